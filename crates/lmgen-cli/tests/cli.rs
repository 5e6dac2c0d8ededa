//! End-to-end tests of the `lmgen` binary on the tiny fixture models (tests/fixtures).
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_lmgen");

fn fixtures() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    if root.join("models").is_dir() {
        root.join("models")
    } else {
        root
    }
}

fn model(name: &str) -> &'static str {
    Box::leak(
        fixtures()
            .join(name)
            .to_str()
            .unwrap()
            .to_string()
            .into_boxed_str(),
    )
}

fn golden(name: &str) -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../../tests/fixtures/golden/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn prompts(g: &Value) -> Vec<String> {
    g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["text"].as_str().unwrap().to_string())
        .collect()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn run_with_stdin(args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env("RAYON_NUM_THREADS", "1")
        .env_remove("LMGEN_MODELS");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(s) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn run(args: &[&str]) -> Output {
    run_with_stdin(args, None)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[track_caller]
fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "lmgen failed ({:?}): {}",
        o.status.code(),
        stderr(o)
    );
}

/// Exit code 2 and exactly one `lmgen: error:` line on stderr containing every `needles`.
#[track_caller]
fn usage_error(o: &Output, needles: &[&str]) -> String {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "expected exit 2, stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one stderr line, got: {err}");
    assert!(lines[0].starts_with("lmgen: error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "'{n}' not in: {err}");
    }
    lines[0].to_string()
}

