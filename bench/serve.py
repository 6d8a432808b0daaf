"""pymoe serve against in-process decoding and against llama.cpp's
llama-server (built from the same vendored source by `make bench-peer`), on
the demo's Q8_0 MoE target, greedy, plain decoding:

- decode: completion tokens/s of a streamed request, timed by the client from
  its first chunk to its last (in process: a session's generate, the same
  tokens);
- the next turn: time to the first streamed token of a chat's second turn
  (a long first message, its reply, a short question) on a server whose
  context holds the first turn (kept) and on one whose context holds another
  conversation (everything fed again).

Settings run interleaved in each repetition; medians. Writes
bench/results/serve.md.

    .venv/bin/python -P bench/serve.py [--reps 3] [-n 128]
"""
from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai

import pymoe
from pymoe.demo_models import smollm2_moe

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # python -P does not add the script's folder
from report import machine_lines, write  # noqa: E402

REPO = HERE.parent
LLAMA_SERVER = REPO / "build" / "peer" / "bin" / "llama-server"
THREADS = 2
CTX = 4096
STORY = ("The lighthouse stood on a narrow spit of rock at the mouth of the harbour. Every night for ninety years its "
         "lamp had turned, sweeping the water with a slow white beam that fishermen counted on to find their way "
         "home. ") * 12


class Server:
    """A server process on a free port, ready when it answers /health."""

    def __init__(self, argv, port):
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        self.log = []
        threading.Thread(target=lambda: self.log.extend(self.process.stderr), daemon=True).start()
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0,
                                    timeout=600)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.client.models.list()
                return
            except (openai.APIConnectionError, openai.InternalServerError):  # not listening yet, or loading (503)
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.process.kill()
                    raise RuntimeError("the server did not start: " + "".join(self.log)[-2000:])
                time.sleep(0.2)

    def stop(self):
        self.process.send_signal(signal.SIGINT)
        self.process.wait(60)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def streamed(client, messages, n):
    """(seconds to the first token, decode tokens/s after it, text) of one streamed chat request."""
    t0 = time.perf_counter()
    first = last = None
    pieces = []
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    tokens = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    rate = (tokens - 1) / (last - first) if last and last > first else 0.0
    return first - t0, rate, "".join(pieces)


def in_process(target, messages, n):
    prompt = target.tokenize(target.chat_format(messages), parse_special=True)
    with target.session(n_ctx=CTX, n_threads=THREADS, sampling=pymoe.SamplingParams.greedy()) as s:
        s.feed(prompt)
        t0 = time.perf_counter()
        ids = list(s.generate_tokens(None, max_tokens=n))
        return len(ids) / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-n", type=int, default=128)
    args = ap.parse_args()
    path = smollm2_moe(experts=4, used=2, expert_type="q8_0")
    pymoe_port, peer_port = free_port(), free_port()
    servers = {}
    try:
        servers["pymoe serve"] = Server([sys.executable, "-P", "-m", "pymoe", "serve", "-m", str(path), "--port",
                                         str(pymoe_port), "--ctx", str(CTX), "-t", str(THREADS), "--temp", "0"],
                                        pymoe_port)
        if LLAMA_SERVER.exists():
            servers["llama-server"] = Server([str(LLAMA_SERVER), "-m", str(path), "--port", str(peer_port), "-c",
                                              str(CTX), "-t", str(THREADS), "-tb", str(THREADS), "--temp", "0", "-np",
                                              "1", "--no-webui"], peer_port)
        results = measure(servers, path, args)
    finally:
        for server in servers.values():
            server.stop()
    return report(servers, path, args, *results)


def measure(servers, path, args):
    first_turn = [{"role": "user", "content": "Read this and tell me what it is about.\n\n" + STORY}]
    other = [{"role": "user", "content": "Write a short poem about the moon."}]
    rates = {name: [] for name in ["in process", *servers]}
    kept = {name: [] for name in servers}
    refed = {name: [] for name in servers}
    with pymoe.Model(path) as target:
        n_story = len(target.tokenize(target.chat_format(first_turn), parse_special=True))
        for rep in range(args.reps):
            rates["in process"].append(in_process(target, first_turn, args.n))
            for name, server in servers.items():
                _, rate, reply = streamed(server.client, first_turn, args.n)
                rates[name].append(rate)
                second = first_turn + [{"role": "assistant", "content": reply},
                                       {"role": "user", "content": "And who kept the light?"}]
                kept[name].append(streamed(server.client, second, 8)[0])
                streamed(server.client, other, 8)  # the context now holds another conversation
                refed[name].append(streamed(server.client, second, 8)[0])
            print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
    return rates, kept, refed, n_story


def report(servers, path, args, rates, kept, refed, n_story) -> int:
    base = statistics.median(rates["in process"])
    lines = ["# pymoe serve: decode speed over HTTP and the next turn of a chat", "", *machine_lines(
        f"target {path.name} (the demo's Q8_0 MoE), greedy, plain decoding, {THREADS} threads, ctx {CTX}, "
        f"{args.reps} interleaved repetitions, medians"), "",
             f"Decode: a streamed chat request of {args.n} tokens after a {n_story}-token prompt, tokens/s from the "
             "first streamed token to the last (in process: a session's generate of the same prompt).", "",
             "| | decode tokens/s | x in process |", "|---|---|---|"]
    for name, values in rates.items():
        lines.append(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / base:.2f} |")
    lines += ["", f"The next turn: seconds to the first token of the second turn (the {n_story}-token first turn, its "
              "reply, a short question), when the server's context holds the first turn (kept) and when it holds "
              "another conversation (fed again).", "",
              "| | first token, context kept (s) | first token, fed again (s) | fed again / kept |", "|---|---|---|---|"]
    for name in servers:
        k, r = statistics.median(kept[name]), statistics.median(refed[name])
        lines.append(f"| {name} | {k:.3f} | {r:.3f} | {r / k:.1f} |")
    if "llama-server" not in servers:
        lines += ["", "(no llama-server: `make bench-peer` builds it)"]
    else:
        lines += ["", "Why llama-server's \"fed again\" is faster than its \"kept\": it is not fed again. llama-server "
                  "keeps the states of earlier prompts in RAM (`--cache-ram`, on by default) and restores the one "
                  "that shares the most with a new prompt; the second turn was asked once before, so its whole "
                  "prompt comes back from that cache. pymoe serve keeps one context: after another conversation it "
                  "feeds the whole prompt again."]
    return write("serve.md", lines)


if __name__ == "__main__":
    sys.exit(main())
