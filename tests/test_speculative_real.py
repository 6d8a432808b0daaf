"""Speculative decoding with SmolLM2-135M as the draft of MoE targets upcycled
from it: exact identity with plain greedy decoding on an all-F32 target, and on
a quantized target the guarantee that holds there (each emitted token is what
the verifier must emit from its own verify batch)."""
import pytest

import pymoe
from pymoe.demo_models import smollm2_moe

pytestmark = pytest.mark.slow

EXACT = dict(n_ctx=1024, flash_attn="off", cache_type_k="f32", cache_type_v="f32", n_threads=2)
PROMPTS = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n"]
N = 32


@pytest.fixture(scope="module")
def f32_target():
    with pymoe.Model(smollm2_moe(4, 2, "f32", noise=0.1, rest_f32=True, quiet=True)) as model:
        yield model


@pytest.fixture(scope="module")
def q4_target():
    with pymoe.Model(smollm2_moe(4, 2, "q4_0", noise=0.1, quiet=True)) as model:
        yield model


def tokens(model, prompt):
    return model.tokenize(prompt, parse_special=True)


def test_greedy_speculative_equals_plain_greedy_on_an_f32_moe(f32_target, smollm2):
    rejected = 0
    for prompt in PROMPTS:
        with f32_target.session(sampling=pymoe.SamplingParams.greedy(), **EXACT) as s:
            plain = [t.id for t in s.generate(tokens(f32_target, prompt), max_tokens=N)]
        for k in (1, 3, 8, "auto"):
            with pymoe.Speculative(f32_target, smollm2, draft_max=k, temperature=0, **EXACT) as spec:
                out = list(spec.generate_tokens(tokens(f32_target, prompt), max_tokens=N))
                rejected += spec.stats.drafted - spec.stats.accepted
            assert out == plain, (prompt, k)
    assert rejected > 0  # partial acceptances happened and were rolled back


def test_each_token_is_what_the_verifier_emits_from_its_batch_on_a_q4_0_moe(q4_target, smollm2):
    assert q4_target.info.n_experts == 4
    for prompt in PROMPTS:
        rounds = []
        with pymoe.Speculative(q4_target, smollm2, draft_max=4, temperature=0, n_ctx=1024) as spec:
            spec.set_inspect(lambda *r: rounds.append(r))
            spec.feed(tokens(q4_target, prompt))
            emitted = 0
            while emitted < N and spec.stop_reason != "eog":
                got = spec.step(N - emitted)
                draft, logits, n_acc, nxt = rounds[-1]
                assert (n_acc, nxt) == pymoe.verify(draft, logits, greedy=True)
                expected = draft[:n_acc] + [nxt]
                eog = [i for i, t in enumerate(expected) if q4_target.is_eog(t)]
                assert got == (expected[:eog[0]] if eog else expected)
                assert spec.stop_reason == ("eog" if eog else spec.stop_reason)
                emitted += len(got)
        assert len(rounds) >= 2
