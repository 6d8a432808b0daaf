"""The speculative loop end to end on tiny F32 models: greedy speculative output
is token-identical to greedy plain decoding, every emitted token is what the
verifier must emit from its own verify batch, and misuse gets clear errors."""
import numpy as np
import pytest

import pymoe
import tiny_models
from pymoe.upcycle import upcycle

EXACT = dict(n_ctx=512, flash_attn="off", cache_type_k="f32", cache_type_v="f32", n_threads=2)
PROMPTS = ["Once upon a time", "The quick brown fox", "1 2 3 4"]


@pytest.fixture(scope="session")
def target_path(dense_path, model_dir):
    # noise 1.0: the draft (the dense model) agrees with the target often, not always
    return upcycle(dense_path, model_dir / "upcycled.gguf", n_experts=4, n_experts_used=2, noise=1.0,
                   expert_type="f32", seed=3)


@pytest.fixture(scope="session")
def target(target_path):
    with pymoe.Model(target_path) as model:
        yield model


def plain_greedy(model, prompt, n):
    with model.session(sampling=pymoe.SamplingParams.greedy(), **EXACT) as s:
        return [t.id for t in s.generate(prompt, max_tokens=n)]


@pytest.mark.parametrize("draft_max", [1, 3, 8, "auto"])
def test_greedy_speculative_output_is_plain_greedy_output(target, dense_model, draft_max):
    rejected = accepted = 0
    for prompt in PROMPTS:
        plain = plain_greedy(target, prompt, 48)
        with pymoe.Speculative(target, dense_model, draft_max=draft_max, temperature=0, **EXACT) as spec:
            out = list(spec.generate_tokens(prompt, max_tokens=48))
            stats = spec.stats
        assert out == plain
        assert stats.emitted == len(out)
        rejected += stats.drafted - stats.accepted
        accepted += stats.accepted
    if draft_max != "auto":  # auto may rightly choose not to draft on these tiny models
        assert rejected > 0, "the models always agreed: rollback was never exercised"
        assert accepted > 0, "the models never agreed: acceptance was never exercised"


def test_the_upcycled_target_is_a_moe_that_the_dense_model_drafts_for(target, dense_model):
    assert target.info.n_experts == 4 and target.info.n_experts_used == 2
    assert target.info.vocab_fingerprint == dense_model.info.vocab_fingerprint
    with pymoe.Speculative(target, dense_model, draft_max=3, temperature=0, **EXACT) as spec:
        list(spec.generate_tokens(PROMPTS[1], max_tokens=48))
        stats = spec.stats
    assert 0 < stats.accepted < stats.drafted  # some kept, some rejected


def test_every_emitted_token_is_what_the_verifier_must_emit_from_the_verify_batch(target, dense_model):
    rounds = []
    with pymoe.Speculative(target, dense_model, draft_max=4, temperature=0, **EXACT) as spec:
        spec.set_inspect(lambda draft, logits, n_acc, nxt: rounds.append((draft, logits, n_acc, nxt)))
        spec.feed(PROMPTS[1])
        emitted = []
        while len(emitted) < 40 and spec.stop_reason is None:
            got = spec.step(40 - len(emitted))
            draft, logits, n_acc, nxt = rounds[-1]
            assert logits.shape == (len(draft) + 1, target.info.n_vocab)
            assert (n_acc, nxt) == pymoe.verify(draft, logits, greedy=True)
            assert got == draft[:n_acc] + [nxt]
            emitted += got
    assert len(rounds) > 1


def test_sampled_runs_are_reproducible_with_a_seed(target, dense_model):
    def run(seed):
        with pymoe.Speculative(target, dense_model, draft_max=3, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0,
                               seed=seed, **EXACT) as spec:
            return list(spec.generate_tokens(PROMPTS[0], max_tokens=40))
    a, b, c = run(7), run(7), run(8)
    assert a == b and len(a) == 40
    assert a != c


@pytest.mark.parametrize("top_k", [0, 3000])
def test_a_draft_identical_to_the_target_accepts_nearly_everything(target, top_k):
    """top_k 0: every token kept (the rows' dense path); 3000: more than the id sort's threshold of kept tokens
    (its counting passes): either way the verifier reads the same distribution for draft and target."""
    with pymoe.Speculative(target, target, draft_max=4, temperature=1.0, top_k=top_k, top_p=1.0, min_p=0.0, seed=1,
                           **EXACT) as spec:
        list(spec.generate_tokens(PROMPTS[2], max_tokens=60))
        assert spec.stats.acceptance > 0.9


