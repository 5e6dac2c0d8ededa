//! Chat templates: the Jinja template a model ships (`chat_template` in
//! `tokenizer_config.json`, a `chat_template.jinja` / `chat_template.json` file, or GGUF
//! `tokenizer.chat_template`) rendered as `transformers`' `apply_chat_template` renders it.
//!
//! The engine is `minijinja` with the Python string/dict/list methods of
//! `minijinja-contrib`'s pycompat, `trim_blocks` and `lstrip_blocks` on (as transformers
//! sets them), and the helpers transformers adds: `raise_exception(msg)`,
//! `strftime_now(format)` and a `tojson` that writes what Python's `json.dumps` writes
//! (`ensure_ascii=False`, `indent`, `separators`, `sort_keys`).
use std::path::Path;

use minijinja::value::{Kwargs, Serde};
use minijinja::{Environment, Error as JError, ErrorKind, Value};
use serde_json::Value as Json;

use crate::error::{Error, Result};
use crate::hub::ModelLocation;
use crate::tokenizer::LmTokenizer;

/// A model's chat template and the special tokens it may use (`bos_token`, `eos_token`, ...).
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    pub source: String,
    /// Template variables such as `bos_token` → `<s>`.
    pub specials: Vec<(String, String)>,
    /// The template compiled once, at its first use.
    compiled: std::sync::OnceLock<std::result::Result<Environment<'static>, String>>,
}

/// The special-token names transformers passes to a template.
const SPECIAL_NAMES: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "pad_token",
    "sep_token",
    "cls_token",
    "mask_token",
];

fn token_str(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Object(o) => o
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

fn read_json(p: &Path) -> Result<Option<Json>> {
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::BadRequest(format!("{}: {e}", p.display())))
}

