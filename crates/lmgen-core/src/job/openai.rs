//! OpenAI batch files: the request lines (`custom_id`, `method`, `url`, `body`) read into
//! typed requests, and the output lines (`id`, `custom_id`, `response` {`status_code`,
//! `request_id`, `body`}, `error`) whose bodies are what the endpoint returns.
//!
//! Endpoints: `/v1/completions`, `/v1/chat/completions`, `/v1/embeddings`. A line that is
//! not a valid request gets a response with status 400 and an OpenAI error body; the job goes on.
use super::input::PromptSrc;
use serde_json::{json, Map, Value};

/// Whether these lines are an OpenAI batch file: the first non-blank line is a JSON object
/// with `custom_id`, or with `url` and `body`.
pub fn is_batch_file(lines: &[&[u8]]) -> bool {
    let Some(first) = lines.iter().find(|l| !l.trim_ascii().is_empty()) else {
        return false;
    };
    match serde_json::from_slice::<Value>(first.trim_ascii()) {
        Ok(Value::Object(o)) => {
            o.contains_key("custom_id") || (o.contains_key("url") && o.contains_key("body"))
        }
        _ => false,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Completions,
    ChatCompletions,
    Embeddings,
}

impl Endpoint {
    pub fn url(&self) -> &'static str {
        match self {
            Endpoint::Completions => "/v1/completions",
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Embeddings => "/v1/embeddings",
        }
    }
}

/// Sampling settings of a completion or chat request; `None`: the command line's value.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampling {
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Choices per prompt.
    pub n: usize,
    pub stop: Option<Vec<String>>,
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Completion {
        prompts: Vec<PromptSrc>,
        sampling: Sampling,
        /// `logprobs: N`: the log-probability of each chosen token and the N most likely.
        logprobs: Option<usize>,
        echo: bool,
    },
    Chat {
        /// The messages as given, content parts of type text joined into one string.
        messages: Value,
        sampling: Sampling,
        /// `logprobs: true`, with `top_logprobs` (default 0) alternatives.
        logprobs: Option<usize>,
    },
    Embedding {
        inputs: Vec<PromptSrc>,
        base64: bool,
    },
}

/// A request line, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRequest {
    pub endpoint: Endpoint,
    /// `body.model`, echoed in the response.
    pub model: Option<String>,
    pub request: Request,
}

/// What is wrong with a request: an OpenAI error body with status 400.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub message: String,
    pub param: Option<String>,
}

fn err(message: impl Into<String>, param: Option<&str>) -> ApiError {
    ApiError {
        message: message.into(),
        param: param.map(str::to_string),
    }
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

/// Fields each endpoint reads; others are accepted and ignored (`user`, `metadata`, ...)
/// unless they ask for something lmgen does not do (see [`unsupported`]).
fn token_ids(v: &Value) -> Option<Vec<u32>> {
    v.as_array()?
        .iter()
        .map(|x| {
            x.as_u64()
                .filter(|&t| t <= u32::MAX as u64)
                .map(|t| t as u32)
        })
        .collect()
}

/// `prompt` / `input`: a string, a list of strings, a list of token ids, or a list of lists
/// of token ids.
fn prompts(v: Option<&Value>, name: &str) -> Result<Vec<PromptSrc>, ApiError> {
    let bad = || {
        err(
            format!("'{name}' must be a string, a list of strings, a list of token ids or a list of lists of token ids"),
            Some(name),
        )
    };
    let v = match v {
        None | Some(Value::Null) => return Err(err(format!("'{name}' is required"), Some(name))),
        Some(v) => v,
    };
    let out = match v {
        Value::String(s) => vec![PromptSrc::Text(s.clone())],
        Value::Array(a) if a.is_empty() => {
            return Err(err(format!("'{name}' must not be empty"), Some(name)))
        }
        Value::Array(a) if a[0].is_number() => vec![PromptSrc::Ids(token_ids(v).ok_or_else(bad)?)],
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => Ok(PromptSrc::Text(s.clone())),
                Value::Array(_) => match token_ids(x) {
                    Some(ids) if !ids.is_empty() => Ok(PromptSrc::Ids(ids)),
                    _ => Err(bad()),
                },
                _ => Err(bad()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad()),
    };
    Ok(out)
}

fn get<'a>(body: &'a Map<String, Value>, k: &str) -> Option<&'a Value> {
    body.get(k).filter(|v| !v.is_null())
}

