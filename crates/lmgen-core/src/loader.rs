//! From a resolved model location to a runnable [`Model`]: config → spec, checkpoint files →
//! weight store → canonical weights (strictly accounted), tokenizer, EOS set.
use crate::config::{ModelSpec, Positions, RawConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::families::{self, Loader};
use crate::hub::ModelLocation;
use crate::kernels::quant::QuantKind;
use crate::model::Decoder;
use crate::plan::{self, Placement, Plan};
use crate::tokenizer::LmTokenizer;
use crate::weights::{
    gguf::GgufFile, pth::PthFile, st, st::SafetensorsFile, TensorSource, WeightStore,
};
use candle_core::DType;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Where the layers go (see [`Placement`]); default: all on the CPU.
    pub placement: Placement,
    /// Compute dtype (f32 on CPU).
    pub dtype: DType,
    /// Weight-only quantization applied after loading (CPU).
    pub quantize: Option<QuantKind>,
    /// Keep matrices a GGUF file stores quantized in that form (CPU), as llama.cpp does,
    /// instead of dequantizing them to `dtype` (as transformers does).
    pub keep_quantized: bool,
    /// Use f32, bf16 and f16 matrices in place from the checkpoint's memory map where their
    /// stored layout is the one computed with (CPU, f32 compute): no copy at load time, pages
    /// read on first use and shared between processes. `false` copies every weight, as
    /// `--no-mmap` asks (bf16 / f16 ones still in their dtype, computed in f32).
    pub map_weights: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            placement: Placement::default(),
            dtype: DType::F32,
            quantize: None,
            keep_quantized: true,
            map_weights: true,
        }
    }
}

/// When weights are used in place from the checkpoint's memory map
/// ([`LoadOptions::map_weights`]) rather than copied into memory of their own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MapWeights {
    /// In place for short jobs (at most [`MAP_IN_PLACE_MAX_STEPS`] model steps), copied for
    /// longer ones.
    #[default]
    Auto,
    Always,
    Never,
}

/// Up to this many model steps (decode steps, prefill chunks) a job is done sooner with its
/// f32 weights used in place. In place, loading skips the copy (SmolLM2-135M F32 GGUF, 2
/// threads: load 0.35–0.44 s instead of 0.97–0.99 s), but every step then streams the weights
/// through 4 KiB page-cache pages instead of the copy's huge pages: batch-1 decode 29–45
/// (median 32) instead of 34–41 (median 39) tokens/s in 6 alternating rounds; at batch 64 no
/// loss could be told from the machine's noise. The copy pays for itself after ~100
/// memory-bound steps; the 4 × 75 job (75 steps at batch 4) takes 2.9–3.6 s in place against
/// 3.5–4.1 s copied.
pub const MAP_IN_PLACE_MAX_STEPS: usize = 100;

impl MapWeights {
    /// Whether a job of about `steps` model steps uses its weights in place.
    pub fn in_place(self, steps: usize) -> bool {
        match self {
            MapWeights::Auto => steps <= MAP_IN_PLACE_MAX_STEPS,
            MapWeights::Always => true,
            MapWeights::Never => false,
        }
    }
}

/// A loaded model: decoder, tokenizer, and the token ids that end generation.
pub struct Model {
    pub decoder: Decoder,
    pub tokenizer: LmTokenizer,
    pub eos: Vec<u32>,
    pub location: ModelLocation,
    /// The plan of a [`Placement::Auto`] spread over several devices; `None` on one device.
    pub placement: Option<Plan>,
}

impl Model {
    pub fn spec(&self) -> &ModelSpec {
        &self.decoder.spec
    }

    /// Longest sequence the model can process, if it has a hard limit (learned positions).
    /// RoPE and ALiBi models have a trained context (`max_positions`) that prompts must fit,
    /// but generation may run past it as in `transformers`.
    pub fn hard_limit(&self) -> Option<usize> {
        match &self.decoder.spec.positions {
            Positions::Learned { .. } => Some(self.decoder.spec.max_positions),
            _ => None,
        }
    }

    pub fn context_length(&self) -> Option<usize> {
        match &self.decoder.spec.positions {
            Positions::Rope(r) if matches!(r.scaling, RopeScaling::Dynamic { .. }) => None,
            _ => Some(self.decoder.spec.max_positions),
        }
    }

    /// Whether a sequence of `len` tokens can be processed.
    pub fn fits(&self, len: usize) -> bool {
        self.hard_limit().is_none_or(|l| len <= l)
    }

    pub fn check_prompt(&self, ids: &[u32]) -> Result<()> {
        if let Some(limit) = self.context_length() {
            if ids.len() > limit {
                return Err(Error::BadRequest(format!(
                    "prompt has {} tokens, more than the model's context of {limit} (use --truncate left|right)",
                    ids.len()
                )));
            }
        }
        let vocab = self.decoder.spec.vocab_size as u32;
        if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
            return Err(Error::BadRequest(format!(
                "token id {bad} is out of range (vocab size {vocab})"
            )));
        }
        Ok(())
    }
}

/// The model's normalized description from its config alone (no weights read).
pub fn read_spec(location: &ModelLocation) -> Result<ModelSpec> {
    let cfg = match location {
        ModelLocation::Dir(dir) => {
            let p = dir.join("config.json");
            if !p.is_file() {
                return Err(Error::ModelNotFound(format!(
                    "{}: no config.json",
                    dir.display()
                )));
            }
            RawConfig::from_file(&p)?
        }
        ModelLocation::Gguf(file) => gguf_config(file, &open_gguf(file)?)?,
    };
    let (family, arch) = families::detect(&cfg)?;
    families::spec(family, &arch, &cfg)
}

