"""The 8 GB scenario on a real GPU: a 30B-A3B-shaped MoE target whose experts
cannot fit the VRAM budget, with its dense draft, pymoe side by side with
llama.cpp's own tools at the same placement.

    python -P bench/gpu/bench.py --models DIR --peers BIN --out DIR --part pymoe|cache|peers
    python -P bench/gpu/bench.py --out DIR --table      # the table of what was measured

Each measurement is appended to OUT/results.jsonl as it finishes (a run cut
short keeps what it measured); --table prints them side by side with ratios.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PROMPT = "Write a detailed report on the history of the printing press and its effect on Europe."
# Sampling at temperature 1 among the 40 most likely tokens: greedy decoding of
# a random-weight model falls into a loop of one token, which routes every
# token of a verify batch to the same experts and hides the cost that matters
# here. Draft and target share their dense weights, so their distributions stay
# close and stochastic verification still accepts often.
SAMPLING = dict(temperature=1.0, top_k=40, top_p=1.0, min_p=0.0)
# Greedy too, the setting llama-speculative-simple can be compared in (at
# temperature 1 it accepts only exact matches): the caveat above applies.
GREEDY = dict(temperature=0.0, top_k=40, top_p=1.0, min_p=0.0)


def record(out: Path, **row) -> None:
    row["time"] = time.strftime("%H:%M:%S")
    print(json.dumps(row), flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


class PymoeRuns:
    def __init__(self, args):
        import pymoe
        self.pymoe = pymoe
        self.args = args
        self.threads = args.threads
        self.target = str(args.models / "target.gguf")
        self.draft_path = str(args.models / "draft.gguf")
        self.last_cache = None  # the expert cache's counts of the last run (None: no cache)

    def session_params(self, fa="auto", kv="f16"):
        return dict(n_ctx=self.args.ctx, n_threads=self.threads, n_threads_batch=self.threads, flash_attn=fa,
                    cache_type_k=kv, cache_type_v=kv)

    def prompt_tokens(self, model):
        return model.tokenize(PROMPT)

    def plain(self, model, fa="auto", kv="f16", sampling=SAMPLING):
        pymoe = self.pymoe
        with model.session(sampling=pymoe.SamplingParams(**sampling), seed=1, **self.session_params(fa, kv)) as s:
            s.feed(self.prompt_tokens(model))
            t0 = time.perf_counter()
            n = sum(1 for _ in s.generate(None, max_tokens=self.args.tokens))
            rate = n / (time.perf_counter() - t0)
            self.last_cache = s.moe_cache.as_json() if s.moe_cache else None
            return rate

    def prefill(self, model, fa="auto", kv="f16"):
        ids = np.random.default_rng(0).integers(1000, 30000, self.args.prompt_tokens).tolist()
        with model.session(**self.session_params(fa, kv)) as s:
            s.feed(ids[:16])  # warm: first-use allocations are not prefill
            s.reset()
            t0 = time.perf_counter()
            s.feed(ids)
            return len(ids) / (time.perf_counter() - t0)

    def spec(self, target, draft, k, sampling=SAMPLING):
        """tokens/s and what a round was made of: ms per round of the draft,
        the verify batch, rollback and the rest, as the loop measured them."""
        pymoe = self.pymoe
        source, k = ("ngram", "auto") if k == "ngram" else (draft, k)  # "ngram": lookup drafts, auto length
        with pymoe.Speculative(target, source, draft_max=k, seed=1, **sampling, **self.session_params()) as sp:
            sp.feed(self.prompt_tokens(target))
            t0 = time.perf_counter()
            n = sum(1 for _ in sp.generate_tokens(None, max_tokens=self.args.tokens))
            rate = n / (time.perf_counter() - t0)
            st = sp.stats
            self.last_cache = st.moe_cache.as_json() if st.moe_cache else None
            per_round = {name: round(1000 * seconds / max(1, st.rounds), 3) for name, seconds in (
                ("draft", st.draft_seconds), ("verify", st.verify_seconds), ("rollback", st.rollback_seconds),
                ("other", st.other_seconds))}
            return dict(tps=round(rate, 2), acceptance=round(st.acceptance, 3),
                        rounds_by_k=dict(sorted(st.rounds_by_k.items())), round_ms=per_round,
                        tokens_per_round=round(st.tokens_per_round, 3), gated_rounds=st.gated_rounds,
                        max_verify_batch=st.max_verify_batch)

    def routing(self, model):
        """How the target routes the prompt and its own continuation (pymoe.routing_report)."""
        pymoe = self.pymoe
        with model.session(sampling=pymoe.SamplingParams(**SAMPLING), seed=1, **self.session_params()) as s:
            prompt = self.prompt_tokens(model)
            s.feed(prompt)
            tokens = prompt + list(s.generate_tokens(None, max_tokens=64))
        return pymoe.routing_report(model, tokens, n_threads=self.threads)

    def verify_costs(self, model, n_max=9, reps=5):
        """Median ms of one target batch of n sampled-looking tokens at a fixed
        position, n = 1..n_max: what a verify of k = n - 1 drafts costs."""
        rng = np.random.default_rng(1)
        times = {}
        with model.session(**self.session_params()) as s:
            s.feed(self.prompt_tokens(model))
            for n in range(1, n_max + 1):
                samples = []
                for _ in range(reps + 1):
                    batch = rng.integers(1000, 30000, n).tolist()  # fresh tokens: fresh expert choices
                    t0 = time.perf_counter()
                    s.feed(batch, all_logits=True)
                    samples.append(time.perf_counter() - t0)
                    s.rewind(n)
                times[n] = float(np.median(samples[1:])) * 1000
        return times

    def load(self, n_cpu_moe, mode, moe_cache_mib=0, cap=0):
        lines = []
        handler = BufferLines(lines)
        log = logging.getLogger("pymoe")
        level = log.level
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        try:
            t0 = time.perf_counter()
            m = self.pymoe.Model(self.target, load_mode=mode, n_gpu_layers=-1, n_cpu_moe=n_cpu_moe,
                                 moe_cache_mib=moe_cache_mib, moe_cache_uploads=cap)
            wall = time.perf_counter() - t0
        finally:
            log.removeHandler(handler)
            log.setLevel(level)
        self.buffer_lines = lines
        r = m.load_report
        info = dict(load_mode=r.load_mode, load_s=round(wall, 2), locked_gib=round(r.locked_bytes / 2**30, 2),
                    pinned_gib=round(r.pinned_bytes / 2**30, 2), pin_failures=r.pin_failures,
                    gpu_weights_gib=round(sum(r.device_bytes[1:]) / 2**30, 2),
                    ram_weights_gib=round(r.device_bytes[0] / 2**30, 2))
        if moe_cache_mib:
            c = m.moe_cache
            info.update(cache_slots=c.n_slots, cache_layers=c.n_layers, cache_gib=round(c.bytes / 2**30, 2),
                        cache_note=c.note)
        return m, info

    def run_cache(self, out: Path):
        """The expert cache under the same budget: every layer's experts in RAM and what the plan leaves
        to the cache, with an upload cap of 1 per layer and decode, and with none."""
        pymoe, a = self.pymoe, self.args
        plan = pymoe.plan(self.target, draft=self.draft_path, vram=a.vram, ctx=a.ctx, moe_cache="auto")
        print(plan.summary(), flush=True)
        record(out, engine="pymoe", what="plan", placement="cache", n_cpu_moe=plan.n_cpu_moe,
               ngl=plan.n_gpu_layers, draft_on_gpu=plan.draft_on_gpu, gpu_gib=round(plan.gpu_total / 2**30, 2),
               flags=plan.llama_flags() + f" (pymoe: --moe-cache-mib {plan.moe_cache_mib})",
               n_layers=plan.n_layers, cache_slots=plan.moe_cache_slots)
        if not plan.moe_cache_mib:
            record(out, engine="pymoe", what="error", cmd="cache plan", log=plan.note or "no room for a cache")
            return
        draft = pymoe.Model(self.draft_path, load_mode="no-mmap", n_gpu_layers=-1 if plan.draft_on_gpu else 0)
        for cap in (1, 0):
            place = f"cache {plan.moe_cache_mib} MiB, cap {cap or 'none'} (n_cpu_moe={plan.n_cpu_moe})"
            try:
                self.measure(out, draft, place, plan.n_cpu_moe, "auto", "cache", plan.moe_cache_mib, cap)
            except self.pymoe.PymoeError as exc:
                record(out, engine="pymoe", what="error", cmd=place, log=str(exc))
        draft.close()

    def run(self, out: Path):
        pymoe, a = self.pymoe, self.args
        plan = pymoe.plan(self.target, draft=self.draft_path, vram=a.vram, ctx=a.ctx)
        print(plan.summary(), flush=True)
        record(out, engine="pymoe", what="plan", n_cpu_moe=plan.n_cpu_moe, ngl=plan.n_gpu_layers,
               draft_on_gpu=plan.draft_on_gpu, gpu_gib=round(plan.gpu_total / 2**30, 2),
               flags=plan.llama_flags(), n_layers=plan.n_layers)
        split, all_ram = plan.n_cpu_moe, plan.n_layers
        draft = pymoe.Model(self.draft_path, load_mode="no-mmap", n_gpu_layers=-1)
        groups = [(f"split (n_cpu_moe={split})", split, "auto", True), (f"all-ram (n_cpu_moe={all_ram})", all_ram,
                  "auto", False)]
        groups += [(f"split (n_cpu_moe={split})", split, mode, None) for mode in ("mmap", "no-mmap", "mlock")]
        for place, n_cpu_moe, mode, full in groups:
            try:  # one failed configuration is recorded, the others still run
                self.measure(out, draft, place, n_cpu_moe, mode, full)
            except self.pymoe.PymoeError as exc:
                record(out, engine="pymoe", what="error", cmd=f"{place} load_mode={mode}", log=str(exc))
        draft.close()

    def measure(self, out, draft, place, n_cpu_moe, mode, full, moe_cache_mib=0, cap=0):
        """full: every setting; False: plain and auto, and prefill; None: the load and plain decoding only;
        "cache": plain, k = 2 and auto with an expert cache (its counts recorded with each run).
        Decode settings run in --reps interleaved rounds, so that drift slows each alike."""
        a = self.args
        target, info = self.load(n_cpu_moe, mode, moe_cache_mib, cap)
        with target:
            record(out, engine="pymoe", what="load", placement=place, **info)
            if full is not None:
                record(out, engine="pymoe", what="buffers", placement=place, lines=self.buffer_lines)
            extra = {} if mode == "auto" else {"load": info["load_mode"]}
            if full is None:
                record(out, engine="pymoe", what="decode", placement=place, k=0, temp=1, rep=0, fa="auto", kv="f16",
                       tps=round(self.plain(target), 2), **extra)
                return
            if full == "cache":
                for rep in range(a.reps):
                    for temp, k in ((1, 0), (1, 2), (1, "auto"), (0, 0), (0, "ngram")):
                        sampling = SAMPLING if temp else GREEDY
                        row = (dict(tps=round(self.plain(target, sampling=sampling), 2)) if k == 0
                               else self.spec(target, draft, k, sampling))
                        record(out, engine="pymoe", what="decode", placement=place, k=k, temp=temp, rep=rep,
                               fa="auto", kv="f16", moe_cache=self.last_cache, **row)
                return
            if full:
                r = self.routing(target)
                record(out, engine="pymoe", what="routing", placement=place, reuse=round(r.reuse, 4),
                       reuse_random=round(r.reuse_random, 4), distinct={n: round(v, 2) for n, v in r.distinct.items()},
                       random={n: round(v, 2) for n, v in r.random.items()})
            settings = [(1, k) for k in ([0, 1, 2, 4, "auto"] if full else [0, "auto"])]
            settings += [(0, k) for k in ([0, 2, 4, "auto", "ngram"] if full else [])]  # greedy: comparable with the peer
            for rep in range(a.reps):
                for temp, k in settings:
                    sampling = SAMPLING if temp else GREEDY
                    if k == 0:
                        row = dict(tps=round(self.plain(target, sampling=sampling), 2))
                    else:
                        row = self.spec(target, draft, k, sampling)
                    record(out, engine="pymoe", what="decode", placement=place, k=k, temp=temp, rep=rep, fa="auto",
                           kv="f16", **row)
            if full:
                costs = self.verify_costs(target)
                record(out, engine="pymoe", what="verify", placement=place,
                       ms={n: round(t, 2) for n, t in costs.items()},
                       ratio={n: round(t / costs[1], 2) for n, t in costs.items()})
                for fa, kv in (("on", "f16"), ("off", "f16"), ("on", "q8_0")):
                    record(out, engine="pymoe", what="decode", placement=place, k=0, temp=1, rep=0, fa=fa, kv=kv,
                           tps=round(self.plain(target, fa, kv), 2))
            for fa in (("on", "off") if full else ("on",)):
                record(out, engine="pymoe", what="prefill", placement=place, fa=fa, kv="f16",
                       n=a.prompt_tokens, tps=round(self.prefill(target, fa), 1))


class BufferLines(logging.Handler):
    """llama.cpp's lines about the buffers a load made (where the weights went)."""

    def __init__(self, lines):
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record):
        text = record.getMessage()
        if "buffer size" in text:
            self.lines.append(text.strip())


