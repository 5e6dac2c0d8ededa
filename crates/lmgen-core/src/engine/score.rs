//! Scoring (prompt log-probabilities) and hidden-state extraction. Several inputs share a
//! packed step; nothing is padded.
use super::runner::{RunSeq, Runner, SeqKv};
use crate::error::{Error, Result};
use crate::kv::BlockTable;
use crate::model::Want;
use crate::sampling::logprob_of;
use crate::Model;
use candle_core::{Device, Tensor, D};

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

/// All tokens of every input through the model in one packed step, each in fresh blocks.
fn full_pass<'m>(
    model: &'m Model,
    inputs: &[&[u32]],
    want: Want,
    hidden: bool,
) -> Result<Runner<'m>> {
    for ids in inputs {
        model.check_prompt(ids)?;
        if ids.is_empty() {
            return Err(Error::BadRequest("empty input".into()));
        }
    }
    let blocks = inputs
        .iter()
        .map(|ids| BlockTable::blocks_for(ids.len()))
        .sum();
    let mut runner = Runner::new(&model.decoder, blocks, false, true);
    let mut kvs: Vec<SeqKv> = inputs.iter().map(|_| SeqKv::default()).collect();
    for (kv, ids) in kvs.iter_mut().zip(inputs) {
        if !runner.reserve(kv, ids.len()) {
            return Err(Error::BadRequest("KV pool too small".into()));
        }
    }
    let mut steps: Vec<RunSeq> = inputs
        .iter()
        .zip(kvs.iter_mut())
        .map(|(ids, kv)| RunSeq {
            tokens: ids,
            kv,
            want,
            rope_len: 0,
        })
        .collect();
    runner.step(&mut steps, hidden)?;
    Ok(runner)
}

/// Score several token sequences in one packed step.
pub fn score_batch(model: &Model, inputs: &[&[u32]]) -> Result<Vec<ScoreOutput>> {
    let runner = full_pass(model, inputs, Want::All, false)?;
    let vocab = model.decoder.spec.vocab_size;
    let width = runner.vocab();
    Ok(inputs
        .iter()
        .enumerate()
        .map(|(i, ids)| {
            let rows = runner.logits(i);
            let logprobs = (0..ids.len().saturating_sub(1))
                .map(|t| {
                    let row = &rows[t * width..t * width + vocab];
                    logprob_of(row, ids[t + 1])
                })
                .collect();
            ScoreOutput { logprobs }
        })
        .collect())
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
    let ranges: Vec<std::ops::Range<usize>> = inputs.iter().map(|ids| 0..ids.len()).collect();
    embed_ranges(model, inputs, &ranges, layers, pool)
}

/// [`embed_batch`] over the positions `ranges[i]` of input `i` only (all positions are
/// computed; the range selects and pools). An empty range pools to NaN (`[0, width]` unpooled).
pub fn embed_ranges(
    model: &Model,
    inputs: &[&[u32]],
    ranges: &[std::ops::Range<usize>],
    layers: &[usize],
    pool: Pool,
) -> Result<Vec<Vec<Tensor>>> {
    let runner = full_pass(model, inputs, Want::Nothing, true)?;
    let n: usize = inputs.iter().map(|ids| ids.len()).sum();
    let hidden = runner
        .hidden()
        .iter()
        .map(|h| Tensor::from_slice(h, (n, h.len() / n), &Device::Cpu))
        .collect::<candle_core::Result<Vec<Tensor>>>()?;
    let mut start = 0;
    let mut res = Vec::with_capacity(inputs.len());
    for (ids, r) in inputs.iter().zip(ranges) {
        let per_layer = layers
            .iter()
            .map(|&l| {
                let h = hidden[l].narrow(0, start + r.start, r.len())?;
                let width = h.dim(1)?;
                Ok(match pool {
                    Pool::None => h.contiguous()?,
                    _ if r.is_empty() => Tensor::full(f32::NAN, width, &Device::Cpu)?,
                    Pool::Last => h.narrow(0, r.len() - 1, 1)?.squeeze(0)?.contiguous()?,
                    Pool::Mean => h.mean(D::Minus2)?,
                })
            })
            .collect::<Result<Vec<Tensor>>>()?;
        res.push(per_layer);
        start += ids.len();
    }
    Ok(res)
}
