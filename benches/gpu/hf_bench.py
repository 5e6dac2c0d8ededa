"""The transformers side of the GPU benchmark: the seed's job (batch 4, 75 new tokens,
do_sample=True, temperature=0.95) on a randomly initialised model of a preset's shape, bf16,
on one GPU, `device_map="auto"` as the seed's lm_gen.py did. Prints one JSON line.

  python benches/gpu/hf_bench.py --preset galactica-6.7b
"""
import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM

SHAPES = {
    "galactica-6.7b": dict(model_type="opt", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384,
                           vocab_size=50000, max_position_embeddings=2048, activation_function="gelu", word_embed_proj_dim=4096),
    "opt-30b": dict(model_type="opt", hidden_size=7168, num_hidden_layers=48, num_attention_heads=56, ffn_dim=28672,
                    vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=7168),
    "gpt-neox-20b": dict(model_type="gpt_neox", hidden_size=6144, num_hidden_layers=44, num_attention_heads=64,
                         intermediate_size=24576, vocab_size=50432, rotary_pct=0.25, max_position_embeddings=2048),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", required=True, choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=75)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    kw = dict(SHAPES[a.preset])
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    t = time.perf_counter()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    model.eval()
    torch.cuda.synchronize()
    init_s = time.perf_counter() - t
    ids = torch.randint(10, 1000, (a.batch, a.prompt_tokens), device="cuda")
    times = []
    for _ in range(a.runs + 1):  # first run warms up kernels
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new_tokens,
                                 min_new_tokens=a.new_tokens, do_sample=True, temperature=0.95, pad_token_id=1)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    assert out.shape[1] == a.prompt_tokens + a.new_tokens
    print(json.dumps({"system": "transformers", "preset": a.preset, "dtype": "bf16", "batch": a.batch,
                      "new_tokens": a.new_tokens, "init_s": init_s, "generate_s": sorted(times[1:])[len(times[1:]) // 2],
                      "runs_s": times[1:], "torch": torch.__version__, "gpu": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
