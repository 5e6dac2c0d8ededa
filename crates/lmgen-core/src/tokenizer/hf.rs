//! Loading a Hugging Face model directory the way `transformers` 5 `AutoTokenizer` does.
//!
//! transformers 5 picks a tokenizer class (from `tokenizer_config.json`'s `tokenizer_class` and
//! `config.json`'s `model_type`), and the model-specific classes (`GPT2Tokenizer`,
//! `LlamaTokenizer`, `GPTNeoXTokenizer`, `Qwen2Tokenizer`) rebuild the normalizer,
//! pre-tokenizer, decoder and BPE options themselves, keeping only vocab, merges and the
//! post-processor of `tokenizer.json`. Other classes (`PreTrainedTokenizerFast`, BLOOM,
//! Mistral, ...) use `tokenizer.json` as is. Special tokens named in `tokenizer_config.json`
//! (or `special_tokens_map.json`) are then added as special tokens when missing.
use std::path::Path;

use serde_json::{json, Map, Value};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

use super::{bad, LmTokenizer};
use crate::error::{Error, Result};

/// Added tokens with the ids they were declared with.
type AddedList = Vec<(u32, AddedToken)>;

/// The tokenizer classes whose behaviour we reproduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Class {
    /// `TokenizersBackend` / `PreTrainedTokenizerFast`: `tokenizer.json` as is.
    Backend,
    Gpt2,
    Llama,
    GptNeoX,
    Qwen2,
    /// `GemmaTokenizer`; only its `tokenizer.model` conversion is reproduced (a `tokenizer.json`
    /// is used as is).
    Gemma,
}

const SPECIAL_ATTRS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// `transformers.models.auto.tokenization_auto.TOKENIZER_MAPPING_NAMES` for the model types we
/// care about. `None`: no registered class.
pub(super) fn registered_class(model_type: &str) -> Option<&'static str> {
    Some(match model_type {
        "gpt2" | "gpt_neo" | "gptj" | "opt" | "codegen" | "phi" | "starcoder2" | "dbrx" => {
            "GPT2Tokenizer"
        }
        "gpt_neox" | "mpt" | "olmo" | "olmoe" | "mamba" | "mamba2" | "falcon_mamba" | "rwkv" => {
            "GPTNeoXTokenizer"
        }
        "qwen2" | "qwen2_moe" | "qwen3" | "qwen3_moe" | "qwen3_next" | "qwen2_vl"
        | "qwen2_5_vl" => "Qwen2Tokenizer",
        "mistral" | "mixtral" | "ministral" | "mistral3" | "phi3" | "phimoe" | "stablelm"
        | "gpt_bigcode" | "granite" | "olmo2" | "olmo3" | "glm" | "glm4" | "persimmon"
        | "nemotron" | "internlm2" | "internlm3" | "jamba" | "arctic" => "TokenizersBackend",
        "roberta" | "bart" => "RobertaTokenizer",
        "gemma" | "gemma2" | "gemma3" | "gemma3_text" | "gemma3n" | "gemma3n_text" => {
            "GemmaTokenizer"
        }
        _ => return None,
    })
}

pub(super) fn incorrect_hub_class(model_type: &str) -> bool {
    matches!(
        model_type,
        "qwen2"
            | "phi3"
            | "phimoe"
            | "internlm2"
            | "internlm3"
            | "nemotron"
            | "jamba"
            | "arctic"
            | "minicpm3"
    )
}

/// The class a name resolves to (`tokenizer_class_from_name`, "Fast" suffix ignored).
/// Unknown names fall back to the backend (tokenizer.json as is).
fn class_from_name(name: &str) -> Class {
    match name.strip_suffix("Fast").unwrap_or(name) {
        "GPT2Tokenizer" => Class::Gpt2,
        "LlamaTokenizer" => Class::Llama,
        "GPTNeoXTokenizer" => Class::GptNeoX,
        "Qwen2Tokenizer" => Class::Qwen2,
        "GemmaTokenizer" => Class::Gemma,
        _ => Class::Backend,
    }
}

