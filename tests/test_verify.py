"""The speculative verifier (C, pure) against NumPy: exact where the answer is
exact, and distributional where it is random.

Distribution checks use N independent rounds and require every frequency to be
within Bernstein's bound of its exact probability: |f - p| <= sqrt(2 p (1 - p) t / N)
+ 2 t / (3 N), which a correct verifier exceeds with probability at most
2 exp(-t) per cell; t = 21 makes that 1.5e-9. (A normal "5 standard errors"
bound is not safe for cells expecting a handful of counts: their Poisson-like
tail is heavier, and with thousands of cells per run it failed about once in
twenty CI runs.) The bound shrinks like 1 / sqrt(N); the seeds are fixed by
hypothesis, so a failure reproduces."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import pymoe
from pymoe import verify
from strategies import conditional_table

N_FIRST = 3000   # rounds per first-token distribution check
N_SEQ = 12000    # rounds per sequence distribution check
MAX_EXAMPLES = settings().max_examples


BERNSTEIN_T = 21.0


def within_bound(freq, prob, n):
    t = BERNSTEIN_T
    return np.all(np.abs(freq - prob) <= np.sqrt(2 * prob * (1 - prob) * t / n) + 2 * t / (3 * n))


def choice(rng, row) -> int:
    w = np.asarray(row, np.float64)
    return int(rng.choice(w.size, p=w / w.sum()))


@st.composite
def distribution(draw, n, kind=None):
    """A probability row over n tokens: peaked, flat, sparse or random."""
    kind = kind or draw(st.sampled_from(["peaked", "flat", "sparse", "random"]))
    w = np.array(draw(st.lists(st.floats(0.01, 1.0), min_size=n, max_size=n)))
    if kind == "peaked":
        w[draw(st.integers(0, n - 1))] += 20.0
    elif kind == "flat":
        w = np.ones(n)
    elif kind == "sparse":
        keep = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        w = w * np.array(keep)
        if w.sum() == 0:
            w[draw(st.integers(0, n - 1))] = 1.0
    return (w / w.sum()).astype(np.float32)


@st.composite
def pair(draw):
    """(p, q) over a small vocabulary, including identical and disjoint pairs."""
    n = draw(st.integers(2, 6))
    relation = draw(st.sampled_from(["independent", "identical", "disjoint"]))
    p = draw(distribution(n))
    if relation == "identical":
        return p, p.copy()
    if relation == "disjoint":
        split = draw(st.integers(1, n - 1))
        p = np.zeros(n, np.float32)
        q = np.zeros(n, np.float32)
        p[:split] = 1.0 / split
        q[split:] = 1.0 / (n - split)
        return p, q
    return p, draw(distribution(n))


@settings(max_examples=max(10, MAX_EXAMPLES // 4))
@given(pair(), st.integers(0, 2**32 - 1))
def test_first_token_follows_the_target_and_acceptance_is_the_overlap(pq, seed):
    p, q = pq
    rng = np.random.default_rng(seed)
    n = p.size
    counts = np.zeros(n)
    accepted = 0
    pq_rows = np.stack([p, p])  # k = 1: p_1 scores the draft token, p_2 the bonus
    for _ in range(N_FIRST):
        d = choice(rng, q)
        n_acc, nxt = verify([d], pq_rows, q[None, :], rng.random(2))
        first = d if n_acc == 1 else nxt
        counts[first] += 1
        accepted += n_acc
    assert within_bound(counts / N_FIRST, p.astype(np.float64), N_FIRST), (counts / N_FIRST, p)
    overlap = float(np.minimum(p, q).sum())
    assert within_bound(np.array([accepted / N_FIRST]), np.array([min(overlap, 1.0)]), N_FIRST)


@settings(max_examples=max(5, MAX_EXAMPLES // 8))
@given(st.integers(3, 5), st.integers(0, 2**32 - 1), st.floats(0.0, 5.0), st.floats(0.0, 5.0))
def test_one_round_with_k2_emits_the_targets_joint_distribution(n, seed, peak_t, peak_q):
    rng = np.random.default_rng(seed)
    target = conditional_table(rng, n, 2, peak_t)
    draft = conditional_table(rng, n, 1, peak_q)
    counts = np.zeros((n, n, n))
    for _ in range(N_SEQ):
        d1 = choice(rng, draft[()])
        d2 = choice(rng, draft[(d1,)])
        p = np.stack([target[()], target[(d1,)], target[(d1, d2)]])
        q = np.stack([draft[()], draft[(d1,)]])
        n_acc, nxt = verify([d1, d2], p, q, rng.random(3))
        seq = [d1, d2][:n_acc] + [nxt]
        assert 0 <= n_acc <= 2
        while len(seq) < 3:  # later rounds would sample the rest from the target
            seq.append(choice(rng, target[tuple(seq)]))
        counts[tuple(seq)] += 1
    joint = np.zeros((n, n, n))
    for a, b, c in np.ndindex(n, n, n):
        joint[a, b, c] = target[()][a] * target[(a,)][b] * target[(a, b)][c]
    assert within_bound(counts / N_SEQ, joint, N_SEQ)


@st.composite
def rows_and_draft(draw, greedy_match=True):
    n = draw(st.integers(1, 12))
    k = draw(st.integers(0, 6))
    logits = np.array(draw(st.lists(st.integers(-3, 3), min_size=(k + 1) * n, max_size=(k + 1) * n)),
                      np.float32).reshape(k + 1, n)  # small integers: ties happen
    draft = []
    for i in range(k):
        if draw(st.booleans()):
            draft.append(int(np.argmax(logits[i])))
        else:
            draft.append(draw(st.integers(0, n - 1)))
    return logits, draft


@given(rows_and_draft())
def test_greedy_accepts_exactly_the_longest_matching_prefix(case):
    logits, draft = case
    n_acc, nxt = verify(draft, logits, greedy=True)
    expected = 0
    while expected < len(draft) and draft[expected] == int(np.argmax(logits[expected])):
        expected += 1
    assert n_acc == expected
    assert nxt == int(np.argmax(logits[expected]))  # ties: lowest id, like numpy


@given(st.integers(1, 10), st.integers(0, 6), st.integers(0, 2**32 - 1))
def test_stochastic_invariants_for_any_draft(n, k, seed):
    rng = np.random.default_rng(seed)
    p = rng.random((k + 1, n)) * (rng.random((k + 1, n)) < 0.6)
    p[np.arange(k + 1), rng.integers(n, size=k + 1)] += 0.1  # every row has some mass
    p = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    q = rng.random((k, n)) * (rng.random((k, n)) < 0.6)
    q = (q / np.maximum(q.sum(axis=1, keepdims=True), 1e-9)).astype(np.float32)
    draft = [int(x) for x in rng.integers(n, size=k)]  # not necessarily from q
    n_acc, nxt = verify(draft, p, q, rng.random(k + 1))
    assert 0 <= n_acc <= k
    assert p[n_acc, nxt] > 0  # the next token is in the target's support at that position
    for i in range(n_acc):
        assert p[i, draft[i]] > 0  # nothing outside the target's support is ever accepted


def test_k0_draws_from_the_target_row_by_its_cumulative_sum():
    p = np.array([[0.2, 0.5, 0.3]], np.float32)
    assert verify([], p, np.zeros((0, 3)), [0.1]) == (0, 0)
    assert verify([], p, np.zeros((0, 3)), [0.5]) == (0, 1)
    assert verify([], p, np.zeros((0, 3)), [0.95]) == (0, 2)
    assert verify([], p, greedy=True) == (0, 1)


def test_a_draft_token_the_draft_gave_zero_probability_is_accepted_when_the_target_allows_it():
    p = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
    q = np.array([[1.0, 0.0, 0.0]], np.float32)
    assert verify([1], p, q, [0.999, 0.5]) == (1, 0)
    assert verify([2], p, q, [0.0, 0.5]) == (0, 1)  # p(d) = 0: rejected even at u = 0


def test_identical_rows_accept_every_drafted_token_and_disjoint_rows_none():
    p = np.array([[0.5, 0.5, 0.0]] * 3, np.float32)
    for u0 in (0.0, 0.5, 0.999):
        assert verify([0, 1], p, p[:2], [u0, u0, 0.3])[0] == 2
    q = np.array([[0.0, 0.0, 1.0]] * 2, np.float32)
    n_acc, nxt = verify([2, 2], p, q, [0.0, 0.0, 0.7])
    assert n_acc == 0 and nxt == 1


def test_residual_is_the_positive_part_of_p_minus_q():
    p = np.array([[0.6, 0.4, 0.0], [1, 0, 0]], np.float32)
    q = np.array([[0.2, 0.8, 0.0]], np.float32)
    # d = 1 is rejected when u * 0.8 >= 0.4; the residual is all on token 0
    assert verify([1], p, q, [0.9, 0.99]) == (0, 0)


def test_bad_input_is_refused_with_a_clear_error():
    p = np.full((2, 3), 1 / 3, np.float32)
    q = np.full((1, 3), 1 / 3, np.float32)
    with pytest.raises(pymoe.TokenOutOfVocabularyError, match="outside the vocabulary"):
        verify([3], p, q, [0.1, 0.1])
    with pytest.raises(pymoe.TokenOutOfVocabularyError):
        verify([-1], p, greedy=True)
    with pytest.raises(pymoe.InvalidArgumentError, match=r"not in \[0, 1\)"):
        verify([0], p, q, [1.0, 0.1])
    with pytest.raises(pymoe.InvalidArgumentError, match="shape"):
        verify([0, 1], p, greedy=True)
    with pytest.raises(pymoe.InvalidArgumentError, match="no probability mass"):
        verify([], np.zeros((1, 3), np.float32), np.zeros((0, 3)), [0.5])


def sparse(row):
    """A dense probability row as (ids, p) of its nonzero tokens."""
    ids = np.flatnonzero(row)
    return ids.astype(np.int32), row[ids]


@given(st.integers(1, 40), st.integers(0, 6), st.integers(0, 2**32 - 1),
       st.sampled_from(["random", "q equals p", "disjoint", "one token"]))
def test_sparse_rows_decide_exactly_as_dense_ones(n, k, seed, relation):
    """The loop carries distributions as their kept tokens; the verifier must
    decide from those exactly what it decides from full rows."""
    rng = np.random.default_rng(seed)
    p = rng.random((k + 1, n)) * (rng.random((k + 1, n)) < 0.5)
    p[np.arange(k + 1), rng.integers(n, size=k + 1)] += 0.1  # every target row has some mass
    p = (p / p.sum(axis=1, keepdims=True)).astype(np.float32)
    q = rng.random((k, n)) * (rng.random((k, n)) < 0.5)
    q[np.arange(k), rng.integers(n, size=k)] += 0.1
    q = (q / q.sum(axis=1, keepdims=True)).astype(np.float32)
    if relation == "q equals p":
        q = p[:k].copy()
    elif relation == "disjoint" and n > 1:
        q = np.where(p[:k] > 0, 0, 1).astype(np.float32)
        q[q.sum(axis=1) == 0, 0] = 1.0  # a q row needs a token (p may cover everything)
        q = q / q.sum(axis=1, keepdims=True)
    elif relation == "one token":
        p = np.eye(n, dtype=np.float32)[rng.integers(n, size=k + 1)]
    draft = [int(x) for x in rng.integers(n, size=k)]
    for u in (rng.random(k + 1), np.zeros(k + 1), np.full(k + 1, np.nextafter(1.0, 0.0))):
        want = verify(draft, p, q, u)
        got = pymoe.verify_sparse(draft, [sparse(r) for r in p], [sparse(r) for r in q], u, n)
        assert got == want, (relation, u)
        # the loop leaves the target rows after the first rejected draft empty (it never works them out)
        rejected = next((i for i in range(k) if not u[i] * q[i, draft[i]] < p[i, draft[i]]), k)
        empty = (np.array([], np.int32), np.array([], np.float32))
        lazy = [sparse(r) if i <= rejected else empty for i, r in enumerate(p)]
        assert pymoe.verify_sparse(draft, lazy, [sparse(r) for r in q], u, n) == want, (relation, u)


def test_sparse_rows_must_be_ascending_ids_inside_the_vocabulary():
    p = [(np.array([1, 0], np.int32), np.array([0.5, 0.5], np.float32))]
    with pytest.raises(pymoe.InvalidArgumentError, match="ascending"):
        pymoe.verify_sparse([], p, [], [0.5], 3)
    p = [(np.array([0, 3], np.int32), np.array([0.5, 0.5], np.float32))]
    with pytest.raises(pymoe.InvalidArgumentError, match="ascending"):
        pymoe.verify_sparse([], p, [], [0.5], 3)
    with pytest.raises(pymoe.InvalidArgumentError, match="no probability mass"):
        pymoe.verify_sparse([], [(np.array([], np.int32), np.array([], np.float32))], [], [0.5], 3)
