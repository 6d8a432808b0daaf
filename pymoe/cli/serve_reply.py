"""A chat reply as it grows, parsed by the template's parser into content,
reasoning_content and tool calls, and the OpenAI stream deltas between two
parses. A tool call is announced (its id and name) once its name is whole,
that is once its arguments have begun or the reply has ended, then its
arguments follow as they grow, as llama-server streams them. With
parallel_tool_calls false a second call ends the reply: the API's promise of
one call at most (llama.cpp's grammars for some templates allow more)."""
from __future__ import annotations

import uuid
from typing import List

from .. import errors


def _call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class Reply:
    """The reply of one request: add() each piece of text as it comes (the deltas to stream, when streamed),
    then end() for the whole message."""

    def __init__(self, parser, streamed: bool, single_call: bool = False, think_inline: bool = False):
        self.parser = parser
        self.streamed = streamed
        self.think_inline = think_inline  # reasoning_format deepseek-legacy: a stream's thinking in <think> tags
        self.thinking = 0  # of think_inline: 0 before any reasoning, 1 inside <think>, 2 after </think>
        self.single_call = single_call  # parallel_tool_calls false: a second call ends the reply (over)
        self.over = False
        self.text = ""
        self.message = {"role": "assistant", "content": ""}  # the last parse
        self.ids: List[str] = []    # tool call ids, by index, kept from parse to parse
        self.announced = 0          # tool calls whose id and name were sent

    def add(self, piece: str) -> List[dict]:
        self.text += piece
        if not (self.streamed or self.single_call):  # nobody looks at the partial parses: parse once, at the end
            return []
        try:
            message = self._single(self.parser.parse(self.text, partial=True))
        except errors.PymoeError:  # not parseable yet (the library is lenient; this is rare): wait for more
            return []
        return self._advance(message, final=False) if self.streamed else []

    def _single(self, message: dict) -> dict:
        """message with one tool call at most when single_call; a second one begun makes the reply over."""
        calls = message.get("tool_calls") or ()
        if self.single_call and len(calls) > 1:
            self.over = True
            message = dict(message, tool_calls=calls[:1])
        return message

    def end(self, complete: bool = True) -> tuple:
        """(the whole message, the last deltas). complete: the model ended the reply (not max_tokens or a
        cancel, which may cut it inside a call or its thinking: parsed as partial). Text the template's format
        does not match is content."""
        try:  # a reply cut at a second call ends inside it: parsed as partial too
            message = self._single(self.parser.parse(self.text, partial=self.over or not complete))
        except errors.PymoeError:
            message = {"role": "assistant", "content": self.text}
        deltas = self._advance(message, final=True) if self.streamed else []
        self._name(message)
        whole = {"role": "assistant", "content": message.get("content") or None}
        if message.get("reasoning_content"):
            whole["reasoning_content"] = message["reasoning_content"]
        if message.get("tool_calls"):
            whole["tool_calls"] = [self._call(i, call) for i, call in enumerate(message["tool_calls"])]
        elif whole["content"] is None:
            whole["content"] = ""
        return whole, deltas

    def _inline(self, key: str, text: str) -> dict:
        """The delta of new text; with think_inline, thinking goes into the content between <think> tags."""
        if not self.think_inline:
            return {key: text}
        if key == "reasoning_content":
            text, self.thinking = ("<think>" if self.thinking == 0 else "") + text, 1
        elif self.thinking == 1:
            text, self.thinking = "</think>" + text, 2
        return {"content": text}

    def _name(self, message: dict) -> None:
        for i, call in enumerate(message.get("tool_calls") or ()):
            while len(self.ids) <= i:
                self.ids.append(call.get("id") or _call_id())

    def _call(self, i: int, call: dict) -> dict:
        function = call.get("function") or {}
        return {"id": self.ids[i], "type": "function",
                "function": {"name": function.get("name", ""), "arguments": function.get("arguments", "")}}

    def _advance(self, message: dict, final: bool) -> List[dict]:
        """The deltas from the last parse to message; message becomes the last parse."""
        old, out = self.message, []
        for key in ("reasoning_content", "content"):
            before, now = old.get(key) or "", message.get(key) or ""
            if len(now) > len(before) and now.startswith(before):  # a parse never takes back text it gave
                out.append(self._inline(key, now[len(before):]))
        self._name(message)
        old_calls, calls = old.get("tool_calls") or [], message.get("tool_calls") or []
        for i, call in enumerate(calls):
            args = (call.get("function") or {}).get("arguments", "")
            if i >= self.announced:
                if not (args or final) or i > self.announced:
                    break  # its name may still be growing; later calls wait for it
                out.append({"tool_calls": [dict(self._call(i, call), index=i)]})
                self.announced += 1
                continue
            before = ((old_calls[i].get("function") or {}).get("arguments", "")) if i < len(old_calls) else ""
            if len(args) > len(before) and args.startswith(before):
                out.append({"tool_calls": [{"index": i, "function": {"arguments": args[len(before):]}}]})
        self.message = message
        return out
