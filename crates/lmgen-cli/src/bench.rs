//! `lmgen bench`: engine speed on a real or synthetic model next to the machine's limits.
use crate::args::BenchArgs;
use crate::args::DTypeArg;
use crate::user_err;
use crate::util::{default_threads, io_msg};
use lmgen_core::bench::{self, BenchOptions, BenchReport, PRESETS};
use lmgen_core::loader::{load, LoadOptions};
use lmgen_core::plan::Workload;
use std::fmt::Write as _;
use std::time::Instant;

/// The thread count in force: `--threads`, else what `configure_threads` left in
/// `$RAYON_NUM_THREADS`, else the default.
fn threads_in_force(a: &BenchArgs) -> usize {
    a.threads.map(|n| n as usize).unwrap_or_else(|| {
        std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(default_threads)
    })
}

pub fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let given = [a.model.is_some(), a.preset.is_some(), a.config.is_some()];
    if given.iter().filter(|&&g| g).count() != 1 {
        return Err(user_err!(
            "bench: give exactly one of MODEL, --preset NAME or --config FILE (presets: {})",
            PRESETS.join(", ")
        ));
    }
    let max_batch = a.batch_sizes.iter().copied().max().unwrap_or(1);
    let placement = crate::util::parse_placement(
        &a.device,
        None,
        Workload {
            batch: max_batch,
            context: Some(a.prompt_tokens.max(a.context + a.decode_tokens)),
            max_step_tokens: a.prompt_tokens.max(max_batch),
            kv_bytes: None,
        },
    )?;
    let device = placement.main_device();
    let dtype = lmgen_core::plan::compute_dtype(a.dtype.map(DTypeArg::dtype), !device.is_cpu());
    let opts = BenchOptions {
        prompt_tokens: a.prompt_tokens,
        decode_tokens: a.decode_tokens,
        context: a.context,
        batch_sizes: a.batch_sizes.clone(),
        threads: threads_in_force(&a),
        device: device.clone(),
        dtype,
        alloc_counter: Some(crate::alloc::allocations),
    };
    let (report, kind) = if let Some(name) = &a.preset {
        let Some(config) = bench::preset(name) else {
            return Err(user_err!(
                "bench: unknown preset '{name}' (presets: {})",
                PRESETS.join(", ")
            ));
        };
        (bench::run(name, config, &opts)?, "synthetic weights")
    } else if let Some(path) = &a.config {
        let text = std::fs::read_to_string(path)
            .map_err(|e| user_err!("{}: {}", path.display(), io_msg(&e)))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| user_err!("{}: not valid JSON: {e}", path.display()))?;
        (
            bench::run(&path.display().to_string(), config, &opts)?,
            "synthetic weights",
        )
    } else {
        let name = a.model.as_deref().unwrap_or_default();
        let t = Instant::now();
        let location = lmgen_core::hub::resolve(name, a.models_file.as_deref())?;
        let model = load(
            &location,
            &LoadOptions {
                placement,
                dtype,
                map_weights: a.mmap == crate::args::MmapArg::Always,
                ..Default::default()
            },
        )?;
        let load_s = t.elapsed().as_secs_f64();
        if let Some(ctx) = model.hard_limit() {
            let need = a.prompt_tokens.max(a.context + a.decode_tokens);
            if need > ctx {
                return Err(user_err!(
                    "bench: {name} has a context of {ctx} tokens; --prompt-tokens and --context + --decode-tokens must fit it"
                ));
            }
        }
        (
            bench::run_decoder(name, &model.decoder, load_s, &opts)?,
            "checkpoint weights",
        )
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report, kind));
    }
    Ok(())
}

fn si(x: f64, unit: &str) -> String {
    let (v, p) = if x >= 1e12 {
        (x / 1e12, "T")
    } else if x >= 1e9 {
        (x / 1e9, "G")
    } else if x >= 1e6 {
        (x / 1e6, "M")
    } else if x >= 1e3 {
        (x / 1e3, "k")
    } else {
        (x, "")
    };
    format!("{v:.2} {p}{unit}")
}

/// The human-readable report.
pub fn table(r: &BenchReport, kind: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "model             {} ({kind})", r.model);
    let _ = writeln!(s, "params            {}", si(r.params as f64, ""));
    let _ = writeln!(
        s,
        "weight bytes      {} ({} on {})",
        si(r.weight_bytes as f64, "B"),
        r.dtype,
        r.device
    );
    let _ = writeln!(s, "load time         {:.2} s", r.load_s);
    let _ = writeln!(s, "threads           {}", r.threads);
    let peak = r
        .prefill_gemm_ratio
        .map_or(String::new(), |x| format!(" = {x:.2} of GEMM peak"));
    let _ = writeln!(
        s,
        "prefill           {} tokens: {:.1} tok/s, {:.1} GFLOP/s{peak}",
        r.prompt_tokens, r.prefill_tokens_per_s, r.prefill_gflop_s
    );
    let _ = writeln!(
        s,
        "decode            batch      tok/s   vs bandwidth bound   (after {} tokens of context)",
        r.decode_context
    );
    for d in &r.decode {
        let ratio = match d.bandwidth_ratio {
            Some(x) => format!(
                "{x:.2} (bound {:.1} tok/s)",
                d.tokens_per_s / x.max(f64::MIN_POSITIVE)
            ),
            None => String::new(),
        };
        let allocs = match (d.allocations_first_step, d.allocations_last_step) {
            (Some(a), Some(b)) => format!("   allocations/step {a} first, {b} last"),
            _ => String::new(),
        };
        let row = format!(
            "                  {:>5} {:>10.1}   {ratio}{allocs}",
            d.batch, d.tokens_per_s
        );
        let _ = writeln!(s, "{}", row.trim_end());
    }
    let rss = r
        .peak_rss_bytes
        .map_or("unknown".to_string(), |b| si(b as f64, "B"));
    let _ = writeln!(s, "peak RSS          {rss}");
    let Some(l) = &r.limits else { return s };
    let read = if l.read_threads > 1 {
        format!(
            "{:.1} GB/s ({} threads), {:.1} GB/s (1 thread)",
            l.read_gb_s, l.read_threads, l.read_gb_s_1thread
        )
    } else {
        format!("{:.1} GB/s (1 thread)", l.read_gb_s)
    };
    let read = if l.read_huge_pages {
        format!("{read}, huge pages")
    } else {
        read
    };
    let [m, k, n] = l.gemm_shape;
    let _ = writeln!(
        s,
        "machine limits    read {read}; f32 GEMM {:.1} GFLOP/s ({} {m}x{k}x{n})",
        l.gemm_gflop_s, l.gemm_kernel
    );
    s
}
