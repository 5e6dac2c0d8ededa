//! `config.json` → [`ModelSpec`]: the normalized description the generic decoder runs on.
//! Family files (`model/families/*.rs`) fill it in; nothing downstream looks at raw config keys.
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum NormKind {
    LayerNorm,
    RmsNorm,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Activation {
    Relu,
    /// Exact (erf) GELU, transformers' "gelu".
    Gelu,
    /// tanh approximation: "gelu_new", "gelu_pytorch_tanh", "gelu_fast", BLOOM's gelu.
    GeluTanh,
    QuickGelu,
    Silu,
}

impl Activation {
    pub fn from_hf(name: &str) -> Option<Self> {
        Some(match name {
            "relu" => Self::Relu,
            "gelu" | "gelu_python" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" | "bloom_gelu" => Self::GeluTanh,
            "quick_gelu" => Self::QuickGelu,
            "silu" | "swish" => Self::Silu,
            _ => return None,
        })
    }
}

/// How inverse frequencies are derived from the position (transformers' `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// "dynamic" NTK: the base grows with the sequence length once it exceeds `max_positions`.
    Dynamic {
        factor: f64,
        max_positions: usize,
    },
    /// Phi-3 "longrope": `inv_freq` (short factors) while the sequence fits `original_max`,
    /// `long_inv_freq` beyond it (chosen per call from the length seen, as transformers does).
    LongRope {
        long_inv_freq: Vec<f32>,
        original_max: usize,
    },
}

#[derive(Debug, Clone)]
pub struct RopeSpec {
    /// Number of leading head dimensions that are rotated (partial rotary).
    pub rotary_dim: usize,
    pub base: f64,
    /// Inverse frequencies for the unscaled case (already includes linear/llama3/yarn adjustment).
    pub inv_freq: Vec<f32>,
    /// Multiplier on cos/sin (YaRN's attention factor).
    pub attention_factor: f32,
    pub scaling: RopeScaling,
    /// GPT-J style interleaved pairs instead of half-split.
    pub interleaved: bool,
}

