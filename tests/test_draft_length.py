"""The auto draft-length chooser (csrc/draft_length.c, pure C) in simulation:
given true costs and an acceptance rate it must reach nearly the throughput of
the best fixed k, including k = 0 when drafting cannot pay."""
import subprocess

import pytest

import c_program

@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    # the chooser and the random generator only: neither touches llama.cpp
    return c_program.build(tmp_path_factory, "draft_length_sim", "draft_length.c", "draft_length_learned.c", "rng.c")


def run(sim, t_draft, t_verify1, slope, acceptance, k_max=8, rounds=400, seed=1, checkpoint=None, options=()):
    extra = ["--checkpoint"] + [str(x) for x in checkpoint] if checkpoint else []
    out = subprocess.run([str(sim), *extra, *options, str(t_draft), str(t_verify1), str(slope), str(acceptance),
                          str(k_max), str(rounds), str(seed)], capture_output=True, text=True, check=True).stdout.split()
    return float(out[1]), float(out[3]), int(out[5])


# (t_draft, t_verify(1), what a second batch token adds, acceptance), and the
# shape of the verify curve beyond two tokens (draft_length_sim --curve;
# none: linear)
SCENARIOS = {
    "cpu, quantized target: a batch costs n steps": ((0.007, 0.028, 0.026, 0.85), []),
    "gpu-like: batches almost free, good draft": ((0.002, 0.020, 0.001, 0.85), []),
    "moe in ram: batch cost grows with the expert union": ((0.002, 0.030, 0.012, 0.8), []),
    "poor draft": ((0.004, 0.020, 0.002, 0.2), []),
    "draft as slow as the target": ((0.020, 0.020, 0.001, 0.9), []),
    # the GPU run's figures (bench/gpu/RESULTS.md): a 2-token batch 1.28x one token, acceptance 0.84
    "gpu run: experts in ram": ((0.006, 0.025, 0.007, 0.84), []),
    "marginal: drafting barely pays": ((0.004, 0.025, 0.008, 0.6), []),
    # the MTP bench model on this CPU (bench/results/mtp.md): batches of 2, 3, 4
    # cost 1.8, 2.2, 2.6 steps; the head re-evaluates what each round emitted
    # (14% of a step per draft in all), its acceptance falls with depth
    "concave: the mtp bench model's cpu batches": ((0.0025, 0.030, 0.024, 0.88),
                                                   ["--curve", "concave", "0.6", "--refeeds", "--depth-decay", "0.98"]),
    # the union of 8-of-16 experts: batches of 2, 4, 8 read 1.5, 1.9, 2.0x one token's experts
    "concave: a few experts, the union saturates": ((0.002, 0.025, 0.012, 0.75), ["--curve", "experts", "16", "8"]),
    # 8 of 128 experts, a cache serving 60% of them: a batch pays its union's misses
    "expert cache: a batch pays its union's misses": ((0.002, 0.018, 0.005, 0.8),
                                                      ["--curve", "experts", "128", "8"]),
    # a draft that is right across copied text (60 tokens on average) and seldom elsewhere
    "lookup-like: long exact runs, then nothing": ((0.001, 0.020, 0.002, 0.0), ["--copies", "0.97", "0.1", "60"]),
}

# what the cost model does not know (draft_length_sim options)
REGIMES = {
    "as modelled": [],
    "a hidden cost, 15% of a step, per drafting round": ["--hidden", "0.15"],
    "timing jitter of +-30% per round": ["--jitter", "0.3"],
    "bursty acceptance": ["--bursty"],
    "batches and draft 4x dearer halfway": ["--shift", "4"],
    "batches and draft 4x cheaper halfway": ["--shift", "0.25"],
    "checkpoints of 3 ms": ["--checkpoint", "0.003", "0.003"],
}
BAR = 0.97  # auto against the best fixed k (k = 0 included), same seeds and rounds
# runs (seeds) per cell, by rounds per run: single 400-round runs of one cell
# ranged from 0.88 to 1.19 of the best fixed k, so six of them could not
# tell apart rules a few percent apart
REPEATS = {40: 200, 400: 40}

