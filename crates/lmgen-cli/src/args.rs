//! Command-line arguments (clap derive) and the short-form rewrite.
use clap::{Args, Parser, Subcommand, ValueEnum};
use lmgen_core::plan::DEFAULT_MAX_STEP_TOKENS;
use std::ffi::OsString;
use std::path::PathBuf;

const AFTER_HELP: &str = "\
Short form (same as `generate`):
  lmgen MODEL INPUT OUTPUT NUM_TOKENS TEMPERATURE [generate options]

MODEL is a Hugging Face model directory, a model id in the offline Hugging Face cache
(HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub), an alias from a models
file (--models-file, else $LMGEN_MODELS), or a .gguf file.

Input: .txt (one prompt per line, \\n and \\t unescaped, empty lines skipped) or .jsonl
(objects with \"prompt\" or \"input_ids\", optional \"id\" and per-request overrides);
`-` reads stdin (JSONL if every non-blank line starts with '{', else text).

Exit codes: 0 success, 1 runtime failure, 2 bad usage or bad input.";

#[derive(Parser, Debug)]
#[command(
    name = "lmgen",
    version,
    about = "Run Hugging Face causal language models on the CPU: generate, score, embed",
    after_help = AFTER_HELP,
    subcommand_required = true,
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Generate continuations of prompts (JSONL or plain-text output)
    #[command(after_help = GENERATE_AFTER_HELP)]
    Generate(GenerateArgs),
    /// Log-probabilities and perplexity of each input under the model (JSONL output)
    #[command(after_help = SCORE_AFTER_HELP)]
    Score(ScoreArgs),
    /// Hidden states of each input (safetensors output)
    #[command(after_help = EMBED_AFTER_HELP)]
    Embed(EmbedArgs),
    /// Speed on this machine (prefill, decode per batch size) next to its measured limits
    #[command(after_help = bench_after_help())]
    Bench(BenchArgs),
    /// Where each layer would go and how much memory each device needs, without loading weights
    Plan(PlanArgs),
    /// Put the shards of a job (OUT.shards/K-of-N.*) together into OUT, in input order
    Merge(MergeArgs),
    /// Progress of a job: records done of total per shard, tokens/s, time left
    Status(StatusArgs),
    /// Print a SLURM batch script for a sharded, requeue-safe generate job
    #[command(after_help = crate::sbatch::SBATCH_AFTER_HELP)]
    Sbatch(crate::sbatch::SbatchArgs),
}

#[derive(Args, Debug, Clone)]
pub struct MergeArgs {
    /// The job's output (its shards are in OUT.shards/)
    #[arg(value_name = "OUT")]
    pub output: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// The job's output (sharded or not)
    #[arg(value_name = "OUT")]
    pub output: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct PlanArgs {
    /// Model directory, Hugging Face model id, models-file alias, or .gguf file (only its config is read)
    #[arg(value_name = "MODEL")]
    pub model: Option<String>,
    /// Shape of a well-known model instead of MODEL (see `lmgen bench --help` for the list)
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// TOML file mapping aliases to model paths (default: $LMGEN_MODELS)
    #[arg(long, value_name = "FILE")]
    pub models_file: Option<PathBuf>,
    /// auto (all GPUs nvidia-smi reports, then CPU memory), cpu, cuda or cuda:N
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: String,
    /// Budgets in placement order, e.g. cuda:0=70GiB,cuda:1=70GiB,cpu=100GiB (overrides detection)
    #[arg(long, value_name = "LIST")]
    pub max_memory: Option<String>,
    /// Compute dtype, on GPUs also the weight storage without --quantize (default: bf16 with
    /// GPUs, else f32; the CPU computes in f32 and keeps weights as the checkpoint stores them)
    #[arg(long, value_enum, value_name = "DTYPE")]
    pub dtype: Option<DTypeArg>,
    /// Weight-only quantization: q8_0, q4_k, q4_0, q4_1, q6_k
    #[arg(long, value_name = "KIND", value_parser = parse_quant)]
    pub quantize: Option<lmgen_core::model::quant::QuantKind>,
    /// Sequences in flight (KV cache is reserved for each)
    #[arg(long, default_value_t = 4, value_name = "B", allow_negative_numbers = true, value_parser = parse_positive)]
    pub batch_size: usize,
    /// Tokens per sequence, prompt + generation
    #[arg(long, default_value_t = 2048, value_name = "N", allow_negative_numbers = true, value_parser = parse_positive)]
    pub context: usize,
    /// Tokens per engine step (sizes the activations)
    #[arg(long, default_value_t = DEFAULT_MAX_STEP_TOKENS, value_name = "N", allow_negative_numbers = true, value_parser = parse_positive)]
    pub max_step_tokens: usize,
    /// Plan a KV pool of this size instead of batch x context tokens (e.g. 8GiB)
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true, value_parser = parse_kv_memory)]
    pub kv_memory: Option<usize>,
    /// Print the plan as JSON
    #[arg(long)]
    pub json: bool,
}

