"""Going back in a session whose model keeps recurrent state (the hybrid
qwen35moe): snapshots rewind a bounded number of positions of the last feed,
once; checkpoints go back any distance; both continue exactly where plain
decoding would (F32 weights). KV-cache models rewind anywhere, as before."""
import numpy as np
import pytest

import pymoe
import tiny_models

EXACT = dict(n_ctx=256, flash_attn="off", cache_type_k="f32", cache_type_v="f32", n_threads=2)


@pytest.fixture(scope="module")
def hybrid(model_dir):
    path = tiny_models.write_model(model_dir / "rollback-qwen35moe.gguf", tiny_models.ARCHITECTURES["qwen35moe"])
    with pymoe.Model(path) as model:
        yield model


@pytest.fixture(scope="module")
def prompt(hybrid):
    return hybrid.tokenize("Once upon a time there was")


TAIL = [300, 301, 302, 303, 304]


def rows_after(session, tokens):
    session.feed(tokens, all_logits=True)
    return np.array(session.logits_all())


def test_snapshots_rewind_within_the_last_feed_and_continue_exactly(hybrid, prompt):
    with hybrid.session(n_rs_seq=4, **EXACT) as s, hybrid.session(**EXACT) as ref:
        assert s.is_recurrent and s.n_rs_seq == 4
        s.feed(prompt)
        first = rows_after(s, TAIL)
        assert s.rewind_limit == 4  # min(n_rs_seq, tokens of the feed - 1)
        s.rewind(3)
        assert s.position == len(prompt) + 2 and s.rewind_limit == 0
        again = rows_after(s, TAIL[2:])
        np.testing.assert_allclose(again, first[2:], atol=1e-4)
        # and where plain decoding of the same sequence ends up
        ref.feed(prompt + TAIL)
        np.testing.assert_allclose(np.array(s.logits()), np.array(ref.logits()), atol=1e-4)


def test_a_rewind_snapshots_cannot_cover_is_refused_and_changes_nothing(hybrid, prompt):
    with hybrid.session(n_rs_seq=2, **EXACT) as s:
        s.feed(prompt)
        s.feed(TAIL)
        with pytest.raises(pymoe.errors.UnsupportedError, match="can rewind 2 position"):
            s.rewind(3)
        assert s.position == len(prompt) + len(TAIL)
        s.rewind(1)
        with pytest.raises(pymoe.errors.UnsupportedError, match="restore a checkpoint"):
            s.rewind(1)  # once per feed
        s.feed([TAIL[-1]])
        assert s.rewind_limit == 0  # a one-token feed leaves no snapshot behind it


def test_checkpoints_go_back_any_distance_and_can_be_restored_again(hybrid, prompt):
    with hybrid.session(**EXACT) as s:
        assert s.n_rs_seq == 0
        s.feed(prompt)
        s.checkpoint()
        first = rows_after(s, TAIL)
        s.feed([400, 401, 402])
        s.restore()
        assert s.position == len(prompt)
        np.testing.assert_allclose(rows_after(s, TAIL), first, atol=1e-4)
        s.restore()
        np.testing.assert_allclose(rows_after(s, TAIL), first, atol=1e-4)


def test_checkpoint_misuse_gets_clear_errors(hybrid, prompt, dense_path):
    with hybrid.session(**EXACT) as s:
        with pytest.raises(pymoe.errors.InvalidStateError, match="no checkpoint"):
            s.restore()
        s.feed(prompt)
        s.checkpoint()
        s.reset()
        with pytest.raises(pymoe.errors.InvalidStateError, match="no checkpoint"):
            s.restore()
    with hybrid.session(n_rs_seq=4, **EXACT) as s:
        s.feed(prompt)
        s.feed(TAIL)
        s.checkpoint()
        s.rewind(3)  # to before the checkpoint: what follows may differ from what it saw, so it is gone
        with pytest.raises(pymoe.errors.InvalidStateError, match="no checkpoint"):
            s.restore()
    with pymoe.Model(dense_path) as dense, dense.session(n_rs_seq=4, **EXACT) as s:
        assert not s.is_recurrent and s.n_rs_seq == 0  # nothing to snapshot
        s.feed(prompt)
        assert s.rewind_limit == len(prompt)  # a KV cache drops any number of positions
        with pytest.raises(pymoe.errors.UnsupportedError, match="rewind its KV cache instead"):
            s.checkpoint()


def test_saved_state_of_a_hybrid_session_loads_back(hybrid, prompt):
    with hybrid.session(n_rs_seq=2, **EXACT) as s, hybrid.session(n_rs_seq=2, **EXACT) as t:
        s.feed(prompt)
        state = s.save_state()
        expected = rows_after(s, TAIL)
        t.load_state(state)
        np.testing.assert_allclose(rows_after(t, TAIL), expected, atol=1e-4)
