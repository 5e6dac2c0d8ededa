//! PyTorch `torch.save` checkpoints (`pytorch_model.bin`, zip format, torch >= 1.6).
//!
//! The pickle inside (`<archive>/data.pkl`) is read by a small, restricted interpreter that never
//! executes anything: it knows a fixed allow-list of globals (the ones `torch.save` emits for a
//! state dict of tensors) and refuses any other global (`os.system`, `builtins.eval`, ...) the
//! moment it is referenced. Tensor bytes (`<archive>/data/<key>`) are read lazily on `load`,
//! straight from a memory map when the zip entry is stored uncompressed (what torch writes).
use super::st::one_line;
use super::{TensorMeta, TensorSource};
use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::io::{Cursor, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// Element type of a torch storage (`torch.FloatStorage`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StorageKind {
    F32,
    F64,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl StorageKind {
    fn from_class(name: &str) -> Option<Self> {
        Some(match name {
            "FloatStorage" => Self::F32,
            "DoubleStorage" => Self::F64,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }
    fn itemsize(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }
    /// The candle dtype the tensor is exposed as (candle has no i8/bool).
    fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F64 => DType::F64,
            Self::F16 => DType::F16,
            Self::BF16 => DType::BF16,
            Self::I64 => DType::I64,
            Self::I32 => DType::I32,
            Self::I16 | Self::I8 => DType::I16,
            Self::U8 | Self::Bool => DType::U8,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Restricted unpickler
// ---------------------------------------------------------------------------------------------

/// The only globals a checkpoint may reference.
#[derive(Debug, Clone, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    /// `torch.Tensor` / `torch.nn.parameter.Parameter`: only usable as the type argument of
    /// `_rebuild_from_type_v2`, never called.
    TensorType(String),
    /// `_codecs.encode`, which protocol-2 pickles use to encode `bytes` objects.
    CodecsEncode,
    Storage(StorageKind),
}

fn resolve_global(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
        ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
        ("torch", "Tensor") | ("torch._tensor", "Tensor") | ("torch.nn.parameter", "Parameter") => {
            Global::TensorType(format!("{module}.{name}"))
        }
        ("_codecs", "encode") => Global::CodecsEncode,
        ("torch", cls) => Global::Storage(StorageKind::from_class(cls)?),
        _ => return None,
    })
}

#[derive(Debug)]
struct StorageRef {
    kind: StorageKind,
    key: String,
    /// Number of elements of the storage.
    numel: usize,
}

#[derive(Debug)]
struct TensorRef {
    storage: Rc<StorageRef>,
    /// In elements.
    offset: usize,
    size: Vec<usize>,
    /// In elements.
    stride: Vec<usize>,
}

impl TensorRef {
    fn numel(&self) -> Option<usize> {
        self.size.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
    }
    /// True when the elements are laid out in row-major order without gaps.
    fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for (&d, &s) in self.size.iter().zip(&self.stride).rev() {
            if d != 1 && s != expected {
                return false;
            }
            expected = expected.saturating_mul(d);
        }
        true
    }
}

#[derive(Debug, Clone)]
enum V {
    None,
    Bool(bool),
    Int(i64),
    Float(#[allow(dead_code)] f64),
    Str(Rc<str>),
    Bytes(#[allow(dead_code)] Rc<[u8]>),
    Tuple(Rc<Vec<V>>),
    List(Rc<RefCell<Vec<V>>>),
    Dict(Rc<RefCell<Vec<(V, V)>>>),
    Global(Global),
    Storage(Rc<StorageRef>),
    Tensor(Rc<TensorRef>),
}

impl V {
    fn kind(&self) -> &'static str {
        match self {
            V::None => "None",
            V::Bool(_) => "bool",
            V::Int(_) => "int",
            V::Float(_) => "float",
            V::Str(_) => "str",
            V::Bytes(_) => "bytes",
            V::Tuple(_) => "tuple",
            V::List(_) => "list",
            V::Dict(_) => "dict",
            V::Global(_) => "class",
            V::Storage(_) => "storage",
            V::Tensor(_) => "tensor",
        }
    }
    fn dict(items: Vec<(V, V)>) -> V {
        V::Dict(Rc::new(RefCell::new(items)))
    }
}

type PResult<T> = std::result::Result<T, String>;

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<V>,
    /// Positions in `stack` of the open MARKs.
    marks: Vec<usize>,
    memo: HashMap<u64, V>,
}

