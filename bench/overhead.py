"""Python-loop overhead: feed(one token) + sample() from Python vs the same loop in C.

Interleaved runs on SmolLM2-135M with 2 threads: the Python loop, and the same
loop in C (bench/feed_sample_loop.c) called on the same session in the same
process, with a second C run as the noise floor; then Python against the C loop
in its own process. The results are medians of per-round ratios, printed next
to llama.cpp's own llama-bench (-n 128) on the same model, and written with the
machine and versions to bench/results/overhead.md.

    make bench            # or: .venv/bin/python -P bench/overhead.py --pairs 20
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import cffi
import numpy

import pymoe
from pymoe import paths
from pymoe.demo_models import smollm2

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
PROMPT = "The history of the Roman Empire begins"
INSTRUCTION_TOKENS = 32  # under callgrind a token takes about a second


COUNTED_LIB = OUT / "libfeed_sample_loop_counted.so"  # the C loop with callgrind's counting switch


def compile_c_loop(output: Path, *options: str) -> Path:
    """Compile feed_sample_loop.c against the installed libpymoe."""
    OUT.mkdir(exist_ok=True)
    cc = shutil.which("cc") or "gcc"
    subprocess.run([cc, "-O2", "-std=c11", *options, str(HERE / "feed_sample_loop.c"), "-o", str(output),
                    paths.cflags(), *paths.libs().split()], check=True)
    return output


def build_c_loop() -> tuple[Path, Path]:
    """The C loop as a shared library (same process) and as a program (own process)."""
    return (compile_c_loop(OUT / "libfeed_sample_loop.so", "-shared", "-fPIC"),
            compile_c_loop(OUT / "feed_sample_loop", "-DSTANDALONE"))


def python_rounds(session: pymoe.Session, token: int, n_tokens: int) -> int:
    """The loop under test: feed(one token) + sample(), as feed_sample_rounds() in C."""
    greedy = pymoe.SamplingParams.greedy()
    for _ in range(n_tokens):
        session.feed(token)
        token = session.sample(greedy)
    return token


def python_loop(session: pymoe.Session, prompt: list[int], n_tokens: int) -> tuple[float, int]:
    """Mirrors feed_sample_loop() in C: reset and prompt untimed, then the rounds."""
    session.reset()
    session.feed(prompt)
    t0 = time.perf_counter()
    token = python_rounds(session, session.sample(pymoe.SamplingParams.greedy()), n_tokens)
    return time.perf_counter() - t0, token


def run_llama_bench(model: Path, threads: int, n_tokens: int, reps: int) -> dict | None:
    exe = REPO / "build" / "dev" / "bin" / "llama-bench"
    if not exe.exists():
        print("building llama-bench (peer) in build/dev ...", file=sys.stderr, flush=True)
        if subprocess.run(["cmake", "--build", str(REPO / "build" / "dev"), "--target", "llama-bench"]).returncode:
            return None
    cmd = [str(exe), "-m", str(model), "-lm", "none", "-p", "0", "-n", str(n_tokens), "-t", str(threads),
           "-r", str(reps),
           "-o", "json"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stderr[-2000:], file=sys.stderr)
        return None
    row = json.loads(result.stdout)[0]
    return {"cmd": " ".join(["llama-bench"] + cmd[1:]), "tok_s": row["avg_ts"], "stddev": row["stddev_ts"],
            "build": f'{row.get("build_commit", "?")} ({row.get("build_number", "?")})'}


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


C_DECLS = """
double feed_sample_loop(void *, const int32_t *, int, int, int32_t *);
int feed_sample_rounds(void *, int32_t, int, int32_t *);
void count_instructions_toggle(void);
"""


def load_c_loop(path: Path, session: pymoe.Session):
    """The C loop library, and the session's pointer as it takes it."""
    from pymoe._native import ffi as pymoe_ffi
    bench_ffi = cffi.FFI()
    bench_ffi.cdef(C_DECLS)
    c_lib = bench_ffi.dlopen(str(path))
    return bench_ffi, c_lib, bench_ffi.cast("void *", int(pymoe_ffi.cast("uintptr_t", session._ptr)))


