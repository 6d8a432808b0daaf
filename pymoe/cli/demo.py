"""pymoe demo: the whole scenario on the built-in models, in about a minute.

Fetches SmolLM2-135M-Instruct (93 MB, once), makes a small MoE from it (once),
then generates with SmolLM2 as the draft on a fixed question, streaming, and
times speculative and plain decoding in interleaved pairs (medians). Then an
editing task (the reply copies most of its input) with drafts copied from the
context (lookup, no draft model), timed the same way. Each result ends with a
line that says what it means. Progress bars for the download (pip's), the
upcycling and the loads.

    make demo      # or: pymoe demo [--prompt TEXT] [--tokens N] [--threads N] [--pairs N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from ..demo_models import smollm2, smollm2_moe
from ..model import Model
from ..sampling import SamplingParams
from ..speculative import Speculative
from ..text import TextStream
from .terminal import bar, stream

PROMPT = "Name three important inventions and say briefly why each mattered."
EDIT_PROMPT = ("Correct the spelling in this paragraph and reply with the corrected paragraph only.\n\n"
               "The lighthouse stood on a narow spit of rock at the mouth of the harbour. Every night for ninety "
               "years its lamp had turned, sweeping the water with a slow white beam that fishermen counted on to "
               "find their way home. When the keeper retired, the town voted to keep the light burning, and "
               "volunters took turns climbing the one hundred and twelve steps each evening to wind the clockwork "
               "and clean the glass.")
EVEN = 0.03  # ratios within this of 1.0 are "the same speed": the pairs' own spread on a quiet machine


def show(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def meaning(what: str, ratio: float, drafted: int) -> str:
    """One line that says what a paired ratio means."""
    if ratio >= 1.0 + EVEN:
        return f"{what}: {ratio:.2f}x plain decoding: speculation pays here."
    if ratio > 1.0 - EVEN:
        if drafted == 0:
            return (f"{what}: {ratio:.2f}x: draft_max=auto measured that drafts cannot pay on this machine "
                    "and decoded plainly, as it should.")
        return f"{what}: {ratio:.2f}x: about even; auto drafts only while drafting measurably pays."
    return f"{what}: {ratio:.2f}x: slower than plain decoding (a busy machine, or too few tokens to learn)."


def timed_pairs(model, make_decoder, make_plain, prompt, tokens: int, pairs: int, label: str):
    """Decoder and plain runs back to back (a busy machine slows both sides of
    a pair alike); the first decoder run is streamed. Returns
    (ids, plain ids, [(decoder rate, plain rate)], the decoder's stats)."""
    def run(make, shown):
        with make() as d:
            d.feed(prompt)
            t0 = time.perf_counter()
            ids: list = []
            if shown:
                text = TextStream(model)
                stream(d.generate_tokens(None, max_tokens=tokens), text, show, ids)
                show(text.finish())
                print("\n", flush=True)
            else:
                ids = list(d.generate_tokens(None, max_tokens=tokens))
            return ids, len(ids) / (time.perf_counter() - t0), getattr(d, "stats", None)

    ids, rate, stats = run(make_decoder, True)
    plain_ids, plain_rate, _ = run(make_plain, False)
    out = [(rate, plain_rate)]
    timing = bar(f"{label}: timing {pairs - 1} more pairs, interleaved")
    for i in range(pairs - 1):
        timing(i, pairs - 1)
        out.append((run(make_decoder, False)[1], run(make_plain, False)[1]))
        timing(i + 1, pairs - 1)
    return ids, plain_ids, out, stats


def report(what: str, ids, plain_ids, pairs, st) -> float:
    ratios = sorted(a / b for a, b in pairs)
    same = ("the same tokens" if ids == plain_ids else
            "other tokens after a near-tie (quantized weights: batched and single-token logits differ slightly)")
    print(f"{what}: {len(ids)} tokens, median {statistics.median(a for a, _ in pairs):.1f} tokens/s, "
          f"acceptance {st.acceptance:.0%}, rounds by k {dict(sorted(st.rounds_by_k.items()))}\n"
          f"plain decoding: {len(plain_ids)} tokens, median {statistics.median(b for _, b in pairs):.1f} tokens/s\n"
          f"-> {statistics.median(ratios):.2f}x plain (median of {len(pairs)} interleaved pairs, "
          f"{ratios[0]:.2f}-{ratios[-1]:.2f}), {same}", file=sys.stderr)
    return statistics.median(ratios)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pymoe demo", description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="0 = one per physical core (default)")
    parser.add_argument("--pairs", type=int, default=3, choices=range(1, 21), metavar="N",
                        help="speculative/plain pairs timed, interleaved, per task (default 3)")
    args = parser.parse_args(argv)

    draft_path = smollm2()
    target_path = smollm2_moe(experts=4, used=2, expert_type="q8_0", progress=bar("making the MoE target"))
    session = dict(n_ctx=1024, n_threads=args.threads)
    with Model(draft_path, progress=bar(f"loading {draft_path.name}")) as draft, \
            Model(target_path, progress=bar(f"loading {target_path.name}")) as target:
        print(f"target: a synthetic MoE upcycled from SmolLM2 ({target.info.n_experts} experts, "
              f"{target.info.n_experts_used} per token, {target.info.n_bytes / 2**20:.0f} MiB, "
              f"{target.load_report.load_mode}); draft: SmolLM2-135M ({draft.info.n_bytes / 2**20:.0f} MiB)",
              file=sys.stderr)

        def plain():
            return target.session(sampling=SamplingParams.greedy(), **session)

        print(f"\n> {args.prompt}\n", flush=True)
        ids, plain_ids, pairs, st = timed_pairs(
            target, lambda: Speculative(target, draft, draft_max="auto", temperature=0, **session), plain,
            target.chat_tokenize([("user", args.prompt)]), args.tokens, args.pairs, "draft model")
        model_ratio = report("speculative, SmolLM2 drafts (draft_max=auto)", ids, plain_ids, pairs, st)
        model_drafted = st.drafted

        print(f"\n> {EDIT_PROMPT}\n", flush=True)
        ids, plain_ids, pairs, st = timed_pairs(
            target, lambda: Speculative(target, "ngram", draft_max="auto", temperature=0, **session), plain,
            target.chat_tokenize([("user", EDIT_PROMPT)]), args.tokens, args.pairs, "lookup")
        lookup_ratio = report("speculative, drafts copied from the context (lookup, draft_max=auto)", ids,
                              plain_ids, pairs, st)
        print("\n" + meaning("the draft model", model_ratio, model_drafted) + "\n" +
              meaning("lookup on the editing task", lookup_ratio, st.drafted), file=sys.stderr)
    home = str(Path.home())
    target_name, draft_name = (str(p).replace(home, "~", 1) for p in (target_path, draft_path))
    print(f"\nthe demo's models: {target_name} (target), {draft_name} (draft)\n"
          f"next (with . .venv/bin/activate, pymoe is on your PATH):\n"
          f"  pymoe chat -m {target_name} -d {draft_name}\n"
          f"  pymoe serve -m {target_name} -d {draft_name}     # an OpenAI-compatible server on 127.0.0.1:8080",
          file=sys.stderr)
    return 0
