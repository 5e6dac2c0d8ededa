//! Gemma 1/2/3 text (`GemmaForCausalLM`, `Gemma2ForCausalLM`, `Gemma3ForCausalLM`): the Llama
//! layout with RMSNorm over `1 + weight`, embeddings scaled by √hidden, GeGLU (tanh), tied head.
//! Gemma-2 adds sandwich norms, attention and final-logit soft-capping, alternating sliding
//! window layers and `query_pre_attn_scalar`; Gemma-3 adds per-head q/k norms and its own
//! rotary base for the sliding layers.
use super::{heads, layer_types, load_llama_like, Family, Layout, Loader, Weights};
use crate::config::*;
use crate::error::Result;
use serde_json::{Map, Value};

pub const FAMILY: Family = Family {
    name: "gemma",
    architectures: &["GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"],
    model_types: &["gemma", "gemma2", "gemma3_text"],
    gguf: &[],
    spec,
    load,
};

pub fn spec(c: &RawConfig, arch: &str) -> Result<ModelSpec> {
    let version = match arch {
        "Gemma2ForCausalLM" => 2,
        "Gemma3ForCausalLM" => 3,
        _ => 1,
    };
    let e = c.req_usize(&["hidden_size"])?;
    let (nh, hd) = heads(c, e, &["num_attention_heads"])?;
    let layers = c.req_usize(&["num_hidden_layers"])?;
    let max_positions = c.req_usize(&["max_position_embeddings"])?;
    let softcap = |k: &str, default: Option<f64>| -> Result<Option<f32>> {
        Ok(match c.json.get(k) {
            Some(Value::Null) => None,
            Some(_) => c.f64_any(&[k])?.map(|x| x as f32),
            None => default.map(|x| x as f32),
        })
    };
    let (mut sliding_window, mut sliding_layers) = (None, vec![]);
    if version >= 2 {
        sliding_window = c.usize_any(&["sliding_window"])?;
        let pattern = if version == 2 {
            2
        } else {
            c.usize_any(&["sliding_window_pattern"])?.unwrap_or(6)
        };
        sliding_layers = layer_types(c, layers, |i| (i + 1) % pattern != 0)?;
    }
    // Gemma-3: rope parameters per layer type (transformers 5), or `rope_theta` (+ scaling)
    // for the global layers and `rope_local_base_freq` for the sliding ones.
    let (mut positions, mut local_rope) = (None, None);
    if version == 3 {
        let p = c.rope_params();
        let typed = |k: &str| p.get(k).and_then(|v| v.as_object()).cloned();
        let (global, local) = match (typed("full_attention"), typed("sliding_attention")) {
            (Some(g), Some(l)) => (g, l),
            _ => {
                let mut g = p.clone();
                g.entry("rope_theta")
                    .or_insert(c.f64_any(&["rope_theta"])?.unwrap_or(1e6).into());
                let mut l = Map::new();
                l.insert(
                    "rope_theta".into(),
                    c.f64_any(&["rope_local_base_freq"])?.unwrap_or(1e4).into(),
                );
                (g, l)
            }
        };
        positions = Some(rope_spec_from(c, &global, hd, 1.0, 1e6, max_positions)?);
        local_rope = Some(rope_spec_from(c, &local, hd, 1.0, 1e4, max_positions)?);
    }
    let positions = match positions {
        Some(p) => p,
        None => rope_spec(c, hd, 1.0, 10000.0, max_positions)?,
    };
    // Gemma 1 configs say "gelu" where the tanh approximation is meant (transformers corrects it).
    let mut activation = c.activation(&["hidden_activation", "hidden_act"], "gelu_pytorch_tanh")?;
    if activation == Activation::Gelu {
        activation = Activation::GeluTanh;
    }
    let scalar = match version {
        1 => hd as f64,
        _ => c.f64_any(&["query_pre_attn_scalar"])?.unwrap_or(256.0),
    };
    let bias = c.bool_or("attention_bias", false)?;
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
        positions: Positions::Rope(positions),
        local_rope,
        mlp: MlpKind::Gated,
        activation,
        qkv_bias: bias,
        out_bias: bias,
        mlp_bias: false,
        attn_scale: 1.0 / scalar.sqrt(),
        sliding_window,
        sliding_layers,
        tie_embeddings: c.bool_or("tie_word_embeddings", true)?,
        embed_dim: e,
        embed_scale: Some((e as f64).sqrt() as f32),
        attn_softcap: softcap("attn_logit_softcapping", (version == 2).then_some(50.0))?,
        final_softcap: softcap("final_logit_softcapping", (version == 2).then_some(30.0))?,
        qk_norm: version == 3,
        ..ModelSpec::defaults(c)
    })
}

pub fn load(s: &ModelSpec, l: &Loader) -> Result<Weights> {
    let l = l.clone().norm_offset(1.0);
    let layout = if s.architecture != "GemmaForCausalLM" {
        Layout {
            post_attn_norm: Some("post_attention_layernorm"),
            ln2: Some("pre_feedforward_layernorm"),
            post_mlp_norm: Some("post_feedforward_layernorm"),
            q_norm: s.qk_norm.then_some("self_attn.q_norm"),
            k_norm: s.qk_norm.then_some("self_attn.k_norm"),
            ..Layout::LLAMA
        }
    } else {
        Layout::LLAMA
    };
    load_llama_like(s, &l, &layout, "model.norm")
}
