"""Fuzz pymoe with mutated GGUF models: every case goes through plan(),
memory_plan(), Model() with a session, and upcycle(), in a process of its own.

    python -P tests/fuzz/fuzz.py --cases 10000 --jobs 2 --out build/fuzz

A parent process imports pymoe once and forks a child per case, so a crash or a
hang costs only that child. Each target's outcome is one of: loaded (it worked),
typed (a pymoe error, the promise for bad files), other (any other exception: a
defect), crash (the child died of a signal or exited without reporting), hang
(a target ran past --hang seconds). Cases that are not loaded or typed are kept
under OUT/findings with what was done to them and the child's stderr. Exit 1 when
any case crashed, hung or raised an untyped exception."""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import gguf_codec  # noqa: E402
import mutate  # noqa: E402

TARGETS = ("plan", "memory_plan", "model", "upcycle")
BAD = ("crash", "hang", "other")


def make_seeds(seed_dir: Path) -> list[dict]:
    """The tiny models of the test suite as seeds: dense (upcycle's input), two MoEs, a hybrid with an
    MTP head, and a two-file split model (its first part is mutated, the second copied along)."""
    import tiny_models as tm
    seed_dir.mkdir(parents=True, exist_ok=True)
    seeds = []
    for name, shape in (("dense", tm.DENSE), ("llama-moe", tm.LLAMA_MOE), ("qwen3moe", tm.QWEN3MOE),
                        ("qwen35moe-mtp", tm.QWEN35MOE_MTP)):
        path = seed_dir / f"{name}.gguf"
        if not path.exists():
            tm.write_model(path, shape)
        seeds.append({"name": name, "path": path, "parts": []})
    split = seed_dir / "split.gguf"
    first = seed_dir / "split-00001-of-00002.gguf"
    if not first.exists():
        tm.write_model(split, tm.LLAMA_MOE, split_max_tensors=12)
    seeds.append({"name": "split", "path": first, "parts": [seed_dir / "split-00002-of-00002.gguf"]})
    for s in seeds:
        s["gguf"] = gguf_codec.parse(s["path"].read_bytes())
        s["cache"] = {}
        for _, v in s["gguf"].kv:
            raw, fields = gguf_codec.value_bytes(v)
            s["cache"][id(v)] = (raw, fields[:32] + fields[-32:] if len(fields) > 64 else fields)
    return seeds


def make_case(seeds: list[dict], master: int, number: int, case_dir: Path) -> tuple[Path, dict]:
    """Case `number` of run `master`: the same numbers make the same bytes."""
    rng = random.Random(master * 1_000_003 + number)
    seed = rng.choice(seeds)
    data, done = mutate.mutate(rng, seed["gguf"], seed["cache"])
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    path = case_dir / seed["path"].name
    path.write_bytes(data)
    for part in seed["parts"]:
        if rng.random() < 0.9:  # else: a part is missing
            os.symlink(part, case_dir / part.name)
        else:
            done.append(f"missing {part.name}")
    return path, {"case": number, "seed": seed["name"], "mutations": done}


def run_target(name: str, path: Path, work: Path) -> None:
    import pymoe
    if name == "plan":
        pymoe.plan(path, vram="64MiB", ram="1GiB", ctx=256)
    elif name == "memory_plan":
        pymoe.memory_plan(path)
    elif name == "model":
        with pymoe.Model(path) as model:  # load_mode auto, as users load: its dry run is a llama.cpp load too
            tokens = model.tokenize("Hello, world") or [0]
            with model.session(n_ctx=64) as session:
                session.feed(tokens)
                token = session.sample()
                session.feed([token])
                model.token_piece(token)
                model.detokenize(tokens)
    elif name == "upcycle":
        from pymoe.upcycle import upcycle
        upcycle(path, work / "upcycled.gguf", n_experts=2, n_experts_used=1, expert_type="f32")


