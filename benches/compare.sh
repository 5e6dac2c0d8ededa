#!/usr/bin/env bash
# lmgen vs transformers vs llama.cpp on the same job, same weights, same thread count.
#
# The job: the 4 prompts of benches/prompts.txt (~24 tokens each) as one batch of 4,
# 75 new tokens each, once greedy and once with temperature 0.95; plus batch-1 decode speed.
# Model: SmolLM2-135M-Instruct. Its Q4_1 GGUF (scripts/fetch-smollm2.sh) is converted once
# with llama.cpp's llama-quantize to F32 (and F16) GGUF; lmgen, transformers and llama.cpp all
# read that F32 file, so every system computes in f32 with the same weight values.
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
# Usage: benches/compare.sh [--only lmgen,transformers,llama.cpp] [--reps N] [--threads N]
#                           [--reuse OLD_OUT_DIR]
#   --reuse takes the rows of the systems not run now from an earlier run's output directory
#   (e.g. rerun only lmgen after a change: --only lmgen --reuse target/bench-compare/<old>).
# Before each system's turn the script waits (up to IDLE_WAIT seconds, default 600) until the
# rest of the machine uses less than 0.25 CPU, and records that background load with every run
# (bg_cpus): OpenMP (torch) and llama.cpp's spinning thread pools slow down far more than
# lmgen's when another process takes a core, so runs next to a busy neighbour are not comparable.
# Environment: PYTHON (default python3; needs benches/requirements.txt), LMGEN_CACHE (default
# ~/.cache/lmgen), OUT (default target/bench-compare/<date>), LMGEN_BIN (skip the cargo build),
# IDLE_WAIT (seconds, 0 = do not wait).
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
while [ $# -gt 0 ]; do
  case "$1" in
    --only) only="$2"; shift 2 ;;
    --reps) reps="$2"; shift 2 ;;
    --threads) threads="$2"; shift 2 ;;
    --reuse) reuse="$2"; shift 2 ;;
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
# CPUs busy on the whole machine over the next second (from /proc/stat).
busy_cpus() {
  local a b
  a=($(head -1 /proc/stat)); sleep 1; b=($(head -1 /proc/stat))
  awk -v c="$cpus" -v bu=$(( (b[1]+b[2]+b[3]+b[6]+b[7]+b[8]) - (a[1]+a[2]+a[3]+a[6]+a[7]+a[8]) )) \
      -v id=$(( (b[4]+b[5]) - (a[4]+a[5]) )) 'BEGIN { printf "%.2f", (bu + id > 0) ? c * bu / (bu + id) : 0 }'
}
# Wait until the machine is idle (see above); sets $bg to the background load found.
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
# Append a run's JSON object (stdin or $1) to runs.jsonl with the background load.
stamp() { sed "s/}\$/,\"bg_cpus\":$bg}/" >> "$runs"; }
record() { echo "$1" | stamp; }

run_lmgen() {
  local rep=$1 name temp t0 t1 n
  for name in greedy temp; do
    temp=0; [ "$name" = temp ] && temp=$temperature
    t0=$(now)
    "$lmgen" generate "$f32" --input "$prompts" --output "$out/lmgen-$name-$rep.jsonl" \
      --overwrite --max-new-tokens $new_tokens --temperature "$temp" --seed 1 \
      --batch-size 4 --threads "$threads" 2> "$out/lmgen-$name-$rep.log"
    t1=$(now)
    n=$("$py" -c 'import json,sys; print(sum(len(json.loads(l)["token_ids"]) for l in open(sys.argv[1]) if l.strip()))' "$out/lmgen-$name-$rep.jsonl")
    record "{\"system\":\"lmgen\",\"weights\":\"F32\",\"rep\":$rep,\"job\":\"$name\",\"wall_s\":$(elapsed "$t0" "$t1"),\"new_tokens\":$n}"
  done
  "$lmgen" bench "$f32" --threads "$threads" --json --prompt-tokens 24 --decode-tokens 64 \
    --batch-sizes 1 > "$out/lmgen-bench-$rep.json" 2> "$out/lmgen-bench-$rep.log"
  "$py" - "$out/lmgen-bench-$rep.json" "$rep" <<'EOF' | stamp
import json, sys
r = json.load(open(sys.argv[1]))
print(json.dumps({"system": "lmgen", "weights": "F32", "rep": int(sys.argv[2]), "job": "decode1",
                  "load_s": r["load_s"], "decode1_tok_s": r["decode"][0]["tokens_per_s"],
                  "read_gb_s": r["limits"]["read_gb_s"], "gemm_gflop_s": r["limits"]["gemm_gflop_s"]}))
EOF
}

