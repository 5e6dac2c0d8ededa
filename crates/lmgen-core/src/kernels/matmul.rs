//! CPU kernels where candle's generic path is measured to be slow.
//!
//! `matmul_wt_into`: `y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias)` into a caller's buffer.
//! For the few-row case (decode steps, `m <= SMALL_M`) candle routes this through a
//! general GEMM that packs the weight matrix on every call; here each weight row is
//! streamed once from memory and dotted with all `m` input rows while it sits in L1, with
//! AVX2/FMA chosen at run time (the binary targets portable x86-64) and rows split across
//! the compute pool. Decode is bound by reading the weights, so this is the loop that decides
//! tokens/s. Larger `m` goes to [`super::dotgemm`], register-tiled and sums each element in
//! the streaming kernel's order, so the result of a row never depends on `m`; where it has no
//! vector kernel, to the `gemm` crate (the GEMM behind candle's CPU matmul).
use super::pool;
use super::wide::{with_scratch, WSlice};

/// Largest `m` routed to the streaming kernel; beyond it a blocked GEMM wins.
pub const SMALL_M: usize = 16;

/// Below this many weight bytes a product runs on the calling thread.
const INLINE_BYTES: usize = 512 << 10;

/// `out[m, n] = x[m, k] · w[n, k]ᵀ + bias[n]` (row-major; `out` is overwritten).
///
/// Every row's result is bit-identical to [`matmul_wt_small`] of that row alone, whatever
/// `m` is (on x86 with AVX2; elsewhere rows above `SMALL_M` go through `gemm`, as candle's
/// matmul). No heap allocation.
pub fn matmul_wt_into(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    product(
        x,
        m,
        k,
        WRows::one(&[WSlice::F32(w)], k),
        n,
        bias,
        out,
        false,
    )
}

/// As [`matmul_wt_into`] with the weight's rows given as consecutive parts (`parts[0]`'s rows
/// first), each f32, bf16 or f16: a fused QKV or gate/up projection whose parts stay where the
/// checkpoint's memory map has them, in the checkpoint's dtype. Bit-identical to
/// [`matmul_wt_into`] on the concatenated matrix widened to f32.
pub fn matmul_parts_into(
    x: &[f32],
    m: usize,
    k: usize,
    parts: &[WSlice],
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    let w = WRows::one(parts, k);
    product(x, m, k, w, w.n, bias, out, false)
}

/// Whether [`matmul_parts_into`] gives the concatenated matrix's bits for any number of rows:
/// true where the register-tiled kernel runs (x86 with AVX2); the `gemm` crate fallback
/// blocks each part on its own.
pub fn parts_are_exact() -> bool {
    super::dotgemm::isa() != super::dotgemm::Isa::Scalar
}

/// The rows of a weight matrix `[n, k]`: one slice, or consecutive parts of whole rows.
#[derive(Clone, Copy)]
pub(crate) struct WRows<'a> {
    parts: &'a [WSlice<'a>],
    k: usize,
    /// Total rows.
    pub(crate) n: usize,
}

impl<'a> WRows<'a> {
    pub(crate) fn one(parts: &'a [WSlice<'a>], k: usize) -> Self {
        let n = if k == 0 {
            0
        } else {
            parts.iter().map(|p| p.len() / k).sum()
        };
        Self { parts, k, n }
    }

    /// Total values (rows × k, when every part holds whole rows).
    fn len(&self) -> usize {
        self.parts.iter().map(|p| p.len()).sum()
    }

    /// Rows `j..` of the part that holds row `j`: its values, and how many rows are left in
    /// that part.
    #[inline]
    pub(crate) fn run(&self, mut j: usize) -> (WSlice<'a>, usize) {
        for p in self.parts {
            let rows = p.len() / self.k;
            if j < rows {
                return (p.from(j * self.k), rows - j);
            }
            j -= rows;
        }
        (WSlice::F32(&[]), 0)
    }

    /// Values of widening buffer a task needs for `rows` rows at a time (none where every
    /// part is f32 and is read in place).
    pub(crate) fn scratch_for(&self, rows: usize) -> usize {
        if self.parts.iter().all(|p| p.as_f32().is_some()) {
            0
        } else {
            rows * self.k
        }
    }
}

