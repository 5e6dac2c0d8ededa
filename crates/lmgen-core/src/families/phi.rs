//! Phi-1 / 1.5 / 2 (`PhiForCausalLM`): parallel attention and MLP over one LayerNorm, partial
//! rotary (0.5 by default), biases everywhere including the head, optional per-head q/k
//! LayerNorms (`qk_layernorm`), GELU (tanh) MLP.
use super::{heads, Family, Layout, Loader, MlpIn, Weights};
use crate::config::*;
use crate::error::Result;
use crate::weights::gguf::{Fix, GgufArch, GgufFile, LLAMA_TENSORS};
use serde_json::{Map, Value};

/// `config.json` of a Phi-2 GGUF: the MLP width from its matrix (the converter writes
/// 4 × hidden whatever the checkpoint has).
fn gguf_config(g: &GgufFile, c: &mut Map<String, Value>) -> Result<()> {
    if let Some(&[inter, _]) = g.shape("model.layers.0.mlp.fc1.weight") {
        c.insert("intermediate_size".into(), inter.into());
    }
    c.insert("hidden_act".into(), "gelu_new".into());
    c.insert("qk_layernorm".into(), false.into());
    Ok(())
}

pub const FAMILY: Family = Family {
    name: "phi",
    architectures: &["PhiForCausalLM"],
    model_types: &["phi"],
    gguf: &[GgufArch {
        arch: "phi2",
        class: "PhiForCausalLM",
        blocks: "model.layers",
        tensors: &[
            &[
                ("output_norm", "model.final_layernorm", Fix::Keep),
                ("attn_output", "self_attn.dense", Fix::Keep),
                ("ffn_up", "mlp.fc1", Fix::Keep),
                ("ffn_down", "mlp.fc2", Fix::Keep),
            ],
            LLAMA_TENSORS,
        ],
        config: gguf_config,
    }],
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
