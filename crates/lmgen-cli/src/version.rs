//! `lmgen --version`: what this binary is and what it can use on this machine.

/// CPU kernels this machine can run (detected now), best first, in lmgen's terms.
pub fn cpu_kernels() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut v = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        if avx2
            && is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni")
        {
            v.push("avx512-vnni (quantized matmul)");
        }
        if avx2 && is_x86_feature_detected!("avx512f") {
            v.push("avx512f (f32 prefill GEMM, attention products)");
        }
        if avx2 {
            v.push(if is_x86_feature_detected!("f16c") {
                "avx2+fma (f32/bf16/f16 decode and GEMM, attention, quantized matmul)"
            } else {
                "avx2+fma (f32/bf16 decode and GEMM, attention)"
            });
        }
    }
    v.push("scalar");
    v
}

pub fn long_version() -> String {
    let mut s = format!("lmgen {}\n", env!("CARGO_PKG_VERSION"));
    s += &format!("commit: {}\n", env!("LMGEN_GIT_COMMIT"));
    s += &format!(
        "target: {} ({} build)\n",
        env!("LMGEN_TARGET"),
        env!("LMGEN_PROFILE")
    );
    s += &format!("features: {}\n", features());
    s += &format!("cpu kernels: {}\n", cpu_kernels().join(", "));
    if let Ok(isa) = std::env::var("LMGEN_GEMM_ISA") {
        if !isa.is_empty() {
            s += &format!("LMGEN_GEMM_ISA={isa}: f32 GEMM capped at {isa}\n");
        }
    }
    if let Ok(isa) = std::env::var("LMGEN_QUANT_ISA") {
        if !isa.is_empty() {
            s += &format!("LMGEN_QUANT_ISA={isa}: quantized kernels capped at {isa}\n");
        }
    }
    s
}

#[cfg(feature = "cuda")]
fn features() -> String {
    format!(
        "cuda (compute capability {}; driver and CUDA libraries loaded at run time)",
        env!("LMGEN_CUDA_COMPUTE_CAP")
    )
}

#[cfg(not(feature = "cuda"))]
fn features() -> String {
    "cpu only (no cuda)".to_string()
}
