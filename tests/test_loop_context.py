"""What a decoder's context holds, and going back in it: the loop keeps the
sequence (Decoder.tokens) and rewinds every draft source with it; a rewound
loop goes on as a fresh loop fed the kept tokens would (greedy, F32 targets:
a KV-cache target with a draft model, lookup or both, and hybrid targets with
a draft model and with their MTP head, within their reach); sessions a loop
drives refuse outside changes; saved states name their model; token ids are
integers."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pymoe
import tiny_models

EXACT = dict(n_ctx=512, flash_attn="off", cache_type_k="f32", cache_type_v="f32", n_threads=2)
PROMPT = "one two three four five one two three four five one two"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def kv_target_path(model_dir):
    return tiny_models.write_model(model_dir / "ctx-llama-moe.gguf", tiny_models.ARCHITECTURES["llama-moe"])


@pytest.fixture(scope="module")
def draft_path(model_dir):
    return tiny_models.write_model(model_dir / "ctx-draft.gguf", tiny_models.PAIR_DRAFT)


@pytest.fixture(scope="module")
def kv_target(kv_target_path):
    with pymoe.Model(kv_target_path) as model:
        yield model


@pytest.fixture(scope="module")
def hybrid_target(model_dir):
    path = tiny_models.write_model(model_dir / "ctx-qwen35moe.gguf", tiny_models.ARCHITECTURES["qwen35moe"])
    with pymoe.Model(path) as model:
        yield model


@pytest.fixture(scope="module")
def mtp_target(pair_mtp):
    return pair_mtp  # conftest's qwen35moe with an MTP head


@pytest.fixture(scope="module")
def draft(draft_path):
    with pymoe.Model(draft_path) as model:
        yield model


def loop(target, draft, source, **options):
    """A greedy loop of one of the sources the tests go through."""
    kinds = {"model": dict(draft=draft, draft_max=3), "ngram": dict(draft="ngram"),
             "model+ngram": dict(draft=draft, ngram=True, draft_max=3), "auto": dict(draft=draft, draft_max="auto"),
             "mtp": dict(draft="mtp", draft_max=3)}
    return pymoe.Speculative(target, temperature=0, warm_start=False, **kinds[source], **options, **EXACT)


def fresh_continuation(target, draft, source, kept, n, **options):
    with loop(target, draft, source, **options) as fresh:
        fresh.feed(kept)
        return list(fresh.generate_tokens(None, max_tokens=n))


@pytest.mark.parametrize("source", ["model", "ngram", "model+ngram", "auto"])
def test_a_rewound_loop_goes_on_as_a_fresh_loop_fed_the_kept_tokens(kv_target, draft, source):
    prompt = kv_target.tokenize(PROMPT)
    with loop(kv_target, draft, source) as spec:
        generated = list(spec.generate_tokens(prompt, max_tokens=40))
        seq = spec.tokens
        assert seq == prompt + generated and len(seq) == spec.position
        # inside the output, inside the prompt, the last token, and back to the whole sequence's middle again
        for n_keep in (len(prompt) + 17, len(prompt) - 3, len(prompt) + 1):
            spec.rewind(spec.position - n_keep)
            assert spec.tokens == seq[:n_keep] and spec.position == n_keep
            went_on = list(spec.generate_tokens(None, max_tokens=24))
            assert went_on == fresh_continuation(kv_target, draft, source, seq[:n_keep], 24), n_keep
            assert spec.tokens == seq[:n_keep] + went_on
            seq = spec.tokens
        assert spec.stats.rounds > 0 and spec.rewind_limit == spec.position


@pytest.mark.parametrize("source, target_name", [("model", "hybrid_target"), ("mtp", "mtp_target")])
@pytest.mark.parametrize("rollback", ["snapshot", "checkpoint"])
def test_a_hybrid_target_rewinds_within_its_reach_and_goes_on_exactly(request, draft, source, target_name,
                                                                      rollback):
    target = request.getfixturevalue(target_name)
    prompt = target.tokenize(PROMPT)
    with loop(target, draft, source, rollback=rollback) as spec:
        spec.feed(prompt)
        tried = 0
        for _ in range(12):
            out = spec.step()
            reach = spec.rewind_limit
            assert 0 <= reach < spec.position
            if reach == 0:
                continue
            seq = spec.tokens
            n_keep = spec.position - (1 + tried % reach)  # one token, up to as far as it reaches
            spec.rewind(spec.position - n_keep)
            assert spec.tokens == seq[:n_keep]
            went_on = list(spec.generate_tokens(None, max_tokens=6))
            assert went_on == fresh_continuation(target, draft, source, seq[:n_keep], 6, rollback=rollback)
            tried += 1
            assert out
        assert tried >= 3
        # beyond its reach: refused, and nothing changed
        before = spec.tokens
        too_far = spec.rewind_limit + 1
        with pytest.raises(pymoe.UnsupportedError, match="keeps recurrent state, which can go back"):
            spec.rewind(too_far)
        assert spec.tokens == before
        assert list(spec.generate_tokens(None, max_tokens=4)) == fresh_continuation(target, draft, source, before,
                                                                                     4, rollback=rollback)
        spec.rewind(spec.position)  # all of it: a reset
        assert spec.position == 0 and spec.tokens == []


def test_the_mtp_head_is_rewound_into_the_entries_it_has_evaluated(mtp_target, draft):
    """With checkpoints every drafting round can be taken back whole: the
    cut then falls among the head's evaluated entries, not only its queue."""
    prompt = mtp_target.tokenize(PROMPT)
    with loop(mtp_target, draft, "mtp", rollback="checkpoint") as spec:
        spec.feed(prompt)
        deepest = 0
        for _ in range(10):
            spec.step()
            reach = spec.rewind_limit
            if reach >= 2:
                seq = spec.tokens
                spec.rewind(reach)
                deepest = max(deepest, reach)
                went_on = list(spec.generate_tokens(None, max_tokens=8))
                assert went_on == fresh_continuation(mtp_target, draft, "mtp", seq[:len(seq) - reach], 8,
                                                     rollback="checkpoint")
        assert deepest >= 2 and spec.stats.mtp_tokens > 0