#[derive(Debug, Clone)]
pub enum Positions {
    /// Learned absolute positions; index = position + offset (OPT: 2).
    Learned {
        offset: usize,
        table_size: usize,
    },
    Rope(RopeSpec),
    Alibi,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MlpKind {
    /// up → act → down
    Plain,
    /// (act(gate) * up) → down, fused as one `[gate; up]` projection.
    Gated,
}

/// How ALiBi slopes are derived from the head count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AlibiSlopes {
    /// BLOOM: geometric from 2^(-8/n), interleaved extras for non-powers of two.
    Bloom,
    /// Falcon: BLOOM's slopes rounded to bfloat16 (as transformers builds them).
    BloomBf16,
    /// MPT: `1 / 2^(i * bias_max / n)`, odd-then-even for non-powers of two.
    Mpt { bias_max: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Residual {
    /// x += post1(attn(ln1(x))); x += post2(mlp(ln2(x)))   (absent norms are the identity:
    /// OLMo-2 has only the post norms, Gemma-2/3 all four)
    Sequential,
    /// x += attn(ln1(x)) + mlp(ln2(x))   (GPT-NeoX `use_parallel_residual`; without `ln2`
    /// both read `ln1(x)`, as GPT-J, Phi, Falcon)
    Parallel,
    /// x = ln1(x + attn(x)); x = ln2(x + mlp(x))   (OPT `do_layer_norm_before=False`)
    PostNorm,
    /// BLOOM `apply_residual_connection_post_layernorm`: residual taken after the norm.
    SequentialFromNormed,
}

/// Mixture of experts in place of the MLP: a router picks `top_k` of `experts` gated MLPs per
/// token (softmax over all experts, then top-k, lowest index first on ties).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeSpec {
    pub experts: usize,
    pub top_k: usize,
    /// Width of each expert's MLP.
    pub expert_inter: usize,
    /// The top-k probabilities are renormalized to sum to 1 (Mixtral; Qwen `norm_topk_prob`).
    pub norm_topk: bool,
    /// A shared expert of this width runs on every token, scaled by a sigmoid gate (Qwen2-MoE).
    pub shared_inter: Option<usize>,
    /// Per layer: whether it has the experts (else a dense MLP of `intermediate_size`).
    pub sparse_layers: Vec<bool>,
}

/// Normalized model description. All families run through one decoder using this.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// Registry name of the family (`families::FAMILIES`).
    pub family: &'static str,
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    /// Context length (prompts + generation must fit).
    pub max_positions: usize,
    pub norm: NormKind,
    pub norm_eps: f64,
    /// Norms carry learned scale/shift (OPT `layer_norm_elementwise_affine`).
    pub norm_affine: bool,
    pub positions: Positions,
    pub residual: Residual,
    pub mlp: MlpKind,
    pub activation: Activation,
    pub qkv_bias: bool,
    pub out_bias: bool,
    pub mlp_bias: bool,
    /// Multiplies q·k (usually 1/sqrt(head_dim); GPT-2 may disable it).
    pub attn_scale: f64,
    /// GPT-2 `scale_attn_by_inverse_layer_idx`: scores /= (layer + 1).
    pub scale_by_inverse_layer: bool,
    pub sliding_window: Option<usize>,
    /// Per layer: whether it uses `sliding_window` (transformers' `layer_types`).
    pub sliding_layers: Vec<bool>,
    pub embed_norm: bool,
    pub final_norm: bool,
    pub tie_embeddings: bool,
    /// OPT `word_embed_proj_dim` when it differs from `hidden_size` (project_in/out).
    pub embed_dim: usize,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// Multiplier on the token embeddings (Gemma: sqrt(hidden_size)).
    pub embed_scale: Option<f32>,
    /// Attention scores soft-capped as `cap * tanh(s / cap)` before the mask (Gemma-2).
    pub attn_softcap: Option<f32>,
    /// Final logits soft-capped the same way (Gemma-2).
    pub final_softcap: Option<f32>,
    /// q, k, v clamped to `[-c, c]` after the projection (OLMo, MPT `clip_qkv`).
    pub clip_qkv: Option<f32>,
    /// Blocks normalize q and k before the rotary (Qwen3, Gemma-3, OLMo-2, Phi, StableLM).
    pub qk_norm: bool,
    /// q/k norms normalize the whole q and k projections (OLMo-2)
    /// instead of each head (Qwen3, Gemma-3, Phi, StableLM).
    pub qk_norm_whole: bool,
    /// Rotary of the sliding-window layers where it differs from `positions` (Gemma-3).
    pub local_rope: Option<RopeSpec>,
    pub alibi_slopes: AlibiSlopes,
    /// Multiplier on the ALiBi slopes (Falcon scales the bias with the scores).
    pub alibi_scale: f32,
    /// Falcon: the ALiBi bias of key position j is `bf16(slope × bf16(j)) × alibi_scale`, the
    /// product rounded to bfloat16 as transformers builds it (absolute key positions), instead
    /// of `slope × alibi_scale × (j − query position)`.
    pub alibi_bf16_products: bool,
    /// The output head has a bias (GPT-J, Phi).
    pub head_bias: bool,
    /// Mixture of experts in place of the MLP (Mixtral, Qwen-MoE, OLMoE).
    pub moe: Option<MoeSpec>,
    /// `clip_qkv` applies after the q/k norms (OLMoE) rather than to the projection (OLMo, MPT).
    pub clip_after_qk_norm: bool,
}

