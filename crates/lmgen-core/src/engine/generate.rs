//! Continuous batching: up to `batch_size` sequences are in flight; each step packs the
//! prompts of newly admitted sequences together with one token of every running one.
//! A finished sequence leaves at once (its cache is dropped) and the next request takes
//! its place. Every request samples from its own seeded stream, so results do not depend
//! on which requests share a batch.
use super::admit::{self, Demand, Growth};
use super::runner::{RunSeq, Runner, SeqKv};
use crate::error::{Error, Result};
use crate::kv::{BlockTable, BLOCK_SIZE};
use crate::model::Want;
use crate::sampling::{logprob_of, top_logprobs, Sampler, SamplingParams};
use crate::tokenizer::DecodeStream;
use crate::Model;
use std::collections::VecDeque;

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
    /// With `logprobs`: also the this many most likely tokens at each step (OpenAI's
    /// `logprobs: N` / `top_logprobs`).
    pub top_logprobs: usize,
    /// Keep generating past EOS tokens until `max_new_tokens` (benchmarks, as vLLM's `ignore_eos`).
    pub ignore_eos: bool,
    /// What the random stream depends on besides the seed and the sample number: `None` for
    /// a request with its own seed (vLLM's rule), else a stable hash of the record's id
    /// ([`crate::sampling::stream_key`]), so a record samples the same wherever it runs.
    pub stream_key: Option<u64>,
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
    /// With `top_logprobs > 0`: per generated token, the most likely tokens and their
    /// log-probabilities, most likely first.
    pub top_logprobs: Option<Vec<Vec<(u32, f32)>>>,
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
    kv: SeqKv,
    sampler: Sampler,
    /// Prompt and generated tokens; keys and values exist for `kv.len()` of them.
    history: Vec<u32>,
    generated: Vec<u32>,
    logprobs: Vec<f32>,
    top_logprobs: Vec<Vec<(u32, f32)>>,
    /// Only when stop strings are set: incremental text, for matching them.
    stream: Option<(DecodeStream<'m>, String)>,
    /// Admission order (the youngest is preempted first).
    admitted: u64,
    /// Phi-3 longrope: the cached keys were rotated with the short factors (the sequence fit
    /// `original_max_position_embeddings` when they were computed).
    short_rope: bool,
}

impl Active<'_> {
    /// The prompt (and what was generated before a preemption) is computed: at most the
    /// last sampled token is still to be fed.
    fn prefilled(&self) -> bool {
        self.kv.len() + 1 >= self.history.len()
    }

    /// What the sequence needs of the pool from now on (`growth: None`: at most).
    fn demand(&self, growth: Option<&Growth>) -> Demand {
        let (max_new, done) = (self.req.max_new_tokens, self.generated.len());
        Demand {
            len: self.history.len(),
            left: match growth {
                Some(g) => g.left(max_new, done, self.req.ignore_eos),
                None => max_new.saturating_sub(done).max(1),
            },
        }
    }
}

/// How requests are admitted into the KV pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Admission {
    /// Keep blocks for the growth still to come (exact for `ignore_eos`, estimated otherwise;
    /// see `engine/admit.rs`), so that a pool too small for everyone is not over-committed.
    #[default]
    Reserve,
    /// Admit when the prompt fits with one block of growth per running sequence (vLLM's
    /// rule); the pool fills as sequences grow and the youngest are preempted.
    Prompt,
}

impl Admission {
    /// `LMGEN_ADMISSION=prompt` selects [`Admission::Prompt`] (for comparisons).
    fn from_env() -> Self {
        match std::env::var("LMGEN_ADMISSION").as_deref() {
            Ok("prompt") => Admission::Prompt,
            _ => Admission::Reserve,
        }
    }
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
    /// Use the CPU step executor over the paged pool where the model allows it (`false`: the
    /// tensor path, the reference the paged path is tested against).
    pub paged: bool,
    /// How requests are admitted into the KV pool (default: reserve growth;
    /// `LMGEN_ADMISSION=prompt` for vLLM's rule).
    pub admission: Admission,
    /// Checked before every step: once set, [`Generator::run`] returns
    /// [`Error::Interrupted`] (finished outputs were already delivered; in-flight ones are
    /// dropped).
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
}

