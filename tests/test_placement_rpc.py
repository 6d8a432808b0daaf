"""Placement acting on a real second device: a local rpc-server. The bytes the
pre-check predicts per device are compared with what llama.cpp allocated
(its per-buffer log lines) and with the rpc-server's growth in resident
memory; greedy output must not depend on the placement (F32 models)."""
import time

import pytest

import pymoe
import pymoe.rpc
import tiny_models
from conftest import SANITIZED

GREEDY = dict(n_ctx=128, n_threads=2, flash_attn="off", cache_type_k="f32", cache_type_v="f32",
              sampling=pymoe.SamplingParams.greedy())


@pytest.fixture(scope="module")
def rpc():
    with pymoe.rpc.LocalRpcServer() as server:
        yield server


@pytest.fixture(scope="module", params=["llama", "qwen3moe"])
def moe_path(request, model_dir):
    shape = tiny_models.PLACEMENT_MOE if request.param == "llama" else tiny_models.PLACEMENT_QWEN3MOE
    return tiny_models.write_model(model_dir / f"placement-{request.param}.gguf", shape)


def settled_rss(rpc):
    """The server's resident bytes once it has stopped changing: the client
    sends tensors and frees asynchronously."""
    last, stable_since = rpc.resident_bytes(), time.monotonic()
    deadline = time.monotonic() + 10
    while time.monotonic() - stable_since < 0.3 and time.monotonic() < deadline:
        time.sleep(0.05)
        now = rpc.resident_bytes()
        if now != last:
            last, stable_since = now, time.monotonic()
    return last


def within(predicted, actual, tol=0.10):
    return abs(predicted - actual) <= tol * max(actual, 1) + 64 * 1024


def greedy_tokens(model, n=12):
    with model.session(**GREEDY) as s:
        return [t.id for t in s.generate(model.tokenize("Once upon a time"), max_tokens=n)]


PLACEMENTS = [dict(n_gpu_layers=0), dict(), dict(n_gpu_layers=2), dict(n_cpu_moe=1), dict(n_cpu_moe=3),
              dict(overrides=["exps=CPU"]), dict(overrides={r"blk\.[13]\.ffn_up": "CPU"})]


@pytest.mark.parametrize("placement", PLACEMENTS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()) or "all")
def test_predicted_bytes_match_what_is_allocated(moe_path, placement):
    # a fresh server: frees of an earlier model reach a server asynchronously
    with pymoe.rpc.LocalRpcServer() as rpc:
        check_prediction(rpc, moe_path, placement)


def check_prediction(rpc, moe_path, placement):
    plan = pymoe.memory_plan(moe_path, rpc_servers=[rpc.endpoint], **placement)
    rpc_name = plan.placement.devices[1]
    assert rpc_name.startswith("RPC")
    rss_before = settled_rss(rpc)
    with pymoe.Model(moe_path, rpc_servers=[rpc.endpoint], **placement) as model:
        rss_growth = settled_rss(rpc) - rss_before
        actual = model.load_report.bytes_by_device
        predicted = plan.bytes_by_device
        assert model.load_report.plan.bytes_by_device == predicted
        for dev in ("CPU", rpc_name):
            assert within(predicted[dev], actual.get(dev, 0)), (dev, predicted, actual)
        if not SANITIZED:  # under ASan a server's RSS also holds shadow memory and redzones (about 2x)
            assert within(predicted[rpc_name], rss_growth), (predicted, rss_growth)


def test_experts_of_the_first_layers_move_to_the_cpu_and_nothing_else(rpc, moe_path):
    def load(n):
        with pymoe.Model(moe_path, rpc_servers=[rpc.endpoint], n_cpu_moe=n) as m:
            return m.load_report.bytes_by_device, m.load_report.plan.placement
    base, base_plan = load(0)
    assert base_plan.expert_bytes[0] == 0
    per_layer = base_plan.expert_bytes[1] // tiny_models.PLACEMENT_MOE.n_layers
    for n in (1, 2):
        moved, plan = load(n)
        rpc_name = plan.devices[1]
        assert plan.expert_bytes == (n * per_layer, (4 - n) * per_layer)
        # the CPU gains exactly the experts' bytes and the device loses them
        assert within(moved["CPU"] - base["CPU"], n * per_layer, tol=0.01)
        assert within(base[rpc_name] - moved[rpc_name], n * per_layer, tol=0.01)


