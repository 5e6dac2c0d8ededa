#!/usr/bin/env bash
# lmgen vs transformers vs llama.cpp on the same job, same weights, same thread count.
#
# The job: the 4 prompts of benches/prompts.txt (~24 tokens each) as one batch of 4,
# 75 new tokens each, once greedy and once with temperature 0.95; plus batch-1 decode speed.
# Model: SmolLM2-135M-Instruct. Its Q4_1 GGUF (scripts/fetch-smollm2.sh) is converted once
# with llama.cpp's llama-quantize to F32 (and F16) GGUF; lmgen, transformers and llama.cpp all
# read that F32 file (transformers through a safetensors directory it saves from it once),
# so every system computes in f32 with the same weight values. lmgen and llama.cpp also run
# the original Q4_1 file, which both keep quantized in memory (llama.cpp also F16, batch-1).
#
#   lmgen        release binary, `lmgen generate --batch-size 4` (wall time includes loading);
#                load time and batch-1 decode from `lmgen bench MODEL`.
#   transformers fp32, sdpa attention, torch.set_num_threads(N), model.generate with left
#                padding (benches/hf_generate.py); batch-1 decode: 64 KV-cached steps.
#   llama.cpp    built from the source vendored in the llama-cpp-python sdist
#                (benches/build-llama-cpp.sh); the batch job is llama-batched-bench
#                (-npp 24 -ntg 75 -npl 4, no sampling); batch-1 decode is
#                llama-bench -n 64 -p 0 on the F32, F16 and Q4_1 GGUF.
#
# Each system runs --reps times (default 3), alternating lmgen, transformers, llama.cpp, ...
# because memory bandwidth on shared VMs switches between modes within seconds; the table
# gives medians, the per-run numbers are in OUT/runs.jsonl and below the table.
#
# Throughput rows: unless --no-throughput, the script then runs benches/throughput.sh
# --sizes 64,256 (64 and 256 concurrent sequences of 128 prompt + 128 new tokens, lmgen
# `generate --ignore-eos` against `llama-batched-bench -npp 128 -ntg 128 -npl 64,256`) and
# appends its table to the report.
#
# Usage: benches/compare.sh [--only lmgen,transformers,llama.cpp] [--reps N] [--threads N]
#                           [--reuse OLD_OUT_DIR] [--no-throughput] | --report OUT_DIR
#   --reuse takes the rows of the systems not run now from an earlier run's output directory
#   (e.g. rerun only lmgen after a change: --only lmgen --reuse target/bench-compare/<old>).
#   --report OUT_DIR only prints the report of an earlier run again (benches/report.py).
# Before each system's turn the script waits (up to IDLE_WAIT seconds, default 600) until the
# rest of the machine uses less than 0.25 CPU (bg_cpus), and it measures the CPU other
# processes took during the turn (other_cpus); a turn with other_cpus >= 0.25 is run again
# (TRIES, default 3). OpenMP (torch) and llama.cpp's spinning thread pools slow down far more
# than lmgen's when another process takes a core: runs next to a busy neighbour are not
# comparable.
# Environment: PYTHON (default python3; needs benches/requirements.txt), LMGEN_CACHE (default
# ~/.cache/lmgen), OUT (default target/bench-compare/<date>), LMGEN_BIN (skip the cargo build),
# IDLE_WAIT (seconds, 0 = do not wait), TRIES.
# Prints Markdown (versions, machine, tables) on stdout and keeps it in OUT/report.md.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
py="${PYTHON:-python3}"
cache="${LMGEN_CACHE:-$HOME/.cache/lmgen}"
threads=$(nproc)
reps=3
only="lmgen,transformers,llama.cpp"
reuse=""
throughput=1
while [ $# -gt 0 ]; do
  case "$1" in
    --no-throughput) throughput=0; shift ;;
    --only) only="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --reuse) reuse="$2"; shift 2 ;;
    --report) "${PYTHON:-python3}" "$here/report.py" "$2"; exit ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "compare.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
