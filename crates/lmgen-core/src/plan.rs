//! `lmgen plan`: where a model's layers would go and how much memory each device needs,
//! from `config.json` alone (no weights read), in the spirit of accelerate's
//! `device_map="auto"`: embeddings and blocks fill the devices in order (GPUs first, then
//! CPU memory), each block with its share of the KV cache, and the head goes last.
//!
//! The same rule places the layers of a loaded model ([`Placement::Auto`], used by
//! [`crate::loader::load`]) and sizes the default KV pool ([`kv_budget_bytes`]).
use crate::config::{MlpKind, ModelSpec, Positions};
use crate::error::Error;
use crate::kernels::quant::QuantKind;
use candle_core::{DType, Device};
use std::cell::RefCell;

/// Tokens per engine step unless set otherwise (`Generator::max_step_tokens`).
pub const DEFAULT_MAX_STEP_TOKENS: usize = 2048;

/// Sequence length planned for when the run does not say (the model's trained context,
/// capped at this many tokens).
pub const DEFAULT_PLAN_CONTEXT: usize = 4096;

/// Bytes per parameter of a storage format (quantized formats include their scales).
pub fn bytes_per_param(format: &str) -> Option<f64> {
    Some(match format {
        "f32" => 4.0,
        "f16" | "bf16" => 2.0,
        "q8_0" => 34.0 / 32.0,
        "q4_k" => 144.0 / 256.0,
        "q4_0" => 18.0 / 32.0,
        "q4_1" => 20.0 / 32.0,
        "q6_k" => 210.0 / 256.0,
        _ => return None,
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceBudget {
    /// `cuda:0`, `cpu`, ...
    pub name: String,
    pub bytes: u64,
}

#[derive(Debug, Clone)]
pub struct PlanRequest {
    /// Storage of the large matrices (`f32`, `bf16`, `q8_0`, `q4_k`, ...).
    pub weight_format: String,
    /// Bytes per element of activations and KV cache.
    pub act_bytes: usize,
    pub batch: usize,
    /// Tokens per sequence (prompt + generation) the KV cache must hold.
    pub context: usize,
    /// Tokens processed per step (prefill chunk), for the activation estimate.
    pub step_tokens: usize,
    /// In placement order.
    pub devices: Vec<DeviceBudget>,
    /// Total KV cache bytes when fixed (a KV pool size); `None`: `batch` × `context` tokens.
    pub kv_bytes: Option<u64>,
    /// The format the embedding table is kept in where a file says (a quantized GGUF kept as
    /// it is); `None`: as the matrices for float formats, else dense at the compute precision
    /// (`--quantize` leaves the table dense).
    pub embedding_format: Option<String>,
}

/// What a run holds in memory beside the weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Sequences in flight.
    pub batch: usize,
    /// Tokens per sequence (prompt + generation); `None`: the model's trained context,
    /// at most [`DEFAULT_PLAN_CONTEXT`].
    pub context: Option<usize>,
    /// Most tokens processed in one step (bounds the activations).
    pub max_step_tokens: usize,
    /// Size of the KV pool when fixed; `None`: room for `batch` × `context` tokens.
    pub kv_bytes: Option<u64>,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            batch: 8,
            context: None,
            max_step_tokens: DEFAULT_MAX_STEP_TOKENS,
            kv_bytes: None,
        }
    }
}

impl PlanRequest {
    /// The request for a model whose large matrices are stored as `weight_format` and
    /// computed in `compute` (activations and KV cache at its size), on `devices`.
    pub fn new(
        spec: &ModelSpec,
        weight_format: &str,
        compute: DType,
        w: &Workload,
        devices: Vec<DeviceBudget>,
    ) -> Self {
        let batch = w.batch.max(1);
        let context = w
            .context
            .unwrap_or_else(|| spec.max_positions.min(DEFAULT_PLAN_CONTEXT))
            .max(1);
        Self {
            weight_format: weight_format.to_string(),
            act_bytes: compute.size_in_bytes(),
            batch,
            context,
            step_tokens: w.max_step_tokens.min(context * batch).max(1),
            devices,
            kv_bytes: w.kv_bytes,
            embedding_format: None,
        }
    }
}

