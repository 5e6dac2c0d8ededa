//! The CPU step executor: one packed step of every sequence through all layers, over
//! workspaces allocated once and reused, with keys and values in the paged pool.
//!
//! Per layer: norm → fused QKV product → rotary in place on the QKV rows → K/V rows into the
//! pool → one attention call for all sequences (prefill chunks and decode tokens together,
//! reading K/V through the block tables) → output product → residual in place → norm → MLP
//! (bias + activation + gate in one pass) → residual. Logits only for the rows that sample.
//! Same numbers as the tensor path (`decoder.rs`), which remains for GPUs and half precision.
use super::decoder::{Decoder, Want};
use super::layers::{Linear, Norm, Weight};
use crate::config::{dynamic_inv_freq, MlpKind, Positions, Residual};
use crate::kernels::attention::{paged_attention, AttnParams, AttnSeq};
use crate::kernels::ops;
use crate::kv::{KvPool, BLOCK_SIZE};
use candle_core::{CpuStorage, DType, Result, Storage, Tensor};

/// One sequence of a paged step.
#[derive(Debug, Clone, Copy)]
pub struct PagedSeq<'a> {
    /// Tokens fed this step (positions `past..past + tokens.len()`).
    pub tokens: &'a [u32],
    /// Positions already holding keys and values.
    pub past: usize,
    /// Block table covering at least `past + tokens.len()` positions.
    pub blocks: &'a [u32],
    pub want: Want,
}

/// Step buffers, grown to the largest step seen and then reused.
#[derive(Default)]
pub struct Workspace {
    x: Vec<f32>,
    h: Vec<f32>,
    qkv: Vec<f32>,
    att: Vec<f32>,
    tmp: Vec<f32>,
    tmp2: Vec<f32>,
    mlp: Vec<f32>,
    act: Vec<f32>,
    sel: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    attn: Vec<AttnSeq<'static>>,
    /// Logits of the wanted rows, `[rows, vocab_padded]`.
    logits: Vec<f32>,
    /// Per sequence of the last step: first logits row and row count.
    rows: Vec<(usize, usize)>,
    vocab: usize,
    /// Hidden states of the last step when asked for: `0..=layers`, each `[n_tokens, width]`.
    pub hidden: Vec<Vec<f32>>,
}

impl Workspace {
    /// Logits `[rows, vocab]` of sequence `i` of the last step (empty when not wanted).
    pub fn logits(&self, i: usize) -> &[f32] {
        let (r, k) = self.rows[i];
        &self.logits[r * self.vocab..(r + k) * self.vocab]
    }

    /// Width of a logits row.
    pub fn vocab(&self) -> usize {
        self.vocab
    }
}

/// Resize without shrinking; contents are overwritten by the caller.
fn fit(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// The f32 data of a contiguous CPU tensor, borrowed while the guard lives.
struct F32<G>(G, (usize, usize));

fn f32_of(t: &Tensor) -> Result<F32<impl std::ops::Deref<Target = Storage> + '_>> {
    let (storage, layout) = t.storage_and_layout();
    let range = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("CPU step needs contiguous weights".into()))?;
    if !matches!(&*storage, Storage::Cpu(CpuStorage::F32(_))) {
        candle_core::bail!("CPU step needs f32 CPU weights");
    }
    Ok(F32(storage, range))
}

impl<G: std::ops::Deref<Target = Storage>> F32<G> {
    fn s(&self) -> &[f32] {
        match &*self.0 {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.1 .0..self.1 .1],
            _ => &[],
        }
    }
}

/// `out[m, n] = x[m, k] · Wᵀ + b`, into the caller's buffer (no allocation).
fn linear(l: &Linear, x: &[f32], m: usize, out: &mut [f32]) -> Result<()> {
    let n = l.out_dim();
    let k = x.len() / m.max(1);
    let out = &mut out[..m * n];
    let bias = l.bias.as_ref().map(f32_of).transpose()?;
    let bias = bias.as_ref().map(|b| b.s());
    match &l.weight {
        Weight::Quant(q) => q.matmul_into(x, m, bias, out),
        Weight::Dense(w) => {
            let w = f32_of(w)?;
            super::kernels::matmul_wt_into(x, m, k, w.s(), n, bias, out);
        }
    }
    Ok(())
}

