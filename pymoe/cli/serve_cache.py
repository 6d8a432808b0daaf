"""The server's RAM cache of earlier contexts: decoder states saved with the
tokens they hold, so a request that comes back to a conversation the context
no longer holds restores the state sharing the most with its prompt instead of
feeding it all again. When the cache would pass its size, the states used
least recently go first. Only the engine's worker thread touches it."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


@dataclass(eq=False)
class Saved:
    tokens: List[int]
    state: bytearray


class PromptCache:
    """Saved states within limit_bytes (None: no limit). rewinds: a restored
    state can go back to any prefix of its tokens (a KV cache); else (recurrent
    state) it can only be extended, so only a state whose tokens all begin the
    prompt is of use."""

    def __init__(self, limit_bytes: Optional[int], rewinds: bool):
        self.limit = limit_bytes
        self.rewinds = rewinds
        self._saved: "OrderedDict[int, Saved]" = OrderedDict()  # least recently used first
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._saved)

    def keeps(self, tokens: Sequence[int], prompt: Sequence[int]) -> int:
        """How many prompt tokens restoring a state of these tokens keeps (the last prompt token is always fed
        again: its logits are what the request samples from first)."""
        keep = min(common_prefix(tokens, prompt), len(prompt) - 1)
        return keep if self.rewinds or keep == len(tokens) else 0

    def best(self, prompt: Sequence[int]) -> Tuple[Optional[Saved], int]:
        """The saved state that keeps the most of prompt, and how much (None, 0: none keeps anything)."""
        found, most = None, 0
        for saved in self._saved.values():
            keep = self.keeps(saved.tokens, prompt)
            if keep > most:
                found, most = saved, keep
        return found, most

    def fits(self, n_bytes: int) -> bool:
        return self.limit is None or n_bytes <= self.limit

    def drop(self, saved: Saved) -> None:
        if id(saved) in self._saved:
            self._drop(id(saved))

    def used(self, saved: Saved) -> None:
        if id(saved) in self._saved:
            self._saved.move_to_end(id(saved))

    def holds(self, tokens: Sequence[int]) -> bool:
        return any(s.tokens == tokens for s in self._saved.values())

    def add(self, tokens: List[int], state: bytearray) -> bool:
        """Keep a state (False: larger than the whole cache). States it makes
        useless go: the same tokens, and, where states rewind, any whose tokens
        begin these."""
        if not self.fits(len(state)):
            return False
        for key, saved in list(self._saved.items()):
            if saved.tokens == tokens or (self.rewinds and common_prefix(saved.tokens, tokens) == len(saved.tokens)):
                self._drop(key)
        saved = Saved(list(tokens), state)
        self._saved[id(saved)] = saved
        self.bytes += len(state)
        while self.limit is not None and self.bytes > self.limit:
            self._drop(next(iter(self._saved)))
        return True

    def _drop(self, key: int) -> None:
        self.bytes -= len(self._saved.pop(key).state)