pub(super) fn is_backend_name(name: &str) -> bool {
    matches!(
        name.strip_suffix("Fast").unwrap_or(name),
        "TokenizersBackend" | "PythonBackend" | "PreTrainedTokenizer" | "MistralCommonBackend"
    )
}

/// Emulates `AutoTokenizer.from_pretrained`'s choice of class.
pub(super) fn resolve_class(
    hub: Option<&str>,
    model_type: Option<&str>,
    tokenizer_json_text: Option<&str>,
) -> Class {
    let mt = model_type.unwrap_or("");
    let reg = registered_class(mt);
    let strip = |s: &str| s.strip_suffix("Fast").unwrap_or(s).to_string();
    if let Some(h) = hub {
        // Hub says LlamaTokenizer but ships a byte-level tokenizer.json (Llama 3 style).
        if strip(h) == "LlamaTokenizer"
            && !incorrect_hub_class(mt)
            && tokenizer_json_text.is_some_and(|t| t.contains("\"ByteLevel\""))
        {
            return Class::Backend;
        }
        if let Some(r) = reg {
            if strip(r) != strip(h) {
                if !is_backend_name(r) {
                    let name = if incorrect_hub_class(mt) { r } else { h };
                    let c = class_from_name(name);
                    if c != Class::Backend {
                        return c;
                    }
                }
                return Class::Backend;
            }
        }
        return class_from_name(h);
    }
    match reg {
        Some(r) => class_from_name(r),
        None => Class::Backend,
    }
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|_| bad(path, "not valid UTF-8"))
}

fn read_json(path: &Path) -> Result<Value> {
    let text = read_text(path)?;
    serde_json::from_str(&text).map_err(|e| bad(path, format!("invalid JSON: {e}")))
}

fn read_json_obj_opt(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    match read_json(path)? {
        Value::Object(m) => Ok(Some(m)),
        _ => Err(bad(path, "expected a JSON object")),
    }
}

/// An added token as transformers' `AddedToken(**dict)` builds it.
pub(super) fn added_token_from_value(v: &Value, force_special: Option<bool>) -> Option<AddedToken> {
    match v {
        Value::String(s) => Some(AddedToken::from(s.clone(), force_special.unwrap_or(true))),
        Value::Object(m) => {
            let content = m.get("content")?.as_str()?.to_string();
            let special = force_special
                .unwrap_or_else(|| m.get("special").and_then(Value::as_bool).unwrap_or(false));
            let flag = |k: &str, d: bool| m.get(k).and_then(Value::as_bool).unwrap_or(d);
            let mut t = AddedToken::from(content, special);
            t.single_word = flag("single_word", false);
            t.lstrip = flag("lstrip", false);
            t.rstrip = flag("rstrip", false);
            t.normalized = flag("normalized", !special);
            Some(t)
        }
        _ => None,
    }
}

pub(super) fn token_content(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(m) => m.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Class-specific defaults for named special tokens (constructor defaults).
fn class_default(class: Class, attr: &str) -> Option<&'static str> {
    match (class, attr) {
        (Class::Gpt2, "bos_token" | "eos_token" | "unk_token") => Some("<|endoftext|>"),
        (Class::GptNeoX, "bos_token" | "eos_token" | "unk_token") => Some("<|endoftext|>"),
        (Class::GptNeoX, "pad_token") => Some("<|padding|>"),
        (Class::Qwen2, "eos_token" | "unk_token" | "pad_token") => Some("<|endoftext|>"),
        (Class::Llama, "unk_token") => Some("<unk>"),
        (Class::Llama, "bos_token") => Some("<s>"),
        (Class::Llama, "eos_token") => Some("</s>"),
        (Class::Gemma, "unk_token") => Some("<unk>"),
        (Class::Gemma, "bos_token") => Some("<bos>"),
        (Class::Gemma, "eos_token") => Some("<eos>"),
        (Class::Gemma, "pad_token") => Some("<pad>"),
        (Class::Gemma, "mask_token") => Some("<mask>"),
        _ => None,
    }
}

