//! StarCoder2 (`Starcoder2ForCausalLM`): the Llama attention (GQA, RoPE, sliding window) with
//! LayerNorms, a plain GELU MLP (`c_fc`, `c_proj`) and biases everywhere (`use_bias`).
use super::{heads, layer_types, load_llama_like, Family, Layout, Loader, MlpIn, Weights};
use crate::config::*;
use crate::error::Result;
use crate::weights::gguf::{Fix, GgufArch, GgufFile, LLAMA_TENSORS};
use serde_json::{Map, Value};

/// `config.json` of a StarCoder2 GGUF: biases as the tensors say, no sliding window (the
/// converter records none and llama.cpp attends to the whole context).
fn gguf_config(g: &GgufFile, c: &mut Map<String, Value>) -> Result<()> {
    let bias = g.has("model.layers.0.self_attn.q_proj.bias");
    c.insert("use_bias".into(), bias.into());
    c.insert("sliding_window".into(), Value::Null);
    c.insert("hidden_act".into(), "gelu_pytorch_tanh".into());
    Ok(())
}

pub const FAMILY: Family = Family {
    name: "starcoder2",
    architectures: &["Starcoder2ForCausalLM"],
    model_types: &["starcoder2"],
    gguf: &[GgufArch {
        arch: "starcoder2",
        class: "Starcoder2ForCausalLM",
        blocks: "model.layers",
        tensors: &[
            &[
                ("ffn_up", "mlp.c_fc", Fix::Keep),
                ("ffn_down", "mlp.c_proj", Fix::Keep),
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
    let layers = c.req_usize(&["num_hidden_layers"])?;
    let max_positions = c.req_usize(&["max_position_embeddings"])?;
    let bias = c.bool_or("use_bias", true)?;
    let sliding_window = c.usize_any(&["sliding_window"])?;
    Ok(ModelSpec {
        vocab_size: c.req_usize(&["vocab_size"])?,
        hidden_size: e,
        num_layers: layers,
        num_heads: nh,
        num_kv_heads: c.usize_any(&["num_key_value_heads"])?.unwrap_or(nh),
        head_dim: hd,
        intermediate_size: c.req_usize(&["intermediate_size"])?,
        max_positions,
        norm_eps: c.f64_any(&["norm_epsilon"])?.unwrap_or(1e-5),
        positions: Positions::Rope(rope_spec(c, hd, 1.0, 10000.0, max_positions)?),
        activation: c.activation(&["hidden_act"], "gelu_pytorch_tanh")?,
        qkv_bias: bias,
        out_bias: bias,
        mlp_bias: bias,
        attn_scale: 1.0 / (hd as f64).sqrt(),
        sliding_layers: layer_types(c, layers, |_| sliding_window.is_some())?,
        sliding_window,
        tie_embeddings: c.bool_or("tie_word_embeddings", true)?,
        embed_dim: e,
        ..ModelSpec::defaults(c)
    })
}

pub fn load(s: &ModelSpec, l: &Loader) -> Result<Weights> {
    let layout = Layout {
        mlp_in: MlpIn::One("mlp.c_fc"),
        mlp_out: "mlp.c_proj",
        ..Layout::LLAMA
    };
    load_llama_like(s, l, &layout, "model.norm")
}
