//! `lmgen merge` and `lmgen status`: shards of a job (`OUT.shards/K-of-N.EXT`) back into
//! one output in input order, and how far each shard got.
use super::input::{id_key, read_input, Entry};
use super::manifest::{lock_holder, Manifest};
use super::shard::{list_shards, shard_dir, Shard};
use super::sink::{format_for, sidecar_path, OutFormat};
use super::{io_msg, sidecar};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The shards of `out`: all of one split `N`, with their manifests.
fn shards_of(out: &Path) -> Result<Vec<(Shard, PathBuf, Manifest)>> {
    let dir = shard_dir(out);
    if !dir.is_dir() {
        return Err(Error::BadRequest(format!(
            "{}: no shards ({} does not exist)",
            out.display(),
            dir.display()
        )));
    }
    let found = list_shards(&dir)?;
    let Some((first, _)) = found.first() else {
        return Err(Error::BadRequest(format!(
            "{}: no shard files in it",
            dir.display()
        )));
    };
    if let Some((other, _)) = found.iter().find(|(s, _)| s.n != first.n) {
        return Err(Error::BadRequest(format!(
            "{}: shards of different splits ({}-of-{} and {}-of-{}); remove the stale ones",
            dir.display(),
            first.k,
            first.n,
            other.k,
            other.n
        )));
    }
    let mut out = Vec::new();
    for (s, p) in found {
        let m = Manifest::read(&Manifest::path_for(&p))?
            .ok_or_else(|| Error::BadRequest(format!("{}: no manifest beside it", p.display())))?;
        out.push((s, p, m));
    }
    Ok(out)
}

/// What [`merge`] wrote.
#[derive(Debug)]
pub struct Merged {
    pub records: usize,
    pub shards: usize,
}

/// Check that the shards of `out` hold every record of the input exactly once and write `out`
/// in input order (atomically), with a manifest saying the whole job is complete. When
/// records are missing or duplicated, nothing is written and the error lists them.
pub fn merge(out: &Path) -> Result<Merged> {
    let shards = shards_of(out)?;
    let n = shards[0].0.n;
    let first = &shards[0].2;
    let missing: Vec<String> = (0..n)
        .filter(|k| !shards.iter().any(|(s, _, _)| s.k == *k))
        .map(|k| format!("{k}-of-{n}"))
        .collect();
    for (s, p, m) in &shards {
        let mut same = m.clone();
        same.shard = first.shard;
        if let Some(d) = first.differs(&same) {
            return Err(Error::BadRequest(format!(
                "{}: shard {s} is not the same job as shard {}: {d}",
                p.display(),
                first.shard
            )));
        }
    }
    if !missing.is_empty() {
        return Err(Error::Output(format!(
            "{}: shard file(s) missing: {}; nothing written",
            out.display(),
            missing.join(", ")
        )));
    }
    let format = format_for(&out.to_string_lossy());
    let input = read_input(&first.input.path, true)
        .map_err(|e| Error::BadRequest(format!("cannot read the job's input again: {e}")))?;
    if input.sha256 != first.input.sha256 {
        return Err(Error::BadRequest(format!(
            "{}: the input changed since the job ran; cannot merge",
            first.input.path
        )));
    }
    let default_n = first
        .settings
        .get("n")
        .and_then(|v| v.as_u64())
        .unwrap_or(1) as usize;

    // (id key, sample) -> (record bytes, is an error record)
    let mut records: HashMap<(String, usize), (Vec<u8>, bool)> = HashMap::new();
    let mut dups: Vec<String> = Vec::new();
    for (_, path, _) in &shards {
        for (key, body, is_err) in read_records(path, format)? {
            if records.insert(key.clone(), (body, is_err)).is_some() {
                dups.push(describe(&key));
            }
        }
    }
    let mut ordered: Vec<&[u8]> = Vec::new();
    let mut keys: Vec<(String, usize)> = Vec::new();
    let mut lost: Vec<String> = Vec::new();
    for e in &input.entries {
        let key = id_key(e.id());
        let n = match e {
            Entry::Ok(r) => r.overrides.n.unwrap_or(default_n),
            Entry::Bad(_) => 1,
        };
        // An error record stands for all samples of its input.
        let n = match records.get(&(key.clone(), 0)) {
            Some((_, true)) => 1,
            _ => n,
        };
        for s in 0..n {
            match records.get(&(key.clone(), s)) {
                Some((b, _)) => {
                    ordered.push(b);
                    keys.push((key.clone(), s));
                }
                None => lost.push(describe(&(key.clone(), s))),
            }
        }
    }
    let extra = records.len() - ordered.len();
    if !lost.is_empty() || !dups.is_empty() || extra > 0 {
        let list = |v: &[String]| {
            let head: Vec<&str> = v.iter().take(10).map(String::as_str).collect();
            let more = if v.len() > 10 {
                format!(" and {} more", v.len() - 10)
            } else {
                String::new()
            };
            format!("{}{more}", head.join(", "))
        };
        let mut what = Vec::new();
        if !lost.is_empty() {
            what.push(format!("{} missing ({})", lost.len(), list(&lost)));
        }
        if !dups.is_empty() {
            what.push(format!("{} duplicated ({})", dups.len(), list(&dups)));
        }
        if extra > 0 {
            what.push(format!("{extra} not in the input"));
        }
        return Err(Error::Output(format!(
            "{}: not merged, records {}; nothing written (rerun the shards with --resume)",
            out.display(),
            what.join("; ")
        )));
    }

    // Write OUT (and, for text, its progress file) atomically.
    let mut body: Vec<u8> = Vec::new();
    let mut side: Vec<u8> = Vec::new();
    for (b, (key, s)) in ordered.iter().zip(&keys) {
        match format {
            OutFormat::Jsonl => {
                body.extend_from_slice(b);
                body.push(b'\n');
            }
            OutFormat::Text => {
                if !body.is_empty() {
                    body.push(b'\n');
                }
                body.extend_from_slice(b);
                body.push(b'\n');
                side.extend_from_slice(format!("{key}\t{s}\t{}\n", body.len()).as_bytes());
            }
        }
    }
    if format == OutFormat::Text {
        write_atomic(&sidecar_path(out), &side)?;
    }
    write_atomic(out, &body)?;
    let mut m = first.clone();
    m.shard = Shard::WHOLE;
    m.progress.total = ordered.len();
    m.progress.done = ordered.len();
    m.progress.complete = true;
    m.progress.stopped = None;
    m.progress.tokens = shards.iter().map(|(_, _, m)| m.progress.tokens).sum();
    m.progress.seconds = shards.iter().map(|(_, _, m)| m.progress.seconds).sum();
    m.write(&Manifest::path_for(out))?;
    Ok(Merged {
        records: ordered.len(),
        shards: shards.len(),
    })
}

