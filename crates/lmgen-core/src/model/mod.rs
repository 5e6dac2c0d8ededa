//! Model definition: the generic decoder and its layers.
pub mod cpu_step;
pub mod decoder;
pub mod layers;
pub mod topk;

/// Kept at their old paths for callers outside the crate.
pub use crate::kernels::{matmul as kernels, quant};
pub use cpu_step::{PagedSeq, Workspace};
pub use decoder::{Decoder, SeqStep, StepOutput, Want};
