"""The demo: fetch SmolLM2-135M, generate token by token; then make a small MoE
from it (pymoe upcycle) and decode that MoE plainly and speculatively, with
SmolLM2 as the draft. Shows speeds and acceptance.

    make demo      # or: python -P examples/demo.py [--prompt TEXT] [--tokens N]
"""
import argparse
import sys
import time

import pymoe
from pymoe.demo_models import smollm2, smollm2_moe


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="Name three important inventions and say briefly why each mattered.")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="0 = all CPUs")
    args = parser.parse_args()

    path = smollm2()

    shown = [-1]

    def progress(fraction: float) -> None:
        percent = int(fraction * 100)
        if percent // 10 != shown[0] // 10:  # every 10%: llama.cpp reports far more often
            shown[0] = percent
            print(f"\rloading {path.name}: {percent:3d}%", end="", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    with pymoe.Model(path, progress=progress) as model:
        load_s = time.perf_counter() - t0
        r = model.load_report
        locked = f", {r.locked_bytes / 2**20:.0f} MiB locked" if r.load_mode == "mlock" else ""
        print(f"\rloaded {model.info.desc} ({model.info.n_bytes / 2**20:.0f} MiB) in {load_s:.2f} s "
              f"({r.load_mode}{locked})", file=sys.stderr)
        with model.session(n_ctx=1024, n_threads=args.threads, sampling=pymoe.SamplingParams.greedy()) as s:
            # SmolLM2-Instruct is a chat model: wrap the question in its ChatML turn markers
            chat = f"<|im_start|>user\n{args.prompt}<|im_end|>\n<|im_start|>assistant\n"
            prompt = model.tokenize(chat, parse_special=True)
            t0 = time.perf_counter()
            s.feed(prompt)
            prefill_s = time.perf_counter() - t0
            print(f"> {args.prompt}\n", flush=True)
            t0 = time.perf_counter()
            n = 0
            for token in s.generate(None, max_tokens=args.tokens):
                print(token.text, end="", flush=True)
                n += 1
            decode_s = time.perf_counter() - t0
            print()
            print(f"\nprompt: {len(prompt)} tokens, {len(prompt) / prefill_s:.0f} tokens/s; "
                  f"generated: {n} tokens, {n / decode_s:.1f} tokens/s ({s.stop_reason})", file=sys.stderr)

        # the scenario pymoe is for: a MoE target with a small dense draft
        moe_path = smollm2_moe(experts=4, used=2, expert_type="q8_0")
        with pymoe.Model(moe_path) as moe:
            print(f"\ntarget: {moe_path.name}, a synthetic MoE upcycled from SmolLM2 "
                  f"({moe.info.n_experts} experts, {moe.info.n_experts_used} per token, "
                  f"{moe.info.n_bytes / 2**20:.0f} MiB); draft: SmolLM2", file=sys.stderr)
            prompt = moe.tokenize(chat, parse_special=True)
            with moe.session(n_ctx=1024, n_threads=args.threads, sampling=pymoe.SamplingParams.greedy()) as s:
                s.feed(prompt)
                t0 = time.perf_counter()
                plain = [t.id for t in s.generate(None, max_tokens=args.tokens)]
                plain_rate = len(plain) / (time.perf_counter() - t0)
            print(f"plain decoding of the MoE: {len(plain)} tokens, {plain_rate:.1f} tokens/s", file=sys.stderr)
            for k in (4, "auto"):
                with pymoe.Speculative(moe, model, draft_max=k, temperature=0, n_ctx=1024,
                                       n_threads=args.threads) as spec:
                    spec.feed(prompt)
                    t0 = time.perf_counter()
                    ids = list(spec.generate_tokens(None, max_tokens=args.tokens))
                    rate = len(ids) / (time.perf_counter() - t0)
                    st = spec.stats
                same = "same tokens as plain" if ids == plain else "differs from plain at a near-tie (quantized)"
                print(f"speculative, draft_max={k}: {rate:.1f} tokens/s ({rate / plain_rate:.2f}x plain), "
                      f"acceptance {st.acceptance:.0%}, {st.tokens_per_round:.2f} tokens per round, "
                      f"rounds by k {st.rounds_by_k}; {same}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
