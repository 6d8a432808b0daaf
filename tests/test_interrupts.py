"""Ctrl-C (SIGINT) stops a load, a prefill or a speculative round within about
a second, frees what a load had taken, and leaves the session usable. Each
test runs a child process and signals it at one or many points."""
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import pymoe
import pymoe.learned
from conftest import SANITIZED

SLOWER = 10 if SANITIZED else 1  # ASan and UBSan: decoding about 10x slower
LATENCY = 2.0 * SLOWER  # seconds from the signal to the child's exit (measured: 0.11-0.18 s in a plain build)

CHILD_PRELUDE = textwrap.dedent("""
    import os, sys, time
    import pymoe

    def rss():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS:"))

    def say(*words):
        print(*words, flush=True)
""")


def as_from_a_terminal():
    """A child's SIGINT as a shell gives it in the foreground: a process started in the background (CI may run
    the suite so) inherits SIGINT ignored, and Python keeps it ignored."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(body: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-P", "-c", CHILD_PRELUDE + textwrap.dedent(body), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal)


def wait_for(child: subprocess.Popen, word: str) -> None:
    for line in child.stdout:
        if line.split()[:1] == [word]:
            return
    raise AssertionError(f"the child ended before saying {word!r}: {child.stderr.read()[-2000:]}")


def interrupt_and_finish(child: subprocess.Popen, after: float) -> tuple[float, str, str]:
    """Send SIGINT after `after` seconds; the seconds until the child exited, and its output."""
    time.sleep(after)
    sent = time.monotonic()
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=60 * SLOWER)
    return time.monotonic() - sent, out, err


PREFILL = """
    model = pymoe.Model(sys.argv[1])
    s = model.session(n_ctx=4096, n_batch=512, n_threads=2)
    tokens = [(7 * i) % 1000 + 100 for i in range(3000)]
    say("feeding")
    t0 = time.monotonic()
    try:
        s.feed(tokens)
        say("completed", time.monotonic() - t0)
    except KeyboardInterrupt:
        s.feed(tokens[:8])  # usable: the aborted feed left it where it was
        say("interrupted", s.position)
"""


def test_ctrl_c_stops_a_long_prefill_within_a_second(smollm2_path):
    child = start(PREFILL, str(smollm2_path))
    wait_for(child, "feeding")
    seconds, out, err = interrupt_and_finish(child, 1.0)
    assert child.returncode == 0, err
    assert out.split() == ["interrupted", "8"], out  # the prefill (several seconds) was cut, position 0 + 8
    assert seconds < LATENCY, f"Ctrl-C took {seconds:.1f} s to stop the prefill"


LOAD = """
    before = rss()
    say("loading")
    try:
        model = pymoe.Model(sys.argv[1], load_mode="no-mmap")
        say("loaded")
        time.sleep(20)  # Ctrl-C must arrive here at the latest
        say("completed")
    except KeyboardInterrupt:
        grown = rss() - before
        say("interrupted", "loaded" if "model" in dir() else "during-load", grown)
"""


@pytest.mark.parametrize("after", [0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5])
def test_ctrl_c_at_any_point_of_a_load_is_raised_and_frees_the_load(smollm2_path, after):
    child = start(LOAD, str(smollm2_path))
    wait_for(child, "loading")
    seconds, out, err = interrupt_and_finish(child, after)
    last = out.splitlines()[-1].split()
    assert "completed" not in out, f"Ctrl-C was lost: {err[-1000:]}"
    assert last[0] == "interrupted", (out, err[-2000:])
    assert seconds < LATENCY
    if last[1] == "during-load" and not SANITIZED:  # ASan keeps freed memory in quarantine
        assert int(last[2]) < 40 << 20, f"an interrupted load kept {int(last[2]) >> 20} MiB"


LOAD_RETURNS = """
    import pymoe.model
    where = sys.argv[2]
    def interrupted_after(fn):
        def call(*args, **kwargs):
            result = fn(*args, **kwargs)
            raise KeyboardInterrupt  # as Python raises a Ctrl-C that came while the C call was ending
        return call
    if where == "as-the-load-returns":
        pymoe.model.run_c = interrupted_after(pymoe.model.run_c)
    else:  # once the model is owned, while its report is read
        pymoe.model.LoadReport._from_c = interrupted_after(pymoe.model.LoadReport._from_c)
    before = rss()
    try:
        pymoe.Model(sys.argv[1], load_mode="no-mmap")
        say("completed")
    except KeyboardInterrupt:
        say("interrupted", rss() - before)