def child(path: Path, work: Path, targets: tuple[str, ...], report: int) -> None:
    """Runs in the forked process: one line per target, written as soon as it is known."""
    import pymoe

    def say(**kw):
        os.write(report, (json.dumps(kw) + "\n").encode())

    for name in targets:
        say(start=name, t=time.monotonic())
        try:
            run_target(name, path, work)
            outcome, detail = "loaded", ""
        except pymoe.PymoeError as e:
            outcome, detail = "typed", f"{type(e).__name__}: {e}"[:300]
        except BaseException as e:  # noqa: BLE001 - every other exception is what the fuzzer looks for
            outcome, detail = "other", "".join(traceback.format_exception(e))[-1500:]
        say(target=name, outcome=outcome, detail=detail)


class Running:
    def __init__(self, pid, fd, case, path, info, err_path):
        self.pid, self.fd, self.case, self.path, self.info, self.err_path = pid, fd, case, path, info, err_path
        self.buffer = b""
        self.results: dict[str, dict] = {}
        self.current, self.started = None, time.monotonic()

    def read(self) -> bool:
        chunk = os.read(self.fd, 65536)
        self.buffer += chunk
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            msg = json.loads(line)
            if "start" in msg:
                self.current, self.started = msg["start"], time.monotonic()
            else:
                self.results[msg["target"]] = msg
                self.current = None
        return bool(chunk)


def spawn(path: Path, info: dict, targets, work: Path) -> Running:
    r, w = os.pipe()
    err_path = work / "stderr.txt"
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            os.close(r)
            fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            child(path, work, targets, w)
        finally:
            os._exit(0)
    os.close(w)
    return Running(pid, r, info["case"], path, info, err_path)


def finish(run: Running, timed_out: bool, targets) -> dict:
    if timed_out:
        os.kill(run.pid, signal.SIGKILL)
    _, status = os.waitpid(run.pid, 0)
    while run.read():
        pass
    os.close(run.fd)
    outcomes = {t: run.results[t]["outcome"] for t in targets if t in run.results}
    details = {t: run.results[t]["detail"] for t in targets if t in run.results and run.results[t]["detail"]}
    if timed_out:
        outcomes[run.current or "?"] = "hang"
    elif run.current is not None or len(outcomes) < len(targets):
        why = f"signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"
        outcomes[run.current or "?"] = "crash"
        details[run.current or "?"] = why
    return {**run.info, "outcomes": outcomes, "details": details}


ASSERT = re.compile(r"([\w./-]+\.(?:c|cpp|h)):(\d+): (.{0,120})")


def caught_asserts(result: dict) -> list[str]:
    """llama.cpp assertions that pymoe's guard turned into typed errors ("file.cpp:line: message")."""
    sites = []
    for target, outcome in result["outcomes"].items():
        m = ASSERT.search(result["details"].get(target, "")) if outcome == "typed" else None
        if m:
            sites.append(f"{Path(m.group(1)).name}:{m.group(2)}: {m.group(3).split(';')[0]}")
    return sites


