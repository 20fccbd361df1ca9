#!/usr/bin/env bash
# Builds llama.cpp's `llama-server` for the benchmark's `llamacpp-server` engine, from the llama.cpp source that ships
# inside the llama-cpp-python source distribution (vendor/llama.cpp), so only PyPI is needed.
#
#   tools/build_llama_server.sh [DEST]     # DEST defaults to ~/.cache/nanovllm/llama.cpp; prints the binary's path
#
# -DGGML_NATIVE=ON compiles for this machine's own instruction set (AVX-512 on one machine, AVX2 on another): never
# force one the machine lacks. AMX is off (GGML_NATIVE may not detect it safely in a VM); curl and OpenSSL are off
# because the server needs neither to serve a local GGUF. 15 minutes on 2 idle cores.
set -euo pipefail
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
DEST=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/nanovllm/llama.cpp}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$DEST"
if [ -x "$DEST/build/bin/llama-server" ]; then echo "$DEST/build/bin/llama-server"; exit 0; fi
SRC="$DEST/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
  sdist="$DEST/llama_cpp_python-$VERSION.tar.gz"
  [ -f "$sdist" ] || python -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$DEST" >&2
  tar -xzf "$sdist" -C "$DEST"
fi
cmake -S "$SRC" -B "$DEST/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DBUILD_SHARED_LIBS=OFF >&2
cmake --build "$DEST/build" --target llama-server -j "$JOBS" >&2
echo "$DEST/build/bin/llama-server"
