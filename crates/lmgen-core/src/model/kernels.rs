//! CPU kernels where candle's generic path is measured to be slow.
//!
//! `matmul_wt_small`: `y[m, n] = x[m, k] · W[n, k]ᵀ` for the few-row case (decode steps).
//! candle routes this through a general GEMM that packs the weight matrix on every call;
//! here each weight row is streamed once from memory and dotted with all `m` input rows
//! while it sits in L1, with AVX2/FMA chosen at run time (the binary targets portable
//! x86-64) and rows split across the rayon pool. Decode is bound by reading the weights,
//! so this is the loop that decides tokens/s.
use rayon::prelude::*;

/// Largest `m` routed to the streaming kernel; beyond it a blocked GEMM wins.
pub const SMALL_M: usize = 16;

/// Below this many weight bytes a product runs on the calling thread.
const INLINE_BYTES: usize = 512 << 10;

/// `y[m, n] = x[m, k] · w[n, k]ᵀ + bias[n]`.
pub fn matmul_wt_small(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    debug_assert_eq!(x.len(), m * k);
    debug_assert_eq!(w.len(), n * k);
    // Work in column blocks of W rows; each task writes its block transposed ([rows, m]).
    let threads = rayon::current_num_threads().max(1);
    let block = (n / (threads * 8)).clamp(16, 1024).min(n.max(1));
    let mut yt = vec![0f32; n * m];
    let work = |(bi, out): (usize, &mut [f32])| {
        let r0 = bi * block;
        let rows = out.len() / m;
        for r in 0..rows {
            let wr = &w[(r0 + r) * k..(r0 + r + 1) * k];
            let o = &mut out[r * m..(r + 1) * m];
            let mut i = 0;
            while i < m {
                let mt = (m - i).min(4);
                dot_tile(&x[i * k..(i + mt) * k], mt, k, wr, &mut o[i..i + mt]);
                i += mt;
            }
            if let Some(b) = bias {
                o.iter_mut().for_each(|v| *v += b[r0 + r]);
            }
        }
    };
    // Handing small matrices to the pool costs more than it saves (measured for the
    // quantized kernels: 8 µs pooled vs 3 µs inline for a 192x576 matrix).
    if n * k * 4 < INLINE_BYTES {
        yt.chunks_mut(block * m).enumerate().for_each(work);
    } else {
        yt.par_chunks_mut(block * m).enumerate().for_each(work);
    }
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

/// `out[t] = x[t, :] · w` for `mt <= 4` rows of `x`.
#[inline]
fn dot_tile(x: &[f32], mt: usize, k: usize, w: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if has_avx2_fma() {
            // SAFETY: the CPU supports AVX2 and FMA (checked above); slices have the lengths asserted by the caller.
            unsafe {
                match mt {
                    1 => avx::tile::<1>(x, k, w, out),
                    2 => avx::tile::<2>(x, k, w, out),
                    3 => avx::tile::<3>(x, k, w, out),
                    _ => avx::tile::<4>(x, k, w, out),
                }
            }
            return;
        }
    }
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

#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

#[cfg(target_arch = "x86_64")]
mod avx {
    use std::arch::x86_64::*;

    /// Software prefetch distance along the weight stream, in floats (4 KiB).
    const PREFETCH_FLOATS: usize = 1024;

    /// `M` rows of `x` against one weight row; 4 accumulators per row when `M == 1` so the
    /// FMA latency chain does not limit the streaming rate.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile<const M: usize>(x: &[f32], k: usize, w: &[f32], out: &mut [f32]) {
        const U: usize = 2;
        let mut acc = [[_mm256_setzero_ps(); U]; M];
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        let mut i = 0;
        while i + 8 * U <= k {
            // One line 4 KiB ahead: the stream crosses page boundaries, where the hardware
            // prefetcher stops (measured +10-15% decode tokens/s on SmolLM2-135M f32).
            _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + PREFETCH_FLOATS) as *const i8);
            for u in 0..U {
                let wv = _mm256_loadu_ps(wp.add(i + 8 * u));
                for t in 0..M {
                    let xv = _mm256_loadu_ps(xp.add(t * k + i + 8 * u));
                    acc[t][u] = _mm256_fmadd_ps(xv, wv, acc[t][u]);
                }
            }
            i += 8 * U;
        }
        while i + 8 <= k {
            let wv = _mm256_loadu_ps(wp.add(i));
            for t in 0..M {
                acc[t][0] = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(t * k + i)), wv, acc[t][0]);
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
                s += *xp.add(t * k + j) * *wp.add(j);
            }
            out[t] = s;
        }
    }
}

#[cfg(test)]
mod tests {
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
}
