"""pymoe's commands (`pymoe <command>` or `python -m pymoe <command>`): users of
the library in pymoe/, which never imports them. Each command is a module
here with main(argv); the shared parts are common (options, loading, errors
as exit codes) and terminal (streaming text, progress)."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "generate", "chat", "serve", "bench", "plan", "upcycle")  # pymoe/cli/<command>.py, each with main(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in COMMANDS:  # each command's module is imported only when it runs
        return importlib.import_module(f".{argv[0]}", __package__).main(argv[1:])
    parser = argparse.ArgumentParser(prog="pymoe", description="pymoe: MoE models larger than the GPU, over llama.cpp",
                                     epilog="commands (each with --help): " + ", ".join(COMMANDS))
    parser.add_argument("--cflags", action="store_true", help="print the compiler flags for pymoe.h")
    parser.add_argument("--libs", action="store_true", help="print the linker flags for libpymoe")
    parser.add_argument("--version", action="store_true", help="print pymoe's and llama.cpp's versions")
    args = parser.parse_args(argv)
    from .. import paths
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