/// The compute dtype: f32 on the CPU (f16/bf16 are computed as f32 there); on a GPU the
/// requested dtype, bf16 by default.
pub fn compute_dtype(requested: Option<DType>, gpu: bool) -> DType {
    match (gpu, requested) {
        (false, _) => DType::F32,
        (true, Some(d)) => d,
        (true, None) => DType::BF16,
    }
}

/// Storage format of the large matrices: the quantization if any, else the compute dtype.
pub fn weight_format(quantize: Option<QuantKind>, compute: DType) -> &'static str {
    match (quantize, compute) {
        (Some(q), _) => q.name(),
        (None, DType::F16) => "f16",
        (None, DType::BF16) => "bf16",
        (None, _) => "f32",
    }
}

/// Live activation bytes of one step: hidden states and fused projections of the step's
/// tokens at `act_bytes`, attention scores (f32) against `context` positions, f32 logits
/// of one row per sequence.
pub fn activation_bytes(
    s: &ModelSpec,
    act_bytes: usize,
    batch: usize,
    context: usize,
    step_tokens: usize,
) -> u64 {
    let t = step_tokens.max(batch) as u64;
    t * (4 * s.hidden_size as u64 + 3 * s.intermediate_size as u64) * act_bytes as u64
        + 4 * s.num_heads as u64 * t.min(context as u64) * context as u64
        + t.min(batch as u64) * s.vocab_size as u64 * 4
}

/// Share of the available memory [`kv_budget_bytes`] keeps free, in percent.
pub const KV_RESERVE_PERCENT: u64 = 10;

