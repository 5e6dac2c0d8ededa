//! `lmgen bench`: speed of the engine on any model shape, with synthetic (seeded random)
//! weights, next to the limits of this machine measured in the same run.
use crate::config::RawConfig;
use crate::engine::{RunSeq, Runner, SeqKv};
use crate::error::Result;
use crate::families::{self, Loader};
use crate::kv::BlockTable;
use crate::model::{Decoder, Want};
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
        "mixtral-8x7b" => {
            json!({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
            "max_position_embeddings": 32768, "rope_theta": 1e6, "rms_norm_eps": 1e-5})
        }
        "gemma-2-9b" => {
            json!({"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "hidden_size": 3584,
            "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256,
            "intermediate_size": 14336, "vocab_size": 256000, "max_position_embeddings": 8192,
            "sliding_window": 4096, "query_pre_attn_scalar": 256, "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0, "rms_norm_eps": 1e-6})
        }
        "falcon-40b" => {
            json!({"architectures": ["FalconForCausalLM"], "model_type": "falcon", "hidden_size": 8192,
            "num_hidden_layers": 60, "num_attention_heads": 128, "num_kv_heads": 8,
            "new_decoder_architecture": true, "parallel_attn": true, "bias": false, "alibi": false,
            "vocab_size": 65024, "max_position_embeddings": 2048, "tie_word_embeddings": false})
        }
        "phi-3-medium" => {
            json!({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 5120,
            "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 10,
            "intermediate_size": 17920, "vocab_size": 32064, "max_position_embeddings": 4096,
            "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "sliding_window": 2047})
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
    "phi-3-medium",
    "gemma-2-9b",
    "falcon-40b",
    "mixtral-8x7b",
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
#[derive(Debug, Clone, serde::Serialize)]
pub struct Limits {
    /// Sustained memory read bandwidth with `read_threads` threads, GB/s (best of ~1 s of
    /// passes over a 1 GiB buffer, AVX2 loads where the CPU has them).
    pub read_gb_s: f64,
    /// The same with one thread.
    pub read_gb_s_1thread: f64,
    pub read_threads: usize,
    /// Whether the buffer was advised onto transparent huge pages (Linux): with 4 KiB pages
    /// the hardware prefetchers stop at every page and a core reads less.
    pub read_huge_pages: bool,
    /// f32 GEMM throughput, GFLOP/s: the best of the shapes and kernels tried (candle's CPU
    /// matmul, and lmgen's own `dotgemm` that prefill uses), which are `gemm_shape` and
    /// `gemm_kernel`.
    pub gemm_gflop_s: f64,
    /// `[m, k, n]` of the best GEMM: (m×k)·(k×n).
    pub gemm_shape: [usize; 3],
    /// The kernel that reached it.
    pub gemm_kernel: String,
}

/// Size of the bandwidth buffer: far beyond any cache (this VM reports a 480 MiB L3).
const BW_BYTES: usize = 1 << 30;

pub fn measure_limits(threads: usize) -> Result<Limits> {
    let threads = threads.max(1);
    let mut buf = BwBuffer::new(BW_BYTES);
    let read_huge_pages = buf.huge;
    // Every page written (non-zero), so reads hit real memory, not the shared zero page.
    let xs = buf.fill(1.0);
    let read_gb_s = read_bandwidth(xs, threads, 1.0);
    let read_gb_s_1thread = if threads > 1 {
        read_bandwidth(xs, 1, 0.5)
    } else {
        read_gb_s
    };
    drop(buf);
    let (gemm_gflop_s, gemm_shape, gemm_kernel) = gemm_peak()?;
    Ok(Limits {
        read_gb_s,
        read_gb_s_1thread,
        read_threads: threads,
        read_huge_pages,
        gemm_gflop_s,
        gemm_shape,
        gemm_kernel,
    })
}

/// A 2 MiB-aligned f32 buffer, advised onto transparent huge pages where Linux allows it
/// (`madvise` mode is common), so the bandwidth measured is the memory's, not the TLB's.
struct BwBuffer {
    ptr: *mut f32,
    layout: std::alloc::Layout,
    huge: bool,
}

impl BwBuffer {
    fn new(bytes: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(bytes, 2 << 20)
            .expect("valid layout for the bandwidth buffer");
        // Safe: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) } as *mut f32;
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        #[cfg(target_os = "linux")]
        let huge = {
            extern "C" {
                fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
            }
            const MADV_HUGEPAGE: i32 = 14;
            // Safe: the range is exactly our allocation; advice only, no effect on contents.
            unsafe { madvise(ptr.cast(), bytes, MADV_HUGEPAGE) == 0 }
        };
        #[cfg(not(target_os = "linux"))]
        let huge = false;
        Self { ptr, layout, huge }
    }

    /// Write `v` everywhere; the buffer is readable only after this.
    fn fill(&mut self, v: f32) -> &[f32] {
        let n = self.layout.size() / 4;
        // Safe: `ptr` holds `n` f32-aligned slots owned by `self`; written as MaybeUninit,
        // then every slot is initialized.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.cast::<std::mem::MaybeUninit<f32>>(), n)
                .fill(std::mem::MaybeUninit::new(v));
            std::slice::from_raw_parts(self.ptr, n)
        }
    }
}

impl Drop for BwBuffer {
    fn drop(&mut self) {
        // Safe: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.cast(), self.layout) }
    }
}

/// Best GB/s of repeated full passes over `buf` split over `threads` threads (the calling
/// thread is one of them), for about `seconds` (at least 5 passes). Threads start once and
/// meet at a barrier around each pass, so the timing holds no thread start-up.
fn read_bandwidth(buf: &[f32], threads: usize, seconds: f64) -> f64 {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Barrier;
    let chunk = buf.len().div_ceil(threads).next_multiple_of(1024);
    let parts: Vec<&[f32]> = buf.chunks(chunk).collect();
    let barrier = Barrier::new(parts.len());
    let stop = AtomicBool::new(false);
    let mut best = f64::INFINITY;
    std::thread::scope(|s| {
        for part in &parts[1..] {
            let (barrier, stop) = (&barrier, &stop);
            s.spawn(move || loop {
                barrier.wait();
                if stop.load(Ordering::Acquire) {
                    return;
                }
                std::hint::black_box(sum_f32(part));
                barrier.wait();
            });
        }
        let started = Instant::now();
        let mut passes = 0;
        loop {
            barrier.wait();
            let t = Instant::now();
            std::hint::black_box(sum_f32(parts[0]));
            barrier.wait();
            best = best.min(t.elapsed().as_secs_f64());
            passes += 1;
            if (passes >= 5 && started.elapsed().as_secs_f64() >= seconds) || passes >= 200 {
                break;
            }
        }
        stop.store(true, Ordering::Release);
        barrier.wait();
    });
    std::mem::size_of_val(buf) as f64 / best / 1e9
}

/// Best of a few square f32 GEMMs, through candle's matmul and through lmgen's own kernel
/// (`x · wᵀ`, as the model's products); (GFLOP/s, [m, k, n], kernel).
fn gemm_peak() -> Result<(f64, [usize; 3], String)> {
    let mut best = (0.0, [0; 3], String::new());
    for m in [1024usize, 2048] {
        let a = Tensor::randn(0f32, 1.0, (m, m), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, (m, m), &Device::Cpu)?;
        let (av, bv) = (
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?,
        );
        let mut out = vec![0f32; m * m];
        let own = format!("lmgen gemm {}", crate::kernels::dotgemm::large_kernel());
        for kernel in ["candle matmul", own.as_str()] {
            let mut t_best = f64::INFINITY;
            for _ in 0..4 {
                let t = Instant::now();
                if kernel == own {
                    crate::kernels::matmul::matmul_wt_into(&av, m, m, &bv, m, None, &mut out);
                    std::hint::black_box(&mut out);
                } else {
                    std::hint::black_box(a.matmul(&b)?);
                }
                t_best = t_best.min(t.elapsed().as_secs_f64());
            }
            let gflops = 2.0 * (m * m * m) as f64 / t_best / 1e9;
            if gflops > best.0 {
                best = (gflops, [m, m, m], kernel.to_string());
            }
        }
    }
    Ok(best)
}

/// Sum of `xs`, written to be bound by memory loads: AVX2 with 8 independent 8-lane
/// accumulators where the CPU has it (the binary targets baseline x86-64, so the compiler
/// alone would use 4-lane SSE with a latency-bound chain), else 8 scalar accumulators.
fn sum_f32(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // Safe: the CPU supports AVX2 (checked just above).
            return unsafe { sum_f32_avx2(xs) };
        }
    }
    sum_f32_scalar(xs)
}

fn sum_f32_scalar(xs: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = xs.chunks_exact(8);
    for c in &mut it {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().sum::<f32>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_f32_avx2(xs: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_ps(); 8];
    let mut it = xs.chunks_exact(64);
    for c in &mut it {
        let p = c.as_ptr();
        for (i, a) in acc.iter_mut().enumerate() {
            *a = _mm256_add_ps(*a, _mm256_loadu_ps(p.add(8 * i)));
        }
    }
    let mut lanes = [0f32; 8];
    let mut total = acc[0];
    for a in &acc[1..] {
        total = _mm256_add_ps(total, *a);
    }
    _mm256_storeu_ps(lanes.as_mut_ptr(), total);
    lanes.iter().sum::<f32>() + sum_f32_scalar(it.remainder())
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DecodePoint {
    pub batch: usize,
    pub tokens_per_s: f64,
    /// Heap allocations of the first and of the last timed decode step.
    pub allocations_first_step: Option<u64>,
    pub allocations_last_step: Option<u64>,
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
    /// Achieved / measured GEMM peak (CPU runs).
    pub prefill_gemm_ratio: Option<f64>,
    /// Tokens of context per sequence before the timed decode steps.
    pub decode_context: usize,
    pub decode: Vec<DecodePoint>,
    pub peak_rss_bytes: Option<u64>,
    /// Threads the run was asked to use (`BenchOptions::threads`).
    pub threads: usize,
    /// `cpu`, `cuda:0`, ...
    pub device: String,
    pub dtype: String,
    /// Machine limits, measured on CPU runs.
    pub limits: Option<Limits>,
}

pub struct BenchOptions {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    /// Tokens of context each sequence has when the timed decode steps start (as
    /// `llama-bench -d`); the steps read its KV cache.
    pub context: usize,
    pub batch_sizes: Vec<usize>,
    pub threads: usize,
    /// Where synthetic models are built (`run`); a loaded decoder keeps its own.
    pub device: Device,
    pub dtype: DType,
    /// Heap allocations so far (from the binary's allocator), to show that a decode step
    /// allocates the same amount however far generation has gone.
    pub alloc_counter: Option<fn() -> u64>,
}

/// Sum of `f` over the matrices a token multiplies with (all linears + head; of the experts,
/// the `top_k` a token is routed to, on average).
fn per_token(d: &Decoder, f: impl Fn(&crate::model::layers::Linear) -> usize) -> usize {
    let w = &d.weights;
    let mut n = f(&w.lm_head);
    for b in &w.blocks {
        n += f(&b.qkv) + f(&b.out) + f(&b.mlp_in) + f(&b.mlp_out);
        if let (Some(m), Some(ms)) = (&b.moe, &d.spec.moe) {
            n += f(&m.router) + m.shared_gate.as_ref().map_or(0, &f);
            let all: usize = m.experts.iter().map(|(a, b)| f(a) + f(b)).sum();
            n += all * ms.top_k / m.experts.len().max(1);
        }
    }
    n + w.project_in.as_ref().map_or(0, &f) + w.project_out.as_ref().map_or(0, &f)
}

/// Parameters in the matrices every token multiplies with.
fn matmul_params(d: &Decoder) -> usize {
    per_token(d, |l| l.param_count())
}

/// The storage formats of the matrices every token multiplies with, e.g. `f32` or
/// `q4_1+q6_k` (a GGUF file's own mix), not only the compute dtype.
fn weight_formats(d: &Decoder) -> String {
    use crate::model::layers::Weight;
    let w = &d.weights;
    let mut names: Vec<String> = Vec::new();
    let linears = w
        .blocks
        .iter()
        .flat_map(|b| [&b.qkv, &b.out, &b.mlp_in, &b.mlp_out])
        .chain(std::iter::once(&w.lm_head));
    for l in linears {
        let name = match &l.weight {
            Weight::Dense(t) => format!("{:?}", t.dtype()).to_lowercase(),
            Weight::Quant(q) => q.kind().name().to_string(),
            Weight::Mapped(m) => m.dtype_name(),
        };
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names.join("+")
}

/// Stored bytes of the matrices every token multiplies with.
fn matmul_bytes(d: &Decoder) -> usize {
    per_token(d, |l| l.weight_bytes())
}

/// Benchmark a synthetic model of the shape `config` describes.
pub fn run(name: &str, config: Value, opts: &BenchOptions) -> Result<BenchReport> {
    let t = Instant::now();
    let dec = synthetic_decoder(config, 1234, &opts.device, opts.dtype)?;
    run_decoder(name, &dec, t.elapsed().as_secs_f64(), opts)
}

/// Benchmark an already loaded decoder (`load_s`: how long loading took).
pub fn run_decoder(
    name: &str,
    dec: &Decoder,
    load_s: f64,
    opts: &BenchOptions,
) -> Result<BenchReport> {
    // The limits' 1 GiB buffer must not count in the model's peak RSS: keep the peak so far
    // (loading), measure, then reset the kernel's high-water mark.
    let rss_before = peak_rss();
    let cpu = dec.device.is_cpu();
    let limits = if cpu {
        Some(measure_limits(opts.threads)?)
    } else {
        None
    };
    reset_peak_rss();
    let mm = matmul_params(dec);
    let params = mm + dec.weights.embed.elem_count() * usize::from(!dec.spec.tie_embeddings);
    // Bytes every decode step reads: the stored size of every matrix (f32, half or quantized).
    let bytes_per_token = matmul_bytes(dec) as f64;
    let vocab = dec.spec.vocab_size as u32;
    let prompt: Vec<u32> = (0..opts.prompt_tokens as u32)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();

    // Prefill: one prompt, best of 3.
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let mut runner = Runner::new(dec, BlockTable::blocks_for(prompt.len()), false, true);
        let mut kv = SeqKv::default();
        runner.reserve(&mut kv, prompt.len());
        let t = Instant::now();
        runner.step(
            &mut [RunSeq {
                tokens: &prompt,
                kv: &mut kv,
                want: Want::Last,
                rope_len: 0,
            }],
            false,
        )?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let prefill_tps = prompt.len() as f64 / best;
    let prefill_gflops = 2.0 * mm as f64 * prefill_tps / 1e9;

    let mut decode = Vec::new();
    for &b in &opts.batch_sizes {
        let ctx = opts.context.max(1);
        let per_seq = BlockTable::blocks_for(ctx + opts.decode_tokens + 1);
        let mut runner = Runner::new(dec, b * per_seq, false, true);
        let mut kvs: Vec<SeqKv> = (0..b).map(|_| SeqKv::default()).collect();
        let mut last: Vec<Vec<u32>> = (0..b as u32)
            .map(|i| {
                (0..ctx as u32)
                    .map(|j| (j * 7919 + 13 + i) % vocab)
                    .collect()
            })
            .collect();
        let vocab = vocab as usize;
        // Prompts of `ctx` tokens (untimed), then timed decode steps.
        let mut time = 0.0;
        let (mut first_allocs, mut last_allocs) = (None, None);
        for step in 0..=opts.decode_tokens {
            for (kv, toks) in kvs.iter_mut().zip(&last) {
                let total = kv.len() + toks.len();
                runner.reserve(kv, total);
            }
            let allocs0 = opts.alloc_counter.map(|f| f());
            let t = Instant::now();
            {
                let mut steps: Vec<RunSeq> = kvs
                    .iter_mut()
                    .zip(&last)
                    .map(|(kv, toks)| RunSeq {
                        tokens: toks,
                        kv,
                        want: Want::Last,
                        rope_len: 0,
                    })
                    .collect();
                runner.step(&mut steps, false)?;
            }
            for (i, l) in last.iter_mut().enumerate() {
                let tok = argmax(&runner.logits(i)[..vocab]);
                l.clear();
                l.push(tok);
            }
            if step > 0 {
                time += t.elapsed().as_secs_f64();
                let allocs = opts.alloc_counter.zip(allocs0).map(|(f, a0)| f() - a0);
                if step == 1 {
                    first_allocs = allocs;
                }
                last_allocs = allocs;
            }
        }
        let tps = (b * opts.decode_tokens) as f64 / time;
        let ratio = limits
            .as_ref()
            .filter(|_| b == 1)
            .map(|l| tps / (l.read_gb_s * 1e9 / bytes_per_token));
        decode.push(DecodePoint {
            batch: b,
            tokens_per_s: tps,
            allocations_first_step: first_allocs,
            allocations_last_step: last_allocs,
            bandwidth_ratio: ratio,
        });
    }
    Ok(BenchReport {
        model: name.to_string(),
        params,
        weight_bytes: matmul_bytes(dec)
            + dec.weights.embed.bytes() * usize::from(!dec.spec.tie_embeddings),
        load_s,
        prompt_tokens: prompt.len(),
        prefill_tokens_per_s: prefill_tps,
        prefill_gflop_s: prefill_gflops,
        prefill_gemm_ratio: limits.as_ref().map(|l| prefill_gflops / l.gemm_gflop_s),
        decode_context: opts.context.max(1),
        decode,
        peak_rss_bytes: peak_rss().max(rss_before),
        threads: opts.threads,
        device: format!("{:?}", dec.device.location())
            .to_lowercase()
            .replace("cuda { gpu_id: ", "cuda:")
            .replace(" }", ""),
        dtype: weight_formats(dec),
        limits,
    })
}

/// Restart the peak-RSS count at the current RSS (Linux ≥ 4.0: `5` to `clear_refs`).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size of this process (Linux `VmHWM`).
pub fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_sums_agree() {
        // Small integers: every partial sum is exact in f32, whatever the order.
        for n in [0, 7, 64, 1000, 4099] {
            let xs: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
            let want: f32 = xs.iter().sum();
            assert_eq!(sum_f32(&xs), want, "n = {n}");
            assert_eq!(sum_f32_scalar(&xs), want, "n = {n}");
        }
        let mut buf = BwBuffer::new(4 << 20);
        let xs = buf.fill(2.0);
        assert_eq!(xs.len(), 1 << 20);
        assert!(read_bandwidth(xs, 2, 0.0) > 0.0);
    }
}
