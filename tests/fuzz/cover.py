"""Coverage-guided fuzzing of the C GGUF reader (pymoe_gguf_open over ggml's
gguf parser), built with ASan, UBSan and gcc's -fsanitize-coverage=trace-pc.

    python -P tests/fuzz/cover.py --execs 20000 --out build/fuzz

Inputs are GGUF headers: the seeds' tensor data is a hole in a sparse file of
the right size, so a case costs a header's parse. A mutated input that reaches
an edge (or an edge's hit count bucket) no earlier input reached joins the
corpus, and later mutations start from it. A crash (a sanitizer report, an
abort) or a hang (over --hang seconds) is kept under OUT/cover-findings; exit
1 if there was any."""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path[:0] = [str(HERE), str(REPO / "tests")]

import fuzz  # noqa: E402
import gguf_codec  # noqa: E402
import mutate  # noqa: E402

SANITIZE = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-g", "-O1"]
COVERAGE = ["-fsanitize-coverage=trace-pc"]


def build_harness(out: Path) -> Path:
    """The harness binary, rebuilt when a source is newer: the reader's sources instrumented, linked
    against the installed pymoe's libllama and libggml-base for the rest."""
    import pymoe
    lib = Path(pymoe.__file__).resolve().parent / "lib"
    vendor = REPO / "vendor" / "llama.cpp"
    include = [f"-I{REPO / 'csrc'}", f"-I{vendor / 'include'}", f"-I{vendor / 'ggml' / 'include'}",
               f"-I{vendor / 'ggml' / 'src'}"]
    sources = [(REPO / "csrc" / "gguf_file.c", "gcc", COVERAGE), (REPO / "csrc" / "errors.c", "gcc", COVERAGE),
               # gguf.cpp reads a file's type numbers into its enums, then range-checks them: undefined by the
               # letter of C++ (UBSan's enum check), defined in practice, and upstream's to change
               (vendor / "ggml" / "src" / "gguf.cpp", "g++", COVERAGE + ["-std=c++17", "-fno-sanitize=enum"]),
               (HERE / "gguf_reader_harness.c", "gcc", [])]
    binary = out / "gguf_reader_harness"
    newest = max([s.stat().st_mtime for s, _, _ in sources] + [Path(__file__).stat().st_mtime])  # flags live here
    if binary.exists() and binary.stat().st_mtime > newest:
        return binary
    out.mkdir(parents=True, exist_ok=True)
    objects = []
    for source, compiler, extra in sources:
        obj = out / (source.name + ".o")
        subprocess.run([compiler, "-c", *SANITIZE, *extra, *include, str(source), "-o", str(obj)], check=True)
        objects.append(str(obj))
    subprocess.run(["g++", *SANITIZE, *objects, f"-L{lib}", "-lllama", "-lggml-base", f"-Wl,-rpath,{lib}", "-o",
                    str(binary)], check=True)
    return binary


