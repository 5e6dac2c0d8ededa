//! The one generic decoder-only transformer. Every family is a [`ModelSpec`] plus weights
//! mapped to the canonical layout below; there is no per-family forward code.
//!
//! Batches are *packed*: the tokens of all sequences in a step are concatenated into one
//! `[n_tokens, hidden]` matrix for every projection, and attention runs per sequence against
//! that sequence's own KV cache. Sequences of different lengths (prefill chunks and single
//! decode tokens alike) share a step without padding, so no prompt's numbers depend on its
//! neighbours.
use super::layers::{activate, Embedding, Linear, Norm, Weight};
use crate::config::{dynamic_inv_freq, MlpKind, ModelSpec, Positions, Residual, RopeSpec};
use crate::kernels::paged_attn;
use crate::kernels::quant::QuantKind;
use crate::kv::gpu_paged::{self, GpuKvPool, GpuSeqBlocks};
use crate::kv::SeqCache;
use candle_core::{DType, Device, Result, Tensor, D};
use std::sync::Arc;

/// One transformer block in canonical form.
#[derive(Debug, Clone)]
pub struct Block {
    /// Norm before attention; `None`: none (OLMo-2).
    pub ln1: Option<Norm>,
    /// Norm before the MLP. `None`: in parallel blocks attention and MLP share `ln1`'s output
    /// (GPT-J, Phi, Falcon); in sequential blocks there is none (OLMo-2).
    pub ln2: Option<Norm>,
    /// Norms of the attention and MLP outputs before their residual adds (Gemma-2/3, OLMo-2).
    pub post_attn_norm: Option<Norm>,
    pub post_mlp_norm: Option<Norm>,
    /// Norms of q and k before the rotary: per head (weight `[head_dim]`, or `[heads*head_dim]`
    /// for StableLM's one norm per head), or over the whole projection (`spec.qk_norm_whole`).
    pub q_norm: Option<Norm>,
    pub k_norm: Option<Norm>,
    /// Fused projection with output rows `[q (heads*hd); k (kv_heads*hd); v (kv_heads*hd)]`.
    pub qkv: Linear,
    pub out: Linear,
    /// `Plain`: `[inter, hidden]`; `Gated`: `[gate; up]` = `[2*inter, hidden]`. In blocks with
    /// experts: the shared expert (Qwen2-MoE), or no rows when there is none.
    pub mlp_in: Linear,
    pub mlp_out: Linear,
    /// Experts in place of (or, with a shared expert, beside) the dense MLP.
    pub moe: Option<Moe>,
}

/// The experts of one block (see [`crate::config::MoeSpec`]).
#[derive(Debug, Clone)]
pub struct Moe {
    /// `[experts, hidden]`
    pub router: Linear,
    /// Per expert: `[gate; up]` `[2*inter, hidden]` and down `[hidden, inter]`.
    pub experts: Vec<(Linear, Linear)>,
    /// Qwen2-MoE: `[1, hidden]`, the shared expert's output is scaled by `sigmoid(gate · x)`.
    pub shared_gate: Option<Linear>,
}

impl Block {
    /// Every projection matrix of the block (experts included).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = vec![
            &mut self.qkv,
            &mut self.out,
            &mut self.mlp_in,
            &mut self.mlp_out,
        ];
        if let Some(m) = &mut self.moe {
            for (a, b) in &mut m.experts {
                v.push(a);
                v.push(b);
            }
        }
        v
    }

    /// Every projection matrix of the block (experts and routers included).
    pub fn linears(&self) -> Vec<&Linear> {
        let mut v = vec![&self.qkv, &self.out, &self.mlp_in, &self.mlp_out];
        if let Some(m) = &self.moe {
            v.push(&m.router);
            v.extend(m.shared_gate.iter());
            for (a, b) in &m.experts {
                v.push(a);
                v.push(b);
            }
        }
        v
    }
}

/// Top-k routing of one token as transformers computes it (Mixtral, Qwen2-MoE, Qwen3-MoE and
/// OLMoE alike): softmax over all experts' router logits (f32), `torch.topk` of those
/// probabilities, renormalized to sum to 1 when `norm`. Returns `(expert, weight)` pairs in
/// `out`, in torch's top-k order. Exactly equal probabilities (a zero router row, identical
/// rows) are resolved as torch's CPU `topk` resolves them (see [`super::topk`]), so tied tokens
/// go to the same experts as in transformers.
pub fn route(logits: &[f32], k: usize, norm: bool, out: &mut Vec<(usize, f32)>) {
    ROUTE_SCRATCH.with(|s| {
        let (probs, pairs, idx) = &mut *s.borrow_mut();
        let mx = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        probs.clear();
        probs.extend(logits.iter().map(|&l| (l - mx).exp()));
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        super::topk::topk_into(probs, k, pairs, idx);
        out.clear();
        out.extend(idx.iter().map(|&e| (e, probs[e])));
    });
    if norm {
        let s: f32 = out.iter().map(|&(_, w)| w).sum();
        out.iter_mut().for_each(|(_, w)| *w /= s);
    }
}

