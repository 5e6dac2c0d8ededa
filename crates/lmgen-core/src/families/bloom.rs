//! BLOOM (`BloomForCausalLM`): ALiBi, embedding LayerNorm, per-head interleaved fused QKV.
use super::{load_interleaved_blocks, BlockNames, Family, Loader, Weights};
use crate::config::*;
use crate::error::Result;
use crate::weights::gguf::{Fix, GgufArch, GgufFile};
use serde_json::{Map, Value};

/// `config.json` of a BLOOM GGUF. The converter's context length is `seq_length` or, absent
/// that, the hidden size; with ALiBi it is no limit, so it is not used.
fn gguf_config(_g: &GgufFile, c: &mut Map<String, Value>) -> Result<()> {
    c.remove("max_position_embeddings");
    Ok(())
}

pub const FAMILY: Family = Family {
    name: "bloom",
    architectures: &["BloomForCausalLM"],
    model_types: &["bloom"],
    gguf: &[GgufArch {
        arch: "bloom",
        class: "BloomForCausalLM",
        blocks: "transformer.h",
        tensors: &[&[
            ("token_embd", "transformer.word_embeddings", Fix::Keep),
            (
                "token_embd_norm",
                "transformer.word_embeddings_layernorm",
                Fix::Keep,
            ),
            ("output_norm", "transformer.ln_f", Fix::Keep),
            ("output", "lm_head", Fix::Keep),
            ("attn_norm", "input_layernorm", Fix::Keep),
            (
                "attn_qkv",
                "self_attention.query_key_value",
                Fix::Deinterleaved,
            ),
            ("attn_output", "self_attention.dense", Fix::Keep),
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
    let e = c.req_usize(&["hidden_size", "n_embed"])?;
    let nh = c.req_usize(&["n_head", "num_attention_heads"])?;
    let hd = super::head_dim(c, e, nh, "n_head")?;
    let post_ln_residual = c.bool_or("apply_residual_connection_post_layernorm", false)?;
    Ok(ModelSpec {
        vocab_size: c.req_usize(&["vocab_size"])?,
        hidden_size: e,
        num_layers: c.req_usize(&["n_layer", "num_hidden_layers"])?,
        num_heads: nh,
        num_kv_heads: nh,
        head_dim: hd,
        intermediate_size: 4 * e,
        // ALiBi has no hard limit; BLOOM was trained on 2048-token sequences.
        max_positions: c
            .usize_any(&["seq_length", "max_position_embeddings"])?
            .unwrap_or(2048),
        norm_eps: c.f64_any(&["layer_norm_epsilon"])?.unwrap_or(1e-5),
        positions: Positions::Alibi,
        residual: if post_ln_residual {
            Residual::SequentialFromNormed
        } else {
            Residual::Sequential
        },
        activation: Activation::GeluTanh,
        attn_scale: 1.0 / (hd as f64).sqrt(),
        embed_norm: true,
        tie_embeddings: c.bool_or("tie_word_embeddings", true)?,
        embed_dim: e,

        ..ModelSpec::defaults(c)
    })
}

pub fn load(s: &ModelSpec, l: &Loader) -> Result<Weights> {
    let l = l
        .clone()
        .with_prefix("transformer.", "word_embeddings.weight");
    let names = BlockNames {
        ln1: "input_layernorm",
        ln2: "post_attention_layernorm",
        qkv: "self_attention.query_key_value",
        out: "self_attention.dense",
        fc_in: "mlp.dense_h_to_4h",
        fc_out: "mlp.dense_4h_to_h",
    };
    let e = s.hidden_size;
    let embed = l.embedding(&l.name("word_embeddings.weight"), s.vocab_size, e)?;
    Ok(Weights {
        pos_embed: None,
        embed_norm: Some(l.norm("word_embeddings_layernorm", s.norm, e, s.norm_eps)?),
        project_in: None,
        blocks: load_interleaved_blocks(s, &l, "h", &names)?,
        final_norm: Some(l.tail().norm("ln_f", s.norm, e, s.norm_eps)?),
        project_out: None,
        lm_head: l.tail().head(
            s,
            &embed,
            &l.name("word_embeddings.weight"),
            "lm_head.weight",
        )?,
        embed,
    })
}
