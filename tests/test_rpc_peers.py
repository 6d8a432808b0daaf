"""rpc-server peers that misbehave: a taken port, something that is not an
rpc-server (it closes, talks garbage or never answers), a server killed or
stopped in the middle of generation. Each is a typed error in the user's
process, which goes on; none ends it or waits forever."""
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import pytest

import pymoe
import pymoe.rpc


class FakePeer:
    """A TCP listener on 127.0.0.1 that greets each connection with `behaviour`: close, garbage or silence."""

    def __init__(self, behaviour: str):
        self.behaviour = behaviour
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.endpoint = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.held = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if self.behaviour == "close":
                conn.close()
            elif self.behaviour == "garbage":
                conn.recv(64)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n" * 4)
                self.held.append(conn)
            else:  # silent: take the connection, never answer
                self.held.append(conn)

    def close(self):
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.fixture(params=["close", "garbage", "silent"])
def peer(request):
    p = FakePeer(request.param)
    yield p
    p.close()


MESSAGES = {"close": "closed the connection during the handshake", "garbage": "is not an rpc-server",
            "silent": "did not answer the handshake within 5 s"}


def test_a_load_with_a_peer_that_is_not_an_rpc_server_is_a_typed_error(dense_path, peer):
    t0 = time.monotonic()
    with pytest.raises(pymoe.BackendError, match=MESSAGES[peer.behaviour]):
        pymoe.Model(dense_path, rpc_servers=[peer.endpoint])
    with pytest.raises(pymoe.BackendError, match=MESSAGES[peer.behaviour]):
        pymoe.memory_plan(dense_path, rpc_servers=[peer.endpoint])
    with pytest.raises(pymoe.BackendError, match=MESSAGES[peer.behaviour]):
        pymoe.rpc.handshake(peer.endpoint)
    assert time.monotonic() - t0 < 30


def test_nothing_listening_is_a_typed_error(dense_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: connections are refused
        with pytest.raises(pymoe.PymoeError, match="no rpc-server answers"):
            pymoe.Model(dense_path, rpc_servers=[endpoint])


def test_a_local_server_on_a_taken_port_is_refused():
    holder = FakePeer("silent")
    try:
        port = int(holder.endpoint.split(":")[1])
        with pytest.raises(pymoe.BackendError, match="another program has the port"):
            pymoe.rpc.LocalRpcServer(port=port)
    finally:
        holder.close()


def test_a_local_server_is_ready_when_it_speaks_the_protocol():
    with pymoe.rpc.LocalRpcServer() as server:
        major, minor, patch = pymoe.rpc.handshake(server.endpoint)
        assert major >= 1 and minor >= 0 and patch >= 0


def test_a_server_for_other_machines_warns():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pymoe.rpc.LocalRpcServer(host="0.0.0.0"):
            pass
    assert any("no authentication" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pymoe.rpc.LocalRpcServer():  # loopback: silent
            pass


LOST = """
    import os, signal, sys, time
    import pymoe, pymoe.rpc
    how, path = sys.argv[1], sys.argv[2]
    pymoe.rpc.set_timeout(2)
    server = pymoe.rpc.LocalRpcServer()
    model = pymoe.Model(path, rpc_servers=[server.endpoint], n_gpu_layers=-1)
    s = model.session(n_ctx=256, n_threads=1)
    s.feed(model.tokenize("Once upon a time"))
    for _ in range(3):
        s.feed(s.sample())
    os.kill(server.pid, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        for _ in range(1000):
            s.feed(s.sample())
        print("completed", flush=True)
    except pymoe.BackendError as exc:
        print("lost", round(time.monotonic() - t0, 1), "|", exc, flush=True)
    try:
        s.feed(5)
    except pymoe.BackendError:
        print("refused", flush=True)
    s.close()
    model.close()  # left as it is: freeing would wait on the server
    with pymoe.Model(path) as again, again.session(n_ctx=64) as s2:  # the process goes on
        s2.feed(again.tokenize("hello"))
        print("alive", s2.position, flush=True)
    os.kill(server.pid, signal.SIGKILL)
"""


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_server_lost_during_generation_is_a_typed_error_and_the_process_goes_on(dense_path, how):
    r = subprocess.run([sys.executable, "-P", "-c", textwrap.dedent(LOST), how, str(dense_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("lost"), r.stdout + r.stderr[-2000:]
    assert "connection to an rpc-server was lost" in lines[0]
    seconds = float(lines[0].split()[1])
    assert seconds < (3 if how == "kill" else 10), lines[0]  # stopped: the 2 s timeout, then the error
    assert lines[1] == "refused" and lines[2].startswith("alive")