class Harness:
    """The harness process: one path in, (status, edges) out; restarted after a crash or a hang."""

    def __init__(self, binary: Path, log: Path):
        self.binary, self.log = binary, log
        self.start()

    def start(self):
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=77",
                   UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:exitcode=78", GGML_NO_BACKTRACE="1")
        self.err = open(self.log, "wb")
        self.proc = subprocess.Popen([str(self.binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, env=env)

    def read(self, n: int, deadline: float) -> bytes | None:
        data = b""
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.proc.stdout.fileno(), n - len(data))
            if not chunk:
                return None
            data += chunk
        return data

    def run(self, path: Path, hang: float):
        """(status, edges) or ("crash" | "hang", stderr)."""
        deadline = time.monotonic() + hang
        try:
            self.proc.stdin.write(f"{path}\n".encode())
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        head = self.read(8, deadline)
        body = self.read(4 * struct.unpack("<iI", head)[1], deadline) if head else None
        if head is not None and body is not None:
            rc, n = struct.unpack("<iI", head)
            return rc, set(struct.iter_unpack("<HH", body))
        timed_out = time.monotonic() >= deadline
        self.proc.kill()
        self.proc.wait()
        self.err.close()
        what = "hang" if timed_out else "crash"
        stderr = self.log.read_text(errors="replace")
        self.start()
        return what, stderr


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--execs", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--hang", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=REPO / "build" / "fuzz")
    ap.add_argument("--json", type=Path, help="write the counts here")
    ap.add_argument("--record", action="store_true", help="add the counts to tests/fuzz/results.md")
    args = ap.parse_args(argv)
    binary = build_harness(args.out / "harness")
    seeds = fuzz.make_seeds(args.out / "seeds")
    work = args.out / "cover-work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for s in seeds:  # a split model's other part lies beside the case, whole
        for part in s["parts"]:
            os.symlink(part, work / part.name)
    findings = args.out / "cover-findings"
    rng = random.Random(args.seed)
    harness = Harness(binary, work / "stderr.txt")

    # a corpus entry: header bytes, the file's size, the header's field map, the seed (for its name)
    corpus = []
    for s in seeds:
        g = s["gguf"]
        header, fields = gguf_codec.write(gguf_codec.Gguf(g.version, g.kv, g.tensors, b"", g.alignment), s["cache"])
        corpus.append((header, len(header) + len(g.data), fields, s))
    seen: set = set()
    counts = {"ok": 0, "typed": 0, "crash": 0, "hang": 0}
    found = []
    t0 = time.monotonic()
    for i in range(args.execs):
        header, size, fields, s = corpus[i] if i < len(corpus) else rng.choice(corpus)
        what = []
        if i >= len(corpus):
            if rng.random() < 0.3:  # structured mutations of the seed, its data a hole again
                g, what = mutate.mutate_structure(rng, s["gguf"], rng.randint(1, 3))
                size = len(g.data)
                g.data = b""
                header, fields = gguf_codec.write(g, s["cache"])
                size += len(header)
            for _ in range(rng.randint(1, 4)):
                header, step = rng.choice(mutate.BYTES)(rng, header, fields)
                what.append(step)
            if rng.random() < 0.1:
                size = rng.choice((len(header), size - 1, size + 4096, rng.randrange(size + 1)))
                what.append(f"size {size}")
        path = work / s["path"].name
        with open(path, "wb") as f:
            f.write(header)
            f.truncate(size)  # past the header: a hole where the tensor data would be
        result = harness.run(path, args.hang)
        if result[0] in ("crash", "hang"):
            counts[result[0]] += 1
            keep = findings / f"{result[0]}-{i}"
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, keep / path.name)
            (keep / "result.json").write_text(json.dumps({"exec": i, "seed": s["name"], "mutations": what,
                                                          "stderr": result[1][-4000:]}, indent=1))
            found.append({"exec": i, "kind": result[0], "mutations": what, "stderr": result[1][-1500:]})
            print(f"{result[0]}: exec {i} ({s['name']}: {'; '.join(what)})\n{result[1][-1500:]}", file=sys.stderr)
            continue
        rc, edges = result
        counts["ok" if rc == 0 else "typed"] += 1
        if not edges <= seen:
            seen |= edges
            if i >= len(corpus):
                corpus.append((header, size, fields, s))
        if (i + 1) % 2000 == 0:
            print(f"{i + 1}/{args.execs} execs, {time.monotonic() - t0:.0f} s: {counts}, corpus {len(corpus)}, "
                  f"edges {len(seen)}", file=sys.stderr, flush=True)
    harness.proc.stdin.close()
    harness.proc.wait()
    summary = {"execs": args.execs, "seed": args.seed, "seconds": round(time.monotonic() - t0, 1), "counts": counts,
               "corpus": len(corpus), "edges": len(seen), "findings": found}
    print(json.dumps({k: v for k, v in summary.items() if k != "findings"}))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    if args.record:
        import record
        record.record(f"cover.py, {args.execs} executions (seed {args.seed}) in {summary['seconds']:.0f} s: "
                      + ", ".join(f"{n} {k}" for k, n in counts.items()) +
                      f"; corpus {len(corpus)}, edges {len(seen)}")
    return 1 if counts["crash"] or counts["hang"] else 0


if __name__ == "__main__":
    sys.exit(main())
