//! The three subcommands. Order of work in each: arguments → input file (fully validated)
//! → output checks → model → per-prompt checks (tokenize, context) → output opened → run.
use crate::args::{
    EmbedArgs, GenerateArgs, HiddenOf, InputArgs, ModelArgs, PoolArg, ResumeArgs, ScoreArgs,
    Truncate,
};
use crate::progress::Progress;
use crate::user_err;
use crate::util::placement_and_dtype;
use candle_core::DType;
use lmgen_core::engine::{
    embed_batch, embed_ranges, score_batch, GenOutput, GenRequest, Generator, Pool,
};
use lmgen_core::hub::ModelLocation;
use lmgen_core::job::hidden::HiddenSink;
use lmgen_core::job::{
    format_for, id_key, BadRecord, Entry, Input, InputRecord, Job as JobState, JobConfig,
    OutFormat, OutRecord, OutputPlan, PromptSrc, RecordWriter, Shard,
};
use lmgen_core::loader::{load, LoadOptions, Model};
use lmgen_core::plan::{Placement, Workload, DEFAULT_MAX_STEP_TOKENS};
use lmgen_core::sampling::{stream_key, SamplingParams};
use serde::Serialize;
use serde_json::Value;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `steps`: about how many model steps the job will run (decides `--mmap auto`).
pub(crate) fn load_model(
    location: &ModelLocation,
    m: &ModelArgs,
    placement: Placement,
    dtype: DType,
    steps: usize,
) -> anyhow::Result<Model> {
    let model = load(
        location,
        &LoadOptions {
            placement,
            dtype,
            quantize: m.quantize,
            keep_quantized: !m.dequantize,
            map_weights: m.map_weights().in_place(steps),
        },
    )?;
    if let Some(p) = &model.placement {
        eprintln!(
            "lmgen: placing layers: {}",
            p.devices
                .iter()
                .map(|d| format!(
                    "{} {}-{}",
                    d.device,
                    d.blocks.0,
                    d.blocks.1.saturating_sub(1)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(model)
}

/// What `--device auto` plans room for besides the weights.
fn workload(m: &ModelArgs, batch: usize, max_step_tokens: usize) -> Workload {
    Workload {
        batch,
        context: None,
        max_step_tokens,
        kv_bytes: m.kv_memory.map(|b| b as u64),
    }
}

/// About how many model steps generating `lengths` new tokens takes with `batch` sequences
/// at a time: the longest request, or all tokens shared out over the batch, whichever is more.
pub(crate) fn decode_steps(lengths: impl Iterator<Item = usize>, batch: usize) -> usize {
    let (total, longest) = lengths.fold((0usize, 0usize), |(t, l), n| (t + n, l.max(n)));
    longest.max(total.div_ceil(batch.max(1)))
}

/// Tokenizes prompts and checks them against the model.
struct Prep<'m> {
    model: &'m Model,
    /// What the tokenizer puts before any text (e.g. BOS); kept by `--truncate left`.
    prefix: Vec<u32>,
    truncate: Option<Truncate>,
}

impl<'m> Prep<'m> {
    fn new(model: &'m Model, truncate: Option<Truncate>) -> anyhow::Result<Self> {
        let prefix = model.tokenizer.encode("")?;
        Ok(Self {
            model,
            prefix,
            truncate,
        })
    }

    /// The prompt's token ids, or what is wrong with it (a user error).
    fn ids(&self, rec: &InputRecord) -> anyhow::Result<Result<Vec<u32>, String>> {
        let mut ids = match &rec.prompt {
            PromptSrc::Text(t) => self.model.tokenizer.encode(t)?,
            PromptSrc::Ids(ids) => ids.clone(),
        };
        if ids.is_empty() {
            return Ok(Err("the prompt is empty (it has no tokens)".into()));
        }
        if let Some(ctx) = self.model.context_length() {
            if ids.len() > ctx {
                match self.truncate {
                    None => {
                        return Ok(Err(format!(
                            "prompt has {} tokens, more than the model's context of {ctx} (use --truncate left|right)",
                            ids.len()
                        )))
                    }
                    Some(Truncate::Right) => ids.truncate(ctx),
                    Some(Truncate::Left) => {
                        let keep = if !self.prefix.is_empty() && ids.starts_with(&self.prefix) && self.prefix.len() < ctx {
                            self.prefix.len()
                        } else {
                            0
                        };
                        let tail = ids.len() - (ctx - keep);
                        ids.drain(keep..tail);
                    }
                }
            }
        }
        if let Err(e) = self.model.check_prompt(&ids) {
            return Ok(Err(e.to_string()));
        }
        Ok(Ok(ids))
    }

    fn prompt_text(&self, rec: &InputRecord, ids: &[u32]) -> anyhow::Result<String> {
        Ok(match &rec.prompt {
            PromptSrc::Text(t) => t.clone(),
            PromptSrc::Ids(_) => self.model.tokenizer.decode(ids)?,
        })
    }
}

fn error_body(format: OutFormat, bad: &BadRecord) -> String {
    match format {
        OutFormat::Jsonl => {
            let mut m = serde_json::Map::new();
            m.insert("id".into(), bad.id.clone());
            m.insert("error".into(), Value::from(bad.message.clone()));
            Value::Object(m).to_string()
        }
        OutFormat::Text => format!("lmgen: error: {}", bad.message),
    }
}

fn error_record(format: OutFormat, bad: &BadRecord) -> OutRecord {
    eprintln!(
        "lmgen: warning: {} (skipped; error record written)",
        bad.message
    );
    OutRecord {
        index: bad.index,
        sample: 0,
        id_key: id_key(&bad.id),
        body: error_body(format, bad),
    }
}

fn note_resume(plan: &OutputPlan, out: &str, input: &Input) {
    if plan.path.is_some() {
        let mut seen = std::collections::HashSet::new();
        if let Some(dup) = input
            .entries
            .iter()
            .map(|e| id_key(e.id()))
            .find(|k| !seen.insert(k.clone()))
        {
            eprintln!(
                "lmgen: warning: {}: id {dup} is used by more than one input; --resume cannot tell such records apart",
                input.name
            );
        }
    }
    if !plan.done.is_empty() {
        eprintln!(
            "lmgen: resuming {out}: {} record(s) already written",
            plan.done.len()
        );
    }
}

// ---------------------------------------------------------------------------------------
// generate

#[derive(Serialize)]
struct GenRecord<'a> {
    id: &'a Value,
    prompt: &'a str,
    text: &'a str,
    token_ids: &'a [u32],
    finish_reason: &'static str,
    prompt_tokens: usize,
    completion_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<&'a [f32]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sample: Option<usize>,
}

struct GenInfo {
    id: Value,
    prompt_text: String,
    n: usize,
}

enum Job {
    Bad(BadRecord),
    Gen {
        index: usize,
        samples: Vec<usize>,
        request: GenRequest,
    },
}

pub fn generate(a: GenerateArgs, stop: &Arc<AtomicBool>) -> anyhow::Result<()> {
    let base = SamplingParams {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        presence_penalty: a.presence_penalty,
        frequency_penalty: a.frequency_penalty,
        seed: a.seed,
    };
    base.validate().map_err(|e| user_err!("{e}"))?;
    if a.stop.iter().any(|s| s.is_empty()) {
        return Err(user_err!("--stop: stop strings must not be empty"));
    }
    let (placement, dtype) = placement_and_dtype(
        &a.model,
        workload(&a.model, a.input.batch_size, a.max_step_tokens),
    )?;
    let format = format_for(&a.output);
    let settings = json_map(serde_json::json!({
        "max_new_tokens": a.max_new_tokens,
        "temperature": short_f32(a.temperature),
        "top_k": a.top_k,
        "top_p": a.top_p.map(short_f32),
        "repetition_penalty": a.repetition_penalty.map(short_f32),
        "presence_penalty": a.presence_penalty.map(short_f32),
        "frequency_penalty": a.frequency_penalty.map(short_f32),
        "seed": a.seed,
        "stop": a.stop,
        "n": a.num_return_sequences,
        "logprobs": a.logprobs,
        "ignore_eos": a.ignore_eos,
        "hidden_states": a.hidden_states,
        "hidden_pool": a.hidden_states.as_ref().map(|_| a.hidden_pool.name()),
        "hidden_of": a.hidden_states.as_ref().map(|_| a.hidden_of.name()),
    }));
    if a.hidden_states.is_some() && a.output == "-" {
        return Err(user_err!(
            "--hidden-states writes files beside the output; give --output FILE"
        ));
    }
    if let Some(l) = &a.hidden_states {
        check_layers(l)?;
    }
    let (mut job, location) = open_job(
        "generate", &a.model, &a.input, &a.output, format, &a.resume, dtype, settings,
    )?;
    if job.input.openai || a.format == "openai" {
        return crate::openai::generate(&a, job, &location, placement, dtype, stop);
    }
    let input = std::mem::take(&mut job.input);
    let done_set = std::mem::take(&mut job.plan.done);
    if format == OutFormat::Text && a.logprobs {
        eprintln!(
            "lmgen: note: --logprobs needs a .jsonl output; {} is plain text",
            a.output
        );
    }
    // The whole job with every record there: no need to load the model.
    let n_of = |e: &Entry| match e {
        Entry::Ok(r) => r.overrides.n.unwrap_or(a.num_return_sequences),
        Entry::Bad(_) => 1,
    };
    let done = |e: &Entry, s: usize| done_set.contains(&(id_key(e.id()), s));
    if job.shard.is_whole()
        && input
            .entries
            .iter()
            .all(|e| (0..n_of(e)).all(|s| done(e, s)))
    {
        return nothing_to_do(&mut job, &a.output);
    }
    if job.was_complete() {
        return nothing_to_do(&mut job, &a.output);
    }

    let lengths = input.entries.iter().flat_map(|e| {
        let max_new = match e {
            Entry::Ok(r) => r.overrides.max_new_tokens.unwrap_or(a.max_new_tokens),
            Entry::Bad(_) => 0,
        };
        (0..n_of(e))
            .filter(move |&s| !done(e, s))
            .map(move |_| max_new)
    });
    let steps = decode_steps(lengths, a.input.batch_size);
    let model = load_model(&location, &a.model, placement, dtype, steps)?;
    let prep = Prep::new(&model, a.input.truncate)?;
    let skip = a.input.skip_bad_lines;
    // Every entry is tokenized and checked (the shards' split depends on all prompts' sizes).
    let mut prepared: Vec<Result<(Vec<u32>, SamplingParams), String>> = Vec::new();
    let mut costs = Vec::new();
    for e in &input.entries {
        let p = match e {
            Entry::Bad(b) => Err(b.message.clone()),
            Entry::Ok(rec) => prep.ids(rec)?.and_then(|ids| {
                let o = &rec.overrides;
                let params = SamplingParams {
                    temperature: o.temperature.unwrap_or(base.temperature),
                    top_k: o.top_k.or(base.top_k),
                    top_p: o.top_p.or(base.top_p),
                    repetition_penalty: o.repetition_penalty.or(base.repetition_penalty),
                    presence_penalty: o.presence_penalty.or(base.presence_penalty),
                    frequency_penalty: o.frequency_penalty.or(base.frequency_penalty),
                    seed: o.seed.or(base.seed),
                };
                params.validate().map(|_| (ids, params))
            }),
        };
        costs.push(match (&p, e) {
            (Ok((ids, _)), Entry::Ok(r)) => {
                (ids.len() + r.overrides.max_new_tokens.unwrap_or(a.max_new_tokens) * n_of(e))
                    as u64
            }
            _ => 1,
        });
        prepared.push(p);
    }
    let owned = job.owned(&costs);
    let total = input
        .entries
        .iter()
        .zip(&prepared)
        .zip(&owned)
        .filter(|(_, &own)| own)
        .map(|((e, p), _)| if p.is_ok() { n_of(e) } else { 1 })
        .sum();
    job.set_total(total)?;

    let mut jobs = Vec::new();
    let mut info: HashMap<usize, GenInfo> = HashMap::new();
    for ((entry, p), own) in input.entries.iter().zip(prepared).zip(owned) {
        let (rec, (ids, params)) = match (entry, p) {
            (Entry::Bad(b), _) => {
                if own && !done(entry, 0) {
                    jobs.push(Job::Bad(b.clone()));
                }
                continue;
            }
            (Entry::Ok(rec), Err(what)) => {
                // Rejected in every shard alike (an error without --skip-bad-lines).
                let bad = input.reject(rec, &what, skip)?;
                if own && !done(entry, 0) {
                    jobs.push(Job::Bad(bad));
                }
                continue;
            }
            (Entry::Ok(rec), Ok(x)) => (rec, x),
        };
        let n = n_of(entry);
        let samples: Vec<usize> = (0..n).filter(|&s| !done(entry, s)).collect();
        if !own || samples.is_empty() {
            continue;
        }
        let o = &rec.overrides;
        info.insert(
            rec.index,
            GenInfo {
                id: rec.id.clone(),
                prompt_text: prep.prompt_text(rec, &ids)?,
                n,
            },
        );
        let request = GenRequest {
            index: rec.index,
            sample: 0,
            stream_key: o.seed.is_none().then(|| stream_key(&id_key(&rec.id))),
            prompt_ids: ids,
            max_new_tokens: o.max_new_tokens.unwrap_or(a.max_new_tokens),
            params,
            stop: o.stop.clone().unwrap_or_else(|| a.stop.clone()),
            logprobs: a.logprobs,
            top_logprobs: 0,
            ignore_eos: o.ignore_eos.unwrap_or(a.ignore_eos),
        };
        jobs.push(Job::Gen {
            index: rec.index,
            samples,
            request,
        });
    }

    let expected: Vec<(usize, usize)> = jobs
        .iter()
        .flat_map(|j| match j {
            Job::Bad(b) => vec![(b.index, 0)],
            Job::Gen { index, samples, .. } => samples.iter().map(|&s| (*index, s)).collect(),
        })
        .collect();
    let progress = RefCell::new(Progress::new(expected.len()));
    crate::signals::writing(true);
    let hidden = match &a.hidden_states {
        None => None,
        Some(specs) => {
            let layers = resolve_layers(specs, model.spec().num_layers)?;
            let meta = serde_json::json!({
                "model": a.model.model,
                "model_path": model.location.path().display().to_string(),
                "layers": layers,
                "pool": a.hidden_pool.name(),
                "hidden_of": a.hidden_of.name(),
            });
            let out = job.plan.path.clone().expect("an output file");
            let sink = HiddenSink::open(
                &out,
                done_set.is_empty(),
                &done_set,
                meta,
                layers.clone(),
                a.hidden_pool != PoolArg::None,
            )?;
            Some(HiddenOut {
                model: &model,
                sink,
                layers,
                pool: a.hidden_pool.pool(),
                of: a.hidden_of,
                every: a.input.batch_size.max(16),
                pending: Vec::new(),
            })
        }
    };
    let mut emit = Emitter {
        writer: RecordWriter::open(&job.plan, expected)?,
        job,
        hidden,
    };
    let mut requests = Vec::new();
    for j in jobs {
        match j {
            Job::Bad(b) => {
                let n = emit.write(error_record(format, &b), 0)?;
                progress.borrow_mut().records(n);
            }
            Job::Gen {
                samples, request, ..
            } => {
                for s in samples {
                    requests.push(GenRequest {
                        sample: s,
                        ..request.clone()
                    });
                }
            }
        }
    }

    let mut write_err: Option<anyhow::Error> = None;
    let mut generator = Generator::new(&model, a.input.batch_size);
    generator.max_step_tokens = a.max_step_tokens;
    generator.kv_memory = a.model.kv_memory;
    generator.prefix_cache = !a.no_prefix_cache;
    generator.paged = a.executor == "paged";
    generator.stop = Some(stop.clone());
    let result = generator.run_with_stats(
        requests,
        |out: GenOutput| {
            let inf = &info[&out.index];
            let body = match format {
                OutFormat::Jsonl => serde_json::to_string(&GenRecord {
                    id: &inf.id,
                    prompt: &inf.prompt_text,
                    text: &out.text,
                    token_ids: &out.token_ids,
                    finish_reason: out.finish_reason.as_str(),
                    prompt_tokens: out.prompt_ids.len(),
                    completion_tokens: out.token_ids.len(),
                    logprobs: out.logprobs.as_deref(),
                    sample: (inf.n > 1).then_some(out.sample),
                })
                .expect("serializable record"),
                OutFormat::Text => format!("{}{}", inf.prompt_text, out.text),
            };
            let rec = OutRecord {
                index: out.index,
                sample: out.sample,
                id_key: id_key(&inf.id),
                body,
            };
            match emit.generated(rec, &inf.id, &out) {
                Ok(n) => {
                    progress.borrow_mut().records(n);
                    Ok(())
                }
                Err(e) => {
                    write_err = Some(e);
                    Err(lmgen_core::Error::BadRequest("output failed".into()))
                }
            }
        },
        |stats| progress.borrow_mut().tokens(stats.generated_tokens),
    );
    if let Some(e) = write_err {
        return Err(e);
    }
    // Finished records still waiting for their hidden states (also when stopped by a signal).
    let n = emit.flush_hidden()?;
    progress.borrow_mut().records(n);
    let Emitter {
        writer, mut job, ..
    } = emit;
    let stats = result.as_ref().ok().copied();
    end_job(
        &mut job,
        writer,
        result.map(|_| ()).map_err(Into::into),
        &a.output,
    )?;
    progress.into_inner().finish();
    if let Some(s) = stats.filter(|s| s.preemptions > 0) {
        let mib = s.pool_blocks * model.decoder.kv_block_bytes() / (1 << 20);
        eprintln!(
            "lmgen: note: sequences were preempted {} times and recomputed because the KV pool ({mib} MiB) was full; a larger --kv-memory avoids the recomputation",
            s.preemptions
        );
    }
    Ok(())
}

/// Records on their way to the output: written at once, or, with `--hidden-states`, after
/// their states are computed (a full pass over prompt + continuation, batched) and on disk.
struct Emitter<'m> {
    writer: RecordWriter,
    job: JobState,
    hidden: Option<HiddenOut<'m>>,
}

struct HiddenOut<'m> {
    model: &'m Model,
    sink: HiddenSink,
    layers: Vec<usize>,
    pool: Pool,
    of: HiddenOf,
    /// Records per chunk.
    every: usize,
    /// (record, id, sample, prompt + continuation, positions whose states are kept)
    pending: Vec<(OutRecord, Value, Vec<u32>, std::ops::Range<usize>)>,
}

