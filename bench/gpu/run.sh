#!/usr/bin/env bash
# The GPU benchmark of the 8 GB scenario, in steps that each end well inside a
# device call's 600 s:
#
#   bench/gpu/run.sh setup models      unpack the CUDA build, make the models (~2 min)
#   bench/gpu/run.sh pymoe             pymoe's measurements, decode settings in 3 interleaved rounds (~5 min)
#   bench/gpu/run.sh cache             the expert cache: every layer's experts in RAM, the plan's leftover VRAM
#                                      as a cache (upload cap 1, and none), plain / k=2 / auto / ngram
#   bench/gpu/run.sh peers table       llama.cpp's tools at the same placement, then the table
#   bench/gpu/run.sh --cpu-rehearsal   all steps at small sizes on this machine (no GPU)
#
# Needs bench/gpu/carry/ (made here by `make bench-gpu-pack` from a CUDA build:
# the built package and peer tools, and the vocab-only GGUF) and, on the device,
# .whl/ with the wheels its Python lacks (cffi, pycparser, gguf). A rehearsal
# without carry/ uses this checkout's CPU build (.venv) and build/peer's tools
# (`make bench-gpu-rehearsal` builds both). Steps share
# state in $PYMOE_GPU_WORK (default /tmp/pymoe-gpu) and skip what is done, so a
# step on a fresh machine redoes setup and models first. Results go to
# $WORK/out/results.jsonl and the table to table.md, copied to $OUT (the device
# tool's return folder) after each step.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO="$PWD"
CARRY="$REPO/bench/gpu/carry"
REHEARSAL=0
if [[ "${1:-}" == "--cpu-rehearsal" ]]; then
    REHEARSAL=1
    shift
