//! `out[m, n] = x[m, k] · w[n, k]ᵀ` for many rows (prefill, large decode batches), with every
//! element summed in exactly the order of the streaming decode kernel ([`super::matmul`]'s
//! AVX2 tile): 16 partial sums (lane `l` takes `k ≡ l mod 16`, fused multiply-adds in order
//! of `k`), an 8-wide chunk left at the end going to lanes 0-7, the lanes folded as
//! `(l, l + 8)`, `(l, l + 4)`, `(l, l + 2)`, `(l, l + 1)`, then the last `k mod 8` products
//! added one by one. So:
//!
//! * a sequence's numbers do not depend on how many rows share its step (1 row or 512 give
//!   the same bits), and a prompt prefilled in one call equals the same tokens decoded;
//! * the AVX-512 kernel (one 16-lane register per sum) and the AVX2 kernel (two 8-lane
//!   registers per sum) give the same bits, so a cluster's AVX2 and AVX-512 nodes agree while
//!   the AVX-512 nodes run at twice the width.
//!
//! Neither operand is packed: both are read along `k` as they lie in memory (the weights in
//! place, however they were loaded), so a call allocates nothing. Register tiles of
//! `MR` rows × `NR` weight rows (AVX-512 4 × 6, AVX2 3 × 3 in two passes over the even and
//! odd 8-wide chunks); a task of the compute pool takes a block of weight rows and walks
//! blocks of input rows that stay in L2 while each weight tile stays in L1.
//! `examples/gemm_micro.rs` compares it with the `gemm` crate.
//!
//! On AVX-512, products of [`super::panel::MIN_ROWS`] rows or more go to [`super::panel`]
//! instead: outer products over packed copies of both operands, the same bits, 1.2–1.5× the
//! dot tiles from 64 rows on (`LMGEN_GEMM_ISA=avx512-dot` keeps the tiles, for comparisons).
use super::matmul::{OutPtr, WRows};
use super::pool;
use super::wide::with_scratch;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// Instruction set of the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

/// 0: not chosen yet; else `Isa as u8 + 1`.
static ISA: AtomicU8 = AtomicU8::new(0);

/// The instruction set in use: AVX-512F where the CPU has it, else AVX2 + FMA, else scalar
/// (without a vector kernel products go to the `gemm` crate, not bit-identical to these).
pub fn isa() -> Isa {
    match ISA.load(Ordering::Relaxed) {
        1 => Isa::Scalar,
        2 => Isa::Avx2,
        3 => Isa::Avx512,
        _ => {
            let isa = default_isa();
            ISA.store(isa as u8 + 1, Ordering::Relaxed);
            isa
        }
    }
}

/// The best the CPU has; `LMGEN_GEMM_ISA=avx512-dot|avx2|avx2-dot|scalar` caps the choice (the vector
/// kernels give the same bits; the scalar path is the `gemm` crate's).
fn default_isa() -> Isa {
    choose(std::env::var("LMGEN_GEMM_ISA").as_deref().unwrap_or(""))
}

/// The kernel `name` asks for, where the CPU has it, else the best it has; a `-dot` suffix
/// (`avx512-dot`, `avx2-dot`) keeps products of many rows on the dot-product tiles (no packed
/// panels).
fn choose(name: &str) -> Isa {
    let best = best_isa();
    let (name, tiles) = match name.strip_suffix("-dot") {
        Some(isa) => (isa, true),
        None => (name, false),
    };
    PANELS.store(!tiles, Ordering::Relaxed);
    match name {
        "scalar" => Isa::Scalar,
        "avx2" if best != Isa::Scalar => Isa::Avx2,
        _ => best,
    }
}

/// Whether products of [`super::panel::MIN_ROWS`] rows or more take the packed-panel kernel
/// ([`super::panel`]).
static PANELS: AtomicBool = AtomicBool::new(true);

fn best_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = super::simd::has_avx2_fma();
        if avx2 && is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// Chooses the instruction set (`"avx512"`, `"avx512-dot"`, `"avx2"`, `"avx2-dot"`, `"scalar"`; one the CPU