impl Emitter<'_> {
    /// Write a record now; returns how many records reached the output.
    fn write(&mut self, rec: OutRecord, tokens: u64) -> anyhow::Result<usize> {
        let n = self.writer.push(rec)?;
        self.job.progress(n, tokens)?;
        Ok(n)
    }

    /// A generated record: written now, or queued for its hidden states.
    fn generated(&mut self, rec: OutRecord, id: &Value, out: &GenOutput) -> anyhow::Result<usize> {
        let Some(h) = &mut self.hidden else {
            let tokens = (out.prompt_ids.len() + out.token_ids.len()) as u64;
            return self.write(rec, tokens);
        };
        let p = out.prompt_ids.len();
        let all: Vec<u32> = out
            .prompt_ids
            .iter()
            .chain(&out.token_ids)
            .copied()
            .collect();
        let range = match h.of {
            HiddenOf::Prompt => 0..p,
            HiddenOf::Generated => p..all.len(),
            HiddenOf::All => 0..all.len(),
        };
        h.pending.push((rec, id.clone(), all, range));
        if h.pending.len() >= h.every {
            return self.flush_hidden();
        }
        Ok(0)
    }

    /// Compute and store the states of the queued records, then write the records.
    fn flush_hidden(&mut self) -> anyhow::Result<usize> {
        let Some(h) = &mut self.hidden else {
            return Ok(0);
        };
        if h.pending.is_empty() {
            return Ok(0);
        }
        let pending = std::mem::take(&mut h.pending);
        let inputs: Vec<&[u32]> = pending
            .iter()
            .map(|(_, _, ids, _)| ids.as_slice())
            .collect();
        let ranges: Vec<_> = pending.iter().map(|(_, _, _, r)| r.clone()).collect();
        let states = embed_ranges(h.model, &inputs, &ranges, &h.layers, h.pool)?;
        for ((rec, id, _, _), st) in pending.iter().zip(&states) {
            h.sink.push(id, rec.sample, st)?;
        }
        h.sink.flush()?;
        let mut n = 0;
        for (rec, _, ids, _) in pending {
            n += self.write(rec, ids.len() as u64)?;
        }
        Ok(n)
    }
}

