"""pymoe.plan: where a target (and its draft) should live for a VRAM budget.

A budget search over the placement rule (pymoe.place_tensors), from GGUF
metadata and tensor sizes only: no weights are read.

    p = pymoe.plan("target.gguf", draft="draft.gguf", vram="8GiB", ctx=8192)
    print(p.summary())
    model = pymoe.Model("target.gguf", plan=p)

Default priority: the draft wholly in VRAM first (a draft that fits in spare
VRAM masks the cost of experts in RAM), then the target's dense weights and KV
cache, then as many layers' experts as fit. priority="experts" places the
target first and the draft only in what is left.

With mtp=True the target's own MTP head drafts instead: its layer is the
model's last, so it goes to the GPU before any trunk layer, its experts stay
there (n_cpu_moe counts trunk layers from 0), and its cache and compute
buffer are counted next to the target's. Without it, a GGUF's MTP layers are
not loaded and not counted.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

from . import errors
from ._native import lib
from .gguf_file import CACHE_TYPES, ModelSizes, read_sizes  # noqa: F401 - read_sizes: the sizes a plan reads
from .memory import memory_facts, memory_plan, place_tensors

MiB = 1 << 20
DEFAULT_MARGIN = 512 * MiB  # the driver, the CUDA context and allocator slack
PRIORITIES = ("draft", "experts")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "ki": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "mi": 1 << 20, "g": 1e9, "gb": 1e9, "gib": 1 << 30, "gi": 1 << 30, "t": 1e12, "tb": 1e12,
          "tib": 1 << 40, "ti": 1 << 40}


def parse_size(text: Union[str, int]) -> int:
    """"8GiB" -> 8589934592; "8G"/"8GB" are decimal (8e9), "8000MB" too; a plain number is bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise errors.InvalidArgumentError(f"a size must be >= 0, got {text}", lib.PYMOE_EINVAL)
        return text
    m = _SIZE.match(str(text))
    if not m or m.group(2) is not None and m.group(2).lower() not in _UNITS:
        raise errors.InvalidArgumentError(
            f"cannot read {text!r} as a size: use a number with an optional unit, e.g. 8GiB, 8G, 8000MB, 512MiB",
            lib.PYMOE_EINVAL)
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def compute_estimate(sizes: ModelSizes, ctx: int, ubatch: int, flash_attn: bool = True) -> int:
    """One model's compute buffer on the GPU, as llama.cpp reserves it for the
    worst micro-batch: the larger of the logits of every token of a ubatch and
    one layer's attention mask and scores, which never live at the same time,
    plus a few rows of activations. Checked against llama.cpp's
    own reservation on an RPC device (tests/test_plan.py)."""
    logits = ubatch * sizes.n_vocab * 4
    # the attention mask (F16 with flash attention, F32 without) and, without it, the F32 scores of every head
    scores = ubatch * ctx * 2 if flash_attn else ubatch * ctx * (sizes.n_head + 1) * 4
    return max(logits, scores) + 4 * ubatch * sizes.n_embd * 4


