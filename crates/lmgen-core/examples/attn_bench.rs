//! Paged-attention kernel micro-benchmark (SmolLM2-135M attention shape: 9 heads, 3 kv heads, head_dim 64).
use lmgen_core::kernels::attention::{paged_attention, AttnParams, AttnSeq};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// Counts heap allocations (all threads) to check the kernel's steady state.
struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}
#[global_allocator]
static GLOBAL: Counting = Counting;

const NH: usize = 9;
const NKV: usize = 3;
const HD: usize = 64;
const BS: usize = 16;

struct Rng(u64);
impl Rng {
    fn f(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// (past, q_len) per sequence; prints µs per call and GFLOP/s. An optional argument filters by name.
fn bench(name: &str, shape: &[(usize, usize)]) {
    if let Some(f) = std::env::args().nth(1) {
        if !name.contains(f.as_str()) {
            return;
        }
    }
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let need: Vec<usize> = shape.iter().map(|&(p, n)| (p + n).div_ceil(BS)).collect();
    let num_blocks: usize = need.iter().sum();
    // Interleave sequences' blocks across the pool.
    let max_need = *need.iter().max().unwrap();
    let mut tables: Vec<Vec<u32>> = need.iter().map(|&n| Vec::with_capacity(n)).collect();
    let mut next = 0u32;
    for b in 0..max_need {
        for (t, &n) in tables.iter_mut().zip(&need) {
            if b < n {
                t.push(next);
                next += 1;
            }
        }
    }
    let rows: usize = shape.iter().map(|s| s.1).sum();
    let q_stride = (NH + 2 * NKV) * HD; // q read from a fused QKV row
    let q: Vec<f32> = (0..rows * q_stride).map(|_| rng.f()).collect();
    let pool = num_blocks * NKV * BS * HD;
    let k: Vec<f32> = (0..pool).map(|_| rng.f()).collect();
    let v: Vec<f32> = (0..pool).map(|_| rng.f()).collect();
    let mut out = vec![0f32; rows * NH * HD];
    let mut start = 0;
    let seqs: Vec<AttnSeq> = shape
        .iter()
        .zip(&tables)
        .map(|(&(past, q_len), t)| {
            let s = AttnSeq {
                q_start: start,
                q_len,
                past,
                blocks: t,
            };
            start += q_len;
            s
        })
        .collect();
    let p = AttnParams {
        num_heads: NH,
        num_kv_heads: NKV,
        head_dim: HD,
        block_size: BS,
        scale: 1.0 / (HD as f32).sqrt(),
        window: None,
        alibi: None,
        alibi_bf16: None,
        softcap: None,
    };
    let pairs: f64 = shape
        .iter()
        .map(|&(pa, n)| (n * pa + n * (n + 1) / 2) as f64)
        .sum();
    let flops = 4.0 * (NH * HD) as f64 * pairs;
    let mut call = || paged_attention(&p, &seqs, &q, q_stride, &k, &v, &mut out, NH * HD);
    for _ in 0..5 {
        call();
    }
    let mut best = f64::MAX;
    let (mut calls, a0) = (0, ALLOCS.load(Ordering::Relaxed));
    for _ in 0..5 {
        let iters = ((0.2e9 / flops) as usize).clamp(3, 2000);
        let t = Instant::now();
        for _ in 0..iters {
            call();
        }
        best = best.min(t.elapsed().as_secs_f64() / iters as f64);
        calls += iters;
    }
    let allocs = ALLOCS.load(Ordering::Relaxed) - a0;
    // Reference point: one plain pass reading the K and V pools.
    let read = || {
        let mut acc = [0f32; 16];
        for buf in [&k, &v] {
            for c in buf.chunks_exact(16) {
                for i in 0..16 {
                    acc[i] += c[i];
                }
            }
        }
        std::hint::black_box(acc);
    };
    let mut read_best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        read();
        read_best = read_best.min(t.elapsed().as_secs_f64());
    }
    let kv_bytes = (2 * pool * 4) as f64;
    println!(
        "{name:<34} {:>9.1} µs/call  {:>6.1} GFLOP/s  {:>6.1} GB/s K/V  (1-thread read of the pool: {:.1} µs, {:.1} GB/s)  allocs/call {:.3}",
        best * 1e6,
        flops / best / 1e9,
        kv_bytes / best / 1e9,
        read_best * 1e6,
        kv_bytes / read_best / 1e9,
        allocs as f64 / calls as f64
    );
}

fn main() {
    println!(
        "threads: {}  (heads {NH}, kv {NKV}, head_dim {HD}, block {BS})",
        rayon::current_num_threads()
    );
    bench("decode 64 seqs x 1 tok @ ctx 256", &[(255, 1); 64]);
    bench("decode 1 seq x 1 tok @ ctx 2048", &[(2047, 1)]);
    bench("prefill 1 seq x 512 tok", &[(0, 512)]);
}
