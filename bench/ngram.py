"""Lookup drafts (n-gram, no draft model) against plain decoding and against
llama.cpp's own n-gram drafting, on copy-heavy and free-text prompts.

For each target (the repo's MoE targets upcycled from SmolLM2: all-F32, where
a verify batch costs little more than one token, as on a GPU; Q8_0, where on
this CPU it costs nearly n tokens) and each prompt, settings run interleaved
in each repetition: pymoe plain, pymoe lookup (draft_max auto), llama.cpp's
llama-speculative-simple with --spec-type ngram-simple on the same chat-formatted
prompt, and on the F32 target a draft model (SmolLM2-135M) with and without
lookup drafts first. Greedy and sampled. Decode tokens/s only; "x plain" is
the median over repetitions of the ratio to pymoe plain in the same repetition.
Writes bench/results/ngram.md.

    .venv/bin/python -P bench/ngram.py [--reps 2] [-n 128]   (needs `make bench-peer`)

--free-text-only: "no match, no cost" more closely: free-text prompts, greedy,
pymoe plain against pymoe lookup only, more repetitions (bench/results/ngram_free_text.md).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pymoe
from pymoe.demo_models import smollm2, smollm2_moe

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # python -P does not add the script's folder
from peer import SPECULATIVE_SIMPLE as PEER, run as peer_run  # noqa: E402
from report import machine_lines, write  # noqa: E402

THREADS = 2
CTX = 2048

FUNCTION = '''def parse_config(path):
    with open(path) as f:
        lines = f.readlines()
    config = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, value = line.split("=", 1)
        config[key.strip()] = value.strip()
    return config'''
PASSAGE = ("The lighthouse stood on a narrow spit of rock at the mouth of the harbour. Every night for ninety years "
           "its lamp had turned, sweeping the water with a slow white beam that fishermen counted on to find their "
           "way home. When the keeper retired, the town voted to keep the light burning, and volunteers took turns "
           "climbing the one hundred and twelve steps each evening to wind the clockwork and clean the glass.")
JSON = ('{"name": "Ada Lovelace", "born": 1815, "died": 1852, "fields": ["mathematics", "computing"], '
        '"known_for": "notes on the Analytical Engine", "parents": {"father": "Lord Byron", '
        '"mother": "Anne Isabella Milbanke"}}')
LIST = ("Shopping list:\n1. two loaves of bread\n2. a dozen eggs\n3. one litre of milk\n4. a bag of apples\n"
        "5. a jar of honey\n6. three tins of tomatoes\n7. a block of cheese\n8. a bunch of bananas")
COPY = {
    "rewrite a function": f"Rewrite this function so that it is called load_config. Reply with the whole "
                          f"function.\n\n{FUNCTION}",
    "quote a passage": f"{PASSAGE}\n\nRepeat the passage above word for word.",
    "reformat JSON": f"Reformat this JSON with one key per line and two spaces of indentation:\n\n{JSON}",
    "continue a list": f"{LIST}\n\nWrite the shopping list again, then add three more items.",
}
FREE = {
    "story": "Write a short story about a robot who learns to paint.",
    "explain": "Explain how a refrigerator works, step by step.",
    "facts": "List five facts about the planet Mars and explain each one.",
}


def peer(target: Path, prompt: str, n: int, temp: float, seed: int) -> float:
    """llama-speculative-simple with llama.cpp's n-gram drafting: decode tokens/s as it reports it."""
    return peer_run(["-m", target, "-p", prompt, "-n", n, "--spec-type", "ngram-simple", "--spec-ngram-simple-size-n",
                     "3", "--spec-ngram-simple-size-m", "16", "--temp", temp, "--seed", seed, "-t", THREADS, "-c", CTX,
                     "-fit", "off"]).rate


def pymoe_run(target, draft, tokens, n, temp, seed, setting):
    """(decode tokens/s, tokens, stats or None) of one generation."""
    opts = dict(n_ctx=CTX, n_threads=THREADS)
    if setting == "plain":
        decoder = target.session(sampling=pymoe.SamplingParams(temperature=temp), seed=seed, **opts)
    elif setting == "lookup":
        decoder = pymoe.Speculative(target, "ngram", temperature=temp, seed=seed, **opts)
    elif setting == "model":
        decoder = pymoe.Speculative(target, draft, draft_max="auto", temperature=temp, seed=seed, **opts)
    else:  # model + lookup
        decoder = pymoe.Speculative(target, draft, ngram=True, draft_max="auto", temperature=temp, seed=seed, **opts)
    with decoder:
        decoder.feed(tokens)
        t0 = time.perf_counter()
        out = list(decoder.generate_tokens(None, max_tokens=n))
        rate = len(out) / (time.perf_counter() - t0)
        return rate, out, decoder.stats if setting != "plain" else None


