"""Self-speculation with the target's own MTP head (csrc/mtp.c): on a tiny F32
qwen35moe with one nextn layer (and the dense qwen35) the loop is token-identical
to plain greedy decoding for every draft length and rollback, sampled runs are reproducible
and every emitted token is the verifier's choice; the chooser learns
acceptance per draft depth (simulated: tests/c/draft_length_sim.c); a GGUF's
MTP layers are loaded, placed and planned only when asked for; the errors
and lifetimes."""
import gc
import json
import re
import subprocess
import sys

import pytest

import c_program
import pymoe
import tiny_models
from pymoe.cli import main as cli_main
from pymoe.memory import place_tensors
from pymoe.gguf_file import read_sizes

EXACT = dict(n_ctx=512, flash_attn="off", cache_type_k="f32", cache_type_v="f32", n_threads=2)
PROMPTS = ["Once upon a time", "1 2 3 4", "The quick brown fox"]
GREEDY = pymoe.SamplingParams.greedy()


@pytest.fixture(scope="module")
def mtp_path(model_dir):
    return tiny_models.write_model(model_dir / "mtp-qwen35moe.gguf", tiny_models.QWEN35MOE_MTP)


@pytest.fixture(scope="module")
def trunk_path(model_dir):
    """The same trunk without the head (same seed and shapes: the head is written last)."""
    return tiny_models.write_model(model_dir / "mtp-trunk-qwen35moe.gguf", tiny_models.ARCHITECTURES["qwen35moe"])


@pytest.fixture(scope="module")
def target(mtp_path):
    with pymoe.Model(mtp_path, mtp=True) as model:
        yield model


def plain_greedy(model, prompt, n=48):
    with model.session(sampling=GREEDY, **EXACT) as s:
        return list(s.generate_tokens(prompt, max_tokens=n))


# ---- lossless -------------------------------------------------------------

@pytest.mark.parametrize("draft_max", [1, 2, 3, "auto"])
@pytest.mark.parametrize("rollback", ["snapshot", "checkpoint"])
def test_greedy_mtp_output_is_plain_greedy_output(target, draft_max, rollback):
    hist = {}
    for prompt in PROMPTS:
        with pymoe.Speculative(target, "mtp", draft_max=draft_max, temperature=0, rollback=rollback,
                               **EXACT) as spec:
            assert list(spec.generate_tokens(prompt, max_tokens=48)) == plain_greedy(target, prompt)
            st = spec.stats
            for n, rounds in enumerate(st.accepted_hist):
                hist[n] = hist.get(n, 0) + rounds
            assert st.rollback_target == rollback
            if rollback == "checkpoint" and st.drafted > st.accepted:
                assert st.restores > 0
    if draft_max in (2, 3):  # the head agrees often, not always: full and partial acceptances both happen
        assert hist.get(draft_max, 0) > 0 and sum(hist.get(n, 0) for n in range(draft_max)) > 0


@pytest.fixture(scope="module")
def dense_hybrid(model_dir):
    """A second architecture: the dense qwen35, whose head has a dense FFN."""
    path = tiny_models.write_model(model_dir / "mtp-qwen35.gguf", tiny_models.QWEN35_MTP)
    with pymoe.Model(path, mtp=True) as model:
        yield model


@pytest.mark.parametrize("draft_max", [1, 3, "auto"])
def test_the_dense_qwen35_head_is_plain_greedy_output(dense_hybrid, draft_max):
    partial = 0
    for prompt in PROMPTS:
        with pymoe.Speculative(dense_hybrid, "mtp", draft_max=draft_max, temperature=0, **EXACT) as spec:
            assert list(spec.generate_tokens(prompt, max_tokens=48)) == plain_greedy(dense_hybrid, prompt)
            partial += sum(spec.stats.accepted_hist[1:3]) if draft_max == 3 else 0
    assert draft_max != 3 or partial > 0


def test_mtp_with_lookup_drafts_is_plain_greedy_output(target):
    prompt = "1 2 3 4 5 6 1 2 3 4 5 6 1 2 3"
    with pymoe.Speculative(target, "mtp", ngram=True, draft_max=4, temperature=0, **EXACT) as spec:
        assert spec.source == "mtp+ngram"
        assert list(spec.generate_tokens(prompt, max_tokens=40)) == plain_greedy(target, prompt, 40)
        assert spec.stats.drafted > 0


