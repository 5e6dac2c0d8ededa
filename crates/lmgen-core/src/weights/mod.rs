//! Checkpoint readers. Every format exposes the same [`TensorSource`] interface; the
//! [`WeightStore`] merges shards and does strict accounting (every tensor used exactly once).
use crate::error::{Error, Result};
use crate::kernels::quant::QMatrix;
use candle_core::{DType, Device, Tensor};
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod gguf;
pub mod pth;
pub mod st;

/// Little-endian f32 / f16 / bf16 bytes → an f32 CPU tensor, converted by the compute pool's
/// threads in 1 MiB pieces: the copy (and the page faults of the fresh buffer) is most of a
/// load's time, and a bf16 checkpoint computed in f32 is also widened here. The values are
/// those candle's `from_raw_buffer` + `to_dtype(F32)` give (widening is exact). `None` for
/// other dtypes or a byte count that does not match the shape (the caller's path reports it).
pub(crate) fn f32_tensor_from_le(bytes: &[u8], dtype: DType, shape: &[usize]) -> Option<Tensor> {
    let width = match dtype {
        DType::F32 => 4,
        DType::F16 | DType::BF16 => 2,
        _ => return None,
    };
    let n: usize = shape.iter().product();
    if bytes.len() != n * width || cfg!(target_endian = "big") {
        return None;
    }
    const CHUNK: usize = 1 << 18;
    let mut v: Vec<f32> = Vec::with_capacity(n);
    let (dst, src) = (v.as_mut_ptr() as usize, bytes.as_ptr() as usize);
    let piece = |c: usize| {
        let (a, b) = (c * CHUNK, ((c + 1) * CHUNK).min(n));
        let out = dst as *mut f32;
        // SAFETY: elements a..b of the allocation (capacity n) are written by this piece only,
        // through the raw pointer; the source has n * width bytes.
        unsafe {
            match dtype {
                DType::F32 => std::ptr::copy_nonoverlapping(
                    (src as *const u8).add(a * 4),
                    out.add(a) as *mut u8,
                    (b - a) * 4,
                ),
                _ => {
                    let s = std::slice::from_raw_parts((src as *const u8).add(a * 2), (b - a) * 2);
                    for (i, h) in s.chunks_exact(2).enumerate() {
                        let bits = u16::from_le_bytes([h[0], h[1]]);
                        *out.add(a + i) = if dtype == DType::BF16 {
                            half::bf16::from_bits(bits).to_f32()
                        } else {
                            half::f16::from_bits(bits).to_f32()
                        };
                    }
                }
            }
        }
    };
    let pieces = n.div_ceil(CHUNK);
    if pieces > 1 {
        crate::kernels::pool::for_each(pieces, piece);
    } else {
        (0..pieces).for_each(piece);
    }
    // SAFETY: every element 0..n was written above.
    unsafe { v.set_len(n) };
    Tensor::from_vec(v, shape, &Device::Cpu).ok()
}

/// Which source rows [`MappedTensor::copy_as`] copies.
#[derive(Clone, Copy)]
enum Gather<'a> {
    All,
    /// Row `r` of the copy is row `order[r]`.
    Rows(&'a [usize]),
    /// The transpose of a `[rows, _]` matrix.
    Transposed {
        rows: usize,
    },
}

/// Rows `range` of the transpose of `src` (`[rows, cols]`) into `dst` (`[cols, rows]`), in
/// bands of 64 destination rows so that each source row's piece is read once per band.
///
/// # Safety
/// `src` holds `rows * cols` values; `dst` rows `range` (of `rows` values) are writable.
unsafe fn transpose_into<T: Copy>(
    src: *const T,
    dst: *mut T,
    rows: usize,
    cols: usize,
    range: std::ops::Range<usize>,
) {
    let mut c0 = range.start;
    while c0 < range.end {
        let c1 = (c0 + 64).min(range.end);
        for r in 0..rows {
            let s = src.add(r * cols);
            for c in c0..c1 {
                *dst.add(c * rows + r) = *s.add(c);
            }
        }
        c0 = c1;
    }
}

/// A matrix used where the checkpoint's memory map has it, in its stored dtype (f32, bf16 or
/// f16; widened to f32 by the product kernels as they read it): no copy at load time, its pages
/// are read in from the page cache on first use (and shared by every process that maps the same
/// file, e.g. the tasks of a SLURM array on one node).
#[derive(Clone)]
pub struct MappedTensor {
    map: Arc<memmap2::Mmap>,
    /// Byte offset of the first value (a multiple of the value's size).
    offset: usize,
    len: usize,
    dtype: DType,
    /// In a memory map of its own (a copy), not the checkpoint file's.
    own: bool,
}

