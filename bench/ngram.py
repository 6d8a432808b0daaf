"""Lookup drafts (n-gram, no draft model) against plain decoding and against
llama.cpp's own n-gram drafting, on copy-heavy and free-text prompts.

For each target (the repo's MoE targets upcycled from SmolLM2: all-F32, where
a verify batch costs little more than one token, as on a GPU; Q8_0, where on
this CPU it costs nearly n tokens) and each prompt, settings run interleaved
in each repetition: pymoe plain; pymoe lookup (draft_max auto) cold (nothing
learned before) and warm (from what auto learned over this target in the
runs before it: pymoe/learned.py, a folder of the run's own, seeded by one
generation on a prompt of neither table); llama.cpp's llama-speculative-simple
with --spec-type ngram-simple and with ngram-mod on the same chat-formatted
prompt; with --with-model also a draft model (SmolLM2-135M) with and without
lookup drafts first, on the F32 target. Greedy and sampled. Decode tokens/s
only; "x plain" is the median over repetitions of the ratio to pymoe plain in
the same repetition. Writes bench/results/ngram.md.

    .venv/bin/python -P bench/ngram.py [--reps 2] [-n 128] [--with-model]   (needs `make bench-peer`)

--free-text-only: "no match, no cost" more closely: free-text prompts, greedy,
pymoe plain against pymoe lookup only, more repetitions (bench/results/ngram_free_text.md).
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
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


PEERS = {  # llama.cpp's n-gram drafting: 16 drafts at a 3-gram match; chains of 16-gram continuations
    "peer simple": ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3", "--spec-ngram-simple-size-m",
                    "16"],
    "peer mod": ["--spec-type", "ngram-mod", "--spec-ngram-mod-n-match", "16", "--spec-ngram-mod-n-min", "2",
                 "--spec-ngram-mod-n-max", "16"],
}
SEED_PROMPT = ("Copy this sentence exactly, then say what it means: The quick brown fox jumps over the lazy dog, "
               "and the dog does not mind at all.")


def peer(setting: str, target: Path, prompt: str, n: int, temp: float, seed: int) -> float:
    """llama-speculative-simple with llama.cpp's n-gram drafting: decode tokens/s as it reports it."""
    return peer_run(["-m", target, "-p", prompt, "-n", n, *PEERS[setting], "--temp", temp, "--seed", seed,
                     "-t", THREADS, "-c", CTX, "-fit", "off"]).rate


def pymoe_run(target, draft, tokens, n, temp, seed, setting, learned=False):
    """(decode tokens/s, tokens, stats or None) of one generation."""
    opts = dict(n_ctx=CTX, n_threads=THREADS)
    if setting == "plain":
        decoder = target.session(sampling=pymoe.SamplingParams(temperature=temp), seed=seed, **opts)
    elif setting in ("lookup", "lookup warm"):
        decoder = pymoe.Speculative(target, "ngram", temperature=temp, seed=seed,
                                    warm_start=learned if setting == "lookup warm" else False, **opts)
    elif setting == "model":
        decoder = pymoe.Speculative(target, draft, draft_max="auto", temperature=temp, seed=seed, warm_start=False,
                                    **opts)
    else:  # model + lookup
        decoder = pymoe.Speculative(target, draft, ngram=True, draft_max="auto", temperature=temp, seed=seed,
                                    warm_start=False, **opts)
    with decoder:
        decoder.feed(tokens)
        t0 = time.perf_counter()
        out = list(decoder.generate_tokens(None, max_tokens=n))
        rate = len(out) / (time.perf_counter() - t0)
        return rate, out, decoder.stats if setting != "plain" else None


