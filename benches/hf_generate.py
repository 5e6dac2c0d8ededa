"""The transformers side of benches/compare.sh: one job, timed, as one JSON line on stdout.

  python benches/hf_generate.py --model HF_DIR --prompts benches/prompts.txt \
      --threads 2 --max-new-tokens 75 --temperature 0.95      # batch job (all prompts at once)
  python benches/hf_generate.py --model HF_DIR --threads 2 --decode1 64
  python benches/hf_generate.py --model model.gguf --save-hf HF_DIR   # convert once

fp32 on the CPU, batch with left padding, `model.generate`. `--decode1 N` instead times N
single-token steps of one sequence with its KV cache (batch-1 decode), after a short prompt.
--model is a Hugging Face directory or a .gguf file (dequantized by transformers on every
load, which is slow: compare.sh converts the GGUF once with --save-hf and times the
directory, transformers' usual path).
"""
import argparse
import json
import os
import sys
import time

t_start = time.perf_counter()
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

t_import = time.perf_counter() - t_start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--save-hf")
    ap.add_argument("--prompts")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--max-new-tokens", type=int, default=75)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--decode1", type=int, default=0)
    ap.add_argument("--attn", default="sdpa")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.model.endswith(".gguf"):
        d, f = os.path.split(os.path.abspath(args.model))
        where = dict(pretrained_model_name_or_path=d, gguf_file=f)
    else:
        where = dict(pretrained_model_name_or_path=args.model)
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(**where)
    model = AutoModelForCausalLM.from_pretrained(
        **where, dtype=torch.float32, attn_implementation=args.attn
    )
    model.eval()
    load_s = time.perf_counter() - t
    if args.save_hf:
        # transformers marks a GGUF-loaded model as quantized (not serializable); its weights
        # are plain f32 tensors by now, so drop that mark and save them as safetensors.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(args.save_hf)
        tok.save_pretrained(args.save_hf)
        return
    out = {
        "import_s": t_import,
        "load_s": load_s,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn": args.attn,
    }

    if args.decode1:
        ids = tok("The capital of France is", return_tensors="pt").input_ids
        with torch.inference_mode():
            o = model(ids, use_cache=True)
            past, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(args.decode1):
                o = model(nxt, past_key_values=past, use_cache=True)
                past, nxt = o.past_key_values, o.logits[:, -1].argmax(-1, keepdim=True)
            dt = time.perf_counter() - t
        out.update(decode1_tokens=args.decode1, decode1_s=dt, decode1_tok_s=args.decode1 / dt)
        print(json.dumps(out))
        return

    with open(args.prompts, encoding="utf-8") as fh:
        prompts = [line.rstrip("\n") for line in fh if line.strip()]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    t = time.perf_counter()
    enc = tok(prompts, return_tensors="pt", padding=True)
    sample = args.temperature > 0
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=sample,
                      pad_token_id=tok.pad_token_id)
    if sample:
        # Plain temperature sampling, as lmgen's --temperature: no top-k/top-p defaults.
        gen_kwargs.update(temperature=args.temperature, top_k=0, top_p=1.0)
    with torch.inference_mode():
        seqs = model.generate(**enc, **gen_kwargs)
    new = seqs[:, enc.input_ids.shape[1]:]
    eos = set(model.generation_config.eos_token_id
              if isinstance(model.generation_config.eos_token_id, list)
              else [model.generation_config.eos_token_id])
    texts, n_tokens = [], 0
    for row in new.tolist():
        n = 0
        for tid in row:
            n += 1
            if tid in eos:
                break
        n_tokens += n
        texts.append(tok.decode(row[:n], skip_special_tokens=True))
    gen_s = time.perf_counter() - t
    out.update(gen_s=gen_s, new_tokens=n_tokens, prompt_tokens=int(enc.attention_mask.sum()),
               texts=texts)
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
