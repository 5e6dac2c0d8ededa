//! OpenAI batch files: output equal to the one the `openai` package validated
//! (tests/fixtures/openai/expected.jsonl, made by scripts/check_openai_batch.py), the same
//! records when the job is sharded and merged or resumed, seeds, and per-line errors.
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// The command line of the golden run (as in scripts/check_openai_batch.py).
const ARGS: &[&str] = &[
    "--seed",
    "1",
    "--max-new-tokens",
    "10",
    "--threads",
    "1",
    "--batch-size",
    "4",
];

/// The qwen2 fixture with a chat template (as the script builds it).
fn chat_model(dir: &Path) -> PathBuf {
    let m = dir.join("model");
    std::fs::create_dir_all(&m).unwrap();
    for f in std::fs::read_dir(fixtures().join("qwen2")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, m.join(f.file_name().unwrap())).unwrap();
    }
    std::fs::copy(
        fixtures().join("openai/chat_template.jinja"),
        m.join("chat_template.jinja"),
    )
    .unwrap();
    m
}

fn generate(model: &Path, input: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lmgen"))
        .args(["generate", model.to_str().unwrap()])
        .args(["--input", input.to_str().unwrap()])
        .args(["--output", out.to_str().unwrap()])
        .args(ARGS)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The output's records with `created` set to 0 (the only field that is the time of the run).
fn records(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: Value = serde_json::from_str(l).unwrap();
            if let Some(c) = v["response"]["body"].get_mut("created") {
                *c = Value::from(0);
            }
            v
        })
        .collect()
}