@pytest.fixture(scope="module")
def unrelated_draft(model_dir):
    """A draft whose guesses the target never takes: auto settles on plain rounds."""
    with pymoe.Model(tiny_models.write_model(model_dir / "ctx-dense-draft.gguf", tiny_models.DENSE)) as model:
        yield model


def test_a_draft_auto_has_stopped_using_is_not_fed_until_drafting_resumes(kv_target, unrelated_draft):
    prompt = kv_target.tokenize(PROMPT)
    with unrelated_draft.session(**EXACT) as d:
        spec = pymoe.Speculative(kv_target, d, draft_max="auto", temperature=0, warm_start=False, **EXACT)
        spec.feed(prompt)
        assert d.position == len(prompt) - 1  # a fresh loop's draft takes a feed in at once
        out = list(spec.generate_tokens(None, max_tokens=60))
        assert spec.stats.rounds_by_k.get(0, 0) > 40 and d.position < len(prompt) + 5  # plain rounds leave it behind
        behind = d.position
        spec.rewind(10)
        spec.feed(kv_target.tokenize(" five", add_special=False))
        assert d.position == behind  # a server's next turn does not pay for the draft auto does not use
        kept = prompt + out[:-10] + kv_target.tokenize(" five", add_special=False)
        assert spec.tokens == kept
        more = list(spec.generate_tokens(None, max_tokens=12))
        spec.close()
    with unrelated_draft.session(**EXACT) as d, pymoe.Speculative(kv_target, d, draft_max=2, temperature=0,
                                                                  warm_start=False, **EXACT) as fresh:
        fresh.feed(kept)
        assert d.position == len(kept) - 1  # with a fixed k it is fed at once
        assert list(fresh.generate_tokens(None, max_tokens=12)) == more


def test_rewind_needs_a_count_within_the_sequence(kv_target):
    with loop(kv_target, None, "ngram") as spec:
        spec.feed(kv_target.tokenize(PROMPT))
        n = spec.position
        for bad in (-1, n + 1):
            with pytest.raises(pymoe.InvalidArgumentError, match=f"cannot rewind {bad} tokens: the sequence has {n}"):
                spec.rewind(bad)
        with pytest.raises(pymoe.InvalidArgumentError, match="needs an int"):
            spec.rewind(1.0)
        assert spec.position == n