/// Special-token information gathered from `tokenizer_config.json` / `special_tokens_map.json`.
#[derive(Default)]
pub(super) struct SpecialTokens {
    /// Named tokens (bos, eos, ...), model-specific `*_token`s and extra special tokens.
    pub named: Vec<(String, Value)>,
    /// `added_tokens_decoder` (or its legacy equivalents), sorted by id.
    pub added: Vec<(u32, AddedToken)>,
}

impl SpecialTokens {
    fn get(&self, attr: &str) -> Option<String> {
        self.named
            .iter()
            .find(|(k, _)| k == attr)
            .and_then(|(_, v)| token_content(v))
    }
}

fn push_extra(out: &mut Vec<(String, Value)>, key: &str, v: &Value) {
    match v {
        Value::Array(items) => {
            for it in items {
                out.push((format!("{key}[]"), it.clone()));
            }
        }
        Value::Object(m) if !m.contains_key("content") => {
            for (k, it) in m {
                out.push((k.clone(), it.clone()));
            }
        }
        Value::Null => {}
        other => out.push((key.to_string(), other.clone())),
    }
}

/// Collect special tokens like `PreTrainedTokenizerBase._from_pretrained` + the class constructor.
pub(super) fn collect_special(
    class: Class,
    cfg: Option<&Map<String, Value>>,
    stm: Option<&Map<String, Value>>,
    legacy_added: Vec<(u32, AddedToken)>,
) -> SpecialTokens {
    let empty = Map::new();
    let cfg = cfg.unwrap_or(&empty);
    let mut kw: Map<String, Value> = cfg.clone();
    let mut added: Vec<(u32, AddedToken)> = Vec::new();
    if let Some(Value::Object(dec)) = cfg.get("added_tokens_decoder") {
        for (id, v) in dec {
            if let (Ok(id), Some(t)) = (id.parse::<u32>(), added_token_from_value(v, None)) {
                added.push((id, t));
            }
        }
    } else {
        if let Some(stm) = stm {
            for (k, v) in stm {
                kw.insert(k.clone(), v.clone());
            }
        }
        added = legacy_added;
    }
    added.sort_by_key(|(id, _)| *id);

    let mut named: Vec<(String, Value)> = Vec::new();
    for attr in SPECIAL_ATTRS {
        match kw.get(attr) {
            Some(Value::Null) => {}
            Some(v @ (Value::String(_) | Value::Object(_))) => {
                named.push((attr.to_string(), v.clone()))
            }
            Some(_) => {}
            None => {
                if let Some(d) = class_default(class, attr) {
                    named.push((attr.to_string(), Value::String(d.to_string())));
                }
            }
        }
    }
    // Model-specific `*_token` keys (e.g. `image_token`) are special tokens too.
    for (k, v) in &kw {
        let is_token = matches!(v, Value::String(_))
            || matches!(v, Value::Object(m) if m.contains_key("content"));
        if k.ends_with("_token") && !SPECIAL_ATTRS.contains(&k.as_str()) && is_token {
            named.push((k.clone(), v.clone()));
        }
    }
    for key in ["extra_special_tokens", "additional_special_tokens"] {
        if let Some(v) = kw.get(key) {
            push_extra(&mut named, key, v);
        }
    }
    SpecialTokens { named, added }
}

