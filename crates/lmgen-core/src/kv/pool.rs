//! The CPU KV pool: per layer, keys and values as `[block][kv_head][slot][head_dim]` (f32),
//! so one head's keys in one block are a contiguous run the attention kernel streams.
use super::BLOCK_SIZE;

pub struct KvPool {
    pub num_blocks: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl KvPool {
    /// Bytes one block takes over all layers (keys and values).
    pub fn block_bytes(layers: usize, kv_heads: usize, head_dim: usize) -> usize {
        2 * layers * kv_heads * BLOCK_SIZE * head_dim * std::mem::size_of::<f32>()
    }

    /// A pool of `num_blocks` blocks. The memory is requested zeroed and untouched, so the
    /// pages become resident only as blocks are first written (blocks are handed out from
    /// the lowest id; the binary's allocator advises large buffers onto huge pages).
    pub fn new(layers: usize, num_blocks: usize, kv_heads: usize, head_dim: usize) -> Self {
        let per_layer = num_blocks * kv_heads * BLOCK_SIZE * head_dim;
        let alloc = || vec![0f32; per_layer];
        Self {
            num_blocks,
            kv_heads,
            head_dim,
            k: (0..layers).map(|_| alloc()).collect(),
            v: (0..layers).map(|_| alloc()).collect(),
        }
    }

    /// Keys and values of `layer`.
    pub fn layer(&self, layer: usize) -> (&[f32], &[f32]) {
        (&self.k[layer], &self.v[layer])
    }

    /// Store one token's keys and values (`[kv_heads * head_dim]` each, read with strides
    /// from a fused QKV row) at `slot` of `block`.
    #[inline]
    pub fn write(&mut self, layer: usize, block: u32, slot: usize, k: &[f32], v: &[f32]) {
        let hd = self.head_dim;
        let base = block as usize * self.kv_heads * BLOCK_SIZE * hd + slot * hd;
        let (kl, vl) = (&mut self.k[layer], &mut self.v[layer]);
        for h in 0..self.kv_heads {
            let at = base + h * BLOCK_SIZE * hd;
            kl[at..at + hd].copy_from_slice(&k[h * hd..(h + 1) * hd]);
            vl[at..at + hd].copy_from_slice(&v[h * hd..(h + 1) * hd]);
        }
    }
}
