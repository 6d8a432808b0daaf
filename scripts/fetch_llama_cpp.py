#!/usr/bin/env python3
"""Fetch the pinned llama.cpp source into vendor/llama.cpp.

The source is the vendor/llama.cpp subtree of the PyPI source distribution of
llama-cpp-python (pinned version and sha256 below). The download is checked
before anything is unpacked; then pymoe's own patches (patches/*.patch, each
explained in docs/llama_patches.md) are applied. A stamp file naming the pin
and the patches makes a second run a no-op; a changed patch unpacks afresh.

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
PATCHED_NAME = ".pymoe-patched-files"


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


def patches(root: Path) -> list:
    return sorted((root / "patches").glob("*.patch"))


def stamp_text(root: Path) -> str:
    lines = [f"{PACKAGE}=={VERSION} sha256={SHA256}"]
    lines += [f"patch {p.name} sha256={sha256_of(p)}" for p in patches(root)]
    return "\n".join(lines) + "\n"


def patched_files(patch: Path) -> list:
    return [line[len("+++ b/"):].strip() for line in patch.read_text().splitlines() if line.startswith("+++ b/")]


def apply_patches(root: Path, tree: Path) -> list:
    """Apply pymoe's patches to the unpacked tree; returns the files they change."""
    if patches(root) and not shutil.which("patch"):
        sys.exit("pymoe: the 'patch' program is needed to apply patches/*.patch (Debian: apt-get install patch)")
    changed = []
    for p in patches(root):
        result = subprocess.run(["patch", "-p1", "--forward", "--batch", "-d", str(tree), "-i", str(p)],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if result.returncode != 0:
            sys.exit(f"pymoe: {p.name} does not apply to the pinned llama.cpp:\n{result.stdout}")
        changed += patched_files(p)
    return changed


def unpack_subtree(sdist: Path, dest: Path, workdir: Path, root: Path) -> None:
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
    changed = apply_patches(root, staging)
    # a file a patch changes (or changed before: an older build compiled it) must look newer than any
    # build output, or an incremental build keeps the object of the other version
    before = (dest / PATCHED_NAME).read_text().split() if (dest / PATCHED_NAME).is_file() else []
    for name in set(changed) | set(before):
        if (staging / name).is_file():
            os.utime(staging / name)
    (staging / PATCHED_NAME).write_text("\n".join(changed) + "\n")
    (staging / STAMP_NAME).write_text(stamp_text(root))
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(staging), str(dest))


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    dest = Path(sys.argv[1]) if len(sys.argv) > 1 else root / "vendor" / "llama.cpp"
    stamp = dest / STAMP_NAME
    if stamp.is_file() and stamp.read_text() == stamp_text(root):
        return 0
    with tempfile.TemporaryDirectory(prefix="pymoe-fetch-") as tmp:
        sdist = checked_sdist(Path(tmp))
        unpack_subtree(sdist, dest, Path(tmp), root)
    print(f"pymoe: llama.cpp source ({PACKAGE}=={VERSION}) unpacked into {dest}, with "
          f"{len(patches(root))} patch(es) of pymoe's", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
