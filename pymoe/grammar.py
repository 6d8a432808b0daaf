"""A grammar that constrains sampling (csrc/grammar.cpp): the tool call a
chat template asks for (pymoe_chat_render's grammar), or any GBNF grammar.

Session.generate_tokens(grammar=...) generates under one (constrained_sample): each token is drawn as usual and checked; only a token the grammar
does not allow costs a mask of the whole row and a second draw."""
from __future__ import annotations

import json

import numpy as np

from . import errors
from ._native import NativeObject, check, ffi, lib


class Grammar(NativeObject):
    """spec: {"grammar": GBNF, "grammar_lazy", "grammar_triggers", "generation_prompt"} (pymoe_grammar_create)."""

    _kind = "grammar"

    def __init__(self, model, spec: dict):
        out = ffi.new("pymoe_grammar **")
        text = json.dumps({k: spec[k] for k in ("grammar", "grammar_lazy", "grammar_triggers", "generation_prompt")
                           if k in spec}).encode()
        self._allowed = ffi.new("bool *")
        with self._building(out, lib.pymoe_grammar_free):
            with model._call(wait=True) as ptr:
                model._run(lib.pymoe_grammar_create, ptr, text, out)
            self._own(out[0], lib.pymoe_grammar_free, model)  # it reads the model's vocabulary

    def allows(self, token: int) -> bool:
        self._c(lib.pymoe_grammar_allows, token, self._allowed)
        return bool(self._allowed[0])

    def mask(self, row: np.ndarray) -> None:
        """Set the logits (a float32 row, in place) of what the grammar does not allow now to -inf."""
        self._c(lib.pymoe_grammar_mask, ffi.from_buffer("float[]", row), row.size)

    def accept(self, token: int) -> None:
        self._c(lib.pymoe_grammar_accept, token)


def constrained_sample(session, grammar: Grammar, sampling=None) -> int:
    """The next token from the session's last logits under grammar: sampling (default the session's) with the
    session's random state."""
    params = (sampling or session.sampling).c_params
    out = ffi.new("pymoe_token *")
    row = np.array(session.logits(), dtype=np.float32)
    check(lib.pymoe_sample(ffi.from_buffer("float[]", row), row.size, params, session._rng, out))
    if not grammar.allows(out[0]):
        grammar.mask(row)
        if not np.isfinite(row).any():
            raise errors.InvalidArgumentError("the grammar allows no token here", lib.PYMOE_EINVAL)
        check(lib.pymoe_sample(ffi.from_buffer("float[]", row), row.size, params, session._rng, out))
    return out[0]
