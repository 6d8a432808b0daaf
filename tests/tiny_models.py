"""Tiny random-weight GGUF models written with the `gguf` package.

Architectures: dense llama, llama with experts (Mixtral style) and qwen3moe.
The tokenizer is copied from a vocab-only GGUF shipped in the llama.cpp source.
F32 weights by default, so that results are exact enough to compare.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gguf
import gguf.quants
import numpy as np

REPO = Path(__file__).resolve().parent.parent
VOCAB_GGUF = REPO / "vendor" / "llama.cpp" / "models" / "ggml-vocab-llama-spm.gguf"


@dataclass(frozen=True)
class Shape:
    arch: str = "llama"      # "llama" or "qwen3moe"
    n_layers: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    n_ff: int = 128
    n_experts: int = 0       # 0 = dense (llama only)
    n_experts_used: int = 0
    n_ctx_train: int = 2048
    seed: int = 0
    expert_type: str = "f32"  # or "q4_0": the type llama.cpp repacks on AVX2 CPUs


def copy_tokenizer(writer: gguf.GGUFWriter, vocab: Optional[Path] = None) -> int:
    """Copy the tokenizer of a vocab-only GGUF (default: VOCAB_GGUF, read at
    call time so tests can swap it); returns the vocabulary size."""
    reader = gguf.GGUFReader(vocab or VOCAB_GGUF)
    n_vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(value)
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    return n_vocab


# the ChatML template (llama.cpp recognizes it by its markers)
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_model(path: Path, shape: Shape = Shape(), split_max_tensors: int = 0,
                chat_template: Optional[str] = None) -> Path:
    """Write a model; with split_max_tensors, as name-0000i-of-0000N.gguf parts
    (the returned path is then the first part)."""
    rng = np.random.default_rng(shape.seed)
    a = shape.arch
    writer = gguf.GGUFWriter(path, a, split_max_tensors=split_max_tensors)
    n_vocab = copy_tokenizer(writer)
    if chat_template:
        writer.add_chat_template(chat_template)
    head_dim = shape.n_embd // shape.n_head
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if shape.n_experts:
        writer.add_expert_count(shape.n_experts)
        writer.add_expert_used_count(shape.n_experts_used)
    if a == "qwen3moe":
        writer.add_expert_feed_forward_length(shape.n_ff)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)

    def w(*dims, scale=None):
        scale = scale if scale is not None else 1.0 / np.sqrt(dims[-1])
        return (rng.standard_normal(dims) * scale).astype(np.float32)

    def experts(name, values):
        if shape.expert_type == "f32":
            writer.add_tensor(name, values)
        else:
            qtype = gguf.GGMLQuantizationType[shape.expert_type.upper()]
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)

    kv = shape.n_head_kv * head_dim
    writer.add_tensor("token_embd.weight", w(n_vocab, shape.n_embd, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(shape.n_embd, np.float32))
    for i in range(shape.n_layers):
        p = f"blk.{i}."
        writer.add_tensor(p + "attn_norm.weight", np.ones(shape.n_embd, np.float32))
        writer.add_tensor(p + "attn_q.weight", w(shape.n_embd, shape.n_embd))
        writer.add_tensor(p + "attn_k.weight", w(kv, shape.n_embd))
        writer.add_tensor(p + "attn_v.weight", w(kv, shape.n_embd))
        writer.add_tensor(p + "attn_output.weight", w(shape.n_embd, shape.n_embd))
        if a == "qwen3moe":
            writer.add_tensor(p + "attn_q_norm.weight", np.ones(head_dim, np.float32))
            writer.add_tensor(p + "attn_k_norm.weight", np.ones(head_dim, np.float32))
        writer.add_tensor(p + "ffn_norm.weight", np.ones(shape.n_embd, np.float32))
        if shape.n_experts:
            e = shape.n_experts
            writer.add_tensor(p + "ffn_gate_inp.weight", w(e, shape.n_embd))
            experts(p + "ffn_gate_exps.weight", w(e, shape.n_ff, shape.n_embd))
            experts(p + "ffn_up_exps.weight", w(e, shape.n_ff, shape.n_embd))
            experts(p + "ffn_down_exps.weight", w(e, shape.n_embd, shape.n_ff))
        else:
            writer.add_tensor(p + "ffn_gate.weight", w(shape.n_ff, shape.n_embd))
            writer.add_tensor(p + "ffn_up.weight", w(shape.n_ff, shape.n_embd))
            writer.add_tensor(p + "ffn_down.weight", w(shape.n_embd, shape.n_ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        parts = sorted(path.parent.glob(path.stem + "-00001-of-*.gguf"))
        return parts[0]
    return path


DENSE = Shape(n_head=2, n_head_kv=1)  # head size 32: quantized KV cache types fit
LLAMA_MOE = Shape(n_experts=4, n_experts_used=2, seed=1)
QWEN3MOE = Shape(arch="qwen3moe", n_experts=4, n_experts_used=2, seed=2)
# experts large enough that moving a layer's experts is visible next to the 8 MB embedding
PLACEMENT_MOE = Shape(n_layers=4, n_ff=256, n_experts=8, n_experts_used=2, seed=3)
PLACEMENT_QWEN3MOE = Shape(arch="qwen3moe", n_layers=4, n_ff=256, n_experts=8, n_experts_used=2, seed=4)
PLACEMENT_MOE_Q4_0 = Shape(n_layers=4, n_ff=256, n_experts=8, n_experts_used=2, seed=5, expert_type="q4_0")
