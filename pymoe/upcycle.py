"""Upcycle a dense llama-architecture GGUF into a synthetic Mixtral-style MoE.

Each layer's FFN becomes E experts, each a copy of the dense FFN plus seeded
Gaussian noise (scale relative to the weight's standard deviation), with a
random router choosing K of them per token. The result is a real MoE for
llama.cpp (`llama.expert_count`, `ffn_gate_inp`, `ffn_{gate,up,down}_exps`)
whose outputs stay close to the dense model's, so the dense model is a real
draft for it with an acceptance rate set by the noise. It is synthetic: the
experts are not trained, they only have the sizes, routing and cost of a MoE.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import gguf
import numpy as np
from gguf.quants import dequantize, quantize

from ._native import lib
from .errors import ModelFormatError
from .gguf_file import read_sizes

TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
         "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}
FFN = ("ffn_gate", "ffn_up", "ffn_down")
SKIP_KEYS = ("GGUF.", "general.architecture", "general.file_type", "llama.expert_count", "llama.expert_used_count")


def _convert(values: np.ndarray, qtype) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return values.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return values.astype(np.float16)
    return quantize(values.astype(np.float32), qtype)


def _tensor_data(kind, t, shape, ttype, rng, n_experts, noise) -> np.ndarray:
    """One tensor of the MoE: copied, a random router, F32, or n_experts noisy copies of the dense FFN."""
    if kind == "copy":
        return np.asarray(t.data)
    if kind == "router":
        return (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
    dense = dequantize(np.asarray(t.data), t.tensor_type).reshape(shape[-2:] if kind == "experts" else shape)
    if kind == "f32":
        return dense.astype(np.float32)
    scale = noise * float(dense.std())
    experts = np.empty(shape, np.float32)
    for e in range(n_experts):
        experts[e] = dense + scale * rng.standard_normal(dense.shape, dtype=np.float32)
    return _convert(experts, ttype)


def upcycle(src: str | Path, dst: str | Path, *, n_experts: int = 8, n_experts_used: int = 2, noise: float = 0.1,
            expert_type: str = "q8_0", rest_f32: bool = False, seed: int = 0,
            progress: Optional[Callable[[int, int, str], None]] = None) -> Path:
    """Write the MoE made from the dense model at src to dst. expert_type is one
    of f32, f16, q8_0, q4_0; rest_f32 stores every other tensor in F32 too.
    progress(done, total, tensor name) is called after each tensor made."""
    if expert_type not in TYPES:
        raise ValueError(f"expert_type must be one of {sorted(TYPES)}, got {expert_type!r}")
    if not 1 <= n_experts_used <= n_experts:
        raise ValueError(f"need 1 <= n_experts_used <= n_experts, got {n_experts_used} of {n_experts}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    sizes = read_sizes(src)  # the C library's checked reader first: a malformed file is a ModelFormatError
    if sizes.arch != "llama":
        raise ModelFormatError(f"{src}: upcycling needs a llama-architecture model, this one is {sizes.arch!r}",
                               lib.PYMOE_EFORMAT)
    try:
        reader = gguf.GGUFReader(src)
    except Exception as e:  # the gguf package's own parser, on a file the C reader accepted
        raise ModelFormatError(f"{src}: the gguf package cannot read it ({type(e).__name__}: {e})",
                               lib.PYMOE_EFORMAT) from e
    expert_count = reader.fields.get("llama.expert_count")
    if expert_count is not None and expert_count.contents():
        raise ModelFormatError(f"{src} is already a MoE", lib.PYMOE_EFORMAT)
    qtype = TYPES[expert_type]
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".part")
    writer = gguf.GGUFWriter(tmp, "llama")
    try:
        for key, field in reader.fields.items():
            if key.startswith(SKIP_KEYS):
                continue
            if field.types[0] == gguf.GGUFValueType.ARRAY and not field.data:
                raise ModelFormatError(f"{src}: metadata {key} is an empty array (the gguf package cannot write one)",
                                       lib.PYMOE_EFORMAT)
            sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            try:
                value = field.contents()
            except (UnicodeDecodeError, ValueError, IndexError) as e:  # e.g. a string that is not UTF-8
                raise ModelFormatError(f"{src}: metadata {key} cannot be copied ({e})", lib.PYMOE_EFORMAT) from e
            writer.add_key_value(key, value, field.types[0], sub_type=sub_type)
        writer.add_expert_count(n_experts)
        writer.add_expert_used_count(n_experts_used)

        # plan every tensor first (the header lists them), then stream the data
        plan = []
        for t in reader.tensors:
            shape = tuple(int(x) for x in reversed(t.shape))  # numpy order
            parts = t.name.split(".")
            dense_ffn = len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in FFN
            if dense_ffn and parts[3] == "weight":
                layer = int(parts[1])
                if parts[2] == "ffn_gate":  # the router goes with the first expert tensor of a layer
                    plan.append(("router", t, f"blk.{layer}.ffn_gate_inp.weight", (n_experts, shape[1]),
                                 gguf.GGMLQuantizationType.F32))
                plan.append(("experts", t, f"blk.{layer}.{parts[2]}_exps.weight", (n_experts, *shape), qtype))
            elif rest_f32 and t.tensor_type != gguf.GGMLQuantizationType.F32:
                plan.append(("f32", t, t.name, shape, gguf.GGMLQuantizationType.F32))
            else:
                plan.append(("copy", t, t.name, shape, t.tensor_type))
        for _, t, name, shape, ttype in plan:
            block, type_size = gguf.GGML_QUANT_SIZES[ttype]
            nbytes = int(np.prod(shape)) // block * type_size
            writer.add_tensor_info(name, shape, np.float32, nbytes, raw_dtype=ttype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()

        for i, (kind, t, name, shape, ttype) in enumerate(plan):
            try:
                data = _tensor_data(kind, t, shape, ttype, np.random.default_rng([seed, i]), n_experts, noise)
            except (NotImplementedError, ValueError) as e:  # a type the gguf package cannot convert, or a bad shape
                raise ModelFormatError(f"{src}: tensor {t.name} cannot be upcycled ({e})", lib.PYMOE_EFORMAT) from e
            writer.write_tensor_data(data)
            if progress is not None:
                progress(i + 1, len(plan), name)
        writer.close()
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)  # never leave a half-written model behind
        raise
    tmp.replace(dst)  # never leave a half-written model under the final name
    return dst
