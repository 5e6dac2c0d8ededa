//! Parity with `transformers` (fp32, eager) on tiny random-weight models of every family,
//! plus self-consistency (incremental == full forward, batched == single).
//! Fixtures and goldens come from `scripts/make_fixtures.py`.
use lmgen_core::engine::{embed_batch, score_batch, GenRequest, Generator, Pool};
use lmgen_core::hub::ModelLocation;
use lmgen_core::sampling::SamplingParams;
use lmgen_core::{load, LoadOptions, Model};
use serde_json::Value;
use std::path::PathBuf;

const LOGPROB_TOL: f32 = 2e-3;
const HIDDEN_REL_TOL: f32 = 1e-3;
/// Greedy tokens may diverge only where the reference's top-2 gap is a near-tie.
const NEAR_TIE: f32 = 1e-2;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model_dir(name: &str) -> PathBuf {
    let nested = fixtures().join("models").join(name);
    if nested.is_dir() {
        nested
    } else {
        fixtures().join(name)
    }
}

fn golden(name: &str) -> Value {
    let p = fixtures().join("golden").join(format!("{name}.json"));
    serde_json::from_str(
        &std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
    )
    .unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn load_fixture(name: &str) -> Model {
    load(
        &ModelLocation::Dir(model_dir(name)),
        &LoadOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn greedy(
    model: &Model,
    prompts: &[Vec<u32>],
    max_new: usize,
    batch: usize,
    step_tokens: usize,
) -> Vec<(Vec<u32>, Vec<f32>, &'static str)> {
    let reqs = prompts.iter().enumerate().map(|(i, p)| GenRequest {
        index: i,
        sample: 0,
        prompt_ids: p.clone(),
        max_new_tokens: max_new,
        params: SamplingParams::default(),
        stop: vec![],
        logprobs: true,
        top_logprobs: 0,
        ignore_eos: false,
        stream_key: Some(i as u64),
    });
    let mut out = vec![(vec![], vec![], ""); prompts.len()];
    let mut gen = Generator::new(model, batch);
    gen.max_step_tokens = step_tokens;
    gen.run(
        reqs,
        |o| {
            out[o.index] = (o.token_ids, o.logprobs.unwrap(), o.finish_reason.as_str());
            Ok(())
        },
        |_| {},
    )
    .unwrap();
    out
}

fn check_family(name: &str) {
    check_model(name, &load_fixture(name));
}

/// The checks of [`check_family`] on `model` against the goldens of fixture `name`.
fn check_model(name: &str, model: &Model) {
    let g = golden(name);
    let prompts: Vec<Vec<u32>> = g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| ids(&p["input_ids"]))
        .collect();
    let max_new = 10;

    // 1. Prompt log-probabilities (one full forward pass).
    let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
    let scores = score_batch(model, &refs).unwrap();
    let mut worst = 0f32;
    for (i, (p, s)) in g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&scores)
        .enumerate()
    {
        let want = floats(&p["prompt_logprobs"]);
        assert_eq!(
            want.len(),
            s.logprobs.len(),
            "{name} prompt {i}: logprob count"
        );
        for (j, (a, b)) in s.logprobs.iter().zip(&want).enumerate() {
            worst = worst.max((a - b).abs());
            assert!(
                (a - b).abs() <= LOGPROB_TOL,
                "{name} prompt {i} token {j}: logprob {a} vs transformers {b}"
            );
        }
    }

    eprintln!("{name}: max |prompt logprob - transformers| = {worst:.2e}");

    // 2. Greedy generation, one prompt at a time, vs transformers' generate().
    let single = greedy(model, &prompts, max_new, 1, 2048);
    let mut worst_greedy = 0f32;
    for (i, (p, (toks, lps, finish))) in g["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .zip(&single)
        .enumerate()
    {
        let want = ids(&p["greedy"]["token_ids"]);
        let want_lp = floats(&p["greedy"]["logprobs"]);
        let gaps = floats(&p["greedy"]["top2_gap"]);
        for j in 0..want.len().min(toks.len()) {
            if toks[j] != want[j] {
                assert!(
                    gaps[j] < NEAR_TIE,
                    "{name} prompt {i} step {j}: token {} vs transformers {} (top-2 gap {})",
                    toks[j],
                    want[j],
                    gaps[j]
                );
                break;
            }
            worst_greedy = worst_greedy.max((lps[j] - want_lp[j]).abs());
            assert!(
                (lps[j] - want_lp[j]).abs() <= LOGPROB_TOL,
                "{name} prompt {i} step {j}: logprob {} vs {}",
                lps[j],
                want_lp[j]
            );
        }
        if toks == &want {
            assert_eq!(
                p["greedy"]["finish_reason"].as_str().unwrap(),
                *finish,
                "{name} prompt {i}: finish reason"
            );
        }
    }

    eprintln!("{name}: max |greedy logprob - transformers| = {worst_greedy:.2e}");

    // 3. Hidden states (output_hidden_states indexing) where recorded.
    let layers: Vec<usize> = (0..=model.spec().num_layers).collect();
    for (i, p) in g["prompts"].as_array().unwrap().iter().enumerate() {
        let Some(hs) = p.get("hidden_states").and_then(|h| h.as_array()) else {
            continue;
        };
        assert_eq!(hs.len(), layers.len(), "{name}: hidden state count");
        let got = embed_batch(model, &[&prompts[i]], &layers, Pool::None)
            .unwrap()
            .remove(0);
        for (l, (t, want)) in got.iter().zip(hs).enumerate() {
            let got: Vec<Vec<f32>> = t.to_vec2().unwrap();
            let want: Vec<Vec<f32>> = want.as_array().unwrap().iter().map(floats).collect();
            assert_eq!(
                (got.len(), got[0].len()),
                (want.len(), want[0].len()),
                "{name} prompt {i} layer {l}: shape"
            );
            let scale = want
                .iter()
                .flatten()
                .fold(0f32, |m, x| m.max(x.abs()))
                .max(1e-6);
            let err = got
                .iter()
                .flatten()
                .zip(want.iter().flatten())
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err / scale <= HIDDEN_REL_TOL,
                "{name} prompt {i} layer {l}: max rel error {}",
                err / scale
            );
        }
    }

    // 4. Batched == single: identical tokens whatever shares the batch,
    //    also with prompts prefilled in chunks of 3 tokens across steps.
    let batched = greedy(model, &prompts, max_new, 3, 2048);
    let chunked = greedy(model, &prompts, max_new, 2, 3);
    for (i, ((a, b), c)) in single.iter().zip(&batched).zip(&chunked).enumerate() {
        assert_eq!(
            a.0, b.0,
            "{name} prompt {i}: batch of 3 differs from batch of 1"
        );
        // (Chunks are rotated for the whole prompt's length, so dynamic NTK and longrope
        // prompts prefilled in chunks match too.)
        assert_eq!(a.0, c.0, "{name} prompt {i}: chunked prefill differs");
    }

    // 5. Incremental decoding == full forward over prompt + generated tokens
    //    (not for dynamic NTK, whose frequencies depend on the length seen per call, by design;
    //    with longrope, only the steps past original_max_position_embeddings, computed with the
    //    long factors like the full forward).
    let longrope = model.spec().longrope_original_max();
    if !name.contains("dynamic") {
        for (i, (toks, lps, _)) in single.iter().enumerate() {
            let mut full = prompts[i].clone();
            full.extend(toks);
            let s = score_batch(model, &[&full]).unwrap().remove(0);
            let tail = &s.logprobs[prompts[i].len() - 1..];
            for (j, (a, b)) in lps.iter().zip(tail).enumerate() {
                if longrope.is_some_and(|o| prompts[i].len() + j <= o) {
                    continue;
                }
                assert!(
                    (a - b).abs() <= 1e-4,
                    "{name} prompt {i} step {j}: incremental {a} vs full forward {b}"
                );
            }
        }
    }
}

macro_rules! family_tests {
    ($($test:ident => $name:literal),* $(,)?) => { $( #[test] fn $test() { check_family($name); } )* };
}

family_tests! {
    gpt2 => "gpt2",
    gpt2_variants => "gpt2-variants",
    opt => "opt",
    opt_postnorm => "opt-postnorm",
    opt_proj => "opt-proj",
    opt_nobias_gelu => "opt-nobias-gelu",
    opt_slowtok => "opt-slowtok",
    opt_noaffine => "opt-noaffine",
    neox => "neox",
    neox_seq => "neox-seq",
    bloom => "bloom",
    bloom_6heads => "bloom-6heads",
    bloom_postln => "bloom-postln",
    gpt2_noscale => "gpt2-noscale",
    llama => "llama",
    llama_mqa_tied => "llama-mqa-tied",
    llama_rope_linear => "llama-rope-linear",
    llama_rope_dynamic => "llama-rope-dynamic",
    llama_rope_llama3 => "llama-rope-llama3",
    llama_rope_yarn => "llama-rope-yarn",
    mistral_swa => "mistral-swa",
    qwen2 => "qwen2",
    gemma => "gemma",
    gemma2 => "gemma2",
    gemma3 => "gemma3",
    qwen3 => "qwen3",
    phi3 => "phi3",
    phi3_longrope => "phi3-longrope",
    olmo => "olmo",
    olmo2 => "olmo2",
    stablelm => "stablelm",
    stablelm_qkln_par => "stablelm-qkln-par",
    starcoder2 => "starcoder2",
    phi => "phi",
    phi_qkln => "phi-qkln",
    gptj => "gptj",
    falcon => "falcon",
    falcon_mq => "falcon-mq",
    falcon_rw => "falcon-rw",
    falcon_rw_long => "falcon-rw-long",
    gpt_bigcode => "gpt-bigcode",
    gpt_bigcode_mha => "gpt-bigcode-mha",
    mpt => "mpt",
    mixtral => "mixtral",
    mixtral_ties => "mixtral-ties",
    qwen2_moe => "qwen2-moe",
    qwen3_moe => "qwen3-moe",
    olmoe => "olmoe",
    gemma_gguf => "gemma-gguf",
    phi3_longrope_gguf => "phi3-longrope-gguf",
    gemma2_gguf => "gemma2-gguf",
    gemma3_gguf => "gemma3-gguf",
    starcoder2_gguf => "starcoder2-gguf",
    qwen3_moe_gguf => "qwen3-moe-gguf",
}

/// A GGUF file written by llama.cpp's `convert_hf_to_gguf.py` from a fixture (in the fixture's
/// own precision, so the weights are exactly the fixture's) runs like the checkpoint, with the
/// tokenizer rebuilt from the GGUF metadata giving the same ids. The `-gguf` fixtures are
/// variants that a GGUF can describe (see scripts/make_fixtures.py).
#[test]
fn gguf_from_llama_cpp_converter() {
    // (golden, file, space): Gemma's converter records no space prefix (Gemma's SentencePiece
    // model has none) where the fixtures' Llama-style tokenizer adds one, so for those the
    // text is given with its leading space.
    for (name, file, space) in [
        ("qwen3", "qwen3.f16.gguf", ""),
        ("qwen2-moe", "qwen2-moe.f16.gguf", ""),
        ("olmo2", "olmo2.f32.gguf", ""),
        ("gemma-gguf", "gemma.bf16.gguf", " "),
        ("gemma2-gguf", "gemma2.f32.gguf", " "),
        ("gemma3-gguf", "gemma3.bf16.gguf", " "),
        ("phi3", "phi3.bf16.gguf", ""),
        ("phi3-longrope-gguf", "phi3-longrope.bf16.gguf", ""),
        ("starcoder2-gguf", "starcoder2.f16.gguf", ""),
        ("falcon", "falcon.bf16.gguf", ""),
        ("falcon-mq", "falcon-mq.f16.gguf", ""),
        ("qwen3-moe-gguf", "qwen3-moe.bf16.gguf", ""),
        ("phi", "phi2.f16.gguf", ""),
        ("stablelm", "stablelm.bf16.gguf", ""),
        ("gpt-bigcode", "gpt-bigcode.bf16.gguf", ""),
        ("bloom", "bloom.f32.gguf", ""),
        ("gpt2", "gpt2.f32.gguf", ""),
        ("neox", "neox.f32.gguf", ""),
        ("mpt", "mpt.bf16.gguf", ""),
        ("llama-mqa-tied", "llama-mqa-tied.f16.gguf", ""),
    ] {
        let path = fixtures().join("gguf").join(file);
        let model = load(&ModelLocation::Gguf(path.clone()), &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(model.spec().architecture, golden(name)["architecture"]);
        for p in golden(name)["prompts"].as_array().unwrap() {
            let text = p["text"].as_str().unwrap();
            assert_eq!(
                model.tokenizer.encode(&format!("{space}{text}")).unwrap(),
                ids(&p["input_ids"]),
                "{file}: {text:?}"
            );
        }
        check_model(name, &model);
    }
}

/// A quantized GGUF's embedding table stays in its block format (as llama.cpp keeps it; a tied
/// output head is the same matrix, not a second copy), and the rows gathered from it are the
/// values of the table dequantized at load (`--dequantize`), bit for bit.
#[test]
fn gguf_quantized_embedding_table_stays_quantized() {
    use lmgen_core::model::layers::{Embedding, Weight};
    for file in [
        "gpt2.q8_0.gguf",
        "falcon.q8_0.gguf",
        "bloom.q8_0.gguf",
        "qwen2-moe.q8_0.gguf",
    ] {
        let loc = ModelLocation::Gguf(fixtures().join("gguf").join(file));
        let kept = load(&loc, &LoadOptions::default()).unwrap();
        let opts = LoadOptions {
            keep_quantized: false,
            ..LoadOptions::default()
        };
        let deq = load(&loc, &opts).unwrap();
        let w = &kept.decoder.weights;
        let Embedding::Quant(q) = &w.embed else {
            panic!("{file}: embedding table not kept quantized");
        };
        assert!(matches!(deq.decoder.weights.embed, Embedding::Tensor(_)));
        if kept.spec().tie_embeddings {
            match &w.lm_head.weight {
                Weight::Quant(h) => assert!(std::sync::Arc::ptr_eq(q, h), "{file}: tied head"),
                _ => panic!("{file}: tied head not the quantized table"),
            }
        }
        let ids =
            candle_core::Tensor::arange(0u32, q.rows() as u32, &candle_core::Device::Cpu).unwrap();
        let rows = |m: &Model| -> Vec<u32> {
            let t = m.decoder.weights.embed.rows_of(&ids).unwrap();
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            v.iter().map(|x| x.to_bits()).collect()
        };
        assert_eq!(rows(&kept), rows(&deq), "{file}: rows");
        let bad = candle_core::Tensor::new(&[q.rows() as u32], &candle_core::Device::Cpu).unwrap();
        let err = w.embed.rows_of(&bad).unwrap_err().to_string();
        assert!(err.contains("outside the vocabulary"), "{err}");
    }
}

/// A Q8_0 GGUF of a mixture of experts keeps its stacked expert matrices quantized (one
/// expert's rows sliced out of llama.cpp's `[experts, rows, cols]` tensor) and tracks the f32
/// goldens as closely as quantized dense models do.
#[test]
fn gguf_q8_0_experts_stay_quantized() {
    let path = fixtures().join("gguf/qwen2-moe.q8_0.gguf");
    let model = load(&ModelLocation::Gguf(path), &LoadOptions::default()).unwrap();
    let moe = model.decoder.weights.blocks[0].moe.as_ref().unwrap();
    for (gu, down) in &moe.experts {
        assert!(matches!(
            gu.weight,
            lmgen_core::model::layers::Weight::Quant(_)
        ));
        assert!(matches!(
            down.weight,
            lmgen_core::model::layers::Weight::Quant(_)
        ));
    }
    let g = golden("qwen2-moe");
    let mut worst = 0f32;
    for p in g["prompts"].as_array().unwrap() {
        let s = score_batch(&model, &[&ids(&p["input_ids"])])
            .unwrap()
            .remove(0);
        for (a, b) in s.logprobs.iter().zip(floats(&p["prompt_logprobs"])) {
            worst = worst.max((a - b).abs());
        }
    }
    eprintln!("qwen2-moe q8_0 GGUF: max |logprob - transformers f32| = {worst}");
    assert!(worst < 1.0, "{worst}");
}

/// Q8_0 GGUF files keep their fused QKV matrices quantized with the rows put back in
/// canonical order (from Falcon's kv groups, BLOOM's per-head interleave) or, for GPT-2's
/// transposed Conv1D matrices, expanded: the kept matrix is exactly the one the same file gives
/// dequantized at load, and the model runs alike (up to the quantized activations).
#[test]
fn gguf_q8_0_reordered_rows_match_dequantized() {
    for (name, file) in [
        ("falcon", "falcon.q8_0.gguf"),
        ("bloom", "bloom.q8_0.gguf"),
        ("gpt2", "gpt2.q8_0.gguf"),
    ] {
        let path = fixtures().join("gguf").join(file);
        let load_as = |keep_quantized| {
            let opts = LoadOptions {
                keep_quantized,
                ..LoadOptions::default()
            };
            load(&ModelLocation::Gguf(path.clone()), &opts).unwrap()
        };
        let (q, dense) = (load_as(true), load_as(false));
        for (bq, bd) in q
            .decoder
            .weights
            .blocks
            .iter()
            .zip(&dense.decoder.weights.blocks)
        {
            let kept = matches!(bq.qkv.weight, lmgen_core::model::layers::Weight::Quant(_));
            assert_eq!(kept, name != "gpt2", "{file}");
            let diff = (bq.qkv.to_dense().unwrap() - bd.qkv.to_dense().unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{file}");
        }
        let mut worst = 0f32;
        for p in golden(name)["prompts"].as_array().unwrap() {
            let ids = ids(&p["input_ids"]);
            let a = score_batch(&q, &[&ids]).unwrap().remove(0);
            let b = score_batch(&dense, &[&ids]).unwrap().remove(0);
            for (x, y) in a.logprobs.iter().zip(&b.logprobs) {
                worst = worst.max((x - y).abs());
            }
        }
        eprintln!("{file}: max |logprob kept Q8_0 - dequantized| = {worst:.2e}");
        assert!(worst < 0.5, "{file}: {worst}");
    }
}

/// Weights used in place from the file's memory map in their stored dtype (f32, bf16, f16;
/// fused parts kept as separate tensors) give the bits of copies widened to f32 at load: prompt
/// logprobs and greedy continuations, batched, on both executors (scoring, generation).
/// Matrices whose stored layout differs (GPT-2's transposed Conv1D, the per-head interleaved
/// fused QKV of NeoX and BLOOM) are copied.
#[test]
fn weights_in_place_give_the_bits_of_copies() {
    use lmgen_core::model::layers::{Embedding, Linear, Weight};
    let gguf = |f: &str| ModelLocation::Gguf(fixtures().join("gguf").join(f));
    let dir = |n: &str| ModelLocation::Dir(model_dir(n));
    // (golden, location, matrices per block expected in place: qkv, out, mlp_in, mlp_out)
    let cases = [
        (
            "llama-rope-linear",
            dir("llama-rope-linear"),
            [true, true, true, true],
        ),
        ("opt", dir("opt"), [true, true, true, true]),
        (
            "phi3-longrope",
            dir("phi3-longrope"),
            [true, true, true, true],
        ),
        ("gpt2", dir("gpt2"), [false, false, false, false]),
        // GGUF stores GPT-2's Conv1D matrices transposed: the layout the products use.
        ("gpt2", gguf("gpt2.f32.gguf"), [true, true, true, true]),
        ("gpt2", gguf("gpt2.f16.gguf"), [true, true, true, true]),
        ("neox", dir("neox"), [false, true, true, true]),
        ("olmo2", gguf("olmo2.f32.gguf"), [true, true, true, true]),
        ("gemma2", gguf("gemma2.f32.gguf"), [true, true, true, true]),
        ("bloom", gguf("bloom.f32.gguf"), [false, true, true, true]),
        // bf16 / f16 checkpoints: safetensors and GGUF, dense and mixture-of-experts.
        ("qwen2", dir("qwen2"), [true, true, true, true]),
        ("qwen3", dir("qwen3"), [true, true, true, true]),
        ("mixtral", dir("mixtral"), [true, true, false, false]),
        ("gemma", dir("gemma"), [true, true, true, true]),
        ("phi3", gguf("phi3.bf16.gguf"), [true, true, true, true]),
        ("qwen3", gguf("qwen3.f16.gguf"), [true, true, true, true]),
        (
            "stablelm",
            gguf("stablelm.bf16.gguf"),
            [true, true, true, true],
        ),
        // Row orders put back in copies of their own, still half precision: Q/K permuted by
        // the `llama` converter (QKV then in three parts: two copies and V in place), Falcon's
        // grouped fused QKV.
        (
            "llama-mqa-tied",
            gguf("llama-mqa-tied.f16.gguf"),
            [false, true, true, true],
        ),
        (
            "falcon",
            gguf("falcon.bf16.gguf"),
            [false, true, true, true],
        ),
    ];
    for (name, loc, expect) in cases {
        let load_as = |map_weights| {
            let opts = LoadOptions {
                map_weights,
                ..LoadOptions::default()
            };
            load(&loc, &opts).unwrap_or_else(|e| panic!("{name}: {e}"))
        };
        let (mapped, copied) = (load_as(true), load_as(false));
        let in_place = |l: &Linear| matches!(&l.weight, Weight::Mapped(m) if m.in_file());
        // Copies keep a bf16 / f16 matrix in its dtype (a map of their own); f32 ones are
        // tensors.
        let copy_kept_as_stored = |m: &Linear, c: &Linear| match (&m.weight, &c.weight) {
            (Weight::Mapped(m), Weight::Mapped(c)) => {
                m.dtype_name() != "f32" && !c.in_file() && c.dtype_name() == m.dtype_name()
            }
            (Weight::Mapped(m), Weight::Dense(_)) => m.dtype_name() == "f32",
            (_, c) => !matches!(c, Weight::Mapped(_)),
        };
        // The embedding table is stored as it is used by every format here.
        match (&mapped.decoder.weights.embed, &copied.decoder.weights.embed) {
            (Embedding::Mapped(m), Embedding::Tensor(_)) => {
                assert!(m.in_file() && m.dtype_name() == "f32", "{name}")
            }
            (Embedding::Mapped(m), Embedding::Mapped(c)) => assert!(
                m.in_file() && !c.in_file() && m.dtype_name() != "f32",
                "{name}: half-precision table copied as stored"
            ),
            _ => panic!("{name}: embedding table in place"),
        }
        for (bm, bc) in mapped
            .decoder
            .weights
            .blocks
            .iter()
            .zip(&copied.decoder.weights.blocks)
        {
            let got = [&bm.qkv, &bm.out, &bm.mlp_in, &bm.mlp_out].map(in_place);
            assert_eq!(got, expect, "{name} ({loc:?}): matrices in place");
            // Mixture-of-experts: every expert's matrices are in place too.
            if let Some(moe) = &bm.moe {
                assert!(moe.experts.iter().all(|(a, b)| in_place(a) && in_place(b)));
            }
            for (m, c) in [&bm.qkv, &bm.out, &bm.mlp_in, &bm.mlp_out]
                .into_iter()
                .zip([&bc.qkv, &bc.out, &bc.mlp_in, &bc.mlp_out])
            {
                assert!(!in_place(c) && copy_kept_as_stored(m, c), "{name}: copies");
            }
        }
        let prompts = golden_prompts(name);
        let (want_lp, want_gen) = exact_outputs(&copied, &prompts);
        let (got_lp, got_gen) = exact_outputs(&mapped, &prompts);
        assert_eq!(got_lp, want_lp, "{name}: prompt logprobs");
        assert_eq!(got_gen, want_gen, "{name}: greedy");
    }
}

fn golden_prompts(name: &str) -> Vec<Vec<u32>> {
    golden(name)["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| ids(&p["input_ids"]))
        .collect()
}

/// The bits of the prompts' logprobs, and of 8 greedy tokens each with their logprobs.
#[allow(clippy::type_complexity)]
fn exact_outputs(m: &Model, prompts: &[Vec<u32>]) -> (Vec<Vec<u32>>, Vec<(Vec<u32>, Vec<u32>)>) {
    let refs: Vec<&[u32]> = prompts.iter().map(|p| &p[..]).collect();
    let lp = score_batch(m, &refs)
        .unwrap()
        .iter()
        .map(|s| s.logprobs.iter().map(|x| x.to_bits()).collect())
        .collect();
    let gen = greedy(m, prompts, 8, 4, 512)
        .into_iter()
        .map(|(t, lp, _)| (t, lp.iter().map(|x| x.to_bits()).collect()))
        .collect();
    (lp, gen)
}

/// GPT-2's Conv1D matrices stored bf16 or f16 are transposed into copies that keep the dtype
/// (not widened to f32), with the bits of the same values stored as f32.
#[test]
fn half_conv1d_weights_are_kept_transposed_in_their_dtype() {
    use lmgen_core::model::layers::Weight;
    use safetensors::tensor::TensorView;
    let src = model_dir("gpt2");
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let prompts = golden_prompts("gpt2");
    let tmp = tempfile::tempdir().unwrap();
    for (dtype, bits_of, round) in [
        (
            safetensors::Dtype::BF16,
            (|x: f32| half::bf16::from_f32(x).to_bits()) as fn(f32) -> u16,
            (|x: f32| half::bf16::from_f32(x).to_f32()) as fn(f32) -> f32,
        ),
        (
            safetensors::Dtype::F16,
            |x: f32| half::f16::from_f32(x).to_bits(),
            |x: f32| half::f16::from_f32(x).to_f32(),
        ),
    ] {
        // The checkpoint in half precision, and its values widened back and stored as f32.
        let (mut half_data, mut f32_data) = (Vec::new(), Vec::new());
        for (name, t) in st.tensors() {
            let v: Vec<f32> = t
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect();
            let h: Vec<u8> = v.iter().flat_map(|&x| bits_of(x).to_le_bytes()).collect();
            let w: Vec<u8> = v.iter().flat_map(|&x| round(x).to_le_bytes()).collect();
            half_data.push((name.clone(), t.shape().to_vec(), h));
            f32_data.push((name, t.shape().to_vec(), w));
        }
        let mut models = Vec::new();
        for (sub, data, dt) in [
            ("half", &half_data, dtype),
            ("f32", &f32_data, safetensors::Dtype::F32),
        ] {
            let dir = tmp.path().join(format!("{dtype:?}-{sub}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in std::fs::read_dir(&src).unwrap() {
                let f = f.unwrap().path();
                if f.extension().is_some_and(|e| e == "json") {
                    std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
                }
            }
            let views: Vec<(String, TensorView)> = data
                .iter()
                .map(|(n, shape, b)| (n.clone(), TensorView::new(dt, shape.clone(), b).unwrap()))
                .collect();
            safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
            for map_weights in [false, true] {
                let opts = LoadOptions {
                    map_weights,
                    ..LoadOptions::default()
                };
                models.push(load(&ModelLocation::Dir(dir.clone()), &opts).unwrap());
            }
        }
        let want = format!("{dtype:?}").to_lowercase();
        for m in &models[..2] {
            for b in &m.decoder.weights.blocks {
                for l in [&b.qkv, &b.out, &b.mlp_in, &b.mlp_out] {
                    assert!(
                        matches!(&l.weight, Weight::Mapped(r) if !r.in_file() && r.dtype_name() == want),
                        "{dtype:?}: Conv1D kept as a {want} copy"
                    );
                }
            }
        }
        let want = exact_outputs(&models[2], &prompts);
        for m in &models {
            assert_eq!(exact_outputs(m, &prompts), want, "{dtype:?}");
        }
    }
}

/// `lmgen bench` builds every family from its config alone, with synthetic weights, and the
/// result runs on the paged CPU executor.
#[test]
fn every_family_builds_from_its_config_with_synthetic_weights() {
    let mut n = 0;
    for e in std::fs::read_dir(fixtures().join("golden")).unwrap() {
        let name = e
            .unwrap()
            .path()
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .to_string();
        let cfg = model_dir(&name).join("config.json");
        if !cfg.is_file() {
            continue;
        }
        let json: Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        let d = lmgen_core::bench::synthetic_decoder(
            json,
            7,
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(d.cpu_step_supported(), "{name}");
        n += 1;
    }
    assert!(n >= 40, "{n} fixture configs");
}

/// Expert matrices take `--quantize` like the others, and stay as close to f32 as the dense
/// matrices of a dense model do (these fixtures have large activations: q8_0 moves their
/// logprobs by tenths).
#[test]
fn experts_quantize() {
    use lmgen_core::model::quant::QuantKind;
    let worst = |name: &str| -> f32 {
        let g = golden(name);
        let model = load(
            &ModelLocation::Dir(model_dir(name)),
            &LoadOptions {
                quantize: Some(QuantKind::Q8_0),
                ..Default::default()
            },
        )
        .unwrap();
        if let Some(moe) = &model.decoder.weights.blocks[0].moe {
            assert!(matches!(
                moe.experts[0].0.weight,
                lmgen_core::model::layers::Weight::Quant(_)
            ));
        }
        let mut w = 0f32;
        for p in g["prompts"].as_array().unwrap() {
            let s = score_batch(&model, &[&ids(&p["input_ids"])])
                .unwrap()
                .remove(0);
            for (a, b) in s.logprobs.iter().zip(floats(&p["prompt_logprobs"])) {
                w = w.max((a - b).abs());
            }
        }
        w
    };
    let (moe, dense) = (worst("mixtral"), worst("llama"));
    eprintln!("q8_0 max |logprob - transformers f32|: mixtral {moe}, llama {dense}");
    assert!(moe < 3.0 * dense.max(0.1), "mixtral {moe} vs llama {dense}");
}

#[test]
fn every_golden_file_has_a_test() {
    let listed = include_str!("golden.rs");
    for e in std::fs::read_dir(fixtures().join("golden")).unwrap() {
        let name = e
            .unwrap()
            .path()
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .to_string();
        if name == "smollm2" {
            continue;
        }
        assert!(
            listed.contains(&format!("=> \"{name}\"")),
            "golden/{name}.json has no test in golden.rs"
        );
    }
}

/// The half-precision compute path (what GPUs run) on the CPU: f16/bf16 weights and
/// activations, attention softmax in f32. These fixtures have large activations, so errors
/// are those of the formats: measured max |Δlogprob| ≈ 0.045 (f16) and 0.22 (bf16, 3 fewer
/// mantissa bits). Greedy tokens (f16) must agree except at near-ties.
#[test]
fn half_precision_compute_tracks_transformers() {
    use candle_core::DType::{BF16, F16};
    for (name, dtype, tol) in [
        ("llama", F16, 0.06),
        ("opt", F16, 0.06),
        ("bloom", BF16, 0.3),
        ("neox", BF16, 0.3),
        ("gpt2", BF16, 0.3),
    ] {
        let g = golden(name);
        let model = load(
            &ModelLocation::Dir(model_dir(name)),
            &LoadOptions {
                dtype,
                ..Default::default()
            },
        )
        .unwrap();
        let prompts: Vec<Vec<u32>> = g["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| ids(&p["input_ids"]))
            .collect();
        let refs: Vec<&[u32]> = prompts.iter().map(|p| p.as_slice()).collect();
        for (i, (p, s)) in g["prompts"]
            .as_array()
            .unwrap()
            .iter()
            .zip(score_batch(&model, &refs).unwrap())
            .enumerate()
        {
            for (j, (a, b)) in s
                .logprobs
                .iter()
                .zip(floats(&p["prompt_logprobs"]))
                .enumerate()
            {
                assert!(
                    (a - b).abs() < tol,
                    "{name} {dtype:?} prompt {i} token {j}: {a} vs {b}"
                );
            }
        }
        if dtype == F16 {
            for (i, (p, (toks, _, _))) in g["prompts"]
                .as_array()
                .unwrap()
                .iter()
                .zip(greedy(&model, &prompts, 10, 2, 2048))
                .enumerate()
            {
                let want = ids(&p["greedy"]["token_ids"]);
                let gaps = floats(&p["greedy"]["top2_gap"]);
                if let Some(j) = (0..want.len().min(toks.len())).find(|&j| toks[j] != want[j]) {
                    assert!(
                        gaps[j] < 0.1,
                        "{name} f16 prompt {i} step {j}: {} vs {} (gap {})",
                        toks[j],
                        want[j],
                        gaps[j]
                    );
                }
            }
        }
    }
}
