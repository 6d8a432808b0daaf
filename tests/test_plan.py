"""pymoe.plan: the VRAM budget search, on tiny models whose right answer is
computed here by hand, and the plan loaded onto a local RPC device."""
import json
import subprocess
import sys

import gguf
import pytest

import llama_log
import pymoe
import pymoe.rpc
import tiny_models
from conftest import stderr_lines
from pymoe.plan import read_sizes

MiB = 1 << 20
MARGIN = 4 * MiB
CTX = 1024

# PLACEMENT_MOE by hand: 4 layers, n_embd 64, 4 heads (head size 16), 2 KV heads,
# 8 F32 experts of width 256, the 32000-token llama-spm vocabulary, tied output.
EXPERTS_PER_LAYER = 3 * 8 * 256 * 64 * 4                     # gate, up, down: 1.5 MiB
LARGEST_EXPERT_TENSOR = 8 * 256 * 64 * 4
PER_LAYER = 256 + 64 * 64 * 4 + 2 * (32 * 64 * 4) + 64 * 64 * 4 + 256 + 8 * 64 * 4  # norms, q, k, v, o, router
DENSE_ON_GPU = 4 * PER_LAYER + 256 + 32000 * 64 * 4          # + output norm + the tied output copy
KV = 4 * CTX * 2 * (2 * 16) * 2                              # layers x ctx x (K+V) x heads x head size x f16
COMPUTE = 512 * 32000 * 4 + 4 * 512 * 64 * 4                  # a 512-token ubatch's logits, a few activation rows


@pytest.fixture(scope="module")
def moe(model_dir):
    return tiny_models.write_model(model_dir / "plan-moe.gguf", tiny_models.PLACEMENT_MOE)


@pytest.fixture(scope="module")
def draft(model_dir):
    return tiny_models.write_model(model_dir / "plan-draft.gguf", tiny_models.DENSE)


def test_sizes_come_from_the_header_alone(moe):
    sizes = read_sizes(moe)
    reader = gguf.GGUFReader(moe)
    assert list(sizes.tensors) == [(t.name, int(t.n_bytes)) for t in reader.tensors]
    assert (sizes.arch, sizes.n_layers, sizes.n_embd, sizes.n_vocab) == ("llama", 4, 64, 32000)
    assert sizes.kv_bytes(CTX) == KV


def test_a_split_model_is_read_part_by_part(model_dir):
    first = tiny_models.write_model(model_dir / "plan-split.gguf", tiny_models.PLACEMENT_MOE, split_max_tensors=12)
    parts = sorted(model_dir.glob("plan-split-*-of-*.gguf"))
    assert len(parts) > 1 and first == parts[0]
    sizes = read_sizes(first)
    assert sizes.tensors == tuple((t.name, int(t.n_bytes)) for p in parts for t in gguf.GGUFReader(p).tensors)
    parts[-1].rename(parts[-1].with_suffix(".gone"))
    with pytest.raises(pymoe.ModelNotFoundError, match="part of the split model"):
        read_sizes(first)


def test_a_truncated_file_is_a_typed_error_and_one_line_from_the_cli(moe, tmp_path):
    data = moe.read_bytes()
    for cut in (3, 10, 200, 5000):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(pymoe.PymoeError) as info:
            pymoe.plan(bad, vram="1GiB")
        assert isinstance(info.value, pymoe.ModelFormatError) and str(bad) in str(info.value)
    r = subprocess.run([sys.executable, "-P", "-m", "pymoe", "plan", "-m", str(bad), "--vram", "1GiB"],
                       capture_output=True, text=True, timeout=60)
    lines = stderr_lines(r.stderr)
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("key,value,vtype,says", [
    ("general.architecture", 7, gguf.GGUFValueType.UINT32, "general.architecture is a u32"),
    ("llama.block_count", 100000, gguf.GGUFValueType.UINT32, "llama.block_count = 100000 is outside"),
    ("llama.block_count", "four", gguf.GGUFValueType.STRING, "llama.block_count is a str"),
])
def test_metadata_of_the_wrong_type_or_range_is_named(tmp_path, key, value, vtype, says):
    path = tmp_path / "bad-meta.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for k, field in gguf.GGUFReader(tiny_models.write_model(tmp_path / "ok.gguf", tiny_models.DENSE)).fields.items():
        if k.startswith("GGUF.") or k == key:
            continue
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(k, field.contents(), field.types[0], sub_type=sub)
    for kv in writer.kv_data:  # the writer's own general.architecture goes too when it is the key under test
        kv.pop(key, None)
    writer.add_key_value(key, value, vtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with pytest.raises(pymoe.ModelFormatError, match=says):
        read_sizes(path)


def test_more_vram_never_plans_less_on_the_gpu(moe):
    """The search bisects (a file may claim 512 layers): over a sweep of budgets, more VRAM gives at least as
    many layers on the GPU, and with all of them there, no more expert layers in RAM; each plan fits."""
    previous, seen = (0, 0), set()
    for kib in range(0, 160 * 1024, 512):
        p = pymoe.plan(moe, vram=kib * 1024, margin=0, ctx=256)
        step = (p.n_gpu_layers, p.n_layers - p.n_cpu_moe if p.n_gpu_layers else 0)  # fewer expert layers in RAM
        assert step >= previous, (kib, p)
        assert sum(p.gpu_bytes.values()) <= kib * 1024
        previous = step
        seen.add(step)
    assert len(seen) >= 6  # the sweep passes through partial offloads, experts first
    assert previous == (p.n_layers + 1, p.n_layers)  # the sweep ends with everything on the GPU


@pytest.mark.parametrize("text,expected", [("8GiB", 8 << 30), ("8G", 8 * 10**9), ("8000MB", 8 * 10**9),
                                           ("512MiB", 512 << 20), ("1.5GiB", 3 << 29), ("4096", 4096),
                                           (" 2 gib ", 2 << 30), (0, 0)])
def test_sizes_parse(text, expected):
    assert pymoe.parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "8X", "-1G", "GiB", "8 GiB extra", -5])
