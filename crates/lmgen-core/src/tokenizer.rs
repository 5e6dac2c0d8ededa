//! Tokenization for Hugging Face causal LMs, matching `transformers` 5 `AutoTokenizer`.
//!
//! * [`LmTokenizer::from_dir`] loads a model directory (`tokenizer.json`, or slow-tokenizer
//!   `vocab.json` + `merges.txt`, or a SentencePiece `tokenizer.model`), emulating how
//!   `transformers` 5 picks and rebuilds the tokenizer class (see `hf.rs` and `spm.rs`).
//! * [`LmTokenizer::from_gguf`] builds the tokenizer described by GGUF metadata (see `gguf.rs`).
//! * [`LmTokenizer::encode`] / [`LmTokenizer::decode`] behave like `tokenizer(text)["input_ids"]`
//!   and `tokenizer.decode(ids, skip_special_tokens=True)`.
//! * [`DecodeStream`] turns generated ids into text incrementally without ever splitting a
//!   UTF-8 character, at O(window) cost per token.
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::{Error, Result};

pub mod chat;
mod gguf;
mod hf;
mod spm;

/// A loaded tokenizer plus its special-token information. Cheap to clone (shared inside).
#[derive(Clone)]
pub struct LmTokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    tok: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    /// Ids of added tokens flagged special (dropped by `decode`).
    special_ids: HashSet<u32>,
    /// `byte_fallback[id]`: `<0xXX>` token under a `ByteFallback` decoder (empty if none).
    byte_fallback: Vec<bool>,
    /// Where the tokenizer came from (for messages).
    source: PathBuf,
}

impl std::fmt::Debug for LmTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LmTokenizer")
            .field("source", &self.inner.source)
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.inner.bos)
            .field("eos", &self.inner.eos)
            .finish()
    }
}

fn tok_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(one_line(&format!("{what}: {e}")))
}

