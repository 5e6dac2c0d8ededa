#!/usr/bin/env bash
# Throughput with many sequences, prefill and long-context decode: lmgen against llama.cpp on
# the same F32 GGUF (SmolLM2-135M-Instruct, made by benches/compare.sh), same thread count.
#
#   batched   N sequences of 128 prompt tokens, 128 new tokens each, N = 1, 4, 64, 256:
#             lmgen `generate --ignore-eos --temperature 0 --batch-size N --mmap never` on
#             token-id prompts (gen time = wall - the load time of a 1-token run; weights copied
#             in both, so the loads match and the steps run at their steady speed) against
#             `llama-batched-bench -npp 128 -ntg 128 -npl N` (its total time T);
#   pp512     prefill of a 512-token prompt: `lmgen bench --prompt-tokens 512` against
#             `llama-bench -p 512 -n 0`;
#   ctx2048   decode after 2,048 tokens of context: `lmgen bench --context 2048
#             --decode-tokens 64` (64 timed steps after a 2,048-token prompt) against
#             `llama-bench -n 64 -p 0 -d 2048`.
#
# Usage: benches/throughput.sh [--threads N] [--sizes 1,4,64,256] [--weights F32|Q4_1]
# Environment: LMGEN_BIN (default target/release/lmgen), LMGEN_CACHE (default ~/.cache/lmgen).
# Prints a Markdown table; raw outputs in OUT (default target/bench-throughput/<date>).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
cache="${LMGEN_CACHE:-$HOME/.cache/lmgen}"
threads=$(nproc)
sizes="1,4,64,256"
weights=F32
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) threads="$2"; shift 2 ;;
    --sizes) sizes="$2"; shift 2 ;;
    --weights) weights="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "throughput.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
lmgen="${LMGEN_BIN:-$repo/target/release/lmgen}"
llama_bin=$("$here/build-llama-cpp.sh")
q4=$("$repo/scripts/fetch-smollm2.sh")
g="$cache/smollm2-135m-instruct-gguf/SmolLM2-135M-Instruct.F32.gguf"
[ "$weights" = Q4_1 ] && g=$q4
if [ ! -s "$g" ]; then
  mkdir -p "$(dirname "$g")"
  "$llama_bin/llama-quantize" --allow-requantize "$q4" "$g.tmp" F32 >/dev/null 2>&1
  mv "$g.tmp" "$g"
fi
out="${OUT:-$repo/target/bench-throughput/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
now() { date +%s.%N; }
sub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }
div() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a / b }'; }

# Token-id prompts: distinct, deterministic, 128 (or LEN) ids each.
prompts() {  # N LEN FILE
  python3 - "$1" "$2" > "$3" <<'EOF'
import json, sys
n, length = int(sys.argv[1]), int(sys.argv[2])
for i in range(n):
    print(json.dumps({"input_ids": [(i * 7919 + j * 104729 + 13) % 40000 + 100 for j in range(length)]}))
EOF
}
lmgen_run() {  # INPUT NEW BATCH -> wall seconds
  local t0 t1
  t0=$(now)
  "$lmgen" generate "$g" --input "$1" --output "$out/lmgen-out.jsonl" --overwrite \
    --max-new-tokens "$2" --temperature 0 --ignore-eos --batch-size "$3" --threads "$threads" \
    --mmap never 2> "$out/lmgen.log"
  t1=$(now)
  sub "$t1" "$t0"
}

prompts 1 1 "$out/one.jsonl"
load=$(lmgen_run "$out/one.jsonl" 1 1)
echo "| job | lmgen tok/s | llama.cpp tok/s | ratio |"
echo "|---|---:|---:|---:|"
IFS=, read -ra ns <<< "$sizes"
for n in "${ns[@]}"; do
  prompts "$n" 128 "$out/p$n.jsonl"
  wall=$(lmgen_run "$out/p$n.jsonl" 128 "$n")
  ours=$(div $((n * 256)) "$(sub "$wall" "$load")")
  "$llama_bin/llama-batched-bench" -m "$g" -c $((n * 256 + 256)) -b 2048 -ub 512 -npp 128 -ntg 128 \
    -npl "$n" -t "$threads" -tb "$threads" --output-format jsonl > "$out/llama-b$n.txt" 2>/dev/null \
    || "$llama_bin/llama-batched-bench" -m "$g" -c $((n * 256 + 256)) -b 2048 -ub 512 -npp 128 \
      -ntg 128 -npl "$n" -t "$threads" -tb "$threads" --no-repack --output-format jsonl \
      > "$out/llama-b$n.txt" 2>/dev/null
  theirs=$(python3 -c 'import json,sys; r=[json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")][-1]; print("%.1f" % r["speed"])' "$out/llama-b$n.txt")
  echo "| $n × (128 + 128), prompt + generated tokens / s | $ours | $theirs | $(div "$ours" "$theirs") |"
  python3 -c 'import json,sys; r=[json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")][-1]; print("llama.cpp %s sequences: prefill %.1f tok/s, decode %.1f tok/s" % (sys.argv[2], r["speed_pp"], r["speed_tg"]))' "$out/llama-b$n.txt" "$n" >&2
done

"$lmgen" bench "$g" --threads "$threads" --json --prompt-tokens 512 --batch-sizes 1 \
  --decode-tokens 4 > "$out/lmgen-pp512.json" 2>/dev/null
ours=$(python3 -c 'import json,sys; print("%.1f" % json.load(open(sys.argv[1]))["prefill_tokens_per_s"])' "$out/lmgen-pp512.json")
"$llama_bin/llama-bench" -m "$g" -p 512 -n 0 -t "$threads" -r 3 -o json > "$out/llama-pp512.json" 2>/dev/null
theirs=$(python3 -c 'import json,sys; print("%.1f" % json.load(open(sys.argv[1]))[0]["avg_ts"])' "$out/llama-pp512.json")
echo "| prefill, 512-token prompt | $ours | $theirs | $(div "$ours" "$theirs") |"

"$lmgen" bench "$g" --threads "$threads" --json --prompt-tokens 16 --batch-sizes 1 \
  --decode-tokens 64 --context 2048 > "$out/lmgen-d2048.json" 2>/dev/null
ours=$(python3 -c 'import json,sys; print("%.1f" % json.load(open(sys.argv[1]))["decode"][0]["tokens_per_s"])' "$out/lmgen-d2048.json")
"$llama_bin/llama-bench" -m "$g" -p 0 -n 64 -d 2048 -t "$threads" -r 3 -o json > "$out/llama-d2048.json" 2>/dev/null
theirs=$(python3 -c 'import json,sys; print("%.1f" % json.load(open(sys.argv[1]))[0]["avg_ts"])' "$out/llama-d2048.json")
echo "| decode at 2,048 tokens of context, batch 1 | $ours | $theirs | $(div "$ours" "$theirs") |"
echo
echo "threads: $threads; weights: $(basename "$g"); lmgen $(cd "$repo" && git rev-parse --short HEAD); raw: $out"