def case_outcome(result: dict) -> str:
    values = set(result["outcomes"].values())
    for bad in BAD:
        if bad in values:
            return bad
    return "typed" if "typed" in values else "loaded"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--first", type=int, default=0, help="number of the first case (to rerun one: --first N --cases 1)")
    ap.add_argument("--seed", type=int, default=1, help="the run's seed: the same seed makes the same cases")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--hang", type=float, default=10.0, help="seconds one target may run (default 10)")
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--out", type=Path, default=HERE.parent.parent / "build" / "fuzz")
    ap.add_argument("--json", type=Path, help="write the counts and findings here")
    ap.add_argument("--record", action="store_true", help="add the counts to tests/fuzz/results.md")
    args = ap.parse_args(argv)
    targets = tuple(t for t in args.targets.split(",") if t)
    unknown = set(targets) - set(TARGETS)
    if unknown or args.cases < 0 or args.jobs < 1:
        ap.error(f"targets are {', '.join(TARGETS)}; cases >= 0, jobs >= 1")

    os.environ["GGML_NO_BACKTRACE"] = "1"  # an abort prints its message, not a debugger's backtrace
    import pymoe  # noqa: F401 - once, in the parent: every child starts with it imported
    seeds = make_seeds(args.out / "seeds")
    findings = args.out / "findings"
    counts = {k: 0 for k in ("loaded", "typed", *BAD)}
    per_target = {t: {k: 0 for k in ("loaded", "typed", *BAD)} for t in targets}
    found: list[dict] = []
    asserts: dict[str, int] = {}  # llama.cpp assertion -> cases where the guard caught it
    running: dict[int, Running] = {}
    slots = [args.out / f"work{j}" for j in range(args.jobs)]
    free = list(range(args.jobs))
    numbers = iter(range(args.first, args.first + args.cases))
    t0, done = time.monotonic(), 0
    log = open(args.out / "cases.jsonl", "w")  # every case's outcomes and messages
    while True:
        while free:
            number = next(numbers, None)
            if number is None:
                break
            j = free.pop()
            try:
                path, info = make_case(seeds, args.seed, number, slots[j])
            except Exception:  # a mutator's own bug: said, counted, and the run goes on
                print(f"case {number}: the mutator failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
                counts["not made"] = counts.get("not made", 0) + 1
                free.append(j)
                continue
            run = spawn(path, info, targets, slots[j])
            run.slot = j
            running[run.fd] = run
        if not running:
            break
        ready, _, _ = select.select(list(running), [], [], 0.2)
        now = time.monotonic()
        for fd in list(running):
            run = running[fd]
            eof = fd in ready and not run.read()
            timed_out = run.current is not None and now - run.started > args.hang
            if not (eof or timed_out):
                continue
            del running[fd]
            result = finish(run, timed_out, targets)
            kind = case_outcome(result)
            for site in set(caught_asserts(result)):
                asserts[site] = asserts.get(site, 0) + 1
            log.write(json.dumps(result) + "\n")
            counts[kind] += 1
            for t, o in result["outcomes"].items():
                if t in per_target:
                    per_target[t][o] += 1
            if kind in BAD:
                keep = findings / f"{kind}-{result['case']}"
                shutil.rmtree(keep, ignore_errors=True)
                shutil.copytree(slots[run.slot], keep, symlinks=True)
                err = run.err_path.read_text(errors="replace")
                result["stderr"] = err if len(err) < 3000 else err[:1500] + "\n...\n" + err[-1500:]
                (keep / "result.json").write_text(json.dumps(result, indent=1))
                found.append(result)
                print(f"{kind}: case {result['case']} ({result['seed']}: {'; '.join(result['mutations'])}) "
                      f"{json.dumps(result['details'])[:400]}", file=sys.stderr, flush=True)
            free.append(run.slot)
            done += 1
            if done % 500 == 0:
                print(f"{done}/{args.cases} cases, {time.monotonic() - t0:.0f} s: {counts}", file=sys.stderr,
                      flush=True)
    log.close()
    seconds = time.monotonic() - t0
    summary = {"cases": args.cases, "first": args.first, "seed": args.seed, "seconds": round(seconds, 1),
               "counts": counts, "per_target": per_target,
               "caught_asserts": dict(sorted(asserts.items(), key=lambda kv: -kv[1])), "findings": found}
    print(json.dumps({k: summary[k] for k in ("cases", "seed", "seconds", "counts", "per_target", "caught_asserts")},
                     indent=1))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    if args.record:
        import record
        record.record(f"fuzz.py, {args.cases} cases (seed {args.seed}, first {args.first}, {args.jobs} jobs) in "
                      f"{seconds:.0f} s: " + ", ".join(f"{n} {k}" for k, n in counts.items()) +
                      "; loaded per target: " + ", ".join(f"{t} {c['loaded']}" for t, c in per_target.items()) +
                      f"; llama.cpp asserts caught: {sum(asserts.values())} at {len(asserts)} sites")
    return 1 if any(counts[b] for b in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