def test_a_plain_session_is_a_decoder_with_tokens_and_no_drafts(kv_target):
    prompt = kv_target.tokenize(PROMPT)
    with kv_target.session(sampling=pymoe.SamplingParams.greedy(), **EXACT) as s:
        assert s.source is None and s.stats is None and s.tokens == []
        out = list(s.generate_tokens(prompt, max_tokens=10))
        assert s.tokens == prompt + out
        s.rewind(4)
        assert s.tokens == (prompt + out)[:-4]
        state = s.save_state()
        s.reset()
        assert s.tokens == []
        s.load_state(state)
        assert s.tokens == (prompt + out)[:-4]


def test_sessions_a_loop_drives_refuse_outside_changes_until_it_closes(kv_target, draft):
    with kv_target.session(**EXACT) as target, draft.session(**EXACT) as d:
        spec = pymoe.Speculative(target, d, temperature=0, warm_start=False)
        spec.feed(kv_target.tokenize(PROMPT))
        for session in (target, d):
            for call in (lambda: session.feed([5]), lambda: session.rewind(1), session.reset,
                         lambda: session.load_state(b"x" * 200)):
                with pytest.raises(pymoe.InvalidStateError, match="belongs to a speculative loop"):
                    call()
        assert target.tokens == spec.tokens[:-1]  # the newest waits for the next round
        spec.close()
        target.feed([5])
        d.reset()


def test_closing_a_session_closes_the_loop_that_drives_it_first(kv_target, draft):
    target = kv_target.session(**EXACT)
    spec = pymoe.Speculative(target, "ngram", temperature=0, warm_start=False)
    spec.feed(kv_target.tokenize(PROMPT))
    target.close()
    assert spec.closed
    with pytest.raises(pymoe.ClosedError):
        spec.step()
    spec.close()


def test_token_ids_must_be_integers(kv_target, session):
    with loop(kv_target, None, "ngram") as spec:
        for bad in (3.7, [3.7], np.array([1.0, 2.0]), [True], "12"):
            for decoder in (session, spec):
                with pytest.raises(pymoe.InvalidArgumentError, match="token ids must be integers"):
                    decoder.feed(bad) if not isinstance(bad, str) or decoder is session else decoder.feed([bad])
        assert session.position == 0 and spec.position == 0
        session.feed(np.array([1, 2], dtype=np.uint16))
        assert session.tokens == [1, 2]


def test_negative_max_tokens_is_refused(kv_target):
    with loop(kv_target, None, "ngram") as spec:
        spec.feed(kv_target.tokenize(PROMPT))
        with pytest.raises(pymoe.InvalidArgumentError, match="max_tokens must be >= 0"):
            spec.step(-1)
        assert spec.step(0) == [] and spec.stop_reason == "max_tokens"


def test_a_saved_state_loads_only_into_its_own_model_and_cache_types(kv_target, hybrid_target, dense_model):
    with kv_target.session(n_ctx=256) as s:
        s.feed(kv_target.tokenize(PROMPT))
        state = s.save_state()
    with dense_model.session(n_ctx=256) as other:
        other.feed([1, 2, 3])
        with pytest.raises(pymoe.InvalidArgumentError, match="another model .*llama.*parameters"):
            other.load_state(state)
        assert other.tokens == [1, 2, 3]  # untouched
    with kv_target.session(n_ctx=512) as wider:
        with pytest.raises(pymoe.InvalidArgumentError, match="context of 256 tokens, this session's holds 512"):
            wider.load_state(state)
    with kv_target.session(n_ctx=256, cache_type_k="f32", flash_attn="off") as typed:
        with pytest.raises(pymoe.InvalidArgumentError, match="cache types f16/f16, this session has f32/f16"):
            typed.load_state(state)
    with kv_target.session(n_ctx=256) as same:
        same.load_state(state)
        assert same.tokens == kv_target.tokenize(PROMPT)
        damaged = bytearray(state)
        damaged[8 + 32 + 24 + 16] = 0xFF  # a size field: the sizes no longer add up
        with pytest.raises(pymoe.InvalidArgumentError, match="damaged"):
            same.load_state(bytes(damaged))


