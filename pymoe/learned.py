"""What draft_max="auto" learned, kept between runs: a small file per model
pair and machine in the cache folder ($PYMOE_CACHE/learned, default
~/.cache/pymoe/learned).

A short generation spends much of itself learning what the last one already
knew (the verify cost of each batch size, the draft's cost, acceptances,
whether drafting paid at all), so a loop starts from the file when there is
one and writes it back when it closes. The file's name is a hash of what the
numbers depend on: both models (path, size, modification time, where their
weights were placed), the draft sources, k_max, rollback, the threads, this
machine and this pymoe, so a changed model file names another file. A file is
ignored when it is older than MAX_AGE_DAYS, or when the C library does not take it
(another build's format, or figures no run produces). PYMOE_WARM_START=0 turns
off the default folder (benchmarks that must start cold); a folder passed as
Speculative(..., warm_start=folder) is used whatever it says."""
from __future__ import annotations

import hashlib
import os
import platform
import time
from pathlib import Path
from typing import Optional, Union

from ._native import ffi, lib
from .demo_models import cache_dir

MAX_AGE_DAYS = 14


def _model_identity(session) -> list:
    model = session.model
    try:
        st = os.stat(model.path)
        file = [os.path.realpath(model.path), st.st_size, st.st_mtime_ns]
    except OSError:
        file = [model.path]
    report = model.load_report
    return file + [list(report.plan.placement.devices), list(report.device_bytes), model.moe_cache.n_slots,
                   session.n_threads]


def path_for(spec, warm_start: Union[bool, str, os.PathLike]) -> Optional[Path]:
    """The file for this loop's models, sources and machine (None: warm starts off)."""
    if warm_start is False or (warm_start is True and os.environ.get("PYMOE_WARM_START", "1") == "0"):
        return None
    folder = cache_dir() / "learned" if warm_start is True else Path(warm_start)
    key = [ffi.string(lib.pymoe_version()).decode(), platform.node(), platform.machine(), os.cpu_count(),
           spec.source, spec.k_max, spec.rollback, _model_identity(spec.target)]
    if spec.draft is not None:
        key.append(_model_identity(spec.draft))
    digest = hashlib.sha256(repr(key).encode()).hexdigest()[:24]
    return folder / f"{digest}.bin"


def load(ptr, path: Path) -> bool:
    """Start the loop at ptr from the file, if there is a fresh one it takes (a model file that changed has
    another name: its modification time is in the key)."""
    try:
        if not path.is_file() or time.time() - path.stat().st_mtime > MAX_AGE_DAYS * 86400:
            return False
        data = path.read_bytes()
    except OSError:
        return False
    return lib.pymoe_spec_learned_load(ptr, ffi.from_buffer(data), len(data)) == lib.PYMOE_OK


def save(ptr, path: Path) -> bool:
    """Write what the loop at ptr learned (atomically: a reader never sees half a file)."""
    size = ffi.new("size_t *")
    if lib.pymoe_spec_learned_save(ptr, ffi.NULL, 0, size) != lib.PYMOE_OK:
        return False
    buf = ffi.new("char[]", size[0])
    if lib.pymoe_spec_learned_save(ptr, buf, size[0], size) != lib.PYMOE_OK:
        return False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(ffi.buffer(buf, size[0]))
        os.replace(tmp, path)
    except OSError:
        return False  # a read-only cache folder: the next run learns afresh
    return True
