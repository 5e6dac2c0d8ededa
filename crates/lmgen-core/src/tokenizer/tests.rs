//! Unit tests with hand-built tokenizers (the fixture goldens are in `tests/tokenizer_golden.rs`).
use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value as GValue, VersionedMagic};
use serde_json::{json, Value};

use super::hf::{resolve_class, Class};
use super::*;

/// GPT-2's byte -> char table.
fn b2u() -> Vec<char> {
    let mut out = vec!['\0'; 256];
    let mut n = 0;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    out
}

/// vocab (all 256 byte chars + merged tokens) and merges of a tiny byte-level BPE.
fn byte_level_vocab(merges: &[(&str, &str)]) -> (serde_json::Map<String, Value>, Vec<Value>) {
    let mut vocab = serde_json::Map::new();
    for c in b2u() {
        let n = vocab.len();
        vocab.insert(c.to_string(), json!(n));
    }
    let mut m = Vec::new();
    for (a, b) in merges {
        let n = vocab.len();
        vocab.insert(format!("{a}{b}"), json!(n));
        m.push(json!([a, b]));
    }
    (vocab, m)
}

const BL_MERGES: &[(&str, &str)] = &[
    ("h", "i"),
    ("\u{120}", "w"),
    ("\u{120}w", "o"),
    ("r", "ld"),
    ("l", "d"),
    ("\u{120}wo", "rld"),
];

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

/// A GPT-2 style tokenizer.json directory with `<|endoftext|>` as a special added token.
fn gpt2_dir() -> tempfile::TempDir {
    let (vocab, merges) = byte_level_vocab(BL_MERGES);
    let eot = vocab.len();
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": eot, "content": "<|endoftext|>", "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "tokenizer.json", &tj.to_string());
    write(
        d.path(),
        "tokenizer_config.json",
        r#"{"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}"#,
    );
    write(d.path(), "config.json", r#"{"model_type": "gpt2"}"#);
    d
}

/// A Llama (SentencePiece-style BPE, byte fallback) tokenizer.json directory.
fn llama_dir() -> tempfile::TempDir {
    let mut vocab = serde_json::Map::new();
    for t in ["<unk>", "<s>", "</s>"] {
        let n = vocab.len();
        vocab.insert(t.into(), json!(n));
    }
    for b in 0..256 {
        let n = vocab.len();
        vocab.insert(format!("<0x{b:02X}>"), json!(n));
    }
    let pieces = [
        "\u{2581}",
        "H",
        "e",
        "l",
        "o",
        "w",
        "r",
        "d",
        "\u{2581}H",
        "ll",
        "llo",
        "\u{2581}He",
        "\u{2581}Hello",
        "\u{2581}w",
        "or",
        "\u{2581}wor",
        "\u{2581}worl",
        "\u{2581}world",
    ];
    for p in pieces {
        let n = vocab.len();
        vocab.insert(p.into(), json!(n));
    }
    let merges = json!([
        ["\u{2581}", "H"],
        ["l", "l"],
        ["ll", "o"],
        ["\u{2581}H", "e"],
        ["\u{2581}He", "llo"],
        ["\u{2581}", "w"],
        ["o", "r"],
        ["\u{2581}w", "or"],
        ["\u{2581}wor", "l"],
        ["\u{2581}worl", "d"]
    ]);
    let special = |id: usize, c: &str| json!({"id": id, "content": c, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    });
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "tokenizer.json", &tj.to_string());
    write(
        d.path(),
        "tokenizer_config.json",
        r#"{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_prefix_space": null}"#,
    );
    write(d.path(), "config.json", r#"{"model_type": "llama"}"#);
    d
}

fn stream_all(tok: &LmTokenizer, prompt: &[u32], gen: &[u32]) -> (Vec<Option<String>>, String) {
    let mut st = tok.decode_stream(prompt);
    let mut outs: Vec<Option<String>> = gen.iter().map(|&id| st.step(id).unwrap()).collect();
    outs.push(st.flush().unwrap());
    let text = outs.iter().flatten().cloned().collect();
    (outs, text)
}

#[test]
fn lm_tokenizer_is_send_sync_and_cheap_to_clone() {
    fn check<T: Send + Sync + Clone>() {}
    check::<LmTokenizer>();
}

