//! Family files: each maps a `config.json` to a [`ModelSpec`] and the checkpoint's tensor
//! names to the canonical [`Weights`] layout (with load-time transforms such as GPT-2's
//! Conv1D transpose or the per-head de-interleaving of fused QKV).
use super::decoder::{Block, Weights};
use super::layers::{Linear, Norm, Weight};
use super::quant::QMatrix;
use crate::config::{Family, ModelSpec, NormKind, RawConfig};
use crate::error::{Error, Result};
use crate::weights::WeightStore;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

pub mod bloom;
pub mod gpt2;
pub mod gpt_neox;
pub mod llama;
pub mod opt;

/// `architectures[0]` values we run, with their family.
pub const ARCHITECTURES: &[(&str, Family)] = &[
    ("BloomForCausalLM", Family::Bloom),
    ("OPTForCausalLM", Family::Opt),
    ("GPTNeoXForCausalLM", Family::GptNeox),
    ("GPT2LMHeadModel", Family::Gpt2),
    ("LlamaForCausalLM", Family::Llama),
    ("MistralForCausalLM", Family::Llama),
    ("Qwen2ForCausalLM", Family::Llama),
];

const MODEL_TYPES: &[(&str, Family)] = &[
    ("bloom", Family::Bloom),
    ("opt", Family::Opt),
    ("gpt_neox", Family::GptNeox),
    ("gpt2", Family::Gpt2),
    ("llama", Family::Llama),
    ("mistral", Family::Llama),
    ("qwen2", Family::Llama),
];

/// Pick the family from `architectures[0]`, falling back to `model_type`.
pub fn detect(cfg: &RawConfig) -> Result<(Family, String)> {
    let arch = cfg
        .get("architectures")
        .and_then(|a| a.as_array())
        .and_then(|a| a.first())
        .and_then(|a| a.as_str())
        .map(str::to_string);
    let model_type = cfg
        .get("model_type")
        .and_then(|m| m.as_str())
        .map(str::to_string);
    if let Some(a) = &arch {
        if let Some((name, f)) = ARCHITECTURES.iter().find(|(n, _)| n == a) {
            return Ok((*f, name.to_string()));
        }
    }
    if let Some(m) = &model_type {
        if let Some((_, f)) = MODEL_TYPES.iter().find(|(n, _)| n == m) {
            // A known model type under an unknown head class (e.g. a classifier) is still an error.
            if arch.is_none() {
                let name = ARCHITECTURES
                    .iter()
                    .find(|(_, ff)| ff == f)
                    .map(|(n, _)| n.to_string());
                return Ok((*f, name.unwrap_or_default()));
            }
        }
    }
    Err(Error::UnknownArchitecture {
        path: cfg.path.clone(),
        arch: arch.or(model_type).unwrap_or_else(|| "<none>".into()),
        supported: ARCHITECTURES
            .iter()
            .map(|(n, _)| *n)
            .collect::<Vec<_>>()
            .join(", "),
    })
}

pub fn spec(family: Family, arch: &str, cfg: &RawConfig) -> Result<ModelSpec> {
    let mut spec = match family {
        Family::Gpt2 => gpt2::spec(cfg)?,
        Family::Opt => opt::spec(cfg)?,
        Family::GptNeox => gpt_neox::spec(cfg)?,
        Family::Bloom => bloom::spec(cfg)?,
        Family::Llama => llama::spec(cfg, arch)?,
    };
    spec.architecture = arch.to_string();
    cfg.check(
        spec.num_heads > 0 && spec.num_kv_heads > 0 && spec.num_heads % spec.num_kv_heads == 0,
        || {
            format!(
                "{} attention heads cannot be grouped over {} key/value heads",
                spec.num_heads, spec.num_kv_heads
            )
        },
    )?;
    cfg.check(
        spec.vocab_size > 0 && spec.num_layers > 0 && spec.hidden_size > 0,
        || "empty model dimensions".into(),
    )?;
    Ok(spec)
}

pub fn load(spec: &ModelSpec, l: &Loader) -> Result<Weights> {
    let w = match spec.family {
        Family::Gpt2 => gpt2::load(spec, l)?,
        Family::Opt => opt::load(spec, l)?,
        Family::GptNeox => gpt_neox::load(spec, l)?,
        Family::Bloom => bloom::load(spec, l)?,
        Family::Llama => llama::load(spec, l)?,
    };
    l.store.check_all_used()?;
    Ok(w)
}

/// Reads canonical pieces out of a [`WeightStore`], resolving an optional base prefix
/// (checkpoints differ on e.g. `transformer.h.0` vs `h.0`).
#[derive(Clone)]
pub struct Loader<'a> {
    pub store: &'a WeightStore,
    /// Where tensors go (for blocks: the block's device, see [`Loader::block`]).
    pub device: Device,
    pub dtype: DType,
    prefix: String,
    /// One device per block when layers are spread over several devices.
    placement: Option<Vec<Device>>,
    keep_quantized: bool,
    /// Norms have learned weights (and biases) in the checkpoint.
    affine_norms: bool,
}