fn read_jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A JSONL input with the golden prompts (ids "p0".."p3").
fn golden_input(dir: &Path, g: &Value) -> PathBuf {
    let p = dir.join("in.jsonl");
    let lines: Vec<String> = prompts(g)
        .iter()
        .enumerate()
        .map(|(i, t)| serde_json::json!({"id": format!("p{i}"), "prompt": t}).to_string())
        .collect();
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ---------------------------------------------------------------------------------------

#[test]
fn greedy_jsonl_matches_golden_in_order() {
    for name in ["gpt2", "llama", "opt"] {
        let g = golden(name);
        let dir = tempfile::tempdir().unwrap();
        let inp = golden_input(dir.path(), &g);
        // Also one prompt given as input_ids: same result as the text.
        let first_ids = &g["prompts"][0]["input_ids"];
        let mut text = std::fs::read_to_string(&inp).unwrap();
        text.push_str(&serde_json::json!({"input_ids": first_ids}).to_string());
        text.push('\n');
        std::fs::write(&inp, text).unwrap();
        let out = dir.path().join("out.jsonl");
        let o = run(&[
            "generate",
            model(name),
            "--input",
            s(&inp),
            "--output",
            s(&out),
            "--temperature",
            "0",
            "--max-new-tokens",
            "10",
            "--batch-size",
            "2",
        ]);
        ok(&o);
        let recs = read_jsonl(&out);
        assert_eq!(recs.len(), 5, "{name}");
        for (i, r) in recs.iter().enumerate() {
            let gi = if i == 4 { 0 } else { i };
            let gp = &g["prompts"][gi];
            let want_id = if i == 4 {
                Value::from(4)
            } else {
                Value::from(format!("p{i}"))
            };
            assert_eq!(r["id"], want_id, "{name}: records out of order");
            assert_eq!(
                ids(&r["token_ids"]),
                ids(&gp["greedy"]["token_ids"]),
                "{name} prompt {i}"
            );
            assert_eq!(
                r["finish_reason"], gp["greedy"]["finish_reason"],
                "{name} prompt {i}"
            );
            assert!(r.get("logprobs").is_none() && r.get("sample").is_none());
            if i < 4 {
                assert_eq!(r["prompt"], gp["text"]);
            }
            assert!(r["text"].is_string());
        }
        assert_eq!(recs[4]["text"], recs[0]["text"], "{name}: input_ids prompt");
        assert!(o.stdout.is_empty(), "nothing on stdout when writing a file");
    }
}

/// `--mmap always|never|auto` and `--no-mmap` (weights in place from the file's map or copied)
/// write byte-identical records, for an f32 and a bf16 checkpoint; `--no-mmap` with `--mmap` is
/// a usage error.
#[test]
fn mmap_modes_write_the_same_records() {
    for name in ["opt", "qwen2"] {
        mmap_modes_agree(name);
    }
}

fn mmap_modes_agree(name: &str) {
    let g = golden(name);
    let dir = tempfile::tempdir().unwrap();
    let inp = golden_input(dir.path(), &g);
    let gen = |out: &Path, mode: &[&str]| {
        let mut args = vec![
            "generate",
            model(name),
            "--input",
            s(&inp),
            "--output",
            s(out),
            "--max-new-tokens",
            "6",
            "--seed",
            "5",
            "--logprobs",
            "--batch-size",
            "3",
        ];
        args.extend_from_slice(mode);
        run(&args)
    };
    let mut outs = Vec::new();
    for mode in [
        &["--mmap", "always"][..],
        &["--mmap", "never"],
        &["--no-mmap"],
        &[],
    ] {
        let out = dir.path().join(format!("out{}.jsonl", outs.len()));
        ok(&gen(&out, mode));
        outs.push(std::fs::read_to_string(&out).unwrap());
    }
    assert_eq!(outs[0].lines().count(), 4);
    assert!(
        outs.iter().all(|o| *o == outs[0]),
        "{name}: records differ between --mmap modes"
    );
    let o = gen(
        &dir.path().join("bad.jsonl"),
        &["--no-mmap", "--mmap", "always"],
    );
    usage_error(&o, &["--no-mmap", "--mmap"]);
}

#[test]
fn short_form_writes_plain_text() {
    let g = golden("gpt2");
    let dir = tempfile::tempdir().unwrap();
    // .txt: one prompt per line, \n and \t escaped, empty lines skipped.
    let txt: Vec<String> = prompts(&g)
        .iter()
        .map(|p| {
            p.replace('\\', "\\\\")
                .replace('\n', "\\n")
                .replace('\t', "\\t")
        })
        .collect();
    let inp = dir.path().join("in.txt");
    std::fs::write(&inp, txt.join("\n\n") + "\n").unwrap();
    let out = dir.path().join("out");
    ok(&run(&[model("gpt2"), s(&inp), s(&out), "10", "0"]));
    // The same run as JSONL: the text file is prompt + continuation, separated by blank lines.
    let out_j = dir.path().join("out.jsonl");
    ok(&run(&[model("gpt2"), s(&inp), s(&out_j), "10", "0"]));
    let recs = read_jsonl(&out_j);
    assert_eq!(recs.len(), 4);
    for (i, r) in recs.iter().enumerate() {
        // The default id is the 0-based line number: blank lines count.
        assert_eq!(r["id"], Value::from(2 * i));
        assert_eq!(r["prompt"].as_str().unwrap(), prompts(&g)[i]);
        assert_eq!(
            ids(&r["token_ids"]),
            ids(&g["prompts"][i]["greedy"]["token_ids"])
        );
    }
    let want: Vec<String> = recs
        .iter()
        .map(|r| {
            format!(
                "{}{}",
                r["prompt"].as_str().unwrap(),
                r["text"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        want.join("\n\n") + "\n"
    );
}

#[test]
fn stdin_and_stdout() {
    let o = run_with_stdin(
        &[
            "generate",
            model("gpt2"),
            "--input",
            "-",
            "--output",
            "-",
            "--temperature",
            "0",
            "--max-new-tokens",
            "3",
        ],
        Some("{\"prompt\": \"Hello world\"}\n"),
    );
    ok(&o);
    let out = String::from_utf8(o.stdout).unwrap();
    let r: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(ids(&r["token_ids"]), vec![42, 171, 171]);
    // text on stdin
    let o = run_with_stdin(
        &[
            "generate",
            model("gpt2"),
            "-i",
            "-",
            "-o",
            "-",
            "--temperature",
            "0",
            "--max-new-tokens",
            "2",
        ],
        Some("Hello world\n"),
    );
    ok(&o);
    let r: Value = serde_json::from_str(String::from_utf8(o.stdout).unwrap().trim()).unwrap();
    assert_eq!(ids(&r["token_ids"]), vec![42, 171]);
}

#[test]
fn seeded_sampling_is_reproducible_and_independent_of_batch_size() {
    let g = golden("gpt2");
    let dir = tempfile::tempdir().unwrap();
    let inp = golden_input(dir.path(), &g);
    let gen = |batch: &str, seed: &str, out: &str| {
        let out = dir.path().join(out);
        ok(&run(&[
            "generate",
            model("gpt2"),
            "--input",
            s(&inp),
            "--output",
            s(&out),
            "--temperature",
            "1.0",
            "--seed",
            seed,
            "--max-new-tokens",
            "12",
            "--batch-size",
            batch,
        ]));
        read_jsonl(&out)
            .iter()
            .map(|r| ids(&r["token_ids"]))
            .collect::<Vec<_>>()
    };
    let a = gen("1", "42", "a.jsonl");
    let b = gen("4", "42", "b.jsonl");
    let c = gen("3", "42", "c.jsonl");
    let d = gen("4", "7", "d.jsonl");
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_ne!(a, d, "a different seed should give different samples");
}

#[test]
fn num_return_sequences_and_n_override() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.jsonl");
    std::fs::write(
        &inp,
        "{\"prompt\":\"Hello world\"}\n{\"prompt\":\"The quick\",\"n\":3}\n",
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    ok(&run(&[
        "generate",
        model("gpt2"),
        "--input",
        s(&inp),
        "--output",
        s(&out),
        "--num-return-sequences",
        "2",
        "--seed",
        "1",
        "--temperature",
        "1",
        "--max-new-tokens",
        "8",
    ]));
    let recs = read_jsonl(&out);
    let keys: Vec<(u64, u64)> = recs
        .iter()
        .map(|r| (r["id"].as_u64().unwrap(), r["sample"].as_u64().unwrap()))
        .collect();
    assert_eq!(keys, vec![(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]);
    assert_ne!(
        recs[0]["token_ids"], recs[1]["token_ids"],
        "samples should differ"
    );
}

#[test]
fn logprobs_are_log_probabilities() {
    let g = golden("gpt2");
    let dir = tempfile::tempdir().unwrap();
    let inp = golden_input(dir.path(), &g);
    let out = dir.path().join("out.jsonl");
    ok(&run(&[
        "generate",
        model("gpt2"),
        "--input",
        s(&inp),
        "--output",
        s(&out),
        "--temperature",
        "0",
        "--max-new-tokens",
        "10",
        "--logprobs",
    ]));
    for (i, r) in read_jsonl(&out).iter().enumerate() {
        let lp: Vec<f64> = r["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let want: Vec<f64> = g["prompts"][i]["greedy"]["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(lp.len(), r["token_ids"].as_array().unwrap().len());
        assert_eq!(lp.len(), want.len());
        for (a, b) in lp.iter().zip(&want) {
            assert!(*a <= 0.0);
            assert!((a - b).abs() < 1e-3, "prompt {i}: {a} vs {b}");
        }
    }
    // Sampling too: logprobs under the unmodified model distribution are still <= 0.
    ok(&run(&[
        "generate",
        model("gpt2"),
        "--input",
        s(&inp),
        "--output",
        s(&out),
        "--overwrite",
        "--temperature",
        "1.5",
        "--top-k",
        "5",
        "--seed",
        "3",
        "--max-new-tokens",
        "6",
        "--logprobs",
    ]));
    for r in read_jsonl(&out) {
        assert!(r["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x.as_f64().unwrap() <= 0.0));
    }
}

#[test]
fn stop_strings_cut_the_text() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.jsonl");
    std::fs::write(&inp, "{\"prompt\":\"Hello world\"}\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let base = [
        "generate",
        model("gpt2"),
        "--input",
        s(&inp),
        "--output",
        s(&out),
        "--temperature",
        "0",
        "--max-new-tokens",
        "10",
    ];
    ok(&run(&base));
    let full = read_jsonl(&out)[0]["text"].as_str().unwrap().to_string();
    let chars: Vec<char> = full.chars().collect();
    assert!(
        chars.len() >= 4,
        "continuation too short to test stops: {full:?}"
    );
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 1].iter().collect();
    let want = &full[..full.find(&stop).unwrap()];

    let mut args = base.to_vec();
    args.extend([
        "--overwrite",
        "--stop",
        stop.as_str(),
        "--stop",
        "\u{1}never",
    ]);
    ok(&run(&args));
    let r = &read_jsonl(&out)[0];
    assert_eq!(r["finish_reason"], "stop");
    assert_eq!(r["text"].as_str().unwrap(), want);

    // Per-request override (a string or a list).
    let line = serde_json::json!({"prompt": "Hello world", "stop": [stop]}).to_string();
    std::fs::write(&inp, format!("{line}\n")).unwrap();
    ok(&run(&[&base[..], &["--overwrite"]].concat()));
    let r = &read_jsonl(&out)[0];
    assert_eq!(
        (
            r["finish_reason"].as_str().unwrap(),
            r["text"].as_str().unwrap()
        ),
        ("stop", want)
    );
}

#[test]
fn score_fields_and_perplexity() {
    for name in ["gpt2", "llama"] {
        let g = golden(name);
        let dir = tempfile::tempdir().unwrap();
        let inp = golden_input(dir.path(), &g);
        let out = dir.path().join("scores.jsonl");
        ok(&run(&[
            "score",
            model(name),
            "--input",
            s(&inp),
            "--output",
            s(&out),
            "--batch-size",
            "3",
        ]));
        let recs = read_jsonl(&out);
        assert_eq!(recs.len(), 4);
        for (i, r) in recs.iter().enumerate() {
            let keys: Vec<&str> = r.as_object().unwrap().keys().map(|k| k.as_str()).collect();
            assert_eq!(keys, ["id", "token_ids", "logprobs", "sum_logprob", "ppl"]);
            assert_eq!(r["id"], format!("p{i}"));
            let gp = &g["prompts"][i];
            assert_eq!(
                ids(&r["token_ids"]),
                ids(&gp["input_ids"]),
                "{name}: token_ids include BOS as transformers"
            );
            let lp: Vec<f64> = r["logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(lp.len(), ids(&r["token_ids"]).len() - 1);
            for (a, b) in lp.iter().zip(gp["prompt_logprobs"].as_array().unwrap()) {
                assert!(
                    (a - b.as_f64().unwrap()).abs() < 1e-3,
                    "{name} prompt {i}: {a} vs {b}"
                );
            }
            let sum = r["sum_logprob"].as_f64().unwrap();
            assert!((sum - lp.iter().sum::<f64>()).abs() < 1e-3);
            let ppl = r["ppl"].as_f64().unwrap();
            let want = (-sum / lp.len() as f64).exp();
            assert!((ppl - want).abs() <= 1e-6 * want, "{ppl} vs {want}");
        }
    }
}

type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn read_safetensors(p: &Path) -> (Tensors, std::collections::HashMap<String, String>) {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut ts: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32);
            let data = v
                .data()
                .chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            (n, v.shape().to_vec(), data)
        })
        .collect();
    ts.sort_by(|a, b| a.0.cmp(&b.0));
    (ts, meta.metadata().clone().unwrap_or_default())
}

#[test]
fn embed_names_shapes_and_values() {
    let g = golden("gpt2");
    let dir = tempfile::tempdir().unwrap();
    let inp = golden_input(dir.path(), &g);
    let lens: Vec<usize> = (0..4)
        .map(|i| g["prompts"][i]["input_ids"].as_array().unwrap().len())
        .collect();
    let out = dir.path().join("h.safetensors");
    let embed = |extra: &[&str]| {
        let mut a = vec![
            "embed",
            model("gpt2"),
            "--input",
            s(&inp),
            "--output",
            s(&out),
            "--overwrite",
            "--batch-size",
            "3",
        ];
        a.extend_from_slice(extra);
        ok(&run(&a));
        read_safetensors(&out)
    };
    // Default: --layers -1 --pool last on a 2-block model → hidden.2 [4, 32].
    let (ts, meta) = embed(&[]);
    assert_eq!(
        ts.iter()
            .map(|t| (t.0.as_str(), t.1.clone()))
            .collect::<Vec<_>>(),
        vec![("hidden.2", vec![4, 32])]
    );
    assert_eq!(meta["pool"], "last");
    assert_eq!(meta["layers"], "[2]");
    assert_eq!(
        serde_json::from_str::<Value>(&meta["ids"]).unwrap(),
        serde_json::json!(["p0", "p1", "p2", "p3"])
    );
    let meta_ids: Vec<Vec<u32>> = serde_json::from_str(&meta["input_ids"]).unwrap();
    assert_eq!(meta_ids[0], ids(&g["prompts"][0]["input_ids"]));
    assert!(meta["model"].contains("gpt2"));
    // Last-token state of prompt 0 matches transformers.
    let want = &g["prompts"][0]["hidden_states"][2][lens[0] - 1];
    for (a, b) in ts[0].2[..32].iter().zip(want.as_array().unwrap()) {
        assert!((*a as f64 - b.as_f64().unwrap()).abs() < 1e-3);
    }

    let (ts, meta) = embed(&["--layers", "0,-1", "--pool", "mean"]);
    let shapes: Vec<_> = ts.iter().map(|t| (t.0.clone(), t.1.clone())).collect();
    assert_eq!(
        shapes,
        vec![
            ("hidden.0".to_string(), vec![4, 32]),
            ("hidden.2".to_string(), vec![4, 32])
        ]
    );
    assert_eq!(meta["pool"], "mean");
    let h0 = g["prompts"][0]["hidden_states"][0].as_array().unwrap();
    for d in 0..32 {
        let m: f64 = h0.iter().map(|row| row[d].as_f64().unwrap()).sum::<f64>() / h0.len() as f64;
        assert!((ts[0].2[d] as f64 - m).abs() < 1e-3);
    }

    let (ts, _) = embed(&["--layers", "1", "--pool", "none"]);
    let shapes: Vec<_> = ts.iter().map(|t| (t.0.clone(), t.1.clone())).collect();
    let want: Vec<_> = (0..4)
        .map(|r| (format!("hidden.1.{r}"), vec![lens[r], 32]))
        .collect();
    assert_eq!(shapes, want);
    let h1 = g["prompts"][1]["hidden_states"][1].as_array().unwrap();
    let flat: Vec<f64> = h1
        .iter()
        .flat_map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()))
        .collect();
    assert!(ts[1]
        .2
        .iter()
        .zip(&flat)
        .all(|(a, b)| (*a as f64 - b).abs() < 1e-3));

    // OPT with project_out: the last layer is word_embed_proj_dim wide.
    let out2 = dir.path().join("opt.safetensors");
    ok(&run(&[
        "embed",
        model("opt-proj"),
        "--input",
        s(&inp),
        "--output",
        s(&out2),
        "--layers",
        "-1,-2",
    ]));
    let (ts, _) = read_safetensors(&out2);
    let shapes: Vec<_> = ts.iter().map(|t| (t.0.clone(), t.1.clone())).collect();
    assert_eq!(
        shapes,
        vec![
            ("hidden.1".to_string(), vec![4, 32]),
            ("hidden.2".to_string(), vec![4, 16])
        ]
    );

    for bad in ["3", "-4", "x"] {
        let o = run(&[
            "embed",
            model("gpt2"),
            "--input",
            s(&inp),
            "--output",
            s(&out),
            "--overwrite",
            "--layers",
            bad,
        ]);
        usage_error(&o, &["--layers"]);
    }
}

// ---------------------------------------------------------------------------------------
// Bad input: exit code 2, one line naming the file/line at fault, nothing written.

#[test]
fn bad_model_paths() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.txt");
    std::fs::write(&inp, "Hello\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let missing = dir.path().join("no-such-model");
    let o = run(&[
        "generate",
        s(&missing),
        "--input",
        s(&inp),
        "--output",
        s(&out),
    ]);
    usage_error(&o, &["no-such-model"]);
    assert!(!out.exists());

    // Unknown architecture: a copy of gpt2 with a bogus architectures entry.
    let m = dir.path().join("bogus-model");
    std::fs::create_dir(&m).unwrap();
    for f in std::fs::read_dir(model("gpt2")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), m.join(f.file_name())).unwrap();
    }
    let cfg = std::fs::read_to_string(m.join("config.json")).unwrap();
    let cfg = cfg
        .replace("GPT2LMHeadModel", "BogusForCausalLM")
        .replace("\"gpt2\"", "\"bogus\"");
    std::fs::write(m.join("config.json"), cfg).unwrap();
    let o = run(&["generate", s(&m), "--input", s(&inp), "--output", s(&out)]);
    usage_error(&o, &["Bogus", "bogus-model"]);
    assert!(!out.exists());

    let o = run(&[
        "generate",
        model("gpt2"),
        "--input",
        s(&inp),
        "--output",
        s(&out),
        "--device",
        "cuda",
    ]);
    if cfg!(feature = "cuda") {
        if !has_gpu() {
            usage_error(&o, &["--device cuda: "]);
        }
    } else {
        usage_error(&o, &["built without CUDA"]);
    }
}

