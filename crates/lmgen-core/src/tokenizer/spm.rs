//! Model directories that ship only a SentencePiece `tokenizer.model` (older Llama, Mistral and
//! Gemma repositories), converted the way `transformers` 5 `AutoTokenizer` converts them.
//!
//! The file is a serialized `sentencepiece.ModelProto`, read here by a small protobuf reader.
//! `transformers` then takes one of three routes, by tokenizer class:
//!
//! * `LlamaTokenizer`: vocabulary = the pieces by id, merges from every split of every piece
//!   into two pieces (lower id first), and `LlamaTokenizer`'s own pipeline (Metaspace with
//!   `add_prefix_space` and `legacy` from `tokenizer_config.json`, byte fallback).
//! * `GemmaTokenizer`: the same vocabulary and merges with Gemma's pipeline (spaces replaced by
//!   `▁`, no dummy prefix, `<unk>` as the BPE unknown token).
//! * the generic `TokenizersBackend` (`PreTrainedTokenizerFast`, no class, or a model type whose
//!   registered class is the backend, e.g. Mistral, Mixtral, Phi-3):
//!   `SpmConverter.build_tokenizer_from_spm_proto`, which follows the model's own settings: BPE
//!   merges ranked by piece score, or a Unigram model for unigram-type files; the normalizer spec
//!   (precompiled charsmap, extra-whitespace removal, dummy prefix, `legacy`, default true); and
//!   user-defined pieces split off whole.
//!
//! Other named classes with a conversion of their own (`T5Tokenizer`, `CodeLlamaTokenizer`, ...)
//! are refused with a one-line error, as is a file that is not a SentencePiece model.
//!
//! Control pieces become special added tokens and user-defined pieces plain added tokens (unless
//! the config lists its own extra special tokens); `tokenizer_config.json`'s
//! `added_tokens_decoder` and named special tokens are added as for `tokenizer.json`; BOS / EOS
//! are added iff `add_bos_token` / `add_eos_token` (default false).
use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Map, Value};
use tokenizers::{AddedToken, Tokenizer};

use super::hf::{
    added_token_from_value, bpe_model, cfg_bool, collect_special, incorrect_hub_class,
    is_backend_name, llama_pipeline, registered_class, resolve_class, template, token_content,
    tokenizer_from_json, Class, SpecialTokens,
};
use super::{bad, LmTokenizer};
use crate::error::{Error, Result};

const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;

/// A malformed protobuf (offsets are byte positions in the file).
#[derive(Debug, thiserror::Error)]
pub(super) enum ProtoError {
    #[error("truncated at byte {0}")]
    Truncated(usize),
    #[error("malformed varint at byte {0}")]
    Varint(usize),
    #[error("invalid field number 0 at byte {0}")]
    FieldZero(usize),
    #[error("unsupported wire type {wire} at byte {at}")]
    WireType { wire: u64, at: usize },
    #[error("{what} (field {field}) has the wrong wire type at byte {at}")]
    WrongType {
        what: &'static str,
        field: u32,
        at: usize,
    },
    #[error("{what} at byte {at} is not valid UTF-8")]
    Utf8 { what: &'static str, at: usize },
}

type ProtoResult<T> = std::result::Result<T, ProtoError>;

/// One field's payload.
enum Wire<'a> {
    Varint(u64),
    Fixed64,
    Fixed32(u32),
    Bytes(&'a [u8]),
}

/// Reads the fields of one message. `base` is the message's offset in the file.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], base: usize) -> Self {
        Self { buf, pos: 0, base }
    }

    fn at(&self) -> usize {
        self.base + self.pos
    }

    fn byte(&mut self) -> ProtoResult<u8> {
        let b = *self
            .buf
            .get(self.pos)
            .ok_or(ProtoError::Truncated(self.at()))?;
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> ProtoResult<u64> {
        let start = self.at();
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            if shift == 63 && b > 1 {
                return Err(ProtoError::Varint(start));
            }
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(ProtoError::Varint(start))
    }

    fn take(&mut self, n: u64) -> ProtoResult<&'a [u8]> {
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.pos.checked_add(n))
            .filter(|&e| e <= self.buf.len())
            .ok_or(ProtoError::Truncated(self.base + self.buf.len()))?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// The next field: (number, offset of its payload in the file, payload).
    fn next(&mut self) -> ProtoResult<Option<(u32, usize, Wire<'a>)>> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key_at = self.at();
        let key = self.varint()?;
        let field = u32::try_from(key >> 3).map_err(|_| ProtoError::Varint(key_at))?;
        if field == 0 {
            return Err(ProtoError::FieldZero(key_at));
        }
        let at = self.at();
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Wire::Fixed64
            }
            2 => {
                let n = self.varint()?;
                Wire::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Wire::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => {
                return Err(ProtoError::WireType {
                    wire: w,
                    at: key_at,
                })
            }
        };
        Ok(Some((field, at, wire)))
    }
}