def peers(args, out: Path) -> None:
    import pymoe
    target, draft = args.models / "target.gguf", args.models / "draft.gguf"
    plan = pymoe.plan(target, draft=draft, vram=args.vram, ctx=args.ctx)  # the same plan as pymoe's runs
    split, all_ram = plan.n_cpu_moe, plan.n_layers
    bench = args.peers / "llama-bench"
    # llama-bench fits nothing unless asked (-fitt): the placement is the one given
    for ncmoe, extra in ((split, ["-fa", "0,1"]), (split, ["-fa", "1", "-ctk", "q8_0", "-ctv", "q8_0"]),
                         (all_ram, ["-fa", "1"])):
        cmd = [str(bench), "-m", str(target), "-ngl", "99", "--n-cpu-moe", str(ncmoe), "-p", str(args.prompt_tokens),
               "-b", "512", "-ub", "512",  # as pymoe's sessions
               "-n", str(args.tokens), "-r", str(args.reps), "-t", str(args.threads), "-o", "jsonl", *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=400)
        if res.returncode != 0:
            record(out, engine="llama.cpp", what="error", cmd=" ".join(cmd), log=res.stderr[-1500:])
            continue
        name = "split" if ncmoe == split else "all-ram"
        for line in res.stdout.splitlines():
            if not line.startswith("{"):
                continue
            r = json.loads(line)
            what = "prefill" if r.get("n_prompt", 0) > 0 else "decode"
            fa = "on" if r.get("flash_attn") in (1, True, "1", "true") else "off"
            record(out, engine="llama.cpp", what=what, placement=f"{name} (n_cpu_moe={ncmoe})", k=0, fa=fa,
                   kv=r.get("type_k", "f16"), tps=round(float(r["avg_ts"]), 2), n=r.get("n_prompt") or r.get("n_gen"))
    spec = args.peers / "llama-speculative-simple"
    for temp, k in ((0, 2), (0, 4), (1, 2)):  # greedy is where the two loops compare (one run each: loads are long)
        cmd = [str(spec), "-m", str(target), "-md", str(draft), "-p", PROMPT, "-n", str(args.tokens),
               "-ngl", "99", "-ngld", "99", "--n-cpu-moe", str(split), "-fit", "off", "-c", str(args.ctx),
               "--spec-type", "draft-simple", "--spec-draft-n-max", str(k), "--spec-draft-n-min", "0",
               "--draft-p-min", "0.0", "--temp", str(temp), "--top-k", "40", "--top-p", "1", "--min-p", "0",
               "-t", str(args.threads), "-td", str(args.threads), "--seed", "1"]
        res = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=400)
        log = res.stdout + res.stderr
        speed = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s", log)
        accept = re.search(r"accept\s+=\s+([\d.]+)%", log)
        if res.returncode != 0 or not speed:
            record(out, engine="llama.cpp", what="error", cmd=" ".join(cmd), log=log[-1500:])
            continue
        record(out, engine="llama.cpp", what="decode", placement=f"split (n_cpu_moe={split})", k=k, temp=temp, rep=0,
               fa="auto", kv="f16", tps=float(speed.group(3)),
               acceptance=float(accept.group(1)) / 100 if accept else None)


