//! Building blocks: linear (dense for now; quantized variants plug in here), norms, activations.
use crate::config::{Activation, NormKind};
use candle_core::{Result, Tensor, D};

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
        let y = x.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
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
