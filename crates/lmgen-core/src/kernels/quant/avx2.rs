//! AVX2/FMA/F16C tile kernels and activation quantizers.
use super::act::{quant_row_32_generic, quant_row_k_generic};
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

/// Prefetches `len` bytes starting at `p`, one touch per cache line.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn prefetch_range(p: *const u8, len: usize) {
    let mut o = 0;
    while o < len {
        _mm_prefetch::<_MM_HINT_T0>(p.add(o) as *const i8);
        o += 64;
    }
}

/// 8 bytes of activation quants broadcast to every 64-bit lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn bcast8(p: *const i8) -> __m256i {
    _mm256_set1_epi64x((p as *const i64).read_unaligned())
}

/// Lanes hold (row, half) pairs: `out[(4 h + i) * os + t] = v[2 i] + v[2 i + 1]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store_pairs(v: __m256, out: &mut [f32], h: usize, os: usize, t: usize) {
    let mut tmp = [0f32; 8];
    _mm256_storeu_ps(tmp.as_mut_ptr(), v);
    for i in 0..4 {
        out[(4 * h + i) * os + t] = tmp[2 * i] + tmp[2 * i + 1];
    }
}

/// Q8_0 tile × Q8 activations. A 32-byte load is 4 rows × 8 quants; `maddubs` gets
/// |w| (u8) and the activations with w's sign (i8).
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn t_q8_0<const MT: usize>(
    tile: *const u8,
    a: &QAct,
    t0: usize,
    out: &mut [f32],
    os: usize,
) {
    const BB: usize = TILE * 34;
    let (k, nb) = (a.k, a.nb);
    let ones = _mm256_set1_epi16(1);
    let idx = [
        _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
        _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7),
    ];
    let xq: [*const i8; MT] = std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k));
    let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
    let pf = if t0 == 0 { pf_dist() } else { 0 };
    let mut acc = [[_mm256_setzero_ps(); 2]; MT];
    for b in 0..nb {
        let blk = tile.add(b * BB);
        if pf != 0 {
            prefetch_range(blk.add(pf), BB);
        }
        let d8 = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        for h in 0..2 {
            let dexp = _mm256_permutevar8x32_ps(d8, idx[h]);
            let mut isum = [_mm256_setzero_si256(); MT];
            for c in 0..4 {
                let w = _mm256_loadu_si256(blk.add(16 + 64 * c + 32 * h) as *const __m256i);
                let aw = _mm256_sign_epi8(w, w);
                for t in 0..MT {
                    let sx = _mm256_sign_epi8(bcast8(xq[t].add(b * QK + 8 * c)), w);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
                    isum[t] = _mm256_add_epi32(isum[t], p);
                }
            }
            for t in 0..MT {
                let s = _mm256_mul_ps(dexp, _mm256_set1_ps(*xd[t].add(b)));
                acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), s, acc[t][h]);
            }
        }
    }
    for t in 0..MT {
        for h in 0..2 {
            store_pairs(acc[t][h], out, h, os, t);
        }
    }
}

