"""The placement rule as a pure function: hand-computed cases."""
import pytest

import pymoe

LAYERS = 3


def model_tensors(n_layers=LAYERS, tied=False, shexp=False, chexps=False):
    """A small MoE's tensor list with round sizes (multiples of 32: no padding)."""
    t = [("token_embd.weight", 1000 * 32), ("output_norm.weight", 32)]
    if not tied:
        t.append(("output.weight", 2000 * 32))
    for i in range(n_layers):
        p = f"blk.{i}."
        t += [(p + "attn_q.weight", 10 * 32), (p + "ffn_gate_inp.weight", 32),
              (p + "ffn_gate_exps.weight", 100 * 32), (p + "ffn_up_exps.weight", 100 * 32),
              (p + "ffn_down_exps.weight", 100 * 32)]
        if shexp:
            t.append((p + "ffn_up_shexp.weight", 7 * 32))
        if chexps:
            t.append((p + "ffn_gate_up_chexps.weight", 50 * 32))
    return t


LAYER_DENSE = 10 * 32 + 32
LAYER_EXPERTS = 300 * 32
OUTPUT = 2000 * 32 + 32
EMBD = 1000 * 32


def test_everything_on_the_cpu_without_offload_devices():
    p = pymoe.place_tensors(model_tensors(), n_layers=LAYERS)
    assert p.bytes == (EMBD + OUTPUT + LAYERS * (LAYER_DENSE + LAYER_EXPERTS),)
    assert p.expert_bytes == (LAYERS * LAYER_EXPERTS,)
    assert set(p.device_of) == {0}


def test_all_layers_offloaded_but_the_input_embedding():
    p = pymoe.place_tensors(model_tensors(), n_layers=LAYERS, devices=["GPU0"])
    assert p.bytes == (EMBD, OUTPUT + LAYERS * (LAYER_DENSE + LAYER_EXPERTS))
    assert p.output_device == 1 and p.first_gpu_layer == 0


@pytest.mark.parametrize("ngl, gpu_layers, output_on_gpu", [
    (0, 0, False), (1, 0, True), (2, 1, True), (LAYERS, LAYERS - 1, True), (LAYERS + 1, LAYERS, True),
    (LAYERS + 5, LAYERS, True), (-1, LAYERS, True)])
def test_n_gpu_layers_counts_the_output_layer_last(ngl, gpu_layers, output_on_gpu):
    # llama.cpp: layers >= n_layers + 1 - ngl go to the device; the output is "layer" n_layers
    p = pymoe.place_tensors(model_tensors(), n_layers=LAYERS, n_gpu_layers=ngl, devices=["GPU0"])
    gpu = gpu_layers * (LAYER_DENSE + LAYER_EXPERTS) + (OUTPUT if output_on_gpu else 0)
    assert p.bytes[1] == gpu
    assert p.bytes[0] + p.bytes[1] == EMBD + OUTPUT + LAYERS * (LAYER_DENSE + LAYER_EXPERTS)
    assert p.first_gpu_layer == LAYERS - gpu_layers


@pytest.mark.parametrize("n_cpu_moe", [0, 1, 2, 3, 7])
def test_n_cpu_moe_moves_only_the_routed_experts_of_the_first_layers(n_cpu_moe):
    tensors = model_tensors(shexp=True, chexps=True)
    p = pymoe.place_tensors(tensors, n_layers=LAYERS, n_cpu_moe=n_cpu_moe, devices=["GPU0"])
    moved = min(n_cpu_moe, LAYERS)
    experts_per_layer = LAYER_EXPERTS + 50 * 32
    assert p.expert_bytes == (moved * experts_per_layer, (LAYERS - moved) * experts_per_layer)
    for (name, _), dev in zip(tensors, p.device_of):
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        routed = "_exps" in name or "_chexps" in name
        expected = 0 if name.startswith("token_embd") or (routed and layer < n_cpu_moe) else 1
        assert dev == expected, name  # shared experts (_shexp) and everything else stay put