#[test]
fn byte_level_roundtrip_and_specials() {
    let d = gpt2_dir();
    let tok = LmTokenizer::from_dir(d.path()).unwrap();
    let hi = tok.token_to_id("hi").unwrap();
    let world = tok.token_to_id("\u{120}world").unwrap();
    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    assert_eq!(tok.encode("hi world").unwrap(), vec![hi, world]); // GPT-2: no BOS
    assert_eq!(tok.encode("hi<|endoftext|>").unwrap(), vec![hi, eot]);
    assert_eq!(tok.bos_token_id(), Some(eot));
    assert_eq!(tok.eos_token_id(), Some(eot));
    assert_eq!(tok.vocab_size(), 256 + BL_MERGES.len() + 1);
    assert_eq!(tok.decode(&[hi, eot, world]).unwrap(), "hi world");
    assert_eq!(
        tok.decode_with_special(&[hi, eot]).unwrap(),
        "hi<|endoftext|>"
    );
    assert_eq!(tok.continuation(&[hi], &[world]).unwrap(), " world");
}

#[test]
fn multibyte_chars_split_across_byte_tokens() {
    let d = gpt2_dir();
    let tok = LmTokenizer::from_dir(d.path()).unwrap();
    let text = "hi 🙂 é東";
    let ids = tok.encode(text).unwrap();
    // The emoji is 4 byte tokens: " " + F0 9F 99 82 -> at least 4 ids after "hi".
    assert!(ids.len() > 5, "{ids:?}");
    assert_eq!(tok.decode(&ids).unwrap(), text);
    // Decoding only part of the emoji's bytes is lossy (U+FFFD), so the stream must hold it.
    let (outs, streamed) = stream_all(&tok, &ids[..1], &ids[1..]);
    assert_eq!(streamed, &text[2..]);
    assert_eq!(streamed, tok.continuation(&ids[..1], &ids[1..]).unwrap());
    for o in outs.iter().flatten() {
        assert!(!o.contains('\u{FFFD}'), "emitted a partial char: {outs:?}");
    }
    // The emoji comes out in one piece, once its 4th byte arrives.
    assert!(outs.iter().flatten().any(|o| o.contains('🙂')), "{outs:?}");
    let emoji_ids: Vec<u32> = "🙂"
        .bytes()
        .map(|b| tok.token_to_id(&b2u()[b as usize].to_string()).unwrap())
        .collect();
    let mut st = tok.decode_stream(&[]);
    assert_eq!(st.step(emoji_ids[0]).unwrap(), None);
    assert_eq!(st.step(emoji_ids[1]).unwrap(), None);
    assert_eq!(st.step(emoji_ids[2]).unwrap(), None);
    assert_eq!(st.step(emoji_ids[3]).unwrap().as_deref(), Some("🙂"));
    assert_eq!(st.flush().unwrap(), None);
    assert_eq!(tok.decode(&emoji_ids).unwrap(), "🙂");
    assert_eq!(tok.decode(&emoji_ids[..2]).unwrap(), "\u{FFFD}");
}

#[test]
fn stream_window_stays_bounded() {
    let d = gpt2_dir();
    let tok = LmTokenizer::from_dir(d.path()).unwrap();
    let eot = tok.token_to_id("<|endoftext|>").unwrap();
    let hi = tok.token_to_id("hi").unwrap();
    let lone = tok.token_to_id(&b2u()[0x80].to_string()).unwrap(); // a lone continuation byte
    let mut st = tok.decode_stream(&[hi, hi, hi, hi, hi, hi, hi, hi]);
    let mut out = String::new();
    let mut gen = Vec::new();
    for i in 0..2000 {
        let id = match i % 3 {
            0 => eot,
            1 => lone,
            _ => hi,
        };
        gen.push(id);
        if let Some(s) = st.step(id).unwrap() {
            out.push_str(&s);
        }
        assert!(
            st.window_len() <= STREAM_PROMPT_CONTEXT + 2 * STREAM_MAX_PENDING,
            "window {}",
            st.window_len()
        );
    }
    if let Some(s) = st.flush().unwrap() {
        out.push_str(&s);
    }
    assert_eq!(out, tok.continuation(&[hi], &gen).unwrap());
    // Only invalid bytes / only special tokens: still bounded, and flushed at the end.
    let mut st = tok.decode_stream(&[]);
    let mut out = String::new();
    for _ in 0..500 {
        out.push_str(&st.step(lone).unwrap().unwrap_or_default());
        st.step(eot).unwrap();
        assert!(st.window_len() <= 2 * STREAM_MAX_PENDING);
    }
    out.push_str(&st.flush().unwrap().unwrap_or_default());
    assert_eq!(out, "\u{FFFD}".repeat(500));
}

