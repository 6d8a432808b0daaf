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
