//! `lmgen plan`: device placement and memory for a model, from its config alone.
use crate::args::PlanArgs;
use crate::user_err;
use lmgen_core::config::RawConfig;
use lmgen_core::model::families;
use lmgen_core::plan::{self, human, DeviceBudget, PlanRequest};

pub fn plan(a: PlanArgs) -> anyhow::Result<()> {
    let (name, spec) = match (&a.model, &a.preset) {
        (Some(m), None) => {
            let location = lmgen_core::hub::resolve(m, a.models_file.as_deref())?;
            (m.clone(), lmgen_core::loader::read_spec(&location)?)
        }
        (None, Some(p)) => {
            let cfg = lmgen_core::bench::preset(p).ok_or_else(|| {
                user_err!(
                    "unknown preset '{p}' (presets: {})",
                    lmgen_core::bench::PRESETS.join(", ")
                )
            })?;
            let raw = RawConfig::from_value(std::path::Path::new(p), cfg);
            let (f, arch) = families::detect(&raw)?;
            (p.clone(), families::spec(f, &arch, &raw)?)
        }
        _ => return Err(user_err!("give exactly one of MODEL or --preset NAME")),
    };
    let devices = match &a.max_memory {
        Some(s) => plan::parse_max_memory(s).map_err(|e| user_err!("--max-memory: {e}"))?,
        None => detect_devices(&a.device)?,
    };
    let any_gpu = devices.iter().any(|d| d.name.starts_with("cuda"));
    let format = match (&a.quantize, &a.dtype) {
        (Some(q), _) => q.clone(),
        (None, Some(d)) => d.clone(),
        (None, None) => if any_gpu { "bf16" } else { "f32" }.to_string(),
    };
    if plan::bytes_per_param(&format).is_none() {
        return Err(user_err!(
            "unknown weight format '{format}' (f32, bf16, f16, q8_0, q4_k, q4_0, q4_1, q6_k)"
        ));
    }
    let act_bytes = if format == "f32" || !any_gpu { 4 } else { 2 };
    let req = PlanRequest {
        weight_format: format.clone(),
        act_bytes,
        batch: a.batch_size,
        context: a.context,
        step_tokens: 2048.min(a.context * a.batch_size),
        devices,
    };
    let p = plan::plan(&spec, &req);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    let (block, embed, head) = plan::param_counts(&spec);
    let params = block * spec.num_layers as u64 + embed + head;
    println!(
        "{name}: {} ({} blocks, {:.2}e9 parameters), weights {format}, batch {}, context {} tokens",
        spec.architecture,
        spec.num_layers,
        params as f64 / 1e9,
        a.batch_size,
        a.context
    );
    println!(
        "{:<8} {:<22} {:>11} {:>11} {:>12} {:>11} {:>11}",
        "device", "holds", "weights", "KV cache", "activations", "total", "budget"
    );
    for d in &p.devices {
        let mut holds = if d.blocks.1 > d.blocks.0 {
            format!("blocks {}-{}", d.blocks.0, d.blocks.1 - 1)
        } else {
            "-".into()
        };
        if d.embeddings {
            holds.push_str(" +emb");
        }
        if d.head {
            holds.push_str(" +head");
        }
        println!(
            "{:<8} {:<22} {:>11} {:>11} {:>12} {:>11} {:>11}",
            d.device,
            holds,
            human(d.weight_bytes),
            human(d.kv_bytes),
            human(d.activation_bytes),
            human(d.total()),
            human(d.budget)
        );
    }
    println!("fits: {}", if p.fits { "yes" } else { "no" });
    for line in &p.advice {
        println!("  {line}");
    }
    Ok(())
}

/// GPUs (free memory from nvidia-smi) for `auto`/`cuda*`, then the CPU's available memory.
fn detect_devices(device: &str) -> anyhow::Result<Vec<DeviceBudget>> {
    let mut out = Vec::new();
    if device != "cpu" {
        let smi = std::process::Command::new("nvidia-smi")
            .args([
                "--query-gpu=index,memory.free",
                "--format=csv,noheader,nounits",
            ])
            .output();
        if let Some(o) = smi.ok().filter(|o| o.status.success()) {
            for line in String::from_utf8_lossy(&o.stdout).lines() {
                let mut it = line.split(',').map(str::trim);
                if let (Some(i), Some(mib)) =
                    (it.next(), it.next().and_then(|m| m.parse::<u64>().ok()))
                {
                    let name = format!("cuda:{i}");
                    if device == "auto" || device == "cuda" || device == name {
                        out.push(DeviceBudget {
                            name,
                            bytes: mib << 20,
                        });
                    }
                }
            }
        }
        if out.is_empty() && device != "auto" {
            return Err(user_err!("--device {device}: no GPU found (nvidia-smi); give --max-memory cuda:0=80GiB,... to plan for one"));
        }
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let avail_kb = meminfo
        .lines()
        .find(|l| l.starts_with("MemAvailable:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .unwrap_or(0);
    out.push(DeviceBudget {
        name: "cpu".into(),
        bytes: avail_kb * 1024,
    });
    Ok(out)
}

/// Layer placement for `--device auto` when the model does not fit on the first GPU alone:
/// the embedding device and one device per block, following [`plan::plan`]. `None` when the
/// first GPU holds everything (or there is nothing to spread over).
pub fn auto_placement(
    location: &lmgen_core::hub::ModelLocation,
    m: &crate::args::ModelArgs,
    dtype: candle_core::DType,
) -> anyhow::Result<Option<(candle_core::Device, Option<Vec<candle_core::Device>>)>> {
    use candle_core::Device;
    let spec = lmgen_core::loader::read_spec(location)?;
    let devices = match &m.max_memory {
        Some(s) => plan::parse_max_memory(s).map_err(|e| user_err!("--max-memory: {e}"))?,
        None => detect_devices("auto")?,
    };
    if devices.len() < 2 {
        return Ok(None);
    }
    let format = match (m.quantize, dtype) {
        (Some(q), _) => q.name().to_string(),
        (None, candle_core::DType::F32) => "f32".to_string(),
        (None, _) => "bf16".to_string(),
    };
    let req = PlanRequest {
        weight_format: format,
        act_bytes: dtype.size_in_bytes(),
        batch: 8,
        context: spec.max_positions.min(4096),
        step_tokens: 2048,
        devices,
    };
    let p = plan::plan(&spec, &req);
    if !p.fits {
        return Err(user_err!(
            "the model does not fit the devices: {} (see `lmgen plan`)",
            p.advice.join("; ")
        ));
    }
    if p.devices.len() == 1 {
        return Ok(None);
    }
    let open = |name: &str| -> anyhow::Result<Device> {
        Ok(match name.strip_prefix("cuda:") {
            Some(i) => crate::util::open_cuda(name, i.parse()?)?,
            None if name == "cuda" => crate::util::open_cuda(name, 0)?,
            None => Device::Cpu,
        })
    };
    let mut blocks = Vec::with_capacity(spec.num_layers);
    for d in &p.devices {
        let dev = open(&d.device)?;
        blocks.extend(std::iter::repeat_n(dev, d.blocks.1 - d.blocks.0));
    }
    eprintln!(
        "lmgen: placing layers: {}",
        p.devices
            .iter()
            .map(|d| format!(
                "{} {}-{}",
                d.device,
                d.blocks.0,
                d.blocks.1.saturating_sub(1)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Some((open(&p.devices[0].device)?, Some(blocks))))
}
