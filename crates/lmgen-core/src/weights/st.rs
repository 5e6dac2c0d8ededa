//! safetensors reader (memory-mapped, lazy) and the `*.index.json` shard index reader.
use super::{TensorMeta, TensorSource};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

/// One tensor of a safetensors file: where its bytes are and how to read them.
#[derive(Debug, Clone)]
struct Entry {
    /// Byte range inside the whole file (header included).
    start: usize,
    end: usize,
    /// dtype as stored in the file.
    st_dtype: StDtype,
    /// The dtype it is exposed as (`u16` -> `u32`, `bool` -> `u8`: candle has no such types).
    meta: TensorMeta,
}

/// A memory-mapped `.safetensors` file. The header is parsed and validated at `open`; tensor
/// bytes are only touched on `load`.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: std::sync::Arc<memmap2::Mmap>,
    tensors: BTreeMap<String, Entry>,
    /// The free-form `__metadata__` map of the header (e.g. `{"format": "pt"}`).
    metadata: BTreeMap<String, String>,
}

fn exposed_dtype(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::BOOL | StDtype::U8 => DType::U8,
        StDtype::U16 | StDtype::U32 => DType::U32,
        StDtype::I8 | StDtype::I16 => DType::I16,
        StDtype::I32 => DType::I32,
        StDtype::I64 => DType::I64,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F32 => DType::F32,
        StDtype::F64 => DType::F64,
        StDtype::F8_E4M3 => DType::F8E4M3,
        _ => return None,
    })
}

fn bits(d: StDtype) -> usize {
    d.bitsize()
}

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the file is opened read-only; as with every mmap-based reader, modifying the
        // file while it is mapped is undefined behaviour, which we document rather than prevent.
        let mmap =
            unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(&path, e))?;
        let (tensors, metadata) = parse_header(&path, &mmap)?;
        Ok(Self {
            path,
            mmap: std::sync::Arc::new(mmap),
            tensors,
            metadata,
        })
    }

    /// The `__metadata__` entries of the header.
    pub fn header_metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })
    }
}