/// How a checkpoint stores its weights, as a CPU load keeps them: "f32", "bf16", "f16"
/// (computed in f32, but not widened in memory) or a GGUF block format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredFormats {
    /// The format holding most matrix values (`None`: another; plan with the compute dtype).
    pub matrices: Option<&'static str>,
    /// A GGUF's embedding table format (`None` for a directory: planned as its matrices).
    pub embedding: Option<&'static str>,
}

/// The [`StoredFormats`] of a checkpoint, from its files' headers only.
pub fn stored_formats(location: &ModelLocation) -> Result<StoredFormats> {
    Ok(match location {
        ModelLocation::Dir(dir) => {
            let matrices = match WeightStore::new(open_checkpoint(dir)?)?.matrix_dtype() {
                Some(DType::BF16) => Some("bf16"),
                Some(DType::F16) => Some("f16"),
                Some(DType::F32) => Some("f32"),
                _ => None,
            };
            StoredFormats {
                matrices,
                embedding: None,
            }
        }
        ModelLocation::Gguf(file) => {
            let g = GgufFile::open(file)?;
            StoredFormats {
                matrices: g.weight_format(),
                embedding: g.embedding_format(),
            }
        }
    })
}

pub fn load(location: &ModelLocation, opts: &LoadOptions) -> Result<Model> {
    match location {
        ModelLocation::Dir(dir) => load_dir(dir, location, opts),
        ModelLocation::Gguf(file) => load_gguf(file, location, opts),
    }
}

fn load_dir(dir: &Path, location: &ModelLocation, opts: &LoadOptions) -> Result<Model> {
    let cfg_path = dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(Error::ModelNotFound(format!(
            "{}: no config.json",
            dir.display()
        )));
    }
    let cfg = RawConfig::from_file(&cfg_path)?;
    let (family, arch) = families::detect(&cfg)?;
    let spec = families::spec(family, &arch, &cfg)?;
    let store = WeightStore::new(open_checkpoint(dir)?)?;
    let tokenizer = LmTokenizer::from_dir(dir)?;
    let generation = dir.join("generation_config.json");
    let mut eos = if generation.is_file() {
        RawConfig::from_file(&generation)?.token_ids("eos_token_id")
    } else {
        vec![]
    };
    if eos.is_empty() {
        eos = spec.eos_token_ids.clone();
    }
    build(spec, store, tokenizer, eos, location, opts)
}

fn load_gguf(file: &Path, location: &ModelLocation, opts: &LoadOptions) -> Result<Model> {
    let g = open_gguf(file)?;
    let cfg = gguf_config(file, &g)?;
    let (family, arch) = families::detect(&cfg)?;
    let spec = families::spec(family, &arch, &cfg)?;
    let tokenizer = LmTokenizer::from_gguf(g.content(), file)?;
    let mut eos = spec.eos_token_ids.clone();
    if eos.is_empty() {
        eos.extend(tokenizer.eos_token_id());
    }
    let store = WeightStore::new(vec![Box::new(g)])?;
    build(spec, store, tokenizer, eos, location, opts)
}

/// A GGUF file with its tensors under the names of the family its architecture belongs to.
fn open_gguf(file: &Path) -> Result<GgufFile> {
    let g = GgufFile::open(file)?;
    let arch = families::gguf_arch(file, g.architecture())?;
    g.with_arch(arch)
}

/// The config of a GGUF file, as the class its architecture stands for in the registry.
fn gguf_config(file: &Path, g: &GgufFile) -> Result<RawConfig> {
    Ok(RawConfig::from_value(file, g.config_json()?))
}

fn build(
    mut spec: ModelSpec,
    store: WeightStore,
    tokenizer: LmTokenizer,
    eos: Vec<u32>,
    location: &ModelLocation,
    opts: &LoadOptions,
) -> Result<Model> {
    if spec.bos_token_id.is_none() {
        spec.bos_token_id = tokenizer.bos_token_id();
    }
    let layout = opts.placement.resolve(
        &spec,
        plan::weight_format(opts.quantize, opts.dtype),
        opts.dtype,
    )?;
    let mut loader = Loader::new(&store, layout.embeddings.clone(), opts.dtype)
        .keep_quantized(opts.keep_quantized)
        .map_weights(opts.map_weights);
    if let Some(devices) = &layout.blocks {
        loader = loader.with_placement(devices.clone());
    }
    let mut weights = families::load(&spec, &loader)?;
    if let Some(kind) = opts.quantize {
        if !layout.embeddings.is_cpu() || layout.blocks.is_some() {
            return Err(Error::BadRequest(format!(
                "--quantize {kind} is supported on the CPU only"
            )));
        }
        weights.quantize(kind)?;
    }
    Ok(Model {
        decoder: Decoder::new(spec, weights, layout.embeddings),
        tokenizer,
        eos,
        location: location.clone(),
        placement: layout.plan,
    })
}

/// The weight files of a Hugging Face directory, in the order transformers prefers them.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        return st::read_index(&index);
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.is_file() {
        return Ok(vec![bin]);
    }
    let index = dir.join("pytorch_model.bin.index.json");
    if index.is_file() {
        return st::read_index(&index);
    }
    Err(Error::bad_weights(
        dir,
        "no weights found (expected model.safetensors, model.safetensors.index.json, pytorch_model.bin or pytorch_model.bin.index.json)",
    ))
}

fn open_checkpoint(dir: &Path) -> Result<Vec<Box<dyn TensorSource>>> {
    checkpoint_files(dir)?
        .into_iter()
        .map(|f| -> Result<Box<dyn TensorSource>> {
            if f.extension().is_some_and(|e| e == "safetensors") {
                Ok(Box::new(SafetensorsFile::open(&f)?))
            } else {
                Ok(Box::new(PthFile::open(&f)?))
            }
        })
        .collect()
}
