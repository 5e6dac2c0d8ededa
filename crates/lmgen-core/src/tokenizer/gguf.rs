//! Tokenizers described by GGUF metadata (`tokenizer.ggml.*`, llama.cpp key names).
//!
//! * `gpt2`: byte-level BPE from `tokens` + `merges`; the pre-tokenizer regexes are chosen from
//!   `tokenizer.ggml.pre` as llama.cpp's `llama-vocab.cpp` does.
//! * `llama`: SentencePiece-style BPE (Metaspace `▁`, byte fallback), merges from the file or
//!   recovered from the scores, as transformers' GGUF loader does.
//!
//! Control tokens (`token_type` 3) become special added tokens, user-defined ones (4) plain
//! added tokens. BOS is added iff `tokenizer.ggml.add_bos_token` (default: true for `llama`,
//! false for `gpt2` except the pre-tokenizers llama.cpp defaults to BOS for).
use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value as GValue};
use serde_json::{json, Value};
use tokenizers::AddedToken;

use super::hf::{
    bpe_model, byte_level_decoder, llama_pipeline, template, tokenizer_from_json, QWEN2_SPLIT,
};
use super::{bad, LmTokenizer};
use crate::error::Result;

const TYPE_CONTROL: i64 = 3;
const TYPE_USER_DEFINED: i64 = 4;

fn as_i64(v: &GValue) -> Option<i64> {
    Some(match v {
        GValue::U8(x) => *x as i64,
        GValue::I8(x) => *x as i64,
        GValue::U16(x) => *x as i64,
        GValue::I16(x) => *x as i64,
        GValue::U32(x) => *x as i64,
        GValue::I32(x) => *x as i64,
        GValue::U64(x) => i64::try_from(*x).ok()?,
        GValue::I64(x) => *x,
        GValue::Bool(x) => *x as i64,
        _ => return None,
    })
}

fn as_f32(v: &GValue) -> Option<f32> {
    match v {
        GValue::F32(x) => Some(*x),
        GValue::F64(x) => Some(*x as f32),
        other => as_i64(other).map(|x| x as f32),
    }
}

struct Meta<'a> {
    md: &'a HashMap<String, GValue>,
    path: &'a Path,
}

impl<'a> Meta<'a> {
    fn get(&self, key: &str) -> Option<&'a GValue> {
        self.md.get(key)
    }
    fn string(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(bad(self.path, format!("{key}: expected a string"))),
        }
    }
    fn boolean(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => as_i64(v)
                .map(|x| Some(x != 0))
                .ok_or_else(|| bad(self.path, format!("{key}: expected a bool"))),
        }
    }
    fn id(&self, key: &str, n_tokens: usize) -> Result<Option<u32>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                let x = as_i64(v)
                    .ok_or_else(|| bad(self.path, format!("{key}: expected an integer")))?;
                // llama.cpp ignores out-of-range special ids (e.g. -1 meaning "none").
                Ok(u32::try_from(x).ok().filter(|&i| (i as usize) < n_tokens))
            }
        }
    }
    fn array(&self, key: &str) -> Result<Option<&'a Vec<GValue>>> {
        match self.get(key) {
            None => Ok(None),
            Some(GValue::Array(a)) => Ok(Some(a)),
            Some(_) => Err(bad(self.path, format!("{key}: expected an array"))),
        }
    }
    fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        let Some(a) = self.array(key)? else {
            return Ok(None);
        };
        a.iter()
            .enumerate()
            .map(|(i, v)| match v {
                GValue::String(s) => Ok(s.as_str()),
                _ => Err(bad(self.path, format!("{key}[{i}]: expected a string"))),
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
}

/// GPT-2's byte <-> printable-char table (`bytes_to_unicode`).
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        let c = if printable {
            b
        } else {
            n += 1;
            255 + n
        };
        table[b as usize] = char::from_u32(c).unwrap_or('?');
    }
    table
}

const GPT2_SPLIT: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const FALCON_PUNCT: &str = r"[\p{P}\$\+<=>\^~\|`]+";
const DEFAULT_PUNCT: &str = r"[\p{P}\$\+<=>\^~\|]+";
const BLOOM_SPLIT: &str = r" ?[^(\s|.,!?…。，、।۔،)]+";

