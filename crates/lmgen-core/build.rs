//! With the `cuda` feature: compiles the vendored paged-attention kernels in `cuda/` with
//! nvcc into a static library linked into lmgen. Without it this does nothing (no nvcc needed).
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Kernel sources (see cuda/README.md): paged attention v1/v2 per dtype and the cache writer.
const SOURCES: [&str; 7] = [
    "pagedattention_v1_f32.cu",
    "pagedattention_v1_f16.cu",
    "pagedattention_v1_bf16.cu",
    "pagedattention_v2_f32.cu",
    "pagedattention_v2_f16.cu",
    "pagedattention_v2_bf16.cu",
    "reshape_and_cache_kernel.cu",
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo::rerun-if-changed=cuda");
    for var in [
        "CUDA_COMPUTE_CAP",
        "NVCC",
        "CUDA_ROOT",
        "CUDA_PATH",
        "CUDA_NVCC_FLAGS",
    ] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    if let Err(e) = build() {
        panic!("building the CUDA paged-attention kernels failed: {e}");
    }
}

fn cuda_root() -> Option<PathBuf> {
    ["CUDA_ROOT", "CUDA_PATH", "CUDA_HOME"]
        .iter()
        .find_map(|v| env::var_os(v).map(PathBuf::from))
}

fn nvcc() -> PathBuf {
    if let Some(n) = env::var_os("NVCC") {
        return n.into();
    }
    match cuda_root() {
        Some(r) if r.join("bin/nvcc").is_file() => r.join("bin/nvcc"),
        _ => "nvcc".into(),
    }
}

fn build() -> Result<(), String> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let src_dir = manifest.join("cuda");
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let cap: u32 = env::var("CUDA_COMPUTE_CAP")
        .ok()
        .map(|c| c.trim().replace('.', ""))
        .filter(|c| !c.is_empty())
        .map(|c| {
            c.trim_end_matches('a')
                .parse()
                .map_err(|_| format!("bad CUDA_COMPUTE_CAP '{c}'"))
        })
        .transpose()?
        .unwrap_or(90);
    let nvcc = nvcc();
    let extra: Vec<String> = env::var("CUDA_NVCC_FLAGS")
        .map(|f| f.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();
    // SASS for the target plus PTX, so newer GPUs can JIT it.
    let gencode = format!("arch=compute_{cap},code=[sm_{cap},compute_{cap}]");

    let compile = |src: &str| -> Result<PathBuf, String> {
        let obj = out_dir.join(Path::new(src).with_extension("o"));
        let out = Command::new(&nvcc)
            .current_dir(&src_dir)
            .args(["-c", "-std=c++17", "-O3", "--expt-relaxed-constexpr"])
            .args([
                "-U__CUDA_NO_HALF_OPERATORS__",
                "-U__CUDA_NO_HALF_CONVERSIONS__",
                "-U__CUDA_NO_HALF2_OPERATORS__",
                "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            ])
            .args(["-Xcompiler", "-fPIC", "--generate-code", &gencode])
            .args(&extra)
            .arg("-o")
            .arg(&obj)
            .arg(src_dir.join(src))
            .output()
            .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
        if !out.status.success() {
            return Err(format!(
                "nvcc {src}: {}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(obj)
    };

    // Compile the sources on as many threads as cargo allows.
    let jobs = env::var("NUM_JOBS")
        .ok()
        .and_then(|j| j.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs.min(SOURCES.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(src) = SOURCES.get(i) else { break };
                let r = compile(src);
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((i, r));
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_else(|e| e.into_inner());
    results.sort_by_key(|(i, _)| *i);
    let objs = results
        .into_iter()
        .map(|(_, r)| r)
        .collect::<Result<Vec<_>, _>>()?;

    let lib = out_dir.join("liblmgen_paged_attn.a");
    let _ = std::fs::remove_file(&lib);
    let status = Command::new(&nvcc)
        .arg("--lib")
        .arg("-o")
        .arg(&lib)
        .args(&objs)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    if !status.success() {
        return Err(format!("nvcc --lib: {status}"));
    }
    println!("cargo::rustc-link-search=native={}", out_dir.display());
    println!("cargo::rustc-link-lib=static=lmgen_paged_attn");
    // The kernels use the CUDA runtime (launches, cudaFuncSetAttribute): link it statically,
    // as the patched candle-kernels does, so the binary has no DT_NEEDED on CUDA libraries.
    if let Some(root) = cuda_root() {
        for d in ["lib64", "lib"] {
            if root.join(d).is_dir() {
                println!("cargo::rustc-link-search=native={}", root.join(d).display());
            }
        }
    }
    println!("cargo::rustc-link-lib=static:-bundle=cudart_static");
    for lib in ["dl", "rt", "pthread", "stdc++"] {
        println!("cargo::rustc-link-lib={lib}");
    }
    Ok(())
}
