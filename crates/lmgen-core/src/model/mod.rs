//! Model definition: the generic decoder, its layers, and the per-family mappings.
pub mod cpu_step;
pub mod decoder;
pub mod families;
pub mod kernels;
pub mod layers;
pub mod quant;

pub use cpu_step::{PagedSeq, Workspace};
pub use decoder::{Decoder, SeqStep, StepOutput, Want};