def test_stop_reasons_and_limits(target, dense_model):
    with pymoe.Speculative(target, dense_model, draft_max=8, temperature=0, **EXACT) as spec:
        assert list(spec.generate_tokens(PROMPTS[0], max_tokens=0)) == []
        assert len(list(spec.generate_tokens(None, max_tokens=5))) == 5 and spec.stop_reason == "max_tokens"
        assert len(spec.step(2)) <= 2
    small = dict(EXACT, n_ctx=16)
    with pymoe.Speculative(target, dense_model, draft_max=8, temperature=0, **small) as spec:
        prompt = target.tokenize(PROMPTS[0])
        out = list(spec.generate_tokens(prompt, max_tokens=10_000))
        n_ctx = spec.target.n_ctx  # llama.cpp may round the size up
        assert spec.stop_reason == "context_full"
        assert len(prompt) + len(out) == n_ctx + 1  # the last token needs no position yet
    assert out == plain_greedy(target, PROMPTS[0], len(out))


def test_continuing_after_more_input_matches_plain_decoding(target, dense_model):
    with pymoe.Speculative(target, dense_model, draft_max=3, temperature=0, **EXACT) as spec:
        first = list(spec.generate_tokens(PROMPTS[0], max_tokens=10))
        more = target.tokenize(" and then", add_special=False)
        second = list(spec.generate_tokens(more, max_tokens=10))
    sequence = target.tokenize(PROMPTS[0]) + first + more
    with target.session(sampling=pymoe.SamplingParams.greedy(), **EXACT) as s:
        assert [t.id for t in s.generate(sequence, max_tokens=10)] == second


def test_text_generation_decodes_the_tokens(target, dense_model):
    with pymoe.Speculative(target, dense_model, draft_max=3, temperature=0, **EXACT) as spec:
        text = "".join(t.text for t in spec.generate(PROMPTS[0], max_tokens=20))
    with target.session(sampling=pymoe.SamplingParams.greedy(), **EXACT) as s:
        assert text == "".join(t.text for t in s.generate(PROMPTS[0], max_tokens=20))


def test_misuse_is_refused_with_clear_errors(target, dense_model, model_dir):
    with pytest.raises(pymoe.InvalidArgumentError, match="draft_max"):
        pymoe.Speculative(target, dense_model, draft_max=31)
    with pytest.raises(pymoe.InvalidArgumentError, match="p_min"):
        pymoe.Speculative(target, dense_model, draft_p_min=2.0, **EXACT)
    with pytest.raises(pymoe.InvalidArgumentError, match="temperature"):
        pymoe.Speculative(target, dense_model, temperature=-1, **EXACT)
    with pytest.raises(pymoe.InvalidArgumentError, match="a Model, a Session"):
        pymoe.Speculative(target, "draft.gguf", **EXACT)
    with pytest.raises(pymoe.InvalidStateError, match="feed a prompt"):
        with pymoe.Speculative(target, dense_model, **EXACT) as spec:
            spec.step()
    with target.session(**EXACT) as used, dense_model.session(**EXACT) as d:
        used.feed([1, 2, 3])
        with pytest.raises(pymoe.InvalidStateError, match="empty"):
            pymoe.Speculative(used, d)
        with pytest.raises(pymoe.InvalidArgumentError, match="two sessions"):
            pymoe.Speculative(d, d)
    with pymoe.Speculative(target, dense_model, temperature=0, **EXACT) as spec:
        with pytest.raises(pymoe.TokenOutOfVocabularyError):
            spec.feed([target.info.n_vocab])
        assert spec.target.position == 0  # nothing changed
        spec.target.close()
        with pytest.raises(pymoe.ClosedError):
            spec.feed(PROMPTS[0])
    spec.close()  # idempotent