def test_every_emitted_token_is_the_verifiers_choice(target):
    """Greedy: the inspected round's decision is pymoe.verify's on the batch's
    own logits, and the round emits exactly draft[:n_accepted] + [next]."""
    seen = []
    with pymoe.Speculative(target, "mtp", draft_max=3, temperature=0, **EXACT) as spec:
        spec.set_inspect(lambda draft, logits, n_acc, nxt: seen.append((draft, logits, n_acc, nxt)))
        spec.feed("The quick brown fox")
        for _ in range(12):
            before = len(seen)
            emitted = spec.step()
            draft, logits, n_acc, nxt = seen[before]
            assert pymoe.verify(draft, logits, greedy=True) == (n_acc, nxt)
            assert emitted == draft[:n_acc] + [nxt]


def test_sampled_mtp_runs_are_reproducible_per_seed(target):
    def run(seed):
        with pymoe.Speculative(target, "mtp", draft_max=3, temperature=0.9, seed=seed, **EXACT) as spec:
            out = list(spec.generate_tokens("Once upon a time", max_tokens=40))
            return out, spec.stats.drafted
    first, drafted = run(7)
    assert drafted > 0
    assert run(7)[0] == first
    assert run(8)[0] != first


def test_turns_and_reset_stay_plain_greedy(target):
    with pymoe.Speculative(target, "mtp", draft_max=3, temperature=0, **EXACT) as spec, \
            target.session(sampling=GREEDY, **EXACT) as plain:
        for turn in ("Hello there", " and a second turn", " and a third"):
            assert list(spec.generate_tokens(turn, max_tokens=16)) == list(plain.generate_tokens(turn, max_tokens=16))
        spec.reset()
        plain.reset()
        assert (list(spec.generate_tokens("1 2 3 4", max_tokens=16)) ==
                list(plain.generate_tokens("1 2 3 4", max_tokens=16)))


def test_a_prompt_longer_than_a_batch_is_caught_up_chunk_by_chunk(target):
    prompt = target.tokenize("one two three four five six seven eight " * 12)  # > n_batch 32
    opts = dict(EXACT, n_batch=32, n_ubatch=32)
    with pymoe.Speculative(target, "mtp", draft_max=2, temperature=0, **opts) as spec, \
            target.session(sampling=GREEDY, **opts) as plain:
        assert list(spec.generate_tokens(prompt, max_tokens=24)) == list(plain.generate_tokens(prompt, max_tokens=24))
        assert spec.stats.mtp_tokens >= len(prompt)


def test_the_loop_stops_cleanly_at_a_full_context(target):
    with pymoe.Speculative(target, "mtp", draft_max=3, temperature=0, **dict(EXACT, n_ctx=64)) as spec:
        out = list(spec.generate_tokens("Once upon a time", max_tokens=500))
        assert spec.stop_reason == "context_full" and len(out) > 40


# ---- draft length per depth (simulated) -------------------------------------

@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return c_program.build(tmp_path_factory, "draft_length_sim", "draft_length.c", "draft_length_learned.c", "rng.c")


@pytest.mark.parametrize("decay", ["1.0", "0.8", "0.6"])
@pytest.mark.parametrize("costs", [("0.002", "0.020", "0.001", "0.9"), ("0.003", "0.030", "0.012", "0.85")])
def test_auto_learns_acceptance_per_depth(sim, decay, costs):
    """An MTP head's acceptance falls with depth and it evaluates every
    accepted token again: auto reaches the best fixed k within 3%."""
    out = subprocess.run([str(sim), "--depth-decay", decay, "--refeeds", "--repeats", "6", *costs, "8", "400", "1"],
                         capture_output=True, text=True, check=True).stdout.split()
    achieved, best = float(out[1]), float(out[3])
    assert achieved >= 0.97 * best, (achieved / best, out)


