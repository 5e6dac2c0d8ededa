//! `lmgen generate` on an OpenAI batch file (docs/cli.md, "OpenAI batch files"): one output
//! line per request line, in input order, through the same job (resume, shards, lock,
//! manifest) as any other input, keyed by `custom_id`.
use crate::args::GenerateArgs;
use crate::commands::{end_job, load_model, nothing_to_do};
use crate::progress::Progress;
use crate::user_err;
use candle_core::DType;
use lmgen_core::engine::{embed_batch, GenOutput, GenRequest, Generator, Pool};
use lmgen_core::hub::ModelLocation;
use lmgen_core::job::openai::{self as oa, ApiError, BatchRequest, Request};
use lmgen_core::job::{id_key, Entry, Job, OutFormat, OutRecord, PromptSrc, RecordWriter};
use lmgen_core::loader::Model;
use lmgen_core::plan::Placement;
use lmgen_core::sampling::{stream_key, SamplingParams};
use lmgen_core::tokenizer::chat::ChatTemplate;
use serde_json::Value;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// What one request line needs.
enum Work {
    Error(ApiError),
    Embed {
        inputs: Vec<Vec<u32>>,
        base64: bool,
    },
    Gen {
        chat: bool,
        prompts: Vec<Vec<u32>>,
        /// The prompts' text (for `echo`).
        texts: Vec<String>,
        n: usize,
        max_tokens: usize,
        params: SamplingParams,
        stream_key: Option<u64>,
        stop: Vec<String>,
        /// Chosen tokens' log-probabilities and this many alternatives.
        logprobs: Option<usize>,
        echo: bool,
    },
}

struct Line {
    index: usize,
    custom_id: Value,
    /// Digest naming the response (`batch_req_…`, `cmpl-…`).
    hex: String,
    /// `model` of the response body.
    model: String,
    work: Work,
}

impl Line {
    fn cost(&self) -> u64 {
        match &self.work {
            Work::Error(_) => 1,
            Work::Embed { inputs, .. } => inputs.iter().map(|i| i.len() as u64).sum(),
            Work::Gen {
                prompts,
                n,
                max_tokens,
                ..
            } => prompts
                .iter()
                .map(|p| (p.len() + n * max_tokens) as u64)
                .sum(),
        }
    }

