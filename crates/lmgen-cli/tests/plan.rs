//! `lmgen plan` from a config alone.
use std::process::Command;

fn plan(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_lmgen"))
        .arg("plan")
        .args(args)
        .output()
        .unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

#[test]
fn bloom_176b_needs_gpus_or_4bit_on_a_cpu() {
    let (code, out, _) = plan(&["--preset", "bloom-176b", "--max-memory", "cuda:0=139GiB"]);
    assert_eq!(code, 0);
    // --quantize runs on CPUs only: not advised for a GPU, and refused there.
    assert!(
        out.contains("fits: no") && out.contains("GPUs of") && !out.contains("--quantize"),
        "{out}"
    );
    let (code, _, err) = plan(&[
        "--preset",
        "bloom-176b",
        "--max-memory",
        "cuda:0=139GiB",
        "--quantize",
        "q4_k",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--quantize runs on CPUs only"), "{err}");
    let (code, out, _) = plan(&["--preset", "bloom-176b", "--max-memory", "cpu=180GiB"]);
    assert_eq!(code, 0);
    assert!(out.contains("--quantize q4_k would need"), "{out}");
    let (code, out, _) = plan(&[
        "--preset",
        "bloom-176b",
        "--max-memory",
        "cpu=180GiB",
        "--quantize",
        "q4_k",
        "--json",
    ]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["fits"], true);
    assert_eq!(v["devices"][0]["blocks"], serde_json::json!([0, 70]));
}

#[test]
fn layers_spill_from_gpus_to_cpu_and_a_model_dir_needs_only_its_config() {
    let (code, out, _) = plan(&[
        "--preset",
        "opt-30b",
        "--max-memory",
        "cuda:0=24GiB,cuda:1=24GiB,cpu=100GiB",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("cuda:1")
            && out.contains("cpu")
            && out.contains("+head")
            && out.contains("fits: yes"),
        "{out}"
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/llama/config.json"
    );
    std::fs::copy(cfg, dir.path().join("config.json")).unwrap();
    let (code, out, err) = plan(&[dir.path().to_str().unwrap(), "--device", "cpu"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("LlamaForCausalLM")
            && out.contains("fits: yes")
            && out.contains("weights f32"),
        "{out}"
    );
}

/// On the CPU, matrices are planned as the checkpoint stores them (a bf16 checkpoint is kept
/// in bf16, a GGUF in its block format); with a GPU, in the compute dtype.
#[test]
fn cpu_plans_weights_as_stored() {
    let fx = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");
    let bytes = |model: &str, device: &[&str]| -> (String, u64) {
        let mut a = vec![model, "--json"];
        a.extend_from_slice(device);
        let (code, out, err) = plan(&a);
        assert_eq!(code, 0, "{model}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let w = v["devices"][0]["weight_bytes"].as_u64().unwrap();
        (
            v["weight_format"].as_str().unwrap_or_default().to_string(),
            w,
        )
    };
    let qwen2 = format!("{fx}/qwen2");
    let gguf = format!("{fx}/gguf/falcon.q8_0.gguf");
    let (f, cpu) = bytes(&qwen2, &["--device", "cpu"]);
    assert_eq!(f, "bf16");
    let (f, gpu) = bytes(&qwen2, &["--max-memory", "cuda:0=10GiB", "--dtype", "f32"]);
    assert_eq!(f, "f32");
    assert_eq!(2 * cpu, gpu, "bf16 on the CPU is half of f32");
    let (f, q8) = bytes(&gguf, &["--device", "cpu"]);
    assert_eq!(f, "q8_0");
    // Matrices and the embedding table at Q8_0's 34 bytes per 32 values: about a quarter of f32.
    let (_, f32_bytes) = bytes(&gguf, &["--max-memory", "cuda:0=10GiB", "--dtype", "f32"]);
    assert!(
        q8 * 3 < f32_bytes && q8 * 5 > f32_bytes,
        "{q8} vs {f32_bytes}"
    );
}

#[test]
fn bad_plan_arguments_exit_2() {
    for args in [
        &["--preset", "nope"][..],
        &["--preset", "gpt2", "--max-memory", "gpu=1GB"],
        &["--preset", "gpt2", "--quantize", "q3_x"],
    ] {
        let (code, _, err) = plan(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}

#[test]
fn kv_memory_and_step_tokens_size_the_plan() {
    let json = |extra: &[&str]| -> serde_json::Value {
        let mut a = vec![
            "--preset",
            "opt-30b",
            "--max-memory",
            "cuda:0=80GiB",
            "--json",
        ];
        a.extend_from_slice(extra);
        let (code, out, err) = plan(&a);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).unwrap()
    };
    let base = json(&[]);
    let pool = json(&["--kv-memory", "1GiB"]);
    let kv = pool["total_kv_bytes"].as_u64().unwrap();
    assert!((1u64 << 30..(1u64 << 30) + 48).contains(&kv), "{kv}");
    assert_ne!(base["total_kv_bytes"], pool["total_kv_bytes"]);
    let act = |v: &serde_json::Value| v["devices"][0]["activation_bytes"].as_u64().unwrap();
    assert!(act(&json(&["--max-step-tokens", "256"])) < act(&base));
    let (code, _, err) = plan(&["--preset", "gpt2", "--kv-memory", "much"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--kv-memory"), "{err}");
    let (code, _, err) = plan(&["--preset", "gpt2", "--device", "tpu"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--device"), "{err}");
}
