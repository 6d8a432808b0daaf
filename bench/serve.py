"""pymoe serve against in-process decoding and against llama.cpp's
llama-server (built from the same vendored source by `make bench-peer`), on
the demo's Q8_0 MoE target, greedy, each plain and with SmolLM2 as the draft
model, every server with its RAM cache of earlier prompts at its default:

- decode: completion tokens/s of a streamed request, timed by the client from
  its first chunk to its last (in process: a session's generate, the same
  tokens);
- the next turn: time to the first streamed token of a chat's next turn (a
  long first message, its reply, a short question) on a server whose context
  holds that conversation (kept), and on one that answered another
  conversation of 500+ tokens in between (a switch: two conversations asked
  in turns, as an editor's chat and its side requests are).

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
from pymoe.demo_models import smollm2, smollm2_moe

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
NOTES = ("The bakery on the corner opens at five. Before dawn the ovens are lit, the dough that rose overnight is "
         "shaped into loaves, and the first trays go in while the street outside is still dark and quiet. ") * 12


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
    """(seconds to the first token, decode tokens/s after it, text, prompt tokens fed or None where the server
    does not say) of one streamed chat request."""
    t0 = time.perf_counter()
    first = last = None
    pieces = []
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=n, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    tokens, fed = 0, None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            now = time.perf_counter()
            first = first or now
            last = now
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
            details = chunk.usage.prompt_tokens_details
            if details is not None and details.cached_tokens is not None:
                fed = chunk.usage.prompt_tokens - details.cached_tokens
    rate = (tokens - 1) / (last - first) if last and last > first else 0.0
    return first - t0, rate, "".join(pieces), fed


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
    path, draft = smollm2_moe(experts=4, used=2, expert_type="q8_0"), smollm2()
    common = ["--ctx", str(CTX), "-t", str(THREADS), "--temp", "0"]
    peer = ["-c", str(CTX), "-t", str(THREADS), "-tb", str(THREADS), "--temp", "0", "-np", "1", "--no-webui"]
    kinds = {"pymoe serve": [sys.executable, "-P", "-m", "pymoe", "serve", "-m", str(path), *common],
             "pymoe serve -d draft": [sys.executable, "-P", "-m", "pymoe", "serve", "-m", str(path), "-d", str(draft),
                                      *common],
             "pymoe serve --cache-ram 0": [sys.executable, "-P", "-m", "pymoe", "serve", "-m", str(path), *common,
                                           "--cache-ram", "0"]}  # as before the cache: a switch feeds it all
    if LLAMA_SERVER.exists():
        kinds["llama-server"] = [str(LLAMA_SERVER), "-m", str(path), *peer]
        kinds["llama-server -md draft"] = [str(LLAMA_SERVER), "-m", str(path), "-md", str(draft), *peer]
    servers = {}
    try:
        for name, argv in kinds.items():
            port = free_port()
            servers[name] = Server(argv + ["--port", str(port)], port)
        results = measure(servers, path, args)
    finally:
        for server in servers.values():
            server.stop()
    return report(servers, path, args, *results)


def turn(client, conversation, question, n):
    """Ask the conversation's next question; (seconds to its first token, decode tokens/s, prompt tokens fed);
    the reply joins it."""
    conversation.append({"role": "user", "content": question})
    first, rate, reply, fed = streamed(client, conversation, n)
    conversation.append({"role": "assistant", "content": reply})
    return first, rate, fed


def measure(servers, path, args):
    rates = {name: [] for name in ["in process", *servers]}
    kept = {name: [] for name in servers}  # (seconds to the first token, prompt tokens fed)
    switched = {name: [] for name in servers}
    with pymoe.Model(path) as target:
        opening = [{"role": "user", "content": "Reading 1. Read this and tell me what it is about.\n\n" + STORY}]
        n_story = len(target.tokenize(target.chat_format(opening), parse_special=True))
        for rep in range(args.reps):
            rates["in process"].append(in_process(target, opening, args.n))
            for name, server in servers.items():
                a, b = [], []
                ask = f"Reading {rep + 1}. Read this and tell me what it is about.\n\n"  # no rep shares with one before
                rates[name].append(turn(server.client, a, ask + STORY, args.n)[1])
                kept[name].append(turn(server.client, a, "And who kept the light?", 8)[::2])
                turn(server.client, b, ask + NOTES, 8)
                switched[name].append(turn(server.client, a, "How old was it?", 8)[::2])  # back to the first
                switched[name].append(turn(server.client, b, "When does it open?", 8)[::2])  # and to the second
            print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
    return rates, kept, switched, n_story


def report(servers, path, args, rates, kept, switched, n_story) -> int:
    base = statistics.median(rates["in process"])
    lines = ["# pymoe serve: decode speed over HTTP, the next turn of a chat, and switching conversations", "",
             *machine_lines(f"target {path.name} (the demo's Q8_0 MoE), draft SmolLM2-135M-Instruct Q4_1 where "
                            f"named, greedy, {THREADS} threads, ctx {CTX}, {args.reps} interleaved repetitions, "
                            "medians; every server with its RAM cache of earlier prompts at its default (pymoe "
                            "--cache-ram 2048 MiB, llama-server --cache-ram 8192 MiB)"), "",
             f"Decode: a streamed chat request of {args.n} tokens after a {n_story}-token prompt, tokens/s from the "
             "first streamed token to the last (in process: a plain session's generate of the same prompt).", "",
             "| | decode tokens/s | x in process |", "|---|---|---|"]
    for name, values in rates.items():
        lines.append(f"| {name} | {statistics.median(values):.1f} | {statistics.median(values) / base:.2f} |")
    lines += ["", f"The next turn: seconds to the first token of a chat's next turn (a {n_story}-token first "
              "message, its reply, a short question) when the server's context holds the conversation (kept), and "
              "when the server answered another conversation of as many tokens in between (switch: two "
              "conversations asked in turns, each coming back once per repetition).", "",
              "| | first token, kept (s) | first token, after a switch (s) | switch / kept | switch / "
              "llama-server's | prompt tokens fed, kept / switch |", "|---|---|---|---|---|---|"]

    def median(pairs, i):
        values = [p[i] for p in pairs if p[i] is not None]
        return statistics.median(values) if values else None

    for name in servers:
        k, w = median(kept[name], 0), median(switched[name], 0)
        peer = "llama-server -md draft" if "draft" in name else "llama-server"
        vs = f"{w / median(switched[peer], 0):.2f}" if peer in switched else "-"
        fed = [median(kept[name], 1), median(switched[name], 1)]
        fed_text = " / ".join("-" if f is None else f"{f:.0f}" for f in fed)
        lines.append(f"| {name} | {k:.3f} | {w:.3f} | {w / k:.1f} | {vs} | {fed_text} |")
    if "llama-server" not in servers:
        lines += ["", "(no llama-server: `make bench-peer` builds it)"]
    lines += ["", "A switch costs each server a restore from its RAM cache of earlier prompts instead of feeding the "
              "conversation again: pymoe saves the context a request would discard (with the draft's state, for a "
              "speculative loop) and restores the saved state that shares the most with a new prompt; llama-server "
              "does the same with its slot's prompt cache."]
    return write("serve.md", lines)


if __name__ == "__main__":
    sys.exit(main())
