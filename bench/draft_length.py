"""The auto draft-length chooser in simulation: every scenario x regime of
tests/test_draft_length.py, at 40 and 400 rounds, auto against the best fixed
k (k = 0 included) on the same seeds; writes bench/results/draft_length.md.

    .venv/bin/python -P bench/draft_length.py
"""
from __future__ import annotations

import importlib.util
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def load_cases():
    """The scenarios, regimes and bar the tests hold the chooser to."""
    sys.path.insert(0, str(REPO / "tests"))  # the test module's own imports (c_program)
    spec = importlib.util.spec_from_file_location("cases", REPO / "tests" / "test_draft_length.py")
    cases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cases)
    return cases


def build(out: Path) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    exe = out / "draft_length_sim"
    subprocess.run([cc, "-std=c11", "-O2", "-I", str(REPO / "csrc"), str(REPO / "tests" / "c" / "draft_length_sim.c"),
                    str(REPO / "csrc" / "draft_length.c"), str(REPO / "csrc" / "draft_length_learned.c"),
                    str(REPO / "csrc" / "rng.c"), "-o", str(exe), "-lm"],
                   check=True)
    return exe


def main() -> int:
    cases = load_cases()
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(Path(tmp))
        rows, misses = [], []
        for name, (costs, curve) in cases.SCENARIOS.items():
            for rounds, repeats in cases.REPEATS.items():
                cells = []
                for regime, options in cases.REGIMES.items():
                    out = subprocess.run([str(exe), *curve, *options, "--repeats", str(repeats), *map(str, costs), "8",
                                          str(rounds), "1"], capture_output=True, text=True, check=True).stdout.split()
                    ratio, best_k = float(out[1]) / float(out[3]), int(out[5])
                    cells.append(f"{'**' if ratio < cases.BAR else ''}{ratio:.3f}{'**' if ratio < cases.BAR else ''}"
                                 f" (k={best_k})")
                    if ratio < cases.BAR:
                        misses.append(ratio)
                rows.append(f"| {name} | {rounds} | " + " | ".join(cells) + " |")
    header = "| scenario | rounds | " + " | ".join(cases.REGIMES) + " |"
    text = "\n".join([
        "# The auto draft length in simulation",
        "",
        f"Run {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} by `bench/draft_length.py` "
        f"({platform.machine()}, Python {platform.python_version()}): `tests/c/draft_length_sim.c` with "
        "`csrc/draft_length.c`. Each cell: tokens/s of `draft_max=auto` divided by that of the best fixed k "
        "(k = 0..8, plain decoding included) over the same seeds and rounds ("
        + ", ".join(f"{r} rounds x {n} seeds" for r, n in cases.REPEATS.items())
        + f"), and that best k. The bar is {cases.BAR}; cells below it are bold.",
        "",
        "Scenarios: (seconds per draft token, a 1-token verify, each further batch token, acceptance). "
        + "; ".join(f"{n}: {c}{' ' + ' '.join(o) if o else ''}" for n, (c, o) in cases.SCENARIOS.items()) + ".",
        "",
        header,
        "|" + "---|" * (2 + len(cases.REGIMES)),
        *rows,
        "",
        f"{len(misses)} of {len(rows) * len(cases.REGIMES)} cells below the bar"
        + (f", the lowest {min(misses):.3f}." if misses else "."),
        "",
    ])
    (HERE / "results" / "draft_length.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