impl ModelSpec {
    /// The common case (pre-norm LayerNorm block, plain MLP, biases, final norm, untied,
    /// 1/sqrt(head_dim) scaling filled in by the family) with the token ids from `c`;
    /// family files override what differs with struct-update syntax.
    pub fn defaults(c: &RawConfig) -> Self {
        Self {
            family: "",
            architecture: String::new(),
            vocab_size: 0,
            hidden_size: 0,
            num_layers: 0,
            num_heads: 0,
            num_kv_heads: 0,
            head_dim: 0,
            intermediate_size: 0,
            max_positions: 0,
            norm: NormKind::LayerNorm,
            norm_eps: 1e-5,
            norm_affine: true,
            positions: Positions::Alibi,
            residual: Residual::Sequential,
            mlp: MlpKind::Plain,
            activation: Activation::Gelu,
            qkv_bias: true,
            out_bias: true,
            mlp_bias: true,
            attn_scale: 1.0,
            scale_by_inverse_layer: false,
            sliding_window: None,
            sliding_layers: vec![],
            embed_norm: false,
            final_norm: true,
            tie_embeddings: false,
            embed_dim: 0,
            bos_token_id: c.token_id("bos_token_id"),
            eos_token_ids: c.token_ids("eos_token_id"),
            embed_scale: None,
            attn_softcap: None,
            final_softcap: None,
            clip_qkv: None,
            qk_norm: false,
            qk_norm_whole: false,
            local_rope: None,
            alibi_slopes: AlibiSlopes::Bloom,
            alibi_scale: 1.0,
            alibi_bf16_products: false,
            head_bias: false,
            moe: None,
            clip_after_qk_norm: false,
        }
    }

    /// ALiBi slope per head (already multiplied by the attention scale where the family
    /// scales the bias, unless [`Self::alibi_bf16_scale`] applies it to the rounded products),
    /// for models with ALiBi positions.
    pub fn alibi(&self) -> Option<Vec<f32>> {
        if !matches!(self.positions, Positions::Alibi) {
            return None;
        }
        let n = self.num_heads;
        let mut s = match self.alibi_slopes {
            AlibiSlopes::Bloom => bloom_alibi_slopes(n),
            AlibiSlopes::BloomBf16 => bloom_alibi_slopes(n).into_iter().map(round_bf16).collect(),
            AlibiSlopes::Mpt { bias_max } => {
                let p2 = n.next_power_of_two();
                let all: Vec<f32> = (1..=p2)
                    .map(|i| 1.0 / 2f32.powf(i as f32 * (bias_max / p2 as f64) as f32))
                    .collect();
                if p2 == n {
                    all
                } else {
                    all.iter()
                        .skip(1)
                        .step_by(2)
                        .chain(all.iter().step_by(2))
                        .take(n)
                        .copied()
                        .collect()
                }
            }
        };
        if self.alibi_scale != 1.0 && !self.alibi_bf16_products {
            s.iter_mut().for_each(|x| *x *= self.alibi_scale);
        }
        Some(s)
    }

    /// Phi-3 longrope: `original_max_position_embeddings`, past which the long factors apply.
    pub fn longrope_original_max(&self) -> Option<usize> {
        match &self.positions {
            Positions::Rope(RopeSpec {
                scaling: RopeScaling::LongRope { original_max, .. },
                ..
            }) => Some(*original_max),
            _ => None,
        }
    }

