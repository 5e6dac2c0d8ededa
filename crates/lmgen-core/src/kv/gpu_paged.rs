//! Paged KV memory on a CUDA device for the decode kernel (experimental, opt-in with
//! `LMGEN_CUDA_PAGED=1`; see docs/gpu.md). One pool per model holds, per layer, the key and
//! value caches in vLLM's layout (see [`crate::kernels::paged_attn`]); each sequence owns a
//! list of its blocks and gives them back when its cache is dropped.
//!
//! The dense per-sequence cache ([`super::SeqCache`]) is still filled as before: prefill
//! and everything the kernel does not cover use it, so the pool only mirrors its contents.
use crate::error::{Error, Result};
use crate::kernels::paged_attn;
use candle_core::{DType, Device, Tensor};
use std::sync::{Arc, Mutex};

/// Tokens per block of the GPU pool.
pub const GPU_BLOCK_SIZE: usize = 16;
/// Blocks in the pool unless `LMGEN_CUDA_PAGED_BLOCKS` says otherwise.
const DEFAULT_BLOCKS: usize = 2048;

/// Whether `LMGEN_CUDA_PAGED=1` asks for the paged decode path.
pub fn requested() -> bool {
    std::env::var("LMGEN_CUDA_PAGED").is_ok_and(|v| v.trim() == "1")
}

/// Whether `LMGEN_CUDA_PAGED_CHECK=1` asks to compare the kernel with the dense path.
pub fn check_requested() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("LMGEN_CUDA_PAGED_CHECK").is_ok_and(|v| v.trim() == "1"))
}

/// Blocks to allocate (`LMGEN_CUDA_PAGED_BLOCKS`, default 2048, i.e. 32768 positions).
pub fn requested_blocks() -> Result<usize> {
    match std::env::var("LMGEN_CUDA_PAGED_BLOCKS") {
        Err(_) => Ok(DEFAULT_BLOCKS),
        Ok(v) => v
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|&b| b > 0 && b <= u32::MAX as usize)
            .ok_or_else(|| {
                Error::BadRequest(format!("LMGEN_CUDA_PAGED_BLOCKS: bad block count '{v}'"))
            }),
    }
}

pub struct GpuKvPool {
    pub num_blocks: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub dtype: DType,
    /// Per layer: key cache `[blocks, kv_heads, head_dim/x, block, x]`, value cache
    /// `[blocks, kv_heads, head_dim, block]`.
    layers: Vec<(Tensor, Tensor)>,
    /// Free block ids, highest first.
    free: Mutex<Vec<u32>>,
}

impl GpuKvPool {
    /// Checks that the kernels support the model's shapes and allocates the caches.
    pub fn new(
        layers: usize,
        num_blocks: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if !device.is_cuda() {
            return Err(Error::PagedAttention("the pool needs a CUDA device".into()));
        }
        if !paged_attn::supported_dtype(dtype) {
            return Err(Error::PagedAttention(format!(
                "dtype {dtype:?} not supported (f32, f16, bf16)"
            )));
        }
        if !paged_attn::HEAD_DIMS.contains(&head_dim) {
            return Err(Error::PagedAttention(format!(
                "head dim {head_dim} not supported (one of {:?})",
                paged_attn::HEAD_DIMS
            )));
        }
        let x = paged_attn::x_for(dtype);
        let layers = (0..layers)
            .map(|_| -> Result<(Tensor, Tensor)> {
                let k = Tensor::zeros(
                    (num_blocks, kv_heads, head_dim / x, GPU_BLOCK_SIZE, x),
                    dtype,
                    device,
                )?;
                let v = Tensor::zeros(
                    (num_blocks, kv_heads, head_dim, GPU_BLOCK_SIZE),
                    dtype,
                    device,
                )?;
                Ok((k, v))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            num_blocks,
            kv_heads,
            head_dim,
            dtype,
            layers,
            free: Mutex::new((0..num_blocks as u32).rev().collect()),
        })
    }

    /// Key and value caches of `layer`.
    pub fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[layer];
        (k, v)
    }

    /// Blocks not held by any sequence.
    pub fn available(&self) -> usize {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn take(&self, n: usize) -> Option<Vec<u32>> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < n {
            return None;
        }
        let at = free.len() - n;
        Some(free.split_off(at))
    }

    fn give_back(&self, blocks: &mut Vec<u32>) {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .append(blocks);
    }
}

/// A sequence's blocks in the pool and how many positions they hold.
pub struct GpuSeqBlocks {
    pool: Arc<GpuKvPool>,
    pub blocks: Vec<u32>,
    /// Positions written.
    pub len: usize,
}

impl GpuSeqBlocks {
    pub fn new(pool: Arc<GpuKvPool>) -> Self {
        Self {
            pool,
            blocks: Vec::new(),
            len: 0,
        }
    }

    pub fn pool(&self) -> &Arc<GpuKvPool> {
        &self.pool
    }

    /// Make room for positions up to `total` (exclusive); `false` (nothing taken) when the
    /// pool is short of blocks.
    pub fn reserve(&mut self, total: usize) -> bool {
        let need = total
            .div_ceil(GPU_BLOCK_SIZE)
            .saturating_sub(self.blocks.len());
        if need == 0 {
            return true;
        }
        match self.pool.take(need) {
            Some(b) => {
                self.blocks.extend(b);
                true
            }
            None => false,
        }
    }

    /// Cache slot of position `pos` (`block * block_size + offset`); `pos` must be reserved.
    pub fn slot(&self, pos: usize) -> i64 {
        let b = self.blocks[pos / GPU_BLOCK_SIZE] as i64;
        b * GPU_BLOCK_SIZE as i64 + (pos % GPU_BLOCK_SIZE) as i64
    }
}

impl Drop for GpuSeqBlocks {
    fn drop(&mut self) {
        self.pool.give_back(&mut self.blocks);
    }
}
