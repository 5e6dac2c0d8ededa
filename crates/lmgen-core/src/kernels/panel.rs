//! `out[m, n] = x[m, k] · w[n, k]ᵀ` for many rows on AVX-512, as outer products over packed
//! panels (the BLIS / OpenBLAS layout), with every element summed in exactly the order of the
//! streaming decode kernel ([`super::dotgemm`] explains that order: 16 lanes, lane `l` taking
//! `k ≡ l mod 16` by fused multiply-adds in order of `k`, an 8-wide remainder in lanes 0-7,
//! the fold `(l, l + 8)`, `(l, l + 4)`, `(l, l + 2)`, `(l, l + 1)`, the last `k mod 8`
//! products added one by one).
//!
//! The dot-product tiles of `dotgemm` keep one register per sum, 16 lanes along `k`, and fold
//! the lanes at the end of each tile. Here a lane of a register is an output column instead:
//! the 16 lane sums of an element are 16 separate outer-product passes, pass `l` over the
//! values `k = l, l + 16, l + 32, …` (a product over `k / 16` values), and the fold adds whole
//! registers of 16 outputs, pass to pass, in the lanes' tree order. Both operands are first
//! copied in that order of `k` ("packed"): the input rows 8 at a time (`[k][8]`), the weight
//! rows 48 at a time (`[k][48]`, widened there from bf16 / f16), with 16 × 16 register
//! transposes. The 8 × 48 register tile (24 accumulators) then does 24 fused multiply-adds
//! per 8 broadcasts and 3 loads: on one thread about 75 % of the machine's FMA peak (112–123
//! of ~155 GF/s at 512 × 576 × 576), where the dot tiles reach about 60 % (`examples/
//! gemm_micro.rs`; BENCHMARKS.md, "Packed-panel GEMM").
use super::matmul::{OutPtr, WRows};
use super::pool;
use super::wide::WSlice;
use std::cell::RefCell;

/// Lanes of a register: rows a pack transposes at once (two tiles of input rows).
const LANES: usize = 16;
/// Rows of a register tile (input rows).
const MR: usize = 8;
/// Columns of a register tile (weight rows), three registers: one packed panel.
const NR: usize = 48;
/// From this many rows products take this kernel (below, `dotgemm`'s tiles, which
/// need no packing and waste no padded rows). Two threads, three alternating rounds, GF/s
/// dot tiles → panels, `k` × `n` = 576 × 960 (a fused QKV): 17 rows 112–127 → 56–84, 24 rows
/// 117–128 → 108–120, 32 rows 114–136 → 124–132, 64 rows 126–134 → 138–145, 128 rows
/// 127–148 → 146–158, 256 rows 132–137 → 139–173; 128 × 1,536 × 576 (the down projection)
/// 111–116 → 156–179.
pub(crate) const MIN_ROWS: usize = 32;
/// Bytes of packed input rows that a task's panels pass over before the next block (they
/// stay in L2 while each panel, packed once per block, stays in L1/L2).
const ROW_BLOCK_BYTES: usize = 1 << 20;
/// Fewest tiles of input rows a packed panel serves before it is packed again.
const MIN_BLOCK: usize = 16;
/// Bytes of a packed panel up to which a tile runs all its passes before the next tile.
const PANEL_L2_BYTES: usize = 512 << 10;

/// The lanes in the order their passes run: bit-reversed, so that the fold is a binary
/// counter (after pass `t`, the sums of the passes whose index shares `t`'s high bits are
/// added, as the lane tree adds them).
const ORDER: [usize; 16] = [0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15];

/// Where each lane's values of `k` lie in a packed operand: lane `l`'s `len[l]` values from
/// position `off[l]` (value `i` of lane `l` is `k = l + 16 i`); entry 16 is the `k mod 8`
/// tail, added one by one after the fold.
struct Layout {
    off: [usize; 17],
    len: [usize; 17],
    /// Whole chunks of 16.
    chunks: usize,
}

impl Layout {
    fn new(k: usize) -> Self {
        let chunks = k / 16;
        let eight = k - chunks * 16 >= 8;
        let (mut off, mut len) = ([0; 17], [0; 17]);
        // Lanes laid out in the order their passes run: the kernel reads each operand
        // from start to end.
        let mut at = 0;
        for &l in &ORDER {
            len[l] = chunks + usize::from(eight && l < 8);
            off[l] = at;
            at += len[l];
        }
        off[16] = at;
        len[16] = k - at;
        Self { off, len, chunks }
    }

