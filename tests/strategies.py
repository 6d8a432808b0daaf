"""Hypothesis strategies shared by the tests (bounded ranges)."""
import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import pymoe


def logits_rows(min_vocab=1, max_vocab=64):
    """Logit rows with ties allowed and a realistic range."""
    return st.integers(min_vocab, max_vocab).flatmap(lambda n: hnp.arrays(
        np.float32, n, elements=st.floats(-30, 30, width=32, allow_nan=False)))


sampling_params = st.builds(
    pymoe.SamplingParams,
    temperature=st.one_of(st.just(0.0), st.floats(0.05, 5.0)),
    top_k=st.one_of(st.just(0), st.integers(1, 80)),
    top_p=st.one_of(st.just(1.0), st.floats(0.05, 1.0)),
    min_p=st.one_of(st.just(0.0), st.floats(0.0, 1.0)),
)


def conditional_table(rng, n, depth, peak, zeros=0.0):
    """Random conditional distributions over n tokens: table[prefix] for
    prefixes up to depth; each row has one token made likelier by peak, and
    each token is 0 with probability zeros (a row never all 0)."""
    table = {}
    for length in range(depth + 1):
        for prefix in np.ndindex(*(n,) * length) if length else [()]:
            w = rng.random(n) + 0.05
            w[rng.integers(n)] += peak
            if zeros:
                w[rng.random(n) < zeros] = 0.0
                w = w if w.sum() > 0 else np.ones(n)
            table[tuple(prefix)] = (w / w.sum()).astype(np.float32)
    return table
