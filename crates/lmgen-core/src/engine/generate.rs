//! Continuous batching: up to `batch_size` sequences are in flight; each step packs the
//! prompts of newly admitted sequences together with one token of every running one.
//! A finished sequence leaves at once (its cache is dropped) and the next request takes
//! its place. Every request samples from its own seeded stream, so results do not depend
//! on which requests share a batch.
use crate::error::{Error, Result};
use crate::kv_cache::SeqCache;
use crate::model::{SeqStep, Want};
use crate::sampling::{log_softmax_row, Sampler, SamplingParams};
use crate::tokenizer::DecodeStream;
use crate::Model;

#[derive(Debug, Clone)]
pub struct GenRequest {
    /// Input index (records are reported with it; the caller restores input order).
    pub index: usize,
    /// Sample number for `num_return_sequences` (0-based).
    pub sample: usize,
    pub prompt_ids: Vec<u32>,
    pub max_new_tokens: usize,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    pub logprobs: bool,
    /// Keep generating past EOS tokens until `max_new_tokens` (benchmarks, as vLLM's `ignore_eos`).
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Stop,
    Eos,
}

impl FinishReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Eos => "eos",
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenOutput {
    pub index: usize,
    pub sample: usize,
    pub prompt_ids: Vec<u32>,
    pub token_ids: Vec<u32>,
    /// Natural-log probabilities of `token_ids` under the unmodified model distribution.
    pub logprobs: Option<Vec<f32>>,
    pub text: String,
    pub finish_reason: FinishReason,
}

/// Per-step numbers for progress reporting.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub in_flight: usize,
}

struct Active<'m> {
    req: GenRequest,
    cache: SeqCache,
    sampler: Sampler,
    history: Vec<u32>,
    generated: Vec<u32>,
    logprobs: Vec<f32>,
    /// Tokens of `history` already in the cache.
    prefilled: usize,
    /// Only when stop strings are set: incremental text, for matching them.
    stream: Option<(DecodeStream<'m>, String)>,
}

pub struct Generator<'m> {
    pub model: &'m Model,
    pub batch_size: usize,
    /// Most tokens processed in one step (bounds activation memory for long prompts).
    pub max_step_tokens: usize,
    /// Bytes for the paged KV pool; `None`: what fits beside the weights (see `plan`).
    pub kv_memory: Option<usize>,
    /// Reuse the KV blocks of identical prompt prefixes across requests (vLLM's prefix cache).
    pub prefix_cache: bool,
}

impl<'m> Generator<'m> {
    pub fn new(model: &'m Model, batch_size: usize) -> Self {
        Self {
            model,
            batch_size: batch_size.max(1),
            max_step_tokens: 2048,
            kv_memory: None,
            prefix_cache: true,
        }
    }

