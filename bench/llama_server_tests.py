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

    .venv/bin/python -P bench/llama_server_tests.py [-k EXPR] [--timeout 120]
"""
from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
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
CTX = 2048

# Why pymoe serve fails a test llama-server passes, by test file (then by test, where one differs from its file).
WHY = {
    "test_embedding.py": "missing feature: embeddings are not served",
    "test_rerank.py": "missing feature: reranking is not served",
    "test_infill.py": "missing feature: /infill (fill-in-the-middle) is not served",
    "test_lora.py": "missing feature: LoRA adapters are not served",
    "test_tool_call.py": "missing feature: tool calls (issue 32, not done yet)",
    "test_compat_oai_responses.py": "missing feature: /v1/responses is not served",
    "test_compat_anthropic.py": "missing feature: the Anthropic API (/v1/messages) is not served",
    "test_compat_gcp.py": "missing feature: the Vertex AI routes are not served",
    "test_slot_save.py": "missing feature: slots and their save/restore routes are not served",
    "test_metrics.py": "missing feature: /metrics (Prometheus) is not served",
    "test_vision_api.py": "missing feature: images are not served",
    "test_tokenize.py": "real difference: see the failure",
    "test_template.py": "missing feature: Jinja templates, chat_template_kwargs and reasoning (issue 32)",
}


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
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in servers.items():
            port = free_port()
            server = Server(argv + ["--port", str(port)], port)
            try:
                junit = Path(tmp) / f"{name.split()[0]}.xml"
                run_suite(python, port, junit, args)
                results[name] = outcomes(junit)
            finally:
                server.stop()
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
    lines += ["", "Tests that pass on one server only, and why:", "",
              "| test | fails on | why | pymoe's failure | llama-server's failure |", "|---|---|---|---|---|"]
    for ident, key, mine, theirs in differences:
        why = WHY.get(ident, WHY.get(ident.split("::")[0], "(not yet explained)")) if key == "pymoe fails" else ""
        cell = [text.replace("|", "\\|") for text in (mine, theirs)]
        lines.append(f"| {ident} | {key.split()[0]} | {why} | {cell[0]} | {cell[1]} |")
    return write("llama_server_tests.md", lines)


if __name__ == "__main__":
    sys.exit(main())
