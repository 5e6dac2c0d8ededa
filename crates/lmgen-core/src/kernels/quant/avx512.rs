//! AVX-512 VNNI tile kernels: one 64-byte load is a whole tile chunk (8 rows × 8 bytes),
//! `vpdpbusd` takes u8 × i8 four at a time into 32-bit lanes, each row's sum spread over a
//! pair of lanes until the end.
use super::*;
use std::arch::x86_64::*;

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn bcast8(p: *const u8) -> __m512i {
    _mm512_set1_epi64((p as *const i64).read_unaligned())
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn load(p: *const u8) -> __m512i {
    _mm512_loadu_si512(p as *const _)
}

/// Lanes (2r, 2r+1) hold row r: `out[r * os + t] = v[2r] + v[2r + 1]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn store_pairs(v: __m512, out: &mut [f32], os: usize, t: usize) {
    let mut tmp = [0f32; 16];
    _mm512_storeu_ps(tmp.as_mut_ptr(), v);
    for r in 0..TILE {
        out[r * os + t] = tmp[2 * r] + tmp[2 * r + 1];
    }
}

/// The 8 rows' f16 values at `p`, each duplicated into its lane pair.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
unsafe fn f16x8_pairs(p: *const u8, idx: __m512i) -> __m512 {
    let v = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
    _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(v))
}

/// Q8_0 tile × Q8 activations stored as u8 (`q + 128`): `vpdpbusd(x_u8, w_i8)` minus
/// `128 · Σ w` (computed once per block for all activation rows).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn t_q8_0<const MT: usize>(
    tile: *const u8,
    a: &QAct,
    t0: usize,
    out: &mut [f32],
    os: usize,
) {
    const BB: usize = TILE * 34;
    let (k, nb) = (a.k, a.nb);
    let idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    let c128 = _mm512_set1_epi8(0x80u8 as i8);
    let xu: [*const u8; MT] = std::array::from_fn(|t| a.xu.as_ptr().add((t0 + t) * k));
    let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
    let pf = if t0 == 0 { pf_dist() } else { 0 };
    let mut acc = [_mm512_setzero_ps(); MT];
    for b in 0..nb {
        let blk = tile.add(b * BB);
        if pf != 0 {
            avx2::prefetch_range(blk.add(pf), BB);
        }
        let dexp = f16x8_pairs(blk, idx);
        let w: [__m512i; 4] = std::array::from_fn(|c| load(blk.add(16 + 64 * c)));
        let mut corr = _mm512_setzero_si512();
        for wc in &w {
            corr = _mm512_dpbusd_epi32(corr, c128, *wc);
        }
        let neg = _mm512_sub_epi32(_mm512_setzero_si512(), corr);
        for t in 0..MT {
            let x = xu[t].add(b * QK);
            let mut i = neg;
            for (c, wc) in w.iter().enumerate() {
                i = _mm512_dpbusd_epi32(i, bcast8(x.add(8 * c)), *wc);
            }
            let s = _mm512_mul_ps(dexp, _mm512_set1_ps(*xd[t].add(b)));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), s, acc[t]);
        }
    }
    for t in 0..MT {
        store_pairs(acc[t], out, os, t);
    }
}

/// Q4_0 / Q4_1 tile × Q8 activations: `vpdpbusd(nibbles_u8, x_i8)`; the offset or
/// minimum enters through `d_x · Σ q_x` on the even lane of each row's pair.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
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
    let idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    let m4 = _mm512_set1_epi8(0x0F);
    let xq: [*const u8; MT] = std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k) as *const u8);
    let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
    let xs: [*const f32; MT] = std::array::from_fn(|t| a.s.as_ptr().add((t0 + t) * nb));
    let pf = if t0 == 0 { pf_dist() } else { 0 };
    let mut acc = [_mm512_setzero_ps(); MT];
    for b in 0..nb {
        let blk = tile.add(b * bb);
        if pf != 0 {
            avx2::prefetch_range(blk.add(pf), bb);
        }
        let dexp = f16x8_pairs(blk, idx);
        let mexp = if Q41 {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
            _mm512_maskz_permutexvar_ps(0x5555, idx, _mm512_castps256_ps512(v))
        } else {
            _mm512_maskz_mul_ps(0x5555, dexp, _mm512_set1_ps(-8.0))
        };
        let w0 = load(blk.add(hdr));
        let w1 = load(blk.add(hdr + 64));
        let n0 = _mm512_and_si512(w0, m4);
        let n1 = _mm512_and_si512(_mm512_srli_epi16::<4>(w0), m4);
        let n2 = _mm512_and_si512(w1, m4);
        let n3 = _mm512_and_si512(_mm512_srli_epi16::<4>(w1), m4);
        for t in 0..MT {
            let x = xq[t].add(b * QK);
            let mut i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), n0, bcast8(x));
            i = _mm512_dpbusd_epi32(i, n1, bcast8(x.add(16)));
            i = _mm512_dpbusd_epi32(i, n2, bcast8(x.add(8)));
            i = _mm512_dpbusd_epi32(i, n3, bcast8(x.add(24)));
            let s = _mm512_mul_ps(dexp, _mm512_set1_ps(*xd[t].add(b)));
            let v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), s, acc[t]);
            acc[t] = _mm512_fmadd_ps(mexp, _mm512_set1_ps(*xs[t].add(b)), v);
        }
    }
    for t in 0..MT {
        store_pairs(acc[t], out, os, t);
    }
}