def table(out: Path) -> str:
    rows = [json.loads(line) for line in open(out / "results.jsonl")]
    lines = []
    plan = next((r for r in rows if r["what"] == "plan"), None)
    if plan:
        lines.append(f"plan: n_cpu_moe={plan['n_cpu_moe']} of {plan['n_layers']} layers, draft on GPU: "
                     f"{plan['draft_on_gpu']}, planned GPU total {plan['gpu_gib']} GiB; llama.cpp: {plan['flags']}")
    loads = [r for r in rows if r["what"] == "load"]
    if loads:
        lines += ["", "| load | placement | mode used | load s | locked GiB | pinned GiB | GPU weights GiB | RAM weights GiB |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| pymoe | {r['placement']} | {r['load_mode']} | {r['load_s']} | {r['locked_gib']} | "
                  f"{r['pinned_gib']} | {r['gpu_weights_gib']} | {r['ram_weights_gib']} |" for r in loads]
    for r in rows:
        if r["what"] == "buffers":
            lines += ["", f"llama.cpp's buffers, {r['placement']}:", *[f"    {line}" for line in r["lines"]]]
    lines += decode_table(rows)
    lines += cache_table(rows)
    curve = next((r for r in rows if r["what"] == "verify"), None)
    if curve:
        lines += ["", f"verify cost, {curve['engine']}, {curve['placement']}: a batch of n tokens / one token",
                  "| n | " + " | ".join(curve["ratio"]) + " |", "|---|" + "---|" * len(curve["ratio"]),
                  "| x t(1) | " + " | ".join(str(v) for v in curve["ratio"].values()) + " |",
                  "| ms | " + " | ".join(str(v) for v in curve["ms"].values()) + " |"]
        lines += prediction_table(rows, curve)
    for r in rows:
        if r["what"] == "routing":
            ns = list(r["distinct"])
            lines += ["", f"routing, {r['placement']}: the next token reuses {r['reuse']:.0%} of a token's experts "
                      f"(random routing {r['reuse_random']:.0%})", "| batch of n tokens | " + " | ".join(ns) + " |",
                      "|---|" + "---|" * len(ns),
                      "| distinct experts per layer | " + " | ".join(str(r["distinct"][n]) for n in ns) + " |",
                      "| random routing | " + " | ".join(str(r["random"][n]) for n in ns) + " |"]
    for e in (r for r in rows if r["what"] == "error"):
        lines.append(f"\nerror: {e['cmd']}\n{e['log']}")
    return "\n".join(lines)