/// Parse and validate the header against the file size. Errors are one line and name the
/// offending tensor where there is one.
fn parse_header(
    path: &Path,
    data: &[u8],
) -> Result<(BTreeMap<String, Entry>, BTreeMap<String, String>)> {
    let bad = |msg: String| Error::bad_weights(path, msg);
    let file_len = data.len();
    if file_len < 8 {
        return Err(bad(format!(
            "not a safetensors file: {file_len} bytes is too short for the 8-byte header length (truncated?)"
        )));
    }
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(&data[..8]);
    let n = u64::from_le_bytes(n8);
    if n > 100_000_000 {
        return Err(bad(format!(
            "not a safetensors file: header length {n} is implausible (corrupt file or another format)"
        )));
    }
    let n = n as usize;
    let header_end = 8 + n;
    if header_end > file_len {
        return Err(bad(format!(
            "truncated safetensors file: header needs {header_end} bytes, file has {file_len}"
        )));
    }
    let header = std::str::from_utf8(&data[8..header_end])
        .map_err(|e| bad(format!("corrupt safetensors header: not UTF-8 ({e})")))?;
    let json: serde_json::Value = serde_json::from_str(header.trim_end_matches(' '))
        .map_err(|e| bad(format!("corrupt safetensors header: invalid JSON ({e})")))?;
    let obj = json
        .as_object()
        .ok_or_else(|| bad("corrupt safetensors header: not a JSON object".into()))?;

    let mut metadata = BTreeMap::new();
    let mut tensors = BTreeMap::new();
    let data_len = file_len - header_end;
    for (name, v) in obj {
        if name == "__metadata__" {
            if let Some(m) = v.as_object() {
                for (k, v) in m {
                    if let Some(s) = v.as_str() {
                        metadata.insert(k.clone(), s.to_string());
                    }
                }
            }
            continue;
        }
        let info: safetensors::tensor::TensorInfo = serde_json::from_value(v.clone())
            .map_err(|e| bad(format!("corrupt safetensors header: tensor '{name}': {e}")))?;
        let (s, e) = info.data_offsets;
        if e < s {
            return Err(bad(format!(
                "corrupt safetensors header: tensor '{name}' has data_offsets [{s}, {e}]"
            )));
        }
        if e > data_len {
            return Err(bad(format!(
                "truncated safetensors file: tensor '{name}' needs bytes {}..{} but the file has only {file_len} bytes",
                header_end + s,
                header_end + e
            )));
        }
        let numel = info.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let nbits = numel.and_then(|n| n.checked_mul(bits(info.dtype)));
        match nbits {
            Some(nb) if nb % 8 == 0 && nb / 8 == e - s => {}
            _ => {
                return Err(bad(format!(
                    "corrupt safetensors header: tensor '{name}' ({:?}, shape {:?}) does not match its byte range [{s}, {e})",
                    info.dtype, info.shape
                )))
            }
        }
        let dtype = exposed_dtype(info.dtype).ok_or_else(|| {
            bad(format!(
                "tensor '{name}' has dtype {:?}, which is not supported",
                info.dtype
            ))
        })?;
        tensors.insert(
            name.clone(),
            Entry {
                start: header_end + s,
                end: header_end + e,
                st_dtype: info.dtype,
                meta: TensorMeta {
                    shape: info.shape.clone(),
                    dtype,
                },
            },
        );
    }
    // Full validation by the reference implementation (contiguous, non-overlapping ranges that
    // cover the whole data section). Our checks above give the friendlier messages first.
    if let Err(e) = SafeTensors::read_metadata(data) {
        return Err(bad(format!("corrupt safetensors file: {e}")));
    }
    Ok((tensors, metadata))
}

/// Decode `bytes` (little-endian, of safetensors dtype `d`) into a CPU tensor.
fn decode(bytes: &[u8], d: StDtype, shape: &[usize]) -> candle_core::Result<Tensor> {
    let dev = Device::Cpu;
    match d {
        StDtype::BOOL | StDtype::U8 => Tensor::from_raw_buffer(bytes, DType::U8, shape, &dev),
        StDtype::U16 => {
            let v: Vec<u32> = bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                .collect();
            Tensor::from_vec(v, shape, &dev)
        }
        StDtype::I8 => {
            let v: Vec<i16> = bytes.iter().map(|&b| b as i8 as i16).collect();
            Tensor::from_vec(v, shape, &dev)
        }
        StDtype::U32 => Tensor::from_raw_buffer(bytes, DType::U32, shape, &dev),
        StDtype::I16 => Tensor::from_raw_buffer(bytes, DType::I16, shape, &dev),
        StDtype::I32 => Tensor::from_raw_buffer(bytes, DType::I32, shape, &dev),
        StDtype::I64 => Tensor::from_raw_buffer(bytes, DType::I64, shape, &dev),
        StDtype::F16 => Tensor::from_raw_buffer(bytes, DType::F16, shape, &dev),
        StDtype::BF16 => Tensor::from_raw_buffer(bytes, DType::BF16, shape, &dev),
        StDtype::F32 => Tensor::from_raw_buffer(bytes, DType::F32, shape, &dev),
        StDtype::F64 => Tensor::from_raw_buffer(bytes, DType::F64, shape, &dev),
        StDtype::F8_E4M3 => Tensor::from_raw_buffer(bytes, DType::F8E4M3, shape, &dev),
        other => candle_core::bail!("unsupported dtype {other:?}"),
    }
}

