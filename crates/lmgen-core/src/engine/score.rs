//! Scoring (prompt log-probabilities) and hidden-state extraction. Several inputs share a
//! packed step; nothing is padded.
use crate::error::{Error, Result};
use crate::model::{SeqStep, StepOutput, Want};
use crate::sampling::log_softmax_row;
use crate::Model;
use candle_core::{Tensor, D};

#[derive(Debug, Clone)]
pub struct ScoreOutput {
    /// `logprobs[i] = log p(ids[i+1] | ids[..=i])`.
    pub logprobs: Vec<f32>,
}

impl ScoreOutput {
    pub fn sum(&self) -> f64 {
        self.logprobs.iter().map(|&x| x as f64).sum()
    }
    pub fn perplexity(&self) -> f64 {
        if self.logprobs.is_empty() {
            f64::NAN
        } else {
            (-self.sum() / self.logprobs.len() as f64).exp()
        }
    }
}

/// All tokens of every input through the model in one packed step, each with a fresh cache.
fn full_pass(model: &Model, inputs: &[&[u32]], want: Want, hidden: bool) -> Result<StepOutput> {
    for ids in inputs {
        model.check_prompt(ids)?;
        if ids.is_empty() {
            return Err(Error::BadRequest("empty input".into()));
        }
    }
    let mut caches: Vec<_> = inputs
        .iter()
        .map(|ids| model.decoder.new_cache(ids.len()))
        .collect();
    let mut steps: Vec<SeqStep> = inputs
        .iter()
        .zip(caches.iter_mut())
        .map(|(ids, cache)| SeqStep {
            tokens: ids,
            cache,
            want,
        })
        .collect();
    Ok(model.decoder.step(&mut steps, hidden)?)
}

/// Score several token sequences in one packed step.
pub fn score_batch(model: &Model, inputs: &[&[u32]]) -> Result<Vec<ScoreOutput>> {
    let out = full_pass(model, inputs, Want::All, false)?;
    let vocab = model.decoder.spec.vocab_size;
    inputs
        .iter()
        .zip(out.logits)
        .map(|(ids, logits)| {
            let logits = logits.ok_or_else(|| Error::BadRequest("no logits".into()))?;
            let rows: Vec<Vec<f32>> = logits.to_vec2()?;
            let logprobs = (0..ids.len().saturating_sub(1))
                .map(|i| log_softmax_row(&rows[i][..vocab])[ids[i + 1] as usize])
                .collect();
            Ok(ScoreOutput { logprobs })
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pool {
    Last,
    Mean,
    None,
}

/// Hidden states of `layers` (transformers `output_hidden_states` indices, already resolved
/// to `0..=num_layers`) for each input: per input, per layer, `[width]` (pooled) or `[seq, width]`.
pub fn embed_batch(
    model: &Model,
    inputs: &[&[u32]],
    layers: &[usize],
    pool: Pool,
) -> Result<Vec<Vec<Tensor>>> {
    let hidden = full_pass(model, inputs, Want::Nothing, true)?
        .hidden
        .unwrap_or_default();
    let mut start = 0;
    let mut res = Vec::with_capacity(inputs.len());
    for ids in inputs {
        let t = ids.len();
        let per_layer = layers
            .iter()
            .map(|&l| {
                let h = hidden[l].narrow(0, start, t)?;
                Ok(match pool {
                    Pool::None => h.contiguous()?,
                    Pool::Last => h.narrow(0, t - 1, 1)?.squeeze(0)?.contiguous()?,
                    Pool::Mean => h.mean(D::Minus2)?,
                })
            })
            .collect::<Result<Vec<Tensor>>>()?;
        res.push(per_layer);
        start += t;
    }
    Ok(res)
}
