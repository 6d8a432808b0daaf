"""`pymoe bench` as a subprocess: settings side by side, medians, the verify
cost curve, and the files it writes."""
import json
import subprocess
import sys

from conftest import stderr_lines


def bench(*args):
    return subprocess.run([sys.executable, "-P", "-m", "pymoe", "bench", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_bench_compares_settings_and_writes_its_files(llama_moe_path, dense_path, tmp_path):
    out = tmp_path / "b"
    r = bench("-m", llama_moe_path, "-d", dense_path, "--draft-max", "0,2,auto", "--repeat", 2, "-n", 8,
              "--ctx", 256, "--threads", 2, "--out", out)
    assert r.returncode == 0, r.stderr
    result = json.loads((out / "bench.json").read_text())
    by_k = {s["draft_max"]: s for s in result["settings"]}
    assert list(by_k) == [0, 2, "auto"]
    assert all(len(s["runs"]) == 2 * 3 and s["median_tokens_per_s"] > 0 for s in by_k.values())
    assert by_k[0]["median_ratio_to_plain"] == 1.0 and by_k[0]["acceptance"] is None
    assert 0 <= by_k[2]["acceptance"] <= 1
    assert sorted(map(int, result["verify_seconds"])) == list(range(1, 10))
    assert (out / "bench.md").read_text() == r.stdout and "| 0 (plain) |" in r.stdout
    routing = result["routing"]  # a MoE target: its router's choices on the first prompt and its continuation
    assert routing["n_used"] == 2 and routing["distinct_experts_per_layer"]["1"] == 2
    assert "| distinct experts per layer |" in r.stdout
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_settings_are_one_line_and_exit_2(llama_moe_path, tmp_path):
    for args, message in ((["--draft-max", "0,x"], "--draft-max"), (["--draft-max", "0,2"], "need a draft (-d"),
                          (["--draft-max", "0", "--prompts", tmp_path / "none.txt"], "cannot read --prompts")):
        r = bench("-m", llama_moe_path, "--ctx", 256, "--out", tmp_path / "b", *args)
        lines = stderr_lines(r.stderr)
        assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr
