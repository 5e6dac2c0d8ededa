//! The family registry. A family is one file: its architecture names, `config.json` →
//! [`ModelSpec`], and the checkpoint's tensor names → the canonical [`Weights`] (with load-time
//! transforms such as GPT-2's Conv1D transpose or the per-head de-interleaving of fused QKV).
//! Adding one: write `families/<name>.rs` with a `FAMILY` entry and list it in [`FAMILIES`].
use crate::config::{ModelSpec, NormKind, RawConfig};
use crate::error::{Error, Result};
use crate::kernels::quant::QMatrix;
use crate::model::decoder::{Block, Weights};
use crate::model::layers::{Embedding, Linear, MappedRows, Norm, Weight};
use crate::weights::gguf::GgufArch;
use crate::weights::WeightStore;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

pub mod bloom;
pub mod falcon;
pub mod gemma;
pub mod gpt2;
pub mod gpt_bigcode;
pub mod gpt_neox;
pub mod gptj;
pub mod llama;
pub mod moe;
pub mod mpt;
pub mod olmo;
pub mod opt;
pub mod phi;
pub mod phi3;
pub mod stablelm;
pub mod starcoder2;

/// One family: what it is called, how its config and checkpoints read.
pub struct Family {
    /// Registry name (also `ModelSpec::family`).
    pub name: &'static str,
    /// `architectures[0]` values (transformers class names); the first is the canonical one.
    pub architectures: &'static [&'static str],
    /// `model_type` values, for configs without `architectures`.
    pub model_types: &'static [&'static str],
    /// llama.cpp `general.architecture` values this family reads: the class each means, its
    /// tensor names and metadata (what `convert_hf_to_gguf.py` writes for the family).
    pub gguf: &'static [GgufArch],
    /// config → spec, given the architecture name that matched.
    pub spec: fn(&RawConfig, &str) -> Result<ModelSpec>,
    /// checkpoint → canonical weights.
    pub load: fn(&ModelSpec, &Loader) -> Result<Weights>,
}

/// Every family lmgen runs.
pub const FAMILIES: &[Family] = &[
    llama::FAMILY,
    moe::FAMILY,
    gemma::FAMILY,
    phi3::FAMILY,
    olmo::FAMILY,
    starcoder2::FAMILY,
    stablelm::FAMILY,
    gpt_neox::FAMILY,
    gptj::FAMILY,
    falcon::FAMILY,
    phi::FAMILY,
    gpt_bigcode::FAMILY,
    mpt::FAMILY,
    bloom::FAMILY,
    opt::FAMILY,
    gpt2::FAMILY,
];

/// All architecture names, for messages and documentation.
pub fn architectures() -> impl Iterator<Item = &'static str> {
    FAMILIES
        .iter()
        .flat_map(|f| f.architectures.iter().copied())
}

/// Pick the family from `architectures[0]`, falling back to `model_type`.
pub fn detect(cfg: &RawConfig) -> Result<(&'static Family, String)> {
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
        if let Some(f) = FAMILIES
            .iter()
            .find(|f| f.architectures.contains(&a.as_str()))
        {
            return Ok((f, a.clone()));
        }
    }
    if let (Some(m), None) = (&model_type, &arch) {
        // A known model type under an unknown head class (e.g. a classifier) is still an error.
        // The class at the model type's index (the tables list them in the same order).
        for f in FAMILIES {
            if let Some(i) = f.model_types.iter().position(|t| t == m) {
                let a = f.architectures.get(i).unwrap_or(&f.architectures[0]);
                return Ok((f, a.to_string()));
            }
        }
    }
    Err(Error::UnknownArchitecture {
        path: cfg.path.clone(),
        arch: arch.or(model_type).unwrap_or_else(|| "<none>".into()),
        supported: architectures().collect::<Vec<_>>().join(", "),
    })
}

/// The family's description of a GGUF `general.architecture`.
pub fn gguf_arch(path: &std::path::Path, gguf_arch: &str) -> Result<&'static GgufArch> {
    FAMILIES
        .iter()
        .flat_map(|f| f.gguf.iter())
        .find(|a| a.arch == gguf_arch)
        .ok_or_else(|| Error::UnknownArchitecture {
            path: path.to_path_buf(),
            arch: gguf_arch.to_string(),
            supported: FAMILIES
                .iter()
                .flat_map(|f| f.gguf.iter())
                .map(|a| format!("{} (GGUF)", a.arch))
                .collect::<Vec<_>>()
                .join(", "),
        })
}

