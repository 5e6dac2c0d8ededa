use super::*;
use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ6K, BlockQ8_0};

impl QMatrix {
    fn matmul_at(&self, x: &[f32], m: usize, lv: Level) -> Vec<f32> {
        let mut y = vec![0f32; m * self.rows];
        self.matmul_into_at(x, m, None, &mut y, lv);
        y
    }
}

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
        assert_eq!(q.storage_bytes(), stored_rows(rows) * kind.row_bytes(cols));
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
            let tol = 0.02 * scale.max(1.0);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() <= tol,
                    "{kind} m={m} [{i}]: {g} vs {e} (tol {tol})"
                );
            }
            // every level of the integer kernel, including the scalar fallback
            for lv in levels() {
                let got = q.matmul_at(&x, m, lv);
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
    available_levels()
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
            let a = q.matmul_at(&x, m, Level::Scalar);
            for &lv in &all[1..] {
                let b = q.matmul_at(&x, m, lv);
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
        assert_eq!(q.to_ggml_bytes(), &bytes[..], "{kind}");
        // our quantizer produces candle's (= ggml's reference) bytes
        assert_eq!(
            QMatrix::quantize(&w, n, k, kind).unwrap().to_ggml_bytes(),
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

/// Shapes large enough for the rayon paths (kernel tasks and activation quantization).
#[test]
fn parallel_paths() {
    for (kind, n, k, m) in [
        (QuantKind::Q8_0, 1030, 512, 1),
        (QuantKind::Q4K, 301, 2048, 20),
    ] {
        let q = QMatrix::quantize(&randv(n * k, 31), n, k, kind).unwrap();
        assert!(q.storage_bytes() * m >= SEQ_BYTES && m * k >= 32768 || m == 1);
        let x = randv(m * k, 32);
        let want = ref_matmul(&x, m, k, &q.dequantize(), n);
        let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1.0);
        for lv in levels() {
            let got = q.matmul_at(&x, m, lv);
            for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - e).abs() <= 0.02 * scale,
                    "{kind} {lv:?} [{i}]: {g} vs {e}"
                );
            }
        }
    }
}

#[test]
fn zero_rows_and_zero_inputs() {
    let q = QMatrix::quantize(&vec![0.0; 3 * 256], 3, 256, QuantKind::Q4K).unwrap();
    assert_eq!(q.matmul(&vec![0.0; 2 * 256], 2), vec![0.0; 6]);
    let q = QMatrix::quantize(&[], 0, 64, QuantKind::Q8_0).unwrap();
    assert!(q.matmul(&vec![1.0; 64], 1).is_empty());
}

/// The tile kernels driven the way the Vec-returning matmul used to: each tile's results
/// written transposed (`[rows, m]`), then transposed back.
fn matmul_transposed_ref(q: &QMatrix, x: &[f32], m: usize, lv: Level) -> Vec<f32> {
    let (n, k, kind) = (q.rows, q.cols, q.kind);
    let act = QAct::new(kind, x, m, k, lv);
    let rb = kind.row_bytes(k);
    let pr = stored_rows(n);
    let mut yt = vec![0f32; pr * m];
    for (ti, o) in yt.chunks_mut(TILE * m).enumerate() {
        let tile = &q.data[ti * TILE * rb..(ti + 1) * TILE * rb];
        let mut t = 0;
        while t < m {
            let mt = (m - t).min(max_mt(kind, lv));
            tile_kernel(kind, lv, tile, &act, t, mt, &mut o[t..], m);
            t += mt;
        }
    }
    let mut y = vec![0f32; m * n];
    for j in 0..n {
        for i in 0..m {
            y[i * n + j] = yt[j * m + i];
        }
    }
    y
}

#[test]
fn matmul_into_is_bit_exact() {
    for kind in QuantKind::ALL {
        // 37 rows: a partial last tile; large enough k for the parallel paths at m = 129
        let (n, k) = (37, 2 * cols_for(kind));
        let q = QMatrix::quantize(&randv(n * k, 41), n, k, kind).unwrap();
        let bias = randv(n, 43);
        for m in [1usize, 3, 16, 17, 40, 129] {
            let x = randv(m * k, 50 + m as u32);
            for lv in levels() {
                let want = matmul_transposed_ref(&q, &x, m, lv);
                let mut out = vec![f32::NAN; m * n];
                q.matmul_into_at(&x, m, None, &mut out, lv);
                assert!(
                    out.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{kind} {lv:?} m={m}"
                );
                q.matmul_into_at(&x, m, Some(&bias), &mut out, lv);
                for (i, (g, e)) in out.iter().zip(&want).enumerate() {
                    let e = e + bias[i % n];
                    assert_eq!(g.to_bits(), e.to_bits(), "{kind} {lv:?} m={m} bias [{i}]");
                }
            }
            let v = q.matmul(&x, m);
            let mut out = vec![f32::NAN; m * n];
            q.matmul_into(&x, m, None, &mut out);
            assert!(out.iter().zip(&v).all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}

/// Buffers reused across calls of different kinds and sizes give the same results.
#[test]
fn scratch_reuse_across_shapes() {
    let mats: Vec<QMatrix> = QuantKind::ALL
        .iter()
        .map(|&kind| {
            let (n, k) = (19, cols_for(kind));
            QMatrix::quantize(&randv(n * k, 61), n, k, kind).unwrap()
        })
        .collect();
    for m in [40usize, 1, 17, 3] {
        for q in &mats {
            let x = randv(m * q.cols(), 70 + m as u32);
            let fresh = matmul_transposed_ref(q, &x, m, level());
            assert_eq!(q.matmul(&x, m), fresh, "{} m={m}", q.kind());
        }
    }
}
