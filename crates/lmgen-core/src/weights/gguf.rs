//! GGUF (llama.cpp) files, exposed under Hugging Face tensor names and layouts.
//!
//! Tensors are dequantized on `load`. The llama converter of llama.cpp permutes the rows of the
//! Q and K projections (for its interleaved rope); that permutation is undone here so the weights
//! match Hugging Face's half-split (`rotate_half`) rope.
use super::st::one_line;
use super::{TensorMeta, TensorSource};
use crate::error::{Error, Result};
use crate::kernels::quant::{QMatrix, QuantKind};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::io::Cursor;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
struct Mapped {
    /// Name in the GGUF file.
    gguf: String,
    shape: Vec<usize>,
    ggml: GgmlDType,
    /// Undo llama.cpp's Q/K row permutation with this many heads.
    unpermute_heads: Option<usize>,
    /// Expert `j` of a stacked `[experts, rows, cols]` tensor (`shape` is one expert's).
    expert: Option<usize>,
}

/// A memory-mapped GGUF file.
pub struct GgufFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    content: Content,
    arch: String,
    /// HF name -> GGUF tensor.
    tensors: BTreeMap<String, Mapped>,
}

/// `blk.N.ffn_{gate,up,down}_exps.{weight,bias}` (experts stacked in one tensor) ->
/// `(N, HF projection name, kind)`; each expert is exposed as
/// `model.layers.N.mlp.experts.J.{proj}.{kind}` (the Qwen-MoE layout).
fn expert_parts(gguf: &str) -> Option<(usize, &'static str, &str)> {
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, kind) = rest.rsplit_once('.')?;
    let proj = match part {
        "ffn_gate_exps" => "gate_proj",
        "ffn_up_exps" => "up_proj",
        "ffn_down_exps" => "down_proj",
        _ => return None,
    };
    Some((layer.parse().ok()?, proj, kind))
}

/// llama.cpp tensor name -> Hugging Face name (Llama/Qwen2/Qwen3/Qwen2-MoE/OLMo-2 layout). `None` for names without an
/// HF counterpart; those are exposed under their GGUF name (and then reported as unused).
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, kind) = rest.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "post_attention_norm" => "post_attention_layernorm",
        "post_ffw_norm" => "post_feedforward_layernorm",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "ffn_gate_inp" => "mlp.gate",
        "ffn_gate_shexp" => "mlp.shared_expert.gate_proj",
        "ffn_up_shexp" => "mlp.shared_expert.up_proj",
        "ffn_down_shexp" => "mlp.shared_expert.down_proj",
        "ffn_gate_inp_shexp" => "mlp.shared_expert_gate",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
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

/// Inverse of llama.cpp's `permute`:
/// GGUF = HF.reshape(h, 2, r/h/2, ...).swapaxes(1, 2).reshape(r, ...).
fn unpermute(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let half = rows / heads / 2;
    match dims.len() {
        1 => t
            .reshape((heads, half, 2))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape(rows),
        2 => t
            .reshape((heads, half, 2, dims[1]))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows, dims[1])),
        n => candle_core::bail!("cannot un-permute a rank-{n} tensor"),
    }
}

