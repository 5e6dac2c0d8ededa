//! `lmgen plan`: device placement and memory for a model, from its config alone.
use crate::args::{DTypeArg, PlanArgs};
use crate::user_err;
use lmgen_core::config::RawConfig;
use lmgen_core::families;
use lmgen_core::plan::{self, human, DeviceBudget, GpuSelection, PlanRequest, Workload};

pub fn plan(a: PlanArgs) -> anyhow::Result<()> {
    let (name, spec, location) = match (&a.model, &a.preset) {
        (Some(m), None) => {
            let location = lmgen_core::hub::resolve(m, a.models_file.as_deref())?;
            let spec = lmgen_core::loader::read_spec(&location)?;
            (m.clone(), spec, Some(location))
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
            (p.clone(), families::spec(f, &arch, &raw)?, None)
        }
        _ => return Err(user_err!("give exactly one of MODEL or --preset NAME")),
    };
    let devices = match &a.max_memory {
        Some(s) => plan::parse_max_memory(s).map_err(|e| user_err!("--max-memory: {e}"))?,
        None => detect_devices(&a.device)?,
    };
    let any_gpu = devices.iter().any(|d| d.name.starts_with("cuda"));
    if any_gpu && a.quantize.is_some() {
        return Err(user_err!(
            "--quantize runs on CPUs only; plan it for a CPU (--max-memory cpu=SIZE) or leave it out for GPUs"
        ));
    }
    let compute = plan::compute_dtype(a.dtype.map(DTypeArg::dtype), any_gpu);
    // The CPU keeps a checkpoint's f32 / bf16 / f16 matrices (and GGUF block formats) as
    // stored, computing in f32; GPUs hold them in the compute dtype.
    // Best effort: a directory with only its config.json is planned at the compute dtype.
    let stored = match (&location, any_gpu, a.quantize) {
        (Some(l), false, None) => lmgen_core::loader::stored_formats(l).unwrap_or_default(),
        _ => Default::default(),
    };
    let format = stored
        .matrices
        .unwrap_or_else(|| plan::weight_format(a.quantize, compute));
    let workload = Workload {
        batch: a.batch_size,
        context: Some(a.context),
        max_step_tokens: a.max_step_tokens,
        kv_bytes: a.kv_memory.map(|b| b as u64),
    };
    let mut req = PlanRequest::new(&spec, format, compute, &workload, devices);
    // A GGUF kept as stored keeps its embedding table in the table's own format.
    if stored.matrices.is_some() {
        req.embedding_format = stored.embedding.map(str::to_string);
    }
    let p = plan::plan(&spec, &req);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&p)?);
        return Ok(());
    }
    let (block, embed, head) = plan::param_counts(&spec);
    let params = block * spec.num_layers as u64 + embed + head;
    let kv = a
        .kv_memory
        .map_or(String::new(), |b| format!(", KV pool {}", human(b as u64)));
    println!(
        "{name}: {} ({} blocks, {:.2}e9 parameters), weights {format}, batch {}, context {} tokens{kv}",
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
    let d = device.trim().to_ascii_lowercase();
    let gpus = match d.as_str() {
        "cpu" => GpuSelection::None,
        "auto" | "cuda" | "gpu" => GpuSelection::All,
        _ => match d.strip_prefix("cuda:").and_then(|i| i.parse().ok()) {
            Some(i) => GpuSelection::One(i),
            None => {
                return Err(user_err!(
                    "--device: expected cpu, cuda, cuda:N or auto, got '{device}'"
                ))
            }
        },
    };
    let out = plan::detect_budgets(gpus);
    if gpus != GpuSelection::None && d != "auto" && !out.iter().any(|b| b.name.starts_with("cuda"))
    {
        return Err(user_err!("--device {device}: no GPU found (nvidia-smi); give --max-memory cuda:0=80GiB,... to plan for one"));
    }
    Ok(out)
}
