"""logit_bias and the repetition, presence and frequency penalties
(csrc/penalties.c): a row's change is llama.cpp's formula over the window,
plain decoding applies it over the session's tokens and leaves its row as it
was, and the speculative loop applies it to each verify row over the sequence
and the drafts before that row: greedy output equals plain decoding's for
every draft source (with a constraint too), sampled output draws its first two
tokens from the penalized joint; the commands and serve take them."""
import subprocess
import sys

import numpy as np
import pytest

import pymoe
from pymoe import errors
from test_constrained import EXACT, within_bound

A, B, C = 263, 289, 274  # tokens a large bias makes the likeliest: the penalties then choose among them
BIASED = dict(logit_bias={A: 60.0, B: 59.5, C: 59.0}, repeat_penalty=1.1, repeat_last_n=8, presence_penalty=0.3,
              frequency_penalty=0.5)
PROMPT = "a b c d e a b c d e"


def reference(row, history, repeat_penalty=1.0, repeat_last_n=64, presence_penalty=0.0, frequency_penalty=0.0,
              logit_bias=None):
    """llama.cpp's order and formulas, in float64."""
    row = np.array(row, np.float64)
    for token, bias in (logit_bias or {}).items():
        row[token] += bias
    window = [] if repeat_last_n == 0 else list(history) if repeat_last_n < 0 else list(history)[-repeat_last_n:]
    for token in set(window):
        row[token] = row[token] * repeat_penalty if row[token] <= 0 else row[token] / repeat_penalty
        row[token] -= window.count(token) * frequency_penalty + presence_penalty
    return row


def test_a_rows_change_is_the_bias_then_the_penalties_over_the_window():
    rng = np.random.default_rng(7)
    row = (rng.standard_normal(1000) * 3).astype(np.float32)
    history = list(rng.integers(0, 40, 200)) + [5, 5, 5, 6]
    for fields in (dict(repeat_penalty=1.3), dict(repeat_penalty=0.7, repeat_last_n=-1),
                   dict(presence_penalty=1.5, frequency_penalty=-0.25, repeat_last_n=3),
                   dict(repeat_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.5, repeat_last_n=0),
                   dict(logit_bias={5: 2.0, 999: -np.inf, 0: -3.5}, repeat_penalty=1.5, frequency_penalty=1.0),
                   dict(repeat_penalty=1.1, repeat_last_n=100000)):
        sampling = pymoe.SamplingParams(**fields)
        got = sampling.penalize(row, history)
        np.testing.assert_allclose(got, reference(row, history, **fields), rtol=1e-6, err_msg=str(fields))
    assert np.array_equal(pymoe.SamplingParams().penalize(row, history), row)  # the defaults change nothing
    with pytest.raises(errors.TokenOutOfVocabularyError, match="1000"):
        pymoe.SamplingParams(logit_bias={1000: 1.0}).penalize(row, [])
    for bad in (dict(repeat_penalty=0.0), dict(repeat_penalty=float("inf")), dict(repeat_last_n=-2),
                dict(presence_penalty=float("nan")), dict(frequency_penalty=float("-inf")),
                dict(logit_bias={1: float("inf")}), dict(logit_bias={-1: 1.0}), dict(logit_bias=[(1, 1.0)])):
        with pytest.raises(errors.InvalidArgumentError):
            pymoe.SamplingParams(**bad)


def plain(model, sampling, n=60, prompt=PROMPT):
    with model.session(sampling=sampling, **EXACT) as s:
        return list(s.generate_tokens(prompt, max_tokens=n))


def test_plain_decoding_picks_the_penalized_argmax_and_leaves_its_row_as_it_was(pair_target):
    sampling = pymoe.SamplingParams(temperature=0, **BIASED)
    got = plain(pair_target, sampling)
    assert set(got) == {A, B, C}  # the bias chose the tokens, the penalties their order
    assert len(set(tuple(got[i:i + 3]) for i in range(len(got) - 2))) > 3
    prompt = pair_target.tokenize(PROMPT)
    with pair_target.session(**EXACT) as s:
        s.feed(prompt + got[:-1], all_logits=True)
        rows = np.array(s.logits_all())[len(prompt) - 1:]
    for i, row in enumerate(rows):
        assert got[i] == int(np.argmax(reference(row, prompt + got[:i], **BIASED)))
    with pair_target.session(sampling=sampling, **EXACT) as s:
        s.feed(prompt)
        before = np.array(s.logits())
        s.sample()
        assert np.array_equal(np.array(s.logits()), before)  # the row was changed for the draw only
        scored = next(s.generate(None, max_tokens=1, logprobs=1))
        raw = before.astype(np.float64) - np.log(np.exp(before - before.max()).sum()) - before.max()
        assert scored.logprob == pytest.approx(raw[scored.id], abs=1e-4)  # logprobs: the model's own row