impl<'a> Loader<'a> {
    pub fn new(store: &'a WeightStore, device: Device, dtype: DType) -> Self {
        Self {
            store,
            device,
            dtype,
            prefix: String::new(),
            placement: None,
            keep_quantized: false,
            affine_norms: true,
        }
    }

    /// Spread blocks over devices (one entry per block); embeddings stay on `device`.
    pub fn with_placement(mut self, devices: Vec<Device>) -> Self {
        self.placement = Some(devices);
        self
    }

    /// Loader for block `i`: its tensors go to that block's device.
    pub fn block(&self, i: usize) -> Self {
        let mut l = self.clone();
        if let Some(d) = self.placement.as_ref().and_then(|p| p.get(i)) {
            l.device = d.clone();
        }
        l
    }

    /// Loader for what follows the last block (final norm, projection, head).
    pub fn tail(&self) -> Self {
        self.block(
            self.placement
                .as_ref()
                .map_or(0, |p| p.len().saturating_sub(1)),
        )
    }

    /// Use `prefix` (e.g. `"transformer."`) if the checkpoint has `prefix + probe`, else no prefix.
    pub fn with_prefix(mut self, prefix: &str, probe: &str) -> Self {
        if self.store.contains(&format!("{prefix}{probe}")) {
            self.prefix = prefix.to_string();
        }
        self
    }

    pub fn name(&self, n: &str) -> String {
        format!("{}{}", self.prefix, n)
    }

    /// Tensor at the prefixed name, checked against `shape`.
    pub fn t(&self, n: &str, shape: &[usize]) -> Result<Tensor> {
        self.store
            .get(&self.name(n), Some(shape), self.dtype, &self.device)
    }

    /// Tensor at an absolute (unprefixed) name.
    pub fn abs(&self, n: &str, shape: &[usize]) -> Result<Tensor> {
        self.store.get(n, Some(shape), self.dtype, &self.device)
    }

    pub fn linear(&self, p: &str, out: usize, inp: usize, bias: bool) -> Result<Linear> {
        let b = if bias {
            Some(self.t(&format!("{p}.bias"), &[out])?)
        } else {
            None
        };
        if let Some(q) = self.quantized(&self.name(&format!("{p}.weight")), &[out, inp])? {
            return Ok(Linear {
                weight: Weight::Quant(Arc::new(q)),
                bias: b,
            });
        }
        let w = self.t(&format!("{p}.weight"), &[out, inp])?;
        Ok(Linear::new(w, b))
    }

    /// The stored quantized form of a matrix, when the checkpoint has one and we keep it.
    fn quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QMatrix>> {
        if !self.keep_quantized || !self.device.is_cpu() {
            return Ok(None);
        }
        self.store.get_quantized(name, shape)
    }

    /// Norms without learned parameters (`false`): unit scale, zero shift.
    pub fn affine_norms(mut self, affine: bool) -> Self {
        self.affine_norms = affine;
        self
    }

    /// Keep matrices that the checkpoint stores quantized (GGUF) in that form.
    pub fn keep_quantized(mut self, keep: bool) -> Self {
        self.keep_quantized = keep;
        self
    }

    /// GPT-2 `Conv1D`: weight stored `[in, out]`.
    pub fn conv1d(&self, p: &str, out: usize, inp: usize) -> Result<Linear> {
        let w = self
            .t(&format!("{p}.weight"), &[inp, out])?
            .t()?
            .contiguous()?;
        Ok(Linear::new(w, Some(self.t(&format!("{p}.bias"), &[out])?)))
    }

    pub fn norm(&self, p: &str, kind: NormKind, dim: usize, eps: f64) -> Result<Norm> {
        if !self.affine_norms {
            // No learned scale/shift (OPT `layer_norm_elementwise_affine=false`).
            let weight = Tensor::ones(dim, self.dtype, &self.device)?;
            let bias = (kind == NormKind::LayerNorm)
                .then(|| weight.zeros_like())
                .transpose()?;
            return Ok(Norm {
                kind,
                weight,
                bias,
                eps: eps as f32,
            });
        }
        let weight = self.t(&format!("{p}.weight"), &[dim])?;
        let bias = match kind {
            NormKind::LayerNorm => Some(self.t(&format!("{p}.bias"), &[dim])?),
            NormKind::RmsNorm => None,
        };
        Ok(Norm {
            kind,
            weight,
            bias,
            eps: eps as f32,
        })
    }

    /// Mark buffers that some checkpoints carry (causal masks, rotary `inv_freq`) as known.
    pub fn ignore_buffers(&self, suffixes: &[&str]) {
        let names: Vec<String> = self
            .store
            .names()
            .filter(|n| suffixes.iter().any(|s| n.ends_with(s)))
            .cloned()
            .collect();
        for n in names {
            self.store.ignore(&n);
        }
    }

