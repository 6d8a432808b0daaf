# pymoe developer entry points. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# a cached build directory: rebuilding only recompiles what changed
BUILD_DIR := build/dev
# -v: cmake's and ninja's output ([12/345] ...) is the build's progress (the first build takes minutes)
PIP_BUILD := $(PY) -m pip install --no-build-isolation --no-deps -v -Cbuild-dir=$(BUILD_DIR)

# cmake and ninja from PyPI only where the system has none
BUILD_TOOLS := $(if $(shell command -v cmake),,"cmake>=3.21") $(if $(shell command -v ninja),,ninja)

.PHONY: all venv build demo test bench bench-peer bench-speculative bench-load-modes cuda-check bench-gpu-rehearsal \
        bench-gpu-pack sanitize fuzz clean

all: build

$(VENV)/.deps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "scikit-build-core>=0.10" "cffi>=1.17" "numpy>=1.24" "gguf>=0.17" \
	    "pytest>=8" "hypothesis>=6.100" "matplotlib>=3.5" "aiohttp>=3.9" "openai>=1.0" $(BUILD_TOOLS)
	touch $@

venv: $(VENV)/.deps

# fetches the pinned llama.cpp on first use, then builds incrementally
build: venv
	$(PY) scripts/fetch_llama_cpp.py
	$(PIP_BUILD) .

demo: build
	$(PY) -P -m pymoe demo

# -P: import the installed pymoe, not the source tree
test: build
	$(PY) -P -m pytest

bench: build
	$(PY) -P bench/overhead.py

# llama.cpp's own tools from the same vendored source, as benchmark peers (RPC on: llama-fit-params
# plans against a local rpc-server in bench/plan_vs_fit.py; llama-server, without its web UI, is
# bench/serve.py's peer)
bench-peer: build
	cmake -S vendor/llama.cpp -B build/peer -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
	    -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_UI=OFF \
	    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DGGML_CCACHE=OFF -DGGML_RPC=ON > /dev/null
	cmake --build build/peer --target llama-speculative-simple llama-bench llama-fit-params llama-server

bench-speculative: bench-peer
	$(PY) -m pip install -q matplotlib  # for the verify cost plots
	$(PY) -P bench/speculative.py

# the cold-cache runs drop the page cache between loads: needs root
bench-load-modes: bench-peer
	$(PY) -P bench/load_modes.py

# CUDA build for one GPU architecture (RTX 4060 = 89, H100/H200 = 90) in build/cuda-sm$(CUDA_ARCH),
# then the test suite with it: without a GPU it must run on the CPU and pass. Not part of CI (~50 min).
CUDA_ARCH ?= 89
cuda-check:
	CUDA_ARCH=$(CUDA_ARCH) scripts/cuda_build.sh

# the GPU benchmark's steps at small sizes here (bench/gpu/): from the packed CUDA build when there
# is one (make bench-gpu-pack), else from this checkout's CPU build and build/peer's tools
bench-gpu-rehearsal: bench-peer
	bench/gpu/run.sh --cpu-rehearsal

# the CUDA build the device runs, packed into bench/gpu/carry/
bench-gpu-pack:
	CUDA_ARCH=$(CUDA_ARCH) scripts/cuda_build.sh --no-test
	bench/gpu/pack.sh build/cuda-sm$(CUDA_ARCH)

# the fuzzers, long (~45 min here): FUZZ_CASES mutated models through plan, memory_plan, Model + session and
# upcycle, then FUZZ_EXECS coverage-guided runs of the C reader under ASan + UBSan; each adds its counts to
# tests/fuzz/results.md, and what failed is kept in build/fuzz/findings and build/fuzz/cover-findings
FUZZ_CASES ?= 10000
FUZZ_EXECS ?= 20000
fuzz: build
	$(PY) -P tests/fuzz/fuzz.py --cases $(FUZZ_CASES) --record --json build/fuzz/cases.json
	$(PY) -P tests/fuzz/cover.py --execs $(FUZZ_EXECS) --record --json build/fuzz/cover.json

# pymoe, llama.cpp and ggml with ASan + UBSan (build/sanitize; the first build takes ~30 min here), then the
# whole test suite against it; SANITIZE_TESTS picks tests (pytest arguments)
SANITIZE_TESTS ?=
sanitize: build
	$(PY) -m pip install --no-build-isolation --no-deps --upgrade -Cbuild-dir=build/sanitize/cmake \
	    -Ccmake.define.PYMOE_SANITIZE=ON -Ccmake.build-type=RelWithDebInfo --target build/sanitize/site .
	scripts/sanitize.sh $(PY) -P -m pytest $(SANITIZE_TESTS)

clean:
	rm -rf build $(VENV)