impl std::fmt::Debug for MappedTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MappedTensor({} {:?} values at byte {})",
            self.len, self.dtype, self.offset
        )
    }
}

impl MappedTensor {
    /// `len` little-endian values of `dtype` (F32, BF16 or F16) at byte `offset` of `map`;
    /// `None` where they are not aligned to their size, lie outside the map, the dtype is
    /// another, or the machine is big-endian.
    pub(crate) fn new(
        map: &Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
        dtype: DType,
    ) -> Option<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
            return None;
        }
        let size = dtype.size_in_bytes();
        let end = len.checked_mul(size)?.checked_add(offset)?;
        let aligned = (map.as_ptr() as usize + offset).is_multiple_of(size);
        (end <= map.len() && aligned && cfg!(target_endian = "little")).then(|| Self {
            map: map.clone(),
            offset,
            len,
            dtype,
            own: false,
        })
    }

    /// A copy in memory of its own, in the same dtype: anonymous pages advised onto transparent
    /// huge pages (fewer TLB misses than the page cache's 4 KiB pages when a step streams every
    /// weight; not with `LMGEN_NO_HUGEPAGES` set, as the binary's allocator), filled by the
    /// compute pool in 1 MiB pieces. The file pages read for it are released.
    pub(crate) fn copied(&self) -> std::io::Result<Self> {
        self.copy_as(Gather::All, 1)
    }

    /// As [`Self::copied`] for a `[_, cols]` matrix with its rows taken in `order` (row `r` of
    /// the copy is row `order[r]`): a stored row order undone (GGUF's permuted Q/K, grouped or
    /// interleaved fused QKV) without widening. `None` where an index is out of range.
    pub(crate) fn copied_rows(&self, order: &[usize], cols: usize) -> Option<Self> {
        let rows = self.len / cols.max(1);
        if cols == 0 || rows * cols != self.len || order.iter().any(|&r| r >= rows) {
            return None;
        }
        self.copy_as(Gather::Rows(order), cols).ok()
    }

    /// As [`Self::copied`] for the transpose of a `[rows, cols]` matrix (GPT-2's Conv1D
    /// weights, stored `[in, out]`): a `[cols, rows]` copy in the same dtype. `None` where the
    /// shape is not this tensor's.
    pub(crate) fn copied_transposed(&self, rows: usize, cols: usize) -> Option<Self> {
        if rows == 0 || cols == 0 || rows.checked_mul(cols)? != self.len {
            return None;
        }
        self.copy_as(Gather::Transposed { rows }, rows).ok()
    }

    /// A copy of rows of `cols` values: all of them, some in an order, or the transpose.
    fn copy_as(&self, gather: Gather, cols: usize) -> std::io::Result<Self> {
        let size = self.dtype.size_in_bytes();
        let row = cols * size;
        let len = match gather {
            Gather::Rows(o) => o.len() * cols,
            _ => self.len,
        };
        let bytes = len * size;
        let mut dst = memmap2::MmapMut::map_anon(bytes.max(1))?;
        #[cfg(target_os = "linux")]
        if std::env::var_os("LMGEN_NO_HUGEPAGES").is_none() {
            let _ = dst.advise(memmap2::Advice::HugePage); // advice only: fine if refused
        }
        let src = &self.map[self.offset..self.offset + self.len * size];
        // Pieces of whole rows, about 1 MiB each.
        let rows_per = ((1usize << 20) / row.max(1)).max(1);
        let total_rows = bytes / row.max(1);
        let pieces = total_rows.div_ceil(rows_per);
        let out = dst.as_mut_ptr() as usize;
        let piece = |c: usize| {
            let (a, b) = (c * rows_per, ((c + 1) * rows_per).min(total_rows));
            // SAFETY: rows a..b of the fresh map (length >= bytes) are written by this piece
            // only; every source row lies inside the checkpoint's map (orders checked by the
            // caller).
            unsafe {
                let d = (out as *mut u8).add(a * row);
                match gather {
                    Gather::All => {
                        std::ptr::copy_nonoverlapping(src.as_ptr().add(a * row), d, (b - a) * row)
                    }
                    Gather::Rows(o) => {
                        for (i, &r) in o[a..b].iter().enumerate() {
                            let s = src.as_ptr().add(r * row);
                            std::ptr::copy_nonoverlapping(s, d.add(i * row), row);
                        }
                    }
                    // Rows a..b of the copy are columns a..b of the source ([rows, total_rows]).
                    Gather::Transposed { rows } => match size {
                        2 => transpose_into(
                            src.as_ptr() as *const u16,
                            d as *mut u16,
                            rows,
                            total_rows,
                            a..b,
                        ),
                        _ => transpose_into(
                            src.as_ptr() as *const u32,
                            d as *mut u32,
                            rows,
                            total_rows,
                            a..b,
                        ),
                    },
                }
            }
        };
        if pieces > 1 {
            crate::kernels::pool::for_each(pieces, piece);
        } else {
            (0..pieces).for_each(piece);
        }
        if !self.own {
            st::release_pages(&self.map, self.offset, self.offset + self.len * size);
        }
        Ok(Self {
            map: Arc::new(dst.make_read_only()?),
            offset: 0,
            len,
            dtype: self.dtype,
            own: true,
        })
    }

    /// Whether the values lie in the checkpoint file's map (not a copy of their own).
    pub fn in_file(&self) -> bool {
        !self.own
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The stored dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn values(&self) -> crate::kernels::wide::WSlice<'_> {
        use crate::kernels::wide::WSlice;
        let size = self.dtype.size_in_bytes();
        let bytes = &self.map[self.offset..self.offset + size * self.len];
        // SAFETY: `new` checked that the range is inside the map and aligned to the value's
        // size; every bit pattern is a valid f32 / u16, and the map is read-only and lives as
        // long as `self`.
        unsafe {
            match self.dtype {
                DType::F32 => {
                    WSlice::F32(std::slice::from_raw_parts(bytes.as_ptr().cast(), self.len))
                }
                DType::BF16 => {
                    WSlice::Bf16(std::slice::from_raw_parts(bytes.as_ptr().cast(), self.len))
                }
                _ => WSlice::F16(std::slice::from_raw_parts(bytes.as_ptr().cast(), self.len)),
            }
        }
    }
}

