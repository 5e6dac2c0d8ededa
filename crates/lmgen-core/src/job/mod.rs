//! The job layer: what every command that turns an input file into an output file shares.
//! Input files ([`input`]), output sinks with ordered writing and `--resume`
//! ([`sink`]), the job's identity and progress in a manifest with an exclusive lock
//! ([`manifest`]), splitting over processes ([`shard`]) and putting shards back together
//! ([`merge`]).
//!
//! A [`Job`] is opened before the model is loaded (so a wrong path, a second writer or a
//! resume of another job fails at once), told which records it owns once prompts are
//! tokenized, and then fed the records as they are written.
pub mod hidden;
pub mod input;
pub mod manifest;
pub mod merge;
pub mod openai;
pub mod shard;
pub mod sink;

pub use input::{id_key, read_input, BadRecord, Entry, Input, InputRecord, Overrides, PromptSrc};
pub use manifest::{InputIdentity, Manifest, ModelIdentity, Progress};
pub use shard::Shard;
pub use sink::{format_for, OutFormat, OutRecord, OutputPlan, RecordWriter};

use crate::error::{Error, Result};
use manifest::JobLock;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Exit code of a run stopped by SIGTERM, SIGINT or SIGUSR1 after writing every finished
/// record (`EX_TEMPFAIL`: run it again with `--resume`).
pub const EXIT_INTERRUPTED: i32 = 75;

/// How often the manifest's progress is written while a job runs.
const SYNC_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// An I/O error without the "(os error N)" suffix.
pub fn io_msg(e: &std::io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `PATH.SUFFIX` (a file lmgen keeps beside an output).
pub(crate) fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".");
    s.push(suffix);
    PathBuf::from(s)
}

/// Write `bytes` to `path` atomically: a temporary file beside it (mode from the umask, as
/// any new file), fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let err = |e: std::io::Error| Error::Output(format!("{}: {}", path.display(), io_msg(&e)));
    let tmp = sidecar(path, &format!("tmp-{}", std::process::id()));
    let written = std::fs::File::create(&tmp)
        .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
        .and_then(|_| std::fs::rename(&tmp, path));
    written.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a job is, as the command line gives it.
pub struct JobConfig<'a> {
    /// `generate`, `score` or `embed`.
    pub command: &'static str,
    /// Input path, or `-` for standard input.
    pub input: &'a str,
    /// Output path, or `-` for standard output.
    pub output: &'a str,
    pub format: OutFormat,
    pub resume: bool,
    pub overwrite: bool,
    /// Bad lines become error records instead of failing the job.
    pub skip_bad: bool,
    pub shard: Shard,
    /// Whether the output can be resumed record by record (`embed` writes one file at the end).
    pub resumable: bool,
    /// The model as named and its location.
    pub model_name: &'a str,
    pub model_path: &'a Path,
    /// Every setting that changes what a record contains.
    pub settings: Map<String, Value>,
}

/// An open job: its input, where its records go, its lock and manifest.
pub struct Job {
    pub input: Input,
    /// Where this process writes (the shard file, or the output itself), and the records
    /// already there.
    pub plan: OutputPlan,
    pub shard: Shard,
    /// Problems worth a warning (e.g. no locking on this file system).
    pub warnings: Vec<String>,
    manifest: Option<(PathBuf, Manifest)>,
    _lock: Option<JobLock>,
    started: Instant,
    last_sync: Instant,
    /// Seconds and tokens of earlier runs.
    base_seconds: f64,
    base_tokens: u64,
    tokens: u64,
}