done
want() { [[ ",$only," == *",$1,"* ]]; }
out="${OUT:-$repo/target/bench-compare/$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
runs="$out/runs.jsonl"
: > "$runs"
log() { echo "compare.sh: $*" >&2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
prompts="$here/prompts.txt"
new_tokens=75
temperature=0.95

# ---- build and fetch ---------------------------------------------------------------------
if [ -n "${LMGEN_BIN:-}" ]; then
  lmgen="$LMGEN_BIN"
elif want lmgen; then
  log "building lmgen (release)"
  (cd "$repo" && cargo build --release -p lmgen-cli >&2)
  lmgen="$repo/target/release/lmgen"
fi
q4=$("$repo/scripts/fetch-smollm2.sh")
llama_bin=$("$here/build-llama-cpp.sh")
llama_commit=$(cat "$(dirname "$(dirname "$llama_bin")")/COMMIT" 2>/dev/null || echo unknown)
gdir="$cache/smollm2-135m-instruct-gguf"
mkdir -p "$gdir"
f32="$gdir/SmolLM2-135M-Instruct.F32.gguf"
f16="$gdir/SmolLM2-135M-Instruct.F16.gguf"
for t in F32 F16; do
  dst="$gdir/SmolLM2-135M-Instruct.$t.gguf"
  if [ ! -s "$dst" ]; then
    log "converting $(basename "$q4") to $t with llama-quantize"
    "$llama_bin/llama-quantize" --allow-requantize "$q4" "$dst.tmp" "$t" > "$out/quantize-$t.log" 2>&1
    mv "$dst.tmp" "$dst"
  fi
done

# transformers reads a Hugging Face directory (safetensors, f32) saved once from the F32 GGUF
# by transformers itself: the same weights, through transformers' usual loading path.
hfdir="$gdir/hf-f32"
if want transformers && [ ! -s "$hfdir/model.safetensors" ]; then
  log "saving the F32 GGUF as a transformers directory (safetensors)"
  rm -rf "$hfdir.tmp"
  "$py" "$here/hf_generate.py" --model "$f32" --save-hf "$hfdir.tmp" > "$out/hf-convert.log" 2>&1
  rm -rf "$hfdir"; mv "$hfdir.tmp" "$hfdir"
fi

# ---- versions and machine ----------------------------------------------------------------
lmgen_rev=$(cd "$repo" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(cd "$repo" && git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  lmgen_rev="$lmgen_rev+local changes"
fi
pyver=$("$py" -c 'import sys, torch, transformers; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")' 2>/dev/null || echo "transformers not available")
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
cpus=$(nproc)
{
  echo "- date: $(date -u +'%Y-%m-%d %H:%M UTC'); threads: $threads (CPUs available: $cpus); reps: $reps (median shown)"
  echo "- CPU: $cpu; $(lscpu | sed -n 's/^L3 cache: *//p' | head -1) L3; RAM $(free -g | awk '/^Mem:/{print $2}') GiB; $(uname -sr)"
  echo "- load average before the runs: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "- lmgen: $lmgen_rev (release build, target x86-64 baseline)"
  echo "- $pyver"
  echo "- llama.cpp: ggml-org/llama.cpp@$llama_commit (vendored in llama-cpp-python ${LLAMA_CPP_PYTHON_VERSION:-0.3.36}; Release, default CMake options)"
  echo "- model: SmolLM2-135M-Instruct, $(basename "$q4") converted to F32/F16 GGUF with llama-quantize"
} > "$out/env.md"

# ---- the runs ----------------------------------------------------------------------------
# Jiffies of the whole machine: "busy idle" (from /proc/stat).
cpu_jiffies() {
  local a
  a=($(head -1 /proc/stat))
  echo "$((a[1] + a[2] + a[3] + a[6] + a[7] + a[8])) $((a[4] + a[5]))"
}
# CPUs busy on the whole machine over the next second.
busy_cpus() {
  local b0 i0 b1 i1
  read -r b0 i0 < <(cpu_jiffies); sleep 1; read -r b1 i1 < <(cpu_jiffies)
  awk -v c="$cpus" -v b=$((b1 - b0)) -v t=$((b1 - b0 + i1 - i0)) \
    'BEGIN { printf "%.2f", (t > 0 ? c * b / t : 0) }'
}
# Jiffies used by this script's finished child processes (cutime + cstime).
own_jiffies() {
  local f
  f=($(sed 's/^.*) //' /proc/$$/stat))
  echo $((f[13] + f[14]))
}
# Wait until the machine is idle (see the top); sets $bg to the background load found.
wait_idle() {
  local waited=0
  bg=$(busy_cpus)
  while awk -v x="$bg" 'BEGIN { exit !(x >= 0.25) }' && [ "$waited" -lt "${IDLE_WAIT:-600}" ]; do
    [ "$waited" = 0 ] && log "waiting for the machine to be idle (background load $bg CPUs)"
    sleep 4; waited=$((waited + 5)); bg=$(busy_cpus)
  done
  awk -v x="$bg" 'BEGIN { exit !(x >= 0.25) }' && log "warning: running next to a background load of $bg CPUs"
  return 0
}
# One system's turn: wait for idle, run, and measure the CPU that other processes used
# meanwhile (other_cpus); a turn that shared the machine is run again (up to TRIES times,
# default 3; the last try is kept whatever it saw). Rows go to runs.jsonl with bg_cpus and
# other_cpus.
turn() {
  local system=$1 rep=$2 try b0 i0 o0 b1 i1 o1 other
  for try in $(seq 1 "${TRIES:-3}"); do
    wait_idle
    log "rep $rep/$reps: $system$([ "$try" -gt 1 ] && echo " (try $try)")"
    : > "$turn_file"
    read -r b0 i0 < <(cpu_jiffies); o0=$(own_jiffies)
    case "$system" in
      lmgen) run_lmgen "$rep" ;;
      transformers) run_transformers "$rep" ;;
      llama.cpp) run_llama "$rep" ;;
    esac
    read -r b1 i1 < <(cpu_jiffies); o1=$(own_jiffies)
    other=$(awk -v c="$cpus" -v b=$((b1 - b0 - (o1 - o0))) -v t=$((b1 - b0 + i1 - i0)) \
      'BEGIN { x = (t > 0 ? c * b / t : 0); printf "%.2f", (x < 0 ? 0 : x) }')
    if awk -v x="$other" 'BEGIN { exit !(x < 0.25) }' || [ "$try" = "${TRIES:-3}" ]; then
      sed "s/}\$/,\"bg_cpus\":$bg,\"other_cpus\":$other}/" "$turn_file" >> "$runs"
      return 0
    fi
    log "rep $rep/$reps: $system shared the machine with other work ($other CPUs); again"
  done
}
turn_file="$out/turn.jsonl"
stamp() { cat >> "$turn_file"; }
record() { echo "$1" >> "$turn_file"; }

