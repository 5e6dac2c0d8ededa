//! Weight-only quantized linear layers for CPU inference: `y[m, n] = x[m, k] · W[n, k]ᵀ`
//! with `W` stored in one of ggml's block formats (so GGUF tensors are used as they are)
//! and `x`, `y` in f32.
//!
//! Decode (`m <= SMALL_M`): the activation rows are quantized once per call to 8-bit blocks
//! (32 values with an f32 scale for Q8_0/Q4_0/Q4_1, ggml's Q8_K 256-value blocks for
//! Q4_K/Q6_K) and every weight row is streamed from memory exactly once, dotted with all `m`
//! activation rows in integer arithmetic (AVX2 `maddubs`/`madd`, chosen at run time, with a
//! scalar fallback computing the same integer sums). Rows of `W` are split across rayon.
//! Prefill (`m > SMALL_M`): blocks of `W` rows are dequantized to f32 and multiplied with
//! candle's GEMM.
//!
//! MEASUREMENTS: see the table at `MEASURED` below.
use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ6K, BlockQ8_0, GgmlType,
};
use rayon::prelude::*;
use std::fmt;
use std::str::FromStr;

/// Largest `m` that takes the integer streaming kernel; larger batches dequantize and GEMM.
pub const SMALL_M: usize = 16;

const QK: usize = 32;
const QK_K: usize = 256;

/// A ggml block format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantKind {
    Q8_0,
    Q4_0,
    Q4_1,
    Q4K,
    Q6K,
}

impl QuantKind {
    pub const ALL: [QuantKind; 5] = [
        QuantKind::Q8_0,
        QuantKind::Q4_0,
        QuantKind::Q4_1,
        QuantKind::Q4K,
        QuantKind::Q6K,
    ];

    /// `"q8_0" | "q4_0" | "q4_1" | "q4_k" | "q6_k"` (case-insensitive, `q4k`/`q6k` also accepted).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "q8_0" => Some(Self::Q8_0),
            "q4_0" => Some(Self::Q4_0),
            "q4_1" => Some(Self::Q4_1),
            "q4_k" | "q4k" => Some(Self::Q4K),
            "q6_k" | "q6k" => Some(Self::Q6K),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4_1 => "q4_1",
            Self::Q4K => "q4_k",
            Self::Q6K => "q6_k",
        }
    }

    /// Values per block (32 or 256).
    pub fn block_size(self) -> usize {
        match self {
            Self::Q8_0 | Self::Q4_0 | Self::Q4_1 => QK,
            Self::Q4K | Self::Q6K => QK_K,
        }
    }

    /// Bytes per block in ggml's layout.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q4K => 144,
            Self::Q6K => 210,
        }
    }

    /// Bytes of one row of `cols` values (`cols` a multiple of the block size).
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_size() * self.block_bytes()
    }

    /// The `ggml_type` id used in GGUF tensor infos.
    pub fn ggml_type(self) -> u32 {
        match self {
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q8_0 => 8,
            Self::Q4K => 12,
            Self::Q6K => 14,
        }
    }

    pub fn from_ggml_type(t: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.ggml_type() == t)
    }
}

impl FromStr for QuantKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s).ok_or_else(|| {
            format!("unknown quantization `{s}` (expected q8_0, q4_0, q4_1, q4_k or q6_k)")
        })
    }
}

impl fmt::Display for QuantKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A `[rows, cols]` weight matrix in a ggml block format: row-major, each row is
/// `cols / block_size` blocks.
#[derive(Clone)]
pub struct QMatrix {
    kind: QuantKind,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl fmt::Debug for QMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QMatrix({}, {}x{})", self.kind, self.rows, self.cols)
    }
}

fn check_shape(kind: QuantKind, rows: usize, cols: usize) -> Result<(), String> {
    let bs = kind.block_size();
    if cols == 0 || cols % bs != 0 {
        return Err(format!(
            "{kind}: row length {cols} is not a multiple of the block size {bs}"
        ));
    }
    rows.checked_mul(kind.row_bytes(cols))
        .ok_or_else(|| format!("{kind}: {rows}x{cols} too large"))?;
    Ok(())
}