#[test]
fn sentencepiece_continuation_keeps_leading_space() {
    let d = llama_dir();
    let tok = LmTokenizer::from_dir(d.path()).unwrap();
    let hello = tok.token_to_id("\u{2581}Hello").unwrap();
    let world = tok.token_to_id("\u{2581}world").unwrap();
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.encode("Hello world").unwrap(), vec![1, hello, world]);
    assert_eq!(tok.encode("").unwrap(), vec![1]);
    assert_eq!(tok.decode(&[1, hello, world, 2]).unwrap(), "Hello world");
    assert_eq!(tok.decode(&[world]).unwrap(), "world");
    assert_eq!(tok.continuation(&[1, hello], &[world]).unwrap(), " world");
    let (_, streamed) = stream_all(&tok, &[1, hello], &[world, world, 2]);
    assert_eq!(streamed, " world world");
    // Without a prompt the first token's space is stripped, like decode().
    let (_, streamed) = stream_all(&tok, &[], &[world, hello]);
    assert_eq!(streamed, "world Hello");
}

#[test]
fn byte_fallback_runs_are_decoded_whole() {
    let d = llama_dir();
    let tok = LmTokenizer::from_dir(d.path()).unwrap();
    let hello = tok.token_to_id("\u{2581}Hello").unwrap();
    let ids = tok.encode("Hello é🙂").unwrap();
    // "▁" + bytes of é (2) and 🙂 (4) fall back to <0xXX> tokens.
    assert_eq!(ids.len(), 1 + 1 + 1 + 6, "{ids:?}");
    assert!(tok.is_byte_fallback(*ids.last().unwrap()));
    assert_eq!(tok.decode(&ids).unwrap(), "Hello é🙂");
    let (outs, streamed) = stream_all(&tok, &ids[..2], &ids[2..]);
    assert_eq!(streamed, " é🙂");
    for o in outs.iter().flatten() {
        assert!(!o.contains('\u{FFFD}'), "{outs:?}");
    }
    // A valid byte run followed by an invalid byte decodes all to U+FFFD: the stream agrees.
    let r = tok.token_to_id("<0x52>").unwrap();
    let bad = tok.token_to_id("<0x82>").unwrap();
    let gen = [r, bad, hello];
    let (_, streamed) = stream_all(&tok, &ids[..2], &gen);
    assert_eq!(streamed, tok.continuation(&ids[..2], &gen).unwrap());
    assert_eq!(streamed, "\u{FFFD}\u{FFFD} Hello");
}

#[test]
fn llama_class_rebuilds_legacy_tokenizer_json() {
    // A legacy Llama tokenizer.json (Prepend/Replace normalizer, no pre-tokenizer): transformers 5's
    // LlamaTokenizer replaces it with Metaspace(prepend_scheme="first").
    let d = llama_dir();
    let p = d.path().join("tokenizer.json");
    let mut tj: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    tj["normalizer"] = json!({"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u{2581}"},
        {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]});
    tj["pre_tokenizer"] = Value::Null;
    std::fs::write(&p, tj.to_string()).unwrap();
    let tok = LmTokenizer::from_dir(d.path()).unwrap();
    let hello = tok.token_to_id("\u{2581}Hello").unwrap();
    let h = tok.token_to_id("H").unwrap();
    // "first": only the text at the very start gets the ▁ prefix, not the piece after </s>.
    let ids = tok.encode("Hello</s>Hello").unwrap();
    assert_eq!(&ids[..3], &[1, hello, 2]);
    assert_eq!(ids[3], h);
}

#[test]
fn slow_tokenizer_files_opt_style() {
    let (mut vocab, merges) = byte_level_vocab(BL_MERGES);
    for t in ["<s>", "<pad>", "</s>", "<unk>"] {
        let n = vocab.len();
        vocab.insert(t.into(), json!(n));
    }
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "vocab.json",
        &Value::Object(vocab.clone()).to_string(),
    );
    let mut mt = String::from("#version: 0.2\n");
    for m in &merges {
        mt.push_str(&format!(
            "{} {}\n",
            m[0].as_str().unwrap(),
            m[1].as_str().unwrap()
        ));
    }
    write(d.path(), "merges.txt", &mt);
    write(
        d.path(),
        "tokenizer_config.json",
        r#"{"add_bos_token": true, "add_prefix_space": false, "tokenizer_class": "GPT2Tokenizer",
            "bos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": false, "normalized": true, "rstrip": false, "single_word": false},
            "eos_token": "</s>", "unk_token": "</s>", "pad_token": "<pad>"}"#,
    );
    let tok = LmTokenizer::from_dir(d.path()).unwrap();
    let eos = vocab["</s>"].as_u64().unwrap() as u32;
    let hi = tok.token_to_id("hi").unwrap();
    let world = tok.token_to_id("\u{120}world").unwrap();
    assert_eq!(tok.bos_token_id(), Some(eos));
    assert_eq!(tok.encode("hi world").unwrap(), vec![eos, hi, world]);
    assert_eq!(tok.encode("hi</s>").unwrap(), vec![eos, hi, eos]);
    assert_eq!(tok.decode(&[eos, hi, world]).unwrap(), "hi world");
    assert_eq!(tok.vocab_size(), vocab.len());

    // add_bos_token false (GPT-2 default): no BOS.
    write(
        d.path(),
        "tokenizer_config.json",
        r#"{"tokenizer_class": "GPT2Tokenizer", "bos_token": "</s>"}"#,
    );
    let tok = LmTokenizer::from_dir(d.path()).unwrap();
    assert_eq!(tok.encode("hi world").unwrap(), vec![hi, world]);

    // A malformed merges line is a one-line BadTokenizer error naming the file.
    write(d.path(), "merges.txt", "#version: 0.2\nh i\nthis is bad\n");
    let e = LmTokenizer::from_dir(d.path()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::BadTokenizer { .. }), "{msg}");
    assert!(
        msg.contains("merges.txt") && msg.contains("line 3") && !msg.contains('\n'),
        "{msg}"
    );
}