fn wrong(what: &'static str, field: u32, at: usize) -> ProtoError {
    ProtoError::WrongType { what, field, at }
}

fn int(w: &Wire, what: &'static str, field: u32, at: usize) -> ProtoResult<i64> {
    match w {
        // int32 / enum: two's complement, negative values sign-extended to 64 bits.
        Wire::Varint(v) => Ok(*v as i64),
        _ => Err(wrong(what, field, at)),
    }
}

fn string(w: &Wire, what: &'static str, field: u32, at: usize) -> ProtoResult<String> {
    match w {
        Wire::Bytes(b) => String::from_utf8(b.to_vec()).map_err(|_| ProtoError::Utf8 { what, at }),
        _ => Err(wrong(what, field, at)),
    }
}

/// `ModelProto.SentencePiece`.
#[derive(Clone, Debug)]
pub(super) struct Piece {
    pub piece: String,
    pub score: f32,
    /// 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    pub kind: i32,
}

/// The `TrainerSpec` fields the conversion uses (proto2 defaults when absent).
#[derive(Clone, Debug)]
pub(super) struct TrainerSpec {
    /// 1 unigram, 2 BPE, 3 word, 4 char.
    pub model_type: i64,
    pub byte_fallback: bool,
    pub unk_id: i64,
    pub bos_id: i64,
    pub eos_id: i64,
    pub unk_piece: String,
    pub bos_piece: String,
    pub eos_piece: String,
}

impl Default for TrainerSpec {
    fn default() -> Self {
        Self {
            model_type: 1,
            byte_fallback: false,
            unk_id: 0,
            bos_id: 1,
            eos_id: 2,
            unk_piece: "<unk>".into(),
            bos_piece: "<s>".into(),
            eos_piece: "</s>".into(),
        }
    }
}

/// The `NormalizerSpec` fields the conversion uses (proto2 defaults when absent).
#[derive(Clone, Debug)]
pub(super) struct NormalizerSpec {
    pub precompiled_charsmap: Vec<u8>,
    pub add_dummy_prefix: bool,
    pub remove_extra_whitespaces: bool,
    pub escape_whitespaces: bool,
}

impl Default for NormalizerSpec {
    fn default() -> Self {
        Self {
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        }
    }
}

/// The parts of a `sentencepiece.ModelProto` the conversion needs.
#[derive(Clone, Debug)]
pub(super) struct SpmModel {
    pub pieces: Vec<Piece>,
    pub trainer: TrainerSpec,
    pub normalizer: NormalizerSpec,
}

fn parse_piece(buf: &[u8], base: usize) -> ProtoResult<Piece> {
    let mut r = Reader::new(buf, base);
    let mut p = Piece {
        piece: String::new(),
        score: 0.0,
        kind: NORMAL,
    };
    while let Some((field, at, w)) = r.next()? {
        match field {
            1 => p.piece = string(&w, "piece", field, at)?,
            2 => match w {
                Wire::Fixed32(bits) => p.score = f32::from_bits(bits),
                _ => return Err(wrong("piece score", field, at)),
            },
            // Unknown enum values are kept as unknown fields by protobuf: the type stays NORMAL.
            3 => {
                let t = int(&w, "piece type", field, at)?;
                if (1..=6).contains(&t) {
                    p.kind = t as i32;
                }
            }
            _ => {}
        }
    }
    Ok(p)
}

