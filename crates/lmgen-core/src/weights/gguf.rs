//! GGUF (llama.cpp) files, exposed under Hugging Face tensor names and layouts.
//!
//! Tensors are dequantized on `load`. What llama.cpp's converter (`convert_hf_to_gguf.py`) does
//! to a checkpoint is undone here, as the family's [`GgufArch`] table says: tensor names, the
//! Q/K row permutation of the `llama` converter (for its interleaved rope), Gemma's norms stored
//! as `1 + weight`, fused QKV re-ordered from per-head or per-group layouts to `[q; k; v]`,
//! GPT-2's Conv1D matrices transposed. The architecture-specific parts live in the family files;
//! this file only knows these layout operations.
use super::st::one_line;
use super::{TensorMeta, TensorSource};
use crate::error::{Error, Result};
use crate::kernels::quant::{QMatrix, QuantKind};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use serde_json::Map;
use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

/// What llama.cpp's converter did to a tensor, undone on load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fix {
    /// Stored as the checkpoint has it.
    Keep,
    /// Rows permuted for llama.cpp's interleaved rope (the `llama` converter): Q, with
    /// `attention.head_count` heads.
    PermutedQ,
    /// The same for K, with `attention.head_count_kv` heads.
    PermutedK,
    /// Stored as `1 + weight` (Gemma's RMSNorm weights).
    PlusOne,
    /// Fused `[q heads; k heads; v heads]` where the checkpoint groups per kv head
    /// `[the group's q heads, k, v]` (Falcon).
    Ungrouped,
    /// Fused `[q; k; v]` where the checkpoint interleaves per head `[q, k, v]` (GPT-NeoX, BLOOM).
    Deinterleaved,
    /// Stored `[out, in]` where the checkpoint has GPT-2's Conv1D `[in, out]`.
    Transposed,
}

/// One llama.cpp architecture as a family reads it: the transformers class it stands for, the
/// Hugging Face names of its tensors and the `config.json` its metadata makes.
pub struct GgufArch {
    /// `general.architecture`.
    pub arch: &'static str,
    /// The transformers class (an `architectures` entry of the family).
    pub class: &'static str,
    /// Block `N`'s tensors are named `{blocks}.N.{name}`.
    pub blocks: &'static str,
    /// GGUF name -> HF name and fix, without the `.weight`/`.bias` suffix, in tables searched
    /// in order (a family's own entries, then a shared table such as [`LLAMA_TENSORS`]). Names
    /// of block tensors are relative (`attn_q` for `blk.N.attn_q`); others are whole
    /// (`token_embd`). A `*` in the HF name of a block tensor stands for the expert index: the
    /// GGUF tensor stacks the experts (`[experts, rows, cols]`), each is exposed on its own.
    pub tensors: &'static [&'static [(&'static str, &'static str, Fix)]],
    /// Completes the `config.json` of the class: [`GgufFile::config_json`] has put in the keys
    /// common to all (in their Llama spellings) and this adds or renames the rest.
    pub config: fn(&GgufFile, &mut Map<String, serde_json::Value>) -> Result<()>,
}

impl GgufArch {
    /// HF name and fix of the GGUF tensor `part` (see [`GgufArch::tensors`]).
    pub fn lookup(&self, part: &str) -> Option<(&'static str, Fix)> {
        self.tensors
            .iter()
            .flat_map(|t| t.iter())
            .find(|(g, _, _)| *g == part)
            .map(|&(_, hf, fix)| (hf, fix))
    }
}

/// The Llama layout's names (Llama, Mistral, Qwen2/3, their MoE variants, OLMo-2, Gemma ...).
pub const LLAMA_TENSORS: &[(&str, &str, Fix)] = &[
    ("token_embd", "model.embed_tokens", Fix::Keep),
    ("output_norm", "model.norm", Fix::Keep),
    ("output", "lm_head", Fix::Keep),
    ("attn_q", "self_attn.q_proj", Fix::Keep),
    ("attn_k", "self_attn.k_proj", Fix::Keep),
    ("attn_v", "self_attn.v_proj", Fix::Keep),
    ("attn_output", "self_attn.o_proj", Fix::Keep),
    ("ffn_gate", "mlp.gate_proj", Fix::Keep),
    ("ffn_up", "mlp.up_proj", Fix::Keep),
    ("ffn_down", "mlp.down_proj", Fix::Keep),
    ("attn_norm", "input_layernorm", Fix::Keep),
    ("ffn_norm", "post_attention_layernorm", Fix::Keep),
    ("post_attention_norm", "post_attention_layernorm", Fix::Keep),
    ("post_ffw_norm", "post_feedforward_layernorm", Fix::Keep),
    ("attn_q_norm", "self_attn.q_norm", Fix::Keep),
    ("attn_k_norm", "self_attn.k_norm", Fix::Keep),
    ("ffn_gate_inp", "mlp.gate", Fix::Keep),
    ("ffn_gate_exps", "mlp.experts.*.gate_proj", Fix::Keep),
    ("ffn_up_exps", "mlp.experts.*.up_proj", Fix::Keep),
    ("ffn_down_exps", "mlp.experts.*.down_proj", Fix::Keep),
    ("ffn_gate_shexp", "mlp.shared_expert.gate_proj", Fix::Keep),
    ("ffn_up_shexp", "mlp.shared_expert.up_proj", Fix::Keep),
    ("ffn_down_shexp", "mlp.shared_expert.down_proj", Fix::Keep),
    ("ffn_gate_inp_shexp", "mlp.shared_expert_gate", Fix::Keep),
];

#[derive(Debug, Clone)]
struct Mapped {
    /// Name in the GGUF file.
    gguf: String,
    shape: Vec<usize>,
    ggml: GgmlDType,
    fix: Fix,
    /// Heads for the row fixes (`PermutedQ/K`: its heads; `Ungrouped`: q heads, kv heads;
    /// `Deinterleaved`: heads).
    heads: (usize, usize),
    /// Expert `j` of a stacked `[experts, rows, cols]` tensor (`shape` is one expert's).
    expert: Option<usize>,
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: std::sync::Arc<memmap2::Mmap>,
    content: Content,
    arch: String,
    /// The family's description, once [`GgufFile::with_arch`] has given it.
    spec: Option<&'static GgufArch>,
    /// HF name -> GGUF tensor (GGUF names until an architecture is given).
    tensors: BTreeMap<String, Mapped>,
}