#[test]
fn bad_files_are_bad_tokenizer_errors() {
    let d = tempfile::tempdir().unwrap();
    let e = LmTokenizer::from_dir(d.path()).unwrap_err();
    assert!(matches!(e, Error::BadTokenizer { .. }), "{e}");

    write(d.path(), "tokenizer.model", "\u{0}\u{1}binary");
    let e = LmTokenizer::from_dir(d.path()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::BadTokenizer { .. }), "{msg}");
    assert!(
        msg.contains("tokenizer.model") && msg.contains("SentencePiece") && !msg.contains('\n'),
        "{msg}"
    );

    write(
        d.path(),
        "tokenizer.json",
        "{\"version\": \"1.0\",\n \"model\": ",
    );
    let e = LmTokenizer::from_dir(d.path()).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, Error::BadTokenizer { .. })
            && msg.contains("tokenizer.json")
            && !msg.contains('\n'),
        "{msg}"
    );

    write(
        d.path(),
        "tokenizer.json",
        r#"{"version": "1.0", "model": {"type": "BPE", "vocab": 3}}"#,
    );
    let e = LmTokenizer::from_dir(d.path()).unwrap_err();
    assert!(matches!(e, Error::BadTokenizer { .. }), "{e}");

    std::fs::write(d.path().join("tokenizer.json"), [0xffu8, 0xfe, 0x00]).unwrap();
    let e = LmTokenizer::from_dir(d.path()).unwrap_err();
    assert!(matches!(e, Error::BadTokenizer { .. }), "{e}");

    let gd = gpt2_dir();
    write(gd.path(), "tokenizer_config.json", "[1, 2");
    let e = LmTokenizer::from_dir(gd.path()).unwrap_err();
    assert!(e.to_string().contains("tokenizer_config.json"), "{e}");
}