/// lacks gives the default), for side-by-side measurements and tests.
#[doc(hidden)]
pub fn set_isa(name: &str) {
    let isa = choose(name);
    ISA.store(isa as u8 + 1, Ordering::Relaxed);
}

/// Whether products of many rows take the packed-panel kernel with `isa` (AVX-512 only: on
/// AVX2 a 4 × 24 panel tile measured 0.7–0.9× the 3 × 3 dot tiles).
fn panels(isa: Isa) -> bool {
    isa == Isa::Avx512 && PANELS.load(Ordering::Relaxed) && super::panel::available()
}

/// The kernel that products of many rows take: `avx512 panels` ([`super::panel`]),
/// `avx512 tiles`, `avx2 tiles` (this module's dot-product tiles) or
/// `scalar` (the `gemm` crate).
pub fn large_kernel() -> String {
    let isa = isa();
    match (isa, panels(isa)) {
        (Isa::Scalar, _) => "scalar".into(),
        (_, true) => format!("{isa:?} panels").to_lowercase(),
        (_, false) => format!("{isa:?} tiles").to_lowercase(),
    }
}

/// Bytes of input rows kept in L2 while a task's weight rows stream past them (half of a
/// 2 MiB L2; 128 KiB to 1 MiB measured alike for SmolLM2's shapes).
const ROW_BLOCK_BYTES: usize = 1 << 20;

/// `out[m, n] = x[m, k] · w[n, k]ᵀ` (row-major, `out` overwritten; dims checked by the
/// caller). Returns `false` without touching `out` where there is no vector kernel.
pub(crate) fn dot_gemm(x: &[f32], m: usize, k: usize, w: WRows, n: usize, out: &mut [f32]) -> bool {
    dot_gemm_isa(isa(), x, m, k, w, n, out)
}

fn dot_gemm_isa(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: WRows,
    n: usize,
    out: &mut [f32],
) -> bool {
    if m >= super::panel::MIN_ROWS && panels(isa) {
        super::panel::gemm(x, m, k, w, n, out);
        return true;
    }
    dot_tiles(isa, x, m, k, w, n, out)
}

/// [`dot_gemm_isa`] on the dot-product tiles.
fn dot_tiles(isa: Isa, x: &[f32], m: usize, k: usize, w: WRows, n: usize, out: &mut [f32]) -> bool {
    let (mr, nr) = match isa {
        Isa::Avx512 => (4, 6),
        Isa::Avx2 => (3, 3),
        Isa::Scalar => return false,
    };
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 {
        out.fill(0.0);
        return true;
    }
    let mb = ((ROW_BLOCK_BYTES / (k * 4)) / mr * mr).max(mr);
    let col_tiles = n.div_ceil(nr);
    let tasks = (4 * pool::threads()).min(col_tiles).max(1);
    let y = OutPtr::new(out);
    let k16 = k / 16 * 16;
    // Long rows (AVX-512): `k` in parts, so that a weight tile's part stays in L1 while the
    // block's input rows pass it, the tiles' partial sums kept between parts.
    let kc = if isa == Isa::Avx512 && k >= K_BLOCK_MIN {
        K_BLOCK
    } else {
        k16.max(16)
    };
    let state_len = if kc < k16 {
        mb.div_ceil(mr) * mr * nr * 16
    } else {
        0
    };
    pool::for_each(tasks, |t| {
        with_scratch(w.scratch_for(nr), |buf| {
            with_state(state_len, |state| {
                let c0 = (col_tiles * t / tasks) * nr;
                let c1 = ((col_tiles * (t + 1) / tasks) * nr).min(n);
                let mut i0 = 0;
                while i0 < m {
                    let i1 = (i0 + mb).min(m);
                    let mut j = c0;
                    while j < c1 {
                        // A tile never spans two parts of `w`; bf16 / f16 rows are widened
                        // once per block of input rows into this thread's buffer.
                        let (run, left) = w.run(j);
                        let nt = (c1 - j).min(nr).min(left);
                        let run = run.range(0, nt * k).f32_in(buf);
                        let mut from = 0;
                        loop {
                            let to = (from + kc).min(k16);
                            let mut i = i0;
                            while i < i1 {
                                let mt = (i1 - i).min(mr);
                                let span = Span {
                                    from,
                                    to,
                                    state: state.as_mut_ptr().wrapping_add((i - i0) * nr * 16),
                                };
                                // SAFETY: rows i..i + mt of x ([m, k]) exist, and `run` holds
                                // nt rows of k (rows j..j + nt of w, checked by the caller to
                                // be [n, k]); out rows i..i + mt, columns j..j + nt are in this
                                // task's column block (c0..c1), written by no other task; the
                                // CPU has the ISA (`isa`); a partial span's state is this
                                // tile's own slot ((i - i0) / mr of mb / mr), written by the
                                // spans before it.
                                unsafe {
                                    tile(
                                        isa,
                                        mt,
                                        nt,
                                        x.as_ptr().add(i * k),
                                        run.as_ptr(),
                                        k,
                                        y.at(i * n + j),
                                        n,
                                        span,
                                    )
                                };
                                i += mt;
                            }
                            if to >= k16 {
                                break;
                            }
                            from = to;
                        }
                        j += nt;
                    }
                    i0 = i1;
                }
            })
        })
    });
    true
}