fn norm(nm: &Norm, x: &[f32], out: &mut [f32]) -> Result<()> {
    let w = f32_of(&nm.weight)?;
    let width = w.s().len();
    match &nm.bias {
        Some(b) => {
            let b = f32_of(b)?;
            ops::norm_rows(nm.kind, x, out, width, w.s(), Some(b.s()), nm.eps)
        }
        None => ops::norm_rows(nm.kind, x, out, width, w.s(), None, nm.eps),
    }
    Ok(())
}

/// Reuse a vector's allocation for another lifetime; it is emptied first.
fn recycle<'a, 'b>(mut v: Vec<AttnSeq<'a>>) -> Vec<AttnSeq<'b>> {
    v.clear();
    // SAFETY: the vector is empty, and `AttnSeq<'a>` and `AttnSeq<'b>` differ only in a
    // lifetime, so layout and allocation are identical.
    unsafe { std::mem::transmute::<Vec<AttnSeq<'a>>, Vec<AttnSeq<'b>>>(v) }
}

impl Decoder {
    /// Whether the CPU step executor can run this model: every weight an f32 (or quantized)
    /// CPU tensor.
    pub fn cpu_step_supported(&self) -> bool {
        let w = &self.weights;
        let t_ok = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        let l_ok = |l: &Linear| {
            (match &l.weight {
                Weight::Dense(t) => t_ok(t),
                Weight::Quant(_) => true,
            }) && l.bias.as_ref().is_none_or(t_ok)
        };
        let n_ok = |n: &Norm| t_ok(&n.weight) && n.bias.as_ref().is_none_or(t_ok);
        t_ok(&w.embed)
            && w.pos_embed.as_ref().is_none_or(t_ok)
            && w.embed_norm.as_ref().is_none_or(n_ok)
            && w.project_in.as_ref().is_none_or(l_ok)
            && w.final_norm.as_ref().is_none_or(n_ok)
            && w.project_out.as_ref().is_none_or(l_ok)
            && l_ok(&w.lm_head)
            && w.blocks.iter().all(|b| {
                n_ok(&b.ln1)
                    && b.ln2.as_ref().is_none_or(n_ok)
                    && [&b.qkv, &b.out, &b.mlp_in, &b.mlp_out]
                        .into_iter()
                        .all(l_ok)
            })
    }

    /// A KV pool for this model with `num_blocks` blocks.
    pub fn new_pool(&self, num_blocks: usize) -> KvPool {
        let s = &self.spec;
        KvPool::new(s.num_layers, num_blocks, s.num_kv_heads, s.head_dim)
    }

    /// Bytes of KV pool per block.
    pub fn kv_block_bytes(&self) -> usize {
        let s = &self.spec;
        KvPool::block_bytes(s.num_layers, s.num_kv_heads, s.head_dim)
    }

    /// Run one packed step on the CPU: every sequence's tokens are processed, their keys and
    /// values written into `pool` through its block table; logits of the wanted rows (and, with
    /// `want_hidden`, hidden states) are left in `ws`.
    pub fn cpu_step(
        &self,
        ws: &mut Workspace,
        pool: &mut KvPool,
        seqs: &[PagedSeq<'_>],
        want_hidden: bool,
    ) -> Result<()> {
        let spec = &self.spec;
        let w = &self.weights;
        let n: usize = seqs.iter().map(|s| s.tokens.len()).sum();
        if n == 0 {
            candle_core::bail!("empty step");
        }
        let (nh, nkv, hd) = (spec.num_heads, spec.num_kv_heads, spec.head_dim);
        let hidden = spec.hidden_size;
        let qkv_w = (nh + 2 * nkv) * hd;
        for s in seqs {
            if s.blocks.len() * BLOCK_SIZE < s.past + s.tokens.len() {
                candle_core::bail!("block table too short for the step");
            }
        }

        // Embeddings (+ project_in, learned positions, embedding norm) into x.
        let emb = f32_of(&w.embed)?;
        let e = emb.s().len() / w.embed.dim(0)?;
        {
            let buf = fit(
                if w.project_in.is_some() {
                    &mut ws.tmp
                } else {
                    &mut ws.x
                },
                n * e,
            );
            for (row, &t) in buf.chunks_mut(e).zip(seqs.iter().flat_map(|s| s.tokens)) {
                let t = t as usize;
                let src = emb.s().get(t * e..(t + 1) * e).ok_or_else(|| {
                    candle_core::Error::Msg(format!("token id {t} outside the vocabulary"))
                })?;
                row.copy_from_slice(src);
            }
        }
        drop(emb);
        if let Some(p) = &w.project_in {
            let x = fit(&mut ws.x, n * hidden);
            linear(p, &ws.tmp[..n * e], n, x)?;
        }
        if let (Some(table), Positions::Learned { offset, .. }) = (&w.pos_embed, &spec.positions) {
            let t = f32_of(table)?;
            let mut rows = ws.x[..n * hidden].chunks_mut(hidden);
            for s in seqs {
                for p in s.past..s.past + s.tokens.len() {
                    let at = (p + offset) * hidden;
                    let src = t.s().get(at..at + hidden).ok_or_else(|| {
                        candle_core::Error::Msg(format!("position {p} beyond the position table"))
                    })?;
                    if let Some(r) = rows.next() {
                        ops::add_assign(r, src);
                    }
                }
            }
        }
        if let Some(nm) = &w.embed_norm {
            let h = fit(&mut ws.h, n * hidden);
            norm(nm, &ws.x[..n * hidden], h)?;
            ws.x[..n * hidden].copy_from_slice(h);
        }

        // Rotary tables for the packed tokens: [n, rot/2].
        let rope = match &spec.positions {
            Positions::Rope(r) => Some(r),
            _ => None,
        };
        if let Some(r) = rope {
            let half = r.rotary_dim / 2;
            let (cos, sin) = (fit(&mut ws.cos, n * half), fit(&mut ws.sin, n * half));
            let mut i = 0;
            for s in seqs {
                let t = s.tokens.len();
                let dynamic = dynamic_inv_freq(r, s.past + t);
                let inv = dynamic.as_deref().unwrap_or(&r.inv_freq);
                for p in s.past..s.past + t {
                    for (j, &f) in inv.iter().enumerate() {
                        let a = p as f32 * f;
                        cos[i * half + j] = a.cos() * r.attention_factor;
                        sin[i * half + j] = a.sin() * r.attention_factor;
                    }
                    i += 1;
                }
            }
        }

        let mut attn = recycle(std::mem::take(&mut ws.attn));
        let mut q0 = 0;
        for s in seqs {
            attn.push(AttnSeq {
                q_start: q0,
                q_len: s.tokens.len(),
                past: s.past,
                blocks: s.blocks,
            });
            q0 += s.tokens.len();
        }
        ws.hidden.clear();
        let inter_w = w.blocks.first().map_or(0, |b| b.mlp_in.out_dim());
        for (li, b) in w.blocks.iter().enumerate() {
            if want_hidden {
                ws.hidden.push(ws.x[..n * hidden].to_vec());
            }
            let x = fit(&mut ws.x, n * hidden);
            let h = fit(&mut ws.h, n * hidden);
            let qkv = fit(&mut ws.qkv, n * qkv_w);
            let att = fit(&mut ws.att, n * nh * hd);
            let tmp = fit(&mut ws.tmp, n * hidden);
            let tmp2 = fit(&mut ws.tmp2, n * hidden);
            let mlp = fit(&mut ws.mlp, n * inter_w);
            let act = fit(&mut ws.act, n * spec.intermediate_size);

            // Attention of `input` (normed rows) into `tmp`.
            let mut attention = |input: &[f32], tmp: &mut [f32]| -> Result<()> {
                linear(&b.qkv, input, n, qkv)?;
                if let Some(r) = rope {
                    let half = r.rotary_dim / 2;
                    for (t, row) in qkv.chunks_mut(qkv_w).enumerate() {
                        let (c, s) = (&ws.cos[t * half..][..half], &ws.sin[t * half..][..half]);
                        let (q, k) = row.split_at_mut(nh * hd);
                        ops::rope_row(q, nh, hd, r.rotary_dim, c, s, r.interleaved);
                        ops::rope_row(k, nkv, hd, r.rotary_dim, c, s, r.interleaved);
                    }
                }
                let mut t = 0;
                for s in seqs {
                    for p in s.past..s.past + s.tokens.len() {
                        let row = &qkv[t * qkv_w..(t + 1) * qkv_w];
                        let (k, v) = row[nh * hd..].split_at(nkv * hd);
                        pool.write(li, s.blocks[p / BLOCK_SIZE], p % BLOCK_SIZE, k, v);
                        t += 1;
                    }
                }
                let mut scale = spec.attn_scale;
                if spec.scale_by_inverse_layer {
                    scale /= (li + 1) as f64;
                }
                let windowed = spec.sliding_layers.get(li).copied().unwrap_or(false);
                let params = AttnParams {
                    num_heads: nh,
                    num_kv_heads: nkv,
                    head_dim: hd,
                    block_size: BLOCK_SIZE,
                    scale: scale as f32,
                    window: if windowed { spec.sliding_window } else { None },
                    alibi: self.alibi_slopes(),
                };
                let (kc, vc) = pool.layer(li);
                paged_attention(&params, &attn, qkv, qkv_w, kc, vc, att, nh * hd);
                linear(&b.out, att, n, tmp)
            };
            let mut mlp_fn = |input: &[f32], out: &mut [f32]| -> Result<()> {
                linear(&b.mlp_in, input, n, mlp)?;
                let inner: &[f32] = match spec.mlp {
                    MlpKind::Plain => {
                        ops::activate(spec.activation, mlp);
                        mlp
                    }
                    MlpKind::Gated => {
                        ops::gate(spec.activation, mlp, act, inter_w / 2);
                        act
                    }
                };
                linear(&b.mlp_out, inner, n, out)
            };
            let ln2 = b.ln2.as_ref().unwrap_or(&b.ln1);
            match spec.residual {
                Residual::Sequential => {
                    norm(&b.ln1, x, h)?;
                    attention(h, tmp)?;
                    ops::add_assign(x, tmp);
                    norm(ln2, x, h)?;
                    mlp_fn(h, tmp)?;
                    ops::add_assign(x, tmp);
                }
                Residual::SequentialFromNormed => {
                    norm(&b.ln1, x, h)?;
                    attention(h, tmp)?;
                    x.copy_from_slice(h);
                    ops::add_assign(x, tmp);
                    norm(ln2, x, h)?;
                    mlp_fn(h, tmp)?;
                    x.copy_from_slice(h);
                    ops::add_assign(x, tmp);
                }
                Residual::Parallel => {
                    norm(&b.ln1, x, h)?;
                    attention(h, tmp)?;
                    if b.ln2.is_some() {
                        norm(ln2, x, h)?;
                    }
                    mlp_fn(h, tmp2)?;
                    ops::add_assign(x, tmp);
                    ops::add_assign(x, tmp2);
                }
                Residual::PostNorm => {
                    attention(x, tmp)?;
                    ops::add_assign(tmp, x);
                    norm(&b.ln1, tmp, x)?;
                    mlp_fn(x, tmp)?;
                    ops::add_assign(tmp, x);
                    norm(ln2, tmp, x)?;
                }
            }
        }
        ws.attn = recycle(attn);

        // Final norm and projection: x → the width the head reads.
        let mut width = hidden;
        if let Some(nm) = &w.final_norm {
            let h = fit(&mut ws.h, n * hidden);
            norm(nm, &ws.x[..n * hidden], h)?;
            ws.x[..n * hidden].copy_from_slice(h);
        }
        if let Some(p) = &w.project_out {
            width = p.out_dim();
            let t = fit(&mut ws.tmp, n * width);
            linear(p, &ws.x[..n * hidden], n, t)?;
            fit(&mut ws.x, n * width).copy_from_slice(t);
        }
        if want_hidden {
            ws.hidden.push(ws.x[..n * width].to_vec());
        }

        // Rows that need logits, gathered, then one head product.
        ws.rows.clear();
        let mut r = 0;
        let mut t0 = 0;
        let mut total = 0;
        for s in seqs {
            let k = match s.want {
                Want::Last => 1,
                Want::All => s.tokens.len(),
                Want::Nothing => 0,
            };
            ws.rows.push((total, k));
            total += k;
        }
        let vocab = w.lm_head.out_dim();
        ws.vocab = vocab;
        if total > 0 {
            let sel = fit(&mut ws.sel, total * width);
            for s in seqs {
                let t = s.tokens.len();
                let from = match s.want {
                    Want::Last => t0 + t - 1,
                    Want::All => t0,
                    Want::Nothing => t0 + t,
                };
                let k = t0 + t - from;
                sel[r * width..(r + k) * width]
                    .copy_from_slice(&ws.x[from * width..(from + k) * width]);
                r += k;
                t0 += t;
            }
            let logits = fit(&mut ws.logits, total * vocab);
            linear(&w.lm_head, sel, total, logits)?;
        }
        Ok(())
    }
}