/// Pre-tokenizer regexes (applied in sequence, each splitting the previous pieces, matches and
/// gaps both kept) and BPE options per `tokenizer.ggml.pre`, after llama.cpp `llama-vocab.cpp`.
struct PreSpec {
    regexes: Vec<&'static str>,
    ignore_merges: bool,
    /// llama.cpp's default for `add_bos` with this pre-tokenizer.
    add_bos: bool,
}

fn pre_spec(pre: &str) -> PreSpec {
    let spec = |regexes: Vec<&'static str>| PreSpec {
        regexes,
        ignore_merges: false,
        add_bos: false,
    };
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" => PreSpec {
            regexes: vec![LLAMA3_SPLIT],
            ignore_merges: true,
            add_bos: true,
        },
        "dbrx" | "smaug-bpe" | "chatglm-bpe" | "glm4" => spec(vec![LLAMA3_SPLIT]),
        "tekken" => PreSpec {
            regexes: vec![TEKKEN_SPLIT],
            ignore_merges: true,
            add_bos: true,
        },
        "gpt-4o" | "llama4" | "minimax-m2" => spec(vec![GPT4O_SPLIT]),
        "falcon" => spec(vec![FALCON_PUNCT, GPT2_SPLIT, "[0-9][0-9][0-9]"]),
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b" => {
            spec(vec![r"\p{N}", GPT2_SPLIT])
        }
        "gpt2" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
        | "jina-v2-de" | "a.x-4.0" | "mellum" | "mpt" | "olmo" | "jais" | "trillion"
        | "granite-docling" | "exaone4" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe" => {
            spec(vec![GPT2_SPLIT])
        }
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "stablelm2" | "megrez" | "hunyuan" => {
            spec(vec![QWEN2_SPLIT])
        }
        "poro-chat" | "bloom" | "gpt3-finnish" => spec(vec![BLOOM_SPLIT]),
        "viking" => spec(vec![BLOOM_SPLIT, r"\p{N}"]),
        // llama.cpp's "default" (also used for unknown names).
        _ => spec(vec![
            DEFAULT_PUNCT,
            GPT2_SPLIT,
            r"\p{N}+",
            "[0-9][0-9][0-9]",
        ]),
    }
}

/// `transformers.tokenization_utils_base.generate_merges` with scores: every split of every
/// token into two vocabulary tokens, best score first (then longer left, longer right).
fn generate_merges(
    tokens: &[&str],
    scores: &[f32],
    vocab: &HashMap<&str, u32>,
) -> Vec<(String, String)> {
    struct M<'t> {
        l: &'t str,
        r: &'t str,
        score: f32,
        ll: usize,
        lr: usize,
    }
    // dict(zip(tokens, scores)): first-occurrence order, last score.
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f32> = HashMap::with_capacity(tokens.len());
    for (t, s) in tokens.iter().zip(scores) {
        if score_of.insert(t, *s).is_none() {
            order.push(t);
        }
    }
    let mut merges: Vec<M> = Vec::new();
    for t in order {
        let score = score_of.get(t).copied().unwrap_or(0.0);
        let mut local: Vec<M> = Vec::new();
        for (b, _) in t.char_indices().skip(1) {
            let (l, r) = t.split_at(b);
            if vocab.contains_key(l) && vocab.contains_key(r) {
                local.push(M {
                    l,
                    r,
                    score,
                    ll: l.chars().count(),
                    lr: r.chars().count(),
                });
            }
        }
        local.sort_by_key(|m| (vocab.get(m.l).copied(), vocab.get(m.r).copied()));
        merges.extend(local);
    }
    merges.sort_by(|a, b| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(b.ll.cmp(&a.ll))
            .then(b.lr.cmp(&a.lr))
    });
    merges
        .into_iter()
        .map(|m| (m.l.to_string(), m.r.to_string()))
        .collect()
}

/// Split a GGUF merge "a b" like llama.cpp (first space after the first byte).
fn split_merge(m: &str) -> Option<(&str, &str)> {
    let pos = m.as_bytes().iter().skip(1).position(|&b| b == b' ')? + 1;
    Some((m.get(..pos)?, m.get(pos + 1..)?))
}

