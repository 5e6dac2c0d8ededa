//! Building blocks: linear (dense for now; quantized variants plug in here), norms, activations.
use super::kernels;
use crate::config::{Activation, NormKind};
use candle_core::{CpuStorage, DType, Result, Storage, Tensor, D};

/// `y = x Wᵀ + b` with `W` stored `[out, in]` as in PyTorch.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x`: `[n, in]` → `[n, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.forward_small(x)? {
            return Ok(y);
        }
        let y = x.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

impl Linear {
    /// The streaming kernel for few-row inputs on the CPU in f32 (decode steps).
    fn forward_small(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (m, k) = x.dims2()?;
        if m > kernels::SMALL_M
            || !x.device().is_cpu()
            || x.dtype() != DType::F32
            || self.weight.dtype() != DType::F32
        {
            return Ok(None);
        }
        let x = x.contiguous()?;
        let n = self.out_dim();
        let y = {
            let (xs, xl) = x.storage_and_layout();
            let (ws, wl) = self.weight.storage_and_layout();
            let (Some(xo), Some(wo)) = (xl.contiguous_offsets(), wl.contiguous_offsets()) else {
                return Ok(None);
            };
            let (Storage::Cpu(CpuStorage::F32(xv)), Storage::Cpu(CpuStorage::F32(wv))) =
                (&*xs, &*ws)
            else {
                return Ok(None);
            };
            let bias_guard = self.bias.as_ref().map(|b| b.storage_and_layout());
            let bias = match &bias_guard {
                Some((bs, bl)) => match (&**bs, bl.contiguous_offsets()) {
                    (Storage::Cpu(CpuStorage::F32(bv)), Some((b0, b1))) => Some(&bv[b0..b1]),
                    _ => return Ok(None),
                },
                None => None,
            };
            kernels::matmul_wt_small(&xv[xo.0..xo.1], m, k, &wv[wo.0..wo.1], n, bias)
        };
        Ok(Some(Tensor::from_vec(y, (m, n), x.device())?))
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
