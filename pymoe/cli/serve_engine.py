"""The server's engine: one decoder (a session or a speculative loop) that
runs requests one at a time on a worker thread. Each request keeps the part of
the context it shares with what the decoder holds (clients resend the whole
conversation; the decoder's tokens say what it holds), rewinding to it, so a
chat's next turn, or an edit of an earlier message, feeds only what changed.
A context a request would discard goes into a RAM cache of saved states
(serve_cache.py); a request that shares more with one of those than with the
context restores it, so switching between conversations feeds only what is new.

Everything that touches the decoder, and the tokenizing of requests, runs on
the worker thread, so the event loop never waits on the model and requests
never race (/tokenize and /detokenize use the model's text calls, which are
safe from any thread, on an executor thread).
The HTTP side hears from a request through its on_event callback."""
from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Union

from .. import errors
from ..decoder import Decoder
from ..sampling import SamplingParams
from ..chat_template import ChatTemplate
from ..grammar import Grammar
from ..text import TextStream
from .serve_reply import Reply
from .serve_cache import PromptCache, common_prefix

# a context is saved before a request discards at least this many of its tokens (fewer: feeding them again
# costs about what saving would)
SAVE_FROM = 32


def strict_call(rendered: dict) -> dict:
    """A tool call's grammar for tool_choice "required" without the free text that llama.cpp's grammar lets come
    before the call (its root's optional until-N rule): a small model otherwise writes text until max_tokens."""
    lines = rendered["grammar"].split("\n")
    lines = [re.sub(r" until-\d+\?(?= )", "", line) if line.startswith("root ::= ") else line for line in lines]
    return dict(rendered, grammar="\n".join(lines))


class QueueFull(Exception):
    """More requests are waiting than the server keeps: answer 503 at once."""


class BadRequest(Exception):
    """A request the model cannot serve (too long for the context, a token
    outside the vocabulary, no chat template): a 400 with this message."""


@dataclass
class Request:
    """What to generate. prompt is text, token ids, or chat messages (rendered
    with the model's chat template); max_tokens -1: until the context is full."""
    prompt: Union[str, Sequence[int], None] = None
    messages: Optional[List[dict]] = None
    # a chat for the model's Jinja template (pymoe_chat_render's request: messages, tools, ...), whose
    # reply is parsed into content, reasoning and tool calls; reasoning_format as llama-server's
    chat: Optional[dict] = None
    reasoning_format: str = "auto"
    streamed: bool = False
    rendered: Optional[dict] = None  # set by the worker: pymoe_chat_render's result for chat
    max_tokens: int = -1
    stop: Sequence[str] = ()
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: Optional[int] = None
    logprobs: Optional[int] = None  # report each token's log probability and this many alternatives
    # set by the client side to stop it (a disconnect); the worker checks it between tokens
    cancelled: threading.Event = field(default_factory=threading.Event)
    # events for the HTTP side, in order: ("start", None) once the prompt is in, ("text", str) for
    # each piece (of a chat: ("delta", dict), OpenAI's delta), with logprobs ("scores", [Scored]) for
    # the tokens generated since the last, before the piece they made, then ("done", Result) or
    # ("error", exception); None: not listened to
    on_event: Optional[Callable[[str, object], None]] = None

    def emit(self, kind: str, value=None) -> None:
        if self.on_event is not None:
            self.on_event(kind, value)


@dataclass
class Scored:
    """A generated token's log probability and the alternatives', with their bytes (the HTTP side writes
    them as each endpoint does)."""
    piece: bytes
    logprob: float
    top: List[tuple]  # (bytes, logprob), the most likely first


