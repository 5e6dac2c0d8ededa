//! Llama-style (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`,
//! `Qwen3ForCausalLM`): RMSNorm, RoPE (with scaling variants), GQA/MQA, SwiGLU, optional QKV
//! bias and sliding window; Qwen3 adds per-head q/k RMSNorm.
use super::{heads, layer_types, load_llama_like, Family, Layout, Loader, Weights};
use crate::config::*;
use crate::error::Result;
use crate::weights::gguf::{Fix, GgufArch, GgufFile, LLAMA_TENSORS};
use serde_json::{Map, Value};

pub const FAMILY: Family = Family {
    name: "llama",
    architectures: &[
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
    ],
    model_types: &["llama", "mistral", "qwen2", "qwen3"],
    gguf: &[
        GgufArch {
            arch: "llama",
            class: "LlamaForCausalLM",
            blocks: "model.layers",
            // llama.cpp's llama converter permutes the Q/K rows for its interleaved rope.
            tensors: &[
                &[
                    ("attn_q", "self_attn.q_proj", Fix::PermutedQ),
                    ("attn_k", "self_attn.k_proj", Fix::PermutedK),
                ],
                LLAMA_TENSORS,
            ],
            config: gguf_config,
        },
        GgufArch {
            arch: "qwen2",
            class: "Qwen2ForCausalLM",
            blocks: "model.layers",
            tensors: &[LLAMA_TENSORS],
            config: gguf_config,
        },
        GgufArch {
            arch: "qwen3",
            class: "Qwen3ForCausalLM",
            blocks: "model.layers",
            tensors: &[LLAMA_TENSORS],
            config: gguf_config,
        },
    ],
    spec,
    load,
};

pub fn spec(c: &RawConfig, arch: &str) -> Result<ModelSpec> {
    let e = c.req_usize(&["hidden_size"])?;
    let (nh, hd) = heads(c, e, &["num_attention_heads"])?;
    let model_type = c.get("model_type").and_then(|m| m.as_str());
    let qwen3 = arch == "Qwen3ForCausalLM" || model_type == Some("qwen3");
    let max_positions = c.req_usize(&["max_position_embeddings"])?;
    let layers = c.req_usize(&["num_hidden_layers"])?;
    let qwen2 = arch == "Qwen2ForCausalLM" || model_type == Some("qwen2");
    let qwen = qwen2 || qwen3;
    let attention_bias = c.bool_or("attention_bias", false)?;
    // transformers: explicit `layer_types`, else Mistral windows every layer and Qwen2/3 (only
    // with `use_sliding_window`) the layers from `max_window_layers` on.
    let mut sliding_window = c.usize_any(&["sliding_window"])?;
    if qwen && !c.bool_or("use_sliding_window", false)? {
        sliding_window = None;
    }
    let from = if qwen {
        c.usize_any(&["max_window_layers"])?.unwrap_or(0)
    } else {
        0
    };
    let sliding_layers = layer_types(c, layers, |i| sliding_window.is_some() && i >= from)?;
    Ok(ModelSpec {
        vocab_size: c.req_usize(&["vocab_size"])?,
        hidden_size: e,
        num_layers: layers,
        num_heads: nh,
        num_kv_heads: c.usize_any(&["num_key_value_heads"])?.unwrap_or(nh),
        head_dim: hd,
        intermediate_size: c.req_usize(&["intermediate_size"])?,
        max_positions,
        norm: NormKind::RmsNorm,
        norm_eps: c.f64_any(&["rms_norm_eps"])?.unwrap_or(1e-6),
        positions: Positions::Rope(rope_spec(c, hd, 1.0, 10000.0, max_positions)?),
        mlp: MlpKind::Gated,
        activation: c.activation(&["hidden_act", "hidden_activation"], "silu")?,
        qkv_bias: qwen2 || attention_bias,
        qk_norm: qwen3,
        out_bias: attention_bias,
        mlp_bias: c.bool_or("mlp_bias", false)?,
        attn_scale: 1.0 / (hd as f64).sqrt(),
        sliding_window,
        sliding_layers,
        tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
        embed_dim: e,

        ..ModelSpec::defaults(c)
    })
}

pub fn load(s: &ModelSpec, l: &Loader) -> Result<Weights> {
    let qk = s.qk_norm;
    let layout = Layout {
        q_norm: qk.then_some("self_attn.q_norm"),
        k_norm: qk.then_some("self_attn.k_norm"),
        ..Layout::LLAMA
    };
    load_llama_like(s, l, &layout, "model.norm")
}

/// `config.json` keys of the Llama-style classes from GGUF metadata (also the MoE and OLMo-2
/// variants): transformers' defaults for what the metadata leaves out (Qwen's differ), the
/// head size from the rotary dimensions when no key length is given, biases as the tensors say.
pub fn gguf_config(g: &GgufFile, c: &mut Map<String, Value>) -> Result<()> {
    let arch = g.architecture();
    let qwen = arch.starts_with("qwen");
    c.entry("rms_norm_eps")
        .or_insert(if qwen { 1e-6 } else { 1e-5 }.into());
    c.entry("rope_theta")
        .or_insert(if qwen { 1_000_000.0 } else { 10_000.0 }.into());
    c.entry("max_position_embeddings")
        .or_insert(if qwen { 32768 } else { 2048 }.into());
    c.insert("hidden_act".into(), "silu".into());
    if g.md_u64(&g.key("attention.key_length")).is_none() {
        if let Some(d) = g.md_u64(&g.key("rope.dimension_count")) {
            c.insert("head_dim".into(), d.into());
        }
    }
    c.remove("partial_rotary_factor");
    if !matches!(arch, "qwen2" | "qwen2moe") {
        let bias = g.has("model.layers.0.self_attn.q_proj.bias");
        c.insert("attention_bias".into(), bias.into());
        c.insert("mlp_bias".into(), false.into());
    }
    Ok(())
}
