"""python -m pymoe: build flags for C programs, versions; `pymoe upcycle ...` makes a synthetic MoE."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main
        return bench_main(argv[1:])
    if argv[:1] == ["demo"]:
        from .demo import main as demo_main
        return demo_main(argv[1:])
    if argv[:1] == ["chat"]:
        from .chat import main as chat_main
        return chat_main(argv[1:])
    if argv[:1] == ["generate"]:
        from .generate import main as generate_main
        return generate_main(argv[1:])
    if argv[:1] == ["plan"]:
        from .plan import main as plan_main
        return plan_main(argv[1:])
    if argv[:1] == ["upcycle"]:
        from .upcycle import main as upcycle_main
        return upcycle_main(argv[1:])
    parser = argparse.ArgumentParser(prog="pymoe", description="pymoe: MoE models larger than the GPU, over llama.cpp",
                                     epilog="commands: pymoe demo, pymoe generate --help, pymoe chat --help, pymoe bench --help, pymoe plan --help, pymoe upcycle --help")
    parser.add_argument("--cflags", action="store_true", help="print the compiler flags for pymoe.h")
    parser.add_argument("--libs", action="store_true", help="print the linker flags for libpymoe")
    parser.add_argument("--version", action="store_true", help="print pymoe's and llama.cpp's versions")
    args = parser.parse_args(argv)
    from . import paths
    if args.version:
        import pymoe
        print(f"pymoe {pymoe.__version__} (llama.cpp {pymoe.llama_version()})\n{pymoe.build_info()}")
    flags = []
    if args.cflags:
        flags.append(paths.cflags())
    if args.libs:
        flags.append(paths.libs())
    if flags:
        print(" ".join(flags))
    if not (flags or args.version):
        parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
