//! Gemma 1/2/3 text (`GemmaForCausalLM`, `Gemma2ForCausalLM`, `Gemma3ForCausalLM`): the Llama
//! layout with RMSNorm over `1 + weight`, embeddings scaled by √hidden, GeGLU (tanh), tied head.
//! Gemma-2 adds sandwich norms, attention and final-logit soft-capping, alternating sliding
//! window layers and `query_pre_attn_scalar`; Gemma-3 adds per-head q/k norms and its own
//! rotary base for the sliding layers.
use super::{heads, layer_types, load_llama_like, Family, Layout, Loader, Weights};
use crate::config::*;
use crate::error::Result;
use crate::weights::gguf::{Fix, GgufArch, GgufFile, LLAMA_TENSORS};
use serde_json::{json, Map, Value};

/// llama.cpp's converter stores Gemma's norm weights as `1 + weight`.
const GEMMA_NORMS: &[(&str, &str, Fix)] = &[
    ("output_norm", "model.norm", Fix::PlusOne),
    ("attn_norm", "input_layernorm", Fix::PlusOne),
    ("ffn_norm", "post_attention_layernorm", Fix::PlusOne),
];

/// Gemma-2/3: sandwich norms, Gemma-3's q/k norms.
const GEMMA2_NORMS: &[(&str, &str, Fix)] = &[
    ("output_norm", "model.norm", Fix::PlusOne),
    ("attn_norm", "input_layernorm", Fix::PlusOne),
    (
        "post_attention_norm",
        "post_attention_layernorm",
        Fix::PlusOne,
    ),
    ("ffn_norm", "pre_feedforward_layernorm", Fix::PlusOne),
    ("post_ffw_norm", "post_feedforward_layernorm", Fix::PlusOne),
    ("attn_q_norm", "self_attn.q_norm", Fix::PlusOne),
    ("attn_k_norm", "self_attn.k_norm", Fix::PlusOne),
];

/// `config.json` of a Gemma GGUF. What the converter does not record, llama.cpp fixes, and so
/// does this: the query scale 1/√head_dim (the 27B models, by their layer count, scale by
/// hidden/heads), Gemma-2's alternating and Gemma-3's one-in-six sliding layers (unless the
/// file has a pattern), softcaps 50/30 for Gemma-2 when absent.
fn gguf_config(g: &GgufFile, c: &mut Map<String, Value>) -> Result<()> {
    let arch = g.architecture();
    let k = |s: &str| g.key(s);
    let layers = g.req_u64(&k("block_count"))?;
    let num = |key: &str| c.get(key).and_then(|v| v.as_u64()).unwrap_or(0);
    let (hidden, heads, hd) = (
        num("hidden_size"),
        num("num_attention_heads"),
        num("head_dim"),
    );
    c.entry("max_position_embeddings").or_insert(8192.into());
    c.insert("hidden_activation".into(), "gelu_pytorch_tanh".into());
    c.insert("hidden_act".into(), "gelu_pytorch_tanh".into());
    c.insert("attention_bias".into(), false.into());
    if arch == "gemma" {
        return Ok(());
    }
    let big = layers == if arch == "gemma2" { 46 } else { 62 };
    let scalar = if big && heads > 0 { hidden / heads } else { hd };
    c.insert("query_pre_attn_scalar".into(), scalar.into());
    let softcap = |key: &str, default: Option<f64>| match g.md_f64(&k(key)).or(default) {
        Some(x) => json!(x),
        None => Value::Null,
    };
    let gemma2 = arch == "gemma2";
    c.insert(
        "attn_logit_softcapping".into(),
        softcap("attn_logit_softcapping", gemma2.then_some(50.0)),
    );
    c.insert(
        "final_logit_softcapping".into(),
        softcap("final_logit_softcapping", gemma2.then_some(30.0)),
    );
    let window = g
        .md_u64(&k("attention.sliding_window"))
        .filter(|&w| w > 0)
        .or(gemma2.then_some(4096));
    // `attention.sliding_window_pattern`: one flag per layer, or the period n (layers
    // i % n < n - 1 slide), as llama.cpp reads it.
    let key = k("attention.sliding_window_pattern");
    let flags = g.md_bools(&key);
    if flags.as_ref().is_some_and(|f| f.len() as u64 != layers) {
        return Err(g.bad_config(format!("'{key}' has not one flag per layer")));
    }
    let pattern = g.md_u64(&key).unwrap_or(if gemma2 { 2 } else { 6 }).max(1);
    let types: Vec<&str> = (0..layers)
        .map(|i| {
            let sliding = match &flags {
                Some(f) => f[i as usize],
                None => i % pattern < pattern - 1,
            };
            if sliding && window.is_some() {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    c.insert(
        "sliding_window".into(),
        window.map_or(Value::Null, Value::from),
    );
    c.insert("layer_types".into(), json!(types));
    if !gemma2 {
        // Per layer type: the global layers take the file's base and scaling, the sliding ones
        // `rope.freq_base_swa` unscaled.
        let mut global = Map::new();
        global.insert(
            "rope_theta".into(),
            c.get("rope_theta").cloned().unwrap_or(json!(1_000_000.0)),
        );
        match c.get("rope_scaling").and_then(|r| r.as_object()) {
            Some(r) => {
                global.extend(r.clone());
            }
            None => {
                global.insert("rope_type".into(), "default".into());
            }
        }
        let local = json!({"rope_type": "default",
            "rope_theta": g.md_f64(&k("rope.freq_base_swa")).unwrap_or(10_000.0)});
        c.remove("rope_scaling");
        c.insert(
            "rope_parameters".into(),
            json!({"full_attention": global, "sliding_attention": local}),
        );
    }
    Ok(())
}

pub const FAMILY: Family = Family {
    name: "gemma",
    architectures: &["GemmaForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM"],
    model_types: &["gemma", "gemma2", "gemma3_text"],
    gguf: &[
        GgufArch {
            arch: "gemma",
            class: "GemmaForCausalLM",
            blocks: "model.layers",
            tensors: &[GEMMA_NORMS, LLAMA_TENSORS],
            config: gguf_config,
        },
        GgufArch {
            arch: "gemma2",
            class: "Gemma2ForCausalLM",
            blocks: "model.layers",
            tensors: &[GEMMA2_NORMS, LLAMA_TENSORS],
            config: gguf_config,
        },
        GgufArch {
            arch: "gemma3",
            class: "Gemma3ForCausalLM",
            blocks: "model.layers",
            tensors: &[GEMMA2_NORMS, LLAMA_TENSORS],
            config: gguf_config,
        },
    ],
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