fn uint(body: &Map<String, Value>, k: &str, min: u64) -> Result<Option<u64>, ApiError> {
    match get(body, k) {
        None => Ok(None),
        Some(v) => match v.as_u64() {
            Some(x) if x >= min => Ok(Some(x)),
            _ => Err(err(
                format!("'{k}' must be an integer >= {min}, got {v}"),
                Some(k),
            )),
        },
    }
}

fn float(body: &Map<String, Value>, k: &str) -> Result<Option<f64>, ApiError> {
    match get(body, k) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| err(format!("'{k}' must be a number, got {}", kind(v)), Some(k))),
    }
}

fn boolean(body: &Map<String, Value>, k: &str) -> Result<Option<bool>, ApiError> {
    match get(body, k) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(err(
            format!("'{k}' must be true or false, got {}", kind(v)),
            Some(k),
        )),
    }
}

/// Settings lmgen cannot honour: an error rather than a silently different result.
fn unsupported(body: &Map<String, Value>) -> Result<(), ApiError> {
    if boolean(body, "stream")? == Some(true) {
        return Err(err("'stream' is not supported in a batch", Some("stream")));
    }
    if get(body, "logit_bias").is_some_and(|v| v.as_object().is_none_or(|o| !o.is_empty())) {
        return Err(err(
            "'logit_bias' is not supported by lmgen",
            Some("logit_bias"),
        ));
    }
    if get(body, "suffix").is_some() {
        return Err(err("'suffix' is not supported by lmgen", Some("suffix")));
    }
    if get(body, "tools").is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()))
        || get(body, "functions").is_some()
    {
        return Err(err("tool calls are not supported by lmgen", Some("tools")));
    }
    if let Some(rf) = get(body, "response_format") {
        if rf.get("type").and_then(|t| t.as_str()) != Some("text") {
            return Err(err(
                "'response_format' other than {\"type\": \"text\"} is not supported by lmgen",
                Some("response_format"),
            ));
        }
    }
    Ok(())
}