fn bench_after_help() -> String {
    format!(
        "\
Give exactly one of MODEL (a real checkpoint, loaded and timed), --preset NAME (the shape of a
well-known model with synthetic weights) or --config config.json (any shape, synthetic
weights). Presets: {}.

Measures: prefill of one --prompt-tokens prompt (best of 3) as tokens/s, GFLOP/s and its ratio
to the GEMM peak of this machine; decode tokens/s at each batch size, and for batch 1 its
ratio to the bandwidth bound (read bandwidth / bytes of f32 weights read per token); peak RSS;
the machine's read bandwidth and candle f32 GEMM throughput, measured in the same run.",
        lmgen_core::bench::PRESETS.join(", ")
    )
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Model directory, Hugging Face model id, models-file alias, or .gguf file
    #[arg(value_name = "MODEL")]
    pub model: Option<String>,
    /// Shape of a well-known model, with synthetic weights
    #[arg(long, value_name = "NAME")]
    pub preset: Option<String>,
    /// config.json of any supported family, with synthetic weights
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// TOML file mapping aliases to model paths (default: $LMGEN_MODELS)
    #[arg(long, value_name = "FILE")]
    pub models_file: Option<PathBuf>,
    /// CPU threads (default: the CPUs this process may use, capped by $SLURM_CPUS_PER_TASK)
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_threads)]
    pub threads: Option<u32>,
    /// Decode batch sizes, comma-separated
    #[arg(long, value_name = "B,...", value_delimiter = ',', default_value = "1,4,16,64", allow_negative_numbers = true, value_parser = parse_positive)]
    pub batch_sizes: Vec<usize>,
    /// Length of the prefill prompt
    #[arg(long, default_value_t = 128, value_name = "N", allow_negative_numbers = true, value_parser = parse_positive)]
    pub prompt_tokens: usize,
    /// Timed decode steps per batch size
    #[arg(long, default_value_t = 32, value_name = "N", allow_negative_numbers = true, value_parser = parse_positive)]
    pub decode_tokens: usize,
    /// Tokens of context each sequence has before the timed decode steps (llama-bench -d)
    #[arg(long, default_value_t = 16, value_name = "N", allow_negative_numbers = true, value_parser = parse_positive)]
    pub context: usize,
    /// Print the report as JSON instead of a table
    #[arg(long)]
    pub json: bool,
    /// cpu, cuda, cuda:N or auto (machine limits are measured on CPU runs only)
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: String,
    /// Compute dtype (default f32 on the CPU, bf16 on GPUs)
    #[arg(long, value_enum, value_name = "DTYPE")]
    pub dtype: Option<DTypeArg>,
    /// Use a real model's f32/bf16/f16 weights in place from the file's memory map (auto:
    /// copied, as long jobs do; bf16/f16 copies keep their dtype; the figures are steady-state
    /// speeds)
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = MmapArg::Auto)]
    pub mmap: MmapArg,
}

