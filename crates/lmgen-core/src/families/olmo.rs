//! OLMo and OLMo-2 (`OlmoForCausalLM`, `Olmo2ForCausalLM`): the Llama block. OLMo normalizes
//! with a LayerNorm without parameters and may clip q/k/v (`clip_qkv`); OLMo-2 uses RMSNorm
//! on the attention and MLP outputs (no pre-norms) and over the whole q and k projections.
use super::{heads, load_llama_like, Family, Layout, Loader, Weights};
use crate::config::*;
use crate::error::Result;
use crate::weights::gguf::{GgufArch, LLAMA_TENSORS};

pub const FAMILY: Family = Family {
    name: "olmo",
    architectures: &["OlmoForCausalLM", "Olmo2ForCausalLM"],
    model_types: &["olmo", "olmo2"],
    gguf: &[GgufArch {
        arch: "olmo2",
        class: "Olmo2ForCausalLM",
        blocks: "model.layers",
        tensors: &[LLAMA_TENSORS],
        config: super::llama::gguf_config,
    }],
    spec,
    load,
};

pub fn spec(c: &RawConfig, arch: &str) -> Result<ModelSpec> {
    let olmo2 = arch == "Olmo2ForCausalLM";
    let e = c.req_usize(&["hidden_size"])?;
    let (nh, hd) = heads(c, e, &["num_attention_heads"])?;
    let max_positions = c.req_usize(&["max_position_embeddings"])?;
    let bias = c.bool_or("attention_bias", false)?;
    Ok(ModelSpec {
        vocab_size: c.req_usize(&["vocab_size"])?,
        hidden_size: e,
        num_layers: c.req_usize(&["num_hidden_layers"])?,
        num_heads: nh,
        num_kv_heads: c.usize_any(&["num_key_value_heads"])?.unwrap_or(nh),
        head_dim: hd,
        intermediate_size: c.req_usize(&["intermediate_size"])?,
        max_positions,
        norm: if olmo2 {
            NormKind::RmsNorm
        } else {
            NormKind::LayerNorm
        },
        norm_eps: if olmo2 {
            c.f64_any(&["rms_norm_eps"])?.unwrap_or(1e-5)
        } else {
            1e-5
        },
        norm_affine: olmo2,
        positions: Positions::Rope(rope_spec(c, hd, 1.0, 10000.0, max_positions)?),
        mlp: MlpKind::Gated,
        activation: c.activation(&["hidden_act"], "silu")?,
        qkv_bias: bias,
        out_bias: bias,
        mlp_bias: false,
        attn_scale: 1.0 / (hd as f64).sqrt(),
        tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
        embed_dim: e,
        clip_qkv: if olmo2 {
            None
        } else {
            c.f64_any(&["clip_qkv"])?.map(|x| x as f32)
        },
        qk_norm: olmo2,
        qk_norm_whole: true,
        ..ModelSpec::defaults(c)
    })
}

pub fn load(s: &ModelSpec, l: &Loader) -> Result<Weights> {
    let l = l.clone().affine_norms(s.norm_affine);
    let layout = if s.qk_norm {
        Layout {
            ln1: None,
            ln2: None,
            post_attn_norm: Some("post_attention_layernorm"),
            post_mlp_norm: Some("post_feedforward_layernorm"),
            q_norm: Some("self_attn.q_norm"),
            k_norm: Some("self_attn.k_norm"),
            ..Layout::LLAMA
        }
    } else {
        Layout::LLAMA
    };
    load_llama_like(s, &l, &layout, "model.norm")
}
