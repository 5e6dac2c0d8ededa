//! GPT-NeoX / Pythia (`GPTNeoXForCausalLM`): partial rotary, parallel or sequential residual,
//! per-head interleaved fused QKV, untied `embed_out` head by default.
use super::{load_interleaved_blocks, BlockNames, Family, Loader, Weights};
use crate::config::*;
use crate::error::Result;
use crate::weights::gguf::{Fix, GgufArch, GgufFile};
use serde_json::{Map, Value};

/// `config.json` of a GPT-NeoX GGUF: the residual kind; the rotary base is llama.cpp's
/// default unless the file has one (the converter writes none).
fn gguf_config(g: &GgufFile, c: &mut Map<String, Value>) -> Result<()> {
    let parallel = g.md_bool(&g.key("use_parallel_residual")).unwrap_or(true);
    c.insert("use_parallel_residual".into(), parallel.into());
    let bias = g.has("gpt_neox.layers.0.attention.query_key_value.bias");
    c.insert("attention_bias".into(), bias.into());
    Ok(())
}

pub const FAMILY: Family = Family {
    name: "gpt_neox",
    architectures: &["GPTNeoXForCausalLM"],
    model_types: &["gpt_neox"],
    gguf: &[GgufArch {
        arch: "gptneox",
        class: "GPTNeoXForCausalLM",
        blocks: "gpt_neox.layers",
        tensors: &[&[
            ("token_embd", "gpt_neox.embed_in", Fix::Keep),
            ("output_norm", "gpt_neox.final_layer_norm", Fix::Keep),
            ("output", "embed_out", Fix::Keep),
            ("attn_norm", "input_layernorm", Fix::Keep),
            ("attn_qkv", "attention.query_key_value", Fix::Deinterleaved),
            ("attn_output", "attention.dense", Fix::Keep),
            ("ffn_norm", "post_attention_layernorm", Fix::Keep),
            ("ffn_up", "mlp.dense_h_to_4h", Fix::Keep),
            ("ffn_down", "mlp.dense_4h_to_h", Fix::Keep),
        ]],
        config: gguf_config,
    }],
    spec,
    load,
};

pub fn spec(c: &RawConfig, _arch: &str) -> Result<ModelSpec> {
    let e = c.req_usize(&["hidden_size"])?;
    let nh = c.req_usize(&["num_attention_heads"])?;
    let hd = super::head_dim(c, e, nh, "num_attention_heads")?;
    let max_positions = c.req_usize(&["max_position_embeddings"])?;
    let bias = c.bool_or("attention_bias", true)?;
    Ok(ModelSpec {
        vocab_size: c.req_usize(&["vocab_size"])?,
        hidden_size: e,
        num_layers: c.req_usize(&["num_hidden_layers"])?,
        num_heads: nh,
        num_kv_heads: nh,
        head_dim: hd,
        intermediate_size: c.req_usize(&["intermediate_size"])?,
        max_positions,
        norm_eps: c.f64_any(&["layer_norm_eps"])?.unwrap_or(1e-5),
        positions: Positions::Rope(rope_spec(c, hd, 0.25, 10000.0, max_positions)?),
        residual: if c.bool_or("use_parallel_residual", true)? {
            Residual::Parallel
        } else {
            Residual::Sequential
        },
        activation: c.activation(&["hidden_act"], "gelu")?,
        qkv_bias: bias,
        out_bias: bias,
        attn_scale: 1.0 / (hd as f64).sqrt(),
        tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
        embed_dim: e,

        ..ModelSpec::defaults(c)
    })
}

pub fn load(s: &ModelSpec, l: &Loader) -> Result<Weights> {
    l.ignore_buffers(&[
        ".attention.bias",
        ".attention.masked_bias",
        ".rotary_emb.inv_freq",
    ]);
    let names = BlockNames {
        ln1: "input_layernorm",
        ln2: "post_attention_layernorm",
        qkv: "attention.query_key_value",
        out: "attention.dense",
        fc_in: "mlp.dense_h_to_4h",
        fc_out: "mlp.dense_4h_to_h",
    };
    let embed = l.embedding("gpt_neox.embed_in.weight", s.vocab_size, s.hidden_size)?;
    Ok(Weights {
        pos_embed: None,
        embed_norm: None,
        project_in: None,
        blocks: load_interleaved_blocks(s, l, "gpt_neox.layers", &names)?,
        final_norm: Some(l.tail().norm(
            "gpt_neox.final_layer_norm",
            s.norm,
            s.hidden_size,
            s.norm_eps,
        )?),
        project_out: None,
        lm_head: l
            .tail()
            .head(s, &embed, "gpt_neox.embed_in.weight", "embed_out.weight")?,
        embed,
    })
}