/// Add tokens the way `TokenizersBackend.__init__` does: `added_tokens_decoder` entries (Rust
/// skips identical ones), then named special tokens that are not added tokens yet.
fn add_special_tokens(
    tok: &mut Tokenizer,
    sp: &SpecialTokens,
    class: Class,
    path: &Path,
) -> Result<()> {
    let added: Vec<AddedToken> = sp.added.iter().map(|(_, t)| t.clone()).collect();
    if !added.is_empty() {
        tok.add_tokens(added).map_err(|e| bad(path, e))?;
    }
    let present: std::collections::HashSet<String> = tok
        .get_added_tokens_decoder()
        .values()
        .map(|t| t.content.clone())
        .collect();
    let mut extra = Vec::new();
    for (_, v) in &sp.named {
        if let Some(c) = token_content(v) {
            if !present.contains(&c) && !extra.iter().any(|t: &AddedToken| t.content == c) {
                if let Some(t) = added_token_from_value(v, Some(true)) {
                    extra.push(t);
                }
            }
        }
    }
    if !extra.is_empty() {
        tok.add_tokens(extra).map_err(|e| bad(path, e))?;
    }
    if class == Class::Qwen2 {
        // Qwen2Tokenizer re-adds all its special tokens as `AddedToken(t, special=True)`.
        let all: Vec<AddedToken> = sp
            .named
            .iter()
            .filter_map(|(_, v)| token_content(v))
            .map(|c| AddedToken::from(c, true))
            .collect();
        tok.add_tokens(all).map_err(|e| bad(path, e))?;
    }
    Ok(())
}

pub(super) fn cfg_bool(cfg: Option<&Map<String, Value>>, key: &str) -> Option<bool> {
    cfg.and_then(|c| c.get(key)).and_then(Value::as_bool)
}

fn byte_level_pre(add_prefix_space: bool, use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": use_regex})
}

pub(super) fn byte_level_decoder() -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true})
}

pub(super) const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A BPE model JSON as the class constructors build it.
pub(super) fn bpe_model(
    vocab: Value,
    merges: Value,
    unk: Option<&str>,
    fuse_unk: bool,
    byte_fallback: bool,
) -> Value {
    json!({
        "type": "BPE",
        "dropout": null,
        "unk_token": unk,
        "continuing_subword_prefix": null,
        "end_of_word_suffix": null,
        "fuse_unk": fuse_unk,
        "byte_fallback": byte_fallback,
        "ignore_merges": false,
        "vocab": vocab,
        "merges": merges,
    })
}

/// The pipeline a class constructor sets up.
pub(super) struct Pipeline {
    pub normalizer: Value,
    pub pre_tokenizer: Value,
    pub decoder: Value,
    pub byte_fallback: bool,
    pub fuse_unk: bool,
}

pub(super) fn llama_pipeline(add_prefix_space: bool, legacy: bool) -> Pipeline {
    let prepend = if !add_prefix_space {
        "never"
    } else if legacy {
        "always"
    } else {
        "first"
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    if add_prefix_space {
        decoders.push(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0}));
    }
    Pipeline {
        normalizer: Value::Null,
        pre_tokenizer: json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": prepend, "split": false}),
        decoder: json!({"type": "Sequence", "decoders": decoders}),
        byte_fallback: true,
        fuse_unk: true,
    }
}

fn gpt2_pipeline(add_prefix_space: bool) -> Pipeline {
    Pipeline {
        normalizer: Value::Null,
        pre_tokenizer: byte_level_pre(add_prefix_space, true),
        decoder: byte_level_decoder(),
        byte_fallback: false,
        fuse_unk: false,
    }
}

fn class_pipeline(class: Class, cfg: Option<&Map<String, Value>>) -> Option<Pipeline> {
    let aps = cfg_bool(cfg, "add_prefix_space");
    match class {
        Class::Backend | Class::Gemma => None,
        Class::Gpt2 => Some(gpt2_pipeline(aps.unwrap_or(false))),
        Class::GptNeoX => Some(Pipeline {
            normalizer: json!({"type": "NFC"}),
            pre_tokenizer: byte_level_pre(aps.unwrap_or(false), true),
            decoder: byte_level_decoder(),
            byte_fallback: false,
            fuse_unk: false,
        }),
        Class::Qwen2 => Some(Pipeline {
            normalizer: json!({"type": "NFC"}),
            pre_tokenizer: json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": false},
                byte_level_pre(aps.unwrap_or(false), false),
            ]}),
            decoder: byte_level_decoder(),
            byte_fallback: false,
            fuse_unk: false,
        }),
        Class::Llama => Some(llama_pipeline(
            aps.unwrap_or(true),
            cfg_bool(cfg, "legacy").unwrap_or(false),
        )),
    }
}