impl Job {
    /// Read and check the input, check the output path, take the lock, check that a resumed
    /// output belongs to this same job, and record the job in the manifest.
    pub fn open(cfg: JobConfig) -> Result<Job> {
        let input = read_input(cfg.input, cfg.skip_bad)?;
        if input.openai && cfg.command != "generate" {
            return Err(Error::BadRequest(format!(
                "{}: an OpenAI batch file (lines with custom_id, url, body) is read by `lmgen generate`, not `{}`",
                input.name, cfg.command
            )));
        }
        if input.openai && cfg.format != OutFormat::Jsonl {
            return Err(Error::BadRequest(format!(
                "{}: an OpenAI batch file gives JSONL output; name the output .jsonl (or - for standard output)",
                cfg.output
            )));
        }
        let shard = cfg.shard;
        if !shard.is_whole() {
            if cfg.output == "-" {
                return Err(Error::BadRequest(format!(
                    "--shard {shard}: each shard writes its own file; give --output FILE"
                )));
            }
            if cfg.input == "-" {
                return Err(Error::BadRequest(format!(
                    "--shard {shard}: every shard reads the whole input; give --input FILE, not standard input"
                )));
            }
        }
        let (fingerprint, model_files) = manifest::model_fingerprint(cfg.model_path)?;
        if cfg.output == "-" {
            let plan = sink::plan("-", cfg.format, false, false)?;
            return Ok(Job::new(input, plan, shard, None, None, vec![]));
        }
        let out = Path::new(cfg.output);
        check_not_input_or_model(out, cfg.input, cfg.model_path, &model_files)?;
        let target = shard.path(out);
        // Shards of another split (or an unmerged sharded job under a whole-job run) would
        // mix two jobs in one output.
        let dir = shard::shard_dir(out);
        if dir.is_dir() && !cfg.overwrite {
            if let Some((other, _)) = shard::list_shards(&dir)?
                .into_iter()
                .find(|(s, _)| s.n != shard.n)
            {
                if !shard.is_whole() || !out.exists() {
                    return Err(Error::BadRequest(format!(
                        "{}: holds shards of a {}-way split of this output; run with --shard K/{} (or `lmgen merge {}` first, or remove it)",
                        dir.display(),
                        other.n,
                        other.n,
                        out.display()
                    )));
                }
            }
        }
        if !shard.is_whole() {
            sink::check_output_path(cfg.output)?;
            let dir = shard::shard_dir(out);
            std::fs::create_dir_all(&dir).map_err(|e| {
                Error::BadRequest(format!("{}: cannot create: {}", dir.display(), io_msg(&e)))
            })?;
        }
        let target_str = target.to_string_lossy().to_string();
        sink::check_output_path(&target_str)?;
        let (lock, lock_warning) = JobLock::acquire(&target)?;
        let mut warnings: Vec<String> = lock_warning.into_iter().collect();

        let mpath = Manifest::path_for(&target);
        let mut now = Manifest {
            lmgen: crate::version().to_string(),
            command: cfg.command.to_string(),
            model: ModelIdentity {
                name: cfg.model_name.to_string(),
                path: cfg.model_path.display().to_string(),
                fingerprint,
            },
            settings: cfg.settings,
            input: InputIdentity {
                // Absolute, so that `lmgen merge` finds it from anywhere.
                path: Path::new(cfg.input)
                    .canonicalize()
                    .map_or_else(|_| cfg.input.to_string(), |p| p.display().to_string()),
                sha256: input.sha256.clone(),
                records: input.entries.len(),
            },
            shard,
            output: cfg.output.to_string(),
            progress: Progress {
                runs: 1,
                ..Default::default()
            },
        };
        let exists = target.exists();
        if exists && !cfg.overwrite {
            if !cfg.resume || !cfg.resumable {
                let hint = if cfg.resumable {
                    "use --resume to continue or --overwrite"
                } else {
                    "use --overwrite"
                };
                return Err(Error::BadRequest(format!("{target_str} exists; {hint}")));
            }
            match Manifest::read(&mpath)? {
                Some(old) => {
                    if let Some(d) = old.differs(&now) {
                        return Err(Error::BadRequest(format!(
                            "{target_str}: --resume refused, not the same job: {d} (see {}; --overwrite starts again)",
                            mpath.display()
                        )));
                    }
                    now.progress = Progress {
                        runs: old.progress.runs + 1,
                        complete: false,
                        stopped: None,
                        ..old.progress
                    };
                }
                None => warnings.push(format!(
                    "{target_str} has no manifest ({}): cannot check that it is the same job",
                    mpath.display()
                )),
            }
        }
        let plan = sink::plan(&target_str, cfg.format, cfg.resume && exists, cfg.overwrite)?;
        now.progress.done = plan.done.len();
        now.progress.updated = unix_now();
        now.write(&mpath)?;
        Ok(Job::new(
            input,
            plan,
            shard,
            Some((mpath, now)),
            lock,
            warnings,
        ))
    }