impl QMatrix {
    /// Quantizes a row-major `[rows, cols]` f32 matrix with ggml's reference quantizers.
    /// Errors (so the caller keeps the layer in f32) when `cols` is not a multiple of the
    /// block size.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, kind: QuantKind) -> Result<Self, String> {
        check_shape(kind, rows, cols)?;
        if w.len() != rows * cols {
            return Err(format!(
                "{kind}: {} values for a {rows}x{cols} matrix",
                w.len()
            ));
        }
        let rb = kind.row_bytes(cols);
        let mut data = vec![0u8; rows * rb];
        // Chunks of rows in parallel; a few hundred KB of f32 per task.
        let per = (65536 / cols).max(1);
        data.par_chunks_mut(per * rb)
            .zip(w.par_chunks(per * cols))
            .for_each(|(dst, src)| match kind {
                QuantKind::Q8_0 => quantize_into::<BlockQ8_0>(src, dst),
                QuantKind::Q4_0 => quantize_into::<BlockQ4_0>(src, dst),
                QuantKind::Q4_1 => quantize_into::<BlockQ4_1>(src, dst),
                QuantKind::Q4K => quantize_into::<BlockQ4K>(src, dst),
                QuantKind::Q6K => quantize_into::<BlockQ6K>(src, dst),
            });
        Ok(Self {
            kind,
            rows,
            cols,
            data,
        })
    }

    /// Wraps raw ggml/GGUF tensor data. GGUF lists dims innermost first, so a tensor with
    /// GGUF dims `[cols, rows]` is `rows` rows of `cols` values.
    pub fn from_ggml_bytes(
        kind: QuantKind,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self, String> {
        check_shape(kind, rows, cols)?;
        let want = rows * kind.row_bytes(cols);
        if bytes.len() != want {
            return Err(format!(
                "{kind}: {} bytes for a {rows}x{cols} matrix, expected {want}",
                bytes.len()
            ));
        }
        Ok(Self {
            kind,
            rows,
            cols,
            data: bytes.to_vec(),
        })
    }

    pub fn kind(&self) -> QuantKind {
        self.kind
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The ggml block data.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
    pub fn storage_bytes(&self) -> usize {
        self.data.len()
    }

    /// The row-major `[rows, cols]` f32 matrix.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        self.dequantize_rows(0, self.rows, &mut out);
        out
    }

    /// Rows `r0..r1` into `out` (`(r1 - r0) * cols` values), in parallel.
    fn dequantize_rows(&self, r0: usize, r1: usize, out: &mut [f32]) {
        let (cols, rb) = (self.cols, self.kind.row_bytes(self.cols));
        let per = (16384 / cols).max(1);
        let src = &self.data[r0 * rb..r1 * rb];
        out.par_chunks_mut(per * cols)
            .zip(src.par_chunks(per * rb))
            .for_each(|(o, s)| dequantize_bytes(self.kind, s, o));
    }

    /// `y[m, rows] = x[m, cols] · Wᵀ`, any `m`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        if m <= SMALL_M {
            self.matmul_small(x, m, level())
        } else {
            self.matmul_dequant(x, m)
        }
    }

    /// The integer streaming kernel (any `m`, meant for small ones) at a given ISA level.
    fn matmul_small(&self, x: &[f32], m: usize, lv: Level) -> Vec<f32> {
        let (n, k) = (self.rows, self.cols);
        assert_eq!(
            x.len(),
            m * k,
            "matmul: x has {} values, expected {m}x{k}",
            x.len()
        );
        if m == 0 || n == 0 {
            return vec![0f32; m * n];
        }
        let act = QAct::new(self.kind, x, m, k, lv);
        let rb = self.kind.row_bytes(k);
        let threads = rayon::current_num_threads().max(1);
        let block = (n / (threads * 8)).clamp(16, 1024).min(n);
        // Rows per group: a group of W rows stays in L1 while every activation tile passes.
        let group = (16384 / rb).clamp(1, 16);
        let mut yt = vec![0f32; n * m];
        let kind = self.kind;
        let data = &self.data;
        yt.par_chunks_mut(block * m)
            .enumerate()
            .for_each(|(bi, out)| {
                let r0 = bi * block;
                let nr = out.len() / m;
                let mut g = 0;
                while g < nr {
                    let gr = group.min(nr - g);
                    let w = &data[(r0 + g) * rb..(r0 + g + gr) * rb];
                    let o = &mut out[g * m..(g + gr) * m];
                    let mut t = 0;
                    while t < m {
                        let mt = (m - t).min(MAX_MT);
                        kernel(kind, lv, w, gr, &act, t, mt, o, m);
                        t += mt;
                    }
                    g += gr;
                }
            });
        if m == 1 {
            return yt;
        }
        let mut y = vec![0f32; m * n];
        for j in 0..n {
            for i in 0..m {
                y[i * n + j] = yt[j * m + i];
            }
        }
        y
    }

    /// Prefill: dequantize blocks of rows and use candle's f32 GEMM.
    fn matmul_dequant(&self, x: &[f32], m: usize) -> Vec<f32> {
        use candle_core::{Device, Tensor};
        let (n, k) = (self.rows, self.cols);
        assert_eq!(
            x.len(),
            m * k,
            "matmul: x has {} values, expected {m}x{k}",
            x.len()
        );
        let mut y = vec![0f32; m * n];
        if m == 0 || n == 0 {
            return y;
        }
        let xt = Tensor::from_slice(x, (m, k), &Device::Cpu).expect("x tensor");
        // ~2 MB of f32 weights per block.
        let chunk = ((1usize << 19) / k).clamp(64, 4096).min(n);
        let mut r0 = 0;
        while r0 < n {
            let r1 = (r0 + chunk).min(n);
            let nr = r1 - r0;
            let mut w = vec![0f32; nr * k];
            self.dequantize_rows(r0, r1, &mut w);
            let wt = Tensor::from_vec(w, (nr, k), &Device::Cpu).expect("w tensor");
            let yc = xt.matmul(&wt.t().expect("t")).expect("matmul");
            let yc = yc
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("to_vec");
            for i in 0..m {
                y[i * n + r0..i * n + r1].copy_from_slice(&yc[i * nr..(i + 1) * nr]);
            }
            r0 = r1;
        }
        y
    }
}

fn quantize_into<B: GgmlType>(src: &[f32], dst: &mut [u8]) {
    let n = src.len() / B::BLCK_SIZE;
    let mut blocks = vec![B::zeros(); n];
    B::from_float(src, &mut blocks);
    assert_eq!(dst.len(), n * std::mem::size_of::<B>());
    // SAFETY: ggml blocks are `repr(C)` plain data (f16 / integer fields, no padding: candle
    // asserts their sizes); `dst` has exactly their byte length.
    unsafe {
        std::ptr::copy_nonoverlapping(blocks.as_ptr() as *const u8, dst.as_mut_ptr(), dst.len())
    };
}

