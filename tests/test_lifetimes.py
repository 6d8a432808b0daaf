"""Lifetimes under any order: the collector, other threads and callbacks cannot
free a C object under a call, and stale logits raise on every path Python sees.

Each test is one of issue 20's repros. Under `make sanitize` a use-after-free
here aborts the run; in a plain build the frees' order is checked directly."""
import gc
import sys
import threading
import time

import numpy as np
import pytest

import pymoe
import pymoe.model
import pymoe.session
from pymoe import _native

N_CTX = dict(n_ctx=1024, n_batch=512, n_ubatch=512, n_threads=1)


class FreeOrder:
    """Stands in for the C library in pymoe.model and pymoe.session: records the frees, calls the real ones."""

    def __init__(self, real):
        self.real, self.freed = real, []

    def __getattr__(self, name):
        value = getattr(self.real, name)
        if name in ("pymoe_model_free", "pymoe_session_free"):
            def free(ptr, name=name, value=value):
                self.freed.append(name)
                value(ptr)
            return free
        return value


class App:
    pass


def frees_of_a_collected_cycle(monkeypatch, build) -> list:
    """Build objects into an App that refers to itself (only the cycle collector frees such a thing), drop it,
    collect, and return the C frees in the order they ran."""
    recorder = FreeOrder(_native.lib)
    monkeypatch.setattr(pymoe.model, "lib", recorder)
    monkeypatch.setattr(pymoe.session, "lib", recorder)
    gc.collect()
    gc.disable()  # the collections below, not one at an allocation in between
    try:
        app = App()
        build(app)
        app.me = app
        del app
        for _ in range(4):  # a model is freed once the finalizers that keep it have run
            gc.collect()
    finally:
        gc.enable()
    return recorder.freed


def test_the_collector_frees_a_session_before_its_model(dense_path, monkeypatch):
    def build(app):
        app.model = pymoe.Model(dense_path)
        app.session = app.model.session(n_ctx=64)
        app.session.feed(app.model.tokenize("hello"))

    assert frees_of_a_collected_cycle(monkeypatch, build) == ["pymoe_session_free", "pymoe_model_free"]


def test_the_collector_frees_a_loop_its_sessions_and_models_in_order(dense_path, monkeypatch):
    def build(app):
        app.model = pymoe.Model(dense_path)
        app.spec = pymoe.Speculative(app.model, "ngram", n_ctx=64)
        app.spec.feed(app.model.tokenize("a b a b a b"))
        app.spec.step()

    assert frees_of_a_collected_cycle(monkeypatch, build) == ["pymoe_session_free", "pymoe_model_free"]


def feeding_thread(session, tokens, errors, started):
    def run():
        started.set()
        try:
            while True:
                session.reset()
                session.feed(tokens)
        except pymoe.PymoeError as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("close", ["session", "model"])
def test_close_from_another_thread_waits_for_the_running_decode(dense_path, close):
    model = pymoe.Model(dense_path)
    session = model.session(**N_CTX)
    tokens = [(7 * i) % model.info.n_vocab for i in range(500)]
    errors, started = [], threading.Event()
    thread = feeding_thread(session, tokens, errors, started)
    started.wait()
    time.sleep(0.3)  # inside a feed, most likely
    (session if close == "session" else model).close()
    thread.join(30)
    assert not thread.is_alive()
    assert session.closed
    assert len(errors) == 1 and isinstance(errors[0], (pymoe.ClosedError, pymoe.BusyError))
    model.close()


def test_one_session_from_two_threads_is_a_clear_error(dense_model):
    with dense_model.session(**N_CTX) as session:
        tokens = [(3 * i) % dense_model.info.n_vocab for i in range(400)]
        errors, started = [], threading.Event()
        thread = feeding_thread(session, tokens, errors, started)
        started.wait()
        seen = None
        deadline = time.monotonic() + 20
        while seen is None and time.monotonic() < deadline:
            try:
                session.feed(5)
            except pymoe.BusyError as exc:
                seen = exc
        session.close()
        thread.join(30)
    assert seen is not None and "another thread" in str(seen)


@pytest.fixture
def spec(dense_model):
    with pymoe.Speculative(dense_model, dense_model, draft_max=3, temperature=0, n_ctx=256, n_threads=1) as loop:
        loop.feed(dense_model.tokenize("Once upon a time"))
        yield loop