pub fn spec(family: &'static Family, arch: &str, cfg: &RawConfig) -> Result<ModelSpec> {
    let mut spec = (family.spec)(cfg, arch)?;
    spec.family = family.name;
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
        spec.vocab_size > 0 && spec.num_layers > 0 && spec.hidden_size > 0 && spec.head_dim > 0,
        || "empty model dimensions".into(),
    )?;
    cfg.check(
        spec.sliding_layers.is_empty() || spec.sliding_layers.len() == spec.num_layers,
        || {
            format!(
                "{} layer types for {} layers",
                spec.sliding_layers.len(),
                spec.num_layers
            )
        },
    )?;
    if spec.sliding_layers.iter().any(|&s| s) {
        cfg.check(spec.sliding_window.is_some_and(|w| w > 0), || {
            "sliding attention layers need 'sliding_window'".into()
        })?;
    }
    Ok(spec)
}

pub fn load(spec: &ModelSpec, l: &Loader) -> Result<Weights> {
    let family = FAMILIES
        .iter()
        .find(|f| f.name == spec.family)
        .ok_or_else(|| Error::BadRequest(format!("no family '{}'", spec.family)))?;
    let w = (family.load)(spec, l)?;
    l.store.check_all_used()?;
    Ok(w)
}

/// `(heads, head_dim)`: `head_dim` from the config when given, else hidden / heads (checked).
pub fn heads(c: &RawConfig, hidden: usize, head_keys: &[&str]) -> Result<(usize, usize)> {
    let nh = c.req_usize(head_keys)?;
    if let Some(hd) = c.usize_any(&["head_dim"])? {
        c.check(nh > 0, || format!("'{}' is 0", head_keys[0]))?;
        return Ok((nh, hd));
    }
    Ok((nh, head_dim(c, hidden, nh, head_keys[0])?))
}

/// `hidden / heads` for families whose head size is always that, with a one-line error for
/// 0 heads or a hidden size they do not divide.
pub fn head_dim(c: &RawConfig, hidden: usize, nh: usize, head_key: &str) -> Result<usize> {
    c.check(nh > 0, || format!("'{head_key}' is 0"))?;
    c.check(hidden.is_multiple_of(nh), || {
        format!("hidden size {hidden} not divisible by {nh} attention heads ('{head_key}')")
    })?;
    Ok(hidden / nh)
}

