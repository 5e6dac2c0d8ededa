//! Falcon (`FalconForCausalLM`, and the older `RWForCausalLM` configs): fused QKV in three
//! layouts (per-head interleaved; multi-query `[q; k; v]`; the new decoder architecture's
//! per-kv-group `[q heads, k, v]`), rotary or ALiBi (scaled with the scores), parallel or
//! sequential blocks with one or two LayerNorms, GELU MLP, optional biases, tied head.
//! With ALiBi, transformers rounds the slopes and also the products slope × position to
//! bfloat16 (absolute key positions, cast to bfloat16 first), so past position 256 the bias
//! moves in steps; lmgen builds the bias the same way (`alibi_bf16_products`), in the CPU
//! kernel and in the dense (candle) attention path alike. All of this is transformers' eager
//! attention (what the fixtures use): its SDPA path, the default in transformers 5, adds the
//! ALiBi bias only once (through the mask, scaled by 1/sqrt(head_dim)) and gives different
//! numbers (0.52 in logprob on a 10-token input of the falcon-rw fixture).
use super::{degroup_qkv, heads, Family, Loader, Weights};
use crate::config::*;
use crate::error::Result;
use crate::model::decoder::Block;
use crate::weights::gguf::{Fix, GgufArch, GgufFile};
use serde_json::{Map, Value};

/// `config.json` of a Falcon GGUF. llama.cpp runs Falcon as a parallel block with rotary
/// positions; two norms per block (`attn_norm_2`) mean the new decoder architecture.
fn gguf_config(g: &GgufFile, c: &mut Map<String, Value>) -> Result<()> {
    let new = g.has("transformer.h.0.ln_attn.weight");
    let kv = c.get("num_key_value_heads").cloned().unwrap_or(1.into());
    c.insert("new_decoder_architecture".into(), new.into());
    c.insert("num_kv_heads".into(), kv.clone());
    c.insert("multi_query".into(), (kv.as_u64() == Some(1)).into());
    c.insert("parallel_attn".into(), true.into());
    c.insert("alibi".into(), false.into());
    let bias = g.has("transformer.h.0.self_attention.query_key_value.bias");
    c.insert("bias".into(), bias.into());
    if let Some(&[inter, _]) = g.shape("transformer.h.0.mlp.dense_h_to_4h.weight") {
        c.insert("ffn_hidden_size".into(), inter.into());
    }
    Ok(())
}

pub const FAMILY: Family = Family {
    name: "falcon",
    architectures: &["FalconForCausalLM", "RWForCausalLM"],
    model_types: &["falcon", "RefinedWebModel", "RefinedWeb"],
    gguf: &[GgufArch {
        arch: "falcon",
        class: "FalconForCausalLM",
        blocks: "transformer.h",
        tensors: &[&[
            ("token_embd", "transformer.word_embeddings", Fix::Keep),
            ("output_norm", "transformer.ln_f", Fix::Keep),
            ("output", "lm_head", Fix::Keep),
            // llama.cpp: `ln_mlp` (or a single norm's `input_layernorm`), then `ln_attn`.
            ("attn_norm", "input_layernorm", Fix::Keep),
            ("attn_norm_2", "ln_attn", Fix::Keep),
            // The converter's "jploski" layout: `[q heads; k heads; v heads]`.
            ("attn_qkv", "self_attention.query_key_value", Fix::Ungrouped),
            ("attn_output", "self_attention.dense", Fix::Keep),
            ("ffn_up", "mlp.dense_h_to_4h", Fix::Keep),
            ("ffn_down", "mlp.dense_4h_to_h", Fix::Keep),
        ]],
        config: gguf_config,
    }],
    spec,
    load,
};

/// `(new_decoder_architecture, multi_query, parallel_attn)`.
fn variant(c: &RawConfig) -> Result<(bool, bool, bool)> {
    let refined_web = c.get("model_type").and_then(|m| m.as_str()) == Some("RefinedWeb");
    let new = c.bool_or("new_decoder_architecture", refined_web)?;
    let mq = c.bool_or("multi_query", true)?;
    let parallel = new || c.bool_or("parallel_attn", true)?;
    Ok((new, mq, parallel))
}

