//! The CPU step executor: one packed step of every sequence through all layers, over
//! workspaces allocated once and reused, with keys and values in the paged pool.
//!
//! Per layer: norm → fused QKV product → rotary in place on the QKV rows → K/V rows into the
//! pool → one attention call for all sequences (prefill chunks and decode tokens together,
//! reading K/V through the block tables) → output product → residual in place → norm → MLP
//! (bias + activation + gate in one pass) → residual. Logits only for the rows that sample.
//! Same numbers as the tensor path (`decoder.rs`), which remains for GPUs and half precision.
use super::decoder::{route, Decoder, Moe, Want};
use super::layers::{embedding_row, Embedding, Linear, Norm, Weight};
use crate::config::{dynamic_inv_freq, MlpKind, ModelSpec, Positions, Residual, RopeSpec};
use crate::kernels::attention::{paged_attention, AttnParams, AttnSeq};
use crate::kernels::ops;
use crate::kernels::wide::WSlice;
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
    /// The sequence length rotary frequencies are chosen for, when longer than
    /// `past + tokens.len()` (see `RunSeq::rope_len`).
    pub rope_len: usize,
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
    /// Rotary tables of the sliding-window layers when they have their own (Gemma-3).
    cos_local: Vec<f32>,
    sin_local: Vec<f32>,
    attn: Vec<AttnSeq<'static>>,
    /// Logits of the wanted rows, `[rows, vocab_padded]`.
    logits: Vec<f32>,
    /// Per sequence of the last step: first logits row and row count.
    rows: Vec<(usize, usize)>,
    vocab: usize,
    /// Hidden states of the last step when asked for: `0..=layers`, each `[n_tokens, width]`.
    pub hidden: Vec<Vec<f32>>,
    moe: MoeBufs,
}