run_lmgen() {
  local rep=$1 w g name temp t0 t1 n
  for w in F32 Q4_1; do
    g=$f32; [ "$w" = Q4_1 ] && g=$q4
    for name in greedy temp; do
      temp=0; [ "$name" = temp ] && temp=$temperature
      t0=$(now)
      "$lmgen" generate "$g" --input "$prompts" --output "$out/lmgen-$w-$name-$rep.jsonl" \
        --overwrite --max-new-tokens $new_tokens --temperature "$temp" --seed 1 \
        --batch-size 4 --threads "$threads" 2> "$out/lmgen-$w-$name-$rep.log"
      t1=$(now)
      n=$("$py" -c 'import json,sys; print(sum(len(json.loads(l)["token_ids"]) for l in open(sys.argv[1]) if l.strip()))' "$out/lmgen-$w-$name-$rep.jsonl")
      record "{\"system\":\"lmgen\",\"weights\":\"$w\",\"rep\":$rep,\"job\":\"$name\",\"wall_s\":$(elapsed "$t0" "$t1"),\"new_tokens\":$n}"
    done
    "$lmgen" bench "$g" --threads "$threads" --json --prompt-tokens 24 --decode-tokens 64 \
      --batch-sizes 1 > "$out/lmgen-$w-bench-$rep.json" 2> "$out/lmgen-$w-bench-$rep.log"
    "$py" - "$out/lmgen-$w-bench-$rep.json" "$rep" "$w" <<'EOF' | stamp
import json, sys
r = json.load(open(sys.argv[1]))
o = {"system": "lmgen", "weights": sys.argv[3], "rep": int(sys.argv[2]), "job": "decode1",
     "load_s": r["load_s"], "decode1_tok_s": r["decode"][0]["tokens_per_s"],
     "weight_bytes": r.get("weight_bytes")}
if r.get("limits"):
    o.update(read_gb_s=r["limits"]["read_gb_s"], gemm_gflop_s=r["limits"]["gemm_gflop_s"])
print(json.dumps(o))
EOF
  done
}

run_transformers() {
  local rep=$1 name temp t0 t1
  for name in greedy temp decode1; do
    temp=0; [ "$name" = temp ] && temp=$temperature
    local extra=(--prompts "$prompts" --max-new-tokens $new_tokens --temperature "$temp")
    [ "$name" = decode1 ] && extra=(--decode1 64)
    t0=$(now)
    "$py" "$here/hf_generate.py" --model "$hfdir" --threads "$threads" "${extra[@]}" \
      > "$out/hf-$name-$rep.json" 2> "$out/hf-$name-$rep.log"
    t1=$(now)
    "$py" - "$out/hf-$name-$rep.json" "$rep" "$name" "$(elapsed "$t0" "$t1")" <<'EOF' | stamp
import json, sys
r = json.load(open(sys.argv[1]))
o = {"system": "transformers", "weights": "F32", "rep": int(sys.argv[2]), "job": sys.argv[3],
     "wall_s": float(sys.argv[4]), "load_s": r["load_s"], "import_s": r["import_s"]}
if "new_tokens" in r:
    o.update(new_tokens=r["new_tokens"], gen_s=r["gen_s"])
if "decode1_tok_s" in r:
    o.update(decode1_tok_s=r["decode1_tok_s"])
print(json.dumps(o))
EOF
  done
}

