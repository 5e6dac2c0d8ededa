//! `lmgen merge` and `lmgen status`: shards of a job (`OUT.shards/K-of-N.EXT`) back into
//! one output in input order, and how far each shard got.
use super::input::{id_key, read_input, Entry};
use super::manifest::{lock_holder, Manifest};
use super::shard::{list_shards, shard_dir, Shard};
use super::sink::{format_for, sidecar_path, OutFormat};
use super::write_atomic;
use crate::error::{Error, Result};
use std::collections::HashMap;
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
    if !shard_dir(out).is_dir() && super::hidden::dir_for(out).is_dir() {
        // Not sharded: only the hidden-state chunks to put together.
        let format = format_for(&out.to_string_lossy());
        let order: Vec<(String, usize)> = read_records(out, format)?
            .into_iter()
            .filter(|(_, _, is_err)| !is_err)
            .map(|(k, _, _)| k)
            .collect();
        let n =
            super::hidden::consolidate(&[super::hidden::dir_for(out)], &order, &hidden_file(out))?;
        return Ok(Merged {
            records: n,
            shards: 1,
        });
    }
    let shards = shards_of(out)?;
    let n = shards[0].0.n;
    let first = &shards[0].2;
    let missing: Vec<String> = (0..n)
        .filter(|k| {
            !shards
                .iter()
                .any(|(s, _, m)| s.k == *k && (m.command != "embed" || m.progress.complete))
        })
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
    if first.command == "embed" {
        return merge_embed(out, &shards);
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
    let mut with_states: Vec<(String, usize)> = Vec::new();
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
                Some((b, is_err)) => {
                    ordered.push(b);
                    keys.push((key.clone(), s));
                    if !is_err {
                        with_states.push((key.clone(), s));
                    }
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
    if first
        .settings
        .get("hidden_states")
        .is_some_and(|v| !v.is_null())
    {
        let dirs: Vec<PathBuf> = shards
            .iter()
            .map(|(_, p, _)| super::hidden::dir_for(p))
            .collect();
        super::hidden::consolidate(&dirs, &with_states, &hidden_file(out))?;
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

/// `OUT.hidden.safetensors`: the merged hidden states of a `generate --hidden-states` job.
pub fn hidden_file(out: &Path) -> PathBuf {
    super::sidecar(out, "hidden.safetensors")
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
            let (_, records) = super::sink::jsonl_records(&path.display().to_string(), &data)?;
            for r in records {
                out.push((r.key, r.line.to_vec(), r.is_error));
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

/// Write an `embed` output: the tensors (f32, little-endian bytes) and the job's metadata
/// `all` (every top-level field as a string entry, and all of it as JSON under `lmgen`).
pub fn write_embed(
    path: &Path,
    all: &serde_json::Value,
    tensors: &[(String, Vec<usize>, Vec<u8>)],
) -> Result<()> {
    let mut meta = HashMap::new();
    if let serde_json::Value::Object(m) = all {
        for (k, v) in m {
            meta.insert(
                k.clone(),
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string()),
            );
        }
    }
    meta.insert("lmgen".to_string(), all.to_string());
    meta.insert("format".to_string(), "lmgen-embed-v1".to_string());
    let views = tensors
        .iter()
        .map(|(n, shape, b)| {
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b)
                .map(|v| (n.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Output(format!("{}: building safetensors: {e}", path.display())))?;
    let bytes = safetensors::serialize(views, Some(meta))
        .map_err(|e| Error::Output(format!("{}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// `embed` shards own contiguous runs of the input in shard order: their rows are
/// concatenated (pooled tensors `hidden.L` along rows, per-input tensors `hidden.L.ROW`
/// renumbered), and so are the ids, input ids and skipped lines of their metadata.
fn merge_embed(out: &Path, shards: &[(Shard, PathBuf, Manifest)]) -> Result<Merged> {
    let mut all: Option<serde_json::Value> = None;
    let mut pooled: Vec<(String, usize, Vec<u8>)> = Vec::new(); // name, width, rows bytes
    let mut rows_total = 0usize;
    let mut single: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (_, path, _) in shards {
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let bad = |e: String| Error::BadRequest(format!("{}: {e}", path.display()));
        let (_, header) =
            safetensors::SafeTensors::read_metadata(&data).map_err(|e| bad(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&data).map_err(|e| bad(e.to_string()))?;
        let meta: serde_json::Value = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("lmgen"))
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("no lmgen metadata".into()))?;
        let rows = meta["ids"].as_array().map_or(0, |a| a.len());
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        for name in names {
            let t = st.tensor(&name).map_err(|e| bad(e.to_string()))?;
            let parts: Vec<&str> = name.split('.').collect();
            match parts.as_slice() {
                ["hidden", _layer] => {
                    let width = t.shape().get(1).copied().unwrap_or(0);
                    match pooled.iter_mut().find(|(n, _, _)| *n == name) {
                        Some((_, w, buf)) if *w == width => buf.extend_from_slice(t.data()),
                        Some(_) => {
                            return Err(bad(format!("{name}: width differs between shards")))
                        }
                        None => pooled.push((name.clone(), width, t.data().to_vec())),
                    }
                }
                ["hidden", layer, row] => {
                    let row: usize = row
                        .parse()
                        .map_err(|_| bad(format!("unexpected tensor {name}")))?;
                    single.push((
                        format!("hidden.{layer}.{}", row + rows_total),
                        t.shape().to_vec(),
                        t.data().to_vec(),
                    ));
                }
                _ => return Err(bad(format!("unexpected tensor {name}"))),
            }
        }
        rows_total += rows;
        match &mut all {
            None => all = Some(meta),
            Some(a) => {
                for key in ["ids", "input_ids", "skipped"] {
                    if let (Some(dst), Some(src)) = (a[key].as_array_mut(), meta[key].as_array()) {
                        dst.extend(src.iter().cloned());
                    }
                }
            }
        }
    }
    let all = all.unwrap_or_default();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = pooled
        .into_iter()
        .map(|(n, w, b)| (n, vec![rows_total, w], b))
        .collect();
    tensors.extend(single);
    write_embed(out, &all, &tensors)?;
    let mut m = shards[0].2.clone();
    m.shard = Shard::WHOLE;
    m.progress.total = rows_total;
    m.progress.done = rows_total;
    m.progress.complete = true;
    m.write(&Manifest::path_for(out))?;
    Ok(Merged {
        records: rows_total,
        shards: shards.len(),
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