    /// With `alibi_bf16_products` (Falcon): the factor on the bfloat16-rounded products of
    /// [`Self::alibi`]'s slopes and the key positions.
    pub fn alibi_bf16_scale(&self) -> Option<f32> {
        (self.alibi_bf16_products && matches!(self.positions, Positions::Alibi))
            .then_some(self.alibi_scale)
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    /// Width of hidden state `i` in `output_hidden_states` indexing (0..=num_layers).
    pub fn hidden_width(&self, i: usize) -> usize {
        if i == self.num_layers {
            self.embed_dim
        } else {
            self.hidden_size
        }
    }
}

/// Typed accessors over a raw config.json with errors naming the file and key.
pub struct RawConfig {
    pub path: PathBuf,
    pub json: Value,
}

impl RawConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: Value = serde_json::from_str(&text).map_err(|e| Error::bad_config(path, e))?;
        if !json.is_object() {
            return Err(Error::bad_config(path, "expected a JSON object"));
        }
        Ok(Self {
            path: path.to_path_buf(),
            json,
        })
    }

    pub fn from_value(path: &Path, json: Value) -> Self {
        Self {
            path: path.to_path_buf(),
            json,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.json.get(key).filter(|v| !v.is_null())
    }

    fn err(&self, msg: String) -> Error {
        Error::bad_config(&self.path, msg)
    }

    /// First present key among `keys` as usize.
    pub fn usize_any(&self, keys: &[&str]) -> Result<Option<usize>> {
        for k in keys {
            if let Some(v) = self.get(k) {
                return v.as_u64().map(|x| Some(x as usize)).ok_or_else(|| {
                    self.err(format!("'{k}' must be a non-negative integer, got {v}"))
                });
            }
        }
        Ok(None)
    }

    pub fn req_usize(&self, keys: &[&str]) -> Result<usize> {
        self.usize_any(keys)?
            .ok_or_else(|| self.err(format!("missing '{}'", keys[0])))
    }

    pub fn f64_any(&self, keys: &[&str]) -> Result<Option<f64>> {
        for k in keys {
            if let Some(v) = self.get(k) {
                return v
                    .as_f64()
                    .map(Some)
                    .ok_or_else(|| self.err(format!("'{k}' must be a number, got {v}")));
            }
        }
        Ok(None)
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(format!("'{key}' must be a boolean, got {v}"))),
        }
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.err(format!("'{key}' must be a string, got {v}"))),
        }
    }

    pub fn activation(&self, keys: &[&str], default: &str) -> Result<Activation> {
        let name = keys
            .iter()
            .find_map(|k| self.get(k).and_then(|v| v.as_str()))
            .unwrap_or(default);
        Activation::from_hf(name)
            .ok_or_else(|| self.err(format!("unsupported activation '{name}'")))
    }

    pub fn token_id(&self, key: &str) -> Option<u32> {
        self.get(key).and_then(|v| v.as_u64()).map(|x| x as u32)
    }

    /// `eos_token_id` may be an int or a list.
    pub fn token_ids(&self, key: &str) -> Vec<u32> {
        match self.get(key) {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|x| x as u32)
                .collect(),
            Some(v) => v.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            None => vec![],
        }
    }

    /// transformers 5 stores rope settings in `rope_parameters`; older configs use
    /// `rope_theta` + `rope_scaling` (+ `partial_rotary_factor`). Returns a merged view.
    pub fn rope_params(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        if let Some(Value::Object(s)) = self.get("rope_scaling") {
            m.extend(s.clone());
        }
        if let Some(Value::Object(p)) = self.get("rope_parameters") {
            m.extend(p.clone());
        }
        m
    }

    pub fn check(&self, cond: bool, msg: impl FnOnce() -> String) -> Result<()> {
        if cond {
            Ok(())
        } else {
            Err(self.err(msg()))
        }
    }
}

/// Build the rotary spec from rope parameters the way transformers' `modeling_rope_utils` does.
pub fn rope_spec(
    cfg: &RawConfig,
    head_dim: usize,
    default_partial: f64,
    default_base: f64,
    max_positions: usize,
) -> Result<RopeSpec> {
    rope_spec_from(
        cfg,
        &cfg.rope_params(),
        head_dim,
        default_partial,
        default_base,
        max_positions,
    )
}

