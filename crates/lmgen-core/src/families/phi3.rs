//! Phi-3 / 3.5 / 4 (`Phi3ForCausalLM`): the Llama block with fused `qkv_proj` and
//! `gate_up_proj`, partial rotary (Phi-4-mini), `longrope` scaling (short factors up to
//! `original_max_position_embeddings`, long ones beyond), sliding window on every layer.
//! Past `original_max_position_embeddings` transformers switches to the long factors for the
//! whole sequence: a prompt longer than it is rotated with them throughout, and when generation
//! carries a sequence past it, `Phi3ForCausalLM.prepare_inputs_for_generation` drops the KV
//! cache and recomputes everything with the long factors. lmgen does the same: prompts
//! prefilled in chunks use the factors of their whole length (`RunSeq::rope_len`), and the
//! generator frees a crossing sequence's blocks and prefills its history again
//! (`RunStats::rope_recomputes`); its prefix-cache blocks are keyed by the regime.
use super::{heads, layer_types, load_llama_like, Family, Layout, Loader, MlpIn, Qkv, Weights};
use crate::config::*;
use crate::error::Result;
use crate::weights::gguf::{Fix, GgufArch, GgufFile, LLAMA_TENSORS};
use crate::weights::TensorSource;
use candle_core::{DType, Device};
use serde_json::{Map, Value};

/// The `longrope` factors of a GGUF file (read into the config, not weights).
const ROPE_LONG: &str = "rope_factors_long.weight";
const ROPE_SHORT: &str = "rope_factors_short.weight";

/// `config.json` of a Phi-3 GGUF: the sliding window (0: none, as Phi-4 files say), the
/// original context, and `longrope` (Phi-3-128k, Phi-3.5) from the `rope_factors_long/short`
/// tensors the converter writes, with its attention factor.
fn gguf_config(g: &GgufFile, c: &mut Map<String, Value>) -> Result<()> {
    let k = |s: &str| g.key(s);
    let window = g.md_u64(&k("attention.sliding_window")).filter(|&w| w > 0);
    c.insert(
        "sliding_window".into(),
        window.map_or(Value::Null, Value::from),
    );
    if let Some(o) = g.md_u64(&k("rope.scaling.original_context_length")) {
        c.insert("original_max_position_embeddings".into(), o.into());
    }
    if g.has(ROPE_LONG) || g.has(ROPE_SHORT) {
        let factors = |n: &str| -> Result<Vec<f32>> {
            Ok(g.load(n, DType::F32, &Device::Cpu)?
                .flatten_all()?
                .to_vec1()?)
        };
        let mut r = Map::new();
        r.insert("rope_type".into(), "longrope".into());
        r.insert("long_factor".into(), factors(ROPE_LONG)?.into());
        r.insert("short_factor".into(), factors(ROPE_SHORT)?.into());
        if let Some(a) = g.md_f64(&k("rope.scaling.attn_factor")) {
            r.insert("attention_factor".into(), a.into());
        }
        c.insert("rope_scaling".into(), r.into());
    }
    c.insert("hidden_act".into(), "silu".into());
    c.insert("attention_bias".into(), false.into());
    Ok(())
}

pub const FAMILY: Family = Family {
    name: "phi3",
    architectures: &["Phi3ForCausalLM"],
    model_types: &["phi3"],
    gguf: &[GgufArch {
        arch: "phi3",
        class: "Phi3ForCausalLM",
        blocks: "model.layers",
        tensors: &[
            &[
                ("attn_qkv", "self_attn.qkv_proj", Fix::Keep),
                ("ffn_up", "mlp.gate_up_proj", Fix::Keep),
            ],
            LLAMA_TENSORS,
        ],
        config: gguf_config,
    }],
    spec,
    load,
};

pub fn spec(c: &RawConfig, _arch: &str) -> Result<ModelSpec> {
    let e = c.req_usize(&["hidden_size"])?;
    let (nh, hd) = heads(c, e, &["num_attention_heads"])?;
    let layers = c.req_usize(&["num_hidden_layers"])?;
    let max_positions = c.req_usize(&["max_position_embeddings"])?;
    let mut rope = c.rope_params();
    // transformers reads "su" and "yarn" in Phi-3 configs as longrope.
    for k in ["rope_type", "type"] {
        if matches!(rope.get(k).and_then(|v| v.as_str()), Some("su" | "yarn")) {
            rope.insert(k.into(), "longrope".into());
        }
    }
    let sliding_window = c.usize_any(&["sliding_window"])?;
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
        norm_eps: c.f64_any(&["rms_norm_eps"])?.unwrap_or(1e-5),
        positions: Positions::Rope(rope_spec_from(c, &rope, hd, 1.0, 10000.0, max_positions)?),
        mlp: MlpKind::Gated,
        activation: c.activation(&["hidden_act"], "silu")?,
        qkv_bias: bias,
        out_bias: bias,
        mlp_bias: false,
        attn_scale: 1.0 / (hd as f64).sqrt(),
        sliding_layers: layer_types(c, layers, |_| sliding_window.is_some())?,
        sliding_window,
        tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
        embed_dim: e,
        ..ModelSpec::defaults(c)
    })
}

pub fn load(s: &ModelSpec, l: &Loader) -> Result<Weights> {
    let layout = Layout {
        qkv: Qkv::Fused("self_attn.qkv_proj"),
        mlp_in: MlpIn::One("mlp.gate_up_proj"),
        ..Layout::LLAMA
    };
    l.ignore_buffers(&[ROPE_LONG, ROPE_SHORT]);
    load_llama_like(s, l, &layout, "model.norm")
}