type RouteScratch = (Vec<f32>, Vec<(f32, usize)>, Vec<usize>);

thread_local! {
    static ROUTE_SCRATCH: std::cell::RefCell<RouteScratch> = const {
        std::cell::RefCell::new((Vec::new(), Vec::new(), Vec::new()))
    };
}

/// All weights of a model in canonical form.
#[derive(Debug, Clone)]
pub struct Weights {
    /// `[vocab, embed_dim]`
    pub embed: Embedding,
    /// Learned positions `[table, hidden]`.
    pub pos_embed: Option<Tensor>,
    pub embed_norm: Option<Norm>,
    pub project_in: Option<Linear>,
    pub blocks: Vec<Block>,
    pub final_norm: Option<Norm>,
    pub project_out: Option<Linear>,
    /// `[vocab, embed_dim]`; shares `embed`'s storage when tied.
    pub lm_head: Linear,
}

impl Weights {
    /// Weight-only quantization of every block projection and the head (CPU, f32 weights).
    /// A matrix that cannot take `kind` (columns not a multiple of its block size) falls back
    /// to Q8_0, else stays f32. Returns how many matrices got each kind.
    pub fn quantize(&mut self, kind: QuantKind) -> Result<Vec<(String, usize)>> {
        let mut counts: Vec<(String, usize)> = Vec::new();
        let mut tally = |name: &str| match counts.iter_mut().find(|(n, _)| n == name) {
            Some((_, c)) => *c += 1,
            None => counts.push((name.to_string(), 1)),
        };
        let mut linears: Vec<&mut Linear> = Vec::new();
        for b in &mut self.blocks {
            linears.extend(b.linears_mut().into_iter().filter(|l| l.param_count() > 0));
        }
        linears.push(&mut self.lm_head);
        for l in linears {
            if let Weight::Quant(q) = &l.weight {
                tally(q.kind().name()); // kept from the checkpoint
                continue;
            }
            let q = match l.quantize(kind)? {
                Some(q) => Some((q, kind)),
                None if kind != QuantKind::Q8_0 => {
                    l.quantize(QuantKind::Q8_0)?.map(|q| (q, QuantKind::Q8_0))
                }
                None => None,
            };
            match q {
                Some((q, k)) => {
                    *l = q;
                    tally(k.name());
                }
                None => tally("f32"),
            }
        }
        Ok(counts)
    }
}

/// What the caller wants back for one sequence of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Logits of the last token only (generation).
    Last,
    /// Logits of every token of the chunk (scoring).
    All,
    /// Nothing (hidden states only, or prefill of a chunk not ending the prompt).
    Nothing,
}

pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut SeqCache,
    pub want: Want,
    /// The sequence length rotary frequencies are chosen for, when longer than the cache
    /// plus `tokens` (see `RunSeq::rope_len`).
    pub rope_len: usize,
}

pub struct StepOutput {
    /// Per sequence: logits `[rows, vocab]` (f32) as requested by `Want`.
    pub logits: Vec<Option<Tensor>>,
    /// When requested: hidden states `0..=num_layers` (transformers indexing), each `[n_tokens, width]`
    /// over the packed tokens of the step.
    pub hidden: Option<Vec<Tensor>>,
}

pub struct Decoder {
    pub spec: ModelSpec,
    pub weights: Weights,
    pub device: Device,
    /// ALiBi slopes per head.
    alibi: Option<Vec<f32>>,
    /// Falcon: the factor on the bfloat16-rounded products slope × key position.
    alibi_bf16: Option<f32>,
    /// GPU paged KV pool for decode attention (`LMGEN_CUDA_PAGED=1`, experimental).
    paged: Option<Arc<GpuKvPool>>,
}

/// A step's view of the GPU paged pool.
struct PagedStep {
    /// Cache slot of every packed token; -1 for sequences without blocks in the pool.
    slots: Tensor,
    /// Per sequence: its attention goes through the paged kernel (one new token).
    decode: Vec<bool>,
    /// Inputs of the kernel for those sequences; `None` when there are none.
    dec: Option<PagedDecode>,
}

struct PagedDecode {
    /// Packed token rows of the decode sequences, in order (u32).
    rows: Tensor,
    /// `[n_decode, max_blocks]` u32, padded with block 0.
    block_tables: Tensor,
    /// `[n_decode]` u32: positions to attend to (the new one included).
    context_lens: Tensor,
    max_context_len: usize,
}

