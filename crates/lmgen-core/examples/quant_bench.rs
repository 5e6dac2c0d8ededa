//! Quantized matmul timings: the f32 streaming kernel vs candle's `QMatMul` vs
//! `lmgen_core::model::quant::QMatrix`, alternating in one process, best of N.
//!
//! cargo run --release -p lmgen-core --example quant_bench -- [kinds] [m,..]
//! env: QB_COLD_MB=N  rotate through copies of each weight so that ≥ N MB are touched
//!      between reuses (0 = one copy, possibly cache-resident); QB_ROUNDS (default 5);
//!      QB_SHAPES="n x k,..." (default 49152x576,1536x576,576x1536,4096x4096);
//!      QB_PREFILL=1: large m, comparing candle's f32 matmul, candle's QMatMul and ours.
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use lmgen_core::model::kernels::matmul_wt_small;
use lmgen_core::model::quant::{QMatrix, QuantKind};
use std::hint::black_box;
use std::time::Instant;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn dtype(k: QuantKind) -> GgmlDType {
    match k {
        QuantKind::Q8_0 => GgmlDType::Q8_0,
        QuantKind::Q4_0 => GgmlDType::Q4_0,
        QuantKind::Q4_1 => GgmlDType::Q4_1,
        QuantKind::Q4K => GgmlDType::Q4K,
        QuantKind::Q6K => GgmlDType::Q6K,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let kinds: Vec<QuantKind> = match args.first() {
        Some(s) if s != "all" => s.split(',').map(|k| k.parse().unwrap()).collect(),
        _ => QuantKind::ALL.to_vec(),
    };
    let ms: Vec<usize> = args
        .get(1)
        .map(|s| s.split(',').map(|v| v.parse().unwrap()).collect())
        .unwrap_or(vec![1, 16]);
    let shapes: Vec<(usize, usize)> = std::env::var("QB_SHAPES")
        .ok()
        .map(|s| {
            s.split(',')
                .map(|p| {
                    let (a, b) = p.split_once('x').unwrap();
                    (a.trim().parse().unwrap(), b.trim().parse().unwrap())
                })
                .collect()
        })
        .unwrap_or(vec![(49152, 576), (1536, 576), (576, 1536), (4096, 4096)]);
    let cold_mb = env("QB_COLD_MB", 0);
    let rounds = env("QB_ROUNDS", 5);
    let prefill = env("QB_PREFILL", 0) == 1;
    let dev = Device::Cpu;
    println!(
        "threads {} cold_mb {cold_mb} rounds {rounds}",
        rayon::current_num_threads()
    );
    for &(n, k) in &shapes {
        let mut s = 12345u64;
        let w: Vec<f32> = (0..n * k)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            })
            .collect();
        let copies = |bytes: usize| {
            if cold_mb == 0 {
                1
            } else {
                (cold_mb << 20).div_ceil(bytes).max(1)
            }
        };
        let wf: Vec<Vec<f32>> = (0..copies(n * k * 4)).map(|_| w.clone()).collect();
        for &kind in &kinds {
            if k % kind.block_size() != 0 {
                continue;
            }
            let q = QMatrix::quantize(&w, n, k, kind).unwrap();
            let qs: Vec<QMatrix> = (0..copies(q.storage_bytes())).map(|_| q.clone()).collect();
            let qt = QTensor::quantize(&Tensor::from_slice(&w, (n, k), &dev).unwrap(), dtype(kind))
                .unwrap();
            let raw = qt.data().unwrap().into_owned();
            let cq: Vec<QMatMul> = (0..copies(raw.len()))
                .map(|_| {
                    QMatMul::from_qtensor(
                        qtensor_from_ggml(dtype(kind), &raw, vec![n, k], &dev).unwrap(),
                    )
                    .unwrap()
                })
                .collect();
            if prefill {
                bench_prefill(&w, n, k, &qs[0], &cq[0], &ms, rounds);
                continue;
            }
            for &m in &ms {
                let x: Vec<f32> = (0..m * k)
                    .map(|i| (i * 7919 % 1000) as f32 / 1000.0 - 0.5)
                    .collect();
                let xt = Tensor::from_slice(&x, (m, k), &dev).unwrap();
                // warm up every copy (candle repacks lazily on first use)
                for c in &cq {
                    black_box(c.forward(&xt).unwrap());
                }
                // agreement check
                let a = matmul_wt_small(&x, m, k, &w, n, None);
                let b = q.matmul(&x, m);
                let c = cq[0]
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let rel = |u: &[f32]| {
                    let e: f64 = u
                        .iter()
                        .zip(&a)
                        .map(|(p, q)| ((p - q) as f64).powi(2))
                        .sum();
                    let nn: f64 = a.iter().map(|q| (*q as f64).powi(2)).sum();
                    (e / nn).sqrt()
                };
                // calls per sample: ~30 ms of f32 work (estimated at 10 GB/s)
                let calls = ((0.03 * 10e9 / (n * k * 4) as f64) as usize).clamp(3, 200);
                let mut best = [f64::MAX; 3];
                let mut it = [0usize; 3];
                for _ in 0..rounds {
                    for v in 0..3 {
                        let t = Instant::now();
                        for _ in 0..calls {
                            match v {
                                0 => {
                                    let i = it[0] % wf.len();
                                    black_box(matmul_wt_small(&x, m, k, &wf[i], n, None));
                                }
                                1 => {
                                    let i = it[1] % cq.len();
                                    black_box(cq[i].forward(&xt).unwrap());
                                }
                                _ => {
                                    let i = it[2] % qs.len();
                                    black_box(qs[i].matmul(&x, m));
                                }
                            }
                            it[v] += 1;
                        }
                        best[v] = best[v].min(t.elapsed().as_secs_f64() / calls as f64);
                    }
                }
                let gflops = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
                println!(
                    "{n:>6}x{k:<5} {:<5} m={m:<3} f32 {:8.3} ms ({:5.1} GB/s) | candle {:8.3} ms ({:5.1} GF/s, x{:4.2}, rel {:.1e}) | ours {:8.3} ms ({:5.1} GF/s, {:5.1} GB/s, x{:4.2}, rel {:.1e})",
                    kind.name(),
                    best[0] * 1e3,
                    (n * k * 4) as f64 / best[0] / 1e9,
                    best[1] * 1e3,
                    gflops(best[1]),
                    best[0] / best[1],
                    rel(&c),
                    best[2] * 1e3,
                    gflops(best[2]),
                    q.storage_bytes() as f64 / best[2] / 1e9,
                    best[0] / best[2],
                    rel(&b),
                );
            }
        }
    }
}

