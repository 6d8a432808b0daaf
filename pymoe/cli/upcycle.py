"""pymoe upcycle: make a synthetic Mixtral-style MoE from a dense llama GGUF
(pymoe.upcycle does the work)."""
from __future__ import annotations

import sys
import time

from ..upcycle import TYPES, upcycle
from .common import Parser, UsageError, command, number
from .terminal import bar


def progress(quiet: bool):
    """A bar on a terminal; otherwise a line at each quarter (logs stay short); None when quiet."""
    if quiet:
        return None
    if sys.stderr.isatty():
        draw = bar("upcycling")
        return lambda done, total, name: draw(done, total)
    started, said = time.monotonic(), [0]

    def quarter(done, total, name):
        q = 4 * done // total
        if q > said[0]:
            said[0] = q
            print(f"pymoe upcycle: {done}/{total} tensors, {time.monotonic() - started:.0f} s", file=sys.stderr)
    return quarter


def main(argv=None) -> int:
    parser = Parser(
        prog="pymoe upcycle",
        description="Make a synthetic Mixtral-style MoE from a dense llama GGUF: each expert is the dense FFN "
                    "plus seeded noise. The dense model is then a draft for it.")
    parser.add_argument("src", help="dense llama-architecture GGUF")
    parser.add_argument("dst", help="output GGUF")
    parser.add_argument("--experts", type=number(int, 1, 256), default=8, help="experts per layer (default 8)")
    parser.add_argument("--used", type=number(int, 1, 256), default=2,
                        help="experts each token is routed to (default 2)")
    parser.add_argument("--noise", type=number(float, 0), default=0.1,
                        help="expert noise, relative to each weight's standard deviation (default 0.1)")
    parser.add_argument("--type", default="q8_0", choices=sorted(TYPES), help="expert tensor type (default q8_0)")
    parser.add_argument("--rest-f32", action="store_true", help="store every other tensor in F32 too")
    parser.add_argument("--seed", type=number(int, 0, 2**32 - 1), default=0)
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")

    def run(args) -> int:
        try:
            out = upcycle(args.src, args.dst, n_experts=args.experts, n_experts_used=args.used, noise=args.noise,
                          expert_type=args.type, rest_f32=args.rest_f32, seed=args.seed, progress=progress(args.quiet))
        except ValueError as exc:
            raise UsageError(str(exc))
        except OSError as exc:
            raise UsageError(f"{exc.filename or args.src}: {exc.strerror or exc}")
        print(out)
        return 0

    return command("upcycle", argv, parser, run)
