"""What every benchmark here writes: a results file headed by the machine and
the versions it ran on, printed as well."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine_lines(note: str = "") -> list:
    """The machine (CPU, CPUs, kernel, load at start), the versions, the time."""
    import pymoe
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return [f"- machine: {cpu}, {os.cpu_count()} CPUs, {platform.platform()}; load average at start "
            f"{os.getloadavg()[0]:.2f}",
            f"- pymoe {pymoe.__version__}, llama.cpp {pymoe.llama_version()}, Python {platform.python_version()}",
            f"- {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}{'; ' + note if note else ''}"]


def write(name: str, lines: list) -> int:
    """Write results/<name> and print it; the script's exit status."""
    text = "\n".join(lines).rstrip("\n") + "\n"
    (RESULTS / name).write_text(text)
    print(text)
    return 0
