"""llama.cpp's llama-speculative-simple, built from the same vendored source
(`make bench-peer`), run once: the peer of pymoe's speculative loop."""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parent.parent
SPECULATIVE_SIMPLE = REPO / "build" / "peer" / "bin" / "llama-speculative-simple"


@dataclass(frozen=True)
class PeerRun:
    rate: float                  # decode tokens/s as it reports it
    seconds: float               # decode seconds
    n_predict: int               # tokens emitted
    n_accept: int                # draft tokens accepted
    acceptance: Optional[float]  # as it reports it

    @property
    def seconds_per_round(self) -> float:
        """Per committed round (each emits its accepted drafts and one more; a
        checkpoint restore's extra batch counts within the round it belongs to)."""
        rounds = self.n_predict - self.n_accept
        return self.seconds / rounds if rounds > 0 else 0.0


def run(args: Sequence[str]) -> PeerRun:
    """llama-speculative-simple with these arguments; what it reports at the end."""
    out = subprocess.run([str(SPECULATIVE_SIMPLE), *map(str, args)], capture_output=True, text=True, errors="replace",
                         timeout=900)
    log = out.stdout + out.stderr
    speed = re.search(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s", log)
    predict = re.search(r"n_predict\s+=\s+(\d+)", log)
    accept = re.search(r"n_accept\s+=\s+(\d+)", log)
    share = re.search(r"accept\s+=\s+([\d.]+)%", log)
    if out.returncode != 0 or not speed:
        raise RuntimeError(f"llama-speculative-simple failed ({out.returncode}):\n{log[-2000:]}")
    return PeerRun(float(speed.group(3)), float(speed.group(2)), int(predict.group(1)) if predict else 0,
                   int(accept.group(1)) if accept else 0, float(share.group(1)) / 100 if share else None)


def speculative_simple(target: Path, draft: Path, prompt: str, n: int, k: int, *, threads: int,
                       ctx: int) -> Tuple[float, Optional[float]]:
    """Greedy, k drafts per round, p_min 0: (decode tokens/s, acceptance as it reports it)."""
    r = run(["-m", target, "-md", draft, "-p", prompt, "-n", n, "--spec-type", "draft-simple", "--spec-draft-n-max", k,
             "--spec-draft-n-min", "0", "--draft-p-min", "0.0", "--temp", "0", "-t", threads, "-td", threads,
             "-c", ctx, "-fit", "off", "--seed", "1"])
    return r.rate, r.acceptance
