//! The one generic decoder-only transformer. Every family is a [`ModelSpec`] plus weights
//! mapped to the canonical layout below; there is no per-family forward code.
//!
//! Batches are *packed*: the tokens of all sequences in a step are concatenated into one
//! `[n_tokens, hidden]` matrix for every projection, and attention runs per sequence against
//! that sequence's own KV cache. Sequences of different lengths (prefill chunks and single
//! decode tokens alike) share a step without padding, so no prompt's numbers depend on its
//! neighbours.
use super::layers::{activate, Linear, Norm, Weight};
use super::quant::QuantKind;
use crate::config::{dynamic_inv_freq, MlpKind, ModelSpec, Positions, Residual};
use crate::kv::SeqCache;
use candle_core::{DType, Device, Result, Tensor, D};

/// One transformer block in canonical form.
#[derive(Debug, Clone)]
pub struct Block {
    pub ln1: Norm,
    /// `None` when attention and MLP share `ln1` (parallel blocks with one norm).
    pub ln2: Option<Norm>,
    /// Fused projection with output rows `[q (heads*hd); k (kv_heads*hd); v (kv_heads*hd)]`.
    pub qkv: Linear,
    pub out: Linear,
    /// `Plain`: `[inter, hidden]`; `Gated`: `[gate; up]` = `[2*inter, hidden]`.
    pub mlp_in: Linear,
    pub mlp_out: Linear,
}

/// All weights of a model in canonical form.
#[derive(Debug, Clone)]
pub struct Weights {
    /// `[vocab, embed_dim]`
    pub embed: Tensor,
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
            linears.extend([&mut b.qkv, &mut b.out, &mut b.mlp_in, &mut b.mlp_out]);
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
}

impl Decoder {
    pub fn new(spec: ModelSpec, weights: Weights, device: Device) -> Self {
        let alibi =
            matches!(spec.positions, Positions::Alibi).then(|| alibi_slopes(spec.num_heads));
        Self {
            spec,
            weights,
            device,
            alibi,
        }
    }

    /// ALiBi slope per head, for models with ALiBi positions.
    pub fn alibi_slopes(&self) -> Option<&[f32]> {
        self.alibi.as_deref()
    }

