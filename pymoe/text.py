"""Token ids to text as they are generated: incremental UTF-8 decoding of
token pieces (a piece may end inside a character) and stop strings (text is
held back while it could still become one)."""
from __future__ import annotations

import codecs
from typing import Iterable


class TextStream:
    """Feed token ids one by one; add() returns the text that can be shown
    now. A stop string ends the text before it (stopped becomes True); text is
    held back only while it could still begin a stop string, and finish()
    returns what is held when generation ends.

    text: what was shown (stop string excluded); context_text: the decoded
    text of every token added, a stop string and what followed it in its
    token included (what a context that was fed those tokens holds)."""

    def __init__(self, model, stop: Iterable[str] = (), *, render_special: bool = False):
        self.model = model
        self.render_special = render_special
        self.stops = [s for s in stop if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.context_text = ""
        self.text = ""       # decoded text up to any stop string
        self.shown = 0       # characters of text returned so far
        self.stopped = False
        self.finished = False

    @property
    def holding(self) -> bool:
        """Is text held back (a possible stop string, or an unfinished UTF-8 character)?"""
        if self.stopped or self.finished:
            return False
        return self.shown < len(self.text) or bool(self._decoder.getstate()[0])

    def add(self, token: int) -> str:
        """Decode one more token; returns the text that can be shown now."""
        if self.stopped or self.finished:
            raise ValueError("the text stream has ended (a stop string, or finish())")
        piece = self._decoder.decode(self.model.token_piece(token, render_special=self.render_special))
        return self._take(piece)

    def finish(self) -> str:
        """Generation ended: the text still held back."""
        if self.finished:
            return ""
        piece = "" if self.stopped else self._decoder.decode(b"", final=True)
        self.finished = True
        return self._take(piece, final=True)

    def _take(self, piece: str, final: bool = False) -> str:
        self.context_text += piece
        if not self.stopped:
            self.text += piece
            # a stop string can only end in text that is new or was held back
            start = max(self.shown - self.hold, 0)
            cut = min((i for i in (self.text.find(s, start) for s in self.stops) if i >= 0), default=-1)
            if cut >= 0:
                self.text, self.stopped = self.text[:cut], True
        end = len(self.text) if (self.stopped or final) else max(self.shown, len(self.text) - self.hold)
        out, self.shown = self.text[self.shown:end], end
        return out
