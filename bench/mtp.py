"""Self-speculation with the target's MTP head against a separate draft model,
plain decoding, and llama.cpp's own draft-mtp, on a qwen35moe with an MTP head.

The target is written here (tests/tiny_models.py, cached in build/bench-models/):
a hybrid qwen35moe of 32 layers, 256 wide, 16 experts (4 used) and a shared
expert, one nextn layer, all F32 (so greedy speculation must be plain greedy
decoding, token for token). Its trunk and head share a bigram structure (the
output matrix is the embedding permuted), so the head agrees with the trunk
often but not always; the draft model is a 2-layer dense llama with the same
structure. Settings run interleaved in each repetition on the same
chat-formatted prompts: pymoe plain, pymoe with the MTP head at k = 1, 2, 3
and auto, pymoe with the draft model (auto), and llama.cpp's
llama-speculative-simple --spec-type draft-mtp at k = 1, 2, 3 (p_min 0).
Greedy. Decode tokens/s; "x plain" is the median over repetitions of the
ratio to pymoe plain in the same repetition. The MTP head's cost: its seconds
per draft token, against a plain target step. Writes bench/results/mtp.md.

    .venv/bin/python -P bench/mtp.py [--reps 3] [-n 128]   (needs `make bench-peer`)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pymoe

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))  # python -P does not add the script's folder
sys.path.insert(0, str(REPO / "tests"))
import tiny_models  # noqa: E402
from peer import SPECULATIVE_SIMPLE as PEER, PeerRun, run as peer_run  # noqa: E402
from report import machine_lines, write  # noqa: E402

MODELS = REPO / "build" / "bench-models"
THREADS = 2
CTX = 2048
STRUCTURE = dict(embd_seed=100, bigram=True, branch_scale=0.5)
# the head's reading of its token and of the hidden state it is given are noisy enough that it agrees with
# the trunk about three times in four, less where it reads its own state (from the second draft on)
TARGET = tiny_models.Shape(arch="qwen35moe", n_layers=32, n_embd=256, n_head=4, n_head_kv=2, n_ff=512, n_experts=16,
                           n_experts_used=4, n_ff_shared=512, seed=31, nextn=1, mtp_hidden=2.5, mtp_noise=1.3,
                           **STRUCTURE)
DRAFT = tiny_models.Shape(n_layers=2, n_embd=64, n_head=2, n_head_kv=1, seed=32, **STRUCTURE)
PROMPTS = {
    "story": "Write a short story about a robot who learns to paint.",
    "explain": "Explain how a refrigerator works, step by step.",
    "facts": "List five facts about the planet Mars and explain each one.",
}
MTP_K = (1, 2, 3)


def model(name: str, shape) -> Path:
    path = MODELS / name
    if not path.exists():
        MODELS.mkdir(parents=True, exist_ok=True)
        tiny_models.write_model(path, shape, chat_template=tiny_models.CHATML)
    return path


def peer(target: Path, prompt: str, n: int, k: int) -> PeerRun:
    """llama-speculative-simple with llama.cpp's MTP drafting."""
    return peer_run(["-m", target, "-p", prompt, "-n", n, "--spec-type", "draft-mtp", "--spec-draft-n-max", k,
                     "--spec-draft-n-min", "0", "--draft-p-min", "0.0", "--temp", "0", "-t", THREADS, "-c", CTX,
                     "-fit", "off", "--seed", "1"])