run_transformers() {
  local rep=$1 name temp t0 t1
  for name in greedy temp decode1; do
    temp=0; [ "$name" = temp ] && temp=$temperature
    local extra=(--prompts "$prompts" --max-new-tokens $new_tokens --temperature "$temp")
    [ "$name" = decode1 ] && extra=(--decode1 64)
    t0=$(now)
    "$py" "$here/hf_generate.py" --gguf "$f32" --threads "$threads" "${extra[@]}" \
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
  local rep=$1 t0 t1 g
  t0=$(now)
  "$llama_bin/llama-batched-bench" -m "$f32" -c 1024 -npp 24 -ntg $new_tokens -npl 4 \
    -t "$threads" -tb "$threads" --output-format jsonl \
    > "$out/llama-batched-$rep.txt" 2> "$out/llama-batched-$rep.log"
  t1=$(now)
  "$py" - "$out/llama-batched-$rep.txt" "$rep" "$(elapsed "$t0" "$t1")" <<'EOF' | stamp
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
r = [x for x in rows if "pl" in x or "npl" in x][-1]
t = float(r["t"])
print(json.dumps({"system": "llama.cpp", "weights": "F32", "rep": int(sys.argv[2]), "job": "batched",
                  "wall_s": float(sys.argv[3]), "gen_s": t, "new_tokens": 4 * 75,
                  "t_pp": r.get("t_pp"), "t_tg": r.get("t_tg")}))
EOF
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

bg=0
for rep in $(seq 1 "$reps"); do
  if want lmgen; then wait_idle; log "rep $rep/$reps: lmgen"; run_lmgen "$rep"; fi
  if want transformers; then wait_idle; log "rep $rep/$reps: transformers"; run_transformers "$rep"; fi
  if want llama.cpp; then wait_idle; log "rep $rep/$reps: llama.cpp"; run_llama "$rep"; fi
done
if [ -n "$reuse" ]; then
  "$py" - "$reuse/runs.jsonl" "$only" >> "$runs" <<'EOF'
import json, sys
keep = set(sys.argv[2].split(","))
for l in open(sys.argv[1]):
    if l.strip() and json.loads(l)["system"] not in keep:
        print(l.strip())
EOF
  echo "- rows of systems other than $only reused from $reuse" >> "$out/env.md"
fi

# ---- the report --------------------------------------------------------------------------
"$py" - "$runs" "$out/env.md" "$threads" > "$out/report.md" <<'EOF'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
env = open(sys.argv[2]).read()
threads = sys.argv[3]

def pick(system, weights, job, key):
    return [r[key] for r in runs if r["system"] == system and r["weights"] == weights
            and r["job"] == job and r.get(key) is not None]

def med(xs):
    return statistics.median(xs) if xs else None

def f(x, d=1):
    return "—" if x is None else f"{x:.{d}f}"

rows = {}
def row(label, system, weights, greedy_job, temp_job):
    r = {}
    r["load"] = med(pick(system, weights, "decode1", "load_s") or pick(system, weights, greedy_job, "load_s"))
    for tag, job in (("g", greedy_job), ("t", temp_job)):
        if job is None:
            continue
        walls = pick(system, weights, job, "wall_s")
        toks = pick(system, weights, job, "new_tokens")
        r[tag + "wall"] = med(walls)
        r[tag + "tokens"] = med(toks)
        gens = pick(system, weights, job, "gen_s")
        if gens:
            tps = [n / g for n, g in zip(toks, gens)]
        elif walls and r["load"] is not None:
            tps = [n / (w - r["load"]) for n, w in zip(toks, walls)]
        else:
            tps = []
        r[tag + "tps"] = med(tps)
    r["d1"] = med(pick(system, weights, "decode1", "decode1_tok_s"))
    rows[label] = r

row("lmgen (F32)", "lmgen", "F32", "greedy", "temp")
row("transformers (F32)", "transformers", "F32", "greedy", "temp")
row("llama.cpp (F32)", "llama.cpp", "F32", "batched", None)
row("llama.cpp (F16)", "llama.cpp", "F16", None, None)
row("llama.cpp (Q4_1)", "llama.cpp", "Q4_1", None, None)
rows = {k: v for k, v in rows.items() if any(x is not None for x in v.values())}

out = ["## Setup", "", env.rstrip(), "",
       f"## Results (SmolLM2-135M-Instruct, {threads} threads, median of the runs)", "",
       "| system | load s | 4×75 greedy: wall s | tokens | gen tok/s | 4×75 T=0.95: wall s | tokens | gen tok/s | batch-1 decode tok/s |",
       "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
for k, r in rows.items():
    tw = "(no sampling)" if k.startswith("llama.cpp (F32)") else "—"
    out.append(f"| {k} | {f(r.get('load'), 2)} | {f(r.get('gwall'), 2)} | {f(r.get('gtokens'), 0)} | "
               f"{f(r.get('gtps'))} | {f(r.get('twall'), 2) if r.get('twall') else tw} | "
               f"{f(r.get('ttokens'), 0)} | {f(r.get('ttps'))} | {f(r.get('d1'))} |")
out += ["",
        "wall: the whole process, model load included (transformers: also `import torch`); "
        "gen tok/s: generated tokens / (wall − load) for lmgen, / generate() time for "
        "transformers, / llama-batched-bench's T (prefill + decode) for llama.cpp, which always "
        "generates 4×75 and does not sample. lmgen's load s and batch-1 decode come from "
        "`lmgen bench MODEL` (64 steps after a 24-token prompt), transformers' from 64 KV-cached "
        "steps, llama.cpp's from `llama-bench -n 64 -p 0`.", ""]

L = rows.get("lmgen (F32)")
def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b
if L:
    out += ["### Ratios (lmgen ÷ other; > 1 means lmgen is faster)", "",
            "| vs | greedy gen tok/s | greedy wall (other ÷ lmgen) | T=0.95 gen tok/s | batch-1 decode |",
            "|---|---:|---:|---:|---:|"]
    for k, r in rows.items():
        if k == "lmgen (F32)":
            continue
        out.append(f"| {k} | {f(ratio(L.get('gtps'), r.get('gtps')), 2)} | "
                   f"{f(ratio(r.get('gwall'), L.get('gwall')), 2)} | "
                   f"{f(ratio(L.get('ttps'), r.get('ttps')), 2)} | {f(ratio(L.get('d1'), r.get('d1')), 2)} |")
    lim = [(r["read_gb_s"], r["gemm_gflop_s"]) for r in runs if r["system"] == "lmgen" and "read_gb_s" in r]
    if lim:
        out += ["", "Machine limits measured by `lmgen bench` during the lmgen runs: read bandwidth "
                + ", ".join(f"{a:.1f}" for a, _ in lim) + f" GB/s ({threads} threads); candle f32 GEMM "
                + ", ".join(f"{b:.0f}" for _, b in lim) + " GFLOP/s."]

out += ["", "### Every run", "",
        "bg CPUs: load of the rest of the machine just before the system's turn (0 = idle).", "",
        "| rep | system | weights | job | wall s | load s | tokens | gen s | decode-1 tok/s | bg CPUs |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
for r in sorted(runs, key=lambda r: (r["rep"], r["system"], r["weights"], r["job"])):
    out.append(f"| {r['rep']} | {r['system']} | {r['weights']} | {r['job']} | {f(r.get('wall_s'), 2)} | "
               f"{f(r.get('load_s'), 2)} | {r.get('new_tokens', '—')} | {f(r.get('gen_s'), 2)} | "
               f"{f(r.get('decode1_tok_s'))} | {f(r.get('bg_cpus'), 2)} |")
print("\n".join(out))
EOF
cat "$out/report.md"
log "report: $out/report.md (raw: $runs)"
