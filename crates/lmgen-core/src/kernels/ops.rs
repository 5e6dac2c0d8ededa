//! Row-wise operations of the CPU step on slices: norms, activations, rotary embedding.
//! They write in place or into caller-owned buffers; nothing here allocates.
use super::pool;
use crate::config::{Activation, NormKind};

/// Rows per parallel task; below this many elements in all, run on the calling thread.
const PAR_ELEMS: usize = 1 << 15;

/// `out[r] = norm(x[r])` for every row of width `w`.
pub fn norm_rows(
    kind: NormKind,
    x: &[f32],
    out: &mut [f32],
    w: usize,
    scale: &[f32],
    shift: Option<&[f32]>,
    eps: f32,
) {
    let row = |(xr, o): (&[f32], &mut [f32])| match kind {
        NormKind::LayerNorm => layer_norm_row(xr, o, scale, shift, eps),
        NormKind::RmsNorm => rms_norm_row(xr, o, scale, eps),
    };
    if x.len() >= PAR_ELEMS {
        let rows = x.len() / w.max(1);
        let per = rows.div_ceil(4 * pool::threads()).max(1);
        let o = super::matmul::OutPtr::new(out);
        pool::for_each(rows.div_ceil(per), |t| {
            let (r0, r1) = (t * per, ((t + 1) * per).min(rows));
            for r in r0..r1 {
                // SAFETY: row r of `out` (w values) is written by this task only.
                row((&x[r * w..(r + 1) * w], unsafe { o.row(r * w, w) }));
            }
        });
    } else {
        x.chunks(w).zip(out.chunks_mut(w)).for_each(row);
    }
}

/// Sum in 8 lanes (vectorizes; also closer to a pairwise sum than one running total).
#[inline]
fn sum8(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] += f(c[l]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for &v in chunks.remainder() {
        s += f(v);
    }
    s
}

fn layer_norm_row(x: &[f32], o: &mut [f32], scale: &[f32], shift: Option<&[f32]>, eps: f32) {
    let n = x.len() as f32;
    let mean = sum8(x, |v| v) / n;
    let var = sum8(x, |v| (v - mean) * (v - mean)) / n;
    let inv = 1.0 / (var + eps).sqrt();
    match shift {
        Some(b) => {
            for i in 0..x.len() {
                o[i] = (x[i] - mean) * inv * scale[i] + b[i];
            }
        }
        None => {
            for i in 0..x.len() {
                o[i] = (x[i] - mean) * inv * scale[i];
            }
        }
    }
}

fn rms_norm_row(x: &[f32], o: &mut [f32], scale: &[f32], eps: f32) {
    let ms = sum8(x, |v| v * v) / x.len() as f32;
    let inv = 1.0 / (ms + eps).sqrt();
    for i in 0..x.len() {
        o[i] = x[i] * inv * scale[i];
    }
}

#[inline]
fn act(a: Activation, v: f32) -> f32 {
    match a {
        Activation::Relu => v.max(0.0),
        Activation::Gelu => {
            (0.5 * v as f64
                * (1.0 + candle_core::cpu::erf::erf_f64(v as f64 / std::f64::consts::SQRT_2)))
                as f32
        }
        Activation::GeluTanh => {
            const C: f32 = 0.797_884_6; // sqrt(2/pi)
            0.5 * v * (1.0 + (C * v * (1.0 + 0.044715 * v * v)).tanh())
        }
        Activation::QuickGelu => v / (1.0 + (-1.702 * v).exp()),
        Activation::Silu => v / (1.0 + (-v).exp()),
    }
}

/// `x = act(x)` in place.
pub fn activate(a: Activation, x: &mut [f32]) {
    let f = |c: &mut [f32]| c.iter_mut().for_each(|v| *v = act(a, *v));
    if x.len() >= PAR_ELEMS {
        let o = super::matmul::OutPtr::new(x);
        let n = x.len();
        pool::for_each(n.div_ceil(4096), |t| {
            let (a, b) = (t * 4096, ((t + 1) * 4096).min(n));
            // SAFETY: elements a..b are touched by this task only.
            f(unsafe { o.row(a, b - a) });
        });
    } else {
        f(x);
    }
}

/// Gated MLP: rows of `gu` are `[gate (inter); up (inter)]`; `out[r] = act(gate) * up`.
pub fn gate(a: Activation, gu: &[f32], out: &mut [f32], inter: usize) {
    #[cfg(target_arch = "x86_64")]
    let simd_silu = a == Activation::Silu && super::simd::has_avx2_fma();
    let row = |(g, o): (&[f32], &mut [f32])| {
        let (gate, up) = g.split_at(inter);
        #[cfg(target_arch = "x86_64")]
        if simd_silu {
            // SAFETY: AVX2 and FMA are available (checked above); the slices are `inter` long.
            unsafe { silu_gate_avx2(&gate[..inter], &up[..inter], &mut o[..inter]) };
            return;
        }
        for i in 0..inter {
            o[i] = act(a, gate[i]) * up[i];
        }
    };
    if out.len() >= PAR_ELEMS {
        let rows = out.len() / inter.max(1);
        let per = rows.div_ceil(4 * pool::threads()).max(1);
        let o = super::matmul::OutPtr::new(out);
        pool::for_each(rows.div_ceil(per), |t| {
            for r in t * per..((t + 1) * per).min(rows) {
                // SAFETY: row r of `out` is written by this task only.
                row((&gu[r * 2 * inter..(r + 1) * 2 * inter], unsafe {
                    o.row(r * inter, inter)
                }));
            }
        });
    } else {
        gu.chunks(2 * inter)
            .zip(out.chunks_mut(inter))
            .for_each(row);
    }
}