    /// The packed position of value `kk` from the last whole chunk on (`kk >= 16 chunks`).
    fn tail_pos(&self, kk: usize) -> usize {
        let r = kk - self.chunks * 16;
        let tail_from = self.chunks * 16 + (self.len[0] - self.chunks) * 8;
        if kk < tail_from {
            self.off[r] + self.chunks
        } else {
            self.off[16] + (kk - tail_from)
        }
    }
}

/// Whether this kernel runs on this CPU (AVX-512F, with AVX2 and FMA).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::simd::has_avx2_fma() && is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// A raw pointer shared by tasks that read it, or write disjoint parts of it.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: used while the buffer it points into is borrowed by the caller; tasks write
// disjoint ranges, and read only after the writing tasks have finished.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    /// Value `i` on (not dereferenced here).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

thread_local! {
    /// The packed input rows (on the calling thread) and a task's packed panel (on each
    /// thread): grown, never shrunk, so a job's steps allocate nothing.
    static PACKED_X: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `f` with `len` values of this thread's buffer `key`, starting on a cache line (a panel's
/// rows of 48 values are then 3 whole lines: no load or store splits a line).
fn with_buf<R>(
    key: &'static std::thread::LocalKey<RefCell<Vec<f32>>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    let aligned = |v: &mut Vec<f32>| {
        if v.len() < len + 16 {
            v.resize(len + 16, 0.0);
        }
        let skip = v.as_ptr().align_offset(64).min(15);
        skip..skip + len
    };
    key.with(|b| match b.try_borrow_mut() {
        Ok(mut v) => {
            let r = aligned(&mut v);
            f(&mut v[r])
        }
        Err(_) => {
            let mut v = Vec::new();
            let r = aligned(&mut v);
            f(&mut v[r])
        }
    })
}

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` (dims checked by the caller; `out` overwritten), each
/// element the bits of the streaming kernel. The caller checks [`available`].
pub(crate) fn gemm(x: &[f32], m: usize, k: usize, w: WRows, n: usize, out: &mut [f32]) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        out.fill(0.0);
        return;
    }
    let ly = Layout::new(k);
    let tiles = m.div_ceil(MR);
    // Input rows are packed `LANES` at a time (two tiles).
    let pairs = tiles.div_ceil(2);
    with_buf(&PACKED_X, pairs * 2 * MR * k, |xp| {
        let xs = Shared(xp.as_mut_ptr());
        let pack_tasks = (4 * pool::threads()).min(pairs);
        pool::for_each(pack_tasks, |t| {
            for p in pairs * t / pack_tasks..pairs * (t + 1) / pack_tasks {
                let rows: [WSlice; 16] = std::array::from_fn(|r| {
                    let i = p * LANES + r;
                    WSlice::F32(if i < m { &x[i * k..(i + 1) * k] } else { &[] })
                });
                // SAFETY: pair p's 2 MR × k values (tiles 2p and 2p + 1) are inside `xp`
                // (pairs × 2 MR × k) and written by this task only; the caller checked
                // `available()`.
                unsafe { pack512(&rows, k, &ly, xs.at(p * 2 * MR * k), true) };
            }
        });
        let y = OutPtr::new(out);
        let panels = n.div_ceil(NR);
        let tasks = (4 * pool::threads()).min(panels);
        // At least MIN_BLOCK tiles, so that packing a panel stays a small part of the work
        // where rows are long.
        let block = (ROW_BLOCK_BYTES / (MR * k * 4)).max(MIN_BLOCK);
        // Passes a tile runs before the next tile takes its turn: all 16 where the packed
        // panel stays in L2; else one, so that a pass's part of the panel (a 16th) stays in
        // L2 while every tile of the block runs that pass (the tiles' unfinished sums wait in
        // `state`). One thread, alternating: 512 × 576 × 576 95 / 90 GF/s all passes at once
        // against 87 / 83 in groups of 4; 256 × 11,008 × 512 69 / 60 at once against
        // 82 / 70 one pass at a time.
        let group = if ly.len[0] * 16 * NR * 4 <= PANEL_L2_BYTES {
            16
        } else {
            1
        };
        let state = 4 * MR * NR;
        pool::for_each(tasks, |t| {
            with_buf(&PANEL, NR * k + block * state, |buf| {
                let (wp, st) = buf.split_at_mut(NR * k);
                let (p0, p1) = (panels * t / tasks, panels * (t + 1) / tasks);
                let mut t0 = 0;
                while t0 < tiles {
                    let t1 = (t0 + block).min(tiles);
                    for p in p0..p1 {
                        let j = p * NR;
                        let nt = (n - j).min(NR);
                        for g in 0..3 {
                            let rows: [WSlice; 16] = std::array::from_fn(|r| {
                                let c = g * LANES + r;
                                if c < nt {
                                    w.run(j + c).0.range(0, k)
                                } else {
                                    WSlice::F32(&[])
                                }
                            });
                            // SAFETY: the panel buffer holds NR × k values; LANES
                            // g·LANES.. of each position; `available()` checked.
                            unsafe {
                                pack512(&rows, k, &ly, wp.as_mut_ptr().add(g * LANES), false)
                            };
                        }
                        for first in (0..16).step_by(group) {
                            for tile in t0..t1 {
                                let i = tile * MR;
                                let run = Run {
                                    passes: first..first + group,
                                    state: st.as_mut_ptr().wrapping_add((tile - t0) * state),
                                    out: y.at(i * n + j),
                                    ldo: n,
                                    mt: (m - i).min(MR),
                                    nt,
                                };
                                let xt = xs.at(tile * MR * k);
                                // SAFETY: tile `tile` of the packed rows (MR × k values,
                                // written before this region); out rows i..i + mt, columns
                                // j..j + nt are in [m, n] and in this task's panels only;
                                // the tile's fold state (4 MR × NR values) is in `st`,
                                // written by its earlier passes; `available()` checked.
                                unsafe { kernel(&ly, xt, wp.as_ptr(), run) };
                            }
                        }
                    }
                    t0 = t1;
                }
            })
        });
    });
}

/// What a kernel call computes of one `mt × nt` tile (`mt <= mr`, `nt <= nr`): passes
/// `passes` (indices into [`ORDER`]), each folded as it finishes with the sums waiting in
/// `state` (4 mr × nr values); after the last pass, the tail and the output (`mt` rows of
/// stride `ldo` from `out`, `nt` values each).
struct Run {
    passes: std::ops::Range<usize>,
    state: *mut f32,
    out: *mut f32,
    ldo: usize,
    mt: usize,
    nt: usize,
}

/// The value at `kk` of a row (an empty row is zeros).
fn value(row: &WSlice, kk: usize) -> f32 {
    match *row {
        WSlice::F32(s) => s.get(kk).copied().unwrap_or(0.0),
        WSlice::Bf16(s) => super::simd::bf16_to_f32(s[kk]),
        WSlice::F16(s) => super::simd::f16_to_f32(s[kk]),
    }
}

/// The last `k mod 16` values of `rows` one by one, where [`pack512`] places them.
///
/// # Safety
/// As the pack functions.
unsafe fn pack_tail(rows: &[WSlice], k: usize, ly: &Layout, dst: *mut f32, split: bool) {
    for kk in ly.chunks * 16..k {
        let pos = ly.tail_pos(kk);
        for (r, row) in rows.iter().enumerate() {
            let (tile, lane) = if split { (r / MR, r % MR) } else { (0, r) };
            let width = if split { MR } else { NR };
            // SAFETY: inside the layout the caller provides room for.
            unsafe { *dst.add(tile * MR * k + pos * width + lane) = value(row, kk) };
        }
    }
}

/// Packs 16 rows of `k` values (an empty slice is a row of zeros) into the order of
/// [`Layout`] (AVX-512). Input rows (`split`): lanes 0-7 to the tile at `dst` (`[k][8]`), lanes 8-15 to
/// the next tile (`dst + 8 k`). Weight rows: the 16 lanes at `dst` of each position of a
/// `[k][48]` panel.
///
/// # Safety
/// AVX-512F; non-empty rows hold `k` values; `dst` has room for the layout described.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn pack512(rows: &[WSlice; 16], k: usize, ly: &Layout, dst: *mut f32, split: bool) {
    use std::arch::x86_64::*;
    let store = |pos: usize, v: __m512| {
        if split {
            let lo = _mm512_castps512_ps256(v);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            _mm256_storeu_ps(dst.add(pos * MR), lo);
            _mm256_storeu_ps(dst.add(MR * k + pos * MR), hi);
        } else {
            _mm512_storeu_ps(dst.add(pos * NR), v);
        }
    };
    let load = |r: usize, at: usize| -> __m512 {
        match rows[r] {
            WSlice::F32([]) => _mm512_setzero_ps(),
            WSlice::F32(s) => _mm512_loadu_ps(s.as_ptr().add(at)),
            WSlice::Bf16(s) => {
                let h = _mm256_loadu_si256(s.as_ptr().add(at) as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            }
            WSlice::F16(s) => {
                _mm512_cvtph_ps(_mm256_loadu_si256(s.as_ptr().add(at) as *const __m256i))
            }
        }
    };
    for c in 0..ly.chunks {
        let mut v: [__m512; 16] = std::array::from_fn(|r| load(r, c * 16));
        transpose16(&mut v);
        for (l, &vl) in v.iter().enumerate() {
            store(ly.off[l] + c, vl);
        }
    }
    pack_tail(rows, k, ly, dst, split);
}

/// `v[r]` (16 values of row `r`) → `v[c]` (value `c` of the 16 rows).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose16(v: &mut [std::arch::x86_64::__m512; 16]) {
    use std::arch::x86_64::*;
    // 32-bit pairs: t[2i] lane q = rows 2i, 2i + 1 at columns 4q, 4q + 1; t[2i + 1] at
    // 4q + 2, 4q + 3.
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]);
    }
    // 64-bit pairs: u[4i + c] lane q = rows 4i..4i + 4 at column 4q + c.
    let mut u = [_mm512_setzero_ps(); 16];
    for i in 0..4 {
        let pd = |a: __m512| _mm512_castps_pd(a);
        let (a, b, c, d) = (
            pd(t[4 * i]),
            pd(t[4 * i + 1]),
            pd(t[4 * i + 2]),
            pd(t[4 * i + 3]),
        );
        u[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        u[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        u[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        u[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    // 128-bit lanes, twice: column c, 8 + c, 4 + c, 12 + c of all 16 rows.
    for c in 0..4 {
        let a = _mm512_shuffle_f32x4::<0x88>(u[c], u[4 + c]);
        let b = _mm512_shuffle_f32x4::<0xdd>(u[c], u[4 + c]);
        let e = _mm512_shuffle_f32x4::<0x88>(u[8 + c], u[12 + c]);
        let f = _mm512_shuffle_f32x4::<0xdd>(u[8 + c], u[12 + c]);
        v[c] = _mm512_shuffle_f32x4::<0x88>(a, e);
        v[8 + c] = _mm512_shuffle_f32x4::<0xdd>(a, e);
        v[4 + c] = _mm512_shuffle_f32x4::<0x88>(b, f);
        v[12 + c] = _mm512_shuffle_f32x4::<0xdd>(b, f);
    }
}

/// One call of a tile's passes (see [`Run`]) on a packed tile of input rows and a packed
/// panel.
///
/// # Safety
/// AVX-512F; `xp` an `[k][MR]` tile and `wp` a `[k][NR]` panel in `ly`'s order;
/// `run.state` holds 4 MR × NR values, as the tile's earlier passes
/// left them; `run.out` has `mt` rows of stride `ldo` with `nt` writable values each.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::needless_range_loop)] // register tiles indexed by row and column
unsafe fn kernel(ly: &Layout, xp: *const f32, wp: *const f32, run: Run) {
    use std::arch::x86_64::*;
    const NV: usize = 3;
    let z = _mm512_setzero_ps();
    // Sums waiting for their partner in the fold, one slot per level of the tree.
    let slot = |level: usize, r: usize, v: usize| run.state.add(((level * MR + r) * NV + v) * 16);
    let mut acc = [[z; NV]; MR];
    for t in run.passes.clone() {
        let l = ORDER[t];
        acc = [[z; NV]; MR];
        let mut xq = xp.add(ly.off[l] * MR);
        let mut wq = wp.add(ly.off[l] * NR);
        for _ in 0..ly.len[l] {
            let wv: [__m512; NV] = std::array::from_fn(|v| _mm512_loadu_ps(wq.add(16 * v)));
            for r in 0..MR {
                let b = _mm512_set1_ps(*xq.add(r));
                for v in 0..NV {
                    acc[r][v] = _mm512_fmadd_ps(b, wv[v], acc[r][v]);
                }
            }
            xq = xq.add(MR);
            wq = wq.add(NR);
        }
        let mut level = 0;
        while (t >> level) & 1 == 1 {
            for r in 0..MR {
                for v in 0..NV {
                    acc[r][v] = _mm512_add_ps(_mm512_loadu_ps(slot(level, r, v)), acc[r][v]);
                }
            }
            level += 1;
        }
        if level < 4 {
            for r in 0..MR {
                for v in 0..NV {
                    _mm512_storeu_ps(slot(level, r, v), acc[r][v]);
                }
            }
        }
    }
    if run.passes.end < 16 {
        return;
    }
    // The last `k mod 8` products, one by one (rounded product, then the sum).
    let mut xq = xp.add(ly.off[16] * MR);
    let mut wq = wp.add(ly.off[16] * NR);
    for _ in 0..ly.len[16] {
        for r in 0..MR {
            let b = _mm512_set1_ps(*xq.add(r));
            for v in 0..NV {
                acc[r][v] =
                    _mm512_add_ps(acc[r][v], _mm512_mul_ps(b, _mm512_loadu_ps(wq.add(16 * v))));
            }
        }
        xq = xq.add(MR);
        wq = wq.add(NR);
    }
    for r in 0..run.mt {
        for v in 0..NV {
            let c = run.nt.saturating_sub(16 * v).min(16);
            let at = run.out.add(r * run.ldo + 16 * v);
            if c == 16 {
                _mm512_storeu_ps(at, acc[r][v]);
            } else if c > 0 {
                _mm512_mask_storeu_ps(at, ((1u32 << c) - 1) as __mmask16, acc[r][v]);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: &Layout, _: *const f32, _: *const f32, _: Run) {
    unreachable!("no AVX-512 on this architecture")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::matmul_wt_small;
    use crate::kernels::matmul::tests::{halves, rand_vec};

    /// Each element has the streaming kernel's bits: `k` with and without 16-, 8- and 1-wide
    /// remainders, rows and columns cut at every tile edge, weights whole, in parts cut inside
    /// panels, and as bf16 / f16 (widened while packed).
    #[test]
    fn elements_equal_streaming_kernel_bit_for_bit() {
        if !available() {
            eprintln!("no AVX-512F on this CPU: nothing to compare");
            return;
        }
        for &(m, k, n) in &[
            (1, 16, 1),
            (5, 8, 7),
            (7, 11, 13),
            (17, 64, 33),
            (40, 576, 129),
            (129, 130, 67),
            (23, 1549, 31),
            (9, 2064, 49),
            (19, 2741, 60),
            (140, 3000, 50),
            (64, 24, 96),
            (33, 31, 100),
            (300, 200, 500),
        ] {
            let x = rand_vec(m * k, 7 + m as u32);
            let w = rand_vec(n * k, 8 + k as u32);
            let check = |w32: &[f32], parts: &[WSlice], what: &str| {
                let mut want = Vec::with_capacity(m * n);
                for i in 0..m {
                    want.extend(matmul_wt_small(&x[i * k..(i + 1) * k], 1, k, w32, n, None));
                }
                let mut out = vec![f32::NAN; m * n];
                gemm(&x, m, k, WRows::one(parts, k), n, &mut out);
                for (i, (g, e)) in out.iter().zip(&want).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        e.to_bits(),
                        "{what} m={m} k={k} n={n} at ({}, {}): {g} vs {e}",
                        i / n,
                        i % n
                    );
                }
            };
            let (a, b) = (1.min(n) * k, (n / 2 + 1).min(n) * k);
            check(&w, &[WSlice::F32(&w)], "whole");
            check(
                &w,
                &[
                    WSlice::F32(&w[..a]),
                    WSlice::F32(&w[a..b]),
                    WSlice::F32(&w[b..]),
                ],
                "parts",
            );
            let (bf, hf) = halves(&w);
            let bf32 = WSlice::Bf16(&bf).to_f32_vec();
            let hf32 = WSlice::F16(&hf).to_f32_vec();
            check(
                &bf32,
                &[WSlice::Bf16(&bf[..a]), WSlice::Bf16(&bf[a..])],
                "bf16",
            );
            check(
                &hf32,
                &[WSlice::F16(&hf[..b]), WSlice::F16(&hf[b..])],
                "f16",
            );
        }
    }

    #[test]
    fn layout_places_every_value_once() {
        for k in [1, 7, 8, 15, 16, 17, 24, 31, 576, 1549] {
            let ly = Layout::new(k);
            let mut seen = vec![false; k];
            for l in 0..16 {
                for i in 0..ly.len[l] {
                    let pos = ly.off[l] + i;
                    assert!(!seen[pos], "k={k} position {pos} twice");
                    seen[pos] = true;
                    if l + 16 * i >= ly.chunks * 16 {
                        assert_eq!(ly.tail_pos(l + 16 * i), pos, "k={k}");
                    }
                }
            }
            for kk in ly.off[16]..k {
                assert!(!seen[kk]);
                seen[kk] = true;
            }
            assert!(seen.iter().all(|&s| s), "k={k}");
            let tail = k - ly.len[16];
            for kk in tail..k {
                assert_eq!(ly.tail_pos(kk), ly.off[16] + kk - tail, "k={k}");
            }
        }
    }
}
