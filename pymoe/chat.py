"""pymoe chat: a multi-turn conversation through the model's chat template.

The KV cache is kept between turns: each turn feeds only what the template
adds after the text already in the context (the end of the last reply, the new
user message, the start of the next reply), so the history is never
re-prefilled. If the template renders the history differently from what is in
the context, that turn starts over from the whole conversation (and says so
under /stats).
"""
from __future__ import annotations

import sys
import time

from .generate import (StopFilter, UsageError, build_parser, command, load_models, sampling_options, spec_options,
                       session_options, stream)
from .sampling import SamplingParams
from .speculative import Speculative


class Conversation:
    def __init__(self, args, target, draft):
        self.args, self.target = args, target
        self.messages = [{"role": "system", "content": args.system}] if args.system else []
        self.target.chat_format(self.messages or [{"role": "user", "content": ""}])  # no template: fail now
        session, sampling = session_options(args), sampling_options(args)
        if draft is not None:
            self.decoder = Speculative(target, draft, draft_max=args.draft_max, p_min=args.p_min, seed=args.seed,
                                       **sampling, **session, **spec_options(args))
        else:
            self.decoder = target.session(sampling=SamplingParams(**sampling), seed=args.seed, **session)
        self.in_context = ""  # the conversation text the context holds
        self.n_ctx = args.ctx
        self.last: dict = {}

    def _position(self) -> int:
        d = self.decoder
        return (d.target if isinstance(d, Speculative) else d).position

    def _reset(self) -> None:
        d = self.decoder
        for s in ((d.target, d.draft) if isinstance(d, Speculative) else (d,)):
            s.reset()
        self.in_context = ""

    def reply(self, user_text: str, write) -> None:
        self.messages.append({"role": "user", "content": user_text})
        full = self.target.chat_format(self.messages)
        restarted = not full.startswith(self.in_context)
        if restarted:
            self._reset()
        delta = full[len(self.in_context):]
        tokens = self.target.tokenize(delta, add_special=self._position() == 0, parse_special=True)
        if self._position() + len(tokens) >= self.n_ctx:
            self.messages.pop()
            raise UsageError(f"the conversation would need {self._position() + len(tokens)} tokens of context, "
                             f"--ctx is {self.n_ctx}: start a new chat with a larger --ctx")
        t0 = time.perf_counter()
        try:
            self.decoder.feed(tokens)
        except KeyboardInterrupt:  # whether the tokens went in is unknown: start over next turn
            self.messages.pop()
            self._reset()
            raise
        t1 = time.perf_counter()
        self.in_context = full
        stops = StopFilter(self.args.stop)
        ids = (self.decoder.generate_tokens(None, max_tokens=self.args.n_predict)
               if isinstance(self.decoder, Speculative)
               else (t.id for t in self.decoder.generate(None, max_tokens=self.args.n_predict)))
        seen: list = []
        try:
            text_in_context = stream(ids, self.target, stops, write, seen)
            stop_reason = "stop" if stops.stopped else self.decoder.stop_reason or "max_tokens"
        except KeyboardInterrupt:
            stop_reason = "interrupted"
            text_in_context = self.target.detokenize(seen)  # what the context holds of the cut reply
        n = len(seen)
        write(stops.flush() + "\n")
        t2 = time.perf_counter()
        # the reply as the template will render it next turn; the context holds what was generated
        self.messages.append({"role": "assistant", "content": stops.text})
        self.in_context += text_in_context
        self.last = {"n_prompt": len(tokens), "n_generated": n, "stop_reason": stop_reason, "restarted": restarted,
                     "prefill_tokens_per_s": len(tokens) / (t1 - t0) if t1 > t0 else 0.0,
                     "decode_tokens_per_s": n / (t2 - t1) if t2 > t1 else 0.0, "position": self._position()}
        if stop_reason == "interrupted":
            raise KeyboardInterrupt

    def stats(self) -> str:
        if not self.last:
            return "no reply yet\n"
        r = self.last
        line = (f"last reply: fed {r['n_prompt']} new tokens at {r['prefill_tokens_per_s']:.1f} tokens/s"
                f"{' (history re-fed: the template rendered it differently)' if r['restarted'] else ''}, "
                f"generated {r['n_generated']} at {r['decode_tokens_per_s']:.1f} tokens/s (stop: {r['stop_reason']}); "
                f"context {r['position']} of {self.n_ctx} tokens\n")
        if isinstance(self.decoder, Speculative):
            st = self.decoder.stats
            line += (f"draft (whole chat): {st.accepted} of {st.drafted} drafts accepted ({st.acceptance:.0%}), "
                     f"rounds by k {dict(sorted(st.rounds_by_k.items()))}\n")
        return line


def run(args, stdin=sys.stdin, out=sys.stdout, err=sys.stderr) -> int:
    if args.ubatch > args.batch:
        raise UsageError(f"--ubatch ({args.ubatch}) must not exceed --batch ({args.batch})")
    target, draft, plan, load_seconds = load_models(args, with_draft=args.draft_max != 0)
    chat = Conversation(args, target, draft)
    err.write(f"load {load_seconds:.2f} s, locked {target.load_report.locked_bytes / 2**20:,.0f} MiB"
              + (f"; plan: {plan.llama_flags()}" if plan else "") + "\n")
    interactive = stdin.isatty()

    def write(text):
        out.write(text)
        out.flush()

    while True:
        if interactive:
            write("> ")
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            write("\n")
            return 130
        if not line:
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/quit":
            return 0
        if text.strip() == "/stats":
            err.write(chat.stats())
            continue
        if not text.strip():
            continue
        try:
            chat.reply(text, write)
        except KeyboardInterrupt:  # the reply was cut: the chat goes on
            err.write(chat.stats())
        except UsageError as exc:  # the context is full: say so, keep the chat
            err.write(f"pymoe chat: {exc}\n")


def main(argv=None) -> int:
    return command("chat", argv, build_parser(chat=True), run)
