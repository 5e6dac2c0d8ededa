//! Error classification, device/dtype/thread setup.
use crate::args::{DTypeArg, ModelArgs};
use candle_core::{DType, Device};
use lmgen_core::plan::{self, Placement, Workload};
use std::fmt;

/// A problem with the user's arguments or input: exit code 2.
#[derive(Debug)]
pub struct UserError(pub String);

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UserError {}

#[macro_export]
macro_rules! user_err {
    ($($t:tt)*) => { anyhow::Error::new($crate::util::UserError(format!($($t)*))) };
}

/// 2 for bad usage or bad input, 75 for a job stopped by a signal, 1 for runtime failures.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    for cause in err.chain() {
        if let Some(e) = cause.downcast_ref::<lmgen_core::Error>() {
            return match e {
                lmgen_core::Error::Interrupted(_) => lmgen_core::job::EXIT_INTERRUPTED,
                e if e.is_user_error() => 2,
                _ => 1,
            };
        }
        if cause.is::<UserError>() {
            return 2;
        }
    }
    1
}

/// Collapse a (possibly multi-line) message into one line.
pub fn one_line(msg: &str) -> String {
    // Errors from candle may carry a backtrace ("   0: frame ..."): drop it.
    let body: Vec<&str> = msg
        .lines()
        .take_while(|l| !l.trim_start().starts_with("0: "))
        .collect();
    body.join(" ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

pub use lmgen_core::job::io_msg;

/// `--threads N`, else `$RAYON_NUM_THREADS` if the user set it, else the CPUs this process
/// may use (affinity/cgroups via `available_parallelism`, capped by `$SLURM_CPUS_PER_TASK`).
/// Must run before any thread pool starts.
pub fn configure_threads(threads: Option<usize>) {
    let n = match threads {
        Some(n) => n,
        None => {
            let user_set = |k: &str| {
                std::env::var(k)
                    .ok()
                    .and_then(|s| s.trim().parse::<usize>().ok())
                    .filter(|&n| n > 0)
            };
            if user_set("RAYON_NUM_THREADS").is_some() || user_set("CANDLE_NUM_THREADS").is_some() {
                return;
            }
            default_threads()
        }
    };
    // Safe: called at the start of main, before any other thread exists.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
}

pub fn default_threads() -> usize {
    let mut n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if let Some(s) = std::env::var("SLURM_CPUS_PER_TASK")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
    {
        if s > 0 {
            n = n.min(s);
        }
    }
    n.max(1)
}

/// `--device` (cpu, cuda, gpu, cuda:N, auto) and `--max-memory` as a placement request.
/// `workload` sizes the KV cache and activations `auto` plans room for.
pub fn parse_placement(
    device: &str,
    max_memory: Option<&str>,
    workload: Workload,
) -> anyhow::Result<Placement> {
    let budgets = max_memory
        .map(|m| plan::parse_max_memory(m).map_err(|e| user_err!("--max-memory: {e}")))
        .transpose()?;
    let s = device.trim().to_ascii_lowercase();
    let cuda_index =
        if s == "cuda" || s == "gpu" {
            Some(0)
        } else if let Some(i) = s.strip_prefix("cuda:") {
            Some(i.parse::<usize>().map_err(|_| {
                user_err!("--device: bad CUDA device index in '{s}' (expected cuda:N)")
            })?)
        } else {
            None
        };
    match (s.as_str(), cuda_index) {
        ("cpu", _) => Ok(Placement::Single(Device::Cpu)),
        // `auto` quietly takes the CPU when there is no usable GPU, driver or CUDA library.
        ("auto", _) => Ok(Placement::Auto { budgets, workload }),
        (_, Some(i)) => Ok(Placement::Single(open_cuda(&s, i)?)),
        _ => Err(user_err!(
            "--device: expected cpu, cuda, cuda:N or auto, got '{s}'"
        )),
    }
}

/// CUDA device `i` for `--device {arg}`, or a one-line user error (exit 2).
pub fn open_cuda(arg: &str, i: usize) -> anyhow::Result<Device> {
    use lmgen_core::device::CudaUnavailable as U;
    plan::cuda_device(i).map_err(|e| match e {
        U::NotBuilt => {
            user_err!("this lmgen was built without CUDA (cargo build --release --features cuda)")
        }
        U::NoDriver | U::NoLibrary(_) => {
            user_err!("--device {arg}: {e}; this binary also runs on CPUs with --device cpu")
        }
        U::Device { .. } => user_err!("--device {arg}: {}", one_line(&e.to_string())),
    })
}

/// The compute dtype for a placement ([`plan::compute_dtype`]): f32 on the CPU, where
/// f16/bf16 are accepted but computed in f32 (noted once on stderr); bf16 on GPUs by default.
pub fn compute_dtype(placement: &Placement, requested: Option<DTypeArg>) -> DType {
    let gpu = !placement.main_device().is_cpu();
    if let Some(d) = requested.filter(|&d| !gpu && d != DTypeArg::F32) {
        eprintln!(
            "lmgen: note: --dtype {} is computed as f32 on the CPU",
            d.name()
        );
    }
    plan::compute_dtype(requested.map(DTypeArg::dtype), gpu)
}

/// Placement and compute dtype of the model options.
pub fn placement_and_dtype(
    m: &ModelArgs,
    workload: Workload,
) -> anyhow::Result<(Placement, DType)> {
    let placement = parse_placement(&m.device, m.max_memory.as_deref(), workload)?;
    let dtype = compute_dtype(&placement, m.dtype);
    Ok((placement, dtype))
}

/// `mm:ss` or `h:mm:ss`.
pub fn hms(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "--:--".into();
    }
    let s = secs.round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
    } else {
        format!("{:02}:{:02}", s / 60, s % 60)
    }
}
