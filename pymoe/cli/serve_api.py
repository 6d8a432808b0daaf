"""The OpenAI-compatible HTTP API of `pymoe serve`, on aiohttp:
/v1/chat/completions, /v1/completions (streamed as server-sent events or
not), /v1/models, /health, and what clients probe: /tokenize, /detokenize
and /props. A request body becomes an engine Request here;
what pymoe cannot do (n > 1, echo, audio, ...) is a 400 that says so."""
from __future__ import annotations

import asyncio
import codecs
import hmac
import json
import math
import time
import uuid
from typing import Optional

from aiohttp import web

import pymoe

from .. import errors
from ..chat_template import REASONING_FORMATS
from ..decoder import MAX_TOP_LOGPROBS
from ..sampling import SamplingParams
from .serve_engine import BadRequest, Engine, QueueFull, Request, Result

MAX_STOPS = 16
INT32_MAX = 2**31 - 1
MAX_BODY = 16 * 2**20  # bytes of JSON a request may send
# fields the OpenAI API has and pymoe does not do: a request that asks for them gets a 400, not silence
UNSUPPORTED = {"functions": "function calls (send tools)", "function_call": "function calls (send tool_choice)",
               "echo": "echo", "suffix": "suffix (insertion)", "audio": "audio", "modalities": "modalities",
               "prediction": "predicted outputs"}


def _piece(data: bytes):
    """A token's bytes for JSON: its text, or the byte values of a piece that is part of a UTF-8 sequence."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return list(data)


def _token_text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")  # a piece of a UTF-8 sequence: its bytes say what it is


def _json_logprob(value: float) -> float:
    return max(value, -9999.0)  # JSON has no -inf (a token the model rules out); OpenAI writes -9999 for it


class LogprobsWriter:
    """Scored tokens as an endpoint reports them: a chat's {"content": [...]} (token, logprob, bytes,
    top_logprobs), a completion's tokens, token_logprobs, top_logprobs and text_offset (in the generated
    text, counted on across a stream's chunks)."""

    def __init__(self, chat: bool):
        self.chat = chat
        self.offset = 0  # characters of the generated text so far
        self.text = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character split over tokens: one

    def write(self, scored: list) -> dict:
        if self.chat:
            return {"content": [
                {"token": _token_text(s.piece), "logprob": _json_logprob(s.logprob), "bytes": list(s.piece),
                 "top_logprobs": [{"token": _token_text(b), "logprob": _json_logprob(lp), "bytes": list(b)}
                                  for b, lp in s.top]} for s in scored]}
        tokens, offsets, tops = [], [], []
        for s in scored:
            tokens.append(_token_text(s.piece))
            offsets.append(self.offset)
            self.offset += len(self.text.decode(s.piece))
            top: dict = {}
            for b, lp in s.top:  # two tokens with one text (pieces of characters): the likelier one's
                top.setdefault(_token_text(b), _json_logprob(lp))
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": [_json_logprob(s.logprob) for s in scored],
                "top_logprobs": tops, "text_offset": offsets}


def error(status: int, message: str, kind: str = "invalid_request_error", param: Optional[str] = None):
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return web.json_response(body, status=status)


class Invalid(Exception):
    def __init__(self, message: str, param: Optional[str] = None):
        super().__init__(message)
        self.param = param


def _number(body: dict, name: str, default, lo=None, hi=None, integer=False, lo_open=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or (
            isinstance(value, float) and not math.isfinite(value)):  # Python's JSON reader takes NaN and Infinity
        raise Invalid(f"{name} must be {'an integer' if integer else 'a finite number'}, got {json.dumps(value)}",
                      name)
    if lo is not None and (value <= lo if lo_open else value < lo) or hi is not None and value > hi:
        raise Invalid(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}], "
                      f"got {value}", name)
    return value