fn describe((key, s): &(String, usize)) -> String {
    if *s == 0 {
        format!("id {key}")
    } else {
        format!("id {key} sample {s}")
    }
}

/// The records of one shard file: JSONL lines, or text blocks delimited by the progress file.
#[allow(clippy::type_complexity)]
fn read_records(path: &Path, format: OutFormat) -> Result<Vec<((String, usize), Vec<u8>, bool)>> {
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    match format {
        OutFormat::Jsonl => {
            let complete = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            for (i, line) in data[..complete].split(|&b| b == b'\n').enumerate() {
                if line.trim_ascii().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_slice(line).map_err(|e| {
                    Error::BadRequest(format!(
                        "{}:{}: not a JSON record ({e})",
                        path.display(),
                        i + 1
                    ))
                })?;
                let id = v.get("id").or_else(|| v.get("custom_id")).ok_or_else(|| {
                    Error::BadRequest(format!(
                        "{}:{}: record has no \"id\"",
                        path.display(),
                        i + 1
                    ))
                })?;
                let sample = v.get("sample").and_then(|s| s.as_u64()).unwrap_or(0) as usize;
                let is_err = v.get("error").is_some_and(|e| !e.is_null());
                out.push(((id_key(id), sample), line.to_vec(), is_err));
            }
        }
        OutFormat::Text => {
            let side = sidecar_path(path);
            let sdata = std::fs::read(&side).map_err(|e| Error::io(&side, e))?;
            let mut start = 0usize;
            for line in sdata.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                let line = String::from_utf8_lossy(line);
                let mut parts = line.rsplitn(3, '\t');
                let (Some(end), Some(sample), Some(id)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(Error::BadRequest(format!(
                        "{}: malformed progress line",
                        side.display()
                    )));
                };
                let (Ok(end), Ok(sample)) = (end.parse::<usize>(), sample.parse::<usize>()) else {
                    return Err(Error::BadRequest(format!(
                        "{}: malformed progress line",
                        side.display()
                    )));
                };
                if end > data.len() || end < start {
                    return Err(Error::BadRequest(format!(
                        "{}: shorter than its progress file {}",
                        path.display(),
                        side.display()
                    )));
                }
                let mut rec = &data[start..end];
                if start > 0 {
                    rec = rec.strip_prefix(b"\n").unwrap_or(rec);
                }
                let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
                let is_err = rec.starts_with(b"lmgen: error: ");
                out.push(((id.to_string(), sample), rec.to_vec(), is_err));
                start = end;
            }
        }
    }
    Ok(out)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let err = |e: std::io::Error| Error::Output(format!("{}: {}", path.display(), io_msg(&e)));
    let tmp = sidecar(path, &format!("tmp-{}", std::process::id()));
    let mut f = std::fs::File::create(&tmp).map_err(err)?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

/// One shard's state for `lmgen status`.
#[derive(Debug)]
pub struct ShardStatus {
    pub shard: Shard,
    pub path: PathBuf,
    pub progress: super::manifest::Progress,
    /// `host ..., pid ...` of the process writing it now, if one is.
    pub running: Option<String>,
}

/// The state of every shard of `out` (or of `out` itself when it was not sharded).
pub fn status(out: &Path) -> Result<Vec<ShardStatus>> {
    let entries: Vec<(Shard, PathBuf, Manifest)> = if shard_dir(out).is_dir() {
        shards_of(out)?
    } else {
        let m = Manifest::read(&Manifest::path_for(out))?.ok_or_else(|| {
            Error::BadRequest(format!(
                "{}: no job here (neither {} nor {})",
                out.display(),
                Manifest::path_for(out).display(),
                shard_dir(out).display()
            ))
        })?;
        vec![(m.shard, out.to_path_buf(), m)]
    };
    Ok(entries
        .into_iter()
        .map(|(shard, path, m)| ShardStatus {
            shard,
            running: lock_holder(&path),
            path,
            progress: m.progress,
        })
        .collect())
}