/// `name` split into (layer, part, suffix) for `blk.N.part.suffix`, or (None, part, suffix).
fn split_name(gguf: &str) -> Option<(Option<usize>, &str, &str)> {
    let (part, kind) = gguf.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    match part.strip_prefix("blk.") {
        Some(rest) => {
            let (layer, part) = rest.split_once('.')?;
            Some((Some(layer.parse().ok()?), part, kind))
        }
        None => Some((None, part, kind)),
    }
}

fn value_u64(v: &Value) -> Option<u64> {
    match *v {
        Value::U8(x) => Some(x as u64),
        Value::U16(x) => Some(x as u64),
        Value::U32(x) => Some(x as u64),
        Value::U64(x) => Some(x),
        Value::I8(x) => u64::try_from(x).ok(),
        Value::I16(x) => u64::try_from(x).ok(),
        Value::I32(x) => u64::try_from(x).ok(),
        Value::I64(x) => u64::try_from(x).ok(),
        _ => None,
    }
}

fn value_f64(v: &Value) -> Option<f64> {
    match *v {
        Value::F32(x) => Some(x as f64),
        Value::F64(x) => Some(x),
        _ => value_u64(v).map(|x| x as f64),
    }
}

fn ggml_dtype_name(d: GgmlDType) -> &'static str {
    match d {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// A ggml type's name as the plan's storage formats spell it (`None` for one it has not).
fn format_name(ggml: &str) -> Option<&'static str> {
    Some(match ggml {
        "F32" => "f32",
        "BF16" => "bf16",
        "F16" => "f16",
        "Q8_0" => "q8_0",
        "Q4_0" => "q4_0",
        "Q4_1" => "q4_1",
        "Q4_K" => "q4_k",
        "Q6_K" => "q6_k",
        _ => return None,
    })
}

impl Mapped {
    /// For the fixes that reorder rows: the stored row of each checkpoint row.
    fn row_order(&self) -> Option<Vec<usize>> {
        let rows = *self.shape.first()?;
        let (h, kv) = self.heads;
        let order = match self.fix {
            // Inverse of llama.cpp's `permute`: GGUF = HF.reshape(h, 2, r/h/2, ...)
            // .swapaxes(1, 2): checkpoint row (a, b, c) of shape (h, 2, half) is stored row
            // (a, c, b) of shape (h, half, 2).
            Fix::PermutedQ | Fix::PermutedK => {
                let per = rows / h;
                let half = per / 2;
                (0..rows)
                    .map(|r| {
                        let (a, b, c) = (r / per, (r % per) / half, r % half);
                        a * per + c * 2 + b
                    })
                    .collect()
            }
            // Checkpoint (group, slot, d) of shape (kv, h/kv + 2, hd): slot < h/kv is a query
            // head of the group, then its key, then its value.
            Fix::Ungrouped => {
                let hd = rows / (h + 2 * kv);
                let g = h / kv;
                (0..rows)
                    .map(|r| {
                        let (grp, slot, d) = (r / ((g + 2) * hd), (r / hd) % (g + 2), r % hd);
                        if slot < g {
                            (grp * g + slot) * hd + d
                        } else if slot == g {
                            (h + grp) * hd + d
                        } else {
                            (h + kv + grp) * hd + d
                        }
                    })
                    .collect()
            }
            // Checkpoint (head, q/k/v, d) of shape (h, 3, hd).
            Fix::Deinterleaved => {
                let hd = rows / (3 * h);
                (0..rows)
                    .map(|r| {
                        let (head, t, d) = (r / (3 * hd), (r / hd) % 3, r % hd);
                        (t * h + head) * hd + d
                    })
                    .collect()
            }
            _ => return None,
        };
        Some(order)
    }
}

fn insert(
    tensors: &mut BTreeMap<String, Mapped>,
    name: String,
    m: Mapped,
    bad: &dyn Fn(String) -> Error,
) -> Result<()> {
    let g = m.gguf.clone();
    match tensors.insert(name.clone(), m) {
        Some(prev) => Err(bad(format!(
            "tensors '{}' and '{g}' both map to '{name}'",
            prev.gguf
        ))),
        None => Ok(()),
    }
}

impl GgufFile {
    /// `m`'s values as stored, where they are f32, bf16 or f16.
    fn stored_floats(&self, m: &Mapped) -> Option<super::MappedTensor> {
        let dtype = match m.ggml {
            GgmlDType::F32 => DType::F32,
            GgmlDType::BF16 => DType::BF16,
            GgmlDType::F16 => DType::F16,
            _ => return None,
        };
        let r = self.byte_range(m, self.content.tensor_infos.get(&m.gguf)?);
        super::MappedTensor::new(&self.mmap, r.start, r.len() / dtype.size_in_bytes(), dtype)
    }

