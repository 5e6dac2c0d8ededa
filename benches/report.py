"""Markdown report of a benches/compare.sh run: python3 benches/report.py OUT_DIR.

Reads OUT_DIR/runs.jsonl (one JSON object per run) and OUT_DIR/env.md (versions, machine);
medians per system, ratios, and every run. Standard library only.
"""
import json, os, statistics, sys
outdir = sys.argv[1]
runs = [json.loads(l) for l in open(os.path.join(outdir, "runs.jsonl")) if l.strip()]
env = open(os.path.join(outdir, "env.md")).read()
threads = env.split("threads: ", 1)[1].split(" ", 1)[0] if "threads: " in env else "?"

# Runs that shared the machine with other work (other_cpus >= 0.25) are left out of the
# medians when a clean run of the same thing exists; they stay in the list of every run.
BUSY = 0.25
def busy(r):
    return (r.get("other_cpus") or 0) >= BUSY

# Same job, same weights: greedy continuations of lmgen and transformers should agree.
same = None
lp, hp = os.path.join(outdir, "lmgen-F32-greedy-1.jsonl"), os.path.join(outdir, "hf-greedy-1.json")
if os.path.exists(lp) and os.path.exists(hp):
    lt = [json.loads(l)["text"] for l in open(lp) if l.strip()]
    ht = json.load(open(hp))["texts"]
    same = sum(a == b for a, b in zip(lt, ht)), len(ht)

def pick(system, weights, job, key):
    rs = [r for r in runs if r["system"] == system and r["weights"] == weights
          and r["job"] == job and r.get(key) is not None]
    clean = [r for r in rs if not busy(r)]
    return [r[key] for r in (clean or rs)]

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
    if r["load"] is None and greedy_job:
        # llama.cpp: everything outside batched-bench's own timing (start-up, load, warm-up).
        w, g = pick(system, weights, greedy_job, "wall_s"), pick(system, weights, greedy_job, "gen_s")
        r["load"] = med([a - b for a, b in zip(w, g)])
    r["d1"] = med(pick(system, weights, "decode1", "decode1_tok_s"))
    notes = sorted({x for j in (greedy_job, temp_job) if j for x in pick(system, weights, j, "note")})
    if notes:
        label = f"{label} [{'; '.join(notes)}]"
    rows[label] = r

row("lmgen (F32)", "lmgen", "F32", "greedy", "temp")
row("transformers (F32)", "transformers", "F32", "greedy", "temp")
row("llama.cpp (F32)", "llama.cpp", "F32", "batched", None)
row("llama.cpp (F16)", "llama.cpp", "F16", None, None)
row("lmgen (Q4_1)", "lmgen", "Q4_1", "greedy", "temp")
row("llama.cpp (Q4_1)", "llama.cpp", "Q4_1", "batched", None)
rows = {k: v for k, v in rows.items() if any(x is not None for x in v.values())}

out = ["### Setup", "", env.rstrip(), "",
       f"### SmolLM2-135M-Instruct, {threads} threads, median of the runs", "",
       "| system | load s | 4×75 greedy: wall s | tokens | gen tok/s | 4×75 T=0.95: wall s | tokens | gen tok/s | batch-1 decode tok/s |",
       "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
for k, r in rows.items():
    tw = "(no sampling)" if k.startswith("llama.cpp") and r.get("gwall") else "—"
    out.append(f"| {k} | {f(r.get('load'), 2)} | {f(r.get('gwall'), 2)} | {f(r.get('gtokens'), 0)} | "
               f"{f(r.get('gtps'))} | {f(r.get('twall'), 2) if r.get('twall') else tw} | "
               f"{f(r.get('ttokens'), 0)} | {f(r.get('ttps'))} | {f(r.get('d1'))} |")
out += ["",
        "wall: the whole process, model load included (transformers: also `import torch`); "
        "load s for llama.cpp: wall − batched-bench's own time (start-up, load, warm-up); "
        "gen tok/s: generated tokens / (wall − load) for lmgen, / generate() time for "
        "transformers, / llama-batched-bench's T (prefill + decode) for llama.cpp, which always "
        "generates 4×75 tokens of 24-token prompts and does not sample. lmgen's load s and batch-1 decode come from "
        "`lmgen bench MODEL` (64 steps after a 24-token prompt), transformers' from 64 KV-cached "
        "steps, llama.cpp's from `llama-bench -n 64 -p 0`."]
if same:
    out += ["", f"Greedy continuations identical in lmgen and transformers: {same[0]} of {same[1]} prompts."]
out += [""]

def ratio(a, b):
    return None if a is None or b in (None, 0) else a / b
# Same weights, same precision: lmgen's F32 row against the F32 rows, its Q4_1 row against
# llama.cpp's Q4_1 (llama.cpp's F16 is listed above for reference only).
pairs = [("lmgen (F32)", "transformers (F32)"), ("lmgen (F32)", "llama.cpp (F32)"),
         ("lmgen (Q4_1)", "llama.cpp (Q4_1)")]
full = lambda short: next((k for k in rows if k.startswith(short)), None)
pairs = [(full(a), full(b)) for a, b in pairs if full(a) and full(b)]
if pairs:
    out += ["#### Ratios (lmgen ÷ other at the same precision; > 1 means lmgen is faster)", "",
            "| lmgen vs | greedy gen tok/s | greedy wall (other ÷ lmgen) | T=0.95 gen tok/s | batch-1 decode |",
            "|---|---:|---:|---:|---:|"]
    for a, b in pairs:
        L, r = rows[a], rows[b]
        out.append(f"| {b} | {f(ratio(L.get('gtps'), r.get('gtps')), 2)} | "
                   f"{f(ratio(r.get('gwall'), L.get('gwall')), 2)} | "
                   f"{f(ratio(L.get('ttps'), r.get('ttps')), 2)} | {f(ratio(L.get('d1'), r.get('d1')), 2)} |")
lim = [(r["read_gb_s"], r["gemm_gflop_s"]) for r in runs if r["system"] == "lmgen" and "read_gb_s" in r]
if lim:
    out += ["", "Machine limits measured by `lmgen bench` during the lmgen runs: read bandwidth "
            + ", ".join(f"{a:.1f}" for a, _ in lim) + f" GB/s ({threads} threads); candle f32 GEMM "
            + ", ".join(f"{b:.0f}" for _, b in lim) + " GFLOP/s."]

out += ["", "#### Every run", "",
        "bg / other CPUs: what the rest of the machine used just before / during the "
        f"system's turn (0 = idle); * = shared the machine (other ≥ {BUSY}), left out of the "
        "medians when a clean run exists.", "",
        "| rep | system | weights | job | wall s | load s | tokens | gen s | decode-1 tok/s | bg / other CPUs |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
for r in sorted(runs, key=lambda r: (r["rep"], r["system"], r["weights"], r["job"])):
    out.append(f"| {r['rep']} | {r['system']} | {r['weights']} | {r['job']}{' (' + r['note'] + ')' if r.get('note') else ''} | {f(r.get('wall_s'), 2)} | "
               f"{f(r.get('load_s'), 2)} | {r.get('new_tokens', '—')} | {f(r.get('gen_s'), 2)} | "
               f"{f(r.get('decode1_tok_s'))} | {f(r.get('bg_cpus'), 2)} / {f(r.get('other_cpus'), 2)}{' *' if busy(r) else ''} |")
print("\n".join(out))