@dataclass
class Result:
    text: str
    finish_reason: str       # "stop" (end of generation or a stop string), "length", or "cancelled"
    prompt_tokens: int
    cached_tokens: int       # prompt tokens the context already held (not fed again)
    completion_tokens: int
    prefill_seconds: float
    decode_seconds: float
    drafted: int = 0         # speculative drafts during this request, and how many the target accepted
    accepted: int = 0
    message: Optional[dict] = None  # of a chat: the reply parsed (content, reasoning_content, tool_calls)

    def figures(self, source: Optional[str]) -> dict:
        """pymoe's own figures for a response."""
        return {"prompt_tokens_fed": self.prompt_tokens - self.cached_tokens,
                "prefill_tokens_per_s": round((self.prompt_tokens - self.cached_tokens) / self.prefill_seconds, 2)
                if self.prefill_seconds else 0.0,
                "decode_tokens_per_s": round(self.completion_tokens / self.decode_seconds, 2)
                if self.decode_seconds else 0.0,
                "draft_source": source, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance": round(self.accepted / self.drafted, 4) if self.drafted else None}


class Engine:
    """Runs Requests on one decoder, one at a time, at most max_waiting queued
    behind the running one (submit raises QueueFull beyond that). cache_bytes:
    the RAM cache of earlier contexts (0: none; None: no limit)."""

    def __init__(self, decoder: Decoder, *, n_ctx: int, max_waiting: int = 8, feed_chunk: int = 256,
                 cache_bytes: Optional[int] = 0, template: Optional[ChatTemplate] = None):
        self.decoder = decoder
        self.template = template  # the model's Jinja chat template (None: llama.cpp's built-in templates)
        self.constrains = decoder.takes_grammar  # sessions and speculative loops both do
        self.cache = PromptCache(cache_bytes, rewinds=not decoder.is_recurrent) if cache_bytes != 0 else None
        self.model = decoder.model
        self.n_ctx = n_ctx
        self.max_waiting = max_waiting
        self.feed_chunk = feed_chunk  # a prompt goes in in pieces of this size: a disconnect stops it between
        self.source = decoder.source
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pymoe-serve")
        self._lock = threading.Lock()
        self._active = 0    # queued + running
        self._closed = False
        self.served = 0

    @property
    def busy(self) -> int:
        return self._active

    def submit(self, request: Request):
        """Queue a request; returns a concurrent Future of its Result."""
        with self._lock:
            if self._closed:
                raise QueueFull("the server is shutting down")
            if self._active > self.max_waiting:
                raise QueueFull(f"{self._active - 1} requests are already waiting (--queue {self.max_waiting})")
            self._active += 1
        future = self._pool.submit(self._run, request)
        future.add_done_callback(self._finished)
        return future

    def _finished(self, _future) -> None:
        with self._lock:
            self._active -= 1

    def close(self) -> None:
        """Stop taking requests, let the running one see its cancel, and wait for the worker."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)

    # -- on the worker thread ---------------------------------------------
    def _run(self, request: Request) -> Optional[Result]:
        if request.cancelled.is_set():
            return None
        try:
            result = self._generate(request)
        except BadRequest as exc:
            request.emit("error", exc)
            return None
        except Exception as exc:  # a failed decode: the context's contents are unknown, start over next time
            self._start_over()
            request.emit("error", exc)
            return None
        self.served += 1
        request.emit("done", result)
        return result

    def _start_over(self) -> None:
        try:
            self.decoder.reset()
        except errors.PymoeError:
            pass  # the next request's feed will say what is wrong

    def _tokens(self, request: Request) -> List[int]:
        model = self.model
        try:
            if request.chat is not None:
                if request.chat["tool_choice"] == "required" and not self.constrains:
                    raise BadRequest("tool_choice \"required\" or a named function needs a constrained tool call, "
                                     "which this decoder cannot make")
                prompt, request.rendered = self.template.prompt(model, request.chat)
                return prompt.tokens(model)  # message text never becomes control tokens
            if request.messages is not None:
                return model.chat_tokenize(request.messages)  # message text never becomes control tokens
            if isinstance(request.prompt, str):
                return model.tokenize(request.prompt)
            tokens = [int(t) for t in request.prompt]
        except (errors.UnsupportedError, errors.InvalidArgumentError) as exc:  # no template; text not Unicode
            raise BadRequest(str(exc))
        bad = [t for t in tokens if not 0 <= t < model.info.n_vocab]
        if bad:
            raise BadRequest(f"token id {bad[0]} is outside the vocabulary (0..{model.info.n_vocab - 1})")
        return tokens

    def _keep(self, prompt: List[int]) -> int:
        """Bring the context to the longest prefix of prompt that it or a saved
        state holds (at least one prompt token is fed again, for its logits),
        saving the context first if that discards much of it; returns how many
        tokens stay."""
        d = self.decoder
        held = d.tokens
        keep = min(common_prefix(held, prompt), len(prompt) - 1)
        if len(held) - keep > d.rewind_limit:
            keep = 0
        if self.cache is not None:
            saved, restores = self.cache.best(prompt)
            if len(held) - keep >= SAVE_FROM and not self.cache.holds(held):
                self._save(held)
            if saved is not None and restores > keep:
                try:
                    d.load_state(saved.state)
                except errors.PymoeError:  # a state that does not load goes, and the request starts over
                    self.cache.drop(saved)
                    d.reset()
                    held, keep = [], 0
                else:
                    self.cache.used(saved)
                    held, keep = saved.tokens, restores
        drop = len(held) - keep
        if drop > 0:
            if keep > 0 and drop <= d.rewind_limit:
                d.rewind(drop)
            else:
                d.reset()
                keep = 0
        return keep

    def _save(self, held: List[int]) -> None:
        """The context into the cache, if its state fits there; the cache only saves time, so a state that
        cannot be saved (out of memory) is not saved, and the request goes on."""
        try:
            if self.cache.fits(self.decoder.state_size):
                self.cache.add(held, self.decoder.save_state())
        except (MemoryError, errors.PymoeError):
            pass

    def _generate(self, request: Request) -> Result:
        prompt = self._tokens(request)
        if not prompt:
            raise BadRequest("the prompt is empty")
        if len(prompt) >= self.n_ctx:
            raise BadRequest(f"the prompt is {len(prompt)} tokens; the context holds {self.n_ctx} (--ctx)")
        bias = request.sampling.logit_bias or {}
        outside = [t for t in bias if t >= self.model.info.n_vocab]
        if outside:
            raise BadRequest(f"logit_bias: token id {outside[0]} is outside the vocabulary "
                             f"(0..{self.model.info.n_vocab - 1})")
        grammar = self._grammar(request)
        try:
            return self._prefill_and_decode(request, prompt, grammar)
        finally:
            if grammar is not None:
                grammar.close()  # now, not when the collector gets to it

    def _prefill_and_decode(self, request: Request, prompt: List[int], grammar: Optional[Grammar]) -> Result:
        d = self.decoder
        t0 = time.perf_counter()
        keep = self._keep(prompt)
        d.set_sampling(request.sampling, request.seed)
        before = d.stats
        for i in range(keep, len(prompt), self.feed_chunk):
            if request.cancelled.is_set():
                return self._cancelled(prompt, keep, t0)
            d.feed(prompt[i:i + self.feed_chunk])
        t1 = time.perf_counter()
        request.emit("start")
        room = self.n_ctx - len(prompt)
        budget = room if request.max_tokens < 0 else min(request.max_tokens, room)
        text, reply = self._reply(request)
        options = {} if grammar is None else {"grammar": grammar}
        if request.logprobs is not None:
            options["logprobs"] = request.logprobs
        tokens = d.generate_tokens(None, max_tokens=budget, **options)
        try:
            return self._decode(request, tokens, text, reply, Result("", "length", len(prompt), keep, 0, t1 - t0, 0.0),
                                before)
        finally:
            if reply is not None:
                reply.parser.close()

    def _grammar(self, request: Request) -> Optional[Grammar]:
        """The request's response format or grammar, else the grammar of a chat's tool call, made before the
        prompt goes in: one that does not parse, or that this model's tokenizer cannot follow, is a 400 that
        costs nothing. Not for a reasoning model's auto tool calls (its lazy grammar would also fire on a call
        written while thinking)."""
        if not self.constrains:
            return None
        rendered = request.rendered
        try:
            if rendered is not None and rendered["grammar"] and request.chat.get("json_schema") is not None:
                return Grammar(self.model, rendered)  # the template's grammar for the schema (after any thinking)
            grammar = request.sampling.constraint(self.model)
        except errors.InvalidArgumentError as exc:
            raise BadRequest(str(exc))
        if grammar is not None or rendered is None or not rendered["grammar"]:
            return grammar
        required = request.chat["tool_choice"] == "required"
        if rendered["supports_thinking"] and not required:
            return None
        try:
            return Grammar(self.model, strict_call(rendered) if required else rendered)
        except errors.InvalidArgumentError as exc:
            raise BadRequest(f"the tool call's grammar: {exc}")

    def _reply(self, request: Request) -> tuple:
        """(TextStream, Reply or None) of a request: a chat through the Jinja template is parsed as it grows."""
        rendered = request.rendered
        if rendered is None:
            return TextStream(self.model, request.stop), None
        chat = request.chat
        reply = Reply(self.template.parser(rendered), request.streamed,
                      single_call=bool(chat.get("tools")) and not chat.get("parallel_tool_calls", True),
                      think_inline=request.reasoning_format == "deepseek-legacy")
        text = TextStream(self.model, list(request.stop) + rendered["additional_stops"],
                          render_special=bool(rendered["preserved_tokens"]))
        return text, reply

    def _decode(self, request: Request, tokens, text: TextStream, reply: Optional[Reply], result: Result,
                before) -> Result:
        """Generate from tokens into result (whose prompt figures are set), emitting the text as it comes."""
        d = self.decoder
        t1 = time.perf_counter()
        n = 0
        finish = "length"
        scored: List[Scored] = []
        for token in tokens:
            n += 1
            piece = text.add(token)
            if request.logprobs is not None:
                scored.append(self._scored(token, d.scores))
            if piece:
                if scored:
                    request.emit("scores", scored)
                    scored = []
                self._emit(request, reply, piece)
            if text.stopped or (reply is not None and reply.over):
                break
            if request.cancelled.is_set():
                finish = "cancelled"
                break
        if text.stopped or d.stop_reason == "eog" or (reply is not None and reply.over):
            finish = "stop"
        tail = text.finish()
        if scored:
            request.emit("scores", scored)
        if tail and finish != "cancelled":
            self._emit(request, reply, tail)
        result.text, result.finish_reason, result.completion_tokens = text.text, finish, n
        result.decode_seconds = time.perf_counter() - t1
        if reply is not None:
            result.message, deltas = reply.end(complete=finish == "stop")
            for delta in deltas:
                request.emit("delta", delta)
            if result.message.get("tool_calls") and finish == "stop":
                result.finish_reason = "tool_calls"
        if before is not None:
            after = d.stats
            result.drafted, result.accepted = after.drafted - before.drafted, after.accepted - before.accepted
        return result

    def _scored(self, token: int, scores) -> Scored:
        piece = self.model.token_piece
        return Scored(piece(token, render_special=True), scores.logprob,
                      [(piece(t, render_special=True), logprob) for t, logprob in scores.top])

    @staticmethod
    def _emit(request: Request, reply: Optional[Reply], piece: str) -> None:
        if reply is None:
            request.emit("text", piece)
            return
        for delta in reply.add(piece):
            request.emit("delta", delta)

    def _cancelled(self, prompt, keep, t0) -> Result:
        return Result("", "cancelled", len(prompt), keep, 0, time.perf_counter() - t0, 0.0)