fn parse_trainer(buf: &[u8], base: usize, t: &mut TrainerSpec) -> ProtoResult<()> {
    let mut r = Reader::new(buf, base);
    while let Some((field, at, w)) = r.next()? {
        match field {
            3 => t.model_type = int(&w, "model_type", field, at)?,
            35 => t.byte_fallback = int(&w, "byte_fallback", field, at)? != 0,
            40 => t.unk_id = i64::from(int(&w, "unk_id", field, at)? as i32),
            41 => t.bos_id = i64::from(int(&w, "bos_id", field, at)? as i32),
            42 => t.eos_id = i64::from(int(&w, "eos_id", field, at)? as i32),
            45 => t.unk_piece = string(&w, "unk_piece", field, at)?,
            46 => t.bos_piece = string(&w, "bos_piece", field, at)?,
            47 => t.eos_piece = string(&w, "eos_piece", field, at)?,
            _ => {}
        }
    }
    Ok(())
}

fn parse_normalizer(buf: &[u8], base: usize, n: &mut NormalizerSpec) -> ProtoResult<()> {
    let mut r = Reader::new(buf, base);
    while let Some((field, at, w)) = r.next()? {
        match field {
            2 => match w {
                Wire::Bytes(b) => n.precompiled_charsmap = b.to_vec(),
                _ => return Err(wrong("precompiled_charsmap", field, at)),
            },
            3 => n.add_dummy_prefix = int(&w, "add_dummy_prefix", field, at)? != 0,
            4 => n.remove_extra_whitespaces = int(&w, "remove_extra_whitespaces", field, at)? != 0,
            5 => n.escape_whitespaces = int(&w, "escape_whitespaces", field, at)? != 0,
            _ => {}
        }
    }
    Ok(())
}

/// A `ModelProto` as read, before the checks of [`SpmModel::parse`].
struct RawModel {
    pieces: Vec<Piece>,
    trainer: Option<TrainerSpec>,
    normalizer: Option<NormalizerSpec>,
}

/// Parse a serialized `ModelProto` (a singular message field given twice is merged, as
/// protobuf does).
fn parse_proto(buf: &[u8]) -> ProtoResult<RawModel> {
    let mut r = Reader::new(buf, 0);
    let mut m = RawModel {
        pieces: Vec::new(),
        trainer: None,
        normalizer: None,
    };
    while let Some((field, at, w)) = r.next()? {
        match (field, w) {
            (1, Wire::Bytes(b)) => m.pieces.push(parse_piece(b, at)?),
            (2, Wire::Bytes(b)) => {
                parse_trainer(b, at, m.trainer.get_or_insert_with(Default::default))?
            }
            (3, Wire::Bytes(b)) => {
                parse_normalizer(b, at, m.normalizer.get_or_insert_with(Default::default))?
            }
            (1, _) => return Err(wrong("pieces", field, at)),
            (2, _) => return Err(wrong("trainer_spec", field, at)),
            (3, _) => return Err(wrong("normalizer_spec", field, at)),
            _ => {}
        }
    }
    Ok(m)
}

impl SpmModel {
    /// Parse `tokenizer.model` bytes; the error is a one-line description.
    pub(super) fn parse(buf: &[u8]) -> std::result::Result<Self, String> {
        let what = "not a valid SentencePiece model";
        let m = parse_proto(buf).map_err(|e| format!("{what} ({e})"))?;
        if m.pieces.is_empty() {
            return Err(format!("{what} (no pieces)"));
        }
        let trainer = m
            .trainer
            .ok_or_else(|| format!("{what} (no trainer_spec; truncated?)"))?;
        let normalizer = m
            .normalizer
            .ok_or_else(|| format!("{what} (no normalizer_spec; truncated?)"))?;
        Ok(Self {
            pieces: m.pieces,
            trainer,
            normalizer,
        })
    }
}

