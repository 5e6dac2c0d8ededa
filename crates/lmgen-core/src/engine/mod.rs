//! Scheduling and the three jobs: generate (continuous ragged batching), score, embed.
mod generate;
mod score;

pub use generate::{FinishReason, GenOutput, GenRequest, Generator, StepStats};
pub use score::{embed_batch, score_batch, Pool, ScoreOutput};