/// A model directory whose only tokenizer is a truncated SentencePiece `tokenizer.model`: exit
/// 2, one line naming the file.
#[test]
fn bad_sentencepiece_tokenizer_model() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.txt");
    std::fs::write(&inp, "Hello\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let m = dir.path().join("spm-model");
    std::fs::create_dir(&m).unwrap();
    for f in std::fs::read_dir(model("llama")).unwrap() {
        let f = f.unwrap();
        if f.file_name() != "tokenizer.json" {
            std::fs::copy(f.path(), m.join(f.file_name())).unwrap();
        }
    }
    let spm = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/spm/llama/tokenizer.model"),
    )
    .unwrap();
    std::fs::write(m.join("tokenizer.model"), &spm[..spm.len() / 2]).unwrap();
    let o = run(&["generate", s(&m), "--input", s(&inp), "--output", s(&out)]);
    usage_error(&o, &["tokenizer.model", "not a valid SentencePiece model"]);
    assert!(!out.exists());
}

/// A GPU node (NVIDIA driver loaded): `--device cuda` may work there.
fn has_gpu() -> bool {
    Path::new("/dev/nvidiactl").exists()
}

/// The CUDA build where CUDA cannot be used (no driver, no GPU): `--device cuda` is one line
/// with exit 2, `--device auto` and `--device cpu` run on the CPU.
#[cfg(feature = "cuda")]
#[test]
fn cuda_build_without_gpu() {
    if has_gpu() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.txt");
    std::fs::write(&inp, "Hello\n").unwrap();
    let out = dir.path().join("out.jsonl");
    let gen = |device: &str| {
        run(&[
            "generate",
            model("llama"),
            "--input",
            s(&inp),
            "--output",
            s(&out),
            "--max-new-tokens",
            "2",
            "--overwrite",
            "--device",
            device,
        ])
    };
    let line = usage_error(&gen("cuda"), &["--device cuda: "]);
    if line.contains("libcuda.so.1 not found") {
        assert!(line.contains("--device cpu"), "{line}");
    }
    for device in ["auto", "cpu"] {
        ok(&gen(device));
        assert_eq!(read_jsonl(&out).len(), 1);
    }
}