impl TensorSource for SafetensorsFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn metas(&self) -> Result<Vec<(String, TensorMeta)>> {
        Ok(self
            .tensors
            .iter()
            .map(|(n, e)| (n.clone(), e.meta.clone()))
            .collect())
    }

    fn mapped(&self, name: &str) -> Option<super::MappedTensor> {
        let e = self.tensors.get(name)?;
        // `MappedTensor::new` refuses dtypes other than f32, bf16 and f16.
        let dtype = exposed_dtype(e.st_dtype)?;
        let len = (e.end - e.start) / dtype.size_in_bytes();
        super::MappedTensor::new(&self.mmap, e.start, len, dtype)
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let e = self.entry(name)?;
        let bytes = self.mmap.get(e.start..e.end).ok_or_else(|| {
            Error::bad_weights(
                &self.path,
                format!("tensor '{name}' lies outside the file (file changed on disk?)"),
            )
        })?;
        let wrap = |err: candle_core::Error| {
            Error::bad_weights(
                &self.path,
                format!("tensor '{name}': {}", one_line(&err.to_string())),
            )
        };
        let fast = (dtype == DType::F32 && device.is_cpu())
            .then(|| super::f32_tensor_from_le(bytes, e.meta.dtype, &e.meta.shape))
            .flatten();
        let t = match fast {
            Some(t) => t,
            None => decode(bytes, e.st_dtype, &e.meta.shape).map_err(wrap)?,
        };
        let t = if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype).map_err(wrap)?
        };
        let t = t.to_device(device).map_err(wrap)?;
        // The tensor now owns a copy: let the kernel drop the file pages we read, so peak
        // memory stays near one copy of the weights instead of two. Only whole pages
        // inside this tensor's range are released; failure is harmless.
        release_pages(&self.mmap, e.start, e.end);
        Ok(t)
    }
}

#[cfg(unix)]
pub(crate) fn release_pages(map: &memmap2::Mmap, start: usize, end: usize) {
    const PAGE: usize = 4096;
    let first = start.div_ceil(PAGE) * PAGE;
    let last = end / PAGE * PAGE;
    if last > first {
        // SAFETY: the map is read-only and file-backed; DONTNEED only drops clean page-cache
        // mappings, which are re-read from the file if touched again.
        let _ = unsafe {
            map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, last - first)
        };
    }
}

#[cfg(not(unix))]
pub(crate) fn release_pages(_: &memmap2::Mmap, _: usize, _: usize) {}

/// First line of a (possibly multi-line, backtrace-carrying) error message.
pub(crate) fn one_line(s: &str) -> String {
    s.lines().next().unwrap_or("").trim().to_string()
}

