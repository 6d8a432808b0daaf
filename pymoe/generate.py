"""pymoe generate: text from a target model, with a draft if one is given.

Streams the text to stdout as it is generated, then prints the stats on
stderr (or, with --json, one JSON object on stdout instead). Bad input is one
line on stderr and exit code 2; Ctrl-C stops cleanly with the partial stats and
exit code 130.
"""
from __future__ import annotations

import argparse
import codecs
import json
import sys
import time
import warnings
from pathlib import Path
from typing import List

from . import errors
from .model import Model
from .plan import parse_size, plan
from .sampling import SamplingParams
from .session import FLASH_ATTN
from .speculative import MAX_DRAFT, ROLLBACK, Speculative, default_snapshots

LOAD_MODES = ("auto", "mmap", "no-mmap", "mlock")


class UsageError(Exception):
    """Bad input: one line, exit code 2."""


def _number(kind, lo=None, hi=None, lo_open=False):
    """An argparse type: kind within [lo, hi] (lo excluded when lo_open), with a message saying what is allowed."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if lo is not None and (value <= lo if lo_open else value < lo) or hi is not None and value > hi:
            span = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise argparse.ArgumentTypeError(f"{text} is outside {span}")
        return value
    return parse


def _draft_max(text):
    if text == "auto":
        return text
    return _number(int, 0, MAX_DRAFT)(text)


def _size_or_auto(text):
    if text == "auto":
        return text
    try:
        parse_size(text)
    except errors.PymoeError as exc:
        raise argparse.ArgumentTypeError(str(exc))
    return text


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage)
        raise UsageError(message)


def add_load_options(p: argparse.ArgumentParser) -> None:
    """The models, where they go, and the session: shared by generate, chat and bench."""
    p.add_argument("-m", "--model", required=True, help="target GGUF")
    p.add_argument("-d", "--draft", help="draft GGUF (same vocabulary)")
    p.add_argument("--load", choices=LOAD_MODES, default="auto", help="load mode (default auto)")
    p.add_argument("--vram", type=_size_or_auto, help="plan the placement for this VRAM budget (8GiB, auto)")
    p.add_argument("--n-cpu-moe", type=_number(int, 0), default=0, help="keep the experts of the first N layers in RAM")
    p.add_argument("--ngl", type=_number(int, -1), default=-1, help="target layers on the GPU (-1 = all)")
    p.add_argument("--rpc", help="rpc-server endpoints HOST:PORT,... as extra devices")
    p.add_argument("--ctx", type=_number(int, 1), default=4096, help="context size (default 4096)")
    p.add_argument("--batch", type=_number(int, 1), default=512)
    p.add_argument("--ubatch", type=_number(int, 1), default=512)
    p.add_argument("--threads", type=_number(int, 0), default=0, help="0 = all CPUs")
    p.add_argument("--flash-attn", choices=sorted(FLASH_ATTN), default="auto")
    p.add_argument("--cache-type-k", default=None, help="K cache type (f16, q8_0, ...)")
    p.add_argument("--cache-type-v", default=None, help="V cache type (quantized needs --flash-attn on)")
    p.add_argument("--verbose", action="store_true", help="show llama.cpp's log on stderr")


def add_sampling_options(p: argparse.ArgumentParser, temp: float = 0.8) -> None:
    p.add_argument("--temp", type=_number(float, 0), default=temp, help=f"temperature, 0 = greedy (default {temp})")
    p.add_argument("--top-k", type=_number(int, 0), default=40, help="0 = off (default 40)")
    p.add_argument("--top-p", type=_number(float, 0, 1, lo_open=True), default=0.95, help="(0, 1] (default 0.95)")
    p.add_argument("--min-p", type=_number(float, 0, 1), default=0.05, help="[0, 1] (default 0.05)")
    p.add_argument("--seed", type=_number(int, 0, 2**64 - 1), default=None)
    p.add_argument("--p-min", type=_number(float, 0, 1), default=0.0,
                   help="stop drafting below this draft probability (default 0)")
    p.add_argument("--rollback", choices=sorted(ROLLBACK), default="auto",
                   help="how a hybrid/recurrent target drops rejected drafts: snapshot (recurrent-state snapshots), "
                   "checkpoint (save and restore), remove (KV cache only), or auto (the cheapest it supports; "
                   "default)")
    p.add_argument("--n-rs-seq", type=_number(int, 0, 64), default=None,
                   help="recurrent-state snapshots for a hybrid target (default: the draft length, 4 with auto)")


def spec_options(args) -> dict:
    """The Speculative options of the shared flags."""
    opts = {"rollback": args.rollback}
    if args.n_rs_seq is not None:
        opts["n_rs_seq"] = args.n_rs_seq
    return opts


def planned_snapshots(args) -> int:
    """What the speculative loop's target session will ask for, so that the plan
    counts it (the plan ignores it for a target without recurrent state)."""
    draft_max = getattr(args, "draft_max", "auto")
    if not args.draft or draft_max == 0:
        return 0
    return args.n_rs_seq if args.n_rs_seq is not None else default_snapshots(args.rollback, draft_max)


def build_parser(chat: bool = False) -> argparse.ArgumentParser:
    if chat:
        p = _Parser(prog="pymoe chat", description="Chat with a model through its chat template, keeping the KV "
                    "cache between turns; speculatively when a draft is given (-d). Type /stats for the stats of "
                    "the last reply, /quit (or end of input) to leave.")
        p.add_argument("--system", help="a system message")
    else:
        p = _Parser(prog="pymoe generate", description="Generate text with a MoE target, speculatively when a "
                    "draft is given (-d).")
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("-p", "--prompt", help="prompt text (raw, or a user message with --chat)")
        src.add_argument("-f", "--file", help="read the prompt from this file")
        p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
        p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    add_load_options(p)
    add_sampling_options(p)
    p.add_argument("-n", "--n-predict", type=_number(int, 0), default=512 if chat else 128,
                   help=f"tokens to generate (per reply; default {512 if chat else 128})")
    p.add_argument("--draft-max", type=_draft_max, default="auto",
                   help=f"draft tokens per round, 0..{MAX_DRAFT} or auto (default auto; 0 = plain decoding)")
    p.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")
    return p


class StopFilter:
    """Streams text but holds back what could still become a stop string."""

    def __init__(self, stops: List[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, piece: str) -> str:
        """The text that can be shown now."""
        self.text += piece
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
            end = len(self.text)
        else:
            end = max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


def _load_bar(path):
    """A load progress bar on stderr when it is a terminal; otherwise silent."""
    if not sys.stderr.isatty():
        return lambda fraction: None
    from .demo import bar
    return bar(f"loading {Path(path).name}")


def stream(ids, model, stops: StopFilter, write, seen: list) -> str:
    """Decode token ids as they come and write the text, holding back what
    could still become a stop string; each id is appended to seen (so an
    interrupted stream keeps what it showed). Returns the text of every id
    seen, a stop string's included (what the context holds)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = ""
    for token in ids:
        seen.append(token)
        piece = decoder.decode(model.token_piece(token))
        text += piece
        write(stops.add(piece))
        if stops.stopped:
            return text
    piece = decoder.decode(b"", final=True)
    write(stops.add(piece))
    return text + piece