/// Counters of a run (for tests and reports).
#[derive(Debug, Clone, Copy, Default)]
pub struct RunStats {
    /// Sequences preempted (blocks freed, recomputed later) because the pool was full.
    pub preemptions: usize,
    /// Phi-3 longrope sequences recomputed with the long factors on outgrowing
    /// `original_max_position_embeddings` (as transformers does).
    pub rope_recomputes: usize,
    /// Prompt positions whose keys and values came from shared blocks.
    pub reused_tokens: usize,
    pub pool_blocks: usize,
}

impl<'m> Generator<'m> {
    pub fn new(model: &'m Model, batch_size: usize) -> Self {
        Self {
            model,
            batch_size: batch_size.max(1),
            max_step_tokens: 2048,
            kv_memory: None,
            prefix_cache: true,
            paged: true,
            admission: Admission::from_env(),
            stop: None,
        }
    }

    /// Blocks of the KV pool: `kv_memory` bytes, else enough for `batch_size` sequences at
    /// the context length (2048 to 8192 tokens each), capped by what `plan::kv_budget_bytes`
    /// leaves of the available memory.
    /// The pool's pages become resident only as blocks are used.
    pub fn pool_blocks(&self) -> usize {
        let dec = &self.model.decoder;
        let per_block = dec.kv_block_bytes().max(1);
        let bytes = match self.kv_memory {
            Some(b) => b,
            None => {
                let ctx = dec.spec.max_positions.clamp(2048, 8192);
                let want = self.batch_size * BlockTable::blocks_for(ctx + 1) * per_block;
                // The weights are loaded: what is available now is for the pool and the step.
                let avail = crate::kv::available_memory().unwrap_or(u64::MAX);
                want.min(crate::plan::kv_budget_bytes(&dec.spec, 0, avail))
            }
        };
        (bytes / per_block).max(1)
    }

    /// Run all `requests`, calling `on_output` as each finishes (completion order) and
    /// `on_step` after every model step.
    pub fn run(
        &self,
        requests: impl IntoIterator<Item = GenRequest>,
        on_output: impl FnMut(GenOutput) -> Result<()>,
        on_step: impl FnMut(StepStats),
    ) -> Result<()> {
        self.run_with_stats(requests, on_output, on_step)
            .map(|_| ())
    }