pub fn spec(c: &RawConfig, _arch: &str) -> Result<ModelSpec> {
    let e = c.req_usize(&["hidden_size", "n_embed"])?;
    let (nh, hd) = heads(c, e, &["num_attention_heads", "n_head"])?;
    let (new, mq, parallel) = variant(c)?;
    let nkv = if new {
        c.usize_any(&["num_kv_heads", "n_head_kv"])?.unwrap_or(nh)
    } else if mq {
        1
    } else {
        nh
    };
    let max_positions = c.usize_any(&["max_position_embeddings"])?.unwrap_or(2048);
    let alibi = c.bool_or("alibi", false)?;
    let bias = c.bool_or("bias", false)?;
    let positions = if alibi {
        Positions::Alibi
    } else {
        Positions::Rope(rope_spec(c, hd, 1.0, 10000.0, max_positions)?)
    };
    Ok(ModelSpec {
        vocab_size: c.req_usize(&["vocab_size"])?,
        hidden_size: e,
        num_layers: c.req_usize(&["num_hidden_layers", "n_layer"])?,
        num_heads: nh,
        num_kv_heads: nkv,
        head_dim: hd,
        intermediate_size: c.usize_any(&["ffn_hidden_size"])?.unwrap_or(4 * e),
        max_positions,
        norm_eps: c.f64_any(&["layer_norm_epsilon"])?.unwrap_or(1e-5),
        positions,
        residual: if parallel {
            Residual::Parallel
        } else {
            Residual::Sequential
        },
        activation: c.activation(&["activation"], "gelu")?,
        qkv_bias: bias,
        out_bias: bias,
        mlp_bias: bias,
        attn_scale: 1.0 / (hd as f64).sqrt(),
        alibi_slopes: AlibiSlopes::BloomBf16,
        // transformers adds the ALiBi bias twice, each time scaled by 1/sqrt(head_dim): inside
        // the attention, (scores + alibi) / sqrt(hd), and again in the causal mask it builds.
        alibi_scale: 2.0 / (hd as f32).sqrt(),
        // ... and builds it as `slopes.bfloat16() * positions`: products rounded to bfloat16.
        alibi_bf16_products: true,
        tie_embeddings: c.bool_or("tie_word_embeddings", true)?,
        embed_dim: e,
        ..ModelSpec::defaults(c)
    })
}

pub fn load(s: &ModelSpec, l: &Loader) -> Result<Weights> {
    let (e, inter, hd, nh, nkv) = (
        s.hidden_size,
        s.intermediate_size,
        s.head_dim,
        s.num_heads,
        s.num_kv_heads,
    );
    l.ignore_buffers(&[".rotary_emb.inv_freq"]);
    // The new decoder architecture has `ln_attn` and `ln_mlp` (unless num_ln_in_parallel_attn=1).
    // In GGUF files the MLP's norm is the one single-norm files have (`attn_norm`, exposed as
    // `input_layernorm`) and `ln_attn` the second (`attn_norm_2`).
    let two_norms = l.store.contains("transformer.h.0.ln_attn.weight");
    let ln_mlp = if l.store.contains("transformer.h.0.ln_mlp.weight") {
        "ln_mlp"
    } else {
        "input_layernorm"
    };
    let blocks = (0..s.num_layers)
        .map(|i| {
            let l = l.block(i);
            let p = format!("transformer.h.{i}");
            let norm = |n: &str| l.norm(&format!("{p}.{n}"), s.norm, e, s.norm_eps);
            let (ln1, ln2) = if two_norms {
                (norm("ln_attn")?, Some(norm(ln_mlp)?))
            } else if s.residual == Residual::Parallel {
                (norm("input_layernorm")?, None)
            } else {
                (
                    norm("input_layernorm")?,
                    Some(norm("post_attention_layernorm")?),
                )
            };
            let qkv = l.linear(
                &format!("{p}.self_attention.query_key_value"),
                (nh + 2 * nkv) * hd,
                e,
                s.qkv_bias,
            )?;
            // Every layout is per kv group `[group's q heads, k, v]`: one q head per group
            // without multi-query, all heads in one group with it.
            let qkv = degroup_qkv(qkv, nh, nkv, hd)?;
            Ok(Block {
                ln1: Some(ln1),
                ln2,
                post_attn_norm: None,
                post_mlp_norm: None,
                q_norm: None,
                k_norm: None,
                moe: None,
                qkv,
                out: l.linear(&format!("{p}.self_attention.dense"), e, e, s.out_bias)?,
                mlp_in: l.linear(&format!("{p}.mlp.dense_h_to_4h"), inter, e, s.mlp_bias)?,
                mlp_out: l.linear(&format!("{p}.mlp.dense_4h_to_h"), e, inter, s.mlp_bias)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let embed = l.embedding("transformer.word_embeddings.weight", s.vocab_size, e)?;
    let t = l.tail();
    Ok(Weights {
        pos_embed: None,
        embed_norm: None,
        project_in: None,
        blocks,
        final_norm: Some(t.norm("transformer.ln_f", s.norm, e, s.norm_eps)?),
        project_out: None,
        lm_head: t.head(
            s,
            &embed,
            "transformer.word_embeddings.weight",
            "lm_head.weight",
        )?,
        embed,
    })
}