def load_models(args, with_draft: bool = True):
    """(target, draft or None, plan or None, load seconds)."""
    t0 = time.perf_counter()
    p = None
    target_opts = {"n_gpu_layers": args.ngl, "n_cpu_moe": args.n_cpu_moe}
    draft_opts = {"n_gpu_layers": -1}
    if args.vram:
        p = plan(args.model, args.draft, vram=args.vram, ctx=args.ctx, cache_type=args.cache_type_k or "f16",
                 n_rs_seq=planned_snapshots(args))
        if not p.fits:
            raise UsageError(p.problem)
        target_opts = {"plan": p}
        draft_opts = {"n_gpu_layers": -1 if p.draft_on_gpu else 0}
    common = {"load_mode": args.load, "rpc_servers": args.rpc}
    # the progress callback is also where Ctrl-C stops a load (llama.cpp checks it between tensors)
    target = Model(args.model, **common, **target_opts, progress=_load_bar(args.model))
    draft = (Model(args.draft, **common, **draft_opts, progress=_load_bar(args.draft))
             if args.draft and with_draft else None)
    return target, draft, p, time.perf_counter() - t0


def session_options(args) -> dict:
    return dict(n_ctx=args.ctx, n_batch=args.batch, n_ubatch=args.ubatch, n_threads=args.threads,
                flash_attn=args.flash_attn, cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v)


def sampling_options(args) -> dict:
    return dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)


def _prompt_text(args) -> str:
    if args.prompt is not None:
        return args.prompt
    try:
        return Path(args.file).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the prompt file {args.file}: {exc.strerror}")