def test_stats_report_acceptance_per_depth(target):
    with pymoe.Speculative(target, "mtp", draft_max=3, temperature=0, **EXACT) as spec:
        list(spec.generate_tokens("Once upon a time", max_tokens=40))
        st = spec.stats
    assert 0 < sum(st.depth_drafted) <= st.drafted  # drafts after a rejection are never tested
    assert sum(st.depth_accepted) == st.accepted
    assert st.depth_drafted[1] >= st.depth_drafted[2] >= st.depth_drafted[3] > 0
    assert set(st.depth_acceptance) == {1, 2, 3}
    assert 0 < st.mtp_seconds <= st.draft_seconds and st.mtp_tokens > 0


# ---- loading and placing the head ---------------------------------------------

def test_without_mtp_the_head_is_not_loaded_and_the_trunk_is_unchanged(mtp_path, trunk_path):
    with pymoe.Model(mtp_path) as with_head, pymoe.Model(trunk_path) as trunk:
        assert with_head.info.n_nextn_layers == 1 and not with_head.info.mtp_loaded
        assert with_head.info.n_layers == trunk.info.n_layers == 4
        assert plain_greedy(with_head, "Once upon a time", 24) == plain_greedy(trunk, "Once upon a time", 24)
        with pytest.raises(pymoe.InvalidArgumentError, match="mtp=True"):
            pymoe.Speculative(with_head, "mtp", **EXACT)
    loaded = pymoe.memory_plan(mtp_path, load_mode="no-mmap").placement.bytes[0]
    assert loaded == pymoe.memory_plan(trunk_path, load_mode="no-mmap").placement.bytes[0]


def test_a_model_without_an_mtp_head_is_refused_with_what_is_missing(trunk_path):
    with pytest.raises(pymoe.UnsupportedError, match="nextn_predict_layers"):
        pymoe.Model(trunk_path, mtp=True)
    with pytest.raises(pymoe.UnsupportedError, match="no MTP head"):
        pymoe.plan(trunk_path, vram="1GiB", mtp=True)


def test_unloaded_layers_are_placed_nowhere(mtp_path):
    sizes = read_sizes(mtp_path)
    assert sizes.n_nextn == 1 and sizes.n_trunk == 4
    head = [i for i, (name, _) in enumerate(sizes.tensors) if name.startswith("blk.4.")]
    p = place_tensors(sizes.tensors, n_layers=sizes.n_layers, n_unloaded_layers=1, devices=["GPU"])
    assert head and all(p.device_of[i] == -1 for i in head)
    full = place_tensors(sizes.tensors, n_layers=sizes.n_layers, devices=["GPU"])
    assert sum(full.bytes) - sum(p.bytes) >= sum(sizes.tensors[i][1] for i in head)


