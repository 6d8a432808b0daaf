"""Sampling in C, checked against a NumPy oracle of the same transform."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import pymoe
from strategies import logits_rows, sampling_params


def oracle_probs(logits, p: pymoe.SamplingParams, slack: float = 0.0):
    """top-k, then top-p, then min-p on softmax(logits), then temperature, in
    float64. slack > 0 loosens top-p and min-p by that much (keeps more),
    slack < 0 tightens them: the C result, in float32, must lie in between."""
    logits = logits.astype(np.float64)
    n = logits.size
    if p.temperature == 0:
        out = np.zeros(n)
        out[int(np.argmax(logits))] = 1.0  # ties: lowest id
        return out
    order = sorted(range(n), key=lambda i: (-logits[i], i))
    if 0 < p.top_k < n:
        order = order[:p.top_k]
    z = np.exp(logits[order] - logits[order[0]])
    top_p = float(np.float32(p.top_p)) + slack
    if p.top_p < 1.0 and top_p < 1.0:
        cum = np.cumsum(z / z.sum())
        cut = int(np.argmax(cum >= top_p)) + 1 if cum[-1] >= top_p else len(order)
        order, z = order[:cut], z[:cut]
    if p.min_p > 0:
        keep = max(1, int(np.sum(z >= float(np.float32(p.min_p)) - slack)))
        order, z = order[:keep], z[:keep]
    t = np.exp((logits[order] - logits[order[0]]) / np.float32(p.temperature))
    out = np.zeros(n)
    out[order] = t / t.sum()
    return out


@given(logits_rows(), sampling_params)
def test_probs_match_the_numpy_oracle(logits, params):
    got = params.probs(logits)
    assert got.sum() == pytest.approx(1.0, abs=1e-5)
    assert (got >= 0).all()
    kept = got > 0
    # below 1e-30 a kept token's float32 probability may underflow to 0
    strict, loose = oracle_probs(logits, params, -1e-5) > 1e-30, oracle_probs(logits, params, 1e-5) > 0
    assert (kept >= strict).all() and (kept <= loose).all()  # only boundary ties may go either way
    want = oracle_probs(logits, params)
    if ((want > 1e-30) == kept).all():
        np.testing.assert_allclose(got, want, atol=1e-5)


@given(logits_rows(), sampling_params)
def test_the_kept_set_respects_every_filter(logits, params):
    probs = params.probs(logits)
    kept = np.flatnonzero(probs)
    assert kept.size >= 1
    if params.temperature == 0:
        assert kept.tolist() == [int(np.argmax(logits))]
        return
    if params.top_k:
        assert kept.size <= params.top_k
    # every kept token is at least as likely as every dropped one
    if kept.size < logits.size:
        dropped = np.setdiff1d(np.arange(logits.size), kept)
        assert logits[kept].min() >= logits[dropped].max()
    base = np.exp(logits.astype(np.float64) - logits.max())
    if params.min_p > 0:
        assert base[kept].min() >= params.min_p * base.max() * (1 - 1e-5)


@given(logits_rows(min_vocab=2, max_vocab=8), st.integers(0, 2**64 - 1))
def test_greedy_is_argmax_and_ignores_the_random_state(logits, seed):
    greedy = pymoe.SamplingParams.greedy()
    assert greedy.sample(logits, pymoe.Rng(seed)) == int(np.argmax(logits))


@given(st.integers(0, 2**64 - 1))
def test_same_seed_same_numbers(seed):
    a, b = pymoe.Rng(seed), pymoe.Rng(seed)
    xs = [a.uniform() for _ in range(20)]
    assert xs == [b.uniform() for _ in range(20)]
    assert all(0.0 <= x < 1.0 for x in xs)


def test_samples_follow_the_distribution():
    """Empirical frequencies converge to probs: with N draws each frequency is
    within 5 standard errors (sqrt(p(1-p)/N)) of its probability."""
    rng = np.random.default_rng(3)
    params = pymoe.SamplingParams(temperature=0.9, top_k=6, top_p=0.97, min_p=0.01)
    state = pymoe.Rng(11)
    for _ in range(5):
        logits = rng.normal(0, 2, 12).astype(np.float32)
        probs = params.probs(logits).astype(np.float64)
        n = 20000
        counts = np.bincount([params.sample(logits, state) for _ in range(n)], minlength=12)
        bound = 5 * np.sqrt(probs * (1 - probs) / n) + 1e-12
        assert (np.abs(counts / n - probs) <= bound).all()
        assert (counts[probs == 0] == 0).all()


def test_sessions_sample_like_the_pure_function(dense_model):
    params = pymoe.SamplingParams(temperature=25.0, top_k=0, top_p=0.9, min_p=0.0)
    with dense_model.session(n_ctx=64, seed=5) as s:
        s.feed([1, 2, 3, 4])
        logits = s.logits().copy()
        state = pymoe.Rng(5)
        for _ in range(20):
            assert s.sample(params) == params.sample(logits, state)


@pytest.mark.parametrize("kwargs", [
    {"temperature": -1.0}, {"temperature": float("inf")}, {"temperature": float("nan")},
    {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}, {"min_p": -0.1}, {"min_p": 2.0}])
def test_invalid_sampling_parameters(kwargs):
    with pytest.raises(pymoe.InvalidArgumentError, match=next(iter(kwargs))):  # at construction, naming the field
        pymoe.SamplingParams(**kwargs)


@pytest.mark.parametrize("top_p, min_p", [(0.95, 0.0), (0.95, 0.05), (1.0, 0.05), (0.5, 0.0), (1.0, 0.0)])
def test_no_top_k_at_a_qwen_sized_vocabulary_matches_the_oracle(top_p, min_p):
    """Without top-k the vocabulary is no longer sorted whole: the kept set and
    its probabilities must still be the sorted transform's."""
    logits = (np.random.default_rng(7).standard_normal(151936) * 3).astype(np.float32)
    params = pymoe.SamplingParams(temperature=0.7, top_k=0, top_p=top_p, min_p=min_p)
    got = params.probs(logits)
    want = oracle_probs(logits, params)
    assert ((got > 0) == (want > 0)).all() and (got > 0).sum() > 1
    np.testing.assert_allclose(got, want, atol=1e-6)