fn paged_err(e: crate::error::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// `LMGEN_CUDA_PAGED_CHECK=1`: compares the paged kernel's output with the dense path's for
/// every decode sequence and layer, and prints the difference each time it exceeds the
/// largest one printed before (so the output stays short).
fn paged_check(li: usize, paged: &Tensor, dense: &Tensor) -> Result<()> {
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    static MAX: AtomicU32 = AtomicU32::new(0);
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let d = (paged.to_dtype(DType::F32)? - dense.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let n = COUNT.fetch_add(1, Ordering::Relaxed) + 1;
    let prev = f32::from_bits(MAX.load(Ordering::Relaxed));
    if n == 1 || d > prev || d.is_nan() {
        MAX.store(d.to_bits(), Ordering::Relaxed);
        eprintln!("lmgen: paged check {n}: layer {li}: max |paged - dense| = {d:e}");
    }
    Ok(())
}

impl Decoder {
    pub fn new(spec: ModelSpec, weights: Weights, device: Device) -> Self {
        let alibi = spec.alibi();
        let alibi_bf16 = spec.alibi_bf16_scale();
        let paged = if gpu_paged::requested() {
            match Self::paged_pool(&spec, &weights) {
                Ok(pool) => {
                    eprintln!(
                        "lmgen: LMGEN_CUDA_PAGED=1: decode attention through the paged CUDA \
                         kernel ({} blocks of {} positions; experimental)",
                        pool.num_blocks,
                        gpu_paged::GPU_BLOCK_SIZE
                    );
                    Some(Arc::new(pool))
                }
                Err(e) => {
                    eprintln!("lmgen: warning: LMGEN_CUDA_PAGED=1 ignored: {e}");
                    None
                }
            }
        } else {
            None
        };
        Self {
            spec,
            weights,
            device,
            alibi,
            alibi_bf16,
            paged,
        }
    }

    /// The GPU paged pool for this model: every layer on one CUDA device.
    fn paged_pool(spec: &ModelSpec, weights: &Weights) -> crate::error::Result<GpuKvPool> {
        let unsupported = |m: &str| crate::error::Error::PagedAttention(m.to_string());
        let first = weights
            .blocks
            .first()
            .ok_or_else(|| unsupported("the model has no layers"))?;
        let dev = first.qkv.device();
        if !dev.is_cuda() {
            return Err(unsupported("the model is not on a CUDA device"));
        }
        if weights
            .blocks
            .iter()
            .any(|b| !b.qkv.device().same_device(&dev))
        {
            return Err(unsupported("the layers are split over several devices"));
        }
        GpuKvPool::new(
            weights.blocks.len(),
            gpu_paged::requested_blocks()?,
            spec.num_kv_heads,
            spec.head_dim,
            weights.embed.dtype(),
            &dev,
        )
    }

    /// Whether decode steps use the GPU paged pool.
    pub fn paged_decode(&self) -> bool {
        self.paged.is_some()
    }

    /// ALiBi slope per head, for models with ALiBi positions.
    pub fn alibi_slopes(&self) -> Option<&[f32]> {
        self.alibi.as_deref()
    }

    /// Falcon: the factor on the bfloat16-rounded products of the slopes and the key positions
    /// (see `AttnParams::alibi_bf16`).
    pub fn alibi_bf16_scale(&self) -> Option<f32> {
        self.alibi_bf16
    }

    pub fn new_cache(&self, capacity: usize) -> SeqCache {
        let mut c = SeqCache::new(self.spec.num_layers, capacity);
        c.paged = self.paged.as_ref().map(|p| GpuSeqBlocks::new(p.clone()));
        c
    }

    /// Reserves pool blocks for this step's tokens and builds the kernels' inputs. A
    /// sequence the pool cannot hold any more (or whose blocks fell behind its dense cache)
    /// leaves the pool and continues on the dense path.
    fn paged_step(&self, seqs: &mut [SeqStep<'_>]) -> Result<Option<PagedStep>> {
        let Some(pool) = &self.paged else {
            return Ok(None);
        };
        let dev = pool.layer(0).0.device().clone();
        let mut slots: Vec<i64> = Vec::new();
        let mut decode = Vec::with_capacity(seqs.len());
        let (mut rows, mut tables, mut lens) = (Vec::new(), Vec::new(), Vec::new());
        let mut row = 0u32;
        let mut any = false;
        for s in seqs.iter_mut() {
            let (t, past) = (s.tokens.len(), s.cache.len());
            let ok = s
                .cache
                .paged
                .as_mut()
                .is_some_and(|p| p.len == past && p.reserve(past + t));
            match s.cache.paged.as_mut().filter(|_| ok) {
                Some(p) => {
                    slots.extend((past..past + t).map(|pos| p.slot(pos)));
                    p.len = past + t;
                    any = true;
                    if t == 1 {
                        rows.push(row);
                        tables.push(p.blocks.clone());
                        lens.push((past + 1) as u32);
                    }
                    decode.push(t == 1);
                }
                None => {
                    s.cache.paged = None;
                    slots.extend(std::iter::repeat_n(-1i64, t));
                    decode.push(false);
                }
            }
            row += t as u32;
        }
        if !any {
            return Ok(None);
        }
        let n = slots.len();
        let slots = Tensor::from_vec(slots, n, &dev)?;
        let dec = if rows.is_empty() {
            None
        } else {
            let nd = rows.len();
            let max_blocks = tables.iter().map(Vec::len).max().unwrap_or(1).max(1);
            let mut flat = vec![0u32; nd * max_blocks];
            for (i, t) in tables.iter().enumerate() {
                flat[i * max_blocks..i * max_blocks + t.len()].copy_from_slice(t);
            }
            let max_context_len = lens.iter().copied().max().unwrap_or(1) as usize;
            Some(PagedDecode {
                rows: Tensor::from_vec(rows, nd, &dev)?,
                block_tables: Tensor::from_vec(flat, (nd, max_blocks), &dev)?,
                context_lens: Tensor::from_vec(lens, nd, &dev)?,
                max_context_len,
            })
        };
        Ok(Some(PagedStep { slots, decode, dec }))
    }

    /// Run one packed step. Each sequence's tokens are appended to its cache.
    pub fn step(&self, seqs: &mut [SeqStep<'_>], want_hidden: bool) -> Result<StepOutput> {
        let spec = &self.spec;
        let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        if n == 0 {
            candle_core::bail!("empty step");
        }
        let mut ids = Vec::with_capacity(n);
        let mut positions = Vec::with_capacity(n);
        for s in seqs.iter() {
            let start = s.cache.len();
            ids.extend_from_slice(s.tokens);
            positions.extend((start..start + s.tokens.len()).map(|p| p as u32));
        }
        let ids_t = Tensor::new(ids.as_slice(), &self.device)?;
        let w = &self.weights;
        let mut x = w.embed.rows_of(&ids_t)?;
        if let Some(s) = spec.embed_scale {
            // transformers multiplies by the scale cast to the weights' dtype.
            let s = Tensor::new(s, &self.device)?.to_dtype(x.dtype())?;
            x = x.broadcast_mul(&s)?;
        }
        if let Some(p) = &w.project_in {
            x = p.forward(&x)?;
        }
        if let (Some(table), Positions::Learned { offset, .. }) = (&w.pos_embed, &spec.positions) {
            let idx: Vec<u32> = positions.iter().map(|p| p + *offset as u32).collect();
            let pos = table.index_select(&Tensor::new(idx.as_slice(), &self.device)?, 0)?;
            x = (x + pos)?;
        }
        if let Some(norm) = &w.embed_norm {
            x = norm.forward(&x)?;
        }
        let rope = match &spec.positions {
            Positions::Rope(r) => Some(self.rope_tables(r, seqs, &positions)?),
            _ => None,
        };
        let local_rope = match &spec.local_rope {
            Some(r) => Some(self.rope_tables(r, seqs, &positions)?),
            None => None,
        };
        // Attention biases depend only on each sequence's lengths: build them once per step.
        let biases = seqs
            .iter()
            .map(|s| {
                let (t, past) = (s.tokens.len(), s.cache.len());
                let full = self.attn_bias(None, t, past)?;
                let windowed = match spec.sliding_window {
                    Some(w) => Some(self.attn_bias(Some(w), t, past)?),
                    None => None,
                };
                Ok((full, windowed))
            })
            .collect::<Result<Vec<_>>>()?;
        let (mut rope, mut local_rope, mut biases) = (rope, local_rope, biases);
        let paged = self.paged_step(seqs)?;
        let mut hidden = want_hidden.then(Vec::new);
        for (li, block) in w.blocks.iter().enumerate() {
            // Layers may live on different devices (--device auto): move the activations
            // and this step's tables along with them.
            let dev = block.qkv.device();
            let dev = &dev;
            if !dev.same_device(x.device()) {
                x = x.to_device(dev)?;
                let mv = |r: Option<(Tensor, Tensor)>| {
                    r.map(|(c, s)| {
                        Ok::<_, candle_core::Error>((c.to_device(dev)?, s.to_device(dev)?))
                    })
                    .transpose()
                };
                rope = mv(rope)?;
                local_rope = mv(local_rope)?;
                biases = biases
                    .into_iter()
                    .map(|(f, w)| Ok((f.to_device(dev)?, w.map(|w| w.to_device(dev)).transpose()?)))
                    .collect::<Result<Vec<_>>>()?;
            }
            if let Some(h) = hidden.as_mut() {
                h.push(x.clone());
            }
            let windowed = spec.sliding_layers.get(li).copied().unwrap_or(false);
            let r = match (&local_rope, windowed) {
                (Some(l), true) => Some(l),
                _ => rope.as_ref(),
            };
            x = self.block(li, block, &x, seqs, r, &biases, paged.as_ref())?;
        }
        let tail = w.lm_head.device();
        if !tail.same_device(x.device()) {
            x = x.to_device(&tail)?;
        }
        if let Some(norm) = &w.final_norm {
            x = norm.forward(&x)?;
        }
        if let Some(p) = &w.project_out {
            x = p.forward(&x)?;
        }
        if let Some(h) = hidden.as_mut() {
            h.push(x.clone());
        }
        // Gather the rows whose logits are wanted and run the head once.
        let mut rows = Vec::new();
        let mut offset = 0u32;
        for s in seqs.iter() {
            let t = s.tokens.len() as u32;
            match s.want {
                Want::Last => rows.push(offset + t - 1),
                Want::All => rows.extend(offset..offset + t),
                Want::Nothing => {}
            }
            offset += t;
        }
        let mut logits = Vec::with_capacity(seqs.len());
        if rows.is_empty() {
            logits.resize(seqs.len(), None);
        } else {
            let sel = if rows.len() == n {
                x.clone()
            } else {
                x.index_select(&Tensor::new(rows.as_slice(), x.device())?, 0)?
            };
            let mut all = w.lm_head.forward(&sel)?.to_dtype(DType::F32)?;
            if let Some(cap) = spec.final_softcap {
                all = ((all / cap as f64)?.tanh()? * cap as f64)?;
            }
            let mut r = 0;
            for s in seqs.iter() {
                let k = match s.want {
                    Want::Last => 1,
                    Want::All => s.tokens.len(),
                    Want::Nothing => 0,
                };
                logits.push(if k == 0 {
                    None
                } else {
                    Some(all.narrow(0, r, k)?)
                });
                r += k;
            }
        }
        Ok(StepOutput { logits, hidden })
    }

    /// cos/sin tables `[n_tokens, rotary_dim/2]` for the packed tokens.
    fn rope_tables(
        &self,
        rope: &RopeSpec,
        seqs: &[SeqStep<'_>],
        positions: &[u32],
    ) -> Result<(Tensor, Tensor)> {
        let half = rope.rotary_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        let mut i = 0;
        for s in seqs {
            let t = s.tokens.len();
            // Dynamic NTK (as transformers): frequencies follow the sequence length seen by this call.
            let seq_len = (s.cache.len() + t).max(s.rope_len);
            let dynamic = dynamic_inv_freq(rope, seq_len);
            let inv = dynamic.as_deref().unwrap_or(&rope.inv_freq);
            for &p in &positions[i..i + t] {
                for &f in inv {
                    let a = p as f32 * f;
                    cos.push(a.cos() * rope.attention_factor);
                    sin.push(a.sin() * rope.attention_factor);
                }
            }
            i += t;
        }
        let n = positions.len();
        let dtype = self.weights.embed.dtype();
        Ok((
            Tensor::from_vec(cos, (n, half), &self.device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, (n, half), &self.device)?.to_dtype(dtype)?,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        li: usize,
        b: &Block,
        x: &Tensor,
        seqs: &mut [SeqStep<'_>],
        rope: Option<&(Tensor, Tensor)>,
        biases: &[(Tensor, Option<Tensor>)],
        paged: Option<&PagedStep>,
    ) -> Result<Tensor> {
        let dense = |h: &Tensor, mlp_in: &Linear, mlp_out: &Linear| -> Result<Tensor> {
            let a = mlp_in.forward(h)?;
            let a = match self.spec.mlp {
                MlpKind::Plain => activate(self.spec.activation, &a)?,
                MlpKind::Gated => {
                    let inter = a.dim(1)? / 2;
                    let gate = activate(self.spec.activation, &a.narrow(1, 0, inter)?)?;
                    (gate * a.narrow(1, inter, inter)?)?
                }
            };
            mlp_out.forward(&a)
        };
        let mlp = |h: &Tensor| -> Result<Tensor> {
            let Some(moe) = &b.moe else {
                return dense(h, &b.mlp_in, &b.mlp_out);
            };
            let spec = self.spec.moe.as_ref().ok_or_else(|| {
                candle_core::Error::Msg("experts without a mixture-of-experts spec".into())
            })?;
            let logits: Vec<Vec<f32>> = moe.router.forward(h)?.to_dtype(DType::F32)?.to_vec2()?;
            // Tokens grouped by expert: (rows, top-k slots `row * k + slot`, weights).
            let k = spec.top_k.min(moe.experts.len());
            let mut groups: Vec<(Vec<u32>, Vec<u32>, Vec<f32>)> =
                vec![(vec![], vec![], vec![]); moe.experts.len()];
            let mut picked = Vec::new();
            for (t, l) in logits.iter().enumerate() {
                route(l, spec.top_k, spec.norm_topk, &mut picked);
                for (slot, &(e, w)) in picked.iter().enumerate() {
                    groups[e].0.push(t as u32);
                    groups[e].1.push((t * k + slot) as u32);
                    groups[e].2.push(w);
                }
            }
            // Weighted outputs per (token, slot), summed in top-k order as transformers'
            // default `grouped_mm` experts do.
            let (n, width) = h.dims2()?;
            let mut slots = Tensor::zeros((n * k, width), h.dtype(), h.device())?;
            for (e, (rows, dest, ws)) in groups.iter().enumerate() {
                if rows.is_empty() {
                    continue;
                }
                let idx = Tensor::new(rows.as_slice(), h.device())?;
                let (gu, down) = &moe.experts[e];
                let y = dense(&h.index_select(&idx, 0)?, gu, down)?;
                let w = Tensor::new(ws.as_slice(), h.device())?
                    .to_dtype(y.dtype())?
                    .unsqueeze(1)?;
                let dest = Tensor::new(dest.as_slice(), h.device())?;
                slots = slots.index_add(&dest, &y.broadcast_mul(&w)?, 0)?;
            }
            let mut out = slots.reshape((n, k, width))?.sum(1)?;
            if let Some(g) = &moe.shared_gate {
                let shared = dense(h, &b.mlp_in, &b.mlp_out)?;
                let gate = candle_nn::ops::sigmoid(&g.forward(h)?)?;
                out = (out + shared.broadcast_mul(&gate)?)?;
            }
            Ok(out)
        };
        let norm = |n: Option<&Norm>, x: &Tensor| -> Result<Tensor> {
            match n {
                Some(n) => n.forward(x),
                None => Ok(x.clone()),
            }
        };
        let (ln1, ln2) = (b.ln1.as_ref(), b.ln2.as_ref());
        match self.spec.residual {
            Residual::Sequential => {
                let a = self.attention(li, b, biases, paged, &norm(ln1, x)?, seqs, rope)?;
                let h = (x + norm(b.post_attn_norm.as_ref(), &a)?)?;
                let m = mlp(&norm(ln2, &h)?)?;
                &h + norm(b.post_mlp_norm.as_ref(), &m)?
            }
            Residual::SequentialFromNormed => {
                let n1 = norm(ln1, x)?;
                let h = (&n1 + self.attention(li, b, biases, paged, &n1, seqs, rope)?)?;
                let n2 = norm(ln2, &h)?;
                &n2 + mlp(&n2)?
            }
            Residual::Parallel => {
                let n1 = norm(ln1, x)?;
                let attn = self.attention(li, b, biases, paged, &n1, seqs, rope)?;
                let m = match ln2 {
                    Some(n) => mlp(&n.forward(x)?)?,
                    None => mlp(&n1)?,
                };
                (x + attn)? + m
            }
            Residual::PostNorm => {
                let h = norm(
                    ln1,
                    &(x + self.attention(li, b, biases, paged, x, seqs, rope)?)?,
                )?;
                norm(ln2, &(&h + mlp(&h)?)?)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        li: usize,
        b: &Block,
        biases: &[(Tensor, Option<Tensor>)],
        paged: Option<&PagedStep>,
        h: &Tensor,
        seqs: &mut [SeqStep<'_>],
        rope: Option<&(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let spec = &self.spec;
        let (nh, nkv, hd) = (spec.num_heads, spec.num_kv_heads, spec.head_dim);
        let n = h.dim(0)?;
        let mut qkv = b.qkv.forward(h)?;
        let clip = spec.clip_qkv.filter(|_| !spec.clip_after_qk_norm);
        if let Some(c) = clip {
            qkv = qkv.clamp(-c, c)?;
        }
        if b.q_norm.is_some() || b.k_norm.is_some() {
            let q = qkv.narrow(1, 0, nh * hd)?;
            let k = qkv.narrow(1, nh * hd, nkv * hd)?;
            let v = qkv.narrow(1, (nh + nkv) * hd, nkv * hd)?;
            let q = qk_norm(b.q_norm.as_ref(), &q, nh, hd, spec.qk_norm_whole)?;
            let k = qk_norm(b.k_norm.as_ref(), &k, nkv, hd, spec.qk_norm_whole)?;
            qkv = Tensor::cat(&[&q, &k, &v], 1)?;
        }
        if let (Some(c), true) = (spec.clip_qkv, spec.clip_after_qk_norm) {
            qkv = qkv.clamp(-c, c)?;
        }
        let to_heads = |t: Tensor, heads: usize| -> Result<Tensor> {
            t.reshape((n, heads, hd))?.transpose(0, 1)?.contiguous()
        };
        let mut q = to_heads(qkv.narrow(1, 0, nh * hd)?, nh)?;
        let mut k = to_heads(qkv.narrow(1, nh * hd, nkv * hd)?, nkv)?;
        let v = to_heads(qkv.narrow(1, (nh + nkv) * hd, nkv * hd)?, nkv)?;
        if let (Some((cos, sin)), Positions::Rope(r)) = (rope, &spec.positions) {
            // A local rope (Gemma-3) differs in frequencies only: same rotary dims and layout.
            q = apply_rope(&q, cos, sin, r.rotary_dim, r.interleaved)?;
            k = apply_rope(&k, cos, sin, r.rotary_dim, r.interleaved)?;
        }
        let mut scale = spec.attn_scale;
        if spec.scale_by_inverse_layer {
            scale /= (li + 1) as f64;
        }
        let group = nh / nkv;
        let mut outs = Vec::with_capacity(seqs.len());
        let mut start = 0;
        let windowed = spec.sliding_layers.get(li).copied().unwrap_or(false);
        let paged_out = self.paged_attention(li, paged, &q, &k, &v, scale, windowed)?;
        let mut di = 0;
        for (si, (s, (full, win))) in seqs.iter_mut().zip(biases).enumerate() {
            let t = s.tokens.len();
            let past = s.cache.len_at(li);
            let (kk, vv) = s
                .cache
                .append(li, &k.narrow(1, start, t)?, &v.narrow(1, start, t)?)?;
            let paged_row = match (&paged_out, paged) {
                (Some(o), Some(ps)) if ps.decode[si] => {
                    di += 1;
                    // [1, nh, hd] -> [nh, 1, hd]
                    Some(o.narrow(0, di - 1, 1)?.transpose(0, 1)?)
                }
                _ => None,
            };
            if let Some(r) = &paged_row {
                if !gpu_paged::check_requested() {
                    outs.push(r.clone());
                    start += t;
                    continue;
                }
            }
            let total = past + t;
            let qs = q.narrow(1, start, t)?.reshape((nkv, group * t, hd))?;
            // Scores, mask and softmax in f32 whatever the compute dtype (bf16 on GPUs).
            let mut scores =
                (qs.matmul(&kk.t()?)?.to_dtype(DType::F32)? * scale)?.reshape((nh, t, total))?;
            if let Some(cap) = spec.attn_softcap {
                scores = ((scores / cap as f64)?.tanh()? * cap as f64)?;
            }
            let bias = if windowed {
                win.as_ref().unwrap_or(full)
            } else {
                full
            };
            let scores = scores.broadcast_add(bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?
                .to_dtype(vv.dtype())?
                .reshape((nkv, group * t, total))?;
            let dense = probs.matmul(&vv)?.reshape((nh, t, hd))?;
            outs.push(match paged_row {
                Some(r) => {
                    paged_check(li, &r, &dense)?;
                    r
                }
                None => dense,
            });
            start += t;
        }
        let o = if outs.len() == 1 {
            outs.pop().unwrap_or_else(|| unreachable!())
        } else {
            Tensor::cat(&outs, 1)?
        };
        let o = o.transpose(0, 1)?.reshape((n, nh * hd))?;
        b.out.forward(&o)
    }

    /// With the GPU paged pool: writes this layer's new keys and values (`[kv_heads, n, hd]`)
    /// into it and, for the step's decode sequences, runs their attention through the paged
    /// kernel. Returns `[n_decode, heads, hd]`, or `None` where the kernel does not apply
    /// (ALiBi, sliding-window layers, a dtype other than the pool's, no decode sequence).
    #[allow(clippy::too_many_arguments)]
    fn paged_attention(
        &self,
        li: usize,
        paged: Option<&PagedStep>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        windowed: bool,
    ) -> Result<Option<Tensor>> {
        let (Some(ps), Some(pool)) = (paged, &self.paged) else {
            return Ok(None);
        };
        if k.dtype() != pool.dtype || q.dtype() != pool.dtype {
            return Ok(None);
        }
        let (kc, vc) = pool.layer(li);
        let kt = k.transpose(0, 1)?.contiguous()?;
        let vt = v.transpose(0, 1)?.contiguous()?;
        // SAFETY: `paged_step` built the slots from blocks this pool handed out (ids below its
        // block count), or -1 for sequences outside the pool.
        unsafe { paged_attn::reshape_and_cache(&kt, &vt, kc, vc, &ps.slots) }.map_err(paged_err)?;
        let spec = &self.spec;
        let applies = self.alibi.is_none()
            && !(windowed && spec.sliding_window.is_some())
            && spec.attn_softcap != Some(1.0);
        let Some(d) = ps.dec.as_ref().filter(|_| applies) else {
            return Ok(None);
        };
        let qd = q.index_select(&d.rows, 1)?.transpose(0, 1)?.contiguous()?;
        // SAFETY: `paged_step` built each table row from the sequence's blocks in this pool,
        // reserved for all `context_len` positions, and `max_context_len` is the maximum of
        // the context lengths.
        unsafe {
            paged_attn::paged_attention(
                &qd,
                kc,
                vc,
                &d.block_tables,
                &d.context_lens,
                d.max_context_len,
                scale as f32,
                spec.attn_softcap,
            )
        }
        .map(Some)
        .map_err(paged_err)
    }

    /// Additive bias `[heads|1, t, total]`: causal mask (+ sliding window) and ALiBi.
    fn attn_bias(&self, window: Option<usize>, t: usize, past: usize) -> Result<Tensor> {
        let total = past + t;
        let mut mask = vec![0f32; t * total];
        for i in 0..t {
            let qpos = past + i;
            for j in 0..total {
                let visible = j <= qpos && window.is_none_or(|w| qpos - j < w);
                if !visible {
                    mask[i * total + j] = f32::NEG_INFINITY;
                }
            }
        }
        let mask = Tensor::from_vec(mask, (1, t, total), &self.device)?;
        match &self.alibi {
            None => Ok(mask),
            Some(slopes) => {
                let nh = slopes.len();
                let mut a = Vec::with_capacity(nh * total);
                for &s in slopes {
                    match self.alibi_bf16 {
                        None => a.extend((0..total).map(|j| s * j as f32)),
                        Some(f) => a.extend(
                            (0..total)
                                .map(|j| crate::kernels::attention::alibi_bf16_bias(s, j) * f),
                        ),
                    }
                }
                Tensor::from_vec(a, (nh, 1, total), &self.device)?.broadcast_add(&mask)
            }
        }
    }
}

/// Rotate the first `rot` dims of `x` `[heads, n, hd]`; cos/sin are `[n, rot/2]`.
fn apply_rope(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    rot: usize,
    interleaved: bool,
) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let xr = if rot == hd {
        x.clone()
    } else {
        x.narrow(D::Minus1, 0, rot)?.contiguous()?
    };
    let xr4 = xr.unsqueeze(0)?;
    let rotated = if interleaved {
        candle_nn::rotary_emb::rope_i(&xr4, cos, sin)?
    } else {
        candle_nn::rotary_emb::rope(&xr4, cos, sin)?
    }
    .squeeze(0)?;
    if rot == hd {
        Ok(rotated)
    } else {
        Tensor::cat(&[&rotated, &x.narrow(D::Minus1, rot, hd - rot)?], D::Minus1)?.contiguous()
    }
}

/// Norm of q or k rows `[n, heads*hd]`: over the whole row, or per head (weight `[hd]` shared
/// by all heads, or `[heads*hd]` with one norm per head).
fn qk_norm(n: Option<&Norm>, x: &Tensor, heads: usize, hd: usize, whole: bool) -> Result<Tensor> {
    let Some(n) = n else {
        return Ok(x.clone());
    };
    let x = &x.contiguous()?;
    if whole {
        return n.forward(x);
    }
    let rows = x.dim(0)?;
    if n.weight.dim(0)? == hd {
        return n
            .forward(&x.reshape((rows * heads, hd))?)?
            .reshape((rows, heads * hd));
    }
    let parts = (0..heads)
        .map(|h| {
            let one = Norm {
                kind: n.kind,
                weight: n.weight.narrow(0, h * hd, hd)?,
                bias: n
                    .bias
                    .as_ref()
                    .map(|b| b.narrow(0, h * hd, hd))
                    .transpose()?,
                eps: n.eps,
            };
            one.forward(&x.narrow(1, h * hd, hd)?.contiguous()?)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 1)
}

pub use crate::config::bloom_alibi_slopes as alibi_slopes;
