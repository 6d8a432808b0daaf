"""llama.cpp's llama-speculative-simple, built from the same vendored source
(`make bench-peer`), run once: the peer of pymoe's speculative loop."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
SPECULATIVE_SIMPLE = REPO / "build" / "peer" / "bin" / "llama-speculative-simple"


def speculative_simple(target: Path, draft: Path, prompt: str, n: int, k: int, *, threads: int,
                       ctx: int) -> Tuple[float, Optional[float]]:
    """Greedy, k drafts per round, p_min 0: (decode tokens/s, acceptance as it reports it)."""
    cmd = [str(SPECULATIVE_SIMPLE), "-m", str(target), "-md", str(draft), "-p", prompt, "-n", str(n),
           "--spec-type", "draft-simple", "--spec-draft-n-max", str(k), "--spec-draft-n-min", "0",
           "--draft-p-min", "0.0", "--temp", "0", "-t", str(threads), "-td", str(threads), "-c", str(ctx),
           "-fit", "off", "--seed", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=900)
    log = out.stdout + out.stderr
    speed = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s", log)
    accept = re.search(r"accept\s+=\s+([\d.]+)%", log)
    if out.returncode != 0 or not speed:
        raise RuntimeError(f"llama-speculative-simple failed ({out.returncode}):\n{log[-2000:]}")
    return float(speed.group(3)), float(accept.group(1)) / 100 if accept else None