/// Q4_0 / Q4_1 tile × Q8 activations: unsigned nibbles × x via `maddubs` (four 16-bit
/// partial sums stay below 2^15), the Q4_0 offset (−8·d) or Q4_1 minimum enters through
/// `d_x · Σ q_x` (added to the even lane of each row's pair).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn t_q4<const MT: usize, const Q41: bool>(
    tile: *const u8,
    a: &QAct,
    t0: usize,
    out: &mut [f32],
    os: usize,
) {
    let bb = TILE * if Q41 { 20 } else { 18 };
    let hdr = if Q41 { 32 } else { 16 };
    let (k, nb) = (a.k, a.nb);
    let ones = _mm256_set1_epi16(1);
    let m4 = _mm256_set1_epi8(0x0F);
    let idx = [
        _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
        _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7),
    ];
    let xq: [*const i8; MT] = std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k));
    let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
    let xs: [*const f32; MT] = std::array::from_fn(|t| a.s.as_ptr().add((t0 + t) * nb));
    let pf = if t0 == 0 { pf_dist() } else { 0 };
    let mut acc = [[_mm256_setzero_ps(); 2]; MT];
    for b in 0..nb {
        let blk = tile.add(b * bb);
        if pf != 0 {
            prefetch_range(blk.add(pf), bb);
        }
        let d8 = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        let m8 = if Q41 {
            _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i))
        } else {
            _mm256_mul_ps(d8, _mm256_set1_ps(-8.0))
        };
        for h in 0..2 {
            let dexp = _mm256_permutevar8x32_ps(d8, idx[h]);
            let mexp = _mm256_blend_ps::<0b1010_1010>(
                _mm256_permutevar8x32_ps(m8, idx[h]),
                _mm256_setzero_ps(),
            );
            let w0 = _mm256_loadu_si256(blk.add(hdr + 32 * h) as *const __m256i);
            let w1 = _mm256_loadu_si256(blk.add(hdr + 64 + 32 * h) as *const __m256i);
            let n0 = _mm256_and_si256(w0, m4);
            let n1 = _mm256_and_si256(_mm256_srli_epi16(w0, 4), m4);
            let n2 = _mm256_and_si256(w1, m4);
            let n3 = _mm256_and_si256(_mm256_srli_epi16(w1, 4), m4);
            for t in 0..MT {
                let x = xq[t].add(b * QK);
                let s01 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(n0, bcast8(x)),
                    _mm256_maddubs_epi16(n1, bcast8(x.add(16))),
                );
                let s23 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(n2, bcast8(x.add(8))),
                    _mm256_maddubs_epi16(n3, bcast8(x.add(24))),
                );
                let p = _mm256_madd_epi16(_mm256_add_epi16(s01, s23), ones);
                let s = _mm256_mul_ps(dexp, _mm256_set1_ps(*xd[t].add(b)));
                let v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, acc[t][h]);
                acc[t][h] = _mm256_fmadd_ps(mexp, _mm256_set1_ps(*xs[t].add(b)), v);
            }
        }
    }
    for t in 0..MT {
        for h in 0..2 {
            store_pairs(acc[t][h], out, h, os, t);
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn t_q4_0<const MT: usize>(
    tile: *const u8,
    a: &QAct,
    t0: usize,
    out: &mut [f32],
    os: usize,
) {
    t_q4::<MT, false>(tile, a, t0, out, os)
}

#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn t_q4_1<const MT: usize>(
    tile: *const u8,
    a: &QAct,
    t0: usize,
    out: &mut [f32],
    os: usize,
) {
    t_q4::<MT, true>(tile, a, t0, out, os)
}

/// The 32-bit lanes of `v` (one per row) picked by `idx` and doubled into an i16 pair.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn i16_pairs(v: __m256i, idx: __m256i) -> __m256i {
    let p = _mm256_permutevar8x32_epi32(v, idx);
    _mm256_or_si256(
        _mm256_and_si256(p, _mm256_set1_epi32(0xFFFF)),
        _mm256_slli_epi32(p, 16),
    )
}

/// Q4_K tile: per row `sc_j` (i32 lanes, 8 rows) and the mins as i16 pairs
/// `[mn_2p, mn_2p+1]` (4 vectors), unpacked from the tile header.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4k_scales(blk: *const u8) -> ([__m256i; 8], [__m256i; 4]) {
    let m63 = _mm256_set1_epi32(63);
    let m15 = _mm256_set1_epi32(15);
    let mut sc = [_mm256_setzero_si256(); 8];
    let mut mnp = [_mm256_setzero_si256(); 4];
    for j in 0..8 {
        let raw = _mm256_cvtepu8_epi32(_mm_loadl_epi64(blk.add(32 + 8 * j) as *const __m128i));
        sc[j] = _mm256_and_si256(raw, m63);
        let lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64(blk.add(96 + 8 * (j / 2)) as *const __m128i));
        let lo = if j % 2 == 1 {
            _mm256_srli_epi32(lo, 4)
        } else {
            lo
        };
        let mn = _mm256_or_si256(
            _mm256_slli_epi32(_mm256_srli_epi32(raw, 6), 4),
            _mm256_and_si256(lo, m15),
        );
        mnp[j / 2] = if j % 2 == 0 {
            mn
        } else {
            _mm256_or_si256(mnp[j / 2], _mm256_slli_epi32(mn, 16))
        };
    }
    (sc, mnp)
}

/// Σ_j mn_j · (sum of activation sub-block j) per row, as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4k_mins(mnp: &[__m256i; 4], p: *const i32) -> __m256 {
    let mut im = _mm256_madd_epi16(mnp[0], _mm256_set1_epi32(*p));
    for (q, mv) in mnp.iter().enumerate().skip(1) {
        im = _mm256_add_epi32(im, _mm256_madd_epi16(*mv, _mm256_set1_epi32(*p.add(q))));
    }
    _mm256_cvtepi32_ps(im)
}

