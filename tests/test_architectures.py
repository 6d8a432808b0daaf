"""The MoE architectures people run, as tiny F32 GGUFs (tests/tiny_models.py):
Mixtral-style llama, qwen3moe, gpt-oss, and the hybrids qwen35moe (routed and
shared experts) and qwen35 (dense), whose gated delta-net layers keep
recurrent state. Each loads in every load mode, keeps the experts of N layers
on the CPU side of a local RPC device where the plan says, and decodes
speculatively token-identical to plain greedy decoding, through full and
partial acceptances, with every rollback its memory supports."""
import json

import pytest

import llama_log
import pymoe
import pymoe.rpc
import tiny_models
from conftest import needs_real_mlock
from pymoe.plan import read_sizes
from tiny_models import ARCHITECTURES

EXACT = dict(n_ctx=256, flash_attn="off", cache_type_k="f32", cache_type_v="f32", n_threads=2)
PROMPTS = ["Once upon a time", "1 2 3 4", "Hello"]
HYBRIDS = ("qwen35moe", "qwen35")
MiB = 1 << 20


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def paths(model_dir):
    out = {name: tiny_models.write_model(model_dir / f"arch-{name}.gguf", shape)
           for name, shape in ARCHITECTURES.items()}
    out["draft"] = tiny_models.write_model(model_dir / "arch-draft.gguf", tiny_models.PAIR_DRAFT)
    out["hybrid-draft"] = tiny_models.write_model(model_dir / "arch-hybrid-draft.gguf", tiny_models.PAIR_HYBRID_DRAFT)
    return out


@pytest.fixture(scope="module")
def draft(paths):
    with pymoe.Model(paths["draft"]) as model:
        yield model


def plain_greedy(model, prompt, n=32):
    with model.session(sampling=pymoe.SamplingParams.greedy(), **EXACT) as s:
        return [t.id for t in s.generate(prompt, max_tokens=n)]


def test_the_model_is_what_llama_cpp_says_it_is(paths, arch):
    with pymoe.Model(paths[arch]) as m:
        assert m.info.arch == ARCHITECTURES[arch].arch
        assert m.info.is_hybrid == (arch in HYBRIDS) and not m.info.is_recurrent
        assert m.info.n_experts == ARCHITECTURES[arch].n_experts


@pytest.mark.parametrize("load_mode", ["mmap", "no-mmap", pytest.param("mlock", marks=needs_real_mlock), "auto"])
def test_every_load_mode_decodes_the_same(paths, arch, load_mode):
    with pymoe.Model(paths["llama-moe" if arch == "llama-moe" else arch], load_mode="mmap") as ref:
        expected = plain_greedy(ref, PROMPTS[0], 16)
    with pymoe.Model(paths[arch], load_mode=load_mode) as m:
        assert m.load_report.load_mode == (load_mode if load_mode != "auto" else m.load_report.load_mode)
        if load_mode == "mlock":
            assert m.load_report.locked_bytes > 0
        assert plain_greedy(m, PROMPTS[0], 16) == expected


@pytest.mark.parametrize("n_cpu_moe", [1, 3])
def test_the_plan_counts_expert_bytes_as_llama_cpp_allocates_them(paths, arch, n_cpu_moe):
    """Experts of the first n_cpu_moe layers stay on the CPU side of a local RPC
    device; the plan's bytes per side are what llama.cpp allocated."""
    if not ARCHITECTURES[arch].n_experts:
        pytest.skip(f"{arch} is dense: no experts to place")
    everything = pymoe.plan(paths[arch], vram="1GiB", margin=0, ctx=256)
    per_layer = everything.expert_bytes_gpu // ARCHITECTURES[arch].n_layers
    assert everything.n_cpu_moe == 0 and per_layer > 0
    # a budget n_cpu_moe layers of experts short of everything on the GPU
    vram = everything.gpu_total - n_cpu_moe * per_layer + per_layer // 2
    p = pymoe.plan(paths[arch], vram=vram, margin=0, ctx=256)
    assert p.n_cpu_moe == n_cpu_moe
    assert p.expert_bytes_ram == n_cpu_moe * per_layer
    with pymoe.rpc.LocalRpcServer() as rpc, pymoe.Model(paths[arch], plan=p, rpc_servers=[rpc.endpoint],
                                                        load_mode="no-mmap") as model:
        allocated = model.load_report.device_bytes
        gpu = p.gpu_bytes["target weights"] + p.gpu_bytes["target experts"]
        ram = p.ram_bytes["target weights"] + p.ram_bytes["target experts"]
        assert abs(allocated[1] - gpu) <= 0.01 * gpu, (allocated, gpu)
        assert abs(allocated[0] - ram) <= 0.01 * ram, (allocated, ram)