def peaked_rows():
    """Rows of a qwen-sized vocabulary as a model gives them: a few likely tokens over a long unlikely tail.
    The top-p cut can lie in the first band of logits collected (within 2^-10 of the most likely token), in
    a later band (a tail of 3,000 tokens between 2^-11 and 2^-19 that holds a quarter of the mass), or in a
    band too wide to sort (the flat row, left to the weight keys)."""
    rng = np.random.default_rng(3)
    n = 151936
    peaked = (rng.standard_normal(n) * 8).astype(np.float32)
    tail = np.full(n, -60.0, np.float32)
    tail[:5] = [0.0, -0.5, -1.0, -2.0, -3.0]
    tail[1000:4000] = rng.uniform(-13.0, -8.0, 3000).astype(np.float32)
    flat = (rng.standard_normal(n) * 0.5).astype(np.float32)
    return {"peaked": peaked, "tail": tail, "flat": flat}


@pytest.mark.parametrize("top_p, min_p", [(0.95, 0.0), (0.99, 0.0), (0.95, 0.05), (0.5, 0.0), (1.0, 1e-4)])
@pytest.mark.parametrize("name", list(peaked_rows()))
def test_no_top_k_on_a_peaked_row_matches_the_oracle(name, top_p, min_p):
    logits = peaked_rows()[name]
    params = pymoe.SamplingParams(temperature=0.7, top_k=0, top_p=top_p, min_p=min_p)
    got, want = params.probs(logits), oracle_probs(logits, params)
    assert ((got > 0) == (want > 1e-30)).all()
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_top_p_next_to_one_counts_weights_a_float_sum_would_drop():
    """Thirty-one tokens 2^-25 below the most likely, all in one vector lane: summed in float lanes beside the
    most likely token's weight of 1 they vanish, and top-p 0.99999994 would keep that token alone."""
    logits = np.full(256, -np.inf, np.float32)
    logits[0] = 0.0
    logits[8::8] = -17.3287
    params = pymoe.SamplingParams(temperature=1.0, top_k=0, top_p=float(np.float32(0.99999994)), min_p=0.0)
    got, want = params.probs(logits), oracle_probs(logits, params)
    assert np.count_nonzero(got) == np.count_nonzero(want) == 30


def test_the_tail_row_cuts_in_a_later_band():
    """The row above is what its name says: at top-p 0.99 the cut takes hundreds of tail tokens."""
    logits = peaked_rows()["tail"]
    kept = np.count_nonzero(pymoe.SamplingParams(temperature=0.7, top_k=0, top_p=0.99, min_p=0.0).probs(logits))
    assert 100 < kept < 3000


