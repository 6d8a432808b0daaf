"""The expert cache (csrc/expert_cache*.c, patches/0001-expert-cache.patch)
with a local rpc-server as the device and the experts in host memory: greedy
output is the same with the cache on and off for plain decoding and every
draft source (a hybrid target with an MTP head included), the logits are the
same, the cache holds no more device memory than its budget, a routing trace
replayed through the policy counts exactly what a session measured, and what
it cannot do is said in one line."""
import numpy as np
import pytest

import pymoe
import pymoe.rpc
import tiny_models
from pymoe.expert_cache import replay
from tiny_models import ARCHITECTURES

EXACT = dict(n_ctx=256, flash_attn="off", cache_type_k="f32", cache_type_v="f32", n_threads=2)
PROMPTS = ["Once upon a time", "1 2 3 4 1 2 3 4 1 2", "Hello"]
MiB = 1 << 20


@pytest.fixture(scope="module")
def rpc():
    with pymoe.rpc.LocalRpcServer() as server:
        yield server


@pytest.fixture(scope="module")
def paths(model_dir):
    out = {name: tiny_models.write_model(model_dir / f"cache-{name}.gguf", ARCHITECTURES[name])
           for name in ("llama-moe", "qwen3moe", "qwen35moe")}
    out["mtp"] = tiny_models.write_model(model_dir / "cache-mtp.gguf", tiny_models.QWEN35MOE_MTP)
    out["draft"] = tiny_models.write_model(model_dir / "cache-draft.gguf", tiny_models.PAIR_DRAFT)
    out["placement"] = tiny_models.write_model(model_dir / "cache-placement.gguf", tiny_models.PLACEMENT_MOE)
    return out


def load(path, rpc, mib=0, **kwargs):
    """Every layer's experts in host memory, the rest on the rpc-server."""
    return pymoe.Model(path, rpc_servers=[rpc.endpoint], n_cpu_moe=99, moe_cache_mib=mib, **kwargs)