/// `transformers.tokenization_utils_base.generate_merges(vocab)` (no scores): every split of
/// every token into two tokens, ordered by the token's id, then shorter left part first.
fn merges_by_id(vocab: &Map<String, Value>) -> Vec<Value> {
    let id = |t: &str| vocab.get(t).and_then(Value::as_u64);
    let mut merges: Vec<(u64, usize, &str, &str)> = Vec::new();
    for (token, tid) in vocab {
        let Some(tid) = tid.as_u64() else { continue };
        let mut local: Vec<(u64, usize, &str, &str)> = Vec::new();
        for (n, (b, _)) in token.char_indices().skip(1).enumerate() {
            let (l, r) = token.split_at(b);
            if id(l).is_some() && id(r).is_some() {
                local.push((tid, n + 1, l, r));
            }
        }
        local.sort_by_key(|m| (id(m.2), id(m.3)));
        merges.extend(local);
    }
    // Stable sort on (id, len(left), len(right)); len(right) follows from len(left).
    merges.sort_by_key(|m| (m.0, m.1));
    merges.into_iter().map(|m| json!([m.2, m.3])).collect()
}

/// `SpmConverter.build_tokenizer_from_spm_proto`'s merges: splits of normal pieces into two
/// normal pieces, best score first, then lower id, then the parts' text.
fn merges_by_score(spm: &SpmModel, id_to_token: &HashMap<u32, String>) -> Vec<Value> {
    let mut normal: HashMap<&str, (f32, u32)> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for (i, p) in spm.pieces.iter().enumerate() {
        if p.kind != NORMAL {
            continue;
        }
        if let Some(t) = id_to_token.get(&(i as u32)) {
            if normal.insert(t.as_str(), (p.score, i as u32)).is_none() {
                order.push(t.as_str());
            }
        }
    }
    let mut ranked: Vec<(f32, u32, &str, &str)> = Vec::new();
    for t in order {
        let Some(&(score, id)) = normal.get(t) else {
            continue;
        };
        for (b, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(b);
            if normal.contains_key(l) && normal.contains_key(r) {
                ranked.push((-score, id, l, r));
            }
        }
    }
    ranked.sort_by(|a, b| {
        a.0.partial_cmp(&b.0)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.1.cmp(&b.1))
            .then(a.2.cmp(b.2))
            .then(a.3.cmp(b.3))
    });
    ranked.into_iter().map(|m| json!([m.2, m.3])).collect()
}