/// Collapse a message onto one line.
pub(crate) fn one_line(s: &str) -> String {
    s.split(['\n', '\r'])
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn bad(path: &Path, msg: impl std::fmt::Display) -> Error {
    Error::BadTokenizer {
        path: path.to_path_buf(),
        msg: one_line(&msg.to_string()),
    }
}

impl LmTokenizer {
    /// Wrap a fully configured `tokenizers::Tokenizer`.
    pub(crate) fn from_parts(
        mut tok: tokenizers::Tokenizer,
        bos: Option<u32>,
        eos: Option<u32>,
        source: &Path,
    ) -> Result<Self> {
        tok.with_truncation(None).map_err(|e| bad(source, e))?;
        tok.with_padding(None);
        // What `decode(.., skip_special_tokens=true)` drops: added tokens whose content is special.
        let special_ids = tok
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| tok.get_added_vocabulary().is_special_token(&t.content))
            .map(|(id, _)| *id)
            .collect();
        let has_byte_fallback = tok
            .get_decoder()
            .and_then(|d| serde_json::to_string(d).ok())
            .is_some_and(|d| d.contains("\"ByteFallback\""));
        let mut byte_fallback = Vec::new();
        if has_byte_fallback {
            let vocab = tok.get_vocab(false);
            let n = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
            byte_fallback = vec![false; n];
            for (t, &i) in &vocab {
                let b = t.as_bytes();
                if b.len() == 6
                    && t.starts_with("<0x")
                    && t.ends_with('>')
                    && u8::from_str_radix(&t[3..5], 16).is_ok()
                {
                    byte_fallback[i as usize] = true;
                }
            }
        }
        let inner = Inner {
            tok,
            bos,
            eos,
            special_ids,
            byte_fallback,
            source: source.to_path_buf(),
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Load from a Hugging Face model directory: `tokenizer.json` (+ `tokenizer_config.json`,
    /// `special_tokens_map.json`, `config.json` when present), or the slow-tokenizer files
    /// `vocab.json` + `merges.txt` when there is no `tokenizer.json`, else a SentencePiece
    /// `tokenizer.model` (converted as `transformers` converts it).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        hf::load_dir(dir)
    }

    /// Build from GGUF metadata (`tokenizer.ggml.*`). `path` is only used in messages.
    pub fn from_gguf(
        content: &candle_core::quantized::gguf_file::Content,
        path: &Path,
    ) -> Result<Self> {
        gguf::load_gguf(content, path)
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner.tok
    }

    /// Where this tokenizer was loaded from.
    pub fn source(&self) -> &Path {
        &self.inner.source
    }

    /// Like `tokenizer(text)["input_ids"]`: special tokens (BOS, ...) added as the tokenizer does.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .tok
            .encode(text, true)
            .map_err(|e| tok_err("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Like `encode` but without the added special tokens (no BOS/EOS template).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .tok
            .encode(text, false)
            .map_err(|e| tok_err("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Like `tokenizer.decode(ids, skip_special_tokens=True)`. Unknown ids are skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .tok
            .decode(ids, true)
            .map_err(|e| tok_err("decode", e))
    }

    /// Like `tokenizer.decode(ids, skip_special_tokens=False)`.
    pub fn decode_with_special(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .tok
            .decode(ids, false)
            .map_err(|e| tok_err("decode", e))
    }

    /// Text of `generated` as a continuation of `prompt` (vLLM-style): `decode(prompt + generated)`
    /// with the `decode(prompt)` prefix removed when it is a prefix, else `decode(generated)`.
    pub fn continuation(&self, prompt: &[u32], generated: &[u32]) -> Result<String> {
        if prompt.is_empty() {
            return self.decode(generated);
        }
        let mut all = Vec::with_capacity(prompt.len() + generated.len());
        all.extend_from_slice(prompt);
        all.extend_from_slice(generated);
        let full = self.decode(&all)?;
        let head = self.decode(prompt)?;
        match full.strip_prefix(head.as_str()) {
            Some(rest) => Ok(rest.to_string()),
            None => self.decode(generated),
        }
    }

    /// An incremental detokenizer for ids generated after `prompt`.
    pub fn decode_stream(&self, prompt: &[u32]) -> DecodeStream<'_> {
        DecodeStream::new(self, prompt)
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.inner.bos
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.inner.eos
    }

    /// Vocabulary size including added tokens (`len(tokenizer)` in transformers).
    pub fn vocab_size(&self) -> usize {
        self.inner.tok.get_vocab_size(true)
    }

    pub fn token_to_id(&self, tok: &str) -> Option<u32> {
        self.inner.tok.token_to_id(tok)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.tok.id_to_token(id)
    }

    /// Whether `id` is a `<0xXX>` byte token decoded by a `ByteFallback` decoder.
    pub fn is_byte_fallback(&self, id: u32) -> bool {
        self.inner
            .byte_fallback
            .get(id as usize)
            .copied()
            .unwrap_or(false)
    }

    /// Whether `id` is a special added token (skipped by `decode`).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner.special_ids.contains(&id)
    }
}

/// How many prompt tokens the stream keeps as left context (so that e.g. the leading space of
/// a SentencePiece token after the prompt is kept).
const STREAM_PROMPT_CONTEXT: usize = 6;
/// After this many ids without output, the longest complete part is emitted anyway (the bytes are
/// then genuinely invalid, or a very long byte-fallback run), which bounds the window.
const STREAM_MAX_PENDING: usize = 32;

/// Incremental detokenizer (vLLM-style prefix/read offsets over a small window of ids).
///
/// `step` returns the newly completed text, or `None` while the decoded tail is an incomplete
/// UTF-8 sequence (ends in U+FFFD), a byte-fallback run is still open (its bytes decode as a
/// whole), or the id produced no text (skipped special tokens). Call `flush` at the end to get
/// any held-back remainder. The concatenation of everything returned equals
/// [`LmTokenizer::continuation`]. The window holds at most
/// `STREAM_PROMPT_CONTEXT + 2 * STREAM_MAX_PENDING` ids, so each step costs O(1) decodes of a
/// bounded window, independent of the sequence length.
pub struct DecodeStream<'a> {
    tok: &'a LmTokenizer,
    /// Window of ids: `[0, read_offset)` were already emitted and serve as left context,
    /// `[read_offset, len)` are pending.
    ids: Vec<u32>,
    read_offset: usize,
    /// `decode(ids[..read_offset])`.
    prefix_text: String,
}

impl<'a> DecodeStream<'a> {
    fn new(tok: &'a LmTokenizer, prompt: &[u32]) -> Self {
        let start = prompt.len().saturating_sub(STREAM_PROMPT_CONTEXT);
        let ids = prompt[start..].to_vec();
        let prefix_text = tok.decode(&ids).unwrap_or_default();
        let read_offset = ids.len();
        Self {
            tok,
            ids,
            read_offset,
            prefix_text,
        }
    }

    /// Push one generated id; returns the text it completes, if any.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        if self.tok.is_special(id) {
            // Skipped special tokens are removed before decoding, so they never change the text
            // (and byte runs on both sides of one join up): keep them out of the window.
            return Ok(None);
        }
        self.ids.push(id);
        if self.ids.len() - self.read_offset >= STREAM_MAX_PENDING {
            return self.force();
        }
        if self.tok.is_byte_fallback(id) {
            // A run of byte-fallback tokens decodes as a whole (all U+FFFD if any byte is invalid),
            // so hold it until a non-byte token ends it.
            return Ok(None);
        }
        let new_text = self.tok.decode(&self.ids)?;
        if new_text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        if new_text.len() > self.prefix_text.len() {
            let end = self.ids.len();
            return self.emit_upto(end, new_text).map(Some);
        }
        Ok(None)
    }

    /// Push several ids; returns the concatenated new text (possibly empty).
    pub fn step_many(&mut self, ids: &[u32]) -> Result<String> {
        let mut out = String::new();
        for &id in ids {
            if let Some(s) = self.step(id)? {
                out.push_str(&s);
            }
        }
        Ok(out)
    }

    /// Emit whatever is held back (possibly ending in U+FFFD). Call at end of generation.
    pub fn flush(&mut self) -> Result<Option<String>> {
        if self.read_offset >= self.ids.len() {
            return Ok(None);
        }
        let new_text = self.tok.decode(&self.ids)?;
        let end = self.ids.len();
        let out = self.emit_upto(end, new_text)?;
        Ok(if out.is_empty() { None } else { Some(out) })
    }

    /// Number of ids currently held in the window (for tests / diagnostics).
    pub fn window_len(&self) -> usize {
        self.ids.len()
    }

    /// Too many ids pending: emit the longest pending prefix that decodes to complete text
    /// (or everything, if the bytes are genuinely invalid), keeping the window bounded.
    fn force(&mut self) -> Result<Option<String>> {
        let end = self.ids.len();
        for k in (self.read_offset + 1..=end).rev() {
            let text = self.tok.decode(&self.ids[..k])?;
            if !text.ends_with('\u{FFFD}') && text.len() > self.prefix_text.len() {
                return self.emit_upto(k, text).map(Some);
            }
        }
        let text = self.tok.decode(&self.ids)?;
        let out = self.emit_upto(end, text)?;
        Ok(if out.is_empty() { None } else { Some(out) })
    }

    /// Output the part of `new_text` (= decode of `ids[..end]`) after the already-emitted
    /// prefix, and slide the window so that `ids[..end]` counts as emitted.
    fn emit_upto(&mut self, end: usize, new_text: String) -> Result<String> {
        let out = match new_text.strip_prefix(self.prefix_text.as_str()) {
            Some(rest) => rest.to_string(),
            // The context decodes differently together with the new ids (a byte sequence that
            // spans the boundary): like `continuation`, fall back to the new ids on their own.
            None => self.tok.decode(&self.ids[self.read_offset..end])?,
        };
        let drop = self.read_offset;
        self.ids.drain(..drop);
        self.read_offset = end - drop;
        self.prefix_text = self.tok.decode(&self.ids[..self.read_offset])?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
