"""Where a speculative round's non-model time goes, at a 151,936-token vocabulary.

Tiny random-weight models (a llama MoE target and a dense draft, written with
tests/tiny_models.py) carry the qwen2 tokenizer, so that every logits row is
152k wide while the models themselves cost little. The loop runs at a fixed
k = 4 in each sampling mode; its statistics split every round into the models'
time and the loop's own: the draft's sampling (transforms and draws), the
target rows' sampling transforms, the verifier, rollback (dropping rejected
positions) and the rest (bookkeeping). pymoe copies no logits: it reads
llama.cpp's output rows in place (llama.cpp's own copy out of the backend is
part of each decode). Medians over runs; writes bench/results/loop_overhead.md.

    .venv/bin/python -P bench/loop_overhead.py [--runs 5] [--tokens 96]
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
from pathlib import Path

import pymoe

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MODELS = HERE / "out" / "models"
sys.path[:0] = [str(REPO / "tests"), str(HERE)]  # python -P does not add the script's folder
import tiny_models  # noqa: E402 - the project's own GGUF writer
from report import machine_lines, write  # noqa: E402

VOCAB = REPO / "vendor" / "llama.cpp" / "models" / "ggml-vocab-qwen2.gguf"
TARGET = tiny_models.ARCHITECTURES["llama-moe"]
DRAFT = tiny_models.PAIR_DRAFT
THREADS = 2
K = 4
PROMPT = "The history of the Roman Empire begins with"
MODES = {  # name: sampling options
    "greedy": dict(temperature=0.0),
    "sampled, top_k 40 (defaults)": dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05),
    "sampled, top_k 0, top_p 0.95, min_p 0.05": dict(temperature=0.8, top_k=0, top_p=0.95, min_p=0.05),
    "sampled, top_k 0, top_p 0.95, min_p 0": dict(temperature=0.8, top_k=0, top_p=0.95, min_p=0.0),
    "sampled, a temperature alone (top_k 0, top_p 1, min_p 0)": dict(temperature=0.8, top_k=0, top_p=1.0, min_p=0.0),
}
PARTS = ["draft model", "draft sampling", "target model", "target sampling", "verifier", "rollback", "bookkeeping"]
LOOP_PARTS = PARTS[1:2] + PARTS[3:]  # the loop's own: everything but the two models


def model(name: str, shape) -> Path:
    MODELS.mkdir(parents=True, exist_ok=True)
    path = MODELS / f"{name}-qwen2vocab-{hashlib.sha256(repr(shape).encode()).hexdigest()[:8]}.gguf"
    if not path.exists():
        tiny_models.VOCAB_GGUF = VOCAB
        tiny_models.write_model(path.with_suffix(".tmp"), shape).rename(path)
    return path


def one_run(target, draft, prompt, tokens, opts, logprobs=None):
    """ms per round of each part, and rows per round (target rows sampled); logprobs: scored tokens (bench/scoring.py)."""
    with pymoe.Speculative(target, draft, draft_max=K, n_ctx=512, n_threads=THREADS, seed=1, **opts) as spec:
        spec.feed(prompt)
        n = len(list(spec.generate_tokens(None, max_tokens=tokens, logprobs=logprobs)))
        st = spec.stats
    r = st.rounds
    other = st.other_seconds - st.target_sampling_seconds - st.verifier_seconds
    parts = {"draft model": st.draft_seconds - st.draft_sampling_seconds, "draft sampling": st.draft_sampling_seconds,
             "target model": st.verify_seconds, "target sampling": st.target_sampling_seconds,
             "verifier": st.verifier_seconds, "rollback": st.rollback_seconds, "bookkeeping": other}
    return {k: 1e3 * v / r for k, v in parts.items()}, (st.drafted + r) / r, n, st.acceptance


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=96)
    args = ap.parse_args()
    head = machine_lines(f"{THREADS} threads, k = {K}")
    with pymoe.Model(model("target", TARGET)) as target, pymoe.Model(model("draft", DRAFT)) as draft:
        prompt = target.tokenize(PROMPT)
        results = {name: [] for name in MODES}
        for run in range(args.runs):  # modes interleaved, so that drift hits each alike
            for name, opts in MODES.items():
                results[name].append(one_run(target, draft, prompt, args.tokens, opts))
                print(f"run {run + 1}/{args.runs}: {name}", file=sys.stderr)
        n_vocab = target.info.n_vocab
    lines = ["# A speculative round's non-model time at a 152k vocabulary", "",
             f"`bench/loop_overhead.py`: tiny llama-MoE target and dense draft with the qwen2 tokenizer "
             f"({n_vocab:,} tokens), {args.tokens} tokens per run, medians of {args.runs} interleaved runs, "
             "milliseconds per round.", "", *head, "",
             "| mode | " + " | ".join(PARTS) + " | loop's own | target rows / round | acceptance |",
             "|---|" + "---|" * (len(PARTS) + 3)]
    for name, runs in results.items():
        med = {p: statistics.median(r[0][p] for r in runs) for p in PARTS}
        own = statistics.median(sum(r[0][p] for p in LOOP_PARTS) for r in runs)
        rows = statistics.median(r[1] for r in runs)
        acc = statistics.median(r[3] for r in runs)
        lines.append(f"| {name} | " + " | ".join(f"{med[p]:.3f}" for p in PARTS) +
                     f" | **{own:.3f}** | {rows:.2f} | {acc:.2f} |")
    lines += ["", "\"loop's own\" is everything but the two models' decodes: the draft's and the target's sampling, "
              "the verifier, rollback and bookkeeping. Per target row, the target's sampling is its column divided "
              "by the rows per round.", ""]
    return write("loop_overhead.md", lines)


if __name__ == "__main__":
    raise SystemExit(main())
