//! Building blocks: linear (dense or weight-only quantized), norms, activations.
use crate::config::{Activation, NormKind};
use crate::kernels::matmul as kernels;
use crate::kernels::quant::{QMatrix, QuantKind};
use crate::kernels::wide::WSlice;
use crate::weights::MappedTensor;
use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor, D};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub enum Weight {
    /// `[out, in]` as in PyTorch, any device and dtype.
    Dense(Tensor),
    /// Weight-only quantized rows (CPU), ggml block layout.
    Quant(Arc<QMatrix>),
    /// `[out, in]` f32, bf16 or f16 (CPU, computed in f32) read in place from the
    /// checkpoint's memory map.
    Mapped(MappedRows),
}

/// A dense weight `[rows, cols]` used in place from checkpoint memory maps in its stored dtype
/// (f32, bf16, f16): one tensor, or the consecutive parts of a fused projection (QKV, gate/up)
/// that the file stores separately.
#[derive(Debug, Clone)]
pub struct MappedRows {
    parts: Vec<MappedTensor>,
    cols: usize,
}

impl MappedRows {
    pub fn new(part: MappedTensor, cols: usize) -> Self {
        Self {
            parts: vec![part],
            cols,
        }
    }

    /// The rows of `all` one after the other (`None` if their widths differ).
    pub fn concat(all: &[&MappedRows]) -> Option<Self> {
        let cols = all.first()?.cols;
        all.iter().all(|m| m.cols == cols).then(|| Self {
            parts: all.iter().flat_map(|m| m.parts.iter().cloned()).collect(),
            cols,
        })
    }

    pub fn rows(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum::<usize>() / self.cols.max(1)
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Whether every part lies in the checkpoint file's map (not a copy of its own).
    pub fn in_file(&self) -> bool {
        self.parts.iter().all(|p| p.in_file())
    }

    /// Bytes the rows take where they lie (what a product reads).
    pub fn bytes(&self) -> usize {
        self.parts
            .iter()
            .map(|p| p.len() * p.dtype().size_in_bytes())
            .sum()
    }

    /// The stored dtype ("f32", "bf16", "f16"; parts of different dtypes joined by "+").
    pub fn dtype_name(&self) -> String {
        let mut names: Vec<&str> = self.parts.iter().map(|p| p.dtype().as_str()).collect();
        names.dedup();
        names.join("+")
    }

    /// The parts' values, in row order, as the product kernels take them (no allocation for
    /// up to four parts).
    pub fn with_parts<R>(&self, f: impl FnOnce(&[WSlice]) -> R) -> R {
        const INLINE: usize = 4;
        if self.parts.len() <= INLINE {
            let mut a: [WSlice; INLINE] = [WSlice::F32(&[]); INLINE];
            for (d, p) in a.iter_mut().zip(&self.parts) {
                *d = p.values();
            }
            f(&a[..self.parts.len()])
        } else {
            f(&self.parts.iter().map(|p| p.values()).collect::<Vec<_>>())
        }
    }

    /// The values, where they are one part (a single tensor of the file).
    pub fn single(&self) -> Option<WSlice<'_>> {
        match &self.parts[..] {
            [p] => Some(p.values()),
            _ => None,
        }
    }

    /// A copy of its own with the rows taken in `order` (row `r` is row `order[r]`), in the
    /// stored dtype; `None` for several parts or an index out of range.
    pub fn select_rows(&self, order: &[usize]) -> Option<MappedRows> {
        match &self.parts[..] {
            [p] => Some(MappedRows::new(p.copied_rows(order, self.cols)?, self.cols)),
            _ => None,
        }
    }

    /// A copy of all rows as f32.
    pub fn to_vec(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.rows() * self.cols];
        let mut at = 0;
        for p in &self.parts {
            p.values().widen_into(&mut v[at..at + p.len()]);
            at += p.len();
        }
        v
    }
}

/// The token embedding table `[vocab, dim]`: a tensor, rows used in place from the
/// checkpoint's memory map (f32, bf16 or f16, widened as they are read), or a GGUF's quantized
/// table kept in its block format (rows dequantized as they are gathered). The last two are also
/// the weight of a tied output head, without a copy.
#[derive(Debug, Clone)]
pub enum Embedding {
    Tensor(Tensor),
    Mapped(MappedRows),
    Quant(Arc<QMatrix>),
}

impl Embedding {
    pub fn dtype(&self) -> DType {
        match self {
            Embedding::Tensor(t) => t.dtype(),
            Embedding::Mapped(_) | Embedding::Quant(_) => DType::F32,
        }
    }

