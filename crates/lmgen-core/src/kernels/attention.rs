//! Paged attention over a block-pooled f32 KV cache (CPU).
//!
//! One call handles a packed step: any mix of prefill chunks and decode tokens. Work is split
//! into units of (sequence, kv head, query-head chunk, query tile), and for long single-tile
//! calls also over key ranges (partial results merged afterwards). A unit streams its visible
//! keys in chunks with an online softmax, loading each K/V row once for all query rows of the
//! unit (every query head sharing the kv head, several query tokens). AVX2/FMA inner loops are
//! chosen at run time, with a portable scalar fallback.
#![allow(clippy::needless_range_loop)] // index loops over rows / keys / lanes read clearer in the kernels

use super::pool;
use std::cell::RefCell;

/// One sequence of a packed step.
pub struct AttnSeq<'a> {
    /// First row of this sequence's query tokens in `q` / `out` (tokens of all sequences are packed).
    pub q_start: usize,
    /// Number of query tokens this step (prefill chunk or 1 for decode).
    pub q_len: usize,
    /// Tokens in the cache BEFORE this step. Query i sits at absolute position past + i.
    /// The K/V of this step's tokens are ALREADY written in the pool (at positions past..past+q_len),
    /// so query i attends to key positions 0..=past+i (causal).
    pub past: usize,
    /// Block table: pool block holding positions [b*block_size, (b+1)*block_size).
    pub blocks: &'a [u32],
}

pub struct AttnParams<'a> {
    pub num_heads: usize,
    /// `num_heads % num_kv_heads == 0`; query head h uses kv head `h / (num_heads / num_kv_heads)`.
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    /// Multiplies q·k.
    pub scale: f32,
    /// Sliding window: key j visible from query at position p iff j <= p && p - j < window.
    pub window: Option<usize>,
    /// ALiBi: per query head slope; score += slope[h] * (key position j as f32).
    pub alibi: Option<&'a [f32]>,
    /// Falcon's ALiBi as transformers builds it: score += `bf16(slope[h] * bf16(j)) * factor`,
    /// the product of the (bfloat16) slope and the absolute key position rounded to bfloat16
    /// (exact up to position 256 for power-of-two slopes, rounded past it), then scaled.
    pub alibi_bf16: Option<f32>,
    /// Soft-capping of the scaled scores, `cap * tanh(s / cap)` (Gemma-2).
    pub softcap: Option<f32>,
}

/// Causal paged attention for a packed step.
///
/// `q`: packed queries, row r at `q[r*q_stride ..]`, head h at offset `h*head_dim` within the row
/// (`q_stride >= num_heads*head_dim`, so q may be read straight out of a fused QKV buffer).
/// `k_cache`, `v_cache`: one layer's pool, each laid out
/// `[num_blocks][num_kv_heads][block_size][head_dim]`.
/// `out`: row r at `out[r*out_stride ..]`, head h at `h*head_dim`; every row of every sequence is
/// written (only the `num_heads*head_dim` head columns of each row).
///
/// Panics if the parameters are inconsistent, a row, block or block-table entry is out of range,
/// or the query rows of two sequences overlap.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention(
    p: &AttnParams,
    seqs: &[AttnSeq],
    q: &[f32],
    q_stride: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
    out_stride: usize,
) {
    run(
        p,
        seqs,
        q,
        q_stride,
        k_cache,
        v_cache,
        out,
        out_stride,
        Exec::auto(detect_isa()),
    );
}

/// Falcon's ALiBi term for key position `j` before its scale: transformers multiplies the
/// bfloat16 slope by the integer positions, which torch first casts to bfloat16, and rounds the
/// product to bfloat16.
#[inline]
pub fn alibi_bf16_bias(slope: f32, j: usize) -> f32 {
    use crate::config::round_bf16;
    round_bf16(slope * round_bf16(j as f32))
}

/// Query rows (tokens × heads) per work unit.
const MAX_ROWS: usize = 64;
/// Keys per online-softmax update (a chunk may span several blocks).
const KEY_CHUNK: usize = 32;
/// Calls (and sequences) below this many flops run on the calling thread.
const INLINE_FLOPS: f64 = 262_144.0;
/// Keys of a granule: key positions [g·GRANULE, (g+1)·GRANULE) are summed from a fresh online
/// softmax, and granules are folded into each other in order (`fold`). A call split over the
/// key range (few sequences, long contexts) hands out whole granules and folds them the same
/// way, so the bits of a row do not depend on whether its keys were split, on the thread count
/// or on the batch. A multiple of `KEY_CHUNK`.
const GRANULE: usize = 256;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Isa {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX2 with the score and value products at 16 lanes: the same bits as `Avx2` (every
    /// lane runs the same chain of operations; see `avx512`).
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

/// The best the CPU has, chosen once; `LMGEN_ATTN_ISA=avx2` keeps the 8-lane products (the
/// same bits, for side-by-side measurements).
fn detect_isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if crate::kernels::simd::has_avx2_fma() {
            let cap = std::env::var("LMGEN_ATTN_ISA");
            if is_x86_feature_detected!("avx512f") && cap.as_deref() != Ok("avx2") {
                return Isa::Avx512;
            }
            return Isa::Avx2;
        }
        Isa::Scalar
    })
}

/// Execution choices; `None` fields are decided from the call's size.
#[derive(Clone, Copy, Debug)]
struct Exec {
    isa: Isa,
    parallel: Option<bool>,
    /// Split over the key range (whole granules) or not.
    split: Option<bool>,
}

impl Exec {
    fn auto(isa: Isa) -> Self {
        Exec {
            isa,
            parallel: None,
            split: None,
        }
    }
}

/// Raw output pointer shared by work units.
#[derive(Clone, Copy)]
struct SyncPtr(*mut f32);
// SAFETY: units write disjoint regions (distinct rows or distinct heads of `out`, distinct slots of
// the partial buffer), and the pointee outlives the parallel section.
unsafe impl Send for SyncPtr {}
unsafe impl Sync for SyncPtr {}
impl SyncPtr {
    #[inline(always)]
    fn get(self) -> *mut f32 {
        self.0
    }
}

struct Ctx<'a> {
    p: &'a AttnParams<'a>,
    seqs: &'a [AttnSeq<'a>],
    q: &'a [f32],
    q_stride: usize,
    k: &'a [f32],
    v: &'a [f32],
    out: SyncPtr,
    out_stride: usize,
    isa: Isa,
}

#[derive(Clone, Copy, Debug)]
struct Unit {
    seq: usize,
    kvh: usize,
    /// First query head (absolute) and number of query heads.
    h0: usize,
    nh: usize,
    /// Query tokens [t0, t1) of the sequence.
    t0: usize,
    t1: usize,
    /// Key positions considered: [k_lo, k_hi) intersected with visibility.
    k_lo: usize,
    k_hi: usize,
}

#[derive(Clone, Copy)]
enum Dest {
    Out,
    /// Unnormalized partial result: m[rows], l[rows], acc[rows*head_dim].
    Partial(*mut f32),
}

#[derive(Default)]
struct Scratch {
    qs: Vec<f32>,
    s: Vec<f32>,
    acc: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    alpha: Vec<f32>,
    /// The granules folded so far (units over more than one granule): m, l, acc.
    fm: Vec<f32>,
    fl: Vec<f32>,
    facc: Vec<f32>,
}

impl Scratch {
    fn ensure(&mut self, rows: usize, hd: usize) {
        fn grow(v: &mut Vec<f32>, n: usize) {
            if v.len() < n {
                v.resize(n, 0.0);
            }
        }
        grow(&mut self.qs, rows * hd);
        grow(&mut self.acc, rows * hd);
        grow(&mut self.s, rows * KEY_CHUNK);
        grow(&mut self.m, rows);
        grow(&mut self.l, rows);
        grow(&mut self.alpha, rows);
        grow(&mut self.fm, rows);
        grow(&mut self.fl, rows);
        grow(&mut self.facc, rows * hd);
    }
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    static PARTIAL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Pool tasks of one call: (sequence, first unit, end unit).
    static TASKS: RefCell<Vec<(u32, u32, u32)>> = const { RefCell::new(Vec::new()) };
}

