"""Decoder: what a plain session and a speculative loop have in common, so
that code driving them (a chat, a server, a benchmark) never asks which it has."""
from __future__ import annotations

from typing import Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from . import errors
from ._compiled import lib
from .text import TextStream

Tokens = Union[int, Sequence[int], np.ndarray]


class Scores(NamedTuple):
    """What the model's distribution said of a generated token: its log
    probability (log softmax of the logits at temperature 1, before the
    sampling transforms and any constraint) and the most likely tokens with
    theirs, as (id, logprob), the most likely first."""
    logprob: float
    top: Tuple[Tuple[int, float], ...]


class _TokenFields(NamedTuple):
    id: int
    text: str  # the text this token makes final ("" while inside a UTF-8 sequence or held for a stop string)


class Token(_TokenFields):
    """A generated token: (id, text), and with generate(..., logprobs=n) its
    logprob and top_logprobs (Scores.logprob and .top, n of them; None
    otherwise): attributes beside the pair, so that `for id, text in ...` holds."""

    logprob: Optional[float] = None
    top_logprobs: Optional[Tuple[Tuple[int, float], ...]] = None

    @classmethod
    def scored(cls, id: int, text: str, scores: Optional[Scores]) -> "Token":
        token = cls(id, text)
        if scores is not None:
            token.logprob, token.top_logprobs = scores.logprob, scores.top
        return token

    def __repr__(self) -> str:
        scored = "" if self.logprob is None else f", logprob={self.logprob!r}, top_logprobs={self.top_logprobs!r}"
        return f"Token(id={self.id!r}, text={self.text!r}{scored})"


MAX_TOP_LOGPROBS = 20


def check_logprobs(n) -> None:
    """logprobs=n asks for n alternatives per token (0: the token's own log probability only)."""
    if n is not None and (type(n) is not int or not 0 <= n <= MAX_TOP_LOGPROBS):
        raise errors.InvalidArgumentError(f"logprobs must be None or an int in [0, {MAX_TOP_LOGPROBS}], got {n!r}",
                                          lib.PYMOE_EINVAL)


def scores_from_c(c) -> Scores:
    return Scores(c.logprob, tuple((c.top_ids[i], c.top_logprobs[i]) for i in range(c.n_top)))


class Decoder:
    """A sequence that grows by feeding tokens and by generating them.

    Subclasses provide model (whose tokenizer the sequence uses), position,
    tokens, feed(), reset(), rewind() and generate_tokens(); stop_reason says
    why the last generation ended: "max_tokens", "eog", "context_full", or
    "stop" (a stop string, with generate()). source and stats say where drafts
    come from and what they did: None for a plain session."""

    model = None
    is_recurrent = False  # the context holds recurrent state: rewind() reaches only its snapshots or checkpoint
    takes_grammar = False  # generate_tokens(..., grammar=Grammar) constrains what it samples
    stop_reason: Optional[str] = None
    scores: Optional[Scores] = None  # with generate_tokens(..., logprobs=n): the last yielded token's
    source: Optional[str] = None
    stats = None

    @property
    def tokens(self) -> List[int]:
        """The sequence, oldest first: what was fed and generated (a copy)."""
        raise NotImplementedError

    @property
    def position(self) -> int:
        """Tokens in the sequence."""
        raise NotImplementedError

    def feed(self, tokens: Union[str, Tokens]) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        """Start a new, empty sequence."""
        raise NotImplementedError

    def save_state(self) -> bytearray:
        """Everything the decoder holds of its sequence, to go on from with load_state()."""
        raise NotImplementedError

    @property
    def state_size(self) -> int:
        """The bytes save_state() would return now (nothing is copied)."""
        raise NotImplementedError

    def load_state(self, state) -> None:
        """Go on from save_state()'s bytes (of a decoder over the same models and settings)."""
        raise NotImplementedError

    @property
    def rewind_limit(self) -> int:
        """How many of the last positions rewind() can drop now (0: none; reset() starts over)."""
        return 0

    def rewind(self, n: int) -> None:
        """Drop the last n positions (at most rewind_limit)."""
        raise NotImplementedError

    def set_sampling(self, sampling, seed: Optional[int] = None) -> None:
        """Sample from now on with these SamplingParams, the draws from seed (None: a random one)."""
        raise NotImplementedError

    def generate_tokens(self, prompt: Union[str, Tokens, None] = None, *, max_tokens: int = 128,
                        logprobs: Optional[int] = None, **options) -> Iterator[int]:
        """Feed the prompt (None continues), then yield token ids until
        max_tokens, an end-of-generation token (not yielded) or a full context.
        logprobs=n: scores holds each yielded token's Scores (n alternatives)
        while it is the last one yielded."""
        raise NotImplementedError

    def generate(self, prompt: Union[str, Tokens, None] = None, *, max_tokens: int = 128, stop: Iterable[str] = (),
                 render_special: bool = False, logprobs: Optional[int] = None, **options) -> Iterator[Token]:
        """Like generate_tokens, yielding Token(id, text), with logprobs=n also
        its logprob and top_logprobs (n alternatives). Joined, the texts are
        the generated text, cut before the first stop string (generation then
        ends with stop_reason "stop"; the tokens up to it are in the sequence,
        and in a speculative loop's also the rest of the round that emitted
        it: position says how many).
        While text is held back (a possible stop string, an unfinished
        character), a token is yielded when the next one arrives, so that the
        last token can carry the text released at the end."""
        check_logprobs(logprobs)
        if logprobs is not None:
            options["logprobs"] = logprobs
        text = TextStream(self.model, stop, render_special=render_special)
        deferred: Optional[Token] = None
        for token in self.generate_tokens(prompt, max_tokens=max_tokens, **options):
            shown = text.add(token)
            made = Token.scored(token, shown, self.scores if logprobs is not None else None)
            if deferred is not None:
                yield deferred
                deferred = None
            if text.stopped:
                self.stop_reason = "stop"
                yield made
                return
            if text.holding:
                deferred = made
            else:
                yield made
        tail = text.finish()
        if deferred is not None:
            last = Token(deferred.id, deferred.text + tail)
            last.logprob, last.top_logprobs = deferred.logprob, deferred.top_logprobs
            yield last
