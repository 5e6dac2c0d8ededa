//! Reading and validating input files (`.txt`, `.jsonl`, `-` for stdin).
//!
//! Format: a path ending in `.jsonl`/`.ndjson` is JSONL, `.txt` is text; anything else
//! (including `-`, standard input) is JSONL when every non-blank line starts with `{`,
//! text otherwise.
//!
//! Records are numbered by their 0-based index among the input's records (blank lines
//! are not records); that index is the default `id`, the id of an error record written for a
//! bad line with `--skip-bad-lines`, and what `--resume` matches on. Errors name the 1-based
//! line number in the file: `IN:LINE: message`.
use crate::error::{Error, Result};
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::Read;

#[derive(Debug, Clone, PartialEq)]
pub enum PromptSrc {
    Text(String),
    Ids(Vec<u32>),
}

/// Per-request overrides from a JSONL line.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    pub max_new_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub repetition_penalty: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Vec<String>>,
    pub n: Option<usize>,
    pub ignore_eos: Option<bool>,
}

#[derive(Debug, Clone)]
pub struct InputRecord {
    /// 0-based record index (input order).
    pub index: usize,
    /// 1-based line number in the input file.
    pub line: usize,
    pub id: Value,
    pub prompt: PromptSrc,
    pub overrides: Overrides,
    /// An OpenAI batch line (`custom_id`, `method`, `url`, `body`), as read; its request is
    /// checked by [`super::openai`]. `prompt` is then empty and `id` is the `custom_id`.
    pub batch: Option<serde_json::Map<String, Value>>,
}

#[derive(Debug, Clone)]
pub struct BadRecord {
    pub index: usize,
    /// The error record's id: the record's index for a line that could not be parsed,
    /// else the record's own id.
    pub id: Value,
    /// `IN:LINE: what is wrong`
    pub message: String,
}

#[derive(Debug, Clone)]
pub enum Entry {
    Ok(InputRecord),
    Bad(BadRecord),
}

impl Entry {
    pub fn id(&self) -> &Value {
        match self {
            Entry::Ok(r) => &r.id,
            Entry::Bad(b) => &b.id,
        }
    }
}

#[derive(Debug, Default)]
pub struct Input {
    /// How the input is named in messages (`-` is shown as `<stdin>`).
    pub name: String,
    pub entries: Vec<Entry>,
    /// SHA-256 of the input's bytes (hex), the input's identity in a job manifest.
    pub sha256: String,
    /// An OpenAI batch file (its first line has `custom_id`, `url` or `body`): every line is
    /// one record with its own response, and a line that cannot be read is an error record.
    pub openai: bool,
}

