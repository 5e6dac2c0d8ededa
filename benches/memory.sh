#!/usr/bin/env bash
# Memory under preemption: N sequences of PROMPT token ids, NEW new tokens each (greedy,
# `--ignore-eos`, no prefix cache), all admitted at once (`--batch-size N`) into a KV pool
# smaller than they need together (`--kv-memory`), so the scheduler must preempt and recompute.
# Samples the process's peak RSS (VmHWM) every 5 s and reports it against weights + pool.
#
# Usage: benches/memory.sh [--threads N] [--sequences 256] [--prompt 500] [--new 524]
#                          [--kv-memory 2GiB] [--model FILE|DIR]
# Environment: LMGEN_BIN (default target/release/lmgen), LMGEN_CACHE (default ~/.cache/lmgen).
# Default model: the SmolLM2-135M-Instruct F32 GGUF that benches/throughput.sh makes.
# Prints one Markdown table; raw outputs (records, RSS samples) in OUT
# (default target/bench-memory/<date>). About an hour on 2 cores with the defaults.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
cache="${LMGEN_CACHE:-$HOME/.cache/lmgen}"
threads=$(nproc)
n=256 plen=500 new=524 kv=2GiB
model="$cache/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.F32.gguf"
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --sequences) n="$2"; shift 2 ;;
    --prompt) plen="$2"; shift 2 ;;
    --new) new="$2"; shift 2 ;;
    --kv-memory) kv="$2"; shift 2 ;;
    --model) model="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "memory.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
lmgen="${LMGEN_BIN:-$repo/target/release/lmgen}"
[ -e "$model" ] || { echo "memory.sh: no model at $model (run benches/throughput.sh once)" >&2; exit 2; }
out="${OUT:-$repo/target/bench-memory/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
python3 - "$n" "$plen" > "$out/prompts.jsonl" <<'EOF'
import json, sys
n, length = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    print(json.dumps({"input_ids": [(i * 7919 + j * 104729 + 13) % 40000 + 100 for j in range(length)]}))
EOF

start=$(date +%s)
"$lmgen" generate "$model" --input "$out/prompts.jsonl" --output "$out/records.jsonl" --overwrite \
  --max-new-tokens "$new" --ignore-eos --temperature 0 --no-prefix-cache --batch-size "$n" \
  --kv-memory "$kv" --threads "$threads" --mmap never 2> "$out/stderr.txt" &
pid=$!
peak=0
while kill -0 "$pid" 2>/dev/null; do
  kb=$(awk '/^VmHWM/ { print $2 }' "/proc/$pid/status" 2>/dev/null || echo 0)
  [ -n "$kb" ] && [ "$kb" -gt "$peak" ] && peak=$kb
  echo "$(( $(date +%s) - start )) ${kb:-0} $(wc -l 2>/dev/null < "$out/records.jsonl" || echo 0)" >> "$out/rss.txt"
  sleep 5
done
rc=0
wait "$pid" || rc=$?
secs=$(( $(date +%s) - start ))
records=$(wc -l < "$out/records.jsonl")
weights=$(stat -L -c %s "$model" 2>/dev/null || du -sb "$model" | cut -f1)
pool=$(awk -v s="$kv" 'BEGIN { u = substr(s, length(s) - 2); v = substr(s, 1, length(s) - 3);
  if (u == "GiB") print v * 1073741824; else if (u == "MiB") print v * 1048576; else print s }')
# `generate` notes how often sequences were preempted and recomputed (none: no note).
preempted=$(sed -n 's/.*preempted \([0-9]*\) times.*/\1/p' "$out/stderr.txt" | tail -1)
awk -v p="$peak" -v w="$weights" -v k="$pool" -v rc="$rc" -v s="$secs" -v r="$records" -v n="$n" \
    -v pre="${preempted:-0}" -v tok="$(( records * new ))" 'BEGIN {
  g = 1073741824; over = (p * 1024 - w - k) / (w + k) * 100
  print "| sequences done | exit | wall (s) | generated tok/s | preemptions | peak RSS (GiB) | weights (GiB) | pool (GiB) | over weights + pool |"
  print "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  printf "| %d of %d | %d | %d | %.1f | %d | %.3f | %.3f | %.3f | %.1f %% |\n", r, n, rc, s, tok / (s > 0 ? s : 1), pre, p * 1024 / g, w / g, k / g, over
}'