def test_tied_embeddings_are_copied_to_an_offloaded_output_layer():
    tensors = model_tensors(tied=True)
    on_gpu = pymoe.place_tensors(tensors, n_layers=LAYERS, devices=["GPU0"])
    assert on_gpu.bytes[1] == 32 + EMBD + LAYERS * (LAYER_DENSE + LAYER_EXPERTS)
    on_cpu = pymoe.place_tensors(tensors, n_layers=LAYERS, n_gpu_layers=0, devices=["GPU0"])
    assert on_cpu.bytes == (EMBD + 32 + LAYERS * (LAYER_DENSE + LAYER_EXPERTS), 0)  # one copy on one device
    # an override on the name moves both uses to one device: one copy there
    moved = pymoe.place_tensors(tensors, n_layers=LAYERS, devices=["GPU0"], overrides={"token_embd": "GPU0"})
    assert moved.bytes == (0, EMBD + 32 + LAYERS * (LAYER_DENSE + LAYER_EXPERTS))


def test_overrides_first_match_wins_and_name_devices_case_insensitively():
    p = pymoe.place_tensors(model_tensors(), n_layers=LAYERS, devices=["GPU0", "GPU1"],
                            overrides=[(r"blk\.2\.ffn_up_exps", "cpu"), (r"ffn_.*_exps", "gpu1"), ("attn_q", "GPU0")])
    names = [n for n, _ in model_tensors()]
    dev = dict(zip(names, p.device_of))
    assert dev["blk.2.ffn_up_exps.weight"] == 0
    assert dev["blk.2.ffn_down_exps.weight"] == 2 and dev["blk.0.ffn_gate_exps.weight"] == 2
    assert all(dev[f"blk.{i}.attn_q.weight"] == 1 for i in range(LAYERS))
    assert p.bytes[0] == EMBD + 100 * 32
    # the string form of llama.cpp's -ot
    q = pymoe.place_tensors(model_tensors(), n_layers=LAYERS, devices=["GPU0"], overrides=["exps=CPU"])
    assert q.expert_bytes == (LAYERS * LAYER_EXPERTS, 0)


def test_n_cpu_moe_applies_before_overrides():
    p = pymoe.place_tensors(model_tensors(), n_layers=LAYERS, devices=["GPU0"], n_cpu_moe=1,
                            overrides={"blk\\.0\\.": "GPU0"})
    assert p.expert_bytes == (LAYER_EXPERTS, (LAYERS - 1) * LAYER_EXPERTS)


def test_layers_are_spread_over_devices_by_split():
    # 3 layers + output = 4 slots; split 1:3 -> slot 0 on the first device, slots 1-3 on the second
    p = pymoe.place_tensors(model_tensors(), n_layers=LAYERS, devices=["A", "B"], device_split=[1.0, 3.0])
    assert p.bytes[1] == LAYER_DENSE + LAYER_EXPERTS
    assert p.bytes[2] == 2 * (LAYER_DENSE + LAYER_EXPERTS) + OUTPUT


def test_sizes_are_padded_to_the_buffer_alignment():
    p = pymoe.place_tensors([("token_embd.weight", 1), ("blk.0.attn_q.weight", 33)], n_layers=1)
    assert p.bytes == (32 + 64,)


def test_bad_overrides_are_refused_with_the_known_devices():
    with pytest.raises(pymoe.InvalidArgumentError, match=r"'NPU3'.*\(CPU, GPU0\)"):
        pymoe.place_tensors(model_tensors(), n_layers=LAYERS, devices=["GPU0"], overrides={"exps": "NPU3"})
    with pytest.raises(pymoe.InvalidArgumentError, match="not a valid POSIX extended regex"):
        pymoe.place_tensors(model_tensors(), n_layers=LAYERS, overrides={"blk\\.(": "CPU"})
    with pytest.raises(pymoe.InvalidArgumentError, match="PATTERN=DEVICE"):
        pymoe.place_tensors(model_tensors(), n_layers=LAYERS, overrides=["exps"])
    with pytest.raises(pymoe.InvalidArgumentError, match="negative"):
        pymoe.place_tensors(model_tensors(), n_layers=LAYERS, devices=["A"], device_split=[-1.0])