def test_the_plan_puts_the_head_on_the_gpu_before_the_trunks_experts(mtp_path):
    sizes = read_sizes(mtp_path)
    roomy = pymoe.plan(mtp_path, vram="1GiB", ctx=1024, margin=0, mtp=True)
    assert roomy.mtp and roomy.draft_on_gpu and roomy.gpu_bytes["MTP compute"] > 0 and "MTP KV" in roomy.gpu_bytes
    assert roomy.n_cpu_moe == 0 and "--spec-type draft-mtp" in roomy.llama_flags()
    without = pymoe.plan(mtp_path, vram="1GiB", ctx=1024, margin=0)
    assert roomy.gpu_total > without.gpu_total and "MTP KV" not in without.gpu_bytes
    # a budget that holds everything but the experts: the trunk's go to RAM, the head's stay
    experts = roomy.expert_bytes_gpu
    tight = pymoe.plan(mtp_path, vram=roomy.gpu_total - experts // 2, ctx=1024, margin=0, mtp=True)
    assert tight.n_gpu_layers == sizes.n_layers + 1 and 0 < tight.n_cpu_moe <= sizes.n_trunk
    p = place_tensors(sizes.tensors, n_layers=sizes.n_layers, n_gpu_layers=tight.n_gpu_layers,
                      n_cpu_moe=tight.n_cpu_moe, devices=["GPU"])
    head_experts = [i for i, (name, _) in enumerate(sizes.tensors) if name.startswith("blk.4.ffn_up_exps")]
    assert head_experts and all(p.device_of[i] == 1 for i in head_experts)
    with pytest.raises(pymoe.InvalidArgumentError, match="not both"):
        pymoe.plan(mtp_path, mtp_path, mtp=True)


# ---- lifetimes and errors ----------------------------------------------------

def test_closing_the_model_first_leaves_the_loop_closable(mtp_path):
    model = pymoe.Model(mtp_path, mtp=True)
    spec = pymoe.Speculative(model, "mtp", **EXACT)
    list(spec.generate_tokens("Once upon a time", max_tokens=8))
    model.close()  # closes the loop's sessions, and the head with the target's
    with pytest.raises(pymoe.ClosedError):
        spec.step()
    spec.close()
    model = pymoe.Model(mtp_path, mtp=True)
    spec = pymoe.Speculative(model, "mtp", **EXACT)
    list(spec.generate_tokens("Once upon a time", max_tokens=8))
    del spec
    gc.collect()
    model.close()


def test_one_session_serves_loop_after_loop(target):
    with target.session(**EXACT) as s:
        for _ in range(2):
            with pymoe.Speculative(s, "mtp", draft_max=2, temperature=0) as spec:
                assert list(spec.generate_tokens("1 2 3 4", max_tokens=12)) == plain_greedy(target, "1 2 3 4", 12)
            s.reset()


def test_a_draft_model_and_the_head_together_are_refused(target):
    params = pymoe._native.params_struct("pymoe_spec_params")
    params.draft_sources = pymoe._lib.PYMOE_DRAFT_MODEL | pymoe._lib.PYMOE_DRAFT_MTP
    with target.session(**EXACT) as t, target.session(**EXACT) as d:
        out = pymoe._ffi.new("pymoe_spec **")
        assert pymoe._lib.pymoe_spec_create(t._handle(), d._handle(), params, out) == pymoe._lib.PYMOE_EINVAL
        assert "PYMOE_DRAFT_MTP" in pymoe._ffi.string(pymoe._lib.pymoe_last_error()).decode()


# ---- the commands -------------------------------------------------------------

def test_generate_with_the_mtp_head(mtp_path, capsys):
    assert cli_main(["generate", "-m", str(mtp_path), "-d", "mtp", "-p", "Once upon a time", "-n", "24", "--temp", "0",
                     "--draft-max", "3", "--ctx", "256", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["draft_source"] == "mtp" and r["n_drafted"] > 0 and set(r["acceptance_by_depth"]) <= {"1", "2", "3"}
    assert cli_main(["generate", "-m", str(mtp_path), "-d", "mtp", "--ngram", "-p", "1 2 3 1 2 3 1 2", "-n", "12",
                     "--temp", "0", "--ctx", "256", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["draft_source"] == "mtp+ngram"


def test_generate_with_mtp_on_a_model_without_a_head_says_why(trunk_path, capsys):
    assert cli_main(["generate", "-m", str(trunk_path), "-d", "mtp", "-p", "x", "-n", "4"]) == 2
    assert "no MTP head" in capsys.readouterr().err


def test_plan_with_the_mtp_head(mtp_path, capsys):
    assert cli_main(["plan", "-m", str(mtp_path), "-d", "mtp", "--vram", "1GiB", "--ctx", "1024"]) == 0
    out = capsys.readouterr().out
    assert "the target's MTP head, on GPU" in out and "MTP compute" in out


def test_a_chat_with_the_mtp_head_says_what_a_plain_one_says(model_dir):
    target = tiny_models.write_model(model_dir / "mtp-chat-qwen35moe.gguf", tiny_models.QWEN35MOE_MTP,
                                     chat_template=tiny_models.CHATML)

    def chat(*args):
        return subprocess.run([sys.executable, "-P", "-m", "pymoe", "chat", "-m", str(target), "--temp", "0", "--ctx",
                               "512", "--threads", "2", "-n", "24", "--flash-attn", "off", "--cache-type-k", "f32",
                               "--cache-type-v", "f32", *args], input="Hello there\nTell me more\n/stats\n",
                              capture_output=True, text=True, timeout=120)
    plain, spec = chat(), chat("-d", "mtp", "--draft-max", "3")
    assert plain.returncode == 0 and spec.returncode == 0, plain.stderr + spec.stderr
    assert spec.stdout == plain.stdout
    found = re.search(r"draft \(mtp, whole chat\): (\d+) of (\d+) drafts accepted", spec.stderr)
    assert found and int(found.group(2)) > 0, spec.stderr