@dataclass(frozen=True)
class Plan:
    target: str
    draft: Optional[str]
    vram: int                      # the budget, bytes (0: CPU only)
    margin: int
    ctx: int
    cache_type: str
    gpu: str                       # the device planned for ("GPU" for a budget with no device named)
    n_gpu_layers: int              # target layers on the GPU (n_layers + 1 = all, the output layer included)
    n_cpu_moe: int                 # target layers whose routed experts stay in RAM
    draft_on_gpu: bool
    n_layers: int
    gpu_bytes: dict = field(default_factory=dict)   # component -> bytes planned on the GPU
    ram_bytes: dict = field(default_factory=dict)   # component -> bytes in RAM
    expert_bytes_gpu: int = 0
    expert_bytes_ram: int = 0
    n_rs_seq: int = 0              # recurrent-state snapshots counted for a hybrid target
    mtp: bool = False              # the target's MTP head drafts (loaded with the target)
    moe_cache_mib: int = 0         # device memory for an expert cache (Model(moe_cache_mib=...)); 0: none
    moe_cache_slots: int = 0       # experts per layer it holds
    moe_cache_layers: int = 0      # layers it serves (those whose experts are in RAM)
    moe_cache_hit_rate: Optional[float] = None  # predicted by replaying a routing trace (None: no trace)
    moe_cache_trace_tokens: int = 0
    ram_available: int = 0
    fits: bool = True
    problem: str = ""
    note: str = ""

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu_bytes.values())

    @property
    def ram_total(self) -> int:
        return sum(self.ram_bytes.values())

    def llama_flags(self) -> str:
        """The same placement as llama.cpp flags (with -fit off: its own planner would move it)."""
        flags = f"-ngl {self.n_gpu_layers} --n-cpu-moe {self.n_cpu_moe}"
        if self.draft:
            flags += f" -ngld {99 if self.draft_on_gpu else 0}"
        if self.mtp:
            flags += " --spec-type draft-mtp"
        if self.cache_type != "f16":
            flags += f" -ctk {self.cache_type} -ctv {self.cache_type}"
        return flags + f" -c {self.ctx} -fit off"

    def summary(self) -> str:
        def mib(n):
            return f"{n / MiB:,.0f} MiB"
        name = f"plan for {Path(self.target).name}" + (f" + draft {Path(self.draft).name}" if self.draft else "")
        if self.gpu == "CPU":  # vram="auto" found no GPU: there is nothing to place
            lines = [f"{name}, ctx {self.ctx}: no GPU found, so everything runs from RAM: "
                     f"{mib(self.ram_total)} ({', '.join(f'{k} {mib(v)}' for k, v in self.ram_bytes.items() if v)})",
                     f"  llama.cpp: {self.llama_flags()}"]
            if self.problem:
                lines.append(f"  problem: {self.problem}")
            return "\n".join(lines)
        lines = [name + f", ctx {self.ctx}, {self.gpu} budget {mib(self.vram)} (margin {mib(self.margin)})"]
        if self.note:
            lines.append(self.note)
        lines.append(f"  target: {self.n_gpu_layers} of {self.n_layers + 1} layers on {self.gpu}, "
                     f"experts of {self.n_cpu_moe} of {self.n_layers} layers in RAM "
                     f"({mib(self.expert_bytes_ram)} in RAM, {mib(self.expert_bytes_gpu)} on {self.gpu})")
        if self.draft:
            lines.append(f"  draft: {'on ' + self.gpu if self.draft_on_gpu else 'in RAM'}")
        if self.mtp:
            lines.append(f"  draft: the target's MTP head, {'on ' + self.gpu if self.draft_on_gpu else 'in RAM'}")
        for where, parts, total in ((self.gpu, self.gpu_bytes, self.gpu_total), ("RAM", self.ram_bytes, self.ram_total)):
            detail = ", ".join(f"{k} {mib(v)}" for k, v in parts.items() if v)
            lines.append(f"  {where}: {mib(total)}" + (f" ({detail})" if detail else ""))
        if self.moe_cache_mib:
            line = (f"  expert cache: {self.moe_cache_mib:,} MiB, {self.moe_cache_slots} experts per layer in "
                    f"{self.moe_cache_layers} layers (pymoe: --moe-cache-mib {self.moe_cache_mib})")
            if self.moe_cache_hit_rate is not None:
                line += (f"; predicted hit rate {self.moe_cache_hit_rate:.0%} (a routing trace of "
                         f"{self.moe_cache_trace_tokens} tokens replayed, one token per decode)")
            lines.append(line)
        lines.append(f"  llama.cpp: {self.llama_flags()}")
        if self.problem:
            lines.append(f"  problem: {self.problem}")
        return "\n".join(lines)


