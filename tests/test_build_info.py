"""What a build can run on, and a GPU build started where no GPU is usable:
it says so once, in one line, and runs on the CPU (make cuda-check runs these
with a CUDA build on a machine without a GPU)."""
import subprocess
import sys

import pytest

import pymoe


def test_build_info_names_the_backends():
    info = pymoe.build_info()
    assert info.startswith("backends:") and "CPU" in info and "devices:" in info


def test_version_prints_versions_and_backends():
    r = subprocess.run([sys.executable, "-P", "-m", "pymoe", "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    first, second = r.stdout.strip().splitlines()
    assert first == f"pymoe {pymoe.__version__} (llama.cpp {pymoe.llama_version()})"
    assert second == pymoe.build_info()


GPU_BUILD_WITHOUT_GPU = "no usable GPU" in pymoe.build_info()


@pytest.mark.skipif(not GPU_BUILD_WITHOUT_GPU, reason="not a GPU build on a machine without a usable GPU")
def test_gpu_build_without_gpu_says_so_once_and_runs_on_the_cpu(dense_path):
    code = (f"import pymoe\n"
            f"for _ in range(2):\n"
            f"    pymoe.memory_plan({str(dense_path)!r})\n"
            f"    with pymoe.Model({str(dense_path)!r}) as m:\n"
            f"        print(m.load_report.bytes_by_device)\n")
    r = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if "no usable GPU" in line]
    assert len(lines) == 1 and "running on the CPU" in lines[0]
    assert r.stdout.strip().splitlines()[-1].startswith("{'CPU': ")


@pytest.mark.skipif(not GPU_BUILD_WITHOUT_GPU, reason="not a GPU build on a machine without a usable GPU")
def test_plan_auto_without_gpu_plans_for_the_cpu(dense_path):
    r = subprocess.run([sys.executable, "-P", "-m", "pymoe", "plan", "-m", str(dense_path), "--vram", "auto"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "no GPU found: planning for the CPU only" in r.stdout
    assert r.stderr.count("no usable GPU") == 1 and len(r.stderr.strip().splitlines()) == 1
