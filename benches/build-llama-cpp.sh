#!/usr/bin/env bash
# Build llama.cpp from the source vendored in the PyPI sdist of llama-cpp-python (CPU only,
# Release, llama.cpp's default CMake options) and print the directory holding its binaries.
# The build is cached under ${LMGEN_CACHE:-~/.cache/lmgen}/llama.cpp-<ver>; a second call
# only prints the path. cmake and ninja come from PyPI (into a small venv in the cache) when
# they are not on PATH. Needs a C++ compiler and python3 with pip.
#
#   benches/build-llama-cpp.sh            # -> .../llama.cpp-0.3.36/build/bin
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 PYTHON=python3 benches/build-llama-cpp.sh
set -euo pipefail
ver="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
py="${PYTHON:-python3}"
cache="${LMGEN_CACHE:-$HOME/.cache/lmgen}"
root="$cache/llama.cpp-$ver"
src="$root/src"
bin="$root/build/bin"
targets=(llama-batched-bench llama-bench llama-simple llama-cli llama-quantize)

have_all() { for t in "${targets[@]}"; do [ -x "$bin/$t" ] || return 1; done; }
if have_all; then echo "$bin"; exit 0; fi

mkdir -p "$root"
if [ ! -f "$src/CMakeLists.txt" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  echo "build-llama-cpp: downloading the llama-cpp-python==$ver sdist" >&2
  # --no-binary for this package only: its build backend may still come as wheels.
  "$py" -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$ver" -d "$tmp" >&2
  tar xzf "$tmp"/llama_cpp_python-"$ver".tar.gz -C "$tmp"
  rm -rf "$src"
  mv "$tmp/llama_cpp_python-$ver/vendor/llama.cpp" "$src"
  # The sdist has no .git: record the upstream commit its changelog names.
  grep -m1 -o 'ggml-org/llama.cpp@[0-9a-f]*' "$tmp/llama_cpp_python-$ver/CHANGELOG.md" \
    | sed 's/.*@//' > "$root/COMMIT" || echo unknown > "$root/COMMIT"
fi

# cmake + ninja: from PATH, else from PyPI into $cache/buildtools.
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  tools="$cache/buildtools"
  if [ ! -x "$tools/bin/cmake" ] || [ ! -x "$tools/bin/ninja" ]; then
    echo "build-llama-cpp: installing cmake and ninja from PyPI into $tools" >&2
    "$py" -m venv "$tools"
    "$tools/bin/python" -m pip install --quiet cmake ninja >&2
  fi
  export PATH="$tools/bin:$PATH"
fi

echo "build-llama-cpp: building ${targets[*]} (this takes a while)" >&2
cmake -S "$src" -B "$root/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_NUMBER=0 -DLLAMA_BUILD_COMMIT="$(cat "$root/COMMIT")" >&2
cmake --build "$root/build" --target "${targets[@]}" -j "${BUILD_JOBS:-$(nproc)}" >&2
have_all || { echo "build-llama-cpp: build finished without all of ${targets[*]}" >&2; exit 1; }
echo "$bin"
