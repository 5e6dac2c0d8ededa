//! `lmgen sbatch`: print a ready, commented SLURM batch script for a sharded,
//! preemption-safe `generate` job (array tasks or srun ranks, `--resume --shard K/N|auto`,
//! requeue near the time limit, a dependent merge job).
use crate::args::{Cli, Command};
use crate::user_err;
use anyhow::Result;
use clap::{Args, Parser};
use std::ffi::OsString;
use std::fmt::Write as _;

pub const SBATCH_AFTER_HELP: &str = "\
Usage: lmgen sbatch [JOB OPTIONS] [--] MODEL --input IN --output OUT [generate options]

Prints a SLURM batch script to stdout; save it and submit it with sbatch. Everything from
MODEL on is a `lmgen generate` command line (checked now); the script runs it with
`--resume --shard K/N` (array task K of N; `--shard auto` for srun rank K of --ntasks N),
so each task writes its shard beside OUT, and the same script continues the job after a
requeue, or when a task is submitted again alone (sbatch --array=K SCRIPT). The header
comment holds the submit command with the dependent merge job (`lmgen merge OUT`).

SLURM sends SIGUSR1 to the script --signal-before seconds before the time limit; lmgen then
writes its finished records and exits 75, and the script requeues the task, which resumes.
scancel, `scontrol requeue` and preemption stop lmgen the same way.

Full reference: docs/cli.md.";

#[derive(Args, Debug, Clone)]
pub struct SbatchArgs {
    /// Array tasks: the job is split into N shards, one per task
    #[arg(long, default_value_t = 1, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub array: u32,
    /// At most M array tasks running at once (--array=0-(N-1)%M)
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_running: Option<u32>,
    /// Instead of an array: one job of N tasks started by srun, one shard per rank
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub ntasks: Option<u32>,
    /// CPUs per task (lmgen uses them all: $SLURM_CPUS_PER_TASK)
    #[arg(long, default_value_t = 8, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub cpus_per_task: u32,
    /// GPUs per task, e.g. 1 or a100:1 (none by default)
    #[arg(long, value_name = "GPUS")]
    pub gpus_per_task: Option<String>,
    /// Memory per node, e.g. 32G (default: the partition's)
    #[arg(long, value_name = "SIZE")]
    pub mem: Option<String>,
    /// Time limit per task run, e.g. 04:00:00 or 1-00:00:00 (a task requeues itself when
    /// it runs out and resumes)
    #[arg(long, default_value = "01:00:00", value_name = "TIME")]
    pub time: String,
    /// Partition (default: the cluster's default partition)
    #[arg(long, short = 'p', value_name = "NAME")]
    pub partition: Option<String>,
    /// Account to charge
    #[arg(long, short = 'A', value_name = "NAME")]
    pub account: Option<String>,
    /// Job name (also names the logs and the merge job)
    #[arg(long, short = 'J', default_value = "lmgen", value_name = "NAME")]
    pub job_name: String,
    /// Directory of the job's logs NAME-JOB_TASK.out/.err, relative to --chdir; it must
    /// exist when the job starts
    #[arg(long, default_value = ".", value_name = "DIR")]
    pub log_dir: String,
    /// Working directory of the job; relative paths of the command are relative to it
    /// (default: the current directory)
    #[arg(long, value_name = "DIR")]
    pub chdir: Option<String>,
    /// Seconds before the time limit at which lmgen is told to stop and the task requeued
    #[arg(long, default_value_t = 120, value_name = "SECONDS", value_parser = clap::value_parser!(u32).range(1..))]
    pub signal_before: u32,
    /// Any other sbatch option, as an extra #SBATCH line (repeatable), e.g. --qos=long
    #[arg(long, value_name = "OPTION", allow_hyphen_values = true)]
    pub sbatch_option: Vec<String>,
    /// The lmgen binary the job runs (default: this one)
    #[arg(long, value_name = "PATH")]
    pub lmgen: Option<String>,
    /// The generate command line: MODEL --input IN --output OUT [generate options]
    #[arg(value_name = "GENERATE ARGS", required = true, trailing_var_arg = true, allow_hyphen_values = true, num_args = 1..)]
    pub generate: Vec<OsString>,
}

// Exit code of `lmgen generate` when a signal stopped it cleanly (resume finishes the job).
use lmgen_core::job::EXIT_INTERRUPTED;