fn sampling(body: &Map<String, Value>, chat: bool) -> Result<Sampling, ApiError> {
    let max_tokens = match (chat, uint(body, "max_completion_tokens", 1)?) {
        (true, Some(m)) => Some(m),
        _ => uint(body, "max_tokens", 1)?,
    };
    let temperature = float(body, "temperature")?;
    if let Some(t) = temperature {
        if !(0.0..=2.0).contains(&t) {
            return Err(err(
                format!("'temperature' must be between 0 and 2, got {t}"),
                Some("temperature"),
            ));
        }
    }
    let top_p = float(body, "top_p")?;
    if let Some(p) = top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(err(
                format!("'top_p' must be in (0, 1], got {p}"),
                Some("top_p"),
            ));
        }
    }
    let penalty = |k: &'static str| -> Result<Option<f32>, ApiError> {
        match float(body, k)? {
            Some(x) if !(-2.0..=2.0).contains(&x) => Err(err(
                format!("'{k}' must be between -2 and 2, got {x}"),
                Some(k),
            )),
            x => Ok(x.map(|x| x as f32)),
        }
    };
    let presence_penalty = penalty("presence_penalty")?;
    let frequency_penalty = penalty("frequency_penalty")?;
    let n = uint(body, "n", 1)?.unwrap_or(1);
    if n > 128 {
        return Err(err(format!("'n' must be at most 128, got {n}"), Some("n")));
    }
    if let Some(b) = uint(body, "best_of", 1)? {
        if b != n {
            return Err(err(
                "'best_of' other than n is not supported by lmgen",
                Some("best_of"),
            ));
        }
    }
    let stop = match get(body, "stop") {
        None => None,
        Some(Value::String(s)) => Some(vec![s.clone()]),
        Some(Value::Array(a)) => Some(
            a.iter()
                .map(|x| x.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| err("'stop' must be a string or a list of strings", Some("stop")))?,
        ),
        Some(v) => {
            return Err(err(
                format!(
                    "'stop' must be a string or a list of strings, got {}",
                    kind(v)
                ),
                Some("stop"),
            ))
        }
    };
    if stop
        .as_ref()
        .is_some_and(|s| s.iter().any(|x| x.is_empty()))
    {
        return Err(err("'stop' strings must not be empty", Some("stop")));
    }
    let seed = match get(body, "seed") {
        None => None,
        Some(v) => Some(match (v.as_u64(), v.as_i64()) {
            (Some(u), _) => u,
            // A negative seed is a seed too (two's complement).
            (None, Some(i)) => i as u64,
            _ => {
                return Err(err(
                    format!("'seed' must be an integer, got {v}"),
                    Some("seed"),
                ))
            }
        }),
    };
    Ok(Sampling {
        max_tokens: max_tokens.map(|x| x as usize),
        temperature: temperature.map(|x| x as f32),
        top_p: top_p.map(|x| x as f32),
        presence_penalty,
        frequency_penalty,
        n: n as usize,
        stop,
        seed,
    })
}

/// Most alternative tokens a request may ask for (vLLM's default `max_logprobs`).
pub const MAX_TOP_LOGPROBS: u64 = 20;

fn top_count(v: Option<u64>, k: &'static str) -> Result<Option<usize>, ApiError> {
    match v {
        Some(n) if n > MAX_TOP_LOGPROBS => Err(err(
            format!("'{k}' must be at most {MAX_TOP_LOGPROBS}, got {n}"),
            Some(k),
        )),
        v => Ok(v.map(|n| n as usize)),
    }
}

/// Chat messages: a non-empty list of objects with a string `role`; `content` a string, null,
/// or a list of `{"type": "text", "text": ...}` parts (joined with newlines, as vLLM does).
fn messages(body: &Map<String, Value>) -> Result<Value, ApiError> {
    let p = Some("messages");
    let Some(Value::Array(list)) = get(body, "messages") else {
        return Err(err("'messages' must be a list of messages", p));
    };
    if list.is_empty() {
        return Err(err("'messages' must not be empty", p));
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(err(format!("messages[{i}] must be an object"), p));
        };
        if !m.get("role").is_some_and(|r| r.is_string()) {
            return Err(err(format!("messages[{i}] has no string 'role'"), p));
        }
        let mut m = m.clone();
        // As transformers does: a key whose value is null is not there.
        m.retain(|_, v| !v.is_null());
        if let Some(Value::Array(parts)) = m.get("content") {
            let mut texts = Vec::new();
            for part in parts {
                match (
                    part.get("type").and_then(|t| t.as_str()),
                    part.get("text").and_then(|t| t.as_str()),
                ) {
                    (Some("text"), Some(t)) => texts.push(t.to_string()),
                    (ty, _) => {
                        return Err(err(
                            format!(
                            "messages[{i}]: content parts of type {} are not supported (text only)",
                            ty.unwrap_or("?")
                        ),
                            p,
                        ))
                    }
                }
            }
            m.insert("content".into(), Value::from(texts.join("\n")));
        } else if let Some(c) = m.get("content") {
            if !(c.is_string() || c.is_null()) {
                return Err(err(
                    format!("messages[{i}].content must be a string, a list of text parts or null"),
                    p,
                ));
            }
        }
        out.push(Value::Object(m));
    }
    Ok(Value::Array(out))
}

