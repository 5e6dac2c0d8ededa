//! Hidden states written while generating (`generate --hidden-states`): the states of each
//! record go into numbered safetensors chunks in `OUT.hidden/`, listed by `index.jsonl`, before
//! the record's text is written, so every record in OUT has its states on disk. On resume the
//! index is cut back to the records OUT holds (states of records written again later are found
//! in their newer chunk). `lmgen merge` puts the chunks of all shards into one
//! `OUT.hidden.safetensors` in input order, named as `embed` names its tensors.
use super::input::id_key;
use super::merge::write_embed;
use super::sink::DoneKey;
use super::{io_msg, sidecar, write_atomic};
use crate::error::{Error, Result};
use candle_core::Tensor;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

/// One record's states: per layer, `(shape, values)`.
type States = Vec<(Vec<usize>, Vec<f32>)>;

pub struct HiddenSink {
    dir: PathBuf,
    next: usize,
    /// Metadata every chunk carries (model, layers, pool, which tokens).
    meta: Value,
    layers: Vec<usize>,
    pooled: bool,
    rows: Vec<(Value, usize, States)>,
}

/// `OUT.hidden`: the chunk folder of output `out`.
pub fn dir_for(out: &Path) -> PathBuf {
    sidecar(out, "hidden")
}

/// One line of `index.jsonl`: a chunk file and the (id, sample) of its rows, in row order.
#[derive(serde::Serialize, serde::Deserialize)]
struct IndexLine {
    file: String,
    records: Vec<(Value, usize)>,
}

fn read_index(dir: &Path) -> Result<Vec<IndexLine>> {
    let path = dir.join("index.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(e) => return Err(Error::io(&path, e)),
    };
    // A torn last line (killed while appending) is dropped.
    let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
    complete
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .map_err(|e| Error::BadRequest(format!("{}: malformed line ({e})", path.display())))
        })
        .collect()
}