/// Shape and storage dtype of a tensor in a checkpoint.
#[derive(Debug, Clone)]
pub struct TensorMeta {
    pub shape: Vec<usize>,
    pub dtype: DType,
}

/// One checkpoint file (or a set of files of the same format).
pub trait TensorSource {
    /// The file this source reads (for error messages).
    fn path(&self) -> &Path;
    /// All tensor names with their metadata.
    fn metas(&self) -> Result<Vec<(String, TensorMeta)>>;
    /// Load one tensor, converted to `dtype`, on `device`.
    fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor>;
    /// The tensor in its stored quantized form, for formats that have one (GGUF).
    fn load_quantized(&self, _name: &str) -> Result<Option<QMatrix>> {
        Ok(None)
    }
    /// The tensor's values in place in the file's memory map, where it is stored as f32, bf16
    /// or f16 in the layout it is used in (no transform to undo); `None` otherwise.
    fn mapped(&self, _name: &str) -> Option<MappedTensor> {
        None
    }
    /// The same for a matrix stored as the transpose of the checkpoint's (GGUF's GPT-2 Conv1D
    /// weights, `[out, in]`): its values in the stored layout, the one the products use.
    fn mapped_transposed(&self, _name: &str) -> Option<MappedTensor> {
        None
    }
}

/// All tensors of a checkpoint, possibly spread over several files, with use tracking.
pub struct WeightStore {
    sources: Vec<Box<dyn TensorSource>>,
    index: BTreeMap<String, (usize, TensorMeta)>,
    used: RefCell<BTreeSet<String>>,
    /// Names accepted without being used (tied copies, buffers such as rotary `inv_freq`).
    ignored: RefCell<BTreeSet<String>>,
    /// Benchmark mode: every requested tensor is made up (seeded, uniform in ±0.05).
    synthetic: Option<u64>,
}

impl WeightStore {
    pub fn new(sources: Vec<Box<dyn TensorSource>>) -> Result<Self> {
        let mut index = BTreeMap::new();
        for (i, s) in sources.iter().enumerate() {
            for (name, meta) in s.metas()? {
                if index.insert(name.clone(), (i, meta)).is_some() {
                    return Err(Error::bad_weights(
                        s.path(),
                        format!("tensor '{name}' appears in more than one shard"),
                    ));
                }
            }
        }
        Ok(Self {
            sources,
            index,
            used: RefCell::default(),
            ignored: RefCell::default(),
            synthetic: None,
        })
    }

    /// A store that invents every tensor it is asked for (for `lmgen bench` on any shape
    /// without downloading weights). Deterministic for a given seed and tensor name.
    pub fn synthetic(seed: u64) -> Self {
        Self {
            sources: vec![],
            index: BTreeMap::new(),
            used: RefCell::default(),
            ignored: RefCell::default(),
            synthetic: Some(seed),
        }
    }

    /// Path of the first file, used when an error concerns the checkpoint as a whole.
    pub fn path(&self) -> PathBuf {
        self.sources
            .first()
            .map(|s| s.path().to_path_buf())
            .unwrap_or_default()
    }

