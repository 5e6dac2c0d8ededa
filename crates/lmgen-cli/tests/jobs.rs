//! Jobs split and stopped the ways a cluster splits and stops them give the same records:
//! one process, 4 shards merged, shuffled lines, SIGTERM + `--resume` twice. Plus locking,
//! job identity on resume, and refusing to overwrite the input.
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn lmgen() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lmgen"))
}

/// The sampled job of these tests on `input`, writing `out` (24 new tokens unless `extra`
/// says otherwise).
fn job(input: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = lmgen();
    c.args(["generate", fixture("llama").to_str().unwrap()])
        .args(["--input", input.to_str().unwrap()])
        .args(["--output", out.to_str().unwrap()]);
    if !extra.contains(&"--max-new-tokens") {
        c.args(["--max-new-tokens", "24"]);
    }
    c.args(["--temperature", "0.9", "--top-p", "0.95"])
        .args(["--seed", "123", "--threads", "1"])
        .args(extra);
    c
}

fn run(mut c: Command) -> Output {
    c.stdin(Stdio::null()).output().unwrap()
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// (id, sample) → the record's exact bytes.
fn by_id(p: &Path) -> BTreeMap<(String, u64), String> {
    let mut m = BTreeMap::new();
    for l in lines(p) {
        let v: Value = serde_json::from_str(&l).unwrap();
        let key = (v["id"].to_string(), v["sample"].as_u64().unwrap_or(0));
        assert!(
            m.insert(key.clone(), l).is_none(),
            "{key:?} twice in {}",
            p.display()
        );
    }
    m
}

/// 200 prompts; every 7th has n = 2, every 11th its own seed; ids are explicit strings so
/// that a shuffled copy keeps them.
fn write_input(path: &Path, shuffle: bool) {
    let mut rows: Vec<String> = (0..200)
        .map(|i| {
            let mut o = serde_json::json!({"id": format!("p{i}"), "prompt": format!("Question {i}: what is {} plus {}?", i * 7 % 13, i % 5)});
            if i % 7 == 0 {
                o["n"] = Value::from(2);
            }
            if i % 11 == 0 {
                o["seed"] = Value::from(1000 + i);
            }
            o.to_string()
        })
        .collect();
    if shuffle {
        // A fixed permutation (multiplicative step coprime with 200).
        rows = (0..200)
            .map(|i| rows[(i * 77 + 13) % 200].clone())
            .collect();
    }
    let mut f = std::fs::File::create(path).unwrap();
    for r in rows {
        writeln!(f, "{r}").unwrap();
    }
}

fn sigterm(child: &std::process::Child) {
    // SAFETY: sending a signal to our own child process.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
}

/// Start the job, send SIGTERM once `out` has grown by `more` lines, and return its exit code.
fn run_and_stop(c: &mut Command, out: &Path, more: usize) -> Option<i32> {
    let before = lines(out).len();
    let mut child = c.stderr(Stdio::null()).spawn().unwrap();
    let start = Instant::now();
    while lines(out).len() < before + more {
        if let Ok(Some(st)) = child.try_wait() {
            return st.code();
        }
        assert!(start.elapsed() < Duration::from_secs(300), "no progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    sigterm(&child);
    let t = Instant::now();
    let st = child.wait().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "exited long after SIGTERM"
    );
    st.code()
}

#[test]
fn same_records_however_the_job_is_split_or_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    write_input(&input, false);

    // (a) one process
    let one = tmp.path().join("one.jsonl");
    ok(&run(job(&input, &one, &["--batch-size", "8"])));
    let reference = by_id(&one);
    let expected = 200 + (0..200).filter(|i| i % 7 == 0).count();
    assert_eq!(reference.len(), expected);

    // (b) four shards (other batch sizes), merged
    let sharded = tmp.path().join("sharded.jsonl");
    for k in 0..4 {
        let bs = ["1", "3", "16", "5"][k];
        let shard = format!("{k}/4");
        ok(&run(job(
            &input,
            &sharded,
            &["--shard", &shard, "--batch-size", bs],
        )));
    }
    let parts: Vec<usize> = (0..4)
        .map(|k| {
            lines(
                &tmp.path()
                    .join(format!("sharded.jsonl.shards/{k}-of-4.jsonl")),
            )
            .len()
        })
        .collect();
    assert!(parts.iter().all(|&n| n > 20), "balanced shards: {parts:?}");
    let status = run({
        let mut c = lmgen();
        c.args(["status", sharded.to_str().unwrap()]);
        c
    });
    ok(&status);
    assert!(String::from_utf8_lossy(&status.stdout).contains("complete"));
    ok(&run({
        let mut c = lmgen();
        c.args(["merge", sharded.to_str().unwrap()]);
        c
    }));
    assert_eq!(
        lines(&sharded),
        lines(&one),
        "merged = one process, in input order"
    );

    // (c) the same lines shuffled
    let shuffled_in = tmp.path().join("shuffled.jsonl");
    write_input(&shuffled_in, true);
    let shuffled = tmp.path().join("shuffled-out.jsonl");
    ok(&run(job(&shuffled_in, &shuffled, &["--batch-size", "4"])));
    assert_eq!(
        by_id(&shuffled),
        reference,
        "shuffled input: same record per id"
    );

    // (d) stopped by SIGTERM twice, resumed each time (the first run with --resume too:
    // one command line for the first run and every requeue)
    let stopped = tmp.path().join("stopped.jsonl");
    let mut c = job(&input, &stopped, &["--resume", "--batch-size", "2"]);
    assert_eq!(
        run_and_stop(&mut c, &stopped, 15),
        Some(75),
        "exit code 75 after SIGTERM"
    );
    let after_first = lines(&stopped).len();
    assert!(after_first < expected);
    let m: Value = serde_json::from_slice(
        &std::fs::read(tmp.path().join("stopped.jsonl.lmgen-manifest.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["progress"]["stopped"], "SIGTERM");
    assert_eq!(
        m["progress"]["done"].as_u64().unwrap() as usize,
        after_first
    );
    let mut c = job(&input, &stopped, &["--resume", "--batch-size", "6"]);
    let second = run_and_stop(&mut c, &stopped, 15);
    assert!(matches!(second, Some(75) | Some(0)), "{second:?}");
    ok(&run(job(
        &input,
        &stopped,
        &["--resume", "--batch-size", "3"],
    )));
    assert_eq!(
        lines(&stopped),
        lines(&one),
        "stopped and resumed = one process"
    );
}

#[test]
fn lock_identity_and_paths() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.txt");
    let mut f = std::fs::File::create(&input).unwrap();
    for i in 0..400 {
        writeln!(f, "line {i}").unwrap();
    }
    drop(f);
    let out = tmp.path().join("out.jsonl");
    let two_lines = |o: &Output| {
        let e = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(2), "{e}");
        e.lines().last().unwrap_or("").to_string()
    };

    // A second writer of the same output is refused at once, naming the holder.
    let mut first = job(
        &input,
        &out,
        &["--max-new-tokens", "64", "--batch-size", "1"],
    )
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let start = Instant::now();
    while lines(&out).is_empty() {
        assert!(
            first.try_wait().unwrap().is_none(),
            "the first writer ended early"
        );
        assert!(start.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(5));
    }
    let e = two_lines(&run(job(
        &input,
        &out,
        &["--resume", "--max-new-tokens", "64"],
    )));
    assert!(
        e.contains("another lmgen is writing it") && e.contains(&format!("pid {}", first.id())),
        "{e}"
    );
    sigterm(&first);
    assert_eq!(first.wait().unwrap().code(), Some(75));
    let written = std::fs::read(&out).unwrap();

    // Resume of another job: refused, naming the first difference; nothing touched.
    let e = two_lines(&run(job(
        &input,
        &out,
        &["--resume", "--max-new-tokens", "64", "--top-k", "5"],
    )));
    assert!(
        e.contains("not the same job: top_k was unset and is now 5"),
        "{e}"
    );
    let other = tmp.path().join("other.txt");
    std::fs::write(&other, "something else\n").unwrap();
    let e = two_lines(&run(job(
        &other,
        &out,
        &["--resume", "--max-new-tokens", "64"],
    )));
    assert!(e.contains("with other content"), "{e}");
    assert_eq!(std::fs::read(&out).unwrap(), written);

    // The output may not be the input (even with --overwrite) or a file of the model.
    let before = std::fs::read(&input).unwrap();
    let e = two_lines(&run(job(&input, &input, &["--overwrite"])));
    assert!(e.contains("the output is the input file"), "{e}");
    assert_eq!(std::fs::read(&input).unwrap(), before);
    let cfg = fixture("llama").join("config.json");
    let e = two_lines(&run(job(&input, &cfg, &["--overwrite"])));
    assert!(e.contains("is a file of the model"), "{e}");

    // Merge of an incomplete sharded job: exit 1, the missing ids listed, nothing written.
    let sharded = tmp.path().join("s.jsonl");
    ok(&run(job(
        &input,
        &sharded,
        &["--shard", "1/2", "--max-new-tokens", "2"],
    )));
    let o = run({
        let mut c = lmgen();
        c.args(["merge", sharded.to_str().unwrap()]);
        c
    });
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("0-of-2") && e.contains("missing"), "{e}");
    assert!(!sharded.exists());
    ok(&run(job(
        &input,
        &sharded,
        &["--shard", "0/2", "--max-new-tokens", "2"],
    )));
    std::fs::remove_file(tmp.path().join("s.jsonl.shards/0-of-2.jsonl")).unwrap();
    std::fs::write(tmp.path().join("s.jsonl.shards/0-of-2.jsonl"), "").unwrap();
    let o = run({
        let mut c = lmgen();
        c.args(["merge", sharded.to_str().unwrap()]);
        c
    });
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("missing (id 0, id 1, id 2"), "{e}");
    assert!(!sharded.exists());
}

