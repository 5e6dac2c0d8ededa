#!/usr/bin/env python3
"""Write tests/fixtures/topk/torch_topk_ties.json: tie-heavy rows and what torch's CPU topk picks.

Each case has `levels` and `pick` (one digit per element: the row's values are
`levels[int(d)] for d in pick`, a few levels so many exact ties), `k`, `topk` (the indices of
`torch.topk(values, k)`, largest and sorted) and `route` (the indices of
`torch.topk(torch.softmax(values, -1), k)`, which is how transformers' MoE routers pick experts
from router logits; some rows spread over ~200 so that probabilities underflow and distinct
logits tie). n runs over 4..160 and k over 1..8, covering both of torch's algorithms
(`std::partial_sort` when k * 64 <= n, else `std::nth_element` + `std::sort`).

Usage (from the repository root): python scripts/make_topk_fixture.py
"""
import json
import random
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LEVELS = [-4.0, -2.0, -1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0, 3.0]
# Logits far below the maximum: their probabilities are denormal or exactly 0, so distinct
# logits tie after the softmax (`route` differs from `topk` there).
WIDE = [0.0, -87.0, -95.0, -100.0, -103.5, -104.5, -120.0, -200.0]


def main() -> None:
    torch.set_num_threads(1)
    rng = random.Random(20261202)
    sizes = [(n, k) for n in (4, 5, 7, 8, 16, 60, 64) for k in range(1, min(8, n) + 1)]  # expert counts in use
    sizes += [(n, 1) for n in (64, 65, 100, 128, 160)] + [(n, 2) for n in (128, 140, 160)]  # partial_sort
    while len(sizes) < 500:
        n = rng.randint(4, 160)
        sizes.append((n, rng.randint(1, min(8, n))))
    cases = []
    for i, (n, k) in enumerate(sizes):
        if i % 10 == 0:
            levels = [0.0]  # a zero router
        elif i % 10 == 5:
            levels = rng.sample(WIDE, rng.randint(2, 6))
        else:
            levels = rng.sample(LEVELS, rng.randint(1, 4))
        pick = "".join(str(rng.randrange(len(levels))) for _ in range(n))
        t = torch.tensor([levels[int(d)] for d in pick], dtype=torch.float32)
        cases.append({
            "k": k,
            "levels": levels,
            "pick": pick,
            "topk": torch.topk(t, k).indices.tolist(),
            "route": torch.topk(torch.softmax(t, dim=-1), k).indices.tolist(),
        })
    out = ROOT / "tests" / "fixtures" / "topk" / "torch_topk_ties.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"torch": torch.__version__, "cases": cases}
    out.write_text("{\"torch\": %s, \"cases\": [\n%s\n]}\n" % (
        json.dumps(doc["torch"]), ",\n".join(json.dumps(c, separators=(",", ":")) for c in cases)))
    differ = sum(c["topk"] != sorted(c["topk"]) for c in cases)
    underflow = sum(c["topk"] != c["route"] for c in cases)
    print(f"{out.relative_to(ROOT)}: {len(cases)} cases ({differ} where torch's order is not by index, "
          f"{underflow} where the softmax ties distinct values), torch {torch.__version__}")


if __name__ == "__main__":
    main()
