"""Does the default load mode cost decode speed? Warm decode after each load
mode, each load in a fresh process, processes alternating in pairs.

For each of the repo's models (SmolLM2-135M Q4_1, the demo's E4-K2 Q8_0 MoE)
and each pair: one process per mode (the order alternates), each loading the
model, decoding 16 tokens to warm up, then --runs x 64 greedy tokens, and
reporting its median tokens/s. The result is the median over pairs of each
mode's ratio to the first mode's (auto, the default) in the same pair. Writes bench/results/load_mode_decode.md.

    .venv/bin/python -P bench/load_mode_decode.py [--pairs 8] [--modes auto,mmap,no-mmap]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pymoe
from pymoe.demo_models import smollm2, smollm2_moe

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # python -P does not add the script's folder
from report import machine_lines, write  # noqa: E402
PROMPT = "The history of the Roman Empire begins"
THREADS = 2


def worker(path: str, mode: str, runs: int) -> None:
    with pymoe.Model(path, load_mode=mode) as m:
        rates = []
        with m.session(n_ctx=512, n_threads=THREADS, sampling=pymoe.SamplingParams.greedy()) as s:
            s.feed(m.tokenize(PROMPT))
            list(s.generate_tokens(None, max_tokens=16))  # warm: first-use costs are not decode speed
            for _ in range(runs):
                s.reset()
                s.feed(m.tokenize(PROMPT))
                t0 = time.perf_counter()
                n = len(list(s.generate_tokens(None, max_tokens=64)))
                rates.append(n / (time.perf_counter() - t0))
        report = m.load_report
    print(json.dumps({"tps": statistics.median(rates), "mode_used": report.load_mode,
                      "load_s": report.load_seconds}))


def one(path: Path, mode: str, runs: int) -> dict:
    out = subprocess.run([sys.executable, "-P", __file__, "--worker", str(path), mode, str(runs)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--modes", default="auto,mmap,no-mmap")
    ap.add_argument("--label", default="", help="a note on the run (e.g. the THP setting), printed with it")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], int(args.worker[2]))
        return 0
    modes = args.modes.split(",")
    models = {"SmolLM2-135M Q4_1": smollm2(), "MoE from SmolLM2 (E4-K2 Q8_0)": smollm2_moe(experts=4, used=2,
                                                                                           expert_type="q8_0")}
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    lines = ["# Warm decode speed by load mode", "",
             f"`bench/load_mode_decode.py`: each load in a fresh process, {args.pairs} pairs with the order "
             f"alternating, each process the median of {args.runs} x 64 greedy tokens after 16 to warm up, "
             f"{THREADS} threads; each mode's ratio to the first one ({modes[0]}) in the same pair, medians "
             "(and range) over pairs.", "",
             *machine_lines(f"transparent huge pages: {thp.read_text().strip() if thp.exists() else '?'}"
                            + (f"; {args.label}" if args.label else "")), "",
             f"| model | mode (as loaded) | load s (median) | tokens/s (median) | x {modes[0]} (median of pairs) | "
             "range |", "|---|---|---|---|---|---|"]
    for name, path in models.items():
        rows = {m: [] for m in modes}
        loads = {m: [] for m in modes}
        used = {}
        for p in range(args.pairs):
            order = modes if p % 2 == 0 else modes[::-1]
            for m in order:
                r = one(path, m, args.runs)
                rows[m].append(r["tps"])
                loads[m].append(r["load_s"])
                used[m] = r["mode_used"]
            print(f"{name}: pair {p + 1}/{args.pairs}", file=sys.stderr)
        ref = modes[0]
        for m in modes:
            ratios = [rows[m][i] / rows[ref][i] for i in range(args.pairs)]
            lines.append(f"| {name} | {m} ({used[m]}) | {statistics.median(loads[m]):.2f} | "
                         f"{statistics.median(rows[m]):.1f} | {statistics.median(ratios):.3f} | "
                         f"{min(ratios):.3f}-{max(ratios):.3f} |")
    return write("load_mode_decode.md", lines)


if __name__ == "__main__":
    raise SystemExit(main())
