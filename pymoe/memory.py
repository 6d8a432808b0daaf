"""Where a model's weights go and whether they fit: the placement rule, the
system facts, the pre-check of a load, and the report of what a load did.

    plan = pymoe.memory_plan("model.gguf", n_cpu_moe=20, rpc_servers=["127.0.0.1:50052"])
    print(plan.bytes_by_device, plan.load_mode, plan.problem)
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Sequence, Union

from . import errors
from ._native import check, ffi, lib, params_struct, raise_for, run_c

LOAD_MODES = {"mmap": lib.PYMOE_LOAD_MMAP, "no-mmap": lib.PYMOE_LOAD_NO_MMAP,
              "mlock": lib.PYMOE_LOAD_MLOCK, "auto": lib.PYMOE_LOAD_AUTO}
MODE_NAMES = {v: k for k, v in LOAD_MODES.items()}
UNLIMITED = 2**64 - 1

# overrides: {"pattern": "device"}, [("pattern", "device")], or ["pattern=device"] as llama.cpp's -ot
Overrides = Union[Mapping[str, str], Iterable[Union[str, Sequence[str]]], None]


def _mode_code(load_mode: str) -> int:
    if load_mode not in LOAD_MODES:
        raise errors.InvalidArgumentError(
            f"load_mode must be one of {sorted(LOAD_MODES)}, got {load_mode!r}", lib.PYMOE_EINVAL)
    return LOAD_MODES[load_mode]


def _override_pairs(overrides: Overrides) -> list[tuple[str, str]]:
    if not overrides:
        return []
    items = overrides.items() if isinstance(overrides, Mapping) else overrides
    pairs = []
    for item in items:
        if isinstance(item, str):
            pattern, sep, device = item.rpartition("=")
            if not sep or not pattern or not device:
                raise errors.InvalidArgumentError(
                    f"override {item!r} is not of the form PATTERN=DEVICE", lib.PYMOE_EINVAL)
            item = (pattern, device)
        pattern, device = item
        pairs.append((str(pattern), str(device)))
    return pairs


class _COverrides:
    """A C array of struct pymoe_tensor_override, keeping its strings alive."""

    def __init__(self, overrides: Overrides):
        pairs = _override_pairs(overrides)
        self._strings = [(ffi.new("char[]", p.encode()), ffi.new("char[]", d.encode())) for p, d in pairs]
        self.n = len(pairs)
        self.array = ffi.new("struct pymoe_tensor_override[]", max(self.n, 1))
        for i, (p, d) in enumerate(self._strings):
            self.array[i].pattern = p
            self.array[i].device = d


def _rpc_string(rpc_servers) -> Optional[str]:
    if not rpc_servers:
        return None
    if isinstance(rpc_servers, str):
        return rpc_servers
    return ",".join(str(s) for s in rpc_servers)


class LoadParams:
    """struct pymoe_model_params, filled from Python arguments (and kept alive)."""

    def __init__(self, path, *, load_mode: str = "auto", n_gpu_layers: int = -1, n_cpu_moe: int = 0,
                 overrides: Overrides = None, rpc_servers=None, mtp: bool = False, moe_cache_mib: int = 0,
                 moe_cache_uploads: int = 1):
        if int(n_cpu_moe) < 0:
            raise errors.InvalidArgumentError(f"n_cpu_moe must be >= 0, got {n_cpu_moe}", lib.PYMOE_EINVAL)
        for name, value in (("moe_cache_mib", moe_cache_mib), ("moe_cache_uploads", moe_cache_uploads)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**31:
                raise errors.InvalidArgumentError(f"{name} must be an integer >= 0, got {value!r}", lib.PYMOE_EINVAL)
        self.c = params_struct("pymoe_model_params")
        self._path = ffi.new("char[]", os.fsencode(os.fspath(path)))
        self.c.path = self._path
        self.c.load_mode = _mode_code(load_mode)
        self.c.n_gpu_layers = int(n_gpu_layers)
        self.c.n_cpu_moe = int(n_cpu_moe)
        self._overrides = _COverrides(overrides)
        self.c.overrides = self._overrides.array
        self.c.n_overrides = self._overrides.n
        rpc = _rpc_string(rpc_servers)
        self._rpc = ffi.new("char[]", rpc.encode()) if rpc else ffi.NULL
        self.c.rpc_servers = self._rpc
        self.c.mtp = bool(mtp)
        self.c.moe_cache_mib = moe_cache_mib
        self.c.moe_cache_uploads = moe_cache_uploads


@dataclass(frozen=True)
class Placement:
    devices: tuple[str, ...]          # index 0 = "CPU"
    bytes: tuple[int, ...]            # weight bytes per device
    expert_bytes: tuple[int, ...]     # of which routed experts
    output_device: int
    first_gpu_layer: int              # layers from here on are on offload devices
    device_of: tuple[int, ...] = ()   # per tensor, from place_tensors

    @property
    def bytes_by_device(self) -> dict[str, int]:
        return dict(zip(self.devices, self.bytes))


def _placement(c, names, device_of=()) -> Placement:
    n = c.n_devices
    return Placement(devices=tuple(names[:n]), bytes=tuple(c.bytes[0:n]), expert_bytes=tuple(c.expert_bytes[0:n]),
                     output_device=c.output_device, first_gpu_layer=c.first_gpu_layer, device_of=tuple(device_of))


def place_tensors(tensors: Iterable[tuple[str, int]], *, n_layers: int, n_gpu_layers: int = -1, n_cpu_moe: int = 0,
                  overrides: Overrides = None, devices: Sequence[str] = (),
                  device_split: Optional[Sequence[float]] = None, n_unloaded_layers: int = 0) -> Placement:
    """The placement rule as a pure function: (name, bytes) per tensor ->
    device per tensor and bytes per device. `devices` names the offload
    devices (index 1..); "CPU" is index 0. n_unloaded_layers: the last layers'
    tensors are not loaded (an MTP head without mtp=True): device -1, counted nowhere."""
    tensors = list(tensors)
    names_c = [ffi.new("char[]", name.encode()) for name, _ in tensors]
    arr = ffi.new("struct pymoe_tensor_size[]", max(len(tensors), 1))
    for i, (_, size) in enumerate(tensors):
        arr[i].name = names_c[i]
        arr[i].n_bytes = int(size)
    if len(devices) >= lib.PYMOE_MAX_DEVICES:
        raise errors.InvalidArgumentError(f"at most {lib.PYMOE_MAX_DEVICES - 1} offload devices, got {len(devices)}",
                                          lib.PYMOE_EINVAL)
    if device_split is not None and len(device_split) != len(devices):
        raise errors.InvalidArgumentError(f"device_split needs one weight per device ({len(devices)}), got "
                                          f"{len(device_split)}", lib.PYMOE_EINVAL)
    dev_c = [ffi.new("char[]", d.encode()) for d in devices]
    dev_arr = ffi.new("char *[]", dev_c or [ffi.NULL])
    split = ffi.new("float[]", list(device_split)) if device_split is not None else ffi.NULL
    ov = _COverrides(overrides)
    rq = ffi.new("struct pymoe_placement_request *")
    rq.n_layers, rq.n_gpu_layers, rq.n_cpu_moe = n_layers, n_gpu_layers, n_cpu_moe
    rq.overrides, rq.n_overrides = ov.array, ov.n
    rq.n_devices, rq.device_names, rq.device_split = len(devices), dev_arr, split
    rq.n_unloaded_layers = n_unloaded_layers
    device_of = ffi.new("int32_t[]", max(len(tensors), 1))
    out = ffi.new("struct pymoe_placement *")
    check(lib.pymoe_place_tensors(rq, arr, len(tensors), device_of, out))
    return _placement(out, ["CPU", *devices], device_of[0:len(tensors)])


@dataclass(frozen=True)
class MemoryFacts:
    mem_available: int       # bytes; 0 = unknown
    memlock_limit: int       # soft RLIMIT_MEMLOCK after raising it to the hard one; UNLIMITED
    memlock_hard: int
    cap_ipc_lock: bool       # the limit does not bind
    locked_now: int          # VmLck

    @classmethod
    def _from_c(cls, c) -> "MemoryFacts":
        return cls(c.mem_available, c.memlock_limit, c.memlock_hard, bool(c.cap_ipc_lock), c.locked_now)


def memory_facts() -> MemoryFacts:
    """What this process may lock and allocate (raises the soft memlock limit to the hard one)."""
    out = ffi.new("struct pymoe_memory_facts *")
    check(lib.pymoe_memory_facts_read(out))
    return MemoryFacts._from_c(out)


@dataclass(frozen=True)
class MemoryPlan:
    placement: Placement
    device_free: tuple[int, ...]
    facts: MemoryFacts
    host_bytes: int          # weights that would live in this process's RAM (0 with mmap)
    repacks: bool            # llama.cpp would repack CPU weights (faster kernels), which locking turns off
    load_mode: str           # the mode the load would use (auto: mlock if lockable and not repacks)
    lockable: bool
    fits: bool
    problem: str             # why not, with numbers and the remedy; "" when fine

    @property
    def bytes_by_device(self) -> dict[str, int]:
        return self.placement.bytes_by_device

    @classmethod
    def _from_c(cls, c) -> "MemoryPlan":
        n = c.placement.n_devices
        names = [ffi.string(c.device_names[i]).decode() for i in range(n)]
        return cls(placement=_placement(c.placement, names), device_free=tuple(c.device_free[0:n]),
                   facts=MemoryFacts._from_c(c.facts), host_bytes=c.host_bytes, repacks=bool(c.repacks),
                   load_mode=MODE_NAMES[c.load_mode], lockable=bool(c.lockable), fits=bool(c.fits),
                   problem=ffi.string(c.problem).decode("utf-8", "replace"))


def memory_plan(path, **load_options) -> MemoryPlan:
    """The pre-check a load runs, without loading: bytes per device, the
    memory facts, the resolved load mode and any problem. Takes Model's load
    options (load_mode, n_gpu_layers, n_cpu_moe, overrides, rpc_servers)."""
    params = LoadParams(path, **load_options)
    out = ffi.new("struct pymoe_memory_plan *")
    # with rpc-servers on a helper thread: a lost one is an error, not a wait forever
    rc, detail = run_c(lib.pymoe_memory_plan_for, params.c, out, remote=params.c.rpc_servers != ffi.NULL)
    if rc:
        raise_for(rc, detail)
    return MemoryPlan._from_c(out)


def judge_memory(placement: Placement, facts: MemoryFacts, device_free: Sequence[int],
                 load_mode: str = "auto", repacks: bool = False) -> MemoryPlan:
    """The pre-check's verdict as a pure function of a placement, the memory
    facts and each device's free bytes (index 0, the CPU, is taken from
    facts.mem_available): what a planner calls to try placements."""
    n = len(placement.devices)
    if len(device_free) != n or not 1 <= n <= lib.PYMOE_MAX_DEVICES:
        raise errors.InvalidArgumentError(f"need one free size per device ({n}), got {len(device_free)}",
                                          lib.PYMOE_EINVAL)
    c = ffi.new("struct pymoe_memory_plan *")
    c.placement.n_devices = n
    c.placement.output_device = placement.output_device
    c.placement.first_gpu_layer = placement.first_gpu_layer
    for i in range(n):
        c.placement.bytes[i] = placement.bytes[i]
        c.placement.expert_bytes[i] = placement.expert_bytes[i]
        c.device_names[i] = placement.devices[i].encode()[:63]
        c.device_free[i] = facts.mem_available if i == 0 else device_free[i]
    c.facts.mem_available, c.facts.memlock_limit, c.facts.memlock_hard = (
        facts.mem_available, facts.memlock_limit, facts.memlock_hard)
    c.facts.cap_ipc_lock, c.facts.locked_now = facts.cap_ipc_lock, facts.locked_now
    c.repacks = repacks
    check(lib.pymoe_memory_judge(c, _mode_code(load_mode)))
    return MemoryPlan._from_c(c)


@dataclass(frozen=True)
class LoadReport:
    load_mode: str           # used (auto resolved)
    fell_back: bool          # auto could not lock: no-mmap was used
    load_seconds: float
    bytes_per_second: float
    locked_bytes: int        # VmLck after the load (the whole process, this model included)
    lock_failures: int       # locks llama.cpp reported failing
    pinned_bytes: int        # weights in pinned host buffers (CUDA builds)
    pin_failures: int        # pinned allocations that fell back to plain CPU buffers
    host_bytes: int          # weights in host buffers
    buffers: dict[str, int]  # llama.cpp's weight buffers by name
    plan: MemoryPlan
    device_bytes: tuple[int, ...] = ()  # allocated weight bytes per device, indexed as plan.placement.devices

    @property
    def bytes_by_device(self) -> dict[str, int]:
        """What was allocated on each device, to compare with plan.bytes_by_device."""
        return dict(zip(self.plan.placement.devices, self.device_bytes))

    @classmethod
    def _from_c(cls, c) -> "LoadReport":
        buffers: dict[str, int] = {}
        for i in range(c.n_buffers):
            name = ffi.string(c.buffers[i].name).decode()
            buffers[name] = buffers.get(name, 0) + c.buffers[i].n_bytes
        plan = MemoryPlan._from_c(c.plan)
        return cls(MODE_NAMES[c.load_mode], bool(c.fell_back), c.load_seconds, c.bytes_per_second,
                   c.locked_bytes, c.lock_failures, c.pinned_bytes, c.pin_failures, c.host_bytes, buffers, plan,
                   tuple(c.device_bytes[0:c.plan.placement.n_devices]))
