"""Decode speed by thread count, on a quiet machine and next to a CPU hog.

Plain greedy decoding of the demo models (SmolLM2-135M Q4_1 and the MoE
upcycled from it) at 1 and 2 threads and at the default (0: one per physical
core, as llama.cpp's tools count them), first alone, then with a background
process spinning on one CPU. Settings interleaved, medians of --repeats runs;
writes bench/results/threads.md.

    .venv/bin/python -P bench/threads.py [--repeats 3] [--tokens 64]
"""
from __future__ import annotations

import argparse
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
THREADS = [1, 2, 0]  # 0: the default
HOG = [sys.executable, "-c", "while True: pass"]


def decode_rate(model, threads: int, tokens: int) -> float:
    with model.session(n_ctx=512, n_threads=threads, sampling=pymoe.SamplingParams.greedy()) as s:
        s.feed(model.tokenize(PROMPT))
        t0 = time.perf_counter()
        n = len(list(s.generate_tokens(None, max_tokens=tokens)))
        return n / (time.perf_counter() - t0)


def measure(models, repeats: int, tokens: int) -> dict:
    rates = {(name, t): [] for name in models for t in THREADS}
    for _ in range(repeats):
        for name, model in models.items():
            for t in THREADS:
                rates[(name, t)].append(decode_rate(model, t, tokens))
    return {key: statistics.median(v) for key, v in rates.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    head = machine_lines()
    paths = {"SmolLM2-135M Q4_1": smollm2(),
             "MoE from SmolLM2 (4 experts, 2 used, Q8_0)": smollm2_moe(experts=4, used=2, expert_type="q8_0")}
    models = {name: pymoe.Model(path) for name, path in paths.items()}
    try:
        default = models[next(iter(models))].session(n_ctx=64)
        n_default = default.n_threads
        default.close()
        print("alone ...", file=sys.stderr)
        alone = measure(models, args.repeats, args.tokens)
        hog = subprocess.Popen(HOG)
        try:
            time.sleep(1.0)
            print("next to a CPU hog ...", file=sys.stderr)
            busy = measure(models, args.repeats, args.tokens)
        finally:
            hog.kill()
            hog.wait()
    finally:
        for m in models.values():
            m.close()
    label = {1: "1", 2: "2", 0: f"default ({n_default})"}
    lines = ["# Decode speed by thread count", "",
             f"`bench/threads.py`: plain greedy decoding, {args.tokens} tokens per run, medians of {args.repeats} "
             "interleaved runs, tokens/s; the hog is one process spinning on one CPU.", "",
             *head, "",
             "| model | threads | alone | next to a CPU hog |", "|---|---|---|---|"]
    for name in models:
        for t in THREADS:
            lines.append(f"| {name} | {label[t]} | {alone[(name, t)]:.1f} | {busy[(name, t)]:.1f} |")
    return write("threads.md", lines)


if __name__ == "__main__":
    raise SystemExit(main())
