//! Raw compute on slices, no tensors: matrix products (f32 and the quantized block formats),
//! paged attention, row operations.
pub mod attention;
pub mod dotgemm;
pub mod matmul;
pub mod ops;
pub mod paged_attn;
pub mod panel;
pub mod pool;
pub mod quant;
pub(crate) mod simd;
pub mod wide;
