"""A model's Jinja chat template with tools and reasoning (llama.cpp's chat
library, csrc/chat.cpp): render an OpenAI-style conversation into a prompt,
and parse the model's reply into content, reasoning_content and tool_calls.

The prompt is tokenized as chat_prompt.py does it: a message's text that holds
a control token's text ("<|im_end|>") is replaced by a mark for the rendering,
so only the template's own text can become control tokens."""
from __future__ import annotations

import json
from typing import Optional

from . import errors
from ._native import NativeObject, ffi, lib
from .chat_prompt import ChatPrompt, render_marked

# where a reasoning model's thinking goes, as llama-server names it (pymoe_chat_render's reasoning_format)
REASONING_FORMATS = ("auto", "none", "deepseek", "deepseek-legacy")


def _taken(out) -> dict:
    """The JSON text the library returned in out[0], freed."""
    try:
        return json.loads(ffi.string(out[0]).decode("utf-8", "replace"))
    finally:
        lib.pymoe_chat_text_free(out[0])


def _text_json(value) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise errors.InvalidArgumentError(f"not JSON: {exc}", lib.PYMOE_EINVAL) from None
    except UnicodeEncodeError as exc:  # a lone surrogate from \\ud800 in the request's JSON
        raise errors.InvalidArgumentError(f"text that is not Unicode: {exc.reason}", lib.PYMOE_EINVAL) from None


class ChatTemplate(NativeObject):
    """The chat template of a model (its own, or source: a Jinja template).
    Once made it does not need the model: it keeps what it read from it."""

    _kind = "chat template"

    def __init__(self, model, source: Optional[str] = None):
        out = ffi.new("pymoe_chat **")
        src = ffi.new("char[]", source.encode()) if source else ffi.NULL
        with self._building(out, lib.pymoe_chat_free):
            with model._call(wait=True) as ptr:
                model._run(lib.pymoe_chat_open, ptr, src, out)
            self._own(out[0], lib.pymoe_chat_free)
            self.caps = self._json(lib.pymoe_chat_caps)

    def _json(self, fn, *args) -> dict:
        out = ffi.new("char **")
        with self._call(wait=True) as ptr:  # short calls: another thread's waits (the server renders from two)
            self._run(fn, ptr, *args, out)
        return _taken(out)

    def render(self, request: dict) -> dict:
        """pymoe_chat_render of request ({"messages": [...], "tools": ..., ...}): prompt, grammar, parser, ..."""
        return self._json(lib.pymoe_chat_render, _text_json(request))

    def prompt(self, model, request: dict) -> tuple:
        """(ChatPrompt, render result) of request for model's tokenizer: every message's text stays text."""
        return render_marked(model, self.render, request)

    @staticmethod
    def parser(rendered: dict) -> "ChatParser":
        """The parser of a reply to a rendered request (what it separates follows that request: its tools,
        its reasoning_format)."""
        return ChatParser({key: rendered[key] for key in ("format", "parser", "generation_prompt")})


class ChatParser(NativeObject):
    """Parses a reply as it grows: parse(text, partial=True) while it streams, then partial=False."""

    _kind = "chat parser"

    def __init__(self, syntax: dict):
        out = ffi.new("pymoe_chat_parser **")
        with self._building(out, lib.pymoe_chat_parser_free):
            self._status(lib.pymoe_chat_parser_create(_text_json(syntax), out))
            self._own(out[0], lib.pymoe_chat_parser_free)

    def parse(self, text: str, partial: bool) -> dict:
        """{"role": "assistant", "content", "reasoning_content"?, "tool_calls"?} of the reply text so far."""
        out = ffi.new("char **")
        self._c(lib.pymoe_chat_parse, text.encode("utf-8", "replace"), partial, out)
        return _taken(out)


__all__ = ["ChatTemplate", "ChatParser", "ChatPrompt"]