/// transformers' `layer_types` (sliding or full attention per layer), else `default(i)`.
pub fn layer_types(
    c: &RawConfig,
    layers: usize,
    default: impl Fn(usize) -> bool,
) -> Result<Vec<bool>> {
    match c.get("layer_types").and_then(|v| v.as_array()) {
        Some(types) => {
            c.check(types.len() == layers, || {
                format!(
                    "layer_types has {} entries for {layers} layers",
                    types.len()
                )
            })?;
            Ok(types
                .iter()
                .map(|t| t.as_str() == Some("sliding_attention"))
                .collect())
        }
        None => Ok((0..layers).map(default).collect()),
    }
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
    /// Use matrices in place from the memory map (see [`Loader::map_weights`]).
    map_weights: bool,
    /// Norms have learned weights (and biases) in the checkpoint.
    affine_norms: bool,
    /// Added to stored norm weights (Gemma's RMSNorm multiplies by `1 + weight`).
    norm_offset: f32,
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
            map_weights: false,
            affine_norms: true,
            norm_offset: 0.0,
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
        Ok(Linear {
            weight: self.matrix(&self.name(&format!("{p}.weight")), out, inp)?,
            bias: b,
        })
    }

    /// The weight matrix `[out, inp]` stored at the absolute `name`: in its stored quantized
    /// form when kept, in place in the file's memory map where the layout allows, else loaded.
    fn matrix(&self, name: &str, out: usize, inp: usize) -> Result<Weight> {
        let shape = [out, inp];
        if let Some(q) = self.quantized(name, &shape)? {
            return Ok(Weight::Quant(Arc::new(q)));
        }
        if let Some(m) = self.mapped(name, out, inp) {
            return Ok(Weight::Mapped(m));
        }
        Ok(Weight::Dense(self.store.get(
            name,
            Some(&shape),
            self.dtype,
            &self.device,
        )?))
    }

    /// The token embedding table `[vocab, dim]` stored at the absolute `name`: in place in the
    /// file's memory map where the layout allows (see [`Loader::map_weights`]), else loaded.
    pub fn embedding(&self, name: &str, vocab: usize, dim: usize) -> Result<Embedding> {
        // A GGUF's quantized table stays in its block format (as llama.cpp keeps it).
        if let Some(q) = self.quantized(name, &[vocab, dim])? {
            return Ok(Embedding::Quant(Arc::new(q)));
        }
        match self.mapped(name, vocab, dim) {
            Some(m) => Ok(Embedding::Mapped(m)),
            None => Ok(Embedding::Tensor(self.abs(name, &[vocab, dim])?)),
        }
    }

    /// `[rows, cols]` at `name` kept in its stored layout and dtype, where that is allowed here
    /// (CPU, f32 compute) and the stored layout is the one used: in place in the file's memory
    /// map with [`Loader::map_weights`]; otherwise bf16 / f16 matrices are copied as they are
    /// (half the memory of widening them, and the same results: the kernels widen as they
    /// read) and f32 ones are left to [`Self::abs`]'s copy.
    fn mapped(&self, name: &str, rows: usize, cols: usize) -> Option<MappedRows> {
        self.mapped_as(name, rows, cols, false)
    }

    /// [`Self::mapped`]; `transposed`: `[rows, cols]` is the transpose of the checkpoint's
    /// matrix (GPT-2's Conv1D), used in place where the file stores the transpose (GGUF),
    /// else, for bf16 / f16, transposed into a copy that keeps the dtype.
    fn mapped_as(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        transposed: bool,
    ) -> Option<MappedRows> {
        if !self.device.is_cpu() || self.dtype != DType::F32 {
            return None;
        }
        let half = matches!(
            self.store.stored_dtype(name),
            Some(DType::BF16 | DType::F16)
        );
        if !self.map_weights && !half {
            return None;
        }
        let m = if !transposed {
            self.store.get_mapped(name, &[rows, cols])?
        } else if let Some(m) = self.store.get_mapped_transposed(name, &[cols, rows]) {
            m
        } else if half {
            let m = self.store.get_mapped(name, &[cols, rows])?;
            return Some(MappedRows::new(m.copied_transposed(cols, rows)?, cols));
        } else {
            return None;
        };
        let m = if self.map_weights || !m.in_file() {
            m
        } else {
            m.copied().ok()?
        };
        Some(MappedRows::new(m, cols))
    }

    /// The stored quantized form of a matrix, when the checkpoint has one and we keep it.
    fn quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QMatrix>> {
        if !self.keep_quantized || !self.device.is_cpu() {
            return Ok(None);
        }
        self.store.get_quantized(name, shape)
    }

    /// Use matrices (f32, bf16, f16) in place from the checkpoint's memory map where their
    /// layout allows (CPU, f32 compute); `false` copies them into memory of their own (bf16 /
    /// f16 ones kept in their dtype).
    pub fn map_weights(mut self, map: bool) -> Self {
        self.map_weights = map;
        self
    }

    /// Norms without learned parameters (`false`): unit scale, zero shift.
    pub fn affine_norms(mut self, affine: bool) -> Self {
        self.affine_norms = affine;
        self
    }

    /// Norm weights are stored as `weight - offset` (Gemma: 1).
    pub fn norm_offset(mut self, offset: f32) -> Self {
        self.norm_offset = offset;
        self
    }

    /// Keep matrices that the checkpoint stores quantized (GGUF) in that form.
    pub fn keep_quantized(mut self, keep: bool) -> Self {
        self.keep_quantized = keep;
        self
    }

    /// GPT-2 `Conv1D`: weight stored `[in, out]`.
    /// bf16 / f16 weights are transposed into a copy that keeps their dtype (on the CPU, f32
    /// compute), f32 ones into a tensor.
    pub fn conv1d(&self, p: &str, out: usize, inp: usize) -> Result<Linear> {
        let name = self.name(&format!("{p}.weight"));
        let bias = Some(self.t(&format!("{p}.bias"), &[out])?);
        if let Some(m) = self.mapped_as(&name, out, inp, true) {
            return Ok(Linear {
                weight: Weight::Mapped(m),
                bias,
            });
        }
        let w = self
            .t(&format!("{p}.weight"), &[inp, out])?
            .t()?
            .contiguous()?;
        Ok(Linear::new(w, bias))
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
        let mut weight = self.t(&format!("{p}.weight"), &[dim])?;
        if self.norm_offset != 0.0 {
            weight = (weight + self.norm_offset as f64)?;
        }
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

    /// A norm whose checkpoint has a weight but no bias (MPT's LayerNorms, StableLM's q/k norms).
    pub fn norm_no_bias(&self, p: &str, kind: NormKind, dim: usize, eps: f64) -> Result<Norm> {
        if !self.affine_norms {
            return self.norm(p, kind, dim, eps);
        }
        let weight = self.t(&format!("{p}.weight"), &[dim])?;
        let bias = None;
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
        embed: &Embedding,
        embed_name: &str,
        head_name: &str,
    ) -> Result<Linear> {
        let shape = [spec.vocab_size, spec.embed_dim];
        if spec.head_bias {
            let bias = Some(self.abs(&head_name.replace(".weight", ".bias"), &[spec.vocab_size])?);
            let weight = if spec.tie_embeddings {
                embed.head_weight(&self.device)?
            } else {
                self.matrix(head_name, spec.vocab_size, spec.embed_dim)?
            };
            return Ok(Linear { weight, bias });
        }
        if spec.tie_embeddings {
            if self.store.contains(head_name) {
                self.store.ignore(head_name);
            }
            if !matches!(embed, Embedding::Quant(_)) {
                if let Some(q) = self.quantized(embed_name, &shape)? {
                    return Ok(Linear {
                        weight: Weight::Quant(Arc::new(q)),
                        bias: None,
                    });
                }
            }
            Ok(Linear {
                weight: embed.head_weight(&self.device)?,
                bias: None,
            })
        } else {
            Ok(Linear {
                weight: self.matrix(head_name, spec.vocab_size, spec.embed_dim)?,
                bias: None,
            })
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
            Weight::Dense(_) | Weight::Mapped(_) => None,
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
    // Parts used in place stay in place, as the parts of one weight (the product kernels take
    // them so, with the bits of the concatenated matrix, where they have vector kernels).
    let mapped: Vec<&MappedRows> = parts
        .iter()
        .filter_map(|p| match &p.weight {
            Weight::Mapped(m) => Some(m),
            _ => None,
        })
        .collect();
    if mapped.len() == parts.len() && crate::kernels::matmul::parts_are_exact() {
        if let Some(m) = MappedRows::concat(&mapped) {
            return Ok(Linear {
                weight: Weight::Mapped(m),
                bias,
            });
        }
    }
    let ws = parts
        .iter()
        .map(|p| p.to_dense())
        .collect::<candle_core::Result<Vec<Tensor>>>()?;
    Ok(Linear::new(Tensor::cat(&ws, 0)?, bias))
}

/// `l` with its output rows (and bias) taken in `order`: row `r` of the result is row
/// `order[r]` of `l`. Quantized weights (GGUF) keep their blocks, moved row by row.
pub fn select_rows(l: Linear, order: &[u32]) -> Result<Linear> {
    let idx = |d: &Device| Tensor::from_slice(order, order.len(), d);
    let bias = match &l.bias {
        Some(b) => Some(b.index_select(&idx(b.device())?, 0)?),
        None => None,
    };
    match &l.weight {
        Weight::Dense(w) => Ok(Linear::new(w.index_select(&idx(w.device())?, 0)?, bias)),
        Weight::Mapped(m) => {
            // One stored tensor: a copy of its own with the rows in order, in its dtype.
            let order: Vec<usize> = order.iter().map(|&r| r as usize).collect();
            if let Some(rows) = m.select_rows(&order) {
                return Ok(Linear {
                    weight: Weight::Mapped(rows),
                    bias,
                });
            }
            let w = l.to_dense()?;
            Ok(Linear::new(w.index_select(&idx(w.device())?, 0)?, bias))
        }
        Weight::Quant(q) => {
            let rb = q.kind().row_bytes(q.cols());
            let bytes = q.to_ggml_bytes();
            let mut out = Vec::with_capacity(order.len() * rb);
            for &r in order {
                let r = r as usize;
                let row = bytes.get(r * rb..(r + 1) * rb).ok_or_else(|| {
                    candle_core::Error::Msg(format!("row {r} of a {}-row matrix", q.rows()))
                })?;
                out.extend_from_slice(row);
            }
            let q = QMatrix::from_ggml_bytes(q.kind(), order.len(), q.cols(), &out)
                .map_err(candle_core::Error::Msg)?;
            Ok(Linear {
                weight: Weight::Quant(Arc::new(q)),
                bias,
            })
        }
    }
}

/// Fused QKV stored per head as `[heads, 3, head_dim]` rows (GPT-NeoX, BLOOM) →
/// canonical `[q heads; k heads; v heads]`.
pub fn deinterleave_qkv(l: Linear, heads: usize, head_dim: usize) -> Result<Linear> {
    let order: Vec<u32> = (0..3)
        .flat_map(|t| {
            (0..heads)
                .flat_map(move |h| (0..head_dim).map(move |d| ((h * 3 + t) * head_dim + d) as u32))
        })
        .collect();
    select_rows(l, &order)
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
                ln1: Some(l.norm(&format!("{p}.{}", n.ln1), spec.norm, e, spec.norm_eps)?),
                ln2: Some(l.norm(&format!("{p}.{}", n.ln2), spec.norm, e, spec.norm_eps)?),
                qkv: deinterleave_qkv(
                    l.linear(&format!("{p}.{}", n.qkv), 3 * e, e, spec.qkv_bias)?,
                    nh,
                    hd,
                )?,
                out: l.linear(&format!("{p}.{}", n.out), e, e, spec.out_bias)?,
                mlp_in: l.linear(&format!("{p}.{}", n.fc_in), inter, e, spec.mlp_bias)?,
                mlp_out: l.linear(&format!("{p}.{}", n.fc_out), e, inter, spec.mlp_bias)?,
                post_attn_norm: None,
                post_mlp_norm: None,
                q_norm: None,
                k_norm: None,
                moe: None,
            })
        })
        .collect()
}

