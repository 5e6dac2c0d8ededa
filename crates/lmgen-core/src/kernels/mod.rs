//! Raw compute on slices, no tensors: the CPU step executor's kernels.
pub mod attention;
pub mod ops;