    /// Bytes the table takes where it lies.
    pub fn bytes(&self) -> usize {
        match self {
            Embedding::Tensor(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Embedding::Mapped(m) => m.bytes(),
            Embedding::Quant(q) => q.storage_bytes(),
        }
    }

    pub fn elem_count(&self) -> usize {
        match self {
            Embedding::Tensor(t) => t.elem_count(),
            Embedding::Mapped(m) => m.rows() * m.cols(),
            Embedding::Quant(q) => q.rows() * q.cols(),
        }
    }

    /// Rows (the vocabulary size).
    pub fn rows(&self) -> usize {
        match self {
            Embedding::Tensor(t) => t.dims().first().copied().unwrap_or(0),
            Embedding::Mapped(m) => m.rows(),
            Embedding::Quant(q) => q.rows(),
        }
    }

    /// Values per row (the embedding width).
    pub fn cols(&self) -> usize {
        match self {
            Embedding::Tensor(t) => t.dims().get(1).copied().unwrap_or(0),
            Embedding::Mapped(m) => m.cols(),
            Embedding::Quant(q) => q.cols(),
        }
    }

    /// Rows `ids` (a 1-D u32 tensor) as a `[n, dim]` tensor, on the device of `ids`.
    pub fn rows_of(&self, ids: &Tensor) -> Result<Tensor> {
        if let Embedding::Tensor(t) = self {
            return t.index_select(ids, 0);
        }
        let d = self.cols();
        let ids_v = ids.to_vec1::<u32>()?;
        let mut out = vec![0f32; ids_v.len() * d];
        for (&t, dst) in ids_v.iter().zip(out.chunks_exact_mut(d.max(1))) {
            self.row_into(t, dst)?;
        }
        Tensor::from_vec(out, (ids_v.len(), d), ids.device())
    }

    /// Row `t` of a table used in place or kept quantized into `dst` as f32 (widened or
    /// dequantized); a clear error for an id outside the table. A tensor table is gathered by
    /// its own device ([`Self::rows_of`]; the CPU step borrows its values).
    pub fn row_into(&self, t: u32, dst: &mut [f32]) -> Result<()> {
        let outside = || candle_core::Error::Msg(format!("token id {t} outside the vocabulary"));
        match self {
            Embedding::Tensor(_) => candle_core::bail!("a tensor table is gathered with rows_of"),
            Embedding::Mapped(m) => {
                let table = m.single().ok_or_else(|| {
                    candle_core::Error::Msg("an embedding table is one tensor".into())
                })?;
                embedding_row(table, t, m.cols(), dst)
            }
            Embedding::Quant(q) if (t as usize) < q.rows() => {
                q.dequantize_row(t as usize, dst);
                Ok(())
            }
            Embedding::Quant(_) => Err(outside()),
        }
    }

    /// The table's values, where they are used in place in one piece (`None` otherwise).
    pub fn mapped_values(&self) -> Option<WSlice<'_>> {
        match self {
            Embedding::Tensor(_) | Embedding::Quant(_) => None,
            Embedding::Mapped(m) => m.single(),
        }
    }

    /// The table as the weight of a tied output head on `device`.
    pub fn head_weight(&self, device: &Device) -> Result<Weight> {
        Ok(match self {
            Embedding::Tensor(t) => Weight::Dense(t.to_device(device)?),
            Embedding::Mapped(m) if device.is_cpu() => Weight::Mapped(m.clone()),
            Embedding::Quant(q) if device.is_cpu() => Weight::Quant(q.clone()),
            Embedding::Quant(q) => Weight::Dense(
                Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), &Device::Cpu)?
                    .to_device(device)?,
            ),
            Embedding::Mapped(m) => Weight::Dense(
                Tensor::from_vec(m.to_vec(), (m.rows(), m.cols()), &Device::Cpu)?
                    .to_device(device)?,
            ),
        })
    }
}

/// Row `t` of the `[_, d]` table (any stored dtype) into `dst` as f32; a clear error for an id
/// outside the table.
pub fn embedding_row(table: WSlice, t: u32, d: usize, dst: &mut [f32]) -> Result<()> {
    let t = t as usize;
    table
        .get(t * d, (t + 1) * d)
        .ok_or_else(|| candle_core::Error::Msg(format!("token id {t} outside the vocabulary")))?
        .widen_into(dst);
    Ok(())
}