fn dequantize_with<B: GgmlType>(src: &[u8], dst: &mut [f32]) {
    let n = src.len() / std::mem::size_of::<B>();
    let mut blocks = vec![B::zeros(); n];
    // SAFETY: every bit pattern is a valid block (plain f16 / integer fields); the copy fills
    // exactly `n` blocks and `blocks` is properly aligned.
    unsafe {
        std::ptr::copy_nonoverlapping(
            src.as_ptr(),
            blocks.as_mut_ptr() as *mut u8,
            n * std::mem::size_of::<B>(),
        )
    };
    B::to_float(&blocks, dst);
}

fn dequantize_bytes(kind: QuantKind, src: &[u8], dst: &mut [f32]) {
    match kind {
        QuantKind::Q8_0 => dequantize_with::<BlockQ8_0>(src, dst),
        QuantKind::Q4_0 => dequantize_with::<BlockQ4_0>(src, dst),
        QuantKind::Q4_1 => dequantize_with::<BlockQ4_1>(src, dst),
        QuantKind::Q4K => dequantize_with::<BlockQ4K>(src, dst),
        QuantKind::Q6K => dequantize_with::<BlockQ6K>(src, dst),
    }
}

// ---------------------------------------------------------------------------------------
// Instruction-set level, chosen once at run time.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

fn level() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static LV: OnceLock<Level> = OnceLock::new();
        return *LV.get_or_init(|| {
            if std::env::var_os("LMGEN_QUANT_SCALAR").is_some() {
                Level::Scalar
            } else if is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
            {
                Level::Avx2
            } else {
                Level::Scalar
            }
        });
    }
    #[allow(unreachable_code)]
    Level::Scalar
}

// ---------------------------------------------------------------------------------------
// Activation quantization.

/// Activation rows quantized to 8 bits: 32-value blocks with an f32 scale (`s` = scale ×
/// sum of the block's quants, for the Q4_0 offset and the Q4_1 minimum), or ggml's Q8_K
/// 256-value blocks (`bsums` = sums of each 16 quants).
struct QAct {
    k: usize,
    nb: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    bsums: Vec<i16>,
}

impl QAct {
    fn new(kind: QuantKind, x: &[f32], m: usize, k: usize, lv: Level) -> Self {
        let bs = kind.block_size();
        let nb = k / bs;
        let mut a = QAct {
            k,
            nb,
            qs: vec![0i8; m * k],
            d: vec![0f32; m * nb],
            s: Vec::new(),
            bsums: Vec::new(),
        };
        let big = bs == QK_K;
        if big {
            a.bsums = vec![0i16; m * nb * 16];
        } else {
            a.s = vec![0f32; m * nb];
        }
        let row = |i: usize, qs: &mut [i8], d: &mut [f32], s: &mut [f32], bsums: &mut [i16]| {
            let xr = &x[i * k..(i + 1) * k];
            if big {
                quant_row_k(xr, qs, d, bsums, lv)
            } else {
                quant_row_32(xr, qs, d, s, lv)
            }
        };
        if m * k < 32768 {
            for i in 0..m {
                let (s, b) = if big {
                    (&mut [][..], &mut a.bsums[i * nb * 16..(i + 1) * nb * 16])
                } else {
                    (&mut a.s[i * nb..(i + 1) * nb], &mut [][..])
                };
                row(
                    i,
                    &mut a.qs[i * k..(i + 1) * k],
                    &mut a.d[i * nb..(i + 1) * nb],
                    s,
                    b,
                );
            }
        } else {
            let bl = if big { nb * 16 } else { 1 };
            let sl = if big { 1 } else { nb };
            let mut sv = std::mem::take(&mut a.s);
            let mut bv = std::mem::take(&mut a.bsums);
            if sv.is_empty() {
                sv = vec![0f32; m];
            }
            if bv.is_empty() {
                bv = vec![0i16; m];
            }
            a.qs.par_chunks_mut(k)
                .zip(a.d.par_chunks_mut(nb))
                .zip(sv.par_chunks_mut(sl))
                .zip(bv.par_chunks_mut(bl))
                .enumerate()
                .for_each(|(i, (((q, d), s), b))| {
                    let (s, b): (&mut [f32], &mut [i16]) =
                        if big { (&mut [], b) } else { (s, &mut []) };
                    row(i, q, d, s, b)
                });
            if big {
                a.bsums = bv;
            } else {
                a.s = sv;
            }
        }
        a
    }
}

/// Symmetric 8-bit blocks of 32: `d = amax / 127`, `q = round_ties_even(x / d)`.
#[inline(always)]
fn quant_row_32_generic(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for (b, ((xb, qb), (db, sb))) in x
        .chunks_exact(QK)
        .zip(qs.chunks_exact_mut(QK))
        .zip(d.iter_mut().zip(s.iter_mut()))
        .enumerate()
    {
        let _ = b;
        // max |x| through the bit patterns (integer max vectorizes; NaN-free input assumed)
        let mut amax_bits = 0u32;
        for &v in xb {
            amax_bits = amax_bits.max(v.to_bits() & 0x7fff_ffff);
        }
        let amax = f32::from_bits(amax_bits);
        let dd = amax / 127.0;
        let id = if dd != 0.0 { 1.0 / dd } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in qb.iter_mut().zip(xb) {
            let r = (v * id).round_ties_even().clamp(-127.0, 127.0) as i32;
            *q = r as i8;
            sum += r;
        }
        *db = dd;
        *sb = dd * sum as f32;
    }
}