impl GgufFile {
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
        let md_u64 = |k: &str| content.metadata.get(k).and_then(value_u64);
        let n_head = md_u64(&format!("{arch}.attention.head_count"));
        let n_kv = md_u64(&format!("{arch}.attention.head_count_kv")).or(n_head);

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
            match (start, end) {
                (Some(s), Some(e)) if e <= file_len => {
                    let _ = s;
                }
                _ => {
                    return Err(bad(format!(
                        "truncated or corrupt GGUF file: tensor '{gname}' ({}, shape {shape:?}) needs bytes {}..{} but the file has only {file_len} bytes",
                        ggml_dtype_name(info.ggml_dtype),
                        start.map_or("?".into(), |s| s.to_string()),
                        end.map_or("?".into(), |s| s.to_string()),
                    )))
                }
            }
            if let Some((layer, proj, kind)) = expert_parts(gname) {
                let [n, rows, cols] = shape[..] else {
                    return Err(bad(format!(
                        "expert tensor '{gname}' has shape {shape:?}, expected 3 dimensions"
                    )));
                };
                for j in 0..n {
                    let name = format!("model.layers.{layer}.mlp.experts.{j}.{proj}.{kind}");
                    let m = Mapped {
                        gguf: gname.clone(),
                        shape: vec![rows, cols],
                        ggml: info.ggml_dtype,
                        unpermute_heads: None,
                        expert: Some(j),
                    };
                    if tensors.insert(name.clone(), m).is_some() {
                        return Err(bad(format!("two tensors map to '{name}'")));
                    }
                }
                continue;
            }
            let hf = hf_name(gname);
            let mut unpermute_heads = None;
            if arch == "llama" {
                let heads = if gname.ends_with(".attn_q.weight") || gname.ends_with(".attn_q.bias")
                {
                    Some(n_head)
                } else if gname.ends_with(".attn_k.weight") || gname.ends_with(".attn_k.bias") {
                    Some(n_kv)
                } else {
                    None
                };
                if let Some(h) = heads {
                    let h = h.ok_or_else(|| {
                        bad(format!("GGUF metadata lacks '{arch}.attention.head_count'"))
                    })?;
                    let rows = shape.first().copied().unwrap_or(0) as u64;
                    if shape.is_empty()
                        || shape.len() > 2
                        || h.checked_mul(2).and_then(|d| rows.checked_rem(d)) != Some(0)
                    {
                        return Err(bad(format!(
                            "tensor '{gname}' of shape {shape:?} does not split into {h} heads of even size"
                        )));
                    }
                    unpermute_heads = Some(h as usize);
                }
            }
            let name = hf.unwrap_or_else(|| gname.clone());
            let m = Mapped {
                gguf: gname.clone(),
                shape,
                ggml: info.ggml_dtype,
                unpermute_heads,
                expert: None,
            };
            if let Some(prev) = tensors.insert(name.clone(), m) {
                return Err(bad(format!(
                    "tensors '{}' and '{gname}' both map to '{name}'",
                    prev.gguf
                )));
            }
        }
        Ok(Self {
            path,
            mmap,
            content,
            arch,
            tensors,
        })
    }

    /// The parsed GGUF header (metadata, including `tokenizer.ggml.*`, and tensor infos).
    pub fn content(&self) -> &Content {
        &self.content
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> &str {
        &self.arch
    }

    /// GGUF name and storage type of the tensor exposed as `hf_name`.
    pub fn tensor_origin(&self, hf_name: &str) -> Option<(&str, GgmlDType)> {
        self.tensors.get(hf_name).map(|m| (m.gguf.as_str(), m.ggml))
    }

    fn md(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn md_u64(&self, key: &str) -> Option<u64> {
        self.md(key).and_then(value_u64)
    }

    fn req_u64(&self, key: &str) -> Result<u64> {
        self.md_u64(key).ok_or_else(|| {
            Error::bad_config(&self.path, format!("GGUF metadata lacks integer '{key}'"))
        })
    }

    fn md_f64(&self, key: &str) -> Option<f64> {
        self.md(key).and_then(value_f64)
    }

    /// A Hugging Face `config.json` equivalent built from the GGUF metadata, for the
    /// transformers class `class` (the family registry says which class an architecture is).
    pub fn config_json(&self, class: &str) -> Result<serde_json::Value> {
        let arch = self.arch.as_str();
        let k = |s: &str| format!("{arch}.{s}");
        let layers = self.req_u64(&k("block_count"))?;
        let hidden = self.req_u64(&k("embedding_length"))?;
        let ffn = self.req_u64(&k("feed_forward_length"))?;
        let heads = self.req_u64(&k("attention.head_count"))?;
        if heads == 0 {
            return Err(Error::bad_config(
                &self.path,
                format!("'{}' is 0", k("attention.head_count")),
            ));
        }
        let kv_heads = self.md_u64(&k("attention.head_count_kv")).unwrap_or(heads);
        let head_dim = self
            .md_u64(&k("attention.key_length"))
            .or_else(|| self.md_u64(&k("rope.dimension_count")))
            .unwrap_or(hidden / heads);
        let qwen = matches!(arch, "qwen2" | "qwen3" | "qwen2moe");
        let eps = self
            .md_f64(&k("attention.layer_norm_rms_epsilon"))
            .unwrap_or(if qwen { 1e-6 } else { 1e-5 });
        let theta =
            self.md_f64(&k("rope.freq_base"))
                .unwrap_or(if qwen { 1_000_000.0 } else { 10_000.0 });
        let ctx = self
            .md_u64(&k("context_length"))
            .unwrap_or(if qwen { 32768 } else { 2048 });
        let n_tokens = match self.md("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => Some(a.len() as u64),
            _ => None,
        };
        // The embedding matrix is authoritative (it may be padded past the token list).
        let vocab = self
            .tensors
            .get("model.embed_tokens.weight")
            .and_then(|m| m.shape.first().map(|&r| r as u64))
            .or(n_tokens)
            .ok_or_else(|| {
                Error::bad_config(
                    &self.path,
                    "GGUF has neither a token list nor token_embd.weight",
                )
            })?;
        let tie = !self.tensors.contains_key("lm_head.weight");
        let bias = self
            .tensors
            .contains_key("model.layers.0.self_attn.q_proj.bias");
        let tok = |key: &str| {
            self.md_u64(key)
                .map(serde_json::Value::from)
                .unwrap_or(serde_json::Value::Null)
        };

        let mut c = serde_json::Map::new();
        c.insert("architectures".into(), serde_json::json!([class]));
        c.insert("model_type".into(), arch.into());
        c.insert("vocab_size".into(), vocab.into());
        c.insert("hidden_size".into(), hidden.into());
        c.insert("intermediate_size".into(), ffn.into());
        c.insert("num_hidden_layers".into(), layers.into());
        c.insert("num_attention_heads".into(), heads.into());
        c.insert("num_key_value_heads".into(), kv_heads.into());
        c.insert("head_dim".into(), head_dim.into());
        c.insert("hidden_act".into(), "silu".into());
        c.insert("max_position_embeddings".into(), ctx.into());
        c.insert("rms_norm_eps".into(), eps.into());
        c.insert("rope_theta".into(), theta.into());
        c.insert("tie_word_embeddings".into(), tie.into());
        c.insert("bos_token_id".into(), tok("tokenizer.ggml.bos_token_id"));
        c.insert("eos_token_id".into(), tok("tokenizer.ggml.eos_token_id"));
        if !matches!(arch, "qwen2" | "qwen2moe") {
            c.insert("attention_bias".into(), bias.into());
            c.insert("mlp_bias".into(), false.into());
        }
        if let Some(n) = self.md_u64(&k("expert_count")) {
            c.insert("num_experts".into(), n.into());
            let used = self.req_u64(&k("expert_used_count"))?;
            c.insert("num_experts_per_tok".into(), used.into());
            for (key, md) in [
                ("moe_intermediate_size", "expert_feed_forward_length"),
                (
                    "shared_expert_intermediate_size",
                    "expert_shared_feed_forward_length",
                ),
            ] {
                if let Some(v) = self.md_u64(&k(md)) {
                    c.insert(key.into(), v.into());
                }
            }
            // llama.cpp records renormalized top-k weights as `expert_weights_norm`.
            if let Some(Value::Bool(b)) = self.md(&k("expert_weights_norm")) {
                c.insert("norm_topk_prob".into(), (*b).into());
            }
        }
        let scaling = match self.md(&k("rope.scaling.type")) {
            Some(Value::String(s)) => s.clone(),
            _ => "none".into(),
        };
        if let (true, Some(f)) = (
            scaling == "linear" || scaling == "yarn",
            self.md_f64(&k("rope.scaling.factor")),
        ) {
            let mut r = serde_json::Map::new();
            r.insert("type".into(), scaling.clone().into());
            r.insert("rope_type".into(), scaling.clone().into());
            r.insert("factor".into(), f.into());
            if let Some(o) = self.md_u64(&k("rope.scaling.original_context_length")) {
                r.insert("original_max_position_embeddings".into(), o.into());
            }
            c.insert("rope_scaling".into(), r.into());
        }
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
                let numel: usize = m.shape.iter().product();
                let start = (self.content.tensor_data_offset + info.offset) as usize
                    + m.expert.unwrap_or(0) * numel * dt.size_in_bytes();
                let bytes = self
                    .mmap
                    .get(start..start + numel * dt.size_in_bytes())
                    .ok_or_else(|| {
                        Error::bad_weights(
                            &self.path,
                            format!("tensor '{}' lies outside the file", m.gguf),
                        )
                    })?;
                Tensor::from_raw_buffer(bytes, dt, &m.shape, &cpu).map_err(wrap)?
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
        let t = match m.unpermute_heads {
            Some(h) => unpermute(&t, h).map_err(wrap)?,
            None => t,
        };
        let t = if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype).map_err(wrap)?
        };
        let t = t.to_device(device).map_err(wrap)?;
        // As for safetensors: the copy is made, drop the file pages read for it.
        let len = m.ggml.type_size() * m.shape.iter().product::<usize>() / m.ggml.block_size();
        let start =
            (self.content.tensor_data_offset + info.offset) as usize + m.expert.unwrap_or(0) * len;
        super::st::release_pages(&self.mmap, start, start + len);
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
        let info = self.content.tensor_infos.get(&m.gguf).ok_or_else(|| {
            Error::bad_weights(
                &self.path,
                format!("tensor '{}' vanished from the header", m.gguf),
            )
        })?;
        let rb = kind.row_bytes(cols);
        let start = (self.content.tensor_data_offset + info.offset) as usize
            + m.expert.unwrap_or(0) * rows * rb;
        let bytes = self.mmap.get(start..start + rows * rb).ok_or_else(|| {
            Error::bad_weights(
                &self.path,
                format!("tensor '{}' lies outside the file", m.gguf),
            )
        })?;
        let data: std::borrow::Cow<[u8]> = match m.unpermute_heads {
            None => bytes.into(),
            Some(h) => {
                // Same row order as `unpermute`: new row (a, b, c) of shape (h, 2, half) is
                // old row (a, c, b) of shape (h, half, 2).
                let per_head = rows / h;
                let half = per_head / 2;
                let mut out = Vec::with_capacity(bytes.len());
                for a in 0..h {
                    for b in 0..2 {
                        for c in 0..half {
                            let old = a * per_head + c * 2 + b;
                            out.extend_from_slice(&bytes[old * rb..(old + 1) * rb]);
                        }
                    }
                }
                out.into()
            }
        };
        let q = QMatrix::from_ggml_bytes(kind, rows, cols, &data)
            .map_err(|e| Error::bad_weights(&self.path, format!("tensor '{}': {e}", m.gguf)))?;
        drop(data);
        super::st::release_pages(&self.mmap, start, start + rows * rb);
        Ok(Some(q))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{gguf_file, QTensor};

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
        let g = GgufFile::open(&p).unwrap();
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

        let c = g.config_json("LlamaForCausalLM").unwrap();
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
        let g = GgufFile::open(&p).unwrap();
        let dev = Device::Cpu;
        let q = g
            .load("model.layers.0.self_attn.q_proj.weight", DType::F32, &dev)
            .unwrap();
        assert_eq!(max_diff(&q, &t.q), 0.0);
        let lm = g.load("lm_head.weight", DType::F32, &dev).unwrap();
        assert!(max_diff(&lm, &t.embd) < 0.05);
        let c = g.config_json("Qwen2ForCausalLM").unwrap();
        assert_eq!(c["architectures"][0], "Qwen2ForCausalLM");
        assert_eq!(c["tie_word_embeddings"], false);
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
        let e = crate::families::gguf_class(&up, g.architecture()).unwrap_err();
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
        let g = GgufFile::open(&p).unwrap();
        g.config_json("LlamaForCausalLM").unwrap();
        let dev = Device::Cpu;
        let metas = g.metas().unwrap();
        for (n, m) in &metas {
            let t = g.load(n, DType::F32, &dev).unwrap();
            assert_eq!(t.dims(), m.shape.as_slice(), "{n}");
        }
    }
}
