"""Routing diagnostics: the experts each token was sent to, read from the
router's top-k tensors through llama.cpp's eval callback, and what pymoe
reports from them (pymoe.routing_report)."""
import numpy as np
import pytest

import pymoe

TOKENS = list(range(20, 60))


@pytest.fixture(scope="module")
def moe(qwen3moe_path):
    with pymoe.Model(qwen3moe_path) as m:
        yield m


def test_each_token_of_a_batch_is_routed_as_when_fed_alone(moe):
    """The rows are the batch's tokens in order (the router's output is a
    strided view of its sorted experts), and one batch routes as one-by-one
    feeds do (F32 model: the same choices)."""
    info = moe.info
    with moe.session(n_ctx=128, record_routing=True) as s:
        s.feed(TOKENS, all_logits=True)
        batch = [s.routing(layer) for layer in range(info.n_layers)]
        s.reset()
        alone = [[] for _ in range(info.n_layers)]
        for t in TOKENS:
            s.feed([t])
            for layer in range(info.n_layers):
                alone[layer].append(s.routing(layer)[0])
    for layer in range(info.n_layers):
        ids = batch[layer]
        assert ids.shape == (len(TOKENS), info.n_experts_used)
        assert ids.min() >= 0 and ids.max() < info.n_experts
        assert all(len(set(row)) == info.n_experts_used for row in ids.tolist())  # k different experts
        np.testing.assert_array_equal(np.sort(ids, axis=1), np.sort(np.array(alone[layer]), axis=1))


def test_routing_needs_a_recording_session_and_a_real_layer(moe, dense_model):
    with moe.session(n_ctx=64) as s:
        s.feed([1, 2, 3])
        with pytest.raises(pymoe.InvalidStateError, match="record_routing"):
            s.routing(0)
    with moe.session(n_ctx=64, record_routing=True) as s:
        s.feed([1, 2, 3])
        with pytest.raises(pymoe.InvalidArgumentError, match="outside"):
            s.routing(moe.info.n_layers)
    with dense_model.session(n_ctx=64, record_routing=True) as s:  # no router: no rows
        s.feed([1, 2, 3])
        assert s.routing(0).shape[0] == 0
    with pytest.raises(pymoe.UnsupportedError):
        pymoe.routing_report(dense_model, TOKENS)


def test_the_report_counts_distinct_experts_per_window(moe):
    r = pymoe.routing_report(moe, TOKENS)
    e, k = moe.info.n_experts, moe.info.n_experts_used
    assert (r.n_experts, r.n_used, r.n_tokens) == (e, k, len(TOKENS))
    assert r.distinct[1] == k and r.random[1] == pytest.approx(k)
    for n in range(2, 10):
        assert r.distinct[n - 1] <= r.distinct[n] <= min(e, n * k)
        assert r.random[n] == pytest.approx(e * (1 - (1 - k / e) ** n))
    assert 0.0 <= r.reuse <= 1.0 and r.reuse_random == k / e
    # the same count from the raw rows, by brute force, for one layer and n = 3
    with moe.session(n_ctx=128, record_routing=True) as s:
        s.feed(TOKENS, all_logits=True)
        per_layer = [s.routing(layer) for layer in range(moe.info.n_layers)]
    want = np.mean([len(set(ids[t:t + 3].ravel())) for ids in per_layer for t in range(len(TOKENS) - 2)])
    assert r.distinct[3] == pytest.approx(want)
