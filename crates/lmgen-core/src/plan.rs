//! `lmgen plan`: where a model's layers would go and how much memory each device needs,
//! from `config.json` alone (no weights read), in the spirit of accelerate's
//! `device_map="auto"`: embeddings and blocks fill the devices in order (GPUs first, then
//! CPU memory), each block with its share of the KV cache, and the head goes last.
use crate::config::{MlpKind, ModelSpec, Positions};

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

#[derive(Debug, Clone)]
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
    let block = e * (q + 2 * kv) + q * e + e * mlp_in + inter * e + 4 * e // matrices + norms
        + if s.qkv_bias { q + 2 * kv } else { 0 }
        + if s.out_bias { e } else { 0 }
        + if s.mlp_bias { mlp_in + e } else { 0 };
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
    // Embeddings are gathered, not multiplied: they stay dense at the compute precision.
    let embed_bytes = embed_p * r.act_bytes as u64;
    let head_bytes = (head_p as f64 * wb) as u64;
    let kv_per_block = 2 * (s.kv_dim() * r.act_bytes * r.context * r.batch) as u64;
    // Live activations of one step: hidden states, fused projections, attention scores (f32).
    let t = r.step_tokens.max(r.batch) as u64;
    let act = t * (4 * s.hidden_size as u64 + 3 * s.intermediate_size as u64) * r.act_bytes as u64
        + 4 * s.num_heads as u64 * t.min(r.context as u64) * r.context as u64
        + t.min(r.batch as u64) * s.vocab_size as u64 * 4;

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
        for q in ["q8_0", "q4_k"] {
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
        if r.batch > 1 {
            advice.push(format!(
                "a smaller --batch-size shrinks the KV cache ({} per sequence)",
                human(total_kv_bytes / r.batch as u64)
            ));
        }
    }
    Plan {
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

/// Parse `cuda:0=70GiB,cpu=100GiB` (units: B, KB/KiB, MB/MiB, GB/GiB, TB/TiB).
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

pub fn parse_size(s: &str) -> Result<u64, String> {
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
        "kib" => 1024.0,
        "mb" => 1e6,
        "mib" => (1u64 << 20) as f64,
        "gb" => 1e9,
        "gib" | "g" => (1u64 << 30) as f64,
        "tb" => 1e12,
        "tib" => (1u64 << 40) as f64,
        u => return Err(format!("'{s}': unknown unit '{u}'")),
    };
    Ok((x * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RawConfig;
    use crate::model::families;

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
        assert!(parse_max_memory("gpu0=1GB").is_err());
        assert!(parse_size("12 parsecs").is_err());
    }
}
