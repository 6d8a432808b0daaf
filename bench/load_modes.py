"""Load modes benchmark: mmap vs no-mmap vs mlock on MoE targets whose experts
live in RAM (on this CPU-only machine, every weight does).

Each measurement runs in a fresh process (so VmLck and the heap start clean),
after dropping the page cache for the cold runs (root only): load time and
throughput, then prefill and decode speed, and the time to the first token
after the load (where mmap pays its page faults). Modes are interleaved
round by round, so drift on a shared machine hits them alike. The peer is
llama.cpp's llama-bench (same vendored source) in its none/mmap/mlock modes.

mlock keeps every weight in plain CPU buffers (llama.cpp locks only host
buffers and its CPU_REPACK buffers are not), so on Q4_0 experts the
mlock-vs-no-mmap ratio is the price of locking them all.

    python -P bench/load_modes.py [--rounds 3] [--cache cold,warm] [--out bench/results/load_modes.md]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEER = REPO / "build" / "peer" / "bin" / "llama-bench"
MODES = ["mmap", "no-mmap", "mlock"]
PEER_MODES = {"mmap": "mmap", "no-mmap": "none", "mlock": "mlock"}
# name: (experts, used, expert type)
TARGETS = {"E64-K8 Q8_0": (64, 8, "q8_0"), "E4-K2 Q4_0": (4, 2, "q4_0")}
THREADS = 2
PROMPT = "Explain how a refrigerator works, step by step, in plain words for a curious child. " * 4


def worker(path: str, mode: str, n_tokens: int) -> dict:
    """One load and one generation, in this (fresh) process."""
    import pymoe
    t0 = time.perf_counter()
    with pymoe.Model(path, load_mode=mode) as model:
        load_s = time.perf_counter() - t0
        r = model.load_report
        with model.session(n_ctx=1024, n_threads=THREADS, sampling=pymoe.SamplingParams.greedy()) as s:
            prompt = model.tokenize(PROMPT)
            t1 = time.perf_counter()
            s.feed(prompt)
            prefill_s = time.perf_counter() - t1
            first = time.perf_counter() - t0  # load + prefill: when the first token can come
            t2 = time.perf_counter()
            n = sum(1 for _ in s.generate(None, max_tokens=n_tokens))
            decode_s = time.perf_counter() - t2
    return dict(mode=r.load_mode, load_s=load_s, gb_per_s=r.bytes_per_second / 1e9, locked=r.locked_bytes,
                host=r.host_bytes, buffers=r.buffers, prefill=len(prompt) / prefill_s, decode=n / decode_s,
                first_token_s=first)


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def run_worker(path: Path, mode: str, n_tokens: int, cold: bool) -> dict:
    if cold:
        drop_caches()
    out = subprocess.run([sys.executable, "-P", __file__, "--worker", str(path), mode, str(n_tokens)],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"worker {mode} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_peer(path: Path, mode: str, n_tokens: int, cold: bool) -> float:
    if cold:
        drop_caches()
    cmd = [str(PEER), "-m", str(path), "-p", "0", "-n", str(n_tokens), "-r", "1", "-t", str(THREADS),
           "-lm", PEER_MODES[mode], "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({out.returncode}):\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout)[0]["avg_ts"])


def machine() -> list[str]:
    import pymoe
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal")), "0")
    return [f"- machine: {cpu}, {os.cpu_count()} CPUs, {int(mem) / 2**20:.0f} GiB RAM, {platform.platform()}",
            f"- pymoe {pymoe.__version__}, llama.cpp {pymoe.llama_version()}, Python {platform.python_version()}",
            f"- {time.strftime('%Y-%m-%d')}, {THREADS} threads"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("PATH", "MODE", "TOKENS"), help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--cache", default="cold,warm",
                        help="cold: drop the page cache before every load (root); warm: file read once before")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "load_modes.md")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], int(args.worker[2]))))
        return 0

    from pymoe.demo_models import smollm2_moe
    lines = ["# Load modes: mmap, no-mmap, mlock", "", *machine(),
             f"- medians of {args.rounds} rounds, modes interleaved; {args.tokens} tokens decoded, greedy;",
             "  \"vs no-mmap\" is the median of the per-round ratios (paired: same round, minutes apart at most)",
             "- peer: llama-bench from the same source, `-lm none|mmap|mlock`, decode of the same number of tokens", ""]
    for cache in args.cache.split(","):
        cold = cache == "cold"
        for name, (experts, used, qtype) in TARGETS.items():
            path = smollm2_moe(experts, used, qtype, noise=0.1)
            results: dict[str, list[dict]] = {m: [] for m in MODES}
            peer: dict[str, list[float]] = {m: [] for m in MODES}
            if not cold:
                path.read_bytes()  # into the page cache once
            for r in range(args.rounds):
                for mode in MODES if r % 2 == 0 else reversed(MODES):
                    results[mode].append(run_worker(path, mode, args.tokens, cold))
                    if PEER.exists():
                        peer[mode].append(run_peer(path, mode, args.tokens, cold))
                    print(f"{cache} {name} round {r + 1} {mode}: {results[mode][-1]['load_s']:.2f} s load, "
                          f"{results[mode][-1]['decode']:.1f} tok/s", file=sys.stderr, flush=True)
            lines += table(f"{name} ({path.stat().st_size / 2**30:.2f} GiB), {cache} page cache", results, peer)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def table(title: str, results: dict[str, list[dict]], peer: dict[str, list[float]]) -> list[str]:
    def med(mode, key):
        return statistics.median(x[key] for x in results[mode])

    def ratio(mode, key):  # paired with no-mmap of the same round
        return statistics.median(a[key] / b[key] for a, b in zip(results[mode], results["no-mmap"]))

    lines = [f"## {title}", "",
             "| mode | load s | load GB/s | locked MiB | buffers | prefill tok/s | prefill vs no-mmap | decode tok/s | "
             "decode vs no-mmap | load + prefill s | llama-bench decode tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        last = results[mode][-1]
        buffers = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in last["buffers"].items())
        peer_ts = f"{statistics.median(peer[mode]):.1f}" if peer[mode] else "(not built)"
        lines.append(f"| {mode} | {med(mode, 'load_s'):.2f} | {med(mode, 'gb_per_s'):.2f} | "
                     f"{last['locked'] / 2**20:.0f} | {buffers} | {med(mode, 'prefill'):.1f} | "
                     f"{ratio(mode, 'prefill'):.3f} | {med(mode, 'decode'):.2f} | {ratio(mode, 'decode'):.3f} | "
                     f"{med(mode, 'first_token_s'):.2f} | {peer_ts} |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