@pytest.mark.parametrize("n_rs_seq", [0, 4])
def test_the_plan_counts_kv_and_recurrent_state_as_llama_cpp_reserves_them(paths, arch, n_rs_seq):
    """KV cache of the attention layers only, plus 1 + n_rs_seq copies of the
    recurrent state of the others, on the device (RPC) that holds the layers.
    gpt-oss's sliding-window layers get a full-size cache: pymoe's sessions keep
    llama.cpp's default (swa_full), and at this context a window-sized cache
    would be smaller, so the check would see it."""
    ctx = 2048
    p = pymoe.plan(paths[arch], vram="1GiB", margin=0, ctx=ctx, n_rs_seq=n_rs_seq, flash_attn=False)
    holder = {}

    def load():
        with pymoe.rpc.LocalRpcServer() as rpc, pymoe.Model(paths[arch], plan=p, rpc_servers=[rpc.endpoint],
                                                            load_mode="no-mmap") as model:
            with model.session(n_ctx=ctx, flash_attn="off", n_threads=2, n_rs_seq=n_rs_seq) as s:
                holder["granted"] = s.n_rs_seq

    lines = llama_log.lines_during(load)
    kv, rs = sum(llama_log.rpc_buffers(lines, "KV")), sum(llama_log.rpc_buffers(lines, "RS"))
    if arch in HYBRIDS:
        assert holder["granted"] == n_rs_seq and rs > 0
        # llama.cpp prints MiB with two decimals
        assert abs(read_sizes(paths[arch]).recurrent_bytes(n_rs_seq) - rs) <= 0.0051 * MiB
    else:
        assert holder["granted"] == 0 and rs == 0
    assert abs(p.gpu_bytes["target KV"] - (kv + rs)) <= 0.01 * (kv + rs) + 16 * 1024, (p.gpu_bytes, kv, rs)


def methods(arch):
    """Every rollback the target supports, as Speculative arguments."""
    if arch not in HYBRIDS:
        return {"remove": {}}
    return {"snapshot": dict(rollback="snapshot"), "checkpoint": dict(rollback="checkpoint"),
            "snapshots fewer than k": dict(rollback="snapshot", n_rs_seq=2)}


@pytest.mark.parametrize("draft_max", [1, 4, "auto"])
def test_greedy_speculation_is_plain_greedy_decoding_for_every_rollback(paths, draft, arch, draft_max):
    with pymoe.Model(paths[arch]) as target:
        for name, opts in methods(arch).items():
            accepted = partial = restores = 0
            for prompt in PROMPTS:
                expected = plain_greedy(target, prompt)
                with pymoe.Speculative(target, draft, draft_max=draft_max, temperature=0, **EXACT, **opts) as sp:
                    assert list(sp.generate_tokens(prompt, max_tokens=32)) == expected, (arch, name, prompt)
                    s = sp.stats
                    assert s.rollback_target == opts.get("rollback", "remove")
                    assert s.rollback_draft == "remove"
                    accepted += s.accepted
                    partial += sum(s.accepted_hist[1:max(s.rounds_by_k, default=0)])
                    restores += s.restores
            assert accepted > 0, f"{arch} {name}: the models never agreed"
            if draft_max != "auto":  # auto may settle on plain decoding: there is nothing to roll back then
                if draft_max > 1:
                    assert partial > 0, f"{arch} {name}: no partial acceptance was exercised"
                if name == "checkpoint":
                    assert restores > 0, f"{arch} {name}: no checkpoint was restored"


@pytest.mark.parametrize("target_arch", HYBRIDS)
def test_a_hybrid_draft_rolls_back_by_checkpoint(paths, target_arch):
    accepted = restores = 0
    with pymoe.Model(paths[target_arch]) as target, pymoe.Model(paths["hybrid-draft"]) as hdraft:
        for prompt in PROMPTS:
            expected = plain_greedy(target, prompt)
            with pymoe.Speculative(target, hdraft, draft_max=4, temperature=0, **EXACT) as sp:
                assert list(sp.generate_tokens(prompt, max_tokens=32)) == expected
                s = sp.stats
                assert (s.rollback_target, s.rollback_draft) == ("snapshot", "checkpoint")
                accepted, restores = accepted + s.accepted, restores + s.restores
    assert accepted > 0 and restores > 0


def test_sampled_speculation_on_a_hybrid_is_reproducible(paths, draft):
    with pymoe.Model(paths["qwen35moe"]) as target:
        for rollback in ("snapshot", "checkpoint"):
            runs = []
            for _ in range(2):
                with pymoe.Speculative(target, draft, draft_max=3, temperature=0.8, seed=7, rollback=rollback,
                                       **EXACT) as sp:
                    runs.append(list(sp.generate_tokens(PROMPTS[0], max_tokens=24)))
                    assert sp.stats.rounds > 0 and sp.stats.drafted > sp.stats.accepted
            # restores and snapshots leave nothing behind that changes the next run
            assert runs[0] == runs[1], rollback