/// Read one batch line (already a JSON object).
pub fn parse_request(line: &Map<String, Value>) -> Result<BatchRequest, ApiError> {
    match line.get("custom_id") {
        Some(Value::String(_)) => {}
        Some(v) => {
            return Err(err(
                format!("'custom_id' must be a string, got {}", kind(v)),
                Some("custom_id"),
            ))
        }
        None => return Err(err("'custom_id' is required", Some("custom_id"))),
    }
    if let Some(m) = line.get("method") {
        if m.as_str() != Some("POST") {
            return Err(err(
                format!("'method' must be \"POST\", got {m}"),
                Some("method"),
            ));
        }
    }
    let url = match line.get("url") {
        Some(Value::String(u)) => u.as_str(),
        Some(v) => {
            return Err(err(
                format!("'url' must be a string, got {}", kind(v)),
                Some("url"),
            ))
        }
        None => return Err(err("'url' is required", Some("url"))),
    };
    let endpoint = match url {
        "/v1/completions" => Endpoint::Completions,
        "/v1/chat/completions" => Endpoint::ChatCompletions,
        "/v1/embeddings" => Endpoint::Embeddings,
        other => {
            return Err(err(
                format!("unsupported endpoint '{other}' (lmgen serves /v1/completions, /v1/chat/completions and /v1/embeddings)"),
                Some("url"),
            ))
        }
    };
    let body = match line.get("body") {
        Some(Value::Object(b)) => b,
        Some(v) => {
            return Err(err(
                format!("'body' must be an object, got {}", kind(v)),
                Some("body"),
            ))
        }
        None => return Err(err("'body' is required", Some("body"))),
    };
    let model = match get(body, "model") {
        None => None,
        Some(Value::String(m)) => Some(m.clone()),
        Some(v) => {
            return Err(err(
                format!("'model' must be a string, got {}", kind(v)),
                Some("model"),
            ))
        }
    };
    let request = match endpoint {
        Endpoint::Completions => {
            unsupported(body)?;
            let logprobs = top_count(uint(body, "logprobs", 0)?, "logprobs")?;
            let echo = boolean(body, "echo")?.unwrap_or(false);
            if echo && logprobs.is_some() {
                return Err(err(
                    "'echo' together with 'logprobs' is not supported by lmgen",
                    Some("echo"),
                ));
            }
            Request::Completion {
                prompts: prompts(body.get("prompt"), "prompt")?,
                sampling: sampling(body, false)?,
                logprobs,
                echo,
            }
        }
        Endpoint::ChatCompletions => {
            unsupported(body)?;
            let top = top_count(uint(body, "top_logprobs", 0)?, "top_logprobs")?;
            let logprobs = match (boolean(body, "logprobs")?.unwrap_or(false), top) {
                (true, top) => Some(top.unwrap_or(0)),
                (false, Some(k)) if k > 0 => {
                    return Err(err(
                        "'top_logprobs' needs 'logprobs': true",
                        Some("top_logprobs"),
                    ))
                }
                (false, _) => None,
            };
            Request::Chat {
                messages: messages(body)?,
                sampling: sampling(body, true)?,
                logprobs,
            }
        }
        Endpoint::Embeddings => {
            let base64 = match get(body, "encoding_format") {
                None => false,
                Some(Value::String(f)) if f == "float" => false,
                Some(Value::String(f)) if f == "base64" => true,
                Some(v) => {
                    return Err(err(
                        format!("'encoding_format' must be \"float\" or \"base64\", got {v}"),
                        Some("encoding_format"),
                    ))
                }
            };
            if get(body, "dimensions").is_some() {
                return Err(err(
                    "'dimensions' is not supported by lmgen (embeddings have the model's hidden size)",
                    Some("dimensions"),
                ));
            }
            Request::Embedding {
                inputs: prompts(body.get("input"), "input")?,
                base64,
            }
        }
    };
    Ok(BatchRequest {
        endpoint,
        model,
        request,
    })
}

