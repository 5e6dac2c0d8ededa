//! MPT (`MptForCausalLM`): ALiBi (MPT's slopes, bias max 8), fused `[q; k; v]` projection with
//! optional `clip_qkv`, LayerNorms without bias, no linear biases, exact-GELU MLP of 4× width,
//! tied head. Attention settings live in the nested `attn_config`.
use super::{Family, Loader, Weights};
use crate::config::*;
use crate::error::Result;
use crate::model::decoder::Block;
use crate::weights::gguf::{Fix, GgufArch, GgufFile};
use serde_json::{json, Map, Value};

/// `config.json` of an MPT GGUF: the MLP's expansion from its matrix, `clip_qkv` from
/// `attention.clamp_kqv`; ALiBi always (llama.cpp's MPT has no other positions).
fn gguf_config(g: &GgufFile, c: &mut Map<String, Value>) -> Result<()> {
    let e = c.get("hidden_size").and_then(|v| v.as_u64()).unwrap_or(0) as usize;
    if let (Some(&[inter, _]), true) = (g.shape("transformer.blocks.0.ffn.up_proj.weight"), e > 0) {
        if inter % e != 0 {
            return Err(g.bad_config(format!(
                "MLP width {inter} is not a multiple of the hidden size {e}"
            )));
        }
        c.insert("expansion_ratio".into(), (inter / e).into());
    }
    if let Some(n) = c.get("max_position_embeddings").cloned() {
        c.insert("max_seq_len".into(), n);
    }
    let clip = g.md_f64(&g.key("attention.clamp_kqv"));
    c.insert(
        "attn_config".into(),
        json!({"alibi": true, "clip_qkv": clip, "softmax_scale": null}),
    );
    Ok(())
}

pub const FAMILY: Family = Family {
    name: "mpt",
    architectures: &["MptForCausalLM", "MPTForCausalLM"],
    model_types: &["mpt"],
    gguf: &[GgufArch {
        arch: "mpt",
        class: "MptForCausalLM",
        blocks: "transformer.blocks",
        tensors: &[&[
            ("token_embd", "transformer.wte", Fix::Keep),
            ("output_norm", "transformer.norm_f", Fix::Keep),
            ("output", "lm_head", Fix::Keep),
            ("attn_norm", "norm_1", Fix::Keep),
            ("attn_qkv", "attn.Wqkv", Fix::Keep),
            ("attn_output", "attn.out_proj", Fix::Keep),
            ("ffn_norm", "norm_2", Fix::Keep),
            ("ffn_up", "ffn.up_proj", Fix::Keep),
            ("ffn_down", "ffn.down_proj", Fix::Keep),
        ]],
        config: gguf_config,
    }],
    spec,
    load,
};

pub fn spec(c: &RawConfig, _arch: &str) -> Result<ModelSpec> {
    let e = c.req_usize(&["d_model", "hidden_size"])?;
    let nh = c.req_usize(&["n_heads", "num_attention_heads"])?;
    let hd = super::head_dim(c, e, nh, "n_heads")?;
    let attn = RawConfig::from_value(
        &c.path,
        c.get("attn_config")
            .cloned()
            .unwrap_or(serde_json::json!({})),
    );
    c.check(attn.bool_or("alibi", true)?, || {
        "MPT without ALiBi is not supported (transformers does not run it either)".into()
    })?;
    let max_positions = c.usize_any(&["max_seq_len"])?.unwrap_or(2048);
    Ok(ModelSpec {
        vocab_size: c.req_usize(&["vocab_size"])?,
        hidden_size: e,
        num_layers: c.req_usize(&["n_layers", "num_hidden_layers"])?,
        num_heads: nh,
        num_kv_heads: nh,
        head_dim: hd,
        intermediate_size: c.usize_any(&["expansion_ratio"])?.unwrap_or(4) * e,
        max_positions,
        norm_eps: c.f64_any(&["layer_norm_epsilon"])?.unwrap_or(1e-5),
        positions: Positions::Alibi,
        // transformers builds the slopes with the default bias max of 8 whatever the config says.
        alibi_slopes: AlibiSlopes::Mpt { bias_max: 8.0 },
        activation: Activation::Gelu,
        qkv_bias: false,
        out_bias: false,
        mlp_bias: false,
        attn_scale: attn
            .f64_any(&["softmax_scale"])?
            .unwrap_or(1.0 / (hd as f64).sqrt()),
        clip_qkv: attn
            .f64_any(&["clip_qkv"])?
            .filter(|&c| c != 0.0)
            .map(|c| c as f32),
        tie_embeddings: c.bool_or("tie_word_embeddings", true)?,
        embed_dim: e,
        ..ModelSpec::defaults(c)
    })
}

pub fn load(s: &ModelSpec, l: &Loader) -> Result<Weights> {
    let (e, inter) = (s.hidden_size, s.intermediate_size);
    let norm = |l: &Loader, n: &str| l.norm_no_bias(n, s.norm, e, s.norm_eps);
    let blocks = (0..s.num_layers)
        .map(|i| {
            let l = l.block(i);
            let p = format!("transformer.blocks.{i}");
            Ok(Block {
                ln1: Some(norm(&l, &format!("{p}.norm_1"))?),
                ln2: Some(norm(&l, &format!("{p}.norm_2"))?),
                post_attn_norm: None,
                post_mlp_norm: None,
                q_norm: None,
                k_norm: None,
                moe: None,
                qkv: l.linear(&format!("{p}.attn.Wqkv"), 3 * e, e, false)?,
                out: l.linear(&format!("{p}.attn.out_proj"), e, e, false)?,
                mlp_in: l.linear(&format!("{p}.ffn.up_proj"), inter, e, false)?,
                mlp_out: l.linear(&format!("{p}.ffn.down_proj"), e, inter, false)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let embed = l.embedding("transformer.wte.weight", s.vocab_size, e)?;
    let t = l.tail();
    Ok(Weights {
        pos_embed: None,
        embed_norm: None,
        project_in: None,
        blocks,
        final_norm: Some(norm(&t, "transformer.norm_f")?),
        project_out: None,
        lm_head: t.head(s, &embed, "transformer.wte.weight", "lm_head.weight")?,
        embed,
    })
}
