//! Phi-1 / 1.5 / 2 (`PhiForCausalLM`): parallel attention and MLP over one LayerNorm, partial
//! rotary (0.5 by default), biases everywhere including the head, optional per-head q/k
//! LayerNorms (`qk_layernorm`), GELU (tanh) MLP.
use super::{heads, Family, Layout, Loader, MlpIn, Weights};
use crate::config::*;
use crate::error::Result;

pub const FAMILY: Family = Family {
    name: "phi",
    architectures: &["PhiForCausalLM"],
    model_types: &["phi"],
    gguf: &[],
    spec,
    load,
};

pub fn spec(c: &RawConfig, _arch: &str) -> Result<ModelSpec> {
    let e = c.req_usize(&["hidden_size"])?;
    let (nh, hd) = heads(c, e, &["num_attention_heads"])?;
    let max_positions = c.req_usize(&["max_position_embeddings"])?;
    Ok(ModelSpec {
        vocab_size: c.req_usize(&["vocab_size"])?,
        hidden_size: e,
        num_layers: c.req_usize(&["num_hidden_layers"])?,
        num_heads: nh,
        num_kv_heads: c.usize_any(&["num_key_value_heads"])?.unwrap_or(nh),
        head_dim: hd,
        intermediate_size: c.req_usize(&["intermediate_size"])?,
        max_positions,
        norm_eps: c.f64_any(&["layer_norm_eps"])?.unwrap_or(1e-5),
        positions: Positions::Rope(rope_spec(c, hd, 0.5, 10000.0, max_positions)?),
        residual: Residual::Parallel,
        activation: c.activation(&["hidden_act"], "gelu_new")?,
        attn_scale: 1.0 / (hd as f64).sqrt(),
        tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
        head_bias: true,
        embed_dim: e,
        qk_norm: c.bool_or("qk_layernorm", false)?,
        ..ModelSpec::defaults(c)
    })
}

pub fn load(s: &ModelSpec, l: &Loader) -> Result<Weights> {
    let layout = Layout {
        ln2: None,
        q_norm: s.qk_norm.then_some("self_attn.q_layernorm"),
        k_norm: s.qk_norm.then_some("self_attn.k_layernorm"),
        out: "self_attn.dense",
        mlp_in: MlpIn::One("mlp.fc1"),
        mlp_out: "mlp.fc2",
        ..Layout::LLAMA
    };
    super::load_llama_like(s, l, &layout, "model.final_layernorm")
}
