#!/usr/bin/env bash
# ONE script for the GPU machine (see README "NVIDIA GPUs"): numerical checks, then the
# benchmark, results under $OUT. Carry a CUDA build of lmgen as ./lmgen (or set LMGEN).
#   OUT=/tmp/out LMGEN=./lmgen TORCH_PYTHON=python3 benches/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-gpu-results}; mkdir -p "$OUT"
PY=${TORCH_PYTHON:-python3}
LMGEN=${LMGEN:-./lmgen}
# CUDA libraries from the torch environment's nvidia wheels; the driver provides libcuda.
NV_LIBS=$("$PY" -c 'import nvidia, glob, os; print(":".join(sorted(d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib")))))' 2>/dev/null)
export LD_LIBRARY_PATH="$NV_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; "$LMGEN" --version; "$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'; } > "$OUT/versions.txt" 2>&1
echo "== numerical checks (fixtures on CUDA vs CPU goldens)"
timeout 240 "$PY" benches/gpu/check_fixtures.py --lmgen "$LMGEN" --out "$OUT/fixtures.json" | tee "$OUT/fixtures.txt"
echo "== benchmark: batch 4 x 75 new tokens, temperature 0.95"
for preset in galactica-6.7b opt-30b gpt-neox-20b; do
  timeout 150 "$LMGEN" bench --preset "$preset" --device cuda --batch-sizes 4 --prompt-tokens 24 --decode-tokens 75 --json > "$OUT/lmgen-$preset.json" 2> "$OUT/lmgen-$preset.err"
  timeout 150 "$PY" benches/gpu/hf_bench.py --preset "$preset" > "$OUT/hf-$preset.json" 2> "$OUT/hf-$preset.err"
done
echo "== paged decode attention (LMGEN_CUDA_PAGED=1, experimental; docs/gpu-paged-attention.md)"
# The fixtures' head dims (6-16) are below the kernels' (64-512): this checks the fallback.
# galactica-6.7b (head dim 128) runs the kernel: once compared with the dense path, once timed.
mkdir -p "$OUT/paged"
LMGEN_CUDA_PAGED=1 timeout 240 "$PY" benches/gpu/check_fixtures.py --lmgen "$LMGEN" --out "$OUT/paged/fixtures.json" > "$OUT/paged/fixtures.txt" 2>&1
echo "fixture checks with LMGEN_CUDA_PAGED=1: exit $? ($(tail -1 "$OUT/paged/fixtures.txt"))"
PAGED_PRESET=galactica-6.7b
LMGEN_CUDA_PAGED=1 LMGEN_CUDA_PAGED_CHECK=1 timeout 150 "$LMGEN" bench --preset "$PAGED_PRESET" --device cuda --batch-sizes 4 --prompt-tokens 24 --decode-tokens 75 --json > "$OUT/paged/check-$PAGED_PRESET.json" 2> "$OUT/paged/check-$PAGED_PRESET.err"
echo "kernel vs dense path (exit $?):"; grep -E 'paged|error' "$OUT/paged/check-$PAGED_PRESET.err" | tail -4
LMGEN_CUDA_PAGED=1 timeout 150 "$LMGEN" bench --preset "$PAGED_PRESET" --device cuda --batch-sizes 4 --prompt-tokens 24 --decode-tokens 75 --json > "$OUT/paged/lmgen-$PAGED_PRESET.json" 2> "$OUT/paged/lmgen-$PAGED_PRESET.err"
echo "timed with LMGEN_CUDA_PAGED=1: exit $?"
timeout 150 "$LMGEN" plan --preset bloom-176b --device auto --quantize q4_k > "$OUT/plan-bloom-176b.txt" 2>&1
"$PY" - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
for preset in ["galactica-6.7b", "opt-30b", "gpt-neox-20b"]:
    try:
        l = json.load(open(os.path.join(out, f"lmgen-{preset}.json")))
        h = json.loads(open(os.path.join(out, f"hf-{preset}.json")).read().strip().splitlines()[-1])
        lt = 4 * 75 / next(d["tokens_per_s"] for d in l["decode"] if d["batch"] == 4)
        print(f"{preset}: lmgen {lt:.2f} s, transformers {h['generate_s']:.2f} s, ratio {h['generate_s'] / lt:.2f}x")
    except Exception as e:  # report what is missing, go on
        print(f"{preset}: incomplete ({e})")
for preset in ["galactica-6.7b"]:
    try:
        tps = lambda p: next(d["tokens_per_s"] for d in json.load(open(p))["decode"] if d["batch"] == 4)
        d, p = tps(os.path.join(out, f"lmgen-{preset}.json")), tps(os.path.join(out, "paged", f"lmgen-{preset}.json"))
        print(f"{preset} decode, batch 4: default {d:.1f} tok/s, LMGEN_CUDA_PAGED=1 {p:.1f} tok/s ({p / d:.2f}x)")
    except Exception as e:
        print(f"{preset} paged: incomplete ({e})")
PYEOF
