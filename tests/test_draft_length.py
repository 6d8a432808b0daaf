"""The auto draft-length chooser (csrc/draft_length.c, pure C) in simulation:
given true costs and an acceptance rate it must reach nearly the throughput of
the best fixed k, including k = 0 when drafting cannot pay."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler (cc) on PATH")
    exe = tmp_path_factory.mktemp("sim") / "draft_length_sim"
    # the chooser and the random generator only: neither touches llama.cpp
    subprocess.run([cc, "-std=c11", "-O2", "-Wall", "-Werror", "-I", str(REPO / "csrc"),
                    str(REPO / "tests" / "c" / "draft_length_sim.c"), str(REPO / "csrc" / "draft_length.c"),
                    str(REPO / "csrc" / "rng.c"), "-o", str(exe), "-lm"], check=True)
    return exe


def run(sim, t_draft, t_verify1, slope, acceptance, k_max=8, rounds=400, seed=1, checkpoint=None):
    extra = [str(x) for x in checkpoint] if checkpoint else []
    out = subprocess.run([str(sim), str(t_draft), str(t_verify1), str(slope), str(acceptance), str(k_max),
                          str(rounds), str(seed)] + extra, capture_output=True, text=True, check=True).stdout.split()
    return float(out[1]), float(out[3]), int(out[5])


# (t_draft, t_verify(1), slope of t_verify per extra token, acceptance)
SCENARIOS = {
    "cpu, quantized target: a batch costs n steps": (0.007, 0.028, 0.026, 0.85),
    "gpu-like: batches almost free, good draft": (0.002, 0.020, 0.001, 0.85),
    "moe in ram: batch cost grows with the expert union": (0.002, 0.030, 0.012, 0.8),
    "poor draft": (0.004, 0.020, 0.002, 0.2),
    "draft as slow as the target": (0.020, 0.020, 0.001, 0.9),
}


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_auto_reaches_the_best_fixed_draft_length(sim, name, seed):
    achieved, best, best_k = run(sim, *SCENARIOS[name], seed=seed)
    # the simulated clock has +-5% noise; warm-up and exploration cost a little
    assert achieved >= 0.95 * best, (name, achieved, best, best_k)


def test_auto_never_drafts_when_drafting_cannot_pay(sim):
    achieved, best, best_k = run(sim, 0.007, 0.028, 0.028, 0.99, rounds=1000)
    assert best_k == 0
    assert achieved >= 0.98 * best


# recurrent targets without snapshots: (scenario, save seconds, restore seconds)
CHECKPOINT_SCENARIOS = {
    "cheap checkpoints, good draft": ("gpu-like: batches almost free, good draft", 0.0005, 0.0005),
    "checkpoints as dear as a verify": ("gpu-like: batches almost free, good draft", 0.02, 0.02),
    "moe in ram, moderate checkpoints": ("moe in ram: batch cost grows with the expert union", 0.005, 0.005),
}


@pytest.mark.parametrize("name", CHECKPOINT_SCENARIOS)
@pytest.mark.parametrize("seed", [1, 2])
def test_auto_counts_the_cost_of_checkpoints(sim, name, seed):
    base, save, restore = CHECKPOINT_SCENARIOS[name]
    achieved, best, best_k = run(sim, *SCENARIOS[base], seed=seed, rounds=600, checkpoint=(save, restore))
    assert achieved >= 0.93 * best, (name, achieved, best, best_k)


def test_checkpoints_that_cost_more_than_drafting_gains_mean_plain_decoding(sim):
    achieved, best, best_k = run(sim, 0.002, 0.020, 0.001, 0.85, rounds=600, checkpoint=(0.1, 0.1))
    assert best_k == 0
    assert achieved >= 0.95 * best
