fn main() {
    let name = std::env::args().nth(1).unwrap_or("smollm2-135m".into());
    let opts = lmgen_core::bench::BenchOptions {
        prompt_tokens: 128,
        decode_tokens: 16,
        batch_sizes: vec![1, 4, 16],
        threads: 2,
    };
    let r =
        lmgen_core::bench::run(&name, lmgen_core::bench::preset(&name).unwrap(), &opts).unwrap();
    println!("{}", serde_json::to_string_pretty(&r).unwrap());
}