/// Q4_K tile × Q8_K activations: `vpdpbusd(nibbles_u8, x_i8)` per 32-value sub-block,
/// times the row's 6-bit scale in 32-bit lanes; the minimums through the activation's
/// 32-value sums.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn t_q4k<const MT: usize>(
    tile: *const u8,
    a: &QAct,
    t0: usize,
    out: &mut [f32],
    os: usize,
) {
    const SB: usize = TILE * 144;
    let (k, nb) = (a.k, a.nb);
    let idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    let m4 = _mm512_set1_epi8(0x0F);
    let xq: [*const u8; MT] = std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k) as *const u8);
    let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
    let bp: [*const i32; MT] = std::array::from_fn(|t| a.bs32p.as_ptr().add((t0 + t) * nb * 4));
    let pf = if t0 == 0 { pf_dist() } else { 0 };
    let mut acc = [_mm512_setzero_ps(); MT];
    let mut accm = [_mm256_setzero_ps(); MT];
    for b in 0..nb {
        let blk = tile.add(b * SB);
        if pf != 0 {
            avx2::prefetch_range(blk.add(pf), SB);
        }
        let dexp = f16x8_pairs(blk, idx);
        let dmin8 = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i));
        let (sc, mnp) = avx2::q4k_scales(blk);
        let scx: [__m512i; 8] =
            std::array::from_fn(|j| _mm512_permutexvar_epi32(idx, _mm512_castsi256_si512(sc[j])));
        let mut itot = [_mm512_setzero_si512(); MT];
        for c in 0..4 {
            let w: [__m512i; 4] = std::array::from_fn(|q| load(blk.add(128 + 64 * (4 * c + q))));
            let lo: [__m512i; 4] = std::array::from_fn(|q| _mm512_and_si512(w[q], m4));
            let hi: [__m512i; 4] =
                std::array::from_fn(|q| _mm512_and_si512(_mm512_srli_epi16::<4>(w[q]), m4));
            for t in 0..MT {
                let x = xq[t].add(b * QK_K + 64 * c);
                let mut il = _mm512_setzero_si512();
                let mut ih = _mm512_setzero_si512();
                for q in 0..4 {
                    il = _mm512_dpbusd_epi32(il, lo[q], bcast8(x.add(8 * q)));
                    ih = _mm512_dpbusd_epi32(ih, hi[q], bcast8(x.add(32 + 8 * q)));
                }
                let p = _mm512_add_epi32(
                    _mm512_mullo_epi32(il, scx[2 * c]),
                    _mm512_mullo_epi32(ih, scx[2 * c + 1]),
                );
                itot[t] = _mm512_add_epi32(itot[t], p);
            }
        }
        for t in 0..MT {
            let dx = *xd[t].add(b);
            let s = _mm512_mul_ps(dexp, _mm512_set1_ps(dx));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(itot[t]), s, acc[t]);
            let sm = _mm256_mul_ps(dmin8, _mm256_set1_ps(dx));
            accm[t] = _mm256_fmadd_ps(avx2::q4k_mins(&mnp, bp[t].add(b * 4)), sm, accm[t]);
        }
    }
    for t in 0..MT {
        let mut mins = [0f32; 8];
        _mm256_storeu_ps(mins.as_mut_ptr(), accm[t]);
        store_pairs(acc[t], out, os, t);
        for (r, mv) in mins.iter().enumerate() {
            out[r * os + t] -= mv;
        }
    }
}