impl HiddenSink {
    /// Open the chunk folder of output `out`: emptied for a fresh output, else its index cut
    /// back to the records in `done` (those OUT holds).
    pub fn open(
        out: &Path,
        fresh: bool,
        done: &HashSet<DoneKey>,
        meta: Value,
        layers: Vec<usize>,
        pooled: bool,
    ) -> Result<HiddenSink> {
        let dir = dir_for(out);
        let err =
            |e: std::io::Error| Error::BadRequest(format!("{}: {}", dir.display(), io_msg(&e)));
        if fresh && dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(err)?;
        }
        std::fs::create_dir_all(&dir).map_err(err)?;
        let mut index = read_index(&dir)?;
        let next = index
            .iter()
            .filter_map(|l| {
                l.file
                    .strip_prefix("chunk-")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map_or(0, |n| n + 1);
        for l in &mut index {
            l.records.retain(|(id, s)| done.contains(&(id_key(id), *s)));
        }
        index.retain(|l| !l.records.is_empty());
        let text: String = index
            .iter()
            .map(|l| serde_json::to_string(l).expect("index line") + "\n")
            .collect();
        write_atomic(&dir.join("index.jsonl"), text.as_bytes())?;
        Ok(HiddenSink {
            dir,
            next,
            meta,
            layers,
            pooled,
            rows: Vec::new(),
        })
    }

    /// Buffer one record's states (per layer, `[width]` pooled or `[tokens, width]`).
    pub fn push(&mut self, id: &Value, sample: usize, states: &[Tensor]) -> Result<()> {
        let st = states
            .iter()
            .map(|t| Ok((t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?)))
            .collect::<Result<States>>()?;
        self.rows.push((id.clone(), sample, st));
        Ok(())
    }

    pub fn buffered(&self) -> usize {
        self.rows.len()
    }

    /// Write the buffered records' states as the next chunk and list it in the index.
    pub fn flush(&mut self) -> Result<()> {
        if self.rows.is_empty() {
            return Ok(());
        }
        let file = format!("chunk-{:06}.safetensors", self.next);
        let rows = std::mem::take(&mut self.rows);
        let records: Vec<(Value, usize)> = rows.iter().map(|(id, s, _)| (id.clone(), *s)).collect();
        let states: Vec<&States> = rows.iter().map(|(_, _, st)| st).collect();
        let tensors = tensors_of(&self.layers, self.pooled, &states)?;
        let mut all = self.meta.clone();
        all["ids"] = Value::from(records.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>());
        all["samples"] = Value::from(records.iter().map(|(_, s)| *s).collect::<Vec<_>>());
        write_embed(&self.dir.join(&file), &all, &tensors)?;
        let line = serde_json::to_string(&IndexLine { file, records }).expect("index line") + "\n";
        let path = self.dir.join("index.jsonl");
        let err = |e: std::io::Error| Error::Output(format!("{}: {}", path.display(), io_msg(&e)));
        let mut f = OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(err)?;
        f.write_all(line.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(err)?;
        self.next += 1;
        Ok(())
    }
}

/// The tensors of rows of states, named as `embed` names them: pooled `hidden.L` of shape
/// `[rows, width]`, else `hidden.L.ROW` of shape `[tokens, width]`.
fn tensors_of(
    layers: &[usize],
    pooled: bool,
    rows: &[&States],
) -> Result<Vec<(String, Vec<usize>, Vec<u8>)>> {
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut out = Vec::new();
    for (li, layer) in layers.iter().enumerate() {
        if pooled {
            let width = rows.first().map_or(0, |r| r[li].1.len());
            let mut data = Vec::with_capacity(rows.len() * width);
            for r in rows {
                if r[li].1.len() != width {
                    return Err(Error::Output(format!(
                        "layer {layer}: widths differ between records"
                    )));
                }
                data.extend_from_slice(&r[li].1);
            }
            out.push((
                format!("hidden.{layer}"),
                vec![rows.len(), width],
                bytes(&data),
            ));
        } else {
            for (row, r) in rows.iter().enumerate() {
                out.push((
                    format!("hidden.{layer}.{row}"),
                    r[li].0.clone(),
                    bytes(&r[li].1),
                ));
            }
        }
    }
    Ok(out)
}

/// Put the states of the records `order` ((id, sample) keys, in output order) from the chunk
/// folders `dirs` into one file `dest`. Returns how many records it holds.
pub fn consolidate(dirs: &[PathBuf], order: &[(String, usize)], dest: &Path) -> Result<usize> {
    // key -> (chunk path, row)
    let mut at: HashMap<(String, usize), (PathBuf, usize)> = HashMap::new();
    let mut meta: Option<Value> = None;
    for dir in dirs {
        for line in read_index(dir)? {
            for (row, (id, s)) in line.records.iter().enumerate() {
                at.insert((id_key(id), *s), (dir.join(&line.file), row));
            }
        }
    }
    let mut missing = order.iter().filter(|k| !at.contains_key(*k));
    if let Some((id, s)) = missing.next() {
        return Err(Error::Output(format!(
            "hidden states of id {id} sample {s} (and {} more) are missing; rerun the job with --resume",
            missing.count()
        )));
    }
    // Each chunk is read and decoded once: name -> (shape, values), with its metadata.
    type Decoded = (HashMap<String, (Vec<usize>, Vec<f32>)>, Value);
    let mut chunks: HashMap<PathBuf, Decoded> = HashMap::new();
    let mut rows: Vec<States> = Vec::with_capacity(order.len());
    let mut layers: Vec<usize> = Vec::new();
    let mut pooled = true;
    for key in order {
        let (path, row) = &at[key];
        if !chunks.contains_key(path) {
            chunks.insert(path.clone(), decode_chunk(path)?);
        }
        let (tensors, m) = &chunks[path];
        if meta.is_none() {
            layers = m["layers"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_u64())
                        .map(|v| v as usize)
                        .collect()
                })
                .unwrap_or_default();
            pooled = m["pool"].as_str() != Some("none");
            meta = Some(m.clone());
        }
        let mut states = States::new();
        for layer in &layers {
            let name = if pooled {
                format!("hidden.{layer}")
            } else {
                format!("hidden.{layer}.{row}")
            };
            let (shape, vals) = tensors.get(&name).ok_or_else(|| {
                Error::BadRequest(format!("{}: no tensor {name}", path.display()))
            })?;
            states.push(if pooled {
                let w = shape[1];
                (vec![w], vals[row * w..(row + 1) * w].to_vec())
            } else {
                (shape.clone(), vals.clone())
            });
        }
        rows.push(states);
    }
    let refs: Vec<&States> = rows.iter().collect();
    let tensors = tensors_of(&layers, pooled, &refs)?;
    let mut all = meta.unwrap_or_else(|| Value::Object(Default::default()));
    all["ids"] = Value::from(
        order
            .iter()
            .map(|(k, _)| serde_json::from_str::<Value>(k).unwrap_or(Value::Null))
            .collect::<Vec<_>>(),
    );
    all["samples"] = Value::from(order.iter().map(|(_, s)| *s).collect::<Vec<_>>());
    write_embed(dest, &all, &tensors)?;
    Ok(order.len())
}

/// All tensors of a chunk as f32 values, and its `lmgen` metadata.
#[allow(clippy::type_complexity)]
fn decode_chunk(path: &Path) -> Result<(HashMap<String, (Vec<usize>, Vec<f32>)>, Value)> {
    let bad = |e: String| Error::BadRequest(format!("{}: {e}", path.display()));
    let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(&data).map_err(|e| bad(e.to_string()))?;
    let meta: Value = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("lmgen"))
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| bad("no lmgen metadata".into()))?;
    let st = safetensors::SafeTensors::deserialize(&data).map_err(|e| bad(e.to_string()))?;
    let tensors = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            let vals = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, (t.shape().to_vec(), vals))
        })
        .collect();
    Ok((tensors, meta))
}
