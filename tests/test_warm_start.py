"""What draft_max="auto" learned outlives the loop (pymoe/learned.py,
csrc/draft_length_learned.c): in simulation a warm start reaches the best
fixed draft length within the bar even over a short generation, and costs
nothing where drafting cannot pay; end to end the file is written, read,
and refused (quietly, starting cold) when it is stale, damaged or foreign."""
import os
import time

import pytest

import c_program
import pymoe
import pymoe.learned
import test_draft_length as cases
from test_speculative import EXACT, PROMPTS, plain_greedy, target, target_path  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    return c_program.build(tmp_path_factory, "draft_length_sim", "draft_length.c", "draft_length_learned.c", "rng.c")


@pytest.mark.parametrize("name", cases.SCENARIOS)
def test_a_warm_start_reaches_the_best_fixed_draft_length_over_a_short_generation(sim, name):
    """40 rounds (a 96-token answer), after an earlier run of 400 on other draws."""
    costs, curve = cases.SCENARIOS[name]
    warm, best, best_k = cases.run(sim, *costs, rounds=40, seed=1, options=curve + ["--warm", "400", "--repeats", "30"])
    cold, _, _ = cases.run(sim, *costs, rounds=40, seed=1, options=curve + ["--repeats", "30"])
    assert warm >= cases.BAR * best, (warm / best, best_k)
    if best_k == 0:  # drafting cannot pay: a warm loop decodes plainly from its first round, probes aside (half a
        assert warm >= 0.985 * best, (warm / best, cold / best)  # plain token's time, then 1.5% of the run)


@pytest.fixture
def learned_dir(tmp_path):
    return tmp_path / "learned"


def generate(target, draft, prompt, folder):
    with pymoe.Speculative(target, draft, draft_max="auto", temperature=0, warm_start=folder, **EXACT) as spec:
        out = list(spec.generate_tokens(prompt, max_tokens=32))
        return out, spec.warm_started


def test_a_loop_keeps_what_it_learned_and_the_next_starts_from_it(target, dense_model, learned_dir):
    out, warm = generate(target, dense_model, PROMPTS[0], learned_dir)
    assert not warm
    files = list(learned_dir.glob("*.bin"))
    assert len(files) == 1
    for prompt in PROMPTS:  # warm, and still lossless
        out, warm = generate(target, dense_model, prompt, learned_dir)
        assert warm
        assert out == plain_greedy(target, prompt, 32)
    assert list(learned_dir.glob("*.bin")) == files  # one file per pair and machine, rewritten
    lookup, warm = generate(target, "ngram", PROMPTS[2], learned_dir)
    assert not warm and len(list(learned_dir.glob("*.bin"))) == 2  # another source: another file


def test_a_fixed_draft_length_or_the_switch_off_writes_nothing(target, dense_model, tmp_path, monkeypatch):
    monkeypatch.setattr(pymoe.learned, "cache_dir", lambda: tmp_path)  # the default folder, here
    with pymoe.Speculative(target, dense_model, draft_max=3, temperature=0, warm_start=tmp_path, **EXACT) as spec:
        list(spec.generate_tokens(PROMPTS[0], max_tokens=8))
    generate(target, dense_model, PROMPTS[0], False)
    generate(target, dense_model, PROMPTS[0], True)  # PYMOE_WARM_START=0 (conftest.py): the default folder is off
    assert not list(tmp_path.rglob("*.bin"))
    monkeypatch.setenv("PYMOE_WARM_START", "1")
    generate(target, dense_model, PROMPTS[0], True)
    assert len(list((tmp_path / "learned").glob("*.bin"))) == 1
    with pytest.raises(pymoe.InvalidArgumentError, match="warm_start"):
        pymoe.Speculative(target, dense_model, draft_max="auto", warm_start=1, **EXACT)


def damaged(data: bytes):
    yield b""
    yield data[: len(data) // 2]                  # truncated
    yield data + b"\0"                            # too long
    yield b"\x55" * len(data)                     # not the format
    yield data[:24] + b"\xff" * (len(data) - 24)  # the format's tag, figures no run produces (NaN, -1)


def test_a_damaged_or_stale_file_is_ignored_and_the_loop_starts_cold(target, dense_model, learned_dir):
    generate(target, dense_model, PROMPTS[0], learned_dir)
    (path,) = learned_dir.glob("*.bin")
    good = path.read_bytes()
    for data in damaged(good):
        path.write_bytes(data)
        out, warm = generate(target, dense_model, PROMPTS[1], learned_dir)
        assert not warm
        assert out == plain_greedy(target, PROMPTS[1], 32)
        path.write_bytes(good)  # the cold loop wrote its own: put the good one back for the next case
    _, warm = generate(target, dense_model, PROMPTS[1], learned_dir)
    assert warm
    old = time.time() - (pymoe.learned.MAX_AGE_DAYS + 1) * 86400
    os.utime(path, (old, old))  # older than the limit (and than the model files)
    _, warm = generate(target, dense_model, PROMPTS[1], learned_dir)
    assert not warm


def test_the_c_library_refuses_learned_bytes_of_another_loop(target, dense_model):
    """What the file's name does not catch (k_max, sources) the library does."""
    from pymoe._native import ffi, lib
    with pymoe.Speculative(target, dense_model, draft_max="auto", temperature=0, warm_start=False, **EXACT) as a:
        list(a.generate_tokens(PROMPTS[0], max_tokens=16))
        size = ffi.new("size_t *")
        assert lib.pymoe_spec_learned_save(a._ptr, ffi.NULL, 0, size) == 0
        buf = ffi.new("char[]", size[0])
        assert lib.pymoe_spec_learned_save(a._ptr, buf, size[0] - 1, size) == lib.PYMOE_EINVAL  # no room
        assert lib.pymoe_spec_learned_save(a._ptr, buf, size[0], size) == 0
    with pymoe.Speculative(target, dense_model, draft_max="auto", k_max=4, warm_start=False, **EXACT) as b:
        assert lib.pymoe_spec_learned_load(b._ptr, buf, size[0]) == lib.PYMOE_EINVAL
        assert "k_max" in ffi.string(lib.pymoe_last_error()).decode()
    with pymoe.Speculative(target, "ngram", warm_start=False, **EXACT) as c:
        assert lib.pymoe_spec_learned_load(c._ptr, buf, size[0]) == lib.PYMOE_EINVAL
    with pymoe.Speculative(target, dense_model, draft_max=2, warm_start=False, **EXACT) as d:
        assert lib.pymoe_spec_learned_load(d._ptr, buf, size[0]) == lib.PYMOE_EINVAL
    with pymoe.Speculative(target, dense_model, draft_max="auto", warm_start=False, **EXACT) as e:
        assert lib.pymoe_spec_learned_load(e._ptr, buf, size[0]) == 0
