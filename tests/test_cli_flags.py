"""The commands as a llama.cpp user types them (-ngl, -md, -c, -t, -s, ...,
-n -1, -s -1, -ot), and the rough edges a new user hit: each one here."""
import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tiny_models
from pymoe.cli import chat, generate, serve
from pymoe.cli.common import UsageError

LLAMA_NAMES = [  # (llama.cpp's spelling, pymoe's own)
    (["-ngl", "99"], ["--ngl", "99"]),
    (["--n-gpu-layers", "99"], ["--ngl", "99"]),
    (["-md", "d.gguf"], ["--draft", "d.gguf"]),
    (["--model-draft", "d.gguf"], ["-d", "d.gguf"]),
    (["-ngld", "0"], ["--n-gpu-layers-draft", "0"]),
    (["-c", "1024"], ["--ctx", "1024"]),
    (["--ctx-size", "1024"], ["--ctx", "1024"]),
    (["-t", "3"], ["--threads", "3"]),
    (["-s", "7"], ["--seed", "7"]),
    (["-s", "-1"], []),  # -1: a random seed, as with no seed
    (["-ctk", "q8_0", "-ctv", "q8_0"], ["--cache-type-k", "q8_0", "--cache-type-v", "q8_0"]),
    (["-fa"], ["--flash-attn", "on"]),
    (["-fa", "off"], ["--flash-attn", "off"]),
    (["-ub", "64", "-b", "128"], ["--ubatch", "64", "--batch", "128"]),
    (["--ubatch-size", "64", "--batch-size", "128"], ["--ubatch", "64", "--batch", "128"]),
    (["--mlock"], ["--load", "mlock"]),
    (["--no-mmap"], ["--load", "no-mmap"]),
    (["-ncmoe", "3"], ["--n-cpu-moe", "3"]),
    (["-ot", "exps=CPU,blk\\.0\\.=CPU"], ["--override-tensor", "exps=CPU", "--override-tensor", "blk\\.0\\.=CPU"]),
    (["-n", "-1"], ["--n-predict", "-1"]),
    (["--predict", "5"], ["-n", "5"]),
]
SERVE_NAMES = [(["-cram", "512"], ["--cache-ram", "512"])]


def flattened(ns):
    d = dict(vars(ns))
    d["override_tensor"] = [p for pairs in d["override_tensor"] for p in pairs]
    return d


@pytest.mark.parametrize("command", [generate, chat, serve])
@pytest.mark.parametrize("llama, ours", LLAMA_NAMES, ids=[" ".join(a) for a, _ in LLAMA_NAMES])
def test_llama_cpp_names_mean_what_pymoe_names_mean(command, llama, ours):
    base = ["-m", "t.gguf"] + (["-p", "x"] if command is generate else [])
    parser = command.build_parser()
    assert flattened(parser.parse_args(base + llama)) == flattened(parser.parse_args(base + ours))


@pytest.mark.parametrize("llama, ours", SERVE_NAMES)
def test_llama_server_names_mean_what_pymoe_serve_names_mean(llama, ours):
    parser = serve.build_parser()
    assert flattened(parser.parse_args(["-m", "t.gguf"] + llama)) == flattened(parser.parse_args(["-m", "t.gguf"] + ours))
    with pytest.raises(UsageError, match=re.escape("--cache-ram: -2 is outside")):
        parser.parse_args(["-m", "t.gguf", "--cache-ram", "-2"])


def test_today_s_names_still_work_and_bad_values_are_one_line():
    p = generate.build_parser()
    a = p.parse_args(["-m", "t", "-p", "x", "--ngl", "5", "--ctx", "300", "--threads", "2", "--seed", "3",
                      "--flash-attn", "off", "--load", "mmap", "--draft-max", "auto", "-d", "mtp"])
    assert (a.ngl, a.ctx, a.threads, a.seed, a.flash_attn, a.load, a.draft) == (5, 300, 2, 3, "off", "mmap", "mtp")
    for bad, message in ((["-ngl", "x"], "-ngl/--ngl"), (["-s", "-2"], "-s/--seed: -2 is outside"),
                         (["-ot", "nodevice"], "is not PATTERN=DEVICE"), (["-t", "100000"], "outside [0, 512]"),
                         (["-fa", "maybe"], "invalid choice"), (["--temp", "nan"], "'nan' is not a finite number"),
                         (["--top-p", "inf"], "'inf' is not a finite number")):
        with pytest.raises(UsageError, match=re.escape(message)):
            p.parse_args(["-m", "t", "-p", "x", *bad])


