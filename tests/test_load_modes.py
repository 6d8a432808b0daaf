"""Load modes with the real limits: mlock locks every weight byte in RAM
(Q4_0 experts included), auto falls back to no-mmap with one warning when
locking cannot succeed, and an explicit mlock that cannot lock is an error
raised before anything is allocated. Processes run under
`capsh --drop=cap_ipc_lock` are bound by this machine's RLIMIT_MEMLOCK."""
import json
import resource
import shlex
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest

import pymoe
import tiny_models
from conftest import needs_real_mlock

pytestmark = needs_real_mlock  # every test here loads with real locking or its limits

MEMLOCK_SOFT, MEMLOCK_HARD = resource.getrlimit(resource.RLIMIT_MEMLOCK)


@pytest.fixture(scope="module")
def q4_path(model_dir):
    return tiny_models.write_model(model_dir / "placement-q4_0.gguf", tiny_models.PLACEMENT_MOE_Q4_0)


LOAD = """
    import json, warnings, pymoe
    def load(path, **kw):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with pymoe.Model(path, **kw) as m:
                    r = m.load_report
                    result = dict(mode=r.load_mode, fell_back=r.fell_back, locked=r.locked_bytes,
                                  host=r.host_bytes, buffers=r.buffers, failures=r.lock_failures)
            except pymoe.PymoeError as e:
                result = dict(error=type(e).__name__, message=str(e))
        result["warnings"] = [str(w.message) for w in caught if issubclass(w.category, pymoe.PymoeWarning)]
        return result
"""


def run_python(code: str, *, drop_ipc_lock: bool) -> dict:
    """Run LOAD + code in a fresh interpreter (VmLck starts at 0); it prints one JSON line."""
    cmd = [sys.executable, "-P", "-c", textwrap.dedent(LOAD) + textwrap.dedent(code)]
    if drop_ipc_lock:
        capsh = shutil.which("capsh")
        assert capsh, "capsh (Debian package libcap2-bin) is needed to test the memlock limit"
        cmd = [capsh, "--drop=cap_ipc_lock", "--", "-c", shlex.join(cmd)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])




def test_no_mmap_repacks_q4_0_experts(q4_path):
    # why mlock turns repacking off: llama.cpp locks host buffers only, and CPU_REPACK is not one
    with pymoe.Model(q4_path, load_mode="no-mmap") as m:
        assert m.load_report.buffers["CPU_REPACK"] > 0
        assert m.load_report.host_bytes == sum(m.load_report.buffers.values())  # all of it in RAM


def test_mlock_locks_every_weight_byte_in_ram_including_q4_0_experts(q4_path):
    r = run_python(f"print(json.dumps(load({str(q4_path)!r}, load_mode='mlock')))", drop_ipc_lock=False)
    assert "error" not in r, r
    assert r["mode"] == "mlock" and r["failures"] == 0
    assert "CPU_REPACK" not in r["buffers"]
    weights = sum(r["buffers"].values())
    assert r["host"] == weights
    # a fresh process locked nothing else: VmLck is the weights, rounded up to pages
    assert weights <= r["locked"] <= weights * 1.05 + (1 << 20)


def test_auto_locks_when_it_can_and_it_costs_no_speed(q4_path, model_dir):
    f32_path = tiny_models.write_model(model_dir / "placement-llama.gguf", tiny_models.PLACEMENT_MOE)
    for path in (q4_path, f32_path):
        plan = pymoe.memory_plan(path)
        assert plan.lockable == (plan.facts.cap_ipc_lock or plan.facts.memlock_limit >= plan.host_bytes)
        with pymoe.Model(path, load_mode="no-mmap") as m:  # the dry run predicts what a real load does
            assert plan.repacks == ("CPU_REPACK" in m.load_report.buffers)
        expected = "mlock" if plan.lockable and not plan.repacks else "no-mmap"
        assert plan.load_mode == expected
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pymoe.Model(path) as m:
                assert m.load_report.load_mode == expected
                assert m.load_report.fell_back == (expected == "no-mmap")
        ours = [str(w.message) for w in caught if issubclass(w.category, pymoe.PymoeWarning)]
        assert len(ours) == (1 if expected == "no-mmap" else 0)
        if plan.lockable and plan.repacks:
            assert "repacked CPU kernels" in ours[0] and "mlock locks anyway" in ours[0]
    # on this machine (AVX2, CAP_IPC_LOCK) the Q4_0 experts are repacked and the F32 model is locked
    if pymoe.memory_facts().cap_ipc_lock:
        assert pymoe.memory_plan(f32_path).load_mode == "mlock"


