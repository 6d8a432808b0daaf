"""Log probabilities (csrc/logprobs.c, Session and Speculative generate(...,
logprobs=n)): a row's numbers are its log softmax and its most likely tokens;
a session reports them from the row each token was drawn from; the
speculative loop reports, from its verify rows, what plain decoding reports
(greedy, every draft source, under a constraint), and when sampling, the
target's row at each emitted token's position (accepted drafts and the token
drawn after a rejection alike)."""
import numpy as np
import pytest

import pymoe
from pymoe import errors
from pymoe._native import ffi, lib

EXACT = dict(n_ctx=512, flash_attn="off", cache_type_k="f32", cache_type_v="f32", n_threads=2)
BATCHED = 2e-3  # F32 logits of a batch and of one token differ by up to ~0.007 on a row; log softmax by less
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "n": {"type": "integer"}}, "required": ["name", "n"],
          "additionalProperties": False}


def reference(row: np.ndarray, token: int, n_top: int):
    """(logprob, [(id, logprob)]) in float64: the largest first, equal logits by lower id."""
    row = row.astype(np.float64)
    top = row.max()
    lse = top + np.log(np.exp(row - top).sum())
    order = sorted(range(row.size), key=lambda i: (-row[i], i))[:n_top]
    return row[token] - lse, [(i, row[i] - lse) for i in order]


def c_logprob(row: np.ndarray, token: int, n_top: int):
    out = ffi.new("struct pymoe_logprob *")
    row = np.ascontiguousarray(row, np.float32)
    rc = lib.pymoe_logprob(ffi.from_buffer("float[]", row), row.size, token, n_top, out)
    if rc:
        return rc
    return out.logprob, [(out.top_ids[i], out.top_logprobs[i]) for i in range(out.n_top)]


def test_a_rows_logprob_is_its_log_softmax_and_its_top_tokens_the_most_likely():
    rng = np.random.default_rng(3)
    for n_vocab in (1, 5, 20, 1000, 50000, 151936):
        for n_top in (0, 1, 5, 20):
            row = (rng.standard_normal(n_vocab) * 4).astype(np.float32)
            if n_vocab >= 20:
                row[rng.integers(0, n_vocab, 6)] = row.max()  # ties at the top: lower id first
                row[rng.integers(0, n_vocab, 3)] = -np.inf   # tokens the model rules out
            token = int(rng.integers(0, n_vocab))
            got, want = c_logprob(row, token, n_top), reference(row, token, n_top)
            assert got[0] == pytest.approx(want[0], abs=1e-5) or got[0] == want[0] == -np.inf
            assert [i for i, _ in got[1]] == [i for i, _ in want[1]][:n_vocab], (n_vocab, n_top)
            assert np.allclose([v for _, v in got[1]], [v for _, v in want[1]], atol=1e-5)
    assert c_logprob(np.array([0.0, -np.inf], np.float32), 1, 2)[0] == -np.inf


def test_a_row_that_cannot_be_scored_and_bad_requests_are_errors():
    row = np.zeros(10, np.float32)
    assert c_logprob(row, 10, 1) == lib.PYMOE_ETOKEN
    assert c_logprob(row, -1, 1) == lib.PYMOE_ETOKEN
    assert c_logprob(row, 0, 21) == lib.PYMOE_EINVAL
    assert c_logprob(row, 0, -1) == lib.PYMOE_EINVAL
    for bad in (np.nan, np.inf):
        broken = row.copy()
        broken[7] = bad
        assert c_logprob(broken, 0, 3) == lib.PYMOE_ENUMERIC
    assert c_logprob(np.full(10, -np.inf, np.float32), 0, 3) == lib.PYMOE_EINVAL


def rows_of(model, prompt, tokens):
    """The plain session's logits row before each of tokens, as one batch of the whole sequence."""
    ids = model.tokenize(prompt)
    with model.session(**EXACT) as s:
        s.feed(ids + tokens[:-1], all_logits=True)
        return np.array(s.logits_all())[len(ids) - 1:]


def assert_scores_match(got, want_logprob, want_top, tol):
    assert got.logprob == pytest.approx(want_logprob, abs=tol)
    assert len(got.top_logprobs) == len(want_top)
    for (gi, gv), (wi, wv) in zip(got.top_logprobs, want_top):
        assert gv == pytest.approx(wv, abs=tol)
        # ids agree unless two tokens are within the batched-vs-one-token difference of each other
        assert gi == wi or abs(dict(want_top).get(gi, -np.inf) - wv) <= 2 * tol


def test_a_session_reports_the_row_each_token_was_drawn_from(pair_target):
    with pair_target.session(sampling=pymoe.SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0), seed=5,
                        **EXACT) as s:
        got = list(s.generate("Once upon", max_tokens=30, logprobs=4, stop=["zzzz"]))
    assert len(got) == 30 and all(t.logprob is not None for t in got)  # held-back tokens carry theirs too
    rows = rows_of(pair_target, "Once upon", [t.id for t in got])
    for t, row in zip(got, rows):
        assert_scores_match(t, *reference(row, t.id, 4), BATCHED)
    assert any(t.id != t.top_logprobs[0][0] for t in got)  # sampled: tokens that are not the most likely too