/// ggml's Q8_K: per 256 values `d = max / -128` (max = the value of largest magnitude),
/// `q = min(127, round(x / d))`, plus the sum of each 16 quants.
#[inline(always)]
fn quant_row_k_generic(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
    for ((xb, qb), (db, bb)) in x
        .chunks_exact(QK_K)
        .zip(qs.chunks_exact_mut(QK_K))
        .zip(d.iter_mut().zip(bsums.chunks_exact_mut(16)))
    {
        let mut amax = 0f32;
        let mut max = 0f32;
        for &v in xb {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            *db = 0.0;
            qb.iter_mut().for_each(|q| *q = 0);
            bb.iter_mut().for_each(|b| *b = 0);
            continue;
        }
        let iscale = -128.0 / max;
        for (q, &v) in qb.iter_mut().zip(xb) {
            *q = (iscale * v).round_ties_even().clamp(-128.0, 127.0) as i32 as i8;
        }
        for (j, b) in bb.iter_mut().enumerate() {
            *b = qb[16 * j..16 * j + 16].iter().map(|&q| q as i16).sum();
        }
        *db = 1.0 / iscale;
    }
}

fn quant_row_32(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32], lv: Level) {
    match lv {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Level::Avx2` is only chosen when the CPU has AVX2, FMA and F16C.
        Level::Avx2 => unsafe { avx2::quant_row_32(x, qs, d, s) },
        Level::Scalar => quant_row_32_generic(x, qs, d, s),
    }
}

fn quant_row_k(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16], lv: Level) {
    match lv {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 => unsafe { avx2::quant_row_k(x, qs, d, bsums) },
        Level::Scalar => quant_row_k_generic(x, qs, d, bsums),
    }
}

// ---------------------------------------------------------------------------------------
// Dot-product kernels: `nrows` W rows (contiguous ggml blocks in `w`) against activation rows
// `t0..t0 + mt`, writing `out[r * m + t0 + t]`.

/// Activation rows per kernel call (accumulators live in registers).
const MAX_MT: usize = 4;

#[allow(clippy::too_many_arguments)]
fn kernel(
    kind: QuantKind,
    lv: Level,
    w: &[u8],
    nrows: usize,
    act: &QAct,
    t0: usize,
    mt: usize,
    out: &mut [f32],
    m: usize,
) {
    debug_assert!(mt >= 1 && mt <= MAX_MT);
    debug_assert_eq!(w.len(), nrows * kind.row_bytes(act.k));
    debug_assert!(out.len() >= nrows * m);
    match lv {
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => {
            macro_rules! go {
                ($f:ident) => {
                    // SAFETY: AVX2/FMA/F16C present (Level::Avx2); slice lengths checked above.
                    unsafe {
                        match mt {
                            1 => avx2::$f::<1>(w, nrows, act, t0, out, m),
                            2 => avx2::$f::<2>(w, nrows, act, t0, out, m),
                            3 => avx2::$f::<3>(w, nrows, act, t0, out, m),
                            _ => avx2::$f::<4>(w, nrows, act, t0, out, m),
                        }
                    }
                };
            }
            match kind {
                QuantKind::Q8_0 => go!(q8_0),
                QuantKind::Q4_0 => go!(q4_0),
                QuantKind::Q4_1 => go!(q4_1),
                QuantKind::Q4K => go!(q4k),
                QuantKind::Q6K => go!(q6k),
            }
        }
        Level::Scalar => {
            let rb = kind.row_bytes(act.k);
            for r in 0..nrows {
                let wr = &w[r * rb..(r + 1) * rb];
                for t in t0..t0 + mt {
                    out[r * m + t] = scalar::dot(kind, wr, act, t);
                }
            }
        }
    }
}

#[inline(always)]
fn f16_at(p: &[u8], off: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([p[off], p[off + 1]])).to_f32()
}

/// ggml's 6-bit scale/min unpacking for Q4_K.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Portable kernels computing the same integer block sums as the SIMD ones.
mod scalar {
    use super::*;

    pub(super) fn dot(kind: QuantKind, w: &[u8], a: &QAct, t: usize) -> f32 {
        let (k, nb) = (a.k, a.nb);
        let xq = &a.qs[t * k..(t + 1) * k];
        let xd = &a.d[t * nb..(t + 1) * nb];
        let mut acc = 0f32;
        match kind {
            QuantKind::Q8_0 => {
                for b in 0..nb {
                    let blk = &w[b * 34..(b + 1) * 34];
                    let s: i32 = (0..QK)
                        .map(|l| blk[2 + l] as i8 as i32 * xq[b * QK + l] as i32)
                        .sum();
                    acc += f16_at(blk, 0) * xd[b] * s as f32;
                }
            }
            QuantKind::Q4_0 | QuantKind::Q4_1 => {
                let (bb, off) = if kind == QuantKind::Q4_0 {
                    (18, 2)
                } else {
                    (20, 4)
                };
                let xs = &a.s[t * nb..(t + 1) * nb];
                let mut corr = 0f32;
                for b in 0..nb {
                    let blk = &w[b * bb..(b + 1) * bb];
                    let x = &xq[b * QK..(b + 1) * QK];
                    let mut s = 0i32;
                    for l in 0..16 {
                        let q = blk[off + l];
                        s += (q & 0xF) as i32 * x[l] as i32 + (q >> 4) as i32 * x[l + 16] as i32;
                    }
                    let dw = f16_at(blk, 0);
                    acc += dw * xd[b] * s as f32;
                    corr += if kind == QuantKind::Q4_0 {
                        -8.0 * dw
                    } else {
                        f16_at(blk, 2)
                    } * xs[b];
                }
                acc += corr;
            }
            QuantKind::Q4K => {
                let bs = &a.bsums[t * nb * 16..(t + 1) * nb * 16];
                for b in 0..nb {
                    let blk = &w[b * 144..(b + 1) * 144];
                    let (d, dmin) = (f16_at(blk, 0), f16_at(blk, 2));
                    let sc = &blk[4..16];
                    let qs = &blk[16..144];
                    let x = &xq[b * QK_K..(b + 1) * QK_K];
                    let (mut sumi, mut summ) = (0i32, 0i32);
                    for j in 0..8 {
                        let (s, mn) = scale_min_k4(j, sc);
                        let q = &qs[32 * (j / 2)..32 * (j / 2) + 32];
                        let xs = &x[32 * j..32 * j + 32];
                        let mut p = 0i32;
                        for l in 0..32 {
                            let v = if j % 2 == 0 { q[l] & 0xF } else { q[l] >> 4 };
                            p += v as i32 * xs[l] as i32;
                        }
                        sumi += s as i32 * p;
                        summ +=
                            mn as i32 * (bs[b * 16 + 2 * j] as i32 + bs[b * 16 + 2 * j + 1] as i32);
                    }
                    acc += d * xd[b] * sumi as f32 - dmin * xd[b] * summ as f32;
                }
            }
            QuantKind::Q6K => {
                for b in 0..nb {
                    let blk = &w[b * 210..(b + 1) * 210];
                    let (ql, qh) = (&blk[0..128], &blk[128..192]);
                    let sc = &blk[192..208];
                    let d = f16_at(blk, 208);
                    let x = &xq[b * QK_K..(b + 1) * QK_K];
                    let mut sumi = 0i32;
                    for h in 0..2 {
                        let mut g = [0i32; 8];
                        for l in 0..32 {
                            let (a0, a1, hh) =
                                (ql[64 * h + l], ql[64 * h + l + 32], qh[32 * h + l]);
                            let q = [
                                (a0 & 0xF) | ((hh & 3) << 4),
                                (a1 & 0xF) | (((hh >> 2) & 3) << 4),
                                (a0 >> 4) | (((hh >> 4) & 3) << 4),
                                (a1 >> 4) | (((hh >> 6) & 3) << 4),
                            ];
                            for (i, &qi) in q.iter().enumerate() {
                                g[2 * i + l / 16] +=
                                    (qi as i32 - 32) * x[128 * h + 32 * i + l] as i32;
                            }
                        }
                        for (i, gi) in g.iter().enumerate() {
                            sumi += sc[8 * h + i] as i8 as i32 * gi;
                        }
                    }
                    acc += d * xd[b] * sumi as f32;
                }
            }
        }
        acc
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quant_row_32(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
        quant_row_32_generic(x, qs, d, s)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn quant_row_k(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
        quant_row_k_generic(x, qs, d, bsums)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn f16(p: *const u8) -> f32 {
        let b = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(b as i32)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    }

    /// Software prefetch distance in bytes of W: the kernels do enough work per cache line
    /// that out-of-order execution alone keeps too few lines in flight to reach DRAM
    /// bandwidth.
    fn pf_dist() -> usize {
        use std::sync::OnceLock;
        static D: OnceLock<usize> = OnceLock::new();
        *D.get_or_init(|| {
            std::env::var("QPF")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(2048)
        })
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn prefetch(p: *const u8) {
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load(p: *const i8) -> __m256i {
        _mm256_loadu_si256(p as *const __m256i)
    }

    /// Q8_0 × Q8 (32-blocks): sign trick so `maddubs` gets |w| (u8) × sign(x, w) (i8).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q8_0<const MT: usize>(
        w: &[u8],
        nrows: usize,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        let (k, nb) = (a.k, a.nb);
        let rb = nb * 34;
        let ones = _mm256_set1_epi16(1);
        let xq: [*const i8; MT] = std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k));
        let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
        let pf = pf_dist();
        for r in 0..nrows {
            let wp = w.as_ptr().add(r * rb);
            let mut acc = [[_mm256_setzero_ps(); 2]; MT];
            for b in 0..nb {
                let blk = wp.add(b * 34);
                if pf != 0 {
                    prefetch(blk.add(pf));
                }
                let dw = f16(blk);
                let wq = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                let aw = _mm256_sign_epi8(wq, wq);
                for t in 0..MT {
                    let sx = _mm256_sign_epi8(load(xq[t].add(b * QK)), wq);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
                    let u = b & 1;
                    acc[t][u] = _mm256_fmadd_ps(
                        _mm256_set1_ps(dw * *xd[t].add(b)),
                        _mm256_cvtepi32_ps(p),
                        acc[t][u],
                    );
                }
            }
            for t in 0..MT {
                *out.get_unchecked_mut(r * m + t0 + t) = hsum(_mm256_add_ps(acc[t][0], acc[t][1]));
            }
        }
    }

    /// Q4_0 / Q4_1 × Q8 (32-blocks): unsigned nibbles × x, the offset (−8·d) or minimum
    /// (m) enters through the precomputed `d_x · Σ q_x`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn q4_01<const MT: usize, const Q41: bool>(
        w: &[u8],
        nrows: usize,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        let (k, nb) = (a.k, a.nb);
        let bb = if Q41 { 20 } else { 18 };
        let qoff = if Q41 { 4 } else { 2 };
        let rb = nb * bb;
        let ones = _mm256_set1_epi16(1);
        let m4 = _mm256_set1_epi8(0x0F);
        let xq: [*const i8; MT] = std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k));
        let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
        let xs: [*const f32; MT] = std::array::from_fn(|t| a.s.as_ptr().add((t0 + t) * nb));
        let pf = pf_dist();
        for r in 0..nrows {
            let wp = w.as_ptr().add(r * rb);
            let mut acc = [[_mm256_setzero_ps(); 2]; MT];
            let mut corr = [0f32; MT];
            for b in 0..nb {
                let blk = wp.add(b * bb);
                if pf != 0 {
                    prefetch(blk.add(pf));
                }
                let dw = f16(blk);
                let cw = if Q41 { f16(blk.add(2)) } else { -8.0 * dw };
                let q = _mm_loadu_si128(blk.add(qoff) as *const __m128i);
                let nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(q, 4), q), m4);
                for t in 0..MT {
                    let p =
                        _mm256_madd_epi16(_mm256_maddubs_epi16(nib, load(xq[t].add(b * QK))), ones);
                    let u = b & 1;
                    acc[t][u] = _mm256_fmadd_ps(
                        _mm256_set1_ps(dw * *xd[t].add(b)),
                        _mm256_cvtepi32_ps(p),
                        acc[t][u],
                    );
                    corr[t] += cw * *xs[t].add(b);
                }
            }
            for t in 0..MT {
                *out.get_unchecked_mut(r * m + t0 + t) =
                    hsum(_mm256_add_ps(acc[t][0], acc[t][1])) + corr[t];
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_0<const MT: usize>(
        w: &[u8],
        nrows: usize,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        q4_01::<MT, false>(w, nrows, a, t0, out, m)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4_1<const MT: usize>(
        w: &[u8],
        nrows: usize,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        q4_01::<MT, true>(w, nrows, a, t0, out, m)
    }

    /// Q4_K × Q8_K: per 64 values one 32-byte load gives both sub-blocks' nibbles;
    /// `maddubs` then `madd` with the 6-bit sub-block scale; the minimums enter through the
    /// activation's 16-value sums.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4k<const MT: usize>(
        w: &[u8],
        nrows: usize,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        let (k, nb) = (a.k, a.nb);
        let rb = nb * 144;
        let m4 = _mm256_set1_epi8(0x0F);
        let xq: [*const i8; MT] = std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k));
        let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
        let xb: [*const i16; MT] =
            std::array::from_fn(|t| a.bsums.as_ptr().add((t0 + t) * nb * 16));
        let pf = pf_dist();
        for r in 0..nrows {
            let wp = w.as_ptr().add(r * rb);
            let mut acc = [_mm256_setzero_ps(); MT];
            let mut accm = [_mm_setzero_ps(); MT];
            for b in 0..nb {
                let blk = wp.add(b * 144);
                if pf != 0 {
                    prefetch(blk.add(pf));
                    prefetch(blk.add(pf + 64));
                    prefetch(blk.add(pf + 128));
                }
                let d = f16(blk);
                let dmin = f16(blk.add(2));
                let sc = std::slice::from_raw_parts(blk.add(4), 12);
                let mut scales = [0i16; 8];
                let mut mins = [0i16; 8];
                for j in 0..8 {
                    let (s, mn) = scale_min_k4(j, sc);
                    scales[j] = s as i16;
                    mins[j] = mn as i16;
                }
                let mins = _mm_loadu_si128(mins.as_ptr() as *const __m128i);
                let qs = blk.add(16);
                let mut sumi = [_mm256_setzero_si256(); MT];
                for c in 0..4 {
                    let q4 = _mm256_loadu_si256(qs.add(32 * c) as *const __m256i);
                    let lo = _mm256_and_si256(q4, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4);
                    let slo = _mm256_set1_epi16(scales[2 * c]);
                    let shi = _mm256_set1_epi16(scales[2 * c + 1]);
                    for t in 0..MT {
                        let x = xq[t].add(b * QK_K + 64 * c);
                        let plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load(x)), slo);
                        let phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load(x.add(32))), shi);
                        sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(plo, phi));
                    }
                }
                for t in 0..MT {
                    let dx = *xd[t].add(b);
                    acc[t] = _mm256_fmadd_ps(
                        _mm256_set1_ps(d * dx),
                        _mm256_cvtepi32_ps(sumi[t]),
                        acc[t],
                    );
                    let bs = xb[t].add(b * 16) as *const __m128i;
                    let s8 = _mm_hadd_epi16(_mm_loadu_si128(bs), _mm_loadu_si128(bs.add(1)));
                    let pm = _mm_madd_epi16(mins, s8);
                    accm[t] = _mm_fmadd_ps(_mm_set1_ps(dmin * dx), _mm_cvtepi32_ps(pm), accm[t]);
                }
            }
            for t in 0..MT {
                let m4s = accm[t];
                let s2 = _mm_add_ps(m4s, _mm_movehl_ps(m4s, m4s));
                let mm = _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
                *out.get_unchecked_mut(r * m + t0 + t) = hsum(acc[t]) - mm;
            }
        }
    }

    /// Q6_K × Q8_K: 6-bit unsigned quants × x via `maddubs`, `madd` with the 16-value
    /// scales; the −32 offset enters through the activation's 16-value sums.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q6k<const MT: usize>(
        w: &[u8],
        nrows: usize,
        a: &QAct,
        t0: usize,
        out: &mut [f32],
        m: usize,
    ) {
        let (k, nb) = (a.k, a.nb);
        let rb = nb * 210;
        let m4 = _mm256_set1_epi8(0x0F);
        let m3 = _mm256_set1_epi8(3);
        let m_c = _mm256_set1_epi8(0x0C);
        let m_30 = _mm256_set1_epi8(0x30);
        let m_c0 = _mm256_set1_epi8(0xC0u8 as i8);
        let xq: [*const i8; MT] = std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k));
        let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
        let xb: [*const i16; MT] =
            std::array::from_fn(|t| a.bsums.as_ptr().add((t0 + t) * nb * 16));
        let pf = pf_dist();
        for r in 0..nrows {
            let wp = w.as_ptr().add(r * rb);
            let mut acc = [_mm256_setzero_ps(); MT];
            for b in 0..nb {
                let blk = wp.add(b * 210);
                if pf != 0 {
                    prefetch(blk.add(pf));
                    prefetch(blk.add(pf + 64));
                    prefetch(blk.add(pf + 128));
                    prefetch(blk.add(pf + 192));
                }
                let ql = blk;
                let qh = blk.add(128);
                let sc8 = _mm_loadu_si128(blk.add(192) as *const __m128i);
                let d = f16(blk.add(208));
                let sc16 = _mm256_cvtepi8_epi16(sc8);
                let mut sumi = [_mm256_setzero_si256(); MT];
                // −32 · Σ_g sc_g · bsum_g
                for t in 0..MT {
                    let bs = _mm256_loadu_si256(xb[t].add(b * 16) as *const __m256i);
                    sumi[t] = _mm256_sub_epi32(
                        sumi[t],
                        _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5),
                    );
                }
                for h in 0..2 {
                    let b1 = _mm256_loadu_si256(ql.add(64 * h) as *const __m256i);
                    let b2 = _mm256_loadu_si256(ql.add(64 * h + 32) as *const __m256i);
                    let bh = _mm256_loadu_si256(qh.add(32 * h) as *const __m256i);
                    let q = [
                        _mm256_or_si256(
                            _mm256_and_si256(b1, m4),
                            _mm256_slli_epi16(_mm256_and_si256(bh, m3), 4),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(b2, m4),
                            _mm256_slli_epi16(_mm256_and_si256(bh, m_c), 2),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(b1, 4), m4),
                            _mm256_and_si256(bh, m_30),
                        ),
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16(b2, 4), m4),
                            _mm256_srli_epi16(_mm256_and_si256(bh, m_c0), 2),
                        ),
                    ];
                    for (i, qi) in q.iter().enumerate() {
                        // scales of the two 16-value groups of this 32-value run, as i16 × 8 each
                        let g = (8 * h + 2 * i) as i8;
                        let shuf = _mm_set_epi8(
                            g + 1,
                            g + 1,
                            g + 1,
                            g + 1,
                            g + 1,
                            g + 1,
                            g + 1,
                            g + 1,
                            g,
                            g,
                            g,
                            g,
                            g,
                            g,
                            g,
                            g,
                        );
                        let sv = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(sc8, shuf));
                        for t in 0..MT {
                            let x = load(xq[t].add(b * QK_K + 128 * h + 32 * i));
                            sumi[t] = _mm256_add_epi32(
                                sumi[t],
                                _mm256_madd_epi16(_mm256_maddubs_epi16(*qi, x), sv),
                            );
                        }
                    }
                }
                for t in 0..MT {
                    acc[t] = _mm256_fmadd_ps(
                        _mm256_set1_ps(d * *xd[t].add(b)),
                        _mm256_cvtepi32_ps(sumi[t]),
                        acc[t],
                    );
                }
            }
            for t in 0..MT {
                *out.get_unchecked_mut(r * m + t0 + t) = hsum(acc[t]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u32) -> impl FnMut() -> f32 {
        let mut s = seed;
        move || {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
        }
    }

    fn randv(n: usize, seed: u32) -> Vec<f32> {
        let mut r = rng(seed);
        (0..n).map(|_| r()).collect()
    }

    fn ref_matmul(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                y[i * n + j] = (0..k)
                    .map(|l| x[i * k + l] as f64 * w[j * k + l] as f64)
                    .sum::<f64>() as f32;
            }
        }
        y
    }

    fn cols_for(kind: QuantKind) -> usize {
        if kind.block_size() == QK_K {
            512
        } else {
            96
        }
    }

    #[test]
    fn parse_and_sizes() {
        for k in QuantKind::ALL {
            assert_eq!(QuantKind::parse(k.name()), Some(k));
            assert_eq!(QuantKind::from_ggml_type(k.ggml_type()), Some(k));
        }
        assert_eq!("Q4_K".parse::<QuantKind>().unwrap(), QuantKind::Q4K);
        assert!("q5_k".parse::<QuantKind>().is_err());
        assert_eq!(
            std::mem::size_of::<BlockQ8_0>(),
            QuantKind::Q8_0.block_bytes()
        );
        assert_eq!(
            std::mem::size_of::<BlockQ4_0>(),
            QuantKind::Q4_0.block_bytes()
        );
        assert_eq!(
            std::mem::size_of::<BlockQ4_1>(),
            QuantKind::Q4_1.block_bytes()
        );
        assert_eq!(
            std::mem::size_of::<BlockQ4K>(),
            QuantKind::Q4K.block_bytes()
        );
        assert_eq!(
            std::mem::size_of::<BlockQ6K>(),
            QuantKind::Q6K.block_bytes()
        );
    }

    #[test]
    fn rejects_bad_shapes() {
        assert!(QMatrix::quantize(&[0.0; 3 * 48], 3, 48, QuantKind::Q8_0).is_err());
        assert!(QMatrix::quantize(&[0.0; 2 * 288], 2, 288, QuantKind::Q4K).is_err());
        assert!(QMatrix::quantize(&[0.0; 2 * 32], 2, 32, QuantKind::Q8_0).is_ok());
        assert!(QMatrix::from_ggml_bytes(QuantKind::Q8_0, 2, 32, &[0u8; 67]).is_err());
        assert!(QMatrix::from_ggml_bytes(QuantKind::Q8_0, 2, 32, &[0u8; 68]).is_ok());
    }

    /// Relative RMS error of quantize→dequantize on uniform [-0.5, 0.5) data.
    #[test]
    fn quantize_dequantize_error() {
        for (kind, bound) in [
            (QuantKind::Q8_0, 0.006),
            (QuantKind::Q4_0, 0.12),
            (QuantKind::Q4_1, 0.08),
            (QuantKind::Q4K, 0.08),
            (QuantKind::Q6K, 0.025),
        ] {
            let (rows, cols) = (7, 1024);
            let w = randv(rows * cols, 3);
            let q = QMatrix::quantize(&w, rows, cols, kind).unwrap();
            assert_eq!(
                q.storage_bytes(),
                rows * cols / kind.block_size() * kind.block_bytes()
            );
            let d = q.dequantize();
            let err: f64 = w
                .iter()
                .zip(&d)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum::<f64>();
            let norm: f64 = w.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
            let rel = (err / norm).sqrt();
            assert!(rel < bound, "{kind}: relative rms error {rel}");
            // max abs error bounded by a step of the block's grid
            let max = w
                .iter()
                .zip(&d)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let step = match kind {
                QuantKind::Q8_0 => 0.5 / 127.0,
                QuantKind::Q6K => 1.0 / 32.0,
                _ => 1.0 / 8.0,
            };
            assert!(max <= step, "{kind}: max abs error {max}");
        }
    }

    #[test]
    fn matmul_matches_dequantized_f32() {
        for kind in QuantKind::ALL {
            let (n, k) = (37, cols_for(kind));
            let w = randv(n * k, 11);
            let q = QMatrix::quantize(&w, n, k, kind).unwrap();
            let wd = q.dequantize();
            for m in [1usize, 3, 16, 40] {
                let x = randv(m * k, 100 + m as u32);
                let want = ref_matmul(&x, m, k, &wd, n);
                let got = q.matmul(&x, m);
                assert_eq!(got.len(), m * n);
                // activations rounded to 8 bits: error ~ |x|·|w|·sqrt(k)·2^-8
                let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
                let tol = if m > SMALL_M { 1e-4 } else { 0.02 } * scale.max(1.0);
                for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - e).abs() <= tol,
                        "{kind} m={m} [{i}]: {g} vs {e} (tol {tol})"
                    );
                }
                // every level of the integer kernel, including the scalar fallback
                for lv in levels() {
                    let got = q.matmul_small(&x, m, lv);
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        let tol = 0.02 * scale.max(1.0);
                        assert!(
                            (g - e).abs() <= tol,
                            "{kind} {lv:?} m={m} [{i}]: {g} vs {e}"
                        );
                    }
                }
            }
        }
    }

    fn levels() -> Vec<Level> {
        let mut v = vec![Level::Scalar];
        #[cfg(target_arch = "x86_64")]
        if level() == Level::Avx2 {
            v.push(Level::Avx2);
        }
        v
    }

    #[test]
    fn scalar_equals_simd() {
        let all = levels();
        if all.len() < 2 {
            eprintln!("no SIMD level on this CPU; skipped");
            return;
        }
        for kind in QuantKind::ALL {
            let (n, k) = (19, 2 * cols_for(kind));
            let q = QMatrix::quantize(&randv(n * k, 5), n, k, kind).unwrap();
            for m in [1usize, 2, 5, 16] {
                let x = randv(m * k, 7 + m as u32);
                let a = q.matmul_small(&x, m, Level::Scalar);
                for &lv in &all[1..] {
                    let b = q.matmul_small(&x, m, lv);
                    for (i, (u, v)) in a.iter().zip(&b).enumerate() {
                        assert!(
                            (u - v).abs() <= 1e-5 * (1.0 + u.abs()),
                            "{kind} {lv:?} m={m} [{i}]: {u} vs {v}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn activation_quantizers_agree() {
        for kind in [QuantKind::Q8_0, QuantKind::Q4K] {
            let (m, k) = (3, 512);
            let mut x = randv(m * k, 9);
            x[5] = 0.0;
            x[300..556].iter_mut().for_each(|v| *v = 0.0);
            let s = QAct::new(kind, &x, m, k, Level::Scalar);
            for lv in levels() {
                let v = QAct::new(kind, &x, m, k, lv);
                assert_eq!(s.qs, v.qs, "{kind} {lv:?}");
                assert_eq!(s.d, v.d);
                assert_eq!(s.s, v.s);
                assert_eq!(s.bsums, v.bsums);
            }
        }
    }

    #[test]
    fn ggml_bytes_round_trip_with_candle() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        for (kind, dt) in [
            (QuantKind::Q8_0, GgmlDType::Q8_0),
            (QuantKind::Q4_0, GgmlDType::Q4_0),
            (QuantKind::Q4_1, GgmlDType::Q4_1),
            (QuantKind::Q4K, GgmlDType::Q4K),
            (QuantKind::Q6K, GgmlDType::Q6K),
        ] {
            let (n, k) = (5, 512);
            let w = randv(n * k, 21);
            let t = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
            let qt = QTensor::quantize(&t, dt).unwrap();
            let bytes = qt.data().unwrap();
            let q = QMatrix::from_ggml_bytes(kind, n, k, &bytes).unwrap();
            assert_eq!(q.data(), &bytes[..], "{kind}");
            // our quantizer produces candle's (= ggml's reference) bytes
            assert_eq!(
                QMatrix::quantize(&w, n, k, kind).unwrap().data(),
                &bytes[..],
                "{kind}"
            );
            let want = qt
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(q.dequantize(), want, "{kind}");
        }
    }

    #[test]
    fn zero_rows_and_zero_inputs() {
        let q = QMatrix::quantize(&vec![0.0; 3 * 256], 3, 256, QuantKind::Q4K).unwrap();
        assert_eq!(q.matmul(&vec![0.0; 2 * 256], 2), vec![0.0; 6]);
        let q = QMatrix::quantize(&[], 0, 64, QuantKind::Q8_0).unwrap();
        assert!(q.matmul(&vec![1.0; 64], 1).is_empty());
    }
}