/// Stable hex digest naming a request's response (`batch_req_…`, `cmpl-…`): from the line's
/// key and content, so a request gets the same ids in every run, shard or position.
pub fn response_hex(id_key: &str, line: Option<&Map<String, Value>>) -> String {
    let content = line
        .map(|l| Value::Object(l.clone()).to_string())
        .unwrap_or_default();
    super::sha256_hex(format!("{id_key}\n{content}").as_bytes())
}

/// One output line. `status` 200 with the endpoint's body, or 400 with an error body.
pub fn output_line(custom_id: &Value, hex: &str, status: u16, body: Value) -> String {
    json!({
        "id": format!("batch_req_{}", &hex[..32]),
        "custom_id": custom_id,
        "response": {
            "status_code": status,
            "request_id": format!("req_{}", &hex[32..64]),
            "body": body,
        },
        "error": null,
    })
    .to_string()
}

/// The body of a 400 response.
pub fn error_body(e: &ApiError) -> Value {
    json!({
        "error": {
            "message": e.message,
            "type": "invalid_request_error",
            "param": e.param,
            "code": null,
        }
    })
}

/// `length` when `max_tokens` ended it, else `stop` (a stop string or an end-of-sequence token).
pub fn finish_reason(reason: crate::engine::FinishReason) -> &'static str {
    match reason {
        crate::engine::FinishReason::Length => "length",
        _ => "stop",
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// A `/v1/completions` response; `choices` are ordered by `index`.
pub fn completion_body(
    hex: &str,
    created: u64,
    model: &str,
    choices: Vec<Value>,
    prompt_tokens: usize,
    completion_tokens: usize,
) -> Value {
    json!({
        "id": format!("cmpl-{}", &hex[..32]),
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    })
}

/// Log-probabilities of a choice's generated tokens: each token's text and log-probability,
/// and per token the most likely alternatives (empty when none were asked for).
#[derive(Debug, Clone, Copy)]
pub struct ChoiceLogprobs<'a> {
    pub tokens: &'a [String],
    pub logprobs: &'a [f32],
    pub top: &'a [Vec<(String, f32)>],
}

/// A `/v1/completions` choice. `logprobs`: each generated token's text and log-probability
/// (`text_offset` counts characters, as Python's `len` does); with alternatives,
/// `top_logprobs` maps their texts to log-probabilities, the chosen token included (as vLLM
/// does, so a position has N or N + 1 entries).
pub fn completion_choice(
    index: usize,
    text: &str,
    finish: &str,
    logprobs: Option<ChoiceLogprobs>,
) -> Value {
    let logprobs = logprobs.map(
        |ChoiceLogprobs {
             tokens,
             logprobs: lps,
             top,
         }| {
            let top_logprobs = (!top.is_empty()).then(|| {
                top.iter()
                    .zip(tokens.iter().zip(lps))
                    .map(|(alts, (t, lp))| {
                        let mut m = Map::new();
                        for (a, l) in alts {
                            m.entry(a.clone()).or_insert(json!(l));
                        }
                        m.entry(t.clone()).or_insert(json!(lp));
                        Value::Object(m)
                    })
                    .collect::<Vec<_>>()
            });
            let mut offset = 0usize;
            let offsets: Vec<usize> = tokens
                .iter()
                .map(|t| {
                    let o = offset;
                    offset += t.chars().count();
                    o
                })
                .collect();
            json!({
                "tokens": tokens,
                "token_logprobs": lps,
                "top_logprobs": top_logprobs,
                "text_offset": offsets,
            })
        },
    );
    json!({
        "index": index,
        "text": text,
        "logprobs": logprobs,
        "finish_reason": finish,
    })
}

