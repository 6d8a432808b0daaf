"""SamplingParams: how a token is drawn from logits (the C library does the work)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

import numpy as np

from . import errors
from ._native import check, ffi, lib, params_struct
from .grammar import Grammar, constraint_spec
from .logits import c_row

_DEFAULTS = params_struct("pymoe_sampling_params")


@dataclass(frozen=True)
class SamplingParams:
    """top-k, then top-p, then min-p on softmax(logits), then the temperature on
    the tokens left. temperature=0 is greedy (argmax). grammar or json_schema
    constrains what generation samples (pymoe.grammar: a Grammar is made for
    each generation). Before all that, generation adds logit_bias ({token id:
    bias}, -inf: never) and applies the penalties over the last repeat_last_n
    tokens of the sequence, prompt included (0: none, -1: all): a positive
    logit divided by repeat_penalty, a negative one multiplied, then
    presence_penalty and frequency_penalty * count subtracted (llama.cpp's
    order and formulas; penalize() does it to a row). probs() and sample() of
    a single row apply none of what needs a sequence: constraint, bias, penalties."""

    # the C library's defaults (floats as the C floats' shortest decimals)
    temperature: float = round(_DEFAULTS.temperature, 6)
    top_k: int = _DEFAULTS.top_k                 # 0 = off
    top_p: float = round(_DEFAULTS.top_p, 6)     # 1 = off
    min_p: float = round(_DEFAULTS.min_p, 6)     # 0 = off
    # a constraint (pymoe.grammar): GBNF text, or a JSON schema (a dict, or its JSON text); one at most
    grammar: Optional[str] = None
    json_schema: Any = field(default=None, hash=False)
    repeat_penalty: float = round(_DEFAULTS.repeat_penalty, 6)  # 1 = off
    repeat_last_n: int = _DEFAULTS.repeat_last_n                # the penalties' window; 0 = off, -1 = all
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[Dict[int, float]] = field(default=None, hash=False)
    _c: object = field(default=None, init=False, repr=False, compare=False)
    _bias: object = field(default=None, init=False, repr=False, compare=False)  # the C array c_params points to

    def __post_init__(self):
        constraint_spec(self.grammar, self.json_schema)  # checked now, not at the first token
        bias = self.logit_bias
        if bias is not None and (not isinstance(bias, dict) or not all(
                type(k) is int and 0 <= k < 2**31 and isinstance(v, (int, float)) and not isinstance(v, bool)
                and v == v and v != float("inf") for k, v in bias.items())):
            raise errors.InvalidArgumentError("logit_bias must be a dict of token ids to numbers below +inf, got "
                                              f"{bias!r:.200}", lib.PYMOE_EINVAL)
        if bias is not None:
            object.__setattr__(self, "logit_bias", dict(bias))  # read now: a change to the caller's dict is not seen
        c, keep = self._struct()  # keep: the bias array c points to, alive during the check
        check(lib.pymoe_sampling_params_check(c))  # every number checked now too

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
            c, bias = self._struct()
            object.__setattr__(self, "_c", c)
            object.__setattr__(self, "_bias", bias)
        return self._c

    def _struct(self) -> tuple:
        """The C struct and the bias array it points to (made on first use: cffi objects do not copy or pickle)."""
        c, bias = params_struct("pymoe_sampling_params"), None
        try:
            c.temperature, c.top_k, c.top_p, c.min_p = self.temperature, self.top_k, self.top_p, self.min_p
            c.repeat_penalty, c.repeat_last_n = self.repeat_penalty, self.repeat_last_n
            c.presence_penalty, c.frequency_penalty = self.presence_penalty, self.frequency_penalty
        except (TypeError, OverflowError) as exc:
            raise errors.InvalidArgumentError(f"sampling: {exc}", lib.PYMOE_EINVAL) from None
        if self.logit_bias:
            bias = ffi.new("struct pymoe_logit_bias[]", [(k, v) for k, v in self.logit_bias.items()])
            c.logit_bias, c.n_logit_bias = bias, len(bias)
        return c, bias

    @property
    def changes_logits(self) -> bool:
        """Whether generation changes the logits before the transforms (a bias or a penalty)."""
        return bool(self.logit_bias) or (self.repeat_last_n != 0 and (
            self.repeat_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0))

    def penalize(self, logits, history) -> np.ndarray:
        """A copy of a logits row with logit_bias and the penalties over history (the sequence it follows)."""
        row = np.array(c_row(logits), dtype=np.float32)
        tokens = np.ascontiguousarray(history, dtype=np.int32)
        check(lib.pymoe_penalize(ffi.from_buffer("float[]", row), row.size, self.c_params,
                                 ffi.from_buffer("pymoe_token[]", tokens), tokens.size))
        return row

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