def bench_target(name, path, draft, prompts, modes, reps, n, with_model, lines, progress, settings=None):
    target = pymoe.Model(path)
    exact = "F32" in name  # greedy speculation must then be plain greedy decoding, token for token
    settings = settings or (["plain", "lookup", "lookup warm", *PEERS] +
                            (["model", "model+lookup"] if with_model else []))
    learned = Path(tempfile.mkdtemp(prefix="pymoe-learned-"))  # what lookup warm keeps, for this target only
    if "lookup warm" in settings:
        seed_tokens = target.tokenize(target.chat_format([{"role": "user", "content": SEED_PROMPT}]),
                                      parse_special=True)
        pymoe_run(target, draft, seed_tokens, n, 0.0, 1, "lookup warm", learned)
    lines += [f"## {name}", "", f"`{path.name}`; {reps} repetitions x {n} tokens; decode tokens/s (median) and x pymoe "
              "plain (median of per-repetition ratios); drafts: lookup warm's drafts accepted / drafted, mean "
              "match length drafted from", ""]
    for temp in modes:
        mode = "greedy" if temp == 0 else f"sampled (temperature {temp}, seed per repetition)"
        lines += [f"### {mode}", "", "| prompt | kind | " + " | ".join(settings) + " | drafts |",
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
                        if s in PEERS:
                            rates[s].append(peer(s, path, formatted, n, temp, seed=r + 1))
                            continue
                        rate, out, st = pymoe_run(target, draft, tokens, n, temp, r + 1, s, learned)
                        rates[s].append(rate)
                        if s == "plain":
                            plain_out = out
                        elif temp == 0:
                            same = same and out == plain_out
                        if s == ("lookup warm" if "lookup warm" in settings else "lookup"):
                            drafted += st.lookup_drafted
                            accepted += st.lookup_accepted
                            matched += sum(n * x.drafted for n, x in st.lookup.items())
                ratios = {s: statistics.median(a / b for a, b in zip(rates[s], rates["plain"])) for s in settings}
                cells = [f"{statistics.median(rates[s]):.1f}" + ("" if s == "plain" else f" ({ratios[s]:.2f}x)")
                         for s in settings]
                look = f"{accepted}/{drafted}, {matched / drafted:.1f}" if drafted else "none"  # the warm loop's
                lines.append(f"| {title} | {kind} | " + " | ".join(cells) + f" | {look} |")
                if not same:  # F32: a defect; quantized: batch and single-token logits differ in the last bits
                    lines.append(f"| ({title}: the greedy output parted from plain decoding"
                                 + (": a defect) |" if exact else " at a near-tie, as quantized targets may) |"))
        lines.append("")
    target.close()
    shutil.rmtree(learned, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("-n", type=int, default=128, help="tokens per generation (default 128)")
    ap.add_argument("--targets", default="f32,q8_0")
    ap.add_argument("--free-text-only", action="store_true")
    ap.add_argument("--with-model", action="store_true", help="also a draft model, with and without lookup (F32)")
    ap.add_argument("--prompts", help="only these prompts (comma-separated titles), for a quick look")
    args = ap.parse_args()
    if args.free_text_only:
        return free_text_only(args)
    if not PEER.exists():
        print(f"{PEER} is missing: run `make bench-peer` first", file=sys.stderr)
        return 2
    lines = ["# Lookup drafts (n-gram) against plain decoding and llama.cpp's n-gram drafting", "",
             "What `bench/ngram.py` measured. pymoe lookup: `Speculative(target, \"ngram\")` (n-grams 2..12, "
             "draft_max auto, k_max 16), cold (nothing learned before) and warm (from what auto learned over "
             "the same target in the runs before it, seeded by one generation on another prompt). peer simple: "
             "llama.cpp's `llama-speculative-simple --spec-type ngram-simple --spec-ngram-simple-size-n 3 "
             "--spec-ngram-simple-size-m 16`; peer mod: `--spec-type ngram-mod --spec-ngram-mod-n-match 16 "
             "--spec-ngram-mod-n-min 2 --spec-ngram-mod-n-max 16`; both on the same chat-formatted prompt "
             "(their decode speed as they report it)."
             + (" model: SmolLM2-135M Q4_1 as a draft model, draft_max auto; model+lookup: the same with lookup "
                "drafts first." if args.with_model else ""), ""] + machine_lines() + [""]
    draft = pymoe.Model(smollm2(quiet=True)) if args.with_model else None
    only = set(args.prompts.split(",")) if args.prompts else None
    prompts = [(kind, {t: p for t, p in group.items() if only is None or t in only})
               for kind, group in (("copy", COPY), ("free", FREE))]

    def progress(text):
        print(f"\r{text:<60}", end="", file=sys.stderr, flush=True)

    for which in args.targets.split(","):
        if which == "f32":
            path = smollm2_moe(experts=4, used=2, expert_type="f32", rest_f32=True, quiet=True)
            bench_target("E4-K2 MoE, all F32", path, draft, prompts, [0.0, 0.7], args.reps, args.n, args.with_model,
                         lines, progress)
        else:
            path = smollm2_moe(experts=4, used=2, expert_type=which, quiet=True)
            bench_target(f"E4-K2 MoE, {which} experts (the demo target)", path, draft, prompts, [0.0, 0.7],
                         args.reps, args.n, False, lines, progress)
    print(file=sys.stderr)
    if draft is not None:
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