/// `--layers`-style specs must at least parse before any work.
fn check_layers(specs: &[String]) -> anyhow::Result<()> {
    for s in specs {
        if s.trim().parse::<i64>().is_err() {
            return Err(user_err!(
                "--layers: '{s}' is not an integer (e.g. --layers -1 or --layers 0,6,-1)"
            ));
        }
    }
    Ok(())
}

/// An f32 setting as the number it was written as (0.9, not 0.8999999761581421).
fn short_f32(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// Settings as a JSON object (for the manifest).
fn json_map(v: Value) -> serde_json::Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => unreachable!("settings are an object"),
    }
}

/// Resolve the model and open the job (input read, output checked and locked, resume
/// checked against the manifest), before the model is loaded.
#[allow(clippy::too_many_arguments)]
fn open_job(
    command: &'static str,
    m: &ModelArgs,
    inp: &InputArgs,
    output: &str,
    format: OutFormat,
    resume: &ResumeArgs,
    dtype: DType,
    mut settings: serde_json::Map<String, Value>,
) -> anyhow::Result<(JobState, ModelLocation)> {
    let location = lmgen_core::hub::resolve(&m.model, m.models_file.as_deref())?;
    let shard = match &inp.shard {
        Some(s) => Shard::parse(s)?,
        None => Shard::WHOLE,
    };
    settings.insert(
        "truncate".into(),
        Value::from(inp.truncate.map(|t| format!("{t:?}").to_lowercase())),
    );
    settings.insert("skip_bad_lines".into(), Value::from(inp.skip_bad_lines));
    settings.insert(
        "dtype".into(),
        Value::from(format!("{dtype:?}").to_lowercase()),
    );
    settings.insert(
        "quantize".into(),
        Value::from(m.quantize.map(|q| q.name().to_string())),
    );
    settings.insert("dequantize".into(), Value::from(m.dequantize));
    let job = JobState::open(JobConfig {
        command,
        input: &inp.input,
        output,
        format,
        resume: resume.resume,
        overwrite: resume.overwrite,
        skip_bad: inp.skip_bad_lines,
        shard,
        resumable: command != "embed",
        model_name: &m.model,
        model_path: location.path(),
        settings,
    })?;
    for w in &job.warnings {
        eprintln!("lmgen: warning: {w}");
    }
    if !shard.is_whole() {
        eprintln!(
            "lmgen: shard {shard}: writing {}",
            job.plan
                .path
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
    }
    let written_to = job
        .plan
        .path
        .as_deref()
        .map_or_else(|| output.to_string(), |p| p.display().to_string());
    note_resume(&job.plan, &written_to, &job.input);
    Ok((job, location))
}

pub(crate) fn nothing_to_do(job: &mut JobState, out: &str) -> anyhow::Result<()> {
    RecordWriter::open(&job.plan, vec![])?.finish()?;
    job.finish(true, None)?;
    eprintln!("lmgen: nothing to do: every input already has its record(s) in {out}");
    Ok(())
}

/// After the run: sync the output and the manifest; a signal is reported as such.
pub(crate) fn end_job(
    job: &mut JobState,
    mut writer: RecordWriter,
    result: anyhow::Result<()>,
    out: &str,
) -> anyhow::Result<()> {
    match result {
        Ok(()) => {
            writer.finish()?;
            job.finish(true, None)?;
            Ok(())
        }
        Err(e) => {
            let interrupted = e
                .downcast_ref::<lmgen_core::Error>()
                .is_some_and(|e| matches!(e, lmgen_core::Error::Interrupted(_)));
            let synced = writer.sync();
            let signal = crate::signals::name().unwrap_or("a signal");
            let _ = job.finish(false, interrupted.then_some(signal));
            synced?;
            if interrupted {
                let out = job
                    .plan
                    .path
                    .as_deref()
                    .map_or_else(|| out.to_string(), |p| p.display().to_string());
                return Err(lmgen_core::Error::Interrupted(format!(
                    "stopped by {signal}; every finished record is in {out}; run the same command with --resume to finish"
                ))
                .into());
            }
            Err(e)
        }
    }
}

// ---------------------------------------------------------------------------------------
// score

#[derive(Serialize)]
struct ScoreRecord<'a> {
    id: &'a Value,
    token_ids: &'a [u32],
    logprobs: &'a [f32],
    sum_logprob: f64,
    ppl: f64,
}

