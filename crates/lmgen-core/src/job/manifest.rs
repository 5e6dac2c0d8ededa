//! What a job is and how far it got (`OUT.lmgen-manifest.json` beside each output file), and
//! the exclusive lock (`OUT.lmgen-lock`) that keeps a second process from writing the same
//! output.
use super::shard::Shard;
use super::{io_msg, sidecar};
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// The model a job runs: how it was named, where it was found, and a fingerprint of its
/// files (names and sizes of the config, tokenizer and weight files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelIdentity {
    pub name: String,
    pub path: String,
    pub fingerprint: String,
}

/// The input of a job: its path and a hash of its bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputIdentity {
    pub path: String,
    pub sha256: String,
    pub records: usize,
}

/// How far a shard got. Updated while the job runs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Records (samples) this shard owns; 0 until known.
    pub total: usize,
    /// Records written.
    pub done: usize,
    /// Tokens processed (prompt + generated) by all runs so far.
    pub tokens: u64,
    /// Seconds spent running (all runs), for rates and the ETA.
    pub seconds: f64,
    /// Unix time of the last update.
    pub updated: u64,
    /// How many times the job was started (1 + resumes).
    pub runs: u32,
    /// Every owned record is written.
    pub complete: bool,
    /// Why the last run stopped early (a signal), if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
}

/// `OUT.lmgen-manifest.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// The lmgen version that wrote the output.
    pub lmgen: String,
    /// `generate`, `score` or `embed`.
    pub command: String,
    pub model: ModelIdentity,
    /// Every setting that changes a record's content.
    pub settings: Map<String, Value>,
    pub input: InputIdentity,
    pub shard: Shard,
    /// The job's final output (shards are merged into it).
    pub output: String,
    pub progress: Progress,
}

impl Manifest {
    pub fn path_for(out: &Path) -> PathBuf {
        sidecar(out, "lmgen-manifest.json")
    }

    pub fn read(path: &Path) -> Result<Option<Manifest>> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                Error::BadRequest(format!(
                    "{}: not an lmgen manifest ({e}); move it away or use --overwrite",
                    path.display()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::BadRequest(format!(
                "{}: cannot read: {}",
                path.display(),
                io_msg(&e)
            ))),
        }
    }

    /// Write atomically (temporary file, fsync, rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut text = serde_json::to_string_pretty(self).expect("serializable manifest");
        text.push('\n');
        super::write_atomic(path, text.as_bytes())
    }

    /// The first field in which `self` (found beside the output) and `now` (this run) are
    /// not the same job, as a message; `None` when they are.
    pub fn differs(&self, now: &Manifest) -> Option<String> {
        let show = |v: &Value| match v {
            Value::Null => "unset".to_string(),
            v => v.to_string(),
        };
        let field = |name: &str, was: Value, is: Value| {
            (was != is).then(|| format!("{name} was {} and is now {}", show(&was), show(&is)))
        };
        let j = |s: &str| Value::from(s);
        field("the lmgen version", j(&self.lmgen), j(&now.lmgen))
            .or_else(|| field("the command", j(&self.command), j(&now.command)))
            .or_else(|| {
                (self.model.fingerprint != now.model.fingerprint).then(|| {
                    format!(
                        "the model was {} ({}) and is now {} ({}): not the same files",
                        self.model.name, self.model.path, now.model.name, now.model.path
                    )
                })
            })
            .or_else(|| {
                let mut keys: Vec<&String> = self.settings.keys().collect();
                keys.extend(
                    now.settings
                        .keys()
                        .filter(|k| !self.settings.contains_key(*k)),
                );
                keys.into_iter().find_map(|k| {
                    let was = self.settings.get(k).cloned().unwrap_or(Value::Null);
                    let is = now.settings.get(k).cloned().unwrap_or(Value::Null);
                    field(k, was, is)
                })
            })
            .or_else(|| {
                (self.input.sha256 != now.input.sha256).then(|| {
                    format!(
                        "the input was {} and is now {} with other content",
                        self.input.path, now.input.path
                    )
                })
            })
            .or_else(|| {
                field(
                    "the shard",
                    j(&self.shard.to_string()),
                    j(&now.shard.to_string()),
                )
            })
    }
}

/// A fingerprint of a model's files: SHA-256 over the sorted names and sizes of its config,
/// tokenizer and weight files (a directory), or of the file itself (GGUF).
pub fn model_fingerprint(path: &Path) -> Result<(String, Vec<PathBuf>)> {
    let mut files: Vec<(String, u64, PathBuf)> = Vec::new();
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        let rd = std::fs::read_dir(path).map_err(|e| Error::io(path, e))?;
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().to_string();
            let model_file = name.ends_with(".json")
                || name.ends_with(".safetensors")
                || name.ends_with(".bin")
                || name.ends_with(".gguf")
                || name.ends_with(".model")
                || name.ends_with(".txt");
            if let (true, Ok(m)) = (model_file, ent.metadata()) {
                if m.is_file() {
                    files.push((name, m.len(), ent.path()));
                }
            }
        }
    } else {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        files.push((name, meta.len(), path.to_path_buf()));
    }
    files.sort();
    let listing: String = files
        .iter()
        .map(|(n, size, _)| format!("{n}\t{size}\n"))
        .collect();
    Ok((
        super::sha256_hex(listing.as_bytes()),
        files.into_iter().map(|(_, _, p)| p).collect(),
    ))
}

