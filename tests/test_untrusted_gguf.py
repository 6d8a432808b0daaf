"""A GGUF file is untrusted input: each malformed file the fuzzer (tests/fuzz/)
found, or the issue that started it listed, is a typed error here, through
plan(), memory_plan(), Model() and upcycle(), and the seeded fuzz cases run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

import pymoe
from pymoe.upcycle import upcycle

FUZZ = Path(__file__).resolve().parent / "fuzz"
sys.path.insert(0, str(FUZZ))
import gguf_codec  # noqa: E402
from gguf_codec import ARRAY, I32, STRING, U32, Value  # noqa: E402


def edited(src: Path, dst: Path, edit) -> Path:
    g = gguf_codec.parse(src.read_bytes())
    edit(g)
    dst.write_bytes(gguf_codec.write(g)[0])
    return dst


def every_reader(path: Path, match: str, error=pymoe.ModelFormatError, named: Path = None) -> None:
    """plan, memory_plan and Model all refuse path with `error` matching `match`, naming `named` (path)."""
    for read in (lambda: pymoe.plan(path, vram="64MiB", ram="1GiB", ctx=256),
                 lambda: pymoe.memory_plan(path, load_mode="no-mmap"),
                 lambda: pymoe.Model(path),  # auto: its dry run is a llama.cpp load too
                 lambda: pymoe.Model(path, load_mode="no-mmap")):
        with pytest.raises(error, match=match) as info:
            read()
        assert str(named or path) in str(info.value)


@pytest.mark.parametrize("value", [0, 513, 65536, 2**31 - 1, 2**32 - 1])
def test_block_count_outside_what_llama_cpp_loads(tmp_path, llama_moe_path, value):
    # llama.cpp asserts on 0 and > 512; 65,536 made plan() search for minutes, 2^31 grew RSS past 6 GB
    path = edited(llama_moe_path, tmp_path / "m.gguf", lambda g: g.set(b"llama.block_count", Value(U32, value)))
    every_reader(path, r"llama\.block_count = \d+ is outside \[1, 512\]")


@pytest.mark.parametrize("key, value, says", [
    (b"llama.expert_count", 1025, r"expert_count = 1025 is outside \[0, 1024\]"),
    (b"llama.expert_used_count", 5, r"expert_used_count \(5\) must be in \[1, llama.expert_count = 4\]"),
    (b"llama.expert_used_count", 0, r"expert_used_count \(0\) must be in \[1"),
    (b"llama.expert_group_count", 4, r"expert_group_count = 4 is outside \[0, 3\]"),
])
def test_expert_counts_llama_cpp_asserts_on(tmp_path, llama_moe_path, key, value, says):
    path = edited(llama_moe_path, tmp_path / "m.gguf", lambda g: g.set(key, Value(U32, value)))
    every_reader(path, says)


def test_a_dense_model_that_names_experts_used(tmp_path, dense_path):
    path = edited(dense_path, tmp_path / "m.gguf", lambda g: g.set(b"llama.expert_used_count", Value(U32, 2)))
    every_reader(path, r"\(0 for a dense model\)")


def test_an_architecture_that_is_not_a_string(tmp_path, dense_path):
    # memory.c read it unchecked: a u32 there aborted the process in gguf_get_val_str
    path = edited(dense_path, tmp_path / "m.gguf", lambda g: g.set(b"general.architecture", Value(U32, 7)))
    every_reader(path, "general.architecture is a u32, not a string")


def test_an_unknown_rope_scaling_type(tmp_path, dense_path):
    path = edited(dense_path, tmp_path / "m.gguf",
                  lambda g: g.set(b"llama.rope.scaling.type", Value(STRING, b"cubic")))
    every_reader(path, "rope.scaling.type is not one of none, linear, yarn, longrope")


def test_tensor_data_past_the_end_of_the_file(tmp_path, dense_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(dense_path.read_bytes()[:-100])
    every_reader(path, r"is truncated: tensor '.*' ends at byte \d+ of a \d+-byte file")


def test_split_parts_that_do_not_belong_together(tmp_path):
    import tiny_models
    first = tiny_models.write_model(tmp_path / "a.gguf", tiny_models.LLAMA_MOE, split_max_tensors=12)
    second = sorted(tmp_path.glob("a-*-of-*.gguf"))[1]
    second.write_bytes(first.read_bytes())  # part 1 where part 2 belongs
    every_reader(first, r"metadata split.no = 0 is outside \[1, 1\]", named=second)
    edited(first, second, lambda g: setattr(g, "kv", [(k, v) for k, v in g.kv if not k.startswith(b"split.")]))
    every_reader(first, r"is not part 2 of 2 of .* \(it has no split.no or split.count\)")


def test_split_tensor_count_that_disagrees_with_the_parts(tmp_path):
    import tiny_models
    first = tiny_models.write_model(tmp_path / "a.gguf", tiny_models.LLAMA_MOE, split_max_tensors=12)
    edited(first, first, lambda g: g.set(b"split.tensors.count", Value(gguf_codec.U16, 5)))
    every_reader(first, r"the split model's parts hold \d+ tensors, split.tensors.count says 5")


@pytest.mark.parametrize("name", ["output_norm.weight", "blk.0.attn_norm.weight"])
def test_a_quantized_norm(tmp_path, dense_path, name):
    # it loaded, then aborted the process at the first feed (ggml's CPU add/mul take F32 weights only)
    import gguf
    import numpy as np
    from gguf.quants import quantize
    reader = gguf.GGUFReader(dense_path)
    path = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        data = np.asarray(t.data)
        if t.name == name:
            writer.add_tensor(t.name, quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    every_reader(path, f"tensor {name} is stored as q8_0; llama.cpp computes with it element by element")


def test_a_vocabulary_of_type_none(tmp_path, dense_path):
    # llama.cpp loads it, then asserts in every text call (pymoe's vocabulary fingerprint was the first)
    def no_vocabulary(g):  # the model's own vocab_size keeps its tensors' shapes right
        g.set(b"tokenizer.ggml.model", Value(STRING, b"none"))
        g.set(b"llama.vocab_size", Value(U32, 32000))
    path = edited(dense_path, tmp_path / "m.gguf", no_vocabulary)
    with pytest.raises(pymoe.UnsupportedError, match="has no tokenizer"):
        pymoe.Model(path, load_mode="no-mmap")


def test_a_vocabulary_with_a_repeated_token(tmp_path, dense_path):
    # llama.cpp's vocabulary loader asserts that token texts are unique: the guard makes it a typed error
    def repeat(g):
        tokens = g.get(b"tokenizer.ggml.tokens")
        g.set(b"tokenizer.ggml.tokens", Value(ARRAY, [tokens.value[300]] + tokens.value[1:], STRING))
    path = edited(dense_path, tmp_path / "m.gguf", repeat)
    for mode in ("auto", "no-mmap"):  # auto loads twice: its dry run first
        with pytest.raises(pymoe.ModelFormatError, match=r"GGML_ASSERT\(id_to_token.size\(\) == token_to_id.size"):
            pymoe.Model(path, load_mode=mode)
    with pymoe.Model(dense_path) as model:  # the process goes on, and loads the next model
        assert model.tokenize("hello")


def test_a_wordpiece_tokenizer_over_a_sentencepiece_vocabulary(tmp_path, dense_path):
    # llama.cpp aborts (GGML_ABORT in token_to_byte) while it caches the token pieces during the load
    path = edited(dense_path, tmp_path / "m.gguf", lambda g: g.set(b"tokenizer.ggml.model", Value(STRING, b"bert")))
    with pytest.raises(pymoe.ModelFormatError, match=r"llama-vocab.cpp:\d+: fatal error"):
        pymoe.Model(path)


def test_llama_cpp_s_cause_is_in_the_message(tmp_path, dense_path):
    path = edited(dense_path, tmp_path / "m.gguf",
                  lambda g: g.set(b"general.architecture", Value(STRING, b"nosucharch")))
    with pytest.raises(pymoe.ModelFormatError, match="unknown model architecture: 'nosucharch'"):
        pymoe.Model(path, load_mode="no-mmap")


def test_upcycle_checks_its_input_with_the_same_reader(tmp_path, dense_path):
    truncated = tmp_path / "t.gguf"
    truncated.write_bytes(dense_path.read_bytes()[:5000])  # the gguf package raised IndexError here
    with pytest.raises(pymoe.ModelFormatError, match="t.gguf"):
        upcycle(truncated, tmp_path / "out.gguf")
    not_utf8 = edited(dense_path, tmp_path / "u.gguf", lambda g: g.set(b"general.name", Value(STRING, b"\xff\xfe")))
    with pytest.raises(pymoe.ModelFormatError, match="metadata general.name cannot be copied"):
        upcycle(not_utf8, tmp_path / "out.gguf")
    assert not list(tmp_path.glob("out.gguf*"))


def test_place_tensors_bounds_its_layer_count():
    # n_layers + 1 overflowed an int32 in placement.c (UBSan)
    with pytest.raises(pymoe.InvalidArgumentError, match="n_layers 2147483647 of at most 512"):
        pymoe.place_tensors([("blk.0.attn_q.weight", 1)], n_layers=2**31 - 1)
    with pytest.raises(pymoe.InvalidArgumentError, match="device_split needs one weight per device"):
        pymoe.place_tensors([("blk.0.attn_q.weight", 1)], n_layers=1, devices=["A", "B", "C", "D"],
                            device_split=[1.0])


@pytest.mark.parametrize("cache_type", ["i32", "i8", "i16", "i64", "f64"])
def test_cache_types_attention_cannot_run_are_refused(dense_model, cache_type):
    # i32 was accepted and crashed at the first feed (a NULL kernel in flash attention)
    with pytest.raises(pymoe.InvalidArgumentError, match=f"unknown KV cache type '{cache_type}'"):
        dense_model.session(n_ctx=64, cache_type_k=cache_type)


def test_seeded_fuzz_cases(tmp_path):
    """300 mutated models, each through plan, memory_plan, Model + session and upcycle in a process of its own:
    every outcome is a load or a typed error, and both happen for every target."""
    summary = tmp_path / "summary.json"
    # --hang 30: a hang is a target that never ends; a busy CI machine makes a legitimate upcycle take 10 s
    run = subprocess.run([sys.executable, "-P", str(FUZZ / "fuzz.py"), "--cases", "300", "--seed", "19", "--hang", "30",
                          "--jobs", "2", "--out", str(tmp_path / "fuzz"), "--json", str(summary)],
                         capture_output=True, text=True, timeout=1200)
    assert summary.exists(), run.stderr[-3000:]
    result = json.loads(summary.read_text())
    counts = result["counts"]
    assert counts["crash"] == counts["hang"] == counts["other"] == 0, json.dumps(result["findings"])[:6000]
    assert counts["typed"] + counts["loaded"] == 300 and run.returncode == 0
    for target, outcomes in result["per_target"].items():
        assert outcomes["loaded"] > 0 and outcomes["typed"] > 0, (target, outcomes)


def test_seeded_coverage_guided_run_of_the_c_reader(tmp_path):
    """The C reader alone, built with ASan and UBSan and coverage hooks: 300 executions from the seeds, no
    sanitizer report, no abort, no hang, and the corpus grew (the coverage feedback works)."""
    summary = tmp_path / "summary.json"
    run = subprocess.run([sys.executable, "-P", str(FUZZ / "cover.py"), "--execs", "300", "--seed", "19", "--hang",
                          "30", "--out", str(tmp_path / "fuzz"), "--json", str(summary)],
                         capture_output=True, text=True, timeout=1200)
    assert summary.exists(), run.stderr[-3000:]
    result = json.loads(summary.read_text())
    assert result["counts"]["crash"] == result["counts"]["hang"] == 0, json.dumps(result["findings"])[:6000]
    assert result["counts"]["ok"] > 0 and result["counts"]["typed"] > 0 and run.returncode == 0
    assert result["corpus"] > 5 and result["edges"] > 1000, result