def _median(values):
    values = [v for v in values if v is not None]
    return float(np.median(values)) if values else None


def decode_table(rows) -> list:
    """Decode and prefill rows grouped by setting: medians over the repeats, and
    each speculative setting's ratio to plain decoding of the same round."""
    plain = {(r["engine"], r["placement"], r.get("temp"), r.get("rep")): r["tps"] for r in rows
             if r["what"] == "decode" and r.get("k") == 0 and r.get("fa") == "auto" and "load" not in r}
    peer_plain = next((r["tps"] for r in rows if r["engine"] == "llama.cpp" and r["what"] == "decode" and
                       r.get("k") == 0 and r.get("fa") == "on" and r.get("kv") == "f16" and
                       r["placement"].startswith("split")), None)
    groups = {}
    for r in rows:
        if r["what"] in ("decode", "prefill"):
            key = (r["engine"], r["what"], r["placement"], r.get("load", "auto"), r.get("k", ""), r.get("temp"),
                   r.get("fa", ""), r.get("kv", ""))
            groups.setdefault(key, []).append(r)
    lines = ["", "| engine | what | placement | load | k | T | flash attn | KV | runs | tokens/s (median) | "
             "x plain (paired median) | acceptance | round ms: draft / verify / rollback / other | "
             "tokens/round | gated rounds | largest batch |", "|---" * 16 + "|"]
    for (engine, what, place, load, k, temp, fa, kv), rs in groups.items():
        ratio = None
        if what == "decode" and engine == "pymoe":
            ratio = _median([r["tps"] / plain[(engine, place, r.get("temp"), r.get("rep"))] for r in rs
                             if plain.get((engine, place, r.get("temp"), r.get("rep")))])
        elif what == "decode" and peer_plain:
            ratio = _median([r["tps"] / peer_plain for r in rs])
        acc = _median([r.get("acceptance") for r in rs])
        parts = ""
        if rs[0].get("round_ms"):
            parts = " / ".join(f"{_median([r['round_ms'][p] for r in rs]):.1f}"
                               for p in ("draft", "verify", "rollback", "other"))
        tpr, gated = _median([r.get("tokens_per_round") for r in rs]), _median([r.get("gated_rounds") for r in rs])
        largest = max((r.get("max_verify_batch") or 0 for r in rs), default=0)
        lines.append(f"| {engine} | {what} | {place} | {load} | {k} | {'' if temp is None else temp} | {fa} | {kv} | "
                     f"{len(rs)} | {_median([r['tps'] for r in rs]):.2f} | {'' if ratio is None else f'{ratio:.2f}'} | "
                     f"{'' if acc is None else f'{acc:.2f}'} | {parts} | {'' if tpr is None else f'{tpr:.2f}'} | "
                     f"{'' if gated is None else f'{gated:.0f}'} | {largest or ''} |")
    return lines


