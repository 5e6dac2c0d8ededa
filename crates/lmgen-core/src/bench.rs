//! `lmgen bench`: speed of the engine on any model shape, with synthetic (seeded random)
//! weights, next to the limits of this machine measured in the same run.
use crate::config::RawConfig;
use crate::error::{Error, Result};
use crate::kv_cache::SeqCache;
use crate::model::families::{self, Loader};
use crate::model::{Decoder, SeqStep, Want};
use crate::sampling::argmax;
use crate::weights::WeightStore;
use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use std::path::Path;
use std::time::Instant;

/// Real shapes of well-known checkpoints (config.json subsets).
pub fn preset(name: &str) -> Option<Value> {
    Some(match name {
        "opt-125m" => opt(768, 12, 12, 3072, 50272, "relu"),
        "galactica-1.3b" => opt(2048, 24, 32, 8192, 50000, "gelu"),
        "galactica-6.7b" => opt(4096, 32, 32, 16384, 50000, "gelu"),
        "opt-30b" => opt(7168, 48, 56, 28672, 50272, "relu"),
        "pythia-160m" => neox(768, 12, 12, 50304),
        "gpt-neox-20b" => neox(6144, 44, 64, 50432),
        "bloom-560m" => bloom(1024, 24, 16),
        "bloom-176b" => bloom(14336, 70, 112),
        "gpt2" => {
            json!({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 768, "n_layer": 12,
            "n_head": 12, "vocab_size": 50257, "n_positions": 1024})
        }
        "smollm2-135m" => {
            json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
            "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": true})
        }
        _ => return None,
    })
}

pub const PRESETS: &[&str] = &[
    "opt-125m",
    "pythia-160m",
    "bloom-560m",
    "gpt2",
    "smollm2-135m",
    "galactica-1.3b",
    "galactica-6.7b",
    "gpt-neox-20b",
    "opt-30b",
    "bloom-176b",
];

fn opt(h: usize, l: usize, nh: usize, ffn: usize, vocab: usize, act: &str) -> Value {
    json!({"architectures": ["OPTForCausalLM"], "model_type": "opt", "hidden_size": h, "num_hidden_layers": l,
        "num_attention_heads": nh, "ffn_dim": ffn, "vocab_size": vocab, "max_position_embeddings": 2048,
        "activation_function": act, "word_embed_proj_dim": h, "do_layer_norm_before": true})
}

