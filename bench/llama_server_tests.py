"""llama-server's own test suite (tools/server/tests of the pinned llama.cpp)
against `pymoe serve` and against llama-server, each run as the suite's
external server (DEBUG_EXTERNAL=1, PORT) on the same model and settings.

The suite was written for llama.cpp's tiny test models and starts each server
with the flags a test needs; run against one external server on another model,
some of its tests fail on both servers. So the comparison is what says
something: a test that passes on llama-server and fails on pymoe serve is a
difference of pymoe's (a missing feature, or a real difference), one that
fails on both is the suite's expectation of another model or other flags.
Writes bench/results/llama_server_tests.md.

Needs `make bench-peer` (llama-server). The suite's requirements go into
build/server-tests-venv on first use (from PyPI).

    .venv/bin/python -P bench/llama_server_tests.py [-k EXPR] [--timeout 120] [--reuse-peer]

--reuse-peer takes llama-server's results from the last run (build/server-tests/, about 13 minutes here)
and runs the suite against pymoe serve only; --report-only writes the report from both last runs.
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # python -P does not add the script's folder
from report import machine_lines, write  # noqa: E402
from serve import LLAMA_SERVER, Server, free_port  # noqa: E402

from pymoe.demo_models import smollm2  # noqa: E402

REPO = HERE.parent
SUITE = REPO / "vendor" / "llama.cpp" / "tools" / "server" / "tests"
VENV = REPO / "build" / "server-tests-venv"
OUT = REPO / "build" / "server-tests"  # each server's JUnit report of the last run
CTX = 2048

# Why pymoe serve fails a test llama-server passes: first by the failure's text, then by the test's file (a 404
# says only that a route is missing; the file says which).
BY_MESSAGE = [
    ("Expected something like", "model-specific expectation: the 135M model's sampled answer to a geometry question "
                                "after a tool result (llama-server fails other variants of the same test)"),
    ("does not support log probabilities", "missing feature: logprobs (issue 33)"),
    ("logit_bias: pymoe serve", "missing feature: logit_bias (issue 33)"),
    ("grammar: pymoe serve", "missing feature: grammars (issue 33)"),
    ("KeyError: 'timings'", "llama-server's own response field (timings): pymoe reports its own figures"),
]
BY_TEST = [  # a part of the test's name
    ("response_format", "missing feature: JSON schema and grammar constraints (issue 33)"),
    ("cors_", "real difference: pymoe lets pages of this machine call it from a browser by default (llama-server: "
              "any page; pymoe serve --cors-origins '*' does that)"),
    ("timings_per_token", "llama-server's own extension fields (timings_per_token, return_progress, __verbose)"),
    ("return_progress", "llama-server's own extension fields (timings_per_token, return_progress, __verbose)"),
    ("verbose_debug", "llama-server's own extension fields (timings_per_token, return_progress, __verbose)"),
    ("token_count", "llama-server's own route /chat/completions/input_tokens is not served"),
    ("continue_final_message", "real difference: llama-server's own template options are ignored, not refused when "
                               "they conflict"),
    ("invalid_chat_completion_req[messages7]", "real difference: two assistant messages in a row are rendered, "
                                               "where llama-server's Jinja template refuses them"),
    ("slashed_model_name", "missing feature: llama-server's router stream routes (/v1/stream) are not served"),
    ("correct_api_key", "llama-server's own /completions API (its bare route, with content) is not served"),
]
BY_FILE = {
    "test_completion.py": "llama-server's own /completion API (prompt, n_predict, content, timings, n_probs) is not "
                          "served: pymoe serves OpenAI's /v1/completions",
    "test_compat_anthropic.py": "missing feature: the Anthropic API (/v1/messages) is not served",
    "test_compat_oai_responses.py": "missing feature: /v1/responses is not served",
    "test_metrics.py": "missing feature: /metrics and /slots are not served",
    "test_ignore_eos.py": "llama-server's own /completion API and its ignore_eos are not served",
    "test_kv_keep_only_active.py": "llama-server's own /completion API is not served",
    "test_ctx_shift.py": "llama-server's own /completion API is not served",
    "test_proxy.py": "missing feature: llama-server's tool proxy routes are not served",
    "test_router.py": "missing feature: llama-server's model router is not served",
}


def why(ident: str, message: str) -> str:
    for text, reason in BY_MESSAGE:
        if text in message:
            return reason
    for part, reason in BY_TEST:
        if part in ident:
            return reason
    return BY_FILE.get(ident.split("::")[0], "(not yet explained)")


def suite_python() -> Path:
    """The suite's own environment (its pinned requirements and pytest-timeout), made once."""
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "-r", str(SUITE / "requirements.txt"),
                        "pytest-timeout"], check=True)
    return python