/// Read a Hugging Face shard index (`model.safetensors.index.json` or
/// `pytorch_model.bin.index.json`) and return the distinct shard files it names, sorted by file
/// name (which is shard order for the `*-00001-of-0000N.*` convention), resolved against the
/// index's directory. Every shard must exist.
pub fn read_index(index_json_path: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let path = index_json_path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::bad_weights(path, msg);
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad(format!("malformed shard index: invalid JSON ({e})")))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("malformed shard index: no \"weight_map\" object".into()))?;
    if map.is_empty() {
        return Err(bad("malformed shard index: \"weight_map\" is empty".into()));
    }
    let mut shards = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            bad(format!(
                "malformed shard index: weight_map entry for tensor '{tensor}' is not a file name"
            ))
        })?;
        let rel = Path::new(file);
        let plain = !file.is_empty() && rel.components().all(|c| matches!(c, Component::Normal(_)));
        if !plain {
            return Err(bad(format!(
                "malformed shard index: shard '{file}' (tensor '{tensor}') is not a plain relative file name"
            )));
        }
        shards.insert(file.to_string());
    }
    let dir = path.parent().unwrap_or_else(|| Path::new(""));
    let mut out = Vec::with_capacity(shards.len());
    for s in shards {
        let p = dir.join(&s);
        if !p.is_file() {
            return Err(bad(format!(
                "shard '{s}' listed in the index is missing (expected at {})",
                p.display()
            )));
        }
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn write_st(path: &Path, tensors: &[(&str, Tensor)]) {
        let map: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(n, t)| (n.to_string(), t.clone()))
            .collect();
        candle_core::safetensors::save(&map, path).expect("save");
    }

    /// A temporary directory, a `model.safetensors` path in it, and the f32 matrix
    /// `[[0, 1, 2], [3, 4, 5]]`.
    fn setup() -> (tempfile::TempDir, PathBuf, Tensor) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("model.safetensors");
        let a = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap();
        (dir, p, a)
    }

    /// f32, bf16 and f16 tensors are offered in place (the values the copy has); other dtypes
    /// are not, and the store offers a tensor in place only for the shape asked.
    #[test]
    fn float_tensors_in_place() {
        let (_dir, p, a) = setup();
        let h = a.to_dtype(DType::F16).unwrap();
        let b = a.to_dtype(DType::BF16).unwrap();
        let i = a.to_dtype(DType::I64).unwrap();
        write_st(&p, &[("a", a.clone()), ("h", h), ("b", b), ("i", i)]);
        let f = SafetensorsFile::open(&p).expect("open");
        let want = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        for (name, dtype) in [("a", DType::F32), ("h", DType::F16), ("b", DType::BF16)] {
            let m = f.mapped(name).expect("in place");
            assert_eq!(m.dtype(), dtype);
            assert_eq!(m.values().to_f32_vec(), want, "{name}");
        }
        assert!(f.mapped("i").is_none() && f.mapped("nope").is_none());
        let store = super::super::WeightStore::new(vec![Box::new(f)]).unwrap();
        assert!(store.get_mapped("a", &[3, 2]).is_none());
        assert!(store.get_mapped("i", &[2, 3]).is_none());
        assert!(store.check_all_used().is_err(), "nothing marked used yet");
        for name in ["a", "h", "b"] {
            assert_eq!(store.get_mapped(name, &[2, 3]).unwrap().len(), 6);
        }
        store.ignore("i");
        store
            .check_all_used()
            .expect("a, h, b are used once mapped");
        // Offsets not aligned to the value's size, or running past the map, are refused.
        // SAFETY: a file of this test, not modified while mapped.
        let map = std::sync::Arc::new(
            unsafe { memmap2::Mmap::map(&std::fs::File::open(&p).unwrap()) }.unwrap(),
        );
        use super::super::MappedTensor as M;
        assert!(M::new(&map, 2, 1, DType::F32).is_none());
        assert!(M::new(&map, 0, map.len() / 4 + 1, DType::F32).is_none());
        assert!(M::new(&map, 4, 1, DType::F32).is_some());
        assert!(M::new(&map, 1, 1, DType::BF16).is_none());
        assert!(M::new(&map, 2, 1, DType::F16).is_some());
        assert!(M::new(&map, 0, map.len() / 2 + 1, DType::BF16).is_none());
        assert!(M::new(&map, 0, 1, DType::I64).is_none());
    }

    #[test]
    fn load_and_convert() {
        let (_dir, p, a) = setup();
        let dev = Device::Cpu;
        let h = Tensor::new(&[1.5f32, -2.0, 0.25], &dev)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let b = Tensor::new(&[3.0f32, 4.0], &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let i = Tensor::new(&[7i64, -8], &dev).unwrap();
        write_st(&p, &[("a", a), ("h", h), ("b", b), ("i", i)]);

        let f = SafetensorsFile::open(&p).expect("open");
        let metas: BTreeMap<_, _> = f.metas().unwrap().into_iter().collect();
        assert_eq!(metas["a"].shape, vec![2, 3]);
        assert_eq!(metas["a"].dtype, DType::F32);
        assert_eq!(metas["h"].dtype, DType::F16);
        assert_eq!(metas["b"].dtype, DType::BF16);
        assert_eq!(metas["i"].dtype, DType::I64);

        let a = f.load("a", DType::F32, &dev).unwrap();
        assert_eq!(
            a.to_vec2::<f32>().unwrap(),
            vec![vec![0., 1., 2.], vec![3., 4., 5.]]
        );
        let a16 = f.load("a", DType::BF16, &dev).unwrap();
        assert_eq!(a16.dtype(), DType::BF16);
        let h = f.load("h", DType::F32, &dev).unwrap();
        assert_eq!(h.to_vec1::<f32>().unwrap(), vec![1.5, -2.0, 0.25]);
        let b = f.load("b", DType::F32, &dev).unwrap();
        assert_eq!(b.to_vec1::<f32>().unwrap(), vec![3.0, 4.0]);
        let i = f.load("i", DType::I64, &dev).unwrap();
        assert_eq!(i.to_vec1::<i64>().unwrap(), vec![7, -8]);
        let err = f.load("nope", DType::F32, &dev).unwrap_err().to_string();
        assert!(
            err.contains("nope") && err.contains("model.safetensors"),
            "{err}"
        );
    }

    #[test]
    fn truncated_and_garbage_files_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("model.safetensors");
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 64.0, &dev).unwrap();
        write_st(&p, &[("w", a)]);
        let full = std::fs::read(&p).unwrap();

        let t = dir.path().join("trunc.safetensors");
        std::fs::write(&t, &full[..full.len() - 10]).unwrap();
        let err = SafetensorsFile::open(&t)
            .err()
            .expect("must fail")
            .to_string();
        assert!(
            err.contains("trunc.safetensors") && err.contains("truncated") && err.contains("'w'"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1);

        std::fs::write(&t, &full[..20]).unwrap();
        let err = SafetensorsFile::open(&t)
            .err()
            .expect("must fail")
            .to_string();
        assert!(
            err.contains("trunc.safetensors") && err.contains("truncated"),
            "{err}"
        );

        std::fs::write(&t, &full[..3]).unwrap();
        let err = SafetensorsFile::open(&t)
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains("trunc.safetensors"), "{err}");

        std::fs::write(&t, b"PK\x03\x04 this is a zip file, not safetensors").unwrap();
        let err = SafetensorsFile::open(&t)
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains("trunc.safetensors"), "{err}");

        let err = SafetensorsFile::open(dir.path().join("missing.safetensors"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("missing.safetensors"), "{err}");
    }

    #[test]
    fn index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let idx = dir.path().join("model.safetensors.index.json");
        std::fs::write(
            &idx,
            r#"{"metadata": {"total_size": 8}, "weight_map": {
                "b": "model-00002-of-00002.safetensors",
                "a": "model-00001-of-00002.safetensors",
                "c": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let err = read_index(&idx).unwrap_err().to_string();
        assert!(
            err.contains("model-0000") && err.contains("missing") && err.contains("index.json"),
            "{err}"
        );
        std::fs::write(dir.path().join("model-00001-of-00002.safetensors"), b"").unwrap();
        std::fs::write(dir.path().join("model-00002-of-00002.safetensors"), b"").unwrap();
        let shards = read_index(&idx).unwrap();
        assert_eq!(
            shards,
            vec![
                dir.path().join("model-00001-of-00002.safetensors"),
                dir.path().join("model-00002-of-00002.safetensors")
            ]
        );
        std::fs::write(&idx, r#"{"metadata": {}}"#).unwrap();
        assert!(read_index(&idx)
            .unwrap_err()
            .to_string()
            .contains("weight_map"));
        std::fs::write(&idx, r#"{"weight_map": {"a": "../x.safetensors"}}"#).unwrap();
        assert!(read_index(&idx)
            .unwrap_err()
            .to_string()
            .contains("plain relative"));
        std::fs::write(&idx, r#"{"weight_map": "#).unwrap();
        assert!(read_index(&idx)
            .unwrap_err()
            .to_string()
            .contains("invalid JSON"));
    }
}