def test_bad_sizes_say_what_is_allowed(bad):
    with pytest.raises(pymoe.InvalidArgumentError, match="size"):
        pymoe.parse_size(bad)


@pytest.mark.parametrize("on_gpu", range(5))
def test_the_budget_buys_whole_layers_of_experts(moe, on_gpu):
    """With room for the dense part, the KV cache, the compute buffer and
    `on_gpu` layers' experts, exactly the other layers keep theirs in RAM; one
    byte less and one more layer does."""
    staging = LARGEST_EXPERT_TENSOR if on_gpu < 4 else 0  # a prompt batch copies RAM experts over
    need = DENSE_ON_GPU + KV + COMPUTE + staging + on_gpu * EXPERTS_PER_LAYER
    p = pymoe.plan(moe, vram=need + MARGIN, margin=MARGIN, ctx=CTX)
    assert (p.n_gpu_layers, p.n_cpu_moe) == (5, 4 - on_gpu)
    assert p.gpu_total == need
    assert p.expert_bytes_gpu == on_gpu * EXPERTS_PER_LAYER
    assert p.expert_bytes_ram == (4 - on_gpu) * EXPERTS_PER_LAYER
    assert p.llama_flags().startswith(f"-ngl 5 --n-cpu-moe {4 - on_gpu} ")
    if on_gpu > 0:
        tighter = pymoe.plan(moe, vram=need + MARGIN - 1, margin=MARGIN, ctx=CTX)
        assert tighter.n_cpu_moe == 5 - on_gpu


def test_when_the_dense_part_does_not_fit_layers_leave_the_gpu(moe):
    # all experts in RAM, and room for the output layer and 2 of the 4 layers with their KV cache
    need = 256 + 32000 * 64 * 4 + 2 * PER_LAYER + KV // 2 + COMPUTE + LARGEST_EXPERT_TENSOR
    p = pymoe.plan(moe, vram=need + MARGIN, margin=MARGIN, ctx=CTX)
    assert (p.n_gpu_layers, p.n_cpu_moe) == (3, 4)
    assert p.gpu_total == need


def test_the_draft_comes_first_unless_asked_otherwise(moe, draft):
    d = read_sizes(draft)
    draft_need = d.weight_bytes + d.kv_bytes(CTX) + 512 * d.n_vocab * 4 + 4 * 512 * d.n_embd * 4
    target_dense = DENSE_ON_GPU + KV + COMPUTE + LARGEST_EXPERT_TENSOR
    vram = MARGIN + draft_need + target_dense + EXPERTS_PER_LAYER  # the draft, or the draft's room in experts
    first = pymoe.plan(moe, draft, vram=vram, margin=MARGIN, ctx=CTX)
    assert first.draft_on_gpu and first.n_cpu_moe == 3
    assert first.gpu_bytes["draft weights"] == d.weight_bytes
    experts = pymoe.plan(moe, draft, vram=vram, margin=MARGIN, ctx=CTX, priority="experts")
    assert not experts.draft_on_gpu and experts.n_cpu_moe == 0
    assert experts.ram_bytes["draft weights"] == d.weight_bytes


