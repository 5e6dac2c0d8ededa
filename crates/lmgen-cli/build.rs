//! Build-time facts for `lmgen --version`: the git commit (or "unknown" outside a git
//! checkout; `LMGEN_GIT_COMMIT` overrides), the target, and with the `cuda` feature the GPU
//! compute capability the kernels are compiled for (`CUDA_COMPUTE_CAP`, else what
//! `nvidia-smi` reports, as the CUDA kernel build does).
use std::path::Path;
use std::process::Command;

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn main() {
    let dir = std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    println!("cargo:rerun-if-env-changed=LMGEN_GIT_COMMIT");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let commit = match std::env::var("LMGEN_GIT_COMMIT") {
        Ok(c) if !c.trim().is_empty() => c.trim().to_string(),
        _ => match git(&dir, &["rev-parse", "--short=12", "HEAD"]) {
            Some(c) => {
                let date = git(&dir, &["log", "-1", "--format=%cs", "HEAD"]);
                // Rebuild when HEAD moves: HEAD itself, the branch it points at, packed refs.
                for p in [
                    git(
                        &dir,
                        &["rev-parse", "--path-format=absolute", "--git-path", "HEAD"],
                    ),
                    git(
                        &dir,
                        &[
                            "rev-parse",
                            "--path-format=absolute",
                            "--git-path",
                            "packed-refs",
                        ],
                    ),
                    git(&dir, &["symbolic-ref", "-q", "HEAD"]).and_then(|r| {
                        git(
                            &dir,
                            &["rev-parse", "--path-format=absolute", "--git-path", &r],
                        )
                    }),
                ]
                .into_iter()
                .flatten()
                {
                    if Path::new(&p).exists() {
                        println!("cargo:rerun-if-changed={p}");
                    }
                }
                match date {
                    Some(d) => format!("{c} ({d})"),
                    None => c,
                }
            }
            None => "unknown".to_string(),
        },
    };
    println!("cargo:rustc-env=LMGEN_GIT_COMMIT={commit}");
    println!(
        "cargo:rustc-env=LMGEN_TARGET={}",
        std::env::var("TARGET").unwrap_or_default()
    );
    println!(
        "cargo:rustc-env=LMGEN_PROFILE={}",
        std::env::var("PROFILE").unwrap_or_default()
    );
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let cap = std::env::var("CUDA_COMPUTE_CAP")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .or_else(|| {
                let out = Command::new("nvidia-smi")
                    .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
                    .output()
                    .ok()?;
                let s = String::from_utf8(out.stdout).ok()?;
                let first = s.lines().next()?.trim().replace('.', "");
                (out.status.success() && !first.is_empty()).then_some(first)
            })
            .unwrap_or_else(|| "unknown".to_string());
        println!("cargo:rustc-env=LMGEN_CUDA_COMPUTE_CAP={cap}");
    }
}
