//! Llama-style (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`): RMSNorm,
//! RoPE (with scaling variants), GQA/MQA, SwiGLU, optional QKV bias and sliding window.
use super::{fuse, Loader, Weights};
use crate::config::*;
use crate::error::Result;
use crate::model::decoder::Block;

pub fn spec(c: &RawConfig, arch: &str) -> Result<ModelSpec> {
    let e = c.req_usize(&["hidden_size"])?;
    let nh = c.req_usize(&["num_attention_heads"])?;
    let hd = c.usize_any(&["head_dim"])?.unwrap_or(e / nh.max(1));
    let max_positions = c.req_usize(&["max_position_embeddings"])?;
    let layers = c.req_usize(&["num_hidden_layers"])?;
    let qwen2 =
        arch == "Qwen2ForCausalLM" || c.get("model_type").and_then(|m| m.as_str()) == Some("qwen2");
    let attention_bias = c.bool_or("attention_bias", false)?;
    // transformers: explicit `layer_types`, else Mistral windows every layer and Qwen2 (only
    // with `use_sliding_window`) the layers from `max_window_layers` on.
    let mut sliding_window = c.usize_any(&["sliding_window"])?;
    if qwen2 && !c.bool_or("use_sliding_window", false)? {
        sliding_window = None;
    }
    let sliding_layers: Vec<bool> = match c.get("layer_types").and_then(|v| v.as_array()) {
        Some(types) => {
            c.check(types.len() == layers, || {
                format!(
                    "layer_types has {} entries for {layers} layers",
                    types.len()
                )
            })?;
            types
                .iter()
                .map(|t| t.as_str() == Some("sliding_attention"))
                .collect()
        }
        None => {
            let from = if qwen2 {
                c.usize_any(&["max_window_layers"])?.unwrap_or(0)
            } else {
                0
            };
            (0..layers)
                .map(|i| sliding_window.is_some() && i >= from)
                .collect()
        }
    };
    if sliding_layers.iter().any(|&s| s) {
        c.check(sliding_window.is_some_and(|w| w > 0), || {
            "sliding attention layers need 'sliding_window'".into()
        })?;
    }
    Ok(ModelSpec {
        vocab_size: c.req_usize(&["vocab_size"])?,
        hidden_size: e,
        num_layers: layers,
        num_heads: nh,
        num_kv_heads: c.usize_any(&["num_key_value_heads"])?.unwrap_or(nh),
        head_dim: hd,
        intermediate_size: c.req_usize(&["intermediate_size"])?,
        max_positions,
        norm: NormKind::RmsNorm,
        norm_eps: c.f64_any(&["rms_norm_eps"])?.unwrap_or(1e-6),
        positions: Positions::Rope(rope_spec(c, hd, 1.0, 10000.0, max_positions)?),
        mlp: MlpKind::Gated,
        activation: c.activation(&["hidden_act", "hidden_activation"], "silu")?,
        qkv_bias: qwen2 || attention_bias,
        out_bias: attention_bias,
        mlp_bias: c.bool_or("mlp_bias", false)?,
        attn_scale: 1.0 / (hd as f64).sqrt(),
        sliding_window,
        sliding_layers,
        tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
        embed_dim: e,

        ..ModelSpec::defaults(Family::Llama, c)
    })
}

pub fn load(s: &ModelSpec, l: &Loader) -> Result<Weights> {
    l.ignore_buffers(&[".rotary_emb.inv_freq"]);
    let (e, inter) = (s.hidden_size, s.intermediate_size);
    let embed = l.abs("model.embed_tokens.weight", &[s.vocab_size, e])?;
    let blocks = (0..s.num_layers)
        .map(|i| {
            let l = l.block(i);
            let p = format!("model.layers.{i}");
            let attn = |n: &str, out: usize, bias: bool| {
                l.linear(&format!("{p}.self_attn.{n}"), out, e, bias)
            };
            let mlp = |n: &str| l.linear(&format!("{p}.mlp.{n}"), inter, e, s.mlp_bias);
            Ok(Block {
                ln1: l.norm(&format!("{p}.input_layernorm"), s.norm, e, s.norm_eps)?,
                ln2: Some(l.norm(
                    &format!("{p}.post_attention_layernorm"),
                    s.norm,
                    e,
                    s.norm_eps,
                )?),
                qkv: fuse(&[
                    attn("q_proj", s.q_dim(), s.qkv_bias)?,
                    attn("k_proj", s.kv_dim(), s.qkv_bias)?,
                    attn("v_proj", s.kv_dim(), s.qkv_bias)?,
                ])?,
                out: l.linear(&format!("{p}.self_attn.o_proj"), e, s.q_dim(), s.out_bias)?,
                mlp_in: fuse(&[mlp("gate_proj")?, mlp("up_proj")?])?,
                mlp_out: l.linear(&format!("{p}.mlp.down_proj"), e, inter, s.mlp_bias)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Weights {
        pos_embed: None,
        embed_norm: None,
        project_in: None,
        blocks,
        final_norm: Some(l.tail().norm("model.norm", s.norm, e, s.norm_eps)?),
        project_out: None,
        lm_head: l
            .tail()
            .head(s, &embed, "model.embed_tokens.weight", "lm_head.weight")?,
        embed,
    })
}
