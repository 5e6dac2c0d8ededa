//! Output files: checks before any model work, `--resume` bookkeeping, and the ordered
//! record writer (a reorder buffer keyed by (input index, sample)).
//!
//! JSONL (`OUT` ending in `.jsonl`/`.ndjson`, or `-`): one record per line. On `--resume`,
//! the bytes after the last newline (a torn record) are cut off and the `(id, sample)` of
//! every complete record is skipped.
//!
//! Plain text (any other `OUT`): `prompt + continuation` records separated by a blank line.
//! Text records cannot be parsed back, so a sidecar `OUT.lmgen-done` gets one line per
//! record, `<id as JSON>\t<sample>\t<byte offset of the end of the record in OUT>`, appended
//! and flushed after the record itself. On `--resume`, OUT is cut back to the offset of the
//! last complete sidecar line and those records are skipped.
use super::input::id_key;
use super::io_msg;
use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutFormat {
    Jsonl,
    Text,
}

pub fn format_for(out: &str) -> OutFormat {
    let lower = out.to_ascii_lowercase();
    if out == "-" || lower.ends_with(".jsonl") || lower.ends_with(".ndjson") {
        OutFormat::Jsonl
    } else {
        OutFormat::Text
    }
}

/// The id a JSONL record is matched by: its `custom_id` (OpenAI batch output, whose `id` is
/// the response's own), else its `id`.
/// One complete record of a JSONL output.
pub(crate) struct JsonlRecord<'a> {
    /// (id key, sample)
    pub key: DoneKey,
    pub line: &'a [u8],
    /// An error record (a non-null `error`).
    pub is_error: bool,
}

/// The complete records of JSONL output `data` (named `name` in errors), and the length they
/// span: a torn last line (a killed writer's) is left out.
pub(crate) fn jsonl_records<'a>(
    name: &str,
    data: &'a [u8],
) -> Result<(usize, Vec<JsonlRecord<'a>>)> {
    let complete = data.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut out = Vec::new();
    for (i, line) in data[..complete].split(|&b| b == b'\n').enumerate() {
        if line.trim_ascii().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(line)
            .map_err(|e| Error::BadRequest(format!("{name}:{}: not a JSON record ({e})", i + 1)))?;
        let Some(id) = record_id(&v) else {
            return Err(Error::BadRequest(format!(
                "{name}:{}: record has no \"id\"",
                i + 1
            )));
        };
        let sample = v.get("sample").and_then(|s| s.as_u64()).unwrap_or(0) as usize;
        out.push(JsonlRecord {
            key: (id_key(id), sample),
            line,
            is_error: v.get("error").is_some_and(|e| !e.is_null()),
        });
    }
    Ok((complete, out))
}

pub fn record_id(v: &serde_json::Value) -> Option<&serde_json::Value> {
    v.get("custom_id")
        .filter(|c| !c.is_null())
        .or_else(|| v.get("id"))
}

/// (id key, sample)
pub type DoneKey = (String, usize);

#[derive(Debug)]
pub struct OutputPlan {
    /// None: standard output.
    pub path: Option<PathBuf>,
    pub format: OutFormat,
    /// Records already in OUT (from `--resume`).
    pub done: HashSet<DoneKey>,
    /// Byte length OUT is cut to before appending (resume); None: create/truncate.
    keep_len: Option<u64>,
    /// Byte length the sidecar is cut to (text resume).
    sidecar_keep_len: u64,
}

pub fn sidecar_path(p: &Path) -> PathBuf {
    super::sidecar(p, "lmgen-done")
}

/// Check that OUT can be written, before loading anything. Nothing is modified.
pub fn check_output_path(out: &str) -> Result<PathBuf> {
    let p = PathBuf::from(out);
    if p.is_dir() {
        return Err(Error::BadRequest(format!(
            "{out}: is a directory, expected an output file"
        )));
    }
    let parent = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !parent.is_dir() {
        return Err(Error::BadRequest(format!(
            "{out}: output directory {} does not exist",
            parent.display()
        )));
    }
    if p.exists() {
        OpenOptions::new()
            .append(true)
            .open(&p)
            .map_err(|e| Error::BadRequest(format!("{out}: cannot write: {}", io_msg(&e))))?;
    } else {
        let probe = parent.join(format!(".lmgen-probe-{}", std::process::id()));
        match File::create(&probe) {
            Ok(_) => {
                let _ = std::fs::remove_file(&probe);
            }
            Err(e) => {
                return Err(Error::BadRequest(format!(
                    "{out}: output directory {} is not writable: {}",
                    parent.display(),
                    io_msg(&e)
                )))
            }
        }
    }
    Ok(p)
}

