"""Sessions: feeding, logits views, rewind, state, bad input."""
import os

import numpy as np
import pytest

import pymoe

PROMPT = [1, 450, 4996, 17354, 1701, 29916, 432, 17204]


def test_feed_takes_ints_sequences_and_arrays(session):
    session.feed(np.int32(5))
    session.feed(np.array([6, 7], dtype=np.int64))
    session.feed((8, 9))
    assert session.position == 5
    with pytest.raises(pymoe.InvalidArgumentError):
        session.feed([[1, 2], [3, 4]])
    with pytest.raises(pymoe.InvalidArgumentError):
        session.feed([])
    assert session.position == 5


def test_feed_moves_the_position_and_gives_logits(session):
    assert session.position == 0
    with pytest.raises(pymoe.InvalidStateError):
        session.logits()
    session.feed(PROMPT)
    assert session.position == len(PROMPT)
    logits = session.logits()
    assert logits.shape == (session.n_vocab,) and logits.dtype == np.float32
    assert session.logits_all().shape == (1, session.n_vocab)
    session.feed(7)
    assert session.position == len(PROMPT) + 1


def test_all_logits_match_feeding_one_token_at_a_time(dense_model):
    # like with like: an F16 cache or flash attention rounds to F16, which measured up to 1.06e-3 here
    exact = dict(n_ctx=64, flash_attn="off", cache_type_k="f32", cache_type_v="f32")
    with dense_model.session(**exact) as batched, dense_model.session(**exact) as single:
        batched.feed(PROMPT, all_logits=True)
        rows = batched.logits_all()
        assert rows.shape == (len(PROMPT), batched.n_vocab)
        np.testing.assert_array_equal(rows[-1], batched.logits())
        for i, token in enumerate(PROMPT):
            single.feed(token)
            # F32 weights: batched and one-by-one agree to float rounding
            np.testing.assert_allclose(rows[i], single.logits(), rtol=0, atol=1e-3)


def test_long_feed_is_split_into_batches(dense_model):
    tokens = list(np.random.default_rng(0).integers(3, 32000, 150))
    # F32 cache, no flash attention (it rounds Q to F16): only summation order differs
    f32 = {"cache_type_k": "f32", "cache_type_v": "f32", "flash_attn": "off"}
    with dense_model.session(n_ctx=256, n_batch=32, n_ubatch=32, **f32) as small, \
            dense_model.session(n_ctx=256, n_batch=256, n_ubatch=256, **f32) as big:
        small.feed(tokens)
        big.feed(tokens)
        assert small.position == big.position == 150
        np.testing.assert_allclose(small.logits(), big.logits(), atol=1e-3)
        with pytest.raises(pymoe.InvalidArgumentError, match="n_batch"):
            small.feed(tokens[:40], all_logits=True)
        assert small.position == 150


def test_rewind_then_refeed_reproduces_the_logits(session):
    session.feed(PROMPT)
    session.feed(42)
    expected = session.logits().copy()
    session.feed([9, 10, 11])
    session.rewind(4)
    assert session.position == len(PROMPT)
    with pytest.raises(pymoe.InvalidStateError):
        session.logits()
    session.feed(42)
    np.testing.assert_array_equal(session.logits(), expected)
    with pytest.raises(pymoe.InvalidArgumentError):
        session.rewind(session.position + 1)
    with pytest.raises(pymoe.InvalidArgumentError):
        session.rewind(-1)


def test_save_and_load_state(dense_model, session):
    session.feed(PROMPT)
    state = session.save_state()
    session.feed(42)
    expected = session.logits().copy()
    session.feed([5, 6, 7])
    session.load_state(state)
    assert session.position == len(PROMPT)
    session.feed(42)
    np.testing.assert_array_equal(session.logits(), expected)
    # into another session of the same model and size
    with dense_model.session(n_ctx=256, n_batch=64, n_ubatch=64) as other:
        other.load_state(state)
        other.feed(42)
        np.testing.assert_array_equal(other.logits(), expected)
        with pytest.raises(pymoe.InvalidArgumentError):
            other.load_state(b"garbage" * 10)
        with pytest.raises(pymoe.InvalidArgumentError):
            other.load_state(state[:-10])
        with pytest.raises(pymoe.InvalidArgumentError):
            other.load_state(b"")


def test_reset(session):
    session.feed(PROMPT)
    session.reset()
    assert session.position == 0
    with pytest.raises(pymoe.InvalidStateError):
        session.sample()


def test_logits_view_is_read_only_and_goes_stale(session):
    session.feed(PROMPT, all_logits=True)
    view = session.logits()
    rows = session.logits_all()
    np.testing.assert_array_equal(view.copy(), rows[-1].copy())  # the last row, each a copy the views own
    assert not np.shares_memory(np.asarray(view), np.asarray(rows))
    with pytest.raises(ValueError):
        view[0] = 1.0
    kept = view.copy()
    top = int(view.argmax())
    row0 = rows[0]  # a sub-view stays checked
    assert isinstance(row0, pymoe.LogitsView)
    doubled = view * 2  # arithmetic makes a plain, independent array
    assert type(doubled) is np.ndarray
    session.feed(3)
    for use in (lambda: view[0], lambda: view.argmax(), lambda: np.max(view), lambda: view + 1,
                lambda: rows[0], lambda: row0.sum(), lambda: repr(view), lambda: view.tolist()):
        with pytest.raises(pymoe.StaleLogitsError):
            use()
    assert int(kept.argmax()) == top
    np.testing.assert_array_equal(doubled, kept * 2)
    for change in (lambda: session.rewind(1), session.reset, session.close):
        session.feed(3) if not session.closed and session.position < 200 else None
        view = session.logits() if not session.closed else None
        change()
        if view is not None:
            with pytest.raises(pymoe.StaleLogitsError):
                view.max()


