//! GPT-2 (`GPT2LMHeadModel`): learned positions, Conv1D weights, fused QKV (q|k|v blocks).
use super::{Family, Loader, Weights};
use crate::config::*;
use crate::error::Result;
use crate::model::decoder::Block;
use crate::weights::gguf::{Fix, GgufArch, GgufFile};
use serde_json::{Map, Value};

/// `config.json` of a GPT-2 GGUF: the MLP width and the position table from their matrices.
fn gguf_config(g: &GgufFile, c: &mut Map<String, Value>) -> Result<()> {
    if let Some(&[_, inter]) = g.shape("transformer.h.0.mlp.c_fc.weight") {
        c.insert("n_inner".into(), inter.into());
    }
    if let Some(&[n, _]) = g.shape("transformer.wpe.weight") {
        c.insert("n_positions".into(), n.into());
    }
    Ok(())
}

pub const FAMILY: Family = Family {
    name: "gpt2",
    architectures: &["GPT2LMHeadModel"],
    model_types: &["gpt2"],
    gguf: &[GgufArch {
        arch: "gpt2",
        class: "GPT2LMHeadModel",
        blocks: "transformer.h",
        tensors: &[&[
            ("token_embd", "transformer.wte", Fix::Keep),
            ("position_embd", "transformer.wpe", Fix::Keep),
            ("output_norm", "transformer.ln_f", Fix::Keep),
            ("output", "lm_head", Fix::Keep),
            ("attn_norm", "ln_1", Fix::Keep),
            ("attn_qkv", "attn.c_attn", Fix::Transposed),
            ("attn_output", "attn.c_proj", Fix::Transposed),
            ("ffn_norm", "ln_2", Fix::Keep),
            ("ffn_up", "mlp.c_fc", Fix::Transposed),
            ("ffn_down", "mlp.c_proj", Fix::Transposed),
        ]],
        config: gguf_config,
    }],
    spec,
    load,
};

pub fn spec(c: &RawConfig, _arch: &str) -> Result<ModelSpec> {
    let e = c.req_usize(&["n_embd", "hidden_size"])?;
    let nh = c.req_usize(&["n_head", "num_attention_heads"])?;
    let hd = super::head_dim(c, e, nh, "n_head")?;
    let positions = c.req_usize(&["n_positions", "max_position_embeddings"])?;
    Ok(ModelSpec {
        vocab_size: c.req_usize(&["vocab_size"])?,
        hidden_size: e,
        num_layers: c.req_usize(&["n_layer", "num_hidden_layers"])?,
        num_heads: nh,
        num_kv_heads: nh,
        head_dim: hd,
        intermediate_size: c.usize_any(&["n_inner"])?.unwrap_or(4 * e),
        max_positions: positions,
        norm_eps: c.f64_any(&["layer_norm_epsilon"])?.unwrap_or(1e-5),
        positions: Positions::Learned {
            offset: 0,
            table_size: positions,
        },
        activation: c.activation(&["activation_function"], "gelu_new")?,
        attn_scale: if c.bool_or("scale_attn_weights", true)? {
            1.0 / (hd as f64).sqrt()
        } else {
            1.0
        },
        scale_by_inverse_layer: c.bool_or("scale_attn_by_inverse_layer_idx", false)?,
        tie_embeddings: c.bool_or("tie_word_embeddings", true)?,
        embed_dim: e,

        ..ModelSpec::defaults(c)
    })
}

pub fn load(s: &ModelSpec, l: &Loader) -> Result<Weights> {
    let l = l.clone().with_prefix("transformer.", "wte.weight");
    // Causal-mask buffers saved by old transformers versions.
    l.ignore_buffers(&[".attn.bias", ".attn.masked_bias"]);
    let (e, inter) = (s.hidden_size, s.intermediate_size);
    let embed = l.embedding(&l.name("wte.weight"), s.vocab_size, e)?;
    let Positions::Learned { table_size, .. } = s.positions else {
        unreachable!("gpt2 uses learned positions")
    };
    let blocks = (0..s.num_layers)
        .map(|i| {
            let l = l.block(i);
            let p = format!("h.{i}");
            Ok(Block {
                ln1: Some(l.norm(&format!("{p}.ln_1"), s.norm, e, s.norm_eps)?),
                ln2: Some(l.norm(&format!("{p}.ln_2"), s.norm, e, s.norm_eps)?),
                qkv: l.conv1d(&format!("{p}.attn.c_attn"), 3 * e, e)?,
                out: l.conv1d(&format!("{p}.attn.c_proj"), e, e)?,
                mlp_in: l.conv1d(&format!("{p}.mlp.c_fc"), inter, e)?,
                mlp_out: l.conv1d(&format!("{p}.mlp.c_proj"), e, inter)?,
                post_attn_norm: None,
                post_mlp_norm: None,
                q_norm: None,
                k_norm: None,
                moe: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Weights {
        pos_embed: Some(l.t("wpe.weight", &[table_size, e])?),
        embed_norm: None,
        project_in: None,
        blocks,
        final_norm: Some(l.tail().norm("ln_f", s.norm, e, s.norm_eps)?),
        project_out: None,
        lm_head: l
            .tail()
            .head(s, &embed, &l.name("wte.weight"), "lm_head.weight")?,
        embed,
    })
}
