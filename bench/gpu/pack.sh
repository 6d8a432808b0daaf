#!/usr/bin/env bash
# Pack what the GPU benchmark carries to the device (at most 64 MiB a call):
# the CUDA build's installed package (libraries stripped; its cffi module
# renamed for any Python 3: cffi compiles it against Python's limited API) and
# llama.cpp's peer tools from the same build tree, plus the vocab-only GGUF.
#
#   bench/gpu/pack.sh [BUILD]   BUILD = build/cuda-sm90 (scripts/cuda_build.sh with CUDA_ARCH=90)
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD="${1:-build/cuda-sm90}"
CARRY=bench/gpu/carry
SITE="$(echo "$BUILD"/venv/lib/python3*/site-packages/pymoe)"
[[ -d "$SITE" ]] || { echo "pack: no installed pymoe under $BUILD/venv (build it with scripts/cuda_build.sh)" >&2; exit 2; }
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/site" "$STAGE/bin" "$CARRY"
cp -r "$SITE" "$STAGE/site/pymoe"
rm -rf "$STAGE/site/pymoe/__pycache__"
module="$(ls "$STAGE"/site/pymoe/_pymoe_cffi.*.so)"
mv "$module" "$STAGE/site/pymoe/_pymoe_cffi.abi3.so"
mkdir -p "$STAGE/src" && cp "$BUILD/cmake/_pymoe_cffi.c" "$STAGE/src/"  # to compile there if abi3 fails
# a wheel holds each library three times (libX.so, .so.0, .so.0.N.N): keep the soname file once
for lib in "$STAGE"/site/pymoe/lib/lib*.so; do
    soname="$(ls "$lib".[0-9] 2>/dev/null | head -1 || true)"
    [[ -n "$soname" ]] || continue
    rm -f "$lib".[0-9]*.[0-9]*
    ln -sf "$(basename "$soname")" "$lib"
done
# the peers, and the libraries of theirs that the package lacks
for tool in llama-bench llama-speculative-simple; do
    cp "$BUILD/cmake/bin/$tool" "$STAGE/bin/"
done
cp -L "$BUILD"/cmake/bin/libllama-common.so.0 "$BUILD"/cmake/bin/libllama-bench-impl.so "$STAGE/bin/"
strip --strip-unneeded "$STAGE"/site/pymoe/lib/*.so.[0-9] "$STAGE"/site/pymoe/lib/libpymoe.so "$STAGE"/bin/*
tar -czf "$CARRY/pymoe-cuda.tar.gz" -C "$STAGE" site bin src
cp vendor/llama.cpp/models/ggml-vocab-qwen2.gguf "$CARRY/"
du -sh "$CARRY"/*
