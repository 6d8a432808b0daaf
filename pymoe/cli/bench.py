"""pymoe bench: does speculation pay on this machine, for this target and draft?

Runs each draft length (0 = plain decoding) on the same prompts, interleaved
so that a noisy machine slows every setting alike, repeats, and reports the
median tokens/s of each with its ratio to plain decoding; then measures the
verify cost curve: what a target batch of n tokens costs against one token
(a MoE's grows fast, because each token brings its own experts). Writes
bench.json, bench.md and, with matplotlib installed, bench.png to --out.

    pymoe bench -m target.gguf -d draft.gguf --draft-max 0,1,2,4,auto --repeat 3 --out bench-out
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from ..errors import UnsupportedError
from ..expert_cache import MoeCacheStats
from ..routing import routing_report
from ..sampling import SamplingParams
from .common import (Parser, UsageError, add_load_options, add_sampling_options, check_writable_folder, command,
                     draft_max, load_models, number, open_decoder, read_text_file, session_options)

PROMPTS = ["Write a short story about a robot who learns to paint.",
           "Explain how a refrigerator works, step by step.",
           "List five facts about the planet Mars and explain each one."]


def _settings(text: str):
    try:
        values = [draft_max(part.strip()) for part in text.split(",") if part.strip()]
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}")
    if not values:
        raise argparse.ArgumentTypeError("give at least one draft length")
    return list(dict.fromkeys(values))


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="pymoe bench", description=__doc__.splitlines()[0])
    add_load_options(p)
    add_sampling_options(p, temp=0.0)
    p.add_argument("--draft-max", type=_settings, default=[0, 1, 2, 4, "auto"],
                   help="draft lengths to compare, comma-separated (0 = plain decoding; default 0,1,2,4,auto)")
    p.add_argument("--prompts", help="a file with one prompt per line (default: three built-in prompts)")
    p.add_argument("-n", "--n-predict", type=number(int, 1), default=64, help="tokens per run (default 64)")
    p.add_argument("--repeat", type=number(int, 1), default=3, help="rounds over all prompts (default 3)")
    p.add_argument("--out", default="pymoe-bench", help="folder for bench.json, bench.md, bench.png")
    return p


def _prompts(args):
    if not args.prompts:
        return PROMPTS
    lines = [line.strip() for line in read_text_file(args.prompts, "--prompts").splitlines()]
    prompts = [line for line in lines if line]
    if not prompts:
        raise UsageError(f"--prompts {args.prompts} has no prompt in it")
    return prompts


def _encode(target, prompt: str):
    """The prompt as a user message when the model has a chat template, else raw text."""
    try:
        return target.chat_tokenize([("user", prompt)])
    except UnsupportedError:
        return target.tokenize(prompt)


def _one_run(target, draft, k, tokens, args):
    """(tokens/s, drafted, accepted, the expert cache's counts or None) of one generation at draft
    length k (0: plain)."""
    with open_decoder(args, target, draft if k != 0 else None, k=k) as decoder:
        decoder.feed(tokens)
        before = decoder.moe_cache
        t0 = time.perf_counter()
        n = sum(1 for _ in decoder.generate_tokens(None, max_tokens=args.n_predict))
        rate = n / (time.perf_counter() - t0)
        cache = decoder.moe_cache - before if before is not None else None
        stats = decoder.stats
        return rate, stats.drafted if stats else 0, stats.accepted if stats else 0, cache


def verify_curve(target, tokens, args, n_max: int = 9, reps: int = 5):
    """Median seconds of one target batch of n tokens after the prompt, n = 1..n_max."""
    rng = np.random.default_rng(0)
    vocab = target.info.n_vocab
    times = {}
    with target.session(**session_options(args)) as s:
        s.feed(tokens)
        if s.is_recurrent:  # recurrent state cannot drop positions: come back to a checkpoint instead
            s.checkpoint()
        for n in range(1, n_max + 1):
            samples = []
            for _ in range(reps + 1):
                batch = rng.integers(0, vocab, n).tolist()  # fresh tokens, fresh expert choices
                t0 = time.perf_counter()
                s.feed(batch, all_logits=True)
                samples.append(time.perf_counter() - t0)
                s.restore() if s.is_recurrent else s.rewind(n)
            times[n] = statistics.median(samples[1:])
    return times


def _routing(target, prompt, args):
    """The target's routing of a prompt and its own greedy continuation: the
    tokens a verify batch holds (routing_report)."""
    options = session_options(args)
    with target.session(sampling=SamplingParams.greedy(), **options) as s:
        s.feed(prompt)
        tokens = list(prompt) + list(s.generate_tokens(None, max_tokens=args.n_predict))
    return routing_report(target, tokens, **options)


def run(args, out=None, err=None) -> int:
    # the streams of the moment of the call (a caller may have redirected them since import)
    out, err = out or sys.stdout, err or sys.stderr
    settings = args.draft_max
    if any(k != 0 for k in settings) and not args.draft:
        raise UsageError("draft lengths other than 0 need a draft (-d draft.gguf, or -d ngram)")
    prompts = _prompts(args)
    check_writable_folder(args.out, "--out")  # now, not after the benchmark ran
    target, draft, plan, load_seconds = load_models(args, with_draft=any(k != 0 for k in settings))
    encoded = [_encode(target, p) for p in prompts]
    if max(len(t) for t in encoded) + args.n_predict + 16 > args.ctx:
        raise UsageError(f"a prompt plus {args.n_predict} tokens does not fit --ctx {args.ctx}")
    rates = {k: [] for k in settings}
    ratios = {k: [] for k in settings}  # to plain decoding of the same prompt in the same round
    drafted = {k: 0 for k in settings}
    accepted = {k: 0 for k in settings}
    caches = {k: MoeCacheStats() for k in settings} if target.moe_cache.enabled else None
    total = args.repeat * len(prompts)
    for r in range(args.repeat):
        for i, tokens in enumerate(encoded):
            err.write(f"\rround {r + 1}/{args.repeat}, prompt {i + 1}/{len(prompts)} "
                      f"({r * len(prompts) + i + 1}/{total})")
            err.flush()
            this_round = {}
            for k in settings:
                rate, d, a, cache = _one_run(target, draft, k, tokens, args)
                if caches is not None:
                    caches[k] = caches[k] + cache
                this_round[k] = rate
                rates[k].append(rate)
                drafted[k] += d
                accepted[k] += a
            if this_round.get(0):  # a plain run that ended at once (end of text) has no ratio
                for k in settings:
                    ratios[k].append(this_round[k] / this_round[0])
    err.write("\rmeasuring the verify cost curve ...        ")
    err.flush()
    curve = verify_curve(target, encoded[0], args)
    routing = None
    if target.info.n_experts:
        err.write("\rrouting the first prompt and its continuation ...")
        err.flush()
        routing = _routing(target, encoded[0], args)
    err.write("\r" + " " * 52 + "\r")
    result = {
        "target": args.model, "draft": args.draft, "n_predict": args.n_predict, "repeat": args.repeat,
        "prompts": len(prompts), "load_seconds": load_seconds, "plan": plan.llama_flags() if plan else None,
        "settings": [{"draft_max": k, "median_tokens_per_s": statistics.median(rates[k]),
                      "median_ratio_to_plain": statistics.median(ratios[k]) if ratios[k] else None,
                      "acceptance": accepted[k] / drafted[k] if drafted[k] else None, "runs": rates[k],
                      "moe_cache": caches[k].as_json() if caches is not None else None}
                     for k in settings],
        "verify_seconds": {str(n): t for n, t in curve.items()},
        "routing": None if routing is None else {
            "n_experts": routing.n_experts, "n_used": routing.n_used, "tokens": routing.n_tokens,
            "distinct_experts_per_layer": {str(n): v for n, v in routing.distinct.items()},
            "random_routing": {str(n): v for n, v in routing.random.items()},
            "next_token_reuse": routing.reuse, "next_token_reuse_random": routing.reuse_random},
    }
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench.json").write_text(json.dumps(result, indent=1))
    table = _table(result, curve) + ("\n" + routing.table() + "\n" if routing else "")
    (folder / "bench.md").write_text(table)
    out.write(table)
    png = _plot(result, curve, folder / "bench.png")
    err.write(f"wrote {folder / 'bench.json'}, {folder / 'bench.md'}"
              + (f", {png}" if png else " (no plot: pip install matplotlib)") + "\n")
    if draft is not None:
        draft.close()
    target.close()
    return 0


def _table(result, curve) -> str:
    cache = result["settings"][0]["moe_cache"] is not None
    lines = [f"{result['repeat']} rounds x {result['prompts']} prompts, {result['n_predict']} tokens per run; "
             "medians", "", "| draft_max | tokens/s | x plain (paired) | acceptance |"
             + (" expert cache hits | host expert MiB/token (without cache) | uploads/token |" if cache else ""),
             "|---|---|---|---|" + ("---|---|---|" if cache else "")]
    for s in result["settings"]:
        ratio = "" if s["median_ratio_to_plain"] is None else f"{s['median_ratio_to_plain']:.2f}"
        acc = "" if s["acceptance"] is None else f"{s['acceptance']:.0%}"
        name = "0 (plain)" if s["draft_max"] == 0 else s["draft_max"]
        row = f"| {name} | {s['median_tokens_per_s']:.1f} | {ratio} | {acc} |"
        if cache:
            c = s["moe_cache"]
            row += (f" {c['hit_rate']:.0%} | {c['host_expert_bytes_per_token'] / 2**20:.1f} "
                    f"({c['uncached_expert_bytes_per_token'] / 2**20:.1f}) | "
                    f"{c['uploads'] / max(c['tokens'], 1):.1f} |")
        lines.append(row)
    lines += ["", "verify cost: a target batch of n tokens / one token", "",
              "| n | " + " | ".join(str(n) for n in curve) + " |", "|---|" + "---|" * len(curve),
              "| x t(1) | " + " | ".join(f"{t / curve[1]:.2f}" for t in curve.values()) + " |"]
    return "\n".join(lines) + "\n"


def _plot(result, curve, path: Path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = [str(s["draft_max"]) for s in result["settings"]]
    left.bar(names, [s["median_tokens_per_s"] for s in result["settings"]], color="tab:blue")
    left.set_xlabel("draft_max (0 = plain decoding)")
    left.set_ylabel("tokens/s (median)")
    left.set_title("decoding speed per setting")
    ns = list(curve)
    right.plot(ns, [curve[n] / curve[1] for n in ns], "o-", label="measured")
    right.plot(ns, ns, "--", color="gray", label="n x one token")
    right.plot(ns, [1] * len(ns), ":", color="gray", label="free batching")
    right.set_xlabel("tokens in one target batch (k + 1)")
    right.set_ylabel("time / time of one token")
    right.set_title("verify cost")
    right.legend()
    fig.suptitle(Path(result["target"]).name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    return command("bench", argv, build_parser(), run)
