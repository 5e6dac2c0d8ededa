//! Decode loop on a synthetic SmolLM2-shaped model, for profiling.
use lmgen_core::model::{SeqStep, Want};
fn main() {
    let name = std::env::args().nth(1).unwrap_or("smollm2-135m".into());
    let steps: usize = std::env::args()
        .nth(2)
        .map(|s| s.parse().unwrap())
        .unwrap_or(64);
    let dec = lmgen_core::bench::synthetic_decoder(
        lmgen_core::bench::preset(&name).unwrap(),
        1,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
    )
    .unwrap();
    let mut cache = dec.new_cache(steps + 8);
    let mut tok = vec![1u32, 2, 3, 4];
    let t = std::time::Instant::now();
    for _ in 0..steps {
        let out = dec
            .step(
                &mut [SeqStep {
                    tokens: &tok,
                    cache: &mut cache,
                    want: Want::Last,
                }],
                false,
            )
            .unwrap();
        let row: Vec<f32> = out.logits[0]
            .as_ref()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        tok = vec![lmgen_core::sampling::argmax(&row)];
    }
    let s = t.elapsed().as_secs_f64();
    println!("{steps} steps in {s:.3}s: {:.1} tok/s", steps as f64 / s);
}
