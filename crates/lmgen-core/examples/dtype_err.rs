use lmgen_core::{engine::score_batch, hub::ModelLocation, load, LoadOptions};
fn main() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    for name in ["llama", "neox", "opt", "bloom", "gpt2"] {
        let g: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(root.join(format!("golden/{name}.json"))).unwrap(),
        )
        .unwrap();
        for dt in [
            candle_core::DType::F32,
            candle_core::DType::F16,
            candle_core::DType::BF16,
        ] {
            let m = load(
                &ModelLocation::Dir(root.join(name)),
                &LoadOptions {
                    dtype: dt,
                    ..Default::default()
                },
            )
            .unwrap();
            let mut worst = 0f32;
            for p in g["prompts"].as_array().unwrap() {
                let ids: Vec<u32> = p["input_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u32)
                    .collect();
                let s = score_batch(&m, &[&ids]).unwrap().remove(0);
                for (a, b) in s
                    .logprobs
                    .iter()
                    .zip(p["prompt_logprobs"].as_array().unwrap())
                {
                    worst = worst.max((a - b.as_f64().unwrap() as f32).abs());
                }
            }
            println!("{name} {dt:?}: max |dlogprob| {worst:.4}");
        }
    }
}