/// [`rope_spec`] over explicit rope parameters (one entry of a per-layer-type map).
pub fn rope_spec_from(
    cfg: &RawConfig,
    p: &serde_json::Map<String, Value>,
    head_dim: usize,
    default_partial: f64,
    default_base: f64,
    max_positions: usize,
) -> Result<RopeSpec> {
    let num = |k: &str| p.get(k).and_then(|v| v.as_f64());
    let base = num("rope_theta")
        .or(cfg.f64_any(&["rope_theta", "rotary_emb_base"])?)
        .unwrap_or(default_base);
    let partial = num("partial_rotary_factor")
        .or(cfg.f64_any(&["partial_rotary_factor", "rotary_pct"])?)
        .unwrap_or(default_partial);
    let dim = (head_dim as f64 * partial) as usize;
    cfg.check(dim >= 2 && dim % 2 == 0 && dim <= head_dim, || {
        format!("bad rotary dimension {dim}")
    })?;
    let rope_type = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(|v| v.as_str())
        .unwrap_or("default")
        .to_string();
    let default_inv: Vec<f32> = default_inv_freq(base, dim);
    let factor = num("factor");
    let need_factor = || {
        factor.ok_or_else(|| {
            Error::bad_config(&cfg.path, format!("rope type '{rope_type}' needs 'factor'"))
        })
    };
    let orig_max = num("original_max_position_embeddings")
        .or(cfg.f64_any(&["original_max_position_embeddings"])?)
        .map(|x| x as usize);
    let mut attention_factor = 1.0f32;
    let mut scaling = RopeScaling::None;
    let inv_freq = match rope_type.as_str() {
        "default" => default_inv,
        "linear" => {
            let f = need_factor()? as f32;
            default_inv.iter().map(|x| x / f).collect()
        }
        "dynamic" => {
            scaling = RopeScaling::Dynamic {
                factor: need_factor()?,
                max_positions,
            };
            default_inv
        }
        "llama3" => {
            let factor = need_factor()? as f32;
            let low = num("low_freq_factor").unwrap_or(1.0) as f32;
            let high = num("high_freq_factor").unwrap_or(4.0) as f32;
            let old = orig_max.unwrap_or(max_positions) as f32;
            let low_wl = old / low;
            let high_wl = old / high;
            default_inv
                .iter()
                .map(|&f| {
                    let wl = 2.0 * std::f32::consts::PI / f;
                    let scaled = if wl > low_wl { f / factor } else { f };
                    let smooth = (old / wl - low) / (high - low);
                    let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                    let medium = !(wl < high_wl) && !(wl > low_wl);
                    if medium {
                        smoothed
                    } else {
                        scaled
                    }
                })
                .collect()
        }
        "yarn" => {
            let orig = orig_max.unwrap_or(max_positions);
            let factor = match factor {
                Some(f) => f,
                None => max_positions as f64 / orig as f64,
            };
            let mscale = |scale: f64, m: f64| {
                if scale <= 1.0 {
                    1.0
                } else {
                    0.1 * m * scale.ln() + 1.0
                }
            };
            attention_factor = match num("attention_factor") {
                Some(a) => a,
                None => match (
                    num("mscale").filter(|x| *x != 0.0),
                    num("mscale_all_dim").filter(|x| *x != 0.0),
                ) {
                    (Some(m), Some(ma)) => mscale(factor, m) / mscale(factor, ma),
                    _ => mscale(factor, 1.0),
                },
            } as f32;
            let beta_fast = num("beta_fast").filter(|x| *x != 0.0).unwrap_or(32.0);
            let beta_slow = num("beta_slow").filter(|x| *x != 0.0).unwrap_or(1.0);
            let truncate = p.get("truncate").and_then(|v| v.as_bool()).unwrap_or(true);
            let corr = |rot: f64| {
                (dim as f64 * (orig as f64 / (rot * 2.0 * std::f64::consts::PI)).ln())
                    / (2.0 * base.ln())
            };
            let (mut low, mut high) = (corr(beta_fast), corr(beta_slow));
            if truncate {
                low = low.floor();
                high = high.ceil();
            }
            let low = low.max(0.0) as f32;
            let mut high = high.min(dim as f64 - 1.0) as f32;
            if low == high {
                high += 0.001;
            }
            (0..dim / 2)
                .map(|i| {
                    let pos_freq = (base as f32).powf((2 * i) as f32 / dim as f32);
                    let extra = 1.0 / pos_freq;
                    let inter = 1.0 / (factor as f32 * pos_freq);
                    let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                    let extra_factor = 1.0 - ramp;
                    inter * (1.0 - extra_factor) + extra * extra_factor
                })
                .collect()
        }
        "longrope" | "su" => {
            let orig = orig_max.unwrap_or(max_positions);
            let factors = |k: &str| -> Result<Vec<f32>> {
                let v: Vec<f32> = p
                    .get(k)
                    .and_then(|v| v.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|x| x.as_f64())
                            .map(|x| x as f32)
                            .collect()
                    })
                    .unwrap_or_default();
                cfg.check(v.len() == dim / 2, || {
                    format!("longrope '{k}' needs {} numbers", dim / 2)
                })?;
                Ok(v)
            };
            let (short, long) = (factors("short_factor")?, factors("long_factor")?);
            let factor = factor.unwrap_or(max_positions as f64 / orig as f64);
            attention_factor = match num("attention_factor") {
                Some(a) => a,
                None if factor <= 1.0 => 1.0,
                None => (1.0 + factor.ln() / (orig as f64).ln()).sqrt(),
            } as f32;
            let with = |ext: &[f32]| -> Vec<f32> {
                (0..dim / 2)
                    .map(|i| 1.0 / (ext[i] * (base as f32).powf((2 * i) as f32 / dim as f32)))
                    .collect()
            };
            scaling = RopeScaling::LongRope {
                long_inv_freq: with(&long),
                original_max: orig,
            };
            with(&short)
        }
        other => {
            return Err(Error::bad_config(
                &cfg.path,
                format!("unsupported rope type '{other}'"),
            ))
        }
    };
    Ok(RopeSpec {
        rotary_dim: dim,
        base,
        inv_freq,
        attention_factor,
        scaling,
        interleaved: false,
    })
}

