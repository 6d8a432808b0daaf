"""Tiny random-weight GGUF models written with the `gguf` package.

Architectures: dense llama, llama with experts (Mixtral style), qwen3moe,
gpt-oss, and the hybrids qwen35 (dense) and qwen35moe (routed + shared expert),
whose layers alternate gated delta-net (recurrent) and attention. The
hyperparameters and tensor shapes are the ones llama.cpp's loaders ask for
(src/models/<arch>.cpp). The tokenizer is copied from a vocab-only GGUF shipped
in the llama.cpp source. F32 weights by default, so that results are exact
enough to compare.
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
    arch: str = "llama"      # "llama", "qwen3moe", "gpt-oss", "qwen35" or "qwen35moe"
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
    embd_seed: int = -1      # >= 0: the token embedding drawn from this seed, so that two
                             # models can share it (a draft that agrees with its target)
    branch_scale: float = 1.0  # scales what each layer adds to the residual stream
    bigram: bool = False     # untied output = the embedding rows permuted (drawn from embd_seed):
                             # the residual stream alone then predicts a fixed successor of each
                             # token, which models sharing embd_seed agree on; the layers perturb it
    full_attention_interval: int = 2  # hybrids: every n-th layer is attention, the rest recurrent
    n_ff_shared: int = 64    # qwen35moe: the shared expert's width
    ssm_state: int = 16      # hybrids' gated delta-net: head size, key heads, value heads
    ssm_k_heads: int = 2
    ssm_v_heads: int = 4
    dense_type: str = "f32"  # or "f16": the other weight matrices (not norms, not the embedding)
    nextn: int = 0           # qwen35moe, qwen35: MTP head layers after the trunk (blk.<n_layers>.*); the head
                             # reads mostly its token, so with bigram it agrees with the trunk often
    mtp_hidden: float = 0.3  # how much of the trunk's hidden state the head mixes in (disagreement,
                             # growing with depth: past the first draft the head reads its own state)
    mtp_noise: float = 0.1   # noise on the head's reading of its token (disagreement at every depth)

    @property
    def hybrid(self) -> bool:
        return self.arch in ("qwen35", "qwen35moe")

    def is_recurrent_layer(self, i: int) -> bool:
        return self.hybrid and (i + 1) % self.full_attention_interval != 0


def copy_tokenizer(writer: gguf.GGUFWriter, vocab: Optional[Path] = None, add_bos: Optional[bool] = None) -> int:
    """Copy the tokenizer of a vocab-only GGUF (default: VOCAB_GGUF, read at
    call time so tests can swap it), add_bos set when given; returns the
    vocabulary size."""
    reader = gguf.GGUFReader(vocab or VOCAB_GGUF)
    n_vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer.") or (add_bos is not None and key == "tokenizer.ggml.add_bos_token"):
            continue
        value = field.contents()
        if key == "tokenizer.ggml.tokens":
            n_vocab = len(value)
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    return n_vocab


# the ChatML template (llama.cpp recognizes it by its markers)
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


SSM_CONV = 4  # the hybrids' convolution width


def write_model(path: Path, shape: Shape = Shape(), split_max_tensors: int = 0,
                chat_template: Optional[str] = None, add_bos: Optional[bool] = None) -> Path:
    """Write a model; with split_max_tensors, as name-0000i-of-0000N.gguf parts
    (the returned path is then the first part); add_bos: the tokenizer's
    setting (None: the vocabulary file's)."""
    rng = np.random.default_rng(shape.seed)
    a = shape.arch
    writer = gguf.GGUFWriter(path, a, split_max_tensors=split_max_tensors)
    n_vocab = copy_tokenizer(writer, add_bos=add_bos)
    if chat_template:
        writer.add_chat_template(chat_template)
    head_dim = shape.n_embd // shape.n_head
    writer.add_context_length(shape.n_ctx_train)
    writer.add_embedding_length(shape.n_embd)
    writer.add_block_count(shape.n_layers + shape.nextn)
    if shape.nextn:
        writer.add_nextn_predict_layers(shape.nextn)
    writer.add_feed_forward_length(shape.n_ff)
    writer.add_head_count(shape.n_head)
    writer.add_head_count_kv(shape.n_head_kv)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if shape.n_experts:
        writer.add_expert_count(shape.n_experts)
        writer.add_expert_used_count(shape.n_experts_used)
    if a != "llama":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if a in ("qwen3moe", "qwen35moe", "gpt-oss"):
        writer.add_expert_feed_forward_length(shape.n_ff)
    if a == "qwen35moe":
        writer.add_expert_shared_feed_forward_length(shape.n_ff_shared)
    if a == "gpt-oss":
        writer.add_sliding_window(8)  # every other layer attends to the last 8 positions
    if shape.hybrid:
        writer.add_rope_dimension_sections([head_dim // 4 - 1, head_dim // 4 - 1, 2, 0])  # sums to head_dim / 2
        writer.add_ssm_conv_kernel(SSM_CONV)
        writer.add_ssm_inner_size(shape.ssm_state * shape.ssm_v_heads)
        writer.add_ssm_state_size(shape.ssm_state)
        writer.add_ssm_time_step_rank(shape.ssm_v_heads)
        writer.add_ssm_group_count(shape.ssm_k_heads)
        writer.add_full_attention_interval(shape.full_attention_interval)

    def w(*dims, scale=None):
        scale = scale if scale is not None else 1.0 / np.sqrt(dims[-1])
        return (rng.standard_normal(dims) * scale).astype(np.float32)

    def add(name, values):  # matrices in dense_type; vectors, the embedding and the convolution in F32
        f16 = (shape.dense_type == "f16" and values.ndim == 2 and "token_embd" not in name
               and "ssm_conv1d" not in name and "output." not in name)
        writer.add_tensor(name, values.astype(np.float16) if f16 else values)

    def branch_out(*dims):  # a projection back into the residual stream
        return w(*dims, scale=shape.branch_scale / np.sqrt(dims[-1]))

    def ones(n):
        return np.ones(n, np.float32)

    def experts(name, values):
        if shape.expert_type == "f32":
            writer.add_tensor(name, values)
        else:
            qtype = gguf.GGMLQuantizationType[shape.expert_type.upper()]
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)

    embd_rng = np.random.default_rng(shape.embd_seed) if shape.embd_seed >= 0 else rng
    embd = embd_rng.standard_normal((n_vocab, shape.n_embd)).astype(np.float32)
    add("token_embd.weight", embd)
    add("output_norm.weight", ones(shape.n_embd))
    if shape.bigram:
        # its own generator: models of any width share the permutation
        add("output.weight", embd[np.random.default_rng(shape.embd_seed + 1).permutation(n_vocab)])
    elif a == "gpt-oss":  # the only one here without tied embeddings
        add("output.weight", embd.copy())
    kv = shape.n_head_kv * head_dim
    e, n_ff = shape.n_experts, shape.n_ff
    for i in range(shape.n_layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", ones(shape.n_embd))
        if shape.is_recurrent_layer(i):
            ss, vh = shape.ssm_state, shape.ssm_v_heads
            key, value = ss * shape.ssm_k_heads, ss * vh
            add(p + "attn_qkv.weight", w(2 * key + value, shape.n_embd))
            add(p + "attn_gate.weight", w(value, shape.n_embd))
            add(p + "ssm_conv1d.weight", w(2 * key + value, SSM_CONV))
            add(p + "ssm_dt.bias", w(vh, scale=0.5))
            add(p + "ssm_a", -np.exp(w(vh, scale=0.5)))  # negative: a decay
            add(p + "ssm_beta.weight", w(vh, shape.n_embd))
            add(p + "ssm_alpha.weight", w(vh, shape.n_embd))
            add(p + "ssm_norm.weight", ones(ss))
            add(p + "ssm_out.weight", branch_out(shape.n_embd, value))
        else:
            q = shape.n_embd * (2 if shape.hybrid else 1)  # the hybrids' Q carries a gate
            add(p + "attn_q.weight", w(q, shape.n_embd))
            add(p + "attn_k.weight", w(kv, shape.n_embd))
            add(p + "attn_v.weight", w(kv, shape.n_embd))
            add(p + "attn_output.weight", branch_out(shape.n_embd, shape.n_embd))
            if a in ("qwen3moe", "qwen35", "qwen35moe"):
                add(p + "attn_q_norm.weight", ones(head_dim))
                add(p + "attn_k_norm.weight", ones(head_dim))
            if a == "gpt-oss":
                add(p + "attn_sinks.weight", w(shape.n_head, scale=1.0))
                add(p + "attn_output.bias", w(shape.n_embd, scale=0.1))
        # the hybrids and gpt-oss norm before the FFN under another name
        ffn_norm = "post_attention_norm" if a in ("gpt-oss", "qwen35", "qwen35moe") else "ffn_norm"
        add(p + ffn_norm + ".weight", ones(shape.n_embd))
        if e:
            add(p + "ffn_gate_inp.weight", w(e, shape.n_embd))
            experts(p + "ffn_gate_exps.weight", w(e, n_ff, shape.n_embd))
            experts(p + "ffn_up_exps.weight", w(e, n_ff, shape.n_embd))
            experts(p + "ffn_down_exps.weight", branch_out(e, shape.n_embd, n_ff))
            if a == "gpt-oss":
                add(p + "ffn_gate_inp.bias", w(e, scale=0.1))
                add(p + "ffn_gate_exps.bias", w(e, n_ff, scale=0.1))
                add(p + "ffn_up_exps.bias", w(e, n_ff, scale=0.1))
                add(p + "ffn_down_exps.bias", w(e, shape.n_embd, scale=0.1))
            if a == "qwen35moe":
                s = shape.n_ff_shared
                add(p + "ffn_gate_inp_shexp.weight", w(shape.n_embd))
                add(p + "ffn_gate_shexp.weight", w(s, shape.n_embd))
                add(p + "ffn_up_shexp.weight", w(s, shape.n_embd))
                add(p + "ffn_down_shexp.weight", branch_out(shape.n_embd, s))
        else:
            add(p + "ffn_gate.weight", w(n_ff, shape.n_embd))
            add(p + "ffn_up.weight", w(n_ff, shape.n_embd))
            add(p + "ffn_down.weight", branch_out(shape.n_embd, n_ff))
    for i in range(shape.n_layers, shape.n_layers + shape.nextn):
        write_mtp_block(add, experts, w, branch_out, shape, f"blk.{i}.")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        parts = sorted(path.parent.glob(path.stem + "-00001-of-*.gguf"))
        return parts[0]
    return path


def write_mtp_block(add, experts, w, branch_out, shape: Shape, p: str) -> None:
    """A qwen35moe or qwen35 MTP head: norms of the token's embedding and of the
    trunk's hidden state, their projection (mostly the token: eh_proj ~
    [I + mtp_noise * noise, mtp_hidden * noise]), then a gated-attention decoder
    block with routed and shared experts (qwen35: a dense FFN), read out by the
    model's output matrix (src/models/qwen35moe.cpp and qwen35.cpp, graph_mtp)."""
    n, e, n_ff, s = shape.n_embd, shape.n_experts, shape.n_ff, shape.n_ff_shared
    head_dim, kv = n // shape.n_head, shape.n_head_kv * (n // shape.n_head)
    ones = np.ones(n, np.float32)
    token_part = np.eye(n, dtype=np.float32) + w(n, n, scale=shape.mtp_noise / np.sqrt(n))
    add(p + "nextn.eh_proj.weight", np.concatenate([token_part, w(n, n, scale=shape.mtp_hidden / np.sqrt(n))], axis=1))
    add(p + "nextn.enorm.weight", ones)
    add(p + "nextn.hnorm.weight", ones)
    add(p + "nextn.shared_head_norm.weight", ones)
    add(p + "attn_norm.weight", ones)
    add(p + "post_attention_norm.weight", ones)
    add(p + "attn_q.weight", w(2 * n, n))  # Q and its gate
    add(p + "attn_k.weight", w(kv, n))
    add(p + "attn_v.weight", w(kv, n))
    add(p + "attn_output.weight", branch_out(n, n))
    add(p + "attn_q_norm.weight", np.ones(head_dim, np.float32))
    add(p + "attn_k_norm.weight", np.ones(head_dim, np.float32))
    if shape.arch == "qwen35":
        add(p + "ffn_gate.weight", w(n_ff, n))
        add(p + "ffn_up.weight", w(n_ff, n))
        add(p + "ffn_down.weight", branch_out(n, n_ff))
        return
    add(p + "ffn_gate_inp.weight", w(e, n))
    experts(p + "ffn_gate_exps.weight", w(e, n_ff, n))
    experts(p + "ffn_up_exps.weight", w(e, n_ff, n))
    experts(p + "ffn_down_exps.weight", branch_out(e, n, n_ff))
    add(p + "ffn_gate_inp_shexp.weight", w(n))
    add(p + "ffn_gate_shexp.weight", w(s, n))
    add(p + "ffn_up_shexp.weight", w(s, n))
    add(p + "ffn_down_shexp.weight", branch_out(n, s))


DENSE = Shape(n_head=2, n_head_kv=1)  # head size 32: quantized KV cache types fit
LLAMA_MOE = Shape(n_experts=4, n_experts_used=2, seed=1)
QWEN3MOE = Shape(arch="qwen3moe", n_experts=4, n_experts_used=2, seed=2)
# experts large enough that moving a layer's experts is visible next to the 8 MB embedding
PLACEMENT_MOE = Shape(n_layers=4, n_ff=256, n_experts=8, n_experts_used=2, seed=3)
PLACEMENT_QWEN3MOE = Shape(arch="qwen3moe", n_layers=4, n_ff=256, n_experts=8, n_experts_used=2, seed=4)
PLACEMENT_MOE_Q4_0 = Shape(n_layers=4, n_ff=256, n_experts=8, n_experts_used=2, seed=5, expert_type="q4_0")

# The architectures people run MoE targets as, each with a dense llama draft
# that shares its embedding and bigram output: they agree often, not always,
# so speculation sees full and partial acceptances (branch_scale sets how often).
PAIR = dict(embd_seed=100, bigram=True, branch_scale=0.8)
ARCHITECTURES = {
    "llama-moe": Shape(n_layers=4, n_experts=4, n_experts_used=2, seed=21, **PAIR),
    "qwen3moe": Shape(arch="qwen3moe", n_layers=4, n_experts=4, n_experts_used=2, seed=22, **PAIR),
    "qwen35moe": Shape(arch="qwen35moe", n_layers=4, n_experts=4, n_experts_used=2, seed=23, **PAIR),
    "gpt-oss": Shape(arch="gpt-oss", n_layers=4, n_experts=4, n_experts_used=2, seed=24, **PAIR),
    "qwen35": Shape(arch="qwen35", n_layers=4, seed=25, **PAIR),
}
PAIR_DRAFT = Shape(n_head=2, n_head_kv=1, seed=26, **PAIR)
# the qwen35moe target with an MTP head: self-speculation, no draft model
QWEN35MOE_MTP = Shape(arch="qwen35moe", n_layers=4, n_experts=4, n_experts_used=2, seed=23, nextn=1, **PAIR)
QWEN35_MTP = Shape(arch="qwen35", n_layers=4, seed=25, nextn=1, **PAIR)  # the dense hybrid, same head
PAIR_HYBRID_DRAFT = Shape(arch="qwen35", n_layers=2, seed=27, **PAIR)