pub fn score(a: ScoreArgs, stop: &Arc<AtomicBool>) -> anyhow::Result<()> {
    let (placement, dtype) = placement_and_dtype(
        &a.model,
        workload(&a.model, a.input.batch_size, DEFAULT_MAX_STEP_TOKENS),
    )?;
    let (mut job, location) = open_job(
        "score",
        &a.model,
        &a.input,
        &a.output,
        OutFormat::Jsonl,
        &a.resume,
        dtype,
        serde_json::Map::new(),
    )?;
    let input = std::mem::take(&mut job.input);
    let done_set = std::mem::take(&mut job.plan.done);
    let done = |e: &Entry| done_set.contains(&(id_key(e.id()), 0));
    if job.was_complete() || (job.shard.is_whole() && input.entries.iter().all(done)) {
        return nothing_to_do(&mut job, &a.output);
    }
    let steps = input.entries.len().div_ceil(a.input.batch_size.max(1));
    let model = load_model(&location, &a.model, placement, dtype, steps)?;
    let prep = Prep::new(&model, a.input.truncate)?;
    let (good, bad, owned) = prepare_owned(&job, &input, &prep, a.input.skip_bad_lines)?;
    job.set_total(owned.iter().filter(|&&o| o).count())?;
    let entries = &input.entries;
    let good: Vec<_> = good
        .into_iter()
        .filter(|(r, _)| owned[r.index] && !done(&entries[r.index]))
        .collect();
    let bad: Vec<_> = bad
        .into_iter()
        .filter(|b| owned[b.index] && !done(&entries[b.index]))
        .collect();
    let mut expected: Vec<(usize, usize)> = good
        .iter()
        .map(|(r, _)| (r.index, 0))
        .chain(bad.iter().map(|b| (b.index, 0)))
        .collect();
    expected.sort_unstable();
    let mut progress = Progress::new(expected.len());
    crate::signals::writing(true);
    let mut writer = RecordWriter::open(&job.plan, expected)?;
    let result = (|| -> anyhow::Result<()> {
        for b in &bad {
            let n = writer.push(error_record(OutFormat::Jsonl, b))?;
            progress.records(n);
            job.progress(n, 0)?;
        }
        for chunk in good.chunks(a.input.batch_size) {
            if stop.load(Ordering::Relaxed) {
                return Err(lmgen_core::Error::Interrupted("stopped by a signal".into()).into());
            }
            let inputs: Vec<&[u32]> = chunk.iter().map(|(_, ids)| ids.as_slice()).collect();
            let scores = score_batch(&model, &inputs)?;
            for ((rec, ids), s) in chunk.iter().zip(scores) {
                let body = serde_json::to_string(&ScoreRecord {
                    id: &rec.id,
                    token_ids: ids,
                    logprobs: &s.logprobs,
                    sum_logprob: s.sum(),
                    ppl: s.perplexity(),
                })
                .expect("serializable record");
                let n = writer.push(OutRecord {
                    index: rec.index,
                    sample: 0,
                    id_key: id_key(&rec.id),
                    body,
                })?;
                progress.records(n);
                job.progress(n, ids.len() as u64)?;
            }
            progress.tokens(inputs.iter().map(|i| i.len()).sum());
        }
        Ok(())
    })();
    end_job(&mut job, writer, result, &a.output)?;
    progress.finish();
    Ok(())
}