impl Input {
    /// Turn an entry into an error: a user error, or (with `--skip-bad-lines`) a bad record
    /// reported as a warning on stderr.
    pub fn reject(&self, rec: &InputRecord, what: &str, skip_bad: bool) -> Result<BadRecord> {
        let message = format!("{}:{}: {}", self.name, rec.line, what);
        if !skip_bad {
            return Err(Error::BadRequest(message));
        }
        Ok(BadRecord {
            index: rec.index,
            id: rec.id.clone(),
            message,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Jsonl,
}

pub fn read_input(path: &str, skip_bad: bool) -> Result<Input> {
    let (name, bytes) = if path == "-" {
        let mut buf = Vec::new();
        std::io::stdin()
            .read_to_end(&mut buf)
            .map_err(|e| Error::BadRequest(format!("<stdin>: cannot read: {e}")))?;
        ("<stdin>".to_string(), buf)
    } else {
        let p = std::path::Path::new(path);
        if p.is_dir() {
            return Err(Error::BadRequest(format!(
                "{path}: is a directory, expected an input file (.txt or .jsonl)"
            )));
        }
        let bytes = std::fs::read(p).map_err(|e| {
            Error::BadRequest(format!("{path}: cannot read input: {}", super::io_msg(&e)))
        })?;
        (path.to_string(), bytes)
    };
    let input = parse_input(&name, path, &bytes, skip_bad)?;
    if input.entries.is_empty() {
        return Err(Error::BadRequest(format!("{name}: no prompts")));
    }
    Ok(input)
}

fn detect_format(path: &str, lines: &[&[u8]]) -> Format {
    let lower = path.to_ascii_lowercase();
    if lower.ends_with(".jsonl") || lower.ends_with(".ndjson") {
        return Format::Jsonl;
    }
    if lower.ends_with(".txt") {
        return Format::Text;
    }
    let mut nonblank = lines
        .iter()
        .filter(|l| !l.trim_ascii().is_empty())
        .peekable();
    if nonblank.peek().is_none() {
        return Format::Text;
    }
    if nonblank.all(|l| l.trim_ascii_start().starts_with(b"{")) {
        Format::Jsonl
    } else {
        Format::Text
    }
}

pub fn parse_input(name: &str, path: &str, bytes: &[u8], skip_bad: bool) -> Result<Input> {
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes); // UTF-8 BOM
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if lines.last().is_some_and(|l| l.is_empty()) {
        lines.pop();
    }
    let format = detect_format(path, &lines);
    if format == Format::Jsonl && super::openai::is_batch_file(&lines) {
        return Ok(parse_batch(name, bytes, &lines));
    }
    let mut entries = Vec::new();
    let mut warned = BTreeSet::new();
    for (i, raw) in lines.iter().enumerate() {
        let line_no = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let blank = match format {
            Format::Text => raw.is_empty(),
            Format::Jsonl => raw.trim_ascii().is_empty(),
        };
        if blank {
            continue;
        }
        let index = entries.len();
        let parsed = std::str::from_utf8(raw)
            .map_err(|e| format!("not valid UTF-8 (byte {})", e.valid_up_to()))
            .and_then(|s| match format {
                Format::Text => Ok(InputRecord {
                    index,
                    line: line_no,
                    id: Value::from(i),
                    prompt: PromptSrc::Text(unescape(s)),
                    overrides: Overrides::default(),
                    batch: None,
                }),
                Format::Jsonl => parse_json_line(s, index, line_no, &mut warned, name),
            });
        match parsed {
            Ok(r) => entries.push(Entry::Ok(r)),
            Err(what) => {
                let message = format!("{name}:{line_no}: {what}");
                if !skip_bad {
                    return Err(Error::BadRequest(message));
                }
                entries.push(Entry::Bad(BadRecord {
                    index,
                    id: Value::from(i),
                    message,
                }));
            }
        }
    }
    Ok(Input {
        name: name.to_string(),
        entries,
        sha256: super::sha256_hex(bytes),
        openai: false,
    })
}

/// An OpenAI batch file: one record per non-blank line, keyed by its `custom_id` (a line
/// without one: its 0-based line number). A line that is not a JSON object is an error
/// record, never the end of the job.
fn parse_batch(name: &str, bytes: &[u8], lines: &[&[u8]]) -> Input {
    let mut entries = Vec::new();
    for (i, raw) in lines.iter().enumerate() {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.trim_ascii().is_empty() {
            continue;
        }
        let index = entries.len();
        let parsed = std::str::from_utf8(raw)
            .map_err(|e| format!("not valid UTF-8 (byte {})", e.valid_up_to()))
            .and_then(|s| {
                serde_json::from_str::<Value>(s).map_err(|e| format!("malformed JSON: {e}"))
            });
        let entry = match parsed {
            Ok(Value::Object(obj)) => Entry::Ok(InputRecord {
                index,
                line: i + 1,
                id: match obj.get("custom_id") {
                    Some(Value::String(c)) => Value::from(c.clone()),
                    _ => Value::from(i),
                },
                prompt: PromptSrc::Text(String::new()),
                overrides: Overrides {
                    n: Some(1),
                    ..Overrides::default()
                },
                batch: Some(obj),
            }),
            Ok(v) => Entry::Bad(BadRecord {
                index,
                id: Value::from(i),
                message: format!("line {}: expected a JSON object, got {}", i + 1, kind(&v)),
            }),
            Err(what) => Entry::Bad(BadRecord {
                index,
                id: Value::from(i),
                message: format!("line {}: {what}", i + 1),
            }),
        };
        entries.push(entry);
    }
    Input {
        name: name.to_string(),
        entries,
        sha256: super::sha256_hex(bytes),
        openai: true,
    }
}

/// `\n` → newline, `\t` → tab, `\r` → carriage return, `\\` → backslash; other backslashes are kept.
pub fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.peek() {
                Some('n') => {
                    out.push('\n');
                    chars.next();
                }
                Some('t') => {
                    out.push('\t');
                    chars.next();
                }
                Some('r') => {
                    out.push('\r');
                    chars.next();
                }
                Some('\\') => {
                    out.push('\\');
                    chars.next();
                }
                _ => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

const KNOWN_KEYS: &[&str] = &[
    "id",
    "prompt",
    "input_ids",
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "n",
    "ignore_eos",
];

fn parse_json_line(
    s: &str,
    index: usize,
    line: usize,
    warned: &mut BTreeSet<String>,
    name: &str,
) -> std::result::Result<InputRecord, String> {
    let v: Value = serde_json::from_str(s).map_err(|e| format!("malformed JSON: {e}"))?;
    let Value::Object(obj) = v else {
        return Err(format!("expected a JSON object, got {}", kind(&v)));
    };
    for k in obj.keys() {
        if !KNOWN_KEYS.contains(&k.as_str()) && warned.insert(k.clone()) {
            eprintln!("lmgen: warning: {name}:{line}: ignoring unknown field '{k}'");
        }
    }
    let id = match obj.get("id") {
        None | Some(Value::Null) => Value::from(line - 1),
        Some(v @ (Value::String(_) | Value::Number(_))) => v.clone(),
        Some(v) => {
            return Err(format!(
                "\"id\" must be a string or a number, got {}",
                kind(v)
            ))
        }
    };
    let prompt = match (obj.get("prompt"), obj.get("input_ids")) {
        (Some(_), Some(_)) => return Err("has both \"prompt\" and \"input_ids\"; give one".into()),
        (None, None) => return Err("missing \"prompt\" (text) or \"input_ids\" (token ids)".into()),
        (Some(Value::String(p)), None) => PromptSrc::Text(p.clone()),
        (Some(v), None) => return Err(format!("\"prompt\" must be a string, got {}", kind(v))),
        (None, Some(Value::Array(a))) => {
            if a.is_empty() {
                return Err("\"input_ids\" is empty".into());
            }
            let ids = a
                .iter()
                .map(|x| {
                    x.as_u64()
                        .filter(|&t| t <= u32::MAX as u64)
                        .map(|t| t as u32)
                })
                .collect::<Option<Vec<u32>>>()
                .ok_or("\"input_ids\" must be a list of non-negative integer token ids")?;
            PromptSrc::Ids(ids)
        }
        (None, Some(v)) => {
            return Err(format!(
                "\"input_ids\" must be a list of token ids, got {}",
                kind(v)
            ))
        }
    };
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
    let uint = |k: &str, min: u64| -> std::result::Result<Option<u64>, String> {
        match get(k) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(x) if x >= min => Ok(Some(x)),
                _ => Err(format!("\"{k}\" must be an integer >= {min}, got {v}")),
            },
        }
    };
    let float = |k: &str| -> std::result::Result<Option<f32>, String> {
        match get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(|x| Some(x as f32))
                .ok_or_else(|| format!("\"{k}\" must be a number, got {v}")),
        }
    };
    let stop = match get("stop") {
        None => None,
        Some(Value::String(s)) => Some(vec![s.clone()]),
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or("\"stop\" must be a string or a list of strings")?,
        ),
        Some(v) => {
            return Err(format!(
                "\"stop\" must be a string or a list of strings, got {}",
                kind(v)
            ))
        }
    };
    if stop
        .as_ref()
        .is_some_and(|s| s.iter().any(|x| x.is_empty()))
    {
        return Err("\"stop\" strings must not be empty".into());
    }
    let ignore_eos = match get("ignore_eos") {
        None => None,
        Some(Value::Bool(b)) => Some(*b),
        Some(v) => {
            return Err(format!(
                "\"ignore_eos\" must be true or false, got {}",
                kind(v)
            ))
        }
    };
    let overrides = Overrides {
        max_new_tokens: uint("max_new_tokens", 1)?.map(|x| x as usize),
        temperature: float("temperature")?,
        top_p: float("top_p")?,
        top_k: uint("top_k", 1)?.map(|x| x as usize),
        repetition_penalty: float("repetition_penalty")?,
        presence_penalty: float("presence_penalty")?,
        frequency_penalty: float("frequency_penalty")?,
        seed: uint("seed", 0)?,
        stop,
        n: uint("n", 1)?.map(|x| x as usize),
        ignore_eos,
    };
    Ok(InputRecord {
        index,
        line,
        id,
        prompt,
        overrides,
        batch: None,
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Canonical key of an id, for matching records on `--resume`.
pub fn id_key(id: &Value) -> String {
    serde_json::to_string(id).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(path: &str, text: &str, skip: bool) -> Result<Input> {
        parse_input(path, path, text.as_bytes(), skip)
    }

    #[test]
    fn text_lines_unescaped_and_blank_skipped() {
        let inp = parse("in.txt", "a\\nb\n\nc\\td\\\\n\r\n", false).unwrap();
        let got: Vec<_> = inp
            .entries
            .iter()
            .map(|e| match e {
                Entry::Ok(r) => (r.index, r.line, r.prompt.clone(), r.id.clone()),
                _ => panic!(),
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 1, PromptSrc::Text("a\nb".into()), Value::from(0)),
                (1, 3, PromptSrc::Text("c\td\\n".into()), Value::from(2)),
            ]
        );
    }

    #[test]
    fn jsonl_fields_and_errors() {
        let inp = parse(
            "in.jsonl",
            "{\"prompt\":\"x\",\"id\":\"a\",\"stop\":\"s\",\"n\":2,\"temperature\":0}\n\n{\"input_ids\":[1,2],\"top_k\":3,\"ignore_eos\":true}\n",
            false,
        )
        .unwrap();
        let Entry::Ok(r) = &inp.entries[0] else {
            panic!()
        };
        assert_eq!(r.id, Value::from("a"));
        assert_eq!(r.overrides.stop, Some(vec!["s".to_string()]));
        assert_eq!(r.overrides.n, Some(2));
        assert_eq!(r.overrides.ignore_eos, None);
        let Entry::Ok(r) = &inp.entries[1] else {
            panic!()
        };
        assert_eq!((r.index, r.line), (1, 3));
        assert_eq!(r.prompt, PromptSrc::Ids(vec![1, 2]));
        assert_eq!(r.overrides.ignore_eos, Some(true));
        assert_eq!(
            r.id,
            Value::from(2),
            "the default id is the 0-based line number"
        );

        for (bad, what) in [
            ("{\"prompt\":\"x\"\n{oops\n", "in.jsonl:1: malformed JSON"),
            ("{\"x\":1}\n", "in.jsonl:1: missing \"prompt\""),
            (
                "{\"prompt\":\"x\"}\n{\"prompt\":\"x\",\"input_ids\":[1]}\n",
                "in.jsonl:2: has both",
            ),
            (
                "{\"prompt\":1}\n",
                "in.jsonl:1: \"prompt\" must be a string",
            ),
            (
                "{\"input_ids\":[1,-1]}\n",
                "in.jsonl:1: \"input_ids\" must be",
            ),
            (
                "{\"prompt\":\"x\",\"max_new_tokens\":\"5\"}\n",
                "in.jsonl:1: \"max_new_tokens\" must be",
            ),
            (
                "{\"prompt\":\"x\",\"id\":[1]}\n",
                "in.jsonl:1: \"id\" must be",
            ),
            ("[1]\n", "in.jsonl:1: expected a JSON object"),
            (
                "{\"prompt\":\"x\"}\n{\"prompt\":\"x\",\"ignore_eos\":\"yes\"}\n",
                "in.jsonl:2: \"ignore_eos\" must be true or false",
            ),
        ] {
            let e = parse("in.jsonl", bad, false).unwrap_err().to_string();
            assert!(e.starts_with(what), "{e} vs {what}");
        }
        let inp = parse(
            "in.jsonl",
            "{\"prompt\":\"x\"}\n{oops\n{\"prompt\":\"y\"}\n",
            true,
        )
        .unwrap();
        assert!(
            matches!(&inp.entries[1], Entry::Bad(b) if b.index == 1 && b.id == Value::from(1) && b.message.starts_with("in.jsonl:2:"))
        );
        assert_eq!(inp.entries.len(), 3);
    }

    #[test]
    fn stdin_format_sniffing() {
        assert_eq!(
            detect_format("-", &[b"{\"prompt\":1}", b"", b" {}"]),
            Format::Jsonl
        );
        assert_eq!(
            detect_format("-", &[b"{\"prompt\":1}", b"hello"]),
            Format::Text
        );
        assert_eq!(detect_format("x.txt", &[b"{\"prompt\":1}"]), Format::Text);
    }
}