/// Upper bound on the tensor rank we accept (torch allows 64 dims).
const MAX_RANK: usize = 64;

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> PResult<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        match end {
            Some(end) => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(format!(
                "pickle data ends unexpectedly at byte {} (truncated data.pkl)",
                self.pos
            )),
        }
    }
    fn u8(&mut self) -> PResult<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> PResult<u16> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> PResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> PResult<u64> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn line(&mut self) -> PResult<&'a str> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("pickle data ends inside a text line (truncated)")?;
        let s =
            std::str::from_utf8(&rest[..n]).map_err(|_| "non-UTF-8 text in pickle".to_string())?;
        self.pos += n + 1;
        Ok(s.trim_end_matches('\r'))
    }
    fn str_of_len(&mut self, n: u64) -> PResult<V> {
        let n = usize::try_from(n).map_err(|_| "string length overflows".to_string())?;
        let b = self.take(n)?;
        let s = std::str::from_utf8(b).map_err(|_| "invalid UTF-8 string in pickle".to_string())?;
        Ok(V::Str(Rc::from(s)))
    }
    fn bytes_of_len(&mut self, n: u64) -> PResult<V> {
        let n = usize::try_from(n).map_err(|_| "bytes length overflows".to_string())?;
        Ok(V::Bytes(Rc::from(self.take(n)?)))
    }

    fn push(&mut self, v: V) {
        self.stack.push(v)
    }
    fn pop(&mut self) -> PResult<V> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err("malformed pickle: stack underflow".into());
        }
        self.stack
            .pop()
            .ok_or_else(|| "malformed pickle: stack underflow".into())
    }
    fn top(&mut self) -> PResult<&mut V> {
        self.stack
            .last_mut()
            .ok_or_else(|| "malformed pickle: empty stack".into())
    }
    fn pop_mark(&mut self) -> PResult<Vec<V>> {
        let m = self.marks.pop().ok_or("malformed pickle: MARK expected")?;
        let items = self.stack.split_off(m);
        Ok(items)
    }
    fn memo_put(&mut self, idx: u64) -> PResult<()> {
        let v = self
            .stack
            .last()
            .cloned()
            .ok_or("malformed pickle: memoizing an empty stack")?;
        self.memo.insert(idx, v);
        Ok(())
    }
    fn memo_get(&mut self, idx: u64) -> PResult<()> {
        let v = self
            .memo
            .get(&idx)
            .cloned()
            .ok_or_else(|| format!("malformed pickle: memo entry {idx} missing"))?;
        self.push(v);
        Ok(())
    }

    fn global(&mut self, module: &str, name: &str) -> PResult<()> {
        match resolve_global(module, name) {
            Some(g) => {
                self.push(V::Global(g));
                Ok(())
            }
            None => Err(format!(
                "pickle references '{module}.{name}', which is not tensor data; refusing to load"
            )),
        }
    }

    /// Run the pickle to its STOP and return the resulting object.
    fn run(mut self) -> PResult<V> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    if proto > 5 {
                        return Err(format!("unsupported pickle protocol {proto}"));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: just a length hint
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.global(module, name)?
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    match (module, name) {
                        (V::Str(m), V::Str(n)) => self.global(&m, &n)?,
                        _ => return Err("malformed pickle: STACK_GLOBAL needs two strings".into()),
                    }
                }
                b'q' => {
                    let i = self.u8()? as u64;
                    self.memo_put(i)?
                }
                b'r' => {
                    let i = self.u32()? as u64;
                    self.memo_put(i)?
                }
                0x94 => {
                    let i = self.memo.len() as u64;
                    self.memo_put(i)?
                }
                b'p' => {
                    let i = self.line()?.parse::<u64>().map_err(|_| "malformed PUT".to_string())?;
                    self.memo_put(i)?
                }
                b'h' => {
                    let i = self.u8()? as u64;
                    self.memo_get(i)?
                }
                b'j' => {
                    let i = self.u32()? as u64;
                    self.memo_get(i)?
                }
                b'g' => {
                    let i = self.line()?.parse::<u64>().map_err(|_| "malformed GET".to_string())?;
                    self.memo_get(i)?
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.push(v)
                }
                b')' => self.push(V::Tuple(Rc::new(vec![]))),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(V::Tuple(Rc::new(items)))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.push(V::Tuple(Rc::new(items)))
                }
                b'}' => self.push(V::dict(vec![])),
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items)?;
                    self.push(V::dict(pairs))
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        V::Dict(d) => d.borrow_mut().push((k, v)),
                        other => return Err(format!("malformed pickle: SETITEM on a {}", other.kind())),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let p = pairs(items)?;
                    match self.top()? {
                        V::Dict(d) => d.borrow_mut().extend(p),
                        other => return Err(format!("malformed pickle: SETITEMS on a {}", other.kind())),
                    }
                }
                b']' => self.push(V::List(Rc::new(RefCell::new(vec![])))),
                b'l' => {
                    let items = self.pop_mark()?;
                    self.push(V::List(Rc::new(RefCell::new(items))))
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        V::List(l) => l.borrow_mut().push(v),
                        other => return Err(format!("malformed pickle: APPEND on a {}", other.kind())),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        V::List(l) => l.borrow_mut().extend(items),
                        other => return Err(format!("malformed pickle: APPENDS on a {}", other.kind())),
                    }
                }
                b'N' => self.push(V::None),
                0x88 => self.push(V::Bool(true)),
                0x89 => self.push(V::Bool(false)),
                b'J' => {
                    let v = self.u32()? as i32;
                    self.push(V::Int(v as i64))
                }
                b'K' => {
                    let v = self.u8()?;
                    self.push(V::Int(v as i64))
                }
                b'M' => {
                    let v = self.u16()?;
                    self.push(V::Int(v as i64))
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a { self.u8()? as usize } else { self.u32()? as usize };
                    if n > 8 {
                        return Err(format!("integer of {n} bytes in pickle is too large"));
                    }
                    let b = self.take(n)?;
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= (byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n); // sign-extend
                    }
                    self.push(V::Int(v))
                }
                b'I' => {
                    let l = self.line()?;
                    let v = match l {
                        "01" => V::Bool(true),
                        "00" => V::Bool(false),
                        _ => V::Int(l.parse::<i64>().map_err(|_| format!("malformed INT '{l}'"))?),
                    };
                    self.push(v)
                }
                b'G' => {
                    let b = self.take(8)?;
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    self.push(V::Float(f64::from_be_bytes(a)))
                }
                b'X' => {
                    let n = self.u32()? as u64;
                    let v = self.str_of_len(n)?;
                    self.push(v)
                }
                0x8c => {
                    let n = self.u8()? as u64;
                    let v = self.str_of_len(n)?;
                    self.push(v)
                }
                0x8d => {
                    let n = self.u64()?;
                    let v = self.str_of_len(n)?;
                    self.push(v)
                }
                b'T' | b'U' => {
                    // Python 2 byte strings: decode as latin-1.
                    let n = if op == b'T' { self.u32()? as usize } else { self.u8()? as usize };
                    let s: String = self.take(n)?.iter().map(|&b| b as char).collect();
                    self.push(V::Str(Rc::from(s.as_str())))
                }
                b'B' => {
                    let n = self.u32()? as u64;
                    let v = self.bytes_of_len(n)?;
                    self.push(v)
                }
                b'C' => {
                    let n = self.u8()? as u64;
                    let v = self.bytes_of_len(n)?;
                    self.push(v)
                }
                0x8e => {
                    let n = self.u64()?;
                    let v = self.bytes_of_len(n)?;
                    self.push(v)
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let s = persistent_storage(pid)?;
                    self.push(V::Storage(Rc::new(s)))
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = call(callable, args)?;
                    self.push(v)
                }
                b'b' => {
                    let _state = self.pop()?;
                    match self.top()? {
                        // OrderedDict attributes (`_metadata`), tensor/parameter state: ignored.
                        V::Dict(_) | V::Tensor(_) => {}
                        other => return Err(format!("malformed pickle: BUILD on a {}", other.kind())),
                    }
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                other => {
                    return Err(format!(
                        "unsupported pickle opcode 0x{other:02x} at byte {at}; not a plain tensor state dict"
                    ))
                }
            }
        }
    }
}

