"""What a plan needs of a GGUF model, read by the C library's one GGUF header
reader (pymoe_gguf_open): tensor sizes and the shape of a context's memory.
No tensor data is read; every part of a split model is."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

from ._native import check, ffi, lib

CACHE_TYPES = tuple(ffi.string(lib.pymoe_cache_types()).decode().split(","))  # KV cache types, "f16" first


@dataclass(frozen=True)
class ModelSizes:
    """Tensor sizes and per-layer context memory of one GGUF model."""
    path: str
    arch: str
    n_layers: int
    n_embd: int
    n_vocab: int
    n_head: int
    kv_k_elements: tuple[int, ...]          # K values one token adds, per layer (0 for a recurrent layer)
    kv_v_elements: tuple[int, ...]          # V values, likewise
    tensors: tuple[tuple[str, int], ...]    # (name, bytes)
    recurrent_bytes_per_layer: tuple[int, ...] = ()  # one sequence's recurrent state (F32), per layer (0: none)
    n_nextn: int = 0                        # of n_layers, the last are an MTP head (not the target's context's)
    n_experts: int = 0                      # routed experts per MoE layer (0: dense)

    @property
    def n_trunk(self) -> int:
        """The layers a target's context runs (and keeps a cache for)."""
        return self.n_layers - self.n_nextn

    @property
    def weight_bytes(self) -> int:
        return sum(n for _, n in self.tensors)

    def expert_bytes_per_layer(self) -> dict:
        """Layer -> bytes of its routed expert tensors (*_exps: what an expert cache holds slots of)."""
        out: dict = {}
        for name, n in self.tensors:
            parts = name.split(".")
            if (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2].endswith("_exps")
                    and parts[3] == "weight"):
                out[int(parts[1])] = out.get(int(parts[1]), 0) + n
        return out

    def kv_bytes(self, ctx: int, cache_type: str = "f16", layers: Optional[range] = None) -> int:
        """KV cache bytes of `layers` (the trunk's by default) for ctx tokens (the C library's rule)."""
        layers = range(self.n_trunk) if layers is None else layers
        k = sum(self.kv_k_elements[i] for i in layers)
        v = sum(self.kv_v_elements[i] for i in layers)
        out = ffi.new("uint64_t *")
        ct = cache_type.encode()
        check(lib.pymoe_kv_cache_bytes(k, v, ctx, ct, ct, out))
        return out[0]

    def recurrent_bytes(self, extra_copies: int = 0, layers: Optional[range] = None) -> int:
        """Recurrent state of one sequence, 1 + extra_copies times (llama.cpp keeps n_rs_seq
        snapshots beside the live state; a checkpoint is one more copy)."""
        rows = self.recurrent_bytes_per_layer
        if layers is not None:
            rows = [rows[i] for i in layers if i < len(rows)]
        return int(sum(rows)) * (1 + extra_copies)


def read_sizes(path: Union[str, os.PathLike]) -> ModelSizes:
    """Sizes from GGUF metadata only (all parts of a split model). ModelNotFoundError
    or ModelFormatError (with the file and the key) for what cannot be read."""
    handle = ffi.new("pymoe_gguf **")
    check(lib.pymoe_gguf_open(os.fsencode(os.fspath(path)), handle))
    gguf = handle[0]
    try:
        info = ffi.new("struct pymoe_gguf_info *")
        check(lib.pymoe_gguf_get_info(gguf, info))
        name, size = ffi.new("const char **"), ffi.new("uint64_t *")
        tensors = []
        for i in range(info.n_tensors):
            check(lib.pymoe_gguf_tensor(gguf, i, name, size))
            tensors.append((ffi.string(name[0]).decode("utf-8", "replace"), size[0]))
        layer = ffi.new("struct pymoe_gguf_layer *")
        k, v, recurrent = [], [], []
        for il in range(info.n_layers):
            check(lib.pymoe_gguf_layer(gguf, il, layer))
            k.append(layer.kv_k_elements)
            v.append(layer.kv_v_elements)
            recurrent.append(layer.recurrent_bytes)
        return ModelSizes(os.fspath(path), ffi.string(info.arch).decode("utf-8", "replace"), info.n_layers,
                          info.n_embd, info.n_vocab, info.n_head, tuple(k), tuple(v), tuple(tensors), tuple(recurrent),
                          info.n_nextn, info.n_experts)
    finally:
        lib.pymoe_gguf_free(gguf)