const GENERATE_AFTER_HELP: &str = "\
Output: OUT ending in .jsonl (or `-` for stdout) gets one JSON record per input and sample,
{\"id\",\"prompt\",\"text\",\"token_ids\",\"finish_reason\",\"prompt_tokens\",\"completion_tokens\",
\"logprobs\"?,\"sample\"?}, in input order. The default id is the 0-based line number.
Any other OUT gets plain text: prompt + continuation, records separated by a blank line;
its progress is kept in OUT.lmgen-done (one `id<TAB>sample<TAB>end offset` line per record)
so that --resume can continue it.

--resume skips inputs whose id is already in OUT (a torn last record is cut off first) and
starts OUT when it does not exist; it refuses an OUT of another job (OUT.lmgen-manifest.json).
--overwrite starts OUT afresh. Without either, an existing OUT is an error (exit 2).
On SIGTERM/SIGINT/SIGUSR1: finished records are written, exit 75; rerun with --resume.
--shard K/N|auto writes OUT.shards/K-of-N.*; `lmgen merge OUT` joins them in input order.

Per-request JSONL overrides: max_new_tokens, temperature, top_p, top_k, repetition_penalty,
presence_penalty, frequency_penalty, seed, stop (string or list), n (samples per prompt), ignore_eos (true/false).

OpenAI batch files (first line {\"custom_id\",\"method\",\"url\",\"body\"}, or --format openai):
/v1/completions, /v1/chat/completions (the model's chat template) and /v1/embeddings; one
output line per request, {\"id\",\"custom_id\",\"response\":{\"status_code\",\"request_id\",
\"body\"},\"error\"}, the body as the endpoint returns it (usage included); a bad request is a
400 response, never the end of the run. See docs/cli.md, \"OpenAI batch files\".

Memory: the KV cache is a pool of --kv-memory bytes (default: what fits beside the weights);
each step processes at most --max-step-tokens tokens, so long prompts are prefilled in chunks;
prompts that share a prefix reuse its KV blocks unless --no-prefix-cache.

Full reference: docs/cli.md.";

const SCORE_AFTER_HELP: &str = "\
Output: one JSON record per input, in input order:
{\"id\",\"token_ids\",\"logprobs\",\"sum_logprob\",\"ppl\"}. token_ids are the prompt's ids (with
the BOS token the tokenizer adds, if any); logprobs[i] = log p(token_ids[i+1] | token_ids[..=i])
(n-1 values, natural log); sum_logprob is their sum and ppl = exp(-sum_logprob / len(logprobs)),
null for a one-token input (nothing is predicted).
With --skip-bad-lines a bad input becomes {\"id\",\"error\"}. --resume skips inputs whose id is
already in OUT; --overwrite replaces OUT; without either an existing OUT is an error (exit 2).

Full reference: docs/cli.md.";

const EMBED_AFTER_HELP: &str = "\
Output: a safetensors file of f32 hidden states, transformers' output_hidden_states indexing
(0 = embedding output, L = last block after the final norm, negative from the end; the name
carries the resolved index). --pool last|mean: one tensor per layer, hidden.<layer>, of shape
[n_inputs, width], rows in input order (mean averages over all tokens, BOS included);
--pool none: one tensor per input and layer, hidden.<layer>.<row>, of shape [seq_len, width].
The metadata holds the model, layers, pool, ids and input ids of the rows.

Full reference: docs/cli.md.";

#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory, Hugging Face model id, models-file alias, or .gguf file
    #[arg(value_name = "MODEL")]
    pub model: String,
    /// TOML file mapping aliases to model paths (default: $LMGEN_MODELS)
    #[arg(long, value_name = "FILE")]
    pub models_file: Option<PathBuf>,
    /// Compute dtype (default f32 on the CPU, bf16 on GPUs; the CPU computes f16/bf16 as f32)
    #[arg(long, value_enum, value_name = "DTYPE")]
    pub dtype: Option<DTypeArg>,
    /// cpu, cuda, cuda:N, or auto (CUDA when built with it and available; layers spread over
    /// the GPUs, then CPU memory, when one GPU is too small)
    #[arg(long, default_value = "auto", value_name = "DEVICE")]
    pub device: String,
    /// CPU threads (default: the CPUs this process may use, capped by $SLURM_CPUS_PER_TASK)
    #[arg(long, value_name = "N", allow_negative_numbers = true, value_parser = parse_threads)]
    pub threads: Option<u32>,
    /// Weight-only quantization at load (CPU): q8_0, q4_k (matrices whose width is not a
    /// multiple of 256 take q8_0), q4_0, q4_1, q6_k
    #[arg(long, value_name = "KIND", value_parser = parse_quant)]
    pub quantize: Option<lmgen_core::model::quant::QuantKind>,
    /// Dequantize the quantized matrices of a GGUF file at load (what transformers computes)
    /// instead of running them in their stored format (what llama.cpp does; the default)
    #[arg(long)]
    pub dequantize: bool,
    /// Use f32/bf16/f16 weights in place from the file's memory map (no copy at load, but
    /// each step reads them from 4 KiB pages): auto = for jobs of at most 100 model steps, else
    /// copied onto huge pages (bf16/f16 kept in their dtype)
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = MmapArg::Auto)]
    pub mmap: MmapArg,
    /// Same as --mmap never (llama.cpp's flag)
    #[arg(long, conflicts_with = "mmap")]
    pub no_mmap: bool,
    /// With --device auto: memory budgets in placement order, e.g. cuda:0=70GiB,cpu=100GiB
    /// (default: free GPU memory from nvidia-smi, then the CPU's available memory)
    #[arg(long, value_name = "LIST")]
    pub max_memory: Option<String>,
    /// Size of the KV cache pool, e.g. 512MiB, 2GiB, 1.5G, 300M or bytes (default: what fits
    /// beside the weights)
    #[arg(long, value_name = "SIZE", allow_negative_numbers = true, value_parser = parse_kv_memory)]
    pub kv_memory: Option<usize>,
}

fn parse_kv_memory(s: &str) -> Result<usize, String> {
    match lmgen_core::plan::parse_size(s) {
        Ok(0) => Err(format!("'{s}': the KV pool needs more than 0 bytes")),
        Ok(n) => Ok(usize::try_from(n).unwrap_or(usize::MAX)),
        Err(e) => Err(format!(
            "{e} (e.g. 512MiB, 2GiB, 1.5G, 300M or a number of bytes)"
        )),
    }
}

fn parse_quant(s: &str) -> Result<lmgen_core::model::quant::QuantKind, String> {
    lmgen_core::model::quant::QuantKind::parse(s).ok_or_else(|| {
        format!("unknown quantization '{s}' (expected q8_0, q4_k, q4_0, q4_1 or q6_k)")
    })
}

#[derive(Args, Debug, Clone)]
pub struct InputArgs {
    /// Input file: .txt, .jsonl, or - for stdin
    #[arg(long, short = 'i', value_name = "IN", allow_hyphen_values = true)]
    pub input: String,
    /// Write an error record for a malformed input line and go on, instead of failing
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// Cut prompts longer than the model's context to fit it (left keeps the BOS token)
    #[arg(long, value_enum, value_name = "SIDE")]
    pub truncate: Option<Truncate>,
    /// Sequences processed together
    #[arg(long, default_value_t = 8, value_name = "B", allow_negative_numbers = true, value_parser = parse_positive)]
    pub batch_size: usize,
    /// Do only shard K of N of the input (K/N, 0-based), or `auto`: the SLURM array task
    /// (SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT), else the srun task (SLURM_PROCID of
    /// SLURM_NTASKS), else the whole input. Shards write OUT.shards/K-of-N.*; see `lmgen merge`
    #[arg(long, value_name = "K/N|auto")]
    pub shard: Option<String>,
}

#[derive(Args, Debug, Clone)]
pub struct ResumeArgs {
    /// Continue an interrupted run: skip inputs already in OUT
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Replace an existing OUT
    #[arg(long)]
    pub overwrite: bool,
}

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub input: InputArgs,
    /// Output: .jsonl or - (JSONL records), anything else plain text
    #[arg(long, short = 'o', value_name = "OUT", allow_hyphen_values = true)]
    pub output: String,
    #[command(flatten)]
    pub resume: ResumeArgs,
    /// Maximum number of new tokens per sequence
    #[arg(long, default_value_t = 75, value_name = "N", allow_negative_numbers = true, value_parser = parse_positive)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 means greedy
    #[arg(long, default_value_t = 0.95, value_name = "T", allow_negative_numbers = true, value_parser = parse_temperature)]
    pub temperature: f32,
    /// Keep only the K most likely tokens
    #[arg(long, value_name = "K", allow_negative_numbers = true, value_parser = parse_positive)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of tokens with probability mass >= P
    #[arg(long, value_name = "P", allow_negative_numbers = true, value_parser = parse_top_p)]
    pub top_p: Option<f32>,
    /// Repetition penalty as in transformers (1 = none)
    #[arg(long, value_name = "R", allow_negative_numbers = true, value_parser = parse_penalty)]
    pub repetition_penalty: Option<f32>,
    /// OpenAI presence penalty in [-2, 2]: subtracted from the logit of every token
    /// generated so far (the prompt does not count)
    #[arg(long, value_name = "X", allow_negative_numbers = true, value_parser = parse_openai_penalty)]
    pub presence_penalty: Option<f32>,
    /// OpenAI frequency penalty in [-2, 2]: times the number of times a token was generated
    #[arg(long, value_name = "X", allow_negative_numbers = true, value_parser = parse_openai_penalty)]
    pub frequency_penalty: Option<f32>,
    /// Random seed: a record's samples depend only on the seed, its id and the sample number
    /// (a per-line "seed" alone decides that line's samples)
    #[arg(long, value_name = "S", allow_negative_numbers = true, value_parser = parse_seed)]
    pub seed: Option<u64>,
    /// Stop when the continuation contains STR (repeatable); the text is cut before it
    #[arg(long, value_name = "STR", allow_hyphen_values = true)]
    pub stop: Vec<String>,
    /// Continuations sampled per prompt (each its own record with "sample": k)
    #[arg(long, default_value_t = 1, value_name = "N", allow_negative_numbers = true, value_parser = parse_positive)]
    pub num_return_sequences: usize,
    /// Include the log-probability of each generated token (JSONL)
    #[arg(long)]
    pub logprobs: bool,
    /// Keep generating past EOS tokens until --max-new-tokens (benchmarks)
    #[arg(long)]
    pub ignore_eos: bool,
    /// Tokens processed per engine step: running sequences plus prompt chunks (long prompts
    /// are prefilled in pieces of at most this many tokens)
    #[arg(long, default_value_t = DEFAULT_MAX_STEP_TOKENS, value_name = "N", allow_negative_numbers = true, value_parser = parse_positive)]
    pub max_step_tokens: usize,
    /// Do not reuse the KV cache of a prompt prefix shared with an earlier request
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Also write the hidden states of these layers (as `embed --layers`) for every record,
    /// in OUT.hidden/ (safetensors chunks + index.jsonl; `lmgen merge OUT` makes one
    /// OUT.hidden.safetensors in input order)
    #[arg(
        long,
        value_name = "LAYERS",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    pub hidden_states: Option<Vec<String>>,
    /// Pooling of the hidden states over the tokens chosen by --hidden-of
    #[arg(long, value_enum, default_value = "last", value_name = "POOL")]
    pub hidden_pool: PoolArg,
    /// Which tokens' hidden states: the prompt's, the generated ones (each generated token
    /// as the model reads it back), or all
    #[arg(long, value_enum, default_value = "generated", value_name = "TOKENS")]
    pub hidden_of: HiddenOf,
    /// Step executor on CPUs: `paged` (the fused CPU executor over the paged KV pool; f32 and
    /// quantized weights) or `tensor` (the candle tensor path, as on GPUs; for comparisons)
    #[arg(long, default_value = "paged", value_name = "KIND", value_parser = ["paged", "tensor"])]
    pub executor: String,
    /// Input format: `auto` (an OpenAI batch file when its first line has custom_id, url and
    /// body; else lmgen's) or `openai` (the OpenAI Batch format, required)
    #[arg(long, default_value = "auto", value_name = "FORMAT", value_parser = ["auto", "openai"])]
    pub format: String,
}

#[derive(Args, Debug, Clone)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub input: InputArgs,
    /// Output JSONL file (or - for stdout)
    #[arg(
        long,
        short = 'o',
        value_name = "OUT.jsonl",
        allow_hyphen_values = true
    )]
    pub output: String,
    #[command(flatten)]
    pub resume: ResumeArgs,
}