    fn path_of(&self, name: &str) -> PathBuf {
        match self.index.get(name) {
            Some((i, _)) => self.sources[*i].path().to_path_buf(),
            None => self.path(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn meta(&self, name: &str) -> Option<&TensorMeta> {
        self.index.get(name).map(|(_, m)| m)
    }

    /// Load `name` as `dtype`, checking its shape when `shape` is given. Marks it used.
    pub fn get(
        &self,
        name: &str,
        shape: Option<&[usize]>,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        if let (Some(seed), Some(shape)) = (self.synthetic, shape) {
            return synthetic_tensor(seed, name, shape, dtype, device);
        }
        let (i, meta) = self.index.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path(),
            name: name.to_string(),
        })?;
        if let Some(shape) = shape {
            if meta.shape != shape {
                return Err(Error::ShapeMismatch {
                    path: self.path_of(name),
                    name: name.to_string(),
                    got: meta.shape.clone(),
                    expected: shape.to_vec(),
                });
            }
        }
        self.used.borrow_mut().insert(name.to_string());
        self.sources[*i].load(name, dtype, device)
    }

    /// `name` as stored quantized (marked used), or `None` when it is not stored quantized.
    pub fn get_quantized(&self, name: &str, shape: &[usize]) -> Result<Option<QMatrix>> {
        let Some((i, meta)) = self.index.get(name) else {
            return Ok(None);
        };
        if meta.shape != shape {
            return Ok(None); // `get` reports the mismatch
        }
        let q = self.sources[*i].load_quantized(name)?;
        if q.is_some() {
            self.used.borrow_mut().insert(name.to_string());
        }
        Ok(q)
    }

    /// `name` used in place from the file's memory map (marked used), or `None` when it is
    /// not stored as f32, bf16 or f16 in its final layout (then [`Self::get`] loads a copy and
    /// reports any mismatch).
    pub fn get_mapped(&self, name: &str, shape: &[usize]) -> Option<MappedTensor> {
        self.mapped_by(name, shape, |s| s.mapped(name))
    }

    /// `name` (of `shape`, a matrix) transposed, in place where the file stores it so
    /// ([`TensorSource::mapped_transposed`]); marks it used.
    pub fn get_mapped_transposed(&self, name: &str, shape: &[usize]) -> Option<MappedTensor> {
        self.mapped_by(name, shape, |s| s.mapped_transposed(name))
    }

    fn mapped_by(
        &self,
        name: &str,
        shape: &[usize],
        get: impl FnOnce(&dyn TensorSource) -> Option<MappedTensor>,
    ) -> Option<MappedTensor> {
        if self.synthetic.is_some() {
            return None;
        }
        let (i, meta) = self.index.get(name)?;
        if meta.shape != shape || !matches!(meta.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return None;
        }
        let m = get(self.sources[*i].as_ref())?;
        if m.len != shape.iter().product::<usize>() {
            return None;
        }
        self.used.borrow_mut().insert(name.to_string());
        Some(m)
    }

    /// The float dtype (f32, bf16, f16) that holds most of the checkpoint's matrix values, or
    /// `None` where another dtype does.
    pub fn matrix_dtype(&self) -> Option<DType> {
        let mut by: BTreeMap<&'static str, (DType, usize)> = BTreeMap::new();
        for (_, meta) in self.index.values() {
            if meta.shape.len() >= 2 {
                let e = by.entry(meta.dtype.as_str()).or_insert((meta.dtype, 0));
                e.1 += meta.shape.iter().product::<usize>();
            }
        }
        let (dtype, _) = by.into_values().max_by_key(|&(_, n)| n)?;
        matches!(dtype, DType::F32 | DType::BF16 | DType::F16).then_some(dtype)
    }

    /// The dtype `name` is stored in (`None` for an unknown name).
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        self.index.get(name).map(|(_, m)| m.dtype)
    }

    /// Declare a tensor as deliberately unused (e.g. a tied `lm_head.weight` copy).
    pub fn ignore(&self, name: &str) {
        self.ignored.borrow_mut().insert(name.to_string());
    }

    /// Fail on the first tensor that was neither used nor ignored.
    pub fn check_all_used(&self) -> Result<()> {
        let used = self.used.borrow();
        let ignored = self.ignored.borrow();
        for name in self.index.keys() {
            if !used.contains(name) && !ignored.contains(name) {
                return Err(Error::UnusedTensor {
                    path: self.path_of(name),
                    name: name.clone(),
                });
            }
        }
        Ok(())
    }
}

fn synthetic_tensor(
    seed: u64,
    name: &str,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    // FNV-1a of the name, mixed with the seed: each tensor has its own stream.
    let mut state = name.bytes().fold(0xcbf2_9ce4_8422_2325u64 ^ seed, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    });
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| {
            // xorshift64*
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40; // 24 random bits
            (r as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect();
    Ok(Tensor::from_vec(data, shape, device)?.to_dtype(dtype)?)
}
