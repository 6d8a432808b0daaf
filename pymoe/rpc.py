"""A local rpc-server (llama.cpp's RPC backend, packaged as pymoe-rpc-server):
a second device on a machine without a GPU, or the way to lend another
machine's memory to a load.

    with pymoe.rpc.LocalRpcServer() as server:
        model = pymoe.Model(path, rpc_servers=[server.endpoint], n_cpu_moe=4)
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from typing import Optional

from . import errors
from ._native import lib
from .paths import RPC_SERVER


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalRpcServer:
    """Starts pymoe-rpc-server on host (a free port unless given), waits until
    it accepts connections, and stops it on close()."""

    def __init__(self, host: str = "127.0.0.1", port: Optional[int] = None, threads: int = 1,
                 start_timeout: float = 20.0):
        self.host = host
        self.port = port or _free_port(host)
        self.endpoint = f"{host}:{self.port}"
        if not RPC_SERVER.exists():
            raise errors.UnsupportedError(f"{RPC_SERVER} is missing: this pymoe was built without the RPC backend",
                                          lib.PYMOE_EUNSUPPORTED)
        # a fixed mmap threshold: every large block (weights, each received
        # tensor) is its own mapping, returned to the system when freed, so
        # resident memory tracks what loads hold (glibc's adaptive threshold
        # would keep freed blocks in the heap)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
        self.process = subprocess.Popen([str(RPC_SERVER), "-H", host, "-p", str(self.port), "-t", str(threads)],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=env)
        deadline = time.monotonic() + start_timeout
        while True:
            if self.process.poll() is not None:
                out = self.process.stdout.read().decode(errors="replace") if self.process.stdout else ""
                raise errors.BackendError(f"rpc-server exited with status {self.process.returncode}: {out[-500:]}",
                                          lib.PYMOE_EBACKEND)
            try:
                with socket.create_connection((host, self.port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.close()
                    raise errors.BackendError(f"rpc-server did not listen on {self.endpoint} within "
                                              f"{start_timeout:.0f} s", lib.PYMOE_EBACKEND)
                time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.process.pid

    def resident_bytes(self) -> int:
        """The server's resident memory (VmRSS): what a load placed on it costs."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout:
            self.process.stdout.close()

    def __enter__(self) -> "LocalRpcServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