@pytest.mark.parametrize("victim", ["loop", "target", "draft", "model"])
def test_a_callback_cannot_close_what_is_running(spec, victim):
    obj = {"loop": spec, "target": spec.target, "draft": spec.draft, "model": spec.target.model}[victim]
    spec.set_inspect(lambda *round_: obj.close())
    with pytest.raises(pymoe.BusyError, match="from inside its own call"):
        spec.step()
    assert not obj.closed and not spec.closed
    spec.set_inspect(None)
    assert len(spec.step()) >= 1  # the loop goes on


@pytest.mark.parametrize("call", ["feed", "step", "reset", "position"])
def test_a_callback_cannot_re_enter_the_loop(spec, call):
    actions = {"feed": lambda: spec.feed([5, 6]), "step": spec.step, "reset": spec.reset,
               "position": lambda: spec.position}
    spec.set_inspect(lambda *round_: actions[call]())
    position = spec.position
    with pytest.raises(pymoe.BusyError):
        spec.step()
    spec.set_inspect(None)
    assert spec.position > position  # the round itself completed


STALE_PATHS = {
    "flat": lambda v: v.flat[0],
    "base": lambda v: v.base[0],
    "data": lambda v: v.data,
    "ctypes": lambda v: v.ctypes.data,
    "interface": lambda v: v.__array_interface__,
    "T": lambda v: v.T[0],
    "real": lambda v: v.real[0],
    "index": lambda v: v[0],
    "ufunc": lambda v: np.exp(v),
    "function": lambda v: np.argmax(v),
    "probs": lambda v: pymoe.SamplingParams().probs(v),
    "asarray-probs": lambda v: pymoe.SamplingParams().probs(np.asarray(v)),
    "asarray-sample": lambda v: pymoe.SamplingParams().sample(np.asarray(v)[None][0], pymoe.Rng(1)),
}
if sys.version_info >= (3, 12):
    STALE_PATHS["memoryview"] = memoryview


@pytest.mark.parametrize("path", sorted(STALE_PATHS))
@pytest.mark.parametrize("after", ["close", "feed", "reset"])
def test_every_path_of_a_stale_view_raises(dense_model, path, after):
    session = dense_model.session(n_ctx=64)
    session.feed(dense_model.tokenize("hello"))
    view = session.logits()
    STALE_PATHS[path](view)  # fresh: fine
    {"close": session.close, "feed": lambda: session.feed(5), "reset": session.reset}[after]()
    with pytest.raises(pymoe.StaleLogitsError):
        STALE_PATHS[path](view)
    session.close()


def test_what_escapes_the_check_reads_the_old_logits_never_freed_memory(dense_model):
    """Before Python 3.12 the buffer protocol cannot be checked: memoryview of
    a stale view (and bytes of that) then reads the logits it was taken with
    (the copy its views own), whatever the session did since, closing
    included; np.asarray aliases likewise."""
    session = dense_model.session(n_ctx=64)
    session.feed(dense_model.tokenize("hello"))
    first = session.logits()
    want = first.copy()
    alias = np.asarray(first)
    session.feed(5)
    second = session.logits()  # a view is alive: the next copy goes elsewhere
    assert not np.array_equal(second.copy(), want)
    session.close()
    assert np.array_equal(alias, want)
    with pytest.raises(pymoe.StaleLogitsError):
        bytes(first)  # numpy asks __index__ first, which is checked
    if sys.version_info < (3, 12):
        assert np.array_equal(np.frombuffer(memoryview(first), np.float32), want)
        assert bytes(memoryview(first)) == want.tobytes()
    else:
        with pytest.raises(pymoe.StaleLogitsError):
            memoryview(first)


def test_token_pieces_from_many_threads_are_right(dense_model):
    tokens = list(range(dense_model.info.n_vocab))
    expected = [dense_model.token_piece(t) for t in tokens]
    wrong = []

    def run(offset):
        for i in range(20_000):
            t = (i * 7 + offset) % len(tokens)
            if dense_model.token_piece(t) != expected[t]:
                wrong.append(t)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_several_threads_on_several_sessions_of_one_model_decode_as_one_thread_does(dense_model):
    prompts = ["Once upon a time", "The quick brown fox", "1 2 3 4", "hello there"]

    def greedy(prompt):
        with dense_model.session(n_ctx=128, n_threads=1, sampling=pymoe.SamplingParams.greedy()) as s:
            return "".join(t.text for t in s.generate(prompt, max_tokens=24))

    expected = [greedy(p) for p in prompts]
    got = [[] for _ in prompts]

    def run(i):
        for _ in range(3):
            got[i].append(greedy(prompts[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [[e] * 3 for e in expected]
