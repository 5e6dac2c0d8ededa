//! Mixtures of experts: Mixtral (`MixtralForCausalLM`), Qwen2-MoE (shared expert with a
//! sigmoid gate) and Qwen3-MoE (`Qwen2MoeForCausalLM`, `Qwen3MoeForCausalLM`: top-k
//! renormalized with `norm_topk_prob`, dense layers by `mlp_only_layers` /
//! `decoder_sparse_step`), OLMoE (`OlmoeForCausalLM`: OLMo-2's whole q/k norms with pre-norms,
//! `clip_qkv` after them). The attention is their dense sibling's; the MLP is the spec's
//! [`MoeSpec`].
use super::{load_llama_like, Family, Layout, Loader, MoeNames, Weights};
use crate::config::*;
use crate::error::Result;
use crate::weights::gguf::{GgufArch, GgufFile, LLAMA_TENSORS};
use serde_json::{Map, Value};

pub const FAMILY: Family = Family {
    name: "moe",
    architectures: &[
        "MixtralForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3MoeForCausalLM",
        "OlmoeForCausalLM",
    ],
    model_types: &["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"],
    gguf: &[
        GgufArch {
            arch: "qwen2moe",
            class: "Qwen2MoeForCausalLM",
            blocks: "model.layers",
            tensors: &[LLAMA_TENSORS],
            config: gguf_config,
        },
        GgufArch {
            arch: "qwen3moe",
            class: "Qwen3MoeForCausalLM",
            blocks: "model.layers",
            tensors: &[LLAMA_TENSORS],
            config: gguf_config,
        },
    ],
    spec,
    load,
};

pub fn spec(c: &RawConfig, arch: &str) -> Result<ModelSpec> {
    let layers = c.req_usize(&["num_hidden_layers"])?;
    let experts = c.req_usize(&["num_local_experts", "num_experts"])?;
    let top_k = c.req_usize(&["num_experts_per_tok"])?;
    c.check(experts > 0 && top_k > 0 && top_k <= experts, || {
        format!("{top_k} experts per token out of {experts}")
    })?;
    let mut s = match arch {
        "MixtralForCausalLM" => super::llama::spec(c, "MistralForCausalLM")?,
        "Qwen2MoeForCausalLM" => super::llama::spec(c, "Qwen2ForCausalLM")?,
        "Qwen3MoeForCausalLM" => super::llama::spec(c, "Qwen3ForCausalLM")?,
        _ => {
            let mut s = super::olmo::spec(c, "Olmo2ForCausalLM")?;
            s.clip_qkv = c.f64_any(&["clip_qkv"])?.map(|x| x as f32);
            s.clip_after_qk_norm = true;
            s
        }
    };
    let qwen = arch.starts_with("Qwen");
    let sparse_layers = if qwen {
        let only: Vec<u64> = c
            .get("mlp_only_layers")
            .and_then(|v| v.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
            .unwrap_or_default();
        let step = c.usize_any(&["decoder_sparse_step"])?.unwrap_or(1).max(1);
        (0..layers)
            .map(|i| !only.contains(&(i as u64)) && (i + 1) % step == 0)
            .collect()
    } else {
        vec![true; layers]
    };
    s.moe = Some(MoeSpec {
        experts,
        top_k,
        expert_inter: match c.usize_any(&["moe_intermediate_size"])? {
            Some(i) if qwen => i,
            _ => s.intermediate_size,
        },
        norm_topk: arch == "MixtralForCausalLM" || c.bool_or("norm_topk_prob", false)?,
        shared_inter: if arch == "Qwen2MoeForCausalLM" {
            c.usize_any(&["shared_expert_intermediate_size"])?
        } else {
            None
        },
        sparse_layers,
    });
    Ok(s)
}

pub fn load(s: &ModelSpec, l: &Loader) -> Result<Weights> {
    let mixtral = s.architecture == "MixtralForCausalLM";
    let per_expert = |block| MoeNames {
        block,
        router: "gate",
        gate: "gate_proj",
        up: "up_proj",
        down: "down_proj",
        shared: s
            .moe
            .as_ref()
            .and_then(|m| m.shared_inter)
            .map(|_| "shared_expert"),
    };
    let moe = if mixtral {
        MoeNames {
            gate: "w1",
            up: "w3",
            down: "w2",
            ..per_expert("block_sparse_moe")
        }
    } else {
        per_expert("mlp")
    };
    let layout = Layout {
        q_norm: s.qk_norm.then_some("self_attn.q_norm"),
        k_norm: s.qk_norm.then_some("self_attn.k_norm"),
        moe: Some(moe),
        ..Layout::LLAMA
    };
    load_llama_like(s, l, &layout, "model.norm")
}

/// `config.json` of a Qwen MoE GGUF: the Llama-style keys, then the experts (every layer is
/// sparse: llama.cpp's converter maps no dense MLP layers for these architectures).
fn gguf_config(g: &GgufFile, c: &mut Map<String, Value>) -> Result<()> {
    super::llama::gguf_config(g, c)?;
    let k = |s: &str| g.key(s);
    let n = g.req_u64(&k("expert_count"))?;
    c.insert("num_experts".into(), n.into());
    c.insert(
        "num_experts_per_tok".into(),
        g.req_u64(&k("expert_used_count"))?.into(),
    );
    for (key, md) in [
        ("moe_intermediate_size", "expert_feed_forward_length"),
        (
            "shared_expert_intermediate_size",
            "expert_shared_feed_forward_length",
        ),
    ] {
        if let Some(v) = g.md_u64(&k(md)) {
            c.insert(key.into(), v.into());
        }
    }
    // llama.cpp records renormalized top-k weights as `expert_weights_norm`; its Qwen3-MoE
    // graph always renormalizes.
    let norm = g
        .md_bool(&k("expert_weights_norm"))
        .unwrap_or(g.architecture() == "qwen3moe");
    c.insert("norm_topk_prob".into(), norm.into());
    Ok(())
}