    /// Run all `requests`, calling `on_output` as each finishes (completion order) and
    /// `on_step` after every model step.
    pub fn run(
        &self,
        requests: impl IntoIterator<Item = GenRequest>,
        mut on_output: impl FnMut(GenOutput) -> Result<()>,
        mut on_step: impl FnMut(StepStats),
    ) -> Result<()> {
        let model = self.model;
        let mut pending = requests.into_iter();
        let mut active: Vec<Active<'m>> = Vec::new();
        let mut exhausted = false;
        loop {
            while !exhausted && active.len() < self.batch_size {
                match pending.next() {
                    None => exhausted = true,
                    Some(req) => {
                        model.check_prompt(&req.prompt_ids)?;
                        if let Err(e) = req.params.validate() {
                            return Err(Error::BadRequest(format!("request {}: {e}", req.index)));
                        }
                        if req.max_new_tokens == 0 {
                            on_output(self.finish_output(
                                req,
                                vec![],
                                vec![],
                                FinishReason::Length,
                            )?)?;
                            continue;
                        }
                        let cap = req.prompt_ids.len() + req.max_new_tokens;
                        active.push(Active {
                            cache: model.decoder.new_cache(cap),
                            sampler: Sampler::new(
                                req.params.clone(),
                                req.index as u64,
                                req.sample as u64,
                            ),
                            history: req.prompt_ids.clone(),
                            generated: Vec::with_capacity(req.max_new_tokens),
                            logprobs: Vec::new(),
                            prefilled: 0,
                            stream: (!req.stop.is_empty()).then(|| {
                                (
                                    model.tokenizer.decode_stream(&req.prompt_ids),
                                    String::new(),
                                )
                            }),
                            req,
                        });
                    }
                }
            }
            if active.is_empty() {
                return Ok(());
            }
            let mut stats = StepStats {
                in_flight: active.len(),
                ..Default::default()
            };
            // Decode tokens first (one per running sequence), then prompt chunks while the
            // step's token budget lasts; a long prompt is prefilled over several steps.
            let mut budget = self.max_step_tokens.max(1);
            // Per active sequence: the (start, len) of `history` it feeds this step, if any.
            let mut plan: Vec<Option<(usize, usize)>> = vec![None; active.len()];
            for (p, a) in plan.iter_mut().zip(&active) {
                if a.prefilled == a.history.len() {
                    *p = Some((a.history.len() - 1, 1));
                    budget = budget.saturating_sub(1);
                }
            }
            for (p, a) in plan.iter_mut().zip(&active) {
                if p.is_none() && budget > 0 {
                    let len = (a.history.len() - a.prefilled).min(budget);
                    *p = Some((a.prefilled, len));
                    budget -= len;
                    stats.prompt_tokens += len;
                }
            }
            let out = {
                let mut steps: Vec<SeqStep> = active
                    .iter_mut()
                    .zip(&plan)
                    .filter_map(|(a, p)| {
                        let (start, len) = (*p)?;
                        let done = start + len == a.history.len();
                        Some(SeqStep {
                            tokens: &a.history[start..start + len],
                            cache: &mut a.cache,
                            want: if done { Want::Last } else { Want::Nothing },
                        })
                    })
                    .collect();
                model.decoder.step(&mut steps, false)?
            };
            let mut finished = Vec::new();
            let mut logits_of_step = out.logits.into_iter();
            for (i, p) in plan.iter().enumerate() {
                let Some((start, len)) = *p else { continue };
                let a = &mut active[i];
                a.prefilled = a.prefilled.max(start + len);
                let Some(logits) = logits_of_step.next().flatten() else {
                    continue;
                };
                let mut row: Vec<f32> = logits.flatten_all()?.to_vec1()?;
                // Padded vocab rows beyond the tokenizer never get sampled.
                row.truncate(model.decoder.spec.vocab_size);
                let lp = a.req.logprobs.then(|| log_softmax_row(&row));
                let tok = a.sampler.sample(&mut row, &a.history);
                if let Some(lp) = lp {
                    a.logprobs.push(lp[tok as usize]);
                }
                a.generated.push(tok);
                a.history.push(tok);
                stats.generated_tokens += 1;
                let reason = if !a.req.ignore_eos && model.eos.contains(&tok) {
                    Some(FinishReason::Eos)
                } else if Self::hits_stop(a, tok)? {
                    Some(FinishReason::Stop)
                } else if a.generated.len() >= a.req.max_new_tokens
                    || !model.fits(a.history.len() + 1)
                {
                    Some(FinishReason::Length)
                } else {
                    None
                };
                if let Some(r) = reason {
                    finished.push((i, r));
                }
            }
            on_step(stats);
            for (i, reason) in finished.into_iter().rev() {
                let a = active.remove(i);
                let lps = a.logprobs;
                on_output(self.finish_output(a.req, a.generated, lps, reason)?)?;
            }
        }
    }

    /// Feed the new token to the sequence's text stream and look for a stop string in
    /// the part of the text the new piece could have completed.
    fn hits_stop(a: &mut Active, tok: u32) -> Result<bool> {
        let Some((stream, text)) = a.stream.as_mut() else {
            return Ok(false);
        };
        let Some(piece) = stream.step(tok)? else {
            return Ok(false);
        };
        let longest = a.req.stop.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut from = text.len().saturating_sub(longest);
        text.push_str(&piece);
        while !text.is_char_boundary(from) {
            from -= 1;
        }
        Ok(a.req.stop.iter().any(|s| text[from..].contains(s.as_str())))
    }

    fn finish_output(
        &self,
        req: GenRequest,
        token_ids: Vec<u32>,
        logprobs: Vec<f32>,
        finish_reason: FinishReason,
    ) -> Result<GenOutput> {
        let mut text = self
            .model
            .tokenizer
            .continuation(&req.prompt_ids, &token_ids)?;
        if finish_reason == FinishReason::Stop {
            if let Some(pos) = req.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(pos);
            }
        }
        Ok(GenOutput {
            index: req.index,
            sample: req.sample,
            logprobs: req.logprobs.then_some(logprobs),
            prompt_ids: req.prompt_ids,
            token_ids,
            text,
            finish_reason,
        })
    }
}