#[test]
fn class_resolution_follows_transformers() {
    let bl = Some(r#"{"pre_tokenizer": {"type": "ByteLevel"}}"#);
    let sp = Some(r#"{"pre_tokenizer": {"type": "Metaspace"}}"#);
    assert_eq!(
        resolve_class(Some("GPT2Tokenizer"), Some("gpt2"), bl),
        Class::Gpt2
    );
    assert_eq!(resolve_class(None, Some("gpt2"), bl), Class::Gpt2);
    assert_eq!(
        resolve_class(Some("GPT2Tokenizer"), Some("opt"), bl),
        Class::Gpt2
    );
    assert_eq!(
        resolve_class(Some("PreTrainedTokenizerFast"), Some("opt"), bl),
        Class::Backend
    ); // Galactica
    assert_eq!(
        resolve_class(Some("GPTNeoXTokenizerFast"), Some("gpt_neox"), bl),
        Class::GptNeoX
    );
    assert_eq!(
        resolve_class(Some("BloomTokenizerFast"), Some("bloom"), bl),
        Class::Backend
    );
    assert_eq!(
        resolve_class(Some("LlamaTokenizerFast"), Some("llama"), sp),
        Class::Llama
    );
    assert_eq!(
        resolve_class(Some("LlamaTokenizer"), Some("llama"), bl),
        Class::Backend
    ); // Llama 3
    assert_eq!(
        resolve_class(Some("LlamaTokenizer"), Some("mistral"), sp),
        Class::Backend
    );
    assert_eq!(
        resolve_class(Some("GPT2Tokenizer"), Some("llama"), bl),
        Class::Gpt2
    ); // SmolLM2
    assert_eq!(
        resolve_class(Some("Qwen2Tokenizer"), Some("qwen2"), bl),
        Class::Qwen2
    );
    assert_eq!(
        resolve_class(Some("PreTrainedTokenizerFast"), Some("qwen2"), bl),
        Class::Qwen2
    );
    assert_eq!(
        resolve_class(Some("PreTrainedTokenizerFast"), Some("llama"), bl),
        Class::Backend
    );
    assert_eq!(resolve_class(None, None, bl), Class::Backend);
}

fn gstr(s: &str) -> GValue {
    GValue::String(s.to_string())
}

fn content(md: Vec<(&str, GValue)>) -> Content {
    Content {
        magic: VersionedMagic::GgufV3,
        metadata: md
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<HashMap<_, _>>(),
        tensor_infos: HashMap::new(),
        tensor_data_offset: 0,
    }
}

#[test]
fn gguf_byte_level_smollm_style() {
    let table = b2u();
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    tokens.extend(table.iter().map(|c| c.to_string()));
    let merges = [("h", "i"), ("\u{120}", "w"), ("\u{120}", "1"), ("1", "2")];
    for (a, b) in merges {
        tokens.push(format!("{a}{b}"));
    }
    let mut types = vec![GValue::I32(3); 3];
    types.extend(std::iter::repeat_n(GValue::I32(1), tokens.len() - 3));
    let md = |pre: &str, add_bos: Option<bool>| {
        let mut v = vec![
            ("tokenizer.ggml.model", gstr("gpt2")),
            ("tokenizer.ggml.pre", gstr(pre)),
            (
                "tokenizer.ggml.tokens",
                GValue::Array(tokens.iter().map(|t| gstr(t)).collect()),
            ),
            ("tokenizer.ggml.token_type", GValue::Array(types.clone())),
            (
                "tokenizer.ggml.merges",
                GValue::Array(
                    merges
                        .iter()
                        .map(|(a, b)| gstr(&format!("{a} {b}")))
                        .collect(),
                ),
            ),
            ("tokenizer.ggml.bos_token_id", GValue::U32(1)),
            ("tokenizer.ggml.eos_token_id", GValue::U32(2)),
            ("tokenizer.ggml.unknown_token_id", GValue::U32(0)),
        ];
        if let Some(b) = add_bos {
            v.push(("tokenizer.ggml.add_bos_token", GValue::Bool(b)));
        }
        content(v)
    };
    let path = Path::new("model.gguf");
    let tok = LmTokenizer::from_gguf(&md("smollm", None), path).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.vocab_size(), tokens.len());
    // smollm splits digits: "12" is never merged, " 1" neither (the space stands alone).
    assert_eq!(
        tok.encode("hi 12").unwrap(),
        vec![id("hi"), id("\u{120}"), id("1"), id("2")]
    );
    assert_eq!(
        tok.encode("<|im_start|>hi<|im_end|>").unwrap(),
        vec![1, id("hi"), 2]
    );
    assert_eq!(tok.decode(&[1, id("hi"), 2]).unwrap(), "hi");
    // gpt2 pre-tokenizer: digits merge.
    let tok2 = LmTokenizer::from_gguf(&md("gpt2", Some(true)), path).unwrap();
    assert_eq!(
        tok2.encode("hi 12").unwrap(),
        vec![1, id("hi"), id("\u{120}1"), id("2")]
    );
    // llama-bpe defaults to BOS and uses the Llama 3 regex (digits in groups of up to 3).
    let tok3 = LmTokenizer::from_gguf(&md("llama-bpe", None), path).unwrap();
    assert_eq!(
        tok3.encode("hi 12").unwrap(),
        vec![1, id("hi"), id("\u{120}"), id("12")]
    );
    // Unknown pre-tokenizer names fall back to llama.cpp's default.
    let tok4 = LmTokenizer::from_gguf(&md("something-new", None), path).unwrap();
    assert_eq!(
        tok4.decode(&tok4.encode("hi 12, wow!").unwrap()).unwrap(),
        "hi 12, wow!"
    );
    let tok5 = LmTokenizer::from_gguf(&md("qwen2", None), path).unwrap();
    assert_eq!(
        tok5.encode("hi 12").unwrap(),
        vec![id("hi"), id("\u{120}"), id("1"), id("2")]
    );

    // Bad metadata: clear one-line errors naming the file.
    let e = LmTokenizer::from_gguf(&content(vec![("tokenizer.ggml.model", gstr("bert"))]), path)
        .unwrap_err();
    assert!(
        matches!(e, Error::BadTokenizer { .. }) && e.to_string().contains("model.gguf"),
        "{e}"
    );
    let e = LmTokenizer::from_gguf(&content(vec![]), path).unwrap_err();
    assert!(matches!(e, Error::BadTokenizer { .. }), "{e}");
    let bad = content(vec![
        ("tokenizer.ggml.model", gstr("gpt2")),
        (
            "tokenizer.ggml.tokens",
            GValue::Array(vec![gstr("a"), GValue::U8(1)]),
        ),
    ]);
    assert!(matches!(
        LmTokenizer::from_gguf(&bad, path).unwrap_err(),
        Error::BadTokenizer { .. }
    ));
    let bad = content(vec![
        ("tokenizer.ggml.model", gstr("gpt2")),
        (
            "tokenizer.ggml.tokens",
            GValue::Array(vec![gstr("a"), gstr("b")]),
        ),
        ("tokenizer.ggml.merges", GValue::Array(vec![gstr("a c")])),
    ]);
    let e = LmTokenizer::from_gguf(&bad, path).unwrap_err();
    assert!(e.to_string().contains("merges[0]"), "{e}");
}

#[test]
fn gguf_sentencepiece_llama_style() {
    let mut tokens: Vec<(String, f32, i32)> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<s>".into(), 0.0, 3),
        ("</s>".into(), 0.0, 3),
    ];
    for b in 0..256 {
        tokens.push((format!("<0x{b:02X}>"), 0.0, 6));
    }
    let pieces: [(&str, f32); 12] = [
        ("\u{2581}", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("ll", -3.0),
        ("he", -4.0),
        ("llo", -5.0),
        ("hello", -6.0),
        ("\u{2581}hello", -7.0),
        ("\u{2581}h", -8.0),
        ("\u{2581}he", -9.0),
    ];
    for (p, s) in pieces {
        tokens.push((p.into(), s, 1));
    }
    let md = content(vec![
        ("tokenizer.ggml.model", gstr("llama")),
        (
            "tokenizer.ggml.tokens",
            GValue::Array(tokens.iter().map(|t| gstr(&t.0)).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            GValue::Array(tokens.iter().map(|t| GValue::F32(t.1)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            GValue::Array(tokens.iter().map(|t| GValue::I32(t.2)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id", GValue::U32(1)),
        ("tokenizer.ggml.eos_token_id", GValue::U32(2)),
        ("tokenizer.ggml.unknown_token_id", GValue::U32(0)),
    ]);
    let tok = LmTokenizer::from_gguf(&md, Path::new("spm.gguf")).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    // BOS by default; merges recovered from scores: "hello" -> ▁hello.
    assert_eq!(tok.encode("hello").unwrap(), vec![1, id("\u{2581}hello")]);
    assert_eq!(
        tok.encode("hello hello").unwrap(),
        vec![1, id("\u{2581}hello"), id("\u{2581}hello")]
    );
    // Unknown chars fall back to bytes.
    let ids = tok.encode("hé").unwrap();
    assert_eq!(ids, vec![1, id("\u{2581}h"), id("<0xC3>"), id("<0xA9>")]);
    assert_eq!(tok.decode(&ids).unwrap(), "hé");
    assert_eq!(
        tok.continuation(&[1, id("\u{2581}hello")], &[id("\u{2581}hello")])
            .unwrap(),
        " hello"
    );
    let (_, s) = stream_all(&tok, &[1, id("\u{2581}hello")], &[id("\u{2581}hello"), 2]);
    assert_eq!(s, " hello");
}

// ---- SentencePiece `tokenizer.model` ----

/// Protobuf encoding helpers for hand-made `tokenizer.model` files.
fn pb_varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn pb_key(out: &mut Vec<u8>, field: u64, wire: u64) {
    pb_varint(out, (field << 3) | wire);
}

fn pb_bytes(out: &mut Vec<u8>, field: u64, b: &[u8]) {
    pb_key(out, field, 2);
    pb_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn pb_int(out: &mut Vec<u8>, field: u64, v: i64) {
    pb_key(out, field, 0);
    pb_varint(out, v as u64);
}

/// A BPE `ModelProto`: pieces (text, score, type), byte fallback, dummy prefix, plus unknown
/// fields of every wire type (which readers must skip).
fn spm_proto(pieces: &[(&str, f32, i64)]) -> Vec<u8> {
    let mut out = Vec::new();
    pb_bytes(&mut out, 99, b"unknown top-level field");
    for (p, score, ty) in pieces {
        let mut m = Vec::new();
        pb_bytes(&mut m, 1, p.as_bytes());
        pb_key(&mut m, 2, 5);
        m.extend_from_slice(&score.to_le_bytes());
        if *ty != 1 {
            pb_int(&mut m, 3, *ty);
        }
        pb_bytes(&mut out, 1, &m);
    }
    let mut t = Vec::new();
    pb_bytes(&mut t, 2, b"prefix"); // model_prefix
    pb_int(&mut t, 3, 2); // BPE
    pb_key(&mut t, 10, 5); // character_coverage (fixed32)
    t.extend_from_slice(&1.0f32.to_le_bytes());
    pb_key(&mut t, 11, 1); // a fixed64 field
    t.extend_from_slice(&7u64.to_le_bytes());
    pb_int(&mut t, 35, 1); // byte_fallback
    pb_int(&mut t, 43, -1); // pad_id: negative int32, 10-byte varint
    pb_bytes(&mut out, 2, &t);
    let mut n = Vec::new();
    pb_bytes(&mut n, 1, b"identity");
    pb_int(&mut n, 3, 1); // add_dummy_prefix
    pb_int(&mut n, 4, 0); // remove_extra_whitespaces
    pb_bytes(&mut out, 3, &n);
    out
}

fn spm_pieces() -> Vec<(String, f32, i64)> {
    let mut v: Vec<(String, f32, i64)> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<s>".into(), 0.0, 3),
        ("</s>".into(), 0.0, 3),
        ("<|user|>".into(), 0.0, 4),
    ];
    for b in 0..256 {
        v.push((format!("<0x{b:02X}>"), 0.0, 6));
    }
    for (i, p) in [
        "\u{2581}h",
        "el",
        "lo",
        "\u{2581}hel",
        "\u{2581}hello",
        "\u{2581}",
        "h",
        "e",
        "l",
        "o",
    ]
    .iter()
    .enumerate()
    {
        v.push((p.to_string(), -(i as f32), 1));
    }
    v
}

fn spm_dir(config: &str, model_type: Option<&str>) -> tempfile::TempDir {
    let pieces = spm_pieces();
    let refs: Vec<(&str, f32, i64)> = pieces
        .iter()
        .map(|(p, s, t)| (p.as_str(), *s, *t))
        .collect();
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("tokenizer.model"), spm_proto(&refs)).unwrap();
    write(d.path(), "tokenizer_config.json", config);
    if let Some(mt) = model_type {
        write(
            d.path(),
            "config.json",
            &format!(r#"{{"model_type": "{mt}"}}"#),
        );
    }
    d
}

#[test]
fn sentencepiece_proto_reader() {
    let pieces = spm_pieces();
    let refs: Vec<(&str, f32, i64)> = pieces
        .iter()
        .map(|(p, s, t)| (p.as_str(), *s, *t))
        .collect();
    let m = spm::SpmModel::parse(&spm_proto(&refs)).unwrap();
    assert_eq!(m.pieces.len(), pieces.len());
    assert_eq!(m.pieces[3].piece, "<|user|>");
    assert_eq!(m.pieces[3].kind, 4);
    assert_eq!(m.pieces[260 + 4].score, -4.0);
    assert_eq!(m.trainer.model_type, 2);
    assert!(m.trainer.byte_fallback);
    // Defaults for what the file leaves out.
    assert_eq!(
        (m.trainer.unk_id, m.trainer.bos_id, m.trainer.eos_id),
        (0, 1, 2)
    );
    assert_eq!(m.trainer.bos_piece, "<s>");
    assert!(m.normalizer.add_dummy_prefix && m.normalizer.escape_whitespaces);
    assert!(!m.normalizer.remove_extra_whitespaces);

    // Malformed input: each is a one-line message.
    let mut group = Vec::new();
    pb_key(&mut group, 1, 3); // start-group wire type
    let mut long_varint = Vec::new();
    pb_key(&mut long_varint, 1, 0);
    long_varint.extend_from_slice(&[0xff; 11]);
    let mut bad_utf8 = Vec::new();
    let mut piece = Vec::new();
    pb_bytes(&mut piece, 1, &[0xc3, 0x28]);
    pb_bytes(&mut bad_utf8, 1, &piece);
    let mut piece_as_int = Vec::new();
    pb_int(&mut piece_as_int, 1, 5);
    for (bytes, want) in [
        (vec![], "no pieces"),
        (vec![0u8, 1], "field number 0"),
        (group, "wire type 3"),
        (long_varint, "varint"),
        (bad_utf8, "UTF-8"),
        (piece_as_int, "wrong wire type"),
        (b"IQ== 0\nIg== 1\n".to_vec(), ""), // a tiktoken file
        (vec![0x0a, 0x05, 0x0a], "truncated"),
    ] {
        let e = spm::SpmModel::parse(&bytes).unwrap_err();
        assert!(e.contains("not a valid SentencePiece model"), "{e}");
        assert!(e.contains(want) && !e.contains('\n'), "{e}");
    }
}

#[test]
fn sentencepiece_llama_class() {
    let d = spm_dir(
        r#"{"tokenizer_class": "LlamaTokenizer", "add_bos_token": true, "legacy": false}"#,
        None,
    );
    let tok = LmTokenizer::from_dir(d.path()).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_id(), Some(2));
    assert_eq!(tok.encode("hello").unwrap(), vec![1, id("\u{2581}hello")]);
    // The user-defined piece is an added (not special) token; the text after it gets no prefix.
    let ids = tok.encode("hello<|user|>hello").unwrap();
    assert_eq!(ids[..3], [1, id("\u{2581}hello"), 3]);
    assert!(!tok.is_special(3) && tok.is_special(1));
    assert_eq!(tok.decode(&ids).unwrap(), "hello<|user|>hello");
    // Byte fallback for what the vocabulary lacks.
    let ids = tok.encode("hé").unwrap();
    assert_eq!(ids, vec![1, id("\u{2581}h"), id("<0xC3>"), id("<0xA9>")]);
    assert_eq!(tok.decode(&ids).unwrap(), "hé");
    // add_bos_token defaults to false, as in transformers 5.
    let d = spm_dir(r#"{"tokenizer_class": "LlamaTokenizer"}"#, None);
    let tok = LmTokenizer::from_dir(d.path()).unwrap();
    assert_eq!(
        tok.encode("hello").unwrap(),
        vec![tok.token_to_id("\u{2581}hello").unwrap()]
    );
}

#[test]
fn sentencepiece_backend_route() {
    // model_type mistral: built from the proto itself; legacy defaults to true.
    let d = spm_dir(
        r#"{"tokenizer_class": "LlamaTokenizer", "add_bos_token": true}"#,
        Some("mistral"),
    );
    let tok = LmTokenizer::from_dir(d.path()).unwrap();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    assert_eq!(
        tok.encode("hello hello").unwrap(),
        vec![1, id("\u{2581}hello"), id("\u{2581}hello")]
    );
    // Legacy: a text that starts with "▁" keeps its own "▁" after the dummy prefix.
    let ids = tok.encode("\u{2581}hello").unwrap();
    assert_eq!(ids, vec![1, id("\u{2581}"), id("\u{2581}hello")]);
    assert_eq!(tok.decode(&ids).unwrap(), " hello");
    // User-defined pieces are split off by the pre-tokenizer.
    let ids = tok.encode("hello<|user|>").unwrap();
    assert_eq!(ids, vec![1, id("\u{2581}hello"), 3]);
}

#[test]
fn tokenizer_json_is_preferred_over_tokenizer_model() {
    let d = llama_dir();
    write(d.path(), "tokenizer.model", "not a SentencePiece model");
    let tok = LmTokenizer::from_dir(d.path()).unwrap();
    assert!(
        tok.source().ends_with("tokenizer.json"),
        "{:?}",
        tok.source()
    );
    let hello = tok.token_to_id("\u{2581}Hello").unwrap();
    assert_eq!(tok.encode("Hello").unwrap(), vec![1, hello]);
}

#[test]
fn sentencepiece_bad_files_are_one_line_errors() {
    let d = spm_dir(r#"{"tokenizer_class": "LlamaTokenizer"}"#, None);
    let path = d.path().join("tokenizer.model");
    let bytes = std::fs::read(&path).unwrap();
    // Every strict prefix of a model is rejected by the parser.
    for cut in 0..bytes.len() {
        assert!(spm::SpmModel::parse(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    let garbage: Vec<u8> = (0u32..4096)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for content in [
        bytes[..bytes.len() / 2].to_vec(),
        bytes[..bytes.len() - 1].to_vec(),
        Vec::new(),
        b"hello world".to_vec(),
        garbage,
    ] {
        std::fs::write(&path, &content).unwrap();
        let e = LmTokenizer::from_dir(d.path()).unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, Error::BadTokenizer { .. }) && e.is_user_error(),
            "{msg}"
        );
        assert!(
            msg.contains("tokenizer.model")
                && msg.contains("not a valid SentencePiece model")
                && !msg.contains('\n'),
            "{msg}"
        );
    }
    // A class that cannot use tokenizer.model.
    std::fs::write(&path, &bytes).unwrap();
    write(
        d.path(),
        "tokenizer_config.json",
        r#"{"tokenizer_class": "GPT2Tokenizer"}"#,
    );
    let e = LmTokenizer::from_dir(d.path()).unwrap_err();
    assert!(matches!(e, Error::BadTokenizer { .. }), "{e}");
    // add_bos_token with a BOS that is not in the vocabulary.
    write(
        d.path(),
        "tokenizer_config.json",
        r#"{"tokenizer_class": "LlamaTokenizer", "add_bos_token": true, "bos_token": null}"#,
    );
    let tok = LmTokenizer::from_dir(d.path()).unwrap();
    assert_eq!(tok.bos_token_id(), None);
}
