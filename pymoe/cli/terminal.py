"""What the commands show on a terminal: generated text as it streams, and
progress bars for long work."""
from __future__ import annotations

import sys
from pathlib import Path

from ..text import TextStream

BAR = 30


def bar(label: str):
    """A progress callback drawing `label [####    ]  40%` on stderr (a fraction,
    or done/total) when stderr is a terminal; silent otherwise (logs stay short)."""
    if not sys.stderr.isatty():
        return lambda *_: None
    shown = [-1]

    def draw(done, total=None, *_):
        fraction = done / total if total else float(done)
        percent = int(fraction * 100)
        if percent != shown[0]:
            shown[0] = percent
            filled = int(fraction * BAR)
            end = "\n" if percent >= 100 else ""
            print(f"\r{label} [{'#' * filled}{' ' * (BAR - filled)}] {percent:3d}%", end=end, file=sys.stderr,
                  flush=True)
    return draw


def load_bar(path):
    """A load progress bar on stderr when it is a terminal; otherwise silent."""
    return bar(f"loading {Path(path).name}")


def stream(ids, text: TextStream, write, seen: list) -> None:
    """Write the text of token ids as they come (held back while it could
    still become a stop string) until the ids end or a stop string; each id
    is appended to seen first, so that an interrupted stream knows what the
    context holds. The caller writes text.finish() at the end."""
    for token in ids:
        seen.append(token)
        write(text.add(token))
        if text.stopped:
            return
