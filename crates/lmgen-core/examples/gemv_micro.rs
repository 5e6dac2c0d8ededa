//! Streaming f32 kernel (through `Linear::forward`, and `matmul_wt_into` into a reused
//! buffer) vs candle's matmul vs a pure memory-read loop, alternating in one process.
use candle_core::{Device, Tensor};
use std::time::Instant;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn read_all(xs: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut a = [_mm256_setzero_ps(); 4];
    let p = xs.as_ptr();
    let mut i = 0;
    while i + 32 <= xs.len() {
        for (u, au) in a.iter_mut().enumerate() {
            *au = _mm256_add_ps(*au, _mm256_loadu_ps(p.add(i + 8 * u)));
        }
        i += 32;
    }
    let mut out = [0f32; 8];
    _mm256_storeu_ps(
        out.as_mut_ptr(),
        _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])),
    );
    out.iter().sum()
}

fn main() {
    let (k, n) = (576usize, 49152usize);
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
    let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let lin = lmgen_core::model::layers::Linear::new(w.clone(), None);
    let gb = (n * k * 4) as f64 / 1e9;
    let x = Tensor::randn(0f32, 1.0, (1, k), &Device::Cpu).unwrap();
    let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let mut out = vec![0f32; n];
    for round in 0..4 {
        let t = Instant::now();
        for _ in 0..10 {
            std::hint::black_box(unsafe { read_all(&wv) });
        }
        let read1 = t.elapsed().as_secs_f64() / 10.0;
        let t = Instant::now();
        for _ in 0..10 {
            std::hint::black_box(rayon::join(
                || unsafe { read_all(&wv[..wv.len() / 2]) },
                || unsafe { read_all(&wv[wv.len() / 2..]) },
            ));
        }
        let read2 = t.elapsed().as_secs_f64() / 10.0;
        let t = Instant::now();
        for _ in 0..10 {
            std::hint::black_box(lin.forward(&x).unwrap());
        }
        let ours = t.elapsed().as_secs_f64() / 10.0;
        let t = Instant::now();
        for _ in 0..10 {
            lmgen_core::model::kernels::matmul_wt_into(&xv, 1, k, &wv, n, None, &mut out);
            std::hint::black_box(&mut out);
        }
        let into = t.elapsed().as_secs_f64() / 10.0;
        let t = Instant::now();
        for _ in 0..10 {
            std::hint::black_box(x.matmul(&w.t().unwrap()).unwrap());
        }
        let candle = t.elapsed().as_secs_f64() / 10.0;
        println!("round {round}: read 1T {:.1} GB/s, 2T {:.1} GB/s | ours m=1 {:.1} GB/s | into m=1 {:.1} GB/s | candle m=1 {:.1} GB/s", gb / read1, gb / read2, gb / ours, gb / into, gb / candle);
    }
}