def test_greedy_output_is_the_same_whatever_the_placement(rpc, moe_path):
    with pymoe.Model(moe_path, load_mode="no-mmap") as cpu_only:
        expected = greedy_tokens(cpu_only)
    for placement in PLACEMENTS:
        with pymoe.Model(moe_path, rpc_servers=[rpc.endpoint], **placement) as model:
            assert greedy_tokens(model) == expected, placement


def test_a_device_named_in_an_override_must_exist(rpc, moe_path):
    with pytest.raises(pymoe.InvalidArgumentError, match=r"'CUDA7'.*\(CPU, RPC"):
        pymoe.Model(moe_path, rpc_servers=[rpc.endpoint], overrides={"exps": "CUDA7"})


def test_an_unreachable_rpc_server_is_an_error_not_a_crash(moe_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(pymoe.ModelNotFoundError, match=f"no rpc-server answers at 127.0.0.1:{port}"):
        pymoe.Model(moe_path, rpc_servers=[f"127.0.0.1:{port}"])
    with pytest.raises(pymoe.InvalidArgumentError, match="host:port"):
        pymoe.memory_plan(moe_path, rpc_servers=["localhost"])


def test_split_models_are_planned_from_all_their_parts(model_dir):
    whole = tiny_models.write_model(model_dir / "placement-whole.gguf", tiny_models.PLACEMENT_MOE)
    first = tiny_models.write_model(model_dir / "placement-split.gguf", tiny_models.PLACEMENT_MOE,
                                    split_max_tensors=10)
    assert "placement-split-00001-of-" in first.name
    assert pymoe.memory_plan(first).bytes_by_device == pymoe.memory_plan(whole).bytes_by_device


@pytest.mark.slow
@pytest.mark.parametrize("placement", [dict(), dict(n_cpu_moe=10), dict(n_cpu_moe=30), dict(n_gpu_layers=16)],
                         ids=["all", "n_cpu_moe=10", "n_cpu_moe=30", "n_gpu_layers=16"])
def test_prediction_on_an_upcycled_q4_0_target(placement):
    from pymoe.demo_models import smollm2_moe
    path = smollm2_moe(4, 2, "q4_0", noise=0.1, quiet=True)
    with pymoe.rpc.LocalRpcServer() as rpc:
        check_prediction(rpc, path, placement)


def test_a_model_spread_over_two_rpc_servers(moe_path):
    """Two machines' worth of rpc-servers (both local here): the layers are
    split over both devices, each holds what the pre-check predicted, and the
    greedy output is the CPU-only output."""
    with pymoe.Model(moe_path, n_gpu_layers=0) as local:
        expected = greedy_tokens(local)
    with pymoe.rpc.LocalRpcServer() as a, pymoe.rpc.LocalRpcServer() as b:
        plan = pymoe.memory_plan(moe_path, rpc_servers=[a.endpoint, b.endpoint])
        devices = plan.placement.devices
        assert len(devices) == 3 and all(d.startswith("RPC") for d in devices[1:]), devices
        predicted = plan.bytes_by_device
        assert predicted[devices[1]] > 0 and predicted[devices[2]] > 0, predicted
        with pymoe.Model(moe_path, rpc_servers=[a.endpoint, b.endpoint]) as spread:
            loaded = spread.load_report.bytes_by_device
            for device in devices[1:]:
                assert within(predicted[device], loaded[device]), (device, predicted, loaded)
            assert greedy_tokens(spread) == expected