# Cells that miss the bar, with what the worst regime reaches
# (bench/results/draft_length.md says why): in 40 rounds, learning what a
# round costs and how often drafts are accepted is itself a cost the best
# fixed k (chosen in hindsight) never pays; at 400 rounds, only regimes the
# cost model does not know miss it (timing jitter of 30%, a hidden cost, a
# shift, checkpoints, bursts): probes that lose spend the probe budget, and
# exploration waits for it.
BELOW_BAR = {
    (40, "cpu, quantized target: a batch costs n steps"): 0.965,
    (40, "gpu-like: batches almost free, good draft"): 0.93,
    (40, "moe in ram: batch cost grows with the expert union"): 0.93,
    (40, "poor draft"): 0.94,
    (40, "gpu run: experts in ram"): 0.94,
    (40, "marginal: drafting barely pays"): 0.925,
    (40, "concave: the mtp bench model's cpu batches"): 0.875,
    (40, "concave: a few experts, the union saturates"): 0.89,
    (40, "expert cache: a batch pays its union's misses"): 0.94,
    (400, "moe in ram: batch cost grows with the expert union"): 0.96,
    (400, "concave: the mtp bench model's cpu batches"): 0.955,
    (400, "concave: a few experts, the union saturates"): 0.93,
    (400, "expert cache: a batch pays its union's misses"): 0.95,
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_curve_as_modelled_meets_the_bar_at_400_rounds(sim, name):
    """Linear, concave, cache-shaped and lookup-like curves alike: what
    BELOW_BAR allows at 400 rounds is for the regimes only."""
    costs, curve = SCENARIOS[name]
    achieved, best, best_k = run(sim, *costs, rounds=400, seed=1, options=curve + ["--repeats", str(REPEATS[400])])
    assert achieved >= BAR * best, (achieved / best, best_k)


@pytest.mark.parametrize("rounds,repeats", REPEATS.items())
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("name", SCENARIOS)
def test_auto_reaches_the_best_fixed_draft_length(sim, name, regime, rounds, repeats):
    costs, curve = SCENARIOS[name]
    achieved, best, best_k = run(sim, *costs, rounds=rounds, seed=1,
                                 options=curve + REGIMES[regime] + ["--repeats", str(repeats)])
    floor = BELOW_BAR.get((rounds, name), BAR)
    assert achieved >= floor * best, (achieved / best, best_k)


@pytest.mark.parametrize("hidden", ["0.5", "1.0"])
@pytest.mark.parametrize("rounds,repeats", REPEATS.items())
def test_a_cost_the_model_misses_never_makes_auto_lose_to_plain(sim, hidden, rounds, repeats):
    """The GPU run's failure: the components predict a gain, a cost no
    component names turns it into a loss. Whole rounds show it."""
    achieved, best, best_k = run(sim, *SCENARIOS["gpu run: experts in ram"][0], rounds=rounds, seed=1,
                                 options=["--hidden", hidden, "--repeats", str(repeats)])
    assert best_k == 0
    assert achieved >= BAR * best


def test_the_bar_is_missed_only_where_written(sim):
    """BELOW_BAR lists no cell that now meets the bar everywhere: a better
    chooser must tighten it."""
    for (rounds, name), floor in BELOW_BAR.items():
        costs, curve = SCENARIOS[name]
        ratios = [run(sim, *costs, rounds=rounds, seed=1, options=curve + opts + ["--repeats", str(REPEATS[rounds])])
                  for opts in REGIMES.values()]
        assert min(a / b for a, b, _ in ratios) < BAR, (rounds, name)


def test_auto_finds_long_drafts_where_only_they_pay(sim):
    """A batch's first extra token costs 1.25 steps, each further one far
    less (an MTP head's refed drafts): k = 1 and 2 cannot pay even if every
    draft were accepted, k = 8 gains about 25%. Exploring only one batch size
    past those measured never found that (0.81 of the best fixed k); a leap
    to the nearest draft length that could win, paid from the run's probe
    share, finds it within the run."""
    options = ["--curve", "concave", "0.3", "--refeeds", "--repeats", str(REPEATS[400])]
    achieved, best, best_k = run(sim, 0.0025, 0.024, 0.03, 0.88, rounds=400, options=options)
    assert best_k == 8
    assert achieved >= 0.92 * best


def test_a_catch_ups_tests_count_for_the_first_draft_depth(tmp_path_factory):
    """An MTP head's catch-up after plain rounds tests first drafts for free;
    the model reads the first draft's acceptance from depth 1, so they must
    reach it: two rejected first drafts, then 32 passed tests, left depth 1 at
    0.62 while the pooled rate said 0.92 (traced on the MTP bench model: 0.69
    against 0.78-0.86, and auto stayed plain)."""
    exe = c_program.build(tmp_path_factory, "draft_length_depth", "draft_length.c", "draft_length_learned.c")

    def believed(tests):
        f = subprocess.run([str(exe), str(tests)], capture_output=True, text=True, check=True).stdout.split()
        return float(f[1]), float(f[3])

    pooled, depth1 = believed(0)
    assert depth1 < 0.3 and pooled < 0.3  # both rejections count
    pooled, depth1 = believed(32)
    assert pooled > 0.85
    assert depth1 > 0.9


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
    achieved, best, best_k = run(sim, *SCENARIOS[base][0], seed=seed, rounds=600, checkpoint=(save, restore))
    assert achieved >= 0.93 * best, (name, achieved, best, best_k)


def test_checkpoints_that_cost_more_than_drafting_gains_mean_plain_decoding(sim):
    achieved, best, best_k = run(sim, 0.002, 0.020, 0.001, 0.85, rounds=600, checkpoint=(0.1, 0.1))
    assert best_k == 0
    assert achieved >= 0.95 * best