@pytest.mark.skipif(MEMLOCK_HARD == resource.RLIM_INFINITY, reason="needs a finite hard RLIMIT_MEMLOCK")
def test_without_cap_ipc_lock_the_limit_binds(q4_path):
    code = f"""
    path = {str(q4_path)!r}
    plan = pymoe.memory_plan(path, load_mode="auto")
    print(json.dumps(dict(plan=dict(lockable=plan.lockable, mode=plan.load_mode, host=plan.host_bytes,
                                    problem=plan.problem, cap=plan.facts.cap_ipc_lock, limit=plan.facts.memlock_limit),
                          auto=load(path), mlock=load(path, load_mode="mlock"), no_mmap=load(path, load_mode="no-mmap"))))
    """
    r = run_python(code, drop_ipc_lock=True)
    plan = r["plan"]
    assert not plan["cap"] and plan["limit"] == MEMLOCK_HARD < plan["host"]
    assert not plan["lockable"] and plan["mode"] == "no-mmap"
    assert "ulimit -l" in plan["problem"] and "LimitMEMLOCK" in plan["problem"] and "no-mmap" in plan["problem"]
    # auto: no-mmap, exactly one warning that says how to enable locking
    assert r["auto"]["mode"] == "no-mmap" and r["auto"]["fell_back"]
    assert len(r["auto"]["warnings"]) == 1 and "ulimit -l" in r["auto"]["warnings"][0]
    # explicit mlock: an error before allocating, with the numbers
    assert r["mlock"]["error"] == "OutOfMemoryError"
    assert f"{plan['host'] / 2**20:.1f} MiB" in r["mlock"]["message"]
    assert f"{MEMLOCK_HARD / 2**20:.1f} MiB" in r["mlock"]["message"]
    # no-mmap asks for no lock: no warning
    assert r["no_mmap"]["mode"] == "no-mmap" and r["no_mmap"]["warnings"] == []


@pytest.mark.skipif(MEMLOCK_HARD == resource.RLIM_INFINITY, reason="needs a finite hard RLIMIT_MEMLOCK")
def test_mlock_within_the_limit_succeeds_without_cap_ipc_lock(q4_path):
    # the layers stay on the CPU, the 8 MB embedding goes to the RPC device: what stays in RAM fits under the limit
    code = f"""
    import pymoe.rpc
    with pymoe.rpc.LocalRpcServer() as server:
        r = load({str(q4_path)!r}, load_mode="mlock", rpc_servers=[server.endpoint], n_gpu_layers=0,
                 overrides={{"token_embd": "RPC0"}})
    print(json.dumps(r))
    """
    r = run_python(code, drop_ipc_lock=True)
    assert "error" not in r, r
    assert r["mode"] == "mlock" and r["failures"] == 0
    assert 0 < r["host"] <= r["locked"] <= MEMLOCK_HARD


HUGE_PAGES = """
    import json, pymoe
    def anon_huge():
        for line in open("/proc/self/smaps_rollup"):
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    before = anon_huge()
    with pymoe.Model({path!r}, load_mode={mode!r}) as m:
        print(json.dumps(dict(gained=anon_huge() - before, host=m.load_report.host_bytes,
                              mode=m.load_report.load_mode)))
"""


@pytest.mark.parametrize("mode", ["no-mmap", "mlock"])
def test_weights_read_into_memory_sit_on_huge_pages(smollm2_path, mode):
    """A mapped file may be served from huge page-cache folios while llama.cpp's
    own buffers get 4 KiB pages: the load advises them for huge pages (mlock
    collapses them after locking), which made them decode 5-10% faster here."""
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    try:
        setting = open(thp).read()
    except OSError:
        pytest.skip("no transparent huge pages on this kernel")
    if "[never]" in setting:
        pytest.skip("transparent huge pages are off on this machine")
    r = run_python(HUGE_PAGES.format(path=str(smollm2_path), mode=mode), drop_ipc_lock=False)
    assert r["mode"] == mode
    assert r["gained"] >= 0.5 * r["host"], r  # most of the weights' bytes on huge pages