/// `processors.TemplateProcessing` as `update_post_processor` builds it
/// (`[bos:0] $A:0 [eos:0]`, pair `... [bos:1] $B:1 [eos:1]`).
pub(super) fn template(
    bos: Option<(&str, u32)>,
    eos: Option<(&str, u32)>,
    path: &Path,
) -> Result<TemplateProcessing> {
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Map::new();
    for (type_id, s, out) in [(0u32, "A", &mut single), (1u32, "B", &mut pair)] {
        if let Some((b, _)) = bos {
            out.push(special(b, type_id));
        }
        out.push(seq(s, type_id));
        if let Some((e, _)) = eos {
            out.push(special(e, type_id));
        }
    }
    let pair: Vec<Value> = single.iter().cloned().chain(pair).collect();
    for (t, id) in [bos, eos].into_iter().flatten() {
        specials.insert(t.to_string(), json!({"id": t, "ids": [id], "tokens": [t]}));
    }
    let v = json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials});
    serde_json::from_value(v).map_err(|e| bad(path, format!("post-processor template: {e}")))
}

pub(super) fn tokenizer_from_json(v: Value, path: &Path) -> Result<Tokenizer> {
    serde_json::from_value::<Tokenizer>(v).map_err(|e| bad(path, e))
}

/// Legacy `added_tokens.json` ({token: id}).
pub(super) fn legacy_added_tokens_json(
    dir: &Path,
    named: &[String],
) -> Result<Vec<(u32, AddedToken)>> {
    let p = dir.join("added_tokens.json");
    let Some(m) = read_json_obj_opt(&p)? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for (k, v) in m {
        let id = v
            .as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| bad(&p, format!("bad id for '{k}'")))?;
        let special = named.contains(&k);
        let mut t = AddedToken::from(k, special);
        t.normalized = !special;
        out.push((id, t));
    }
    Ok(out)
}

/// Parse `tokenizer.json` and rebuild it as the class constructor does: a fresh tokenizer from
/// vocab + merges with the class's pipeline (post-processor kept). Returns the tokenizer, the
/// effective class (`Backend` for non-BPE models, kept as is) and tokenizer.json's added tokens
/// (which the class gets back only through the config / legacy path).
fn rebuild_for_class(
    text: &str,
    class: Class,
    cfg: Option<&Map<String, Value>>,
    path: &Path,
) -> Result<(Tokenizer, Class, AddedList)> {
    let mut json: Value =
        serde_json::from_str(text).map_err(|e| bad(path, format!("invalid JSON: {e}")))?;
    let obj = json
        .as_object_mut()
        .ok_or_else(|| bad(path, "expected a JSON object"))?;
    let model_type = obj
        .get("model")
        .and_then(|m| m.get("type"))
        .and_then(Value::as_str);
    let is_bpe = model_type == Some("BPE")
        || (model_type.is_none() && obj.get("model").and_then(|m| m.get("merges")).is_some());
    let Some(p) = class_pipeline(class, cfg).filter(|_| is_bpe) else {
        return Ok((tokenizer_from_json(json, path)?, Class::Backend, Vec::new()));
    };
    let mut added: Vec<(u32, AddedToken)> = Vec::new();
    if let Some(Value::Array(items)) = obj.get("added_tokens") {
        for it in items {
            let id = it
                .get("id")
                .and_then(Value::as_u64)
                .and_then(|x| u32::try_from(x).ok());
            if let (Some(id), Some(t)) = (id, added_token_from_value(it, None)) {
                added.push((id, t));
            }
        }
    }
    let model = obj.remove("model").unwrap_or(Value::Null);
    let (vocab, merges) = match model {
        Value::Object(mut m) => (
            m.remove("vocab").unwrap_or_else(|| json!({})),
            m.remove("merges").unwrap_or_else(|| json!([])),
        ),
        _ => (json!({}), json!([])),
    };
    obj.insert(
        "model".into(),
        bpe_model(vocab, merges, None, p.fuse_unk, p.byte_fallback),
    );
    obj.insert("normalizer".into(), p.normalizer);
    obj.insert("pre_tokenizer".into(), p.pre_tokenizer);
    obj.insert("decoder".into(), p.decoder);
    obj.insert("added_tokens".into(), json!([]));
    obj.insert("truncation".into(), Value::Null);
    obj.insert("padding".into(), Value::Null);
    if class == Class::GptNeoX {
        // GPTNeoXTokenizer calls update_post_processor() (add_bos/add_eos are dropped when a
        // tokenizer.json exists, so: no BOS/EOS).
        obj.insert("post_processor".into(), Value::Null);
    }
    Ok((tokenizer_from_json(json, path)?, class, added))
}

