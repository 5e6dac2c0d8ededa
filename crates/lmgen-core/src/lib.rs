//! lmgen-core: load Hugging Face causal language models and run generation, scoring and
//! hidden-state extraction on them. No printing, no CLI concerns: see `lmgen-cli`.
pub mod bench;
pub mod config;
pub mod device;
pub mod engine;
pub mod error;
pub mod families;
pub mod hub;
pub mod job;
pub mod kernels;
pub mod kv;
pub mod loader;
pub mod model;
pub mod plan;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
pub use loader::{load, LoadOptions, Model};

pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