    pub fn new_cache(&self, capacity: usize) -> SeqCache {
        SeqCache::new(self.spec.num_layers, capacity)
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
        let mut x = w.embed.index_select(&ids_t, 0)?;
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
        let rope = self.rope_tables(seqs, &positions)?;
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
        let (mut rope, mut biases) = (rope, biases);
        let mut hidden = want_hidden.then(Vec::new);
        for (li, block) in w.blocks.iter().enumerate() {
            // Layers may live on different devices (--device auto): move the activations
            // and this step's tables along with them.
            let dev = block.ln1.weight.device();
            if !dev.same_device(x.device()) {
                x = x.to_device(dev)?;
                rope = rope
                    .map(|(c, s)| {
                        Ok::<_, candle_core::Error>((c.to_device(dev)?, s.to_device(dev)?))
                    })
                    .transpose()?;
                biases = biases
                    .into_iter()
                    .map(|(f, w)| Ok((f.to_device(dev)?, w.map(|w| w.to_device(dev)).transpose()?)))
                    .collect::<Result<Vec<_>>>()?;
            }
            if let Some(h) = hidden.as_mut() {
                h.push(x.clone());
            }
            x = self.block(li, block, &x, seqs, rope.as_ref(), &biases)?;
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
            let all = w.lm_head.forward(&sel)?.to_dtype(DType::F32)?;
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
        seqs: &[SeqStep<'_>],
        positions: &[u32],
    ) -> Result<Option<(Tensor, Tensor)>> {
        let Positions::Rope(rope) = &self.spec.positions else {
            return Ok(None);
        };
        let half = rope.rotary_dim / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        let mut i = 0;
        for s in seqs {
            let t = s.tokens.len();
            // Dynamic NTK (as transformers): frequencies follow the sequence length seen by this call.
            let seq_len = s.cache.len() + t;
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
        Ok(Some((
            Tensor::from_vec(cos, (n, half), &self.device)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, (n, half), &self.device)?.to_dtype(dtype)?,
        )))
    }

    fn block(
        &self,
        li: usize,
        b: &Block,
        x: &Tensor,
        seqs: &mut [SeqStep<'_>],
        rope: Option<&(Tensor, Tensor)>,
        biases: &[(Tensor, Option<Tensor>)],
    ) -> Result<Tensor> {
        let mlp = |h: &Tensor| -> Result<Tensor> {
            let a = b.mlp_in.forward(h)?;
            let a = match self.spec.mlp {
                MlpKind::Plain => activate(self.spec.activation, &a)?,
                MlpKind::Gated => {
                    let inter = a.dim(1)? / 2;
                    let gate = activate(self.spec.activation, &a.narrow(1, 0, inter)?)?;
                    (gate * a.narrow(1, inter, inter)?)?
                }
            };
            b.mlp_out.forward(&a)
        };
        let ln2 = b.ln2.as_ref().unwrap_or(&b.ln1);
        match self.spec.residual {
            Residual::Sequential => {
                let h = (x + self.attention(li, b, biases, &b.ln1.forward(x)?, seqs, rope)?)?;
                &h + mlp(&ln2.forward(&h)?)?
            }
            Residual::SequentialFromNormed => {
                let n1 = b.ln1.forward(x)?;
                let h = (&n1 + self.attention(li, b, biases, &n1, seqs, rope)?)?;
                let n2 = ln2.forward(&h)?;
                &n2 + mlp(&n2)?
            }
            Residual::Parallel => {
                let attn = self.attention(li, b, biases, &b.ln1.forward(x)?, seqs, rope)?;
                let m = mlp(&ln2.forward(x)?)?;
                (x + attn)? + m
            }
            Residual::PostNorm => {
                let h = b
                    .ln1
                    .forward(&(x + self.attention(li, b, biases, x, seqs, rope)?)?)?;
                ln2.forward(&(&h + mlp(&h)?)?)
            }
        }
    }

    fn attention(
        &self,
        li: usize,
        b: &Block,
        biases: &[(Tensor, Option<Tensor>)],
        h: &Tensor,
        seqs: &mut [SeqStep<'_>],
        rope: Option<&(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let spec = &self.spec;
        let (nh, nkv, hd) = (spec.num_heads, spec.num_kv_heads, spec.head_dim);
        let n = h.dim(0)?;
        let qkv = b.qkv.forward(h)?;
        let to_heads = |t: Tensor, heads: usize| -> Result<Tensor> {
            t.reshape((n, heads, hd))?.transpose(0, 1)?.contiguous()
        };
        let mut q = to_heads(qkv.narrow(1, 0, nh * hd)?, nh)?;
        let mut k = to_heads(qkv.narrow(1, nh * hd, nkv * hd)?, nkv)?;
        let v = to_heads(qkv.narrow(1, (nh + nkv) * hd, nkv * hd)?, nkv)?;
        if let (Some((cos, sin)), Positions::Rope(r)) = (rope, &spec.positions) {
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
        for (s, (full, win)) in seqs.iter_mut().zip(biases) {
            let t = s.tokens.len();
            let past = s.cache.len_at(li);
            let (kk, vv) = s
                .cache
                .append(li, &k.narrow(1, start, t)?, &v.narrow(1, start, t)?)?;
            let total = past + t;
            let qs = q.narrow(1, start, t)?.reshape((nkv, group * t, hd))?;
            // Scores, mask and softmax in f32 whatever the compute dtype (bf16 on GPUs).
            let scores =
                (qs.matmul(&kk.t()?)?.to_dtype(DType::F32)? * scale)?.reshape((nh, t, total))?;
            let bias = if windowed {
                win.as_ref().unwrap_or(full)
            } else {
                full
            };
            let scores = scores.broadcast_add(bias)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?
                .to_dtype(vv.dtype())?
                .reshape((nkv, group * t, total))?;
            outs.push(probs.matmul(&vv)?.reshape((nh, t, hd))?);
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
                for s in slopes {
                    a.extend((0..total).map(|j| s * j as f32));
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

/// BLOOM's ALiBi slopes for any head count (computed in f32 as transformers does).
pub fn alibi_slopes(n: usize) -> Vec<f32> {
    let cp = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let base = 2f64.powf(-(2f64.powf(-((cp as f64).log2() - 3.0)))) as f32;
    let mut slopes: Vec<f32> = (1..=cp).map(|i| base.powi(i as i32)).collect();
    if cp != n {
        let extra = 2f64.powf(-(2f64.powf(-(((2 * cp) as f64).log2() - 3.0)))) as f32;
        let rem = (n - cp).min(cp);
        slopes.extend((0..rem).map(|i| extra.powi((1 + 2 * i) as i32)));
    }
    slopes
}