/// Decide how OUT will be written; on `--resume`, collect the records already there.
pub fn plan(out: &str, format: OutFormat, resume: bool, overwrite: bool) -> Result<OutputPlan> {
    if out == "-" {
        return Ok(OutputPlan {
            path: None,
            format,
            done: HashSet::new(),
            keep_len: None,
            sidecar_keep_len: 0,
        });
    }
    let path = check_output_path(out)?;
    let exists = path.exists();
    let mut plan = OutputPlan {
        path: Some(path.clone()),
        format,
        done: HashSet::new(),
        keep_len: None,
        sidecar_keep_len: 0,
    };
    if !exists || overwrite {
        return Ok(plan);
    }
    if !resume {
        return Err(Error::BadRequest(format!(
            "{out} exists; use --resume to continue or --overwrite"
        )));
    }
    let data = read_all(&path)?;
    match format {
        OutFormat::Jsonl => {
            let (complete, records) = jsonl_records(out, &data)?;
            plan.done.extend(records.into_iter().map(|r| r.key));
            plan.keep_len = Some(complete as u64);
        }
        OutFormat::Text => {
            let side = sidecar_path(&path);
            if !side.exists() {
                if data.is_empty() {
                    plan.keep_len = Some(0);
                    return Ok(plan);
                }
                return Err(Error::BadRequest(format!(
                    "{out}: cannot resume plain-text output without its progress file {} (use --overwrite, or a .jsonl output)",
                    side.display()
                )));
            }
            let sdata = read_all(&side)?;
            let complete = sdata.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let mut end = 0u64;
            for (i, line) in sdata[..complete].split(|&b| b == b'\n').enumerate() {
                if line.is_empty() {
                    continue;
                }
                let bad = || {
                    Error::BadRequest(format!(
                        "{}:{}: malformed progress line; cannot resume",
                        side.display(),
                        i + 1
                    ))
                };
                let line = std::str::from_utf8(line).map_err(|_| bad())?;
                let mut parts = line.rsplitn(3, '\t');
                let (Some(off), Some(sample), Some(id)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(bad());
                };
                let off: u64 = off.parse().map_err(|_| bad())?;
                let sample: usize = sample.parse().map_err(|_| bad())?;
                plan.done.insert((id.to_string(), sample));
                end = end.max(off);
            }
            if (data.len() as u64) < end {
                return Err(Error::BadRequest(format!(
                    "{out} is shorter ({} bytes) than its progress file {} records ({end} bytes); cannot resume",
                    data.len(),
                    side.display()
                )));
            }
            plan.keep_len = Some(end);
            plan.sidecar_keep_len = complete as u64;
        }
    }
    Ok(plan)
}

fn read_all(p: &Path) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    File::open(p)
        .and_then(|mut f| f.read_to_end(&mut buf))
        .map_err(|e| Error::BadRequest(format!("{}: cannot read: {}", p.display(), io_msg(&e))))?;
    Ok(buf)
}

/// One finished record, ready to be written in order.
pub struct OutRecord {
    pub index: usize,
    pub sample: usize,
    pub id_key: String,
    /// A JSON object (no newline) or a text block (prompt + continuation), per the format.
    pub body: String,
}

pub struct RecordWriter {
    name: String,
    format: OutFormat,
    out: Box<dyn Write>,
    /// The output file itself (for fsync), unless it is standard output.
    file: Option<File>,
    sidecar: Option<(PathBuf, File)>,
    /// Bytes in OUT (text format: to know where records end).
    offset: u64,
    expected: VecDeque<(usize, usize)>,
    pending: HashMap<(usize, usize), OutRecord>,
}

impl RecordWriter {
    /// Open OUT (repairing a torn tail on resume). `expected` lists the (index, sample)
    /// keys that will be written, in output order.
    pub fn open(plan: &OutputPlan, expected: Vec<(usize, usize)>) -> Result<Self> {
        let mut file = None;
        let (name, out, sidecar, offset): (String, Box<dyn Write>, _, u64) = match &plan.path {
            None => ("<stdout>".to_string(), Box::new(std::io::stdout()), None, 0),
            Some(path) => {
                let name = path.display().to_string();
                let ctx = |e: std::io::Error| Error::Output(format!("{name}: {}", io_msg(&e)));
                let mut f = OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(false)
                    .open(path)
                    .map_err(ctx)?;
                let keep = plan.keep_len.unwrap_or(0);
                f.set_len(keep).map_err(ctx)?;
                f.seek(SeekFrom::Start(keep)).map_err(ctx)?;
                let sidecar = if plan.format == OutFormat::Text {
                    let side = sidecar_path(path);
                    let sctx = |e: std::io::Error| {
                        Error::Output(format!("{}: {}", side.display(), io_msg(&e)))
                    };
                    let mut s = OpenOptions::new()
                        .create(true)
                        .write(true)
                        .truncate(false)
                        .open(&side)
                        .map_err(sctx)?;
                    let skeep = if plan.keep_len.is_some() {
                        plan.sidecar_keep_len
                    } else {
                        0
                    };
                    s.set_len(skeep).map_err(sctx)?;
                    s.seek(SeekFrom::Start(skeep)).map_err(sctx)?;
                    Some((side.clone(), s))
                } else {
                    None
                };
                file = f.try_clone().ok();
                (name.clone(), Box::new(BufWriter::new(f)), sidecar, keep)
            }
        };
        Ok(Self {
            name,
            format: plan.format,
            out,
            file,
            sidecar,
            offset,
            expected: expected.into(),
            pending: HashMap::new(),
        })
    }