#[test]
fn bad_input_lines() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let gen = |inp: &Path, extra: &[&str]| {
        let mut a = vec![
            "generate",
            model("gpt2"),
            "--input",
            s(inp),
            "--output",
            s(&out),
            "--temperature",
            "0",
            "--max-new-tokens",
            "3",
        ];
        a.extend_from_slice(extra);
        run(&a)
    };
    let inp = dir.path().join("in.jsonl");
    for (content, line, what) in [
        ("{\"prompt\":\"a\"}\n{oops\n{\"prompt\":\"b\"}\n", 2, "JSON"),
        ("{\"prompt\":\"a\"}\n\n{\"id\":1}\n", 3, "prompt"),
        ("{\"prompt\":\"a\",\"input_ids\":[1]}\n", 1, "both"),
        (
            "{\"prompt\":\"a\"}\n{\"prompt\":\"a\",\"temperature\":\"hot\"}\n",
            2,
            "temperature",
        ),
        (
            "{\"prompt\":\"a\"}\n{\"prompt\":\"a\",\"top_p\":0}\n",
            2,
            "top_p",
        ),
        ("{\"input_ids\":[1, 99999]}\n", 1, "99999"),
    ] {
        std::fs::write(&inp, content).unwrap();
        let o = gen(&inp, &[]);
        usage_error(&o, &[format!("in.jsonl:{line}:").as_str(), what]);
        assert!(!out.exists(), "output must not be created on bad input");
    }

    // --skip-bad-lines: an error record in place of the bad line, the rest is generated.
    std::fs::write(&inp, "{\"prompt\":\"Hello world\"}\n{oops\n{\"prompt\":\"Hello world\",\"top_k\":0}\n{\"prompt\":\"Hello world\",\"id\":\"x\"}\n").unwrap();
    let o = gen(&inp, &["--skip-bad-lines"]);
    ok(&o);
    let recs = read_jsonl(&out);
    assert_eq!(recs.len(), 4);
    assert_eq!(ids(&recs[0]["token_ids"]), vec![42, 171, 171]);
    assert_eq!(recs[1]["id"], 1);
    assert!(recs[1]["error"].as_str().unwrap().contains("in.jsonl:2:"));
    assert_eq!(recs[2]["id"], 2);
    assert!(recs[2]["error"].as_str().unwrap().contains("in.jsonl:3:"));
    assert_eq!(recs[3]["id"], "x");
    assert_eq!(recs[3]["token_ids"], recs[0]["token_ids"]);
    std::fs::remove_file(&out).unwrap();

    // Empty input.
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    usage_error(&gen(&empty, &[]), &["empty.txt", "no prompts"]);

    // Prompt longer than the context (gpt2 fixture: 64 positions).
    let long = "word ".repeat(100);
    std::fs::write(
        &inp,
        format!("{{\"prompt\":\"Hello\"}}\n{{\"prompt\":\"{long}\"}}\n"),
    )
    .unwrap();
    usage_error(&gen(&inp, &[]), &["in.jsonl:2:", "context"]);
    assert!(!out.exists());
    for side in ["left", "right"] {
        ok(&gen(&inp, &["--truncate", side, "--overwrite"]));
        assert_eq!(read_jsonl(&out).len(), 2);
    }
    std::fs::remove_file(&out).unwrap();

    // Missing input file.
    usage_error(&gen(&dir.path().join("nope.jsonl"), &[]), &["nope.jsonl"]);
}

