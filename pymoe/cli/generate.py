"""pymoe generate: text from a target model, with a draft if one is given.

Streams the text to stdout as it is generated, then prints the stats on
stderr (or, with --json, one JSON object on stdout instead). Bad input is one
line on stderr and exit code 2; Ctrl-C stops cleanly with the partial stats and
exit code 130.
"""
from __future__ import annotations

import json
import sys
import time

from ..speculative import SpecStats
from ..text import TextStream
from ..sampling import SamplingParams
from .common import (Parser, UsageError, add_constraint_options, add_generation_options, add_load_options,
                     add_sampling_options, command, load_models, open_decoder, read_text_file, sampling_options,
                     token_budget, utf8_text)
from .terminal import stream


def build_parser() -> Parser:
    p = Parser(prog="pymoe generate", description="Generate text with a MoE target, speculatively when a draft is "
               "given (-d).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-p", "--prompt", help="prompt text (raw, or a user message with --chat)")
    src.add_argument("-f", "--file", help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    p.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    add_load_options(p)
    add_sampling_options(p)
    add_constraint_options(p)
    add_generation_options(p, n_predict=128)
    return p


def _prompt_text(args) -> str:
    if args.prompt is not None:
        return utf8_text(args.prompt, "the prompt (-p)")
    return read_text_file(args.file, "the prompt file")


def run(args, out=None, err=None) -> int:
    # the streams of the moment of the call (a caller may have redirected them since import)
    out, err = out or sys.stdout, err or sys.stderr
    text = _prompt_text(args)
    SamplingParams(**sampling_options(args))  # a bad schema is an error before the models load
    target, draft, p, load_seconds = load_models(args, with_draft=args.draft_max != 0)
    if args.chat:
        prompt = target.chat_tokenize([{"role": "user", "content": text}])  # special tokens: the template's only
    else:
        prompt = target.tokenize(text)
    if not prompt:
        raise UsageError("the prompt is empty (no tokens, and this model adds no BOS): give some text")
    if len(prompt) >= args.ctx:
        raise UsageError(f"the prompt is {len(prompt)} tokens, the context only {args.ctx}: use a larger --ctx")
    result = {"n_prompt": len(prompt), "tokens": [], "stop_reason": "max_tokens", "load_seconds": load_seconds,
              "locked_bytes": target.load_report.locked_bytes, "draft_max": 0,
              "auto_draft": False}
    shown = TextStream(target, args.stop)

    def write(text):
        out.write(text)
        out.flush()

    decoder = open_decoder(args, target, draft)
    speculating = decoder.source is not None
    if speculating:
        # a number always: the fixed draft length, or the longest that auto may choose
        result.update(draft_max=decoder.k_max, auto_draft=decoder.draft_max == "auto")
    t_prefill = t_decode = 0.0
    t1 = None
    try:
        t0 = time.perf_counter()
        decoder.feed(prompt)
        t_prefill = time.perf_counter() - t0
        t1 = time.perf_counter()
        ids = decoder.generate_tokens(None, max_tokens=token_budget(args, decoder))
        stream(ids, shown, (lambda text: None) if args.json else write, result["tokens"])
        result["stop_reason"] = "stop" if shown.stopped else decoder.stop_reason or "max_tokens"
        t_decode = time.perf_counter() - t1
        status = 0
    except KeyboardInterrupt:
        result["stop_reason"] = "interrupted"
        t_decode = time.perf_counter() - t1 if t1 is not None else 0.0
        status = 130
    tail = shown.finish()
    if not args.json:
        write(tail + "\n")
    n = len(result["tokens"])
    result.update(text=shown.text, n_generated=n, prefill_tokens_per_s=len(prompt) / t_prefill if t_prefill else 0.0,
                  decode_tokens_per_s=n / t_decode if t_decode else 0.0, plan=p.llama_flags() if p else None)
    if speculating:
        st = decoder.stats
        result.update(draft_source=decoder.source, n_drafted=st.drafted, n_accepted=st.accepted,
                      acceptance=st.acceptance, mean_accepted=st.accepted / st.rounds if st.rounds else 0.0,
                      rounds_by_k={str(k): v for k, v in st.rounds_by_k.items()}, gated_rounds=st.gated_rounds,
                      rollback=st.rollback_target, draft_rollback=st.rollback_draft if draft is not None else None,
                      restores=st.restores, rollback_seconds_per_round=st.rollback_seconds_per_round,
                      lookup=lookup_json(st) if decoder.ngram else None,
                      acceptance_by_depth={str(i): a for i, a in st.depth_acceptance.items()})
    else:
        result.update(draft_source=None, n_drafted=0, n_accepted=0, acceptance=0.0, mean_accepted=0.0,
                      rounds_by_k={}, gated_rounds=0, rollback=None, draft_rollback=None, restores=0,
                      rollback_seconds_per_round=0.0, lookup=None, acceptance_by_depth={})
    cache = (decoder.target if speculating else decoder).moe_cache
    result["moe_cache"] = cache.as_json() if cache is not None else None
    decoder.close()
    if args.json:
        out.write(json.dumps(result) + "\n")
    else:
        err.write(stats_text(result))
    if draft is not None:
        draft.close()
    target.close()
    return status


def lookup_json(st: SpecStats) -> dict:
    """Lookup drafts by match length, for --json: what was found, drafted and accepted."""
    return {"drafted": st.lookup_drafted, "accepted": st.lookup_accepted,
            "by_match_length": {str(n): {"matches": s.matches, "rounds": s.rounds, "drafted": s.drafted,
                                         "accepted": s.accepted} for n, s in sorted(st.lookup.items())}}


def stats_text(r: dict) -> str:
    lines = [f"load {r['load_seconds']:.2f} s, locked {r['locked_bytes'] / 2**20:,.0f} MiB",
             f"prefill {r['n_prompt']} tokens, {r['prefill_tokens_per_s']:.1f} tokens/s; "
             f"decode {r['n_generated']} tokens, {r['decode_tokens_per_s']:.1f} tokens/s (stop: {r['stop_reason']})"]
    if r["draft_max"]:
        lines.append(f"draft ({r['draft_source']}): k {'auto, up to ' if r['auto_draft'] else ''}{r['draft_max']}, {r['n_accepted']} of {r['n_drafted']} drafts accepted "
                     f"({r['acceptance']:.0%}), {r['mean_accepted']:.2f} per round, rounds by k {r['rounds_by_k']}"
                     + (f", {r['gated_rounds']} made plain by measurement" if r["gated_rounds"] else ""))
        if r["acceptance_by_depth"] and len(r["acceptance_by_depth"]) > 1:
            lines.append("acceptance by draft depth: " + ", ".join(f"{i}: {a:.0%}"
                                                                  for i, a in r["acceptance_by_depth"].items()))
        if r["lookup"]:
            lines.append(f"lookup: {r['lookup']['accepted']} of {r['lookup']['drafted']} accepted; by match length "
                         + ", ".join(f"{n}: {s['accepted']}/{s['drafted']} in {s['rounds']} of {s['matches']} matches"
                                     for n, s in r["lookup"]["by_match_length"].items()))
        if r["rollback"] != "remove" or r["draft_rollback"] not in ("remove", None):
            lines.append(f"rollback: target {r['rollback']}, draft {r['draft_rollback']}, {r['restores']} restores, "
                         f"{r['rollback_seconds_per_round'] * 1e3:.2f} ms per round")
    if r.get("moe_cache"):
        c = r["moe_cache"]
        lines.append(f"expert cache: {c['hit_rate']:.0%} of {c['hits'] + c['misses']} expert uses hit, "
                     f"{c['uploads']} experts copied in ({c['uploaded_bytes'] / 2**20:,.1f} MiB); host expert "
                     f"reads {c['host_expert_bytes_per_token'] / 2**20:,.2f} MiB per token "
                     f"({c['uncached_expert_bytes_per_token'] / 2**20:,.2f} without the cache)")
    if r["plan"]:
        lines.append(f"plan: {r['plan']}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    return command("generate", argv, build_parser(), run)