/// Bytes of KV cache that fit on a device with `available_bytes` of memory that also holds
/// `weight_bytes` of weights.
///
/// Reserved for everything else: [`KV_RESERVE_PERCENT`] % of `available_bytes` (allocator
/// slack, buffers) plus the activations of one [`DEFAULT_MAX_STEP_TOKENS`]-token step at
/// f32 against the model's context (capped at [`DEFAULT_PLAN_CONTEXT`]), as
/// [`activation_bytes`] estimates them. 0 when nothing is left.
pub fn kv_budget_bytes(spec: &ModelSpec, weight_bytes: u64, available_bytes: u64) -> usize {
    let context = spec.max_positions.clamp(1, DEFAULT_PLAN_CONTEXT);
    let reserve = available_bytes / 100 * KV_RESERVE_PERCENT
        + activation_bytes(spec, 4, 1, context, DEFAULT_MAX_STEP_TOKENS);
    let left = available_bytes.saturating_sub(weight_bytes.saturating_add(reserve));
    usize::try_from(left).unwrap_or(usize::MAX)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DevicePlan {
    pub device: String,
    pub budget: u64,
    /// Block indices `[first, last)` placed here.
    pub blocks: (usize, usize),
    pub embeddings: bool,
    pub head: bool,
    pub weight_bytes: u64,
    pub kv_bytes: u64,
    pub activation_bytes: u64,
}

impl DevicePlan {
    pub fn total(&self) -> u64 {
        self.weight_bytes + self.kv_bytes + self.activation_bytes
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    /// Storage format the matrices were planned in ("f32", "bf16", "q4_k", ...).
    pub weight_format: String,
    pub devices: Vec<DevicePlan>,
    pub fits: bool,
    pub total_weight_bytes: u64,
    pub total_kv_bytes: u64,
    /// What to do when it does not fit (or could fit better).
    pub advice: Vec<String>,
}

/// Parameter counts: (per block, embeddings incl. positions, head + final norm).
pub fn param_counts(s: &ModelSpec) -> (u64, u64, u64) {
    let e = s.hidden_size as u64;
    let (q, kv, inter) = (
        s.q_dim() as u64,
        s.kv_dim() as u64,
        s.intermediate_size as u64,
    );
    let mlp_in = if s.mlp == MlpKind::Gated {
        2 * inter
    } else {
        inter
    };
    let dense_mlp = e * mlp_in + inter * e + if s.mlp_bias { mlp_in + e } else { 0 };
    // Blocks with experts: all experts, the router and the shared expert (the largest block;
    // the few dense layers some MoE models have are counted as this too).
    let mlp = match &s.moe {
        Some(m) => {
            let (n, ei) = (m.experts as u64, m.expert_inter as u64);
            n * 3 * e * ei + n * e + m.shared_inter.map_or(0, |si| 3 * e * si as u64 + e)
        }
        None => dense_mlp,
    };
    let block = e * (q + 2 * kv) + q * e + mlp + 4 * e // matrices + norms
        + if s.qkv_bias { q + 2 * kv } else { 0 }
        + if s.out_bias { e } else { 0 };
    let mut embed = (s.vocab_size * s.embed_dim) as u64;
    if let Positions::Learned { table_size, .. } = s.positions {
        embed += (table_size * s.hidden_size) as u64;
    }
    if s.embed_dim != s.hidden_size {
        embed += (s.embed_dim * s.hidden_size) as u64;
    }
    let head = if s.tie_embeddings {
        0
    } else {
        (s.vocab_size * s.embed_dim) as u64
    } + 2 * e;
    (block, embed, head)
}

pub fn plan(s: &ModelSpec, r: &PlanRequest) -> Plan {
    let wb = bytes_per_param(&r.weight_format).unwrap_or(4.0);
    let (block_p, embed_p, head_p) = param_counts(s);
    let block_bytes = (block_p as f64 * wb) as u64;
    // Embeddings are gathered, not multiplied: a float format keeps them as it stores them
    // (the CPU keeps bf16 / f16 tables as stored), as does a quantized GGUF; `--quantize`
    // leaves them dense at the compute precision.
    let embed_bytes = match (r.embedding_format.as_deref(), r.weight_format.as_str()) {
        (Some(f), _) => (embed_p as f64 * bytes_per_param(f).unwrap_or(wb)) as u64,
        (None, "f32" | "bf16" | "f16") => (embed_p as f64 * wb) as u64,
        _ => embed_p * r.act_bytes as u64,
    };
    let head_bytes = (head_p as f64 * wb) as u64;
    let kv_per_block = match r.kv_bytes {
        Some(total) => total.div_ceil(s.num_layers.max(1) as u64),
        None => 2 * (s.kv_dim() * r.act_bytes * r.context * r.batch) as u64,
    };
    let act = activation_bytes(s, r.act_bytes, r.batch, r.context, r.step_tokens);

    let mut devices = Vec::new();
    let mut next = 0usize;
    let n = s.num_layers;
    for d in &r.devices {
        let mut p = DevicePlan {
            device: d.name.clone(),
            budget: d.bytes,
            blocks: (next, next),
            embeddings: devices.is_empty(),
            head: false,
            weight_bytes: if devices.is_empty() { embed_bytes } else { 0 },
            kv_bytes: 0,
            activation_bytes: act,
        };
        while next < n {
            // The head must follow the last block; reserve room for it when this block is the last.
            let extra = if next + 1 == n { head_bytes } else { 0 };
            if p.total() + block_bytes + kv_per_block + extra > d.bytes {
                break;
            }
            p.weight_bytes += block_bytes;
            p.kv_bytes += kv_per_block;
            next += 1;
        }
        p.blocks.1 = next;
        if next == n && !devices.iter().any(|x: &DevicePlan| x.head) {
            p.head = true;
            p.weight_bytes += head_bytes;
        }
        let used = p.blocks.1 > p.blocks.0 || p.embeddings || p.head;
        if used {
            devices.push(p);
        }
        if next == n {
            break;
        }
    }
    let fits = next == n && devices.iter().all(|d| d.total() <= d.budget);
    let total_weight_bytes = embed_bytes + head_bytes + block_bytes * n as u64;
    let total_kv_bytes = kv_per_block * n as u64;
    let mut advice = Vec::new();
    if !fits {
        let budget: u64 = r.devices.iter().map(|d| d.bytes).sum();
        advice.push(format!(
            "needs about {} for weights + {} KV cache + activations; the devices offer {}",
            human(total_weight_bytes),
            human(total_kv_bytes),
            human(budget)
        ));
        let params = (embed_p + head_p + block_p * n as u64) as f64;
        // Weight-only quantization runs on CPUs only.
        let cpu_only = r.devices.iter().all(|d| d.name == "cpu");
        for q in ["q8_0", "q4_k"].into_iter().filter(|_| cpu_only) {
            let need = params * bytes_per_param(q).unwrap_or(4.0) + total_kv_bytes as f64;
            if (need as u64) < budget && wb > bytes_per_param(q).unwrap_or(0.0) {
                advice.push(format!(
                    "--quantize {q} would need about {} and fit",
                    human(need as u64)
                ));
            }
        }
        if let Some(gpu) = r.devices.iter().find(|d| d.name.starts_with("cuda")) {
            let need = total_weight_bytes + total_kv_bytes + act;
            advice.push(format!(
                "or about {} GPUs of {}",
                need.div_ceil(gpu.bytes.max(1)),
                human(gpu.bytes)
            ));
        }
        if r.batch > 1 && r.kv_bytes.is_none() {
            advice.push(format!(
                "a smaller --batch-size shrinks the KV cache ({} per sequence)",
                human(total_kv_bytes / r.batch as u64)
            ));
        }
    }
    Plan {
        weight_format: r.weight_format.clone(),
        devices,
        fits,
        total_weight_bytes,
        total_kv_bytes,
        advice,
    }
}

pub fn human(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

/// Parse `cuda:0=70GiB,cpu=100GiB` (sizes as [`parse_size`] reads them).
pub fn parse_max_memory(s: &str) -> Result<Vec<DeviceBudget>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|part| {
            let (name, size) = part
                .split_once('=')
                .ok_or_else(|| format!("'{part}': expected DEVICE=SIZE"))?;
            let name = name.trim();
            if !(name == "cpu"
                || name == "cuda"
                || name
                    .strip_prefix("cuda:")
                    .is_some_and(|i| i.parse::<usize>().is_ok()))
            {
                return Err(format!("'{name}': expected cpu, cuda or cuda:N"));
            }
            Ok(DeviceBudget {
                name: name.to_string(),
                bytes: parse_size(size.trim())?,
            })
        })
        .collect()
}

/// A size in bytes: a number with an optional unit, `B`, `KB`/`MB`/`GB`/`TB` (powers of
/// 1000), `KiB`/`MiB`/`GiB`/`TiB` or `K`/`M`/`G`/`T` (powers of 1024), case-insensitive:
/// `512MiB`, `1.5G`, `300M`, `1000000`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let x: f64 = num
        .parse()
        .map_err(|_| format!("'{s}': expected a size like 70GiB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "kib" | "k" => 1024.0,
        "mb" => 1e6,
        "mib" | "m" => (1u64 << 20) as f64,
        "gb" => 1e9,
        "gib" | "g" => (1u64 << 30) as f64,
        "tb" => 1e12,
        "tib" | "t" => (1u64 << 40) as f64,
        u => return Err(format!("'{s}': unknown unit '{u}'")),
    };
    Ok((x * mult) as u64)
}

// ---------------------------------------------------------------------------------------
// Placement of a loaded model

/// Where the layers of a model go when it is loaded.
#[derive(Debug, Clone)]
pub enum Placement {
    /// Every layer on this device.
    Single(Device),
    /// Embeddings on `embeddings`, block `i` on `blocks[i]`, the head with the last block.
    Explicit {
        embeddings: Device,
        blocks: Vec<Device>,
    },
    /// On the first GPU when one is usable, spread over the `budgets` devices in order (as
    /// [`plan`] shows) when it alone is too small; else on the CPU.
    Auto {
        /// Devices and memory in placement order; `None`: [`detect_budgets`] (every GPU,
        /// then the CPU).
        budgets: Option<Vec<DeviceBudget>>,
        workload: Workload,
    },
}

impl Default for Placement {
    fn default() -> Self {
        Placement::Single(Device::Cpu)
    }
}

/// Devices resolved from a [`Placement`] for one model.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Device of the embeddings (and of every layer unless `blocks` is set).
    pub embeddings: Device,
    /// One device per block; `None`: all on `embeddings`.
    pub blocks: Option<Vec<Device>>,
    /// The plan behind a spread over several devices.
    pub plan: Option<Plan>,
}

