"""What the commands share: their options, loading the models a command
names, the decoder they generate with, and one way of turning bad input and
pymoe errors into one line and exit code 2 (Ctrl-C: 130)."""
from __future__ import annotations

import argparse
import errno
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

from .. import build_info, errors
from ..decoder import Decoder
from ..memory import LOAD_MODES, memory_plan
from ..model import Model
from ..plan import parse_size, plan
from ..sampling import SamplingParams
from ..session import FLASH_ATTN
from ..speculative import MAX_DRAFT, NGRAM_MAX, ROLLBACK, NgramDraft, Speculative, default_snapshots
from .terminal import load_bar


class UsageError(Exception):
    """Bad input: one line, exit code 2."""


def number(kind, lo=None, hi=None, lo_open=False):
    """An argparse type: kind within [lo, hi] (lo excluded when lo_open), with a message saying what is allowed."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if lo is not None and (value <= lo if lo_open else value < lo) or hi is not None and value > hi:
            span = f"{'(' if lo_open else '['}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
            raise argparse.ArgumentTypeError(f"{text} is outside {span}")
        return value
    return parse


def logit_bias(text):
    """llama.cpp's TOKEN_ID(+/-)BIAS, as (token id, bias)."""
    found = re.fullmatch(r"\s*(\d+)\s*([+-])\s*(\S+)\s*", text)
    try:
        bias = float(found.group(3)) if found else None
    except ValueError:
        bias = None
    if bias is None or bias != bias or bias == float("-inf") or (bias == float("inf") and found.group(2) == "+"):
        raise argparse.ArgumentTypeError(f"{text!r} is not TOKEN_ID+BIAS or TOKEN_ID-BIAS (e.g. 15043+1, 15043-inf)")
    token = int(found.group(1))
    if token >= 2**31:
        raise argparse.ArgumentTypeError(f"{text!r}: token id {token} is too large")
    return token, -bias if found.group(2) == "-" else bias


def draft_max(text):
    """A draft length 0..MAX_DRAFT, or "auto"."""
    if text == "auto":
        return text
    return number(int, 0, MAX_DRAFT)(text)


def seed(text):
    """A seed 0..2^64-1, or -1 (llama.cpp's "random"): None."""
    value = number(int, -1, 2**64 - 1)(text)
    return None if value == -1 else value


def mib_or_auto(text):
    """--moe-cache-mib: MiB, or auto (with --vram: what the plan leaves)."""
    return text if text == "auto" else number(int, 0, 2**31 - 1)(text)


def size_or_auto(text):
    if text == "auto":
        return text
    try:
        parse_size(text)
    except errors.PymoeError as exc:
        raise argparse.ArgumentTypeError(str(exc))
    return text


MAX_INPUT_BYTES = 64 << 20  # a prompt file larger than this is refused: no context holds it, and /dev/zero never ends


def utf8_text(text: str, what: str) -> str:
    """text from the command line or a terminal (undecodable bytes arrive as lone surrogates), refused with one
    line when it was not UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        what_char = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        raise UsageError(f"{what} is not valid UTF-8 ({what_char} at character {exc.start})") from None
    return text


def read_text_file(path: str, what: str) -> str:
    """A UTF-8 text file of at most MAX_INPUT_BYTES; one line (UsageError) for anything else."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror}") from None
    if len(data) > MAX_INPUT_BYTES:
        raise UsageError(f"{what} {path} is larger than {MAX_INPUT_BYTES >> 20} MiB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})") \
            from None


