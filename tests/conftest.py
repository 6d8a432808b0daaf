import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

import pymoe
import tiny_models

# quick while developing, thorough in CI (CI=true) or on request
settings.register_profile("dev", max_examples=40, deadline=None)
settings.register_profile("ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# `make sanitize` (scripts/sanitize.sh) sets PYMOE_SANITIZE=1. ASan makes mlock a no-op that reports
# success, so pymoe's check that every weight byte is locked (VmLck) fails: an mlock load is refused and
# auto falls back to no-mmap. Tests of real locking skip there; everything else runs.
SANITIZED = os.environ.get("PYMOE_SANITIZE") == "1"
# loops start cold, whatever earlier runs left in the cache folder (pymoe/learned.py);
# the tests of warm starts turn it back on for a folder of their own
os.environ["PYMOE_WARM_START"] = "0"
needs_real_mlock = pytest.mark.skipif(SANITIZED, reason="ASan makes mlock a no-op (make sanitize)")


def stderr_lines(text: str) -> list:
    """A command's stderr lines, less the notes a build may add: a GPU build without a usable GPU says so
    once (tests/test_build_info.py), and under make sanitize auto's mlock falls back with a warning."""
    return [line for line in text.splitlines()
            if "no usable GPU" not in line and not (SANITIZED and "could not lock all" in line)]

REPO = Path(__file__).resolve().parent.parent
if Path(pymoe.__file__).resolve().parent == REPO / "pymoe":
    raise RuntimeError("tests must import the installed pymoe, not the source tree: run `make test`")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def dense_path(model_dir):
    return tiny_models.write_model(model_dir / "dense.gguf", tiny_models.DENSE)


@pytest.fixture(scope="session")
def llama_moe_path(model_dir):
    return tiny_models.write_model(model_dir / "llama-moe.gguf", tiny_models.LLAMA_MOE)


@pytest.fixture(scope="session")
def pair_target(model_dir):
    """A llama MoE target (F32) and its matching draft (PAIR_DRAFT), and a qwen35moe target with an MTP head:
    the speculative loop's exactness tests (constraints, logprobs, penalties) share them."""
    path = tiny_models.write_model(model_dir / "pair-target.gguf", tiny_models.ARCHITECTURES["llama-moe"])
    with pymoe.Model(path) as m:
        yield m


@pytest.fixture(scope="session")
def pair_draft(model_dir):
    path = tiny_models.write_model(model_dir / "pair-draft.gguf", tiny_models.PAIR_DRAFT)
    with pymoe.Model(path) as m:
        yield m


@pytest.fixture(scope="session")
def pair_mtp(model_dir):
    path = tiny_models.write_model(model_dir / "pair-mtp.gguf", tiny_models.QWEN35MOE_MTP)
    with pymoe.Model(path, mtp=True) as m:
        yield m


@pytest.fixture(scope="session")
def qwen3moe_path(model_dir):
    return tiny_models.write_model(model_dir / "qwen3moe.gguf", tiny_models.QWEN3MOE)


@pytest.fixture(scope="session")
def dense_model(dense_path):
    with pymoe.Model(dense_path) as model:
        yield model


@pytest.fixture
def session(dense_model):
    with dense_model.session(n_ctx=256, n_batch=64, n_ubatch=64, n_threads=2) as s:
        yield s


@pytest.fixture(scope="session")
def smollm2_path():
    from pymoe.demo_models import smollm2
    return smollm2()


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    with pymoe.Model(smollm2_path) as model:
        yield model
