"""The GPU benchmark's models, made in seconds from random quantized bytes.

- draft: a random-weight dense qwen3 model shaped like the dense part of a
  30B-A3B MoE (attention, a dense FFN of the experts' width, embeddings);
- target: a qwen3moe "upcycled" from it: every expert of a layer is a copy of
  the draft's FFN of that layer with a fraction of its Q4_0 blocks re-drawn,
  and a random router. Top-k routing averages near-copies of the dense FFN, so
  the draft is a real draft for the target.

Everything but the norms and the router is Q4_0, written as random Q4_0 blocks
(the Python quantizer is far too slow for billions of weights). The vocabulary
comes from a vocab-only GGUF (--vocab).

    python bench/gpu/make_models.py --vocab ggml-vocab-qwen2.gguf --out DIR [--small]
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from tiny_models import copy_tokenizer  # noqa: E402  (one tokenizer copier for tests and benchmarks)

Q4_0 = gguf.GGMLQuantizationType.Q4_0
F32 = gguf.GGMLQuantizationType.F32
QK, Q4_0_BYTES = 32, 18  # weights per block, bytes per block (f16 scale + 16 bytes of nibbles)


@dataclass(frozen=True)
class Shape:
    n_layers: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int           # the dense FFN's width = each expert's width
    n_experts: int
    n_used: int


FULL = Shape(n_layers=48, n_embd=2048, n_head=32, n_head_kv=4, head_dim=128, n_ff=768, n_experts=128, n_used=8)
# attention and FFN outputs scaled against the embeddings: with the perturbation
# below, a 48-layer draft then agrees with the target about as often as a real
# draft does (measured on a narrow 48-layer copy: acceptance 0.68-0.88)
RESIDUAL_SCALE = 0.3
SMALL = Shape(n_layers=4, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_ff=512, n_experts=32, n_used=4)


def nibbles(rng: np.random.Generator, shape) -> np.ndarray:
    """Q4_0 quants uniform in 1..15, i.e. weights uniform in -7d..7d: zero mean.
    (Uniform 0..15 would give every weight a mean of -d/2: a common direction
    that 48 random layers amplify until the model ignores its input.)"""
    lo = rng.integers(1, 16, size=shape, dtype=np.uint8)
    hi = rng.integers(1, 16, size=shape, dtype=np.uint8)
    return lo | (hi << 4)


def q4_0_random(rng: np.random.Generator, rows: int, cols: int, std: float) -> np.ndarray:
    """rows x cols weights as Q4_0 blocks: zero-mean nibbles (std 4.32 d) under one scale d."""
    nb = cols // QK
    out = np.empty((rows, nb, Q4_0_BYTES), np.uint8)
    out[:, :, :2] = np.frombuffer(np.float16(std / 4.32).tobytes(), np.uint8)
    out[:, :, 2:] = nibbles(rng, (rows, nb, 16))
    return out


def perturbed_copies(rng: np.random.Generator, dense: np.ndarray, n: int, fraction: float) -> np.ndarray:
    """n copies of a Q4_0 tensor with `fraction` of each copy's blocks re-drawn."""
    out = np.repeat(dense[None], n, axis=0)
    mask = rng.random(out.shape[:-1]) < fraction
    out[mask, 2:] = nibbles(rng, (int(mask.sum()), 16))
    return out