/// Fused QKV stored per kv group as `[kv_heads, heads/kv_heads + 2, head_dim]` rows (Falcon's
/// new decoder architecture: each group's query heads, then its key, then its value) →
/// canonical `[q heads; k heads; v heads]`.
pub fn degroup_qkv(l: Linear, heads: usize, kv_heads: usize, head_dim: usize) -> Result<Linear> {
    let g = heads / kv_heads;
    // Stored row of head `slot` of group `grp`, dimension `d`.
    let at = |grp: usize, slot: usize, d: usize| ((grp * (g + 2) + slot) * head_dim + d) as u32;
    let q = (0..heads).flat_map(|h| (0..head_dim).map(move |d| at(h / g, h % g, d)));
    let k = (0..kv_heads).flat_map(|j| (0..head_dim).map(move |d| at(j, g, d)));
    let v = (0..kv_heads).flat_map(|j| (0..head_dim).map(move |d| at(j, g + 1, d)));
    let order: Vec<u32> = q.chain(k).chain(v).collect();
    select_rows(l, &order)
}

/// How the projections of the input are stored.
pub enum Qkv<'n> {
    /// Separate q, k, v projections.
    Split(&'n str, &'n str, &'n str),
    /// One fused `[q; k; v]` projection.
    Fused(&'n str),
}

/// How the MLP's input projection is stored.
pub enum MlpIn<'n> {
    /// Gated: separate gate and up projections.
    GateUp(&'n str, &'n str),
    /// Gated, fused `[gate; up]`, or plain: one projection.
    One(&'n str),
}

/// Names (relative to `{layers}.{i}.`) of a block stored the Llama way: the layout of most
/// families since Llama (Gemma, Qwen3, OLMo, Phi-3, StarCoder2, StableLM, Mixtral, ...).
pub struct Layout<'n> {
    pub layers: &'n str,
    pub ln1: Option<&'n str>,
    pub ln2: Option<&'n str>,
    pub post_attn_norm: Option<&'n str>,
    pub post_mlp_norm: Option<&'n str>,
    pub q_norm: Option<&'n str>,
    pub k_norm: Option<&'n str>,
    pub qkv: Qkv<'n>,
    pub out: &'n str,
    pub mlp_in: MlpIn<'n>,
    pub mlp_out: &'n str,
    /// Names of the experts, for the layers `spec.moe` makes sparse.
    pub moe: Option<MoeNames<'n>>,
}