#[derive(Args, Debug, Clone)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub input: InputArgs,
    /// Output safetensors file
    #[arg(long, short = 'o', value_name = "OUT.safetensors")]
    pub output: String,
    /// Replace an existing OUT
    #[arg(long)]
    pub overwrite: bool,
    /// Hidden-state layers (transformers indexing: 0 = embeddings, L = last block after the
    /// final norm, negative counts from the end), comma-separated or repeated
    #[arg(
        long,
        value_name = "LAYERS",
        default_value = "-1",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    pub layers: Vec<String>,
    /// Pooling over tokens
    #[arg(long, value_enum, default_value = "last")]
    pub pool: PoolArg,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmapArg {
    Auto,
    Always,
    Never,
}

impl MmapArg {
    pub fn map_weights(self) -> lmgen_core::loader::MapWeights {
        use lmgen_core::loader::MapWeights;
        match self {
            MmapArg::Auto => MapWeights::Auto,
            MmapArg::Always => MapWeights::Always,
            MmapArg::Never => MapWeights::Never,
        }
    }
}

impl ModelArgs {
    /// `--mmap`, with `--no-mmap` as `never`.
    pub fn map_weights(&self) -> lmgen_core::loader::MapWeights {
        if self.no_mmap {
            lmgen_core::loader::MapWeights::Never
        } else {
            self.mmap.map_weights()
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl DTypeArg {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            DTypeArg::F32 => candle_core::DType::F32,
            DTypeArg::F16 => candle_core::DType::F16,
            DTypeArg::Bf16 => candle_core::DType::BF16,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            DTypeArg::F32 => "f32",
            DTypeArg::F16 => "f16",
            DTypeArg::Bf16 => "bf16",
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Truncate {
    Left,
    Right,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenOf {
    Prompt,
    Generated,
    All,
}

impl HiddenOf {
    pub fn name(&self) -> &'static str {
        match self {
            HiddenOf::Prompt => "prompt",
            HiddenOf::Generated => "generated",
            HiddenOf::All => "all",
        }
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolArg {
    Last,
    Mean,
    None,
}

impl PoolArg {
    pub fn pool(self) -> lmgen_core::engine::Pool {
        match self {
            PoolArg::Last => lmgen_core::engine::Pool::Last,
            PoolArg::Mean => lmgen_core::engine::Pool::Mean,
            PoolArg::None => lmgen_core::engine::Pool::None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            PoolArg::Last => "last",
            PoolArg::Mean => "mean",
            PoolArg::None => "none",
        }
    }
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("must be a positive integer, got '{s}'")),
    }
}

fn parse_threads(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("must be a positive integer, got '{s}'")),
    }
}

fn parse_seed(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .map_err(|_| format!("must be an integer from 0 to 2^64-1, got '{s}'"))
}

fn parse_temperature(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!("must be a number >= 0 (0 = greedy), got '{s}'")),
    }
}

