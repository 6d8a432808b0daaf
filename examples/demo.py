"""The demo: fetch SmolLM2-135M, load it, generate token by token, show speed.

    make demo      # or: python -P examples/demo.py [--prompt TEXT] [--tokens N]
"""
import argparse
import sys
import time

import pymoe
from pymoe.demo_models import smollm2


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
    with pymoe.Model(path, load_mode="no-mmap", progress=progress) as model:
        load_s = time.perf_counter() - t0
        print(f"\rloaded {model.info.desc} ({model.info.n_bytes / 2**20:.0f} MiB) in {load_s:.2f} s",
              file=sys.stderr)
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
