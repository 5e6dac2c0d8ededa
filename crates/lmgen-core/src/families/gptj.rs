//! GPT-J (`GPTJForCausalLM`): parallel attention and MLP over one LayerNorm, interleaved
//! (rotate-every-two) rotary on the first `rotary_dim` dims of each head, no attention biases,
//! untied head with a bias.
use super::{heads, Family, Layout, Loader, MlpIn, Weights};
use crate::config::*;
use crate::error::Result;

pub const FAMILY: Family = Family {
    name: "gptj",
    architectures: &["GPTJForCausalLM"],
    model_types: &["gptj"],
    gguf: &[],
    spec,
    load,
};

pub fn spec(c: &RawConfig, _arch: &str) -> Result<ModelSpec> {
    let e = c.req_usize(&["n_embd", "hidden_size"])?;
    let (nh, hd) = heads(c, e, &["n_head", "num_attention_heads"])?;
    let max_positions = c.req_usize(&["n_positions", "max_position_embeddings"])?;
    let rot = c.usize_any(&["rotary_dim"])?.unwrap_or(hd);
    c.check(rot >= 2 && rot % 2 == 0 && rot <= hd, || {
        format!("bad rotary_dim {rot} for head size {hd}")
    })?;
    Ok(ModelSpec {
        vocab_size: c.req_usize(&["vocab_size"])?,
        hidden_size: e,
        num_layers: c.req_usize(&["n_layer", "num_hidden_layers"])?,
        num_heads: nh,
        num_kv_heads: nh,
        head_dim: hd,
        intermediate_size: c.usize_any(&["n_inner"])?.unwrap_or(4 * e),
        max_positions,
        norm_eps: c.f64_any(&["layer_norm_epsilon"])?.unwrap_or(1e-5),
        positions: Positions::Rope(RopeSpec {
            rotary_dim: rot,
            base: 10000.0,
            inv_freq: default_inv_freq(10000.0, rot),
            attention_factor: 1.0,
            scaling: RopeScaling::None,
            interleaved: true,
        }),
        residual: Residual::Parallel,
        activation: c.activation(&["activation_function"], "gelu_new")?,
        qkv_bias: false,
        out_bias: false,
        mlp_bias: true,
        attn_scale: 1.0 / (hd as f64).sqrt(),
        tie_embeddings: c.bool_or("tie_word_embeddings", false)?,
        head_bias: true,
        embed_dim: e,
        ..ModelSpec::defaults(c)
    })
}

pub fn load(s: &ModelSpec, l: &Loader) -> Result<Weights> {
    l.ignore_buffers(&[".attn.bias", ".attn.masked_bias", ".embed_positions"]);
    let layout = Layout {
        layers: "transformer.h",
        ln1: Some("ln_1"),
        ln2: None,
        qkv: super::Qkv::Split("attn.q_proj", "attn.k_proj", "attn.v_proj"),
        out: "attn.out_proj",
        mlp_in: MlpIn::One("mlp.fc_in"),
        mlp_out: "mlp.fc_out",
        ..Layout::LLAMA
    };
    let embed = l.embedding("transformer.wte.weight", s.vocab_size, s.hidden_size)?;
    let t = l.tail();
    Ok(Weights {
        pos_embed: None,
        embed_norm: None,
        project_in: None,
        blocks: super::load_blocks(s, l, &layout)?,
        final_norm: Some(t.norm("transformer.ln_f", s.norm, s.hidden_size, s.norm_eps)?),
        project_out: None,
        lm_head: t.head(s, &embed, "transformer.wte.weight", "lm_head.weight")?,
        embed,
    })
}