fn pairs(mut items: Vec<V>) -> PResult<Vec<(V, V)>> {
    if items.len() % 2 == 1 {
        return Err("malformed pickle: odd number of dict items".into());
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.drain(..);
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Ok(out)
}

fn as_int(v: &V, what: &str) -> PResult<i64> {
    match v {
        V::Int(i) => Ok(*i),
        V::Bool(b) => Ok(*b as i64),
        other => Err(format!("{what}: expected an int, got a {}", other.kind())),
    }
}

fn as_usize(v: &V, what: &str) -> PResult<usize> {
    let i = as_int(v, what)?;
    usize::try_from(i).map_err(|_| format!("{what}: negative value {i}"))
}

fn as_usizes(v: &V, what: &str) -> PResult<Vec<usize>> {
    match v {
        V::Tuple(t) => {
            if t.len() > MAX_RANK {
                return Err(format!("{what}: {} dimensions", t.len()));
            }
            t.iter().map(|x| as_usize(x, what)).collect()
        }
        other => Err(format!("{what}: expected a tuple, got a {}", other.kind())),
    }
}

/// `('storage', torch.FloatStorage, key, location, numel)`
fn persistent_storage(pid: V) -> PResult<StorageRef> {
    let t = match &pid {
        V::Tuple(t) => t.clone(),
        other => return Err(format!("unsupported persistent id (a {})", other.kind())),
    };
    match t.as_slice() {
        [V::Str(tag), V::Global(Global::Storage(kind)), V::Str(key), _location, numel]
            if &**tag == "storage" =>
        {
            let numel = as_usize(numel, "storage size")?;
            let plain = !key.is_empty()
                && key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            if !plain || key.contains("..") {
                return Err(format!("invalid storage key '{key}'"));
            }
            Ok(StorageRef {
                kind: *kind,
                key: key.to_string(),
                numel,
            })
        }
        [V::Str(tag), ..] if &**tag == "storage" => {
            Err("unsupported storage reference (unknown storage type or layout)".into())
        }
        _ => Err("unsupported persistent id (not a storage)".into()),
    }
}

fn call(callable: V, args: V) -> PResult<V> {
    let g = match callable {
        V::Global(g) => g,
        other => return Err(format!("malformed pickle: calling a {}", other.kind())),
    };
    let args = match args {
        V::Tuple(t) => t,
        other => {
            return Err(format!(
                "malformed pickle: call arguments are a {}",
                other.kind()
            ))
        }
    };
    match g {
        Global::OrderedDict => match args.as_slice() {
            [] => Ok(V::dict(vec![])),
            [V::List(l)] => {
                let mut items = vec![];
                for p in l.borrow().iter() {
                    match p {
                        V::Tuple(kv) if kv.len() == 2 => items.push((kv[0].clone(), kv[1].clone())),
                        _ => return Err("OrderedDict(...) with a non-pair item".into()),
                    }
                }
                Ok(V::dict(items))
            }
            _ => Err("unsupported OrderedDict(...) arguments".into()),
        },
        Global::RebuildTensorV2 => {
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            if args.len() < 4 {
                return Err("_rebuild_tensor_v2 with too few arguments".into());
            }
            let storage = match &args[0] {
                V::Storage(s) => s.clone(),
                other => {
                    return Err(format!(
                        "_rebuild_tensor_v2: expected a storage, got a {}",
                        other.kind()
                    ))
                }
            };
            let offset = as_usize(&args[1], "storage offset")?;
            let size = as_usizes(&args[2], "tensor size")?;
            let stride = as_usizes(&args[3], "tensor stride")?;
            if size.len() != stride.len() {
                return Err(format!(
                    "tensor size {size:?} and stride {stride:?} differ in rank"
                ));
            }
            Ok(V::Tensor(Rc::new(TensorRef {
                storage,
                offset,
                size,
                stride,
            })))
        }
        Global::RebuildParameter | Global::RebuildParameterWithState => match args.first() {
            Some(t @ V::Tensor(_)) => Ok(t.clone()),
            _ => Err("_rebuild_parameter without a tensor".into()),
        },
        Global::RebuildFromTypeV2 => match args.as_slice() {
            // (func, new_type, args, state)
            [func @ V::Global(Global::RebuildTensorV2 | Global::RebuildParameter), V::Global(Global::TensorType(_)), fargs, ..] => {
                call(func.clone(), fargs.clone())
            }
            _ => Err("unsupported _rebuild_from_type_v2 arguments".into()),
        },
        Global::CodecsEncode => match args.as_slice() {
            [V::Str(s), V::Str(enc)] if &**enc == "latin1" || &**enc == "latin-1" => {
                let mut b = Vec::with_capacity(s.len());
                for c in s.chars() {
                    b.push(
                        u8::try_from(c as u32)
                            .map_err(|_| "bad latin-1 text in pickle".to_string())?,
                    );
                }
                Ok(V::Bytes(Rc::from(b)))
            }
            [V::Str(s), V::Str(enc)] if &**enc == "utf-8" || &**enc == "utf8" => {
                Ok(V::Bytes(Rc::from(s.as_bytes())))
            }
            _ => Err("unsupported _codecs.encode arguments".into()),
        },
        Global::TensorType(name) => Err(format!("pickle calls '{name}', which is not supported")),
        Global::Storage(k) => Err(format!(
            "pickle calls the storage class {k:?}, which is not supported"
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Zip layout
// ---------------------------------------------------------------------------------------------

#[derive(Debug)]
struct StorageEntry {
    zip_name: String,
    /// Byte offset of the data in the file when stored uncompressed.
    stored_at: Option<usize>,
    size: usize,
}

#[derive(Debug)]
struct PthTensor {
    kind: StorageKind,
    key: String,
    offset: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
    contiguous: bool,
}

/// A zip-format `torch.save` file holding a flat state dict of tensors.
pub struct PthFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    tensors: BTreeMap<String, PthTensor>,
    storages: HashMap<String, StorageEntry>,
}

type ZipOnSlice<'a> = zip::ZipArchive<Cursor<&'a [u8]>>;

impl PthFile {
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: read-only mapping; the file must not be modified while mapped.
        let mmap =
            unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(&path, e))?;
        let bad = |msg: String| Error::bad_weights(&path, msg);
        let data: &[u8] = &mmap;

        if data.len() < 4 {
            return Err(bad(format!(
                "not a PyTorch checkpoint: file is {} bytes (empty or truncated)",
                data.len()
            )));
        }
        if !data.starts_with(b"PK\x03\x04") {
            let legacy_tar = data.len() > 262 && &data[257..262] == b"ustar";
            if data[0] == 0x80 || legacy_tar {
                return Err(bad(
                    "legacy torch format not supported; re-save with torch>=1.6 or convert to safetensors".into(),
                ));
            }
            return Err(bad(
                "not a PyTorch zip checkpoint (unrecognised file signature)".into(),
            ));
        }
        let mut zip = ZipOnSlice::new(Cursor::new(data)).map_err(|e| {
            bad(format!(
                "corrupt or truncated zip archive: {}",
                one_line(&e.to_string())
            ))
        })?;

        // `<archive>/data.pkl`; the archive prefix is whatever name torch.save was given.
        let names: Vec<String> = zip
            .file_names()
            .filter_map(|n| n.ok())
            .map(|n| n.into_owned())
            .collect();
        let pkls: Vec<&String> = names
            .iter()
            .filter(|n| *n == "data.pkl" || n.ends_with("/data.pkl"))
            .collect();
        let pkl = match pkls.as_slice() {
            [one] => (*one).clone(),
            [] => {
                return Err(bad(
                    "zip archive has no data.pkl: not a torch.save checkpoint".into(),
                ))
            }
            _ => {
                return Err(bad(format!(
                    "zip archive has {} data.pkl entries; expected one",
                    pkls.len()
                )))
            }
        };
        let prefix = pkl[..pkl.len() - "data.pkl".len()].to_string();

        if names.iter().any(|n| *n == format!("{prefix}byteorder")) {
            let bo = read_member(&mut zip, &format!("{prefix}byteorder"), 64).map_err(&bad)?;
            if bo.trim_ascii() != b"little" {
                return Err(bad(format!(
                    "checkpoint was saved with byte order '{}'; only little-endian is supported",
                    String::from_utf8_lossy(bo.trim_ascii())
                )));
            }
        }

        let pickle = read_member(&mut zip, &pkl, 1 << 31).map_err(&bad)?;
        let root = Unpickler::new(&pickle)
            .run()
            .map_err(|e| bad(format!("{pkl}: {e}")))?;
        let items = match root {
            V::Dict(d) => d,
            other => {
                return Err(bad(format!(
                    "checkpoint holds a {}, not a state dict of tensors",
                    other.kind()
                )))
            }
        };

        let mut tensors = BTreeMap::new();
        let mut storages: HashMap<String, StorageEntry> = HashMap::new();
        for (k, v) in items.borrow().iter() {
            let name = match k {
                V::Str(s) => s.to_string(),
                other => {
                    return Err(bad(format!(
                        "state dict has a {} key; expected tensor names",
                        other.kind()
                    )))
                }
            };
            let t = match v {
                V::Tensor(t) => t.clone(),
                V::Dict(_) if matches!(name.as_str(), "state_dict" | "model" | "module" | "model_state_dict") => {
                    return Err(bad(format!(
                        "checkpoint nests its weights under '{name}'; only a flat state dict (Hugging Face format) is supported"
                    )))
                }
                other => {
                    return Err(bad(format!("state dict entry '{name}' is a {}, not a tensor", other.kind())))
                }
            };
            let st = &t.storage;
            // Every element the view can reach must lie inside the storage.
            let numel = t
                .numel()
                .ok_or_else(|| bad(format!("tensor '{name}': size {:?} overflows", t.size)))?;
            if numel > 0 {
                let mut last = Some(t.offset);
                for (&d, &s) in t.size.iter().zip(&t.stride) {
                    last = last.and_then(|l| (d - 1).checked_mul(s).and_then(|x| x.checked_add(l)));
                }
                match last {
                    Some(l) if l < st.numel => {}
                    _ => {
                        return Err(bad(format!(
                            "tensor '{name}' (offset {}, size {:?}, stride {:?}) reaches outside its storage of {} elements",
                            t.offset, t.size, t.stride, st.numel
                        )))
                    }
                }
            }
            let need = st
                .numel
                .checked_mul(st.kind.itemsize())
                .ok_or_else(|| bad(format!("tensor '{name}': storage too large")))?;
            if !storages.contains_key(&st.key) {
                let zip_name = format!("{prefix}data/{}", st.key);
                let f = zip.by_name(&zip_name).map_err(|e| {
                    bad(format!(
                        "tensor '{name}': storage '{zip_name}' missing from the archive ({})",
                        one_line(&e.to_string())
                    ))
                })?;
                let size = usize::try_from(f.size())
                    .map_err(|_| bad(format!("tensor '{name}': storage too large")))?;
                let stored_at = if f.compression() == zip::CompressionMethod::Stored
                    && f.compressed_size() == f.size()
                {
                    let start = f.data_start().and_then(|s| usize::try_from(s).ok());
                    match start {
                        Some(s) if s.checked_add(size).is_some_and(|e| e <= data.len()) => Some(s),
                        None => None,
                        Some(_) => {
                            return Err(bad(format!(
                                "truncated or corrupt file: storage '{zip_name}' of tensor '{name}' lies outside the file"
                            )))
                        }
                    }
                } else {
                    None
                };
                storages.insert(
                    st.key.clone(),
                    StorageEntry {
                        zip_name,
                        stored_at,
                        size,
                    },
                );
            }
            let se = &storages[&st.key];
            if se.size < need {
                return Err(bad(format!(
                    "tensor '{name}': storage '{}' has {} bytes, its {:?} storage needs {need}",
                    se.zip_name, se.size, st.kind
                )));
            }
            let contiguous = t.is_contiguous();
            tensors.insert(
                name,
                PthTensor {
                    kind: st.kind,
                    key: st.key.clone(),
                    offset: t.offset,
                    size: t.size.clone(),
                    stride: t.stride.clone(),
                    contiguous,
                },
            );
        }
        drop(zip);
        Ok(Self {
            path,
            mmap,
            tensors,
            storages,
        })
    }

    fn storage_bytes(&self, name: &str, key: &str) -> Result<Cow<'_, [u8]>> {
        let se = self.storages.get(key).ok_or_else(|| {
            Error::bad_weights(
                &self.path,
                format!("tensor '{name}': unknown storage '{key}'"),
            )
        })?;
        if let Some(s) = se.stored_at {
            return self
                .mmap
                .get(s..s + se.size)
                .map(Cow::Borrowed)
                .ok_or_else(|| {
                    Error::bad_weights(
                        &self.path,
                        format!("tensor '{name}': storage lies outside the file (file changed?)"),
                    )
                });
        }
        let bad = |m: String| Error::bad_weights(&self.path, format!("tensor '{name}': {m}"));
        let mut zip = ZipOnSlice::new(Cursor::new(&self.mmap[..]))
            .map_err(|e| bad(one_line(&e.to_string())))?;
        let bytes = read_member(&mut zip, &se.zip_name, se.size as u64 + 1).map_err(bad)?;
        Ok(Cow::Owned(bytes))
    }
}

/// Read a whole zip member, refusing members larger than `limit` bytes.
fn read_member(
    zip: &mut ZipOnSlice<'_>,
    name: &str,
    limit: u64,
) -> std::result::Result<Vec<u8>, String> {
    let mut f = zip.by_name(name).map_err(|e| {
        format!(
            "cannot open '{name}' in the archive: {}",
            one_line(&e.to_string())
        )
    })?;
    if f.size() > limit {
        return Err(format!(
            "'{name}' in the archive is implausibly large ({} bytes)",
            f.size()
        ));
    }
    let mut out = Vec::with_capacity(f.size() as usize);
    f.read_to_end(&mut out).map_err(|e| {
        format!(
            "cannot read '{name}' from the archive (corrupt or truncated): {}",
            one_line(&e.to_string())
        )
    })?;
    Ok(out)
}

/// Copy the elements of a strided view into a contiguous buffer.
fn gather(src: &[u8], itemsize: usize, offset: usize, size: &[usize], stride: &[usize]) -> Vec<u8> {
    let n: usize = size.iter().product();
    let mut out = Vec::with_capacity(n * itemsize);
    if n == 0 {
        return out;
    }
    let rank = size.len();
    let mut idx = vec![0usize; rank];
    let mut pos = offset;
    for _ in 0..n {
        let b = pos * itemsize;
        out.extend_from_slice(&src[b..b + itemsize]);
        // Odometer increment of the multi-index, keeping `pos` in sync.
        let mut d = rank;
        while d > 0 {
            d -= 1;
            idx[d] += 1;
            pos += stride[d];
            if idx[d] < size[d] {
                break;
            }
            pos -= stride[d] * size[d];
            idx[d] = 0;
        }
    }
    out
}

fn decode(bytes: &[u8], kind: StorageKind, shape: &[usize]) -> candle_core::Result<Tensor> {
    let dev = Device::Cpu;
    match kind {
        StorageKind::I8 => {
            let v: Vec<i16> = bytes.iter().map(|&b| b as i8 as i16).collect();
            Tensor::from_vec(v, shape, &dev)
        }
        StorageKind::Bool => {
            let v: Vec<u8> = bytes.iter().map(|&b| (b != 0) as u8).collect();
            Tensor::from_vec(v, shape, &dev)
        }
        k => Tensor::from_raw_buffer(bytes, k.dtype(), shape, &dev),
    }
}

impl TensorSource for PthFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn metas(&self) -> Result<Vec<(String, TensorMeta)>> {
        Ok(self
            .tensors
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    TensorMeta {
                        shape: t.size.clone(),
                        dtype: t.kind.dtype(),
                    },
                )
            })
            .collect())
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        let storage = self.storage_bytes(name, &t.key)?;
        let is = t.kind.itemsize();
        let numel: usize = t.size.iter().product();
        // Bounds were validated at open against the storage size.
        let gathered;
        let bytes: &[u8] = if numel == 0 {
            &[]
        } else if t.contiguous {
            let start = t.offset * is;
            match storage.get(start..start + numel * is) {
                Some(b) => b,
                None => {
                    return Err(Error::bad_weights(
                        &self.path,
                        format!("tensor '{name}' reaches outside its storage"),
                    ))
                }
            }
        } else {
            gathered = gather(&storage, is, t.offset, &t.size, &t.stride);
            &gathered
        };
        let wrap = |err: candle_core::Error| {
            Error::bad_weights(
                &self.path,
                format!("tensor '{name}': {}", one_line(&err.to_string())),
            )
        };
        let x = decode(bytes, t.kind, &t.size).map_err(wrap)?;
        let x = if x.dtype() == dtype {
            x
        } else {
            x.to_dtype(dtype).map_err(wrap)?
        };
        x.to_device(device).map_err(wrap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Emits pickle opcodes.
    #[derive(Default)]
    struct P(Vec<u8>);
    impl P {
        fn op(&mut self, b: u8) -> &mut Self {
            self.0.push(b);
            self
        }
        fn global(&mut self, m: &str, n: &str) -> &mut Self {
            self.0.push(b'c');
            self.0.extend_from_slice(format!("{m}\n{n}\n").as_bytes());
            self
        }
        fn stack_global(&mut self, m: &str, n: &str) -> &mut Self {
            self.s(m).s(n).op(0x93)
        }
        fn s(&mut self, s: &str) -> &mut Self {
            self.0.push(b'X');
            self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
            self.0.extend_from_slice(s.as_bytes());
            self
        }
        fn int(&mut self, i: i32) -> &mut Self {
            self.0.push(b'J');
            self.0.extend_from_slice(&i.to_le_bytes());
            self
        }
        fn put(&mut self, i: u8) -> &mut Self {
            self.op(b'q').op(i)
        }
        fn get(&mut self, i: u8) -> &mut Self {
            self.op(b'h').op(i)
        }
        fn ints(&mut self, v: &[i32]) -> &mut Self {
            self.op(b'(');
            for &i in v {
                self.int(i);
            }
            self.op(b't')
        }
        /// `_rebuild_tensor_v2(persistent('storage', torch.<cls>, key, 'cpu', numel), off, size, stride, False, OrderedDict())`
        fn tensor(
            &mut self,
            cls: &str,
            key: &str,
            numel: i32,
            off: i32,
            size: &[i32],
            stride: &[i32],
        ) -> &mut Self {
            self.global("torch._utils", "_rebuild_tensor_v2").op(b'(');
            self.op(b'(')
                .s("storage")
                .global("torch", cls)
                .s(key)
                .s("cpu")
                .int(numel)
                .op(b't')
                .op(b'Q');
            self.int(off).ints(size).ints(stride).op(0x89);
            self.global("collections", "OrderedDict").op(b')').op(b'R');
            self.op(b't').op(b'R')
        }
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn zip_bytes(entries: &[(&str, &[u8], bool)]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (name, data, deflate) in entries {
            let method = if *deflate {
                zip::CompressionMethod::Deflated
            } else {
                zip::CompressionMethod::Stored
            };
            let opts = zip::write::SimpleFileOptions::default().compression_method(method);
            w.start_file(*name, opts).expect("start_file");
            w.write_all(data).expect("write");
        }
        w.finish().expect("finish").into_inner()
    }

    /// A state dict in the shape HF's `torch.save(model.state_dict())` produces.
    fn sample_pickle() -> Vec<u8> {
        let mut p = P::default();
        p.op(0x80).op(2);
        p.global("collections", "OrderedDict")
            .put(0)
            .op(b')')
            .op(b'R')
            .put(1)
            .op(b'(');
        // 'a': f32 [2, 3] at offset 2 of storage '0' (8 elements)
        p.s("a").tensor("FloatStorage", "0", 8, 2, &[2, 3], &[3, 1]);
        // 'h': f16 [3], storage '1'
        p.s("h").tensor("HalfStorage", "1", 3, 0, &[3], &[1]);
        // 'tied': transposed [2, 2] view of storage '0' (shared with 'a')
        p.s("tied")
            .tensor("FloatStorage", "0", 8, 0, &[2, 2], &[1, 2]);
        // 'p': a Parameter wrapping a bf16 [2] tensor
        p.s("p")
            .global("torch._utils", "_rebuild_parameter")
            .op(b'(');
        p.tensor("BFloat16Storage", "2", 2, 0, &[2], &[1])
            .op(0x88)
            .get(0)
            .op(b')')
            .op(b'R')
            .op(b't')
            .op(b'R');
        // 'i': int64 scalar
        p.s("i").tensor("LongStorage", "3", 1, 0, &[], &[]);
        p.op(b'u');
        // state = {'_metadata': OrderedDict({'': {'version': 1}})}
        p.op(b'}')
            .s("_metadata")
            .get(0)
            .op(b')')
            .op(b'R')
            .s("")
            .op(b'}')
            .s("version")
            .int(1)
            .op(b's')
            .op(b's');
        p.op(b's').op(b'b').op(b'.');
        p.0
    }

    fn sample_zip(pickle: &[u8], deflate: bool) -> Vec<u8> {
        let s0 = f32_bytes(&[10., 11., 0., 1., 2., 3., 4., 5.]);
        let s1: Vec<u8> = [1.5f32, -2.0, 0.25]
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect();
        let s2: Vec<u8> = [3.0f32, -4.0]
            .iter()
            .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
            .collect();
        let s3 = (-7i64).to_le_bytes();
        zip_bytes(&[
            ("archive/data.pkl", pickle, false),
            ("archive/byteorder", b"little", false),
            ("archive/data/0", &s0, deflate),
            ("archive/data/1", &s1, false),
            ("archive/data/2", &s2, false),
            ("archive/data/3", &s3, false),
            ("archive/version", b"3\n", false),
        ])
    }

    fn check_sample(path: &Path) {
        let dev = Device::Cpu;
        let f = PthFile::open(path).expect("open");
        let metas: BTreeMap<_, _> = f.metas().unwrap().into_iter().collect();
        assert_eq!(metas.len(), 5);
        assert_eq!(metas["a"].shape, vec![2, 3]);
        assert_eq!(metas["a"].dtype, DType::F32);
        assert_eq!(metas["h"].dtype, DType::F16);
        assert_eq!(metas["p"].dtype, DType::BF16);
        assert_eq!(metas["i"].shape, Vec::<usize>::new());
        let a = f.load("a", DType::F32, &dev).unwrap();
        assert_eq!(
            a.to_vec2::<f32>().unwrap(),
            vec![vec![0., 1., 2.], vec![3., 4., 5.]]
        );
        let h = f.load("h", DType::F32, &dev).unwrap();
        assert_eq!(h.to_vec1::<f32>().unwrap(), vec![1.5, -2.0, 0.25]);
        let h16 = f.load("h", DType::F16, &dev).unwrap();
        assert_eq!(h16.dtype(), DType::F16);
        let tied = f.load("tied", DType::F32, &dev).unwrap();
        assert_eq!(
            tied.to_vec2::<f32>().unwrap(),
            vec![vec![10., 0.], vec![11., 1.]]
        );
        let p = f.load("p", DType::F32, &dev).unwrap();
        assert_eq!(p.to_vec1::<f32>().unwrap(), vec![3.0, -4.0]);
        let i = f.load("i", DType::I64, &dev).unwrap();
        assert_eq!(i.to_scalar::<i64>().unwrap(), -7);
    }

    #[test]
    fn loads_state_dict() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pytorch_model.bin");
        std::fs::write(&path, sample_zip(&sample_pickle(), false)).unwrap();
        check_sample(&path);
        // Deflated storage entries go through the zip reader instead of the mmap.
        let path = dir.path().join("deflated.bin");
        std::fs::write(&path, sample_zip(&sample_pickle(), true)).unwrap();
        check_sample(&path);
    }

    #[test]
    fn empty_tensor() {
        let mut p = P::default();
        p.op(0x80).op(2).op(b'}');
        p.s("e")
            .tensor("FloatStorage", "0", 8, 1 << 30, &[0, 4], &[4, 1])
            .op(b's')
            .op(b'.');
        let z = sample_zip(&p.0, false);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.bin");
        std::fs::write(&path, z).unwrap();
        let f = PthFile::open(&path).unwrap();
        let e = f.load("e", DType::F32, &Device::Cpu).unwrap();
        assert_eq!(e.dims(), &[0, 4]);
    }

    #[test]
    fn gather_matches_strides() {
        // 2x3 row-major storage viewed transposed as 3x2.
        let src = f32_bytes(&[0., 1., 2., 3., 4., 5.]);
        let out = gather(&src, 4, 0, &[3, 2], &[1, 3]);
        assert_eq!(out, f32_bytes(&[0., 3., 1., 4., 2., 5.]));
        // broadcast (stride 0)
        let out = gather(&src, 4, 1, &[2, 2], &[0, 1]);
        assert_eq!(out, f32_bytes(&[1., 2., 1., 2.]));
    }

    fn open_err(bytes: &[u8]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("evil.bin");
        std::fs::write(&path, bytes).unwrap();
        let e = PthFile::open(&path).err().expect("must fail").to_string();
        assert!(e.contains("evil.bin"), "{e}");
        assert_eq!(e.lines().count(), 1, "{e}");
        e
    }

    #[test]
    fn refuses_code() {
        // GLOBAL os.system; REDUCE
        let mut p = P::default();
        p.op(0x80)
            .op(2)
            .global("os", "system")
            .s("echo pwned")
            .op(0x85)
            .op(b'R')
            .op(b'.');
        let e = open_err(&sample_zip(&p.0, false));
        assert!(
            e.contains("pickle references 'os.system', which is not tensor data; refusing to load"),
            "{e}"
        );

        // STACK_GLOBAL builtins.eval, hidden inside a state dict value
        let mut p = P::default();
        p.op(0x80)
            .op(4)
            .op(b'}')
            .s("w")
            .stack_global("builtins", "eval")
            .s("1")
            .op(0x85)
            .op(b'R')
            .op(b's')
            .op(b'.');
        let e = open_err(&sample_zip(&p.0, false));
        assert!(
            e.contains("'builtins.eval'") && e.contains("refusing"),
            "{e}"
        );

        let mut p = P::default();
        p.op(0x80).op(2).global("__builtin__", "getattr").op(b'.');
        let e = open_err(&sample_zip(&p.0, false));
        assert!(e.contains("'__builtin__.getattr'"), "{e}");

        // An allowed class used as a callable it is not.
        let mut p = P::default();
        p.op(0x80)
            .op(2)
            .op(b'}')
            .s("w")
            .global("torch", "FloatStorage")
            .op(b')')
            .op(b'R')
            .op(b's')
            .op(b'.');
        let e = open_err(&sample_zip(&p.0, false));
        assert!(e.contains("not supported"), "{e}");
    }

    #[test]
    fn bad_files_error() {
        let good = sample_zip(&sample_pickle(), false);
        // Truncated: the central directory is gone.
        let e = open_err(&good[..good.len() - 30]);
        assert!(e.contains("zip"), "{e}");
        let e = open_err(&good[..good.len() / 2]);
        assert!(e.contains("zip"), "{e}");
        // Legacy (pre-1.6) torch.save: a bare pickle starting with the magic number.
        let e = open_err(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.\x80\x02M\xe9\x03.");
        assert!(e.contains("legacy torch format not supported"), "{e}");
        let e = open_err(b"");
        assert!(e.contains("empty"), "{e}");
        let e = open_err(b"hello world, not a checkpoint");
        assert!(e.contains("not a PyTorch"), "{e}");
        // Truncated pickle.
        let pk = sample_pickle();
        let e = open_err(&sample_zip(&pk[..pk.len() / 2], false));
        assert!(e.contains("truncated") || e.contains("malformed"), "{e}");
        // A view reaching past its storage.
        let mut p = P::default();
        p.op(0x80)
            .op(2)
            .op(b'}')
            .s("w")
            .tensor("FloatStorage", "0", 8, 4, &[2, 3], &[3, 1])
            .op(b's')
            .op(b'.');
        let e = open_err(&sample_zip(&p.0, false));
        assert!(
            e.contains("'w'") && e.contains("outside its storage"),
            "{e}"
        );
        // Storage declared larger than its bytes.
        let mut p = P::default();
        p.op(0x80)
            .op(2)
            .op(b'}')
            .s("w")
            .tensor("FloatStorage", "1", 8, 0, &[8], &[1])
            .op(b's')
            .op(b'.');
        let e = open_err(&sample_zip(&p.0, false));
        assert!(e.contains("'w'") && e.contains("bytes"), "{e}");
        // Storage missing.
        let mut p = P::default();
        p.op(0x80)
            .op(2)
            .op(b'}')
            .s("w")
            .tensor("FloatStorage", "9", 1, 0, &[1], &[1])
            .op(b's')
            .op(b'.');
        let e = open_err(&sample_zip(&p.0, false));
        assert!(e.contains("'w'") && e.contains("missing"), "{e}");
        // Nested training checkpoint.
        let mut p = P::default();
        p.op(0x80)
            .op(2)
            .op(b'}')
            .s("state_dict")
            .op(b'}')
            .op(b's')
            .op(b'.');
        let e = open_err(&sample_zip(&p.0, false));
        assert!(e.contains("nests its weights under 'state_dict'"), "{e}");
        // Not a dict at all.
        let mut p = P::default();
        p.op(0x80).op(2).int(3).op(b'.');
        let e = open_err(&sample_zip(&p.0, false));
        assert!(e.contains("not a state dict"), "{e}");
        // Big-endian checkpoint.
        let z = zip_bytes(&[
            ("a/data.pkl", &sample_pickle(), false),
            ("a/byteorder", b"big", false),
        ]);
        let e = open_err(&z);
        assert!(e.contains("byte order 'big'"), "{e}");
        // No data.pkl.
        let z = zip_bytes(&[("a/other.txt", b"x", false)]);
        let e = open_err(&z);
        assert!(e.contains("no data.pkl"), "{e}");
    }
}
