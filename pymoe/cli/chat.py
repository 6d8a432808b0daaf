"""pymoe chat: a multi-turn conversation through the model's chat template.

The KV cache is kept between turns: each turn feeds only what the template
adds after the text already in the context (the end of the last reply, the new
user message, the start of the next reply), so the history is never
re-prefilled. The conversation's text is the record of what the context holds
(re-tokenizing a reply need not give the tokens that were generated). A stop
string's tokens, and any a speculative round generated after it, are rewound.
If the template renders the history differently from what is in the context,
that turn starts over from the whole conversation (and says so under /stats).
"""
from __future__ import annotations

import sys
import time

from ..chat_prompt import render as render_chat
from ..text import TextStream
from .common import (Parser, UsageError, add_generation_options, add_load_options, add_sampling_options, command,
                     MAX_INPUT_BYTES, load_models, open_decoder, token_budget, utf8_text)
from .terminal import stream


def build_parser() -> Parser:
    p = Parser(prog="pymoe chat", description="Chat with a model through its chat template, keeping the KV cache "
               "between turns; speculatively when a draft is given (-d). Type /help for the commands, /exit (or "
               "end of input) to leave.")
    p.add_argument("-sys", "--system", "--system-prompt", dest="system", help="a system message")
    add_load_options(p)
    add_sampling_options(p)
    add_generation_options(p, n_predict=512)
    return p


