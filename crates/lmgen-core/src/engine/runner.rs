//! One model step for the scheduler, whatever executes it: the CPU step executor over the
//! paged KV pool, or the tensor decoder (GPUs, half precision, layers spread over devices)
//! with a contiguous cache per sequence.
use crate::error::Result;
use crate::kv::{BlockManager, BlockTable, KvPool, SeqCache};
use crate::model::Decoder;
use crate::model::{PagedSeq, SeqStep, Want, Workspace};

/// A sequence's keys and values: its block table (always: admission and preemption count
/// blocks) and, on the tensor path, the cache holding them.
#[derive(Default)]
pub struct SeqKv {
    pub table: BlockTable,
    dense: Option<SeqCache>,
}

impl SeqKv {
    /// Positions holding keys and values.
    pub fn len(&self) -> usize {
        self.table.len
    }

    pub fn is_empty(&self) -> bool {
        self.table.len == 0
    }
}

/// What one sequence feeds a step.
pub struct RunSeq<'a> {
    pub tokens: &'a [u32],
    pub kv: &'a mut SeqKv,
    pub want: Want,
    /// The sequence length the rotary frequencies are chosen for where they depend on it
    /// (dynamic NTK, longrope): transformers' length of the call, e.g. the whole prompt while
    /// it is prefilled in chunks. 0 (or anything shorter): the positions computed so far.
    pub rope_len: usize,
}

enum Exec {
    Paged {
        pool: KvPool,
        ws: Box<Workspace>,
    },
    Tensor {
        logits: Vec<Vec<f32>>,
        hidden: Vec<Vec<f32>>,
        vocab: usize,
    },
}

pub struct Runner<'m> {
    pub dec: &'m Decoder,
    pub blocks: BlockManager,
    exec: Exec,
}

impl<'m> Runner<'m> {
    /// A runner with a KV pool of `num_blocks` blocks: the CPU executor when the model
    /// supports it (and `paged`), else the tensor path, which shares no blocks between sequences.
    pub fn new(dec: &'m Decoder, num_blocks: usize, prefix_cache: bool, paged: bool) -> Self {
        let paged = paged && dec.cpu_step_supported();
        let exec = if paged {
            Exec::Paged {
                pool: dec.new_pool(num_blocks),
                ws: Box::default(),
            }
        } else {
            Exec::Tensor {
                logits: Vec::new(),
                hidden: Vec::new(),
                vocab: 0,
            }
        };
        Self {
            dec,
            blocks: BlockManager::new(num_blocks, prefix_cache && paged),
            exec,
        }
    }

    /// Whether sequences can share blocks (prefix cache, samples of one prompt).
    pub fn shares_blocks(&self) -> bool {
        matches!(self.exec, Exec::Paged { .. })
    }

    /// Release a sequence's blocks (finished or preempted).
    pub fn free(&mut self, kv: &mut SeqKv) {
        self.blocks.free_table(&mut kv.table);
        kv.dense = None;
    }

    /// Reserve blocks so that `kv` can hold `total` positions.
    pub fn reserve(&mut self, kv: &mut SeqKv, total: usize) -> bool {
        self.blocks.reserve(&mut kv.table, total)
    }

    /// Run one packed step; block tables must already cover the new positions.
    pub fn step(&mut self, seqs: &mut [RunSeq<'_>], want_hidden: bool) -> Result<()> {
        let dec = self.dec;
        match &mut self.exec {
            Exec::Paged { pool, ws } => {
                {
                    let paged: Vec<PagedSeq> = seqs
                        .iter()
                        .map(|s| PagedSeq {
                            tokens: s.tokens,
                            past: s.kv.table.len,
                            blocks: &s.kv.table.blocks,
                            want: s.want,
                            rope_len: s.rope_len,
                        })
                        .collect();
                    dec.cpu_step(ws, pool, &paged, want_hidden)?;
                }
                for s in seqs.iter_mut() {
                    s.kv.table.len += s.tokens.len();
                }
            }
            Exec::Tensor {
                logits,
                hidden,
                vocab,
            } => {
                let out = {
                    let mut steps: Vec<SeqStep> = seqs
                        .iter_mut()
                        .map(|s| {
                            let cap = s.kv.table.blocks.len() * crate::kv::BLOCK_SIZE;
                            let cache = s.kv.dense.get_or_insert_with(|| dec.new_cache(cap));
                            SeqStep {
                                tokens: s.tokens,
                                cache,
                                want: s.want,
                                rope_len: s.rope_len,
                            }
                        })
                        .collect();
                    dec.step(&mut steps, want_hidden)?
                };
                for s in seqs.iter_mut() {
                    s.kv.table.len += s.tokens.len();
                }
                logits.clear();
                *vocab = dec.spec.vocab_size;
                for l in out.logits {
                    logits.push(match l {
                        Some(t) => {
                            *vocab = t.dim(1)?;
                            t.flatten_all()?.to_vec1()?
                        }
                        None => Vec::new(),
                    });
                }
                hidden.clear();
                for h in out.hidden.into_iter().flatten() {
                    hidden.push(
                        h.to_dtype(candle_core::DType::F32)?
                            .flatten_all()?
                            .to_vec1()?,
                    );
                }
            }
        }
        Ok(())
    }

    /// Logits `[rows, vocab()]` of sequence `i` of the last step.
    pub fn logits(&self, i: usize) -> &[f32] {
        match &self.exec {
            Exec::Paged { ws, .. } => ws.logits(i),
            Exec::Tensor { logits, .. } => &logits[i],
        }
    }

    /// Width of a logits row (the head's rows; may exceed the tokenizer's vocabulary).
    pub fn vocab(&self) -> usize {
        match &self.exec {
            Exec::Paged { ws, .. } => ws.vocab(),
            Exec::Tensor { vocab, .. } => *vocab,
        }
    }

    /// Hidden states of the last step (when asked for): `0..=layers`, each `[n_tokens, width]`.
    pub fn hidden(&self) -> &[Vec<f32>] {
        match &self.exec {
            Exec::Paged { ws, .. } => &ws.hidden,
            Exec::Tensor { hidden, .. } => hidden,
        }
    }
}
