"""pymoe-rpc-server: the console command for the rpc-server built with the
package (llama.cpp's RPC backend: lends this machine's memory and CPU or GPU
to a load on another machine). It has no authentication: keep it on
127.0.0.1 or a network you trust."""
from __future__ import annotations

import os
import sys


def main(argv=None) -> int:
    from ..paths import RPC_SERVER
    argv = sys.argv[1:] if argv is None else list(argv)
    if not RPC_SERVER.exists():
        print(f"pymoe-rpc-server: {RPC_SERVER} is missing: this pymoe was built without the RPC backend",
              file=sys.stderr)
        return 2
    os.execv(RPC_SERVER, [str(RPC_SERVER), *argv])  # the process becomes the server: signals reach it directly
    return 0  # not reached