def wide_rows():
    """Rows wide enough for the blocked top-k and argmax: Gaussian, integer
    logits (ties everywhere, the boundary among them), and rows with masked
    (-inf) stretches and the maximum at either end."""
    rng = np.random.default_rng(11)
    gaussian = (rng.standard_normal(151936) * 3).astype(np.float32)
    ties = rng.integers(-20, 4, 40000).astype(np.float32)
    masked = (rng.standard_normal(30000) * 2).astype(np.float32)
    masked[:20000] = -np.inf
    last = masked.copy()
    last[-1] = 50.0
    first = ties.copy()
    first[0] = 50.0
    return {"gaussian": gaussian, "ties": ties, "masked": masked, "max last": last, "max first": first}


@pytest.mark.parametrize("top_k", [1, 40, 300])
@pytest.mark.parametrize("name", list(wide_rows()))
def test_top_k_of_a_wide_row_matches_the_oracle(name, top_k):
    """Wide rows take the blocked top-k (block maxima, then only the blocks
    that reach the k-th largest of them): the same tokens as sorting the row."""
    logits = wide_rows()[name]
    params = pymoe.SamplingParams(temperature=0.8, top_k=top_k, top_p=1.0, min_p=0.0)
    got, want = params.probs(logits), oracle_probs(logits, params)
    assert ((got > 0) == (want > 1e-30)).all()
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("name", list(wide_rows()))
def test_argmax_of_a_wide_row_is_the_first_maximum(name):
    logits = wide_rows()[name]
    assert pymoe.SamplingParams.greedy().sample(logits, pymoe.Rng(0)) == int(np.argmax(logits))


def split_rows():
    """Rows of a qwen-sized vocabulary, which is read on several threads (a share of the blocks each): ties
    everywhere, and the maximum twice, in the first and the last share and at the row's two ends."""
    n = 151936
    ties = np.random.default_rng(5).integers(-20, 4, n).astype(np.float32)
    twice = np.zeros(n, np.float32)
    twice[[n // 4 - 1, n - 3]] = 9.0
    ends = np.full(n, -1.0, np.float32)
    ends[[0, n - 1]] = 2.0
    return {"ties": ties, "max twice": twice, "max at both ends": ends}


@pytest.mark.parametrize("name", list(split_rows()))
def test_a_row_read_on_several_threads_gives_the_serial_answer(name):
    logits = split_rows()[name]
    assert pymoe.SamplingParams.greedy().sample(logits, pymoe.Rng(0)) == int(np.argmax(logits))
    params = pymoe.SamplingParams(temperature=0.8, top_k=40, top_p=1.0, min_p=0.0)
    got, want = params.probs(logits), oracle_probs(logits, params)
    assert ((got > 0) == (want > 1e-30)).all()
    np.testing.assert_allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("at", [0, 151936 // 4 + 7, 151936 // 2 + 7, 151935, *range(4096, 4096 + 32)])
def test_a_nan_in_any_threads_share_of_a_row_is_found(at):
    """At the row's ends, in each thread's share, and in each lane of each accumulator of one round."""
    logits = np.zeros(151936, np.float32)
    logits[at] = np.nan
    for params in (pymoe.SamplingParams.greedy(), pymoe.SamplingParams(top_k=40)):
        with pytest.raises(pymoe.errors.NonFiniteLogitsError, match="not all numbers"):
            params.sample(logits, pymoe.Rng(0))


def test_a_forked_child_samples_a_wide_row():
    """The parent's wide rows ran on an OpenMP pool that a forked child does not have (GNU libgomp waits for
    it for ever): the child reads its rows on one thread."""
    import os
    import select
    logits = split_rows()["ties"]
    greedy = pymoe.SamplingParams.greedy()
    want = greedy.sample(logits, pymoe.Rng(0))
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its answer through the pipe, and out without Python's clean-up
        try:
            os.write(write, str(greedy.sample(logits, pymoe.Rng(0))).encode())
        finally:
            os._exit(0)
    os.close(write)
    ready, _, _ = select.select([read], [], [], 30)
    if not ready:
        os.kill(pid, 9)
    os.waitpid(pid, 0)
    answer = os.read(read, 64) if ready else b""
    os.close(read)
    assert ready, "the forked child did not answer within 30 s"
    assert int(answer) == want
