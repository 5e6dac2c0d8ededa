//! lmgen-core: load Hugging Face causal language models and run generation, scoring and
//! hidden-state extraction on them. No printing, no CLI concerns: see `lmgen-cli`.
pub mod error;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};

pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}
pub mod config;
pub mod kv_cache;
pub mod model;
