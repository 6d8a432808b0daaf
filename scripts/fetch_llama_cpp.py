#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source into vendor/llama.cpp.

The source is the vendor/llama.cpp subtree of the PyPI source distribution of
llama-cpp-python (pinned version and sha256 below). The download is checked
before anything is unpacked; a stamp file makes a second run a no-op.

Environment:
  PYMOE_LLAMA_CPP_SDIST  path to an already downloaded sdist (skips pip)
  PYMOE_CACHE            where the checked sdist is kept (default ~/.cache/pymoe)
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_NAME = f"llama_cpp_python-{VERSION}.tar.gz"
SUBTREE = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
STAMP_NAME = ".pymoe-source-stamp"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("PYMOE_CACHE", Path.home() / ".cache" / "pymoe"))


def download_sdist(workdir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:",
           "--no-deps",
           "-d", str(workdir), f"{PACKAGE}=={VERSION}"]
    print(f"pymoe: downloading {PACKAGE}=={VERSION} (the pinned llama.cpp source, ~77 MB)",
          file=sys.stderr, flush=True)
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sdist = workdir / SDIST_NAME
    if result.returncode != 0 or not sdist.exists():
        tail = "\n".join(result.stdout.strip().splitlines()[-15:])
        sys.exit(
            f"pymoe: could not download {PACKAGE}=={VERSION} with pip "
            f"(exit {result.returncode}).\n{tail}\n"
            "Check network access to PyPI, or download the sdist yourself and set "
            "PYMOE_LLAMA_CPP_SDIST=/path/to/" + SDIST_NAME + ", or build against your own "
            "llama.cpp checkout with PYMOE_LLAMA_CPP_DIR=/path/to/llama.cpp.")
    return sdist


def checked_sdist(workdir: Path) -> Path:
    """Return a path to the pinned sdist whose sha256 has been verified."""
    given = os.environ.get("PYMOE_LLAMA_CPP_SDIST")
    cached = cache_dir() / SDIST_NAME
    for candidate in ([Path(given)] if given else []) + [cached]:
        if candidate.is_file():
            if sha256_of(candidate) == SHA256:
                return candidate
            print(f"pymoe: ignoring {candidate}: sha256 does not match the pin",
                  file=sys.stderr)
    sdist = download_sdist(workdir)
    got = sha256_of(sdist)
    if got != SHA256:
        sys.exit(f"pymoe: {sdist.name} has sha256 {got}, expected {SHA256}; "
                 "refusing to unpack it.")
    try:  # keep it, so a fresh clone on this machine does not download again
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(sdist, cached)
    except OSError:
        pass
    return sdist


def unpack_subtree(sdist: Path, dest: Path, workdir: Path) -> None:
    staging = workdir / "llama.cpp"
    with tarfile.open(sdist, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            if not m.name.startswith(SUBTREE):
                continue
            m.name = m.name[len(SUBTREE):]
            parts = Path(m.name).parts
            # .git is a submodule pointer into a repository we do not have
            if not m.name or m.name.startswith("/") or ".." in parts or parts[0] == ".git":
                continue
            if not (m.isfile() or m.isdir() or m.issym()):
                continue
            members.append(m)
        if not members:
            sys.exit(f"pymoe: {sdist.name} has no {SUBTREE} subtree")
        tar.extractall(staging, members=members, filter="tar" if hasattr(tarfile, "data_filter") else None)
    (staging / STAMP_NAME).write_text(f"{PACKAGE}=={VERSION} sha256={SHA256}\n")
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(dest))


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "vendor" / "llama.cpp"
    stamp = dest / STAMP_NAME
    expected = f"{PACKAGE}=={VERSION} sha256={SHA256}\n"
    if stamp.is_file() and stamp.read_text() == expected:
        return 0
    with tempfile.TemporaryDirectory(prefix="pymoe-fetch-") as tmp:
        sdist = checked_sdist(Path(tmp))
        unpack_subtree(sdist, dest, Path(tmp))
    print(f"pymoe: llama.cpp source ({PACKAGE}=={VERSION}) unpacked into {dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
