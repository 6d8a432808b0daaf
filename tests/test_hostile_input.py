"""Hostile input to the commands: bytes that are not UTF-8, binary and endless
files, output that cannot be written, out-of-range knobs. Each ends in one
line on stderr and exit code 2 (a closed pipe: silently, 141), never a
traceback, and before any long work."""
import os
import subprocess
import sys
import time

import pytest

from conftest import stderr_lines


def pymoe(*args, stdout=subprocess.PIPE):
    return subprocess.run([sys.executable.encode(), b"-P", b"-m", b"pymoe",
                           *(a if isinstance(a, bytes) else str(a).encode() for a in args)],
                          stdout=stdout, stderr=subprocess.PIPE, timeout=120)


def one_line_exit_2(r, *words):
    err = r.stderr.decode("utf-8", "replace")
    lines = stderr_lines(err)
    assert r.returncode == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_a_prompt_that_is_not_utf8(dense_path):
    one_line_exit_2(pymoe("generate", "-m", dense_path, "-p", b"caf\xe9 \xff", "-n", 2), "not valid UTF-8",
                    "byte 0xe9")


def test_a_binary_prompt_file(dense_path, tmp_path):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    one_line_exit_2(pymoe("generate", "-m", dense_path, "-f", binary, "-n", 2), "not UTF-8 text", "byte 0x80",
                    "offset 128")


def test_an_endless_prompt_file_is_refused_quickly(dense_path):
    t0 = time.monotonic()
    one_line_exit_2(pymoe("generate", "-m", dense_path, "-f", "/dev/zero", "-n", 2), "larger than 64 MiB")
    assert time.monotonic() - t0 < 30


def test_a_prompt_file_that_cannot_be_read(dense_path, tmp_path):
    one_line_exit_2(pymoe("generate", "-m", dense_path, "-f", tmp_path, "-n", 2), "cannot read the prompt file")


def test_output_to_a_full_device(dense_path):
    with open("/dev/full", "w") as full:
        r = pymoe("generate", "-m", dense_path, "-p", "Once upon a time", "-n", 16, "--ctx", 256, stdout=full)
    one_line_exit_2(r, "cannot write the output", "No space left on device")


def test_output_to_a_closed_pipe_ends_silently(dense_path):
    child = subprocess.Popen([sys.executable, "-P", "-m", "pymoe", "generate", "-m", str(dense_path), "-p", "Once",
                              "-n", "400", "--ctx", "512", "--temp", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.read(1)
    child.stdout.close()  # `| head -c 1`
    err = child.stderr.read().decode()
    child.wait(60)
    assert child.returncode == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err


def test_stdout_closed_from_the_start(dense_path):
    r = subprocess.run([sys.executable, "-P", "-m", "pymoe", "generate", "-m", str(dense_path), "-p", "Once", "-n",
                        "2"], stderr=subprocess.PIPE, timeout=60, preexec_fn=lambda: os.close(1))
    one_line_exit_2(r, "standard output is closed")


def test_bench_out_that_cannot_be_written_is_refused_before_the_benchmark(dense_path, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    t0 = time.monotonic()
    line = one_line_exit_2(pymoe("bench", "-m", dense_path, "--draft-max", "0", "--out", blocker / "sub", "-n", 1,
                                 "--repeat", 1), "cannot write to --out")
    assert "Not a directory" in line
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("flag,value", [("--threads", 100000), ("--threads", 513), ("--threads", -1),
                                        ("--ctx", 0), ("--batch", 0), ("--top-p", 0), ("--min-p", 2),
                                        ("--draft-max", 999), ("--ngram-max", 10**9)])
def test_knobs_out_of_range(dense_path, flag, value):
    one_line_exit_2(pymoe("generate", "-m", dense_path, "-p", "x", flag, value), "outside")


def test_the_largest_thread_count_is_accepted(dense_path):
    r = pymoe("generate", "-m", dense_path, "-p", "x", "-n", 1, "--ctx", 256, "--threads", 512)
    assert r.returncode == 0, r.stderr.decode()


def test_llama_cpp_s_cause_reaches_the_command_line(tmp_path, dense_path):
    from test_untrusted_gguf import STRING, Value, edited
    path = edited(dense_path, tmp_path / "m.gguf",
                  lambda g: g.set(b"general.architecture", Value(STRING, b"nosucharch")))
    one_line_exit_2(pymoe("generate", "-m", path, "-p", "x", "--load", "no-mmap"),
                    "unknown model architecture: 'nosucharch'")


def test_an_endless_chat_line_is_refused(tmp_path):
    import tiny_models
    model = tiny_models.write_model(tmp_path / "chat.gguf", tiny_models.DENSE, chat_template=tiny_models.CHATML)
    with open("/dev/zero", "rb") as zero:
        r = subprocess.run([sys.executable, "-P", "-m", "pymoe", "chat", "-m", str(model), "--ctx", "256"],
                           stdin=zero, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    err = r.stderr.decode()
    assert r.returncode == 2 and "longer than 64 MiB" in err and "Traceback" not in err, err