def run(*args, timeout=120, env=None):
    return subprocess.run([sys.executable, "-P", "-m", "pymoe", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def pair(model_dir):
    target = tiny_models.write_model(model_dir / "flags-moe.gguf", tiny_models.ARCHITECTURES["llama-moe"])
    draft = tiny_models.write_model(model_dir / "flags-draft.gguf", tiny_models.PAIR_DRAFT)
    return target, draft


def test_a_llama_cpp_command_line_runs_and_says_what_pymoe_s_says(pair):
    target, draft = pair
    llama = run("generate", "-m", target, "-md", draft, "-ngl", "99", "-ngld", "99", "-c", "512", "-t", "2", "-s", "1",
                "-fa", "off", "-ctk", "f32", "-ctv", "f32", "-ub", "64", "-b", "128", "--no-mmap", "-n", "12",
                "--temp", "0", "-ot", "exps=CPU", "-p", "The sea", "--json")
    ours = run("generate", "-m", target, "--draft", draft, "--ctx", "512", "--threads", "2", "--seed", "1",
               "--flash-attn", "off", "--cache-type-k", "f32", "--cache-type-v", "f32", "--ubatch", "64", "--batch",
               "128", "--load", "no-mmap", "-n", "12", "--temp", "0", "-p", "The sea", "--json")
    assert llama.returncode == 0 and ours.returncode == 0, llama.stderr + ours.stderr
    a, b = json.loads(llama.stdout), json.loads(ours.stdout)
    assert a["tokens"] == b["tokens"] and len(a["tokens"]) == 12
    assert a["draft_source"] == "model"


def test_minus_one_predicts_until_the_context_is_full(pair):
    r = run("generate", "-m", pair[0], "-p", "Hi", "-n", "-1", "-c", "256", "-t", "2", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["stop_reason"] in ("context_full", "eog")
    if out["stop_reason"] == "context_full":
        assert out["n_prompt"] + out["n_generated"] == 256


def test_an_unknown_device_in_an_override_is_one_line(pair):
    r = run("generate", "-m", pair[0], "-p", "Hi", "-ot", "exps=CUDA7", "-n", "1")
    assert r.returncode == 2 and "CUDA7" in r.stderr and "Traceback" not in r.stderr


def test_vram_and_hand_placement_are_not_mixed(pair):
    r = run("generate", "-m", pair[0], "-p", "Hi", "--vram", "8GiB", "-ngl", "3")
    assert r.returncode == 2 and "--vram plans the placement itself; -ngl" in r.stderr


def test_vram_without_a_gpu_says_so(pair):
    r = run("generate", "-m", pair[0], "-p", "Hi", "--vram", "8GiB", "-n", "2", "-t", "2")
    if "CUDA" in run("--version").stdout.split("\n", 1)[1] and "devices: CPU only" not in run("--version").stdout:
        pytest.skip("this machine has a GPU")
    assert r.returncode == 0, r.stderr
    assert "no GPU found" in r.stderr and "everything runs from RAM" in r.stderr


def test_plan_without_a_gpu_says_so_plainly(pair):
    r = run("plan", "-m", pair[0])
    if "devices: CPU only" not in run("--version").stdout:
        pytest.skip("this machine has a GPU")
    assert r.returncode == 0, r.stderr
    assert "no GPU found, so everything runs from RAM" in r.stdout
    assert "0 of" not in r.stdout and "budget 0 MiB" not in r.stdout


def test_a_small_ctx_is_rounded_up_out_loud(pair):
    r = run("generate", "-m", pair[0], "-p", "Hi", "--ctx", "32", "-n", "2", "-t", "2")
    assert r.returncode == 0, r.stderr
    assert "--ctx 32: the context holds 256 tokens" in r.stderr


def test_json_draft_max_is_always_a_number(pair):
    for extra in ([], ["-d", "ngram"], ["-d", "ngram", "--draft-max", "3"]):
        r = run("generate", "-m", pair[0], "-p", "Hi Hi Hi", "-n", "4", "-t", "2", "--json", *extra)
        out = json.loads(r.stdout)
        assert type(out["draft_max"]) is int and type(out["auto_draft"]) is bool, out
    assert (out["draft_max"], out["auto_draft"]) == (3, False)


def test_an_empty_prompt_never_shows_a_c_function(pair, model_dir):
    r = run("generate", "-m", pair[0], "-p", "", "-n", "2", "-t", "2")
    assert r.returncode in (0, 2) and "pymoe_" not in r.stderr, r.stderr
    no_bos = tiny_models.write_model(model_dir / "flags-nobos.gguf", tiny_models.DENSE, add_bos=False)
    r = run("generate", "-m", no_bos, "-p", "", "-n", "2", "-t", "2")
    assert r.returncode == 2 and "the prompt is empty" in r.stderr and "pymoe_" not in r.stderr


def test_upcycle_errors_are_one_line_and_exit_2_and_its_log_is_short(tmp_path, model_dir):
    r = run("upcycle", tmp_path / "missing.gguf", tmp_path / "out.gguf")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "missing.gguf" in r.stderr
    r = run("upcycle", tmp_path / "missing.gguf", tmp_path / "out.gguf", "--experts", "0")
    assert r.returncode == 2 and "--experts: 0 is outside" in r.stderr
    moe = tiny_models.write_model(model_dir / "flags-moe2.gguf", tiny_models.ARCHITECTURES["llama-moe"])
    r = run("upcycle", moe, tmp_path / "out.gguf")
    assert r.returncode == 2 and "already a MoE" in r.stderr and "Traceback" not in r.stderr
    dense = tiny_models.write_model(model_dir / "flags-dense.gguf", tiny_models.DENSE)
    r = run("upcycle", dense, tmp_path / "up.gguf")  # stderr is a pipe here: a line per quarter, not per tensor
    assert r.returncode == 0, r.stderr
    assert 1 <= len(r.stderr.strip().splitlines()) <= 4, r.stderr


def test_load_progress_is_silent_when_stderr_is_not_a_terminal(pair):
    r = run("generate", "-m", pair[0], "-p", "Hi", "-n", "2", "-t", "2")
    assert "loading" not in r.stderr and "\r" not in r.stderr


def test_pymoe_rpc_server_is_a_console_command():
    exe = Path(sys.executable).parent / "pymoe-rpc-server"
    assert exe.exists(), "pip did not install the pymoe-rpc-server command"
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "--port" in r.stdout + r.stderr


def pty_chat(model, keys, *args, timeout=60):
    """pymoe chat on a pseudo-terminal (readline is on): type keys (a list of
    strings, each sent when the output goes quiet); returns (exit code, output)."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-P", "-m", "pymoe", "chat", "-m", str(model), "--temp", "0",
                                  "--ctx", "512", "-t", "2", "-n", "4", *args])
    out = b""
    deadline = time.monotonic() + timeout

    def drain(quiet=0.5):
        nonlocal out
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], quiet)
            if not ready:
                return
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                return
            if not chunk:
                return
            out += chunk

    drain(2.0)
    for k in keys:
        while b"> " not in out.rsplit(b"\n", 1)[-1] and time.monotonic() < deadline:  # wait for the prompt
            drain(0.2)
        os.write(fd, k.encode())
        drain()
    drain()
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


@pytest.fixture(scope="module")
def chat_model(model_dir):
    return tiny_models.write_model(model_dir / "flags-chat.gguf", tiny_models.DENSE, chat_template=tiny_models.CHATML)


def test_chat_edits_lines_and_knows_its_commands(chat_model):
    # "/hel", left arrow, right arrow, "p": with line editing that is /help, not text for the model
    code, out = pty_chat(chat_model, ["/hel\x1b[D\x1b[Cp\r", "/nonsense\r", "/exit\r"])
    assert code == 0, out
    assert "/stats" in out and "/reset" in out  # the help text
    assert "unknown command /nonsense" in out
    assert "[D" not in out.replace("\x1b[D", "")  # the arrows never reached the model as text


def test_chat_ctrl_d_leaves_cleanly_on_a_fresh_line(chat_model):
    code, out = pty_chat(chat_model, ["Hello\r", "\x04"])
    assert code == 0, out
    assert out.endswith("\n") or out.endswith("\r\n"), repr(out[-40:])
    assert "Traceback" not in out


def test_the_readme_examples_run_from_the_clone_s_root(pair, tmp_path):
    """As printed in the README, from the clone's root with the venv's bin on PATH."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    target, draft = pair
    r = subprocess.run(["python", "examples/speculative.py", str(target), str(draft), "Once upon"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "acceptance" in r.stderr, r.stderr
    exe = tmp_path / "speculative"
    r = subprocess.run(f"cc examples/speculative.c -o {exe} $(pymoe --cflags --libs) && {exe} {target} {draft} Hi 8 2",
                       shell=True, cwd=root, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
