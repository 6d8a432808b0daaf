"""What a constraint (a JSON schema) costs per token, and the engine behind it.

1. The demo model (SmolLM2 MoE, Q8_0, 49,152 tokens) answers a chat under a
   JSON schema, greedily. The same tokens are then decoded again, paired and
   interleaved, by a plain session without the constraint and with it (the
   constrained draw and the grammar's advance): the difference is the
   constraint's cost per token, as a fraction of a decode step. Greedy and
   sampled (the default transforms).
2. Under the constraint, each draft source against plain constrained
   decoding of the same answer (tokens per second, paired and interleaved).
3. Per row at a 151,936-token vocabulary (the qwen2 tokenizer on a tiny
   model): the constrained distribution when the transforms' kept tokens
   include an allowed one (the common case: a check of the kept tokens), and
   when none is allowed (the whole row masked), beside llguidance's token mask
   for the same schema, along the answer, when the `llguidance` package is installed
   (`pip install llguidance`; not a dependency of pymoe).

Writes bench/results/constrained.md.

    .venv/bin/python -P bench/constrained.py [--runs 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import pymoe
from pymoe.grammar import Grammar, constrained_sample

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "tests"), str(HERE)]  # python -P does not add the script's folder
from loop_overhead import TARGET, model as qwen2_vocab_model  # noqa: E402
from report import machine_lines, write  # noqa: E402

MODELS = Path.home() / ".cache" / "pymoe" / "models"
DEMO = MODELS / "smollm2-moe-E4-K2-q8_0-noise0.1.gguf"
DRAFT = MODELS / "SmolLM2-135M-Instruct.Q4_1.gguf"
THREADS = 2
CITY = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40},
    "population": {"type": "integer"},
    "landmarks": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 4}},
    "required": ["city", "country", "population", "landmarks"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe Paris as JSON with its country, population and landmarks."}]
SAMPLED = pymoe.SamplingParams()  # the defaults: top_k 40, top_p 0.95, min_p 0.05, temperature 0.8


def replay(target, prompt, tokens, sampling, constrained):
    """Seconds to decode tokens after prompt, drawing each (and advancing the grammar) as generation would."""
    with target.session(n_ctx=1024, n_threads=THREADS, sampling=sampling, seed=1) as s:
        s.feed(prompt)
        g = Grammar.from_json_schema(target, CITY) if constrained else None
        t0 = time.perf_counter()
        for t in tokens:
            if g is None:
                s.sample()
            else:
                constrained_sample(s, g)
                g.accept(t)
            s.feed(t)
        seconds = time.perf_counter() - t0
        if g is not None:
            g.close()
    return seconds


def masked_whole(target, prompt, tokens) -> int:
    """How many of the answer's greedy rows have a most likely token the schema forbids: the rows whose draw
    masks the whole row (the rest cost a check of one token)."""
    n = 0
    with target.session(n_ctx=1024, n_threads=THREADS) as s, Grammar.from_json_schema(target, CITY) as g:
        s.feed(prompt)
        for t in tokens:
            n += not g.allows(int(np.argmax(s.logits())))
            g.accept(t)
            s.feed(t)
    return n


def part_cost(target, prompt, tokens, runs):
    lines = ["## 1. The constraint's cost per token (demo model)", "",
             f"The demo model's greedy answer under the schema: {len(tokens)} tokens, decoded again without and "
             f"with the constraint; medians of {runs} interleaved pairs. At {masked_whole(target, prompt, tokens)} "
             f"of the {len(tokens)} positions the model's most likely token is one the schema forbids: there the "
             "greedy draw masks the whole row.", "",
             "| draw | plain, ms/token | constrained, ms/token | constraint's cost |", "|---|---|---|---|"]
    for name, sampling in (("greedy", pymoe.SamplingParams.greedy()), ("sampled (defaults)", SAMPLED)):
        plain, constrained = [], []
        for _ in range(runs):
            plain.append(replay(target, prompt, tokens, sampling, False))
            constrained.append(replay(target, prompt, tokens, sampling, True))
        p, c = statistics.median(plain), statistics.median(constrained)
        ratio = statistics.median(b / a for a, b in zip(plain, constrained))
        lines.append(f"| {name} | {1e3 * p / len(tokens):.2f} | {1e3 * c / len(tokens):.2f} | "
                     f"**{100 * (ratio - 1):+.1f}%** |")
        print(f"cost: {name} {ratio:.3f}", file=sys.stderr)
    return lines


def generate(decoder, prompt, sampling_kw):
    t0 = time.perf_counter()
    out = list(decoder.generate_tokens(prompt, max_tokens=200))
    return out, time.perf_counter() - t0


def part_speculation(target, draft, prompt, runs):
    lines = ["", "## 2. Speculation under the constraint (demo model, greedy)", "",
             f"The same answer from each decoder (checked), tokens per second; medians of {runs} interleaved runs, "
             "and the median of the paired ratios to plain constrained decoding.", "",
             "| decoder | tokens/s | vs plain | acceptance |", "|---|---|---|---|"]
    makers = {"plain": lambda: target.session(n_ctx=1024, n_threads=THREADS,
                                              sampling=pymoe.SamplingParams(temperature=0, json_schema=CITY)),
              "draft model (SmolLM2-135M), k 3": lambda: pymoe.Speculative(
                  target, draft, draft_max=3, temperature=0, json_schema=CITY, n_ctx=1024, n_threads=THREADS),
              "draft model, auto": lambda: pymoe.Speculative(
                  target, draft, draft_max="auto", warm_start=False, temperature=0, json_schema=CITY, n_ctx=1024,
                  n_threads=THREADS),
              "lookup (ngram), auto": lambda: pymoe.Speculative(
                  target, "ngram", warm_start=False, temperature=0, json_schema=CITY, n_ctx=1024, n_threads=THREADS)}
    times = {name: [] for name in makers}
    acceptance = {}
    want = None
    for _ in range(runs):
        for name, make in makers.items():
            with make() as d:
                out, seconds = generate(d, prompt, {})
                if want is None:
                    want = out
                assert out == want, name  # greedy constrained speculation is plain constrained decoding
                times[name].append(seconds)
                acceptance[name] = d.stats.acceptance if d.stats is not None else None
    for name, ts in times.items():
        ratio = statistics.median(times["plain"][i] / t for i, t in enumerate(ts))
        acc = "" if acceptance[name] is None else f"{acceptance[name]:.0%}"
        lines.append(f"| {name} | {len(want) / statistics.median(ts):.1f} | {ratio:.2f}x | {acc} |")
    return lines


def timed(fn, n):
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def walk(tokens, step) -> list:
    """Seconds of step(i, token) for each token of the answer."""
    out = []
    for i, t in enumerate(tokens):
        t0 = time.perf_counter()
        step(i, t)
        out.append(time.perf_counter() - t0)
    return out


def part_rows(answer: str, runs: int):
    """Along the demo's answer, retokenized with the qwen2 vocabulary: per token, pymoe's constrained
    distribution when the row's most likely token is the answer's (the model follows the schema), the whole-row
    mask llama.cpp's grammar makes, and llguidance's mask, each with the grammar's advance."""
    lines = ["", "## 3. The engines per token at a 151,936-token vocabulary", ""]
    with pymoe.Model(qwen2_vocab_model("target", TARGET)) as m, m.session(n_ctx=256, n_threads=THREADS) as s:
        n_vocab = m.info.n_vocab
        tokens = m.tokenize(answer, add_special=False)
        s.feed(m.tokenize("x"))
        base = np.array(s.logits(), dtype=np.float32)
        rows = []
        for t in tokens:  # the answer's token on top, by a margin a model that follows the schema has
            row = base.copy()
            row[t] = base.max() + 8.0
            rows.append(row)
        results = {}
        for _ in range(runs):
            for name, sampling in (("pymoe, greedy", pymoe.SamplingParams.greedy()), ("pymoe, sampled", SAMPLED)):
                with Grammar.from_json_schema(m, CITY) as g:
                    results.setdefault(name, []).append(walk(tokens, lambda i, t: (g.probs(rows[i], sampling),
                                                                                    g.accept(t))))
            with Grammar.from_json_schema(m, CITY) as g:
                results.setdefault("llama.cpp's whole-row mask", []).append(
                    walk(tokens, lambda i, t: (g.mask(rows[i].copy()), g.accept(t))))
            matcher = llguidance_matcher(m)
            if matcher is not None:
                match, mask, fill = matcher
                results.setdefault("llguidance's mask", []).append(
                    walk(tokens, lambda i, t: (fill(match, mask, 0), match.consume_token(t))))
        dense_us = statistics.median(timed(lambda: SAMPLED.probs(rows[0]), 20) for _ in range(runs)) * 1e6
    lines += [f"The demo's answer retokenized with the qwen2 tokenizer ({len(tokens)} tokens, {n_vocab:,}-token "
              f"rows), each row with the answer's token on top; per token: the draw's constrained distribution or "
              f"the mask, and the grammar's advance. Microseconds, over {runs} walks.", "",
              "| engine, per token | median µs | mean µs | p99 µs |", "|---|---|---|---|"]
    for name, walks in results.items():
        flat = np.array([x for w in walks for x in w]) * 1e6
        lines.append(f"| {name} | {np.median(flat):,.0f} | {flat.mean():,.0f} | {np.percentile(flat, 99):,.0f} |")
    if not any(name.startswith("llguidance") for name in results):
        lines.append("| llguidance | (not installed: `pip install llguidance` to compare) | | |")
    lines.append(f"| for scale: the unconstrained distribution (sampled, defaults) | {dense_us:,.0f} | | |")
    return lines


