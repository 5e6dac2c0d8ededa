//! Activation quantization: f32 rows to 8-bit blocks, once per matmul.
#[cfg(target_arch = "x86_64")]
use super::avx2;
use super::{Level, QuantKind, QK, QK_K};
use rayon::prelude::*;

/// Activation rows quantized to 8 bits: 32-value blocks with an f32 scale (`s` = scale ×
/// sum of the block's quants, for the Q4_0 offset and the Q4_1 minimum; `xu` = quants + 128
/// as u8, for the AVX-512 Q8_0 kernel), or ggml's Q8_K 256-value blocks (`bsums` = sums of
/// each 16 quants). The buffers only grow: refilling with at most as many values as before
/// does not allocate.
pub(super) struct QAct {
    pub(super) m: usize,
    pub(super) k: usize,
    pub(super) nb: usize,
    pub(super) qs: Vec<i8>,
    pub(super) xu: Vec<u8>,
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
    pub(super) bsums: Vec<i16>,
    /// Q4_K: per 256-block four i32, each the sums of two 32-value sub-blocks as an i16 pair.
    pub(super) bs32p: Vec<i32>,
}

impl QAct {
    pub(super) const fn empty() -> Self {
        QAct {
            m: 0,
            k: 0,
            nb: 0,
            qs: Vec::new(),
            xu: Vec::new(),
            d: Vec::new(),
            s: Vec::new(),
            bsums: Vec::new(),
            bs32p: Vec::new(),
        }
    }

    pub(super) fn new(kind: QuantKind, x: &[f32], m: usize, k: usize, lv: Level) -> Self {
        let mut a = Self::empty();
        a.fill(kind, x, m, k, lv);
        a
    }

    /// Quantizes the rows of `x` (`[m, k]`, `k` a multiple of the block size) for `kind`.
    pub(super) fn fill(&mut self, kind: QuantKind, x: &[f32], m: usize, k: usize, lv: Level) {
        let bs = kind.block_size();
        let nb = k / bs;
        let big = bs == QK_K;
        assert!(k > 0 && k.is_multiple_of(bs) && x.len() == m * k);
        (self.m, self.k, self.nb) = (m, k, nb);
        // Every element is overwritten below, so stale values left by `resize` do not matter.
        self.qs.resize(m * k, 0);
        self.d.resize(m * nb, 0.0);
        let par = m * k >= 32768;
        if big {
            self.s.clear();
            self.bsums.resize(m * nb * 16, 0);
            quant_rows(
                x,
                k,
                &mut self.qs,
                &mut self.d,
                &mut self.bsums,
                par,
                |x, q, d, b| quant_row_k(x, q, d, b, lv),
            );
        } else {
            self.bsums.clear();
            self.s.resize(m * nb, 0.0);
            quant_rows(
                x,
                k,
                &mut self.qs,
                &mut self.d,
                &mut self.s,
                par,
                |x, q, d, s| quant_row_32(x, q, d, s, lv),
            );
        }
        self.bs32p.clear();
        if kind == QuantKind::Q4K {
            self.bs32p.extend(self.bsums.chunks_exact(4).map(|b| {
                let lo = (b[0] as i32 + b[1] as i32) as u16 as u32;
                let hi = (b[2] as i32 + b[3] as i32) as u16 as u32;
                (lo | (hi << 16)) as i32
            }));
        }
        self.xu.clear();
        #[cfg(target_arch = "x86_64")]
        if kind == QuantKind::Q8_0 && lv == Level::Avx512 {
            self.xu.extend(self.qs.iter().map(|&q| (q as u8) ^ 0x80));
        }
    }
}

/// Runs `f(x row, quants, scales, side)` over the rows; `side` (the per-row sums) is split
/// into as many equal parts as there are rows.
fn quant_rows<S: Send>(
    x: &[f32],
    k: usize,
    qs: &mut [i8],
    d: &mut [f32],
    side: &mut [S],
    par: bool,
    f: impl Fn(&[f32], &mut [i8], &mut [f32], &mut [S]) + Sync,
) {
    let m = x.len() / k;
    if m == 0 {
        return;
    }
    let (dl, sl) = (d.len() / m, side.len() / m);
    if par {
        x.par_chunks(k)
            .zip(qs.par_chunks_mut(k))
            .zip(d.par_chunks_mut(dl))
            .zip(side.par_chunks_mut(sl))
            .for_each(|(((x, q), d), s)| f(x, q, d, s));
    } else {
        for (((x, q), d), s) in x
            .chunks(k)
            .zip(qs.chunks_mut(k))
            .zip(d.chunks_mut(dl))
            .zip(side.chunks_mut(sl))
        {
            f(x, q, d, s)
        }
    }
}

/// Symmetric 8-bit blocks of 32: `d = amax / 127`, `q = round_ties_even(x / d)`.
#[inline(always)]
pub(super) fn quant_row_32_generic(x: &[f32], qs: &mut [i8], d: &mut [f32], s: &mut [f32]) {
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
pub(super) fn quant_row_k_generic(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16]) {
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
        // SAFETY: both levels are only chosen when the CPU has AVX2, FMA and F16C.
        Level::Avx2 | Level::Avx512 => unsafe { avx2::quant_row_32(x, qs, d, s) },
        Level::Scalar => quant_row_32_generic(x, qs, d, s),
    }
}

fn quant_row_k(x: &[f32], qs: &mut [i8], d: &mut [f32], bsums: &mut [i16], lv: Level) {
    match lv {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Level::Avx2 | Level::Avx512 => unsafe { avx2::quant_row_k(x, qs, d, bsums) },
        Level::Scalar => quant_row_k_generic(x, qs, d, bsums),
    }
}
