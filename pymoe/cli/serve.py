"""pymoe serve: an OpenAI-compatible HTTP server for one model (and its
draft, the MTP head or lookup drafts) for editors, agents and scripts that
speak that API. Needs the serve extra (pip install .[serve]: aiohttp).

Requests run one at a time, each keeping the part of the context it shares
with what the decoder holds (a rewind to it), or with an earlier context kept
in RAM (--cache-ram); a few more wait in a queue (a full queue is a 503).
Binds 127.0.0.1 unless --host says otherwise. Ctrl-C (or SIGTERM) stops it:
the running request is cancelled and the models are freed."""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import signal
import sys
from pathlib import Path

from ..sampling import SamplingParams
from ..chat_template import REASONING_FORMATS
from .common import (Parser, UsageError, add_generation_options, add_load_options, add_sampling_options, command,
                     load_models, number, open_decoder, sampling_options)

SHUTDOWN_SECONDS = 3.0  # how long Ctrl-C waits for open responses before cutting them
DEFAULT_CACHE_RAM = 2048  # MiB: a few long conversations of a 30B MoE (about 0.1 MiB of KV cache a token)


def build_parser() -> Parser:
    p = Parser(prog="pymoe serve", description="Serve a model over an OpenAI-compatible HTTP API "
               "(/v1/chat/completions, /v1/completions, /v1/models, /health), speculatively when a draft is "
               "given (-d). The sampling options are the defaults of requests that do not set them.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                   "only)")
    p.add_argument("--port", type=number(int, 0, 65535), default=8080, help="port (default 8080; 0: a free one)")
    p.add_argument("--api-key", default=os.environ.get("PYMOE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on every request but /health (default: $PYMOE_API_KEY, "
                   "which other users cannot read in the process list)")
    p.add_argument("--queue", type=number(int, 0, 1024), default=8,
                   help="requests that may wait behind the running one; more get a 503 (default 8)")
    p.add_argument("-a", "--alias", help="the model's name in the API (default: the file name)")
    p.add_argument("-cram", "--cache-ram", type=number(int, -1, 2**40), default=DEFAULT_CACHE_RAM, metavar="MiB",
                   help="RAM for the states of earlier conversations, so that coming back to one feeds only what "
                   f"is new (default {DEFAULT_CACHE_RAM}; 0: off; -1: no limit)")
    p.add_argument("--cors-origins", default="localhost", metavar="ORIGINS",
                   help="web pages (their Origin) that may call the API from a browser: localhost (default: pages "
                   "served from this machine), * (any page, llama-server's default), a comma-separated list, or '' "
                   "(none)")
    p.add_argument("--jinja", action=argparse.BooleanOptionalAction, default=True,
                   help="render chats with the model's Jinja chat template, which makes tool calls and the "
                   "separation of reasoning possible (default; --no-jinja: llama.cpp's built-in templates)")
    p.add_argument("--chat-template-file", metavar="FILE", help="a Jinja chat template to use instead of the "
                   "model's own")
    p.add_argument("--reasoning-format", choices=REASONING_FORMATS, default="auto",
                   help="where a reasoning model's thinking goes: auto or deepseek: message.reasoning_content; "
                   "deepseek-legacy: there too, but inline in <think> tags when streamed; none: left in the content "
                   "(default auto; a request's reasoning_format overrides it)")
    add_load_options(p)
    add_sampling_options(p)
    add_generation_options(p, n_predict=-1, stop=False)
    return p


def chat_template(args, model, err):
    """The Jinja chat template chats are rendered with (None: --no-jinja, or the model's own does not parse)."""
    from ..chat_template import ChatTemplate
    from .. import errors
    if args.chat_template_file and not args.jinja:
        raise UsageError("--chat-template-file is a Jinja template: drop --no-jinja")
    if not args.jinja:
        return None
    source = None
    if args.chat_template_file:
        try:
            source = Path(args.chat_template_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--chat-template-file: cannot read {args.chat_template_file}: {exc}")
        if not source.strip():
            raise UsageError(f"--chat-template-file: {args.chat_template_file} is empty")
    try:
        return ChatTemplate(model, source)
    except errors.PymoeError as exc:
        if source is not None:
            raise UsageError(f"--chat-template-file: {exc}")
        err.write(f"pymoe serve: warning: the model's chat template does not parse as Jinja ({exc}); chats use "
                  "llama.cpp's built-in templates, without tool calls\n")
        return None


def exposed(host: str) -> bool:
    """True unless host is a loopback address (or localhost)."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: it may resolve to anything


async def serve(api, host: str, port: int, err) -> None:
    from aiohttp import web
    runner = web.AppRunner(api.app(), handler_cancellation=True, shutdown_timeout=SHUTDOWN_SECONDS,
                           access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, shutdown_timeout=SHUTDOWN_SECONDS)
        try:
            await site.start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
        bound = runner.addresses[0][1]
        url = f"http://{host if ':' not in host else f'[{host}]'}:{bound}"
        err.write(f"pymoe serve: listening on {url} (OpenAI base_url {url}/v1, model {api.model_name!r}); "
                  "Ctrl-C stops\n")
        err.flush()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        err.write("pymoe serve: stopping\n")
    finally:
        await runner.cleanup()


def run(args, err=None) -> int:
    err = err or sys.stderr
    try:
        from .serve_api import Api
        from .serve_engine import Engine
    except ImportError as exc:
        raise UsageError(f"pymoe serve needs aiohttp ({exc.name} is missing): pip install '.[serve]' in pymoe's "
                         "source folder, or pip install aiohttp")
    if args.api_key is not None and not args.api_key:
        raise UsageError("--api-key must not be empty")
    if exposed(args.host):
        err.write(f"pymoe serve: warning: listening on {args.host}: anyone who can reach this machine can use the "
                  "model" + ("" if args.api_key else " (no --api-key)") + "; HTTP is not encrypted\n")
    target, draft, plan, load_seconds = load_models(args, with_draft=args.draft_max != 0)
    err.write(f"load {load_seconds:.2f} s, locked {target.load_report.locked_bytes / 2**20:,.0f} MiB"
              + (f"; plan: {plan.llama_flags()}" if plan else "") + "\n")
    template = chat_template(args, target, err)
    decoder = open_decoder(args, target, draft)
    engine = Engine(decoder, n_ctx=decoder.n_ctx, max_waiting=args.queue, feed_chunk=args.batch,
                    cache_bytes=None if args.cache_ram < 0 else args.cache_ram << 20, template=template)
    api = Api(engine, args.alias or Path(args.model).name, defaults=SamplingParams(**sampling_options(args)),
              seed=args.seed, max_tokens=args.n_predict, api_key=args.api_key, model_path=str(args.model),
              reasoning_format=args.reasoning_format, cors_origins=args.cors_origins)
    try:
        asyncio.run(serve(api, args.host, args.port, err))
    finally:
        engine.close()
        decoder.close()
        if template is not None:
            template.close()
        if draft is not None:
            draft.close()
        target.close()
    err.write(f"pymoe serve: stopped after {engine.served} requests\n")
    return 0


def main(argv=None) -> int:
    return command("serve", argv, build_parser(), run)
