#!/usr/bin/env bash
# Build pymoe with CUDA for one GPU architecture into its own cached build
# directory and virtual environment, then (unless --no-test) run the test suite
# with that build: on a machine without a GPU the CUDA build must fall back to
# the CPU and pass.
#
#   scripts/cuda_build.sh [--no-test]        CUDA_ARCH=89 (RTX 4060) by default
#
# Only for machines whose CUDA toolkit lacks cuBLAS (nvcc alone): cuBLAS then
# comes from the PyPI wheel nvidia-cublas, and GGML_CUDA_NO_VMM removes the link
# to the driver library (libcuda), which such machines lack too. A user with a
# full toolkit needs none of this: CMAKE_ARGS="-DGGML_CUDA=ON" pip install .
set -euo pipefail
cd "$(dirname "$0")/.."

ARCH="${CUDA_ARCH:-89}"
CUBLAS_WHEEL="nvidia-cublas==13.1.1.3"   # CUDA 13's cuBLAS, matching nvcc 13.0
OUT="build/cuda-sm${ARCH}"
VENV="$OUT/venv"
DEPS="build/cuda-deps"
RUN_TESTS=1
[[ "${1:-}" == "--no-test" ]] && RUN_TESTS=0

command -v nvcc >/dev/null || { echo "cuda_build: nvcc not found; install the CUDA toolkit" >&2; exit 2; }
NVCC_DIR="$(dirname "$(readlink -f "$(command -v nvcc)")")"
CUDA_ROOT="$(dirname "$NVCC_DIR")"
started=$(date +%s)

# --- cuBLAS: the toolkit's own, else the PyPI wheel's -------------------------
if ls "$CUDA_ROOT"/lib64/libcublas.so "$CUDA_ROOT"/targets/*/lib/libcublas.so >/dev/null 2>&1; then
    CUBLAS_ARGS=()
    CUBLAS_LIB=""
else
    if [[ ! -f "$DEPS/nvidia/cu13/lib/libcublas.so" ]]; then
        echo "cuda_build: the toolkit has no cuBLAS; taking it from PyPI ($CUBLAS_WHEEL)"
        python3 -m pip install -q --no-deps --target "$DEPS" "$CUBLAS_WHEEL"
        for lib in libcublas libcublasLt; do   # CMake looks for the unversioned names
            ln -sf "$lib.so.13" "$DEPS/nvidia/cu13/lib/$lib.so"
        done
    fi
    CUBLAS_LIB="$(readlink -f "$DEPS/nvidia/cu13/lib")"
    CUBLAS_INC="$(readlink -f "$DEPS/nvidia/cu13/include")"
    CUBLAS_ARGS=(-Ccmake.define.CUDA_cublas_LIBRARY="$CUBLAS_LIB/libcublas.so"
                 -Ccmake.define.CUDA_cublasLt_LIBRARY="$CUBLAS_LIB/libcublasLt.so"
                 -Ccmake.define.CMAKE_CUDA_FLAGS="-I$CUBLAS_INC"
                 -Ccmake.define.CMAKE_CXX_FLAGS="-I$CUBLAS_INC")
fi
# no driver library here either (libcuda): CUDA's virtual memory API needs it
if ls /usr/lib/x86_64-linux-gnu/libcuda.so* /usr/lib64/libcuda.so* "$CUDA_ROOT"/lib64/stubs/libcuda.so >/dev/null 2>&1 \
   && [[ -z "$CUBLAS_LIB" ]]; then
    VMM_ARGS=()
else
    VMM_ARGS=(-Ccmake.define.GGML_CUDA_NO_VMM=ON)
fi

# --- a virtual environment of its own, so the CPU build in .venv stays as it is
[[ -x "$VENV/bin/python" ]] || { python3 -m venv "$VENV" && "$VENV/bin/python" -m pip install -q --upgrade pip; }
# the same packages as the Makefile's venv (a second or two when they are there)
"$VENV/bin/python" -m pip install -q "scikit-build-core>=0.10" "cffi>=1.17" "numpy>=1.24" "gguf>=0.17" \
    "pytest>=8" "hypothesis>=6.100" "matplotlib>=3.5" $(command -v cmake >/dev/null || echo "cmake>=3.21") \
    $(command -v ninja >/dev/null || echo ninja)

echo "cuda_build: building pymoe with CUDA for sm_$ARCH in $OUT (about 40 minutes on 2 cores the first time)"
"$VENV/bin/python" scripts/fetch_llama_cpp.py
"$VENV/bin/python" -m pip install --no-build-isolation --no-deps -q -Cbuild-dir="$OUT/cmake" \
    -Ccmake.define.GGML_CUDA=ON -Ccmake.define.CMAKE_CUDA_ARCHITECTURES="$ARCH" \
    -Ccmake.define.CMAKE_CUDA_COMPILER="$NVCC_DIR/nvcc" -Ccmake.define.PYMOE_BUILD_PEERS=ON \
    "${CUBLAS_ARGS[@]}" "${VMM_ARGS[@]}" .
# llama.cpp's tools as benchmark peers, linked to the same CUDA libraries
cmake --build "$OUT/cmake" --target llama-bench llama-speculative-simple
built=$(date +%s)
echo "cuda_build: built in $(( (built - started) / 60 )) min $(( (built - started) % 60 )) s"

if (( RUN_TESTS )); then
    # the wheel's cuBLAS is not on the loader's path by itself
    export LD_LIBRARY_PATH="${CUBLAS_LIB:+$CUBLAS_LIB:}${LD_LIBRARY_PATH:-}"
    "$VENV/bin/python" -P -c "import pymoe; print(pymoe.build_info())"
    "$VENV/bin/python" -P -m pytest -q
    echo "cuda_build: tests passed with the sm_$ARCH CUDA build in $(( ($(date +%s) - built) / 60 )) min"
fi