fn parse_top_p(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        _ => Err(format!("must be a number in (0, 1], got '{s}'")),
    }
}

fn parse_penalty(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(format!("must be a number > 0, got '{s}'")),
    }
}

fn parse_openai_penalty(s: &str) -> Result<f32, String> {
    match s.trim().parse::<f32>() {
        Ok(r) if (-2.0..=2.0).contains(&r) => Ok(r),
        _ => Err(format!("must be a number in [-2, 2], got '{s}'")),
    }
}

const SUBCOMMANDS: &[&str] = &[
    "generate", "score", "embed", "bench", "plan", "merge", "status", "help",
];
/// Subcommands that take no model (not rewritten as the short form).
const TOOL_SUBCOMMANDS: &[&str] = &["sbatch"];

/// `lmgen MODEL INPUT OUTPUT NUM_TOKENS TEMPERATURE [options]` → `lmgen generate ...`.
/// Returns a one-line message for a malformed short form.
pub fn rewrite_short_form(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let Some(first) = args.get(1).map(|a| a.to_string_lossy().into_owned()) else {
        return Ok(args);
    };
    if first.starts_with('-')
        || SUBCOMMANDS.contains(&first.as_str())
        || TOOL_SUBCOMMANDS.contains(&first.as_str())
    {
        return Ok(args);
    }
    if args.len() < 6 {
        return Err(format!(
            "expected a subcommand (generate, score, embed, bench, plan, merge, status, sbatch) or the short form MODEL INPUT OUTPUT NUM_TOKENS TEMPERATURE; got {} argument(s) (see lmgen --help)",
            args.len() - 1
        ));
    }
    let num = args[4].to_string_lossy();
    let tokens = match num.trim().parse::<usize>() {
        Ok(n) if n >= 1 => n,
        _ => {
            return Err(format!(
                "NUM_TOKENS must be a positive integer, got '{num}'"
            ))
        }
    };
    let temp = args[5].to_string_lossy();
    let temperature = match temp.trim().parse::<f32>() {
        Ok(t) if t.is_finite() && t >= 0.0 => t,
        _ => {
            return Err(format!(
                "TEMPERATURE must be a number >= 0 (0 = greedy), got '{temp}'"
            ))
        }
    };
    let mut out: Vec<OsString> = vec![args[0].clone(), "generate".into(), args[1].clone()];
    let mut kv = |k: &str, v: &OsString| {
        let mut s = OsString::from(k);
        s.push("=");
        s.push(v);
        out.push(s);
    };
    kv("--input", &args[2]);
    kv("--output", &args[3]);
    kv("--max-new-tokens", &tokens.to_string().into());
    kv("--temperature", &temperature.to_string().into());
    out.extend(args[6..].iter().cloned());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn short_form() {
        let r = rewrite_short_form(v(&[
            "lmgen", "m", "in.txt", "out", "10", "0", "--seed", "3",
        ]))
        .unwrap();
        assert_eq!(
            r,
            v(&[
                "lmgen",
                "generate",
                "m",
                "--input=in.txt",
                "--output=out",
                "--max-new-tokens=10",
                "--temperature=0",
                "--seed",
                "3"
            ])
        );
        let cli = Cli::try_parse_from(r).unwrap();
        let Command::Generate(g) = cli.command else {
            panic!()
        };
        assert_eq!(
            (g.max_new_tokens, g.temperature, g.seed),
            (10, 0.0, Some(3))
        );
        for bad in [
            ["0", "1"],
            ["-1", "1"],
            ["abc", "1"],
            ["5", "-1"],
            ["5", "nan"],
        ] {
            let e = rewrite_short_form(v(&["lmgen", "m", "i", "o", bad[0], bad[1]])).unwrap_err();
            assert!(e.contains("NUM_TOKENS") || e.contains("TEMPERATURE"), "{e}");
        }
        assert!(rewrite_short_form(v(&["lmgen", "m", "i"])).is_err());
        assert_eq!(
            rewrite_short_form(v(&["lmgen", "score", "m"])).unwrap(),
            v(&["lmgen", "score", "m"])
        );
    }

    #[test]
    fn long_form_values() {
        let cli = Cli::try_parse_from(v(&[
            "lmgen",
            "embed",
            "m",
            "-i",
            "x",
            "-o",
            "y.safetensors",
            "--layers",
            "-1,0",
            "--layers=2",
        ]))
        .unwrap();
        let Command::Embed(e) = cli.command else {
            panic!()
        };
        assert_eq!(e.layers, vec!["-1", "0", "2"]);
        assert!(Cli::try_parse_from(v(&[
            "lmgen",
            "generate",
            "m",
            "-i",
            "x",
            "-o",
            "y",
            "--temperature",
            "-1"
        ]))
        .is_err());
        assert!(Cli::try_parse_from(v(&[
            "lmgen",
            "generate",
            "m",
            "-i",
            "x",
            "-o",
            "y",
            "--resume",
            "--overwrite"
        ]))
        .is_err());
        Cli::try_parse_from(v(&[
            "lmgen", "generate", "m", "-i", "-", "-o", "-", "--stop", "a", "--stop", "b",
        ]))
        .unwrap();
    }
}