/// A `/v1/chat/completions` response.
pub fn chat_body(
    hex: &str,
    created: u64,
    model: &str,
    choices: Vec<Value>,
    prompt_tokens: usize,
    completion_tokens: usize,
) -> Value {
    json!({
        "id": format!("chatcmpl-{}", &hex[..32]),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    })
}

/// A chat choice: the assistant's message, and with `logprobs` each token's (and its
/// `top_logprobs` alternatives, most likely first).
pub fn chat_choice(
    index: usize,
    text: &str,
    finish: &str,
    logprobs: Option<ChoiceLogprobs>,
) -> Value {
    let logprobs = logprobs.map(
        |ChoiceLogprobs {
             tokens,
             logprobs: lps,
             top,
         }| {
            let content: Vec<Value> = tokens
                .iter()
                .zip(lps)
                .enumerate()
                .map(|(i, (t, lp))| {
                    let alts: Vec<Value> = top.get(i).map_or(Vec::new(), |alts| {
                        alts.iter()
                            .map(|(a, l)| json!({"token": a, "logprob": l, "bytes": a.as_bytes()}))
                            .collect()
                    });
                    json!({
                        "token": t,
                        "logprob": lp,
                        "bytes": t.as_bytes(),
                        "top_logprobs": alts,
                    })
                })
                .collect();
            json!({"content": content, "refusal": null})
        },
    );
    json!({
        "index": index,
        "message": {"role": "assistant", "content": text, "refusal": null},
        "logprobs": logprobs,
        "finish_reason": finish,
    })
}

/// A `/v1/embeddings` response.
pub fn embedding_body(
    model: &str,
    vectors: &[Vec<f32>],
    base64: bool,
    prompt_tokens: usize,
) -> Value {
    let data: Vec<Value> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Value::from(base64_encode(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    })
}

