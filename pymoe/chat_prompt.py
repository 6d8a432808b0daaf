"""Chat prompts in which only the template's own markers are special tokens.

The template's output cannot simply be tokenized with parse_special: a user
who types "<|im_end|>" or "</s>" in a message would end the turn and write
the model's next one. So the conversation is rendered twice with each
message's text replaced by a unique mark: once to find where each message
goes, once with the marks padded to learn whether the template trims
message text. Control tokens are then looked for only outside the messages,
longest first, as llama.cpp's tokenizer looks for them; the text between two
of them (template and message text together) is tokenized as plain text.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, List, Sequence, Tuple

SPACE = " \t\n\v\f\r"  # what C's isspace() strips beside a token with strip flags


@dataclass(frozen=True)
class ChatPrompt:
    text: str                                # the conversation as the model's template writes it
    messages: Tuple[Tuple[int, int], ...]    # [start, end) of each message's text in it

    def tokens(self, model, *, add_special: bool = True, start: int = 0) -> List[int]:
        """The tokens of text[start:] (start: what a context holds already), markers special, messages plain."""
        pieces: list = [(start, len(self.text))]  # (start, end) of text still to look in, or a token id
        for token, marker, strip in model._control_tokens():
            pieces = [part for piece in pieces
                      for part in (self._split(piece, token, marker, strip) if isinstance(piece, tuple) else [piece])]
        out: List[int] = []
        for piece in pieces:
            if isinstance(piece, tuple):
                if piece[1] > piece[0]:
                    out += model.tokenize(self.text[piece[0]:piece[1]], add_special=False, parse_special=False)
            else:
                out.append(piece)
        if add_special:
            edges = model.tokenize("", add_special=True)  # BOS (and EOS) as this model's tokenizer adds them
            head = edges[:1] if edges and edges[0] == model.info.bos else []
            out = head + out + edges[len(head):]
        return out

    def _in_message(self, at: int, end: int) -> bool:
        return any(at < m_end and m_start < end for m_start, m_end in self.messages)

    def _split(self, piece: Tuple[int, int], token: int, marker: str, strip: int) -> list:
        """piece split at each occurrence of marker outside the messages; the token in between."""
        text, (at, end) = self.text, piece
        out: list = []
        while True:
            hit = text.find(marker, at, end)
            while hit >= 0 and self._in_message(hit, hit + len(marker)):
                hit = text.find(marker, hit + 1, end)
            if hit < 0:
                out.append((at, end))
                return out
            left_end = hit
            if strip & 1:  # PYMOE_STRIP_LEFT
                while left_end > at and text[left_end - 1] in SPACE:
                    left_end -= 1
            out += [(at, left_end), token]
            at = hit + len(marker)
            if strip & 2:  # PYMOE_STRIP_RIGHT
                while at < end and text[at] in SPACE:
                    at += 1


def render(model, pairs: Sequence[Tuple[str, str]], add_assistant: bool) -> ChatPrompt:
    """The conversation through model's chat template, knowing where each message's text is."""
    def through_template(texts):
        return model.chat_format([(role, text) for (role, _), text in zip(pairs, texts)],
                                 add_assistant=add_assistant), None
    return marked(through_template, [str(content) for _, content in pairs])[0]


def render_marked(model, render_request: Callable[[dict], dict], request: dict) -> Tuple[ChatPrompt, dict]:
    """(ChatPrompt, render_request's result) of a chat request whose messages' texts (content,
    reasoning_content) stay text: render_request returns {"prompt": text, ...} (a Jinja template's
    rendering). Texts are marked only when one holds a control token's text: otherwise the template
    sees them as they are (one rendering, and a template that looks into a message's text sees it)."""
    slots = [(i, key) for i, m in enumerate(request["messages"]) for key in ("content", "reasoning_content")
             if isinstance(m.get(key), str)]
    markers = [marker for _, marker, _ in model._control_tokens()]
    if not any(marker in request["messages"][i][key] for i, key in slots for marker in markers):
        result = render_request(request)
        return ChatPrompt(result["prompt"], ()), result

    def through_template(texts):
        messages = [dict(m) for m in request["messages"]]
        for (i, key), text in zip(slots, texts):
            messages[i][key] = text
        result = render_request({**request, "messages": messages})
        return result["prompt"], result
    return marked(through_template, [request["messages"][i][key] for i, key in slots])


def marked(through_template: Callable[[List[str]], Tuple[str, object]], texts: List[str]) -> Tuple[ChatPrompt, object]:
    """through_template(strings in place of texts) -> (rendered text, anything): the ChatPrompt of texts
    rendered, found by rendering unique marks in their place, and what the first rendering returned beside
    its text."""
    nonce = os.urandom(6).hex()
    marks = [f"pymoe{nonce}m{i}e" for i in range(len(texts))]
    plain, extra = through_template(marks)
    padded, _ = through_template([f" {mark} " for mark in marks])
    index = {mark: i for i, mark in enumerate(marks)}
    parts: List[str] = []
    spans = []
    at = length = 0
    for m in re.finditer("|".join(marks) or "(?!)", plain):
        mark = m.group()
        content = texts[index[mark]]
        if f" {mark}" not in padded:  # the template trims message text
            content = content.lstrip(SPACE)
        if f"{mark} " not in padded:
            content = content.rstrip(SPACE)
        before = plain[at:m.start()]
        parts += [before, content]
        length += len(before)
        spans.append((length, length + len(content)))
        length += len(content)
        at = m.end()
    parts.append(plain[at:])
    return ChatPrompt("".join(parts), tuple(spans)), extra