@pytest.mark.parametrize("constraint", [{}, {"grammar": 'root ::= (" a" | " b" | " c" | "a" | "b" | "c")+'}])
def test_greedy_speculation_with_penalties_is_plain_decoding_for_every_draft_source(pair_target, pair_draft, pair_mtp,
                                                                                    constraint):
    sampling = pymoe.SamplingParams(temperature=0, **BIASED, **constraint)
    want = plain(pair_target, sampling)
    accepted = 0
    for source, kw in ((pair_draft, dict(draft_max=3)), (pair_draft, dict(draft_max="auto")), ("ngram", {}),
                       (pair_draft, dict(ngram=True))):
        with pymoe.Speculative(pair_target, source, sampling=sampling, **kw, **EXACT) as spec:
            assert list(spec.generate_tokens(PROMPT, max_tokens=60)) == want, (source, kw)
            accepted += spec.stats.accepted
    assert accepted > 0
    want = plain(pair_mtp, sampling, 30)
    with pymoe.Speculative(pair_mtp, "mtp", sampling=sampling, draft_max=2, **EXACT) as spec:
        assert list(spec.generate_tokens(PROMPT, max_tokens=30)) == want


@pytest.mark.parametrize("source", ["model", "ngram"])
def test_sampled_speculation_with_penalties_draws_the_first_two_tokens_from_the_penalized_joint(pair_target, pair_draft,
                                                                                               source):
    prompt = "a b c a b c a b c"
    ids = pair_target.tokenize(prompt)
    joint = {}
    with pair_target.session(**EXACT) as s:
        s.feed(ids)
        row = np.array(s.logits())
        # biases that bring A, B and C level; the penalties, on the last token only, then rule out a repeat
        fields = dict(logit_bias={t: 60.0 - float(row[t]) for t in (A, B, C)}, frequency_penalty=0.4,
                      presence_penalty=0.3, repeat_penalty=1.5, repeat_last_n=1)
        sampling = pymoe.SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, **fields)
        first = sampling.probs(sampling.penalize(s.logits(), ids))
        for t1 in np.flatnonzero(first > 1e-9):
            s.feed(int(t1))
            second = sampling.probs(sampling.penalize(s.logits(), ids + [int(t1)]))
            s.rewind(1)
            for t2 in np.flatnonzero(second > 1e-9):
                joint[(int(t1), int(t2))] = float(first[t1]) * float(second[t2])
    assert len(joint) >= 3 and max(joint.values()) < 0.6  # several likely pairs
    assert all(t1 != t2 for t1, t2 in joint)  # a verify row whose history missed the draft before it would repeat
    n = 400
    counts = {}
    with pymoe.Speculative(pair_target, pair_draft if source == "model" else "ngram", sampling=sampling, draft_max=3,
                           **EXACT) as spec:
        for seed in range(n):
            spec.reset()
            spec.set_sampling(sampling, seed=seed)
            out = list(spec.generate_tokens(prompt, max_tokens=3))
            counts[tuple(out[:2])] = counts.get(tuple(out[:2]), 0) + 1
        assert spec.stats.drafted > 0 and spec.stats.accepted > 0
    assert set(counts) <= set(joint)
    keys = sorted(joint)
    freq = np.array([counts.get(k, 0) / n for k in keys])
    assert within_bound(freq, np.array([joint[k] for k in keys]), n)


def generate(*args):
    return subprocess.run([sys.executable, "-P", "-m", "pymoe", "generate", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def test_the_commands_take_llama_cpps_flags(pair_target, pair_draft):
    flags = ["--temp", "0", "--ctx", "256", "-t", "2", "-n", "24", "-p", PROMPT, "-l", f"{A}+60", "-l", f"{B}+59.5",
             "--logit-bias", f"{C}+59", "--repeat-penalty", "1.1", "--repeat-last-n", "8", "--presence-penalty", "0.3",
             "--frequency-penalty", "0.5", "--flash-attn", "off", "--cache-type-k", "f32", "--cache-type-v", "f32"]
    want = pair_target.detokenize(plain(pair_target, pymoe.SamplingParams(temperature=0, **BIASED), 24))
    for extra in ([], ["-md", pair_draft.path, "--draft-max", "3"], ["-md", "ngram"]):
        r = generate("-m", pair_target.path, *flags, *extra)
        assert r.returncode == 0, r.stderr
        assert r.stdout.rstrip("\n").endswith(want), (extra, r.stdout)
    banned = generate("-m", pair_target.path, *flags, "-l", f"{A}-inf", "-l", f"{B}-inf", "-l", f"{C}-inf")
    assert banned.returncode == 0 and not {" a", " b", " c"} & set(banned.stdout.split(PROMPT)[-1].split())
    for bad in ("5x", "5+nan", "5", "+1"):
        r = generate("-m", pair_target.path, "-p", "x", "-n", "2", "-l", bad)
        assert r.returncode == 2 and "logit-bias" in r.stderr
    r = generate("-m", pair_target.path, "-p", "x", "-n", "2", "-l", "40000+1")
    assert r.returncode == 2 and "outside the vocabulary" in r.stderr and r.stdout.strip() in ("", "x")


def test_a_loop_refuses_a_bias_outside_the_vocabulary_before_any_round(pair_target, pair_draft):
    outside = pymoe.SamplingParams(temperature=0, logit_bias={pair_target.info.n_vocab: 1.0})
    with pytest.raises(errors.TokenOutOfVocabularyError, match="logit_bias"):
        pymoe.Speculative(pair_target, pair_draft, sampling=outside, **EXACT)
    with pymoe.Speculative(pair_target, pair_draft, temperature=0, draft_max=3, **EXACT) as spec:
        spec.feed(PROMPT)
        with pytest.raises(errors.TokenOutOfVocabularyError, match="logit_bias"):
            spec.set_sampling(outside)
        assert len(spec.step()) >= 1  # the loop goes on