/// `k` from which the AVX-512 kernel sums in parts of [`K_BLOCK`] (a 4 × 6 tile's operands
/// no longer fit L1 beyond ~1,000).
const K_BLOCK_MIN: usize = 1024;
/// Values of `k` per part (a multiple of 16). `examples/gemm_micro.rs`, 512 × 1536 × 576 (the
/// down projection of SmolLM2), two alternating rounds: whole 118 / 121 GF/s; parts of 256:
/// 103 / 91; 384: 143 / 130; 512: 141 / 128; 768: 127 / 123. At 17 and 64 rows parts of 512
/// measured 137–151 and 168–172 against 132–136 and 148–157.
const K_BLOCK: usize = 512;

/// `f` with this thread's buffer for partial tile sums, at least `len` floats.
fn with_state<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    thread_local! {
        static STATE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    STATE.with(|s| {
        let mut v = s.borrow_mut();
        if v.len() < len {
            v.resize(len, 0.0);
        }
        f(&mut v[..len])
    })
}

/// The part `from..to` of `k` (multiples of 16; `to` = `k / 16 * 16` for the last part, which
/// also takes the remainder and writes the tile) a tile call sums; `state` holds the tile's
/// partial sums between parts (`MR × NR × 16` floats).
#[derive(Clone, Copy)]
struct Span {
    from: usize,
    to: usize,
    state: *mut f32,
}

/// One `mt × nt` tile (`mt <= MR`, `nt <= NR` of the ISA) over `span` of `k` (the AVX2
/// kernel takes whole spans only).
///
/// # Safety
/// `x` has `mt` rows of `k`, `w` `nt` rows of `k`, `out` `mt` rows of stride `ldo` with `nt`
/// writable values each; the CPU supports `isa`; a partial span's `state` holds `mt × nt × 16`
/// floats, written by the spans before it.
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    isa: Isa,
    mt: usize,
    nt: usize,
    x: *const f32,
    w: *const f32,
    k: usize,
    out: *mut f32,
    ldo: usize,
    span: Span,
) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! rows {
            ($f:ident, $nr:literal, $($mr:literal)+) => {
                match mt {
                    $($mr => $f::<$mr, $nr>(x, w, k, out, ldo, span),)+
                    _ => unreachable!(),
                }
            };
        }
        match isa {
            // SAFETY (all arms): as the caller guarantees.
            Isa::Avx512 => unsafe {
                match nt {
                    1 => rows!(k512, 1, 1 2 3 4),
                    2 => rows!(k512, 2, 1 2 3 4),
                    3 => rows!(k512, 3, 1 2 3 4),
                    4 => rows!(k512, 4, 1 2 3 4),
                    5 => rows!(k512, 5, 1 2 3 4),
                    _ => rows!(k512, 6, 1 2 3 4),
                }
            },
            Isa::Avx2 => unsafe {
                match nt {
                    1 => rows!(k256, 1, 1 2 3),
                    2 => rows!(k256, 2, 1 2 3),
                    _ => rows!(k256, 3, 1 2 3),
                }
            },
            Isa::Scalar => unreachable!("no scalar tile"),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, mt, nt, x, w, k, out, ldo, span);
        unreachable!("no vector kernel on this architecture")
    }
}

