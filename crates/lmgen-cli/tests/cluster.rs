//! The cluster-facing commands. `lmgen sbatch`: the printed job script is valid bash, passes
//! the generate arguments through intact, and handles the signals SLURM sends (run here with
//! a stand-in lmgen and scontrol; scripts/test-slurm.sh runs it on a real SLURM).
//! `lmgen --version`: version, commit, features, CPU kernels.
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lmgen");

fn sbatch(args: &[&str]) -> std::process::Output {
    Command::new(BIN).arg("sbatch").args(args).output().unwrap()
}

fn script(dir: &Path, fake: &Path) -> String {
    let out = sbatch(&[
        "--array",
        "4",
        "--cpus-per-task",
        "2",
        "--gpus-per-task",
        "1",
        "--time",
        "02:00:00",
        "--partition",
        "gpu",
        "--mem",
        "16G",
        "--chdir",
        dir.to_str().unwrap(),
        "--lmgen",
        fake.to_str().unwrap(),
        "--",
        "my model",
        "--input",
        "in.txt",
        "--output",
        "o u t.jsonl",
        "--stop",
        "it's $HOME `x`",
        "--seed",
        "1",
        "--resume",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn script_is_valid_bash_with_the_job_options() {
    let dir = tempfile::tempdir().unwrap();
    let s = script(dir.path(), Path::new("/opt/lmgen/bin/lmgen"));
    for line in [
        "#!/bin/bash\n",
        "#SBATCH --array=0-3\n",
        "#SBATCH --cpus-per-task=2\n",
        "#SBATCH --gpus-per-task=1\n",
        "#SBATCH --mem=16G\n",
        "#SBATCH --time=02:00:00\n",
        "#SBATCH --partition=gpu\n",
        "#SBATCH --signal=B:USR1@120\n",
        "#SBATCH --requeue\n",
        "#SBATCH --open-mode=append\n",
        "#SBATCH --output=./lmgen-%A_%a.out\n",
        "#SBATCH --error=./lmgen-%A_%a.err\n",
        "--resume --shard \"${SLURM_ARRAY_TASK_ID:?submit this script with sbatch}/4\"",
        "--dependency=afterok:",
        "merge 'o u t.jsonl'",
    ] {
        assert!(s.contains(line), "missing {line:?} in\n{s}");
    }
    // #SBATCH lines must come before the first command.
    let first_cmd = s
        .lines()
        .position(|l| !l.is_empty() && !l.starts_with('#'))
        .unwrap();
    assert!(s.lines().skip(first_cmd).all(|l| !l.starts_with("#SBATCH")));
    let f = dir.path().join("job.sh");
    std::fs::write(&f, &s).unwrap();
    let st = Command::new("bash").arg("-n").arg(&f).status().unwrap();
    assert!(st.success(), "bash -n failed on\n{s}");
    // The submit line in the header is valid bash too.
    let submit = s
        .lines()
        .find_map(|l| l.strip_prefix("#   jid="))
        .expect("submit line");
    let st = Command::new("bash")
        .args(["-n", "-c", &format!("jid={submit}")])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn bad_arguments_are_usage_errors() {
    for args in [
        &["--", "m", "--input", "in.txt"][..],
        &["--", "m", "--input", "in.txt", "--output", "-"],
        &[
            "--",
            "m",
            "--input",
            "in.txt",
            "--output",
            "o.jsonl",
            "--overwrite",
        ],
        &[
            "--", "m", "--input", "in.txt", "--output", "o.jsonl", "--shard", "0/2",
        ],
        &[
            "--array", "2", "--ntasks", "2", "--", "m", "-i", "a", "-o", "b",
        ],
        &["--time", "1 day", "--", "m", "-i", "a", "-o", "b"],
        &["--array", "0", "--", "m", "-i", "a", "-o", "b"],
    ] {
        let out = sbatch(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(out.stdout.is_empty());
    }
}

fn wait_exit(child: &mut std::process::Child, limit: Duration) -> Option<i32> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    None
}

/// Runs the printed script with a stand-in lmgen (records its arguments, exits 75 on a
/// signal) and scontrol (records its arguments); sends `sig` to the script's shell, or with
/// `group` to all its processes.
fn run_with_signal(sig: &str, group: bool) -> (Option<i32>, String, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let fake = d.join("fake-lmgen");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/bash\nD={}\nprintf '%s\\n' \"$@\" > \"$D/args\"\n\
             trap 'echo USR1 >> \"$D/signals\"; exit 75' USR1\n\
             trap 'echo TERM >> \"$D/signals\"; exit 75' TERM\n\
             touch \"$D/started\"\nwhile :; do sleep 0.05; done\n",
            d.display()
        ),
    )
    .unwrap();
    let bin = d.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::write(
        bin.join("scontrol"),
        format!("#!/bin/bash\necho \"$@\" >> {}/scontrol\n", d.display()),
    )
    .unwrap();
    for f in [fake.clone(), bin.join("scontrol")] {
        Command::new("chmod").arg("+x").arg(&f).status().unwrap();
    }
    let s = script(d, &fake);
    std::fs::write(d.join("job.sh"), &s).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    // In a process group of its own: SLURM signals every process of a job, as `kill -SIG -PGID`.
    let mut child = Command::new("bash")
        .process_group(0)
        .arg(d.join("job.sh"))
        .current_dir(d)
        .env("PATH", path)
        .env("SLURM_JOB_ID", "4242")
        .env("SLURM_ARRAY_TASK_ID", "3")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(d.join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !d.join("started").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the job did not start lmgen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let target = if group {
        format!("-{}", child.id())
    } else {
        child.id().to_string()
    };
    Command::new("kill")
        .args([&format!("-{sig}"), "--", &target])
        .status()
        .unwrap();
    let code = wait_exit(&mut child, Duration::from_secs(20));
    let read = |n: &str| std::fs::read_to_string(d.join(n)).unwrap_or_default();
    eprintln!("job stderr:\n{}", read("stderr"));
    (code, read("args"), read("signals"), read("scontrol"))
}

fn expected_args() -> String {
    [
        "generate",
        "my model",
        "--input",
        "in.txt",
        "--output",
        "o u t.jsonl",
        "--stop",
        "it's $HOME `x`",
        "--seed",
        "1",
        "--resume",
        "--shard",
        "3/4",
    ]
    .iter()
    .map(|a| format!("{a}\n"))
    .collect()
}

#[test]
fn time_limit_signal_stops_lmgen_and_requeues_the_task() {
    let (code, args, signals, scontrol) = run_with_signal("USR1", false);
    assert_eq!(args, expected_args());
    assert_eq!(signals.trim(), "USR1");
    assert_eq!(scontrol.trim(), "requeue 4242");
    assert_eq!(code, Some(75));
}

#[test]
fn scancel_stops_lmgen_without_requeue() {
    let (code, args, signals, scontrol) = run_with_signal("TERM", true);
    assert_eq!(args, expected_args());
    assert_eq!(signals.trim(), "TERM");
    assert_eq!(scontrol, "");
    assert_eq!(code, Some(75));
}

#[test]
fn version_names_commit_features_and_cpu_kernels() {
    for flag in ["--version", "-V"] {
        let out = Command::new(BIN).arg(flag).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], format!("lmgen {}", env!("CARGO_PKG_VERSION")), "{text}");
        let field = |k: &str| {
            lines
                .iter()
                .find_map(|l| l.strip_prefix(&format!("{k}: ")))
                .unwrap_or_else(|| panic!("no {k}: line in\n{text}"))
                .to_string()
        };
        let commit = field("commit");
        assert!(
            commit == "unknown" || commit.chars().take(12).all(|c| c.is_ascii_hexdigit()),
            "{commit}"
        );
        let features = field("features");
        assert_eq!(features.starts_with("cuda"), cfg!(feature = "cuda"), "{features}");
        assert!(field("cpu kernels").ends_with("scalar"));
        assert!(!field("target").is_empty());
    }
}