def cache_table(rows) -> list:
    """The expert cache's runs against plain decoding without it (the split placement, same temperature):
    the bars are cache >= 1.2x for plain decoding and >= 1.3x with speculation."""
    cached = [r for r in rows if r["what"] == "decode" and r.get("moe_cache")]
    if not cached:
        return []
    base = {}
    for r in rows:
        if r["what"] == "decode" and r["engine"] == "pymoe" and r["placement"].startswith("split") and \
                r.get("k") == 0 and r.get("fa") == "auto" and "load" not in r:
            base.setdefault(r["temp"], []).append(r["tps"])
    lines = ["", "| expert cache | k | T | tokens/s (median) | x plain without cache | hit rate | host MiB/token | "
             "without cache | uploads/token | upload s/token |", "|---" * 10 + "|"]
    groups = {}
    for r in cached:
        groups.setdefault((r["placement"], r["k"], r["temp"]), []).append(r)
    for (place, k, temp), rs in groups.items():
        tps = _median([r["tps"] for r in rs])
        ref = _median(base.get(temp, []))
        c = rs[-1]["moe_cache"]
        tokens = max(c["tokens"], 1)
        lines.append(f"| {place} | {k} | {temp} | {tps:.2f} | {'' if not ref else f'{tps / ref:.2f}'} | "
                     f"{c['hit_rate']:.0%} | {c['host_expert_bytes_per_token'] / 2**20:.0f} | "
                     f"{c['uncached_expert_bytes_per_token'] / 2**20:.0f} | {c['uploads'] / tokens:.1f} | "
                     f"{c['upload_seconds'] / tokens:.4f} |")
    return lines