impl Placement {
    /// The device computation starts on: the embeddings' device (for `Auto`, the first
    /// CUDA device when the build has CUDA and one is usable, else the CPU).
    pub fn main_device(&self) -> Device {
        match self {
            Placement::Single(d) => d.clone(),
            Placement::Explicit { embeddings, .. } => embeddings.clone(),
            Placement::Auto { .. } => auto_device(),
        }
    }

    /// The devices for `spec` with matrices stored as `weight_format` and computed in
    /// `compute`. `Auto` fails with [`Error::BadRequest`] when the model does not fit.
    pub fn resolve(
        &self,
        spec: &ModelSpec,
        weight_format: &str,
        compute: DType,
    ) -> Result<Layout, Error> {
        let single = |d: Device| Layout {
            embeddings: d,
            blocks: None,
            plan: None,
        };
        match self {
            Placement::Single(d) => Ok(single(d.clone())),
            Placement::Explicit { embeddings, blocks } => {
                if blocks.len() != spec.num_layers {
                    return Err(Error::BadRequest(format!(
                        "placement names {} devices for {} layers",
                        blocks.len(),
                        spec.num_layers
                    )));
                }
                Ok(Layout {
                    embeddings: embeddings.clone(),
                    blocks: Some(blocks.clone()),
                    plan: None,
                })
            }
            Placement::Auto { budgets, workload } => {
                let main = auto_device();
                if main.is_cpu() {
                    return Ok(single(main));
                }
                let budgets = match budgets {
                    Some(b) => b.clone(),
                    None => detect_budgets(GpuSelection::All),
                };
                if budgets.len() < 2 {
                    return Ok(single(main));
                }
                let req = PlanRequest::new(spec, weight_format, compute, workload, budgets);
                let p = plan(spec, &req);
                if !p.fits {
                    return Err(Error::BadRequest(format!(
                        "the model does not fit the devices: {} (see `lmgen plan`)",
                        p.advice.join("; ")
                    )));
                }
                if p.devices.len() == 1 {
                    return Ok(single(main));
                }
                let mut blocks = Vec::with_capacity(spec.num_layers);
                for d in &p.devices {
                    let dev = open_device(&d.device)?;
                    blocks.extend(std::iter::repeat_n(dev, d.blocks.1 - d.blocks.0));
                }
                Ok(Layout {
                    embeddings: open_device(&p.devices[0].device)?,
                    blocks: Some(blocks),
                    plan: Some(p),
                })
            }
        }
    }
}