run_llama() {
  local rep=$1 t0 t1 g w attempt
  for w in F32 Q4_1; do
    g=$f32; [ "$w" = Q4_1 ] && g=$q4
    # With a quantized model on a CPU that reports AMX, the default build's AMX matmul
    # (used for batches, through weight repacking) can crash: then run without repacking
    # and say so in the row.
    local extra=() note=""
    for attempt in 1 2; do
      t0=$(now)
      if "$llama_bin/llama-batched-bench" -m "$g" -c 1024 -npp 24 -ntg $new_tokens -npl 4 \
        -t "$threads" -tb "$threads" --output-format jsonl "${extra[@]}" \
        > "$out/llama-$w-batched-$rep.txt" 2> "$out/llama-$w-batched-$rep.log"; then
        break
      fi
      [ "$attempt" = 2 ] && { log "llama-batched-bench failed on $w (see $out/llama-$w-batched-$rep.log)"; exit 1; }
      log "llama-batched-bench crashed on $w; again with --no-repack"
      extra=(--no-repack); note="no-repack (default crashed)"
    done
    t1=$(now)
    "$py" - "$out/llama-$w-batched-$rep.txt" "$rep" "$(elapsed "$t0" "$t1")" "$w" "$note" <<'EOF' | stamp
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
r = [x for x in rows if "pl" in x or "npl" in x][-1]
o = {"system": "llama.cpp", "weights": sys.argv[4], "rep": int(sys.argv[2]), "job": "batched",
     "wall_s": float(sys.argv[3]), "gen_s": float(r["t"]), "new_tokens": 4 * 75,
     "t_pp": r.get("t_pp"), "t_tg": r.get("t_tg")}
if sys.argv[5]:
    o["note"] = sys.argv[5]
print(json.dumps(o))
EOF
  done
  for g in "$f32" "$f16" "$q4"; do
    "$llama_bin/llama-bench" -m "$g" -n 64 -p 0 -t "$threads" -r 3 -o json \
      > "$out/llama-bench-$rep-$(basename "$g").json" 2> "$out/llama-bench-$rep.log"
    "$py" - "$out/llama-bench-$rep-$(basename "$g").json" "$rep" "$g" <<'EOF' | stamp
import json, re, sys
r = json.load(open(sys.argv[1]))[0]
w = re.search(r"\.(F32|F16|Q4_1)\.gguf$", sys.argv[3]).group(1)
print(json.dumps({"system": "llama.cpp", "weights": w, "rep": int(sys.argv[2]), "job": "decode1",
                  "decode1_tok_s": r["avg_ts"]}))
EOF
  done
}

for rep in $(seq 1 "$reps"); do
  for system in lmgen transformers llama.cpp; do
    if want "$system"; then turn "$system" "$rep"; fi
  done
done
rm -f "$turn_file"
if [ -n "$reuse" ]; then
  "$py" - "$reuse/runs.jsonl" "$only" >> "$runs" <<'EOF'
import json, sys
keep = set(sys.argv[2].split(","))
for l in open(sys.argv[1]):
    if l.strip() and json.loads(l)["system"] not in keep:
        print(l.strip())
EOF
  for system in transformers llama.cpp; do  # their raw outputs too (the report reads some)
    if ! want "$system"; then
      cp "$reuse"/"$([ "$system" = transformers ] && echo hf || echo llama)"-* "$out"/ 2>/dev/null || true
    fi
  done
  echo "- rows of systems other than $only reused from $reuse" >> "$out/env.md"
fi

# ---- the report --------------------------------------------------------------------------
"$py" "$here/report.py" "$out" > "$out/report.md"
if [ "$throughput" = 1 ]; then
  { echo; echo "### Throughput: 64 and 256 concurrent sequences (benches/throughput.sh)"; echo
    LMGEN_BIN="${LMGEN_BIN:-}" OUT="$out/throughput" "$here/throughput.sh" --threads "$threads" --sizes 64,256
  } >> "$out/report.md"
fi
cat "$out/report.md"
log "report: $out/report.md (raw: $runs)"