fn neox(h: usize, l: usize, nh: usize, vocab: usize) -> Value {
    json!({"architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": h,
        "num_hidden_layers": l, "num_attention_heads": nh, "intermediate_size": 4 * h, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rotary_pct": 0.25, "use_parallel_residual": true})
}

fn bloom(h: usize, l: usize, nh: usize) -> Value {
    json!({"architectures": ["BloomForCausalLM"], "model_type": "bloom", "hidden_size": h, "n_layer": l,
        "n_head": nh, "vocab_size": 250880})
}

/// A decoder with made-up weights of the shape `config` describes.
pub fn synthetic_decoder(
    config: Value,
    seed: u64,
    device: &Device,
    dtype: DType,
) -> Result<Decoder> {
    let cfg = RawConfig::from_value(Path::new("<bench config>"), config);
    let (family, arch) = families::detect(&cfg)?;
    let spec = families::spec(family, &arch, &cfg)?;
    let store = WeightStore::synthetic(seed);
    let weights = families::load(&spec, &Loader::new(&store, device.clone(), dtype))?;
    Ok(Decoder::new(spec, weights, device.clone()))
}

/// What this machine can do at best, measured now.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Limits {
    /// Sustained memory read bandwidth over all threads, GB/s.
    pub read_gb_s: f64,
    /// f32 GEMM throughput (1024³, candle's CPU kernel), GFLOP/s.
    pub gemm_gflop_s: f64,
}

pub fn measure_limits(threads: usize) -> Result<Limits> {
    // Read bandwidth: sum a 512 MiB buffer split over the threads; best of 5.
    let n: usize = 128 << 20;
    let buf: Vec<f32> = (0..n).map(|i| (i & 7) as f32).collect();
    let threads = threads.max(1);
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        let total: f32 = std::thread::scope(|s| {
            let chunk = n.div_ceil(threads);
            let hs: Vec<_> = buf
                .chunks(chunk)
                .map(|c| s.spawn(move || sum_f32(c)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        std::hint::black_box(total);
        best = best.min(t.elapsed().as_secs_f64());
    }
    let read_gb_s = (n * 4) as f64 / best / 1e9;
    drop(buf);
    let m = 1024;
    let a = Tensor::randn(0f32, 1.0, (m, m), &Device::Cpu)?;
    let b = Tensor::randn(0f32, 1.0, (m, m), &Device::Cpu)?;
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        std::hint::black_box(a.matmul(&b.t()?)?);
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(Limits {
        read_gb_s,
        gemm_gflop_s: 2.0 * (m * m * m) as f64 / best / 1e9,
    })
}

fn sum_f32(xs: &[f32]) -> f32 {
    // 8 independent accumulators so the loop is bound by loads, not by add latency.
    let mut acc = [0f32; 8];
    for c in xs.chunks_exact(8) {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum()
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodePoint {
    pub batch: usize,
    pub tokens_per_s: f64,
    /// Batch 1 only: achieved / (bandwidth ÷ bytes read per token).
    pub bandwidth_ratio: Option<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub model: String,
    pub params: usize,
    pub weight_bytes: usize,
    pub load_s: f64,
    pub prompt_tokens: usize,
    pub prefill_tokens_per_s: f64,
    pub prefill_gflop_s: f64,
    pub prefill_gemm_ratio: f64,
    pub decode: Vec<DecodePoint>,
    pub peak_rss_bytes: Option<u64>,
    pub limits: Limits,
}

pub struct BenchOptions {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub batch_sizes: Vec<usize>,
    pub threads: usize,
}

/// Parameters in the matrices every token multiplies with (all linears + head).
fn matmul_params(d: &Decoder) -> usize {
    let w = &d.weights;
    let mut n = w.lm_head.elem_count();
    for b in &w.blocks {
        n += b.qkv.weight.elem_count() + b.out.weight.elem_count();
        n += b.mlp_in.weight.elem_count() + b.mlp_out.weight.elem_count();
    }
    n += w.project_in.as_ref().map_or(0, |p| p.weight.elem_count());
    n += w.project_out.as_ref().map_or(0, |p| p.weight.elem_count());
    n
}

/// Benchmark a synthetic model of the shape `config` describes.
pub fn run(name: &str, config: Value, opts: &BenchOptions) -> Result<BenchReport> {
    let t = Instant::now();
    let dec = synthetic_decoder(config, 1234, &Device::Cpu, DType::F32)?;
    run_decoder(name, &dec, t.elapsed().as_secs_f64(), opts)
}

/// Benchmark an already loaded decoder (`load_s`: how long loading took).
pub fn run_decoder(name: &str, dec: &Decoder, load_s: f64, opts: &BenchOptions) -> Result<BenchReport> {
    let limits = measure_limits(opts.threads)?;
    let mm = matmul_params(dec);
    let params = mm + dec.weights.embed.elem_count() * usize::from(!dec.spec.tie_embeddings);
    let bytes_per_token = (mm * 4) as f64;
    let vocab = dec.spec.vocab_size as u32;
    let prompt: Vec<u32> = (0..opts.prompt_tokens as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();

    // Prefill: one prompt, best of 3.
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let mut cache = dec.new_cache(prompt.len());
        let t = Instant::now();
        dec.step(
            &mut [SeqStep {
                tokens: &prompt,
                cache: &mut cache,
                want: Want::Last,
            }],
            false,
        )?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let prefill_tps = prompt.len() as f64 / best;
    let prefill_gflops = 2.0 * mm as f64 * prefill_tps / 1e9;

    let mut decode = Vec::new();
    for &b in &opts.batch_sizes {
        let mut caches: Vec<SeqCache> = (0..b)
            .map(|_| dec.new_cache(16 + opts.decode_tokens))
            .collect();
        let mut last: Vec<Vec<u32>> = (0..b)
            .map(|i| {
                prompt[..16.min(prompt.len())]
                    .iter()
                    .map(|t| (t + i as u32) % vocab)
                    .collect()
            })
            .collect();
        // Short prompts, then timed decode steps.
        let mut time = 0.0;
        for step in 0..=opts.decode_tokens {
            let t = Instant::now();
            let out = {
                let mut steps: Vec<SeqStep> = caches
                    .iter_mut()
                    .zip(&last)
                    .map(|(c, toks)| SeqStep {
                        tokens: toks,
                        cache: c,
                        want: Want::Last,
                    })
                    .collect();
                dec.step(&mut steps, false)?
            };
            for (l, logits) in last.iter_mut().zip(out.logits) {
                let row: Vec<f32> = logits
                    .ok_or_else(|| Error::BadRequest("no logits".into()))?
                    .flatten_all()?
                    .to_vec1()?;
                *l = vec![argmax(&row)];
            }
            if step > 0 {
                time += t.elapsed().as_secs_f64();
            }
        }
        let tps = (b * opts.decode_tokens) as f64 / time;
        let ratio = (b == 1).then(|| tps / (limits.read_gb_s * 1e9 / bytes_per_token));
        decode.push(DecodePoint {
            batch: b,
            tokens_per_s: tps,
            bandwidth_ratio: ratio,
        });
    }
    Ok(BenchReport {
        model: name.to_string(),
        params,
        weight_bytes: params * 4,
        load_s,
        prompt_tokens: prompt.len(),
        prefill_tokens_per_s: prefill_tps,
        prefill_gflop_s: prefill_gflops,
        prefill_gemm_ratio: prefill_gflops / limits.gemm_gflop_s,
        decode,
        peak_rss_bytes: peak_rss(),
        limits,
    })
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