    /// Where `m`'s data lies in the file (one expert's, of a stacked tensor).
    fn byte_range(
        &self,
        m: &Mapped,
        info: &candle_core::quantized::gguf_file::TensorInfo,
    ) -> std::ops::Range<usize> {
        let len = m.ggml.type_size() * m.shape.iter().product::<usize>() / m.ggml.block_size();
        let start =
            (self.content.tensor_data_offset + info.offset) as usize + m.expert.unwrap_or(0) * len;
        start..start + len
    }

    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: read-only mapping; the file must not be modified while mapped.
        let mmap =
            unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(&path, e))?;
        let bad = |msg: String| Error::bad_weights(&path, msg);
        if mmap.len() < 4 || &mmap[..4] != b"GGUF" {
            return Err(bad("not a GGUF file (bad magic)".into()));
        }
        let content = Content::read(&mut Cursor::new(&mmap[..])).map_err(|e| {
            bad(format!(
                "corrupt or truncated GGUF header: {}",
                one_line(&e.to_string())
            ))
        })?;
        let file_len = mmap.len() as u64;
        if content.tensor_data_offset > file_len {
            return Err(bad(format!(
                "truncated GGUF file: tensor data should start at byte {} but the file has {file_len} bytes",
                content.tensor_data_offset
            )));
        }
        let arch = match content.metadata.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(bad("GGUF metadata lacks 'general.architecture'".into())),
        };
        let mut tensors = BTreeMap::new();
        let mut names: Vec<&String> = content.tensor_infos.keys().collect();
        names.sort();
        for gname in names {
            let info = &content.tensor_infos[gname];
            let shape = info.shape.dims().to_vec();
            let numel = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d as u64));
            let bs = info.ggml_dtype.block_size() as u64;
            let size = match numel {
                Some(n) if n % bs == 0 => (n / bs).checked_mul(info.ggml_dtype.type_size() as u64),
                Some(n) => {
                    return Err(bad(format!(
                    "tensor '{gname}' has {n} elements, not a multiple of the {} block size {bs}",
                    ggml_dtype_name(info.ggml_dtype)
                )))
                }
                None => None,
            };
            let start = content.tensor_data_offset.checked_add(info.offset);
            let end = start.zip(size).and_then(|(s, n)| s.checked_add(n));
            if !matches!(end, Some(e) if e <= file_len) {
                return Err(bad(format!(
                    "truncated or corrupt GGUF file: tensor '{gname}' ({}, shape {shape:?}) needs bytes {}..{} but the file has only {file_len} bytes",
                    ggml_dtype_name(info.ggml_dtype),
                    start.map_or("?".into(), |s| s.to_string()),
                    end.map_or("?".into(), |s| s.to_string()),
                )));
            }
            let m = Mapped {
                gguf: gname.clone(),
                shape,
                ggml: info.ggml_dtype,
                fix: Fix::Keep,
                heads: (0, 0),
                expert: None,
            };
            tensors.insert(gname.clone(), m);
        }
        Ok(Self {
            path,
            mmap: std::sync::Arc::new(mmap),
            content,
            arch,
            spec: None,
            tensors,
        })
    }

    /// Expose the tensors under the Hugging Face names and layouts `spec` gives (the family's
    /// description of this file's architecture). Tensors it does not name keep their GGUF
    /// name (and are then reported as unused).
    pub fn with_arch(mut self, spec: &'static GgufArch) -> Result<Self> {
        let path = self.path.clone();
        let bad = |msg: String| Error::bad_weights(&path, msg);
        let arch = self.arch.clone();
        let n_head = self.md_u64(&format!("{arch}.attention.head_count"));
        let n_kv = self
            .md_u64(&format!("{arch}.attention.head_count_kv"))
            .or(n_head);
        let mut tensors = BTreeMap::new();
        for (gname, raw) in std::mem::take(&mut self.tensors) {
            let shape = raw.shape.clone();
            let found = split_name(&gname).and_then(|(layer, part, kind)| {
                spec.lookup(part).map(|(hf, fix)| (layer, hf, fix, kind))
            });
            let Some((layer, hf, fix, kind)) = found else {
                insert(&mut tensors, gname.clone(), raw, &bad)?;
                continue;
            };
            let full = |hf: &str| match layer {
                Some(n) => format!("{}.{n}.{hf}.{kind}", spec.blocks),
                None => format!("{hf}.{kind}"),
            };
            if hf.contains('*') {
                let [n, rows, cols] = shape[..] else {
                    return Err(bad(format!(
                        "expert tensor '{gname}' has shape {shape:?}, expected 3 dimensions"
                    )));
                };
                for j in 0..n {
                    let m = Mapped {
                        shape: vec![rows, cols],
                        expert: Some(j),
                        ..raw.clone()
                    };
                    insert(
                        &mut tensors,
                        full(&hf.replace('*', &j.to_string())),
                        m,
                        &bad,
                    )?;
                }
                continue;
            }
            // Norm weights only: biases are stored as they are.
            let fix = if fix == Fix::PlusOne && kind != "weight" {
                Fix::Keep
            } else {
                fix
            };
            let need = |key: &str, v: Option<u64>| {
                v.filter(|&h| h > 0)
                    .map(|h| h as usize)
                    .ok_or_else(|| bad(format!("GGUF metadata lacks '{arch}.{key}'")))
            };
            let rows = shape.first().copied().unwrap_or(0);
            let heads = match fix {
                Fix::PermutedQ | Fix::PermutedK => {
                    let h = if fix == Fix::PermutedQ {
                        need("attention.head_count", n_head)?
                    } else {
                        need("attention.head_count_kv", n_kv)?
                    };
                    if shape.is_empty() || shape.len() > 2 || rows % (2 * h) != 0 {
                        return Err(bad(format!(
                            "tensor '{gname}' of shape {shape:?} does not split into {h} heads of even size"
                        )));
                    }
                    (h, 0)
                }
                Fix::Ungrouped | Fix::Deinterleaved => {
                    let h = need("attention.head_count", n_head)?;
                    let kv = if fix == Fix::Ungrouped {
                        need("attention.head_count_kv", n_kv)?
                    } else {
                        h
                    };
                    if shape.is_empty()
                        || shape.len() > 2
                        || h % kv != 0
                        || rows % (h + 2 * kv) != 0
                    {
                        return Err(bad(format!(
                            "fused QKV tensor '{gname}' of shape {shape:?} does not split into {h} query and {kv} key/value heads"
                        )));
                    }
                    (h, kv)
                }
                _ => (0, 0),
            };
            let shape = if fix == Fix::Transposed && shape.len() == 2 {
                vec![shape[1], shape[0]]
            } else {
                shape
            };
            let m = Mapped {
                shape,
                fix,
                heads,
                ..raw
            };
            insert(&mut tensors, full(hf), m, &bad)?;
        }
        self.tensors = tensors;
        self.spec = Some(spec);
        Ok(self)
    }

    /// The parsed GGUF header (metadata, including `tokenizer.ggml.*`, and tensor infos).
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> &str {
        &self.arch
    }

    /// The storage format ("f32", "bf16", "f16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k") that
    /// holds most of the file's matrix values, as the CPU keeps them; `None` for another.
    pub fn weight_format(&self) -> Option<&'static str> {
        let mut by_type: BTreeMap<&'static str, usize> = BTreeMap::new();
        for info in self.content.tensor_infos.values() {
            let dims = info.shape.dims();
            if dims.len() >= 2 {
                *by_type.entry(ggml_dtype_name(info.ggml_dtype)).or_default() +=
                    dims.iter().product::<usize>();
            }
        }
        let (name, _) = by_type.into_iter().max_by_key(|&(_, n)| n)?;
        format_name(name)
    }

    /// The format of the token embedding table (`token_embd.weight`), named as
    /// [`Self::weight_format`] names them.
    pub fn embedding_format(&self) -> Option<&'static str> {
        let info = self.content.tensor_infos.get("token_embd.weight")?;
        format_name(ggml_dtype_name(info.ggml_dtype))
    }

    /// GGUF name and storage type of the tensor exposed as `hf_name`.
    pub fn tensor_origin(&self, hf_name: &str) -> Option<(&str, GgmlDType)> {
        self.tensors.get(hf_name).map(|m| (m.gguf.as_str(), m.ggml))
    }

    /// A metadata value.
    pub fn md(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// `{general.architecture}.{key}`, the spelling of the architecture's own metadata.
    pub fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.arch)
    }

    /// An integer metadata value.
    pub fn md_u64(&self, key: &str) -> Option<u64> {
        self.md(key).and_then(value_u64)
    }

    /// An integer metadata value that must be there.
    pub fn req_u64(&self, key: &str) -> Result<u64> {
        self.md_u64(key)
            .ok_or_else(|| self.bad_config(format!("GGUF metadata lacks integer '{key}'")))
    }

    /// A number in the metadata.
    pub fn md_f64(&self, key: &str) -> Option<f64> {
        self.md(key).and_then(value_f64)
    }

    /// A boolean in the metadata.
    pub fn md_bool(&self, key: &str) -> Option<bool> {
        match self.md(key) {
            Some(Value::Bool(b)) => Some(*b),
            v => v.and_then(value_u64).map(|x| x != 0),
        }
    }

    /// An array of booleans in the metadata.
    pub fn md_bools(&self, key: &str) -> Option<Vec<bool>> {
        match self.md(key) {
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| match v {
                    Value::Bool(b) => Some(*b),
                    v => value_u64(v).map(|x| x != 0),
                })
                .collect(),
            _ => None,
        }
    }

    /// A string in the metadata.
    pub fn md_str(&self, key: &str) -> Option<&str> {
        match self.md(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    /// Whether a tensor is exposed under `hf_name`.
    pub fn has(&self, hf_name: &str) -> bool {
        self.tensors.contains_key(hf_name)
    }

    /// Shape of the tensor exposed under `hf_name`.
    pub fn shape(&self, hf_name: &str) -> Option<&[usize]> {
        self.tensors.get(hf_name).map(|m| m.shape.as_slice())
    }

    /// A one-line configuration error naming this file.
    pub fn bad_config(&self, msg: impl std::fmt::Display) -> Error {
        Error::bad_config(&self.path, msg)
    }

    /// A Hugging Face `config.json` equivalent built from the GGUF metadata, for the class of
    /// the architecture given to [`GgufFile::with_arch`]. The keys common to all are written
    /// here in their Llama spellings, when the metadata has them; the family's
    /// [`GgufArch::config`] does the rest.
    pub fn config_json(&self) -> Result<serde_json::Value> {
        let spec = self.spec.ok_or_else(|| {
            self.bad_config(format!(
                "no family description given for GGUF architecture '{}'",
                self.arch
            ))
        })?;
        let k = |s: &str| self.key(s);
        let layers = self.req_u64(&k("block_count"))?;
        let hidden = self.req_u64(&k("embedding_length"))?;
        let heads = self.req_u64(&k("attention.head_count"))?;
        if heads == 0 {
            return Err(self.bad_config(format!("'{}' is 0", k("attention.head_count"))));
        }
        let kv_heads = self.md_u64(&k("attention.head_count_kv")).unwrap_or(heads);
        let head_dim = self
            .md_u64(&k("attention.key_length"))
            .unwrap_or(hidden / heads);
        let n_tokens = match self.md("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => Some(a.len() as u64),
            _ => None,
        };
        // The embedding matrix is authoritative (it may be padded past the token list).
        let embed = spec
            .lookup("token_embd")
            .map(|(hf, _)| format!("{hf}.weight"));
        let head = spec.lookup("output").map(|(hf, _)| format!("{hf}.weight"));
        let vocab = embed
            .as_deref()
            .and_then(|e| self.shape(e))
            .and_then(|s| s.first().map(|&r| r as u64))
            .or(n_tokens)
            .ok_or_else(|| {
                self.bad_config("GGUF has neither a token list nor token_embd.weight")
            })?;
        let tie = !head.as_deref().is_some_and(|h| self.has(h));
        let tok = |key: &str| {
            self.md_u64(key)
                .map(serde_json::Value::from)
                .unwrap_or(serde_json::Value::Null)
        };

        let mut c = Map::new();
        c.insert("architectures".into(), serde_json::json!([spec.class]));
        c.insert("model_type".into(), self.arch.clone().into());
        c.insert("vocab_size".into(), vocab.into());
        c.insert("hidden_size".into(), hidden.into());
        if let Some(ffn) = self.md_u64(&k("feed_forward_length")) {
            c.insert("intermediate_size".into(), ffn.into());
        }
        c.insert("num_hidden_layers".into(), layers.into());
        c.insert("num_attention_heads".into(), heads.into());
        c.insert("num_key_value_heads".into(), kv_heads.into());
        c.insert("head_dim".into(), head_dim.into());
        if let Some(ctx) = self.md_u64(&k("context_length")) {
            c.insert("max_position_embeddings".into(), ctx.into());
        }
        if let Some(eps) = self.md_f64(&k("attention.layer_norm_rms_epsilon")) {
            c.insert("rms_norm_eps".into(), eps.into());
        }
        if let Some(eps) = self.md_f64(&k("attention.layer_norm_epsilon")) {
            // The spellings of the LayerNorm families.
            for key in ["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"] {
                c.insert(key.into(), eps.into());
            }
        }
        if let Some(theta) = self.md_f64(&k("rope.freq_base")) {
            c.insert("rope_theta".into(), theta.into());
        }
        if let (Some(dims), true) = (self.md_u64(&k("rope.dimension_count")), head_dim > 0) {
            c.insert(
                "partial_rotary_factor".into(),
                (dims as f64 / head_dim as f64).into(),
            );
        }
        c.insert("tie_word_embeddings".into(), tie.into());
        c.insert("bos_token_id".into(), tok("tokenizer.ggml.bos_token_id"));
        c.insert("eos_token_id".into(), tok("tokenizer.ggml.eos_token_id"));
        let scaling = self.md_str(&k("rope.scaling.type")).unwrap_or("none");
        if let (true, Some(f)) = (
            scaling == "linear" || scaling == "yarn",
            self.md_f64(&k("rope.scaling.factor")),
        ) {
            let mut r = Map::new();
            r.insert("type".into(), scaling.into());
            r.insert("rope_type".into(), scaling.into());
            r.insert("factor".into(), f.into());
            if let Some(o) = self.md_u64(&k("rope.scaling.original_context_length")) {
                r.insert("original_max_position_embeddings".into(), o.into());
            }
            c.insert("rope_scaling".into(), r.into());
        }
        (spec.config)(self, &mut c)?;
        Ok(serde_json::Value::Object(c))
    }
}

impl TensorSource for GgufFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn metas(&self) -> Result<Vec<(String, TensorMeta)>> {
        Ok(self
            .tensors
            .iter()
            .map(|(n, m)| {
                let dtype = match m.ggml {
                    GgmlDType::F16 => DType::F16,
                    GgmlDType::BF16 => DType::BF16,
                    _ => DType::F32,
                };
                (
                    n.clone(),
                    TensorMeta {
                        shape: m.shape.clone(),
                        dtype,
                    },
                )
            })
            .collect())
    }

    /// In place where the layout is the checkpoint's; where only the row order differs
    /// (permuted Q/K, grouped or interleaved fused QKV), a copy of its own with the rows put
    /// back, still in the stored dtype.
    fn mapped(&self, name: &str) -> Option<super::MappedTensor> {
        let m = self.tensors.get(name)?;
        let order = m.row_order();
        if m.fix != Fix::Keep && order.is_none() {
            return None;
        }
        let t = self.stored_floats(m)?;
        match (order, &m.shape[..]) {
            (None, _) => Some(t),
            (Some(o), [_, cols]) => t.copied_rows(&o, *cols),
            _ => None,
        }
    }

    fn mapped_transposed(&self, name: &str) -> Option<super::MappedTensor> {
        let m = self.tensors.get(name)?;
        (m.fix == Fix::Transposed && m.shape.len() == 2)
            .then(|| self.stored_floats(m))
            .flatten()
    }

    fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let m = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        let wrap = |err: candle_core::Error| {
            Error::bad_weights(
                &self.path,
                format!(
                    "tensor '{}' ({}): {}",
                    m.gguf,
                    ggml_dtype_name(m.ggml),
                    one_line(&err.to_string())
                ),
            )
        };
        let info = self.content.tensor_infos.get(&m.gguf).ok_or_else(|| {
            Error::bad_weights(
                &self.path,
                format!("tensor '{}' vanished from the header", m.gguf),
            )
        })?;
        let cpu = Device::Cpu;
        let t = match m.ggml {
            GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16 => {
                let dt = match m.ggml {
                    GgmlDType::F32 => DType::F32,
                    GgmlDType::F16 => DType::F16,
                    _ => DType::BF16,
                };
                let bytes = self.mmap.get(self.byte_range(m, info)).ok_or_else(|| {
                    Error::bad_weights(
                        &self.path,
                        format!("tensor '{}' lies outside the file", m.gguf),
                    )
                })?;
                let mut stored = m.shape.clone();
                if m.fix == Fix::Transposed {
                    stored.reverse();
                }
                match (dtype == DType::F32)
                    .then(|| super::f32_tensor_from_le(bytes, dt, &stored))
                    .flatten()
                {
                    Some(t) => t,
                    None => Tensor::from_raw_buffer(bytes, dt, &stored, &cpu).map_err(wrap)?,
                }
            }
            _ => {
                let q = info
                    .read(
                        &mut Cursor::new(&self.mmap[..]),
                        self.content.tensor_data_offset,
                        &cpu,
                    )
                    .map_err(wrap)?;
                let t = q.dequantize(&cpu).map_err(wrap)?;
                match m.expert {
                    Some(j) => t.get(j).map_err(wrap)?,
                    None => t,
                }
            }
        };
        let t = match m.row_order() {
            Some(order) => {
                let idx: Vec<u32> = order.into_iter().map(|r| r as u32).collect();
                let idx = Tensor::from_vec(idx, m.shape[0], &cpu).map_err(wrap)?;
                t.index_select(&idx, 0).map_err(wrap)?
            }
            None => t,
        };
        let t = match m.fix {
            Fix::Transposed if m.shape.len() == 2 => {
                t.t().and_then(|t| t.contiguous()).map_err(wrap)?
            }
            Fix::PlusOne => (t.to_dtype(DType::F32).map_err(wrap)? - 1.0).map_err(wrap)?,
            _ => t,
        };
        let t = if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype).map_err(wrap)?
        };
        let t = t.to_device(device).map_err(wrap)?;
        // As for safetensors: the copy is made, drop the file pages read for it.
        let r = self.byte_range(m, info);
        super::st::release_pages(&self.mmap, r.start, r.end);
        Ok(t)
    }

    /// Matrices stored in a block format our kernels run (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) are
    /// handed over as they are (rows un-permuted for Q/K), so GGUF files keep their quantization.
    fn load_quantized(&self, name: &str) -> Result<Option<QMatrix>> {
        let Some(m) = self.tensors.get(name) else {
            return Ok(None);
        };
        let kind = match m.ggml {
            GgmlDType::Q8_0 => QuantKind::Q8_0,
            GgmlDType::Q4_0 => QuantKind::Q4_0,
            GgmlDType::Q4_1 => QuantKind::Q4_1,
            GgmlDType::Q4K => QuantKind::Q4K,
            GgmlDType::Q6K => QuantKind::Q6K,
            _ => return Ok(None),
        };
        let [rows, cols] = m.shape[..] else {
            return Ok(None);
        };
        if matches!(m.fix, Fix::Transposed | Fix::PlusOne) {
            return Ok(None);
        }
        let info = self.content.tensor_infos.get(&m.gguf).ok_or_else(|| {
            Error::bad_weights(
                &self.path,
                format!("tensor '{}' vanished from the header", m.gguf),
            )
        })?;
        let rb = kind.row_bytes(cols);
        let range = self.byte_range(m, info);
        let bytes = self.mmap.get(range.clone()).ok_or_else(|| {
            Error::bad_weights(
                &self.path,
                format!("tensor '{}' lies outside the file", m.gguf),
            )
        })?;
        let data: std::borrow::Cow<[u8]> = match m.row_order() {
            None => bytes.into(),
            Some(order) => {
                let mut out = Vec::with_capacity(bytes.len());
                for old in order {
                    out.extend_from_slice(&bytes[old * rb..(old + 1) * rb]);
                }
                out.into()
            }
        };
        let q = QMatrix::from_ggml_bytes(kind, rows, cols, &data)
            .map_err(|e| Error::bad_weights(&self.path, format!("tensor '{}': {e}", m.gguf)))?;
        drop(data);
        super::st::release_pages(&self.mmap, range.start, range.end);
        Ok(Some(q))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, QTensor};

    fn open_as(p: &Path) -> GgufFile {
        let g = GgufFile::open(p).unwrap();
        let arch = crate::families::gguf_arch(p, g.architecture()).unwrap();
        g.with_arch(arch).unwrap()
    }

    /// llama.cpp's `permute` (HF -> GGUF).
    fn permute(t: &Tensor, heads: usize) -> Tensor {
        let (rows, cols) = t.dims2().unwrap();
        t.reshape((heads, 2, rows / heads / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    struct Tiny {
        q: Tensor,
        k: Tensor,
        qb: Tensor,
        up: Tensor,
        embd: Tensor,
    }

    /// A one-layer llama: hidden 64, 4 heads of 16, 2 KV heads, ffn 64, vocab 32.
    fn write_tiny(path: &Path, arch: &str, with_output: bool) -> Tiny {
        let dev = Device::Cpu;
        let r = |s: (usize, usize)| Tensor::randn(0f32, 1.0, s, &dev).unwrap();
        let t = Tiny {
            q: r((64, 64)),
            k: r((32, 64)),
            qb: Tensor::arange(0f32, 64.0, &dev).unwrap(),
            up: r((64, 64)),
            embd: r((32, 64)),
        };
        let (q_file, k_file, qb_file) = if arch == "llama" {
            let qb = permute(&t.qb.reshape((64, 1)).unwrap(), 4)
                .flatten_all()
                .unwrap();
            (permute(&t.q, 4), permute(&t.k, 2), qb)
        } else {
            (t.q.clone(), t.k.clone(), t.qb.clone())
        };
        let f32q = |x: &Tensor| QTensor::quantize(x, GgmlDType::F32).unwrap();
        let q8 = |x: &Tensor| QTensor::quantize(x, GgmlDType::Q8_0).unwrap();
        let ones = Tensor::ones(64, DType::F32, &dev).unwrap();
        let mut tensors = vec![
            ("token_embd.weight", f32q(&t.embd)),
            ("blk.0.attn_q.weight", f32q(&q_file)),
            ("blk.0.attn_q.bias", f32q(&qb_file)),
            ("blk.0.attn_k.weight", q8(&k_file)),
            ("blk.0.attn_v.weight", q8(&t.k)),
            ("blk.0.attn_output.weight", q8(&t.q)),
            ("blk.0.ffn_gate.weight", q8(&t.up)),
            ("blk.0.ffn_up.weight", q8(&t.up)),
            ("blk.0.ffn_down.weight", q8(&t.up)),
            ("blk.0.attn_norm.weight", f32q(&ones)),
            ("blk.0.ffn_norm.weight", f32q(&ones)),
            ("output_norm.weight", f32q(&ones)),
        ];
        if with_output {
            tensors.push(("output.weight", q8(&t.embd)));
        }
        let s = |x: &str| Value::String(x.into());
        let md = vec![
            ("general.architecture".to_string(), s(arch)),
            (format!("{arch}.block_count"), Value::U32(1)),
            (format!("{arch}.embedding_length"), Value::U32(64)),
            (format!("{arch}.feed_forward_length"), Value::U32(64)),
            (format!("{arch}.attention.head_count"), Value::U32(4)),
            (format!("{arch}.attention.head_count_kv"), Value::U32(2)),
            (
                format!("{arch}.attention.layer_norm_rms_epsilon"),
                Value::F32(1e-5),
            ),
            (format!("{arch}.rope.freq_base"), Value::F32(10000.0)),
            (format!("{arch}.context_length"), Value::U32(128)),
            (format!("{arch}.rope.dimension_count"), Value::U32(16)),
            (
                "tokenizer.ggml.tokens".to_string(),
                Value::Array((0..32).map(|i| s(&format!("t{i}"))).collect()),
            ),
            ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(1)),
            ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(2)),
        ];
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
        let mut f = std::fs::File::create(path).unwrap();
        gguf_file::write(&mut f, &md_refs, &t_refs).unwrap();
        t
    }

    #[test]
    fn names_shapes_and_unpermute() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tiny.gguf");
        let t = write_tiny(&p, "llama", false);
        let g = open_as(&p);
        let dev = Device::Cpu;
        let metas: BTreeMap<_, _> = g.metas().unwrap().into_iter().collect();
        let expect = [
            ("model.embed_tokens.weight", vec![32, 64]),
            ("model.layers.0.self_attn.q_proj.weight", vec![64, 64]),
            ("model.layers.0.self_attn.q_proj.bias", vec![64]),
            ("model.layers.0.self_attn.k_proj.weight", vec![32, 64]),
            ("model.layers.0.self_attn.v_proj.weight", vec![32, 64]),
            ("model.layers.0.self_attn.o_proj.weight", vec![64, 64]),
            ("model.layers.0.mlp.gate_proj.weight", vec![64, 64]),
            ("model.layers.0.mlp.up_proj.weight", vec![64, 64]),
            ("model.layers.0.mlp.down_proj.weight", vec![64, 64]),
            ("model.layers.0.input_layernorm.weight", vec![64]),
            ("model.layers.0.post_attention_layernorm.weight", vec![64]),
            ("model.norm.weight", vec![64]),
        ];
        assert_eq!(
            metas.len(),
            expect.len(),
            "{:?}",
            metas.keys().collect::<Vec<_>>()
        );
        for (n, s) in expect {
            assert_eq!(metas[n].shape, s, "{n}");
        }
        assert!(!metas.contains_key("lm_head.weight"));

        // F32 Q: exact round trip through permute/unpermute.
        let q = g
            .load("model.layers.0.self_attn.q_proj.weight", DType::F32, &dev)
            .unwrap();
        assert_eq!(max_diff(&q, &t.q), 0.0);
        let qb = g
            .load("model.layers.0.self_attn.q_proj.bias", DType::F32, &dev)
            .unwrap();
        assert_eq!(qb.to_vec1::<f32>().unwrap(), t.qb.to_vec1::<f32>().unwrap());
        // Q8_0 K with 2 KV heads: equal up to quantization error (rows would be far off if the
        // permutation were wrong).
        let k = g
            .load("model.layers.0.self_attn.k_proj.weight", DType::F32, &dev)
            .unwrap();
        assert!(max_diff(&k, &t.k) < 0.05, "{}", max_diff(&k, &t.k));
        // V is not permuted.
        let v = g
            .load("model.layers.0.self_attn.v_proj.weight", DType::F32, &dev)
            .unwrap();
        assert!(max_diff(&v, &t.k) < 0.05);
        let up = g
            .load("model.layers.0.mlp.up_proj.weight", DType::BF16, &dev)
            .unwrap();
        assert_eq!(up.dtype(), DType::BF16);
        assert!(max_diff(&up.to_dtype(DType::F32).unwrap(), &t.up) < 0.05);
        let e = g
            .load("model.embed_tokens.weight", DType::F16, &dev)
            .unwrap();
        assert_eq!(e.dtype(), DType::F16);

        let c = g.config_json().unwrap();
        assert_eq!(c["architectures"][0], "LlamaForCausalLM");
        assert_eq!(c["model_type"], "llama");
        assert_eq!(c["num_hidden_layers"], 1);
        assert_eq!(c["hidden_size"], 64);
        assert_eq!(c["num_attention_heads"], 4);
        assert_eq!(c["num_key_value_heads"], 2);
        assert_eq!(c["head_dim"], 16);
        assert_eq!(c["vocab_size"], 32);
        assert_eq!(c["max_position_embeddings"], 128);
        assert_eq!(c["tie_word_embeddings"], true);
        assert_eq!(c["attention_bias"], true);
        assert_eq!(c["bos_token_id"], 1);
        assert_eq!(c["eos_token_id"], 2);
        assert!((c["rms_norm_eps"].as_f64().unwrap() - 1e-5).abs() < 1e-9);
        assert_eq!(c["rope_theta"], 10000.0);
        assert!(
            matches!(g.content().metadata.get("tokenizer.ggml.tokens"), Some(Value::Array(a)) if a.len() == 32)
        );
    }

    #[test]
    fn qwen2_is_not_unpermuted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qwen.gguf");
        let t = write_tiny(&p, "qwen2", true);
        let g = open_as(&p);
        let dev = Device::Cpu;
        let q = g
            .load("model.layers.0.self_attn.q_proj.weight", DType::F32, &dev)
            .unwrap();
        assert_eq!(max_diff(&q, &t.q), 0.0);
        let lm = g.load("lm_head.weight", DType::F32, &dev).unwrap();
        assert!(max_diff(&lm, &t.embd) < 0.05);
        let c = g.config_json().unwrap();
        assert_eq!(c["architectures"][0], "Qwen2ForCausalLM");
        assert_eq!(c["tie_word_embeddings"], false);
    }

    fn no_config(_: &GgufFile, _: &mut Map<String, serde_json::Value>) -> Result<()> {
        Ok(())
    }

    static FIXES: GgufArch = GgufArch {
        arch: "fixes",
        class: "None",
        blocks: "layers",
        tensors: &[&[
            ("grouped", "g", Fix::Ungrouped),
            ("interleaved", "i", Fix::Deinterleaved),
            ("conv", "c", Fix::Transposed),
            ("norm", "n", Fix::PlusOne),
            ("exps", "e.*.w", Fix::Keep),
        ]],
        config: no_config,
    };

    /// Each fix undoes what llama.cpp's converter does (its operations written out here).
    #[test]
    fn fixes_undo_the_converter() {
        let dev = Device::Cpu;
        let (nh, kv, hd, cols) = (4usize, 2usize, 3usize, 5usize);
        let r = |s: &[usize]| Tensor::randn(0f32, 1.0, s, &dev).unwrap();
        // Falcon: per kv group [q heads of the group, k, v] -> [q heads; k heads; v heads].
        let g = r(&[(nh + 2 * kv) * hd, cols]);
        let t = g.reshape((kv, nh / kv + 2, hd, cols)).unwrap();
        let part = |a: usize, n: usize, rows: usize| {
            t.narrow(1, a, n)
                .unwrap()
                .contiguous()
                .unwrap()
                .reshape((rows, cols))
                .unwrap()
        };
        let g_file = Tensor::cat(
            &[
                part(0, nh / kv, nh * hd),
                part(nh / kv, 1, kv * hd),
                part(nh / kv + 1, 1, kv * hd),
            ],
            0,
        )
        .unwrap();
        // GPT-NeoX/BLOOM: per head [q, k, v] -> [q; k; v].
        let i = r(&[3 * nh * hd]);
        let ti = i.reshape((nh, 3, hd)).unwrap();
        let i_file = Tensor::cat(
            &(0..3)
                .map(|j| ti.narrow(1, j, 1).unwrap().flatten_all().unwrap())
                .collect::<Vec<_>>(),
            0,
        )
        .unwrap();
        let c = r(&[cols, 2 * cols]);
        let n = r(&[cols]);
        let e = r(&[3, 2, cols]);
        let f32q = |x: &Tensor| QTensor::quantize(x, GgmlDType::F32).unwrap();
        let tensors = [
            ("grouped.weight", f32q(&g_file)),
            ("interleaved.bias", f32q(&i_file)),
            ("conv.weight", f32q(&c.t().unwrap().contiguous().unwrap())),
            ("norm.weight", f32q(&(&n + 1.0).unwrap())),
            ("blk.1.exps.weight", f32q(&e)),
        ];
        let md = [
            ("general.architecture", Value::String("fixes".into())),
            ("fixes.attention.head_count", Value::U32(nh as u32)),
            ("fixes.attention.head_count_kv", Value::U32(kv as u32)),
        ];
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fixes.gguf");
        let md_refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
        let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (*k, v)).collect();
        gguf_file::write(&mut std::fs::File::create(&p).unwrap(), &md_refs, &t_refs).unwrap();
        let gg = GgufFile::open(&p).unwrap().with_arch(&FIXES).unwrap();
        let load = |name: &str| gg.load(name, DType::F32, &dev).unwrap();
        assert_eq!(max_diff(&load("g.weight"), &g), 0.0);
        assert_eq!(max_diff(&load("i.bias"), &i), 0.0);
        assert_eq!(gg.shape("c.weight"), Some(&[cols, 2 * cols][..]));
        assert_eq!(max_diff(&load("c.weight"), &c), 0.0);
        assert!(max_diff(&load("n.weight"), &n) < 1e-6);
        assert_eq!(
            max_diff(&load("layers.1.e.2.w.weight"), &e.get(2).unwrap()),
            0.0
        );
        // A fused tensor that does not split into the heads is a one-line error naming it.
        let bad = [("fixes.attention.head_count_kv", Value::U32(3))];
        let md_refs: Vec<(&str, &Value)> =
            md[..2].iter().chain(&bad).map(|(k, v)| (*k, v)).collect();
        gguf_file::write(&mut std::fs::File::create(&p).unwrap(), &md_refs, &t_refs).unwrap();
        let err = GgufFile::open(&p)
            .unwrap()
            .with_arch(&FIXES)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("fixes.gguf")
                && err.contains("'grouped.weight'")
                && err.lines().count() == 1,
            "{err}"
        );
    }

    #[test]
    fn errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tiny.gguf");
        write_tiny(&p, "llama", true);
        let full = std::fs::read(&p).unwrap();
        let tp = dir.path().join("trunc.gguf");
        for cut in [
            full.len() - 1,
            full.len() - 5000,
            full.len() / 2,
            300,
            10,
            2,
        ] {
            std::fs::write(&tp, &full[..cut]).unwrap();
            let e = GgufFile::open(&tp).err().expect("must fail").to_string();
            assert!(e.contains("trunc.gguf"), "{cut}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
            if cut > 5000 {
                assert!(e.contains("truncated") && e.contains("needs bytes"), "{e}");
            }
        }
        let up = dir.path().join("phi.gguf");
        write_tiny(&up, "phi9", true);
        let g = GgufFile::open(&up).unwrap();
        let e = crate::families::gguf_arch(&up, g.architecture())
            .err()
            .unwrap();
        assert!(
            matches!(e, Error::UnknownArchitecture { ref arch, .. } if arch == "phi9"),
            "{e}"
        );
        assert!(e.to_string().contains("phi9"));
    }

    /// Manual check against a real file when present (not a committed fixture).
    #[test]
    fn real_smollm2_if_present() {
        // `LMGEN_TEST_GGUF`, or the first *.gguf up to three levels below ~/.cache/lmgen.
        fn find(dir: &Path, depth: usize) -> Option<PathBuf> {
            for e in std::fs::read_dir(dir).ok()?.flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "gguf") && p.is_file() {
                    return Some(p);
                }
                if depth > 0 && p.is_dir() {
                    if let Some(f) = find(&p, depth - 1) {
                        return Some(f);
                    }
                }
            }
            None
        }
        let p = match std::env::var_os("LMGEN_TEST_GGUF") {
            Some(p) => PathBuf::from(p),
            None => match std::env::var_os("HOME")
                .and_then(|h| find(&Path::new(&h).join(".cache/lmgen"), 3))
            {
                Some(p) => p,
                None => return,
            },
        };
        eprintln!("checking {}", p.display());
        let g = open_as(&p);
        g.config_json().unwrap();
        let dev = Device::Cpu;
        let metas = g.metas().unwrap();
        for (n, m) in &metas {
            let t = g.load(n, DType::F32, &dev).unwrap();
            assert_eq!(t.dims(), m.shape.as_slice(), "{n}");
        }
    }
}