/// [`prepare_all`] on every entry, and which of them this shard owns (split by tokens).
#[allow(clippy::type_complexity)]
fn prepare_owned<'e>(
    job: &JobState,
    input: &'e Input,
    prep: &Prep,
    skip: bool,
) -> anyhow::Result<(Vec<(&'e InputRecord, Vec<u32>)>, Vec<BadRecord>, Vec<bool>)> {
    let (good, bad) = prepare_all(input, prep, input.entries.iter().collect(), skip)?;
    let mut costs = vec![1u64; input.entries.len()];
    for (r, ids) in &good {
        costs[r.index] = ids.len() as u64;
    }
    let owned = job.owned(&costs);
    Ok((good, bad, owned))
}

/// Tokenize and check every entry; bad ones become error records (or a user error).
#[allow(clippy::type_complexity)]
fn prepare_all<'e>(
    input: &Input,
    prep: &Prep,
    entries: Vec<&'e Entry>,
    skip: bool,
) -> anyhow::Result<(Vec<(&'e InputRecord, Vec<u32>)>, Vec<BadRecord>)> {
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for e in entries {
        match e {
            Entry::Bad(b) => bad.push(b.clone()),
            Entry::Ok(r) => match prep.ids(r)? {
                Ok(ids) => good.push((r, ids)),
                Err(what) => bad.push(input.reject(r, &what, skip)?),
            },
        }
    }
    Ok((good, bad))
}

// ---------------------------------------------------------------------------------------
// embed

/// transformers `output_hidden_states` indices: 0..=L, negative from the end.
pub fn resolve_layers(specs: &[String], num_layers: usize) -> anyhow::Result<Vec<usize>> {
    let n = num_layers as i64;
    let mut out = Vec::new();
    for s in specs {
        let s = s.trim();
        let l: i64 = s.parse().map_err(|_| {
            user_err!("--layers: '{s}' is not an integer (e.g. --layers -1 or --layers 0,6,-1)")
        })?;
        let r = if l < 0 { n + 1 + l } else { l };
        if !(0..=n).contains(&r) {
            return Err(user_err!(
                "--layers: layer {l} is out of range for a model with {num_layers} layers (valid: {}..={num_layers})",
                -(n + 1)
            ));
        }
        if !out.contains(&(r as usize)) {
            out.push(r as usize);
        }
    }
    if out.is_empty() {
        return Err(user_err!("--layers: no layers given"));
    }
    Ok(out)
}

pub fn embed(a: EmbedArgs, stop: &Arc<AtomicBool>) -> anyhow::Result<()> {
    if a.output == "-" {
        return Err(user_err!(
            "embed writes a safetensors file; give --output FILE.safetensors"
        ));
    }
    check_layers(&a.layers)?;
    let lower = a.output.to_ascii_lowercase();
    if [".jsonl", ".ndjson", ".json", ".txt"]
        .iter()
        .any(|e| lower.ends_with(e))
    {
        return Err(user_err!(
            "{}: embed writes a safetensors file; give --output FILE.safetensors",
            a.output
        ));
    }
    let (placement, dtype) = placement_and_dtype(
        &a.model,
        workload(&a.model, a.input.batch_size, DEFAULT_MAX_STEP_TOKENS),
    )?;
    let settings = json_map(serde_json::json!({
        "layers": a.layers,
        "pool": a.pool.name(),
    }));
    let resume = ResumeArgs {
        resume: false,
        overwrite: a.overwrite,
    };
    let (mut job, location) = open_job(
        "embed",
        &a.model,
        &a.input,
        &a.output,
        OutFormat::Jsonl,
        &resume,
        dtype,
        settings,
    )?;
    let path = job.plan.path.clone().expect("embed writes a file");
    let input = std::mem::take(&mut job.input);
    let steps = input.entries.len().div_ceil(a.input.batch_size.max(1));
    let model = load_model(&location, &a.model, placement, dtype, steps)?;
    let layers = resolve_layers(&a.layers, model.spec().num_layers)?;
    let pool = a.pool.pool();
    let prep = Prep::new(&model, a.input.truncate)?;
    let (good, bad, owned) = prepare_owned(&job, &input, &prep, a.input.skip_bad_lines)?;
    let good: Vec<_> = good.into_iter().filter(|(r, _)| owned[r.index]).collect();
    let bad: Vec<_> = bad.into_iter().filter(|b| owned[b.index]).collect();
    job.set_total(good.len())?;
    crate::signals::writing(true);

    let mut progress = Progress::new(good.len());
    // name → (shape, data)
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut pooled: Vec<(Vec<f32>, Option<usize>)> = vec![(Vec::new(), None); layers.len()];
    let mut row = 0usize;
    for chunk in good.chunks(a.input.batch_size) {
        if stop.load(Ordering::Relaxed) {
            // Nothing of an embed output is written before its end.
            let signal = crate::signals::name().unwrap_or("a signal");
            job.finish(false, Some(signal))?;
            return Err(lmgen_core::Error::Interrupted(format!(
                "stopped by {signal}; nothing written (embed writes its file at the end)"
            ))
            .into());
        }
        let inputs: Vec<&[u32]> = chunk.iter().map(|(_, ids)| ids.as_slice()).collect();
        let hidden = embed_batch(&model, &inputs, &layers, pool)?;
        for per_layer in hidden {
            for ((li, &layer), t) in layers.iter().enumerate().zip(per_layer) {
                let t = t.to_dtype(DType::F32)?;
                let dims = t.dims().to_vec();
                let data: Vec<f32> = t.flatten_all()?.to_vec1()?;
                if pool == Pool::None {
                    tensors.push((format!("hidden.{layer}.{row}"), dims, data));
                } else {
                    let (buf, width) = &mut pooled[li];
                    let w = data.len();
                    if width.is_some_and(|x| x != w) {
                        anyhow::bail!(
                            "layer {layer}: hidden width changed from {} to {w}",
                            width.unwrap_or(0)
                        );
                    }
                    *width = Some(w);
                    buf.extend_from_slice(&data);
                }
            }
            row += 1;
        }
        progress.records(chunk.len());
        let tokens: usize = inputs.iter().map(|i| i.len()).sum();
        progress.tokens(tokens);
        job.progress(chunk.len(), tokens as u64)?;
    }
    if pool != Pool::None {
        for (&layer, (buf, width)) in layers.iter().zip(pooled) {
            let w = width.unwrap_or(0);
            tensors.push((format!("hidden.{layer}"), vec![row, w], buf));
        }
    }

    let ids: Vec<&Value> = good.iter().map(|(r, _)| &r.id).collect();
    let input_ids: Vec<&Vec<u32>> = good.iter().map(|(_, ids)| ids).collect();
    let skipped: Vec<Value> = bad
        .iter()
        .map(|b| {
            eprintln!("lmgen: warning: {} (skipped)", b.message);
            serde_json::json!({"id": b.id, "error": b.message})
        })
        .collect();
    let all = serde_json::json!({
        "model": a.model.model,
        "model_path": model.location.path().display().to_string(),
        "layers": layers,
        "pool": a.pool.name(),
        "ids": ids,
        "input_ids": input_ids,
        "skipped": skipped,
    });
    let tensors: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(n, shape, data)| {
            (
                n,
                shape,
                data.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    lmgen_core::job::merge::write_embed(&path, &all, &tensors)?;
    job.finish(true, None)?;
    progress.finish();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert_eq!(resolve_layers(&s(&["-1"]), 24).unwrap(), vec![24]);
        assert_eq!(
            resolve_layers(&s(&["0", "-25", "3", "3"]), 24).unwrap(),
            vec![0, 3]
        );
        assert!(resolve_layers(&s(&["25"]), 24).is_err());
        assert!(resolve_layers(&s(&["-26"]), 24).is_err());
    }

    #[test]
    fn steps_decide_whether_weights_are_used_in_place() {
        use lmgen_core::loader::{MapWeights, MAP_IN_PLACE_MAX_STEPS};
        let steps = |l: &[usize], b| decode_steps(l.iter().copied(), b);
        // The 4 × 75 job: 75 steps, in place; 1000 prompts of 75 at batch 32: copied.
        assert_eq!(steps(&[75; 4], 4), 75);
        assert_eq!(steps(&[75; 1000], 32), 2344);
        // The longest request when the batch is not full.
        assert_eq!(steps(&[10, 200], 8), 200);
        assert_eq!(steps(&[], 8), 0);
        assert!(MapWeights::Auto.in_place(75));
        assert!(MapWeights::Auto.in_place(MAP_IN_PLACE_MAX_STEPS));
        assert!(!MapWeights::Auto.in_place(MAP_IN_PLACE_MAX_STEPS + 1));
        assert!(MapWeights::Always.in_place(1 << 20));
        assert!(!MapWeights::Never.in_place(1));
    }
}