#[test]
fn output_is_the_validated_golden() {
    let dir = tempfile::tempdir().unwrap();
    let model = chat_model(dir.path());
    let out = dir.path().join("out.jsonl");
    let o = generate(&model, &fixtures().join("openai/batch.jsonl"), &out, &[]);
    ok(&o);
    let got = records(&out);
    let want = records(&fixtures().join("openai/expected.jsonl"));
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, w, "\n got: {g}\nwant: {w}");
    }
    // Bad lines are error responses, the run goes on.
    let status: Vec<u64> = got
        .iter()
        .map(|r| r["response"]["status_code"].as_u64().unwrap())
        .collect();
    assert_eq!(
        status,
        [200, 200, 200, 200, 200, 200, 200, 400, 400, 400, 400, 200, 200, 200, 200]
    );
    // Greedy choices: each chosen token is the most likely alternative, with its logprob.
    let lp = &got[13]["response"]["body"]["choices"][0]["logprobs"];
    let chosen = lp["token_logprobs"].as_array().unwrap();
    let top = lp["top_logprobs"].as_array().unwrap();
    assert_eq!(top.len(), chosen.len());
    for ((t, c), alts) in lp["tokens"].as_array().unwrap().iter().zip(chosen).zip(top) {
        let alts = alts.as_object().unwrap();
        assert!((1..=4).contains(&alts.len()), "{alts:?}");
        let best = alts
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        assert_eq!(alts[t.as_str().unwrap()].as_f64(), c.as_f64());
        assert!(c.as_f64().unwrap() >= best - 1e-6);
    }
    let content = got[14]["response"]["body"]["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap();
    for c in content {
        let alts = c["top_logprobs"].as_array().unwrap();
        assert_eq!(alts.len(), 2);
        assert_eq!(alts[0]["token"], c["token"]);
        assert_eq!(alts[0]["logprob"], c["logprob"]);
        assert!(alts[0]["logprob"].as_f64() >= alts[1]["logprob"].as_f64());
    }
    // Negative presence / frequency penalties make the greedy continuation repeat itself
    // where the same request without them does not.
    let text = |r: &Value| {
        r["response"]["body"]["choices"][0]["text"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(got[12]["custom_id"], "penalties");
    assert_ne!(text(&got[12]), text(&got[0]));
    // A line without a custom_id is named by its 0-based line number.
    assert_eq!(got[10]["custom_id"], Value::from(10));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("unsupported endpoint '/v1/images/generations'"),
        "{stderr}"
    );
}

#[test]
fn sharded_merged_and_resumed_give_the_same_records() {
    let dir = tempfile::tempdir().unwrap();
    let model = chat_model(dir.path());
    let input = fixtures().join("openai/batch.jsonl");
    let whole = dir.path().join("whole.jsonl");
    ok(&generate(&model, &input, &whole, &[]));
    let want = records(&whole);

    let sharded = dir.path().join("sharded.jsonl");
    for k in 0..3 {
        ok(&generate(
            &model,
            &input,
            &sharded,
            &["--shard", &format!("{k}/3")],
        ));
    }
    let m = Command::new(env!("CARGO_BIN_EXE_lmgen"))
        .args(["merge", sharded.to_str().unwrap()])
        .output()
        .unwrap();
    ok(&m);
    assert_eq!(records(&sharded), want);

    // Three records and a torn fourth, as a killed job leaves them; --resume finishes it.
    let resumed = dir.path().join("resumed.jsonl");
    let text = std::fs::read_to_string(&whole).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let partial = format!(
        "{}\n{}\n{}\n{}",
        lines[0],
        lines[1],
        lines[2],
        &lines[3][..lines[3].len() / 2]
    );
    std::fs::write(&resumed, partial).unwrap();
    let o = generate(&model, &input, &resumed, &["--resume"]);
    ok(&o);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("3 record(s) already written"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(records(&resumed), want);
}

fn line(id: &str, body: Value) -> String {
    serde_json::json!({"custom_id": id, "method": "POST", "url": "/v1/completions", "body": body})
        .to_string()
}

fn texts(r: &Value) -> Vec<String> {
    r["response"]["body"]["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_request_seed_alone_decides_its_samples() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("qwen2");
    let seeded = serde_json::json!({"prompt": "Once upon a time", "n": 2, "max_tokens": 8, "temperature": 1.0, "seed": 5});
    let unseeded =
        serde_json::json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0});
    let a = dir.path().join("a.jsonl");
    std::fs::write(
        &a,
        [
            line("x", seeded.clone()),
            line("u", unseeded.clone()),
            line("y", seeded.clone()),
        ]
        .join("\n"),
    )
    .unwrap();
    let b = dir.path().join("b.jsonl");
    std::fs::write(
        &b,
        [
            line(
                "other",
                serde_json::json!({"prompt": "Hello", "max_tokens": 3}),
            ),
            line("u", unseeded),
            line("z", seeded),
        ]
        .join("\n"),
    )
    .unwrap();
    let (oa, ob) = (dir.path().join("oa.jsonl"), dir.path().join("ob.jsonl"));
    ok(&generate(&model, &a, &oa, &[]));
    ok(&generate(&model, &b, &ob, &[]));
    let (ra, rb) = (records(&oa), records(&ob));
    // Same seed: same samples, whatever the custom_id, position or batch neighbours.
    assert_eq!(texts(&ra[0]), texts(&ra[2]));
    assert_eq!(texts(&ra[0]), texts(&rb[2]));
    assert_eq!(texts(&ra[0]).len(), 2);
    // No seed: the job's --seed and the custom_id decide.
    assert_eq!(texts(&ra[1]), texts(&rb[1]));
}

#[test]
fn format_checks_and_missing_template() {
    let dir = tempfile::tempdir().unwrap();
    let plain = fixtures().join("qwen2");
    // A model without a chat template: an error response for chat lines only.
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        format!(
            "{}\n{}\n",
            serde_json::json!({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
                "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}),
            line("p", serde_json::json!({"prompt": "hi", "max_tokens": 2}))
        ),
    )
    .unwrap();
    let out = dir.path().join("out.jsonl");
    ok(&generate(&plain, &input, &out, &[]));
    let r = records(&out);
    assert_eq!(r[0]["response"]["status_code"], 400);
    let msg = r[0]["response"]["body"]["error"]["message"]
        .as_str()
        .unwrap();
    assert!(msg.contains("has no chat template"), "{msg}");
    assert_eq!(r[1]["response"]["status_code"], 200);
    assert_eq!(r[1]["response"]["body"]["model"], plain.to_str().unwrap());

    // --format openai on an lmgen input, a text output, and `score` are refused (exit 2).
    let lm = dir.path().join("lm.jsonl");
    std::fs::write(&lm, "{\"prompt\": \"hi\"}\n").unwrap();
    let o = generate(
        &plain,
        &lm,
        &dir.path().join("o1.jsonl"),
        &["--format", "openai"],
    );
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = generate(&plain, &input, &dir.path().join("o2.txt"), &[]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("JSONL output"));
    let o = Command::new(env!("CARGO_BIN_EXE_lmgen"))
        .args([
            "score",
            plain.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ])
        .args(["--output", dir.path().join("s.jsonl").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("OpenAI batch file"));
}

/// Start the job, send SIGTERM once `out` has `at_least` lines, and return its exit code.
fn stop_after(c: &mut Command, out: &Path, at_least: usize) -> Option<i32> {
    let count = || {
        std::fs::read_to_string(out)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let mut child = c
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while count() < at_least {
        if let Ok(Some(st)) = child.try_wait() {
            return st.code();
        }
        assert!(start.elapsed().as_secs() < 300, "no progress");
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    child.wait().unwrap().code()
}

#[test]
fn sigterm_then_resume_gives_the_same_records() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("qwen2");
    let input = dir.path().join("in.jsonl");
    let rows: Vec<String> = (0..150)
        .map(|i| {
            let mut body = serde_json::json!({"prompt": format!("Question {i}: what is {i} plus 2?"), "max_tokens": 24, "temperature": 0.9});
            if i % 3 == 0 {
                body["seed"] = Value::from(i);
            }
            if i % 5 == 0 {
                body["n"] = Value::from(2);
            }
            line(&format!("q{i}"), body)
        })
        .collect();
    std::fs::write(&input, rows.join("\n") + "\n").unwrap();
    let whole = dir.path().join("whole.jsonl");
    ok(&generate(&model, &input, &whole, &[]));
    let stopped = dir.path().join("stopped.jsonl");
    let run = |extra: &[&str]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_lmgen"));
        c.args(["generate", model.to_str().unwrap()])
            .args(["--input", input.to_str().unwrap()])
            .args(["--output", stopped.to_str().unwrap()])
            .args(ARGS)
            .args(extra);
        c
    };
    assert_eq!(stop_after(&mut run(&["--resume"]), &stopped, 10), Some(75));
    let partial = records(&stopped).len();
    assert!(partial < 150, "{partial}");
    let mut c = run(&["--resume"]);
    ok(&c.stdin(Stdio::null()).output().unwrap());
    assert_eq!(records(&stopped), records(&whole));
}