/// The 16 lanes of one sum as two 8-lane halves → the sum, then the `k mod 8` tail.
///
/// # Safety
/// AVX2 available; `x`, `w` readable for `k` values.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn finish(
    lo: std::arch::x86_64::__m256,
    hi: std::arch::x86_64::__m256,
    x: *const f32,
    w: *const f32,
    from: usize,
    k: usize,
) -> f32 {
    use std::arch::x86_64::*;
    // Exactly the streaming tile's fold (`matmul::avx::tile`).
    let v = _mm256_add_ps(lo, hi);
    let h = _mm256_extractf128_ps(v, 1);
    let l = _mm256_castps256_ps128(v);
    let s4 = _mm_add_ps(h, l);
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    let mut s = _mm_cvtss_f32(s1);
    for j in from..k {
        s += *x.add(j) * *w.add(j);
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[allow(clippy::needless_range_loop)] // register tiles indexed by row and column
#[allow(clippy::too_many_arguments)]
unsafe fn k512<const MR: usize, const NR: usize>(
    x: *const f32,
    w: *const f32,
    k: usize,
    out: *mut f32,
    ldo: usize,
    span: Span,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); NR]; MR];
    let k16 = k / 16 * 16;
    // A span of `k` continues the sums a previous span left in `state` (same lanes, same
    // order of `k`: the bits of one pass), and the last one finishes them.
    if span.from > 0 {
        for t in 0..MR {
            for j in 0..NR {
                acc[t][j] = _mm512_loadu_ps(span.state.add((t * NR + j) * 16));
            }
        }
    }
    let mut i = span.from;
    while i < span.to {
        let mut wv = [_mm512_setzero_ps(); NR];
        for j in 0..NR {
            wv[j] = _mm512_loadu_ps(w.add(j * k + i));
        }
        for t in 0..MR {
            let xv = _mm512_loadu_ps(x.add(t * k + i));
            for j in 0..NR {
                acc[t][j] = _mm512_fmadd_ps(xv, wv[j], acc[t][j]);
            }
        }
        i += 16;
    }
    if span.to < k16 {
        for t in 0..MR {
            for j in 0..NR {
                _mm512_storeu_ps(span.state.add((t * NR + j) * 16), acc[t][j]);
            }
        }
        return;
    }
    if k - i >= 8 {
        // The streaming kernel's 8-wide remainder goes to lanes 0-7; the others keep theirs.
        const LOW: __mmask16 = 0x00ff;
        for j in 0..NR {
            let wv = _mm512_maskz_loadu_ps(LOW, w.add(j * k + i));
            for t in 0..MR {
                let xv = _mm512_maskz_loadu_ps(LOW, x.add(t * k + i));
                acc[t][j] = _mm512_mask3_fmadd_ps(xv, wv, acc[t][j], LOW);
            }
        }
        i += 8;
    }
    for t in 0..MR {
        for j in 0..NR {
            let a = acc[t][j];
            let lo = _mm512_castps512_ps256(a);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(a)));
            *out.add(t * ldo + j) = finish(lo, hi, x.add(t * k), w.add(j * k), i, k);
        }
    }
}

