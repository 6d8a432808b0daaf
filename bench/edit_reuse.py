"""An agent edits an earlier message of its conversation: the serve engine's
next request with a speculative decoder (lookup drafts, greedy) that rewinds to
what the edit left unchanged, against the same request on a context that holds
something else (everything fed again, as before the loop could rewind).

SmolLM2-135M Q4_1 (the demo's draft model, here the target), 2 threads; each
repetition runs both, interleaved; medians of the request's prefill time.
Writes bench/results/edit_reuse.md.

    .venv/bin/python -P bench/edit_reuse.py [--reps 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import pymoe
from pymoe.cli.serve_engine import Engine, Request
from pymoe.demo_models import smollm2, smollm2_moe

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # python -P does not add the script's folder
from report import machine_lines, write  # noqa: E402

SYSTEM = {"role": "system", "content": "You are a careful assistant who answers in three short lines. " * 30}
FIRST = [SYSTEM, {"role": "user", "content": "Summarise the history of Rome in three lines."}]
EDITED = [SYSTEM, {"role": "user", "content": "Summarise the history of Athens in three lines."}]


def one(model, keep: bool, **exact):
    """(prefill seconds, cached tokens, prompt tokens, text) of the edited request."""
    greedy = pymoe.SamplingParams.greedy()
    with pymoe.Speculative(model, "ngram", temperature=0, n_ctx=2048, n_threads=2, warm_start=False,
                           **exact) as spec:
        engine = Engine(spec, n_ctx=2048)
        try:
            engine.submit(Request(messages=FIRST, max_tokens=8, sampling=greedy)).result(600)
            if not keep:
                spec.reset()
                spec.feed(model.tokenize("Something else entirely, " * 8))
            r = engine.submit(Request(messages=EDITED, max_tokens=16, sampling=greedy)).result(600)
        finally:
            engine.close()
    return r.prefill_seconds, r.cached_tokens, r.prompt_tokens, r.text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    with pymoe.Model(smollm2()) as model:
        runs = {True: [], False: []}
        for _ in range(args.reps):
            for keep in (True, False):
                runs[keep].append(one(model, keep))
    texts = {r[3] for rows in runs.values() for r in rows}  # every repetition's, both ways
    exact = dict(flash_attn="off", cache_type_k="f32", cache_type_v="f32")
    with pymoe.Model(smollm2_moe(experts=4, used=2, expert_type="f32", rest_f32=True)) as f32:
        f32_texts = [one(f32, keep, **exact)[3] for keep in (True, False)]
    kept, fresh = (statistics.median(r[0] for r in runs[k]) for k in (True, False))
    lines = ["# An edited conversation: rewind to what it shares, or feed it all again", "",
             f"Run by `bench/edit_reuse.py --reps {args.reps}`: SmolLM2-135M-Instruct Q4_1, lookup drafts "
             "(`Speculative(model, \"ngram\")`), greedy, 2 threads, n_ctx 2048, through `pymoe serve`'s engine. The "
             "first request is a system message and a question; the second edits the question.", "",
             *machine_lines(), "",
             "| the context holds | prompt tokens | reused (`cached_tokens`) | median prefill s |",
             "|---|---|---|---|",
             f"| the first request: the loop rewinds to the shared prefix | {runs[True][0][2]} | "
             f"{runs[True][0][1]} | {kept:.3f} |",
             f"| another conversation: everything is fed | {runs[False][0][2]} | {runs[False][0][1]} | {fresh:.3f} |",
             "", f"Ratio: {fresh / kept:.1f}x less prefill time.", "",
             "The greedy texts (the first repetition's):", "",
             f"- rewound: {runs[True][0][3]!r}", f"- fed again: {runs[False][0][3]!r}", "",
             f"Identical: {'yes' if len(texts) == 1 else 'no'}. On quantized weights the prompt's evaluation in "
             "other batches (the shared part earlier, with the first request) gives slightly different logits in "
             "llama.cpp's kernels, so greedy texts may part where two tokens are close. On F32 weights (the demo's "
             "E4-K2 F32 MoE, F32 cache, one run each way): "
             f"{'identical' if f32_texts[0] == f32_texts[1] else 'DIFFERENT'} ({f32_texts[0]!r}); the tests hold "
             "that on tiny F32 models (`tests/test_serve.py`, `tests/test_loop_context.py`)."]
    return write("edit_reuse.md", lines)


if __name__ == "__main__":
    sys.exit(main())
