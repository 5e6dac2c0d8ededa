//! Heap allocations per call of `kernels::matmul_wt_into` and `QMatrix::matmul_into` after a
//! warm-up call, counted by a global allocator over all threads (the rayon pool included).
//! Exits with an error if an inline (single-thread) product allocates at all.
//!
//! cargo run --release -p lmgen-core --example into_allocs
use lmgen_core::model::kernels::matmul_wt_into;
use lmgen_core::model::quant::{QMatrix, QuantKind};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;

static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator; only counts calls.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const CALLS: usize = 200;

/// Allocations over `CALLS` calls of `f`, after one warm-up call.
fn count(mut f: impl FnMut()) -> usize {
    f();
    let before = ALLOCS.load(Ordering::Relaxed);
    for _ in 0..CALLS {
        f();
    }
    ALLOCS.load(Ordering::Relaxed) - before
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn main() {
    println!(
        "threads {}; allocations per {CALLS} calls after warm-up",
        rayon::current_num_threads()
    );
    let mut inline_allocs = 0;
    let k = 576;
    // (n, pooled): 64 rows run inline (f32 up to SMALL_M rows, quantized at m = 1),
    // 49152 on the rayon pool
    for (n, pooled) in [(64usize, false), (49152, true)] {
        let w = data(n * k, 1);
        let bias = data(n, 2);
        for m in [1usize, 16, 17, 128] {
            let x = data(m * k, 3);
            let mut out = vec![0f32; m * n];
            let f32_allocs = count(|| matmul_wt_into(&x, m, k, &w, n, Some(&bias), &mut out));
            let mut line = format!("{n:>5}x{k} m={m:<3} f32 {f32_allocs:>4}");
            // m > SMALL_M goes to gemm
            if !pooled && m <= 16 {
                inline_allocs += f32_allocs;
            }
            for kind in [QuantKind::Q8_0, QuantKind::Q4K, QuantKind::Q6K] {
                // K-quants need a multiple of 256 columns
                let kq = if kind.block_size() == 256 { 512 } else { k };
                let q = QMatrix::quantize(&w[..n * kq], n, kq, kind).unwrap();
                let xq = &x[..m * kq];
                let a = count(|| q.matmul_into(xq, m, Some(&bias), &mut out));
                if !pooled && m == 1 {
                    inline_allocs += a;
                }
                line += &format!(" | {kind} {a:>4}");
            }
            println!("{line}");
        }
    }
    if inline_allocs != 0 {
        eprintln!("inline products allocated {inline_allocs} times");
        std::process::exit(1);
    }
    println!("inline products: no allocations");
}