/// `chat_template` as transformers stores it: a string, or a list of named templates
/// (the one named `default` is used).
fn template_of(v: &Json) -> Option<String> {
    match v {
        Json::String(s) => Some(s.clone()),
        Json::Array(list) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    pub fn new(source: impl Into<String>, specials: Vec<(String, String)>) -> Self {
        Self {
            source: source.into(),
            specials,
            compiled: std::sync::OnceLock::new(),
        }
    }

    /// The template of the model at `location`, if it has one.
    pub fn for_model(location: &ModelLocation, tok: &LmTokenizer) -> Result<Option<Self>> {
        let mut specials: Vec<(String, String)> = Vec::new();
        let push = |specials: &mut Vec<(String, String)>, k: &str, v: Option<String>| {
            if let Some(v) = v {
                if !specials.iter().any(|(n, _)| n == k) {
                    specials.push((k.to_string(), v));
                }
            }
        };
        let source = match location {
            ModelLocation::Dir(dir) => {
                let cfg = read_json(&dir.join("tokenizer_config.json"))?;
                let map = read_json(&dir.join("special_tokens_map.json"))?;
                for name in SPECIAL_NAMES {
                    for src in [&cfg, &map].into_iter().flatten() {
                        push(&mut specials, name, src.get(*name).and_then(token_str));
                    }
                }
                let jinja = dir.join("chat_template.jinja");
                if jinja.is_file() {
                    Some(std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?)
                } else if let Some(t) = read_json(&dir.join("chat_template.json"))?
                    .as_ref()
                    .and_then(|j| j.get("chat_template"))
                    .and_then(template_of)
                {
                    Some(t)
                } else {
                    cfg.as_ref()
                        .and_then(|c| c.get("chat_template"))
                        .and_then(template_of)
                }
            }
            ModelLocation::Gguf(file) => {
                let g = crate::weights::gguf::GgufFile::open(file)?;
                let meta = &g.content().metadata;
                for (name, key) in [
                    ("bos_token", "tokenizer.ggml.bos_token_id"),
                    ("eos_token", "tokenizer.ggml.eos_token_id"),
                    ("unk_token", "tokenizer.ggml.unknown_token_id"),
                    ("pad_token", "tokenizer.ggml.padding_token_id"),
                ] {
                    let id = meta.get(key).and_then(|v| v.to_u32().ok());
                    push(&mut specials, name, id.and_then(|i| tok.id_to_token(i)));
                }
                meta.get("tokenizer.chat_template")
                    .and_then(|v| v.to_string().ok())
                    .cloned()
            }
        };
        push(
            &mut specials,
            "bos_token",
            tok.bos_token_id().and_then(|i| tok.id_to_token(i)),
        );
        push(
            &mut specials,
            "eos_token",
            tok.eos_token_id().and_then(|i| tok.id_to_token(i)),
        );
        Ok(source.map(|s| Self::new(s, specials)))
    }

    /// Render `messages` (a JSON list of `{role, content, ...}`) as
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does;
    /// `extra` are more template variables (e.g. `date_string`). The error is one line.
    pub fn render(
        &self,
        messages: &Json,
        add_generation_prompt: bool,
        extra: &serde_json::Map<String, Json>,
    ) -> std::result::Result<String, String> {
        let env = self
            .compiled
            .get_or_init(|| {
                let mut env = environment();
                env.add_template_owned("chat", self.source.clone())
                    .map(|_| env)
                    .map_err(|e| format!("chat template: {}", describe(&e)))
            })
            .as_ref()
            .map_err(Clone::clone)?;
        let tmpl = env
            .get_template("chat")
            .map_err(|e| format!("chat template: {}", describe(&e)))?;
        let mut ctx = serde_json::Map::new();
        for (k, v) in &self.specials {
            ctx.insert(k.clone(), Json::from(v.clone()));
        }
        ctx.insert("messages".into(), messages.clone());
        ctx.insert(
            "add_generation_prompt".into(),
            Json::from(add_generation_prompt),
        );
        for (k, v) in extra {
            ctx.insert(k.clone(), v.clone());
        }
        tmpl.render(Value::from(Serde(&Json::Object(ctx))))
            .map_err(|e| format!("chat template: {}", describe(&e)))
    }
}

/// One line: the message, and the template line where it happened.
fn describe(e: &JError) -> String {
    let what = match e.kind() {
        ErrorKind::InvalidOperation => e.detail().unwrap_or("invalid operation").to_string(),
        _ => e.to_string(),
    };
    let what = crate::tokenizer::one_line(&what);
    match e.line() {
        Some(l) if !what.contains("line") => format!("{what} (template line {l})"),
        _ => what,
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("default delimiters"),
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<Value, JError> {
            Err(JError::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
    env.add_filter("tojson", tojson);
    env
}

/// Python's `json.dumps(x, ensure_ascii=False, indent=..., separators=..., sort_keys=...)`.
fn tojson(v: Value, kwargs: Kwargs) -> std::result::Result<Value, JError> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let indent = match indent {
        Some(i) if i.is_none() || i.is_undefined() => None,
        Some(i) => match i.as_usize() {
            Some(n) => Some(" ".repeat(n)),
            None => Some(i.to_string()),
        },
        None => None,
    };
    let (item, key) = match separators {
        Some(s) if !s.is_none() && !s.is_undefined() => {
            let parts: Vec<String> = s
                .try_iter()?
                .map(|p| p.as_str().unwrap_or_default().to_string())
                .collect();
            match parts.as_slice() {
                [a, b] => (a.clone(), b.clone()),
                _ => {
                    return Err(JError::new(
                        ErrorKind::InvalidOperation,
                        "tojson: separators must be two strings",
                    ))
                }
            }
        }
        _ if indent.is_some() => (",".to_string(), ": ".to_string()),
        _ => (", ".to_string(), ": ".to_string()),
    };
    let json = serde_json::to_value(&v)
        .map_err(|e| JError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let mut out = String::new();
    let f = PyJson {
        indent,
        item,
        key,
        sort_keys: sort_keys.unwrap_or(false),
    };
    f.write(&json, 0, &mut out);
    Ok(Value::from_safe_string(out))
}

struct PyJson {
    indent: Option<String>,
    item: String,
    key: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, depth: usize, out: &mut String) {
        if let Some(ind) = &self.indent {
            out.push('\n');
            for _ in 0..depth {
                out.push_str(ind);
            }
        }
    }

    fn write(&self, v: &Json, depth: usize, out: &mut String) {
        match v {
            Json::Array(a) if !a.is_empty() => {
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(depth + 1, out);
                    self.write(x, depth + 1, out);
                }
                self.newline(depth, out);
                out.push(']');
            }
            Json::Object(o) if !o.is_empty() => {
                let mut entries: Vec<(&String, &Json)> = o.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, x)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item);
                    }
                    self.newline(depth + 1, out);
                    out.push_str(&serde_json::to_string(k).unwrap_or_default());
                    out.push_str(&self.key);
                    self.write(x, depth + 1, out);
                }
                self.newline(depth, out);
                out.push('}');
            }
            // Python writes floats with a fractional part (1.0) as serde_json does.
            other => out.push_str(&serde_json::to_string(other).unwrap_or_default()),
        }
    }
}