def run(args, out=sys.stdout, err=sys.stderr) -> int:
    if args.ubatch > args.batch:
        raise UsageError(f"--ubatch ({args.ubatch}) must not exceed --batch ({args.batch})")
    text = _prompt_text(args)
    target, draft, p, load_seconds = load_models(args, with_draft=args.draft_max != 0)
    session, sampling = session_options(args), sampling_options(args)
    if args.chat:
        prompt = target.tokenize(target.chat_format([{"role": "user", "content": text}]), parse_special=True)
    else:
        prompt = target.tokenize(text)
    if len(prompt) >= args.ctx:
        raise UsageError(f"the prompt is {len(prompt)} tokens, the context only {args.ctx}: use a larger --ctx")
    result = {"n_prompt": len(prompt), "tokens": [], "stop_reason": "max_tokens", "load_seconds": load_seconds,
              "locked_bytes": target.load_report.locked_bytes, "draft_max": args.draft_max if draft else 0}
    stops = StopFilter(args.stop)

    def write(text):
        out.write(text)
        out.flush()

    gen = spec = None
    t_prefill = t_decode = 0.0
    t1 = None
    try:
        if draft is not None:
            spec = Speculative(target, draft, draft_max=args.draft_max, p_min=args.p_min, seed=args.seed,
                               **sampling, **session, **spec_options(args))
            t0 = time.perf_counter()
            spec.feed(prompt)
            ids = spec.generate_tokens(None, max_tokens=args.n_predict)
        else:
            gen = target.session(sampling=SamplingParams(**sampling), seed=args.seed, **session)
            t0 = time.perf_counter()
            gen.feed(prompt)
            ids = (t.id for t in gen.generate(None, max_tokens=args.n_predict))
        t_prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        stream(ids, target, stops, (lambda text: None) if args.json else write, result["tokens"])
        result["stop_reason"] = "stop" if stops.stopped else (spec or gen).stop_reason or "max_tokens"
        t_decode = time.perf_counter() - t1
        status = 0
    except KeyboardInterrupt:
        result["stop_reason"] = "interrupted"
        t_decode = time.perf_counter() - t1 if t1 is not None else 0.0
        status = 130
    tail = stops.flush()
    if not args.json:
        write(tail + "\n")
    n = len(result["tokens"])
    result.update(text=stops.text, n_generated=n, prefill_tokens_per_s=len(prompt) / t_prefill if t_prefill else 0.0,
                  decode_tokens_per_s=n / t_decode if t_decode else 0.0, plan=p.llama_flags() if p else None)
    if spec is not None:
        st = spec.stats
        result.update(n_drafted=st.drafted, n_accepted=st.accepted, acceptance=st.acceptance,
                      mean_accepted=st.accepted / st.rounds if st.rounds else 0.0,
                      rounds_by_k={str(k): v for k, v in st.rounds_by_k.items()},
                      rollback=st.rollback_target, draft_rollback=st.rollback_draft, restores=st.restores,
                      rollback_seconds_per_round=st.rollback_seconds_per_round)
        spec.close()
    else:
        result.update(n_drafted=0, n_accepted=0, acceptance=0.0, mean_accepted=0.0, rounds_by_k={}, rollback=None,
                      draft_rollback=None, restores=0, rollback_seconds_per_round=0.0)
    if gen is not None:
        gen.close()
    if args.json:
        out.write(json.dumps(result) + "\n")
    else:
        err.write(stats_text(result))
    if draft is not None:
        draft.close()
    target.close()
    return status


def stats_text(r: dict) -> str:
    lines = [f"load {r['load_seconds']:.2f} s, locked {r['locked_bytes'] / 2**20:,.0f} MiB",
             f"prefill {r['n_prompt']} tokens, {r['prefill_tokens_per_s']:.1f} tokens/s; "
             f"decode {r['n_generated']} tokens, {r['decode_tokens_per_s']:.1f} tokens/s (stop: {r['stop_reason']})"]
    if r["draft_max"]:
        lines.append(f"draft: k {r['draft_max']}, {r['n_accepted']} of {r['n_drafted']} drafts accepted "
                     f"({r['acceptance']:.0%}), {r['mean_accepted']:.2f} per round, rounds by k {r['rounds_by_k']}")
        if r["rollback"] != "remove" or r["draft_rollback"] != "remove":
            lines.append(f"rollback: target {r['rollback']}, draft {r['draft_rollback']}, {r['restores']} restores, "
                         f"{r['rollback_seconds_per_round'] * 1e3:.2f} ms per round")
    if r["plan"]:
        lines.append(f"plan: {r['plan']}")
    return "\n".join(lines) + "\n"


def command(name: str, argv, parser: argparse.ArgumentParser, body) -> int:
    """Parse, run body(args); bad input and pymoe errors are one line and exit 2."""
    warnings.showwarning = lambda msg, *a, **k: print(f"pymoe: warning: {msg}", file=sys.stderr)
    try:
        args = parser.parse_args(argv)
        if getattr(args, "verbose", False):
            from ._native import show_log
            show_log()
        return body(args)
    except (UsageError, errors.PymoeError) as exc:
        print(f"pymoe {name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while loading
        print(f"pymoe {name}: interrupted", file=sys.stderr)
        return 130


def main(argv=None) -> int:
    return command("generate", argv, build_parser(), run)
