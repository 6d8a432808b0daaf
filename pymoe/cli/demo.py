"""pymoe demo: the whole scenario on the built-in models, in about a minute.

Fetches SmolLM2-135M-Instruct (93 MB, once), makes a small MoE from it (once),
then generates with SmolLM2 as the draft on a fixed question, streaming, and
ends with speculative and plain decoding timed in interleaved pairs (medians). Progress bars for
the download (pip's), the upcycling and the loads.

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


def show(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="pymoe demo", description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="0 = one per physical core (default)")
    parser.add_argument("--pairs", type=int, default=3, choices=range(1, 21), metavar="N",
                        help="speculative/plain pairs timed, interleaved (default 3)")
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
        prompt = target.chat_tokenize([("user", args.prompt)])
        print(f"\n> {args.prompt}\n", flush=True)

        def speculative(visible: bool):
            with Speculative(target, draft, draft_max="auto", temperature=0, **session) as spec:
                spec.feed(prompt)
                t0 = time.perf_counter()
                ids: list = []
                if visible:
                    text = TextStream(target)
                    stream(spec.generate_tokens(None, max_tokens=args.tokens), text, show, ids)
                    show(text.finish())
                else:
                    ids = list(spec.generate_tokens(None, max_tokens=args.tokens))
                return ids, len(ids) / (time.perf_counter() - t0), spec.stats

        def plain():
            with target.session(sampling=SamplingParams.greedy(), **session) as s:
                s.feed(prompt)
                t0 = time.perf_counter()
                ids = list(s.generate_tokens(None, max_tokens=args.tokens))
                return ids, len(ids) / (time.perf_counter() - t0)

        # one speculative run shown, then the timing: pairs run back to back,
        # so that a busy machine slows both sides of a pair alike
        ids, spec_rate, st = speculative(True)
        print("\n", flush=True)
        plain_ids, plain_rate = plain()
        pairs = [(spec_rate, plain_rate)]
        timing = bar(f"timing {args.pairs - 1} more pairs, interleaved")
        for i in range(args.pairs - 1):
            timing(i, args.pairs - 1)
            pairs.append((speculative(False)[1], plain()[1]))
            timing(i + 1, args.pairs - 1)
        ratios = sorted(a / b for a, b in pairs)
        same = ("the same tokens" if ids == plain_ids else
                "other tokens after a near-tie (quantized weights: batched and single-token logits differ slightly)")
        print(f"speculative (draft_max=auto): {len(ids)} tokens, median {statistics.median(a for a, _ in pairs):.1f} "
              f"tokens/s, acceptance {st.acceptance:.0%}, rounds by k {dict(sorted(st.rounds_by_k.items()))}\n"
              f"plain decoding:               {len(plain_ids)} tokens, median "
              f"{statistics.median(b for _, b in pairs):.1f} tokens/s\n"
              f"-> speculative is {statistics.median(ratios):.2f}x plain here (median of {len(pairs)} interleaved "
              f"pairs, {ratios[0]:.2f}-{ratios[-1]:.2f}), {same}", file=sys.stderr)
    home = str(Path.home())
    target_name, draft_name = (str(p).replace(home, "~", 1) for p in (target_path, draft_path))
    print(f"\nthe demo's models: {target_name} (target), {draft_name} (draft)\n"
          f"next (with . .venv/bin/activate, pymoe is on your PATH):\n"
          f"  pymoe chat -m {target_name} -d {draft_name}\n"
          f"  pymoe serve -m {target_name} -d {draft_name}     # an OpenAI-compatible server on 127.0.0.1:8080",
          file=sys.stderr)
    return 0