pub(super) fn load_dir(dir: &Path) -> Result<LmTokenizer> {
    if !dir.is_dir() {
        return Err(Error::ModelNotFound(dir.display().to_string()));
    }
    let cfg_path = dir.join("tokenizer_config.json");
    let cfg = read_json_obj_opt(&cfg_path)?;
    let stm = read_json_obj_opt(&dir.join("special_tokens_map.json"))?;
    // config.json problems are reported by the model loader; here it only informs the class choice.
    let model_cfg = read_json_obj_opt(&dir.join("config.json")).ok().flatten();
    let model_type = model_cfg
        .as_ref()
        .and_then(|m| m.get("model_type"))
        .and_then(Value::as_str);
    let hub_class = cfg
        .as_ref()
        .and_then(|c| c.get("tokenizer_class"))
        .and_then(Value::as_str)
        .or_else(|| {
            model_cfg
                .as_ref()
                .and_then(|m| m.get("tokenizer_class"))
                .and_then(Value::as_str)
        });

    let tj_path = dir.join("tokenizer.json");
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    if tj_path.is_file() {
        let text = read_text(&tj_path)?;
        let class = match resolve_class(hub_class, model_type, Some(&text)) {
            Class::Gemma => Class::Backend,
            c => c,
        };
        let (mut tok, class, legacy_added) = if class == Class::Backend {
            // tokenizer.json as is.
            let tok = serde_json::from_str::<Tokenizer>(&text).map_err(|e| bad(&tj_path, e))?;
            (tok, class, Vec::new())
        } else {
            rebuild_for_class(&text, class, cfg.as_ref(), &tj_path)?
        };
        let mut legacy = legacy_added;
        let named0 = collect_special(class, cfg.as_ref(), stm.as_ref(), Vec::new());
        let named_strs: Vec<String> = named0
            .named
            .iter()
            .filter_map(|(_, v)| token_content(v))
            .collect();
        legacy.extend(legacy_added_tokens_json(dir, &named_strs)?);
        let sp = collect_special(class, cfg.as_ref(), stm.as_ref(), legacy);
        add_special_tokens(&mut tok, &sp, class, &tj_path)?;
        // No post-processor in tokenizer.json: transformers' `update_post_processor` runs with
        // add_bos/add_eos = False (dropped from the config when a tokenizer.json exists), which
        // adds nothing -- same as leaving it empty.
        let bos = sp.get("bos_token").and_then(|t| tok.token_to_id(&t));
        let eos = sp.get("eos_token").and_then(|t| tok.token_to_id(&t));
        return LmTokenizer::from_parts(tok, bos, eos, &tj_path);
    }
    if vocab_path.is_file() && merges_path.is_file() {
        return load_slow_bpe(dir, hub_class, model_type, cfg.as_ref(), stm.as_ref());
    }
    if dir.join("tokenizer.model").is_file() {
        return super::spm::load(
            dir,
            hub_class,
            model_type,
            cfg.as_ref(),
            stm.as_ref(),
            |named| legacy_added_tokens_json(dir, named),
        );
    }
    Err(bad(
        dir,
        "no tokenizer.json (or vocab.json + merges.txt, or tokenizer.model) in the model directory",
    ))
}

