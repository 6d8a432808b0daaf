"""The expert cache: recently used experts of host-resident MoE layers kept in
device memory (Model(..., moe_cache_mib=N)). What a model's cache is
(MoeCacheInfo), what it did for a session (MoeCacheStats), and the same policy
replayed over a routing trace (replay), which predicts a hit rate before
anything is loaded."""
from __future__ import annotations

from dataclasses import dataclass, fields
import os
from typing import Sequence, Union

import numpy as np

from . import errors
from ._native import check, ffi, lib
from .routing import routed_layers


@dataclass(frozen=True)
class MoeCacheInfo:
    enabled: bool
    n_layers: int       # layers it serves
    n_slots: int        # experts it holds per layer
    max_tokens: int     # decodes of at most this many tokens use it
    upload_cap: int     # experts copied in per layer and decode (0: no limit)
    bytes: int          # device memory it holds
    slot_bytes: int     # one expert of every cached layer
    note: str           # why there is none, or what it leaves out ("" = nothing)

    @classmethod
    def _from_c(cls, c) -> "MoeCacheInfo":
        return cls(bool(c.enabled), c.n_layers, c.n_slots, c.max_tokens, c.upload_cap, c.bytes, c.slot_bytes,
                   ffi.string(c.note).decode(errors="replace"))


@dataclass(frozen=True)
class MoeCacheStats:
    steps: int = 0                  # decodes it served
    tokens: int = 0
    hits: int = 0                   # expert uses (token x routed expert, per layer) found in the cache
    misses: int = 0                 # ... computed from host memory
    uploads: int = 0                # experts copied in
    uploaded_bytes: int = 0
    host_experts: int = 0           # experts read from host memory (distinct misses per layer and decode)
    host_expert_bytes: int = 0
    uncached_expert_bytes: int = 0  # what the same decodes read from host memory without a cache
    upload_seconds: float = 0.0     # spent copying experts in

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    @property
    def host_expert_bytes_per_token(self) -> float:
        return self.host_expert_bytes / self.tokens if self.tokens else 0.0

    def __sub__(self, other: "MoeCacheStats") -> "MoeCacheStats":
        return MoeCacheStats(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def __add__(self, other: "MoeCacheStats") -> "MoeCacheStats":
        return MoeCacheStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_json(self) -> dict:
        """The `moe_cache` object of `pymoe generate --json`."""
        return {"hits": self.hits, "misses": self.misses, "hit_rate": round(self.hit_rate, 4),
                "uploads": self.uploads, "uploaded_bytes": self.uploaded_bytes,
                "host_expert_bytes_per_token": round(self.host_expert_bytes_per_token),
                "uncached_expert_bytes_per_token": round(self.uncached_expert_bytes / self.tokens) if self.tokens
                else 0, "upload_seconds": round(self.upload_seconds, 4), "steps": self.steps, "tokens": self.tokens}

    @classmethod
    def _from_c(cls, c) -> "MoeCacheStats":
        return cls(*(getattr(c, f.name) for f in fields(cls)))


def replay(ids: np.ndarray, n_experts: int, n_slots: int, *, upload_cap: int = 1,
           step_tokens: Sequence[int] | None = None, decay: float = 0.0) -> MoeCacheStats:
    """The cache policy over one layer's routing trace, as the loaded cache
    runs it: ids is (tokens, experts per token) as Session.routing() gives;
    step_tokens the tokens of each decode (default: one token each, plain
    decoding); upload_cap as Model's moe_cache_uploads. decay: 0 for the
    cache's own, or another in (0, 1) to compare (small: recency weighs most,
    close to least-recently-used). Counts are per expert, so bytes fields
    count experts."""
    ids = np.ascontiguousarray(ids, dtype=np.int32)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise errors.InvalidArgumentError(f"ids must be (tokens, experts per token), got shape {ids.shape}",
                                          lib.PYMOE_EINVAL)
    steps = np.ones(ids.shape[0], np.int32) if step_tokens is None else np.asarray(step_tokens, np.int32)
    if int(steps.sum()) != ids.shape[0]:
        raise errors.InvalidArgumentError(f"step_tokens add up to {int(steps.sum())}, the trace has {ids.shape[0]} "
                                          "tokens", lib.PYMOE_EINVAL)
    out = ffi.new("struct pymoe_moe_cache_stats *")
    check(lib.pymoe_moe_cache_replay(n_experts, ids.shape[1], n_slots, upload_cap, float(decay),
                                     ffi.from_buffer("int32_t[]", ids), ffi.from_buffer("int32_t[]", steps),
                                     len(steps), out))
    return MoeCacheStats._from_c(out)


def routing_trace(model, tokens: Sequence[int], **session_params) -> np.ndarray:
    """The router's choices for `tokens` in every layer, shape (layers,
    tokens, experts per token), from one batch with every row computed (a
    token's routing does not depend on the batch it is in): what plan()
    replays to predict an expert cache's hit rate. Save it with np.save."""
    tokens = list(tokens)
    if len(tokens) < 1:
        raise errors.InvalidArgumentError("a routing trace needs at least one token", lib.PYMOE_EINVAL)
    layers = routed_layers(model, tokens, **session_params)
    k = max((ids.shape[1] for ids in layers), default=0)
    if not k:
        raise errors.UnsupportedError(f"{model.info.arch} model without routed experts: no routing to trace",
                                      lib.PYMOE_EUNSUPPORTED)
    # a dense layer of a mixed model: no choices (-1, never cached)
    return np.stack([ids if len(ids) == len(tokens) else np.full((len(tokens), k), -1, np.int32) for ids in layers])


def load_trace(trace: Union[np.ndarray, str, os.PathLike]) -> np.ndarray:
    """A routing trace (layers, tokens, experts per token), given or from a .npy file."""
    ids = np.load(trace) if isinstance(trace, (str, os.PathLike)) else np.asarray(trace)
    if ids.ndim != 3 or not np.issubdtype(ids.dtype, np.integer):
        raise errors.InvalidArgumentError(f"a routing trace is an integer array (layers, tokens, experts per token); "
                                          f"got {ids.dtype} {ids.shape}", lib.PYMOE_EINVAL)
    return ids.astype(np.int32)
