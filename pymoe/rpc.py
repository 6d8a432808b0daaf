"""A local rpc-server (llama.cpp's RPC backend, packaged as pymoe-rpc-server):
a second device on a machine without a GPU, or the way to lend another
machine's memory to a load.

    with pymoe.rpc.LocalRpcServer() as server:
        model = pymoe.Model(path, rpc_servers=[server.endpoint], n_cpu_moe=4)
"""
from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import time
import warnings
from typing import Optional, Tuple

from . import errors
from ._native import ffi, lib
from .paths import RPC_SERVER


def handshake(endpoint: str) -> Tuple[int, int, int]:
    """Speak the RPC handshake with endpoint ("host:port") as a load would, with
    timeouts: the server's protocol version, or (-1, -1, -1) when this process
    is connected to it already. BackendError when nothing listens there or what
    answers is not an rpc-server; UnsupportedError for another protocol version."""
    version = ffi.new("int32_t[3]")
    rc = lib.pymoe_rpc_handshake(endpoint.encode(), version)
    if rc:
        detail = ffi.string(lib.pymoe_last_error()).decode("utf-8", "replace")
        typed = rc in (lib.PYMOE_EINVAL, lib.PYMOE_EUNSUPPORTED)  # else unreachable or not an rpc-server
        raise (errors.BY_CODE[rc] if typed else errors.BackendError)(detail, rc)
    return tuple(version)


def set_timeout(seconds: float) -> None:
    """Loads from now on give their connections to rpc-servers this receive and
    send timeout (default 120 s; 0: none): a server silent that long is lost
    (BackendError), not waited on forever."""
    if not seconds >= 0:
        raise errors.InvalidArgumentError(f"the timeout must be >= 0 seconds, got {seconds!r}", lib.PYMOE_EINVAL)
    lib.pymoe_rpc_set_timeout(float(seconds))


def timeout() -> float:
    return lib.pymoe_rpc_timeout()


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise errors.BackendError(f"cannot start an rpc-server on {host}:{port}: {exc.strerror} (another "
                                      f"program has the port; choose another, or none for a free one)",
                                      lib.PYMOE_EBACKEND) from None


class LocalRpcServer:
    """Starts pymoe-rpc-server on host (a free port unless given), waits until
    it answers the RPC handshake, and stops it on close(). Any host but a
    loopback one warns: ggml's RPC has no authentication."""

    def __init__(self, host: str = "127.0.0.1", port: Optional[int] = None, threads: int = 1,
                 start_timeout: float = 20.0):
        self.host = host
        if not RPC_SERVER.exists():
            raise errors.UnsupportedError(f"{RPC_SERVER} is missing: this pymoe was built without the RPC backend",
                                          lib.PYMOE_EUNSUPPORTED)
        if port:
            _check_port_free(host, port)  # else the handshake below could reach whoever holds it
        self.port = port or _free_port(host)
        self.endpoint = f"{host}:{self.port}"
        if not is_loopback(host):
            warnings.warn(f"an rpc-server on {host}:{self.port} can be reached from other machines, and ggml's RPC "
                          f"has no authentication: anyone who reaches it can use this machine's memory and "
                          f"processors. Keep it on 127.0.0.1 unless the network is yours alone",
                          errors.PymoeWarning, stacklevel=2)
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
                handshake(self.endpoint)  # ready: it speaks the protocol, not only accepts connections
                break
            except errors.PymoeError as exc:
                if time.monotonic() > deadline:
                    self.close()
                    raise errors.BackendError(f"rpc-server did not answer on {self.endpoint} within "
                                              f"{start_timeout:.0f} s: {exc}", lib.PYMOE_EBACKEND) from None
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
