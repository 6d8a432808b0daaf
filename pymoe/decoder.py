"""Decoder: what a plain session and a speculative loop have in common, so
that code driving them (a chat, a server, a benchmark) never asks which it has."""
from __future__ import annotations

from typing import Iterable, Iterator, List, NamedTuple, Optional, Sequence, Union

import numpy as np

from .text import TextStream

Tokens = Union[int, Sequence[int], np.ndarray]


class Token(NamedTuple):
    id: int
    text: str  # the text this token makes final ("" while inside a UTF-8 sequence or held for a stop string)


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
                        **options) -> Iterator[int]:
        """Feed the prompt (None continues), then yield token ids until
        max_tokens, an end-of-generation token (not yielded) or a full context."""
        raise NotImplementedError

    def generate(self, prompt: Union[str, Tokens, None] = None, *, max_tokens: int = 128, stop: Iterable[str] = (),
                 render_special: bool = False, **options) -> Iterator[Token]:
        """Like generate_tokens, yielding Token(id, text). Joined, the texts are
        the generated text, cut before the first stop string (generation then
        ends with stop_reason "stop"; the tokens up to it are in the sequence,
        and in a speculative loop's also the rest of the round that emitted
        it: position says how many).
        While text is held back (a possible stop string, an unfinished
        character), a token is yielded when the next one arrives, so that the
        last token can carry the text released at the end."""
        text = TextStream(self.model, stop, render_special=render_special)
        deferred: Optional[Token] = None
        for token in self.generate_tokens(prompt, max_tokens=max_tokens, **options):
            shown = text.add(token)
            if deferred is not None:
                yield deferred
                deferred = None
            if text.stopped:
                self.stop_reason = "stop"
                yield Token(token, shown)
                return
            if text.holding:
                deferred = Token(token, shown)
            else:
                yield Token(token, shown)
        tail = text.finish()
        if deferred is not None:
            yield Token(deferred.id, deferred.text + tail)