def test_tokens_outside_the_vocabulary_change_nothing(session):
    session.feed(PROMPT[:-1])
    session.feed(PROMPT[-1])
    before = session.logits().copy()
    for bad in ([5, 32000], [-1], 32000, np.array([1, 2, 99999]), 2**40, [3, 2**40], np.int64(-7)):
        with pytest.raises(pymoe.TokenOutOfVocabularyError) as err:
            session.feed(bad)
        assert err.value.code == -5
    assert session.position == len(PROMPT)
    np.testing.assert_array_equal(session.logits(), before)  # rejected before anything changed
    session.rewind(1)
    session.feed(PROMPT[-1])
    np.testing.assert_array_equal(session.logits(), before)


def test_feeding_past_the_context(dense_model):
    with dense_model.session(n_ctx=256, n_batch=64, n_ubatch=64) as s:
        n_ctx = s.n_ctx
        s.feed([5] * (n_ctx - 1))
        with pytest.raises(pymoe.ContextFullError):
            s.feed([5, 5])
        assert s.position == n_ctx - 1
        s.feed(5)
        assert s.position == n_ctx
        with pytest.raises(pymoe.ContextFullError):
            s.feed(5)
        out = list(s.generate(None, max_tokens=5, stop_at_eog=False))
        assert out == [] and s.stop_reason == "context_full"


def test_a_context_too_large_to_allocate(dense_model):
    with pytest.raises(pymoe.OutOfMemoryError, match="KV cache"):
        dense_model.session(n_ctx=2**29)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_batch": 16, "n_ubatch": 32}, "n_ubatch"),
    ({"flash_attn": "sometimes"}, "flash_attn"),
    ({"cache_type_k": "q9_9"}, "q9_9"),
    ({"cache_type_k": "q8_0"}, "head sizes"),
    ({"n_ctx": -1}, "n_ctx"),
    ({"n_threads": -2}, "n_threads"),
    ({"n_threads": 10000}, "thread counts must be in \\[0, 512\\]"),
    ({"n_threads_batch": 513}, "thread counts must be in \\[0, 512\\]"),
    ({"cache_type_k": "i32"}, "unknown KV cache type 'i32'"),
])
def test_bad_session_parameters(llama_moe_path, kwargs, match):
    with pymoe.Model(llama_moe_path) as model:  # head size 16
        with pytest.raises(pymoe.InvalidArgumentError, match=match):
            model.session(**kwargs)


@pytest.mark.parametrize("flash_attn, cache_k, cache_v", [
    ("off", None, None), ("on", None, None), ("on", "q8_0", "q8_0"), ("off", "q8_0", None), ("auto", "f32", "f32")])
def test_flash_attention_and_cache_types_can_be_switched(dense_model, flash_attn, cache_k, cache_v):
    with dense_model.session(n_ctx=64) as ref, dense_model.session(
            n_ctx=64, flash_attn=flash_attn, cache_type_k=cache_k, cache_type_v=cache_v) as s:
        ref.feed(PROMPT)
        s.feed(PROMPT)
        # same model, different kernels and cache precision: close, not equal
        np.testing.assert_allclose(s.logits(), ref.logits(), atol=0.5)


def test_greedy_generation_is_deterministic(dense_model):
    runs = []
    for _ in range(2):
        with dense_model.session(n_ctx=128, sampling=pymoe.SamplingParams.greedy()) as s:
            runs.append([t.id for t in s.generate(PROMPT, max_tokens=20, stop_at_eog=False)])
    assert runs[0] == runs[1] and len(runs[0]) == 20


def test_seeds_reproduce_sampling(dense_model):
    # the random model is very peaked (tied embeddings): a high temperature spreads it
    hot = pymoe.SamplingParams(temperature=30.0, top_k=0, top_p=1.0, min_p=0.0)

    def run(seed):
        with dense_model.session(n_ctx=128, sampling=hot, seed=seed) as s:
            return [t.id for t in s.generate(PROMPT, max_tokens=24, stop_at_eog=False)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_generate_yields_tokens_in_the_context(session):
    out = list(session.generate("Once upon a time", max_tokens=8, stop_at_eog=False))
    assert len(out) == 8 and session.stop_reason == "max_tokens"
    assert session.position == len(session.model.tokenize("Once upon a time")) + 8
    assert all(isinstance(t.text, str) for t in out)


def test_the_default_thread_count_is_one_per_physical_core(dense_model):
    """As llama.cpp's tools count them: distinct sets of SMT siblings among the CPUs this process may use."""
    cores = set()
    for cpu in os.sched_getaffinity(0):
        path = f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings"
        cores.add(open(path).read() if os.path.exists(path) else str(cpu))
    with dense_model.session(n_ctx=64) as s:
        assert s.n_threads == len(cores) >= 1
    with dense_model.session(n_ctx=64, n_threads=3) as s:
        assert s.n_threads == 3
