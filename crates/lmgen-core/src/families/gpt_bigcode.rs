//! GPT-BigCode / StarCoder / SantaCoder (`GPTBigCodeForCausalLM`): GPT-2 with `nn.Linear`
//! weights, multi-query attention (`[q; k; v]` with one kv head) or per-head interleaved fused
//! QKV, learned positions, tied head.
use super::{deinterleave_qkv, heads, Family, Loader, Weights};
use crate::config::*;
use crate::error::Result;
use crate::weights::gguf::{Fix, GgufArch, GgufFile};
use serde_json::{Map, Value};

/// `config.json` of a GPT-BigCode GGUF (llama.cpp's `starcoder`): multi-query from the kv
/// heads, the MLP width and the position table from their matrices.
fn gguf_config(g: &GgufFile, c: &mut Map<String, Value>) -> Result<()> {
    let mq = c.get("num_key_value_heads").and_then(|v| v.as_u64()) == Some(1);
    c.insert("multi_query".into(), mq.into());
    if let Some(&[inter, _]) = g.shape("transformer.h.0.mlp.c_fc.weight") {
        c.insert("n_inner".into(), inter.into());
    }
    if let Some(&[n, _]) = g.shape("transformer.wpe.weight") {
        c.insert("n_positions".into(), n.into());
    }
    c.insert("activation_function".into(), "gelu_pytorch_tanh".into());
    Ok(())
}
use crate::model::decoder::Block;

pub const FAMILY: Family = Family {
    name: "gpt_bigcode",
    architectures: &["GPTBigCodeForCausalLM"],
    model_types: &["gpt_bigcode"],
    gguf: &[GgufArch {
        arch: "starcoder",
        class: "GPTBigCodeForCausalLM",
        blocks: "transformer.h",
        tensors: &[&[
            ("token_embd", "transformer.wte", Fix::Keep),
            ("position_embd", "transformer.wpe", Fix::Keep),
            ("output_norm", "transformer.ln_f", Fix::Keep),
            ("output", "lm_head", Fix::Keep),
            ("attn_norm", "ln_1", Fix::Keep),
            ("attn_qkv", "attn.c_attn", Fix::Keep),
            ("attn_output", "attn.c_proj", Fix::Keep),
            ("ffn_norm", "ln_2", Fix::Keep),
            ("ffn_up", "mlp.c_fc", Fix::Keep),
            ("ffn_down", "mlp.c_proj", Fix::Keep),
        ]],
        config: gguf_config,
    }],
    spec,
    load,
};

pub fn spec(c: &RawConfig, _arch: &str) -> Result<ModelSpec> {
    let e = c.req_usize(&["n_embd", "hidden_size"])?;
    let (nh, hd) = heads(c, e, &["n_head", "num_attention_heads"])?;
    let n_pos = c.req_usize(&["n_positions", "max_position_embeddings"])?;
    Ok(ModelSpec {
        vocab_size: c.req_usize(&["vocab_size"])?,
        hidden_size: e,
        num_layers: c.req_usize(&["n_layer", "num_hidden_layers"])?,
        num_heads: nh,
        num_kv_heads: if c.bool_or("multi_query", true)? {
            1
        } else {
            nh
        },
        head_dim: hd,
        intermediate_size: c.usize_any(&["n_inner"])?.unwrap_or(4 * e),
        max_positions: n_pos,
        norm_eps: c.f64_any(&["layer_norm_epsilon"])?.unwrap_or(1e-5),
        positions: Positions::Learned {
            offset: 0,
            table_size: n_pos,
        },
        activation: c.activation(&["activation_function"], "gelu_pytorch_tanh")?,
        attn_scale: if c.bool_or("scale_attn_weights", true)? {
            1.0 / (hd as f64).sqrt()
        } else {
            1.0
        },
        tie_embeddings: c.bool_or("tie_word_embeddings", true)?,
        embed_dim: e,
        ..ModelSpec::defaults(c)
    })
}

pub fn load(s: &ModelSpec, l: &Loader) -> Result<Weights> {
    l.ignore_buffers(&[".attn.bias", ".attn.masked_bias"]);
    let (e, inter, hd, nh, nkv) = (
        s.hidden_size,
        s.intermediate_size,
        s.head_dim,
        s.num_heads,
        s.num_kv_heads,
    );
    let Positions::Learned { table_size, .. } = s.positions else {
        unreachable!("gpt_bigcode uses learned positions")
    };
    let blocks = (0..s.num_layers)
        .map(|i| {
            let l = l.block(i);
            let p = format!("transformer.h.{i}");
            let norm = |n: &str| l.norm(&format!("{p}.{n}"), s.norm, e, s.norm_eps);
            let qkv = l.linear(&format!("{p}.attn.c_attn"), (nh + 2 * nkv) * hd, e, true)?;
            Ok(Block {
                ln1: Some(norm("ln_1")?),
                ln2: Some(norm("ln_2")?),
                post_attn_norm: None,
                post_mlp_norm: None,
                q_norm: None,
                k_norm: None,
                moe: None,
                qkv: if nkv == nh {
                    deinterleave_qkv(qkv, nh, hd)?
                } else {
                    qkv
                },
                out: l.linear(&format!("{p}.attn.c_proj"), e, e, true)?,
                mlp_in: l.linear(&format!("{p}.mlp.c_fc"), inter, e, true)?,
                mlp_out: l.linear(&format!("{p}.mlp.c_proj"), e, inter, true)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let embed = l.embedding("transformer.wte.weight", s.vocab_size, e)?;
    let t = l.tail();
    Ok(Weights {
        pos_embed: Some(l.abs("transformer.wpe.weight", &[table_size, e])?),
        embed_norm: None,
        project_in: None,
        blocks,
        final_norm: Some(t.norm("transformer.ln_f", s.norm, e, s.norm_eps)?),
        project_out: None,
        lm_head: t.head(s, &embed, "transformer.wte.weight", "lm_head.weight")?,
        embed,
    })
}
