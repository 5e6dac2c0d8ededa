use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() {
    let (k, n) = (576usize, 49152usize);
    let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap();
    let lin = lmgen_core::model::layers::Linear::new(w.clone(), None);
    for m in [1usize, 4, 16] {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu).unwrap();
        for round in 0..3 {
            let t = Instant::now();
            for _ in 0..10 {
                std::hint::black_box(x.matmul(&w.t().unwrap()).unwrap());
            }
            let candle = t.elapsed().as_secs_f64() / 10.0;
            let t = Instant::now();
            for _ in 0..10 {
                std::hint::black_box(lin.forward(&x).unwrap());
            }
            let ours = t.elapsed().as_secs_f64() / 10.0;
            let gb = (n * k * 4) as f64 / 1e9;
            println!(
                "m={m} round {round}: candle {:.2} ms ({:.1} GB/s)  ours {:.2} ms ({:.1} GB/s)",
                candle * 1e3,
                gb / candle,
                ours * 1e3,
                gb / ours
            );
        }
    }
}
