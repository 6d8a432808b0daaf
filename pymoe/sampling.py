"""SamplingParams: how a token is drawn from logits (the C library does the work)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ._native import check, ffi, lib, params_struct
from .grammar import Grammar, constraint_spec
from .logits import c_row

_DEFAULTS = params_struct("pymoe_sampling_params")


@dataclass(frozen=True)
class SamplingParams:
    """top-k, then top-p, then min-p on softmax(logits), then the temperature on
    the tokens left. temperature=0 is greedy (argmax). grammar or json_schema
    constrains what generation samples (pymoe.grammar: a Grammar is made for
    each generation); probs() and sample() of a single row do not apply it."""

    # the C library's defaults (floats as the C floats' shortest decimals)
    temperature: float = round(_DEFAULTS.temperature, 6)
    top_k: int = _DEFAULTS.top_k                 # 0 = off
    top_p: float = round(_DEFAULTS.top_p, 6)     # 1 = off
    min_p: float = round(_DEFAULTS.min_p, 6)     # 0 = off
    # a constraint (pymoe.grammar): GBNF text, or a JSON schema (a dict, or its JSON text); one at most
    grammar: Optional[str] = None
    json_schema: Any = field(default=None, hash=False)
    _c: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        constraint_spec(self.grammar, self.json_schema)  # checked now, not at the first token

    def constraint(self, model) -> Optional[Grammar]:
        """A fresh Grammar for one generation (None without a constraint)."""
        spec = constraint_spec(self.grammar, self.json_schema)
        return Grammar(model, spec) if spec is not None else None

    @classmethod
    def greedy(cls) -> "SamplingParams":
        return cls(temperature=0.0)

    @property
    def c_params(self):
        """The C struct, built once (sampling is called once per token)."""
        if self._c is None:
            c = params_struct("pymoe_sampling_params")
            c.temperature, c.top_k, c.top_p, c.min_p = self.temperature, self.top_k, self.top_p, self.min_p
            object.__setattr__(self, "_c", c)
        return self._c

    def probs(self, logits) -> np.ndarray:
        """The distribution a sample is drawn from (the C transform), as float32."""
        row = c_row(logits)
        out = np.empty_like(row)
        check(lib.pymoe_sampling_probs(ffi.from_buffer("float[]", row), row.size, self.c_params,
                                       ffi.from_buffer("float[]", out)))
        return out

    def sample(self, logits, rng_state: "Rng") -> int:
        """Draw a token from a logits row with the given random state."""
        row = c_row(logits)
        out = ffi.new("pymoe_token *")
        check(lib.pymoe_sample(ffi.from_buffer("float[]", row), row.size, self.c_params, rng_state._state, out))
        return out[0]


def seed_or_random(seed: Optional[int]) -> int:
    """seed as a 64-bit seed, or a random one for None."""
    return (seed if seed is not None else int.from_bytes(os.urandom(8), "little")) & 0xFFFFFFFFFFFFFFFF


class Rng:
    """The C library's random state (splitmix64): same seed, same numbers."""

    def __init__(self, seed: int):
        self._state = ffi.new("uint64_t *")
        lib.pymoe_rng_seed(self._state, seed & 0xFFFFFFFFFFFFFFFF)

    def uniform(self) -> float:
        return lib.pymoe_rng_uniform(self._state)