/// An exclusive advisory lock (`flock`) on `OUT.lmgen-lock`, held while the process runs.
/// The kernel drops it when the process ends, however it ends: a lock left by a killed job
/// never blocks the next one.
pub struct JobLock {
    _file: File,
}

impl JobLock {
    /// Lock the output `out`, or fail naming the process that holds it. On a file system
    /// without `flock` support the job runs unlocked after a warning (returned).
    pub fn acquire(out: &Path) -> Result<(Option<JobLock>, Option<String>)> {
        let path = sidecar(out, "lmgen-lock");
        let err = |e: std::io::Error| {
            Error::BadRequest(format!(
                "{}: cannot open the lock file: {}",
                path.display(),
                io_msg(&e)
            ))
        };
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(err)?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = f.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(Error::BadRequest(format!(
                    "{}: another lmgen is writing it ({}); wait for it to end or stop it",
                    out.display(),
                    if holder.is_empty() {
                        "holder unknown".to_string()
                    } else {
                        holder.to_string()
                    }
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Ok((
                    None,
                    Some(format!(
                        "{}: cannot lock ({}); make sure no other job writes this output",
                        path.display(),
                        io_msg(&e)
                    )),
                ));
            }
        }
        let me = format!("host {}, pid {}\n", hostname(), std::process::id());
        let _ = f
            .set_len(0)
            .and_then(|_| f.seek(SeekFrom::Start(0)))
            .and_then(|_| f.write_all(me.as_bytes()))
            .and_then(|_| f.flush());
        Ok((Some(JobLock { _file: f }), None))
    }
}

/// The process holding the lock of output `out` (`host ..., pid ...`), if one does.
pub fn lock_holder(out: &Path) -> Option<String> {
    let path = sidecar(out, "lmgen-lock");
    let mut f = OpenOptions::new().read(true).write(true).open(path).ok()?;
    match f.try_lock() {
        Ok(()) => None,
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            Some(holder.trim().to_string())
        }
        Err(_) => None,
    }
}

/// This machine's name (for lock holders and status).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        let mut settings = Map::new();
        settings.insert("temperature".into(), Value::from(0.9));
        Manifest {
            lmgen: "1".into(),
            command: "generate".into(),
            model: ModelIdentity {
                name: "m".into(),
                path: "/m".into(),
                fingerprint: "f".into(),
            },
            settings,
            input: InputIdentity {
                path: "in.txt".into(),
                sha256: "h".into(),
                records: 3,
            },
            shard: Shard::WHOLE,
            output: "out.jsonl".into(),
            progress: Progress::default(),
        }
    }

    #[test]
    fn differs_names_the_first_field() {
        let a = manifest();
        let mut b = a.clone();
        b.progress.done = 7;
        b.model.path = "/elsewhere".into();
        assert_eq!(
            a.differs(&b),
            None,
            "progress and model paths are not identity"
        );
        b.settings.insert("temperature".into(), Value::from(0.7));
        assert_eq!(a.differs(&b).unwrap(), "temperature was 0.9 and is now 0.7");
        b.settings.insert("seed".into(), Value::from(1));
        b.settings.insert("temperature".into(), Value::from(0.9));
        assert_eq!(a.differs(&b).unwrap(), "seed was unset and is now 1");
        let mut c = a.clone();
        c.input.sha256 = "other".into();
        assert!(a.differs(&c).unwrap().contains("other content"));
        let mut c = a.clone();
        c.model.fingerprint = "g".into();
        assert!(a.differs(&c).unwrap().starts_with("the model was m"));
        let mut c = a.clone();
        c.shard = Shard { k: 1, n: 2 };
        assert_eq!(
            a.differs(&c).unwrap(),
            "the shard was \"0/1\" and is now \"1/2\""
        );
    }

    #[test]
    fn write_read_and_lock() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("o.jsonl");
        let m = manifest();
        let p = Manifest::path_for(&out);
        assert!(Manifest::read(&p).unwrap().is_none());
        m.write(&p).unwrap();
        assert_eq!(Manifest::read(&p).unwrap().unwrap().differs(&m), None);
        std::fs::write(&p, "{").unwrap();
        assert!(Manifest::read(&p)
            .unwrap_err()
            .to_string()
            .contains("not an lmgen manifest"));

        let (lock, warn) = JobLock::acquire(&out).unwrap();
        assert!(lock.is_some() && warn.is_none());
        let e = JobLock::acquire(&out)
            .err()
            .expect("second lock fails")
            .to_string();
        assert!(
            e.contains("another lmgen is writing it")
                && e.contains(&format!("pid {}", std::process::id())),
            "{e}"
        );
        assert!(lock_holder(&out).unwrap().contains("pid"));
        drop(lock);
        assert_eq!(lock_holder(&out), None);
        assert!(
            JobLock::acquire(&out).unwrap().0.is_some(),
            "released on drop"
        );
    }

    #[test]
    fn fingerprint_changes_with_the_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        std::fs::write(dir.path().join("model.safetensors"), "xx").unwrap();
        std::fs::write(dir.path().join("notes.md"), "ignored").unwrap();
        let (a, files) = model_fingerprint(dir.path()).unwrap();
        assert_eq!(files.len(), 2);
        std::fs::write(dir.path().join("notes.md"), "still ignored").unwrap();
        assert_eq!(model_fingerprint(dir.path()).unwrap().0, a);
        std::fs::write(dir.path().join("model.safetensors"), "xxx").unwrap();
        assert_ne!(model_fingerprint(dir.path()).unwrap().0, a);
    }
}