#[test]
fn bad_output_and_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.txt");
    std::fs::write(&inp, "Hello world\n").unwrap();
    let m = model("gpt2");

    let out = dir.path().join("missing-dir/out.jsonl");
    usage_error(
        &run(&["generate", m, "--input", s(&inp), "--output", s(&out)]),
        &["missing-dir"],
    );
    usage_error(&run(&[m, s(&inp), s(&out), "5", "0"]), &["missing-dir"]);

    let out = dir.path().join("out.jsonl");
    std::fs::write(&out, "{\"id\":0}\n").unwrap();
    let o = run(&["generate", m, "--input", s(&inp), "--output", s(&out)]);
    usage_error(&o, &["out.jsonl", "exists", "--resume", "--overwrite"]);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "{\"id\":0}\n",
        "existing output left alone"
    );

    let out = dir.path().join("fresh.txt");
    for (n, t) in [("0", "1"), ("-1", "1"), ("abc", "1"), ("1.5", "1")] {
        usage_error(&run(&[m, s(&inp), s(&out), n, t]), &["NUM_TOKENS", n]);
    }
    for t in ["-1", "abc", "nan", "inf"] {
        usage_error(&run(&[m, s(&inp), s(&out), "5", t]), &["TEMPERATURE"]);
    }
    usage_error(
        &run(&[
            "generate",
            m,
            "--input",
            s(&inp),
            "--output",
            s(&out),
            "--temperature",
            "-1",
        ]),
        &["--temperature"],
    );
    usage_error(
        &run(&[
            "generate",
            m,
            "--input",
            s(&inp),
            "--output",
            s(&out),
            "--top-p",
            "1.5",
        ]),
        &["--top-p"],
    );
    usage_error(
        &run(&[
            "generate",
            m,
            "--input",
            s(&inp),
            "--output",
            s(&out),
            "--max-new-tokens",
            "0",
        ]),
        &["--max-new-tokens"],
    );
    usage_error(
        &run(&[m, s(&inp)]),
        &["MODEL INPUT OUTPUT NUM_TOKENS TEMPERATURE"],
    );
    usage_error(&run(&["generate", m, "--input", s(&inp)]), &["--output"]);
    assert!(!out.exists());

    let o = run(&["--version"]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("lmgen "));
    let o = run(&["generate", "--help"]);
    ok(&o);
    assert!(String::from_utf8_lossy(&o.stdout).contains("--max-new-tokens"));
}

