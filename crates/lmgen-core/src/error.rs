//! Typed library errors. The CLI maps `Error::is_user_error()` to exit code 2.
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model argument did not resolve to anything on disk.
    #[error("model not found: {0}")]
    ModelNotFound(String),
    #[error("{path}: unknown architecture '{arch}' (supported: {supported})")]
    UnknownArchitecture {
        path: PathBuf,
        arch: String,
        supported: String,
    },
    #[error("{path}: bad config: {msg}")]
    BadConfig { path: PathBuf, msg: String },
    #[error("{path}: missing tensor '{name}'")]
    MissingTensor { path: PathBuf, name: String },
    #[error("{path}: unused tensor '{name}' (not part of this model)")]
    UnusedTensor { path: PathBuf, name: String },
    #[error("{path}: tensor '{name}' has shape {got:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    /// A weight file that cannot be parsed (truncated, corrupt, unsupported layout).
    #[error("{path}: {msg}")]
    BadWeights { path: PathBuf, msg: String },
    #[error("{path}: bad tokenizer: {msg}")]
    BadTokenizer { path: PathBuf, msg: String },
    /// A problem with the user's request (prompt too long, bad parameter, ...).
    #[error("{0}")]
    BadRequest(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// Writing an output, sidecar or manifest failed (a runtime failure, exit code 1).
    #[error("{0}")]
    Output(String),
    /// The CUDA paged-attention kernels rejected their inputs (see [`crate::kernels::paged_attn`]).
    #[error("paged attention: {0}")]
    PagedAttention(String),
    /// The job stopped on a signal after writing what was finished (see [`crate::job`]).
    #[error("{0}")]
    Interrupted(String),
}

impl Error {
    /// Errors caused by bad input (exit code 2), as opposed to runtime failures (exit code 1).
    pub fn is_user_error(&self) -> bool {
        !matches!(
            self,
            Error::Candle(_)
                | Error::Tokenizer(_)
                | Error::Output(_)
                | Error::Interrupted(_)
                | Error::PagedAttention(_)
        )
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
    pub fn bad_weights(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::BadWeights {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
    pub fn bad_config(path: impl Into<PathBuf>, msg: impl std::fmt::Display) -> Self {
        Error::BadConfig {
            path: path.into(),
            msg: msg.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