def _unsupported(body: dict) -> None:
    for name, what in UNSUPPORTED.items():
        value = body.get(name)
        if value in (None, False, 0, {}, []) or (name == "tool_choice" and value == "none"):
            continue
        raise Invalid(f"{name}: pymoe serve does not support {what}", name)
    if _number(body, "n", 1, integer=True) != 1:
        raise Invalid("n must be 1: pymoe serve generates one choice per request", "n")
    if _number(body, "best_of", 1, integer=True) != 1:
        raise Invalid("best_of must be 1", "best_of")


def _constraint(body: dict) -> dict:
    """SamplingParams' grammar or json_schema from OpenAI's response_format ({"type": "json_object"} is any JSON
    object; "json_schema" takes {"json_schema": {"schema": ...}}, strict or not: the output always follows it)
    or llama-server's grammar (GBNF) and json_schema fields; one at most."""
    found = {}
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            found["json_schema"] = fmt.get("schema", {"type": "object"})
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
                raise Invalid("response_format.json_schema must be {\"name\": ..., \"schema\": {...}}",
                              "response_format")
            found["json_schema"] = spec.get("schema", {})
        elif kind != "text":
            raise Invalid("response_format.type must be text, json_object or json_schema", "response_format")
    for name in ("grammar", "json_schema"):
        if body.get(name) is not None:
            found[name] = body[name]
    if len(found) > 1 or (fmt is not None and "json_schema" in body and body["json_schema"] is not None):
        raise Invalid("give one constraint: response_format, grammar or json_schema", "response_format")
    if "grammar" in found and not isinstance(found["grammar"], str):
        raise Invalid("grammar must be GBNF text", "grammar")
    return found


def _logprobs(body: dict, chat: bool) -> Optional[int]:
    """How many alternatives per token to report (None: no logprobs). A chat asks with logprobs: true and
    top_logprobs: n; a completion with logprobs: n."""
    if chat:
        asked = body.get("logprobs")
        if asked is not None and not isinstance(asked, bool):
            raise Invalid("logprobs must be true or false", "logprobs")
        top = _number(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
        if top is not None and not asked:
            raise Invalid("top_logprobs needs logprobs: true", "top_logprobs")
        return (top or 0) if asked else None
    return None if body.get("logprobs") is False else _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS,
                                                               integer=True)


def _logit_bias(body: dict, defaults: Optional[dict]) -> Optional[dict]:
    """OpenAI's {"token id": bias} (bias in [-100, 100]), or llama-server's [[id, bias], ...]; a bias of false
    bans the token. The vocabulary is checked by the engine."""
    given = body.get("logit_bias")
    if given is None:
        return defaults
    pairs = given.items() if isinstance(given, dict) else given if isinstance(given, list) else None
    out = {}
    for pair in pairs if pairs is not None else [None]:
        key, value = pair if isinstance(pair, (tuple, list)) and len(pair) == 2 else (None, None)
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdecimal() and len(key) < 11 else \
            key if isinstance(key, int) and not isinstance(key, bool) else None
        if value is False:
            value = float("-inf")
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            value = None
        if token is None or not 0 <= token < 2**31 or value is None:
            raise Invalid("logit_bias must map token ids to a bias in [-100, 100] (or false: never), as "
                          "{\"15043\": -100} or [[15043, -100]]", "logit_bias")
        out[token] = float(value)
    return out or None