/// The granules holding a sequence's visible keys (from its first query's window).
fn granules(s: &AttnSeq, window: Option<usize>) -> std::ops::Range<usize> {
    let (lo, end) = (window_lo(window, s.past), s.past + s.q_len);
    if s.q_len == 0 || lo >= end {
        return 0..0;
    }
    lo / GRANULE..(end - 1) / GRANULE + 1
}

/// Folds one granule's unnormalized result (`m`, `l`, `acc`: per row its running maximum,
/// sum of exponentials and weighted values) into the granules folded before it (`fm`, `fl`,
/// `facc`, all rows without keys yet: `-inf`). Rows of the granule without visible keys are
/// left as they are; the first granule with keys is taken as it is.
fn fold(
    rows: usize,
    hd: usize,
    (m, l, acc): (&[f32], &[f32], &[f32]),
    fm: &mut [f32],
    fl: &mut [f32],
    facc: &mut [f32],
) {
    for r in 0..rows {
        if m[r] == f32::NEG_INFINITY {
            continue;
        }
        let (a_row, d) = (&acc[r * hd..][..hd], &mut facc[r * hd..][..hd]);
        if fm[r] == f32::NEG_INFINITY {
            fm[r] = m[r];
            fl[r] = l[r];
            d.copy_from_slice(a_row);
            continue;
        }
        let mx = fm[r].max(m[r]);
        let (a, b) = ((fm[r] - mx).exp(), (m[r] - mx).exp());
        fl[r] = fl[r] * a + l[r] * b;
        for (o, x) in d.iter_mut().zip(a_row) {
            *o = *o * a + x * b;
        }
        fm[r] = mx;
    }
}

/// Row `r` of an unnormalized result, divided by its sum of exponentials, into `dst`.
#[inline(always)]
unsafe fn normalize(l: f32, acc: &[f32], dst: *mut f32) {
    let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
    for (d, a) in acc.iter().enumerate() {
        *dst.add(d) = a * inv;
    }
}

#[inline(always)]
fn window_lo(window: Option<usize>, pos: usize) -> usize {
    match window {
        Some(w) => (pos + 1).saturating_sub(w),
        None => 0,
    }
}

/// Sum over queries of visible keys.
fn visible_pairs(s: &AttnSeq, window: Option<usize>) -> f64 {
    let (pa, n) = (s.past as f64, s.q_len as f64);
    let causal = n * pa + n * (n + 1.0) / 2.0;
    match window {
        Some(w) => causal.min(n * w as f64),
        None => causal,
    }
}