def run(target, draft, tokens, n, setting, learned):
    """(decode tokens/s, tokens, stats or None, decode seconds) of one greedy generation. auto runs cold (nothing
    learned before), except "mtp auto warm": from what the runs of that setting before it learned (in learned)."""
    opts = dict(n_ctx=CTX, n_threads=THREADS, temperature=0)
    if setting == "plain":
        decoder = target.session(sampling=pymoe.SamplingParams.greedy(), n_ctx=CTX, n_threads=THREADS)
    elif setting == "model auto":
        decoder = pymoe.Speculative(target, draft, draft_max="auto", warm_start=False, **opts)
    else:  # "mtp k", "mtp auto" or "mtp auto warm"
        k = setting.split()[1]
        decoder = pymoe.Speculative(target, "mtp", draft_max=k if k == "auto" else int(k),
                                    warm_start=learned if setting.endswith("warm") else False, **opts)
    with decoder:
        decoder.feed(tokens)
        t0 = time.perf_counter()
        out = list(decoder.generate_tokens(None, max_tokens=n))
        seconds = time.perf_counter() - t0
        return len(out) / seconds, out, decoder.stats if setting != "plain" else None, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("-n", type=int, default=128)
    args = ap.parse_args()
    if not PEER.exists():
        print(f"{PEER} is missing: run `make bench-peer` first", file=sys.stderr)
        return 2
    target_path, draft_path = model("mtp-bench-qwen35moe.gguf", TARGET), model("mtp-bench-draft.gguf", DRAFT)
    target, draft = pymoe.Model(target_path, mtp=True), pymoe.Model(draft_path)
    settings = (["plain"] + [f"mtp {k}" for k in MTP_K] + ["mtp auto", "mtp auto warm", "model auto"] +
                [f"peer mtp {k}" for k in MTP_K])
    learned = Path(tempfile.mkdtemp(prefix="pymoe-learned-"))  # what "mtp auto warm" keeps between its runs
    lines = ["# MTP self-speculation vs a draft model vs plain, and llama.cpp's draft-mtp", "",
             f"Target `{target_path.name}`: {target.info.desc}, {target.info.n_layers} layers + "
             f"{target.info.n_nextn_layers} nextn layer, {target.info.n_experts} experts ({target.info.n_experts_used} "
             f"used), F32, {target_path.stat().st_size >> 20} MiB; draft `{draft_path.name}` ({draft.info.desc}). "
             f"Greedy, {args.reps} repetitions x {args.n} tokens per prompt, {THREADS} threads, settings interleaved "
             "in each repetition. Decode tokens/s (median) and x pymoe plain (median of per-repetition ratios). "
             "peer: llama.cpp's `llama-speculative-simple --spec-type draft-mtp --spec-draft-n-max k "
             "--spec-draft-n-min 0 --draft-p-min 0` on the same chat-formatted prompt. auto starts cold (nothing "
             "learned before); mtp auto warm starts from what its own runs before it learned (its first run, "
             "the first prompt's first repetition, is cold).", ""] + machine_lines() + [""]
    lines += ["| prompt | " + " | ".join(settings) + " |", "|---|" + "---|" * len(settings)]
    head_cost, depth = {}, {}
    per_round = {k: {"pymoe": [], "peer": [], "pymoe acceptance": [], "peer acceptance": []} for k in MTP_K}
    identical = True
    for title, text in PROMPTS.items():
        formatted = target.chat_format([{"role": "user", "content": text}])
        tokens = target.tokenize(formatted, parse_special=True)
        rates = {s: [] for s in settings}
        for r in range(args.reps):
            print(f"{title} rep {r + 1}", file=sys.stderr, flush=True)
            for s in settings:
                if s.startswith("peer"):
                    k = int(s.split()[-1])
                    p = peer(target_path, formatted, args.n, k)
                    rates[s].append(p.rate)
                    per_round[k]["peer"].append(p.seconds_per_round)
                    per_round[k]["peer acceptance"].append(p.acceptance or 0.0)
                    continue
                rate, out, st, seconds = run(target, draft, tokens, args.n, s, learned)
                rates[s].append(rate)
                if s == "plain":
                    plain_out, step = out, 1.0 / rate
                    continue
                identical = identical and out == plain_out
                if s in (f"mtp {k}" for k in MTP_K):
                    k = int(s.split()[-1])
                    per_round[k]["pymoe"].append(seconds / st.rounds)
                    per_round[k]["pymoe acceptance"].append(st.acceptance)
                if s.startswith("mtp") and st.drafted:
                    head_cost.setdefault(s, []).append((st.mtp_seconds / st.drafted) / step)
                    for i, a in st.depth_acceptance.items():
                        depth.setdefault(s, {}).setdefault(i, []).append(a)
        ratios = {s: statistics.median(a / b for a, b in zip(rates[s], rates["plain"])) for s in settings}
        lines.append(f"| {title} | " + " | ".join(f"{statistics.median(rates[s]):.1f}" +
                                                   ("" if s == "plain" else f" ({ratios[s]:.2f}x)")
                                                   for s in settings) + " |")
    lines += ["", "Per round at the same k (median over prompts and repetitions): the two generate different text "
              "(the peer's greedy output parts from plain decoding where batched and single-token logits of this "
              "hybrid differ, so its drafts are tested on other tokens), so acceptance differs; a round's time is "
              "what the MTP machinery costs. pymoe: decode seconds / rounds; peer: decode seconds / committed rounds "
              "(emitted - accepted; its checkpoint restores' extra batches fall within them).", "",
              "| k | pymoe ms per round | peer ms per round | pymoe / peer | pymoe acceptance | peer acceptance |",
              "|---|---|---|---|---|---|"]
    for k, v in per_round.items():
        a, b = statistics.median(v["pymoe"]) * 1e3, statistics.median(v["peer"]) * 1e3
        lines.append(f"| {k} | {a:.1f} | {b:.1f} | {a / b:.2f} | {statistics.median(v['pymoe acceptance']):.0%} | "
                     f"{statistics.median(v['peer acceptance']):.0%} |")
    lines += ["", f"Greedy output of every pymoe setting identical to plain decoding: {'yes' if identical else 'NO'}.", "",
              "The MTP head's drafting time (catch-up and drafts) per draft token, as a share of a plain target "
              "step (median over prompts and repetitions), and its acceptance by draft depth:", "",
              "| setting | head time per draft / target step | acceptance by depth |", "|---|---|---|"]
    for s in settings:
        if s in head_cost:
            acc = ", ".join(f"{i}: {statistics.median(v):.0%}" for i, v in sorted(depth.get(s, {}).items()))
            lines.append(f"| {s} | {statistics.median(head_cost[s]):.1%} | {acc} |")
    target.close()
    draft.close()
    return write("mtp.md", lines)


if __name__ == "__main__":
    sys.exit(main())