/// Q6_K tile × Q8_K activations: `vpdpbusd(quants_u8, x_i8)` per 16-value group, times
/// the group's i8 scale in 32-bit lanes; the −32 offset through the activation's
/// 16-value sums.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn t_q6k<const MT: usize>(
    tile: *const u8,
    a: &QAct,
    t0: usize,
    out: &mut [f32],
    os: usize,
) {
    const SB: usize = TILE * 210;
    let (k, nb) = (a.k, a.nb);
    let idx = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    let m4 = _mm512_set1_epi8(0x0F);
    let bits = |h: __m512i, m: u8| _mm512_and_si512(h, _mm512_set1_epi8(m as i8));
    let xq: [*const u8; MT] = std::array::from_fn(|t| a.qs.as_ptr().add((t0 + t) * k) as *const u8);
    let xd: [*const f32; MT] = std::array::from_fn(|t| a.d.as_ptr().add((t0 + t) * nb));
    let xb: [*const i16; MT] = std::array::from_fn(|t| a.bsums.as_ptr().add((t0 + t) * nb * 16));
    let pf = if t0 == 0 { pf_dist() } else { 0 };
    let mut acc = [_mm512_setzero_ps(); MT];
    let mut acco = [_mm256_setzero_ps(); MT];
    for b in 0..nb {
        let blk = tile.add(b * SB);
        if pf != 0 {
            avx2::prefetch_range(blk.add(pf), SB);
        }
        let d8 = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
        let dexp = _mm512_permutexvar_ps(idx, _mm512_castps256_ps512(d8));
        let (scp, scg) = avx2::q6k_scales(blk);
        let scx: [__m512i; 16] =
            std::array::from_fn(|g| _mm512_permutexvar_epi32(idx, _mm512_castsi256_si512(scg[g])));
        let mut itot = [_mm512_setzero_si512(); MT];
        for h in 0..2 {
            for s2 in 0..2 {
                let mut isum = [[_mm512_setzero_si512(); 4]; MT];
                for qq in 0..2 {
                    let q = 2 * s2 + qq;
                    let qa = load(blk.add(144 + 64 * (8 * h + q)));
                    let qb = load(blk.add(144 + 64 * (8 * h + 4 + q)));
                    let qh = load(blk.add(144 + 64 * (16 + 4 * h + q)));
                    let v = [
                        _mm512_or_si512(
                            _mm512_and_si512(qa, m4),
                            _mm512_slli_epi16::<4>(bits(qh, 0x03)),
                        ),
                        _mm512_or_si512(
                            _mm512_and_si512(qb, m4),
                            _mm512_slli_epi16::<2>(bits(qh, 0x0C)),
                        ),
                        _mm512_or_si512(
                            _mm512_and_si512(_mm512_srli_epi16::<4>(qa), m4),
                            bits(qh, 0x30),
                        ),
                        _mm512_or_si512(
                            _mm512_and_si512(_mm512_srli_epi16::<4>(qb), m4),
                            _mm512_srli_epi16::<2>(bits(qh, 0xC0)),
                        ),
                    ];
                    for t in 0..MT {
                        let x = xq[t].add(b * QK_K + 128 * h + 8 * q);
                        for i in 0..4 {
                            isum[t][i] =
                                _mm512_dpbusd_epi32(isum[t][i], v[i], bcast8(x.add(32 * i)));
                        }
                    }
                }
                for t in 0..MT {
                    for i in 0..4 {
                        let p = _mm512_mullo_epi32(isum[t][i], scx[8 * h + 2 * i + s2]);
                        itot[t] = _mm512_add_epi32(itot[t], p);
                    }
                }
            }
        }
        for t in 0..MT {
            let dx = *xd[t].add(b);
            let s = _mm512_mul_ps(dexp, _mm512_set1_ps(dx));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(itot[t]), s, acc[t]);
            let so = _mm256_mul_ps(d8, _mm256_set1_ps(32.0 * dx));
            acco[t] = _mm256_fmadd_ps(avx2::q6k_offset(&scp, xb[t].add(b * 16)), so, acco[t]);
        }
    }
    for t in 0..MT {
        let mut off = [0f32; 8];
        _mm256_storeu_ps(off.as_mut_ptr(), acco[t]);
        store_pairs(acc[t], out, os, t);
        for (r, o) in off.iter().enumerate() {
            out[r * os + t] -= o;
        }
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn t_q4_0<const MT: usize>(
    tile: *const u8,
    a: &QAct,
    t0: usize,
    out: &mut [f32],
    os: usize,
) {
    t_q4::<MT, false>(tile, a, t0, out, os)
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
pub(super) unsafe fn t_q4_1<const MT: usize>(
    tile: *const u8,
    a: &QAct,
    t0: usize,
    out: &mut [f32],
    os: usize,
) {
    t_q4::<MT, true>(tile, a, t0, out, os)
}