/// Parse `merges.txt` (one "a b" pair per line, optional `#version` header).
pub(super) fn parse_merges(text: &str, path: &Path) -> Result<Vec<Value>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        let parts: Vec<&str> = line.split(' ').collect();
        if parts.len() != 2 {
            return Err(bad(
                path,
                format!("line {}: expected two space-separated tokens", i + 1),
            ));
        }
        out.push(json!([parts[0], parts[1]]));
    }
    Ok(out)
}

/// A slow (vocab.json + merges.txt) byte-level BPE tokenizer, as `GPT2Tokenizer` (or
/// GPTNeoX/Qwen2) builds it from those files.
fn load_slow_bpe(
    dir: &Path,
    hub_class: Option<&str>,
    model_type: Option<&str>,
    cfg: Option<&Map<String, Value>>,
    stm: Option<&Map<String, Value>>,
) -> Result<LmTokenizer> {
    let vocab_path = dir.join("vocab.json");
    let merges_path = dir.join("merges.txt");
    let class = match resolve_class(hub_class, model_type, None) {
        Class::Backend | Class::Llama | Class::Gemma => Class::Gpt2,
        c => c,
    };
    let vocab = read_json(&vocab_path)?;
    let vmap = vocab
        .as_object()
        .ok_or_else(|| bad(&vocab_path, "expected a JSON object {token: id}"))?;
    for (k, v) in vmap {
        if v.as_u64().and_then(|x| u32::try_from(x).ok()).is_none() {
            return Err(bad(
                &vocab_path,
                format!("token '{k}' has a non-integer id"),
            ));
        }
    }
    let merges = parse_merges(&read_text(&merges_path)?, &merges_path)?;
    for m in &merges {
        if let Some(a) = m.as_array() {
            for part in a {
                let p = part.as_str().unwrap_or_default();
                if !vmap.contains_key(p) {
                    return Err(bad(
                        &merges_path,
                        format!("merge token '{p}' is not in vocab.json"),
                    ));
                }
            }
        }
    }
    let p = class_pipeline(class, cfg)
        .unwrap_or_else(|| gpt2_pipeline(cfg_bool(cfg, "add_prefix_space").unwrap_or(false)));
    let json = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": p.normalizer,
        "pre_tokenizer": p.pre_tokenizer,
        "post_processor": null,
        "decoder": p.decoder,
        "model": bpe_model(vocab, Value::Array(merges), None, p.fuse_unk, p.byte_fallback),
    });
    let mut tok = tokenizer_from_json(json, &vocab_path)?;
    let named0 = collect_special(class, cfg, stm, Vec::new());
    let named_strs: Vec<String> = named0
        .named
        .iter()
        .filter_map(|(_, v)| token_content(v))
        .collect();
    let legacy = legacy_added_tokens_json(dir, &named_strs)?;
    let sp = collect_special(class, cfg, stm, legacy);
    add_special_tokens(&mut tok, &sp, class, &vocab_path)?;
    // No tokenizer.json: add_bos_token / add_eos_token from the config are honoured.
    let bos = sp.get("bos_token");
    let eos = sp.get("eos_token");
    let add_bos = cfg_bool(cfg, "add_bos_token").unwrap_or(false);
    let add_eos = cfg_bool(cfg, "add_eos_token").unwrap_or(false);
    let bos_pair = match (&bos, add_bos) {
        (Some(b), true) => Some((
            b.as_str(),
            tok.token_to_id(b)
                .ok_or_else(|| bad(&vocab_path, format!("bos token '{b}' not in vocabulary")))?,
        )),
        _ => None,
    };
    let eos_pair = match (&eos, add_eos) {
        (Some(e), true) => Some((
            e.as_str(),
            tok.token_to_id(e)
                .ok_or_else(|| bad(&vocab_path, format!("eos token '{e}' not in vocabulary")))?,
        )),
        _ => None,
    };
    let tp = template(bos_pair, eos_pair, &vocab_path)?;
    tok.with_post_processor(Some(tp));
    let bos_id = bos.as_deref().and_then(|t| tok.token_to_id(t));
    let eos_id = eos.as_deref().and_then(|t| tok.token_to_id(t));
    LmTokenizer::from_parts(tok, bos_id, eos_id, &vocab_path)
}