def check_writable_folder(folder: str, what: str) -> None:
    """Create folder if needed and make sure files can be written there, before hours of work go into them."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".pymoe-write-check-"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to {what} {folder}: {exc.strerror}") from None


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints the whole usage)
        raise UsageError(message)


def add_load_options(p: argparse.ArgumentParser) -> None:
    """The models, where they go, and the session: shared by generate, chat, bench and serve.
    llama.cpp's names (-ngl, -md, -c, ...) are accepted beside pymoe's own."""
    p.add_argument("-m", "--model", required=True, help="target GGUF")
    p.add_argument("-d", "-md", "--draft", "--model-draft", dest="draft",
                   help="draft GGUF (same vocabulary); 'mtp': the target's own MTP head drafts "
                   "(a model with nextn layers, no second model); or 'ngram': drafts copied from the context "
                   "(prompt lookup), no draft model")
    p.add_argument("--ngram", action="store_true",
                   help="with a draft GGUF or -d mtp: also draft from the context, the model drafting where no "
                   "match is long enough to pay")
    p.add_argument("--ngram-min", type=number(int, 1, NGRAM_MAX), default=NgramDraft.n_min,
                   help=f"shortest match lookup drafts from (default {NgramDraft.n_min})")
    p.add_argument("--ngram-max", type=number(int, 1, NGRAM_MAX), default=NgramDraft.n_max,
                   help=f"matches are measured up to this many tokens (default {NgramDraft.n_max}, at most "
                   f"{NGRAM_MAX})")
    p.add_argument("--load", choices=list(LOAD_MODES), default="auto", help="load mode (default auto)")
    p.add_argument("--mlock", dest="load", action="store_const", const="mlock", help="= --load mlock")
    p.add_argument("--no-mmap", dest="load", action="store_const", const="no-mmap", help="= --load no-mmap")
    p.add_argument("--vram", type=size_or_auto, help="plan the placement for this VRAM budget (8GiB, auto)")
    # placement by hand (None: not given, so that --vram can refuse them rather than ignore them)
    p.add_argument("--n-cpu-moe", "-ncmoe", type=number(int, 0), default=None,
                   help="keep the experts of the first N layers in RAM")
    p.add_argument("--moe-cache-mib", type=mib_or_auto, default=0, metavar="N",
                   help="keep recently used experts of the layers whose experts are in RAM in N MiB of device "
                   "memory (an expert cache; 0 = none, the default); with --vram, auto: every layer's experts in "
                   "RAM and what the plan leaves to the cache")
    p.add_argument("--moe-cache-uploads", type=number(int, 0, 2**31 - 1), default=1, metavar="N",
                   help="copy at most N missed experts per layer and decode into the expert cache (default 1; "
                   "0 = every miss)")
    p.add_argument("-ngl", "--ngl", "--n-gpu-layers", "--gpu-layers", dest="ngl", type=number(int, -1), default=None,
                   help="target layers on the GPU (-1 = all, the default)")
    p.add_argument("-ngld", "--ngld", "--n-gpu-layers-draft", "--gpu-layers-draft", dest="ngld",
                   type=number(int, -1), default=None, help="draft model layers on the GPU (-1 = all, the default)")
    p.add_argument("-ot", "--override-tensor", dest="override_tensor", action="append", type=override,
                   default=[], help="PATTERN=DEVICE[,PATTERN=DEVICE...]: tensors whose name matches the regex "
                   "go to DEVICE (CPU, CUDA0, RPC0, ...); repeatable, the first match wins")
    p.add_argument("--rpc", help="rpc-server endpoints HOST:PORT,... as extra devices")
    p.add_argument("-c", "--ctx", "--ctx-size", dest="ctx", type=number(int, 1), default=4096,
                   help="context size (default 4096; llama.cpp rounds it up to a multiple of 256)")
    p.add_argument("-b", "--batch", "--batch-size", dest="batch", type=number(int, 1), default=512)
    p.add_argument("-ub", "--ubatch", "--ubatch-size", dest="ubatch", type=number(int, 1), default=512)
    p.add_argument("-t", "--threads", type=number(int, 0, 512), default=0, help="0 = one per physical core (default)")
    p.add_argument("-fa", "--flash-attn", choices=sorted(FLASH_ATTN), nargs="?", const="on", default="auto",
                   help="flash attention: on, off or auto (default auto; -fa alone: on)")
    p.add_argument("-ctk", "--cache-type-k", default=None, help="K cache type (f16, q8_0, ...)")
    p.add_argument("-ctv", "--cache-type-v", default=None, help="V cache type (quantized needs --flash-attn on)")
    p.add_argument("--verbose", "-v", action="store_true", help="show llama.cpp's log on stderr")


def override(text):
    """-ot PATTERN=DEVICE[,PATTERN=DEVICE...] as llama.cpp writes it: a list of "pattern=device"."""
    pairs = [part for part in text.split(",") if part]
    for part in pairs:
        pattern, eq, device = part.partition("=")
        if not eq or not pattern or not device:
            raise argparse.ArgumentTypeError(f"{part!r} is not PATTERN=DEVICE (e.g. 'exps=CPU')")
    if not pairs:
        raise argparse.ArgumentTypeError("expected PATTERN=DEVICE (e.g. 'exps=CPU')")
    return pairs


def add_sampling_options(p: argparse.ArgumentParser, temp: float = SamplingParams.temperature) -> None:
    d = SamplingParams(temperature=temp)
    p.add_argument("--temp", type=number(float, 0), default=d.temperature,
                   help=f"temperature, 0 = greedy (default {d.temperature:g})")
    p.add_argument("--top-k", type=number(int, 0), default=d.top_k, help=f"0 = off (default {d.top_k})")
    p.add_argument("--top-p", type=number(float, 0, 1, lo_open=True), default=d.top_p,
                   help=f"(0, 1] (default {d.top_p:g})")
    p.add_argument("--min-p", type=number(float, 0, 1), default=d.min_p, help=f"[0, 1] (default {d.min_p:g})")
    p.add_argument("--repeat-penalty", type=number(float, 0, lo_open=True), default=d.repeat_penalty,
                   help=f"divide the logit of a token in the last --repeat-last-n (a negative one: multiply); "
                   f"1 = off (default {d.repeat_penalty:g})")
    p.add_argument("--repeat-last-n", type=number(int, -1), default=d.repeat_last_n,
                   help=f"the tokens the penalties look at, prompt included (0 = off, -1 = all; default "
                   f"{d.repeat_last_n})")
    p.add_argument("--presence-penalty", type=number(float), default=d.presence_penalty,
                   help="subtract from the logit of a token in the last --repeat-last-n (default 0)")
    p.add_argument("--frequency-penalty", type=number(float), default=d.frequency_penalty,
                   help="subtract, per time it is there, from the logit of a token in the last --repeat-last-n "
                   "(default 0)")
    p.add_argument("-l", "--logit-bias", type=logit_bias, action="append", default=[], metavar="TOKEN_ID(+/-)BIAS",
                   help="add a bias to a token's logit, e.g. 15043+1 or 15043-inf (never); repeatable")
    p.add_argument("-s", "--seed", type=seed, default=None, help="random seed (default or -1: a random one)")
    p.add_argument("--draft-p-min", type=number(float, 0, 1), default=0.0,
                   help="stop drafting a round when the draft's top probability is below this (default 0)")
    p.add_argument("--rollback", choices=sorted(ROLLBACK), default="auto",
                   help="how a hybrid/recurrent target drops rejected drafts: snapshot (recurrent-state snapshots), "
                   "checkpoint (save and restore), remove (KV cache only), or auto (the cheapest it supports; "
                   "default)")
    p.add_argument("--n-rs-seq", type=number(int, 0, 64), default=None,
                   help="recurrent-state snapshots for a hybrid target (default: the draft length, 4 with auto)")
    p.add_argument("--cold", action="store_true",
                   help="--draft-max auto starts from nothing and keeps nothing (default: it starts from what it "
                   "learned over the same models on this machine before, and keeps what it learns)")


def add_generation_options(p: argparse.ArgumentParser, n_predict: int, stop: bool = True) -> None:
    """How much to generate, how, and where to stop: shared by generate, chat and serve."""
    p.add_argument("-n", "--n-predict", "--predict", dest="n_predict", type=number(int, -1), default=n_predict,
                   help=f"tokens to generate (per reply; default {n_predict}; -1: until the context is full)")
    p.add_argument("--draft-max", type=draft_max, default="auto",
                   help=f"draft tokens per round, 0..{MAX_DRAFT} or auto (default auto; 0 = plain decoding)")
    if stop:
        p.add_argument("--stop", action="append", default=[], help="stop at this text (repeatable)")


def token_budget(args, decoder: Decoder) -> int:
    """What -n allows one generation: -1 is until the context is full (the decoder stops there)."""
    return args.n_predict if args.n_predict >= 0 else decoder.n_ctx


def planned_snapshots(args) -> int:
    """What the speculative loop's target session will ask for, so that the plan
    counts it (the plan ignores it for a target without recurrent state)."""
    k = getattr(args, "draft_max", "auto")
    if not args.draft or k == 0:
        return 0
    return args.n_rs_seq if args.n_rs_seq is not None else default_snapshots(args.rollback, k)


NGRAM = "ngram"  # -d ngram: lookup drafts, no draft model
MTP = "mtp"      # -d mtp: the target's MTP head drafts


def draft_model_path(args):
    """The draft GGUF -d names, or None (none given, -d ngram or -d mtp)."""
    return args.draft if args.draft and args.draft not in (NGRAM, MTP) else None


def lookup_drafts(args):
    """The lookup drafts -d ngram or --ngram ask for, or None."""
    if args.ngram and not (draft_model_path(args) or args.draft == MTP):
        raise UsageError("--ngram adds lookup drafts to a draft model (-d draft.gguf) or the MTP head (-d mtp); "
                         "for lookup drafts alone use -d ngram")
    if args.draft != NGRAM and not args.ngram:
        return None
    if args.ngram_min > args.ngram_max:
        raise UsageError(f"--ngram-min ({args.ngram_min}) must not exceed --ngram-max ({args.ngram_max})")
    return NgramDraft(args.ngram_min, args.ngram_max)


def placement_by_hand(args) -> list:
    """The hand placement options given (which --vram replaces)."""
    given = [("-ngl", args.ngl), ("-ngld", args.ngld), ("--n-cpu-moe", args.n_cpu_moe)]
    return [name for name, value in given if value is not None] + (["-ot"] if args.override_tensor else [])


def warn_without_gpu(args) -> None:
    """--vram on a machine (or a build) with no GPU plans nothing that can happen: say so."""
    devices = memory_plan(args.model, load_mode="no-mmap", rpc_servers=args.rpc).placement.devices
    if len(devices) < 2:
        warnings.warn(f"--vram {args.vram}: no GPU found ({build_info()}); everything runs from RAM")


def load_models(args, with_draft: bool = True):
    """(target, draft model or None, plan or None, load seconds)."""
    if args.ubatch > args.batch:
        raise UsageError(f"--ubatch ({args.ubatch}) must not exceed --batch ({args.batch})")
    lookup_drafts(args)  # bad lookup options fail before minutes of loading
    draft_path = draft_model_path(args)
    t0 = time.perf_counter()
    p = None
    overrides = [pair for pairs in args.override_tensor for pair in pairs]
    target_opts = {"n_gpu_layers": -1 if args.ngl is None else args.ngl, "n_cpu_moe": args.n_cpu_moe or 0,
                   "overrides": overrides or None}
    draft_opts = {"n_gpu_layers": -1 if args.ngld is None else args.ngld}
    if args.vram:
        by_hand = placement_by_hand(args)
        if by_hand:
            raise UsageError(f"--vram plans the placement itself; {', '.join(by_hand)} place by hand: use one or the "
                             "other")
        p = plan(args.model, draft_path, vram=args.vram, ctx=args.ctx, cache_type=args.cache_type_k or "f16",
                 n_rs_seq=planned_snapshots(args), mtp=args.draft == MTP, moe_cache=args.moe_cache_mib or None,
                 moe_cache_uploads=args.moe_cache_uploads)
        if not p.fits:
            raise UsageError(p.problem)
        warn_without_gpu(args)
        target_opts = {"plan": p}
        draft_opts = {"n_gpu_layers": -1 if p.draft_on_gpu else 0}
    shared = {"load_mode": args.load, "rpc_servers": args.rpc}
    if args.draft == MTP:
        target_opts["mtp"] = True
    if args.moe_cache_mib == "auto" and not args.vram:
        raise UsageError("--moe-cache-mib auto sizes the cache from the --vram plan: give --vram, or a size in MiB")
    target_opts.update(moe_cache_mib=p.moe_cache_mib if p else args.moe_cache_mib,
                       moe_cache_uploads=args.moe_cache_uploads)
    # the progress callback is also where Ctrl-C stops a load (llama.cpp checks it between tensors)
    target = Model(args.model, **shared, **target_opts, progress=load_bar(args.model))
    draft = (Model(draft_path, **shared, **draft_opts, progress=load_bar(draft_path))
             if draft_path and with_draft else None)
    return target, draft, p, time.perf_counter() - t0


def session_options(args) -> dict:
    return dict(n_ctx=args.ctx, n_batch=args.batch, n_ubatch=args.ubatch, n_threads=args.threads,
                flash_attn=args.flash_attn, cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v)


def add_constraint_options(p: argparse.ArgumentParser) -> None:
    """llama.cpp's flags for a constraint on what is generated (one at most)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--grammar", help="a GBNF grammar the output must follow")
    g.add_argument("--grammar-file", help="read the GBNF grammar from this file")
    g.add_argument("-j", "--json-schema", help="a JSON schema the output must follow (JSON text; {} = any JSON)")
    g.add_argument("-jf", "--json-schema-file", help="read the JSON schema from this file")