def plain_scored(model, prompt, n, **sampling):
    with model.session(sampling=pymoe.SamplingParams(temperature=0, **sampling), **EXACT) as s:
        return list(s.generate(prompt, max_tokens=n, logprobs=5))


def test_greedy_speculation_reports_what_plain_decoding_does_for_every_draft_source(pair_target, pair_draft, pair_mtp):
    prompt = "a b c d e a b c d e a b"  # lookup finds matches
    for constraint in ({}, {"json_schema": SCHEMA}):
        want = plain_scored(pair_target, prompt, 40, **constraint)
        for source, kw in ((pair_draft, dict(draft_max=3)), (pair_draft, dict(draft_max="auto")), ("ngram", {}),
                           (pair_draft, dict(ngram=True))):
            with pymoe.Speculative(pair_target, source, temperature=0, **constraint, **kw, **EXACT) as spec:
                got = list(spec.generate(prompt, max_tokens=40, logprobs=5))
                assert spec.stats.accepted > 0 or source == "ngram", kw  # this model's text seldom repeats
            assert [t.id for t in got] == [t.id for t in want]
            for g, w in zip(got, want):
                assert_scores_match(g, w.logprob, w.top_logprobs, BATCHED)
    want = plain_scored(pair_mtp, "Answer:", 30)
    with pymoe.Speculative(pair_mtp, "mtp", temperature=0, draft_max=2, **EXACT) as spec:
        got = list(spec.generate("Answer:", max_tokens=30, logprobs=5))
    assert [t.id for t in got] == [t.id for t in want]
    for g, w in zip(got, want):
        assert_scores_match(g, w.logprob, w.top_logprobs, BATCHED)


def test_sampled_speculation_reports_the_targets_row_at_every_emitted_token(pair_target, pair_draft):
    for source in (pair_draft, "ngram"):
        with pymoe.Speculative(pair_target, source, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, draft_max=4,
                               seed=11, **EXACT) as spec:
            got = list(spec.generate("a b c d e a b c d e", max_tokens=60, logprobs=3))
            stats = spec.stats
        if source is pair_draft:  # accepted drafts and tokens redrawn after a rejection both
            assert 0 < stats.accepted < stats.drafted
        rows = rows_of(pair_target, "a b c d e a b c d e", [t.id for t in got])
        for t, row in zip(got, rows):
            assert_scores_match(t, *reference(row, t.id, 3), BATCHED)


def test_step_and_round_scores_and_bad_requests(pair_target, pair_draft):
    with pymoe.Speculative(pair_target, pair_draft, temperature=0, draft_max=3, **EXACT) as spec:
        spec.feed("Once upon")
        spec.set_logprobs(0)
        tokens = spec.step()
        assert len(spec.round_scores) == len(tokens) and all(s.top == () for s in spec.round_scores)
        spec.set_logprobs(None)
        spec.step()
        assert spec.round_scores == []
        for bad in (21, -1, True, "2", 2.0):
            with pytest.raises(errors.InvalidArgumentError, match="logprobs"):
                spec.set_logprobs(bad)
            with pytest.raises(errors.InvalidArgumentError, match="logprobs"):
                list(spec.generate(None, max_tokens=2, logprobs=bad))
    with pair_target.session(**EXACT) as s:
        with pytest.raises(errors.InvalidArgumentError, match="logprobs"):
            list(s.generate_tokens("x", max_tokens=2, logprobs=99))
        assert all(t.logprob is None for t in s.generate("x", max_tokens=3))


def test_a_loop_takes_its_sampling_as_sampling_params_too(pair_target, pair_draft):
    greedy = pymoe.SamplingParams.greedy()
    want = plain_scored(pair_target, "Once upon", 12)
    with pymoe.Speculative(pair_target, pair_draft, sampling=greedy, draft_max=3, **EXACT) as spec:
        assert [t.id for t in spec.generate("Once upon", max_tokens=12)] == [t.id for t in want]
    with pytest.raises(errors.InvalidArgumentError, match="not both"):
        pymoe.Speculative(pair_target, pair_draft, sampling=greedy, temperature=0.5, **EXACT)
    with pytest.raises(errors.InvalidArgumentError, match="SamplingParams"):
        pymoe.Speculative(pair_target, pair_draft, sampling={"temperature": 0}, **EXACT)


def test_a_token_is_still_a_pair_and_its_scores_survive_a_held_back_text(pair_target, pair_draft):
    with pair_target.session(sampling=pymoe.SamplingParams.greedy(), **EXACT) as s:
        for token_id, text in s.generate("Once upon", max_tokens=3):  # unpacks as (id, text), scored or not
            assert isinstance(token_id, int) and isinstance(text, str)
        got = list(s.generate("Once upon", max_tokens=8, logprobs=2, stop=["\x00never"]))
        assert all(len(t) == 2 and t.logprob is not None and len(t.top_logprobs) == 2 for t in got)
        assert "logprob=" in repr(got[-1])
    with pymoe.Speculative(pair_target, pair_draft, temperature=0, draft_max=3, **EXACT) as spec:
        list(spec.generate("Once upon", max_tokens=6, logprobs=1))
        spec.step()
        assert spec.round_scores == []  # the generation's scoring ended with it