def test_a_draft_with_another_vocabulary_is_refused(target, model_dir, monkeypatch):
    monkeypatch.setattr(tiny_models, "VOCAB_GGUF", tiny_models.REPO / "vendor" / "llama.cpp" / "models" /
                        "ggml-vocab-gpt-2.gguf")
    other = tiny_models.write_model(model_dir / "other-vocab.gguf", tiny_models.DENSE)
    with pymoe.Model(other) as draft:
        with pytest.raises(pymoe.InvalidArgumentError,
                           match=rf"draft's vocabulary \({draft.info.n_vocab} tokens\).*target's "
                                 rf"\({target.info.n_vocab} tokens\)"):
            pymoe.Speculative(target, draft, **EXACT)


def test_stats_describe_the_rounds(target, dense_model):
    with pymoe.Speculative(target, dense_model, draft_max="auto", k_max=4, temperature=0, **EXACT) as spec:
        list(spec.generate_tokens(PROMPTS[0], max_tokens=40))
        s = spec.stats
    assert s.rounds == sum(s.accepted_hist) == sum(s.rounds_by_k.values()) and s.emitted == 40
    assert set(s.rounds_by_k) <= set(range(5))
    assert s.accepted == sum(i * c for i, c in enumerate(s.accepted_hist))
    assert set(s.verify_seconds_by_n) <= set(range(1, 6)) and {1, 2} <= set(s.verify_seconds_by_n)
    assert all(t > 0 for t in s.verify_seconds_by_n.values())
    assert 0 <= s.acceptance_estimate <= 1 and s.tokens_per_second > 0
    assert np.isclose(s.tokens_per_round, 40 / s.rounds)


def test_a_session_and_a_speculative_loop_are_one_decoder(target, dense_model):
    """Code written against pymoe.Decoder gets the same greedy text from both,
    the same positions, and a reset that starts the sequence over."""
    def run(decoder: pymoe.Decoder):
        tokens = target.tokenize(PROMPTS[1])
        decoder.feed(tokens)
        first = list(decoder.generate_tokens(None, max_tokens=12))
        assert decoder.position == len(tokens) + len(first) and decoder.stop_reason == "max_tokens"
        decoder.reset()
        assert decoder.position == 0
        again = [t.id for t in decoder.generate(tokens, max_tokens=12)]
        assert again == first
        return first

    with target.session(sampling=pymoe.SamplingParams.greedy(), **EXACT) as s:
        plain = run(s)
    with pymoe.Speculative(target, dense_model, draft_max=3, temperature=0, **EXACT) as spec:
        assert run(spec) == plain
        assert spec.stats.accepted > 0


def test_generation_ends_at_a_stop_string(target, dense_model):
    with target.session(sampling=pymoe.SamplingParams.greedy(), **EXACT) as s:
        text = "".join(t.text for t in s.generate(PROMPTS[0], max_tokens=24))
    stop = text[len(text) // 2:len(text) // 2 + 3]
    with pymoe.Speculative(target, dense_model, draft_max=3, temperature=0, **EXACT) as spec:
        cut = list(spec.generate(PROMPTS[0], max_tokens=24, stop=[stop]))
        assert "".join(t.text for t in cut) == text[:text.find(stop)] and spec.stop_reason == "stop"
        # the tokens up to the stop stay, and the rest of their round (at most draft_max more)
        assert 0 <= spec.position - (len(target.tokenize(PROMPTS[0])) + len(cut)) <= 3


def test_set_sampling_changes_how_the_next_generation_samples(target, dense_model):
    """A loop made sampling at temperature 1 verifies greedily after
    set_sampling(greedy), keeping its sequence; a seed repeats a sampled run."""
    with pymoe.Speculative(target, dense_model, draft_max=3, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
                           seed=9, **EXACT) as spec:
        spec.set_sampling(pymoe.SamplingParams.greedy())
        assert list(spec.generate_tokens(PROMPTS[0], max_tokens=24)) == plain_greedy(target, PROMPTS[0], 24)
        assert spec.position > 24  # the sequence stays: the next generation continues it
        hot = pymoe.SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
        runs = []
        for _ in range(2):
            spec.reset()
            spec.set_sampling(hot, seed=123)
            runs.append(list(spec.generate_tokens(PROMPTS[1], max_tokens=24)))
        assert runs[0] == runs[1]
        with pytest.raises(pymoe.InvalidArgumentError, match="top_p"):
            spec.set_sampling(pymoe.SamplingParams(top_p=0.0))
        with pytest.raises(pymoe.InvalidArgumentError, match="SamplingParams"):
            spec.set_sampling({"temperature": 0})
