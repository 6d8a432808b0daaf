"""Rows that are not numbers: a model whose output norm is NaN, infinite or
huge (3e38, which overflows) yields logits that are not numbers. Every path
(plain and speculative, greedy and sampled, Python, the command and serve)
raises one typed error naming the position instead of emitting a token; a row
whose every logit is -inf (a caller's own masking) is an error too, never
token 0."""
import math
import shutil
import subprocess
import sys

import gguf
import numpy as np
import pytest

import pymoe
import tiny_models
from pymoe import errors
from test_serve import Server

EXACT = dict(n_ctx=256, n_threads=2)
VALUES = {"nan": math.nan, "inf": math.inf, "3e38": 3e38}


@pytest.fixture(scope="module")
def clean_path(model_dir):
    return tiny_models.write_model(model_dir / "nonfinite-clean.gguf", tiny_models.DENSE)


@pytest.fixture(scope="module", params=list(VALUES))
def broken_path(request, clean_path, model_dir):
    """The clean model with its output norm overwritten."""
    path = model_dir / f"nonfinite-{request.param}.gguf"
    shutil.copy(clean_path, path)
    reader = gguf.GGUFReader(path, "r+")
    norm = next(t for t in reader.tensors if t.name == "output_norm.weight")
    norm.data[:] = VALUES[request.param]
    reader.data.flush()
    del reader
    return path


@pytest.fixture(scope="module")
def broken(broken_path):
    with pymoe.Model(broken_path) as m:
        yield m


@pytest.fixture(scope="module")
def clean(clean_path):
    with pymoe.Model(clean_path) as m:
        yield m


SAMPLINGS = [pymoe.SamplingParams.greedy(), pymoe.SamplingParams(), pymoe.SamplingParams(top_k=0),
             pymoe.SamplingParams(top_k=0, top_p=1.0, min_p=0.0)]


@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "defaults", "top_k 0", "no transforms"])
def test_a_session_raises_naming_the_position_and_emits_nothing(broken, sampling):
    with broken.session(sampling=sampling, **EXACT) as s:
        out = []
        n = len(broken.tokenize("a b c"))
        with pytest.raises(errors.NonFiniteLogitsError, match=f"for position {n} are not all numbers"):
            out.extend(s.generate_tokens("a b c", max_tokens=8))
        assert out == []
        with pytest.raises(errors.NonFiniteLogitsError):
            s.sample()
    with broken.session(sampling=sampling, **EXACT) as s, \
            pymoe.grammar.Grammar.from_gbnf(broken, 'root ::= "a"+') as g:
        with pytest.raises(errors.NonFiniteLogitsError):
            list(s.generate_tokens("a b c", max_tokens=8, grammar=g))


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("source", ["draft model", "ngram"])
def test_a_speculative_loop_raises_naming_the_position(broken, clean, temperature, source):
    draft = clean if source == "draft model" else "ngram"
    with pymoe.Speculative(broken, draft, draft_max=3, temperature=temperature, **EXACT) as spec:
        out = []
        with pytest.raises(errors.NonFiniteLogitsError, match="target's .*position .*are not all numbers"):
            out.extend(spec.generate_tokens("a b c a b c", max_tokens=8))
        assert out == []
        spec.reset()  # and the loop works again after a reset (it still finds the same rows)
        with pytest.raises(errors.NonFiniteLogitsError):
            list(spec.generate_tokens("a b c", max_tokens=4, grammar=pymoe.grammar.Grammar.from_gbnf(broken,
                                                                                                  'root ::= "a"+')))


def test_a_broken_draft_is_named_as_the_draft(broken, clean):
    with pymoe.Speculative(clean, broken, draft_max=3, temperature=0, **EXACT) as spec:
        with pytest.raises(errors.NonFiniteLogitsError, match="draft's logits"):
            list(spec.generate_tokens("a b c", max_tokens=8))


def test_a_row_masked_whole_is_an_error_not_token_0():
    row = np.full(100, -np.inf, dtype=np.float32)
    rng = pymoe.Rng(1)
    for sampling in SAMPLINGS:
        with pytest.raises(errors.InvalidArgumentError, match="all -inf"):
            sampling.sample(row, rng)
        with pytest.raises(errors.InvalidArgumentError, match="all -inf"):
            sampling.probs(row)
    row[7] = np.nan
    with pytest.raises(errors.NonFiniteLogitsError):
        pymoe.SamplingParams.greedy().sample(row, rng)
    with pytest.raises(errors.NonFiniteLogitsError, match="row 1"):
        pymoe.verify([3], np.stack([np.eye(100, dtype=np.float32)[3], row]), greedy=True)
    ok = np.zeros(100, dtype=np.float32)
    ok[:50] = -np.inf  # a caller's partial masking is fine
    assert pymoe.SamplingParams.greedy().sample(ok, rng) == 50


@pytest.mark.parametrize("args", [["--temp", "0"], [], ["--temp", "0", "-d", "ngram"], ["-d", "ngram"]],
                         ids=["plain greedy", "plain sampled", "speculative greedy", "speculative sampled"])
def test_pymoe_generate_exits_2_with_one_line_and_no_text(broken_path, args):
    run = subprocess.run([sys.executable, "-P", "-m", "pymoe", "generate", "-m", str(broken_path), "-p", "a b c a b c",
                          "-n", "8", "-t", "2", *args], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stdout.strip() == ""
    errors_ = [line for line in run.stderr.splitlines() if line.startswith("pymoe generate:")]
    assert len(errors_) == 1 and "not all numbers" in errors_[0] and "position" in errors_[0], run.stderr


def test_serve_answers_500_naming_it_and_stays_up(broken_path):
    server = Server(broken_path)
    try:
        status, body = server.request("/v1/completions", {"prompt": "a b c", "max_tokens": 4})
        assert status == 500 and "not all numbers" in body["error"]["message"], body
        status, body = server.request("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                               "max_tokens": 4, "stream": False})
        assert status in (400, 500)  # no chat template (400), or the same rows (500)
        status, _ = server.request("/health")
        assert status == 200
    finally:
        code, log = server.stop()
    assert code == 0, log