/// `o = silu(g) · u` = `g / (1 + exp(-g)) · u`, 8 lanes at a time with the shared vector
/// exp (~2 ulp; libm's scalar `expf` was 6 % of a prefill step); the tail as [`act`].
///
/// # Safety
/// AVX2 and FMA available; the three slices have the same length.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_gate_avx2(g: &[f32], u: &[f32], o: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = o.len();
    let one = _mm256_set1_ps(1.0);
    let zero = _mm256_setzero_ps();
    let mut i = 0;
    while i + 8 <= n {
        let gv = _mm256_loadu_ps(g.as_ptr().add(i));
        let e = super::simd::exp8(_mm256_sub_ps(zero, gv));
        let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
        _mm256_storeu_ps(
            o.as_mut_ptr().add(i),
            _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr().add(i))),
        );
        i += 8;
    }
    for j in i..n {
        o[j] = act(Activation::Silu, g[j]) * u[j];
    }
}

/// `x += y`.
pub fn add_assign(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// Rotate the first `rot` dims of each of `heads` heads (width `hd`) that start `row` in place;
/// `cos`/`sin` hold `rot/2` values for this token. Half-split pairs (i, i + rot/2) or
/// interleaved pairs (2i, 2i + 1).
#[inline]
pub fn rope_row(
    row: &mut [f32],
    heads: usize,
    hd: usize,
    rot: usize,
    cos: &[f32],
    sin: &[f32],
    interleaved: bool,
) {
    let half = rot / 2;
    for h in 0..heads {
        let x = &mut row[h * hd..h * hd + rot];
        if interleaved {
            for i in 0..half {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = a * cos[i] - b * sin[i];
                x[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        } else {
            let (lo, hi) = x.split_at_mut(half);
            for i in 0..half {
                let (a, b) = (lo[i], hi[i]);
                lo[i] = a * cos[i] - b * sin[i];
                hi[i] = b * cos[i] + a * sin[i];
            }
        }
    }
}

/// Normalize one row in place (LayerNorm or RMSNorm), scale and optional shift of its width.
pub fn norm_in_place(
    kind: NormKind,
    x: &mut [f32],
    scale: &[f32],
    shift: Option<&[f32]>,
    eps: f32,
) {
    let n = x.len() as f32;
    match kind {
        NormKind::LayerNorm => {
            let mean = sum8(x, |v| v) / n;
            let var = sum8(x, |v| (v - mean) * (v - mean)) / n;
            let inv = 1.0 / (var + eps).sqrt();
            for i in 0..x.len() {
                x[i] = (x[i] - mean) * inv * scale[i] + shift.map_or(0.0, |b| b[i]);
            }
        }
        NormKind::RmsNorm => {
            let inv = 1.0 / (sum8(x, |v| v * v) / n + eps).sqrt();
            for i in 0..x.len() {
                x[i] = x[i] * inv * scale[i];
            }
        }
    }
}

/// `x = cap * tanh(x / cap)` in place (soft-capping).
pub fn softcap(x: &mut [f32], cap: f32) {
    x.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
}

/// `x = clamp(x, -c, c)` in place.
pub fn clamp(x: &mut [f32], c: f32) {
    x.iter_mut().for_each(|v| *v = v.clamp(-c, c));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector SiLU gate agrees with the scalar formula (libm `expf`) to a few ulp, over
    /// ordinary values, large magnitudes and an odd tail.
    #[test]
    fn silu_gate_matches_scalar() {
        let inter = 8 * 9 + 5;
        let rows = 3;
        let mut gu = Vec::with_capacity(rows * 2 * inter);
        for r in 0..rows {
            for i in 0..2 * inter {
                let t = (r * 2 * inter + i) as f32;
                gu.push(match i % 11 {
                    0 => 95.0 - t * 0.01,
                    1 => -95.0 + t * 0.01,
                    _ => (t * 0.37).sin() * 12.0,
                });
            }
        }
        let mut out = vec![0f32; rows * inter];
        gate(Activation::Silu, &gu, &mut out, inter);
        for r in 0..rows {
            let (g, u) = gu[r * 2 * inter..(r + 1) * 2 * inter].split_at(inter);
            for i in 0..inter {
                let want = act(Activation::Silu, g[i]) * u[i];
                let got = out[r * inter + i];
                assert!(
                    (got - want).abs() <= 4.0 * f32::EPSILON * want.abs() + 1e-30,
                    "row {r} [{i}]: silu({}) * {} = {got}, want {want}",
                    g[i],
                    u[i]
                );
            }
        }
    }
}
