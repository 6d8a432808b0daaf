"""What logprobs, penalties and logit_bias cost.

1. Per row at a 151,936-token vocabulary (the qwen2 tokenizer on a tiny model,
   a 100-token history): a session's draw without and with the penalties
   (repeat, presence, frequency over 64 tokens, 16 biased tokens), greedy and
   sampled, and a token's log probability with 0, 5 and 20 alternatives.
   Medians of interleaved calls, microseconds, the Python call included.
2. The speculative loop's own time per round (everything but the two models'
   decodes, as bench/loop_overhead.py splits it) on the same vocabulary, a
   draft model at k = 4: plain, with logprobs (5 alternatives), with the
   penalties.
3. The demo model (SmolLM2 MoE, Q8_0, 49,152 tokens), greedy: milliseconds
   per generated token without, with logprobs=5, with the penalties
   (generations paired and interleaved).

Writes bench/results/scoring.md.

    .venv/bin/python -P bench/scoring.py [--runs 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pymoe
from pymoe._native import ffi, lib

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE)]  # python -P does not add the script's folder
from loop_overhead import DRAFT, LOOP_PARTS, PROMPT, TARGET, model as qwen2_vocab_model, one_run  # noqa: E402
from report import machine_lines, write  # noqa: E402

DEMO = Path.home() / ".cache" / "pymoe" / "models" / "smollm2-moe-E4-K2-q8_0-noise0.1.gguf"
THREADS = 2
PENALTIES = dict(repeat_penalty=1.1, repeat_last_n=64, presence_penalty=0.5, frequency_penalty=0.5,
                 logit_bias={t: -1.0 for t in range(1000, 1016)})
GREEDY = pymoe.SamplingParams.greedy()
SAMPLED = pymoe.SamplingParams()


def per_row(calls: dict, n: int) -> dict:
    """Median microseconds of each call, interleaved."""
    times = {name: [] for name in calls}
    for _ in range(n):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e6 * statistics.median(t) for name, t in times.items()}


def part_rows(n: int) -> list:
    with pymoe.Model(qwen2_vocab_model("target", TARGET)) as m, m.session(n_ctx=256, n_threads=THREADS) as s:
        s.feed(m.tokenize(PROMPT * 12)[:100])
        out = ffi.new("struct pymoe_logprob *")
        token = s.sample(GREEDY)
        calls = {
            "draw, greedy": lambda: s.sample(GREEDY),
            "draw, greedy, penalties": lambda p=pymoe.SamplingParams(temperature=0, **PENALTIES): s.sample(p),
            "draw, sampled (defaults)": lambda: s.sample(SAMPLED),
            "draw, sampled, penalties": lambda p=pymoe.SamplingParams(**PENALTIES): s.sample(p),
            "logprob, 0 alternatives": lambda: s._c(lib.pymoe_session_logprob, token, 0, out),
            "logprob, 5 alternatives": lambda: s._c(lib.pymoe_session_logprob, token, 5, out),
            "logprob, 20 alternatives": lambda: s._c(lib.pymoe_session_logprob, token, 20, out),
        }
        us = per_row(calls, n)
        n_vocab = m.info.n_vocab
    lines = [f"## Per row, {n_vocab:,} tokens (µs, medians of {n} interleaved calls)", "",
             "| call | µs |", "|---|---|"]
    lines += [f"| {name} | {v:.1f} |" for name, v in us.items()]
    return lines + ["", "The penalties change a few dozen logits in place and put them back (the row is never "
                    f"copied): {us['draw, greedy, penalties'] - us['draw, greedy']:+.1f} µs on a greedy draw, "
                    f"{us['draw, sampled, penalties'] - us['draw, sampled (defaults)']:+.1f} µs on a sampled one, "
                    "within the calls' noise.", ""]


def part_loop(runs: int) -> list:
    cases = {"greedy": (dict(temperature=0.0), None),
             "greedy, logprobs 5": (dict(temperature=0.0), 5),
             "greedy, penalties": (dict(sampling=pymoe.SamplingParams(temperature=0, **PENALTIES)), None),
             "sampled (defaults)": ({}, None),
             "sampled, logprobs 5": ({}, 5),
             "sampled, penalties": (dict(sampling=pymoe.SamplingParams(**PENALTIES)), None)}
    results = {name: [] for name in cases}
    with pymoe.Model(qwen2_vocab_model("target", TARGET)) as target, \
            pymoe.Model(qwen2_vocab_model("draft", DRAFT)) as draft:
        prompt = target.tokenize(PROMPT)
        for run in range(runs):
            for name, (opts, logprobs) in cases.items():
                results[name].append(one_run(target, draft, prompt, 96, opts, logprobs))
                print(f"loop run {run + 1}/{runs}: {name}", file=sys.stderr)
    lines = [f"## The loop's own time per round, k = 4 (ms, medians of {runs} interleaved runs of 96 tokens)", "",
             "| case | loop's own | target model | own / target model | acceptance |", "|---|---|---|---|---|"]
    for name, rs in results.items():
        own = statistics.median(sum(r[0][p] for p in LOOP_PARTS) for r in rs)
        model = statistics.median(r[0]["target model"] for r in rs)
        acc = statistics.median(r[3] for r in rs)
        lines.append(f"| {name} | {own:.3f} | {model:.3f} | {100 * own / model:.1f}% | {acc:.2f} |")
    return lines + ["", "A token's log probability needs the sum of exp over its whole row (the one full pass over a "
                    "row that pymoe makes for a token: a draw reads only block maxima and a few candidates), once per "
                    "emitted token: only when logprobs are asked for. The penalties touch a few dozen logits per row.",
                    ""]


def generation_ms(model, sampling, logprobs, prompt, n) -> float:
    with model.session(n_ctx=1024, n_threads=THREADS, sampling=sampling) as s:
        s.feed(prompt)
        t0 = time.perf_counter()
        got = sum(1 for _ in s.generate_tokens(None, max_tokens=n, logprobs=logprobs, stop_at_eog=False))
        return 1e3 * (time.perf_counter() - t0) / got


def part_demo(runs: int) -> list:
    cases = {"plain": (GREEDY, None), "logprobs 5": (GREEDY, 5),
             "penalties": (pymoe.SamplingParams(temperature=0, **PENALTIES), None)}
    ms = {name: [] for name in cases}
    with pymoe.Model(DEMO) as m:
        prompt = m.tokenize("The history of the Roman Empire begins with")
        for run in range(runs):
            for name, (sampling, logprobs) in cases.items():
                ms[name].append(generation_ms(m, sampling, logprobs, prompt, 64))
            print(f"demo run {run + 1}/{runs}", file=sys.stderr)
        n_vocab = m.info.n_vocab
    base = statistics.median(ms["plain"])
    lines = [f"## The demo model, greedy, 64 tokens ({n_vocab:,}-token vocabulary; medians of {runs} interleaved "
             "generations)", "", "| case | ms per token | vs plain |", "|---|---|---|"]
    for name, values in ms.items():
        med = statistics.median(values)
        lines.append(f"| {name} | {med:.2f} | {med / base:.3f}x |")
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    head = machine_lines(f"{THREADS} threads")
    lines = ["# What logprobs, penalties and logit_bias cost", "",
             "`bench/scoring.py`. Penalties: repeat 1.1, presence 0.5, frequency 0.5 over the last 64 tokens, and "
             "16 tokens with a logit_bias.", "", *head, ""]
    lines += part_rows(2000)
    lines += part_loop(args.runs)
    lines += part_demo(args.runs)
    return write("scoring.md", lines)


if __name__ == "__main__":
    raise SystemExit(main())