def test_rollbacks_a_model_cannot_do_are_refused_with_the_reason(paths, draft):
    with pymoe.Model(paths["gpt-oss"]) as kv_only:
        with pytest.raises(pymoe.errors.InvalidArgumentError, match="KV cache only"):
            pymoe.Speculative(kv_only, draft, draft_max=2, rollback="checkpoint", **EXACT)
        with pytest.raises(pymoe.errors.InvalidArgumentError, match="snapshot"):
            pymoe.Speculative(kv_only, draft, draft_max=2, rollback="snapshot", **EXACT)
    with pymoe.Model(paths["qwen35"]) as hybrid:
        with pytest.raises(pymoe.errors.InvalidArgumentError, match="cannot drop positions"):
            pymoe.Speculative(hybrid, draft, draft_max=2, rollback="remove", **EXACT)
        with pytest.raises(pymoe.errors.InvalidArgumentError, match="no recurrent-state snapshots"):
            pymoe.Speculative(hybrid, draft, draft_max=2, rollback="snapshot", n_rs_seq=0, **EXACT)
        with pytest.raises(pymoe.errors.InvalidArgumentError, match="rollback must be one of"):
            pymoe.Speculative(hybrid, draft, draft_max=2, rollback="undo", **EXACT)


def cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-P", "-m", "pymoe", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_generate_on_a_hybrid_target_reports_its_rollback(paths):
    common = ["-m", paths["qwen35moe"], "-p", PROMPTS[0], "-n", 24, "--json", "--temp", "0", "--ctx", 256,
              "--threads", 2, "--flash-attn", "off", "--cache-type-k", "f32", "--cache-type-v", "f32"]
    plain = cli("generate", *common, "--draft-max", 0)
    assert plain.returncode == 0, plain.stderr
    for rollback in ("snapshot", "checkpoint"):
        r = cli("generate", *common, "-d", paths["draft"], "--draft-max", 3, "--rollback", rollback)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["tokens"] == json.loads(plain.stdout)["tokens"]
        assert (out["rollback"], out["draft_rollback"]) == (rollback, "remove")
        assert out["n_drafted"] > out["n_accepted"] > 0
    bad = cli("generate", *common, "-d", paths["draft"], "--rollback", "remove")
    assert bad.returncode == 2 and "cannot drop positions" in bad.stderr


def test_plan_counts_the_snapshots_it_is_told_about(paths):
    base = json.loads(cli("plan", "-m", paths["qwen35moe"], "--vram", "1GiB", "--ctx", 512, "--json").stdout)
    more = json.loads(cli("plan", "-m", paths["qwen35moe"], "--vram", "1GiB", "--ctx", 512, "--n-rs-seq", 4,
                          "--json").stdout)
    state = read_sizes(paths["qwen35moe"]).recurrent_bytes()
    assert state > 0 and more["gpu_bytes"]["target KV"] - base["gpu_bytes"]["target KV"] == 4 * state
    # speculation (a draft) adds the checkpoint's copy
    spec = json.loads(cli("plan", "-m", paths["qwen35moe"], "-d", paths["draft"], "--vram", "1GiB", "--ctx", 512,
                          "--n-rs-seq", 4, "--json").stdout)
    assert spec["gpu_bytes"]["target KV"] - more["gpu_bytes"]["target KV"] == state
    r = cli("plan", "-m", paths["qwen35moe"], "--n-rs-seq", -1)
    assert r.returncode == 2 and "n_rs_seq must be" in r.stderr


@pytest.mark.parametrize("arch_name, opts", [("llama-moe", {}), ("qwen35moe", dict(rollback="checkpoint"))])
def test_verify_batches_stay_below_the_op_offload_batch(paths, draft, arch_name, opts):
    """llama.cpp copies weights kept in RAM to the GPU for ops of 32 tokens or
    more: a verify batch must never be that long, with the longest draft and
    with the tokens a checkpoint restore evaluates again."""
    with pymoe.Model(paths[arch_name]) as target:
        expected = plain_greedy(target, PROMPTS[0])
        with pymoe.Speculative(target, draft, draft_max=pymoe.speculative.MAX_DRAFT, temperature=0, **EXACT,
                               **opts) as sp:
            assert list(sp.generate_tokens(PROMPTS[0], max_tokens=32)) == expected
            assert 2 <= sp.stats.max_verify_batch <= 31, sp.stats


def test_a_smaller_op_offload_batch_caps_verify_batches_too(paths, draft, monkeypatch):
    monkeypatch.setenv("GGML_OP_OFFLOAD_MIN_BATCH", "6")  # ggml reads it from the same environment
    with pymoe.Model(paths["llama-moe"]) as target:
        expected = plain_greedy(target, PROMPTS[0])
        with pymoe.Speculative(target, draft, draft_max=8, temperature=0, **EXACT) as sp:
            assert list(sp.generate_tokens(PROMPTS[0], max_tokens=32)) == expected
            assert sp.stats.max_verify_batch == 5