def write(path: Path, shape: Shape, vocab: Path, moe: bool, seed: int, fraction: float,
          residual_scale: float = RESIDUAL_SCALE) -> Path:
    arch = "qwen3moe" if moe else "qwen3"
    tmp = path.with_name(path.name + ".part")
    writer = gguf.GGUFWriter(tmp, arch)
    n_vocab = copy_tokenizer(writer, vocab)
    s = shape
    writer.add_context_length(32768)
    writer.add_embedding_length(s.n_embd)
    writer.add_block_count(s.n_layers)
    writer.add_head_count(s.n_head)
    writer.add_head_count_kv(s.n_head_kv)
    writer.add_key_length(s.head_dim)
    writer.add_value_length(s.head_dim)
    writer.add_rope_dimension_count(s.head_dim)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    if moe:
        writer.add_feed_forward_length(s.n_ff * s.n_used)
        writer.add_expert_feed_forward_length(s.n_ff)
        writer.add_expert_count(s.n_experts)
        writer.add_expert_used_count(s.n_used)
    else:
        writer.add_feed_forward_length(s.n_ff)

    # the same seed gives the same dense weights in both models: the target's
    # experts are copies of the draft's FFN
    rng = np.random.default_rng(seed)
    router_rng = np.random.default_rng((seed, 1))  # apart, so the dense draws stay in step
    q, kv = s.n_head * s.head_dim, s.n_head_kv * s.head_dim
    tensors: list[tuple[str, tuple, object]] = []  # name, numpy-order shape, make() -> array

    def add(name, shape_, make, qtype=Q4_0):
        tensors.append((name, shape_, qtype, make))

    def q4(rows, cols, std=None):
        data = q4_0_random(rng, rows, cols, std if std is not None else 1 / np.sqrt(cols))
        return lambda: data

    ones = lambda n: (lambda: np.ones(n, np.float32))  # noqa: E731
    add("token_embd.weight", (n_vocab, s.n_embd), q4(n_vocab, s.n_embd, 1.0))
    add("output_norm.weight", (s.n_embd,), ones(s.n_embd), F32)
    # logits of standard deviation about 2: sampling at temperature 1 spreads over many tokens
    add("output.weight", (n_vocab, s.n_embd), q4(n_vocab, s.n_embd, 2 / np.sqrt(s.n_embd)))
    for i in range(s.n_layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", (s.n_embd,), ones(s.n_embd), F32)
        add(p + "attn_q.weight", (q, s.n_embd), q4(q, s.n_embd))
        add(p + "attn_k.weight", (kv, s.n_embd), q4(kv, s.n_embd))
        add(p + "attn_v.weight", (kv, s.n_embd), q4(kv, s.n_embd))
        add(p + "attn_output.weight", (s.n_embd, q), q4(s.n_embd, q, residual_scale / np.sqrt(q)))
        add(p + "attn_q_norm.weight", (s.head_dim,), ones(s.head_dim), F32)
        add(p + "attn_k_norm.weight", (s.head_dim,), ones(s.head_dim), F32)
        add(p + "ffn_norm.weight", (s.n_embd,), ones(s.n_embd), F32)
        ffn = {"gate": q4(s.n_ff, s.n_embd), "up": q4(s.n_ff, s.n_embd),
               "down": q4(s.n_embd, s.n_ff, residual_scale / np.sqrt(s.n_ff))}
        if not moe:
            for kind in ("gate", "up", "down"):
                rows, cols = (s.n_embd, s.n_ff) if kind == "down" else (s.n_ff, s.n_embd)
                add(p + f"ffn_{kind}.weight", (rows, cols), ffn[kind])
            continue
        router = (router_rng.standard_normal((s.n_experts, s.n_embd)) / np.sqrt(s.n_embd)).astype(np.float32)
        add(p + "ffn_gate_inp.weight", (s.n_experts, s.n_embd), (lambda r=router: r), F32)
        for kind in ("gate", "up", "down"):
            rows, cols = (s.n_embd, s.n_ff) if kind == "down" else (s.n_ff, s.n_embd)
            dense, layer_seed = ffn[kind], (seed, i, len(kind))
            add(p + f"ffn_{kind}_exps.weight", (s.n_experts, rows, cols),
                lambda d=dense, ls=layer_seed: perturbed_copies(np.random.default_rng(ls), d(), s.n_experts,
                                                                 fraction))

    for name, shape_, qtype, _ in tensors:
        n = int(np.prod(shape_))
        nbytes = n * 4 if qtype == F32 else n // QK * Q4_0_BYTES
        writer.add_tensor_info(name, shape_, np.float32, nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, shape_, qtype, make in tensors:
        writer.write_tensor_data(np.ascontiguousarray(make()))
    writer.close()
    tmp.replace(path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", required=True, type=Path, help="a vocab-only GGUF (e.g. ggml-vocab-qwen2.gguf)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--small", action="store_true", help="rehearsal sizes (a few MB)")
    parser.add_argument("--perturb", type=float, default=0.005, help="fraction of each expert's blocks re-drawn")
    args = parser.parse_args(argv)
    shape = SMALL if args.small else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    for name, moe in (("draft.gguf", False), ("target.gguf", True)):
        t0 = time.perf_counter()
        path = write(args.out / name, shape, args.vocab, moe, seed=1, fraction=args.perturb)
        print(f"{path}: {path.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