/// Buffers of the expert MLPs: router logits, per-expert token lists, gathered rows.
#[derive(Default)]
struct MoeBufs {
    logits: Vec<f32>,
    picked: Vec<(usize, f32)>,
    /// Per expert: (token row, top-k slot, weight).
    groups: Vec<Vec<(usize, usize, f32)>>,
    /// Weighted expert outputs `[rows, top_k, width]`, summed over the slots in top-k order.
    slots: Vec<f32>,
    x: Vec<f32>,
    mlp: Vec<f32>,
    act: Vec<f32>,
    y: Vec<f32>,
    gate: Vec<f32>,
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
            crate::kernels::matmul::matmul_wt_into(x, m, k, w.s(), n, bias, out);
        }
        Weight::Mapped(w) => {
            w.with_parts(|p| crate::kernels::matmul::matmul_parts_into(x, m, k, p, bias, out))
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

/// q/k norm in place on the q (or k) part of every QKV row: over the whole part, or per head
/// (weight of one head shared by all, or one weight per head).
fn qk_norm(
    nm: &Norm,
    rows: &mut [f32],
    stride: usize,
    off: usize,
    heads: usize,
    hd: usize,
    whole: bool,
) -> Result<()> {
    let w = f32_of(&nm.weight)?;
    let b = nm.bias.as_ref().map(f32_of).transpose()?;
    let (w, b) = (w.s(), b.as_ref().map(|b| b.s()));
    for row in rows.chunks_mut(stride) {
        let part = &mut row[off..off + heads * hd];
        if whole {
            ops::norm_in_place(nm.kind, part, w, b, nm.eps);
            continue;
        }
        for (h, x) in part.chunks_mut(hd).enumerate() {
            let at = (h * hd) % w.len();
            ops::norm_in_place(
                nm.kind,
                x,
                &w[at..at + hd],
                b.map(|b| &b[at..at + hd]),
                nm.eps,
            );
        }
    }
    Ok(())
}

/// cos/sin `[n, rot/2]` of the packed tokens of `seqs` for `r`.
fn rope_tables(
    r: &RopeSpec,
    seqs: &[PagedSeq<'_>],
    n: usize,
    cos: &mut Vec<f32>,
    sin: &mut Vec<f32>,
) {
    let half = r.rotary_dim / 2;
    let (cos, sin) = (fit(cos, n * half), fit(sin, n * half));
    let mut i = 0;
    for s in seqs {
        let t = s.tokens.len();
        let dynamic = dynamic_inv_freq(r, (s.past + t).max(s.rope_len));
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

/// `out = mlp_out(act(mlp_in(x)))` (gated or plain) over `n` rows.
#[allow(clippy::too_many_arguments)]
fn dense_mlp(
    spec: &ModelSpec,
    mlp_in: &Linear,
    mlp_out: &Linear,
    x: &[f32],
    n: usize,
    mlp: &mut Vec<f32>,
    act: &mut Vec<f32>,
    out: &mut [f32],
) -> Result<()> {
    let w = mlp_in.out_dim();
    let mlp = fit(mlp, n * w);
    linear(mlp_in, x, n, mlp)?;
    let inner: &[f32] = match spec.mlp {
        MlpKind::Plain => {
            ops::activate(spec.activation, mlp);
            mlp
        }
        MlpKind::Gated => {
            let act = fit(act, n * w / 2);
            ops::gate(spec.activation, mlp, act, w / 2);
            act
        }
    };
    linear(mlp_out, inner, n, out)
}

/// The experts of a block over `n` rows of `x` into `out`: each token's top-k experts, run
/// for the tokens routed to them only (grouped per expert), weighted by their routing weights
/// and summed in top-k order, as transformers' default `grouped_mm` experts do
/// (`weighted_out.view(tokens, top_k, hidden).sum(dim=1)`); plus the gated shared expert
/// (`shared`) when the block has one.
#[allow(clippy::too_many_arguments)]
fn moe_mlp(
    spec: &ModelSpec,
    moe: &Moe,
    shared: (&Linear, &Linear),
    x: &[f32],
    n: usize,
    width: usize,
    b: &mut MoeBufs,
    out: &mut [f32],
) -> Result<()> {
    let ms = spec.moe.as_ref().ok_or_else(|| {
        candle_core::Error::Msg("experts without a mixture-of-experts spec".into())
    })?;
    let ne = moe.experts.len();
    let logits = fit(&mut b.logits, n * ne);
    linear(&moe.router, x, n, logits)?;
    b.groups.resize_with(ne, Vec::new);
    b.groups.iter_mut().for_each(|g| g.clear());
    let k = ms.top_k.min(ne);
    for t in 0..n {
        route(
            &logits[t * ne..(t + 1) * ne],
            ms.top_k,
            ms.norm_topk,
            &mut b.picked,
        );
        for (slot, &(e, w)) in b.picked.iter().enumerate() {
            b.groups[e].push((t, slot, w));
        }
    }
    let slots = fit(&mut b.slots, n * k * width);
    for (e, group) in b.groups.iter().enumerate() {
        let m = group.len();
        if m == 0 {
            continue;
        }
        let xe = fit(&mut b.x, m * width);
        for (r, &(t, _, _)) in group.iter().enumerate() {
            xe[r * width..(r + 1) * width].copy_from_slice(&x[t * width..(t + 1) * width]);
        }
        let (gu, down) = &moe.experts[e];
        let y = fit(&mut b.y, m * width);
        dense_mlp(spec, gu, down, xe, m, &mut b.mlp, &mut b.act, y)?;
        for (r, &(t, slot, w)) in group.iter().enumerate() {
            let dst = &mut slots[(t * k + slot) * width..(t * k + slot + 1) * width];
            for (d, &v) in dst.iter_mut().zip(&y[r * width..(r + 1) * width]) {
                *d = v * w;
            }
        }
    }
    let out = &mut out[..n * width];
    out.fill(0.0);
    for (t, dst) in out.chunks_exact_mut(width).enumerate() {
        for s in slots[t * k * width..(t + 1) * k * width].chunks_exact(width) {
            for (d, &v) in dst.iter_mut().zip(s) {
                *d += v;
            }
        }
    }
    if let Some(g) = &moe.shared_gate {
        let y = fit(&mut b.y, n * width);
        dense_mlp(spec, shared.0, shared.1, x, n, &mut b.mlp, &mut b.act, y)?;
        let gate = fit(&mut b.gate, n);
        linear(g, x, n, gate)?;
        for t in 0..n {
            let s = 1.0 / (1.0 + (-gate[t]).exp());
            for (d, &v) in out[t * width..(t + 1) * width]
                .iter_mut()
                .zip(&y[t * width..(t + 1) * width])
            {
                *d += v * s;
            }
        }
    }
    Ok(())
}

fn need(n: Option<&Norm>) -> Result<&Norm> {
    n.ok_or_else(|| candle_core::Error::Msg("this residual layout needs both norms".into()))
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
                Weight::Quant(_) | Weight::Mapped(_) => true,
            }) && l.bias.as_ref().is_none_or(t_ok)
        };
        let n_ok = |n: &Norm| t_ok(&n.weight) && n.bias.as_ref().is_none_or(t_ok);
        let on_ok = |n: &Option<Norm>| n.as_ref().is_none_or(n_ok);
        (match &w.embed {
            Embedding::Tensor(t) => t_ok(t),
            Embedding::Mapped(_) => w.embed.mapped_values().is_some(),
            Embedding::Quant(_) => true,
        }) && w.pos_embed.as_ref().is_none_or(t_ok)
            && w.embed_norm.as_ref().is_none_or(n_ok)
            && w.project_in.as_ref().is_none_or(l_ok)
            && w.final_norm.as_ref().is_none_or(n_ok)
            && w.project_out.as_ref().is_none_or(l_ok)
            && l_ok(&w.lm_head)
            && w.blocks.iter().all(|b| {
                [
                    &b.ln1,
                    &b.ln2,
                    &b.post_attn_norm,
                    &b.post_mlp_norm,
                    &b.q_norm,
                    &b.k_norm,
                ]
                .into_iter()
                .all(on_ok)
                    && b.linears().into_iter().all(l_ok)
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
        let emb_tensor = match &w.embed {
            Embedding::Tensor(t) => Some(f32_of(t)?),
            Embedding::Mapped(_) | Embedding::Quant(_) => None,
        };
        let e = w.embed.cols();
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
                match &emb_tensor {
                    Some(table) => embedding_row(WSlice::F32(table.s()), t, e, row)?,
                    None => w.embed.row_into(t, row)?,
                }
                if let Some(sc) = spec.embed_scale {
                    row.iter_mut().for_each(|v| *v *= sc);
                }
            }
        }
        drop(emb_tensor);
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
            rope_tables(r, seqs, n, &mut ws.cos, &mut ws.sin);
        }
        if let Some(r) = &spec.local_rope {
            rope_tables(r, seqs, n, &mut ws.cos_local, &mut ws.sin_local);
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

            let windowed = spec.sliding_layers.get(li).copied().unwrap_or(false);
            let (cos_t, sin_t) = if windowed && spec.local_rope.is_some() {
                (&ws.cos_local, &ws.sin_local)
            } else {
                (&ws.cos, &ws.sin)
            };
            // Attention of `input` (normed rows) into `tmp`.
            let mut attention = |input: &[f32], tmp: &mut [f32]| -> Result<()> {
                linear(&b.qkv, input, n, qkv)?;
                let clip = spec.clip_qkv.filter(|_| !spec.clip_after_qk_norm);
                if let Some(c) = clip {
                    ops::clamp(qkv, c);
                }
                if let Some(nm) = &b.q_norm {
                    qk_norm(nm, qkv, qkv_w, 0, nh, hd, spec.qk_norm_whole)?;
                }
                if let Some(nm) = &b.k_norm {
                    qk_norm(nm, qkv, qkv_w, nh * hd, nkv, hd, spec.qk_norm_whole)?;
                }
                if let (Some(c), true) = (spec.clip_qkv, spec.clip_after_qk_norm) {
                    ops::clamp(qkv, c);
                }
                if let Some(r) = rope {
                    let half = r.rotary_dim / 2;
                    for (t, row) in qkv.chunks_mut(qkv_w).enumerate() {
                        let (c, s) = (&cos_t[t * half..][..half], &sin_t[t * half..][..half]);
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
                let params = AttnParams {
                    num_heads: nh,
                    num_kv_heads: nkv,
                    head_dim: hd,
                    block_size: BLOCK_SIZE,
                    scale: scale as f32,
                    window: if windowed { spec.sliding_window } else { None },
                    alibi: self.alibi_slopes(),
                    alibi_bf16: self.alibi_bf16_scale(),
                    softcap: spec.attn_softcap,
                };
                let (kc, vc) = pool.layer(li);
                paged_attention(&params, &attn, qkv, qkv_w, kc, vc, att, nh * hd);
                linear(&b.out, att, n, tmp)
            };
            let (mlp, act, moe_bufs) = (&mut ws.mlp, &mut ws.act, &mut ws.moe);
            let mut mlp_fn = |input: &[f32], out: &mut [f32]| -> Result<()> {
                match &b.moe {
                    None => dense_mlp(spec, &b.mlp_in, &b.mlp_out, input, n, mlp, act, out),
                    Some(moe) => moe_mlp(
                        spec,
                        moe,
                        (&b.mlp_in, &b.mlp_out),
                        input,
                        n,
                        hidden,
                        moe_bufs,
                        out,
                    ),
                }
            };
            let (ln1, ln2) = (b.ln1.as_ref(), b.ln2.as_ref());
            match spec.residual {
                Residual::Sequential => {
                    let input: &[f32] = match ln1 {
                        Some(nm) => {
                            norm(nm, x, h)?;
                            h
                        }
                        None => x,
                    };
                    attention(input, tmp)?;
                    match &b.post_attn_norm {
                        Some(nm) => {
                            norm(nm, tmp, tmp2)?;
                            ops::add_assign(x, tmp2);
                        }
                        None => ops::add_assign(x, tmp),
                    }
                    let input: &[f32] = match ln2 {
                        Some(nm) => {
                            norm(nm, x, h)?;
                            h
                        }
                        None => x,
                    };
                    mlp_fn(input, tmp)?;
                    match &b.post_mlp_norm {
                        Some(nm) => {
                            norm(nm, tmp, tmp2)?;
                            ops::add_assign(x, tmp2);
                        }
                        None => ops::add_assign(x, tmp),
                    }
                }
                Residual::SequentialFromNormed => {
                    norm(need(ln1)?, x, h)?;
                    attention(h, tmp)?;
                    x.copy_from_slice(h);
                    ops::add_assign(x, tmp);
                    norm(need(ln2)?, x, h)?;
                    mlp_fn(h, tmp)?;
                    x.copy_from_slice(h);
                    ops::add_assign(x, tmp);
                }
                Residual::Parallel => {
                    norm(need(ln1)?, x, h)?;
                    attention(h, tmp)?;
                    if let Some(nm) = ln2 {
                        norm(nm, x, h)?;
                    }
                    mlp_fn(h, tmp2)?;
                    ops::add_assign(x, tmp);
                    ops::add_assign(x, tmp2);
                }
                Residual::PostNorm => {
                    attention(x, tmp)?;
                    ops::add_assign(tmp, x);
                    norm(need(ln1)?, tmp, x)?;
                    mlp_fn(x, tmp)?;
                    ops::add_assign(tmp, x);
                    norm(need(ln2)?, tmp, x)?;
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
            if let Some(cap) = spec.final_softcap {
                ops::softcap(logits, cap);
            }
        }
        Ok(())
    }
}
