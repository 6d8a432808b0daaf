"""A grammar that constrains sampling (csrc/grammar.cpp): a GBNF grammar, a
JSON schema (converted by llama.cpp's json-schema-to-grammar), or the tool
call a chat template asks for (pymoe_chat_render's grammar).

The constrained distribution (pymoe_grammar_sample): the tokens the sampling
transforms keep that the grammar allows, renormalized; when it allows none of
them, the transforms of the row with every forbidden token masked; greedy: the
most likely token it allows. Plain sessions draw from it
(Session.generate_tokens(grammar=...)) and a speculative loop verifies against
it (Speculative.generate_tokens(grammar=...)), so both give the same output."""
from __future__ import annotations

import json
import weakref
from typing import Any, Optional

import numpy as np

from . import errors
from ._native import NativeObject, ffi, lib
from .logits import c_row

_SPEC_KEYS = ("grammar", "json_schema", "grammar_lazy", "grammar_triggers", "generation_prompt")


class Grammar(NativeObject):
    """spec: {"grammar": GBNF or "json_schema": a schema, "grammar_lazy", "grammar_triggers",
    "generation_prompt"} (pymoe_grammar_create). A grammar has a state: it
    advances with every token accepted, so make one per generation."""

    _kind = "grammar"
    _loop = None  # the speculative loop it constrains now (a weak reference), or None

    def __init__(self, model, spec: dict):
        out = ffi.new("pymoe_grammar **")
        try:
            text = json.dumps({k: spec[k] for k in _SPEC_KEYS if k in spec}).encode()
        except (TypeError, ValueError, RecursionError) as e:
            raise errors.InvalidArgumentError(f"the grammar's spec is not JSON: {e}", lib.PYMOE_EINVAL) from None
        self._allowed = ffi.new("bool *")
        self._token = ffi.new("pymoe_token *")
        with self._building(out, lib.pymoe_grammar_free):
            with model._call(wait=True) as ptr:
                model._run(lib.pymoe_grammar_create, ptr, text, out)
            self._own(out[0], lib.pymoe_grammar_free, model)  # it reads the model's vocabulary

    @classmethod
    def from_gbnf(cls, model, text: str) -> "Grammar":
        """A GBNF grammar (root rule "root")."""
        return cls(model, {"grammar": text})

    @classmethod
    def from_json_schema(cls, model, schema: Any) -> "Grammar":
        """JSON that a schema (a dict, or its JSON text) allows; {} allows any JSON value."""
        return cls(model, {"json_schema": _schema(schema)})

    def allows(self, token: int) -> bool:
        self._c(lib.pymoe_grammar_allows, token, self._allowed)
        return bool(self._allowed[0])

    def mask(self, row: np.ndarray) -> None:
        """Set the logits (a float32 row, in place) of what the grammar does not allow now to -inf."""
        self._c(lib.pymoe_grammar_mask, ffi.from_buffer("float[]", row), row.size)

    def accept(self, token: int) -> None:
        self._c(lib.pymoe_grammar_accept, token)

    def sample(self, logits, sampling, rng) -> int:
        """Draw from the constrained distribution of a logits row (sampling: SamplingParams, rng: an Rng);
        the grammar does not advance (accept())."""
        row = c_row(logits)
        self._c(lib.pymoe_grammar_sample, ffi.from_buffer("float[]", row), row.size, sampling.c_params,
                rng._state, self._token)
        return self._token[0]

    def probs(self, logits, sampling) -> np.ndarray:
        """The constrained distribution of a logits row, as float32 probabilities."""
        row = c_row(logits)
        out = np.empty_like(row)
        self._c(lib.pymoe_grammar_probs, ffi.from_buffer("float[]", row), row.size, sampling.c_params,
                ffi.from_buffer("float[]", out))
        return out

    def _before_close(self) -> None:
        loop = self._loop() if self._loop is not None else None
        if loop is not None:  # it no longer constrains that loop (its rounds take this lock too)
            loop._detach_grammar(self)


MAX_SCHEMA_DEPTH = 400  # as csrc/grammar.cpp: the converters recurse once per level


def _depth(value: Any) -> int:
    """How deep a JSON value nests (without recursing)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        deepest = max(deepest, depth)
        if depth <= MAX_SCHEMA_DEPTH:
            children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
            todo.extend((child, depth + 1) for child in children)
    return deepest


def _schema(schema: Any) -> Any:
    """A JSON schema given as a dict (or bool), or as its JSON text."""
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except (ValueError, RecursionError) as e:
            raise errors.InvalidArgumentError(f"the JSON schema is not JSON: {e}", lib.PYMOE_EINVAL) from None
    if not isinstance(schema, (dict, bool)):
        raise errors.InvalidArgumentError(f"a JSON schema is an object, got {type(schema).__name__}",
                                          lib.PYMOE_EINVAL)
    if _depth(schema) > MAX_SCHEMA_DEPTH:  # also for a chat's schema, which llama.cpp's chat library converts
        raise errors.InvalidArgumentError(f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels",
                                          lib.PYMOE_EINVAL)
    return schema


def constraint_spec(grammar: Optional[str], json_schema: Any) -> Optional[dict]:
    """The spec of SamplingParams' constraint (None: none); both at once is an error."""
    if grammar is not None and json_schema is not None:
        raise errors.InvalidArgumentError("give a grammar or a JSON schema, not both", lib.PYMOE_EINVAL)
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise errors.InvalidArgumentError("grammar must be GBNF text", lib.PYMOE_EINVAL)
        return {"grammar": grammar}
    return {"json_schema": _schema(json_schema)} if json_schema is not None else None


def attach(loop, grammar: Optional[Grammar]) -> None:
    """Mark grammar as constraining loop (None: no longer): closing the grammar detaches it first."""
    if grammar is not None:
        if grammar._loop is not None and grammar._loop() not in (None, loop):
            raise errors.BusyError("the grammar constrains another loop already: make one per generation",
                                   lib.PYMOE_ESTATE)
        grammar._loop = weakref.ref(loop)


def constrained_sample(session, grammar: Grammar, sampling=None) -> int:
    """The next token from the session's last logits under grammar: sampling (default the session's) with the
    session's random state; the row is read where the session keeps it."""
    sampling = sampling or session.sampling
    params = sampling.c_params
    row = c_row(session.logits())
    if sampling.changes_logits:  # the bias and penalties, over the session's tokens, as its own draws have them
        row = sampling.penalize(row, session.tokens)
    with session._call():  # the row stays where it is until the draw is made
        grammar._c(lib.pymoe_grammar_sample, ffi.from_buffer("float[]", row), row.size, params, session._rng,
                   grammar._token)
    return grammar._token[0]