def worker(kind: str, tokens: int, threads: int) -> None:
    """Count one loop's instructions (run under callgrind by count_instructions)."""
    with pymoe.Model(smollm2(quiet=True)) as model, model.session(n_ctx=512, n_threads=threads) as session:
        bench_ffi, c_lib, session_c = load_c_loop(COUNTED_LIB, session)
        session.feed(model.tokenize(PROMPT))
        first = session.sample(pymoe.SamplingParams.greedy())
        last = bench_ffi.new("int32_t *")
        # resolve the functions now: cffi builds a function's type on first use, in Python,
        # which must not be counted as part of either loop
        toggle, c_rounds = c_lib.count_instructions_toggle, c_lib.feed_sample_rounds
        toggle()
        if kind == "py":
            python_rounds(session, first, tokens)
        else:
            c_rounds(session_c, first, tokens, last)
        toggle()


def count_instructions(tokens: int) -> dict:
    """Instructions executed by each loop for `tokens` tokens, counted by
    callgrind from the loop's first feed to its last sample (exact, unlike
    time on a shared machine). One thread: with two, the waiting thread's
    spinning would be counted."""
    if not shutil.which("valgrind"):
        raise SystemExit("--instructions needs valgrind (apt-get install valgrind)")
    # valgrind cannot run AVX-512 code: a CPU backend for AVX2 machines, used in place of the native one
    portable = REPO / "build" / "callgrind"
    if not (portable / "bin" / "libggml-cpu.so").exists():
        print("building an AVX2 CPU backend for valgrind in build/callgrind ...", file=sys.stderr, flush=True)
        subprocess.run(["cmake", "-S", str(REPO), "-B", str(portable), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
                        "-DGGML_BMI2=ON", f"-DPython_EXECUTABLE={sys.executable}"], check=True,
                       stdout=subprocess.DEVNULL)
        subprocess.run(["cmake", "--build", str(portable), "--target", "ggml-cpu", "ggml-base"], check=True)
    compile_c_loop(COUNTED_LIB, "-shared", "-fPIC", "-DCOUNT_INSTRUCTIONS")
    counts = {}
    for name, kind in (("py", "py"), ("c", "c"), ("c2", "c")):  # c2: the same C loop again, for the noise
        print(f"callgrind: the {kind} loop, {tokens} tokens ...", file=sys.stderr, flush=True)
        out = OUT / f"callgrind.{name}.out"
        env = dict(os.environ, PYTHONHASHSEED="0", LD_LIBRARY_PATH=str(portable / "bin"))
        subprocess.run(["valgrind", "--tool=callgrind", "--collect-atstart=no", f"--callgrind-out-file={out}",
                        sys.executable, "-P", __file__, "--worker", kind, "--tokens", str(tokens), "--threads", "1"],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        summary = next(line for line in out.read_text().splitlines() if line.startswith("summary:"))
        counts[name] = int(summary.split()[1])
    return counts


def rotate(runs: list, i: int) -> list:
    """Round i runs the loops starting at a different one, so no loop always goes first."""
    k = i % len(runs)
    return runs[k:] + runs[:k]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--results", type=Path, default=HERE / "results" / "overhead.md")
    parser.add_argument("--instructions", action="store_true",
                        help="also count instructions per token with callgrind (a few minutes)")
    parser.add_argument("--worker", choices=["py", "c"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.tokens, args.threads)
        return 0

    model_path = smollm2()
    lib_path, exe = build_c_loop()
    with pymoe.Model(model_path) as model, model.session(n_ctx=512, n_threads=args.threads) as session:
        bench_ffi, c_lib, session_c = load_c_loop(lib_path, session)
        prompt = model.tokenize(PROMPT)
        prompt_c = bench_ffi.new("int32_t[]", prompt)
        last_c = bench_ffi.new("int32_t *")
        c_proc = subprocess.Popen([str(exe), str(model_path), str(args.threads), str(args.tokens),
                                   *map(str, prompt)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

        def py() -> tuple[float, int]:
            return python_loop(session, prompt, args.tokens)

        def c_same_process() -> tuple[float, int]:
            seconds = c_lib.feed_sample_loop(session_c, prompt_c, len(prompt), args.tokens, last_c)
            if seconds < 0:
                raise SystemExit("the C loop failed")
            return seconds, last_c[0]

        def c_own_process() -> tuple[float, int]:
            c_proc.stdin.write("run\n")
            c_proc.stdin.flush()
            seconds, token = c_proc.stdout.readline().split()
            return float(seconds), int(token)

        for run in (py, c_same_process, c_own_process):  # warm up
            run()
        times = {"py": [], "c1": [], "c2": [], "py_b": [], "cp": []}
        for i in range(args.pairs):
            # same process: Python, C, and C again as the noise floor
            lasts = set()
            for name, run in rotate([("py", py), ("c1", c_same_process), ("c2", c_same_process)], i):
                seconds, last = run()
                times[name].append(seconds)
                lasts.add(last)
            # Python against a separate C process
            for name, run in rotate([("py_b", py), ("cp", c_own_process)], i):
                seconds, last = run()
                times[name].append(seconds)
                lasts.add(last)
            if len(lasts) != 1:  # the loops are the same computation: they must end on the same token
                raise SystemExit(f"round {i}: the loops disagree (last tokens {sorted(lasts)})")
            r = times["py"][-1] / times["c1"][-1]
            print(f"round {i + 1:2d}/{args.pairs}: python {args.tokens / times['py'][-1]:6.1f} tok/s, "
                  f"C {args.tokens / times['c1'][-1]:6.1f} tok/s, ratio {r:.4f}", file=sys.stderr, flush=True)
        c_proc.stdin.close()
        c_proc.wait()

    def median_ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    def tok_s(name: str) -> float:
        return args.tokens / statistics.median(times[name])

    ratio = median_ratio("py", "c1")
    floor = median_ratio("c2", "c1")
    ratio_proc = median_ratio("py_b", "cp")
    extra_us = statistics.median((p - c) / args.tokens * 1e6 for p, c in zip(times["py"], times["c1"]))
    peer = run_llama_bench(model_path, args.threads, args.tokens, reps=5)
    instructions = count_instructions(INSTRUCTION_TOKENS) if args.instructions else None
    lines = [
        "# Python-loop overhead",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `bench/overhead.py`: "
        f"{args.pairs} rounds of interleaved runs (the order rotates each round), {args.tokens} tokens per run, "
        f"greedy, {args.threads} threads, SmolLM2-135M-Instruct Q4_1, n_ctx 512, no-mmap load.",
        "",
        f"- machine: {machine()}",
        f"- versions: pymoe {pymoe.__version__}, llama.cpp {pymoe.llama_version()} "
        f"(llama-cpp-python 0.3.36 sdist), Python {platform.python_version()}, cffi {cffi.__version__}, "
        f"numpy {numpy.__version__}",
        "",
        "| loop | median tok/s |",
        "|---|---|",
        f"| Python: `session.feed(tok)` + `session.sample()` | {tok_s('py'):.1f} |",
        f"| C, same process and session: `pymoe_session_feed` + `pymoe_session_sample` | {tok_s('c1'):.1f} |",
        f"| C, its own process (`bench/feed_sample_loop.c -DSTANDALONE`) | {tok_s('cp'):.1f} |",
    ]
    if peer:
        lines.append(f"| llama.cpp `{peer['cmd'].replace(str(model_path), 'SmolLM2.gguf')}` | "
                     f"{peer['tok_s']:.1f} ± {peer['stddev']:.1f} |")
    lines += [
        "",
        "| median of per-round ratios | value |",
        "|---|---|",
        f"| **t_python / t_C, same process (the bar: <= 1.01)** | **{ratio:.4f}** |",
        f"| t_C / t_C, same process (noise floor: the same C loop twice) | {floor:.4f} |",
        f"| t_python / t_C, C in its own process | {ratio_proc:.4f} |",
        "",
        f"Median extra time per token in the Python loop: {extra_us:.1f} µs "
        f"(of {1e6 / tok_s('c1'):.0f} µs per token).",
        "",
        "Per-round t_python / t_C (same process): " + ", ".join(
            f"{p / c:.4f}" for p, c in zip(times["py"], times["c1"])),
        "",
    ]
    if instructions:
        py_i, c_i = instructions["py"], instructions["c"]
        lines += [
            f"Instructions executed by the loop for {INSTRUCTION_TOKENS} tokens (callgrind, counting from the "
            "first feed to the last sample; 1 thread; the AVX2 CPU backend, since valgrind cannot run AVX-512):",
            "",
            "| loop | instructions | per token |",
            "|---|---|---|",
            f"| Python | {py_i:,} | {py_i / INSTRUCTION_TOKENS:,.0f} |",
            f"| C, same process | {c_i:,} | {c_i / INSTRUCTION_TOKENS:,.0f} |",
            f"| C again (run-to-run noise) | {instructions['c2']:,} | {instructions['c2'] / INSTRUCTION_TOKENS:,.0f} |",
            f"| **ratio Python / C** | **{py_i / c_i:.5f}** | {(py_i - c_i) / INSTRUCTION_TOKENS:,.0f} extra |",
            f"| ratio C again / C | {instructions['c2'] / c_i:.5f} | |",
            "",
        ]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