/// `s` as one bash word: unchanged when it is made of safe characters only, else in single
/// quotes (an embedded `'` becomes `'\''`).
pub fn shell_quote(s: &str) -> String {
    let safe = !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'_' | b'@' | b'%' | b'+' | b'=' | b':' | b',' | b'.' | b'/' | b'-'
                )
        });
    if safe {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// A value that can go on an `#SBATCH` line or into a SLURM option unquoted.
fn sbatch_value(flag: &str, v: &str) -> Result<String> {
    if v.is_empty()
        || v.chars().any(|c| {
            c.is_whitespace() || c.is_control() || matches!(c, '\'' | '"' | '#' | '\\' | '$' | '`')
        })
    {
        return Err(user_err!(
            "--{flag} '{v}': SLURM options cannot hold spaces, quotes, '#', '$' or backslashes"
        ));
    }
    Ok(v.to_string())
}

/// The generate arguments as the job will run them: `--resume` dropped (the script adds it),
/// `--shard` and `--overwrite` refused. Also validated by parsing them as `lmgen generate`.
fn generate_words(args: &SbatchArgs) -> Result<(Vec<String>, String, String)> {
    let mut words = Vec::new();
    for a in &args.generate {
        let Some(s) = a.to_str() else {
            return Err(user_err!(
                "generate argument {a:?} is not valid UTF-8 (not supported in job scripts)"
            ));
        };
        if s == "--resume" {
            continue;
        }
        if s == "--overwrite" {
            return Err(user_err!(
                "--overwrite in a job script would restart the job from scratch at every requeue; delete the old output first"
            ));
        }
        if s == "--shard" || s.starts_with("--shard=") {
            return Err(user_err!(
                "the job script passes --shard auto itself (one shard per array task or srun rank); drop --shard"
            ));
        }
        words.push(s.to_string());
    }
    if words.first().map(String::as_str) == Some("--") {
        words.remove(0);
    }
    let mut argv = vec!["lmgen".to_string(), "generate".to_string()];
    argv.extend(words.iter().cloned());
    let cli = match Cli::try_parse_from(&argv) {
        Ok(c) => c,
        Err(e) => {
            let text = e.render().to_string();
            let head: Vec<&str> = text.lines().take_while(|l| !l.trim().is_empty()).collect();
            let msg = crate::util::one_line(&head.join(" "));
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg).to_string();
            return Err(user_err!(
                "the generate arguments after the job options: {msg} (see lmgen generate --help)"
            ));
        }
    };
    let Command::Generate(g) = cli.command else {
        unreachable!("parsed as generate")
    };
    if g.output == "-" {
        return Err(user_err!(
            "a job needs an output file (--output OUT), not stdout"
        ));
    }
    if g.input.input == "-" {
        return Err(user_err!(
            "a job needs an input file (--input IN), not stdin"
        ));
    }
    Ok((words, g.input.input, g.output))
}

fn binary(args: &SbatchArgs) -> String {
    if let Some(b) = &args.lmgen {
        return b.clone();
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.canonicalize().ok())
        .and_then(|p| p.to_str().map(str::to_string))
        .unwrap_or_else(|| "lmgen".to_string())
}

/// The working directory of the job: `--chdir`, else the current directory.
fn workdir(args: &SbatchArgs) -> Result<String> {
    let dir = match &args.chdir {
        Some(d) => d.clone(),
        None => std::env::current_dir()
            .map_err(|e| user_err!("current directory: {e}"))?
            .to_str()
            .ok_or_else(|| user_err!("the current directory is not valid UTF-8; pass --chdir"))?
            .to_string(),
    };
    sbatch_value("chdir", &dir)
}