thread_local! {
    /// CUDA devices opened so far on this thread: one handle per index, so that every layer
    /// placed on a GPU shares it.
    static CUDA_DEVICES: RefCell<Vec<(usize, Device)>> = const { RefCell::new(Vec::new()) };
}

/// CUDA device `i`, the same handle on every call from a thread. An error on a build
/// without CUDA, without a driver or CUDA libraries, or without that GPU.
pub fn cuda_device(i: usize) -> Result<Device, crate::device::CudaUnavailable> {
    CUDA_DEVICES.with(|open| {
        if let Some((_, d)) = open.borrow().iter().find(|(j, _)| *j == i) {
            return Ok(d.clone());
        }
        let d = crate::device::cuda(i)?;
        open.borrow_mut().push((i, d.clone()));
        Ok(d)
    })
}

/// The device of a budget name: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
pub fn open_device(name: &str) -> Result<Device, Error> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda_device(0).map_err(|e| Error::BadRequest(format!("{name}: {e}"))),
        _ => match name.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => cuda_device(i).map_err(|e| Error::BadRequest(format!("{name}: {e}"))),
            None => Err(Error::BadRequest(format!(
                "unknown device '{name}' (expected cpu, cuda or cuda:N)"
            ))),
        },
    }
}

/// The first CUDA device when the build has CUDA and one is usable, else the CPU.
pub fn auto_device() -> Device {
    cuda_device(0).unwrap_or(Device::Cpu)
}

/// Which GPUs [`detect_budgets`] lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuSelection {
    None,
    All,
    One(usize),
}

