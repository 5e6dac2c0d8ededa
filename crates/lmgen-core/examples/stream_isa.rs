//! The f32 streaming kernel per instruction set (AVX2 vs AVX-512), alternating in one
//! process: decode-sized products (`m` = 1..16 rows) on the pool, GB/s of weights read.
use lmgen_core::kernels::matmul::{matmul_wt_into, set_f32_kernel};
use std::time::Instant;

fn main() {
    let (k, n) = (576usize, 49152usize);
    let mut s = 1u32;
    let mut rnd = || {
        s = s.wrapping_mul(1664525).wrapping_add(1013904223);
        (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5
    };
    let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
    let x: Vec<f32> = (0..16 * k).map(|_| rnd()).collect();
    let mut out = vec![0f32; 16 * n];
    let gb = (n * k * 4) as f64 / 1e9;
    for round in 0..3 {
        let mut line = format!("round {round}:");
        for m in [1usize, 4, 8, 16] {
            for isa in ["avx2", "avx512"] {
                set_f32_kernel(isa);
                let reps = 8;
                let t = Instant::now();
                for _ in 0..reps {
                    matmul_wt_into(&x[..m * k], m, k, &w, n, None, &mut out[..m * n]);
                }
                let dt = t.elapsed().as_secs_f64();
                line += &format!(" m={m} {isa} {:.1}", gb * reps as f64 / dt);
            }
        }
        println!("{line}  (GB/s)");
    }
}