/// Q4_K tile × Q8_K activations, 4 rows per 32-byte vector: `maddubs` of nibbles × x
/// (four 16-bit partial sums stay below 2^15), `madd` with the row's sub-block scale,
/// the minimums through the activation's 32-value sums.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn t_q4k<const MT: usize>(
    tile: *const u8,
    a: &QAct,
    t0: usize,
    out: &mut [f32],
    os: usize,
) {
    const SB: usize = TILE * 144;
    let (k, nb) = (a.k, a.nb);
    let m4 = _mm256_set1_epi8(0x0F);
    let idx = [
        _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
        _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7),
    ];
    let xq: [*const i8; MT] = std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k));
    let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
    let bp: [*const i32; MT] = std::array::from_fn(|t| a.bs32p.as_ptr().add((t0 + t) * nb * 4));
    let pf = if t0 == 0 { pf_dist() } else { 0 };
    let mut acc = [[_mm256_setzero_ps(); 2]; MT];
    let mut accm = [_mm256_setzero_ps(); MT];
    for b in 0..nb {
        let blk = tile.add(b * SB);
        if pf != 0 {
            prefetch_range(blk.add(pf), SB);
        }
        let d8 = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        let dmin8 = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
        let (sc, mnp) = q4k_scales(blk);
        for h in 0..2 {
            let mut itot = [_mm256_setzero_si256(); MT];
            for c in 0..4 {
                let scl = i16_pairs(sc[2 * c], idx[h]);
                let sch = i16_pairs(sc[2 * c + 1], idx[h]);
                let w: [__m256i; 4] = std::array::from_fn(|q| {
                    _mm256_loadu_si256(blk.add(128 + 64 * (4 * c + q) + 32 * h) as *const __m256i)
                });
                for t in 0..MT {
                    let x = xq[t].add(b * QK_K + 64 * c);
                    let mut sl = _mm256_setzero_si256();
                    let mut sh = _mm256_setzero_si256();
                    for (q, wq) in w.iter().enumerate() {
                        let lo = _mm256_and_si256(*wq, m4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16(*wq, 4), m4);
                        sl = _mm256_add_epi16(sl, _mm256_maddubs_epi16(lo, bcast8(x.add(8 * q))));
                        sh = _mm256_add_epi16(
                            sh,
                            _mm256_maddubs_epi16(hi, bcast8(x.add(32 + 8 * q))),
                        );
                    }
                    let p =
                        _mm256_add_epi32(_mm256_madd_epi16(sl, scl), _mm256_madd_epi16(sh, sch));
                    itot[t] = _mm256_add_epi32(itot[t], p);
                }
            }
            let dexp = _mm256_permutevar8x32_ps(d8, idx[h]);
            for t in 0..MT {
                let s = _mm256_mul_ps(dexp, _mm256_set1_ps(*xd[t].add(b)));
                acc[t][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(itot[t]), s, acc[t][h]);
            }
        }
        for t in 0..MT {
            let s = _mm256_mul_ps(dmin8, _mm256_set1_ps(*xd[t].add(b)));
            accm[t] = _mm256_fmadd_ps(q4k_mins(&mnp, bp[t].add(b * 4)), s, accm[t]);
        }
    }
    for t in 0..MT {
        let mut mins = [0f32; 8];
        _mm256_storeu_ps(mins.as_mut_ptr(), accm[t]);
        for h in 0..2 {
            store_pairs(acc[t][h], out, h, os, t);
        }
        for (r, mv) in mins.iter().enumerate() {
            out[r * os + t] -= mv;
        }
    }
}

/// Q6_K tile scales: i16 pairs `[sc_2p, sc_2p+1]` per row (8 vectors) and each group's
/// scale as i32 per row (16 vectors).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q6k_scales(blk: *const u8) -> ([__m256i; 8], [__m256i; 16]) {
    let scp: [__m256i; 8] = std::array::from_fn(|p| {
        _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(16 + 16 * p) as *const __m128i))
    });
    let scg: [__m256i; 16] = std::array::from_fn(|g| {
        let v = scp[g / 2];
        if g % 2 == 0 {
            _mm256_srai_epi32(_mm256_slli_epi32(v, 16), 16)
        } else {
            _mm256_srai_epi32(v, 16)
        }
    });
    (scp, scg)
}

/// Σ_g sc_g · (sum of activation group g) per row, as f32 (`bs`: the 16 group sums).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q6k_offset(scp: &[__m256i; 8], bs: *const i16) -> __m256 {
    let pair = |p: usize| _mm256_set1_epi32((bs.add(2 * p) as *const i32).read_unaligned());
    let mut io = _mm256_madd_epi16(scp[0], pair(0));
    for (p, sv) in scp.iter().enumerate().skip(1) {
        io = _mm256_add_epi32(io, _mm256_madd_epi16(*sv, pair(p)));
    }
    _mm256_cvtepi32_ps(io)
}