def sampling_options(args) -> dict:
    """SamplingParams' fields from the flags, the constraint too where the command has its flags."""
    opts = dict(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty)
    if args.logit_bias:
        opts["logit_bias"] = dict(args.logit_bias)  # a token given twice: the last one
    if getattr(args, "grammar_file", None) is not None:
        opts["grammar"] = read_text_file(args.grammar_file, "the grammar file")
    elif getattr(args, "grammar", None) is not None:
        opts["grammar"] = utf8_text(args.grammar, "the grammar (--grammar)")
    if getattr(args, "json_schema_file", None) is not None:
        opts["json_schema"] = read_text_file(args.json_schema_file, "the JSON schema file")
    elif getattr(args, "json_schema", None) is not None:
        opts["json_schema"] = utf8_text(args.json_schema, "the JSON schema (-j)")
    return opts


def open_decoder(args, target: Model, draft=None, k=None) -> Decoder:
    """What the command generates with: a speculative loop with the draft model
    or the MTP head and/or lookup drafts (draft length k, default --draft-max),
    else (k = 0, or no draft) a plain session of the target."""
    session, sampling = session_options(args), sampling_options(args)
    lookup = lookup_drafts(args)
    k = args.draft_max if k is None else k
    if args.draft == MTP and k != 0:
        draft = MTP
    if k == 0 or (draft is None and lookup is None):
        decoder = target.session(sampling=SamplingParams(**sampling), seed=args.seed, **session)
    else:
        opts = {"rollback": args.rollback}
        if args.n_rs_seq is not None:
            opts["n_rs_seq"] = args.n_rs_seq
        first, then = (lookup, None) if draft is None else (draft, lookup)  # lookup alone, or before the model
        decoder = Speculative(target, first, ngram=then, draft_max=k, draft_p_min=args.draft_p_min,
                              seed=args.seed, warm_start=False if args.cold else None,
                              sampling=SamplingParams(**sampling), **session, **opts)
    if decoder.n_ctx != args.ctx:
        warnings.warn(f"--ctx {args.ctx}: the context holds {decoder.n_ctx} tokens (llama.cpp makes it a multiple "
                      "of 256)")
    return decoder


def command(name: str, argv, parser: argparse.ArgumentParser, body) -> int:
    """Parse, run body(args); bad input and pymoe errors are one line and exit 2."""
    warnings.showwarning = lambda msg, *a, **k: print(f"pymoe: warning: {msg}", file=sys.stderr)
    if sys.stdout is None:  # started with stdout closed (>&-)
        print(f"pymoe {name}: standard output is closed", file=sys.stderr)
        return 2
    try:
        args = parser.parse_args(argv)
        if getattr(args, "verbose", False):
            from .._native import show_log
            show_log()
        return body(args)
    except (UsageError, errors.PymoeError) as exc:
        print(f"pymoe {name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # while loading
        print(f"pymoe {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # writing the output failed: a closed pipe, a full disk
        _drop_output()
        if exc.errno == errno.EPIPE:
            return 141  # as a program killed by SIGPIPE: silent (`pymoe generate ... | head`)
        print(f"pymoe {name}: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        return 2


def _drop_output() -> None:
    """Point stdout at /dev/null, so that the flush at exit does not fail a second time."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass
