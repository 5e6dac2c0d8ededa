//! Portable kernels computing the same integer block sums as the SIMD ones.
use super::act::QAct;
use super::formats::{f16_at, scale_min_k4};
use super::{QuantKind, QK, QK_K};

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
                    summ += mn as i32 * (bs[b * 16 + 2 * j] as i32 + bs[b * 16 + 2 * j + 1] as i32);
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
                        let (a0, a1, hh) = (ql[64 * h + l], ql[64 * h + l + 32], qh[32 * h + l]);
                        let q = [
                            (a0 & 0xF) | ((hh & 3) << 4),
                            (a1 & 0xF) | (((hh >> 2) & 3) << 4),
                            (a0 >> 4) | (((hh >> 4) & 3) << 4),
                            (a1 >> 4) | (((hh >> 6) & 3) << 4),
                        ];
                        for (i, &qi) in q.iter().enumerate() {
                            g[2 * i + l / 16] += (qi as i32 - 32) * x[128 * h + 32 * i + l] as i32;
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
