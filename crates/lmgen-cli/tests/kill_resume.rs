//! `--resume` after a real kill (SIGKILL mid-run): no record lost or duplicated, input order kept,
//! and the result equals an uninterrupted run.
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

fn generate(input: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lmgen"));
    c.args([
        "generate",
        fixture("gpt2").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
    ])
    .args([
        "--output",
        out.to_str().unwrap(),
        "--max-new-tokens",
        "24",
        "--temperature",
        "0.8",
        "--seed",
        "5",
    ])
    .args(["--batch-size", "4", "--threads", "1"])
    .args(extra)
    .stderr(Stdio::null());
    c
}

#[test]
fn resume_after_sigkill_matches_an_uninterrupted_run() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.txt");
    let mut f = std::fs::File::create(&input).unwrap();
    let n = 1500;
    for i in 0..n {
        writeln!(f, "prompt number {i} says").unwrap();
    }
    drop(f);
    let out = tmp.path().join("out.jsonl");
    let mut child = generate(&input, &out, &[]).spawn().unwrap();
    let start = Instant::now();
    // Kill once some, but not all, records are out.
    loop {
        let k = lines(&out).len();
        if k >= 20 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no output after 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let partial = lines(&out).len();
    assert!(
        partial < n,
        "the job finished before it could be killed; make it longer"
    );

    let status = generate(&input, &out, &["--resume"]).status().unwrap();
    assert!(status.success());
    let resumed = lines(&out);
    let ids: Vec<u64> = resumed
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        ids,
        (0..n as u64).collect::<Vec<_>>(),
        "every id once, in input order"
    );

    let fresh = tmp.path().join("fresh.jsonl");
    assert!(generate(&input, &fresh, &[]).status().unwrap().success());
    assert_eq!(
        resumed,
        lines(&fresh),
        "resumed output equals an uninterrupted run"
    );
}
