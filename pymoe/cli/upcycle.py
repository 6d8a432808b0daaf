"""pymoe upcycle: make a synthetic Mixtral-style MoE from a dense llama GGUF
(pymoe.upcycle does the work)."""
from __future__ import annotations

import argparse
import sys
import time

from ..upcycle import TYPES, upcycle


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="pymoe upcycle",
        description="Make a synthetic Mixtral-style MoE from a dense llama GGUF: each expert is the dense FFN "
                    "plus seeded noise. The dense model is then a draft for it.")
    parser.add_argument("src", help="dense llama-architecture GGUF")
    parser.add_argument("dst", help="output GGUF")
    parser.add_argument("--experts", type=int, default=8, help="experts per layer (default 8)")
    parser.add_argument("--used", type=int, default=2, help="experts each token is routed to (default 2)")
    parser.add_argument("--noise", type=float, default=0.1,
                        help="expert noise, relative to each weight's standard deviation (default 0.1)")
    parser.add_argument("--type", default="q8_0", choices=sorted(TYPES), help="expert tensor type (default q8_0)")
    parser.add_argument("--rest-f32", action="store_true", help="store every other tensor in F32 too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    started = time.monotonic()
    say = None if args.quiet else (lambda done, total, name: print(
        f"{name} ({done}/{total} tensors, {time.monotonic() - started:.0f} s)", file=sys.stderr))
    try:
        out = upcycle(args.src, args.dst, n_experts=args.experts, n_experts_used=args.used, noise=args.noise,
                      expert_type=args.type, rest_f32=args.rest_f32, seed=args.seed, progress=say)
    except (ValueError, OSError) as exc:
        print(f"pymoe upcycle: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0
