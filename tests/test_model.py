"""Loading models: modes, architectures, split files, progress, bad files."""
import gc

import numpy as np
import pytest

import pymoe
import tiny_models
from conftest import needs_real_mlock


@pytest.mark.parametrize("load_mode", ["mmap", "no-mmap", pytest.param("mlock", marks=needs_real_mlock), "auto"])
def test_load_modes_give_the_same_logits(dense_path, load_mode):
    tokens = [1, 15043, 3186]
    with pymoe.Model(dense_path, load_mode=load_mode) as model, model.session(n_ctx=64) as s:
        s.feed(tokens)
        got = s.logits().copy()
    with pymoe.Model(dense_path, load_mode="mmap") as ref, ref.session(n_ctx=64) as s:
        s.feed(tokens)
        np.testing.assert_array_equal(got, s.logits())


@pytest.mark.parametrize("fixture, arch, experts", [
    ("dense_path", "llama", (0, 0)),
    ("llama_moe_path", "llama", (4, 2)),
    ("qwen3moe_path", "qwen3moe", (4, 2)),
])
def test_info_describes_each_architecture(request, fixture, arch, experts):
    shape = {"dense_path": tiny_models.DENSE, "llama_moe_path": tiny_models.LLAMA_MOE,
             "qwen3moe_path": tiny_models.QWEN3MOE}[fixture]
    with pymoe.Model(request.getfixturevalue(fixture)) as model:
        info = model.info
        assert info.arch == arch
        assert (info.n_experts, info.n_experts_used) == experts
        assert info.is_moe == (experts[0] > 0)
        assert info.n_layers == shape.n_layers
        assert info.n_embd == shape.n_embd
        assert (info.n_head, info.n_head_kv) == (shape.n_head, shape.n_head_kv)
        assert info.n_vocab == 32000
        assert info.n_ctx_train == shape.n_ctx_train
        assert info.n_bytes > 32000 * shape.n_embd * 4  # at least the F32 embeddings
        assert not info.is_recurrent and not info.is_hybrid
        with model.session(n_ctx=64) as s:
            s.feed(model.tokenize("a tiny model"))
            assert np.isfinite(s.logits()).all()


def test_vocab_fingerprint_tells_tokenizers_apart(dense_model, llama_moe_path, smollm2):
    with pymoe.Model(llama_moe_path) as moe:
        assert moe.info.vocab_fingerprint == dense_model.info.vocab_fingerprint
    assert smollm2.info.vocab_fingerprint != dense_model.info.vocab_fingerprint


def test_split_gguf_loads_from_the_first_part(model_dir, dense_model):
    first = tiny_models.write_model(model_dir / "split.gguf", tiny_models.DENSE, split_max_tensors=6)
    assert first.name.startswith("split-00001-of-")
    n_parts = int(first.stem.split("-of-")[1])
    assert n_parts >= 3
    tokens = dense_model.tokenize("split files")
    with pymoe.Model(first) as split, split.session(n_ctx=64) as s, dense_model.session(n_ctx=64) as ref:
        assert split.info.n_bytes == dense_model.info.n_bytes
        s.feed(tokens)
        ref.feed(tokens)
        np.testing.assert_array_equal(s.logits(), ref.logits())


def test_progress_is_reported_and_can_abort(dense_path):
    seen = []
    with pymoe.Model(dense_path, progress=seen.append):
        pass
    assert seen and seen[-1] == pytest.approx(1.0)
    assert seen == sorted(seen)
    with pytest.raises(pymoe.AbortedError) as err:
        pymoe.Model(dense_path, progress=lambda fraction: False)
    assert err.value.code == -8


def test_an_exception_in_progress_aborts_and_propagates(dense_path):
    def boom(fraction):
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        pymoe.Model(dense_path, progress=boom)


def test_missing_file(tmp_path):
    with pytest.raises(pymoe.ModelNotFoundError) as err:
        pymoe.Model(tmp_path / "nope.gguf")
    assert err.value.code == -2 and "nope.gguf" in err.value.message
    assert isinstance(err.value, FileNotFoundError)


def test_a_directory(tmp_path):
    with pytest.raises(pymoe.ModelNotFoundError, match="is a directory"):
        pymoe.Model(tmp_path)


def test_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "notes.gguf"
    path.write_text("these are not weights")
    with pytest.raises(pymoe.ModelFormatError, match="not a GGUF file"):
        pymoe.Model(path)


@pytest.mark.parametrize("keep", [0.02, 0.5, 0.99])
def test_a_truncated_gguf(tmp_path, dense_path, keep):
    data = dense_path.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    for mode in ("mmap", "no-mmap", "mlock"):
        with pytest.raises(pymoe.ModelFormatError) as err:
            pymoe.Model(path, load_mode=mode)
        assert "truncated.gguf" in err.value.message


def test_bad_load_mode(dense_path):
    with pytest.raises(pymoe.InvalidArgumentError):
        pymoe.Model(dense_path, load_mode="fast")


def test_close_is_idempotent_and_closes_sessions_first(dense_path):
    model = pymoe.Model(dense_path)
    s = model.session(n_ctx=32)
    s.feed([1, 2])
    model.close()
    model.close()
    assert model.closed and s.closed
    with pytest.raises(pymoe.ClosedError):
        model.tokenize("x")
    with pytest.raises(pymoe.ClosedError):
        s.feed(3)
    s.close()


def test_a_session_keeps_its_model_alive(dense_path):
    s = pymoe.Model(dense_path).session(n_ctx=32)  # no other reference to the model
    gc.collect()
    s.feed([1, 2, 3])
    assert s.logits().shape == (32000,)
    s.close()


def test_tokenize_roundtrip_and_specials(dense_model):
    text = "Hello world, this is pymoe."
    tokens = dense_model.tokenize(text)
    assert tokens[0] == dense_model.info.bos  # the vocab asks for BOS
    assert dense_model.tokenize(text, add_special=False) == tokens[1:]
    assert dense_model.detokenize(tokens[1:]) == text
    assert dense_model.is_eog(dense_model.info.eos)
    assert not dense_model.is_eog(tokens[1])
    assert not dense_model.is_eog(10**9)
    long_text = "word " * 3000  # longer than the first buffer guess
    assert len(dense_model.tokenize(long_text, add_special=False)) >= 3000


def test_detokenize_rejects_tokens_outside_the_vocabulary(dense_model):
    with pytest.raises(pymoe.TokenOutOfVocabularyError, match="32000"):
        dense_model.detokenize([5, 32000])
    with pytest.raises(pymoe.TokenOutOfVocabularyError):
        dense_model.token_piece(-1)