/// `1 / base^(2i/dim)` computed in f32 like transformers.
pub fn default_inv_freq(base: f64, dim: usize) -> Vec<f32> {
    (0..dim / 2)
        .map(|i| 1.0 / (base as f32).powf((2 * i) as f32 / dim as f32))
        .collect()
}

/// Dynamic-NTK inverse frequencies for a sequence of length `seq_len` (transformers' formula).
pub fn dynamic_inv_freq(rope: &RopeSpec, seq_len: usize) -> Option<Vec<f32>> {
    let (factor, max_positions) = match &rope.scaling {
        RopeScaling::Dynamic {
            factor,
            max_positions,
        } => (*factor, *max_positions),
        RopeScaling::LongRope {
            long_inv_freq,
            original_max,
        } => return (seq_len > *original_max).then(|| long_inv_freq.clone()),
        RopeScaling::None => return None,
    };
    if seq_len <= max_positions {
        return None;
    }
    let dim = rope.rotary_dim as f64;
    let base = rope.base
        * ((factor * seq_len as f64 / max_positions as f64) - (factor - 1.0))
            .powf(dim / (dim - 2.0));
    Some(default_inv_freq(base, rope.rotary_dim))
}

/// BLOOM's ALiBi slopes for any head count (computed in f32 as transformers does).
pub fn bloom_alibi_slopes(n: usize) -> Vec<f32> {
    let cp = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let base = 2f64.powf(-(2f64.powf(-((cp as f64).log2() - 3.0)))) as f32;
    let mut slopes: Vec<f32> = (1..=cp).map(|i| base.powi(i as i32)).collect();
    if cp != n {
        let extra = 2f64.powf(-(2f64.powf(-(((2 * cp) as f64).log2() - 3.0)))) as f32;
        let rem = (n - cp).min(cp);
        slopes.extend((0..rem).map(|i| extra.powi((1 + 2 * i) as i32)));
    }
    slopes
}

/// Round to the nearest bfloat16 (ties to even), returned as f32.
pub fn round_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    let r = b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000;
    f32::from_bits(r)
}