/// The four 32-value runs of 6-bit quants (0..63) decoded from ggml's `ql` chunks `a`
/// (values l), `b` (values l + 32) and `qh` chunk `h`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6_decode(a: __m256i, b: __m256i, h: __m256i) -> [__m256i; 4] {
    let m4 = _mm256_set1_epi8(0x0F);
    let bits = |m: i8| _mm256_and_si256(h, _mm256_set1_epi8(m));
    [
        _mm256_or_si256(_mm256_and_si256(a, m4), _mm256_slli_epi16(bits(0x03), 4)),
        _mm256_or_si256(_mm256_and_si256(b, m4), _mm256_slli_epi16(bits(0x0C), 2)),
        _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), m4), bits(0x30)),
        _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(b, 4), m4),
            _mm256_srli_epi16(bits(0xC0u8 as i8), 2),
        ),
    ]
}

/// Q6_K tile × Q8_K activations, 4 rows per 32-byte vector: `maddubs` of the unsigned
/// quants × x (two 16-bit partial sums stay below 2^15), `madd` with the 16-value group
/// scale; the −32 offset through the activation's 16-value sums.
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn t_q6k<const MT: usize>(
    tile: *const u8,
    a: &QAct,
    t0: usize,
    out: &mut [f32],
    os: usize,
) {
    const SB: usize = TILE * 210;
    let (k, nb) = (a.k, a.nb);
    let idx = [
        _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3),
        _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7),
    ];
    let xq: [*const i8; MT] = std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k));
    let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
    let xb: [*const i16; MT] = std::array::from_fn(|t| a.bsums.as_ptr().add((t0 + t) * nb * 16));
    let pf = if t0 == 0 { pf_dist() } else { 0 };
    let mut acc = [[_mm256_setzero_ps(); 2]; MT];
    let mut acco = [_mm256_setzero_ps(); MT];
    for b in 0..nb {
        let blk = tile.add(b * SB);
        if pf != 0 {
            prefetch_range(blk.add(pf), SB);
        }
        let d8 = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        let (scp, scg) = q6k_scales(blk);
        for hh in 0..2 {
            let mut itot = [_mm256_setzero_si256(); MT];
            for h in 0..2 {
                for s2 in 0..2 {
                    let mut isum = [[_mm256_setzero_si256(); 4]; MT];
                    for qq in 0..2 {
                        let q = 2 * s2 + qq;
                        let ld = |c: usize| {
                            _mm256_loadu_si256(blk.add(144 + 64 * c + 32 * hh) as *const __m256i)
                        };
                        let v = q6_decode(ld(8 * h + q), ld(8 * h + 4 + q), ld(16 + 4 * h + q));
                        for t in 0..MT {
                            let x = xq[t].add(b * QK_K + 128 * h + 8 * q);
                            for i in 0..4 {
                                let p = _mm256_maddubs_epi16(v[i], bcast8(x.add(32 * i)));
                                isum[t][i] = _mm256_add_epi16(isum[t][i], p);
                            }
                        }
                    }
                    for i in 0..4 {
                        let sv = i16_pairs(scg[8 * h + 2 * i + s2], idx[hh]);
                        for t in 0..MT {
                            let p = _mm256_madd_epi16(isum[t][i], sv);
                            itot[t] = _mm256_add_epi32(itot[t], p);
                        }
                    }
                }
            }
            let dexp = _mm256_permutevar8x32_ps(d8, idx[hh]);
            for t in 0..MT {
                let s = _mm256_mul_ps(dexp, _mm256_set1_ps(*xd[t].add(b)));
                acc[t][hh] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(itot[t]), s, acc[t][hh]);
            }
        }
        for t in 0..MT {
            let s = _mm256_mul_ps(d8, _mm256_set1_ps(32.0 * *xd[t].add(b)));
            acco[t] = _mm256_fmadd_ps(q6k_offset(&scp, xb[t].add(b * 16)), s, acco[t]);
        }
    }
    for t in 0..MT {
        let mut off = [0f32; 8];
        _mm256_storeu_ps(off.as_mut_ptr(), acco[t]);
        for h in 0..2 {
            store_pairs(acc[t][h], out, h, os, t);
        }
        for (r, o) in off.iter().enumerate() {
            out[r * os + t] -= o;
        }
    }
}