def smallest_budget(path, rpc, slots=1):
    """MiB for `slots` experts per layer (and the zero slot), rounded up."""
    with load(path, rpc, mib=64) as m:
        info = m.moe_cache
    return -(-(info.slot_bytes * (slots + 1) + 64 * 1024) // MiB)


def greedy(model, prompt, n=24):
    with model.session(sampling=pymoe.SamplingParams.greedy(), **EXACT) as s:
        return [t.id for t in s.generate(prompt, max_tokens=n)], s.moe_cache


@pytest.mark.parametrize("arch", ["llama-moe", "qwen3moe", "qwen35moe"])
def test_greedy_decoding_is_the_same_with_the_cache(paths, rpc, arch):
    with load(paths[arch], rpc) as off:
        expected = [greedy(off, p)[0] for p in PROMPTS]
    with load(paths[arch], rpc, mib=smallest_budget(paths[arch], rpc)) as on:
        assert on.moe_cache.enabled and on.moe_cache.n_layers == 4 and on.moe_cache.n_slots >= 1
        hits = 0
        for prompt, want in zip(PROMPTS, expected):
            got, stats = greedy(on, prompt)
            assert got == want, (arch, prompt)
            # every layer's rows, but the last layer's: it computes only the rows whose logits are asked for
            assert stats.steps > 0 and 0 < stats.hits + stats.misses <= stats.tokens * 4 * on.info.n_experts_used
            hits += stats.hits
        assert hits > 0, "the cache never hit: the test does not exercise the cached path"


def test_logits_are_the_same_with_the_cache(paths, rpc):
    """Hits are computed on the device, misses on the host, the sum is the
    uncached mul_mat_id: every logit of every step agrees (F32)."""
    path = paths["llama-moe"]
    tokens = None
    rows = {}
    for mib in (0, smallest_budget(path, rpc, slots=2)):
        with load(path, rpc, mib=mib) as m, m.session(**EXACT) as s:
            tokens = tokens or m.tokenize("Once upon a time there was a cat")
            out = []
            for t in tokens:  # one-token decodes: each goes through the cache
                s.feed([t])
                out.append(np.array(s.logits()))
            rows[mib] = np.stack(out)
            if mib:
                assert s.moe_cache.hits > 0
    off, on = rows.values()
    assert np.abs(off - on).max() < 1e-4, np.abs(off - on).max()


@pytest.mark.parametrize("source", ["draft", "ngram", "draft+ngram"])
def test_speculative_decoding_is_the_same_with_the_cache(paths, rpc, source):
    with load(paths["llama-moe"], rpc) as off:
        expected = [greedy(off, p, n=32)[0] for p in PROMPTS]
    with pymoe.Model(paths["draft"]) as draft, \
            load(paths["llama-moe"], rpc, mib=smallest_budget(paths["llama-moe"], rpc)) as target:
        verified = 0
        for prompt, want in zip(PROMPTS, expected):
            d = "ngram" if source == "ngram" else draft
            opts = dict(ngram=True) if source == "draft+ngram" else {}
            with pymoe.Speculative(target, d, draft_max=4, temperature=0, **opts, **EXACT) as sp:
                assert list(sp.generate_tokens(prompt, max_tokens=32)) == want, (source, prompt)
                st = sp.stats
                assert st.moe_cache is not None and st.moe_cache.steps > 0
                verified += st.rounds if st.drafted else 0
        assert verified > 0, f"{source}: no verify batch ran"


def test_mtp_on_a_hybrid_target_is_the_same_with_the_cache(paths, rpc):
    """qwen35moe with an MTP head: the head's own MoE layer is cached too (its
    layer index is past the trunk's), and snapshots roll the trunk back."""
    with load(paths["mtp"], rpc, mtp=True) as off:
        expected = [greedy(off, p, n=32)[0] for p in PROMPTS]
    with load(paths["mtp"], rpc, mib=smallest_budget(paths["mtp"], rpc, slots=2), mtp=True) as target:
        assert target.moe_cache.n_layers == 5  # 4 trunk layers and the head's
        for rollback in ("snapshot", "checkpoint"):
            for prompt, want in zip(PROMPTS, expected):
                with pymoe.Speculative(target, "mtp", draft_max=3, temperature=0, rollback=rollback,
                                       **EXACT) as sp:
                    assert list(sp.generate_tokens(prompt, max_tokens=32)) == want, (rollback, prompt)
                    assert sp.stats.drafted > 0 and sp.stats.moe_cache.hits > 0


def test_the_cache_holds_its_budget_and_no_more(paths, rpc):
    """The rpc-server's memory grows by the cache's bytes (within 10%), which
    fit in the budget."""
    from test_placement_rpc import settled_rss
    path = paths["placement"]
    mib = smallest_budget(path, rpc, slots=3)
    with load(path, rpc) as m:
        base = settled_rss(rpc)
    with load(path, rpc, mib=mib) as m:
        grown = settled_rss(rpc)
        info = m.moe_cache
        assert info.n_slots >= 3  # the budget is whole MiB: what is left over holds more
        assert info.bytes <= mib * MiB
        assert abs((grown - base) - info.bytes) <= 0.10 * info.bytes + 256 * 1024, (grown - base, info.bytes)
        # and decoding fills it without allocating more
        greedy(m, "Once upon a time", n=32)
        assert settled_rss(rpc) - grown <= 0.10 * info.bytes + 256 * 1024


@pytest.mark.parametrize("upload_cap", [0, 1])
def test_a_replayed_trace_counts_what_the_session_measured(paths, rpc, upload_cap):
    path = paths["placement"]
    with load(path, rpc, mib=smallest_budget(path, rpc, slots=3), moe_cache_uploads=upload_cap) as m, \
            m.session(record_routing=True, **EXACT) as s:
        n_layers, e, slots = m.info.n_layers, m.info.n_experts, m.moe_cache.n_slots
        prompt = m.tokenize("Once upon a time there was a cat who liked to sit")
        traces = [[] for _ in range(n_layers)]
        token, fed = prompt, 0
        for size in [len(prompt)] + [1] * 20 + [3, 5, 1, 2]:  # decode steps and verify-sized batches
            s.feed(token if size == len(prompt) else token[:size], all_logits=size in (3, 5))
            for layer in range(n_layers):
                traces[layer].append(s.routing(layer))  # the last layer's rows: those whose logits are asked for
            fed += size
            token = [int(np.argmax(s.logits()))] * 5
        measured = s.moe_cache
    predicted = pymoe.expert_cache.MoeCacheStats()
    for layer in range(n_layers):
        steps = [len(t) for t in traces[layer]]
        predicted = predicted + replay(np.concatenate(traces[layer]), e, slots, upload_cap=upload_cap, step_tokens=steps)
    assert (predicted.hits, predicted.misses, predicted.uploads, predicted.host_experts) == \
        (measured.hits, measured.misses, measured.uploads, measured.host_experts)
    assert measured.hits > 0 and measured.tokens == fed


def test_the_policy_keeps_what_is_used_most_lately():
    """Decayed use counts: a miss is copied in only when it beats the held
    expert with the fewest recent uses, which it replaces."""
    ids = np.array([[0], [1], [0], [2], [1], [0]], np.int32)
    # 2 slots: 0 and 1 fill them; 0 hits; 2 replaces 1 (one use, older); 1 replaces 2 (one use each, 1's
    # older uses count too); 0 hits. Least-recently-used would evict 0 for 1 instead: one hit.
    st = replay(ids, n_experts=4, n_slots=2, upload_cap=0)
    assert (st.hits, st.misses, st.uploads) == (2, 4, 4)
    # an expert used in 5 decodes is not evicted by two one-offs (least-recently-used: 4 copies, 4 hits)
    busy = np.array([[0]] * 5 + [[1], [2], [0]], np.int32)
    st = replay(busy, n_experts=4, n_slots=1, upload_cap=0)
    assert (st.hits, st.uploads) == (5, 1)
    # a small decay weighs recency: close to least-recently-used
    st = replay(busy, n_experts=4, n_slots=1, upload_cap=0, decay=0.01)
    assert (st.hits, st.uploads) == (4, 4)
    # one decode of all six: 3 distinct experts, nothing held yet, two copied in (both slots used by it)
    st = replay(ids, n_experts=4, n_slots=2, upload_cap=0, step_tokens=[6])
    assert (st.hits, st.misses, st.uploads, st.host_experts, st.uncached_expert_bytes) == (0, 6, 2, 3, 3)
    # a cap of 1 per decode: the most used missed expert goes first (0: three uses)
    st = replay(np.array([[0], [1], [0], [0]] + [[0]] * 2, np.int32), n_experts=4, n_slots=2, upload_cap=1,
                step_tokens=[4, 2])
    assert (st.hits, st.uploads) == (2, 1)  # expert 0 was copied in: the second decode hits it twice
    with pytest.raises(pymoe.InvalidArgumentError):
        replay(ids, n_experts=4, n_slots=2, step_tokens=[2, 2])
    with pytest.raises(pymoe.InvalidArgumentError):
        replay(ids, n_experts=4, n_slots=2, decay=1.0)

def test_a_model_with_nothing_to_cache_says_so_in_one_line(paths, rpc):
    with pytest.warns(pymoe.PymoeWarning, match="no MoE layer keeps its experts in host memory") as said, \
            pymoe.Model(paths["llama-moe"], rpc_servers=[rpc.endpoint], moe_cache_mib=8) as m:  # experts on the device
        assert not m.moe_cache.enabled
        assert greedy(m, "Hello")[1] is None
    assert len(said) == 1 and "\n" not in str(said[0].message)
    with pytest.warns(pymoe.PymoeWarning, match="no expert cache: llama model without routed experts"), \
            pymoe.Model(paths["draft"], moe_cache_mib=8) as m:  # dense
        assert not m.moe_cache.enabled


def test_a_budget_too_small_for_one_slot_per_layer_is_a_clear_error(paths, rpc):
    with pytest.raises(pymoe.InvalidArgumentError, match="cannot hold one expert per layer"):
        load(paths["placement"], rpc, mib=1)
    with pytest.raises(pymoe.InvalidArgumentError, match="moe_cache_mib"):
        load(paths["placement"], rpc, mib=-1)


def test_generate_json_reports_the_cache(paths, rpc):
    import json
    import subprocess
    import sys
    mib = smallest_budget(paths["placement"], rpc, slots=2)
    out = subprocess.run([sys.executable, "-P", "-m", "pymoe", "generate", "-m", str(paths["placement"]), "-p",
                          "Once upon a time", "-n", "16", "--temp", "0", "--rpc", rpc.endpoint, "-ncmoe", "99",
                          "--moe-cache-mib", str(mib), "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    cache = json.loads(out.stdout)["moe_cache"]
    assert set(cache) >= {"hits", "misses", "uploaded_bytes", "host_expert_bytes_per_token"}
    assert cache["hits"] + cache["misses"] > 0
    assert cache["host_expert_bytes_per_token"] < cache["uncached_expert_bytes_per_token"]


def test_the_plan_sizes_the_cache_as_the_library_does(paths, rpc):
    from pymoe.plan import cache_slots, read_sizes
    path = paths["placement"]
    sizes = read_sizes(path)
    for slots in (1, 3, 6):
        mib = smallest_budget(path, rpc, slots=slots)
        with load(path, rpc, mib=mib) as m:
            assert cache_slots(sizes, mib * MiB, range(sizes.n_layers)) == m.moe_cache.n_slots
    # auto: every layer's experts in RAM, the rest of the budget to the cache
    p = pymoe.plan(path, vram="256MiB", margin=0, ctx=256, moe_cache="auto")
    assert p.fits and p.n_cpu_moe == sizes.n_layers and p.n_gpu_layers == sizes.n_layers + 1
    assert p.moe_cache_slots == sizes.n_experts and p.moe_cache_layers == sizes.n_layers  # what is left holds them all
    assert "expert cache" in p.summary() and p.gpu_total <= 256 * MiB
    # 4 MiB reserved first, the rest placed as without a cache: the layers whose experts stay in RAM are cached
    full = pymoe.plan(path, vram="256MiB", margin=0, ctx=256)
    dense = (full.gpu_total - full.expert_bytes_gpu) // MiB + 1
    small = pymoe.plan(path, vram=f"{dense + 4 + 2}MiB", margin=0, ctx=256, moe_cache=4)
    assert small.fits and small.moe_cache_mib == 4 and 0 < small.n_cpu_moe < sizes.n_layers
    assert small.moe_cache_slots == cache_slots(sizes, 4 * MiB, range(small.n_cpu_moe))
    assert small.moe_cache_layers == small.n_cpu_moe
    # a cache where every expert fits anyway: the plan says none is needed and places as without one
    roomy = pymoe.plan(path, vram="256MiB", margin=0, ctx=256, moe_cache=4)
    assert roomy.moe_cache_mib == 0 and roomy.n_cpu_moe == 0 and "no expert cache is needed" in roomy.note
    with pytest.raises(pymoe.InvalidArgumentError):
        pymoe.plan(path, vram="16MiB", moe_cache="lots")


def test_a_routing_trace_predicts_the_hit_rate_of_decoding_the_same_tokens(paths, rpc, tmp_path):
    """The plan's prediction: a trace recorded in one batch, replayed one token
    per decode, equals what the cache counts decoding those tokens."""
    path = paths["placement"]
    mib = smallest_budget(path, rpc, slots=2)
    with load(path, rpc) as m:
        tokens = m.tokenize("Once upon a time there was a cat who liked to sit in the sun all day long")
        np.save(tmp_path / "trace.npy", pymoe.expert_cache.routing_trace(m, tokens, **EXACT))
    with load(path, rpc, mib=mib) as m, m.session(**EXACT) as s:
        for t in tokens:
            s.feed([t])
        measured = s.moe_cache
    full = pymoe.plan(path, vram="256MiB", margin=0, ctx=256)
    vram = (full.gpu_total - full.expert_bytes_gpu) // MiB + 1 + mib  # room for the cache, not for a layer's experts
    p = pymoe.plan(path, vram=f"{vram}MiB", margin=0, ctx=256, moe_cache=mib, routing_trace=tmp_path / "trace.npy")
    assert p.n_cpu_moe == m.info.n_layers and p.moe_cache_trace_tokens == len(tokens)
    assert p.moe_cache_hit_rate == measured.hit_rate and measured.hits > 0
    out = subprocess_plan(path, vram, mib, tmp_path / "trace.npy")
    assert f"predicted hit rate {measured.hit_rate:.0%}" in out


def subprocess_plan(path, vram, mib, trace):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-P", "-m", "pymoe", "plan", "-m", str(path), "--vram", f"{vram}MiB",
                        "--margin", "0", "--ctx", "256", "--moe-cache-mib", str(mib), "--routing-trace", str(trace)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_bench_reports_the_cache_per_setting(paths, rpc, tmp_path):
    import json
    import subprocess
    import sys
    mib = smallest_budget(paths["llama-moe"], rpc, slots=2)
    r = subprocess.run([sys.executable, "-P", "-m", "pymoe", "bench", "-m", str(paths["llama-moe"]), "-d", "ngram",
                        "--draft-max", "0,auto", "--repeat", "1", "-n", "8", "--ctx", "256", "--threads", "2", "--rpc",
                        rpc.endpoint, "-ncmoe", "99", "--moe-cache-mib", str(mib), "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    settings = json.loads((tmp_path / "bench.json").read_text())["settings"]
    assert all(s["moe_cache"]["hits"] + s["moe_cache"]["misses"] > 0 for s in settings)
    assert "expert cache hits" in r.stdout


def test_the_cache_serves_only_batches_below_the_op_offload_batch(paths, rpc, monkeypatch):
    """From GGML_OP_OFFLOAD_MIN_BATCH tokens on, ggml runs host experts on the device, which would not skip
    the rows the cache computed: the cache stops below it, and refuses when every batch is offloaded."""
    mib = smallest_budget(paths["placement"], rpc)
    monkeypatch.setenv("GGML_OP_OFFLOAD_MIN_BATCH", "8")
    with load(paths["placement"], rpc, mib=mib) as m:
        assert m.moe_cache.max_tokens == 7
    for value in ("0", "1", "none"):
        monkeypatch.setenv("GGML_OP_OFFLOAD_MIN_BATCH", value)
        with pytest.raises(pymoe.InvalidArgumentError, match="GGML_OP_OFFLOAD_MIN_BATCH"):
            load(paths["placement"], rpc, mib=mib)


def test_experts_with_biases_are_not_cached_and_that_is_said(model_dir, rpc):
    """gpt-oss's experts have per-expert biases, which the patch does not serve."""
    path = tiny_models.write_model(model_dir / "cache-gpt-oss.gguf", ARCHITECTURES["gpt-oss"])
    with pytest.warns(pymoe.PymoeWarning, match="biases or scales"), load(path, rpc, mib=64) as m:
        assert not m.moe_cache.enabled
        assert greedy(m, "Hello")[1] is None