#[test]
fn embed_shards_merge_into_the_whole() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.txt");
    let text: String = (0..30)
        .map(|i| format!("text number {i} {}\n", "x ".repeat(i % 9)))
        .collect();
    std::fs::write(&input, text).unwrap();
    let embed = |out: &Path, pool: &str, extra: &[&str]| {
        let mut c = lmgen();
        c.args(["embed", fixture("llama").to_str().unwrap()])
            .args([
                "--input",
                input.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ])
            .args(["--layers", "0,-1", "--pool", pool, "--threads", "1"])
            .args(extra);
        ok(&run(c));
    };
    for pool in ["mean", "none"] {
        let whole = tmp.path().join(format!("whole-{pool}.safetensors"));
        embed(&whole, pool, &[]);
        let merged = tmp.path().join(format!("merged-{pool}.safetensors"));
        for k in 0..3 {
            embed(&merged, pool, &["--shard", &format!("{k}/3")]);
        }
        let mut c = lmgen();
        c.args(["merge", merged.to_str().unwrap()]);
        ok(&run(c));
        let (a, b) = (
            std::fs::read(&whole).unwrap(),
            std::fs::read(&merged).unwrap(),
        );
        let (ta, tb) = (
            safetensors::SafeTensors::deserialize(&a).unwrap(),
            safetensors::SafeTensors::deserialize(&b).unwrap(),
        );
        let mut names = ta.names();
        names.sort();
        let mut names_b = tb.names();
        names_b.sort();
        assert_eq!(names, names_b);
        assert!(names.len() >= 2);
        for n in names {
            let (x, y) = (ta.tensor(n).unwrap(), tb.tensor(n).unwrap());
            assert_eq!((x.shape(), x.data()), (y.shape(), y.data()), "{n}");
        }
        let meta = |d: &[u8]| -> Value {
            let (_, h) = safetensors::SafeTensors::read_metadata(d).unwrap();
            serde_json::from_str(&h.metadata().as_ref().unwrap()["lmgen"]).unwrap()
        };
        assert_eq!(meta(&a)["ids"], meta(&b)["ids"]);
        assert_eq!(meta(&a)["input_ids"], meta(&b)["input_ids"]);
        // The mode any new file gets (umask), not 0600.
        let probe = tmp.path().join("probe");
        std::fs::File::create(&probe).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&merged), mode(&probe));
        assert_eq!(mode(&whole), mode(&probe));
    }
}