def test_the_cli_never_asks_which_decoder_it_has():
    """Decoder has tokens, stats and source: code driving one needs no isinstance."""
    pattern = re.compile(r"isinstance\([^)]*,\s*\(?\s*(Speculative|Session|Decoder)\b")
    hits = [f"{p.name}:{i}" for p in sorted((REPO / "pymoe" / "cli").glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


def test_a_round_whose_decode_fails_breaks_the_loop_until_a_reset(tmp_path_factory, kv_target_path, draft_path):
    """Driven from C (tests/c/broken_round.c): the verify batch of a round
    stops; every call but reset is then refused with PYMOE_ESTATE, and after
    a reset the loop generates what a loop that never broke generates."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler (cc) on PATH")
    flags = subprocess.run([sys.executable, "-P", "-m", "pymoe", "--cflags", "--libs"], check=True,
                           capture_output=True, text=True).stdout.split()
    exe = tmp_path_factory.mktemp("broken_round") / "broken_round"
    subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", str(REPO / "tests" / "c" / "broken_round.c"),
                    "-o", str(exe), *flags], check=True)
    r = subprocess.run([str(exe), str(kv_target_path), str(draft_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.startswith("ok "), r.stdout + r.stderr
    assert int(r.stdout.split()[1]) > 0


@pytest.mark.parametrize("source, target_name", [("model", "kv_target"), ("ngram", "kv_target"),
                                                 ("model+ngram", "kv_target"), ("model", "hybrid_target"),
                                                 ("mtp", "mtp_target")])
def test_a_saved_loop_loaded_into_a_new_one_goes_on_as_if_never_stopped(request, draft, source, target_name):
    target = request.getfixturevalue(target_name)
    prompt = target.tokenize(PROMPT)
    with loop(target, draft, source) as spec:
        first = list(spec.generate_tokens(prompt, max_tokens=13))
        state = spec.save_state()
        uninterrupted = list(spec.generate_tokens(None, max_tokens=30))
        with loop(target, draft, source) as other:
            other.load_state(bytes(state))
            assert other.tokens == prompt + first and other.position == len(prompt) + len(first)
            assert list(other.generate_tokens(None, max_tokens=30)) == uninterrupted
            assert other.stats.rounds > 0
        spec.load_state(state)  # back in the same loop, too
        assert list(spec.generate_tokens(None, max_tokens=30)) == uninterrupted


def test_a_loop_refuses_another_loops_state_and_names_why(kv_target, hybrid_target, draft):
    prompt = kv_target.tokenize(PROMPT)
    with loop(kv_target, draft, "model") as spec:
        list(spec.generate_tokens(prompt, max_tokens=5))
        state = spec.save_state()
    with loop(kv_target, None, "ngram") as lookup:
        lookup.feed(prompt[:4])
        with pytest.raises(pymoe.InvalidArgumentError, match="draft sources 1, this one has 2"):
            lookup.load_state(state)
        assert lookup.tokens == prompt[:4]
    with loop(hybrid_target, draft, "model") as other:
        other.feed(prompt[:4])
        with pytest.raises(pymoe.InvalidArgumentError, match="another model"):
            other.load_state(state)
        assert other.tokens == prompt[:4]  # the target refused it before anything changed
        with pytest.raises(pymoe.InvalidArgumentError, match="damaged|bad magic|too short"):
            other.load_state(state[:100])
        with pytest.raises(pymoe.InvalidArgumentError, match="bytes-like"):
            other.load_state("state")
        assert other.tokens == prompt[:4]


def test_an_older_callers_smaller_result_struct_gets_the_fields_it_knows(kv_target):
    """ABI: pymoe_spec_stats and pymoe_load_report start with the caller's
    size of them; the library fills no more than that, and refuses an unset
    size."""
    from pymoe._native import ffi, lib
    with loop(kv_target, None, "ngram") as spec:
        list(spec.generate_tokens(kv_target.tokenize(PROMPT), max_tokens=8))
        st = spec.stats
        # the header of an older build: size, rounds, drafted (24 bytes); then a canary
        old = ffi.new("unsigned char[]", 24 + 16)
        ffi.memmove(old + 24, b"\xab" * 16, 16)
        ffi.cast("uint32_t *", old)[0] = 24
        as_stats = ffi.cast("struct pymoe_spec_stats *", old)
        with spec._call() as ptr:
            assert lib.pymoe_spec_stats(ptr, as_stats) == lib.PYMOE_OK
            assert bytes(ffi.buffer(old + 24, 16)) == b"\xab" * 16
            assert (as_stats.size, as_stats.rounds, as_stats.drafted) == (24, st.rounds, st.drafted)
            ffi.cast("uint32_t *", old)[0] = 0
            assert lib.pymoe_spec_stats(ptr, as_stats) == lib.PYMOE_EINVAL
            assert "set it to sizeof(struct pymoe_spec_stats)" in ffi.string(lib.pymoe_last_error()).decode()
    report = ffi.new("struct pymoe_load_report *")  # size 0
    assert lib.pymoe_model_load_report(kv_target._ptr, report) == lib.PYMOE_EINVAL
    report.size = ffi.sizeof("struct pymoe_load_report") + 64  # a newer header's: told how much this one has
    assert lib.pymoe_model_load_report(kv_target._ptr, report) == lib.PYMOE_OK
    assert report.size == ffi.sizeof("struct pymoe_load_report") and report.load_seconds > 0


def test_params_structs_carry_their_size_so_older_and_newer_callers_keep_their_meaning(kv_target_path, kv_target):
    """ABI: *_default() (a macro over *_init with sizeof the caller's struct)
    sets the size; the library takes the fields a caller's struct has, refuses
    one without a size, and refuses a newer caller's field it does not know
    unless it is 0."""
    from pymoe._native import ffi, lib
    full = ffi.sizeof("struct pymoe_sampling_params")
    logits = ffi.new("float[]", [0.0, 3.0, 1.0])
    out, rng = ffi.new("pymoe_token *"), ffi.new("uint64_t *")

    def sample(buf):
        return lib.pymoe_sample(logits, 3, ffi.cast("struct pymoe_sampling_params *", buf), rng, out)

    newer = ffi.new("unsigned char[]", full + 16)  # a newer header's struct: 16 bytes this library does not know
    lib.pymoe_sampling_params_init(ffi.cast("struct pymoe_sampling_params *", newer), full + 16)
    as_params = ffi.cast("struct pymoe_sampling_params *", newer)
    assert as_params.size == full + 16 and as_params.top_k == 40 and bytes(ffi.buffer(newer + full, 16)) == bytes(16)
    as_params.temperature = 0.0
    assert sample(newer) == lib.PYMOE_OK and out[0] == 1  # greedy: the unknown fields are 0
    newer[full + 3] = 1
    assert sample(newer) == lib.PYMOE_EINVAL
    assert "a field this library does not know is set" in ffi.string(lib.pymoe_last_error()).decode()
    canary = ffi.new("unsigned char[]", b"\xab" * 32)  # init writes no more than the caller's size
    lib.pymoe_sampling_params_init(ffi.cast("struct pymoe_sampling_params *", canary), 8)
    assert bytes(ffi.buffer(canary + 8, 24)) == b"\xab" * 24 and ffi.cast("uint32_t *", canary)[0] == 8
    assert sample(canary) == lib.PYMOE_EINVAL  # 8 bytes: older than any release with a size
    unset = ffi.new("struct pymoe_sampling_params *", {"temperature": 0.0})  # no *_default(): size 0
    assert sample(unset) == lib.PYMOE_EINVAL
    assert "fill it with pymoe_sampling_params_default() first" in ffi.string(lib.pymoe_last_error()).decode()
    model_params, model = ffi.new("struct pymoe_model_params *"), ffi.new("pymoe_model **")
    path = ffi.new("char[]", str(kv_target_path).encode())
    model_params.path = path
    assert lib.pymoe_model_load(model_params, model) == lib.PYMOE_EINVAL and model[0] == ffi.NULL
    assert "pymoe_model_params_default" in ffi.string(lib.pymoe_last_error()).decode()
    with kv_target.session(**EXACT) as target:
        spec_params = ffi.new("struct pymoe_spec_params *")
        spec = ffi.new("pymoe_spec **")
        with target._call() as ptr:
            assert lib.pymoe_spec_create(ptr, ffi.NULL, spec_params, spec) == lib.PYMOE_EINVAL
            lib.pymoe_spec_params_init(spec_params, ffi.sizeof("struct pymoe_spec_params"))
            spec_params.draft_sources = lib.PYMOE_DRAFT_LOOKUP
            assert spec_params.sampling == ffi.NULL  # NULL: the sampling defaults
            assert lib.pymoe_spec_create(ptr, ffi.NULL, spec_params, spec) == lib.PYMOE_OK
            lib.pymoe_spec_free(spec[0])


def test_every_call_into_c_of_a_session_loop_or_model_raises_one_way():
    """NativeObject._c / _run / _status: no method of these objects checks a
    status by hand (each would have to remember Ctrl-C, callback errors, a
    close from another thread and rpc-servers)."""
    by_hand = re.compile(r"\bcheck\(\s*(lib\.pymoe_|rc\b)")
    hits = [f"{name}:{i}" for name in ("session.py", "speculative.py", "model.py")
            for i, line in enumerate((REPO / "pymoe" / name).read_text().splitlines(), 1) if by_hand.search(line)]
    assert hits == [f"speculative.py:{i}" for i, line in enumerate((REPO / "pymoe" / "speculative.py").read_text()
                                                                    .splitlines(), 1)
                    if "check(lib.pymoe_verify" in line]  # the pure verifier: no object


def test_one_loop_drives_a_session(kv_target):
    with kv_target.session(**EXACT) as target:
        with pymoe.Speculative(target, "ngram", temperature=0, warm_start=False):
            with pytest.raises(pymoe.InvalidStateError, match="belongs to another speculative loop"):
                pymoe.Speculative(target, "ngram", temperature=0, warm_start=False)
        with pymoe.Speculative(target, "ngram", temperature=0, warm_start=False) as again:  # free again
            again.feed([1, 2, 3])


def test_an_empty_loops_state_loads_as_an_empty_loop(kv_target, draft):
    with loop(kv_target, draft, "model") as spec:
        empty = spec.save_state()
        spec.feed(kv_target.tokenize(PROMPT))
        spec.load_state(empty)
        assert spec.position == 0 and spec.tokens == []
        assert list(spec.generate_tokens(kv_target.tokenize(PROMPT), max_tokens=6)) == fresh_continuation(
            kv_target, draft, "model", kv_target.tokenize(PROMPT), 6)


def test_a_crafted_mtp_part_is_refused_not_read_past_its_end(mtp_target, draft):
    """The head's part of a saved loop: sizes that do not add up (compared
    without a sum that could wrap), a queue that is not the sequence's end:
    refused, the loop left empty."""
    import struct
    prompt = mtp_target.tokenize(PROMPT)
    with loop(mtp_target, draft, "mtp") as spec:
        list(spec.generate_tokens(prompt, max_tokens=9))
        state = bytearray(spec.save_state())
        # the loop header (40 bytes): magic, sources, n_seq, the target's bytes, each source's
        n_seq = struct.unpack_from("<i", state, 12)[0]
        target_bytes, mtp_bytes = struct.unpack_from("<QQ", state, 16)
        at = 40 + 4 * n_seq + target_bytes  # the MTP head's part: pos, n_tokens, n_rows, n_embd, n_data, ...
        pos, n_tokens, n_rows, n_embd, n_data = struct.unpack_from("<iiiiQ", state, at)
        assert pos + n_tokens == n_seq and n_embd > 0 and len(state) == at + mtp_bytes
        # the whole sequence queued with as many rows as that allows, n_data what the rest of the part would be
        # (modulo 2**64, as a wrapping sum would take it); and an n_data near 2**64
        n_tok, n_row = 4 * n_seq, 4 * (n_seq + 1) * n_embd
        wrapped = bytearray(state)
        struct.pack_into("<iiiiQ", wrapped, at, 0, n_seq, n_seq + 1, n_embd, (mtp_bytes - 24 - n_tok - n_row) % 2**64)
        huge = bytearray(state)
        struct.pack_into("<Q", huge, at + 16, 2**64 - 1)
        queue = bytearray(state)
        if n_tokens:
            struct.pack_into("<i", queue, at + 24, (struct.unpack_from("<i", queue, at + 24)[0] + 1) % 100)
        for bad in (wrapped, huge, queue) if n_tokens else (wrapped, huge):
            with pytest.raises(pymoe.InvalidArgumentError, match="MTP head's part|damaged"):
                spec.load_state(bytes(bad))
            assert spec.position == 0  # left empty, never half loaded
        spec.load_state(state)  # the real one still loads
        assert spec.position == n_seq