// ---------------------------------------------------------------------------------------
// --resume

#[test]
fn resume_jsonl_after_a_torn_record() {
    let g = golden("gpt2");
    let dir = tempfile::tempdir().unwrap();
    let inp = golden_input(dir.path(), &g);
    let out = dir.path().join("out.jsonl");
    let args = [
        "generate",
        model("gpt2"),
        "--input",
        s(&inp),
        "--output",
        s(&out),
        "--temperature",
        "0",
        "--max-new-tokens",
        "10",
    ];
    ok(&run(&args));
    let full = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = full.lines().collect();
    assert_eq!(lines.len(), 4);
    // Simulate a kill: one and a half records.
    let torn = format!("{}\n{}", lines[0], &lines[1][..lines[1].len() / 2]);
    std::fs::write(&out, &torn).unwrap();
    ok(&run(&[&args[..], &["--resume"]].concat()));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), full);
    let ids: Vec<Value> = read_jsonl(&out).iter().map(|r| r["id"].clone()).collect();
    assert_eq!(ids, vec!["p0", "p1", "p2", "p3"]);
    // Resuming a finished run changes nothing.
    ok(&run(&[&args[..], &["--resume"]].concat()));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), full);
    // --overwrite starts afresh.
    ok(&run(&[&args[..], &["--overwrite"]].concat()));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), full);
}

