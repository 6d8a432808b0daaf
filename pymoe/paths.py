"""Where the installed native parts live: header, shared libraries, tools."""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = PACKAGE_DIR / "include"   # pymoe.h
LIB_DIR = PACKAGE_DIR / "lib"           # libpymoe.so, libllama.so, libggml*.so
BIN_DIR = PACKAGE_DIR / "bin"
RPC_SERVER = BIN_DIR / "pymoe-rpc-server"  # llama.cpp's rpc-server, built with the package


def cflags() -> str:
    return f"-I{INCLUDE_DIR}"


def libs() -> str:
    # rpath: the program finds libpymoe where the package keeps it
    return f"-L{LIB_DIR} -Wl,-rpath,{LIB_DIR} -lpymoe"
