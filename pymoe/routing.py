"""What a MoE's router does with real text: how many distinct experts a batch
of n consecutive tokens needs per layer (a verify batch of n tokens reads that
many experts' weights), next to uniform random routing, and how much of a
token's experts the next token reuses. This is what explains a verify cost
curve: on a MoE with experts in RAM a batch costs the union of its experts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np

from . import errors
from ._native import lib


@dataclass(frozen=True)
class RoutingReport:
    n_experts: int
    n_used: int
    n_layers: int                 # layers with routed experts
    n_tokens: int                 # tokens routed
    distinct: Dict[int, float]    # batch size n -> mean distinct experts per layer over every n consecutive tokens
    random: Dict[int, float]      # the same for uniform random routing: E * (1 - (1 - K/E)^n)
    reuse: float                  # mean share of a token's experts the next token also uses
    reuse_random: float           # K / E

    def ratio(self, n: int) -> float:
        """Distinct experts of a batch of n against random routing's."""
        return self.distinct[n] / self.random[n]

    def table(self) -> str:
        ns = sorted(self.distinct)
        return "\n".join([
            f"routing of {self.n_tokens} tokens, {self.n_layers} MoE layers, {self.n_used} of {self.n_experts} "
            f"experts per token: the next token reuses {self.reuse:.0%} of a token's experts "
            f"(random routing: {self.reuse_random:.0%})", "",
            "| batch of n tokens | " + " | ".join(str(n) for n in ns) + " |",
            "|---|" + "---|" * len(ns),
            "| distinct experts per layer | " + " | ".join(f"{self.distinct[n]:.1f}" for n in ns) + " |",
            "| random routing | " + " | ".join(f"{self.random[n]:.1f}" for n in ns) + " |",
            "| x random | " + " | ".join(f"{self.ratio(n):.2f}" for n in ns) + " |"])


def routed_layers(model, tokens: Sequence[int], **session_params) -> list:
    """Each layer's router choices for `tokens` fed in one batch, every row
    computed (a token's routing does not depend on the batch it is in):
    (tokens, experts per token) arrays, empty for a layer without routed experts."""
    tokens = list(tokens)
    n_batch = max(512, len(tokens))  # one batch: all of them through every layer
    params = {**session_params, "n_ctx": max(session_params.get("n_ctx") or 0, len(tokens) + 1),
              "n_batch": n_batch, "n_ubatch": n_batch}
    with model.session(record_routing=True, **params) as s:
        s.feed(tokens, all_logits=True)  # every token through every layer, the last included
        return [s.routing(layer) for layer in range(model.info.n_layers)]


def routing_report(model, tokens: Sequence[int], batch_sizes: Sequence[int] = range(1, 10),
                   **session_params) -> RoutingReport:
    """Route `tokens` (a prompt and its continuation: the text a verify batch
    would hold) through `model` in one batch and measure its router's choices.
    A dense model raises UnsupportedError."""
    info = model.info
    if not info.n_experts:
        raise errors.UnsupportedError(f"{info.arch} model without routed experts: no routing to report",
                                      lib.PYMOE_EUNSUPPORTED)
    tokens = list(tokens)
    if len(tokens) < 2:
        raise errors.InvalidArgumentError("routing needs at least 2 tokens", lib.PYMOE_EINVAL)
    layers = [ids for ids in routed_layers(model, tokens, **session_params) if len(ids) == len(tokens)]
    if not layers:
        raise errors.UnsupportedError("no router reported its choices", lib.PYMOE_EUNSUPPORTED)
    e, k = info.n_experts, layers[0].shape[1]
    onehot = np.zeros((len(layers), len(tokens), e), np.int32)
    for i, ids in enumerate(layers):
        onehot[i, np.arange(len(tokens))[:, None], ids] = 1
    csum = np.concatenate([np.zeros((len(layers), 1, e), np.int32), onehot.cumsum(axis=1)], axis=1)
    distinct, random = {}, {}
    for n in batch_sizes:
        if n > len(tokens):
            break
        window = csum[:, n:] - csum[:, :-n]  # experts used per window of n tokens, per layer
        distinct[n] = float((window > 0).sum(axis=2).mean())
        random[n] = e * (1 - (1 - k / e) ** n)
    reuse = float((onehot[:, 1:] & onehot[:, :-1]).sum(axis=2).mean() / k)
    return RoutingReport(e, k, len(layers), len(tokens), distinct, random, reuse, k / e)
