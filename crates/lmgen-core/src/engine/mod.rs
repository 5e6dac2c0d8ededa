//! Scheduling and the three jobs: generate (continuous ragged batching), score, embed.
mod admit;
mod generate;
mod runner;
mod score;

pub use generate::{
    Admission, FinishReason, GenOutput, GenRequest, Generator, RunStats, StepStats,
};
pub use runner::{RunSeq, Runner, SeqKv};
pub use score::{embed_batch, embed_ranges, score_batch, Pool, ScoreOutput};