pub fn render(args: &SbatchArgs) -> Result<String> {
    let (words, input, output) = generate_words(args)?;
    let tasks = args.array as usize;
    let ntasks = args.ntasks.unwrap_or(1) as usize;
    if tasks > 1 && ntasks > 1 {
        return Err(user_err!(
            "give --array N (one shard per array task) or --ntasks N (one shard per srun rank), not both"
        ));
    }
    if args.max_running.is_some() && tasks == 1 {
        return Err(user_err!("--max-running needs --array N with N > 1"));
    }
    let name = sbatch_value("job-name", &args.job_name)?;
    let log_dir = sbatch_value("log-dir", &args.log_dir)?;
    let dir = workdir(args)?;
    let lmgen = binary(args);
    let tag = if tasks > 1 { "%A_%a" } else { "%j" };
    let log_out = format!("{}/{name}-{tag}.out", log_dir.trim_end_matches('/'));
    let log_err = format!("{}/{name}-{tag}.err", log_dir.trim_end_matches('/'));

    let mut s = String::new();
    let w = &mut s;
    let version = env!("CARGO_PKG_VERSION");
    writeln!(w, "#!/bin/bash").unwrap();
    writeln!(
        w,
        "# SLURM job for `lmgen generate`, printed by `lmgen sbatch` (lmgen {version})."
    )
    .unwrap();
    writeln!(w, "#").unwrap();
    if tasks > 1 {
        writeln!(w, "# {tasks} array tasks; task K writes shard K of {tasks} ({output}.shards/K-of-{tasks}.*) with").unwrap();
    } else if ntasks > 1 {
        writeln!(w, "# {ntasks} srun ranks; rank K writes shard K of {ntasks} ({output}.shards/K-of-{ntasks}.*) with").unwrap();
    } else {
        writeln!(
            w,
            "# One task, one shard: it writes {output} directly, with"
        )
        .unwrap();
    }
    if tasks > 1 {
        writeln!(w, "# `--resume --shard $SLURM_ARRAY_TASK_ID/{tasks}`, so the same command starts the job and").unwrap();
        writeln!(
            w,
            "# continues it after a requeue, a preemption or a time limit, or when a task is"
        )
        .unwrap();
        writeln!(
            w,
            "# submitted again alone, without losing or repeating records."
        )
        .unwrap();
    } else {
        writeln!(w, "# `--resume --shard auto`, so the same command starts the job and continues it after a").unwrap();
        writeln!(
            w,
            "# requeue, a preemption or a time limit, without losing or repeating records."
        )
        .unwrap();
    }
    writeln!(w, "# {input} -> {output}").unwrap();
    writeln!(w, "#").unwrap();
    let script = format!("{name}.sbatch");
    writeln!(
        w,
        "# Save this script (e.g. `lmgen sbatch ... > {script}`) and submit it; in bash, this"
    )
    .unwrap();
    writeln!(
        w,
        "# also submits the merge job, which runs once every task has succeeded:"
    )
    .unwrap();
    let merge_cmd = format!("{} merge {}", shell_quote(&lmgen), shell_quote(&output));
    let mut merge_job = format!(
        "sbatch --parsable --dependency=afterok:${{jid%%;*}} --job-name={name}-merge --chdir={dir} --output={}/{name}-merge-%j.out --time=00:30:00",
        log_dir.trim_end_matches('/')
    );
    if let Some(p) = &args.partition {
        write!(merge_job, " --partition={}", sbatch_value("partition", p)?).unwrap();
    }
    if let Some(a) = &args.account {
        write!(merge_job, " --account={}", sbatch_value("account", a)?).unwrap();
    }
    write!(merge_job, " --wrap={}", shell_quote(&merge_cmd)).unwrap();
    writeln!(w, "#   jid=$(sbatch --parsable {script}) && {merge_job}").unwrap();
    writeln!(w, "#").unwrap();
    writeln!(
        w,
        "# Progress: {} status {}",
        shell_quote(&lmgen),
        shell_quote(&output)
    )
    .unwrap();
    if tasks > 1 {
        writeln!(
            w,
            "# A task that was cancelled or failed: submit it again alone, e.g."
        )
        .unwrap();
        writeln!(w, "#   sbatch --array=2 {script}").unwrap();
        writeln!(
            w,
            "# (it resumes its shard), then merge by hand once all are done: {merge_cmd}"
        )
        .unwrap();
        writeln!(
            w,
            "# (merge writes nothing and lists the missing ids while a shard is incomplete)."
        )
        .unwrap();
    } else {
        writeln!(
            w,
            "# If the job was cancelled, submit it again: it resumes."
        )
        .unwrap();
    }
    writeln!(w, "#").unwrap();
    writeln!(w, "#SBATCH --job-name={name}").unwrap();
    if tasks > 1 {
        match args.max_running {
            Some(m) => writeln!(w, "#SBATCH --array=0-{}%{m}", tasks - 1).unwrap(),
            None => writeln!(w, "#SBATCH --array=0-{}", tasks - 1).unwrap(),
        }
        writeln!(w, "#SBATCH --ntasks=1").unwrap();
    } else {
        writeln!(w, "#SBATCH --ntasks={ntasks}").unwrap();
    }
    writeln!(w, "#SBATCH --cpus-per-task={}", args.cpus_per_task).unwrap();
    if let Some(g) = &args.gpus_per_task {
        writeln!(
            w,
            "#SBATCH --gpus-per-task={}",
            sbatch_value("gpus-per-task", g)?
        )
        .unwrap();
    }
    if let Some(m) = &args.mem {
        writeln!(w, "#SBATCH --mem={}", sbatch_value("mem", m)?).unwrap();
    }
    writeln!(w, "#SBATCH --time={}", sbatch_value("time", &args.time)?).unwrap();
    if let Some(p) = &args.partition {
        writeln!(w, "#SBATCH --partition={}", sbatch_value("partition", p)?).unwrap();
    }
    if let Some(a) = &args.account {
        writeln!(w, "#SBATCH --account={}", sbatch_value("account", a)?).unwrap();
    }
    writeln!(
        w,
        "# SIGUSR1 to this shell {} s before the time limit: lmgen stops cleanly and the task",
        args.signal_before
    )
    .unwrap();
    writeln!(
        w,
        "# is requeued (below); --requeue also lets SLURM requeue it after a node failure or"
    )
    .unwrap();
    writeln!(w, "# a preemption; logs are appended across restarts.").unwrap();
    writeln!(w, "#SBATCH --signal=B:USR1@{}", args.signal_before).unwrap();
    writeln!(w, "#SBATCH --requeue").unwrap();
    writeln!(w, "#SBATCH --open-mode=append").unwrap();
    writeln!(w, "#SBATCH --chdir={dir}").unwrap();
    writeln!(w, "#SBATCH --output={log_out}").unwrap();
    writeln!(w, "#SBATCH --error={log_err}").unwrap();
    for extra in &args.sbatch_option {
        let extra = extra.trim();
        let extra = if extra.starts_with('-') {
            extra.to_string()
        } else {
            format!("--{extra}")
        };
        writeln!(w, "#SBATCH {}", sbatch_value("sbatch-option", &extra)?).unwrap();
    }
    writeln!(w).unwrap();
    writeln!(w, "set -u").unwrap();
    writeln!(w, "LMGEN={}", shell_quote(&lmgen)).unwrap();
    writeln!(w, "echo \"lmgen job ${{SLURM_JOB_ID:-}} task ${{SLURM_ARRAY_TASK_ID:-0}} restart ${{SLURM_RESTART_COUNT:-0}} on $(hostname) at $(date -u +%FT%TZ)\" >&2").unwrap();
    writeln!(w).unwrap();
    writeln!(
        w,
        "# lmgen stops cleanly on SIGUSR1, SIGTERM or SIGINT: it writes every finished record"
    )
    .unwrap();
    writeln!(w, "# and exits {EXIT_INTERRUPTED}. scancel, `scontrol requeue` and preemption signal every process of").unwrap();
    writeln!(
        w,
        "# the job, lmgen too, so this shell ignores them and waits for lmgen (a second SIGTERM"
    )
    .unwrap();
    writeln!(
        w,
        "# would make lmgen exit at once). The time-limit warning reaches only this shell,"
    )
    .unwrap();
    writeln!(w, "# which passes it on and then requeues the task.").unwrap();
    writeln!(w, "time_up=0").unwrap();
    writeln!(w, "trap ':' TERM INT").unwrap();
    let launcher = if ntasks > 1 {
        "srun --kill-on-bad-exit=0 \"$LMGEN\""
    } else {
        "\"$LMGEN\""
    };
    let quoted: Vec<String> = words.iter().map(|a| shell_quote(a)).collect();
    writeln!(w, "{launcher} generate \\").unwrap();
    // One option (with its value) per line.
    let mut line = String::new();
    for q in &quoted {
        if q.starts_with('-') && !line.is_empty() {
            writeln!(w, "    {line} \\").unwrap();
            line.clear();
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(q);
    }
    if !line.is_empty() {
        writeln!(w, "    {line} \\").unwrap();
    }
    if tasks > 1 {
        // Not `auto`: a task submitted again alone (`sbatch --array=2`) runs in an array of
        // one task, but it is still shard 2 of N.
        writeln!(w, "    --resume --shard \"${{SLURM_ARRAY_TASK_ID:?submit this script with sbatch}}/{tasks}\" &").unwrap();
    } else {
        writeln!(w, "    --resume --shard auto &").unwrap();
    }
    writeln!(w, "pid=$!").unwrap();
    writeln!(w, "trap '' TERM INT").unwrap();
    writeln!(w, "trap 'time_up=1; kill -USR1 \"$pid\" 2>/dev/null' USR1").unwrap();
    writeln!(w, "while :; do").unwrap();
    writeln!(w, "    wait \"$pid\"; rc=$?").unwrap();
    writeln!(
        w,
        "    # the USR1 trap interrupts `wait`: wait again while lmgen runs"
    )
    .unwrap();
    writeln!(
        w,
        "    [ \"$rc\" -gt 128 ] && kill -0 \"$pid\" 2>/dev/null && continue"
    )
    .unwrap();
    writeln!(w, "    break").unwrap();
    writeln!(w, "done").unwrap();
    writeln!(w).unwrap();
    writeln!(w, "if [ \"$time_up\" = 1 ] && [ \"$rc\" -ne 0 ]; then").unwrap();
    writeln!(
        w,
        "    echo \"lmgen: time limit near; requeueing job $SLURM_JOB_ID (it resumes)\" >&2"
    )
    .unwrap();
    writeln!(w, "    scontrol requeue \"$SLURM_JOB_ID\"").unwrap();
    writeln!(w, "fi").unwrap();
    writeln!(w, "echo \"lmgen exited $rc at $(date -u +%FT%TZ)\" >&2").unwrap();
    writeln!(w, "exit \"$rc\"").unwrap();
    Ok(s)
}

pub fn sbatch(args: SbatchArgs) -> Result<()> {
    let script = render(&args)?;
    let (_, input, _) = generate_words(&args)?;
    let dir = workdir(&args)?;
    let input_path = std::path::Path::new(&dir).join(&input);
    if !input_path.exists() {
        eprintln!("lmgen: warning: the input {input} does not exist (yet) in {dir}");
    }
    print!("{script}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn quoting() {
        assert_eq!(shell_quote("abc/d-e_f.txt"), "abc/d-e_f.txt");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
        assert_eq!(shell_quote("\n"), "'\n'");
    }

    fn parse(a: &[&str]) -> SbatchArgs {
        let mut v: Vec<OsString> = vec![
            "lmgen".into(),
            "sbatch".into(),
            "--chdir".into(),
            "/scratch/project".into(),
            "--lmgen".into(),
            "/opt/lmgen/bin/lmgen".into(),
        ];
        v.extend(a.iter().map(OsString::from));
        match Cli::try_parse_from(v).unwrap().command {
            Command::Sbatch(s) => s,
            _ => panic!(),
        }
    }

    #[test]
    fn array_script() {
        let s = render(&parse(&[
            "--array",
            "4",
            "--cpus-per-task",
            "2",
            "--time",
            "0:10:00",
            "--",
            "m",
            "--input",
            "in.txt",
            "--output",
            "out dir/o.jsonl",
            "--stop",
            "it's",
            "--resume",
        ]))
        .unwrap();
        assert!(s.contains("#SBATCH --array=0-3\n"), "{s}");
        assert!(s.contains("#SBATCH --cpus-per-task=2\n"));
        assert!(s.contains("#SBATCH --time=0:10:00\n"));
        assert!(s.contains("#SBATCH --signal=B:USR1@120\n"));
        assert!(s.contains("#SBATCH --requeue\n"));
        assert!(s.contains("#SBATCH --open-mode=append\n"));
        assert!(s.contains("#SBATCH --output=./lmgen-%A_%a.out\n"));
        assert!(s.contains("'out dir/o.jsonl'"));
        assert!(s.contains(r"'it'\''s'"));
        assert!(
            s.contains(
                "--resume --shard \"${SLURM_ARRAY_TASK_ID:?submit this script with sbatch}/4\" &"
            ),
            "{s}"
        );
        let body: String = s.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(body.matches("--resume").count(), 1, "{s}");
        assert!(s.contains("--dependency=afterok:"));
        assert!(!s.contains("srun"));
    }

    #[test]
    fn ntasks_script_and_refusals() {
        let s = render(&parse(&[
            "--ntasks", "2", "m", "-i", "a.txt", "-o", "b.jsonl",
        ]))
        .unwrap();
        assert!(s.contains("#SBATCH --ntasks=2\n"));
        assert!(s.contains("srun --kill-on-bad-exit=0 \"$LMGEN\" generate"));
        assert!(!s.contains("--array"));
        assert!(s.contains("--resume --shard auto &"));
        for bad in [
            &["--array", "2", "--ntasks", "2", "m", "-i", "a", "-o", "b"][..],
            &["m", "-i", "a", "-o", "b", "--overwrite"],
            &["m", "-i", "a", "-o", "b", "--shard", "1/2"],
            &["m", "-i", "a", "-o", "-"],
            &["m", "-i", "a", "-o", "b", "--no-such-flag"],
            &["--partition", "a b", "m", "-i", "a", "-o", "b"],
        ] {
            assert!(render(&parse(bad)).is_err(), "{bad:?}");
        }
    }
}
