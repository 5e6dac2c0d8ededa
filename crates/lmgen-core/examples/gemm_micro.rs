//! Prefill-shaped f32 products: `kernels::matmul_wt_into` (above 16 rows the register-tiled
//! `dotgemm`, from 32 rows on AVX-512 the packed panels, summing in the decode kernel's order) vs the `gemm` crate called the same way
//! (`matmul_wt_gemm_crate`, bit-identical to candle) vs candle's `x.matmul(&w.t())`
//! (+ `broadcast_add` for the bias), alternating in one process, best of N; also prints how
//! far `dotgemm` is from candle.
//!
//! cargo run --release -p lmgen-core --example gemm_micro -- [m,..] [n,..]
//! defaults: m = 17,128,512; k = 576; n = 576,1536,49152 (SmolLM2-135M); env GM_K,
//! GM_ROUNDS (least samples per variant, default 5), GM_ISA (dotgemm's kernels: avx512,
//! avx512-dot for the dot-product tiles instead of the packed panels, avx2).
use candle_core::{Device, Tensor};
use lmgen_core::kernels::dotgemm;
use lmgen_core::model::kernels::{matmul_wt_gemm_crate, matmul_wt_into};
use std::hint::black_box;
use std::time::Instant;

fn list(arg: Option<&String>, default: &[usize]) -> Vec<usize> {
    arg.map(|s| s.split(',').map(|v| v.parse().unwrap()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let ms = list(args.first(), &[17, 128, 512]);
    let ns = list(args.get(1), &[576, 1536, 49152]);
    let k = env("GM_K", 576);
    let rounds = env("GM_ROUNDS", 5);
    let dev = Device::Cpu;
    if let Ok(isa) = std::env::var("GM_ISA") {
        dotgemm::set_isa(&isa);
    }
    println!(
        "threads {} k {k} rounds {rounds} dotgemm {:?}",
        lmgen_core::kernels::pool::threads(),
        dotgemm::isa()
    );
    for &n in &ns {
        let w = Tensor::randn(0f32, 0.05, (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.05, n, &dev).unwrap();
        let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let bv: Vec<f32> = b.to_vec1().unwrap();
        for &m in &ms {
            let x = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
            let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            let mut out = vec![0f32; m * n];
            // agreement (with bias)
            let want: Vec<f32> = x
                .matmul(&w.t().unwrap())
                .unwrap()
                .broadcast_add(&b)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            matmul_wt_into(&xv, m, k, &wv, n, Some(&bv), &mut out);
            let same = out
                .iter()
                .zip(&want)
                .all(|(p, q)| p.to_bits() == q.to_bits());
            let maxd = out
                .iter()
                .zip(&want)
                .map(|(p, q)| (p - q).abs())
                .fold(0f32, f32::max);
            // calls per sample: ~5 ms at 50 GF/s; samples: ~0.5 s per variant (at least `rounds`)
            let est = (2 * m * n * k) as f64 / 50e9;
            let calls = ((5e-3 / est) as usize).clamp(1, 200);
            let samples = ((0.5 / (est * calls as f64)) as usize).clamp(rounds, 100);
            let mut best = [f64::MAX; 5];
            for _ in 0..samples {
                for (v, bst) in best.iter_mut().enumerate() {
                    let t = Instant::now();
                    for _ in 0..calls {
                        match v {
                            0 => matmul_wt_into(&xv, m, k, &wv, n, None, &mut out),
                            4 => {
                                black_box(x.matmul(&w.t().unwrap()).unwrap());
                            }
                            2 => matmul_wt_into(&xv, m, k, &wv, n, Some(&bv), &mut out),
                            3 => matmul_wt_gemm_crate(&xv, m, k, &wv, n, None, &mut out),
                            _ => {
                                let y = x.matmul(&w.t().unwrap()).unwrap();
                                black_box(y.broadcast_add(&b).unwrap());
                            }
                        }
                        black_box(&mut out);
                    }
                    *bst = bst.min(t.elapsed().as_secs_f64() / calls as f64);
                }
            }
            let gf = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
            println!(
                "m={m:<4} n={n:<6} into {:8.3} ms ({:5.1} GF/s) | gemm crate {:8.3} ms ({:5.1}) x{:4.2} | candle {:8.3} ms ({:5.1}) x{:4.2} | +bias: into {:8.3} ms, candle {:8.3} ms x{:4.2} | {}",
                best[0] * 1e3,
                gf(best[0]),
                best[3] * 1e3,
                gf(best[3]),
                best[3] / best[0],
                best[4] * 1e3,
                gf(best[4]),
                best[4] / best[0],
                best[2] * 1e3,
                best[1] * 1e3,
                best[1] / best[2],
                if same {
                    "bit-identical".to_string()
                } else {
                    format!("max |diff| {maxd:.1e}")
                },
            );
        }
    }
}