/// Names (relative to the block) of a mixture of experts stored one expert at a time:
/// `{block}.{router}.weight`, `{block}.experts.{j}.{gate|up|down}.weight`, and a shared expert
/// `{block}.{shared}.{gate,up,down}_proj` with its gate `{block}.{shared}_gate`.
pub struct MoeNames<'n> {
    pub block: &'n str,
    pub router: &'n str,
    pub gate: &'n str,
    pub up: &'n str,
    pub down: &'n str,
    pub shared: Option<&'n str>,
}

impl Layout<'static> {
    /// `model.layers.N.{input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
    /// mlp.{gate,up,down}_proj}`.
    pub const LLAMA: Layout<'static> = Layout {
        layers: "model.layers",
        ln1: Some("input_layernorm"),
        ln2: Some("post_attention_layernorm"),
        post_attn_norm: None,
        post_mlp_norm: None,
        q_norm: None,
        k_norm: None,
        qkv: Qkv::Split("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        out: "self_attn.o_proj",
        mlp_in: MlpIn::GateUp("mlp.gate_proj", "mlp.up_proj"),
        mlp_out: "mlp.down_proj",
        moe: None,
    };
}

/// The blocks of `layout`, sized and biased as `s` says; norms of `s.norm` (q/k norms of
/// width `head_dim`, or the whole projection with `s.qk_norm_whole`).
pub fn load_blocks(s: &ModelSpec, l: &Loader, layout: &Layout) -> Result<Vec<Block>> {
    let (e, inter) = (s.hidden_size, s.intermediate_size);
    let mlp_w = if s.mlp == crate::config::MlpKind::Gated {
        2 * inter
    } else {
        inter
    };
    (0..s.num_layers)
        .map(|i| {
            let l = l.block(i);
            let p = format!("{}.{i}", layout.layers);
            let norm = |n: Option<&str>, dim: usize| {
                n.map(|n| l.norm(&format!("{p}.{n}"), s.norm, dim, s.norm_eps))
                    .transpose()
            };
            let lin = |n: &str, out: usize, inp: usize, bias: bool| {
                l.linear(&format!("{p}.{n}"), out, inp, bias)
            };
            let sparse = s
                .moe
                .as_ref()
                .is_some_and(|m| m.sparse_layers.get(i).copied().unwrap_or(true));
            let (mlp_in, mlp_out, moe) = match (&layout.moe, &s.moe, sparse) {
                (Some(names), Some(ms), true) => {
                    load_moe(s, ms, &l, &format!("{p}.{}", names.block), names)?
                }
                _ => (
                    match layout.mlp_in {
                        MlpIn::GateUp(g, u) => {
                            fuse(&[lin(g, inter, e, s.mlp_bias)?, lin(u, inter, e, s.mlp_bias)?])?
                        }
                        MlpIn::One(n) => lin(n, mlp_w, e, s.mlp_bias)?,
                    },
                    lin(layout.mlp_out, e, inter, s.mlp_bias)?,
                    None,
                ),
            };
            let (qw, kw) = if s.qk_norm_whole {
                (s.q_dim(), s.kv_dim())
            } else {
                (s.head_dim, s.head_dim)
            };
            Ok(Block {
                ln1: norm(layout.ln1, e)?,
                ln2: norm(layout.ln2, e)?,
                post_attn_norm: norm(layout.post_attn_norm, e)?,
                post_mlp_norm: norm(layout.post_mlp_norm, e)?,
                q_norm: norm(layout.q_norm, qw)?,
                k_norm: norm(layout.k_norm, kw)?,
                moe,
                qkv: match layout.qkv {
                    Qkv::Split(q, k, v) => fuse(&[
                        lin(q, s.q_dim(), e, s.qkv_bias)?,
                        lin(k, s.kv_dim(), e, s.qkv_bias)?,
                        lin(v, s.kv_dim(), e, s.qkv_bias)?,
                    ])?,
                    Qkv::Fused(n) => lin(n, s.q_dim() + 2 * s.kv_dim(), e, s.qkv_bias)?,
                },
                out: lin(layout.out, e, s.q_dim(), s.out_bias)?,
                mlp_in,
                mlp_out,
            })
        })
        .collect()
}