fn validate(
    p: &AttnParams,
    seqs: &[AttnSeq],
    q: &[f32],
    q_stride: usize,
    out: &[f32],
    out_stride: usize,
    num_blocks: usize,
) {
    let (nh, hd, bs) = (p.num_heads, p.head_dim, p.block_size);
    assert!(
        nh > 0 && p.num_kv_heads > 0 && nh % p.num_kv_heads == 0,
        "num_heads must be a multiple of num_kv_heads"
    );
    assert!(hd > 0 && bs > 0, "head_dim and block_size must be positive");
    assert!(
        q_stride >= nh * hd && out_stride >= nh * hd,
        "row strides must cover num_heads*head_dim"
    );
    assert!(p.window != Some(0), "window must be at least 1");
    if let Some(a) = p.alibi {
        assert!(a.len() >= nh, "alibi needs one slope per query head");
    }
    let mut sorted = true;
    let mut prev_end = 0;
    for s in seqs.iter().filter(|s| s.q_len > 0) {
        let last = s.q_start + s.q_len - 1;
        assert!(
            last * q_stride + nh * hd <= q.len(),
            "q too short for sequence rows"
        );
        assert!(
            last * out_stride + nh * hd <= out.len(),
            "out too short for sequence rows"
        );
        let end = s.past + s.q_len;
        let first_block = window_lo(p.window, s.past) / bs;
        let nblk = end.div_ceil(bs);
        assert!(
            s.blocks.len() >= nblk,
            "block table shorter than the sequence"
        );
        for &b in &s.blocks[first_block..nblk] {
            assert!(
                (b as usize) < num_blocks,
                "block id {b} out of range ({num_blocks} blocks)"
            );
        }
        sorted &= s.q_start >= prev_end;
        prev_end = s.q_start + s.q_len;
    }
    if !sorted {
        for (i, a) in seqs.iter().enumerate().filter(|(_, s)| s.q_len > 0) {
            for b in seqs[i + 1..].iter().filter(|s| s.q_len > 0) {
                assert!(
                    a.q_start + a.q_len <= b.q_start || b.q_start + b.q_len <= a.q_start,
                    "query rows of two sequences overlap"
                );
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    p: &AttnParams,
    seqs: &[AttnSeq],
    q: &[f32],
    q_stride: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    out: &mut [f32],
    out_stride: usize,
    ex: Exec,
) {
    let (nh, nkv, hd, bs) = (p.num_heads, p.num_kv_heads, p.head_dim, p.block_size);
    let block_len = nkv.max(1) * bs.max(1) * hd.max(1);
    let num_blocks = k_cache.len().min(v_cache.len()) / block_len;
    validate(p, seqs, q, q_stride, out, out_stride, num_blocks);

    let group = nh / nkv;
    let nhc = group.div_ceil(MAX_ROWS); // head chunks per kv head
    let hc = group.div_ceil(nhc); // heads per chunk (last may be smaller)
    let tile_cap = (MAX_ROWS / hc).max(1);
    let upt = nkv * nhc; // units per query tile

    let mut flops = 0.0;
    let mut tokens = 0;
    let mut max_q = 0;
    let mut max_granules = 0;
    for s in seqs.iter().filter(|s| s.q_len > 0) {
        flops += 4.0 * (nh * hd) as f64 * visible_pairs(s, p.window);
        tokens += s.q_len;
        max_q = max_q.max(s.q_len);
        max_granules = max_granules.max(granules(s, p.window).len());
    }
    if tokens == 0 {
        return;
    }
    // Only a call worth parallelizing looks at (and possibly starts) the thread pool.
    let threads = if ex.parallel == Some(false) || (ex.parallel.is_none() && flops < INLINE_FLOPS) {
        1
    } else {
        pool::threads()
    };
    let parallel = ex.parallel.unwrap_or(threads > 1);
    let tile = if parallel && ex.split != Some(true) {
        (tokens * upt).div_ceil(2 * threads).clamp(1, tile_cap)
    } else {
        tile_cap
    };

    let ctx = Ctx {
        p,
        seqs,
        q,
        q_stride,
        k: k_cache,
        v: v_cache,
        out: SyncPtr(out.as_mut_ptr()),
        out_stride,
        isa: ex.isa,
    };

    // Key-range split: every sequence fits one query tile but there are too few units.
    if max_q <= tile {
        let units = seqs.len() * upt;
        let split = ex
            .split
            .unwrap_or(parallel && units < 2 * threads && max_granules > 1);
        if split && run_split(&ctx, nhc, hc, max_q * hc, max_granules, parallel) {
            return;
        }
    }

    let unit_of = |si: usize, ui: usize| -> Unit {
        let s = &seqs[si];
        let (tix, rest) = (ui / upt, ui % upt);
        let (kvh, hci) = (rest / nhc, rest % nhc);
        let t0 = tix * tile;
        let hh0 = hci * hc;
        Unit {
            seq: si,
            kvh,
            h0: kvh * group + hh0,
            nh: hc.min(group - hh0),
            t0,
            t1: (t0 + tile).min(s.q_len),
            k_lo: 0,
            k_hi: usize::MAX,
        }
    };
    let units_in = |s: &AttnSeq| s.q_len.div_ceil(tile) * upt;
    if !parallel {
        for (si, s) in seqs.iter().enumerate() {
            for ui in 0..units_in(s) {
                exec_unit(&ctx, &unit_of(si, ui), Dest::Out);
            }
        }
    } else {
        // One pool task per unit, or per sequence where its units are too small to hand out.
        TASKS.with(|cell| {
            let mut fresh = Vec::new();
            let mut held = cell.try_borrow_mut();
            let tasks = match held.as_deref_mut() {
                Ok(t) => t,
                Err(_) => &mut fresh,
            };
            tasks.clear();
            for (si, s) in seqs.iter().enumerate() {
                let n = units_in(s);
                let seq_flops = 4.0 * (nh * hd) as f64 * visible_pairs(s, p.window);
                if n <= 1 || seq_flops < INLINE_FLOPS {
                    tasks.push((si as u32, 0, n as u32));
                } else {
                    tasks.extend((0..n as u32).map(|ui| (si as u32, ui, ui + 1)));
                }
            }
            let tasks = &*tasks;
            pool::for_each(tasks.len(), |t| {
                let (si, u0, u1) = tasks[t];
                for ui in u0..u1 {
                    exec_unit(&ctx, &unit_of(si as usize, ui as usize), Dest::Out);
                }
            });
        });
    }
}

/// Runs every (sequence, kv head, head chunk) unit over each of its granules (at most
/// `ngran`) into partial slots, then folds each unit's granules in order, as a unit run whole
/// does. Returns false (nothing done) if the partial buffer is busy on this thread.
fn run_split(
    c: &Ctx,
    nhc: usize,
    hc: usize,
    max_rows: usize,
    ngran: usize,
    parallel: bool,
) -> bool {
    let p = c.p;
    let (nkv, hd) = (p.num_kv_heads, p.head_dim);
    let group = p.num_heads / nkv;
    let upt = nkv * nhc;
    let slot = max_rows * (hd + 2);
    let nunits = c.seqs.len() * upt;
    let nslots = nunits * ngran;
    PARTIAL.with(|cell| {
        let Ok(mut buf) = cell.try_borrow_mut() else {
            return false;
        };
        // The partial slots, then one slot for folding.
        if buf.len() < (nslots + 1) * slot {
            buf.resize((nslots + 1) * slot, 0.0);
        }
        let bp = SyncPtr(buf.as_mut_ptr());
        // Unit `ui` over its granule `j` (`None`: the sequence has fewer granules).
        let unit_of = |ui: usize, j: usize| -> Option<Unit> {
            let (si, rest) = (ui / upt, ui % upt);
            let (kvh, hci) = (rest / nhc, rest % nhc);
            let s = &c.seqs[si];
            let g = granules(s, p.window);
            let gi = g.start + j;
            if gi >= g.end {
                return None;
            }
            let hh0 = hci * hc;
            Some(Unit {
                seq: si,
                kvh,
                h0: kvh * group + hh0,
                nh: hc.min(group - hh0),
                t0: 0,
                t1: s.q_len,
                k_lo: gi * GRANULE,
                k_hi: (gi + 1) * GRANULE,
            })
        };
        let work = |i: usize| {
            if let Some(u) = unit_of(i / ngran, i % ngran) {
                // SAFETY: slot i lies inside `buf` and is written by this unit only.
                let dst = unsafe { bp.get().add(i * slot) };
                exec_unit(c, &u, Dest::Partial(dst));
            }
        };
        if parallel {
            pool::for_each(nslots, work);
        } else {
            (0..nslots).for_each(work);
        }
        let (parts, folded) = buf.split_at_mut(nslots * slot);
        for ui in 0..nunits {
            let Some(u) = unit_of(ui, 0) else { continue };
            let rows = (u.t1 - u.t0) * u.nh;
            let s = &c.seqs[u.seq];
            let (fm, rest) = folded.split_at_mut(rows);
            let (fl, facc) = rest.split_at_mut(rows);
            fm.fill(f32::NEG_INFINITY);
            fl.fill(0.0);
            facc[..rows * hd].fill(0.0);
            for j in 0..ngran {
                if unit_of(ui, j).is_none() {
                    break;
                }
                let part = &parts[(ui * ngran + j) * slot..][..slot];
                let (m, rest) = part.split_at(rows);
                let (l, acc) = rest.split_at(rows);
                fold(rows, hd, (m, l, acc), fm, fl, facc);
            }
            for r in 0..rows {
                let (t, h) = (u.t0 + r / u.nh, u.h0 + r % u.nh);
                // SAFETY: bounds checked in `validate`; only this thread writes during the fold.
                unsafe {
                    normalize(
                        fl[r],
                        &facc[r * hd..][..hd],
                        c.out.get().add((s.q_start + t) * c.out_stride + h * hd),
                    )
                };
            }
        }
        true
    })
}

fn exec_unit(c: &Ctx, u: &Unit, dest: Dest) {
    let rows = (u.t1 - u.t0) * u.nh;
    if rows == 0 {
        return;
    }
    SCRATCH.with(|cell| {
        let mut sc = cell.borrow_mut();
        sc.ensure(rows, c.p.head_dim);
        // SAFETY: `validate` checked every row, block and block-table entry this unit touches;
        // the AVX2 variant runs only when the CPU supports avx2 and fma.
        unsafe {
            match c.isa {
                Isa::Scalar => unit_impl::<SCALAR>(c, u, dest, &mut sc),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unit_avx2(c, u, dest, &mut sc),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unit_avx512(c, u, dest, &mut sc),
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn unit_avx2(c: &Ctx, u: &Unit, dest: Dest, sc: &mut Scratch) {
    unit_impl::<AVX2>(c, u, dest, sc)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn unit_avx512(c: &Ctx, u: &Unit, dest: Dest, sc: &mut Scratch) {
    unit_impl::<AVX512>(c, u, dest, sc)
}

/// Kernel variants of [`unit_impl`].
const SCALAR: u8 = 0;
const AVX2: u8 = 1;
const AVX512: u8 = 2;

/// One work unit: online softmax over the unit's visible keys, for all its query rows.
/// Row r = token (r / nh) of the tile, head h0 + (r % nh).
#[inline(always)]
unsafe fn unit_impl<const ISA: u8>(c: &Ctx, u: &Unit, dest: Dest, sc: &mut Scratch) {
    let p = c.p;
    let (hd, bs, nkv) = (p.head_dim, p.block_size, p.num_kv_heads);
    let s = &c.seqs[u.seq];
    let rows = (u.t1 - u.t0) * u.nh;
    let Scratch {
        qs,
        s: sb,
        acc,
        m,
        l,
        alpha,
        fm,
        fl,
        facc,
    } = sc;
    let (qs, sb, acc) = (
        &mut qs[..rows * hd],
        &mut sb[..rows * KEY_CHUNK],
        &mut acc[..rows * hd],
    );
    let (m, l, alpha) = (&mut m[..rows], &mut l[..rows], &mut alpha[..rows]);
    let (fm, fl, facc) = (&mut fm[..rows], &mut fl[..rows], &mut facc[..rows * hd]);

    for t in 0..u.t1 - u.t0 {
        let qrow = (s.q_start + u.t0 + t) * c.q_stride;
        for hh in 0..u.nh {
            let src = &c.q[qrow + (u.h0 + hh) * hd..][..hd];
            let dst = &mut qs[(t * u.nh + hh) * hd..][..hd];
            for i in 0..hd {
                dst[i] = src[i] * p.scale;
            }
        }
    }
    acc.fill(0.0);
    m.fill(f32::NEG_INFINITY);
    l.fill(0.0);

    let pos0 = s.past + u.t0;
    let kbeg = u.k_lo.max(window_lo(p.window, pos0));
    let kend = u.k_hi.min(s.past + u.t1);
    // Pool offset of the K/V row of key position x (rows are contiguous up to the block's end).
    let row_at = |x: usize| -> usize {
        let b = x / bs;
        ((s.blocks[b] as usize * nkv + u.kvh) * bs + x - b * bs) * hd
    };
    let seg_end = |x: usize, c1: usize| c1.min((x / bs + 1) * bs);
    let chunk_end = |c0: usize| kend.min((c0 / KEY_CHUNK + 1) * KEY_CHUNK);
    let (kp, vp) = (c.k.as_ptr(), c.v.as_ptr());
    // Keys in more than one granule: each granule from a fresh state, folded in order.
    let multi = kbeg < kend && kbeg / GRANULE != (kend - 1) / GRANULE;
    if multi {
        fm.fill(f32::NEG_INFINITY);
        fl.fill(0.0);
        facc.fill(0.0);
    }
    let mut c0 = kbeg;
    while c0 < kend {
        if multi && c0 > kbeg && c0 % GRANULE == 0 {
            fold(rows, hd, (m, l, acc), fm, fl, facc);
            acc.fill(0.0);
            m.fill(f32::NEG_INFINITY);
            l.fill(0.0);
        }
        let c1 = chunk_end(c0);
        let n = c1 - c0;
        // Blocks are scattered over the pool: fetch the next chunk while this one is computed.
        if c1 < kend {
            let c2 = chunk_end(c1);
            let mut x = c1;
            while x < c2 {
                let e = seg_end(x, c2);
                prefetch(kp.add(row_at(x)), (e - x) * hd);
                prefetch(vp.add(row_at(x)), (e - x) * hd);
                x = e;
            }
        }
        let mut x = c0;
        while x < c1 {
            let e = seg_end(x, c1);
            qk::<ISA>(
                qs.as_ptr(),
                rows,
                hd,
                kp.add(row_at(x)),
                e - x,
                sb.as_mut_ptr().add(x - c0),
                KEY_CHUNK,
            );
            x = e;
        }
        for r in 0..rows {
            let pos = pos0 + r / u.nh;
            let row = &mut sb[r * KEY_CHUNK..r * KEY_CHUNK + n];
            let jlo = window_lo(p.window, pos).saturating_sub(c0).min(n);
            let jhi = (pos + 1).saturating_sub(c0).min(n);
            if jlo >= jhi {
                row.fill(0.0);
                alpha[r] = 1.0;
                continue;
            }
            if let Some(slopes) = p.alibi {
                let slope = slopes[u.h0 + r % u.nh];
                match p.alibi_bf16 {
                    // slope * (j - pos): equal after softmax to slope * j, and exact near the
                    // diagonal.
                    None => {
                        for (j, x) in row.iter_mut().enumerate().take(jhi).skip(jlo) {
                            *x -= slope * (pos - (c0 + j)) as f32;
                        }
                    }
                    Some(f) => {
                        for (j, x) in row.iter_mut().enumerate().take(jhi).skip(jlo) {
                            *x += alibi_bf16_bias(slope, c0 + j) * f;
                        }
                    }
                }
            }
            if let Some(cap) = p.softcap {
                for x in &mut row[jlo..jhi] {
                    *x = cap * (*x / cap).tanh();
                }
            }
            let mx = m[r].max(row_max::<ISA>(&row[jlo..jhi]));
            let a = if mx == m[r] { 1.0 } else { (m[r] - mx).exp() };
            let sum = exp_sum::<ISA>(&mut row[jlo..jhi], mx);
            row[..jlo].fill(0.0);
            row[jhi..].fill(0.0);
            l[r] = l[r] * a + sum;
            m[r] = mx;
            alpha[r] = a;
        }
        let mut x = c0;
        while x < c1 {
            let e = seg_end(x, c1);
            let pj = sb.as_ptr().add(x - c0);
            pv::<ISA>(
                acc.as_mut_ptr(),
                rows,
                hd,
                alpha.as_ptr(),
                x == c0,
                pj,
                KEY_CHUNK,
                vp.add(row_at(x)),
                e - x,
            );
            x = e;
        }
        c0 = c1;
    }

    match dest {
        Dest::Out => {
            let (l, acc) = if multi {
                fold(rows, hd, (m, l, acc), fm, fl, facc);
                (&*fl, &*facc)
            } else {
                (&*l, &*acc)
            };
            for r in 0..rows {
                let (t, h) = (u.t0 + r / u.nh, u.h0 + r % u.nh);
                let dst = c.out.get().add((s.q_start + t) * c.out_stride + h * hd);
                normalize(l[r], &acc[r * hd..][..hd], dst);
            }
        }
        Dest::Partial(dst) => {
            debug_assert!(!multi, "a partial covers one granule");
            std::ptr::copy_nonoverlapping(m.as_ptr(), dst, rows);
            std::ptr::copy_nonoverlapping(l.as_ptr(), dst.add(rows), rows);
            std::ptr::copy_nonoverlapping(acc.as_ptr(), dst.add(2 * rows), rows * hd);
        }
    }
}

/// Prefetches `len` floats at `ptr` into L1.
#[inline(always)]
fn prefetch(ptr: *const f32, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let mut o = 0;
        while o < len {
            // SAFETY: prefetch never faults; the address stays within the pool slice.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.wrapping_add(o) as *const i8) };
            o += 16;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ptr, len);
}

/// `s[r*ld + j] = dot(q_r, k_j)` for rows `q` (stride hd) and keys `k` (stride hd).
#[inline(always)]
unsafe fn qk<const ISA: u8>(
    q: *const f32,
    rows: usize,
    hd: usize,
    k: *const f32,
    n: usize,
    s: *mut f32,
    ld: usize,
) {
    #[cfg(target_arch = "x86_64")]
    match ISA {
        AVX2 => return avx2::qk(q, rows, hd, k, n, s, ld),
        AVX512 => return avx512::qk(q, rows, hd, k, n, s, ld),
        _ => {}
    }
    scalar::qk(q, rows, hd, k, n, s, ld)
}

/// `acc_r = acc_r * alpha_r + Σ_j p[r*ld + j] * v_j` (without the `alpha_r` factor unless `rescale`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn pv<const ISA: u8>(
    acc: *mut f32,
    rows: usize,
    hd: usize,
    alpha: *const f32,
    rescale: bool,
    p: *const f32,
    ld: usize,
    v: *const f32,
    n: usize,
) {
    #[cfg(target_arch = "x86_64")]
    match ISA {
        AVX2 => return avx2::pv(acc, rows, hd, alpha, rescale, p, ld, v, n),
        AVX512 => return avx512::pv(acc, rows, hd, alpha, rescale, p, ld, v, n),
        _ => {}
    }
    scalar::pv(acc, rows, hd, alpha, rescale, p, ld, v, n)
}

#[inline(always)]
unsafe fn row_max<const ISA: u8>(x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if ISA != SCALAR {
        return avx2::row_max(x);
    }
    x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// In place `x = exp(x - mx)`; returns the sum.
#[inline(always)]
unsafe fn exp_sum<const ISA: u8>(x: &mut [f32], mx: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if ISA != SCALAR {
        return avx2::exp_sum(x, mx);
    }
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - mx).exp();
        sum += *v;
    }
    sum
}

mod scalar {
    use std::slice::from_raw_parts;

    #[inline(always)]
    fn dot(a: &[f32], b: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
        let (ar, br) = (ac.remainder(), bc.remainder());
        for (x, y) in ac.zip(bc) {
            for i in 0..8 {
                acc[i] += x[i] * y[i];
            }
        }
        let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (x, y) in ar.iter().zip(br) {
            s += x * y;
        }
        s
    }

    pub(super) unsafe fn qk(
        q: *const f32,
        rows: usize,
        hd: usize,
        k: *const f32,
        n: usize,
        s: *mut f32,
        ld: usize,
    ) {
        for r in 0..rows {
            let qr = from_raw_parts(q.add(r * hd), hd);
            for j in 0..n {
                *s.add(r * ld + j) = dot(qr, from_raw_parts(k.add(j * hd), hd));
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pv(
        acc: *mut f32,
        rows: usize,
        hd: usize,
        alpha: *const f32,
        rescale: bool,
        p: *const f32,
        ld: usize,
        v: *const f32,
        n: usize,
    ) {
        for r in 0..rows {
            let ar = std::slice::from_raw_parts_mut(acc.add(r * hd), hd);
            let a = if rescale { *alpha.add(r) } else { 1.0 };
            if a != 1.0 {
                for x in ar.iter_mut() {
                    *x *= a;
                }
            }
            for j in 0..n {
                let pj = *p.add(r * ld + j);
                if pj != 0.0 {
                    let vj = from_raw_parts(v.add(j * hd), hd);
                    for (x, y) in ar.iter_mut().zip(vj) {
                        *x += pj * y;
                    }
                }
            }
        }
    }
}

/// The score and value products at 16 lanes, bit for bit the AVX2 kernels' results: in the
/// score product two keys share a 512-bit register (lanes 0-7 key t, 8-15 key t + 1), each lane
/// running the same chain of FMAs over the head dimension as AVX2's 8-lane accumulator, folded
/// by the same `hsum4`, with the same grouping of keys by four; in the value product every
/// column is its own chain (scale by alpha, then one FMA per key in order), 32 or 16 columns
/// per pass; what is left of either goes to the AVX2 code.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // register tiles indexed by row
mod avx512 {
    use super::avx2;
    use std::arch::x86_64::*;

    /// Two 8-lane vectors as one 16-lane register (AVX-512F only).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn pair(lo: __m256, hi: __m256) -> __m512 {
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(
            _mm512_castpd256_pd512(_mm256_castps_pd(lo)),
            _mm256_castps_pd(hi),
        ))
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn halves(a: __m512) -> (__m256, __m256) {
        (
            _mm512_castps512_ps256(a),
            _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a))),
        )
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn qk(
        q: *const f32,
        rows: usize,
        hd: usize,
        k: *const f32,
        n: usize,
        s: *mut f32,
        ld: usize,
    ) {
        let mut r = 0;
        while r + 6 <= rows {
            qk_rows::<6>(q.add(r * hd), hd, k, n, s.add(r * ld), ld);
            r += 6;
        }
        let (q, s) = (q.add(r * hd), s.add(r * ld));
        match rows - r {
            5 => qk_rows::<5>(q, hd, k, n, s, ld),
            4 => qk_rows::<4>(q, hd, k, n, s, ld),
            3 => qk_rows::<3>(q, hd, k, n, s, ld),
            2 => qk_rows::<2>(q, hd, k, n, s, ld),
            1 => qk_rows::<1>(q, hd, k, n, s, ld),
            _ => {}
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn qk_rows<const R: usize>(
        q: *const f32,
        hd: usize,
        k: *const f32,
        n: usize,
        s: *mut f32,
        ld: usize,
    ) {
        let d8 = hd & !7;
        let mut j = 0;
        while j + 4 <= n {
            let kj = k.add(j * hd);
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            let mut d = 0;
            while d < d8 {
                let k01 = pair(_mm256_loadu_ps(kj.add(d)), _mm256_loadu_ps(kj.add(hd + d)));
                let k23 = pair(
                    _mm256_loadu_ps(kj.add(2 * hd + d)),
                    _mm256_loadu_ps(kj.add(3 * hd + d)),
                );
                for rr in 0..R {
                    let q8 = _mm256_loadu_ps(q.add(rr * hd + d));
                    let qv = _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(q8)));
                    acc[rr][0] = _mm512_fmadd_ps(qv, k01, acc[rr][0]);
                    acc[rr][1] = _mm512_fmadd_ps(qv, k23, acc[rr][1]);
                }
                d += 8;
            }
            for rr in 0..R {
                let (a0, a1) = halves(acc[rr][0]);
                let (a2, a3) = halves(acc[rr][1]);
                let mut o = [0f32; 4];
                _mm_storeu_ps(o.as_mut_ptr(), avx2::hsum4(&[a0, a1, a2, a3]));
                for (t, ot) in o.iter_mut().enumerate() {
                    for dd in d8..hd {
                        *ot += *q.add(rr * hd + dd) * *kj.add(t * hd + dd);
                    }
                }
                std::ptr::copy_nonoverlapping(o.as_ptr(), s.add(rr * ld + j), 4);
            }
            j += 4;
        }
        if j < n {
            avx2::qk_rows::<R>(q, hd, k.add(j * hd), n - j, s.add(j), ld);
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pv(
        acc: *mut f32,
        rows: usize,
        hd: usize,
        alpha: *const f32,
        rescale: bool,
        p: *const f32,
        ld: usize,
        v: *const f32,
        n: usize,
    ) {
        let mut r = 0;
        while r + 4 <= rows {
            let (a, pr) = (acc.add(r * hd), p.add(r * ld));
            pv_rows::<4>(a, hd, alpha.add(r), rescale, pr, ld, v, n);
            r += 4;
        }
        let (a, pr) = (acc.add(r * hd), p.add(r * ld));
        match rows - r {
            3 => pv_rows::<3>(a, hd, alpha.add(r), rescale, pr, ld, v, n),
            2 => pv_rows::<2>(a, hd, alpha.add(r), rescale, pr, ld, v, n),
            1 => pv_rows::<1>(a, hd, alpha.add(r), rescale, pr, ld, v, n),
            _ => {}
        }
    }

    /// `W` 16-column registers per row and pass.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_pass<const R: usize, const W: usize>(
        acc: *mut f32,
        hd: usize,
        al: &[__m512; R],
        p: *const f32,
        ld: usize,
        v: *const f32,
        n: usize,
        d: usize,
    ) {
        let mut a = [[_mm512_setzero_ps(); W]; R];
        for rr in 0..R {
            for w in 0..W {
                let x = _mm512_loadu_ps(acc.add(rr * hd + d + 16 * w));
                a[rr][w] = _mm512_mul_ps(x, al[rr]);
            }
        }
        for j in 0..n {
            let mut vv = [_mm512_setzero_ps(); W];
            for w in 0..W {
                vv[w] = _mm512_loadu_ps(v.add(j * hd + d + 16 * w));
            }
            for rr in 0..R {
                let pb = _mm512_set1_ps(*p.add(rr * ld + j));
                for w in 0..W {
                    a[rr][w] = _mm512_fmadd_ps(pb, vv[w], a[rr][w]);
                }
            }
        }
        for rr in 0..R {
            for w in 0..W {
                _mm512_storeu_ps(acc.add(rr * hd + d + 16 * w), a[rr][w]);
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_rows<const R: usize>(
        acc: *mut f32,
        hd: usize,
        alpha: *const f32,
        rescale: bool,
        p: *const f32,
        ld: usize,
        v: *const f32,
        n: usize,
    ) {
        let mut al = [_mm512_set1_ps(1.0); R];
        if rescale {
            for rr in 0..R {
                al[rr] = _mm512_set1_ps(*alpha.add(rr));
            }
        }
        let mut d = 0;
        while d + 32 <= hd {
            pv_pass::<R, 2>(acc, hd, &al, p, ld, v, n, d);
            d += 32;
        }
        if d + 16 <= hd {
            pv_pass::<R, 1>(acc, hd, &al, p, ld, v, n, d);
            d += 16;
        }
        if d < hd {
            avx2::pv_rows::<R>(acc, hd, alpha, rescale, p, ld, v, n, d);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Sums of four accumulators: [Σa0, Σa1, Σa2, Σa3].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn hsum4(a: &[__m256; 4]) -> __m128 {
        let t0 = _mm256_hadd_ps(a[0], a[1]);
        let t1 = _mm256_hadd_ps(a[2], a[3]);
        let t2 = _mm256_hadd_ps(t0, t1);
        _mm_add_ps(_mm256_castps256_ps128(t2), _mm256_extractf128_ps::<1>(t2))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(a: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn qk(
        q: *const f32,
        rows: usize,
        hd: usize,
        k: *const f32,
        n: usize,
        s: *mut f32,
        ld: usize,
    ) {
        let mut r = 0;
        while r + 3 <= rows {
            qk_rows::<3>(q.add(r * hd), hd, k, n, s.add(r * ld), ld);
            r += 3;
        }
        match rows - r {
            2 => qk_rows::<2>(q.add(r * hd), hd, k, n, s.add(r * ld), ld),
            1 => qk_rows::<1>(q.add(r * hd), hd, k, n, s.add(r * ld), ld),
            _ => {}
        }
    }

    /// R query rows against all n keys, four keys at a time.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn qk_rows<const R: usize>(
        q: *const f32,
        hd: usize,
        k: *const f32,
        n: usize,
        s: *mut f32,
        ld: usize,
    ) {
        let d8 = hd & !7;
        let mut j = 0;
        while j + 4 <= n {
            let kj = k.add(j * hd);
            let mut acc = [[_mm256_setzero_ps(); 4]; R];
            let mut d = 0;
            while d < d8 {
                let mut qv = [_mm256_setzero_ps(); R];
                for rr in 0..R {
                    qv[rr] = _mm256_loadu_ps(q.add(rr * hd + d));
                }
                for t in 0..4 {
                    let kv = _mm256_loadu_ps(kj.add(t * hd + d));
                    for rr in 0..R {
                        acc[rr][t] = _mm256_fmadd_ps(qv[rr], kv, acc[rr][t]);
                    }
                }
                d += 8;
            }
            for rr in 0..R {
                let mut o = [0f32; 4];
                _mm_storeu_ps(o.as_mut_ptr(), hsum4(&acc[rr]));
                for (t, ot) in o.iter_mut().enumerate() {
                    for dd in d8..hd {
                        *ot += *q.add(rr * hd + dd) * *kj.add(t * hd + dd);
                    }
                }
                std::ptr::copy_nonoverlapping(o.as_ptr(), s.add(rr * ld + j), 4);
            }
            j += 4;
        }
        while j < n {
            let kj = k.add(j * hd);
            let mut acc = [_mm256_setzero_ps(); R];
            let mut d = 0;
            while d < d8 {
                let kv = _mm256_loadu_ps(kj.add(d));
                for rr in 0..R {
                    acc[rr] = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(rr * hd + d)), kv, acc[rr]);
                }
                d += 8;
            }
            for rr in 0..R {
                // Summed as the keys of a group of four are (lane 0 of `hsum4`): a key's score
                // has the same bits wherever the chunk or block boundaries put it.
                let z = _mm256_setzero_ps();
                let mut o = _mm_cvtss_f32(hsum4(&[acc[rr], z, z, z]));
                for dd in d8..hd {
                    o += *q.add(rr * hd + dd) * *kj.add(dd);
                }
                *s.add(rr * ld + j) = o;
            }
            j += 1;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pv(
        acc: *mut f32,
        rows: usize,
        hd: usize,
        alpha: *const f32,
        rescale: bool,
        p: *const f32,
        ld: usize,
        v: *const f32,
        n: usize,
    ) {
        let mut r = 0;
        while r + 4 <= rows {
            pv_rows::<4>(
                acc.add(r * hd),
                hd,
                alpha.add(r),
                rescale,
                p.add(r * ld),
                ld,
                v,
                n,
                0,
            );
            r += 4;
        }
        let (a, pr) = (acc.add(r * hd), p.add(r * ld));
        match rows - r {
            3 => pv_rows::<3>(a, hd, alpha.add(r), rescale, pr, ld, v, n, 0),
            2 => pv_rows::<2>(a, hd, alpha.add(r), rescale, pr, ld, v, n, 0),
            1 => pv_rows::<1>(a, hd, alpha.add(r), rescale, pr, ld, v, n, 0),
            _ => {}
        }
    }

    /// R rows: acc_r = acc_r * alpha_r + Σ_j p_rj v_j, 16 then 8 columns at a time, from
    /// column `d0` on.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn pv_rows<const R: usize>(
        acc: *mut f32,
        hd: usize,
        alpha: *const f32,
        rescale: bool,
        p: *const f32,
        ld: usize,
        v: *const f32,
        n: usize,
        d0: usize,
    ) {
        let mut al = [_mm256_set1_ps(1.0); R];
        if rescale {
            for rr in 0..R {
                al[rr] = _mm256_set1_ps(*alpha.add(rr));
            }
        }
        let mut d = d0;
        while d + 16 <= hd {
            let mut a = [[_mm256_setzero_ps(); 2]; R];
            for rr in 0..R {
                a[rr][0] = _mm256_mul_ps(_mm256_loadu_ps(acc.add(rr * hd + d)), al[rr]);
                a[rr][1] = _mm256_mul_ps(_mm256_loadu_ps(acc.add(rr * hd + d + 8)), al[rr]);
            }
            for j in 0..n {
                let v0 = _mm256_loadu_ps(v.add(j * hd + d));
                let v1 = _mm256_loadu_ps(v.add(j * hd + d + 8));
                for rr in 0..R {
                    let pb = _mm256_broadcast_ss(&*p.add(rr * ld + j));
                    a[rr][0] = _mm256_fmadd_ps(pb, v0, a[rr][0]);
                    a[rr][1] = _mm256_fmadd_ps(pb, v1, a[rr][1]);
                }
            }
            for rr in 0..R {
                _mm256_storeu_ps(acc.add(rr * hd + d), a[rr][0]);
                _mm256_storeu_ps(acc.add(rr * hd + d + 8), a[rr][1]);
            }
            d += 16;
        }
        if d + 8 <= hd {
            let mut a = [_mm256_setzero_ps(); R];
            for rr in 0..R {
                a[rr] = _mm256_mul_ps(_mm256_loadu_ps(acc.add(rr * hd + d)), al[rr]);
            }
            for j in 0..n {
                let v0 = _mm256_loadu_ps(v.add(j * hd + d));
                for rr in 0..R {
                    a[rr] = _mm256_fmadd_ps(_mm256_broadcast_ss(&*p.add(rr * ld + j)), v0, a[rr]);
                }
            }
            for rr in 0..R {
                _mm256_storeu_ps(acc.add(rr * hd + d), a[rr]);
            }
            d += 8;
        }
        if d < hd {
            for rr in 0..R {
                let a = if rescale { *alpha.add(rr) } else { 1.0 };
                for dd in d..hd {
                    let mut x = *acc.add(rr * hd + dd) * a;
                    for j in 0..n {
                        x += *p.add(rr * ld + j) * *v.add(j * hd + dd);
                    }
                    *acc.add(rr * hd + dd) = x;
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn row_max(x: &[f32]) -> f32 {
        let n = x.len();
        let ptr = x.as_ptr();
        let mut m = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut j = 0;
        while j + 8 <= n {
            m = _mm256_max_ps(m, _mm256_loadu_ps(ptr.add(j)));
            j += 8;
        }
        let mut t = [0f32; 8];
        _mm256_storeu_ps(t.as_mut_ptr(), m);
        let mut r = t.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for &v in &x[j..] {
            r = r.max(v);
        }
        r
    }

    use crate::kernels::simd::exp8 as exp;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_sum(x: &mut [f32], mx: f32) -> f32 {
        let n = x.len();
        let ptr = x.as_mut_ptr();
        let mv = _mm256_set1_ps(mx);
        let mut sum = _mm256_setzero_ps();
        let mut j = 0;
        while j + 8 <= n {
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(ptr.add(j)), mv));
            _mm256_storeu_ps(ptr.add(j), e);
            sum = _mm256_add_ps(sum, e);
            j += 8;
        }
        let mut s = hsum(sum);
        for v in &mut x[j..] {
            *v = (*v - mx).exp();
            s += *v;
        }
        s
    }

    #[cfg(test)]
    pub(super) fn exp_slice(x: &mut [f32]) {
        for c in x.chunks_exact_mut(8) {
            // SAFETY: test helper, called only when avx2 and fma are available.
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), exp(_mm256_loadu_ps(c.as_ptr()))) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn f(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    struct Case {
        nh: usize,
        nkv: usize,
        hd: usize,
        bs: usize,
        window: Option<usize>,
        alibi: bool,
        /// Falcon's bfloat16-rounded ALiBi products, with this factor.
        alibi_bf16: Option<f32>,
        /// (past, q_len) per sequence.
        seqs: Vec<(usize, usize)>,
        /// Query magnitude: larger makes the softmax peakier.
        qscale: f32,
    }

    fn case(nh: usize, nkv: usize, hd: usize, bs: usize, seqs: &[(usize, usize)]) -> Case {
        Case {
            nh,
            nkv,
            hd,
            bs,
            window: None,
            alibi: false,
            alibi_bf16: None,
            seqs: seqs.to_vec(),
            qscale: 2.0,
        }
    }

    struct Data {
        slopes: Vec<f32>,
        tables: Vec<Vec<u32>>,
        q: Vec<f32>,
        q_stride: usize,
        k: Vec<f32>,
        v: Vec<f32>,
        out_stride: usize,
        rows: usize,
    }

    fn make(c: &Case, seed: u64) -> Data {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let need: Vec<usize> = c
            .seqs
            .iter()
            .map(|&(p, n)| (p + n).div_ceil(c.bs))
            .collect();
        let num_blocks = need.iter().sum::<usize>() + 5;
        let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..ids.len()).rev() {
            ids.swap(i, rng.below(i + 1));
        }
        let mut it = ids.into_iter();
        let tables: Vec<Vec<u32>> = need
            .iter()
            .map(|&n| (0..n).map(|_| it.next().unwrap()).collect())
            .collect();
        let rows: usize = c.seqs.iter().map(|s| s.1).sum::<usize>() + 2;
        let q_stride = c.nh * c.hd + 2 * c.nkv * c.hd + 3;
        let q = (0..rows * q_stride).map(|_| rng.f() * c.qscale).collect();
        let pool = num_blocks * c.nkv * c.bs * c.hd;
        let k = (0..pool).map(|_| rng.f()).collect();
        let v = (0..pool).map(|_| rng.f()).collect();
        let slopes = (0..c.nh).map(|h| 0.5f32.powi(h as i32 + 1)).collect();
        Data {
            slopes,
            tables,
            q,
            q_stride,
            k,
            v,
            out_stride: c.nh * c.hd + 5,
            rows,
        }
    }

    fn attn_seqs<'a>(c: &Case, d: &'a Data) -> Vec<AttnSeq<'a>> {
        // One empty row before the first sequence; sequences packed after it.
        let mut start = 1;
        c.seqs
            .iter()
            .zip(&d.tables)
            .map(|(&(past, q_len), t)| {
                let s = AttnSeq {
                    q_start: start,
                    q_len,
                    past,
                    blocks: t,
                };
                start += q_len;
                s
            })
            .collect()
    }

    fn params<'a>(c: &Case, d: &'a Data) -> AttnParams<'a> {
        AttnParams {
            num_heads: c.nh,
            num_kv_heads: c.nkv,
            head_dim: c.hd,
            block_size: c.bs,
            scale: 1.0 / (c.hd as f32).sqrt(),
            window: c.window,
            alibi: if c.alibi { Some(&d.slopes) } else { None },
            alibi_bf16: c.alibi_bf16,
            softcap: None,
        }
    }

    /// Plain loops, f64, materialized scores.
    fn reference(c: &Case, d: &Data) -> Vec<f32> {
        let p = params(c, d);
        let seqs = attn_seqs(c, d);
        let mut out = vec![f32::NAN; d.rows * d.out_stride];
        let group = c.nh / c.nkv;
        for s in &seqs {
            for i in 0..s.q_len {
                let pos = s.past + i;
                for h in 0..c.nh {
                    let g = h / group;
                    let qv = &d.q[(s.q_start + i) * d.q_stride + h * c.hd..][..c.hd];
                    let kv_at = |buf: &[f32], j: usize| -> Vec<f64> {
                        let b = s.blocks[j / c.bs] as usize;
                        let o = ((b * c.nkv + g) * c.bs + j % c.bs) * c.hd;
                        buf[o..o + c.hd].iter().map(|&x| x as f64).collect()
                    };
                    let mut scores = Vec::new();
                    for j in 0..=pos {
                        if let Some(w) = c.window {
                            if pos - j >= w {
                                continue;
                            }
                        }
                        let kj = kv_at(&d.k, j);
                        let mut sc: f64 = qv.iter().zip(&kj).map(|(&a, b)| a as f64 * b).sum();
                        sc *= p.scale as f64;
                        if c.alibi {
                            sc += match c.alibi_bf16 {
                                None => d.slopes[h] as f64 * j as f64,
                                Some(f) => {
                                    let prod = d.slopes[h] as f64
                                        * crate::config::round_bf16(j as f32) as f64;
                                    crate::config::round_bf16(prod as f32) as f64 * f as f64
                                }
                            };
                        }
                        scores.push((j, sc));
                    }
                    let mx = scores.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = scores.iter().map(|x| (x.1 - mx).exp()).sum();
                    let mut o = vec![0f64; c.hd];
                    for &(j, sc) in &scores {
                        let w = (sc - mx).exp() / z;
                        for (od, vd) in o.iter_mut().zip(kv_at(&d.v, j)) {
                            *od += w * vd;
                        }
                    }
                    let dst = &mut out[(s.q_start + i) * d.out_stride + h * c.hd..][..c.hd];
                    for (x, y) in dst.iter_mut().zip(o) {
                        *x = y as f32;
                    }
                }
            }
        }
        out
    }

    fn isas() -> Vec<Isa> {
        let mut v = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        match detect_isa() {
            Isa::Avx2 => v.push(Isa::Avx2),
            Isa::Avx512 => v.extend([Isa::Avx2, Isa::Avx512]),
            Isa::Scalar => {}
        }
        v
    }

    fn check_with(c: &Case, seed: u64, ex: Exec) -> Vec<f32> {
        let d = make(c, seed);
        let want = reference(c, &d);
        let p = params(c, &d);
        let seqs = attn_seqs(c, &d);
        let mut out = vec![f32::NAN; d.rows * d.out_stride];
        run(
            &p,
            &seqs,
            &d.q,
            d.q_stride,
            &d.k,
            &d.v,
            &mut out,
            d.out_stride,
            ex,
        );
        for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
            let ok = if w.is_nan() {
                g.is_nan()
            } else {
                (g - w).abs() <= 1e-5 + 1e-5 * w.abs()
            };
            assert!(
                ok,
                "{ex:?} seed {seed}: index {i} (row {}, col {}): got {g}, want {w}",
                i / d.out_stride,
                i % d.out_stride
            );
        }
        out
    }

    /// Every ISA, automatic and forced inline / parallel execution, and key splits where they apply.
    fn check(c: &Case) {
        // The 16-lane products give the AVX2 kernel's bits, inline, parallel and split.
        #[cfg(target_arch = "x86_64")]
        if isas().contains(&Isa::Avx512) {
            for (parallel, split) in [(None, None), (Some(false), None), (Some(true), Some(true))] {
                let ex = |isa| Exec {
                    isa,
                    parallel,
                    split,
                };
                let bits = |v: Vec<f32>| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(check_with(c, 99, ex(Isa::Avx2))),
                    bits(check_with(c, 99, ex(Isa::Avx512))),
                    "AVX-512 and AVX2 attention differ ({parallel:?}, {split:?})"
                );
            }
        }
        // Inline, parallel and split over the key range: the same bits (keys are summed in
        // the same granules, folded in the same order), so results do not depend on the batch
        // or the thread count.
        for (n, isa) in isas().into_iter().enumerate() {
            let seed = 7 + n as u64;
            let bits = |ex: Exec| -> Vec<u32> {
                check_with(c, seed, ex)
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            };
            let want = bits(Exec::auto(isa));
            let mut modes = vec![(Some(false), None), (Some(true), None)];
            if c.seqs.iter().all(|s| s.1 * (c.nh / c.nkv) <= MAX_ROWS) {
                modes.extend([(Some(true), Some(true)), (Some(false), Some(true))]);
            }
            for (parallel, split) in modes {
                let ex = Exec {
                    isa,
                    parallel,
                    split,
                };
                assert_eq!(
                    bits(ex),
                    want,
                    "{ex:?}: bits differ from {:?}",
                    Exec::auto(isa)
                );
            }
        }
    }

    const RAGGED: &[(usize, usize)] = &[(0, 7), (5, 1), (17, 1), (31, 9), (0, 1)];

    #[test]
    fn ragged_gqa_block16() {
        check(&case(6, 2, 64, 16, RAGGED));
    }

    #[test]
    fn ragged_gqa_block32_and_4() {
        check(&case(6, 2, 64, 32, RAGGED));
        check(&case(6, 2, 64, 4, RAGGED));
    }

    #[test]
    fn mqa_and_mha() {
        check(&case(6, 1, 64, 16, RAGGED));
        check(&case(4, 4, 64, 16, RAGGED));
        check(&case(9, 3, 64, 16, RAGGED));
    }

    #[test]
    fn head_dims() {
        for hd in [8, 16, 32, 80, 96, 128, 3, 13, 29] {
            check(&case(6, 2, hd, 16, RAGGED));
        }
    }

    #[test]
    fn head_dim_256() {
        check(&case(4, 2, 256, 16, &[(0, 5), (40, 1), (70, 3)]));
    }

    #[test]
    fn sliding_window() {
        for (w, bs) in [(5, 16), (5, 4), (1, 4), (20, 8)] {
            let mut c = case(6, 2, 64, bs, RAGGED);
            c.window = Some(w);
            check(&c);
        }
        let mut c = case(6, 2, 32, 16, &[(300, 1), (100, 40), (0, 70)]);
        c.window = Some(37);
        check(&c);
        // Windows across granule boundaries, starting inside a granule.
        let mut c = case(6, 2, 32, 16, &[(900, 1), (500, 3), (230, 60)]);
        c.window = Some(300);
        check(&c);
    }

    /// A prompt prefilled in one call, in tiles, or token by token: the bits of every row
    /// are those of the row decoded alone, across granules.
    #[test]
    fn prefill_rows_equal_decoded_rows_across_granules() {
        let c = case(6, 2, 64, 16, &[(200, 400)]);
        let d = make(&c, 5);
        let p = params(&c, &d);
        let whole = {
            let mut out = vec![f32::NAN; d.rows * d.out_stride];
            let seqs = attn_seqs(&c, &d);
            paged_attention(
                &p,
                &seqs,
                &d.q,
                d.q_stride,
                &d.k,
                &d.v,
                &mut out,
                d.out_stride,
            );
            out
        };
        let seqs = attn_seqs(&c, &d);
        let base = &seqs[0];
        for t in [0, 55, 56, 57, 311, 399] {
            let one = AttnSeq {
                q_start: base.q_start + t,
                q_len: 1,
                past: base.past + t,
                blocks: base.blocks,
            };
            let mut out = vec![f32::NAN; d.rows * d.out_stride];
            paged_attention(
                &p,
                &[one],
                &d.q,
                d.q_stride,
                &d.k,
                &d.v,
                &mut out,
                d.out_stride,
            );
            let row = |o: &[f32]| -> Vec<u32> {
                o[(base.q_start + t) * d.out_stride..][..c.nh * c.hd]
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            };
            assert_eq!(row(&out), row(&whole), "token {t}");
        }
    }

    #[test]
    fn alibi() {
        let mut c = case(6, 6, 64, 16, RAGGED);
        c.alibi = true;
        check(&c);
        let mut c = case(8, 2, 32, 16, &[(200, 1), (60, 30)]);
        c.alibi = true;
        check(&c);
        let mut c = case(6, 2, 64, 16, RAGGED);
        c.alibi = true;
        c.window = Some(6);
        check(&c);
    }

    /// Falcon's bfloat16-rounded products slope × position, past position 256 where they
    /// stop being exact.
    #[test]
    fn alibi_bf16_products() {
        let mut c = case(4, 4, 32, 16, &[(300, 1), (250, 40), (0, 70)]);
        c.alibi = true;
        c.alibi_bf16 = Some(0.1);
        check(&c);
        // The rounding, as torch computes `slopes.bfloat16() * arange` (positions cast first).
        assert_eq!(alibi_bf16_bias(0.25, 256), 64.0);
        assert_eq!(alibi_bf16_bias(0.25, 257), 64.0);
        assert_eq!(alibi_bf16_bias(0.25, 259), 65.0);
        assert_eq!(alibi_bf16_bias(0.5, 301), 150.0);
        let s = crate::config::round_bf16(0.3);
        assert_eq!(alibi_bf16_bias(s, 100), 30.125);
    }

    #[test]
    fn long_prefill_tiles() {
        let c = case(6, 2, 64, 16, &[(300, 200)]);
        for isa in isas() {
            check_with(&c, 3, Exec::auto(isa));
            check_with(
                &c,
                3,
                Exec {
                    isa,
                    parallel: Some(true),
                    split: None,
                },
            );
        }
        check(&case(9, 3, 64, 16, &[(0, 130), (40, 1)]));
    }

    #[test]
    fn long_decode_split() {
        check(&case(9, 3, 64, 16, &[(1500, 1)]));
        check(&case(6, 2, 80, 32, &[(700, 1), (5, 0), (900, 2), (3, 1)]));
    }

    #[test]
    fn many_heads_per_kv_head() {
        // group 71 > MAX_ROWS: heads split into chunks.
        check(&case(71, 1, 16, 16, &[(0, 3), (20, 1)]));
        check(&case(128, 2, 8, 8, &[(10, 2), (0, 1)]));
    }

    #[test]
    fn peaky_and_flat_softmax() {
        let mut c = case(6, 2, 64, 16, RAGGED);
        c.qscale = 30.0;
        check(&c);
        c.qscale = 0.0;
        check(&c);
    }

    #[test]
    fn unsorted_rows_and_empty_seqs() {
        let c = case(6, 2, 64, 16, &[(4, 3), (0, 0), (9, 1)]);
        let d = make(&c, 1);
        let want = reference(&c, &d);
        let p = params(&c, &d);
        let mut seqs = attn_seqs(&c, &d);
        seqs.reverse();
        let mut out = vec![f32::NAN; d.rows * d.out_stride];
        paged_attention(
            &p,
            &seqs,
            &d.q,
            d.q_stride,
            &d.k,
            &d.v,
            &mut out,
            d.out_stride,
        );
        for (&g, &w) in out.iter().zip(&want) {
            assert!(if w.is_nan() {
                g.is_nan()
            } else {
                (g - w).abs() <= 1e-5 + 1e-5 * w.abs()
            });
        }
    }

    #[test]
    #[should_panic(expected = "overlap")]
    fn overlapping_rows_panic() {
        let c = case(2, 1, 8, 4, &[(0, 3), (0, 2)]);
        let d = make(&c, 1);
        let p = params(&c, &d);
        let mut seqs = attn_seqs(&c, &d);
        seqs[1].q_start = 2;
        seqs.swap(0, 1);
        let mut out = vec![0.0; d.rows * d.out_stride];
        paged_attention(
            &p,
            &seqs,
            &d.q,
            d.q_stride,
            &d.k,
            &d.v,
            &mut out,
            d.out_stride,
        );
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn bad_block_id_panics() {
        let c = case(2, 1, 8, 4, &[(0, 3)]);
        let d = make(&c, 1);
        let p = params(&c, &d);
        let bad = [10_000u32];
        let seqs = [AttnSeq {
            q_start: 0,
            q_len: 3,
            past: 0,
            blocks: &bad,
        }];
        let mut out = vec![0.0; d.rows * d.out_stride];
        paged_attention(
            &p,
            &seqs,
            &d.q,
            d.q_stride,
            &d.k,
            &d.v,
            &mut out,
            d.out_stride,
        );
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_accuracy() {
        if detect_isa() != Isa::Avx2 {
            return;
        }
        let xs: Vec<f32> = (0..8000).map(|i| -80.0 + i as f32 * 0.01).collect();
        let mut ys = xs.clone();
        avx2::exp_slice(&mut ys);
        for (&x, &y) in xs.iter().zip(&ys) {
            let e = (x as f64).exp();
            assert!(
                ((y as f64) - e).abs() <= 4e-7 * e,
                "exp({x}) = {y}, want {e}"
            );
        }
    }
}