def _content(message: dict, i: int) -> str:
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise Invalid(f"messages[{i}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise Invalid(f"messages[{i}].content must be a string or a list of text parts", "messages")


def _tool_calls(calls, i: int) -> list:
    """An assistant message's tool_calls, checked; arguments given as an object become its JSON text."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise Invalid(f"{where} must be a list", "messages")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise Invalid(f"{where}[{j}] must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                          "\"arguments\": ...}}", "messages")
        args = function.get("arguments", "")
        if not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        one = {"type": "function", "function": {"name": function["name"], "arguments": args}}
        if isinstance(call.get("id"), str):
            one["id"] = call["id"]
        out.append(one)
    return out


def _chat_messages(body: dict) -> list:
    """The messages for the model's Jinja template: every role OpenAI has, tool calls and results kept."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Invalid("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
            raise Invalid(f"messages[{i}] must be an object whose role is system, developer, user, assistant or "
                          "tool", "messages")
        one = {"role": "system" if m["role"] == "developer" else m["role"]}
        if m["role"] == "assistant" and m.get("content") is None and m.get("tool_calls"):
            one["content"] = None
        else:
            one["content"] = _content(m, i)
        if m["role"] == "assistant" and m.get("tool_calls"):
            one["tool_calls"] = _tool_calls(m["tool_calls"], i)
        if m["role"] == "assistant" and isinstance(m.get("reasoning_content"), str):
            one["reasoning_content"] = m["reasoning_content"]
        if m["role"] == "tool":
            if not isinstance(m.get("tool_call_id", ""), str):
                raise Invalid(f"messages[{i}].tool_call_id must be a string", "messages")
            if m.get("tool_call_id"):
                one["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str) and m["role"] in ("tool", "user"):
            one["name"] = m["name"]
        out.append(one)
    return out


def _tools(body: dict) -> tuple:
    """(tools, tool_choice) for the template: a named function is "required" with only that tool."""
    tools = body.get("tools") or []
    if not isinstance(tools, list) or not all(
            isinstance(t, dict) and t.get("type", "function") == "function" and isinstance(t.get("function"), dict)
            and isinstance(t["function"].get("name"), str) for t in tools):
        raise Invalid("tools must be a list of {\"type\": \"function\", \"function\": {\"name\": ..., "
                      "\"parameters\": ...}}", "tools")
    choice = body.get("tool_choice")
    choice = "auto" if choice is None else choice
    if isinstance(choice, dict):
        function = choice.get("function") if choice.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        named = [t for t in tools if t["function"]["name"] == name]
        if not named:
            raise Invalid("tool_choice names a function that tools does not have"
                          if isinstance(name, str) else "tool_choice must be \"auto\", \"none\", \"required\" "
                          "or {\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
        return named[:1], "required"
    if choice not in ("auto", "none", "required"):
        raise Invalid("tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                      "\"function\": {\"name\": ...}}", "tool_choice")
    if choice == "required" and not tools:
        raise Invalid("tool_choice \"required\" needs tools", "tool_choice")
    return tools, choice


def _chat(body: dict, caps: dict) -> dict:
    """pymoe_chat_render's request from a chat body."""
    tools, choice = _tools(body)
    parallel = body.get("parallel_tool_calls", bool(caps.get("supports_parallel_tool_calls")))
    kwargs = body.get("chat_template_kwargs")
    kwargs = {} if kwargs is None else kwargs
    if not isinstance(parallel, bool):
        raise Invalid("parallel_tool_calls must be true or false", "parallel_tool_calls")
    if not isinstance(kwargs, dict):
        raise Invalid("chat_template_kwargs must be an object", "chat_template_kwargs")
    generation_prompt = body.get("add_generation_prompt", True)
    if not isinstance(generation_prompt, bool):
        raise Invalid("add_generation_prompt must be true or false", "add_generation_prompt")
    chat = {"messages": _chat_messages(body), "tools": tools, "tool_choice": choice,
            "parallel_tool_calls": parallel, "chat_template_kwargs": dict(kwargs),
            "add_generation_prompt": generation_prompt}
    thinking = kwargs.get("enable_thinking", True)
    if not isinstance(thinking, bool):
        raise Invalid("chat_template_kwargs.enable_thinking must be true or false", "chat_template_kwargs")
    effort = body.get("reasoning_effort")
    if effort is not None and not isinstance(effort, str):
        raise Invalid("reasoning_effort must be a string", "reasoning_effort")
    if effort == "none":
        thinking = False
    elif effort:
        chat["chat_template_kwargs"]["reasoning_effort"] = effort
    chat["enable_thinking"] = thinking
    return chat


def _messages(body: dict) -> list:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise Invalid("messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise Invalid(f"messages[{i}] must be an object whose role is system, developer, user or assistant "
                          "(tool messages are not supported)", "messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": _content(m, i)})
    return out


def _prompt(body: dict):
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a list, as the client sends it
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    raise Invalid("prompt must be a string, or a list of token ids (one prompt per request)", "prompt")


def parse_request(body, defaults: SamplingParams, max_tokens_default: int, chat: bool,
                  seed_default: Optional[int] = None, template_caps: Optional[dict] = None,
                  reasoning_format: str = "auto") -> tuple:
    """(Request, stream, include_usage) from a JSON body; Invalid says what is wrong."""
    if not isinstance(body, dict):
        raise Invalid("the body must be a JSON object")
    _unsupported(body)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
        raise Invalid(f"stop must be a string or a list of at most {MAX_STOPS} strings", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise Invalid("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise Invalid("stream_options must be an object", "stream_options")
    constraint = _constraint(body)
    if constraint and body.get("tools") and body.get("tool_choice", "auto") != "none":
        raise Invalid("a response format or grammar with tools: pymoe serve constrains one of them at a time "
                      "(send tool_choice \"none\", or no tools)", "response_format")
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": limit}, "max_tokens", max_tokens_default, -1, integer=True)
    numbers = dict(temperature=float(_number(body, "temperature", defaults.temperature, 0, 2)),
                   top_k=_number(body, "top_k", defaults.top_k, 0, INT32_MAX, integer=True),
                   top_p=float(_number(body, "top_p", defaults.top_p, 0, 1, lo_open=True)),
                   min_p=float(_number(body, "min_p", defaults.min_p, 0, 1)),
                   presence_penalty=float(_number(body, "presence_penalty", defaults.presence_penalty, -2, 2)),
                   frequency_penalty=float(_number(body, "frequency_penalty", defaults.frequency_penalty, -2, 2)),
                   repeat_penalty=float(_number(body, "repeat_penalty", defaults.repeat_penalty, 0, 10,
                                                lo_open=True)),
                   repeat_last_n=_number(body, "repeat_last_n", defaults.repeat_last_n, -1, INT32_MAX, integer=True),
                   logit_bias=_logit_bias(body, defaults.logit_bias))
    try:
        sampling = SamplingParams(**numbers, **constraint)
    except errors.InvalidArgumentError as exc:  # a schema that is not JSON, not an object
        raise Invalid(str(exc), "response_format" if "response_format" in body else
                      next(iter(constraint)) if constraint else None)
    seed = _number(body, "seed", seed_default, -(2**63), 2**64 - 1, integer=True)
    request = Request(max_tokens=max_tokens, stop=stops, sampling=sampling,
                      seed=None if seed is None else seed % 2**64, logprobs=_logprobs(body, chat))
    if chat and template_caps is not None:
        request.chat = _chat(body, template_caps)
        request.streamed = stream
        request.reasoning_format = body.get("reasoning_format", reasoning_format)
        if request.reasoning_format not in REASONING_FORMATS:
            raise Invalid(f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}", "reasoning_format")
        request.chat["reasoning_format"] = request.reasoning_format
        if sampling.json_schema is not None:  # the template's response format: thinking first, where it thinks
            request.chat["json_schema"] = sampling.json_schema
    else:
        for name in ("tools", "tool_choice"):
            if body.get(name) not in (None, [], "none", "auto"):
                raise Invalid(f"{name}: tool calls need /v1/chat/completions and the model's Jinja chat template "
                              "(pymoe serve without --no-jinja)" if chat else
                              f"{name}: tool calls need /v1/chat/completions", name)
    if chat and template_caps is None:
        request.messages = _messages(body)
    elif not chat:
        request.prompt = _prompt(body)
    return request, stream, bool(options.get("include_usage"))


def event_queue(loop: asyncio.AbstractEventLoop):
    """(queue, on_event): on_event, called on the worker thread, puts (kind, value) on an asyncio queue."""
    queue: asyncio.Queue = asyncio.Queue()

    def on_event(kind, value):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop has closed (shutdown): nobody is listening
            pass
    return queue, on_event


class Api:
    """The routes, over one Engine."""

    def __init__(self, engine: Engine, model_name: str, *, defaults: SamplingParams, max_tokens: int,
                 seed: Optional[int] = None, api_key: Optional[str] = None, model_path: str = "",
                 reasoning_format: str = "auto", cors_origins: str = "localhost"):
        self.engine = engine
        self.cors_origins = cors_origins  # "*", "localhost", "" (none) or a comma-separated list of origins
        self.reasoning_format = reasoning_format  # of requests that do not say (llama-server's --reasoning-format)
        self.template_caps = engine.template.caps if engine.template is not None else None
        self.model_path = model_path
        self.seed = seed  # for requests that give none (None: a random one each)
        self.model_name = model_name
        self.defaults = defaults
        self.max_tokens = max_tokens
        self.api_key = api_key
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._cors_preflight, self._auth], client_max_size=MAX_BODY)
        app.on_response_prepare.append(self._cors_headers)
        app.router.add_get("/health", self.health)
        for prefix in ("/v1", ""):  # without /v1 too, as llama-server has them (its bare /completions is its own API)
            app.router.add_get(f"{prefix}/models", self.models)
            app.router.add_post(f"{prefix}/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/props", self.props)
        app.router.add_post("/apply-template", self.apply_template)
        return app

    def _allowed_origin(self, origin: Optional[str]) -> Optional[str]:
        """The Origin a browser page may read answers from (reflected), or None."""
        if not origin or not self.cors_origins:
            return None
        if self.cors_origins == "*":
            return origin
        if self.cors_origins == "localhost":
            from urllib.parse import urlsplit
            try:
                parts = urlsplit(origin)
                host = parts.hostname
            except ValueError:
                return None
            return origin if parts.scheme in ("http", "https") and host in ("localhost", "127.0.0.1", "::1") else None
        return origin if origin in (o.strip() for o in self.cors_origins.split(",")) else None

    @web.middleware
    async def _cors_preflight(self, request: web.Request, handler):
        """A browser's preflight (OPTIONS, no API key): 200, with the CORS headers where the origin is allowed."""
        if request.method != "OPTIONS":
            return await handler(request)
        response = web.Response(status=200)
        if self._allowed_origin(request.headers.get("Origin")):
            # the headers asked for, named: a "*" does not cover Authorization (an API key) in browsers
            response.headers.update({"Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                                     "Access-Control-Allow-Headers":
                                         request.headers.get("Access-Control-Request-Headers", "Content-Type")})
        return response

    async def _cors_headers(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = self._allowed_origin(request.headers.get("Origin"))
        if origin:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers.setdefault("Vary", "Origin")

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self.api_key and request.path != "/health":
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return error(401, "a valid API key is needed: Authorization: Bearer <key>", "authentication_error")
        try:
            return await handler(request)
        except web.HTTPException as exc:  # aiohttp's own (404, 405, 413): as OpenAI-style JSON errors
            if exc.status < 400:
                raise
            return error(exc.status, exc.reason)

    async def health(self, request: web.Request):
        return web.json_response({"status": "ok", "busy": self.engine.busy})

    async def models(self, request: web.Request):
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "pymoe",
             "draft_source": self.engine.source, "n_ctx": self.engine.n_ctx}]})

    async def props(self, request: web.Request):
        """What llama-server's /props says that pymoe has: clients read the context size and the model here."""
        engine = self.engine
        cache = engine.cache
        return web.json_response({
            "model_alias": self.model_name, "model_path": self.model_path, "total_slots": 1,
            "default_generation_settings": {"n_ctx": engine.n_ctx, "params": {
                "temperature": self.defaults.temperature, "top_k": self.defaults.top_k, "top_p": self.defaults.top_p,
                "min_p": self.defaults.min_p, "repeat_penalty": self.defaults.repeat_penalty,
                "repeat_last_n": self.defaults.repeat_last_n, "presence_penalty": self.defaults.presence_penalty,
                "frequency_penalty": self.defaults.frequency_penalty, "n_predict": self.max_tokens, "seed": self.seed}},
            "draft_source": engine.source, "modalities": {"vision": False, "audio": False},
            "chat_template": (self.template_caps or {}).get("source", ""),
            "chat_template_caps": {k: v for k, v in (self.template_caps or {}).items() if k != "source"},
            "build_info": f"pymoe {pymoe.__version__}",
            "cache_ram": {"enabled": cache is not None, "limit_bytes": None if cache is None else cache.limit,
                          "states": len(cache or ()),
                          "bytes": 0 if cache is None else cache.bytes}})

    async def apply_template(self, request: web.Request):
        """llama-server's /apply-template: the prompt a chat request becomes, not generated from."""
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        template = self.engine.template
        if template is None:
            return error(400, "no Jinja chat template (pymoe serve --no-jinja)")
        try:
            chat = _chat(body, self.template_caps)
            chat["reasoning_format"] = body.get("reasoning_format", self.reasoning_format)
            rendered = await asyncio.get_running_loop().run_in_executor(None, template.render, chat)
        except Invalid as exc:
            return error(400, str(exc), param=exc.param)
        except errors.PymoeError as exc:  # the template raised, or a message it cannot take
            return error(400, str(exc), param="messages")
        return web.json_response({"prompt": rendered["prompt"]})

    async def tokenize(self, request: web.Request):
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        content, add_special = body.get("content"), body.get("add_special", False)
        if not isinstance(content, str):
            return error(400, "content must be a string", param="content")
        if not isinstance(add_special, bool) or not isinstance(body.get("with_pieces", False), bool):
            return error(400, "add_special and with_pieces must be true or false")
        model = self.engine.model
        loop = asyncio.get_running_loop()
        try:
            tokens = await loop.run_in_executor(None, lambda: model.tokenize(content, add_special=add_special,
                                                                             parse_special=True))
        except errors.InvalidArgumentError as exc:  # text that is not Unicode (a lone surrogate)
            return error(400, f"content: {exc}", param="content")
        if not body.get("with_pieces"):
            return web.json_response({"tokens": tokens})
        pieces = await loop.run_in_executor(None, lambda: [model.token_piece(t, render_special=True) for t in tokens])
        return web.json_response({"tokens": [{"id": t, "piece": _piece(p)}
                                             for t, p in zip(tokens, pieces)]})

    async def detokenize(self, request: web.Request):
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        tokens = body.get("tokens")
        n_vocab = self.engine.model.info.n_vocab
        if not isinstance(tokens, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < n_vocab for t in tokens):
            return error(400, f"tokens must be a list of token ids in [0, {n_vocab})", param="tokens")
        model = self.engine.model
        text = await asyncio.get_running_loop().run_in_executor(
            None, lambda: model.detokenize(tokens, render_special=True))
        return web.json_response({"content": text})

    async def _body(self, http: web.Request):
        """The request's JSON object, or the 400 saying why not."""
        try:
            body = await http.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error(400, f"the body is not valid JSON: {exc}")
        except RecursionError:
            return error(400, "the body is not valid JSON: nested too deeply")
        if not isinstance(body, dict):
            return error(400, "the body must be a JSON object")
        return body

    async def chat(self, request: web.Request):
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request):
        return await self._complete(request, chat=False)

    async def _complete(self, http: web.Request, chat: bool):
        body = await self._body(http)
        if isinstance(body, web.Response):
            return body
        try:
            req, stream, include_usage = parse_request(body, self.defaults, self.max_tokens, chat, self.seed,
                                                       self.template_caps, self.reasoning_format)
        except Invalid as exc:
            return error(400, str(exc), param=exc.param)
        events, req.on_event = event_queue(asyncio.get_running_loop())
        try:
            self.engine.submit(req)
        except QueueFull as exc:
            return error(503, f"the server is busy: {exc}; try again later", "server_error")
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        try:
            kind, value = await self._next(http, req, events)  # "start" once the prompt is in, or an error
            if kind == "error":
                return self._failure(value)
            if kind == "done":  # cancelled before it started
                return web.json_response(self._whole(ident, chat, "", value,
                                                     LogprobsWriter(chat).write([]) if req.logprobs is not None
                                                     else None))
            if stream:
                return await self._stream(http, req, events, ident, chat, include_usage)
            text, scored = [], []
            while True:
                kind, value = await self._next(http, req, events)
                if kind in ("text", "delta"):  # a chat's whole reply is its parsed message, in the Result
                    text.append(value if kind == "text" else "")
                elif kind == "scores":
                    scored.extend(value)
                elif kind == "error":
                    return self._failure(value)
                else:
                    logprobs = LogprobsWriter(chat).write(scored) if req.logprobs is not None else None
                    return web.json_response(self._whole(ident, chat, "".join(text), value, logprobs))
        finally:
            req.cancelled.set()  # a disconnect, a shutdown or the end: the worker stops or has stopped

    async def _next(self, http: web.Request, req: Request, events: asyncio.Queue):
        """The next event, watching the client: one that hung up cancels its request."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if http.transport is None or http.transport.is_closing():
                    req.cancelled.set()
                    raise asyncio.CancelledError

    def _failure(self, exc: Exception):
        if isinstance(exc, BadRequest):
            return error(400, str(exc))
        return error(500, f"generation failed: {exc}", "server_error")

    def _usage(self, r: Result) -> dict:
        return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
                "total_tokens": r.prompt_tokens + r.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": r.cached_tokens},
                "pymoe": r.figures(self.engine.source)}

    def _whole(self, ident: str, chat: bool, text: str, r: Result, logprobs: Optional[dict] = None) -> dict:
        message = r.message or {"role": "assistant", "content": text}
        choice = ({"index": 0, "message": message, "logprobs": logprobs, "finish_reason": r.finish_reason} if chat
                  else {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": r.finish_reason})
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": [choice], "usage": self._usage(r)}

    def _chunk(self, ident: str, chat: bool, text, finish: Optional[str], first=False,
               logprobs: Optional[dict] = None) -> dict:
        """A stream chunk: text (None: none), or of a chat a delta dict; logprobs: of the tokens it carries."""
        if chat:
            delta = dict(text) if isinstance(text, dict) else {} if text is None else {"content": text}
            if first:
                delta["role"] = "assistant"
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        return {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": [choice]}

    async def _stream(self, http, req, events, ident, chat, include_usage):
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(http)

        async def send(obj):
            await response.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

        writer = LogprobsWriter(chat) if req.logprobs is not None else None
        scored: list = []  # scored tokens the next chunk carries

        def logprobs():  # None in a chunk that carries no token
            out = writer.write(scored) if writer is not None and scored else None
            scored.clear()
            return out

        try:
            if chat:  # the role first, without content (a content delta is never empty)
                await send(self._chunk(ident, chat, None, None, first=True))
            while True:
                kind, value = await self._next(http, req, events)
                if kind in ("text", "delta"):
                    await send(self._chunk(ident, chat, value, None, logprobs=logprobs()))
                elif kind == "scores":
                    scored.extend(value)
                elif kind == "error":  # the headers are gone: the error travels as an event
                    await send({"error": {"message": f"generation failed: {value}", "type": "server_error"}})
                    break
                else:
                    last = self._chunk(ident, chat, None, value.finish_reason, logprobs=logprobs())
                    last["pymoe"] = value.figures(self.engine.source)
                    await send(last)
                    if include_usage:
                        await send({"id": ident, "object": last["object"], "created": last["created"],
                                    "model": self.model_name, "choices": [], "usage": self._usage(value)})
                    break
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            req.cancelled.set()
            raise
        return response
