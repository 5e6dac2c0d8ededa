//! OPT / Galactica (`OPTForCausalLM`): learned positions with offset 2, pre- or post-norm,
//! optional `project_in/out`, relu or gelu, `enable_bias`.
use super::{fuse, Family, Loader, Weights};
use crate::config::*;
use crate::error::Result;
use crate::model::decoder::Block;

pub const FAMILY: Family = Family {
    name: "opt",
    architectures: &["OPTForCausalLM"],
    model_types: &["opt"],
    gguf: &[],
    spec,
    load,
};

pub fn spec(c: &RawConfig, _arch: &str) -> Result<ModelSpec> {
    let e = c.req_usize(&["hidden_size"])?;
    let nh = c.req_usize(&["num_attention_heads"])?;
    super::head_dim(c, e, nh, "num_attention_heads")?;
    let positions = c.req_usize(&["max_position_embeddings"])?;
    let pre = c.bool_or("do_layer_norm_before", true)?;
    let bias = c.bool_or("enable_bias", true)?;
    Ok(ModelSpec {
        vocab_size: c.req_usize(&["vocab_size"])?,
        hidden_size: e,
        num_layers: c.req_usize(&["num_hidden_layers"])?,
        num_heads: nh,
        num_kv_heads: nh,
        head_dim: e / nh,
        intermediate_size: c.req_usize(&["ffn_dim"])?,
        max_positions: positions,
        norm_eps: 1e-5,
        positions: Positions::Learned {
            offset: 2,
            table_size: positions + 2,
        },
        residual: if pre {
            Residual::Sequential
        } else {
            Residual::PostNorm
        },
        activation: c.activation(&["activation_function"], "relu")?,
        qkv_bias: bias,
        out_bias: bias,
        mlp_bias: bias,
        attn_scale: 1.0 / ((e / nh) as f64).sqrt(),
        final_norm: pre && !c.bool_or("_remove_final_layer_norm", false)?,
        tie_embeddings: c.bool_or("tie_word_embeddings", true)?,
        embed_dim: c.usize_any(&["word_embed_proj_dim"])?.unwrap_or(e),

        norm_affine: c.bool_or("layer_norm_elementwise_affine", true)?,
        ..ModelSpec::defaults(c)
    })
}

pub fn load(s: &ModelSpec, l: &Loader) -> Result<Weights> {
    let l = l
        .clone()
        .affine_norms(s.norm_affine)
        .with_prefix("model.", "decoder.embed_tokens.weight");
    let (e, inter, d) = (s.hidden_size, s.intermediate_size, s.embed_dim);
    let Positions::Learned { table_size, .. } = s.positions else {
        unreachable!("opt uses learned positions")
    };
    let embed = l.embedding(&l.name("decoder.embed_tokens.weight"), s.vocab_size, d)?;
    let blocks = (0..s.num_layers)
        .map(|i| {
            let l = l.block(i);
            let p = format!("decoder.layers.{i}");
            let proj = |n: &str| l.linear(&format!("{p}.self_attn.{n}"), e, e, s.qkv_bias);
            Ok(Block {
                ln1: Some(l.norm(&format!("{p}.self_attn_layer_norm"), s.norm, e, s.norm_eps)?),
                ln2: Some(l.norm(&format!("{p}.final_layer_norm"), s.norm, e, s.norm_eps)?),
                qkv: fuse(&[proj("q_proj")?, proj("k_proj")?, proj("v_proj")?])?,
                out: proj("out_proj")?,
                mlp_in: l.linear(&format!("{p}.fc1"), inter, e, s.mlp_bias)?,
                mlp_out: l.linear(&format!("{p}.fc2"), e, inter, s.mlp_bias)?,
                post_attn_norm: None,
                post_mlp_norm: None,
                q_norm: None,
                k_norm: None,
                moe: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let (project_in, project_out) = if d != e {
        (
            Some(l.linear("decoder.project_in", e, d, false)?),
            Some(l.tail().linear("decoder.project_out", d, e, false)?),
        )
    } else {
        (None, None)
    };
    Ok(Weights {
        pos_embed: Some(l.t("decoder.embed_positions.weight", &[table_size, e])?),
        embed_norm: None,
        project_in,
        blocks,
        final_norm: if s.final_norm {
            Some(
                l.tail()
                    .norm("decoder.final_layer_norm", s.norm, e, s.norm_eps)?,
            )
        } else {
            None
        },
        project_out,
        lm_head: l.tail().head(
            s,
            &embed,
            &l.name("decoder.embed_tokens.weight"),
            "lm_head.weight",
        )?,
        embed,
    })
}