    fn record(&self, status: u16, body: Value) -> OutRecord {
        OutRecord {
            index: self.index,
            sample: 0,
            id_key: id_key(&self.custom_id),
            body: oa::output_line(&self.custom_id, &self.hex, status, body),
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn bad(message: String) -> ApiError {
    ApiError {
        message,
        param: None,
    }
}

/// A prompt's token ids, checked against the model (`special`: add BOS etc. as the
/// tokenizer does, for text prompts).
fn tokens(
    model: &Model,
    p: &PromptSrc,
    special: bool,
) -> anyhow::Result<Result<Vec<u32>, ApiError>> {
    let ids = match p {
        PromptSrc::Text(t) if special => model.tokenizer.encode(t)?,
        PromptSrc::Text(t) => model.tokenizer.encode_raw(t)?,
        PromptSrc::Ids(ids) => ids.clone(),
    };
    if ids.is_empty() {
        return Ok(Err(bad("the prompt is empty (it has no tokens)".into())));
    }
    if let Err(e) = model.check_prompt(&ids) {
        let msg = e.to_string();
        let msg = msg
            .split(" (use --truncate")
            .next()
            .unwrap_or(&msg)
            .to_string();
        return Ok(Err(bad(msg)));
    }
    Ok(Ok(ids))
}

struct Ctx<'a> {
    a: &'a GenerateArgs,
    model: &'a Model,
    template: Option<&'a ChatTemplate>,
}

impl Ctx<'_> {
    /// The work of one line: what it asks, tokenized and checked.
    fn work(&self, key: &str, req: BatchRequest) -> anyhow::Result<Work> {
        let a = self.a;
        let all =
            |ps: &[PromptSrc], special: bool| -> anyhow::Result<Result<Vec<Vec<u32>>, ApiError>> {
                let mut out = Vec::new();
                for p in ps {
                    match tokens(self.model, p, special)? {
                        Ok(ids) => out.push(ids),
                        Err(e) => return Ok(Err(e)),
                    }
                }
                Ok(Ok(out))
            };
        let (prompts, texts, sampling, logprobs, echo, chat) = match req.request {
            Request::Embedding { inputs, base64 } => {
                return Ok(match all(&inputs, true)? {
                    Ok(inputs) => Work::Embed { inputs, base64 },
                    Err(e) => Work::Error(e),
                })
            }
            Request::Completion {
                prompts,
                sampling,
                logprobs,
                echo,
            } => {
                let ids = match all(&prompts, true)? {
                    Ok(ids) => ids,
                    Err(e) => return Ok(Work::Error(e)),
                };
                let mut texts = Vec::new();
                for (p, i) in prompts.iter().zip(&ids) {
                    texts.push(match p {
                        PromptSrc::Text(t) => t.clone(),
                        PromptSrc::Ids(_) => self.model.tokenizer.decode(i)?,
                    });
                }
                (ids, texts, sampling, logprobs, echo, false)
            }
            Request::Chat {
                messages,
                sampling,
                logprobs,
            } => {
                let Some(t) = self.template else {
                    return Ok(Work::Error(bad(format!(
                        "the model {} has no chat template (chat_template in tokenizer_config.json, chat_template.jinja, or tokenizer.chat_template in a GGUF file); use /v1/completions",
                        a.model.model
                    ))));
                };
                let text = match t.render(&messages, true, &serde_json::Map::new()) {
                    Ok(s) => s,
                    Err(e) => return Ok(Work::Error(bad(e))),
                };
                // The template writes the special tokens itself (transformers tokenizes it
                // with add_special_tokens=False).
                let ids = match tokens(self.model, &PromptSrc::Text(text.clone()), false)? {
                    Ok(ids) => ids,
                    Err(e) => return Ok(Work::Error(e)),
                };
                (vec![ids], vec![text], sampling, logprobs, false, true)
            }
        };
        let params = SamplingParams {
            temperature: sampling.temperature.unwrap_or(a.temperature),
            top_k: a.top_k,
            top_p: sampling.top_p.or(a.top_p),
            repetition_penalty: a.repetition_penalty,
            presence_penalty: sampling.presence_penalty.or(a.presence_penalty),
            frequency_penalty: sampling.frequency_penalty.or(a.frequency_penalty),
            seed: sampling.seed.or(a.seed),
        };
        if let Err(e) = params.validate() {
            return Ok(Work::Error(bad(e)));
        }
        Ok(Work::Gen {
            chat,
            prompts,
            texts,
            n: sampling.n,
            max_tokens: sampling.max_tokens.unwrap_or(a.max_new_tokens),
            params,
            // A request's own seed alone decides its stream; else the job's seed and its id.
            stream_key: sampling.seed.is_none().then(|| stream_key(key)),
            stop: sampling.stop.unwrap_or_else(|| a.stop.clone()),
            logprobs,
            echo,
        })
    }

    fn line(&self, e: &Entry) -> anyhow::Result<Line> {
        let model = |r: Option<&BatchRequest>| {
            r.and_then(|r| r.model.clone())
                .unwrap_or_else(|| self.a.model.model.clone())
        };
        Ok(match e {
            Entry::Bad(b) => Line {
                index: b.index,
                custom_id: b.id.clone(),
                hex: oa::response_hex(&id_key(&b.id), None),
                model: model(None),
                work: Work::Error(bad(b.message.clone())),
            },
            Entry::Ok(r) => {
                let key = id_key(&r.id);
                let batch = r.batch.as_ref();
                let hex = oa::response_hex(&key, batch);
                let parsed = match batch {
                    Some(b) => oa::parse_request(b),
                    None => Err(bad("not an OpenAI batch request".into())),
                };
                let (m, work) = match parsed {
                    Ok(req) => (model(Some(&req)), self.work(&key, req)?),
                    Err(e) => (model(None), Work::Error(e)),
                };
                Line {
                    index: r.index,
                    custom_id: r.id.clone(),
                    hex,
                    model: m,
                    work,
                }
            }
        })
    }
}

/// Generated tokens as text pieces, for logprobs.
fn token_texts(model: &Model, ids: &[u32]) -> anyhow::Result<Vec<String>> {
    ids.iter()
        .map(|&t| Ok(model.tokenizer.decode_with_special(&[t])?))
        .collect()
}

/// The response body of a generation line once all its choices are there.
fn gen_body(model: &Model, line: &Line, outs: &[GenOutput]) -> anyhow::Result<Value> {
    let Work::Gen {
        chat,
        prompts,
        texts,
        n,
        logprobs,
        echo,
        ..
    } = &line.work
    else {
        unreachable!("a generation line")
    };
    let mut choices = Vec::with_capacity(outs.len());
    let mut completion_tokens = 0;
    for (i, out) in outs.iter().enumerate() {
        completion_tokens += out.token_ids.len();
        let finish = oa::finish_reason(out.finish_reason);
        let pieces = match logprobs {
            Some(_) => Some(token_texts(model, &out.token_ids)?),
            None => None,
        };
        let lps = out.logprobs.clone().unwrap_or_default();
        let mut top = Vec::new();
        for alts in out.top_logprobs.iter().flatten() {
            let mut v = Vec::with_capacity(alts.len());
            for &(t, l) in alts {
                v.push((model.tokenizer.decode_with_special(&[t])?, l));
            }
            top.push(v);
        }
        let lp = pieces.as_ref().map(|p| oa::ChoiceLogprobs {
            tokens: p,
            logprobs: &lps,
            top: &top,
        });
        choices.push(if *chat {
            oa::chat_choice(i, &out.text, finish, lp)
        } else {
            let text = if *echo {
                format!("{}{}", texts[i / n], out.text)
            } else {
                out.text.clone()
            };
            oa::completion_choice(i, &text, finish, lp)
        });
    }
    let prompt_tokens = prompts.iter().map(Vec::len).sum();
    let f = if *chat {
        oa::chat_body
    } else {
        oa::completion_body
    };
    Ok(f(
        &line.hex,
        unix_now(),
        &line.model,
        choices,
        prompt_tokens,
        completion_tokens,
    ))
}

/// Run a job whose input is an OpenAI batch file (opened by `generate`).
pub fn generate(
    a: &GenerateArgs,
    mut job: Job,
    location: &ModelLocation,
    placement: Placement,
    dtype: DType,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<()> {
    if !job.input.openai {
        return Err(user_err!(
            "{}: --format openai: the first line is not an OpenAI batch request (a JSON object with custom_id, method, url and body)",
            job.input.name
        ));
    }
    if job.plan.format != OutFormat::Jsonl {
        return Err(user_err!(
            "{}: an OpenAI batch file gives JSONL output; name the output .jsonl (or - for standard output)",
            a.output
        ));
    }
    if a.hidden_states.is_some() {
        return Err(user_err!(
            "--hidden-states is not available for OpenAI batch files (use an lmgen JSONL input)"
        ));
    }
    let input = std::mem::take(&mut job.input);
    let done_set = std::mem::take(&mut job.plan.done);
    let done = |e: &Entry| done_set.contains(&(id_key(e.id()), 0));
    if job.was_complete() || (job.shard.is_whole() && input.entries.iter().all(done)) {
        return nothing_to_do(&mut job, &a.output);
    }
    let lengths = input.entries.iter().map(|_| a.max_new_tokens);
    let steps = crate::commands::decode_steps(lengths, a.input.batch_size);
    let model = load_model(location, &a.model, placement, dtype, steps)?;
    let template = ChatTemplate::for_model(location, &model.tokenizer)?;
    let ctx = Ctx {
        a,
        model: &model,
        template: template.as_ref(),
    };
    // Every line is read and tokenized (the shards' split depends on all of them).
    let mut lines = Vec::with_capacity(input.entries.len());
    for e in &input.entries {
        lines.push(ctx.line(e)?);
    }
    let costs: Vec<u64> = lines.iter().map(Line::cost).collect();
    let owned = job.owned(&costs);
    job.set_total(owned.iter().filter(|&&o| o).count())?;
    let lines: Vec<Line> = lines
        .into_iter()
        .filter(|l| owned[l.index] && !done(&input.entries[l.index]))
        .collect();
    for l in &lines {
        if let Work::Error(e) = &l.work {
            eprintln!(
                "lmgen: warning: {}: custom_id {}: {} (error response written)",
                input.name, l.custom_id, e.message
            );
        }
    }

    let expected: Vec<(usize, usize)> = lines.iter().map(|l| (l.index, 0)).collect();
    let progress = RefCell::new(Progress::new(expected.len()));
    crate::signals::writing(true);
    let mut writer = RecordWriter::open(&job.plan, expected)?;
    let job = RefCell::new(job);
    let push = |writer: &mut RecordWriter, rec: OutRecord, tokens: u64| -> anyhow::Result<()> {
        let n = writer.push(rec)?;
        progress.borrow_mut().records(n);
        job.borrow_mut().progress(n, tokens)?;
        Ok(())
    };

    // Error responses and embeddings first (the writer keeps input order), then generation.
    let mut requests = Vec::new();
    let first = (|| -> anyhow::Result<()> {
        let last_layer = model.spec().num_layers;
        for l in &lines {
            match &l.work {
                Work::Error(e) => push(&mut writer, l.record(400, oa::error_body(e)), 0)?,
                Work::Embed { inputs, base64 } => {
                    let mut vectors = Vec::with_capacity(inputs.len());
                    for chunk in inputs.chunks(a.input.batch_size) {
                        if stop.load(Ordering::Relaxed) {
                            return Err(lmgen_core::Error::Interrupted(
                                "stopped by a signal".into(),
                            )
                            .into());
                        }
                        let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
                        for per_layer in embed_batch(&model, &refs, &[last_layer], Pool::Last)? {
                            let mut v: Vec<f32> = per_layer[0].to_dtype(DType::F32)?.to_vec1()?;
                            oa::normalize(&mut v);
                            vectors.push(v);
                        }
                    }
                    let tokens: usize = inputs.iter().map(Vec::len).sum();
                    progress.borrow_mut().tokens(tokens);
                    let body = oa::embedding_body(&l.model, &vectors, *base64, tokens);
                    push(&mut writer, l.record(200, body), tokens as u64)?;
                }
                Work::Gen {
                    prompts,
                    n,
                    max_tokens,
                    params,
                    stream_key,
                    stop,
                    logprobs,
                    ..
                } => {
                    for (p, ids) in prompts.iter().enumerate() {
                        for j in 0..*n {
                            requests.push(GenRequest {
                                index: l.index,
                                // OpenAI numbers choices prompt by prompt: index = p * n + j.
                                sample: p * n + j,
                                prompt_ids: ids.clone(),
                                max_new_tokens: *max_tokens,
                                params: params.clone(),
                                stop: stop.clone(),
                                logprobs: logprobs.is_some(),
                                top_logprobs: logprobs.unwrap_or(0),
                                ignore_eos: a.ignore_eos,
                                stream_key: *stream_key,
                            });
                        }
                    }
                }
            }
        }
        Ok(())
    })();
    if let Err(e) = first {
        let mut job = job.into_inner();
        return end_job(&mut job, writer, Err(e), &a.output);
    }

    let by_index: HashMap<usize, &Line> = lines.iter().map(|l| (l.index, l)).collect();
    let mut pending: HashMap<usize, Vec<Option<GenOutput>>> = HashMap::new();
    let mut write_err: Option<anyhow::Error> = None;
    let mut generator = Generator::new(&model, a.input.batch_size);
    generator.max_step_tokens = a.max_step_tokens;
    generator.kv_memory = a.model.kv_memory;
    generator.prefix_cache = !a.no_prefix_cache;
    generator.paged = a.executor == "paged";
    generator.stop = Some(stop.clone());
    let result = generator.run(
        requests,
        |out: GenOutput| {
            let line = by_index[&out.index];
            let Work::Gen { prompts, n, .. } = &line.work else {
                unreachable!("a generation line")
            };
            let slots = pending
                .entry(out.index)
                .or_insert_with(|| vec![None; prompts.len() * n]);
            let s = out.sample;
            slots[s] = Some(out);
            if slots.iter().any(Option::is_none) {
                return Ok(());
            }
            let outs: Vec<GenOutput> = pending
                .remove(&line.index)
                .unwrap_or_default()
                .into_iter()
                .flatten()
                .collect();
            let tokens: usize = outs
                .iter()
                .map(|o| o.prompt_ids.len() + o.token_ids.len())
                .sum();
            let written = gen_body(&model, line, &outs)
                .and_then(|body| push(&mut writer, line.record(200, body), tokens as u64));
            match written {
                Ok(()) => Ok(()),
                Err(e) => {
                    write_err = Some(e);
                    Err(lmgen_core::Error::BadRequest("output failed".into()))
                }
            }
        },
        |stats| progress.borrow_mut().tokens(stats.generated_tokens),
    );
    let mut job = job.into_inner();
    if let Some(e) = write_err {
        return Err(e);
    }
    end_job(&mut job, writer, result.map_err(Into::into), &a.output)?;
    progress.into_inner().finish();
    Ok(())
}
