//! StableLM (`StableLmForCausalLM`): the Llama block with LayerNorms, partial rotary (0.25 by
//! default), optional q/k/v bias, optional parallel residual (one norm), and optional per-head
//! q/k LayerNorms (`qk_layernorm`, one norm without bias per head).
use super::{heads, load_llama_like, Family, Layout, Loader, Weights};
use crate::config::*;
use crate::error::Result;
use crate::weights::gguf::{GgufArch, GgufFile, LLAMA_TENSORS};
use serde_json::{Map, Value};

/// `config.json` of a StableLM GGUF. Per-head q/k norms (StableLM 2 12B), which the converter
/// stacks, are not read: those tensors stay unused and the load fails naming them.
fn gguf_config(g: &GgufFile, c: &mut Map<String, Value>) -> Result<()> {
    let parallel = g.md_bool(&g.key("use_parallel_residual")).unwrap_or(true);
    c.insert("use_parallel_residual".into(), parallel.into());
    let bias = g.has("model.layers.0.self_attn.q_proj.bias");
    c.insert("use_qkv_bias".into(), bias.into());
    c.insert("qk_layernorm".into(), false.into());
    c.insert("hidden_act".into(), "silu".into());
    Ok(())
}
use crate::model::layers::Norm;
use candle_core::Tensor;

pub const FAMILY: Family = Family {
    name: "stablelm",
    architectures: &["StableLmForCausalLM"],
    model_types: &["stablelm"],
    gguf: &[GgufArch {
        arch: "stablelm",
        class: "StableLmForCausalLM",
        blocks: "model.layers",
        tensors: &[LLAMA_TENSORS],
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
        positions: Positions::Rope(rope_spec(c, hd, 0.25, 10000.0, max_positions)?),
        residual: if c.bool_or("use_parallel_residual", false)? {
            Residual::Parallel
        } else {
            Residual::Sequential
        },
        mlp: MlpKind::Gated,
        activation: c.activation(&["hidden_act"], "silu")?,
        qkv_bias: c.bool_or("use_qkv_bias", false)?,
        out_bias: false,
        mlp_bias: false,
        attn_scale: 1.0 / (hd as f64).sqrt(),
        tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
        embed_dim: e,
        qk_norm: c.bool_or("qk_layernorm", false)?,
        ..ModelSpec::defaults(c)
    })
}

pub fn load(s: &ModelSpec, l: &Loader) -> Result<Weights> {
    let parallel = s.residual == Residual::Parallel;
    let layout = Layout {
        ln2: (!parallel).then_some("post_attention_layernorm"),
        ..Layout::LLAMA
    };
    let mut w = load_llama_like(s, l, &layout, "model.norm")?;
    if s.qk_norm {
        // One LayerNorm (no bias) per head, kept as one weight of all heads.
        for (i, b) in w.blocks.iter_mut().enumerate() {
            let l = l.block(i);
            let per_head = |which: &str, heads: usize| -> Result<Norm> {
                let ws = (0..heads)
                    .map(|h| {
                        let p = format!("model.layers.{i}.self_attn.{which}.norms.{h}");
                        Ok(
                            l.norm_no_bias(&p, NormKind::LayerNorm, s.head_dim, s.norm_eps)?
                                .weight,
                        )
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Norm {
                    kind: NormKind::LayerNorm,
                    weight: Tensor::cat(&ws, 0)?,
                    bias: None,
                    eps: s.norm_eps as f32,
                })
            };
            b.q_norm = Some(per_head("q_layernorm", s.num_heads)?);
            b.k_norm = Some(per_head("k_layernorm", s.num_kv_heads)?);
        }
    }
    Ok(w)
}
