"""Speculative decoding benchmark: pymoe vs llama.cpp's llama-speculative-simple.

Targets are MoEs upcycled from SmolLM2-135M (made once, cached under ~/.cache/pymoe/models);
the draft is SmolLM2-135M itself. Greedy, several prompts, side by side in one
run: plain decoding of the target, pymoe at fixed k and auto, and
llama-speculative-simple (built from the same vendored source) at the same k.
Also the verify cost curve t_verify(n) / t_verify(1) of each target.

    python -P bench/speculative.py [--tokens 128] [--out bench/results/speculative.md]

llama-speculative-simple is built with `make bench-peer` (build/peer).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pymoe
from pymoe.demo_models import smollm2, smollm2_moe

sys.path.insert(0, str(Path(__file__).resolve().parent))  # python -P does not add the script's folder
from peer import SPECULATIVE_SIMPLE, speculative_simple  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PEER = SPECULATIVE_SIMPLE
PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain how a refrigerator works, step by step.",
    "List five facts about the planet Mars and explain each one.",
]
# name: (experts, used, expert type, every other tensor F32)
TARGETS = {"sparse": (64, 8, "q8_0", False), "dense-like": (8, 8, "q8_0", False),
           "f32": (4, 2, "f32", True)}  # F32 weights: batches are cheap on CPUs, so drafting can pay
KS = [1, 2, 4, 8]
THREADS = 2
SESSION = dict(n_ctx=2048, n_threads=THREADS)


def target_path(experts: int, used: int, expert_type: str, rest_f32: bool) -> Path:
    return smollm2_moe(experts, used, expert_type, noise=0.1, rest_f32=rest_f32)


def chat(prompt: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def plain(target: pymoe.Model, prompt: str, n: int):
    with target.session(sampling=pymoe.SamplingParams.greedy(), **SESSION) as s:
        s.feed(target.tokenize(chat(prompt), parse_special=True))
        t0 = time.perf_counter()
        ids = [t.id for t in s.generate(None, max_tokens=n)]
        return ids, len(ids) / (time.perf_counter() - t0)


def speculative(target, draft, prompt, n, k):
    with pymoe.Speculative(target, draft, draft_max=k, temperature=0, warm_start=False,
                           **SESSION) as spec:
        spec.feed(target.tokenize(chat(prompt), parse_special=True))
        t0 = time.perf_counter()
        ids = list(spec.generate_tokens(None, max_tokens=n))
        rate = len(ids) / (time.perf_counter() - t0)
        return ids, rate, spec.stats


def peer(target_file: Path, draft_file: Path, prompt: str, n: int, k: int):
    rate, acceptance = speculative_simple(target_file, draft_file, chat(prompt), n, k, threads=THREADS, ctx=2048)
    return rate, acceptance if acceptance is not None else float("nan")


def paired(target, draft, best_k, n, reps):
    """Noise-robust ratios: plain, auto and the best fixed k run back to back
    on the same prompt, reps times per prompt; ratios are taken within a triple."""
    out = {"auto/plain": [], "auto/best": [], "k_hist": {}}
    for prompt in PROMPTS:
        for _ in range(reps):
            _, plain_rate = plain(target, prompt, n)
            _, auto_rate, stats = speculative(target, draft, prompt, n, "auto")
            for k, rounds in stats.rounds_by_k.items():
                out["k_hist"][k] = out["k_hist"].get(k, 0) + rounds
            _, best_rate, _ = speculative(target, draft, prompt, n, best_k)
            out["auto/plain"].append(auto_rate / plain_rate)
            out["auto/best"].append(auto_rate / best_rate)
    out["k_hist"] = dict(sorted(out["k_hist"].items()))
    return out


def verify_curve(target: pymoe.Model, n_max: int = 9, reps: int = 7):
    """Median seconds of a target batch of n tokens at a fixed context, n = 1..n_max."""
    times = {}
    with target.session(**SESSION) as s:
        s.feed(target.tokenize(chat(PROMPTS[0]), parse_special=True))
        batch = target.tokenize(" the cat sat on the mat and looked at the door", add_special=False)
        for n in range(1, n_max + 1):
            samples = []
            for _ in range(reps + 1):
                t0 = time.perf_counter()
                s.feed(batch[:n], all_logits=True)
                samples.append(time.perf_counter() - t0)
                s.rewind(n)
            times[n] = statistics.median(samples[1:])
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "speculative.md"))
    parser.add_argument("--no-peer", action="store_true", help="skip llama-speculative-simple")
    parser.add_argument("--reps", type=int, default=3, help="paired repetitions per prompt")
    parser.add_argument("--targets", default="sparse,dense-like,f32",
                        help=f"comma-separated, from {', '.join(TARGETS)}")
    args = parser.parse_args()
    if not args.no_peer and not PEER.exists():
        print(f"{PEER} is missing: run `make bench-peer` (or pass --no-peer)", file=sys.stderr)
        return 1
    n = args.tokens
    draft_file = Path(smollm2())
    lines = [f"# Speculative decoding: pymoe vs llama-speculative-simple ({time.strftime('%Y-%m-%d')})", "",
             f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
             f"- pymoe {pymoe.__version__}, llama.cpp {pymoe.llama_version()} (same vendored source for the peer)",
             f"- draft: {draft_file.name}; greedy; {n} tokens per prompt, {len(PROMPTS)} prompts (chat format); "
             f"{THREADS} threads; p_min 0 on both sides; generation ends at n tokens or end of generation; rates are medians over prompts (tokens/s of decoding, "
             "prefill excluded)", ""]
    for name in args.targets.split(","):
        experts, used, expert_type, rest_f32 = TARGETS[name]
        tfile = target_path(experts, used, expert_type, rest_f32)
        print(f"== {name}: {tfile.name}", file=sys.stderr)
        with pymoe.Model(tfile) as target, pymoe.Model(draft_file) as draft:
            rows = []
            plain_ids, plain_rates = {}, []
            for p in PROMPTS:
                ids, rate = plain(target, p, n)
                plain_ids[p] = ids
                plain_rates.append(rate)
            base = statistics.median(plain_rates)
            rows.append(("plain (target only)", base, None, None, 0))
            print(f"plain {base:.1f} tok/s", file=sys.stderr)
            configs = [(k, f"k={k}") for k in KS] + [("auto", "auto (k_max 8)")]
            for k, label in configs:
                rates, acc, diverged, chosen, peer_results, vs_peer = [], [], 0, [], [], []
                for p in PROMPTS:  # pymoe and the peer back to back on each prompt
                    ids, rate, stats = speculative(target, draft, p, n, k)
                    rates.append(rate)
                    acc.append(stats.acceptance)
                    diverged += ids != plain_ids[p]
                    chosen.append(stats.last_k)
                    if k != "auto" and not args.no_peer:
                        peer_results.append(peer(tfile, draft_file, p, n, k))
                        vs_peer.append(rate / peer_results[-1][0])
                peer_rate = peer_acc = None
                if peer_results:
                    peer_rate = statistics.median(r for r, _ in peer_results)
                    peer_acc = statistics.median(a for _, a in peer_results)
                rate = statistics.median(rates)
                rows.append((f"pymoe {label}", rate, statistics.median(acc), peer_rate, diverged,
                             peer_acc, chosen if k == "auto" else None,
                             statistics.median(vs_peer) if vs_peer else None))
                print(f"{label}: {rate:.1f} tok/s, acceptance {statistics.median(acc):.2f}, peer {peer_rate}",
                      file=sys.stderr)
            fixed = [r for r in rows[1:] if not r[0].startswith("pymoe auto")]
            best_row = max(fixed, key=lambda r: r[1])
            best_k = int(best_row[0].split("=")[1])
            pairs = paired(target, draft, best_k, n, args.reps)
            curve = verify_curve(target)
        rest = ", every tensor F32" if rest_f32 else ""
        lines += [f"## {name} target: E={experts}, K={used}, {expert_type.upper()} experts{rest} "
                  f"({tfile.stat().st_size / 2**30:.2f} GiB)",
                  "", "| run | pymoe tok/s | x plain | acceptance | llama-speculative-simple tok/s "
                  "| pymoe / peer (median per prompt) "
                  "| peer acceptance | prompts differing from plain greedy |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            label, rate, acc = row[0], row[1], row[2]
            if acc is None:
                lines.append(f"| {label} | {rate:.1f} | 1.00 | - | - | - | - | - |")
                continue
            peer_rate, diverged, peer_acc, chosen, vs_peer = row[3], row[4], row[5], row[6], row[7]
            peer_cells = (f"{peer_rate:.1f} | {vs_peer:.2f} | {peer_acc:.2f}" if peer_rate else "- | - | -")
            extra = f" (last k per prompt: {chosen})" if chosen else ""
            lines.append(f"| {label}{extra} | {rate:.1f} | {rate / base:.2f} | {acc:.2f} | {peer_cells} | "
                         f"{diverged}/{len(PROMPTS)} |")
        ratio = lambda xs: f"{statistics.median(xs):.3f} (min {min(xs):.3f}, max {max(xs):.3f})"
        lines += ["", f"Paired runs, interleaved (plain, auto, k={best_k}: the best fixed k above), "
                  f"{len(pairs['auto/plain'])} pairs ({len(PROMPTS)} prompts x {args.reps}): "
                  f"auto / plain = {ratio(pairs['auto/plain'])}; auto / k={best_k} = {ratio(pairs['auto/best'])}; "
                  f"k chosen by auto (rounds at each k, all pairs): {pairs['k_hist']}"]
        lines += ["", "Verify cost curve (target batch of n tokens, median of 7, relative to n = 1):", "",
                  "| n | " + " | ".join(str(i) for i in curve) + " |",
                  "|---|" + "---|" * len(curve),
                  "| t(n)/t(1) | " + " | ".join(f"{curve[i] / curve[1]:.2f}" for i in curve) + " |",
                  "| t(n) ms | " + " | ".join(f"{curve[i] * 1e3:.1f}" for i in curve) + " |", ""]
        plot(curve, name, Path(args.out).with_name(f"verify-cost-{name}.png"))
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def plot(curve, name, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = list(curve)
    ax.plot(xs, [curve[x] / curve[1] for x in xs], marker="o", label=name)
    ax.plot(xs, xs, linestyle=":", color="grey", label="linear")
    ax.set_xlabel("tokens in the verify batch (k + 1)")
    ax.set_ylabel("t_verify(n) / t_verify(1)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    sys.exit(main())