def bench_target(name, path, draft, prompts, modes, reps, n, with_model, lines, progress, settings=None):
    target = pymoe.Model(path)
    exact = "F32" in name  # greedy speculation must then be plain greedy decoding, token for token
    settings = settings or ["plain", "lookup", "peer"] + (["model", "model+lookup"] if with_model else [])
    lines += [f"## {name}", "", f"`{path.name}`; {reps} repetitions x {n} tokens; decode tokens/s (median) and x pymoe "
              "plain (median of per-repetition ratios); lookup: drafts accepted / drafted, mean match length "
              "drafted from", ""]
    for temp in modes:
        mode = "greedy" if temp == 0 else f"sampled (temperature {temp}, seed per repetition)"
        lines += [f"### {mode}", "", "| prompt | kind | " + " | ".join(settings) + " | lookup |",
                  "|---|---|" + "---|" * len(settings) + "---|"]
        for kind, group in prompts:
            for title, text in group.items():
                formatted = target.chat_format([{"role": "user", "content": text}])
                tokens = target.tokenize(formatted, parse_special=True)
                rates = {s: [] for s in settings}
                drafted = accepted = matched = 0
                same = True
                for r in range(reps):
                    progress(f"{name} {mode[:7]} {title} rep {r + 1}")
                    for s in settings:
                        if s == "peer":
                            rates[s].append(peer(path, formatted, n, temp, seed=r + 1))
                            continue
                        rate, out, st = pymoe_run(target, draft, tokens, n, temp, r + 1, s)
                        rates[s].append(rate)
                        if s == "plain":
                            plain_out = out
                        elif temp == 0:
                            same = same and out == plain_out
                        if s == "lookup":
                            drafted += st.lookup_drafted
                            accepted += st.lookup_accepted
                            matched += sum(n * x.drafted for n, x in st.lookup.items())
                ratios = {s: statistics.median(a / b for a, b in zip(rates[s], rates["plain"])) for s in settings}
                cells = [f"{statistics.median(rates[s]):.1f}" + ("" if s == "plain" else f" ({ratios[s]:.2f}x)")
                         for s in settings]
                look = f"{accepted}/{drafted}, {matched / drafted:.1f}" if drafted else "none"
                lines.append(f"| {title} | {kind} | " + " | ".join(cells) + f" | {look} |")
                if not same:  # F32: a defect; quantized: batch and single-token logits differ in the last bits
                    lines.append(f"| ({title}: the greedy output parted from plain decoding"
                                 + (": a defect) |" if exact else " at a near-tie, as quantized targets may) |"))
        lines.append("")
    target.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("-n", type=int, default=128, help="tokens per generation (default 128)")
    ap.add_argument("--targets", default="f32,q8_0")
    ap.add_argument("--free-text-only", action="store_true")
    args = ap.parse_args()
    if args.free_text_only:
        return free_text_only(args)
    if not PEER.exists():
        print(f"{PEER} is missing: run `make bench-peer` first", file=sys.stderr)
        return 2
    lines = ["# Lookup drafts (n-gram) against plain decoding and llama.cpp's n-gram drafting", "",
             "What `bench/ngram.py` measured. pymoe lookup: `Speculative(target, \"ngram\")` (n-grams 2..12, "
             "draft_max auto, k_max 16). peer: llama.cpp's `llama-speculative-simple --spec-type ngram-simple "
             "--spec-ngram-simple-size-n 3 --spec-ngram-simple-size-m 16` on the same chat-formatted prompt "
             "(its decode speed as it reports it). model: SmolLM2-135M Q4_1 as a draft model, draft_max auto; "
             "model+lookup: the same with lookup drafts first.", ""] + machine_lines() + [""]
    draft = pymoe.Model(smollm2(quiet=True))
    prompts = [("copy", COPY), ("free", FREE)]

    def progress(text):
        print(f"\r{text:<60}", end="", file=sys.stderr, flush=True)

    for which in args.targets.split(","):
        if which == "f32":
            path = smollm2_moe(experts=4, used=2, expert_type="f32", rest_f32=True, quiet=True)
            bench_target("E4-K2 MoE, all F32", path, draft, prompts, [0.0, 0.7], args.reps, args.n, True, lines,
                         progress)
        else:
            path = smollm2_moe(experts=4, used=2, expert_type=which, quiet=True)
            bench_target(f"E4-K2 MoE, {which} experts (the demo target)", path, draft, prompts, [0.0, 0.7],
                         args.reps, args.n, False, lines, progress)
    print(file=sys.stderr)
    draft.close()
    return write("ngram.md", lines)


def free_text_only(args) -> int:
    lines = ["# Lookup drafts on free text: no match, no cost", "",
             "What `bench/ngram.py --free-text-only` measured: free-text prompts, greedy, pymoe plain decoding and "
             "pymoe lookup drafts (`Speculative(target, \"ngram\")`, auto) interleaved in each repetition; "
             "x plain is the median of per-repetition ratios.", ""] + machine_lines() + [""]

    def progress(text):
        print(f"\r{text:<60}", end="", file=sys.stderr, flush=True)

    for which in args.targets.split(","):
        rest = dict(expert_type="f32", rest_f32=True) if which == "f32" else dict(expert_type=which)
        path = smollm2_moe(experts=4, used=2, quiet=True, **rest)
        bench_target(f"E4-K2 MoE, {'all F32' if which == 'f32' else which + ' experts'}", path, None,
                     [("free", FREE)], [0.0], args.reps, args.n, False, lines, progress, settings=["plain", "lookup"])
    print(file=sys.stderr)
    return write("ngram_free_text.md", lines)


if __name__ == "__main__":
    sys.exit(main())