/// f32 values of tensor `name` in a safetensors file's bytes, with its shape.
fn tensor(data: &[u8], name: &str) -> (Vec<usize>, Vec<f32>) {
    let st = safetensors::SafeTensors::deserialize(data).unwrap();
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let v = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    (t.shape().to_vec(), v)
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
            "{what}: {x} vs {y}"
        );
    }
}

#[test]
fn hidden_states_while_generating_equal_embed_of_the_continuation() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("in.jsonl");
    let prompts: Vec<Vec<u32>> = (0..9)
        .map(|i| (0..3 + i % 4).map(|t| 5 + 7 * t + i as u32).collect())
        .collect();
    let text: String = prompts
        .iter()
        .map(|p| serde_json::json!({"input_ids": p}).to_string() + "\n")
        .collect();
    std::fs::write(&input, text).unwrap();
    let gen = |out: &Path, extra: &[&str], merge: bool| {
        let mut c = lmgen();
        c.args(["generate", fixture("llama").to_str().unwrap()])
            .args([
                "--input",
                input.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
            ])
            .args([
                "--max-new-tokens",
                "5",
                "--temperature",
                "0",
                "--ignore-eos",
                "--batch-size",
                "4",
            ])
            .args(["--hidden-states", "0,-1"])
            .args(extra);
        ok(&run(c));
        if !merge {
            return vec![];
        }
        let mut c = lmgen();
        c.args(["merge", out.to_str().unwrap()]);
        ok(&run(c));
        std::fs::read(tmp.path().join(format!(
            "{}.hidden.safetensors",
            out.file_name().unwrap().to_str().unwrap()
        )))
        .unwrap()
    };
    // All tokens, unpooled, from a job split in two shards.
    let all_out = tmp.path().join("all.jsonl");
    for k in 0..2 {
        gen(
            &all_out,
            &[
                "--hidden-of",
                "all",
                "--hidden-pool",
                "none",
                "--shard",
                &format!("{k}/2"),
            ],
            false,
        );
    }
    let all = {
        let mut c = lmgen();
        c.args(["merge", all_out.to_str().unwrap()]);
        ok(&run(c));
        std::fs::read(tmp.path().join("all.jsonl.hidden.safetensors")).unwrap()
    };
    // embed on prompt + continuation.
    let recs: Vec<Value> = lines(&all_out)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(recs.len(), 9);
    let full: String = recs
        .iter()
        .zip(&prompts)
        .map(|(r, p)| {
            let mut ids = p.clone();
            ids.extend(
                r["token_ids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_u64().unwrap() as u32),
            );
            serde_json::json!({"input_ids": ids}).to_string() + "\n"
        })
        .collect();
    let full_in = tmp.path().join("full.jsonl");
    std::fs::write(&full_in, full).unwrap();
    let emb = tmp.path().join("emb.safetensors");
    let mut c = lmgen();
    c.args(["embed", fixture("llama").to_str().unwrap()])
        .args([
            "--input",
            full_in.to_str().unwrap(),
            "--output",
            emb.to_str().unwrap(),
        ])
        .args(["--layers", "0,-1", "--pool", "none", "--batch-size", "3"]);
    ok(&run(c));
    let emb = std::fs::read(&emb).unwrap();
    let last_layer = 2; // the llama fixture has 2 blocks: -1 = 2
    for row in 0..9 {
        for layer in [0, last_layer] {
            let name = format!("hidden.{layer}.{row}");
            let (sa, a) = tensor(&all, &name);
            let (sb, b) = tensor(&emb, &name);
            assert_eq!(sa, sb, "{name}");
            assert_eq!(sa[0], prompts[row].len() + 5);
            close(&a, &b, &name);
        }
    }
    // Generated tokens only, last token pooled: the last row of the full states.
    let last = gen(
        &tmp.path().join("last.jsonl"),
        &["--hidden-of", "generated", "--hidden-pool", "last"],
        true,
    );
    let (shape, pooled) = tensor(&last, &format!("hidden.{last_layer}"));
    assert_eq!(shape[0], 9);
    let w = shape[1];
    for row in 0..9 {
        let (s, v) = tensor(&emb, &format!("hidden.{last_layer}.{row}"));
        close(
            &pooled[row * w..(row + 1) * w],
            &v[(s[0] - 1) * w..],
            "last generated token",
        );
    }
}