"""


@pytest.mark.parametrize("where", ["as-the-load-returns", "after-it-is-owned"])
def test_a_ctrl_c_raised_as_a_load_ends_frees_the_model_at_once(smollm2_path, where):
    """The window the timed test above hits by chance (once in CI): the load completed in C, and Python raises
    the Ctrl-C before or after the object owns it. The memory is free while the exception is handled."""
    out = subprocess.run([sys.executable, "-P", "-c", CHILD_PRELUDE + textwrap.dedent(LOAD_RETURNS),
                          str(smollm2_path), where], capture_output=True, text=True, timeout=60 * SLOWER)
    last = out.stdout.split()
    assert last[:1] == ["interrupted"], (out.stdout, out.stderr[-2000:])
    if not SANITIZED:
        assert int(last[1]) < 40 << 20, f"the interrupted load kept {int(last[1]) >> 20} MiB"


def interrupted_after(fn, seen=None):
    def call(self, *args, **kwargs):
        if seen is not None:
            seen.append(self)
        fn(self, *args, **kwargs)
        raise KeyboardInterrupt
    return call


def test_a_ctrl_c_raised_as_a_session_is_made_closes_it(smollm2, monkeypatch):
    made = []
    monkeypatch.setattr(pymoe.Session, "seed", interrupted_after(pymoe.Session.seed, made))
    with pytest.raises(KeyboardInterrupt):
        smollm2.session(n_ctx=256)
    assert made and made[0].closed


def test_a_ctrl_c_raised_before_a_session_owns_its_context_frees_it(smollm2, monkeypatch):
    freed = []
    free = pymoe._native._free
    monkeypatch.setattr(pymoe._native, "_free", lambda fn, ptr, *rest: (freed.append(ptr), free(fn, ptr, *rest)))
    monkeypatch.setattr(pymoe.Session, "_own", interrupted_after(lambda *args: None))
    with pytest.raises(KeyboardInterrupt):
        smollm2.session(n_ctx=256)
    assert len(freed) == 1 and freed[0] != pymoe._native.ffi.NULL


@pytest.mark.parametrize("where", ["before-it-is-owned", "after-it-is-owned"])
def test_a_ctrl_c_raised_as_a_loop_is_made_frees_it_and_its_sessions_are_free_again(smollm2, monkeypatch, where):
    if where == "before-it-is-owned":
        monkeypatch.setattr(pymoe.Speculative, "_own", interrupted_after(lambda *args: None))
    else:
        def path_for(*args):
            raise KeyboardInterrupt
        monkeypatch.setattr(pymoe.learned, "path_for", path_for)
    with smollm2.session(n_ctx=256) as target:
        with pytest.raises(KeyboardInterrupt):
            pymoe.Speculative(target, "ngram", draft_max="auto")
        target.feed([1, 2, 3])  # no loop holds it: freed, not left to the collector
        assert target.tokens == [1, 2, 3]


@pytest.mark.parametrize("after", [0.0, 0.2, 0.5, 1.5])  # loading, then the prefill (several seconds)
def test_ctrl_c_ends_a_command_with_130_and_one_line(smollm2_path, tmp_path, after):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the cat sat on the mat and " * 400)
    child = subprocess.Popen([sys.executable, "-P", "-m", "pymoe", "generate", "-m", str(smollm2_path), "-f", prompt,
                              "-n", "100", "--ctx", "4096", "--load", "no-mmap", "-v"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal)
    first = child.stderr.readline()  # llama.cpp's log (-v): pymoe is running and loading (Ctrl-C during Python's
    assert first, child.communicate()  # own start-up is Python's business)
    seconds, out, err = interrupt_and_finish(child, after)
    assert child.returncode == 130, err[-3000:]
    assert "interrupted" in err.strip().splitlines()[-1]
    assert "Traceback" not in err and "Exception ignored" not in err
    assert seconds < LATENCY


SPECULATIVE = """
    model = pymoe.Model(sys.argv[1])
    spec = pymoe.Speculative(model, "ngram", n_ctx=4096, n_batch=512, n_threads=2, temperature=0)
    tokens = [(7 * i) % 1000 + 100 for i in range(3000)]
    say("feeding")
    try:
        spec.feed(tokens)
        say("completed")
    except KeyboardInterrupt:
        spec.reset()
        spec.feed(tokens[:8])
        say("interrupted", len(spec.step()))
"""


def test_ctrl_c_stops_a_speculative_loop_and_reset_brings_it_back(smollm2_path):
    child = start(SPECULATIVE, str(smollm2_path))
    wait_for(child, "feeding")
    seconds, out, err = interrupt_and_finish(child, 1.0)
    assert child.returncode == 0, err
    words = out.split()
    assert words[0] == "interrupted" and int(words[1]) >= 1, out
    assert seconds < LATENCY


def test_a_custom_sigint_handler_still_runs_and_the_feed_stops(smollm2_path):
    body = textwrap.dedent("""
        import signal
        seen = []
        signal.signal(signal.SIGINT, lambda *a: seen.append(1))
    """) + textwrap.dedent(PREFILL).replace(
        "except KeyboardInterrupt:", "except pymoe.AbortedError:").replace("s.position)", "s.position, len(seen))")
    child = start(body, str(smollm2_path))
    wait_for(child, "feeding")
    seconds, out, err = interrupt_and_finish(child, 1.0)
    assert child.returncode == 0, err
    assert out.split() == ["interrupted", "8", "1"], out  # stopped, and the handler ran once
    assert seconds < LATENCY


def test_an_ignored_sigint_stays_ignored(smollm2_path):
    body = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n" + textwrap.dedent(PREFILL).replace(
        "range(3000)", "range(600)")  # long enough to be signalled during it
    child = start(body, str(smollm2_path))
    wait_for(child, "feeding")
    time.sleep(0.5)
    child.send_signal(signal.SIGINT)
    out, err = child.communicate(timeout=120 * SLOWER)
    assert out.split()[0] == "completed", (out, err)
    assert child.returncode == 0