/// `datetime.now().strftime(fmt)` for the directives chat templates use (UTC).
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(fmt, secs)
}

fn strftime(fmt: &str, secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let (hh, mm, ss) = (tod / 3600, tod / 60 % 60, tod % 60);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('-') => match chars.next() {
                Some('d') => out.push_str(&d.to_string()),
                Some('m') => out.push_str(&m.to_string()),
                Some(o) => out.push_str(&format!("%-{o}")),
                None => out.push_str("%-"),
            },
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('j') => out.push_str(&format!("{:03}", doy_of(y, m, d))),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

fn doy_of(y: i64, m: i64, d: i64) -> i64 {
    const CUM: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    CUM[(m - 1) as usize] + d + i64::from(leap && m > 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_formats() {
        // 2024-07-26 13:05:09 UTC, a Friday
        let t = 1_722_000_309;
        assert_eq!(strftime("%d %b %Y", t), "26 Jul 2024");
        assert_eq!(
            strftime("%A %B %-d, %H:%M:%S %j", t),
            "Friday July 26, 13:25:09 208"
        );
    }

    #[test]
    fn tojson_is_pythons() {
        let t = ChatTemplate::new(
            "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ 'é<' | tojson }}",
            vec![],
        );
        let mut extra = serde_json::Map::new();
        extra.insert("x".into(), serde_json::json!({"a": [1, 2.5], "b": {}}));
        let out = t.render(&Json::Array(vec![]), false, &extra).unwrap();
        assert_eq!(
            out,
            "{\"a\": [1, 2.5], \"b\": {}}|{\n  \"a\": [\n    1,\n    2.5\n  ],\n  \"b\": {}\n}|\"é<\""
        );
    }

    /// Real templates rendered by transformers' `apply_chat_template`
    /// (scripts/make_chat_template_goldens.py).
    #[test]
    fn matches_transformers_on_real_templates() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat_templates");
        let mut names = Vec::new();
        for f in std::fs::read_dir(&dir).unwrap() {
            let path = f.unwrap().path();
            let doc: Json = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let specials = doc["specials"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            let t = ChatTemplate::new(doc["template"].as_str().unwrap(), specials);
            let extra = doc["extra"].as_object().unwrap();
            for (i, case) in doc["cases"].as_array().unwrap().iter().enumerate() {
                let agp = case["add_generation_prompt"].as_bool().unwrap();
                let got = t.render(&case["messages"], agp, extra);
                match (case.get("rendered"), case.get("error")) {
                    (Some(want), _) => assert_eq!(
                        got.as_deref(),
                        Ok(want.as_str().unwrap()),
                        "{} case {i}",
                        path.display()
                    ),
                    (_, Some(want)) => {
                        let e = got.unwrap_err();
                        assert!(
                            e.contains(want.as_str().unwrap()),
                            "{}: {e}",
                            path.display()
                        )
                    }
                    _ => panic!("{}: case {i} has no expectation", path.display()),
                }
            }
            names.push(path.file_stem().unwrap().to_string_lossy().to_string());
        }
        names.sort();
        assert!(names.len() >= 6, "{names:?}");
    }

    #[test]
    fn raise_exception_and_generation_prompt() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}<{{ m.role }}>{{ m['content'].strip() }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
            vec![("bos_token".into(), "<s>".into())],
        );
        let none = serde_json::Map::new();
        let msgs = serde_json::json!([{"role": "user", "content": " hi "}]);
        assert_eq!(
            t.render(&msgs, true, &none).unwrap(),
            "<user>hi\n<assistant>"
        );
        let bad = serde_json::json!([{"role": "bad", "content": ""}]);
        let e = t.render(&bad, true, &none).unwrap_err();
        assert!(e.contains("no bad roles"), "{e}");
    }
}