    fn new(
        input: Input,
        plan: OutputPlan,
        shard: Shard,
        manifest: Option<(PathBuf, Manifest)>,
        lock: Option<JobLock>,
        warnings: Vec<String>,
    ) -> Job {
        let (base_seconds, base_tokens) = manifest
            .as_ref()
            .map_or((0.0, 0), |(_, m)| (m.progress.seconds, m.progress.tokens));
        Job {
            input,
            plan,
            shard,
            warnings,
            manifest,
            _lock: lock,
            started: Instant::now(),
            last_sync: Instant::now(),
            base_seconds,
            base_tokens,
            tokens: 0,
        }
    }

    /// Which entries of the input this process owns, given each entry's cost in tokens
    /// (prompt plus tokens to generate); all of them for the whole job.
    pub fn owned(&self, costs: &[u64]) -> Vec<bool> {
        if self.shard.is_whole() {
            return vec![true; costs.len()];
        }
        Shard::owners(costs, self.shard.n)
            .into_iter()
            .map(|o| o == self.shard.k)
            .collect()
    }

    /// The number of records (samples) this process owns, written or not.
    pub fn set_total(&mut self, total: usize) -> Result<()> {
        if let Some((_, m)) = &mut self.manifest {
            m.progress.total = total;
        }
        self.sync_manifest()
    }

    /// `records` more records were written and `tokens` more tokens processed; the manifest
    /// is brought up to date every few seconds.
    pub fn progress(&mut self, records: usize, tokens: u64) -> Result<()> {
        self.tokens += tokens;
        if let Some((_, m)) = &mut self.manifest {
            m.progress.done += records;
        }
        if self.last_sync.elapsed() >= SYNC_EVERY {
            self.sync_manifest()?;
        }
        Ok(())
    }

    fn sync_manifest(&mut self) -> Result<()> {
        self.last_sync = Instant::now();
        let seconds = self.base_seconds + self.started.elapsed().as_secs_f64();
        let tokens = self.base_tokens + self.tokens;
        if let Some((path, m)) = &mut self.manifest {
            m.progress.seconds = seconds;
            m.progress.tokens = tokens;
            m.progress.updated = unix_now();
            m.write(path)?;
        }
        Ok(())
    }

    /// Record the end of this run: `complete` when every owned record is written, or why it
    /// stopped early.
    pub fn finish(&mut self, complete: bool, stopped: Option<&str>) -> Result<()> {
        if let Some((_, m)) = &mut self.manifest {
            m.progress.complete = complete;
            m.progress.stopped = stopped.map(str::to_string);
        }
        self.sync_manifest()
    }

    /// Whether the manifest already says this shard is complete (nothing to do on resume).
    pub fn was_complete(&self) -> bool {
        self.manifest
            .as_ref()
            .is_some_and(|(_, m)| m.progress.total > 0 && m.progress.done >= m.progress.total)
    }
}

