"""Tool calls: pymoe serve against llama.cpp's llama-server (`make bench-peer`)
on the demo's Q8_0 MoE target with a chat template that has tools (Qwen2.5's,
from the pinned llama.cpp source), greedy, same requests and seed:

- the calls each server answers, whole and streamed (the stream's deltas put
  together as a client does), for tool_choice auto, required and a named
  function, and an agent's loop (a call, the tool's result, the answer);
- tool-call requests per second (sequential, whole, interleaved between the
  servers; medians).

Writes bench/results/serve_tools.md.

    .venv/bin/python -P bench/serve_tools.py [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # python -P does not add the script's folder
from report import machine_lines, write  # noqa: E402
from serve import LLAMA_SERVER, Server, free_port  # noqa: E402

from pymoe.demo_models import smollm2_moe  # noqa: E402

TEMPLATE = HERE.parent / "vendor" / "llama.cpp" / "models" / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja"
THREADS, CTX, SEED = 2, 4096, 7


def tool(name, description):
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


TOOLS = [tool("get_weather", "The weather of a city"), tool("get_time", "The time in a city")]


def call(city, i):
    return {"role": "assistant", "content": None, "tool_calls": [{"id": f"call_{i}", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": city})}}]}


ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
FEW_SHOT = [{"role": "user", "content": "Paris weather"}, call("Paris", 1), {"role": "user", "content": "Rome weather"},
            call("Rome", 2), {"role": "user", "content": "Berlin weather"}]
CASES = {  # name: (messages, tool_choice)
    "a question, auto": (ASK, "auto"),
    "few-shot, auto": (FEW_SHOT, "auto"),
    "few-shot, required": (FEW_SHOT, "required"),
    "a question, required": (ASK, "required"),
    "a question, named get_time": (ASK, {"type": "function", "function": {"name": "get_time"}}),
}


def ask(client, messages, choice, stream=False, n=60):
    """(content, [(name, arguments)], finish_reason, completion tokens, seconds) of one request."""
    t0 = time.perf_counter()
    reply = client.chat.completions.create(model="m", messages=messages, tools=TOOLS, tool_choice=choice,
                                           temperature=0, seed=SEED, max_tokens=n, parallel_tool_calls=False,
                                           stream=stream, **({"stream_options": {"include_usage": True}}
                                                             if stream else {}))
    if not stream:
        m = reply.choices[0].message
        return (m.content or "", [(c.function.name, c.function.arguments) for c in m.tool_calls or ()],
                reply.choices[0].finish_reason, reply.usage.completion_tokens, time.perf_counter() - t0)
    content, calls, finish, tokens = "", {}, None, 0
    for chunk in reply:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for c in delta.tool_calls or ():
            one = calls.setdefault(c.index, ["", ""])
            one[0] += c.function.name or ""
            one[1] += c.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return (content, [tuple(calls[i]) for i in sorted(calls)], finish, tokens, time.perf_counter() - t0)


def shown(result) -> str:
    content, calls, finish, tokens, _ = result
    text = "; ".join(f"{name}({args})" for name, args in calls) or json.dumps(content[:60])
    return f"{text} [{finish}, {tokens} tokens]".replace("|", "\\|").replace("\n", " ")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    path = smollm2_moe(experts=4, used=2, expert_type="q8_0")
    kinds = {"pymoe serve": [sys.executable, "-P", "-m", "pymoe", "serve", "-m", str(path), "--ctx", str(CTX),
                             "-t", str(THREADS), "--temp", "0", "--chat-template-file", str(TEMPLATE)]}
    if LLAMA_SERVER.exists():
        kinds["llama-server"] = [str(LLAMA_SERVER), "-m", str(path), "-c", str(CTX), "-t", str(THREADS), "-tb",
                                 str(THREADS), "--temp", "0", "-np", "1", "--no-webui", "--jinja",
                                 "--chat-template-file", str(TEMPLATE)]
    servers = {}
    try:
        for name, argv in kinds.items():
            port = free_port()
            servers[name] = Server(argv + ["--port", str(port)], port)
        answers = {case: {name: (ask(s.client, *CASES[case]), ask(s.client, *CASES[case], stream=True))
                          for name, s in servers.items()} for case in CASES}
        # an agent's loop: pymoe's call, the tool's result, then each server's answer to the same history
        first = ask(servers["pymoe serve"].client, ASK, "required")
        history = ASK + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": n, "arguments": a}} for n, a in first[1][:1]]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
        loop = {name: (ask(s.client, history, "none", n=40), ask(s.client, history, "none", stream=True, n=40))
                for name, s in servers.items()}
        seconds = {name: [] for name in servers}
        for _ in range(args.reps):
            for name, s in servers.items():
                seconds[name].append(ask(s.client, *CASES["few-shot, auto"])[4])
        required = [ask(servers["pymoe serve"].client, *CASES["a question, required"])[4] for _ in range(args.reps)]
    finally:
        for server in servers.values():
            server.stop()
    return report(path, args, servers, answers, first, loop, seconds, required)


def report(path, args, servers, answers, first, loop, seconds, required) -> int:
    names = list(servers)
    lines = ["# pymoe serve: tool calls, side by side with llama-server", "",
             *machine_lines(f"target {path.name} (the demo's Q8_0 MoE) with Qwen2.5-7B-Instruct's chat template (it "
                            f"has tools), greedy, seed {SEED}, parallel_tool_calls false, {THREADS} threads, ctx "
                            f"{CTX}"), "",
             "What each server answers (whole; the stream, put together as a client does, is the same unless a "
             "second line says otherwise):", "",
             "| request | " + " | ".join(names) + " | same calls |", "|---|" + "---|" * (len(names) + 1)]
    for case, by_server in list(answers.items()) + [("the loop's answer (tool result in, tool_choice none)", loop)]:
        cells = []
        for name in names:
            whole, stream = by_server[name]
            cell = shown(whole)
            if (whole[0], whole[1], whole[2]) != (stream[0], stream[1], stream[2]):
                at = next((i for i, (a, b) in enumerate(zip(whole[0], stream[0])) if a != b),
                          min(len(whole[0]), len(stream[0])))
                cell += f"<br>streamed: {shown(stream)}, the text differing from character {at} on"
            cells.append(cell)
        same = "-" if len(names) < 2 else "yes" if len({tuple(by_server[n][0][1]) for n in names}) == 1 else "no"
        lines.append(f"| {case} | " + " | ".join(cells) + f" | {same} |")
    lines += ["", "Where a whole answer and its stream differ, the second request reused the first one's context "
              "(its prompt's KV cache) where the first fed it whole: greedy text that long parts where two "
              "tokens are nearly tied, in both servers. llama-server counts the end-of-generation token in "
              "completion_tokens; pymoe does not. llama-server takes no named function (a tool_choice object is "
              "read as auto), and its grammar for required lets free text come before the call, so a small model "
              "writes text until max_tokens; pymoe drops that free text from the grammar for required and a "
              "named function (the named one the only tool the template sees).", "",
              f"The loop's first step (pymoe, a question, required): {shown(first)}.", "",
              f"Tool-call requests (few-shot, auto: a call from both servers), sequential, whole, {args.reps} "
              "interleaved repetitions, medians:", "", "| | seconds a request | requests/s |", "|---|---|---|"]
    for name, values in seconds.items():
        m = statistics.median(values)
        lines.append(f"| {name} | {m:.3f} | {1 / m:.2f} |")
    m = statistics.median(required)
    lines.append(f"| pymoe serve, a question, required | {m:.3f} | {1 / m:.2f} |")
    if "llama-server" not in servers:
        lines += ["", "(no llama-server: `make bench-peer` builds it)"]
    return write("serve_tools.md", lines)


if __name__ == "__main__":
    sys.exit(main())
