//! `lmgen bench` on a tiny synthetic model (a config written here): the table, the JSON
//! report, and usage errors.
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_lmgen");

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("RAYON_NUM_THREADS")
        .env_remove("LMGEN_MODELS")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn tiny_config(dir: &Path) -> String {
    let p = dir.join("config.json");
    std::fs::write(
        &p,
        r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "intermediate_size": 128, "vocab_size": 256, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": true}"#,
    )
    .unwrap();
    p.to_str().unwrap().to_string()
}

const SMALL: &[&str] = &[
    "--threads",
    "1",
    "--prompt-tokens",
    "8",
    "--decode-tokens",
    "3",
    "--batch-sizes",
    "1,2",
];

#[test]
fn bench_table_and_json_on_a_tiny_config() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config(dir.path());

    let mut args = vec!["bench", "--config", &cfg];
    args.extend_from_slice(SMALL);
    let o = run(&args);
    assert!(o.status.success(), "stderr: {}", text(&o.stderr));
    let out = text(&o.stdout);
    for needle in [
        "model ",
        "config.json (synthetic weights)",
        "params ",
        "weight bytes ",
        "load time ",
        "threads           1",
        "prefill           8 tokens:",
        "of GEMM peak",
        "vs bandwidth bound",
        "peak RSS ",
        "machine limits    read ",
        "GB/s (1 thread)",
        " GFLOP/s (",
    ] {
        assert!(out.contains(needle), "missing {needle:?} in:\n{out}");
    }
    // The GEMM peak names the kernel that reached it.
    assert!(
        out.contains("(candle matmul ") || out.contains("(lmgen gemm "),
        "{out}"
    );
    // One decode row per batch size; only batch 1 has a bandwidth ratio.
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("      ") && !l.trim().is_empty())
        .collect();
    assert_eq!(rows.len(), 2, "{out}");
    assert!(rows[0].trim_start().starts_with("1 ") && rows[0].contains("(bound "));
    assert!(rows[1].trim_start().starts_with("2 ") && !rows[1].contains("bound"));

    args.push("--json");
    let o = run(&args);
    assert!(o.status.success(), "stderr: {}", text(&o.stderr));
    let r: Value = serde_json::from_slice(&o.stdout).expect("--json prints one JSON object");
    // 2 × (q 64×64 + kv 2×32×64 + o 64×64 + mlp 3×64×128) + tied head 256×64
    let params = 2 * (64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 64 * 128) + 256 * 64;
    assert_eq!(r["params"], params, "{r}");
    assert_eq!(r["weight_bytes"], 4 * params);
    assert_eq!(r["prompt_tokens"], 8);
    assert_eq!(r["decode_context"], 16);
    assert_eq!(r["threads"], 1);
    for k in [
        "load_s",
        "prefill_tokens_per_s",
        "prefill_gflop_s",
        "prefill_gemm_ratio",
    ] {
        assert!(r[k].as_f64().unwrap() > 0.0, "{k}: {r}");
    }
    let d = r["decode"].as_array().unwrap();
    assert_eq!(d.len(), 2);
    assert_eq!(d[0]["batch"], 1);
    assert_eq!(d[1]["batch"], 2);
    assert!(d[0]["tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(d[0]["bandwidth_ratio"].as_f64().unwrap() > 0.0);
    assert!(d[1]["bandwidth_ratio"].is_null());
    assert!(r["peak_rss_bytes"].as_u64().unwrap() > 0);
    let l = &r["limits"];
    for k in ["read_gb_s", "read_gb_s_1thread", "gemm_gflop_s"] {
        assert!(l[k].as_f64().unwrap() > 0.0, "{k}: {l}");
    }
    assert_eq!(l["read_threads"], 1);
    assert_eq!(l["gemm_shape"].as_array().unwrap().len(), 3);
    let kernel = l["gemm_kernel"].as_str().unwrap();
    assert!(
        kernel == "candle matmul" || kernel.starts_with("lmgen gemm "),
        "{kernel}"
    );

    // Decode steps after a longer context (as `llama-bench -d`).
    args.pop();
    args.extend_from_slice(&["--context", "40"]);
    let o = run(&args);
    assert!(o.status.success(), "stderr: {}", text(&o.stderr));
    assert!(text(&o.stdout).contains("(after 40 tokens of context)"));
    args.push("--json");
    let r: Value = serde_json::from_slice(&run(&args).stdout).unwrap();
    assert_eq!(r["decode_context"], 40);
    assert!(r["decode"][0]["tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn bench_usage_errors_exit_2() {
    let o = run(&["bench", "--preset", "no-such-model"]);
    assert_eq!(o.status.code(), Some(2));
    let err = text(&o.stderr);
    assert!(
        err.contains("unknown preset 'no-such-model'") && err.contains("smollm2-135m"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    // None, or more than one, of MODEL / --preset / --config.
    for args in [
        vec!["bench"],
        vec!["bench", "some-model", "--preset", "gpt2"],
        vec!["bench", "--preset", "gpt2", "--config", "c.json"],
    ] {
        let o = run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(text(&o.stderr).contains("exactly one of"), "{args:?}");
    }

    let o = run(&["bench", "--config", "/no/such/config.json"]);
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["bench", "--preset", "gpt2", "--batch-sizes", "1,0"]);
    assert_eq!(o.status.code(), Some(2));
}