/// Refuse an output that is the input or one of the model's files.
fn check_not_input_or_model(
    out: &Path,
    input: &str,
    model: &Path,
    model_files: &[PathBuf],
) -> Result<()> {
    let canon = |p: &Path| -> Option<PathBuf> {
        if let Ok(c) = p.canonicalize() {
            return Some(c);
        }
        // Not there yet: its folder's canonical path plus its name.
        let parent = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        Some(parent.canonicalize().ok()?.join(p.file_name()?))
    };
    let Some(o) = canon(out) else { return Ok(()) };
    if input != "-" && canon(Path::new(input)).as_ref() == Some(&o) {
        return Err(Error::BadRequest(format!(
            "{}: the output is the input file; choose another output",
            out.display()
        )));
    }
    let is_model = canon(model).as_ref() == Some(&o)
        || model_files.iter().any(|f| canon(f).as_ref() == Some(&o));
    if is_model {
        return Err(Error::BadRequest(format!(
            "{}: the output is a file of the model {}; choose another output",
            out.display(),
            model.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg<'a>(input: &'a str, output: &'a str, model: &'a Path) -> JobConfig<'a> {
        JobConfig {
            command: "generate",
            input,
            output,
            format: format_for(output),
            resume: true,
            overwrite: false,
            skip_bad: false,
            shard: Shard::WHOLE,
            resumable: true,
            model_name: "m",
            model_path: model,
            settings: Map::new(),
        }
    }

    #[test]
    fn refuses_input_and_model_as_output() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        let inp = dir.path().join("in.txt");
        std::fs::write(&inp, "a\nb\n").unwrap();
        let i = inp.to_str().unwrap();
        let e = Job::open(cfg(i, i, &model)).err().unwrap().to_string();
        assert!(e.contains("the output is the input file"), "{e}");
        let c = model.join("config.json");
        let e = Job::open(cfg(i, c.to_str().unwrap(), &model))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("is a file of the model"), "{e}");
        assert_eq!(std::fs::read_to_string(&inp).unwrap(), "a\nb\n");
    }

    #[test]
    fn resume_checks_identity_and_shards_write_beside() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, "GGUF").unwrap();
        let inp = dir.path().join("in.txt");
        std::fs::write(&inp, "a\nb\n").unwrap();
        let out = dir.path().join("out.jsonl");
        let (i, o) = (inp.to_str().unwrap(), out.to_str().unwrap());
        let mut c = cfg(i, o, &model);
        c.settings.insert("temperature".into(), Value::from(0.5));
        let mut job = Job::open(c).unwrap();
        job.set_total(2).unwrap();
        let mut w = RecordWriter::open(&job.plan, vec![(0, 0), (1, 0)]).unwrap();
        w.push(OutRecord {
            index: 0,
            sample: 0,
            id_key: "0".into(),
            body: "{\"id\":0}".into(),
        })
        .unwrap();
        job.progress(1, 10).unwrap();
        job.finish(false, Some("SIGTERM")).unwrap();
        drop((w, job));
        let m = Manifest::read(&Manifest::path_for(&out)).unwrap().unwrap();
        assert_eq!(
            (m.progress.total, m.progress.done, m.progress.tokens),
            (2, 1, 10)
        );

        let mut c = cfg(i, o, &model);
        c.settings.insert("temperature".into(), Value::from(0.7));
        let e = Job::open(c).err().unwrap().to_string();
        assert!(
            e.contains("not the same job: temperature was 0.5 and is now 0.7"),
            "{e}"
        );

        let mut c = cfg(i, o, &model);
        c.settings.insert("temperature".into(), Value::from(0.5));
        let job = Job::open(c).unwrap();
        assert_eq!(job.plan.done.len(), 1);
        // A second writer is refused while the first holds the lock.
        let mut c = cfg(i, o, &model);
        c.settings.insert("temperature".into(), Value::from(0.5));
        let e = Job::open(c).err().unwrap().to_string();
        assert!(e.contains("another lmgen is writing it"), "{e}");
        drop(job);

        let mut c = cfg(i, o, &model);
        c.shard = Shard { k: 1, n: 2 };
        let job = Job::open(c).unwrap();
        assert!(
            dir.path().join("out.jsonl.shards/1-of-2.jsonl").exists()
                || job.plan.path.as_deref()
                    == Some(dir.path().join("out.jsonl.shards/1-of-2.jsonl").as_path())
        );
        assert_eq!(job.owned(&[5, 5, 5, 5]), vec![false, false, true, true]);
    }
}