def test_memory_facts_read_the_system():
    import resource
    facts = pymoe.memory_facts()
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    assert soft == hard  # raised to the hard limit
    assert facts.memlock_limit == (pymoe.memory.UNLIMITED if soft == resource.RLIM_INFINITY else soft)
    with open("/proc/meminfo") as f:
        avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    assert abs(facts.mem_available - avail) < 0.1 * avail
    with open("/proc/self/status") as f:
        cap_eff = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff"))
    assert facts.cap_ipc_lock == bool(cap_eff >> 14 & 1)


MiB = 2**20
ROOM = pymoe.MemoryFacts(mem_available=1000 * MiB, memlock_limit=8 * MiB, memlock_hard=8 * MiB, cap_ipc_lock=False,
                         locked_now=0)


def placement(cpu, gpu):
    return pymoe.Placement(devices=("CPU", "GPU0"), bytes=(cpu, gpu), expert_bytes=(0, 0), output_device=1,
                           first_gpu_layer=0)


def test_judge_locks_what_the_limit_allows():
    small = pymoe.judge_memory(placement(6 * MiB, 0), ROOM, [0, 100 * MiB])
    assert small.lockable and small.fits and small.load_mode == "mlock" and small.problem == ""
    big = pymoe.judge_memory(placement(9 * MiB, 0), ROOM, [0, 100 * MiB])
    assert not big.lockable and big.fits and big.load_mode == "no-mmap"  # auto falls back
    assert "9.0 MiB" in big.problem and "8.0 MiB" in big.problem and "ulimit -l" in big.problem
    already = pymoe.judge_memory(placement(6 * MiB, 0), pymoe.MemoryFacts(1000 * MiB, 8 * MiB, 8 * MiB, False, 3 * MiB),
                                 [0, 100 * MiB])
    assert not already.lockable  # what the process has locked counts against the limit
    cap = pymoe.MemoryFacts(1000 * MiB, 8 * MiB, 8 * MiB, True, 0)
    assert pymoe.judge_memory(placement(900 * MiB, 0), cap, [0, 100 * MiB]).lockable
    unlimited = pymoe.MemoryFacts(1000 * MiB, pymoe.memory.UNLIMITED, pymoe.memory.UNLIMITED, False, 0)
    assert pymoe.judge_memory(placement(900 * MiB, 0), unlimited, [0, 100 * MiB]).lockable


def test_judge_modes_that_do_not_lock_have_no_lock_problem():
    for mode in ("no-mmap", "mmap"):
        plan = pymoe.judge_memory(placement(9 * MiB, 0), ROOM, [0, 100 * MiB], load_mode=mode)
        assert plan.load_mode == mode and plan.problem == ""
    assert pymoe.judge_memory(placement(9 * MiB, 0), ROOM, [0, 0], load_mode="mmap").host_bytes == 0


def test_judge_refuses_what_does_not_fit():
    ram = pymoe.judge_memory(placement(2000 * MiB, 0), ROOM, [0, 100 * MiB], load_mode="no-mmap")
    assert not ram.fits and "2000.0 MiB" in ram.problem and "1000.0 MiB" in ram.problem
    assert pymoe.judge_memory(placement(2000 * MiB, 0), ROOM, [0, 100 * MiB], load_mode="mmap").fits
    gpu = pymoe.judge_memory(placement(0, 200 * MiB), ROOM, [0, 100 * MiB], load_mode="no-mmap")
    assert not gpu.fits and "GPU0" in gpu.problem and "200.0 MiB" in gpu.problem and "n_cpu_moe" in gpu.problem
    assert pymoe.judge_memory(placement(0, 200 * MiB), ROOM, [0, 0], load_mode="no-mmap").fits  # 0 = unknown


def test_judge_auto_keeps_repacked_kernels_rather_than_lock():
    plan = pymoe.judge_memory(placement(6 * MiB, 0), ROOM, [0, 100 * MiB], repacks=True)
    assert plan.lockable and plan.load_mode == "no-mmap" and "repacked" in plan.problem
    forced = pymoe.judge_memory(placement(6 * MiB, 0), ROOM, [0, 100 * MiB], load_mode="mlock", repacks=True)
    assert forced.load_mode == "mlock" and forced.problem == ""