/// As [`matmul_wt_into`] for `m > SMALL_M` through the `gemm` crate (candle's CPU matmul,
/// bit-identical to it) instead of [`super::dotgemm`]: the baseline of `examples/gemm_micro.rs`.
#[doc(hidden)]
pub fn matmul_wt_gemm_crate(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    product(
        x,
        m,
        k,
        WRows::one(&[WSlice::F32(w)], k),
        n,
        bias,
        out,
        true,
    )
}

#[allow(clippy::too_many_arguments)]
fn product(
    x: &[f32],
    m: usize,
    k: usize,
    w: WRows,
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
    gemm_crate: bool,
) {
    check_dims(x, m, k, w, n, bias, out);
    if m <= SMALL_M && !gemm_crate {
        stream_into(x, m, k, w, n, bias, out);
        return;
    }
    if gemm_crate || !super::dotgemm::dot_gemm(x, m, k, w, n, out) {
        gemm_into(x, m, k, w, n, out);
    }
    if let Some(b) = bias {
        add_bias_rows(out, n, b);
    }
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ + bias[n]` with the streaming kernel, for any `m`
/// (meant for `m <= SMALL_M`).
pub fn matmul_wt_small(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut y = vec![0f32; m * n];
    let one = [WSlice::F32(w)];
    let w = WRows::one(&one, k);
    check_dims(x, m, k, w, n, bias, &y);
    stream_into(x, m, k, w, n, bias, &mut y);
    y
}

/// `out[i, j] += bias[j]` for every row `i` of the row-major `[_, n]` matrix `out`.
pub fn add_bias_rows(out: &mut [f32], n: usize, bias: &[f32]) {
    assert_eq!(
        bias.len(),
        n,
        "bias has {} values, expected {n}",
        bias.len()
    );
    if n == 0 {
        return;
    }
    for row in out.chunks_exact_mut(n) {
        for (o, b) in row.iter_mut().zip(bias) {
            *o += b;
        }
    }
}

fn check_dims(
    x: &[f32],
    m: usize,
    k: usize,
    w: WRows,
    n: usize,
    bias: Option<&[f32]>,
    out: &[f32],
) {
    assert_eq!(x.len(), m * k, "x has {} values, expected {m}x{k}", x.len());
    assert_eq!(w.len(), n * k, "w has {} values, expected {n}x{k}", w.len());
    assert!(
        k == 0 || w.parts.iter().all(|p| p.len() % k == 0),
        "a part of w is not made of whole rows of {k}"
    );
    assert_eq!(
        out.len(),
        m * n,
        "out has {} values, expected {m}x{n}",
        out.len()
    );
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "bias has {} values, expected {n}", b.len());
    }
}

/// A pointer to the output shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(*mut f32);

// SAFETY: only used while the `&mut [f32]` it was made from is borrowed, by tasks that
// write disjoint index sets (each task owns a range of output columns).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    pub(crate) fn new(out: &mut [f32]) -> Self {
        Self(out.as_mut_ptr())
    }

    /// # Safety
    /// `i` is within the slice this was made from, and no other task writes index `i`.
    #[inline(always)]
    pub(crate) unsafe fn write(self, i: usize, v: f32) {
        // SAFETY: guaranteed by the caller.
        unsafe { *self.0.add(i) = v }
    }

    /// The pointer to element `i` (not dereferenced here).
    #[inline(always)]
    pub(crate) fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }

    /// `len` values from index `start`, as a mutable slice.
    ///
    /// # Safety
    /// The range is within the slice this was made from, and no other task touches it
    /// while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    #[inline(always)]
    pub(crate) unsafe fn row<'a>(self, start: usize, len: usize) -> &'a mut [f32] {
        // SAFETY: guaranteed by the caller.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(start), len) }
    }
}

/// The streaming kernel: tasks take blocks of `w`'s rows (= columns of `out`).
fn stream_into(
    x: &[f32],
    m: usize,
    k: usize,
    w: WRows,
    n: usize,
    bias: Option<&[f32]>,
    out: &mut [f32],
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for row in out.chunks_exact_mut(n) {
            match bias {
                Some(b) => row.copy_from_slice(b),
                None => row.fill(0.0),
            }
        }
        return;
    }
    let threads = pool::threads();
    let block = (n / (threads * 8)).clamp(16, 1024).min(n);
    let y = OutPtr::new(out);
    // bf16 / f16 rows are widened in registers by the AVX2 tile; elsewhere into this
    // thread's buffer first (exact either way), then read as f32.
    let bf16_in_registers = isa() == Isa::Avx2;
    let f16_in_registers = bf16_in_registers && super::wide::has_f16c();
    let fused = |w: &WSlice| match w {
        WSlice::F32(_) => true,
        WSlice::Bf16(_) => bf16_in_registers,
        WSlice::F16(_) => f16_in_registers,
    };
    let work = |bi: usize| {
        with_scratch(w.scratch_for(1), |buf| {
            let mut o = [0f32; 4];
            let (mut run, mut left) = (WSlice::F32(&[]), 0);
            for j in bi * block..((bi + 1) * block).min(n) {
                if left == 0 {
                    (run, left) = w.run(j);
                }
                let wr = run.range(0, k);
                let wr = if fused(&wr) {
                    wr
                } else {
                    WSlice::F32(wr.f32_in(buf))
                };
                (run, left) = (run.from(k), left - 1);
                let b = bias.map_or(0.0, |b| b[j]);
                let mut i = 0;
                while i < m {
                    let mt = (m - i).min(4);
                    dot_tile(&x[i * k..(i + mt) * k], mt, k, wr, &mut o[..mt]);
                    for (t, v) in o[..mt].iter().enumerate() {
                        // SAFETY: (i + t) < m and j < n, so the index is inside `out`
                        // ([m, n]); column j belongs to this task's block only.
                        unsafe {
                            y.write((i + t) * n + j, if bias.is_some() { v + b } else { *v })
                        };
                    }
                    i += mt;
                }
            }
        })
    };
    let blocks = n.div_ceil(block);
    // Handing small matrices to the pool costs more than it saves (measured for the
    // quantized kernels: 8 µs pooled vs 3 µs inline for a 192x576 matrix).
    if n * k * 4 < INLINE_BYTES {
        (0..blocks).for_each(work);
    } else {
        pool::for_each(blocks, work);
    }
}

/// `out = x · wᵀ` through `gemm`, reading `w` transposed in place: the pool's tasks take
/// blocks of output columns, each one single-threaded `gemm` call. `gemm`'s blocking over
/// `k` depends on `k` and the caches only (for blocks of more than 64 columns), so every
/// element is summed in the order of one whole-matrix call (candle's), bit for bit.
fn gemm_into(x: &[f32], m: usize, k: usize, w: WRows, n: usize, out: &mut [f32]) {
    if k == 0 {
        out.fill(0.0);
    }
    if m == 0 || n == 0 || k == 0 {
        return;
    }
    // Blocks wider than 64 columns: `gemm` picks its `k` blocking differently for m, n <= 64.
    let blocks = (2 * pool::threads()).min(n / 80).max(1);
    let y = OutPtr::new(out);
    pool::for_each(blocks, |t| {
        let (mut j, j1) = (n * t / blocks, n * (t + 1) / blocks);
        // One call per part of `w` inside this task's columns (a single call for a single
        // matrix); bf16 / f16 rows widened first.
        while j < j1 {
            let (run, left) = w.run(j);
            let nb = left.min(j1 - j);
            with_scratch(w.scratch_for(nb), |buf| {
                let run = run.range(0, nb * k).f32_in(buf);
                // SAFETY: dims checked by the caller: `x` is [m, k] (row stride k), `run` holds
                // at least nb rows of k (row j of w first), read as the [k, nb] matrix wᵀ (row
                // stride 1, column stride k); columns j..j + nb of `out` ([m, n], row stride n)
                // are written by this task only and do not alias the inputs. alpha = 0 with
                // read_dst = false: `out` is only written.
                unsafe {
                    gemm::gemm(
                        m,
                        nb,
                        k,
                        y.at(j),
                        1,
                        n as isize,
                        false,
                        x.as_ptr(),
                        1,
                        k as isize,
                        run.as_ptr(),
                        k as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                }
            });
            j += nb;
        }
    });
}

/// `out[t] = x[t, :] · w` for `mt <= 4` rows of `x`. A row's sum is taken in the same order
/// whatever `mt` is, so a sequence's numbers do not depend on the rows batched with it.
/// `w` is f32, or bf16 / f16 where the AVX2 kernel widens it in registers (else the caller
/// widens it first).
#[inline]
fn dot_tile(x: &[f32], mt: usize, k: usize, w: WSlice, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! by_rows {
            ($m:ident :: $f:ident, $w:expr) => {
                match mt {
                    1 => $m::$f::<1>(x, k, $w, out),
                    2 => $m::$f::<2>(x, k, $w, out),
                    3 => $m::$f::<3>(x, k, $w, out),
                    _ => $m::$f::<4>(x, k, $w, out),
                }
            };
        }
        match (isa(), w) {
            // SAFETY: the CPU supports AVX-512F (checked by `isa`); slices have the lengths
            // asserted by the caller.
            (Isa::Avx512, WSlice::F32(w)) => return unsafe { by_rows!(avx512::tile, w) },
            // SAFETY: the CPU supports AVX2 and FMA (checked by `isa`); as above.
            (Isa::Avx2, WSlice::F32(w)) => return unsafe { by_rows!(avx::tile, w) },
            // SAFETY: as above (bf16 widening needs AVX2 only).
            (Isa::Avx2, WSlice::Bf16(w)) => return unsafe { by_rows!(avx::tile_bf16, w) },
            // SAFETY: as above, and the caller checked F16C.
            (Isa::Avx2, WSlice::F16(w)) => return unsafe { by_rows!(avx::tile_f16, w) },
            _ => {}
        }
    }
    let w = w
        .as_f32()
        .expect("half-precision rows widened by the caller");
    for t in 0..mt {
        let xr = &x[t * k..(t + 1) * k];
        let mut acc = [0f32; 8];
        let mut i = 0;
        while i + 8 <= k {
            for l in 0..8 {
                acc[l] += xr[i + l] * w[i + l];
            }
            i += 8;
        }
        let mut s: f32 = acc.iter().sum();
        while i < k {
            s += xr[i] * w[i];
            i += 1;
        }
        out[t] = s;
    }
}

/// Instruction set of the streaming kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

/// 0: not chosen yet; else `Isa as u8 + 1`.
static ISA: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

fn isa() -> Isa {
    match ISA.load(std::sync::atomic::Ordering::Relaxed) {
        1 => Isa::Scalar,
        2 => Isa::Avx2,
        3 => Isa::Avx512,
        _ => {
            let isa = default_isa();
            ISA.store(isa as u8 + 1, std::sync::atomic::Ordering::Relaxed);
            isa
        }
    }
}

/// AVX2 where the CPU has it, also on AVX-512 machines: decode products are bound by memory
/// bandwidth, where the wider kernel measured no faster (`examples/stream_isa.rs`), and one
/// kernel everywhere keeps results bit-identical across x86 machines (golden outputs).
fn default_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if super::simd::has_avx2_fma() {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Name of the streaming kernel's instruction set in use (for reports).
pub fn f32_kernel() -> &'static str {
    match isa() {
        Isa::Scalar => "scalar",
        Isa::Avx2 => "avx2",
        Isa::Avx512 => "avx512",
    }
}

/// Chooses the streaming kernel's instruction set (`"scalar"`, `"avx2"`, `"avx512"`; one
/// the CPU lacks gives the default), for side-by-side measurements.
#[doc(hidden)]
pub fn set_f32_kernel(name: &str) {
    let isa = match name {
        "avx512" if has_avx512() => Isa::Avx512,
        "scalar" => Isa::Scalar,
        _ => default_isa(),
    };
    ISA.store(isa as u8 + 1, std::sync::atomic::Ordering::Relaxed);
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // lane / row loops index several arrays
mod avx512 {
    use std::arch::x86_64::*;

    /// Software prefetch distance along the weight stream, in floats (4 KiB).
    const PREFETCH_FLOATS: usize = 1024;

    /// As `avx::tile`, 16 lanes wide.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn tile<const M: usize>(x: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
        const U: usize = 2;
        let mut acc = [[_mm512_setzero_ps(); U]; M];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        let mut i = 0;
        while i + 16 * U <= k {
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + PREFETCH_FLOATS) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + PREFETCH_FLOATS + 16) as *const i8);
            for u in 0..U {
                let wv = _mm512_loadu_ps(wp.add(i + 16 * u));
                for t in 0..M {
                    let xv = _mm512_loadu_ps(xp.add(t * k + i + 16 * u));
                    acc[t][u] = _mm512_fmadd_ps(xv, wv, acc[t][u]);
                }
            }
            i += 16 * U;
        }
        while i + 16 <= k {
            let wv = _mm512_loadu_ps(wp.add(i));
            for t in 0..M {
                acc[t][0] = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(t * k + i)), wv, acc[t][0]);
            }
            i += 16;
        }
        for t in 0..M {
            let mut v = acc[t][0];
            for u in 1..U {
                v = _mm512_add_ps(v, acc[t][u]);
            }
            let mut s = _mm512_reduce_add_ps(v);
            for j in i..k {
                s += *xp.add(t * k + j) * *wp.add(j);
            }
            out[t] = s;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(clippy::needless_range_loop)] // lane / row loops index several arrays
mod avx {
    use std::arch::x86_64::*;

    /// Software prefetch distance along the weight stream, in bytes.
    const PREFETCH_BYTES: usize = 4096;

    /// The streaming tile for one weight element type: `$load` reads 8 weights at a pointer
    /// as an f32 vector (widening in registers, exact), `$one` one weight as f32. The sums are
    /// formed in the same order whatever the type, so a bf16 / f16 weight gives the bits of
    /// the same weight widened to f32.
    macro_rules! stream_tile {
        ($(#[$doc:meta])* $name:ident, $elem:ty, $features:literal,
         |$p:ident| $load:expr, |$h:ident| $one:expr) => {
            $(#[$doc])*
            #[target_feature(enable = $features)]
            pub unsafe fn $name<const M: usize>(
                x: &[f32],
                k: usize,
                w: &[$elem],
                out: &mut [f32],
            ) {
                const U: usize = 2;
                // Expanded in place (no call): the conversion runs with this function's
                // target features.
                macro_rules! load {
                    ($at:expr) => {{
                        let $p: *const $elem = $at;
                        $load
                    }};
                }
                let ahead = PREFETCH_BYTES / std::mem::size_of::<$elem>();
                let mut acc = [[_mm256_setzero_ps(); U]; M];
                let wp = w.as_ptr();
                let xp = x.as_ptr();
                let mut i = 0;
                while i + 8 * U <= k {
                    // One line 4 KiB ahead: the stream crosses page boundaries, where the
                    // hardware prefetcher stops (measured +10-15% decode tokens/s on
                    // SmolLM2-135M f32, +40 % bf16).
                    _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + ahead) as *const i8);
                    for u in 0..U {
                        let wv = load!(wp.add(i + 8 * u));
                        for t in 0..M {
                            let xv = _mm256_loadu_ps(xp.add(t * k + i + 8 * u));
                            acc[t][u] = _mm256_fmadd_ps(xv, wv, acc[t][u]);
                        }
                    }
                    i += 8 * U;
                }
                while i + 8 <= k {
                    let wv = load!(wp.add(i));
                    for t in 0..M {
                        let xv = _mm256_loadu_ps(xp.add(t * k + i));
                        acc[t][0] = _mm256_fmadd_ps(xv, wv, acc[t][0]);
                    }
                    i += 8;
                }
                for t in 0..M {
                    let mut v = acc[t][0];
                    for u in 1..U {
                        v = _mm256_add_ps(v, acc[t][u]);
                    }
                    // horizontal sum
                    let hi = _mm256_extractf128_ps(v, 1);
                    let lo = _mm256_castps256_ps128(v);
                    let s4 = _mm_add_ps(hi, lo);
                    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
                    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
                    let mut s = _mm_cvtss_f32(s1);
                    for j in i..k {
                        let $h: $elem = *wp.add(j);
                        s += *xp.add(t * k + j) * $one;
                    }
                    out[t] = s;
                }
            }
        };
    }

    stream_tile!(
        /// `M` rows of `x` against one f32 weight row; two accumulators per row so the FMA
        /// latency chain does not limit the streaming rate.
        tile, f32, "avx2,fma",
        |p| _mm256_loadu_ps(p),
        |v| v
    );
    stream_tile!(
        /// As [`tile`] on a bf16 weight row (bf16 → f32 is a 16-bit shift).
        tile_bf16, u16, "avx2,fma",
        |p| crate::kernels::simd::bf16x8(p),
        |h| crate::kernels::simd::bf16_to_f32(h)
    );
    stream_tile!(
        /// As [`tile`] on an f16 weight row (F16C conversion).
        tile_f16, u16, "avx2,fma,f16c",
        |p| crate::kernels::simd::f16x8(p),
        |h| crate::kernels::simd::f16_to_f32(h)
    );
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, b: Option<&[f32]>) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for l in 0..k {
                    s += x[i * k + l] as f64 * w[j * k + l] as f64;
                }
                y[i * n + j] = s as f32 + b.map_or(0.0, |b| b[j]);
            }
        }
        y
    }

    #[test]
    fn matches_naive_for_odd_shapes() {
        let mut seed = 1u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            (seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        };
        for &(m, k, n) in &[
            (1, 7, 5),
            (1, 64, 33),
            (2, 100, 17),
            (3, 576, 40),
            (5, 37, 1031),
            (16, 129, 64),
        ] {
            let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
            let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let b: Vec<f32> = (0..n).map(|_| rnd()).collect();
            let got = matmul_wt_small(&x, m, k, &w, n, Some(&b));
            let want = naive(&x, m, k, &w, n, Some(&b));
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "m={m} k={k} n={n}: {g} vs {w}");
            }
        }
    }

    /// Deterministic values in [-0.5, 0.5).
    pub(crate) fn rand_vec(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
            })
            .collect()
    }

    /// `w` rounded to bf16 and to f16, as bits.
    pub(crate) fn halves(w: &[f32]) -> (Vec<u16>, Vec<u16>) {
        let bf = w.iter().map(|v| half::bf16::from_f32(*v).to_bits());
        let hf = w.iter().map(|v| half::f16::from_f32(*v).to_bits());
        (bf.collect(), hf.collect())
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn into_matches_small_bit_for_bit() {
        // n * k * 4 above INLINE_BYTES for (4, 576, 300): the pooled path; m > SMALL_M: the
        // register-tiled GEMM, in the same order (on AVX2 machines)
        let many = if crate::kernels::dotgemm::isa() == crate::kernels::dotgemm::Isa::Scalar {
            &[][..]
        } else {
            &[(17, 40, 9), (64, 576, 100)][..]
        };
        let few = [(1, 7, 5), (3, 33, 17), (16, 129, 40), (4, 576, 300)];
        for &(m, k, n) in few.iter().chain(many) {
            let x = rand_vec(m * k, 1);
            let w = rand_vec(n * k, 2);
            let b = rand_vec(n, 3);
            for bias in [None, Some(&b[..])] {
                let want = matmul_wt_small(&x, m, k, &w, n, bias);
                let mut out = vec![f32::NAN; m * n];
                matmul_wt_into(&x, m, k, &w, n, bias, &mut out);
                assert_eq!(bits(&out), bits(&want), "m={m} k={k} n={n}");
            }
        }
    }

    /// A weight given as parts (a fused projection used in place) gives the bits of the
    /// concatenated matrix on the streaming and register-tiled paths; the `gemm` crate
    /// fallback (no AVX2) blocks differently per part, so there it is only close.
    #[test]
    fn parts_equal_whole_bit_for_bit() {
        let tiled = parts_are_exact();
        for &(m, k, n) in &[
            (1, 7, 5),
            (3, 33, 17),
            (4, 576, 300),
            (17, 40, 9),
            (64, 576, 100),
        ] {
            let x = rand_vec(m * k, 1);
            let w = rand_vec(n * k, 2);
            let b = rand_vec(n, 3);
            let (a, c) = (n / 3 * k, (n / 3 + n / 2 + 1).min(n) * k);
            let parts = [
                WSlice::F32(&w[..a]),
                WSlice::F32(&w[a..c]),
                WSlice::F32(&w[c..]),
            ];
            for bias in [None, Some(&b[..])] {
                for gemm_crate in [false, true] {
                    let mut want = vec![f32::NAN; m * n];
                    product(
                        &x,
                        m,
                        k,
                        WRows::one(&[WSlice::F32(&w)], k),
                        n,
                        bias,
                        &mut want,
                        gemm_crate,
                    );
                    let mut out = vec![f32::NAN; m * n];
                    if gemm_crate {
                        product(&x, m, k, WRows::one(&parts, k), n, bias, &mut out, true);
                    } else {
                        matmul_parts_into(&x, m, k, &parts, bias, &mut out);
                    }
                    if (m <= SMALL_M || tiled) && !gemm_crate {
                        assert_eq!(bits(&out), bits(&want), "m={m} k={k} n={n}");
                    } else {
                        for (g, e) in out.iter().zip(&want) {
                            assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "m={m} k={k} n={n}");
                        }
                    }
                }
            }
        }
    }

    /// bf16 and f16 weights (parts of either, or mixed with f32) give the bits of the same
    /// weights widened to f32, on every path: streaming (m <= 16), register-tiled, `gemm` crate.
    #[test]
    fn half_weights_equal_widened_bit_for_bit() {
        for &(m, k, n) in &[
            (1, 7, 5),
            (3, 33, 17),
            (4, 576, 300),
            (17, 40, 9),
            (64, 576, 100),
            (20, 1549, 31),
        ] {
            let x = rand_vec(m * k, 11);
            let w = rand_vec(n * k, 12);
            let b = rand_vec(n, 13);
            let (bf, hf) = halves(&w);
            let a = n / 2 * k;
            let cases: [(&str, Vec<WSlice>); 4] = [
                ("bf16", vec![WSlice::Bf16(&bf)]),
                ("f16", vec![WSlice::F16(&hf)]),
                (
                    "bf16 parts",
                    vec![WSlice::Bf16(&bf[..a]), WSlice::Bf16(&bf[a..])],
                ),
                (
                    "f16 + f32",
                    vec![WSlice::F16(&hf[..a]), WSlice::F32(&w[a..])],
                ),
            ];
            for (what, parts) in cases {
                let mut wide = vec![0f32; n * k];
                let mut at = 0;
                for p in &parts {
                    p.widen_into(&mut wide[at..at + p.len()]);
                    at += p.len();
                }
                for bias in [None, Some(&b[..])] {
                    for gemm_crate in [false, true] {
                        let whole = [WSlice::F32(&wide)];
                        let (mut want, mut out) = (vec![f32::NAN; m * n], vec![f32::NAN; m * n]);
                        let one = WRows::one(&whole, k);
                        product(&x, m, k, one, n, bias, &mut want, gemm_crate);
                        let rows = WRows::one(&parts, k);
                        product(&x, m, k, rows, n, bias, &mut out, gemm_crate);
                        // Parts through the `gemm` crate are blocked one by one: close only.
                        let exact = parts.len() == 1
                            || (!gemm_crate && (m <= SMALL_M || parts_are_exact()));
                        if exact {
                            assert_eq!(bits(&out), bits(&want), "{what} m={m} k={k} n={n}");
                        } else {
                            for (g, e) in out.iter().zip(&want) {
                                assert!((g - e).abs() <= 1e-5 * (1.0 + e.abs()), "{what}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn into_matches_naive() {
        for &m in &[1usize, 3, 16, 17, 40, 129] {
            for &(k, n) in &[(37, 23), (130, 67), (576, 1031)] {
                let x = rand_vec(m * k, 10 + m as u32);
                let w = rand_vec(n * k, 20 + k as u32);
                let b = rand_vec(n, 30);
                for bias in [None, Some(&b[..])] {
                    let want = naive(&x, m, k, &w, n, bias);
                    let mut out = vec![f32::NAN; m * n];
                    matmul_wt_into(&x, m, k, &w, n, bias, &mut out);
                    for (i, (g, e)) in out.iter().zip(&want).enumerate() {
                        assert!(
                            (g - e).abs() <= 1e-5 * (1.0 + (k as f32).sqrt()),
                            "m={m} k={k} n={n} [{i}]: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    /// The `gemm` crate path gives what candle's matmul (same `gemm` call) gives.
    #[test]
    fn gemm_crate_path_matches_candle_bit_for_bit() {
        use candle_core::{Device, Tensor};
        for &(m, k, n) in &[
            (17, 64, 33),
            (40, 576, 129),
            (129, 130, 67),
            (40, 576, 1031),
            (300, 200, 500),
        ] {
            let x = rand_vec(m * k, 5);
            let w = rand_vec(n * k, 6);
            let b = rand_vec(n, 7);
            let xt = Tensor::from_slice(&x, (m, k), &Device::Cpu).unwrap();
            let wt = Tensor::from_slice(&w, (n, k), &Device::Cpu).unwrap();
            let bt = Tensor::from_slice(&b, n, &Device::Cpu).unwrap();
            let y = xt.matmul(&wt.t().unwrap()).unwrap();
            let want: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            let mut out = vec![f32::NAN; m * n];
            matmul_wt_gemm_crate(&x, m, k, &w, n, None, &mut out);
            assert_eq!(bits(&out), bits(&want), "m={m} k={k} n={n}");
            let want: Vec<f32> = y
                .broadcast_add(&bt)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            matmul_wt_gemm_crate(&x, m, k, &w, n, Some(&b), &mut out);
            assert_eq!(bits(&out), bits(&want), "m={m} k={k} n={n} bias");
        }
    }

    #[test]
    fn empty_shapes() {
        let mut out = vec![1f32; 6];
        matmul_wt_into(&[], 2, 0, &[], 3, None, &mut out);
        assert_eq!(out, vec![0.0; 6]);
        matmul_wt_into(
            &[],
            20,
            0,
            &[],
            3,
            Some(&[1.0, 2.0, 3.0]),
            &mut vec![0.0; 60],
        );
        matmul_wt_into(&[0.0; 5], 1, 5, &[], 0, None, &mut []);
        let mut out = vec![0f32; 4];
        add_bias_rows(&mut out, 2, &[1.0, -1.0]);
        assert_eq!(out, vec![1.0, -1.0, 1.0, -1.0]);
    }
}