fn base64_encode(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// L2-normalize (OpenAI embeddings have length 1).
pub fn normalize(v: &mut [f32]) {
    let norm = v
        .iter()
        .map(|x| (*x as f64) * (*x as f64))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        for x in v {
            *x = (*x as f64 / norm) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(v: Value) -> Result<BatchRequest, ApiError> {
        parse_request(v.as_object().unwrap())
    }

    #[test]
    fn detects_batch_files() {
        assert!(is_batch_file(&[
            b"",
            b"{\"custom_id\":\"a\",\"url\":\"/v1/completions\"}"
        ]));
        assert!(is_batch_file(&[
            b"{\"url\":\"/v1/completions\",\"body\":{}}"
        ]));
        assert!(!is_batch_file(&[b"{\"prompt\":\"x\",\"id\":\"a\"}"]));
        assert!(!is_batch_file(&[b"{oops"]));
    }

    #[test]
    fn batch_input_entries_are_keyed_by_custom_id() {
        use crate::job::input::{parse_input, Entry};
        let text = "{\"custom_id\": \"a\", \"url\": \"/v1/completions\", \"body\": {}}\n\n{oops\n{\"url\": \"/v1/embeddings\", \"body\": {}}\n";
        // Bad lines are entries (error responses), even without --skip-bad-lines.
        let inp = parse_input("b.jsonl", "b.jsonl", text.as_bytes(), false).unwrap();
        assert!(inp.openai);
        let ids: Vec<Value> = inp.entries.iter().map(|e| e.id().clone()).collect();
        assert_eq!(ids, vec![json!("a"), json!(2), json!(3)]);
        assert!(
            matches!(&inp.entries[1], Entry::Bad(b) if b.message.starts_with("line 3: malformed JSON"))
        );
        let Entry::Ok(r) = &inp.entries[2] else {
            panic!()
        };
        assert_eq!((r.index, r.line, r.overrides.n), (2, 4, Some(1)));
        assert!(r.batch.is_some());
        let plain = parse_input("p.jsonl", "p.jsonl", b"{\"prompt\": \"x\"}\n", false).unwrap();
        assert!(!plain.openai);
    }

    #[test]
    fn completions() {
        let r = line(
            json!({"custom_id": "a", "method": "POST", "url": "/v1/completions",
            "body": {"model": "m", "prompt": ["x", [1, 2]], "max_tokens": 5, "n": 2,
                     "stop": "\n", "seed": -1, "logprobs": 0, "presence_penalty": 0}}),
        )
        .unwrap();
        assert_eq!(r.model.as_deref(), Some("m"));
        let Request::Completion {
            prompts,
            sampling,
            logprobs,
            echo,
        } = r.request
        else {
            panic!()
        };
        assert_eq!(
            prompts,
            vec![PromptSrc::Text("x".into()), PromptSrc::Ids(vec![1, 2])]
        );
        assert_eq!(sampling.max_tokens, Some(5));
        assert_eq!(sampling.n, 2);
        assert_eq!(sampling.seed, Some(u64::MAX));
        assert_eq!(sampling.stop, Some(vec!["\n".to_string()]));
        assert!(logprobs == Some(0) && !echo);
        let r =
            line(json!({"custom_id": "a", "url": "/v1/completions", "body": {"prompt": [3, 4]}}))
                .unwrap();
        assert!(
            matches!(r.request, Request::Completion { ref prompts, .. } if prompts == &vec![PromptSrc::Ids(vec![3, 4])])
        );
    }

    #[test]
    fn errors_name_the_field() {
        for (v, param, what) in [
            (
                json!({"url": "/v1/completions", "body": {"prompt": "x"}}),
                "custom_id",
                "required",
            ),
            (
                json!({"custom_id": "a", "url": "/v1/images", "body": {}}),
                "url",
                "unsupported endpoint",
            ),
            (
                json!({"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "presence_penalty": 2.5}}),
                "presence_penalty",
                "between -2 and 2",
            ),
            (
                json!({"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "logprobs": 21}}),
                "logprobs",
                "at most 20",
            ),
            (
                json!({"custom_id": "a", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}}),
                "top_logprobs",
                "needs 'logprobs': true",
            ),
            (
                json!({"custom_id": "a", "url": "/v1/completions", "body": {"prompt": 5}}),
                "prompt",
                "must be",
            ),
            (
                json!({"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x", "temperature": 3}}),
                "temperature",
                "between 0 and 2",
            ),
            (
                json!({"custom_id": "a", "url": "/v1/chat/completions", "body": {"messages": []}}),
                "messages",
                "not be empty",
            ),
            (
                json!({"custom_id": "a", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}}),
                "messages",
                "text only",
            ),
            (
                json!({"custom_id": "a", "url": "/v1/embeddings", "body": {"input": "x", "encoding_format": "int8"}}),
                "encoding_format",
                "must be",
            ),
        ] {
            let e = line(v).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{}", e.message);
            assert!(e.message.contains(what), "{}", e.message);
        }
    }

    #[test]
    fn chat_parts_and_bodies() {
        let r = line(json!({"custom_id": "a", "url": "/v1/chat/completions", "body": {
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_completion_tokens": 3}}))
        .unwrap();
        let Request::Chat {
            messages, sampling, ..
        } = r.request
        else {
            panic!()
        };
        assert_eq!(messages, json!([{"role": "user", "content": "a\nb"}]));
        assert_eq!(sampling.max_tokens, Some(3));
        assert_eq!(base64_encode(b"abcd"), "YWJjZA==");
        let hex = response_hex("\"a\"", None);
        let l: Value = serde_json::from_str(&output_line(
            &json!("a"),
            &hex,
            400,
            error_body(&err("bad", Some("x"))),
        ))
        .unwrap();
        assert_eq!(l["response"]["status_code"], 400);
        assert_eq!(l["response"]["body"]["error"]["param"], "x");
        assert!(l["id"].as_str().unwrap().starts_with("batch_req_"));
    }
}
