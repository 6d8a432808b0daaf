"""SmolLM2-135M-Instruct (Q4_1), a real model fetched once with pip."""
import numpy as np
import pytest

import pymoe

pytestmark = pytest.mark.slow

TEXTS = ["The capital of France is Paris.", "  leading spaces, tabs\tand\nnewlines",
         "Unicode: café, naïve, 日本語, emoji 🙂", "<|im_start|>user\nhi<|im_end|>", ""]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_roundtrip(smollm2, text):
    tokens = smollm2.tokenize(text, add_special=False)
    assert all(0 <= t < smollm2.info.n_vocab for t in tokens)
    assert smollm2.detokenize(tokens) == text


def test_special_tokens_parse_only_when_asked(smollm2):
    text = "<|im_start|>user"
    special = smollm2.tokenize(text, add_special=False, parse_special=True)
    plain = smollm2.tokenize(text, add_special=False, parse_special=False)
    assert len(special) < len(plain)
    assert smollm2.detokenize(special, render_special=True) == text
    assert smollm2.detokenize(special, render_special=False) == "user"


def test_info(smollm2):
    info = smollm2.info
    assert info.arch == "llama" and info.n_layers == 30 and info.n_vocab == 49152
    assert info.n_experts == 0 and not info.is_moe
    assert 90e6 < info.n_bytes < 100e6


def test_streamed_text_equals_the_detokenized_tokens(smollm2):
    with smollm2.session(n_ctx=512, sampling=pymoe.SamplingParams.greedy()) as s:
        out = list(s.generate("Write a short poem about the sea.", max_tokens=40))
        assert s.stop_reason in ("max_tokens", "eog")
    assert "".join(t.text for t in out) == smollm2.detokenize([t.id for t in out])


@pytest.mark.parametrize("load_mode", ["mmap", "no-mmap"])
def test_greedy_is_deterministic_in_both_load_modes(smollm2_path, load_mode):
    runs = []
    with pymoe.Model(smollm2_path, load_mode=load_mode) as model:
        for _ in range(2):
            with model.session(n_ctx=256, n_threads=2, sampling=pymoe.SamplingParams.greedy()) as s:
                runs.append([t.id for t in s.generate("The capital of France is", max_tokens=24)])
    assert runs[0] == runs[1] and len(runs[0]) > 0


def test_rewind_and_refeed_on_the_real_model(smollm2):
    with smollm2.session(n_ctx=256) as s:
        s.feed(smollm2.tokenize("Hello there, how are"))
        s.feed(366)
        expected = s.logits().copy()
        s.feed([1, 2, 3])
        s.rewind(4)
        s.feed(366)
        np.testing.assert_array_equal(s.logits(), expected)