def cache_slots(sizes: ModelSizes, cache_bytes: int, layers) -> int:
    """Experts per layer an expert cache of cache_bytes holds over `layers`
    (the C library's rule: every layer the same number of slots, one more
    all-zero slot each, and two tables of n_experts int32 per layer); at most
    n_experts, below 1 when not even one fits."""
    per_layer = sizes.expert_bytes_per_layer()
    layers = [il for il in layers if il in per_layer]
    if not layers or not sizes.n_experts:
        return 0
    slot = sum(per_layer[il] // sizes.n_experts for il in layers)
    tables = len(layers) * 2 * sizes.n_experts * 4
    return min((cache_bytes - tables) // slot - 1, sizes.n_experts) if cache_bytes > tables else -1


def _gpu_budget(target: str, vram) -> tuple[int, str, str]:
    """(bytes, device name, note) for vram = a size or "auto" (the first GPU's free memory)."""
    if vram != "auto":
        return parse_size(vram), "GPU", ""
    mp = memory_plan(target, load_mode="no-mmap")
    if len(mp.placement.devices) < 2:
        return 0, "CPU", "no GPU found: planning for the CPU only"
    return mp.device_free[1], mp.placement.devices[1], f"{mp.placement.devices[1]}: {mp.device_free[1] / MiB:,.0f} MiB free"


def plan(target, draft=None, *, vram="auto", ram="auto", ctx: int = 8192, margin=DEFAULT_MARGIN,
         cache_type: str = "f16", ubatch: int = 512, flash_attn: bool = True, priority: str = "draft",
         n_rs_seq: int = 0, mtp: bool = False, moe_cache=None, moe_cache_uploads: int = 1,
         routing_trace=None) -> Plan:
    """Choose n_gpu_layers, n_cpu_moe and the draft's place for a VRAM budget.
    vram: a size ("8GiB", bytes) or "auto"; ram: a size or "auto" (MemAvailable).
    n_rs_seq: recurrent-state snapshots of a hybrid target (speculative rollback):
    its recurrent state counts 1 + n_rs_seq times, and once more with a draft
    (the checkpoint rounds that draft past the snapshots take). mtp: the
    target's MTP head drafts (see the module's text); not with a draft model.
    moe_cache: "auto" keeps every trunk layer's experts in RAM and gives the
    VRAM left after the rest (the draft first, and the margin) to an expert
    cache; a size (MiB as an int, or "2GiB") reserves that much for it first
    and places the rest as without a cache, the cache serving the layers
    whose experts stay in RAM. routing_trace: an
    array (layers, tokens, experts per token) or a .npy file of one
    (pymoe.expert_cache.routing_trace): the plan predicts the cache's hit rate
    by replaying it through the cache's own policy (moe_cache_uploads: its cap)."""
    if priority not in PRIORITIES:
        raise errors.InvalidArgumentError(f"priority must be one of {PRIORITIES}, got {priority!r}", lib.PYMOE_EINVAL)
    if cache_type not in CACHE_TYPES:
        raise errors.InvalidArgumentError(f"cache_type must be one of {list(CACHE_TYPES)}, got {cache_type!r}",
                                          lib.PYMOE_EINVAL)
    if not isinstance(ctx, int) or ctx <= 0:
        raise errors.InvalidArgumentError(f"ctx must be a positive number of tokens, got {ctx!r}", lib.PYMOE_EINVAL)
    if not isinstance(n_rs_seq, int) or not 0 <= n_rs_seq <= 64:
        raise errors.InvalidArgumentError(f"n_rs_seq must be an int in [0, 64], got {n_rs_seq!r}", lib.PYMOE_EINVAL)
    if mtp and draft:
        raise errors.InvalidArgumentError("a plan drafts with a draft model or with the target's MTP head, not both",
                                          lib.PYMOE_EINVAL)
    t = read_sizes(target)
    d = read_sizes(draft) if draft else None
    if mtp and not t.n_nextn:
        raise errors.UnsupportedError(f"{target}: the model has no MTP head ({t.arch}.nextn_predict_layers is 0 or "
                                      f"absent); plan with a draft model or without drafts", lib.PYMOE_EUNSUPPORTED)
    trunk = t.n_trunk
    if not any(t.recurrent_bytes_per_layer):
        n_rs_seq = 0  # nothing to snapshot (llama.cpp grants none either)
    # recurrent state: the live copy, the snapshots, and with a draft one checkpoint (speculative
    # rollback keeps it in the buffers of the device that holds the state)
    t_copies = n_rs_seq + (1 if d is not None or mtp else 0)
    # the MTP head's context: its layer's cache and a compute buffer of its own, where its layer is
    mtp_kv = t.kv_bytes(ctx, cache_type, range(trunk, t.n_layers)) if mtp else 0
    mtp_compute = compute_estimate(t, ctx, ubatch, flash_attn) if mtp else 0
    budget, gpu, note = _gpu_budget(str(target), vram)
    margin = parse_size(margin)
    ram_available = memory_facts().mem_available if ram == "auto" else parse_size(ram)
    left = max(budget - margin, 0) if budget else 0

    def target_on_gpu(ngl: int, n_cpu_moe: int):
        p = place_tensors(t.tensors, n_layers=t.n_layers, n_gpu_layers=ngl, n_cpu_moe=n_cpu_moe, devices=["GPU"],
                          n_unloaded_layers=0 if mtp else t.n_nextn)
        gpu_layers = range(p.first_gpu_layer, trunk)
        kv_gpu = t.kv_bytes(ctx, cache_type, gpu_layers) + t.recurrent_bytes(t_copies, gpu_layers)
        # with experts in RAM, llama.cpp copies one expert tensor at a time to the GPU for prompt batches
        ram_experts = [n for name, n in t.tensors if "_exps" in name] if n_cpu_moe else []
        compute = (compute_estimate(t, ctx, ubatch, flash_attn) + max(ram_experts, default=0)) if ngl else 0
        return p, kv_gpu, compute

    def head_on_gpu(p) -> bool:
        """The MTP head's layer (the model's last) is on the GPU, and so are its cache and compute buffer."""
        return mtp and p.first_gpu_layer <= trunk

    def gpu_need(ngl: int, n_cpu_moe: int) -> int:
        p, kv, comp = target_on_gpu(ngl, n_cpu_moe)
        return p.bytes[1] + kv + comp + (mtp_kv + mtp_compute if head_on_gpu(p) else 0)

    draft_need = 0
    if d is not None:
        draft_need = (d.weight_bytes + d.kv_bytes(ctx, cache_type) + d.recurrent_bytes(1)
                      + compute_estimate(d, ctx, ubatch, flash_attn))

    def choose_target(space: int):
        """The most target on the GPU within `space`: all layers with the fewest
        expert layers in RAM, else fewer layers on the GPU with all experts in RAM."""
        if space <= 0:
            return 0, 0
        n = t.n_layers
        # Bisections, so a plan costs O(log n) placements (a file may claim 512 layers): the need falls as
        # n_cpu_moe grows from 1 (0 has no expert copied to the GPU for prompts, so it is tried alone) and
        # grows with ngl. An MTP head's experts (the last layer) stay on the GPU: n_cpu_moe <= trunk.
        if gpu_need(n + 1, 0) <= space:
            return n + 1, 0
        lo, hi = 1, trunk + 1  # the fewest expert layers in RAM that fit, in [1, trunk]; trunk + 1: none
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if gpu_need(n + 1, mid) <= space else (mid + 1, hi)
        if lo <= trunk:
            return n + 1, lo
        lo, hi = 0, n  # the most layers that fit with every expert in RAM, in [1, n]; 0: none
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if gpu_need(mid, trunk) <= space else (lo, mid - 1)
        return (lo, trunk) if lo else (0, 0)

    caching = moe_cache is not None and moe_cache != 0 and t.n_experts and budget
    draft_on_gpu = False
    if d is not None and (priority == "draft" or caching) and 0 < draft_need <= left:  # a cache comes after it
        draft_on_gpu = True
        left -= draft_need
    cache_bytes = 0
    if caching and moe_cache != "auto":  # N MiB first, then the placement as without a cache in the rest
        cache_bytes = (moe_cache if isinstance(moe_cache, int) else parse_size(moe_cache) // MiB) * MiB
        ngl, n_cpu_moe = choose_target(left - cache_bytes)
        if ngl and n_cpu_moe == 0:  # every expert fits beside the cache: nothing for it to serve
            ngl, n_cpu_moe = choose_target(left)
        else:
            left -= cache_bytes
    elif caching:  # every trunk layer's experts in RAM, what is left to the cache
        if gpu_need(t.n_layers + 1, trunk) <= left:
            ngl, n_cpu_moe = t.n_layers + 1, trunk
        else:
            ngl, n_cpu_moe = choose_target(left)
        cache_bytes = max(left - (gpu_need(ngl, n_cpu_moe) if ngl else 0), 0) // MiB * MiB  # whole MiB, as loaded
    else:
        ngl, n_cpu_moe = choose_target(left)
    if d is not None and priority == "experts" and not caching:
        used = gpu_need(ngl, n_cpu_moe) if ngl else 0
        draft_on_gpu = 0 < draft_need <= left - used
    if ngl == 0:
        n_cpu_moe = 0  # nothing offloaded: every weight is in RAM anyway

    p, kv_gpu, comp = target_on_gpu(ngl, n_cpu_moe)
    kv_all = t.kv_bytes(ctx, cache_type) + t.recurrent_bytes(t_copies)
    mtp_on_gpu = ngl > 0 and head_on_gpu(p)
    # "KV" here is all of a context's memory: KV cache plus any recurrent state
    gpu_bytes = {"target weights": p.bytes[1] - p.expert_bytes[1], "target experts": p.expert_bytes[1],
                 "target KV": kv_gpu, "target compute": comp}
    ram_bytes = {"target weights": p.bytes[0] - p.expert_bytes[0], "target experts": p.expert_bytes[0],
                 "target KV": kv_all - kv_gpu}
    if mtp:  # its weights are among the target's
        (gpu_bytes if mtp_on_gpu else ram_bytes)["MTP KV"] = mtp_kv
        if mtp_on_gpu:
            gpu_bytes["MTP compute"] = mtp_compute
    if d is not None:
        d_kv = d.kv_bytes(ctx, cache_type) + d.recurrent_bytes(1)  # a hybrid draft rolls back by checkpoint
        where = gpu_bytes if draft_on_gpu else ram_bytes
        where["draft weights"] = d.weight_bytes
        where["draft KV"] = d_kv
        if draft_on_gpu:
            where["draft compute"] = draft_need - d.weight_bytes - d_kv
    result = dict(target=str(target), draft=str(draft) if draft else None, vram=budget, margin=margin, ctx=ctx,
                  cache_type=cache_type, gpu=gpu, n_gpu_layers=ngl, n_cpu_moe=n_cpu_moe,
                  draft_on_gpu=draft_on_gpu or mtp_on_gpu, mtp=mtp,
                  n_layers=t.n_layers, gpu_bytes=gpu_bytes, ram_bytes=ram_bytes, expert_bytes_gpu=p.expert_bytes[1],
                  expert_bytes_ram=p.expert_bytes[0], n_rs_seq=n_rs_seq, ram_available=ram_available, note=note)
    if cache_bytes and not ngl and moe_cache != "auto":
        result.update(fits=False, problem=f"an expert cache of {cache_bytes / MiB:,.0f} MiB leaves no room in the "
                      f"{budget / MiB:,.0f} MiB budget for the target's layers")
    elif cache_bytes and ngl:
        cached = range(max(p.first_gpu_layer, 0), n_cpu_moe)  # experts in RAM, router on the GPU
        moe_layers = [il for il in cached if il in t.expert_bytes_per_layer()]
        slots = cache_slots(t, cache_bytes, cached)
        if slots >= 1:
            result.update(moe_cache_mib=int(cache_bytes // MiB), moe_cache_slots=int(slots),
                          moe_cache_layers=len(moe_layers))
            gpu_bytes["expert cache"] = int(cache_bytes // MiB) * MiB
            if routing_trace is not None:
                result.update(_predict(routing_trace, t, int(slots), moe_cache_uploads, cached))
        elif not moe_layers:
            result["note"] = (note + "; " if note else "") + ("every layer's experts fit on the GPU: no expert cache "
                                                              "is needed")
        elif moe_cache != "auto":
            result.update(fits=False, problem=f"an expert cache of {cache_bytes / MiB:,.0f} MiB cannot hold one "
                          f"expert per layer of the {len(cached)} layers whose experts are in RAM")
        else:
            result["note"] = (note + "; " if note else "") + "no VRAM is left for an expert cache"
    ram_total = sum(ram_bytes.values())
    if ram_available and ram_total > ram_available:
        result["fits"] = False
        result["problem"] = (f"RAM cannot hold what must live there: {ram_total / MiB:,.0f} MiB needed, "
                             f"{ram_available / MiB:,.0f} MiB available. Use a smaller quantization or context, "
                             f"or a larger VRAM budget")
    elif budget and ngl == 0 and not draft_on_gpu:
        result["note"] = (note + "; " if note else "") + (
            f"nothing fits in {budget / MiB:,.0f} MiB after the {margin / MiB:,.0f} MiB margin: everything runs "
            f"from RAM")
    return Plan(**result)


def _predict(trace, sizes: ModelSizes, slots: int, upload_cap: int, layers) -> dict:
    """The hit rate a cache of `slots` would have over a routing trace, one token per decode."""
    from .expert_cache import MoeCacheStats, load_trace, replay
    ids = load_trace(trace)
    total = MoeCacheStats()
    for il in layers:
        if il < ids.shape[0]:
            total = total + replay(ids[il], sizes.n_experts, slots, upload_cap=upload_cap)
    return dict(moe_cache_hit_rate=total.hit_rate, moe_cache_trace_tokens=int(ids.shape[1]))