/// Sums of lanes 0-7 (`start = 0`, chunks at 0, 16, ... and an 8-wide remainder) or 8-15
/// (`start = 8`) of an `MR × NR` tile: one 8-lane register per sum, so a 3 × 3 tile and its
/// operands fit AVX2's 16 registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn half256<const MR: usize, const NR: usize>(
    x: *const f32,
    w: *const f32,
    k: usize,
    start: usize,
    end: usize,
) -> [[std::arch::x86_64::__m256; NR]; MR] {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    let mut i = start;
    while i < end {
        let mut xv = [_mm256_setzero_ps(); MR];
        for t in 0..MR {
            xv[t] = _mm256_loadu_ps(x.add(t * k + i));
        }
        for j in 0..NR {
            let wv = _mm256_loadu_ps(w.add(j * k + i));
            for t in 0..MR {
                acc[t][j] = _mm256_fmadd_ps(xv[t], wv, acc[t][j]);
            }
        }
        i += 16;
    }
    acc
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::needless_range_loop)]
unsafe fn k256<const MR: usize, const NR: usize>(
    x: *const f32,
    w: *const f32,
    k: usize,
    out: *mut f32,
    ldo: usize,
    span: Span,
) {
    debug_assert!(
        span.from == 0 && span.to == k / 16 * 16,
        "AVX2 tiles take whole spans"
    );
    let k16 = k / 16 * 16;
    let tail8 = k - k16 >= 8;
    let lo = half256::<MR, NR>(x, w, k, 0, if tail8 { k16 + 1 } else { k16 });
    let hi = half256::<MR, NR>(x, w, k, 8, k16);
    let from = if tail8 { k16 + 8 } else { k16 };
    for t in 0..MR {
        for j in 0..NR {
            *out.add(t * ldo + j) = finish(lo[t][j], hi[t][j], x.add(t * k), w.add(j * k), from, k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul::matmul_wt_small;
    use crate::kernels::matmul::tests::rand_vec;
    use crate::kernels::wide::WSlice;

    /// Every ISA the CPU has gives, for each row, the bits of the streaming kernel on that
    /// row alone: k with and without 16-, 8- and 1-wide remainders, tiles cut at every edge.
    #[test]
    fn rows_equal_streaming_kernel_bit_for_bit() {
        let isas: Vec<Isa> = [Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&i| match (i, best_isa()) {
                (_, Isa::Scalar) => false,
                (Isa::Avx512, d) => d == Isa::Avx512,
                _ => true,
            })
            .collect();
        if isas.is_empty() {
            eprintln!("no AVX2 on this CPU: nothing to compare");
            return;
        }
        for &(m, k, n) in &[
            (17, 64, 33),
            (5, 8, 7),
            (7, 11, 13),
            (40, 576, 129),
            (129, 130, 67),
            (23, 1549, 31),
            (9, 2064, 13),
            (37, 1024, 7),
            (300, 1100, 20),
            (300, 200, 500),
            (64, 24, 6),
        ] {
            let x = rand_vec(m * k, 5 + m as u32);
            let w = rand_vec(n * k, 6 + k as u32);
            let mut want = Vec::with_capacity(m * n);
            for i in 0..m {
                want.extend(matmul_wt_small(&x[i * k..(i + 1) * k], 1, k, &w, n, None));
            }
            // Whole, and in three parts cut inside tiles (a fused weight used in place).
            let (a, b) = (1.min(n) * k, (n / 2 + 1).min(n) * k);
            let whole = [WSlice::F32(&w)];
            let cut = [
                WSlice::F32(&w[..a]),
                WSlice::F32(&w[a..b]),
                WSlice::F32(&w[b..]),
            ];
            for &isa in &isas {
                for parts in [&whole[..], &cut[..]] {
                    let mut out = vec![f32::NAN; m * n];
                    assert!(dot_tiles(isa, &x, m, k, WRows::one(parts, k), n, &mut out));
                    for (i, (g, e)) in out.iter().zip(&want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            e.to_bits(),
                            "{isa:?} m={m} k={k} n={n} parts={} at ({}, {}): {g} vs {e}",
                            parts.len(),
                            i / n,
                            i % n
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn zero_k_and_empty() {
        if isa() == Isa::Scalar {
            return;
        }
        let mut out = vec![1f32; 6];
        assert!(dot_gemm(
            &[],
            2,
            0,
            WRows::one(&[WSlice::F32(&[])], 0),
            3,
            &mut out
        ));
        assert_eq!(out, vec![0.0; 6]);
        let w = [0f32; 8];
        assert!(dot_gemm(
            &[],
            0,
            4,
            WRows::one(&[WSlice::F32(&w)], 4),
            2,
            &mut []
        ));
    }
}
