"""TextStream and Decoder.generate against an oracle, on pieces split anywhere
(inside UTF-8 characters too) and stop strings that straddle token boundaries:
never text past a stop, nothing held back at the end, nothing held back longer
than a stop string could need."""
import codecs

from hypothesis import given
from hypothesis import strategies as st

import pymoe

ALPHABET = "ab \né€😀"  # one- to four-byte characters


class PieceModel:
    """A stand-in for a Model: token i is pieces[i]."""

    def __init__(self, pieces):
        self.pieces = pieces

    def token_piece(self, token, render_special=False):
        return self.pieces[token]


@st.composite
def streams(draw):
    text = draw(st.text(alphabet=ALPHABET, min_size=0, max_size=24))
    data = text.encode()
    cuts = sorted(draw(st.sets(st.integers(1, max(len(data) - 1, 1)), max_size=12))) if len(data) > 1 else []
    bounds = [0, *[c for c in cuts if c < len(data)], len(data)]
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]
    # stop strings: pieces of the text itself (so that they occur) and arbitrary ones
    stops = draw(st.lists(st.one_of(
        st.builds(lambda i, n: text[i:i + n], st.integers(0, max(len(text) - 1, 0)), st.integers(1, 4)),
        st.text(alphabet=ALPHABET, min_size=1, max_size=3)), max_size=3))
    return pieces, [s for s in stops if s]


def oracle(pieces, stops):
    """(the text to show, how many tokens are taken, stopped): after each
    token, the decoded text so far is searched for every stop string; the
    first token that completes one ends the text at the earliest stop it contains."""
    for j in range(len(pieces)):
        prefix = codecs.getincrementaldecoder("utf-8")().decode(b"".join(pieces[:j + 1]))
        found = [i for i in (prefix.find(s) for s in stops) if i >= 0]
        if found:
            return prefix[:min(found)], j + 1, True
    return b"".join(pieces).decode(), len(pieces), False


@given(streams())
def test_text_stream_shows_what_the_oracle_says(case):
    pieces, stops = case
    expected, n_taken, stopped = oracle(pieces, stops)
    stream = pymoe.TextStream(PieceModel(pieces), stops)
    hold = max((len(s) for s in stops), default=1) - 1
    shown, taken = "", 0
    for token in range(len(pieces)):
        taken += 1
        shown += stream.add(token)
        if stream.stopped:
            break
        decoded = codecs.getincrementaldecoder("utf-8")().decode(b"".join(pieces[:token + 1]))
        assert len(shown) >= len(decoded) - hold  # nothing held longer than a stop string needs
        assert decoded.startswith(shown)
    assert stream.stopped == stopped and taken == n_taken
    shown += stream.finish()
    assert shown == expected == stream.text
    assert not stream.holding  # nothing held back at the end
    assert stream.context_text.startswith(shown)


class ListDecoder(pymoe.Decoder):
    """A Decoder whose generation is a fixed list of tokens."""

    def __init__(self, pieces):
        self.model = PieceModel(pieces)
        self.n = len(pieces)

    def generate_tokens(self, prompt=None, *, max_tokens=128):
        self.stop_reason = "max_tokens"
        yield from range(min(self.n, max_tokens))


@given(streams())
def test_generate_yields_every_token_with_the_text_it_makes_final(case):
    pieces, stops = case
    expected, n_taken, stopped = oracle(pieces, stops)
    decoder = ListDecoder(pieces)
    tokens = list(decoder.generate(max_tokens=100, stop=stops))
    assert [t.id for t in tokens] == list(range(n_taken))
    assert "".join(t.text for t in tokens) == expected
    assert decoder.stop_reason == ("stop" if stopped else "max_tokens")


def test_a_stop_string_split_over_three_tokens():
    pieces = [b"Hello, wo", b"rld! E", b"ND", b" more"]
    decoder = ListDecoder(pieces)
    tokens = list(decoder.generate(stop=["END"]))
    assert [t.id for t in tokens] == [0, 1, 2] and "".join(t.text for t in tokens) == "Hello, world! "
    assert decoder.stop_reason == "stop"