def run_suite(python: Path, port: int, junit: Path, args) -> None:
    env = {**os.environ, "DEBUG_EXTERNAL": "1", "PORT": str(port)}
    command = [str(python), "-m", "pytest", "unit", "-q", "-p", "no:cacheprovider", f"--timeout={args.timeout}",
               f"--junitxml={junit}"] + (["-k", args.k] if args.k else [])
    subprocess.run(command, cwd=SUITE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def outcomes(junit: Path) -> dict:
    """{test id: (outcome, first line of its failure)} from a JUnit XML report."""
    found = {}
    for case in ElementTree.parse(junit).iter("testcase"):
        ident = f"{case.get('classname', '').split('.')[-1]}.py::{case.get('name')}"
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            node = case.find(kind)
            if node is not None:
                outcome = "failed" if kind in ("failure", "error") else "skipped"
                message = (node.get("message") or node.text or "").strip().splitlines()[0][:160] if (
                    node.get("message") or node.text) else ""
                break
        found[ident] = (outcome, message)
    return found


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("-k", help="only the suite's tests matching this pytest expression")
    ap.add_argument("--timeout", type=int, default=120, help="seconds a test may take")
    ap.add_argument("--reuse-peer", action="store_true", help="llama-server's results of the last run")
    ap.add_argument("--report-only", action="store_true", help="both servers' results of the last run")
    args = ap.parse_args()
    if not LLAMA_SERVER.exists():
        print("llama-server is missing: make bench-peer", file=sys.stderr)
        return 2
    python = suite_python()
    model = smollm2()
    servers = {"pymoe serve": [sys.executable, "-P", "-m", "pymoe", "serve", "-m", str(model), "--ctx", str(CTX),
                               "-t", "2", "-a", "tinyllama-2"],
               "llama-server": [str(LLAMA_SERVER), "-m", str(model), "-c", str(CTX), "-t", "2", "-np", "1",
                                "--no-webui", "-a", "tinyllama-2"]}
    OUT.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, argv in servers.items():
        junit = OUT / f"{name.split()[0]}.xml"
        if not ((args.report_only or args.reuse_peer and name == "llama-server") and junit.exists()):
            port = free_port()
            server = Server(argv + ["--port", str(port)], port)
            try:
                run_suite(python, port, junit, args)
            finally:
                server.stop()
        results[name] = outcomes(junit)
        print(f"{name}: done", file=sys.stderr)
    return report(model, results, args)


def report(model: Path, results: dict, args) -> int:
    ours, peer = results["pymoe serve"], results["llama-server"]
    by_file = collections.defaultdict(collections.Counter)
    differences = []
    for ident in sorted(set(ours) | set(peer)):
        a, b = ours.get(ident, ("absent", ""))[0], peer.get(ident, ("absent", ""))[0]
        key = ("both pass" if a == b == "passed" else "both fail" if a == b == "failed" else
               "skipped" if "skipped" in (a, b) else "pymoe fails" if a != "passed" else "llama-server fails")
        by_file[ident.split("::")[0]][key] += 1
        if key in ("pymoe fails", "llama-server fails"):
            differences.append((ident, key, ours.get(ident, ("", ""))[1], peer.get(ident, ("", ""))[1]))
    columns = ["both pass", "pymoe fails", "llama-server fails", "both fail", "skipped"]
    lines = ["# llama-server's own tests against pymoe serve and llama-server", "",
             *machine_lines(f"model {model.name}, ctx {CTX}, one slot, both as the suite's external server "
                            f"(DEBUG_EXTERNAL=1), {args.timeout} s a test" + (f", -k {args.k!r}" if args.k else "")),
             "", "The suite starts each server with the flags and tiny models its tests need; here both servers run "
             "one model with one set of flags, so a test that fails on both expects another model or other flags. "
             "What says something is a test that passes on one server and fails on the other.", "",
             "| test file | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    totals = collections.Counter()
    for name in sorted(by_file):
        totals.update(by_file[name])
        lines.append(f"| {name} | " + " | ".join(str(by_file[name][c]) for c in columns) + " |")
    lines.append("| all | " + " | ".join(str(totals[c]) for c in columns) + " |")
    reasons = collections.Counter(why(ident, mine) for ident, key, mine, _ in differences if key == "pymoe fails")
    lines += ["", "Why pymoe serve fails what llama-server passes, counted:", "", "| why | tests |", "|---|---|"]
    lines += [f"| {reason} | {n} |" for reason, n in reasons.most_common()]
    lines += ["", "Tests that pass on one server only, and why:", "",
              "| test | fails on | why | pymoe's failure | llama-server's failure |", "|---|---|---|---|---|"]
    for ident, key, mine, theirs in differences:
        reason = why(ident, mine) if key == "pymoe fails" else ""
        cell = [text.replace("|", "\\|") for text in (mine, theirs)]
        lines.append(f"| {ident} | {key.split()[0]} | {reason} | {cell[0]} | {cell[1]} |")
    return write("llama_server_tests.md", lines)


if __name__ == "__main__":
    sys.exit(main())