#[test]
fn resume_plain_text_with_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.txt");
    std::fs::write(
        &inp,
        "Hello world\nThe quick brown fox\nnaïve café\ndef f(x):\\n\\treturn x\n",
    )
    .unwrap();
    let out = dir.path().join("out.txt");
    let side = dir.path().join("out.txt.lmgen-done");
    let m = model("gpt2");
    let args = [m, s(&inp), s(&out), "8", "0"];
    ok(&run(&args));
    let full = std::fs::read_to_string(&out).unwrap();
    let full_side = std::fs::read_to_string(&side).unwrap();
    let side_lines: Vec<&str> = full_side.lines().collect();
    assert_eq!(side_lines.len(), 4);
    // Kill in the middle of record 2 (its sidecar line only half written).
    let end1: usize = side_lines[0].rsplit('\t').next().unwrap().parse().unwrap();
    let end2: usize = side_lines[1].rsplit('\t').next().unwrap().parse().unwrap();
    std::fs::write(&out, &full.as_bytes()[..(end1 + end2) / 2]).unwrap();
    std::fs::write(&side, format!("{}\n{}", side_lines[0], &side_lines[1][..3])).unwrap();
    let o = run(&[&args[..], &["--resume"]].concat());
    ok(&o);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), full);
    assert_eq!(std::fs::read_to_string(&side).unwrap(), full_side);
    // Without the sidecar a non-empty text output cannot be resumed safely.
    std::fs::remove_file(&side).unwrap();
    usage_error(&run(&[&args[..], &["--resume"]].concat()), &["lmgen-done"]);
}

#[test]
fn score_resume_and_skip_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let inp = dir.path().join("in.jsonl");
    std::fs::write(
        &inp,
        "{\"prompt\":\"Hello world\"}\n[1]\n{\"input_ids\":[346,356]}\n",
    )
    .unwrap();
    let out = dir.path().join("s.jsonl");
    let args = [
        "score",
        model("gpt2"),
        "--input",
        s(&inp),
        "--output",
        s(&out),
        "--skip-bad-lines",
    ];
    ok(&run(&args));
    let full = std::fs::read_to_string(&out).unwrap();
    let recs = read_jsonl(&out);
    assert_eq!(recs.len(), 3);
    assert!(recs[1]["error"].as_str().unwrap().contains("in.jsonl:2:"));
    assert_eq!(ids(&recs[2]["token_ids"]), vec![346, 356]);
    let first = full.lines().next().unwrap().to_string();
    std::fs::write(&out, format!("{first}\n{{\"id\":1,")).unwrap();
    ok(&run(&[&args[..], &["--resume"]].concat()));
    // Scores may differ in the last float bits with the batch they were computed in.
    let again = read_jsonl(&out);
    assert_eq!(again.len(), 3);
    assert_eq!(again[0], recs[0], "the kept record is untouched");
    assert_eq!(again[1], recs[1]);
    assert_eq!(again[2]["id"], 2);
    assert_eq!(again[2]["token_ids"], recs[2]["token_ids"]);
    let (a, b) = (
        again[2]["sum_logprob"].as_f64().unwrap(),
        recs[2]["sum_logprob"].as_f64().unwrap(),
    );
    assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    usage_error(&run(&args), &["exists"]);
}

/// The llama-rope-llama3 fixture greedily ends "Hello world" with EOS after 2 tokens.
fn eos_early_input(dir: &Path, lines: &[&str]) -> PathBuf {
    let g = golden("llama-rope-llama3");
    let p0 = &g["prompts"][0];
    assert_eq!(p0["greedy"]["finish_reason"], "eos");
    assert_eq!(ids(&p0["greedy"]["token_ids"]).len(), 2);
    let input_ids = p0["input_ids"].to_string();
    let p = dir.join("eos.jsonl");
    let body: Vec<String> = lines
        .iter()
        .map(|extra| format!("{{\"input_ids\":{input_ids}{extra}}}"))
        .collect();
    std::fs::write(&p, body.join("\n") + "\n").unwrap();
    p
}

