"""Rollback of a hybrid target (gated delta-net + attention, Qwen3.5-MoE style):
recurrent-state snapshots vs checkpoints, side by side in one run, with plain
decoding and llama.cpp's llama-speculative-simple (which uses checkpoints on
such targets) on the same models.

The target is a random-weight qwen35moe written with tests/tiny_models.py
(12 layers, 9 of them recurrent; 32 experts, top-4, and a shared expert; F16),
shaped so that its recurrent state (9.3 MiB per sequence) is a few percent of
the weight bytes a token reads, about the ratio of a Qwen3.5-35B-A3B (its ~66
MiB of state against ~1.7 GB of Q4 weights per token). The draft is a small
dense llama sharing the target's embedding and bigram output, so that they
agree about 60% of the time (tiny_models.Shape.bigram).

    python -P bench/rollback.py [--tokens 96] [--reps 3] [--out bench/results/rollback.md]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import pymoe

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO / "bench")]  # python -P does not add the script's folder
import tiny_models  # noqa: E402 - the project's own GGUF writer
from peer import SPECULATIVE_SIMPLE, speculative_simple  # noqa: E402

PEER = SPECULATIVE_SIMPLE
MODELS = REPO / "build" / "bench-models"
PAIR = dict(embd_seed=100, bigram=True, branch_scale=2.0, n_ctx_train=4096)
TARGET = tiny_models.Shape(arch="qwen35moe", n_layers=12, n_embd=1024, n_head=8, n_head_kv=2, n_ff=256,
                           n_experts=32, n_experts_used=4, n_ff_shared=512, ssm_state=128, ssm_k_heads=4,
                           ssm_v_heads=16, full_attention_interval=4, expert_type="f16", dense_type="f16",
                           seed=31, **PAIR)
DRAFT = tiny_models.Shape(n_layers=4, n_embd=256, n_head=4, n_head_kv=2, n_ff=768, seed=32, **PAIR)
PROMPTS = ["Once upon a time", "The quick brown fox", "1 2 3 4", "Hello"]
THREADS = 2
SESSION = dict(n_ctx=1024, n_threads=THREADS)
KS = [2, 4]
FOOTER = """
Reading the table: "rollback ms/round" is time spent saving and restoring
checkpoints and dropping positions (both models); snapshots cost nothing there
because their writes happen inside every target batch (the 5-token batch line
above). A checkpoint's restore also costs "re-evaluated tokens/round": the
accepted tokens of a partially accepted round, which the next batch evaluates
again. llama-speculative-simple re-runs a partially accepted round with its
accepted tokens as the draft and counts only that re-run, whose drafts all
pass: its acceptance column reads 1.00 (its tokens/s is comparable).
"""


def model(name: str, shape) -> Path:
    MODELS.mkdir(parents=True, exist_ok=True)
    path = MODELS / f"{name}-{hashlib.sha256(repr(shape).encode()).hexdigest()[:8]}.gguf"
    if not path.exists():
        print(f"writing {path.name}", file=sys.stderr)
        tiny_models.write_model(path.with_suffix(".tmp"), shape).rename(path)
    return path


def plain(target, prompt, n):
    with target.session(sampling=pymoe.SamplingParams.greedy(), **SESSION) as s:
        s.feed(target.tokenize(prompt))
        t0 = time.perf_counter()
        ids = [t.id for t in s.generate(None, max_tokens=n)]
        return ids, {"rate": len(ids) / (time.perf_counter() - t0)}


def speculative(target, draft, prompt, n, k, **opts):
    with pymoe.Speculative(target, draft, draft_max=k, temperature=0, warm_start=False, **SESSION,
                           **opts) as sp:
        sp.feed(target.tokenize(prompt))
        t0 = time.perf_counter()
        ids = list(sp.generate_tokens(None, max_tokens=n))
        rate = len(ids) / (time.perf_counter() - t0)
        s = sp.stats
        return ids, {"rate": rate, "acceptance": s.acceptance, "rollback_ms": s.rollback_seconds_per_round * 1e3,
                     "restores": s.restores / s.rounds, "refed": s.refed_tokens / s.rounds,
                     "verify_ms": s.verify_seconds / s.rounds * 1e3, "method": s.rollback_target,
                     "k": dict(s.rounds_by_k)}


def peer(target_file, draft_file, prompt, n, k):
    rate, acceptance = speculative_simple(target_file, draft_file, prompt, n, k, threads=THREADS, ctx=1024)
    return None, {"rate": rate, "acceptance": acceptance}


def costs(target, reps=21):
    """Median milliseconds: saving and restoring a checkpoint of the target, and
    a 5-token batch with and without 4 snapshots (their writes happen in the graph)."""
    tokens = target.tokenize(PROMPTS[0])
    out = {}
    with target.session(**SESSION) as s:
        s.feed(tokens)
        save, restore = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            s.checkpoint()
            save.append(time.perf_counter() - t0)
            s.feed([300, 301, 302])
            t0 = time.perf_counter()
            s.restore()
            restore.append(time.perf_counter() - t0)
        out["save_ms"], out["restore_ms"] = statistics.median(save) * 1e3, statistics.median(restore) * 1e3
        out["state_mib"] = s.checkpoint_bytes / 2**20
    for n_rs_seq in (0, 4):
        with target.session(n_rs_seq=n_rs_seq, **SESSION) as s:
            s.feed(tokens)
            s.checkpoint()
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                s.feed([300, 301, 302, 303, 304], all_logits=True)
                times.append(time.perf_counter() - t0)
                s.restore()
            out[f"batch5_rs{n_rs_seq}_ms"] = statistics.median(times[1:]) * 1e3
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--reps", type=int, default=3, help="rounds over all prompts, settings interleaved")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "rollback.md"))
    parser.add_argument("--no-peer", action="store_true", help="skip llama-speculative-simple")
    args = parser.parse_args()
    if not args.no_peer and not PEER.exists():
        print(f"{PEER} is missing: run `make bench-peer` (or pass --no-peer)", file=sys.stderr)
        return 1
    tfile, dfile = model("rollback-target", TARGET), model("rollback-draft", DRAFT)
    settings = {"plain": None}
    for k in KS:
        settings[f"k={k} snapshot (n_rs_seq {k})"] = (k, dict(rollback="snapshot"))
        settings[f"k={k} checkpoint"] = (k, dict(rollback="checkpoint"))
        if not args.no_peer:
            settings[f"k={k} llama-speculative-simple (checkpoints)"] = ("peer", k)
    settings["auto snapshot (n_rs_seq 4)"] = ("auto", dict(rollback="snapshot"))
    settings["auto checkpoint"] = ("auto", dict(rollback="checkpoint"))
    results = {name: [] for name in settings}
    ratios = {name: [] for name in settings}
    differ = {name: 0 for name in settings}
    with pymoe.Model(tfile) as target, pymoe.Model(dfile) as draft:
        micro = costs(target)
        print(micro, file=sys.stderr)
        for rep in range(args.reps):
            for prompt in PROMPTS:
                base_ids, base = plain(target, prompt, args.tokens)
                results["plain"].append(base)
                ratios["plain"].append(1.0)
                for name, setting in settings.items():
                    if setting is None:
                        continue
                    if setting[0] == "peer":
                        ids, r = peer(tfile, dfile, prompt, args.tokens, setting[1])
                    else:
                        ids, r = speculative(target, draft, prompt, args.tokens, setting[0], **setting[1])
                        differ[name] += ids != base_ids
                    results[name].append(r)
                    ratios[name].append(r["rate"] / base["rate"])
                print(f"rep {rep} {prompt!r}: " + ", ".join(f"{n} {results[n][-1]['rate']:.1f}" for n in settings),
                      file=sys.stderr)

    def med(name, key, fmt):
        values = [r[key] for r in results[name] if r.get(key) is not None]
        return fmt.format(statistics.median(values)) if values else "-"

    runs = len(results["plain"])
    lines = [f"# Rollback of a hybrid target: snapshots vs checkpoints ({time.strftime('%Y-%m-%d')})", "",
             f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
             f"- pymoe {pymoe.__version__}, llama.cpp {pymoe.llama_version()} (the peer built from the same source)",
             f"- target {tfile.name} ({tfile.stat().st_size / 2**20:,.0f} MiB, qwen35moe: 12 layers, 9 gated "
             f"delta-net, 32 experts top-4 + shared expert, F16); draft {dfile.name} (dense llama, 4 layers)",
             f"- greedy, {args.tokens} tokens per prompt, {len(PROMPTS)} prompts x {args.reps} rounds, settings "
             f"interleaved per prompt; {THREADS} threads; medians of {runs} runs; x plain = median of the per-run "
             "ratio to the plain run just before it",
             "", "Costs measured directly (medians of 21):", "",
             f"- recurrent state per sequence (what a checkpoint copies): {micro['state_mib']:.2f} MiB",
             f"- checkpoint save {micro['save_ms']:.2f} ms, restore {micro['restore_ms']:.2f} ms",
             f"- a 5-token target batch: {micro['batch5_rs0_ms']:.1f} ms without snapshots, "
             f"{micro['batch5_rs4_ms']:.1f} ms with 4 (the snapshot writes are part of the batch)",
             "", "| setting | tok/s | x plain | acceptance | rollback ms/round | restores/round "
             "| re-evaluated tokens/round | verify ms/round | runs differing from plain |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in settings:
        ratio = statistics.median(ratios[name])
        lines.append(f"| {name} | {med(name, 'rate', '{:.1f}')} | {ratio:.2f} | {med(name, 'acceptance', '{:.2f}')} "
                     f"| {med(name, 'rollback_ms', '{:.2f}')} | {med(name, 'restores', '{:.2f}')} "
                     f"| {med(name, 'refed', '{:.2f}')} | {med(name, 'verify_ms', '{:.1f}')} "
                     f"| {differ[name] if 'llama' not in name and name != 'plain' else '-'} |")
    chosen = {}
    for name in settings:
        if name.startswith("auto"):
            for r in results[name]:
                for k, c in r["k"].items():
                    chosen.setdefault(name, {}).setdefault(k, 0)
                    chosen[name][k] += c
    lines += ["", "Rounds by the k auto chose, all runs: " + "; ".join(
        f"{name}: {dict(sorted(c.items()))}" for name, c in chosen.items())]
    text = "\n".join(lines) + "\n" + FOOTER
    Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
