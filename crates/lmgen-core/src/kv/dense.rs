//! Per-sequence KV cache, owned by the engine (not by the layers), so sequences of any
//! length can share a step and be added or dropped independently.
use candle_core::{Result, Tensor};
use candle_nn::kv_cache::KvCache;

pub struct SeqCache {
    layers: Vec<KvCache>,
    /// The same keys and values in the GPU paged pool, when the paged decode path is on
    /// (`LMGEN_CUDA_PAGED=1`); `None` otherwise or once the pool ran out of blocks.
    pub paged: Option<super::gpu_paged::GpuSeqBlocks>,
}

impl SeqCache {
    /// `capacity`: tokens to reserve (grows in steps of `capacity` if exceeded).
    pub fn new(num_layers: usize, capacity: usize) -> Self {
        Self {
            layers: (0..num_layers)
                .map(|_| KvCache::new(1, capacity.max(1)))
                .collect(),
            paged: None,
        }
    }

    /// Tokens stored (same for every layer between steps).
    pub fn len(&self) -> usize {
        self.layers.last().map_or(0, |l| l.current_seq_len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len_at(&self, layer: usize) -> usize {
        self.layers[layer].current_seq_len()
    }

    /// Append `k`, `v` (`[kv_heads, t, head_dim]`) at `layer`; returns all keys and values so far.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        self.layers[layer].append(&k.contiguous()?, &v.contiguous()?)
    }
}
