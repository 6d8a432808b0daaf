"""pymoe plan: where a target (and its draft) should live for a VRAM budget,
from GGUF metadata only (nothing is loaded); pymoe.plan() does the work."""
from __future__ import annotations

import json
from dataclasses import asdict

from ..gguf_file import CACHE_TYPES
from ..plan import DEFAULT_MARGIN, MiB, PRIORITIES, plan
from .common import MTP, NGRAM, Parser, command, mib_or_auto, number


def main(argv=None) -> int:
    # --ctx and --n-rs-seq are checked by pymoe.plan(), whose messages name the parameter
    parser = Parser(prog="pymoe plan", description="Plan where a MoE target (and its draft) live for a VRAM budget, "
                    "from GGUF metadata only (nothing is loaded).")
    parser.add_argument("-m", "--model", required=True, help="target GGUF (first part of a split model)")
    parser.add_argument("-d", "--draft", help="draft GGUF; mtp: the target's MTP head (loaded with it, on the GPU "
                        "first); ngram: lookup drafts, which need no memory of their own")
    parser.add_argument("--vram", default="auto", help="VRAM budget: 8GiB, 8G, 8000MB, or auto (the first GPU's "
                        "free memory; default)")
    parser.add_argument("--ram", default="auto", help="RAM budget (default: MemAvailable)")
    parser.add_argument("--ctx", type=int, default=8192, help="context size, tokens (default 8192)")
    parser.add_argument("--margin", default=f"{DEFAULT_MARGIN // MiB}MiB",
                        help=f"VRAM kept free (default {DEFAULT_MARGIN // MiB}MiB)")
    parser.add_argument("--cache-type", default="f16", choices=CACHE_TYPES, help="KV cache type")
    parser.add_argument("--priority", default="draft", choices=PRIORITIES,
                        help="what gets VRAM first: the draft (default) or the target's experts")
    parser.add_argument("--n-rs-seq", type=int, default=0,
                        help="recurrent-state snapshots of a hybrid target (speculative rollback; each one is another "
                        "copy of its recurrent state; default 0)")
    parser.add_argument("--moe-cache-mib", type=mib_or_auto, default=0, metavar="N",
                        help="an expert cache: auto keeps every layer's experts in RAM and gives the VRAM left to the "
                        "cache; N reserves N MiB for it first (default 0: none)")
    parser.add_argument("--moe-cache-uploads", type=number(int, 0), default=1, metavar="N",
                        help="the cache's cap on experts copied in per layer and decode (default 1; 0: none), for "
                        "--routing-trace")
    parser.add_argument("--routing-trace", metavar="FILE.npy",
                        help="predict the cache's hit rate by replaying this routing trace (layers x tokens x "
                        "experts per token; pymoe.expert_cache.routing_trace) through the cache's policy")
    parser.add_argument("--json", action="store_true", help="print the plan as one JSON object")

    def run(args) -> int:
        draft = None if args.draft in (NGRAM, MTP) else args.draft
        p = plan(args.model, draft, vram=args.vram, ram=args.ram, ctx=args.ctx, margin=args.margin,
                 cache_type=args.cache_type, priority=args.priority, n_rs_seq=args.n_rs_seq, mtp=args.draft == MTP,
                 moe_cache=args.moe_cache_mib or None, moe_cache_uploads=args.moe_cache_uploads,
                 routing_trace=args.routing_trace)
        if args.json:
            print(json.dumps({**asdict(p), "llama_flags": p.llama_flags(), "gpu_total": p.gpu_total,
                              "ram_total": p.ram_total}))
        else:
            print(p.summary())
        return 0 if p.fits else 2

    return command("plan", argv, parser, run)
