"""How the repo's MoE models route real text, next to uniform random routing:
distinct experts per layer for a batch of n consecutive tokens, and the share
of a token's experts the next token reuses (pymoe.routing_report). The
random-weight models (bench/gpu, tests) route like random routing, the worst
case for a verify batch; field data for Qwen3-30B-A3B: ~45% of expert choices
repeat at the next token (random: 6.25%), 8-token batches touch ~69% of the
random count. Writes bench/results/routing.md.

    .venv/bin/python -P bench/routing.py
"""
from __future__ import annotations

import sys
from pathlib import Path

import pymoe
from pymoe.demo_models import smollm2_moe

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # python -P does not add the script's folder
from report import machine_lines, write  # noqa: E402
REPO = HERE.parent
OUT = HERE / "out" / "routing"
PROMPT = "Write a detailed report on the history of the printing press and its effect on Europe."
SAMPLING = pymoe.SamplingParams(temperature=1.0, top_k=40, top_p=1.0, min_p=0.0)  # as bench/gpu samples
TOKENS = 96


def gpu_bench_target() -> Path:
    """bench/gpu's target at its rehearsal size (32 experts, 4 used, random weights)."""
    path = OUT / "gpu-small" / "target.gguf"
    if not path.exists():
        import subprocess
        subprocess.run([sys.executable, str(HERE / "gpu" / "make_models.py"), "--vocab",
                        str(REPO / "vendor" / "llama.cpp" / "models" / "ggml-vocab-qwen2.gguf"), "--out",
                        str(path.parent), "--small"], check=True)
    return path


def report(path: Path) -> pymoe.RoutingReport:
    with pymoe.Model(path) as model:
        prompt = model.tokenize(PROMPT)
        with model.session(n_ctx=512, sampling=SAMPLING, seed=1) as s:
            s.feed(prompt)
            tokens = prompt + list(s.generate_tokens(None, max_tokens=TOKENS))
        return pymoe.routing_report(model, tokens)


def main() -> int:
    models = {"MoE upcycled from SmolLM2 (4 experts, 2 used; experts = the dense FFN + 10% noise)":
              smollm2_moe(experts=4, used=2, expert_type="q8_0"),
              "bench/gpu target, rehearsal size (32 experts, 4 used; random weights)": gpu_bench_target()}
    lines = ["# Routing of the repo's MoE models", "",
             f"`bench/routing.py`: the prompt \"{PROMPT}\" and {TOKENS} tokens the model sampled after it "
             "(temperature 1, top-k 40), routed in one batch.", "",
             *machine_lines(), ""]
    for name, path in models.items():
        lines += [f"## {name}", "", report(path).table(), ""]
    return write("routing.md", lines)


if __name__ == "__main__":
    raise SystemExit(main())