    /// Buffer `rec` and write every record whose predecessors are all written.
    /// Returns how many records were written.
    pub fn push(&mut self, rec: OutRecord) -> Result<usize> {
        self.pending.insert((rec.index, rec.sample), rec);
        let mut n = 0;
        while let Some(key) = self.expected.front() {
            let Some(rec) = self.pending.remove(key) else {
                break;
            };
            self.expected.pop_front();
            self.write_one(&rec)?;
            n += 1;
        }
        Ok(n)
    }

    fn write_one(&mut self, rec: &OutRecord) -> Result<()> {
        let name = &self.name;
        let ctx = |e: std::io::Error| Error::Output(format!("{name}: {}", io_msg(&e)));
        let bytes = match self.format {
            OutFormat::Jsonl => format!("{}\n", rec.body),
            OutFormat::Text => {
                if self.offset > 0 {
                    format!("\n{}\n", rec.body)
                } else {
                    format!("{}\n", rec.body)
                }
            }
        };
        self.out.write_all(bytes.as_bytes()).map_err(ctx)?;
        self.out.flush().map_err(ctx)?;
        self.offset += bytes.len() as u64;
        if let Some((side, f)) = &mut self.sidecar {
            let line = format!("{}\t{}\t{}\n", rec.id_key, rec.sample, self.offset);
            f.write_all(line.as_bytes())
                .and_then(|_| f.flush())
                .map_err(|e| Error::Output(format!("{}: {}", side.display(), io_msg(&e))))?;
        }
        Ok(())
    }

    /// Flush what was written and have it reach the disk (output and progress file).
    pub fn sync(&mut self) -> Result<()> {
        let name = &self.name;
        let ctx = |e: std::io::Error| Error::Output(format!("{name}: {}", io_msg(&e)));
        self.out.flush().map_err(ctx)?;
        if let Some(f) = &self.file {
            f.sync_all().map_err(ctx)?;
        }
        if let Some((side, f)) = &self.sidecar {
            f.sync_all()
                .map_err(|e| Error::Output(format!("{}: {}", side.display(), io_msg(&e))))?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        self.sync()?;
        if let Some(k) = self.expected.front() {
            return Err(Error::Output(format!(
                "internal error: record {} (sample {}) was never produced",
                k.0, k.1
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(index: usize, sample: usize, body: &str) -> OutRecord {
        OutRecord {
            index,
            sample,
            id_key: index.to_string(),
            body: body.into(),
        }
    }

    #[test]
    fn reorders_and_resumes_text() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.txt");
        let o = out.to_str().unwrap();
        let p = plan(o, OutFormat::Text, false, false).unwrap();
        let mut w = RecordWriter::open(&p, vec![(0, 0), (1, 0), (2, 0)]).unwrap();
        assert_eq!(w.push(rec(1, 0, "b")).unwrap(), 0);
        assert_eq!(w.push(rec(0, 0, "a")).unwrap(), 2);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "a\n\nb\n");
        drop(w); // killed before record 2
        std::fs::OpenOptions::new()
            .append(true)
            .open(&out)
            .unwrap()
            .write_all(b"\ntor")
            .unwrap();
        assert!(plan(o, OutFormat::Text, false, false)
            .unwrap_err()
            .to_string()
            .contains("exists"));
        let p = plan(o, OutFormat::Text, true, false).unwrap();
        assert_eq!(p.done.len(), 2);
        let mut w = RecordWriter::open(&p, vec![(2, 0)]).unwrap();
        w.push(rec(2, 0, "c")).unwrap();
        w.finish().unwrap();
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "a\n\nb\n\nc\n");
        assert_eq!(
            std::fs::read_to_string(sidecar_path(&out)).unwrap(),
            "0\t0\t2\n1\t0\t5\n2\t0\t8\n"
        );
    }

    #[test]
    fn resumes_jsonl_with_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out.jsonl");
        std::fs::write(
            &out,
            "{\"id\":0}\n{\"id\":\"x\",\"sample\":1}\n{\"id\":2,\"te",
        )
        .unwrap();
        let p = plan(out.to_str().unwrap(), OutFormat::Jsonl, true, false).unwrap();
        assert!(
            p.done.contains(&("0".into(), 0))
                && p.done.contains(&("\"x\"".into(), 1))
                && p.done.len() == 2
        );
        let w = RecordWriter::open(&p, vec![]).unwrap();
        w.finish().unwrap();
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "{\"id\":0}\n{\"id\":\"x\",\"sample\":1}\n"
        );
    }

    #[test]
    fn missing_directory() {
        let e = plan(
            "/nonexistent-dir-lmgen/out.jsonl",
            OutFormat::Jsonl,
            false,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("/nonexistent-dir-lmgen") && e.contains("does not exist"),
            "{e}"
        );
    }
}