#[test]
fn ignore_eos_generates_max_new_tokens() {
    let g = golden("llama-rope-llama3");
    let eos_ids = ids(&g["prompts"][0]["greedy"]["token_ids"]);
    let dir = tempfile::tempdir().unwrap();
    let inp = eos_early_input(
        dir.path(),
        &["", ",\"ignore_eos\":true", ",\"ignore_eos\":false"],
    );
    let gen = |out: &str, extra: &[&str]| -> Vec<Value> {
        let out = dir.path().join(out);
        let mut a = vec![
            "generate",
            model("llama-rope-llama3"),
            "-i",
            s(&inp),
            "-o",
            s(&out),
            "--temperature",
            "0",
            "--max-new-tokens",
            "6",
        ];
        a.extend_from_slice(extra);
        ok(&run(&a));
        read_jsonl(&out)
    };
    // Without the flag: EOS ends the first and third; the JSONL override keeps the second going.
    let r = gen("a.jsonl", &[]);
    assert_eq!(ids(&r[0]["token_ids"]), eos_ids);
    assert_eq!(r[0]["finish_reason"], "eos");
    assert_eq!(ids(&r[1]["token_ids"]).len(), 6);
    assert_eq!(r[1]["finish_reason"], "length");
    assert_eq!(r[2]["finish_reason"], "eos");
    // With --ignore-eos: exactly max-new-tokens, EOS included, unless a line says false.
    let r = gen("b.jsonl", &["--ignore-eos"]);
    for i in [0, 1] {
        let t = ids(&r[i]["token_ids"]);
        assert_eq!(t.len(), 6, "{:?}", r[i]);
        assert_eq!(t[..2], eos_ids[..]);
        assert_eq!(r[i]["finish_reason"], "length");
    }
    assert_eq!(r[2]["finish_reason"], "eos");
    // The engine options do not change greedy results; the short form takes them too.
    let r2 = gen(
        "c.jsonl",
        &[
            "--ignore-eos",
            "--kv-memory",
            "64MiB",
            "--no-prefix-cache",
            "--max-step-tokens",
            "4",
        ],
    );
    assert_eq!(r, r2);
    // The tensor executor gives the same tokens (logprobs are not printed here).
    let r3 = gen("e.jsonl", &["--ignore-eos", "--executor", "tensor"]);
    assert_eq!(r, r3);
    let out = dir.path().join("d.jsonl");
    ok(&run(&[
        model("llama-rope-llama3"),
        s(&inp),
        s(&out),
        "6",
        "0",
        "--ignore-eos",
        "--kv-memory=1.5G",
    ]));
    assert_eq!(read_jsonl(&out), r);
}

#[test]
fn bad_engine_options_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let inp = eos_early_input(dir.path(), &[""]);
    let out = dir.path().join("out.jsonl");
    for bad in ["12parsecs", "-1", "0", "lots", "1.2.3G"] {
        let o = run(&[
            "generate",
            model("llama-rope-llama3"),
            "-i",
            s(&inp),
            "-o",
            s(&out),
            "--kv-memory",
            bad,
        ]);
        usage_error(&o, &["--kv-memory"]);
        assert!(!out.exists());
    }
    let o = run(&[
        "score",
        model("llama-rope-llama3"),
        "-i",
        s(&inp),
        "-o",
        s(&out),
        "--kv-memory",
        "2 furlongs",
    ]);
    usage_error(&o, &["--kv-memory"]);
    let o = run(&[
        "generate",
        model("llama-rope-llama3"),
        "-i",
        s(&inp),
        "-o",
        s(&out),
        "--max-step-tokens",
        "0",
    ]);
    usage_error(&o, &["--max-step-tokens"]);
    // A per-request ignore_eos that is not a boolean names its line.
    for v in ["\"yes\"", "1", "[true]"] {
        let inp = eos_early_input(dir.path(), &["", &format!(",\"ignore_eos\":{v}")]);
        let o = run(&[
            "generate",
            model("llama-rope-llama3"),
            "-i",
            s(&inp),
            "-o",
            s(&out),
        ]);
        usage_error(&o, &["eos.jsonl:2:", "ignore_eos"]);
        assert!(!out.exists());
    }
}

/// A request that cannot grow to its max_new_tokens in the whole KV pool is a one-line error
/// naming both options; the records finished before it stay written.
#[test]
fn a_request_too_long_for_the_pool_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    // 8 prompt tokens; the second request asks for 100 new ones.
    let inp = eos_early_input(dir.path(), &["", ",\"max_new_tokens\":100"]);
    let out = dir.path().join("out.jsonl");
    // Blocks of 16 tokens: a pool of 8 KiB has one for this model, enough for 8 + 4 tokens.
    let o = run(&[
        "generate",
        model("llama-rope-llama3"),
        "-i",
        s(&inp),
        "-o",
        s(&out),
        "--max-new-tokens",
        "4",
        "--temperature",
        "0",
        "--batch-size",
        "1",
        "--kv-memory",
        "8KiB",
    ]);
    usage_error(
        &o,
        &[
            "request 1: 8 tokens and up to 100 new need 7 KV blocks of 16 tokens, the pool has 1",
            "--kv-memory",
            "--max-new-tokens",
        ],
    );
    let r = read_jsonl(&out);
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0]["finish_reason"], "eos");
}

#[test]
fn help_documents_engine_options_and_record_schemas() {
    let help = |cmd: &str| {
        let o = run(&[cmd, "--help"]);
        ok(&o);
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let h = help("generate");
    for flag in [
        "--ignore-eos",
        "--kv-memory",
        "--no-prefix-cache",
        "--max-step-tokens",
        "ignore_eos",
    ] {
        assert!(h.contains(flag), "generate --help lacks {flag}");
    }
    let h = help("score");
    for field in ["\"sum_logprob\"", "\"ppl\"", "token_ids[i+1]"] {
        assert!(h.contains(field), "score --help lacks {field}");
    }
    let h = help("embed");
    for field in [
        "hidden.<layer>",
        "[n_inputs, width]",
        "hidden.<layer>.<row>",
    ] {
        assert!(h.contains(field), "embed --help lacks {field}");
    }
}