/// `y = x Wᵀ + b`. The decoder does not know which kind of weight it has.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Weight::Dense(weight),
            bias,
        }
    }

    /// The weight as a dense f32 tensor (dequantized or copied out of the map if needed).
    pub fn to_dense(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Dense(w) => Ok(w.clone()),
            Weight::Quant(q) => {
                Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), &Device::Cpu)
            }
            Weight::Mapped(m) => Tensor::from_vec(m.to_vec(), (m.rows(), m.cols()), &Device::Cpu),
        }
    }

    pub fn out_dim(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.dims()[0],
            Weight::Quant(q) => q.rows(),
            Weight::Mapped(m) => m.rows(),
        }
    }

    pub fn device(&self) -> Device {
        match &self.weight {
            Weight::Dense(w) => w.device().clone(),
            Weight::Quant(_) | Weight::Mapped(_) => Device::Cpu,
        }
    }

    pub fn param_count(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.elem_count(),
            Weight::Quant(q) => q.rows() * q.cols(),
            Weight::Mapped(m) => m.rows() * m.cols(),
        }
    }

    /// Bytes of weight data read per use (what bounds decode speed).
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            Weight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Weight::Quant(q) => q.storage_bytes(),
            Weight::Mapped(m) => m.bytes(),
        }
    }

    /// Weight-only quantization of a dense f32 CPU weight. `None` when this matrix cannot take
    /// `kind` (e.g. columns not a multiple of the block size); the caller may try another.
    pub fn quantize(&self, kind: QuantKind) -> Result<Option<Linear>> {
        let (rows, cols, data) = match &self.weight {
            Weight::Quant(_) => return Ok(None),
            Weight::Mapped(m) => (m.rows(), m.cols(), m.to_vec()),
            Weight::Dense(w) => {
                let (rows, cols) = w.dims2()?;
                if !w.device().is_cpu() {
                    return Ok(None);
                }
                let data: Vec<f32> = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                (rows, cols, data)
            }
        };
        Ok(QMatrix::quantize(&data, rows, cols, kind)
            .ok()
            .map(|q| Linear {
                weight: Weight::Quant(Arc::new(q)),
                bias: self.bias.clone(),
            }))
    }

    /// `x`: `[n, in]` → `[n, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (m, k) = x.dims2()?;
        let n = self.out_dim();
        match &self.weight {
            // Always the integer kernel (activations quantized per 32-value block, as
            // llama.cpp): one numeric path whatever the number of rows, so a sequence's
            // results do not depend on what shares its step.
            Weight::Quant(q) => self.on_cpu(x, n, "a quantized linear", |x, b, y| {
                q.matmul_into(x, m, b, y)
            }),
            Weight::Mapped(w) => self.on_cpu(x, n, "a weight used in place", |x, b, y| {
                w.with_parts(|p| kernels::matmul_parts_into(x, m, k, p, b, y))
            }),
            Weight::Dense(w) => {
                if x.device().is_cpu() && x.dtype() == DType::F32 && w.dtype() == DType::F32 {
                    // The streaming kernel (decode) or the register-tiled GEMM in its order
                    // (see kernels/matmul.rs): a row's result does not depend on the others.
                    // The weight is borrowed in place: no copy per step.
                    if let Some(wv) = F32View::of(w) {
                        return self.on_cpu(x, n, "a linear", |x, b, y| {
                            kernels::matmul_wt_into(x, m, k, wv.slice(), n, b, y)
                        });
                    }
                }
                let y = x.matmul(&w.t()?)?;
                match &self.bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        }
    }

    /// `[m, n]` from `product(x, bias, y)` on the f32 data of `x` (CPU), with the bias passed
    /// in where it is f32 on the CPU, else added after.
    fn on_cpu(
        &self,
        x: &Tensor,
        n: usize,
        what: &str,
        product: impl FnOnce(&[f32], Option<&[f32]>, &mut [f32]),
    ) -> Result<Tensor> {
        let m = x.dims2()?.0;
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let xv = F32View::of(&x)
            .ok_or_else(|| candle_core::Error::Msg(format!("{what} needs CPU input")))?;
        let bias = self.bias.as_ref().and_then(F32View::of);
        let mut y = vec![0f32; m * n];
        product(xv.slice(), bias.as_ref().map(|b| b.slice()), &mut y);
        let y = Tensor::from_vec(y, (m, n), x.device())?;
        match (&self.bias, &bias) {
            (Some(b), None) => y.broadcast_add(b),
            _ => Ok(y),
        }
    }
}

/// The f32 data of a contiguous CPU tensor, borrowed for as long as the view lives.
struct F32View<G> {
    storage: G,
    range: (usize, usize),
}

impl F32View<()> {
    fn of(t: &Tensor) -> Option<F32View<impl std::ops::Deref<Target = Storage> + '_>> {
        let (storage, layout) = t.storage_and_layout();
        let range = layout.contiguous_offsets()?;
        matches!(&*storage, Storage::Cpu(CpuStorage::F32(_))).then_some(F32View { storage, range })
    }
}

impl<G: std::ops::Deref<Target = Storage>> F32View<G> {
    fn slice(&self) -> &[f32] {
        match &*self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.range.0..self.range.1],
            _ => &[],
        }
    }
}

#[derive(Debug, Clone)]
pub struct Norm {
    pub kind: NormKind,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub eps: f32,
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match (self.kind, &self.bias) {
            (NormKind::LayerNorm, Some(b)) => {
                candle_nn::ops::layer_norm(x, &self.weight, b, self.eps)
            }
            (NormKind::LayerNorm, None) => {
                let zeros = self.weight.zeros_like()?;
                candle_nn::ops::layer_norm(x, &self.weight, &zeros, self.eps)
            }
            (NormKind::RmsNorm, _) => candle_nn::ops::rms_norm(x, &self.weight, self.eps),
        }
    }
}

pub fn activate(act: Activation, x: &Tensor) -> Result<Tensor> {
    match act {
        Activation::Relu => x.relu(),
        Activation::Gelu => x.gelu_erf(),
        Activation::GeluTanh => x.gelu(),
        Activation::QuickGelu => x.broadcast_mul(&candle_nn::ops::sigmoid(&(x * 1.702)?)?),
        Activation::Silu => candle_nn::ops::silu(x),
    }
}

/// log-softmax over the last dimension, in f32.
pub fn log_softmax(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::log_softmax(x, D::Minus1)
}