    /// [`Generator::run`], returning the scheduler's counters.
    pub fn run_with_stats(
        &self,
        requests: impl IntoIterator<Item = GenRequest>,
        mut on_output: impl FnMut(GenOutput) -> Result<()>,
        mut on_step: impl FnMut(StepStats),
    ) -> Result<RunStats> {
        let model = self.model;
        let mut runner = Runner::new(
            &model.decoder,
            self.pool_blocks(),
            self.prefix_cache,
            self.paged,
        );
        let total_blocks = runner.blocks.num_blocks();
        let longrope = model.decoder.spec.longrope_original_max();
        // Blocks cached for a longrope sequence are shared only within its regime (short or
        // long factors): the regime is part of the prefix hash.
        let rope_root = |root: crate::kv::BlockHash, len: usize| match longrope {
            Some(o) if len > o => crate::kv::BlockManager::chain(root, &[u32::MAX]),
            _ => root,
        };
        let mut run_stats = RunStats {
            pool_blocks: total_blocks,
            ..Default::default()
        };
        let mut pending = requests.into_iter();
        // Preempted sequences wait here, ahead of new requests.
        let mut waiting: VecDeque<Active<'m>> = VecDeque::new();
        let mut next_req: Option<GenRequest> = None;
        let mut active: Vec<Active<'m>> = Vec::new();
        let mut admitted = 0u64;
        let mut row: Vec<f32> = Vec::new();
        let mut growth = Growth::new();
        let limit = model.hard_limit();
        let mut demands: Vec<Demand> = Vec::new();
        loop {
            if let Some(stop) = &self.stop {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(Error::Interrupted("stopped by a signal".into()));
                }
            }
            // Admission: preempted sequences first, then new requests, while the batch has
            // room and the pool has the blocks (see `Admission`).
            while active.len() < self.batch_size {
                let mut a = match waiting.pop_front() {
                    Some(a) => a,
                    None => {
                        let req = match next_req.take().or_else(|| pending.next()) {
                            Some(r) => r,
                            None => break,
                        };
                        model.check_prompt(&req.prompt_ids)?;
                        if let Err(e) = req.params.validate() {
                            return Err(Error::BadRequest(format!("request {}: {e}", req.index)));
                        }
                        if req.max_new_tokens == 0 {
                            on_output(self.finish_output(
                                req,
                                vec![],
                                (vec![], vec![]),
                                FinishReason::Length,
                            )?)?;
                            continue;
                        }
                        // Later samples of a prompt wait until one sample's prompt is computed,
                        // then share its blocks (all of them at once).
                        let siblings = || active.iter().filter(|a| a.req.index == req.index);
                        let sibling_prefilling = runner.shares_blocks()
                            && siblings().next().is_some()
                            && !siblings().any(|a| a.prefilled());
                        if sibling_prefilling {
                            next_req = Some(req);
                            break;
                        }
                        self.activate(req)
                    }
                };
                let most = a.demand(None);
                let alone = admit::peak_blocks(most, limit);
                if alone > total_blocks {
                    return Err(Error::BadRequest(format!(
                        "request {}: {} tokens and up to {} new need {alone} KV blocks of {BLOCK_SIZE} tokens, the pool has {total_blocks} (raise --kv-memory or lower --max-new-tokens)",
                        a.req.index, most.len, most.left
                    )));
                }
                // Keys cached from here on use the short factors while the sequence fits.
                a.short_rope = longrope.is_some_and(|o| a.history.len() <= o);
                if runner.shares_blocks() {
                    let root = rope_root(runner.blocks.root(a.req.index), a.history.len());
                    run_stats.reused_tokens +=
                        runner
                            .blocks
                            .match_prefix(&mut a.kv.table, root, &a.history);
                }
                let admits = active.is_empty()
                    || match self.admission {
                        Admission::Reserve => {
                            // Every running sequence's blocks are counted as its own (shared
                            // ones as often as they are shared, on both sides).
                            demands.clear();
                            demands.extend(active.iter().map(|r| r.demand(Some(&growth))));
                            demands.push(a.demand(Some(&growth)));
                            let held: usize = active
                                .iter()
                                .chain([&a])
                                .map(|r| r.kv.table.blocks.len())
                                .sum();
                            admit::fits(&mut demands, runner.blocks.available() + held, limit)
                        }
                        Admission::Prompt => {
                            let need = BlockTable::blocks_for(a.history.len() + 1)
                                - a.kv.table.blocks.len();
                            need + active.len() <= runner.blocks.available()
                        }
                    };
                if !admits {
                    runner.free(&mut a.kv);
                    waiting.push_front(a);
                    break;
                }
                a.admitted = admitted;
                admitted += 1;
                active.push(a);
            }
            if active.is_empty() {
                if waiting.is_empty() && next_req.is_none() {
                    return Ok(run_stats);
                }
                continue;
            }
            let mut stats = StepStats {
                in_flight: active.len(),
                ..Default::default()
            };
            // Phi-3 longrope: when a sequence outgrows `original_max_position_embeddings`,
            // transformers drops its cache and recomputes it with the long factors
            // (`Phi3ForCausalLM.prepare_inputs_for_generation`); so does this: its blocks are
            // freed and the whole history is prefilled again (rotated with the long factors, as
            // `rope_len` is the history's length).
            if let Some(o) = longrope {
                for a in active.iter_mut() {
                    if a.short_rope && a.history.len() > o {
                        runner.free(&mut a.kv);
                        a.kv = SeqKv::default();
                        a.short_rope = false;
                        run_stats.rope_recomputes += 1;
                    }
                }
            }
            // Decode tokens first (one per running sequence), then prompt chunks while the
            // step's token budget lasts; a long prompt is prefilled over several steps.
            let mut budget = self.max_step_tokens.max(1);
            let mut plan: Vec<Option<(usize, usize)>> = vec![None; active.len()];
            for (p, a) in plan.iter_mut().zip(&active) {
                if a.prefilled() {
                    *p = Some((a.history.len() - 1, 1));
                    budget = budget.saturating_sub(1);
                }
            }
            // Decoding sequences re-feed their last token, whose keys and values are not
            // stored yet: keep `kv.len()` the position of the token fed.
            for (p, a) in plan.iter_mut().zip(&mut active) {
                if p.is_none() && budget > 0 {
                    let len = (a.history.len() - a.kv.len()).min(budget);
                    *p = Some((a.kv.len(), len));
                    budget -= len;
                    stats.prompt_tokens += len;
                }
            }
            // Blocks for this step; when the pool is full, preempt the youngest sequences.
            let mut order: Vec<usize> = (0..active.len()).collect();
            order.sort_by_key(|&i| active[i].admitted);
            let mut preempt = vec![false; active.len()];
            for &i in &order {
                let Some((start, len)) = plan[i] else {
                    continue;
                };
                loop {
                    if runner.reserve(&mut active[i].kv, start + len) {
                        break;
                    }
                    // The youngest sequence still holding blocks gives them back.
                    let victim = order
                        .iter()
                        .rev()
                        .copied()
                        .find(|&j| !preempt[j] && !active[j].kv.table.blocks.is_empty())
                        .unwrap_or(i);
                    preempt[victim] = true;
                    plan[victim] = None;
                    runner.free(&mut active[victim].kv);
                    run_stats.preemptions += 1;
                    if victim == i {
                        break;
                    }
                }
            }
            if preempt.iter().any(|&p| p) {
                growth.preempted(
                    active
                        .iter()
                        .zip(&preempt)
                        .filter(|(_, &p)| !p)
                        .map(|(a, _)| (a.generated.len(), a.req.max_new_tokens)),
                );
            } else {
                growth.decay();
            }
            for i in (0..active.len()).rev() {
                if preempt[i] {
                    let mut a = active.remove(i);
                    plan.remove(i);
                    a.kv = SeqKv::default();
                    waiting.push_front(a);
                }
            }
            if plan.iter().all(|p| p.is_none()) {
                continue;
            }
            {
                let mut steps: Vec<RunSeq> = active
                    .iter_mut()
                    .zip(&plan)
                    .filter_map(|(a, p)| {
                        let (start, len) = (*p)?;
                        let done = start + len == a.history.len();
                        Some(RunSeq {
                            tokens: &a.history[start..start + len],
                            kv: &mut a.kv,
                            want: if done { Want::Last } else { Want::Nothing },
                            // A prompt prefilled in chunks is rotated as transformers rotates it
                            // in one call (dynamic NTK, longrope).
                            rope_len: a.history.len(),
                        })
                    })
                    .collect();
                runner.step(&mut steps, false)?;
            }
            let mut finished = Vec::new();
            let mut k = 0;
            let vocab = model.decoder.spec.vocab_size;
            for (i, p) in plan.iter().enumerate() {
                let Some((start, len)) = *p else { continue };
                let slot = k;
                k += 1;
                let a = &mut active[i];
                if runner.shares_blocks() {
                    let root = rope_root(runner.blocks.root(a.req.index), a.history.len());
                    runner
                        .blocks
                        .commit_full_blocks(&mut a.kv.table, root, &a.history);
                }
                if start + len != a.history.len() {
                    continue;
                }
                // Padded vocab rows beyond the tokenizer never get sampled.
                let logits = &runner.logits(slot)[..vocab];
                row.clear();
                row.extend_from_slice(logits);
                let tok = a.sampler.sample(&mut row, &a.history, a.generated.len());
                if a.req.logprobs {
                    a.logprobs.push(logprob_of(logits, tok));
                    if a.req.top_logprobs > 0 {
                        a.top_logprobs
                            .push(top_logprobs(logits, a.req.top_logprobs));
                    }
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
                let mut a = active.remove(i);
                runner.free(&mut a.kv);
                let lps = (a.logprobs, a.top_logprobs);
                on_output(self.finish_output(a.req, a.generated, lps, reason)?)?;
            }
        }
    }

    fn activate(&self, req: GenRequest) -> Active<'m> {
        Active {
            kv: SeqKv::default(),
            sampler: Sampler::new(req.params.clone(), req.stream_key, req.sample as u64),
            history: req.prompt_ids.clone(),
            generated: Vec::with_capacity(req.max_new_tokens),
            logprobs: Vec::new(),
            top_logprobs: Vec::new(),
            stream: (!req.stop.is_empty()).then(|| {
                (
                    self.model.tokenizer.decode_stream(&req.prompt_ids),
                    String::new(),
                )
            }),
            admitted: 0,
            short_rope: false,
            req,
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
        (logprobs, top): (Vec<f32>, Vec<Vec<(u32, f32)>>),
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
            top_logprobs: (req.logprobs && req.top_logprobs > 0).then_some(top),
            logprobs: req.logprobs.then_some(logprobs),
            prompt_ids: req.prompt_ids,
            token_ids,
            text,
            finish_reason,
        })
    }
}