/// Free memory of the selected GPUs (from `nvidia-smi`; none when it is missing), then the
/// CPU's available memory (`MemAvailable` of `/proc/meminfo`), in placement order.
pub fn detect_budgets(gpus: GpuSelection) -> Vec<DeviceBudget> {
    let mut out = Vec::new();
    if gpus != GpuSelection::None {
        let smi = std::process::Command::new("nvidia-smi")
            .args([
                "--query-gpu=index,memory.free",
                "--format=csv,noheader,nounits",
            ])
            .output();
        if let Some(o) = smi.ok().filter(|o| o.status.success()) {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                let mut it = line.split(',').map(str::trim);
                if let (Some(i), Some(mib)) = (
                    it.next().and_then(|i| i.parse::<usize>().ok()),
                    it.next().and_then(|m| m.parse::<u64>().ok()),
                ) {
                    if gpus == GpuSelection::All || gpus == GpuSelection::One(i) {
                        out.push(DeviceBudget {
                            name: format!("cuda:{i}"),
                            bytes: mib << 20,
                        });
                    }
                }
            }
        }
    }
    out.push(DeviceBudget {
        name: "cpu".into(),
        bytes: crate::kv::available_memory().unwrap_or(0),
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;
    use crate::families;

    fn spec(name: &str) -> ModelSpec {
        let cfg = RawConfig::from_value(
            std::path::Path::new("x"),
            crate::bench::preset(name).unwrap(),
        );
        let (f, a) = families::detect(&cfg).unwrap();
        families::spec(f, &a, &cfg).unwrap()
    }

    fn req(format: &str, devices: &str) -> PlanRequest {
        PlanRequest {
            weight_format: format.into(),
            act_bytes: 2,
            batch: 4,
            context: 2048,
            step_tokens: 2048,
            devices: parse_max_memory(devices).unwrap(),
            kv_bytes: None,
            embedding_format: None,
        }
    }

    #[test]
    fn parameter_counts_match_known_models() {
        // Published sizes: galactica-6.7b (OPT-6.7b shape) ≈ 6.658e9, bloom-176b ≈ 176.2e9, gpt-neox-20b ≈ 20.55e9 parameters.
        for (name, want) in [
            ("galactica-6.7b", 6.658e9),
            ("bloom-176b", 176.25e9),
            ("gpt-neox-20b", 20.55e9),
            ("smollm2-135m", 0.1348e9),
            ("mixtral-8x7b", 46.70e9),
            ("gemma-2-9b", 9.242e9),
            ("falcon-40b", 41.84e9),
            ("phi-3-medium", 13.96e9),
        ] {
            let s = spec(name);
            let (b, e, h) = param_counts(&s);
            let total = (b * s.num_layers as u64 + e + h) as f64;
            assert!(
                (total / want - 1.0).abs() < 0.01,
                "{name}: {total:.4e} vs {want:.4e}"
            );
        }
    }

    #[test]
    fn galactica_fits_one_h100_and_bloom_needs_more_or_4bit() {
        let p = plan(&spec("galactica-6.7b"), &req("bf16", "cuda:0=78GiB"));
        assert!(p.fits && p.devices.len() == 1 && p.devices[0].head && p.devices[0].embeddings);
        let p = plan(&spec("bloom-176b"), &req("bf16", "cuda:0=139GiB"));
        assert!(!p.fits);
        // --quantize is for CPUs: not advised for a GPU.
        assert!(
            !p.advice.iter().any(|a| a.contains("--quantize"))
                && p.advice.iter().any(|a| a.contains("GPUs of")),
            "{:?}",
            p.advice
        );
        let p = plan(&spec("bloom-176b"), &req("f32", "cpu=180GiB"));
        assert!(
            p.advice.iter().any(|a| a.contains("--quantize q4_k")),
            "{:?}",
            p.advice
        );
        let p = plan(&spec("bloom-176b"), &req("q4_k", "cuda:0=139GiB"));
        assert!(p.fits, "{p:?}");
    }

    #[test]
    fn layers_spill_over_devices_in_order() {
        let p = plan(
            &spec("opt-30b"),
            &req("bf16", "cuda:0=24GiB,cuda:1=24GiB,cpu=100GiB"),
        );
        assert!(p.fits);
        assert_eq!(p.devices[0].blocks.0, 0);
        for w in p.devices.windows(2) {
            assert_eq!(w[0].blocks.1, w[1].blocks.0, "contiguous");
        }
        assert_eq!(p.devices.last().unwrap().blocks.1, 48);
        assert!(p.devices.iter().all(|d| d.total() <= d.budget));
        assert_eq!(p.devices.iter().filter(|d| d.head).count(), 1);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("70GiB").unwrap(), 70 << 30);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5G").unwrap(), 3 << 29);
        assert_eq!(parse_size("300M").unwrap(), 300 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(
            parse_size("-1").is_err() && parse_size("").is_err() && parse_size("1.2.3G").is_err()
        );
        assert!(parse_max_memory("gpu0=1GB").is_err());
        assert!(parse_size("12 parsecs").is_err());
    }

    #[test]
    fn kv_budget_leaves_the_reserve_and_the_weights() {
        let s = spec("galactica-6.7b");
        let w = 13u64 << 30;
        let avail = 139u64 << 30;
        let kv = kv_budget_bytes(&s, w, avail) as u64;
        let act = activation_bytes(&s, 4, 1, 2048, DEFAULT_MAX_STEP_TOKENS);
        assert_eq!(kv, avail - w - avail / 100 * KV_RESERVE_PERCENT - act);
        // About 110 GiB for the KV pool of a 6.7B model on one H200.
        assert!((100u64 << 30..120u64 << 30).contains(&kv), "{kv}");
        // More weights, less KV; nothing left is 0, not an underflow.
        assert_eq!(
            kv - kv_budget_bytes(&s, w + (1 << 30), avail) as u64,
            1 << 30
        );
        assert_eq!(kv_budget_bytes(&s, 200 << 30, avail), 0);
        assert_eq!(kv_budget_bytes(&s, 0, 0), 0);
    }

    #[test]
    fn one_rule_for_requests() {
        let s = spec("galactica-6.7b");
        let w = Workload::default();
        let r = PlanRequest::new(&s, "bf16", DType::BF16, &w, vec![]);
        assert_eq!(
            (r.act_bytes, r.batch, r.context, r.step_tokens),
            (2, 8, 2048, 2048)
        );
        let w = Workload {
            batch: 2,
            context: Some(100),
            max_step_tokens: 4096,
            kv_bytes: Some(1 << 30),
        };
        let r = PlanRequest::new(
            &s,
            "f32",
            DType::F32,
            &w,
            parse_max_memory("cpu=1TiB").unwrap(),
        );
        assert_eq!((r.act_bytes, r.context, r.step_tokens), (4, 100, 200));
        let p = plan(&s, &r);
        assert!(p.fits);
        assert!(
            p.total_kv_bytes >= 1 << 30 && p.total_kv_bytes < (1 << 30) + 64,
            "{}",
            p.total_kv_bytes
        );
        assert_eq!(compute_dtype(Some(DType::BF16), false), DType::F32);
        assert_eq!(compute_dtype(None, true), DType::BF16);
        assert_eq!(compute_dtype(Some(DType::F16), true), DType::F16);
        assert_eq!(weight_format(Some(QuantKind::Q4K), DType::F32), "q4_k");
        assert_eq!(weight_format(None, DType::BF16), "bf16");
    }

    #[test]
    fn placements_resolve() {
        let s = spec("smollm2-135m");
        let l = Placement::default().resolve(&s, "f32", DType::F32).unwrap();
        assert!(l.embeddings.is_cpu() && l.blocks.is_none() && l.plan.is_none());
        let bad = Placement::Explicit {
            embeddings: Device::Cpu,
            blocks: vec![Device::Cpu; 3],
        };
        assert!(matches!(
            bad.resolve(&s, "f32", DType::F32),
            Err(Error::BadRequest(_))
        ));
        let ok = Placement::Explicit {
            embeddings: Device::Cpu,
            blocks: vec![Device::Cpu; s.num_layers],
        };
        assert_eq!(
            ok.resolve(&s, "f32", DType::F32)
                .unwrap()
                .blocks
                .unwrap()
                .len(),
            s.num_layers
        );
        if !cfg!(feature = "cuda") {
            // Without CUDA, auto is the CPU whatever the budgets say.
            let auto = Placement::Auto {
                budgets: Some(parse_max_memory("cuda:0=1GiB,cpu=1GiB").unwrap()),
                workload: Workload::default(),
            };
            assert!(auto.main_device().is_cpu());
            let l = auto.resolve(&s, "f32", DType::F32).unwrap();
            assert!(l.embeddings.is_cpu() && l.blocks.is_none());
        }
        assert!(open_device("cpu").unwrap().is_cpu());
        assert!(open_device("tpu:0").is_err());
    }
}