fn bench_prefill(
    w: &[f32],
    n: usize,
    k: usize,
    q: &QMatrix,
    cq: &QMatMul,
    ms: &[usize],
    rounds: usize,
) {
    let dev = Device::Cpu;
    let wt = Tensor::from_slice(w, (n, k), &dev).unwrap();
    for &m in ms {
        let x: Vec<f32> = (0..m * k)
            .map(|i| (i * 7919 % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let xt = Tensor::from_slice(&x, (m, k), &dev).unwrap();
        black_box(cq.forward(&xt).unwrap());
        let calls = ((0.05 * 100e9 / (2 * m * n * k) as f64) as usize).clamp(1, 100);
        let mut best = [f64::MAX; 3];
        for _ in 0..rounds {
            for (v, b) in best.iter_mut().enumerate() {
                let t = Instant::now();
                for _ in 0..calls {
                    match v {
                        0 => {
                            black_box(xt.matmul(&wt.t().unwrap()).unwrap());
                        }
                        1 => {
                            black_box(cq.forward(&xt).unwrap());
                        }
                        _ => {
                            black_box(q.matmul(&x, m));
                        }
                    }
                }
                *b = b.min(t.elapsed().as_secs_f64() / calls as f64);
            }
        }
        let gf = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
        println!(
            "{n:>6}x{k:<5} {:<5} m={m:<4} candle f32 {:8.3} ms ({:6.1} GF/s) | candle q {:8.3} ms ({:6.1}) | ours {:8.3} ms ({:6.1})",
            q.kind().name(),
            best[0] * 1e3,
            gf(best[0]),
            best[1] * 1e3,
            gf(best[1]),
            best[2] * 1e3,
            gf(best[2]),
        );
    }
}