def test_ram_that_cannot_hold_the_rest_is_a_refusal(moe):
    p = pymoe.plan(moe, vram=0, ram="1MiB", ctx=CTX)
    assert not p.fits
    assert "RAM cannot hold" in p.problem and "1 MiB available" in p.problem


def test_auto_without_a_gpu_plans_for_the_cpu(moe):
    if len(pymoe.memory_plan(moe).placement.devices) > 1:
        pytest.skip("this machine has a GPU")
    p = pymoe.plan(moe, vram="auto", ctx=CTX)
    assert (p.gpu, p.n_gpu_layers, p.vram) == ("CPU", 0, 0)
    assert "no GPU found" in p.summary()


def test_a_plan_loads_and_places_what_it_said(moe):
    """The plan's GPU weights land on a real second device (a local rpc-server)."""
    vram = MARGIN + DENSE_ON_GPU + KV + COMPUTE + LARGEST_EXPERT_TENSOR + 2 * EXPERTS_PER_LAYER
    p = pymoe.plan(moe, vram=vram, margin=MARGIN, ctx=CTX)
    assert p.n_cpu_moe == 2
    with pymoe.rpc.LocalRpcServer() as rpc, pymoe.Model(moe, plan=p, rpc_servers=[rpc.endpoint],
                                                        load_mode="no-mmap") as model:
        allocated = model.load_report.device_bytes
        planned_gpu = p.gpu_bytes["target weights"] + p.gpu_bytes["target experts"]
        assert abs(allocated[1] - planned_gpu) <= 0.10 * planned_gpu
        planned_ram = p.ram_bytes["target weights"] + p.ram_bytes["target experts"]
        assert abs(allocated[0] - planned_ram) <= 0.10 * planned_ram


def run_cli(*args):
    return subprocess.run([sys.executable, "-P", "-m", "pymoe", "plan", *args], capture_output=True, text=True,
                          timeout=60)


def test_cli_plan_json(moe, draft):
    r = run_cli("-m", str(moe), "-d", str(draft), "--vram", "1GiB", "--ctx", str(CTX), "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    assert p["n_cpu_moe"] == 0 and p["draft_on_gpu"] and "-fit off" in p["llama_flags"]


@pytest.mark.parametrize("args,message", [(["-m", "/nonexistent.gguf"], "no such file"),
                                          (["--vram", "8X"], "cannot read '8X' as a size"),
                                          (["--ctx", "0"], "ctx must be a positive")])
def test_cli_bad_input_is_one_line_and_exit_2(moe, args, message):
    if args[0] != "-m":
        args = ["-m", str(moe), *args]
    r = run_cli(*args)
    assert r.returncode == 2
    lines = stderr_lines(r.stderr)
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr


def test_cli_not_a_gguf(tmp_path):
    bogus = tmp_path / "x.gguf"
    bogus.write_bytes(b"not a model at all")
    r = run_cli("-m", str(bogus))
    assert r.returncode == 2 and "not a GGUF file" in r.stderr


@pytest.mark.parametrize("ctx,flash_attn", [(1024, "on"), (4096, "off"), (16384, "off"), (65536, "on")])
def test_kv_and_compute_estimates_match_what_llama_cpp_reserves(moe, ctx, flash_attn):
    """The KV cache and compute buffer llama.cpp reserves on the offload device
    (its own log lines), against the plan's estimates: within 10%."""
    p = pymoe.plan(moe, vram="1GiB", margin=MARGIN, ctx=ctx, flash_attn=flash_attn == "on")

    def load():
        with pymoe.rpc.LocalRpcServer() as rpc, pymoe.Model(moe, plan=p, rpc_servers=[rpc.endpoint],
                                                            load_mode="no-mmap") as model:
            with model.session(n_ctx=ctx, flash_attn=flash_attn, n_threads=2):
                pass

    lines = llama_log.lines_during(load)

    def reserved(kind):
        found = llama_log.rpc_buffers(lines, kind)
        assert len(found) == 1, lines
        return found[0]

    assert abs(p.gpu_bytes["target KV"] - reserved("KV")) <= 0.10 * reserved("KV")
    assert abs(p.gpu_bytes["target compute"] - reserved("compute")) <= 0.10 * reserved("compute")
    print(f"ctx {ctx} flash attention {flash_attn}: KV planned {p.gpu_bytes['target KV'] / MiB:.2f} MiB, "
          f"reserved {reserved('KV') / MiB:.2f}; compute planned {p.gpu_bytes['target compute'] / MiB:.2f} MiB, "
          f"reserved {reserved('compute') / MiB:.2f}")