def prediction_table(rows, curve) -> list:
    """What the verify curve and the measured acceptance predict for each fixed
    k, next to what the rounds measured, and where the difference went."""
    t1 = curve["ms"]["1"]
    plain = _median([r["tps"] for r in rows if r["what"] == "decode" and r["engine"] == "pymoe" and r.get("k") == 0
                     and r.get("temp") == 1 and r["placement"] == curve["placement"] and "load" not in r
                     and r.get("fa") == "auto"])
    lines = ["", f"prediction (temperature 1, {curve['placement']}): a round of k drafts emits "
             "(1 - a^(k+1)) / (1 - a) tokens and costs t_verify(k + 1) from the curve, plus the draft",
             "| k | acceptance | tokens/round | curve t(k+1) ms | predicted x plain (free draft) | "
             "measured round ms: draft + verify + rollback + other | measured x plain |", "|---" * 7 + "|"]
    for k in (1, 2, 4):
        rs = [r for r in rows if r["what"] == "decode" and r["engine"] == "pymoe" and r.get("k") == k and
              r.get("temp") == 1 and r["placement"] == curve["placement"] and r.get("round_ms")]
        tv = curve["ms"].get(str(k + 1))
        if not rs or tv is None or not plain:
            continue
        a = min(0.999, _median([r["acceptance"] for r in rs]))
        emitted = (1 - a ** (k + 1)) / (1 - a)
        ms = {p: _median([r["round_ms"][p] for r in rs]) for p in ("draft", "verify", "rollback", "other")}
        lines.append(f"| {k} | {a:.2f} | {emitted:.2f} | {tv} | {emitted * t1 / tv:.2f} | "
                     f"{ms['draft']:.1f} + {ms['verify']:.1f} + {ms['rollback']:.1f} + {ms['other']:.1f} = "
                     f"{sum(ms.values()):.1f} | {_median([r['tps'] for r in rs]) / plain:.2f} |")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path)
    parser.add_argument("--peers", type=Path, help="folder with llama-bench and llama-speculative-simple")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--part", choices=("pymoe", "cache", "peers"))
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--vram", default="8GiB")
    parser.add_argument("--ctx", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part == "pymoe":
        print(f"machine: {platform.node()} {platform.processor()} {os.cpu_count()} CPUs", flush=True)
        PymoeRuns(args).run(args.out)
    elif args.part == "cache":
        PymoeRuns(args).run_cache(args.out)
    elif args.part == "peers":
        peers(args, args.out)
    if args.table or args.part is None:
        print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
