"""pymoe upcycle: a dense llama GGUF becomes a Mixtral-style MoE llama.cpp loads,
whose experts are the dense FFN plus noise."""
import subprocess
import sys

import gguf
import numpy as np
import pytest

import pymoe
import tiny_models
from pymoe.upcycle import upcycle

GREEDY = dict(n_ctx=256, flash_attn="off", cache_type_k="f32", cache_type_v="f32",
              sampling=pymoe.SamplingParams.greedy())


def greedy(path, prompt="Once upon a time", n=24):
    with pymoe.Model(path) as model, model.session(**GREEDY) as s:
        return [t.id for t in s.generate(prompt, max_tokens=n, stop_at_eog=False)]


def test_experts_are_the_dense_ffn_plus_scaled_noise(dense_path, tmp_path):
    out = upcycle(dense_path, tmp_path / "moe.gguf", n_experts=3, n_experts_used=2, noise=0.5, expert_type="f32",
                  seed=1)
    dense = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(dense_path).tensors}
    moe = gguf.GGUFReader(out)
    tensors = {t.name: np.asarray(t.data) for t in moe.tensors}
    assert moe.fields["llama.expert_count"].contents() == 3
    assert moe.fields["llama.expert_used_count"].contents() == 2
    assert "blk.0.ffn_gate.weight" not in tensors
    up = tensors["blk.0.ffn_up_exps.weight"]
    assert up.shape == (3, *dense["blk.0.ffn_up.weight"].shape)
    w = dense["blk.0.ffn_up.weight"]
    for e in range(3):
        noise = up[e] - w
        assert abs(noise.std() / w.std() - 0.5) < 0.05  # the noise scale is relative to the weight's spread
    assert not np.array_equal(up[0], up[1])  # each expert has its own noise
    assert tensors["blk.0.ffn_gate_inp.weight"].shape == (3, w.shape[1])
    assert np.array_equal(tensors["token_embd.weight"], dense["token_embd.weight"])  # the rest is copied


def test_without_noise_the_moe_computes_what_the_dense_model_computes(dense_path, tmp_path):
    # routing weights of the chosen experts sum to 1, so identical experts give the dense FFN
    out = upcycle(dense_path, tmp_path / "same.gguf", n_experts=4, n_experts_used=2, noise=0.0, expert_type="f32")
    assert greedy(out) == greedy(dense_path)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "f16"])
def test_quantized_experts_load_and_generate(dense_path, tmp_path, kind):
    out = upcycle(dense_path, tmp_path / f"{kind}.gguf", n_experts=4, n_experts_used=2, expert_type=kind)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(out).tensors}
    assert types["blk.1.ffn_down_exps.weight"] == gguf.GGMLQuantizationType[kind.upper()]
    assert types["blk.1.ffn_gate_inp.weight"] == gguf.GGMLQuantizationType.F32
    with pymoe.Model(out) as model:
        assert model.info.n_experts == 4
    assert len(greedy(out, n=8)) == 8


def test_bad_input_is_refused_and_leaves_no_file(dense_path, llama_moe_path, tmp_path):
    with pytest.raises(pymoe.ModelFormatError, match="already a MoE"):
        upcycle(llama_moe_path, tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="expert_type"):
        upcycle(dense_path, tmp_path / "x.gguf", expert_type="q5_k")
    with pytest.raises(ValueError, match="n_experts_used"):
        upcycle(dense_path, tmp_path / "x.gguf", n_experts=2, n_experts_used=3)
    with pytest.raises(FileNotFoundError):
        upcycle(tmp_path / "missing.gguf", tmp_path / "x.gguf")
    assert not list(tmp_path.glob("x.gguf*"))


def test_command_line(dense_path, qwen3moe_path, tmp_path):
    out = tmp_path / "cli.gguf"
    ok = subprocess.run([sys.executable, "-P", "-m", "pymoe", "upcycle", str(dense_path), str(out), "--experts", "2",
                         "--used", "1", "--type", "f32", "--quiet"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(out) and out.is_file()
    bad = subprocess.run([sys.executable, "-P", "-m", "pymoe", "upcycle", str(qwen3moe_path), str(tmp_path / "q.gguf")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1  # as every command's bad input
    assert "llama-architecture" in bad.stderr and "qwen3moe" in bad.stderr