pub(super) fn load_gguf(content: &Content, path: &Path) -> Result<LmTokenizer> {
    let meta = Meta {
        md: &content.metadata,
        path,
    };
    let model = meta.string("tokenizer.ggml.model")?.ok_or_else(|| {
        bad(
            path,
            "no tokenizer in GGUF metadata (tokenizer.ggml.model missing)",
        )
    })?;
    let tokens = meta
        .strings("tokenizer.ggml.tokens")?
        .ok_or_else(|| bad(path, "tokenizer.ggml.tokens missing"))?;
    if tokens.is_empty() {
        return Err(bad(path, "tokenizer.ggml.tokens is empty"));
    }
    let n = tokens.len();
    let token_types: Option<Vec<i64>> = match meta.array("tokenizer.ggml.token_type")? {
        None => None,
        Some(a) => Some(
            a.iter()
                .map(|v| {
                    as_i64(v)
                        .ok_or_else(|| bad(path, "tokenizer.ggml.token_type: expected integers"))
                })
                .collect::<Result<_>>()?,
        ),
    };
    if token_types.as_ref().is_some_and(|t| t.len() != n) {
        return Err(bad(
            path,
            "tokenizer.ggml.token_type length differs from tokenizer.ggml.tokens",
        ));
    }
    let scores: Option<Vec<f32>> = match meta.array("tokenizer.ggml.scores")? {
        None => None,
        Some(a) => Some(
            a.iter()
                .map(|v| {
                    as_f32(v).ok_or_else(|| bad(path, "tokenizer.ggml.scores: expected numbers"))
                })
                .collect::<Result<_>>()?,
        ),
    };
    if scores.as_ref().is_some_and(|s| s.len() != n) {
        return Err(bad(
            path,
            "tokenizer.ggml.scores length differs from tokenizer.ggml.tokens",
        ));
    }
    let merges_raw = meta.strings("tokenizer.ggml.merges")?;
    let bos_id = meta.id("tokenizer.ggml.bos_token_id", n)?;
    let eos_id = meta.id("tokenizer.ggml.eos_token_id", n)?;
    let unk_id = meta.id("tokenizer.ggml.unknown_token_id", n)?;
    let pad_id = meta.id("tokenizer.ggml.padding_token_id", n)?;
    let add_bos_key = meta.boolean("tokenizer.ggml.add_bos_token")?;
    let add_eos = meta
        .boolean("tokenizer.ggml.add_eos_token")?
        .unwrap_or(false);

    let byte_level = match model {
        "gpt2" => true,
        "llama" => false,
        other => {
            return Err(bad(
                path,
                format!("unsupported GGUF tokenizer model '{other}' (supported: gpt2, llama)"),
            ))
        }
    };

    // Vocabulary as transformers spells it.
    let b2u = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = b2u.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let spelled: Vec<String> = tokens
        .iter()
        .map(|t| {
            if !byte_level || in_alphabet(t) {
                t.to_string()
            } else {
                t.bytes().map(|b| b2u[b as usize]).collect()
            }
        })
        .collect();
    let mut vocab_ids: HashMap<&str, u32> = HashMap::with_capacity(n);
    for (i, t) in spelled.iter().enumerate() {
        vocab_ids.insert(t.as_str(), i as u32);
    }

    let merges: Vec<(String, String)> = match &merges_raw {
        Some(m) => m
            .iter()
            .enumerate()
            .map(|(i, s)| {
                split_merge(s)
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| bad(path, format!("tokenizer.ggml.merges[{i}]: expected 'a b'")))
            })
            .collect::<Result<_>>()?,
        None => {
            let spelled_refs: Vec<&str> = spelled.iter().map(String::as_str).collect();
            let default_scores;
            let sc = match &scores {
                Some(s) => s.as_slice(),
                None => {
                    // No scores either: earlier tokens first (as gemma's positional scores).
                    default_scores = (0..n).map(|i| -(i as f32)).collect::<Vec<_>>();
                    default_scores.as_slice()
                }
            };
            generate_merges(&spelled_refs, sc, &vocab_ids)
        }
    };
    for (i, (a, b)) in merges.iter().enumerate() {
        for p in [a, b] {
            if !vocab_ids.contains_key(p.as_str()) {
                return Err(bad(
                    path,
                    format!("tokenizer.ggml.merges[{i}]: '{p}' is not a token"),
                ));
            }
        }
    }
    // The BPE model is built directly (what deserializing its JSON does, without building
    // and walking a JSON document of ~100k entries: a third of a small model's load time).
    let bpe = |fuse_unk: bool, byte_fallback: bool, ignore_merges: bool| {
        let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(n);
        for (i, t) in spelled.iter().enumerate() {
            vocab.insert(t.clone(), i as u32);
        }
        tokenizers::models::bpe::BPE::builder()
            .vocab_and_merges(vocab, merges)
            .fuse_unk(fuse_unk)
            .byte_fallback(byte_fallback)
            .ignore_merges(ignore_merges)
            .build()
            .map_err(|e| bad(path, e))
    };

    let (normalizer, pre_tokenizer, decoder, model, add_bos) = if byte_level {
        let pre = meta.string("tokenizer.ggml.pre")?.unwrap_or("default");
        let spec = pre_spec(pre);
        let mut pretoks: Vec<Value> = spec
            .regexes
            .iter()
            .map(|r| json!({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": false}))
            .collect();
        pretoks.push(json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}));
        (
            Value::Null,
            json!({"type": "Sequence", "pretokenizers": pretoks}),
            byte_level_decoder(),
            bpe(false, false, spec.ignore_merges)?,
            add_bos_key.unwrap_or(spec.add_bos),
        )
    } else {
        let add_space_prefix = meta
            .boolean("tokenizer.ggml.add_space_prefix")?
            .unwrap_or(true);
        let p = llama_pipeline(add_space_prefix, false);
        (
            p.normalizer,
            p.pre_tokenizer,
            p.decoder,
            bpe(p.fuse_unk, p.byte_fallback, false)?,
            add_bos_key.unwrap_or(true),
        )
    };
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": decoder,
        "model": bpe_model(json!({}), json!([]), None, false, false),
    });
    let mut tok = tokenizer_from_json(json, path)?;
    tok.with_model(model);

    // Control tokens -> special; user-defined -> plain added tokens.
    if let Some(types) = &token_types {
        let control: Vec<AddedToken> = tokens
            .iter()
            .zip(types)
            .filter(|(t, ty)| **ty == TYPE_CONTROL && (!byte_level || in_alphabet(t)))
            .map(|(t, _)| AddedToken::from(t.to_string(), true))
            .collect();
        if !control.is_empty() {
            tok.add_special_tokens(control).map_err(|e| bad(path, e))?;
        }
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(types)
            .filter(|(t, ty)| **ty == TYPE_USER_DEFINED && vocab_ids.contains_key(**t))
            .map(|(t, _)| {
                let mut a = AddedToken::from(t.to_string(), false);
                a.normalized = false;
                a
            })
            .collect();
        if !user.is_empty() {
            tok.add_tokens(user).map_err(|e| bad(path, e))?;
        }
    }
    // Named special tokens (bos/eos/unk/pad) become special if they are not added tokens yet.
    let present: std::collections::HashSet<String> = tok
        .get_added_tokens_decoder()
        .values()
        .map(|t| t.content.clone())
        .collect();
    let named: Vec<AddedToken> = [bos_id, eos_id, unk_id, pad_id]
        .into_iter()
        .flatten()
        .map(|id| tokens[id as usize])
        .filter(|t| !present.contains(*t))
        .map(|t| AddedToken::from(t.to_string(), true))
        .collect();
    if !named.is_empty() {
        tok.add_special_tokens(named).map_err(|e| bad(path, e))?;
    }

    let bos = bos_id.map(|id| (tokens[id as usize], id));
    let eos = eos_id.map(|id| (tokens[id as usize], id));
    let tp = template(
        if add_bos { bos } else { None },
        if add_eos { eos } else { None },
        path,
    )?;
    tok.with_post_processor(Some(tp));
    LmTokenizer::from_parts(tok, bos_id, eos_id, path)
}