/// Weights of a model stored the Llama way: `model.embed_tokens`, the blocks of `layout`,
/// `model.norm` (or `final_norm`), `lm_head` (or tied).
pub fn load_llama_like(
    s: &ModelSpec,
    l: &Loader,
    layout: &Layout,
    final_norm: &str,
) -> Result<Weights> {
    l.ignore_buffers(&[".rotary_emb.inv_freq"]);
    let embed = l.embedding("model.embed_tokens.weight", s.vocab_size, s.hidden_size)?;
    let blocks = load_blocks(s, l, layout)?;
    let t = l.tail();
    Ok(Weights {
        pos_embed: None,
        embed_norm: None,
        project_in: None,
        blocks,
        final_norm: s
            .final_norm
            .then(|| t.norm(final_norm, s.norm, s.hidden_size, s.norm_eps))
            .transpose()?,
        project_out: None,
        lm_head: t.head(s, &embed, "model.embed_tokens.weight", "lm_head.weight")?,
        embed,
    })
}

/// The experts of one block at `p` (router, per-expert gated MLPs fused `[gate; up]`), and the
/// shared expert as the block's dense MLP (no rows without one).
fn load_moe(
    s: &ModelSpec,
    ms: &crate::config::MoeSpec,
    l: &Loader,
    p: &str,
    n: &MoeNames,
) -> Result<(Linear, Linear, Option<crate::model::decoder::Moe>)> {
    let (e, ei) = (s.hidden_size, ms.expert_inter);
    let router = l.linear(&format!("{p}.{}", n.router), ms.experts, e, false)?;
    let experts = (0..ms.experts)
        .map(|j| {
            let x = |w: &str, out: usize, inp: usize| {
                l.linear(&format!("{p}.experts.{j}.{w}"), out, inp, false)
            };
            Ok((
                fuse(&[x(n.gate, ei, e)?, x(n.up, ei, e)?])?,
                x(n.down, e, ei)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let (mlp_in, mlp_out, shared_gate) = match (n.shared, ms.shared_inter) {
        (Some(sh), Some(si)) => {
            let x = |w: &str, out: usize, inp: usize| {
                l.linear(&format!("{p}.{sh}.{w}"), out, inp, false)
            };
            (
                fuse(&[x("gate_proj", si, e)?, x("up_proj", si, e)?])?,
                x("down_proj", e, si)?,
                Some(l.linear(&format!("{p}.{sh}_gate"), 1, e, false)?),
            )
        }
        _ => {
            let none = Tensor::zeros((0, e), l.dtype, &l.device)?;
            (
                Linear::new(none.clone(), None),
                Linear::new(none.t()?.contiguous()?, None),
                None,
            )
        }
    };
    Ok((
        mlp_in,
        mlp_out,
        Some(crate::model::decoder::Moe {
            router,
            experts,
            shared_gate,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Positions, Residual, RopeScaling};
    use serde_json::json;

    #[test]
    fn zero_or_indivisible_heads_are_errors_not_panics() {
        for (arch, cfg) in [
            (
                "BloomForCausalLM",
                json!({"hidden_size": 64, "n_head": 0, "n_layer": 2, "vocab_size": 10}),
            ),
            (
                "GPT2LMHeadModel",
                json!({"n_embd": 64, "n_head": 0, "n_layer": 2, "vocab_size": 10, "n_positions": 32}),
            ),
            (
                "OPTForCausalLM",
                json!({"hidden_size": 64, "num_attention_heads": 5, "num_hidden_layers": 2, "vocab_size": 10, "max_position_embeddings": 32, "ffn_dim": 8}),
            ),
        ] {
            let mut v = cfg;
            v["architectures"] = json!([arch]);
            let c = RawConfig::from_value(std::path::Path::new("config.json"), v);
            let (f, a) = detect(&c).unwrap();
            let e = (f.spec)(&c, &a).err().expect(arch).to_string();
            assert!(
                e.contains("is 0") || e.contains("not divisible"),
                "{arch}: {e}"
            );
        }
    }

    fn spec_of(v: serde_json::Value) -> ModelSpec {
        let c = RawConfig::from_value(std::path::Path::new("config.json"), v);
        let (f, a) = detect(&c).unwrap();
        spec(f, &a, &c).unwrap()
    }

    /// Configs as the Hub has them (subsets), in spellings the fixtures do not cover.
    #[test]
    fn hub_configs() {
        // falcon-7b: RefinedWebModel spelling, multi-query, parallel attention.
        let s = spec_of(
            json!({"architectures": ["RWForCausalLM"], "model_type": "RefinedWebModel",
            "hidden_size": 4544, "n_head": 71, "n_layer": 32, "multi_query": true, "parallel_attn": true,
            "bias": false, "alibi": false, "vocab_size": 65024}),
        );
        assert_eq!((s.family, s.num_kv_heads, s.head_dim), ("falcon", 1, 64));
        assert_eq!(s.residual, Residual::Parallel);
        // falcon-40b: RefinedWeb = new decoder architecture with n_head_kv groups.
        let s = spec_of(
            json!({"architectures": ["RWForCausalLM"], "model_type": "RefinedWeb",
            "hidden_size": 8192, "n_head": 128, "n_head_kv": 8, "n_layer": 60, "parallel_attn": true,
            "bias": false, "alibi": false, "vocab_size": 65024}),
        );
        assert_eq!((s.num_kv_heads, s.num_layers), (8, 60));
        // gemma-3-1b: legacy rope keys and the sliding-window pattern.
        let s = spec_of(
            json!({"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
            "hidden_size": 1152, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
            "intermediate_size": 6912, "num_hidden_layers": 26, "vocab_size": 262144,
            "max_position_embeddings": 32768, "query_pre_attn_scalar": 256, "rope_theta": 1000000.0,
            "rope_local_base_freq": 10000.0, "rope_scaling": null, "sliding_window": 512,
            "sliding_window_pattern": 6, "final_logit_softcapping": null, "attn_logit_softcapping": null}),
        );
        assert_eq!(s.sliding_layers.iter().filter(|&&x| !x).count(), 4); // layers 5, 11, 17, 23
        assert!(!s.sliding_layers[5] && s.sliding_layers[6]);
        assert_eq!(s.local_rope.as_ref().unwrap().base, 10000.0);
        let Positions::Rope(r) = &s.positions else {
            panic!()
        };
        assert_eq!(r.base, 1e6);
        assert_eq!(
            (s.attn_softcap, s.final_softcap, s.embed_scale.is_some()),
            (None, None, true)
        );
        // Phi-3-mini-128k: "longrope" with short/long factors and the attention factor.
        let s = spec_of(
            json!({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3",
            "hidden_size": 3072, "num_attention_heads": 32, "num_hidden_layers": 32,
            "intermediate_size": 8192, "vocab_size": 32064, "max_position_embeddings": 131072,
            "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
            "rope_scaling": {"type": "longrope", "long_factor": vec![2.0; 48], "short_factor": vec![1.0; 48]},
            "sliding_window": 262144}),
        );
        let Positions::Rope(r) = &s.positions else {
            panic!()
        };
        assert!(
            (r.attention_factor - 1.190_238).abs() < 1e-5,
            "{}",
            r.attention_factor
        );
        assert!(matches!(
            r.scaling,
            RopeScaling::LongRope {
                original_max: 4096,
                ..
            }
        ));
        let long = crate::config::dynamic_inv_freq(r, 5000).unwrap();
        assert_eq!(long[0], r.inv_freq[0] / 2.0);
        assert!(crate::config::dynamic_inv_freq(r, 4096).is_none());
        // mpt-7b: nested attn_config, ALiBi, no clipping.
        let s = spec_of(
            json!({"architectures": ["MPTForCausalLM"], "model_type": "mpt", "d_model": 4096,
            "n_heads": 32, "n_layers": 32, "expansion_ratio": 4, "max_seq_len": 2048, "vocab_size": 50432,
            "no_bias": true, "attn_config": {"alibi": true, "alibi_bias_max": 8, "clip_qkv": null,
            "softmax_scale": null, "attn_impl": "torch"}}),
        );
        assert_eq!((s.intermediate_size, s.clip_qkv), (16384, None));
        assert_eq!(s.alibi().unwrap()[0], 0.5f32.powf(0.25));
        // Mixtral without architectures: the model type picks the class.
        let s = spec_of(
            json!({"model_type": "mixtral", "hidden_size": 4096, "num_attention_heads": 32,
            "num_key_value_heads": 8, "num_hidden_layers": 32, "intermediate_size": 14336,
            "vocab_size": 32000, "max_position_embeddings": 32768, "num_local_experts": 8,
            "num_experts_per_tok": 2}),
        );
        assert_eq!(s.architecture, "MixtralForCausalLM");
        let m = s.moe.unwrap();
        assert_eq!(
            (m.experts, m.top_k, m.expert_inter, m.norm_topk),
            (8, 2, 14336, true)
        );
    }
}