/// Python's `re.escape`.
fn re_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "()[]{}?*+-|^$\\.&~# \t\n\r\u{b}\u{c}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(T[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// `SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=legacy)`: the tokenizer
/// JSON (no added tokens, no post-processor).
fn from_proto(
    spm: &SpmModel,
    renames: &HashMap<u32, String>,
    legacy: bool,
    path: &Path,
) -> Result<Value> {
    let ns = &spm.normalizer;
    let byte_fallback = spm.trainer.byte_fallback;
    // `extract` builds a Unigram vocabulary only for unigram models (model_type 1).
    let unigram = spm.trainer.model_type == 1;
    let mut id_to_token: HashMap<u32, String> = HashMap::new();
    let model = if unigram {
        for (i, p) in spm.pieces.iter().enumerate() {
            id_to_token.insert(i as u32, p.piece.clone());
        }
        let unk = usize::try_from(spm.trainer.unk_id)
            .ok()
            .filter(|&u| u < spm.pieces.len())
            .ok_or_else(|| {
                bad(
                    path,
                    format!("unk_id {} is not a piece id", spm.trainer.unk_id),
                )
            })?;
        let vocab: Vec<Value> = spm
            .pieces
            .iter()
            .map(|p| json!([p.piece, f64::from(p.score)]))
            .collect();
        json!({"type": "Unigram", "unk_id": unk, "vocab": vocab, "byte_fallback": byte_fallback})
    } else {
        // The vocabulary, with pieces renamed from `added_tokens_decoder` (a rename onto a piece
        // that keeps its own id is skipped).
        let kept: std::collections::HashSet<&str> = spm
            .pieces
            .iter()
            .enumerate()
            .filter(|(i, _)| !renames.contains_key(&(*i as u32)))
            .map(|(_, p)| p.piece.as_str())
            .collect();
        let mut vocab = Map::new();
        for (i, p) in spm.pieces.iter().enumerate() {
            let token = match renames.get(&(i as u32)) {
                Some(n) if !kept.contains(n.as_str()) => n.clone(),
                _ => p.piece.clone(),
            };
            vocab.insert(token, json!(i));
        }
        for (t, i) in &vocab {
            if let Some(i) = i.as_u64() {
                id_to_token.insert(i as u32, t.clone());
            }
        }
        let merges = merges_by_score(spm, &id_to_token);
        let has_user = spm
            .pieces
            .iter()
            .enumerate()
            .any(|(i, p)| p.kind == USER_DEFINED && id_to_token.contains_key(&(i as u32)));
        let mut m = bpe_model(
            Value::Object(vocab),
            Value::Array(merges),
            Some(&spm.trainer.unk_piece),
            true,
            byte_fallback,
        );
        m["ignore_merges"] = json!(has_user);
        m
    };
    let user_defined: Vec<&str> = spm
        .pieces
        .iter()
        .enumerate()
        .filter(|(_, p)| p.kind == USER_DEFINED)
        .filter_map(|(i, _)| id_to_token.get(&(i as u32)).map(String::as_str))
        .collect();

    let mut normalizers = Vec::new();
    if !ns.precompiled_charsmap.is_empty() {
        normalizers.push(json!({"type": "Precompiled", "precompiled_charsmap": base64(&ns.precompiled_charsmap)}));
    }
    if ns.remove_extra_whitespaces {
        normalizers
            .push(json!({"type": "Replace", "pattern": {"Regex": r"\A +| +\z"}, "content": ""}));
        normalizers.push(json!({"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}));
    }
    if ns.escape_whitespaces {
        normalizers
            .push(json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}));
    }
    if ns.add_dummy_prefix && legacy {
        // Metaspace skips the dummy prefix when the text already starts with "▁"; SentencePiece doesn't.
        normalizers.push(json!({"type": "Replace", "pattern": {"Regex": "\\A\u{2581}"}, "content": "\u{2581}\u{2581}"}));
    }
    let mut pre = Vec::new();
    if ns.add_dummy_prefix {
        let scheme = if legacy { "always" } else { "first" };
        pre.push(json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": scheme, "split": false}));
    }
    if !user_defined.is_empty() {
        let mut sorted = user_defined.clone();
        sorted.sort_by_key(|t| std::cmp::Reverse(t.chars().count()));
        let pattern: Vec<String> = sorted.iter().map(|t| re_escape(t)).collect();
        pre.push(json!({"type": "Split", "pattern": {"Regex": pattern.join("|")}, "behavior": "Isolated", "invert": false}));
    }
    let mut decoders =
        vec![json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "})];
    if byte_fallback {
        decoders.push(json!({"type": "ByteFallback"}));
    }
    if ns.add_dummy_prefix {
        decoders.push(json!({"type": "Fuse"}));
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    } else if byte_fallback {
        decoders.push(json!({"type": "Fuse"}));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": if pre.is_empty() { Value::Null } else { json!({"type": "Sequence", "pretokenizers": pre}) },
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": model,
    }))
}

/// The vocabulary (`{piece: id}`) and merges `SentencePieceExtractor.extract(BPE)` gives a
/// model-specific class.
fn extracted_bpe(spm: &SpmModel) -> (Map<String, Value>, Vec<Value>) {
    let mut vocab = Map::new();
    for (i, p) in spm.pieces.iter().enumerate() {
        vocab.insert(p.piece.clone(), json!(i));
    }
    let merges = merges_by_id(&vocab);
    (vocab, merges)
}

fn class_tokenizer(
    spm: &SpmModel,
    class: Class,
    cfg: &Map<String, Value>,
    path: &Path,
) -> Result<Tokenizer> {
    let (vocab, merges) = extracted_bpe(spm);
    let json = match class {
        Class::Gemma => {
            // GemmaTokenizer(unk_token=...) passes str(unk_token) to the BPE model.
            let unk = match cfg.get("unk_token") {
                None => "<unk>".to_string(),
                Some(Value::Null) => "None".to_string(),
                Some(v) => token_content(v).unwrap_or_else(|| "<unk>".to_string()),
            };
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"},
                "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
                "post_processor": null,
                "decoder": {"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                    {"type": "ByteFallback"}, {"type": "Fuse"}]},
                "model": bpe_model(Value::Object(vocab), Value::Array(merges), Some(&unk), true, true),
            })
        }
        _ => {
            let p = llama_pipeline(
                cfg_bool(Some(cfg), "add_prefix_space").unwrap_or(true),
                cfg_bool(Some(cfg), "legacy").unwrap_or(false),
            );
            json!({
                "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
                "normalizer": p.normalizer,
                "pre_tokenizer": p.pre_tokenizer,
                "post_processor": null,
                "decoder": p.decoder,
                "model": bpe_model(Value::Object(vocab), Value::Array(merges), None, p.fuse_unk, p.byte_fallback),
            })
        }
    };
    tokenizer_from_json(json, path)
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|x| x != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// The extra special tokens the config itself lists (`extra_special_tokens`, or the older
/// `additional_special_tokens`), after transformers' renaming; `None` when it lists none, in
/// which case the extractor's control / user-defined pieces are used. Removes the keys.
fn take_config_extras(kw: &mut Map<String, Value>) -> Option<Value> {
    let extra = kw.get("extra_special_tokens").cloned();
    let mut eff = extra.clone();
    if let Some(a) = kw.get("additional_special_tokens") {
        if !extra.as_ref().is_some_and(truthy) {
            eff = Some(a.clone());
        }
    }
    match eff {
        // A dict: model-specific named tokens, handled with the named ones.
        Some(Value::Object(_)) => None,
        other => {
            kw.remove("additional_special_tokens");
            kw.remove("extra_special_tokens");
            other
        }
    }
}

/// A token queued for `add_tokens`, as transformers holds it (plain string or `AddedToken`).
enum Queued {
    Str(String),
    Tok(AddedToken),
}

/// Add tokens the way `TokenizersBackend.__init__` does: `added_tokens_decoder`, then named
/// special tokens and extra special tokens not yet among them, in one `add_tokens` call.
fn add_tokens(
    tok: &mut Tokenizer,
    sp: &SpecialTokens,
    extras: Vec<Queued>,
    path: &Path,
) -> Result<()> {
    let mut queue: Vec<Queued> = sp
        .added
        .iter()
        .map(|(_, t)| Queued::Tok(t.clone()))
        .collect();
    let encoder: std::collections::HashSet<String> =
        sp.added.iter().map(|(_, t)| t.content.clone()).collect();
    let named_tokens: Vec<Queued> = sp
        .named
        .iter()
        .filter_map(|(_, v)| match v {
            Value::String(s) => Some(Queued::Str(s.clone())),
            v => added_token_from_value(v, None).map(Queued::Tok),
        })
        .collect();
    let content = |q: &Queued| match q {
        Queued::Str(s) => s.clone(),
        Queued::Tok(t) => t.content.clone(),
    };
    let named: std::collections::HashSet<String> = named_tokens.iter().map(content).collect();
    // `q not in tokens_to_add`: strings equal by text, AddedTokens by all their fields.
    type Key = (bool, String, [bool; 5]);
    let key = |q: &Queued| -> Key {
        match q {
            Queued::Str(s) => (true, s.clone(), [false; 5]),
            Queued::Tok(t) => (
                false,
                t.content.clone(),
                [t.single_word, t.lstrip, t.rstrip, t.normalized, t.special],
            ),
        }
    };
    let mut queued: std::collections::HashSet<Key> = queue.iter().map(key).collect();
    for q in named_tokens.into_iter().chain(extras) {
        if !encoder.contains(&content(&q)) && queued.insert(key(&q)) {
            queue.push(q);
        }
    }
    let tokens: Vec<AddedToken> = queue
        .into_iter()
        .map(|q| match q {
            Queued::Str(s) => AddedToken::from(s, true),
            Queued::Tok(mut t) => {
                if !t.special && named.contains(&t.content) {
                    t.special = true;
                }
                t
            }
        })
        .collect();
    if !tokens.is_empty() {
        tok.add_tokens(tokens).map_err(|e| bad(path, e))?;
    }
    Ok(())
}

/// Which route transformers takes for a `tokenizer.model`-only directory: the class
/// `AutoTokenizer` picks (as [`resolve_class`] decides, by name), where only `LlamaTokenizer`,
/// `GemmaTokenizer` and the generic backend are reproduced.
fn spm_class(hub: Option<&str>, model_type: Option<&str>, path: &Path) -> Result<Class> {
    let strip = |s: &'static str| s.strip_suffix("Fast").unwrap_or(s);
    let reg = model_type.and_then(registered_class);
    let name: Option<&str> = match (hub, reg) {
        (Some(h), Some(r)) if strip(r) != h.strip_suffix("Fast").unwrap_or(h) => {
            if is_backend_name(r) {
                None
            } else if model_type.is_some_and(incorrect_hub_class) {
                Some(r)
            } else {
                Some(h)
            }
        }
        (Some(h), _) => Some(h),
        (None, r) => r,
    };
    let Some(name) = name else {
        return Ok(Class::Backend);
    };
    if is_backend_name(name) {
        return Ok(Class::Backend);
    }
    match resolve_class(Some(name), None, None) {
        c @ (Class::Llama | Class::Gemma) => Ok(c),
        _ => Err(bad(
            path,
            format!(
                "tokenizer class {name} is not supported for a tokenizer.model without tokenizer.json \
                 (supported: LlamaTokenizer, GemmaTokenizer, TokenizersBackend / PreTrainedTokenizerFast); \
                 add a tokenizer.json"
            ),
        )),
    }
}

/// Load a directory whose tokenizer is `tokenizer.model` (no `tokenizer.json`).
pub(super) fn load(
    dir: &Path,
    hub: Option<&str>,
    model_type: Option<&str>,
    cfg: Option<&Map<String, Value>>,
    stm: Option<&Map<String, Value>>,
    legacy_added: impl Fn(&[String]) -> Result<Vec<(u32, AddedToken)>>,
) -> Result<LmTokenizer> {
    let path = dir.join("tokenizer.model");
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let spm = SpmModel::parse(&bytes).map_err(|e| bad(&path, e))?;
    let class = spm_class(hub, model_type, &path)?;

    // The keyword arguments the class is built with: tokenizer_config.json, plus
    // special_tokens_map.json when there is no added_tokens_decoder.
    let mut kw = cfg.cloned().unwrap_or_default();
    let mut config_extras = take_config_extras(&mut kw);
    if !kw.contains_key("added_tokens_decoder") {
        for (k, v) in stm.into_iter().flatten() {
            match (k.as_str(), v) {
                // Merged after the config's own list was settled: replaced by the model's pieces.
                ("additional_special_tokens", _) => {}
                ("extra_special_tokens", Value::Array(items)) => {
                    let mut list = match config_extras.take() {
                        Some(Value::Array(a)) => a,
                        _ => Vec::new(),
                    };
                    for t in items {
                        if !list.contains(t) {
                            list.push(t.clone());
                        }
                    }
                    config_extras = Some(Value::Array(list));
                }
                _ => {
                    kw.insert(k.clone(), v.clone());
                }
            }
        }
    }
    // Extractor: control pieces are special, user-defined ones are not (both not normalized).
    let mut spm_extras: Vec<Queued> = spm
        .pieces
        .iter()
        .filter(|p| p.kind == CONTROL || p.kind == USER_DEFINED)
        .map(|p| {
            let mut t = AddedToken::from(p.piece.clone(), p.kind == CONTROL);
            t.normalized = false;
            Queued::Tok(t)
        })
        .collect();
    let legacy = match kw.get("legacy") {
        None => true,
        Some(v) => truthy(v),
    };

    let named0 = collect_special(class, Some(&kw), None, Vec::new());
    let named_strs: Vec<String> = named0
        .named
        .iter()
        .filter_map(|(_, v)| token_content(v))
        .collect();
    let (mut tok, sp) = if class == Class::Backend {
        // Named tokens the config leaves out come from the model's trainer spec.
        let t = &spm.trainer;
        for (key, id, piece, default) in [
            ("bos_token", t.bos_id, &t.bos_piece, "<s>"),
            ("eos_token", t.eos_id, &t.eos_piece, "</s>"),
            ("unk_token", t.unk_id, &t.unk_piece, "<unk>"),
        ] {
            if id >= 0 && !kw.contains_key(key) {
                let v = if piece.is_empty() {
                    default
                } else {
                    piece.as_str()
                };
                kw.insert(key.to_string(), json!(v));
            }
        }
        let mut sp = collect_special(class, Some(&kw), None, legacy_added(&named_strs)?);
        let renames: HashMap<u32, String> = sp
            .added
            .iter()
            .map(|(i, t)| (*i, t.content.clone()))
            .collect();
        // User-defined pieces are matched by the pre-tokenizer, not as added tokens.
        spm_extras.retain(|q| !matches!(q, Queued::Tok(t) if !t.special));
        if spm.normalizer.add_dummy_prefix {
            // Added tokens are matched on the raw text, so each chunk gets its own dummy prefix.
            for (_, t) in sp.added.iter_mut() {
                t.normalized = false;
            }
        }
        let json = from_proto(&spm, &renames, legacy, &path)?;
        (tokenizer_from_json(json, &path)?, sp)
    } else {
        let sp = collect_special(class, Some(&kw), None, legacy_added(&named_strs)?);
        (class_tokenizer(&spm, class, &kw, &path)?, sp)
    };
    let extras = match config_extras {
        None => spm_extras,
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| match v {
                Value::String(s) => Some(Queued::Str(s.clone())),
                v => added_token_from_value(v, None).map(Queued::Tok),
            })
            .collect(),
        Some(_) => Vec::new(),
    };
    add_tokens(&mut tok, &sp, extras, &path)?;

    let bos = sp
        .named
        .iter()
        .find(|(k, _)| k == "bos_token")
        .and_then(|(_, v)| token_content(v));
    let eos = sp
        .named
        .iter()
        .find(|(k, _)| k == "eos_token")
        .and_then(|(_, v)| token_content(v));
    let add_bos = cfg.and_then(|c| c.get("add_bos_token")).is_some_and(truthy);
    let add_eos = cfg.and_then(|c| c.get("add_eos_token")).is_some_and(truthy);
    let with_id = |t: &Option<String>, add: bool, what: &str| -> Result<Option<(String, u32)>> {
        match (t, add) {
            (Some(t), true) => {
                let id = tok.token_to_id(t).ok_or_else(|| {
                    bad(
                        &path,
                        format!("{what} token '{t}' is not in the vocabulary"),
                    )
                })?;
                Ok(Some((t.clone(), id)))
            }
            _ => Ok(None),
        }
    };
    let bos_pair = with_id(&bos, add_bos, "bos")?;
    let eos_pair = with_id(&eos, add_eos, "eos")?;
    let tp = template(
        bos_pair.as_ref().map(|(t, i)| (t.as_str(), *i)),
        eos_pair.as_ref().map(|(t, i)| (t.as_str(), *i)),
        &path,
    )?;
    tok.with_post_processor(Some(tp));
    let bos_id = bos.as_deref().and_then(|t| tok.token_to_id(t));
    let eos_id = eos.as_deref().and_then(|t| tok.token_to_id(t));
    LmTokenizer::from_parts(tok, bos_id, eos_id, &path)
}