def llguidance_matcher(m):
    """(matcher, mask, fill) of llguidance for the schema over m's vocabulary, or None when it is not installed."""
    try:
        import llguidance
        import llguidance.numpy
    except ImportError:
        return None
    pieces = [m.token_piece(t, render_special=True) for t in range(m.info.n_vocab)]

    class Vocab:  # what llguidance.TokenizerWrapper reads
        eos_token_id = m.info.eos
        bos_token_id = None
        tokens = pieces

        def __call__(self, text):
            return m.tokenize(text.decode() if isinstance(text, bytes) else text, add_special=False)

    tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(Vocab()))
    matcher = llguidance.LLMatcher(tok, llguidance.LLMatcher.grammar_from_json_schema(CITY))
    mask = llguidance.numpy.allocate_token_bitmask(1, tok.vocab_size)
    return matcher, mask, llguidance.numpy.fill_next_token_bitmask


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    head = machine_lines(f"{THREADS} threads")
    with pymoe.Model(DEMO) as target, pymoe.Model(DRAFT) as draft:
        prompt = target.chat_tokenize(ASK)
        with target.session(n_ctx=1024, n_threads=THREADS,
                            sampling=pymoe.SamplingParams(temperature=0, json_schema=CITY)) as s:
            tokens = list(s.generate_tokens(prompt, max_tokens=200))
        answer = target.detokenize(tokens)
        lines = ["# Constrained decoding: the cost of a JSON schema", "", "`bench/constrained.py`.", "", *head, "",
                 "The answer: `" + answer.replace("\n", " ") + "`", ""]
        lines += part_cost(target, prompt, tokens, args.runs)
        lines += part_speculation(target, draft, prompt, args.runs)
    lines += part_rows(answer, args.runs)
    return write("constrained.md", lines)


if __name__ == "__main__":
    raise SystemExit(main())
