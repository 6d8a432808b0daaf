"""One line of tests/fuzz/results.md: the date, the commit and what a fuzz run counted."""
from __future__ import annotations

import datetime
import subprocess
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results.md"


def commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=RESULTS.parent).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def record(text: str) -> None:
    with open(RESULTS, "a") as f:
        f.write(f"- {datetime.date.today()} {commit()}: {text}\n")