    /// Output head: `head_name` when untied (or present as an alias of the tied embedding),
    /// else the embedding `embed` (stored as `embed_name`; its quantized form when kept).
    pub fn head(
        &self,
        spec: &ModelSpec,
        embed: &Tensor,
        embed_name: &str,
        head_name: &str,
    ) -> Result<Linear> {
        let shape = [spec.vocab_size, spec.embed_dim];
        if spec.tie_embeddings {
            if self.store.contains(head_name) {
                self.store.ignore(head_name);
            }
            if let Some(q) = self.quantized(embed_name, &shape)? {
                return Ok(Linear {
                    weight: Weight::Quant(Arc::new(q)),
                    bias: None,
                });
            }
            Ok(Linear::new(embed.to_device(&self.device)?, None))
        } else {
            if let Some(q) = self.quantized(head_name, &shape)? {
                return Ok(Linear {
                    weight: Weight::Quant(Arc::new(q)),
                    bias: None,
                });
            }
            Ok(Linear::new(self.abs(head_name, &shape)?, None))
        }
    }
}

/// Concatenate linears along the output dimension (fused QKV, fused gate/up). Quantized
/// parts of one kind stay quantized; a mix is dequantized.
pub fn fuse(parts: &[Linear]) -> Result<Linear> {
    let bias = if parts.iter().all(|p| p.bias.is_some()) {
        let bs: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
        Some(Tensor::cat(&bs, 0)?)
    } else {
        None
    };
    let quant: Vec<&QMatrix> = parts
        .iter()
        .filter_map(|p| match &p.weight {
            Weight::Quant(q) => Some(q.as_ref()),
            Weight::Dense(_) => None,
        })
        .collect();
    if quant.len() == parts.len()
        && quant
            .iter()
            .all(|q| q.kind() == quant[0].kind() && q.cols() == quant[0].cols())
    {
        let data: Vec<u8> = quant.iter().flat_map(|q| q.to_ggml_bytes()).collect();
        let rows = quant.iter().map(|q| q.rows()).sum();
        let q = QMatrix::from_ggml_bytes(quant[0].kind(), rows, quant[0].cols(), &data)
            .map_err(candle_core::Error::Msg)?;
        return Ok(Linear {
            weight: Weight::Quant(Arc::new(q)),
            bias,
        });
    }
    let ws = parts
        .iter()
        .map(|p| p.to_dense())
        .collect::<candle_core::Result<Vec<Tensor>>>()?;
    Ok(Linear::new(Tensor::cat(&ws, 0)?, bias))
}

/// Fused QKV stored per head as `[heads, 3, head_dim]` rows (GPT-NeoX, BLOOM) →
/// canonical `[q heads; k heads; v heads]`.
pub fn deinterleave_qkv(l: Linear, heads: usize, head_dim: usize) -> Result<Linear> {
    let inp = l.dense()?.dim(1)?;
    let reorder = |t: &Tensor, cols: usize| -> Result<Tensor> {
        Ok(t.reshape((heads, 3, head_dim, cols))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((3 * heads * head_dim, cols))?)
    };
    let weight = reorder(l.dense()?, inp)?;
    let bias = match &l.bias {
        Some(b) => Some(reorder(&b.reshape((3 * heads * head_dim, 1))?, 1)?.flatten_all()?),
        None => None,
    };
    Ok(Linear::new(weight, bias))
}

/// Blocks for the common "two LayerNorms, fused QKV, plain MLP" layout, given name builders.
pub struct BlockNames<'n> {
    pub ln1: &'n str,
    pub ln2: &'n str,
    pub qkv: &'n str,
    pub out: &'n str,
    pub fc_in: &'n str,
    pub fc_out: &'n str,
}

/// Load blocks whose fused QKV is per-head interleaved (GPT-NeoX and BLOOM share this).
pub fn load_interleaved_blocks(
    spec: &ModelSpec,
    l: &Loader,
    layers: &str,
    n: &BlockNames,
) -> Result<Vec<Block>> {
    let (e, hd, nh, inter) = (
        spec.hidden_size,
        spec.head_dim,
        spec.num_heads,
        spec.intermediate_size,
    );
    (0..spec.num_layers)
        .map(|i| {
            let l = l.block(i);
            let p = format!("{layers}.{i}");
            Ok(Block {
                ln1: l.norm(&format!("{p}.{}", n.ln1), spec.norm, e, spec.norm_eps)?,
                ln2: Some(l.norm(&format!("{p}.{}", n.ln2), spec.norm, e, spec.norm_eps)?),
                qkv: deinterleave_qkv(
                    l.linear(&format!("{p}.{}", n.qkv), 3 * e, e, spec.qkv_bias)?,
                    nh,
                    hd,
                )?,
                out: l.linear(&format!("{p}.{}", n.out), e, e, spec.out_bias)?,
                mlp_in: l.linear(&format!("{p}.{}", n.fc_in), inter, e, spec.mlp_bias)?,
                mlp_out: l.linear(&format!("{p}.{}", n.fc_out), e, inter, spec.mlp_bias)?,
            })
        })
        .collect()
}