class Conversation:
    def __init__(self, args, target, draft):
        self.args, self.target = args, target
        self.messages = [{"role": "system", "content": utf8_text(args.system, "--system")}] if args.system else []
        self.target.chat_format(self.messages or [{"role": "user", "content": ""}])  # no template: fail now
        self.decoder = open_decoder(args, target, draft)  # lookup drafts match against the whole chat
        self.in_context = ""  # the conversation text the context holds (None: not known, start over)
        self.last_fed_end = 0  # the position after the last turn's feed
        self.n_ctx = self.decoder.n_ctx
        self.last: dict = {}

    def _reset(self) -> None:
        self.decoder.reset()
        self.in_context = ""

    def _tokens_before(self, seen: list, shown: str) -> int:
        """How many of the reply's tokens make text that the shown reply starts with (the rest of the shown
        text, if a token straddles the stop string, is fed with the next turn)."""
        for k in range(len(seen), 0, -1):
            if shown.startswith(self.target.detokenize(seen[:k])):
                return k
        return 0

    def start_over(self) -> None:
        """A new conversation: only the system message stays."""
        self.messages = self.messages[:1] if self.args.system else []
        self._reset()

    def reply(self, user_text: str, write) -> None:
        self.messages.append({"role": "user", "content": user_text})
        prompt = render_chat(self.target, [(m["role"], m["content"]) for m in self.messages], add_assistant=True)
        full = prompt.text
        restarted = self.in_context is None or not full.startswith(self.in_context)
        if restarted:
            self._reset()
        # what the template adds after the context: its markers special, the message's text plain
        tokens = prompt.tokens(self.target, add_special=self.decoder.position == 0, start=len(self.in_context))
        if self.decoder.position + len(tokens) >= self.n_ctx:
            self.messages.pop()
            raise UsageError(f"the conversation would need {self.decoder.position + len(tokens)} tokens of context, "
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
        self.last_fed_end = self.decoder.position
        shown = TextStream(self.target, self.args.stop)
        seen: list = []
        try:
            stream(self.decoder.generate_tokens(None, max_tokens=token_budget(self.args, self.decoder)), shown, write,
                   seen)
            stop_reason = "stop" if shown.stopped else self.decoder.stop_reason or "max_tokens"
        except KeyboardInterrupt:
            stop_reason = "interrupted"
        n = len(seen)
        write(shown.finish() + "\n")
        # what the context holds of the reply (a cut one: every token seen, decoded or not)
        text_in_context = self.target.detokenize(seen) if stop_reason == "interrupted" else shown.context_text
        t2 = time.perf_counter()
        # the reply as the template will render it next turn; the context holds what was generated
        self.messages.append({"role": "assistant", "content": shown.text})
        keep = n
        if stop_reason == "stop":  # the stop string is not in the reply: its tokens leave the context
            keep = self._tokens_before(seen, shown.text)
            text_in_context = self.target.detokenize(seen[:keep])
        self.in_context += text_in_context
        beyond = self.decoder.position - (self.last_fed_end + keep)
        if beyond > 0 and beyond <= self.decoder.rewind_limit:
            # the stop string's tokens, and those a speculative round generated after a stop or a Ctrl-C
            self.decoder.rewind(beyond)
        elif beyond > 0:  # a context that cannot go back that far: the next turn starts over
            self.in_context = None
        self.last = {"n_prompt": len(tokens), "n_generated": n, "stop_reason": stop_reason, "restarted": restarted,
                     "prefill_tokens_per_s": len(tokens) / (t1 - t0) if t1 > t0 else 0.0,
                     "decode_tokens_per_s": n / (t2 - t1) if t2 > t1 else 0.0, "position": self.decoder.position}
        if stop_reason == "interrupted":
            raise KeyboardInterrupt

    def stats(self) -> str:
        if not self.last:
            return "no reply yet\n"
        r = self.last
        line = (f"last reply: fed {r['n_prompt']} new tokens at {r['prefill_tokens_per_s']:.1f} tokens/s"
                f"{' (history re-fed: the context did not hold the conversation as the template renders it)' if r['restarted'] else ''}, "
                f"generated {r['n_generated']} at {r['decode_tokens_per_s']:.1f} tokens/s (stop: {r['stop_reason']}); "
                f"context {r['position']} of {self.n_ctx} tokens\n")
        st = self.decoder.stats
        if st is not None:
            line += (f"draft ({self.decoder.source}, whole chat): {st.accepted} of {st.drafted} drafts accepted "
                     f"({st.acceptance:.0%}), rounds by k {dict(sorted(st.rounds_by_k.items()))}"
                     + (f"; from the context: {st.lookup_accepted} of {st.lookup_drafted}" if self.decoder.ngram
                        else "") + "\n")
        return line


HELP = """commands (a line that is only the command):
  /help          this list
  /stats         the stats of the last reply and of the whole chat
  /reset         start a new conversation (the system message stays)
  /exit, /quit   leave (so does Ctrl-D on an empty line)
Ctrl-C cuts a reply short; at the prompt it leaves.
"""


def line_reader(stdin, write):
    """A function returning the next input line without its newline, or None
    at the end of input. On a terminal: readline's editing and history."""
    if stdin is sys.stdin and stdin.isatty():
        try:
            import readline  # noqa: F401  (input() then edits lines and keeps a history)
        except ImportError:
            pass

        def prompt():
            try:
                return input("> ")
            except EOFError:  # Ctrl-D: leave on a fresh line
                write("\n")
                return None
        return prompt

    def read():
        line = stdin.readline(MAX_INPUT_BYTES + 1)
        if len(line) > MAX_INPUT_BYTES:  # `pymoe chat < /dev/zero`
            raise UsageError(f"an input line is longer than {MAX_INPUT_BYTES >> 20} MiB")
        return line.rstrip("\n") if line else None
    return read


def run(args, stdin=None, out=None, err=None) -> int:
    # the streams of the moment of the call (a caller may have redirected them since import)
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    if hasattr(stdin, "reconfigure"):  # a line that is not UTF-8 is refused below, not a traceback here
        stdin.reconfigure(errors="surrogateescape")
    target, draft, plan, load_seconds = load_models(args, with_draft=args.draft_max != 0)
    chat = Conversation(args, target, draft)
    err.write(f"load {load_seconds:.2f} s, locked {target.load_report.locked_bytes / 2**20:,.0f} MiB"
              + (f"; plan: {plan.llama_flags()}" if plan else "") + "\n")

    def write(text):
        out.write(text)
        out.flush()

    next_line = line_reader(stdin, write)
    if stdin.isatty():
        err.write("/help lists the commands\n")
    while True:
        try:
            text = next_line()
        except KeyboardInterrupt:
            write("\n")
            return 130
        if text is None:
            return 0
        try:
            utf8_text(text, "that line")
        except UsageError as exc:
            err.write(f"pymoe chat: {exc}; it was not sent\n")
            continue
        command_word = text.strip()
        if command_word in ("/quit", "/exit"):
            return 0
        if command_word == "/help":
            err.write(HELP)
            continue
        if command_word == "/stats":
            err.write(chat.stats())
            continue
        if command_word == "/reset":
            chat.start_over()
            err.write("a new conversation\n")
            continue
        if command_word.startswith("/") and " " not in command_word:
            err.write(f"unknown command {command_word}: /help lists them\n")
            continue
        if not command_word:
            continue
        try:
            chat.reply(text, write)
        except KeyboardInterrupt:  # the reply was cut: the chat goes on
            err.write(chat.stats())
        except UsageError as exc:  # the context is full: say so, keep the chat
            err.write(f"pymoe chat: {exc}\n")


def main(argv=None) -> int:
    return command("chat", argv, build_parser(), run)