fi
STEPS=("$@")
[[ ${#STEPS[@]} -eq 0 ]] && STEPS=(setup models pymoe cache peers table)

VENV_BUILD=0
if (( REHEARSAL )); then
    WORK="${PYMOE_GPU_WORK:-$REPO/build/gpu-rehearsal}"
    PY="$REPO/.venv/bin/python"              # has cffi and gguf already
    SIZE_ARGS=(--small)
    BENCH_ARGS=(--vram 1200MiB --ctx 1024 --tokens 32 --prompt-tokens 256 --reps 3)
    [[ -f "$CARRY/pymoe-cuda.tar.gz" ]] || VENV_BUILD=1
else
    WORK="${PYMOE_GPU_WORK:-/tmp/pymoe-gpu}"
    PY="python3"
    SIZE_ARGS=()
    BENCH_ARGS=(--vram 8GiB --ctx 4096 --tokens 128 --prompt-tokens 2048 --reps 3)
fi
VOCAB="$CARRY/ggml-vocab-qwen2.gguf"
PEERS="$WORK/bin"
if (( VENV_BUILD )); then
    VOCAB="$REPO/vendor/llama.cpp/models/ggml-vocab-qwen2.gguf"
    PEERS="$REPO/build/peer/bin"
fi
RESULTS="$WORK/out"
mkdir -p "$WORK" "$RESULTS"

# the CUDA runtime and cuBLAS: wherever this machine has them
cuda_libs() {
    local dirs=()
    for name in libcudart.so.13 libcublas.so.13; do
        local found
        found="$(find "$REPO/build/cuda-deps" /usr/local/cuda/lib64 /usr/local/cuda/targets /usr/lib/x86_64-linux-gnu \
                 /opt/torch/.venv/lib /usr/local/lib /usr/lib/python3 -name "$name" 2>/dev/null | head -1 || true)"
        [[ -n "$found" ]] && dirs+=("$(dirname "$found")")
    done
    local IFS=:
    echo "${dirs[*]:-}"
}
export LD_LIBRARY_PATH="$WORK/site/pymoe/lib:$WORK/bin:$(cuda_libs)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step_setup() {
    local t0=$SECONDS
    [[ -f "$WORK/.setup-done" ]] && { echo "setup: done before"; return; }
    if (( VENV_BUILD )); then
        [[ -x "$PEERS/llama-speculative-simple" && -x "$PEERS/llama-bench" ]] ||
            { echo "no llama.cpp tools in $PEERS: run make bench-peer first" >&2; exit 2; }
        "$PY" -P -c "import pymoe, sys; print('rehearsal with the CPU build: pymoe', pymoe.__version__, 'llama.cpp', pymoe.llama_version(), 'python', sys.version.split()[0]); print(pymoe.build_info())"
        touch "$WORK/.setup-done"
        return
    fi
    [[ -f "$CARRY/pymoe-cuda.tar.gz" ]] || { echo "no $CARRY/pymoe-cuda.tar.gz: run bench/gpu/pack.sh here first" >&2; exit 2; }
    rm -rf "$WORK/site" "$WORK/bin"
    mkdir -p "$WORK/site"
    tar -xzf "$CARRY/pymoe-cuda.tar.gz" -C "$WORK"
    if (( ! REHEARSAL )); then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$WORK/site" "$REPO"/.whl/*.whl
    fi
    # the Python layer from this checkout, over the compiled parts from the tarball
    cp "$REPO"/pymoe/*.py "$WORK/site/pymoe/" && cp -r "$REPO"/pymoe/cli "$WORK/site/pymoe/"
    if ! "$PY" -P -c "import pymoe" 2>/dev/null; then  # the limited-API module did not load: build it here
        echo "setup: compiling the cffi module for this Python"
        local inc suffix
        inc="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
        suffix="$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
        rm -f "$WORK/site/pymoe/_pymoe_cffi.abi3.so"
        cc -O2 -shared -fPIC -I"$inc" -I"$WORK/site/pymoe/include" "$WORK/src/_pymoe_cffi.c" \
            -o "$WORK/site/pymoe/_pymoe_cffi$suffix" -L"$WORK/site/pymoe/lib" -lpymoe -Wl,-rpath,'$ORIGIN/lib'
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    echo "CPUs: $(nproc); $(grep -m1 'model name' /proc/cpuinfo); $(grep -E 'MemTotal|MemAvailable' /proc/meminfo | tr -s ' ' | tr '\n' ' ')"
    "$PY" -P -c "import pymoe, sys; print('pymoe', pymoe.__version__, 'llama.cpp', pymoe.llama_version(), 'python', sys.version.split()[0]); print(pymoe.build_info())"
    touch "$WORK/.setup-done"
    echo "setup: $((SECONDS - t0)) s"
}

step_models() {
    local t0=$SECONDS
    [[ -f "$WORK/models/target.gguf" && -f "$WORK/models/draft.gguf" ]] && { echo "models: made before"; return; }
    "$PY" "$REPO/bench/gpu/make_models.py" --vocab "$VOCAB" --out "$WORK/models" "${SIZE_ARGS[@]}"
    echo "models: $((SECONDS - t0)) s; $(grep MemAvailable /proc/meminfo | tr -s ' ')"
}

step_pymoe() {
    rm -f "$RESULTS/results.jsonl"  # a fresh run of the measurements
    "$PY" -P "$REPO/bench/gpu/bench.py" --models "$WORK/models" --out "$RESULTS" --part pymoe "${BENCH_ARGS[@]}"
}

step_cache() {
    "$PY" -P "$REPO/bench/gpu/bench.py" --models "$WORK/models" --out "$RESULTS" --part cache "${BENCH_ARGS[@]}"
}

step_peers() {
    "$PY" -P "$REPO/bench/gpu/bench.py" --models "$WORK/models" --peers "$PEERS" --out "$RESULTS" --part peers \
        "${BENCH_ARGS[@]}"
}

step_table() {
    "$PY" -P "$REPO/bench/gpu/bench.py" --out "$RESULTS" --table | tee "$RESULTS/table.md"
}

for step in "${STEPS[@]}"; do
    case "$step" in
        setup|models|pymoe|cache|peers|table) ;;
        *) echo "unknown step $step (setup, models, pymoe, cache, peers, table)" >&2; exit 2 ;;
    esac
done
for step in "${STEPS[@]}"; do
    echo "== $step"
    [[ "$step" == pymoe || "$step" == cache || "$step" == peers ]] && { step_setup; step_models; }
    "step_$step"
    [[ -n "${OUT:-}" && -d "$RESULTS" ]] && cp "$RESULTS"/* "$OUT"/ 2>/dev/null || true
done
