//! Engine behaviour beyond parity: stop strings, seeded sampling independent of batching,
//! context limits.
use lmgen_core::engine::{FinishReason, GenOutput, GenRequest, Generator};
use lmgen_core::hub::ModelLocation;
use lmgen_core::sampling::SamplingParams;
use lmgen_core::{load, LoadOptions, Model};
use std::path::PathBuf;

fn model(name: &str) -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name);
    load(&ModelLocation::Dir(dir), &LoadOptions::default()).unwrap()
}

fn req(
    index: usize,
    prompt: Vec<u32>,
    params: SamplingParams,
    stop: Vec<String>,
    max_new: usize,
) -> GenRequest {
    GenRequest {
        index,
        sample: 0,
        prompt_ids: prompt,
        max_new_tokens: max_new,
        params,
        stop,
        logprobs: false,
        top_logprobs: 0,
        ignore_eos: false,
        stream_key: Some(index as u64),
    }
}

fn run(model: &Model, reqs: Vec<GenRequest>, batch: usize) -> Vec<GenOutput> {
    let mut out: Vec<GenOutput> = Vec::new();
    Generator::new(model, batch)
        .run(
            reqs,
            |o| {
                out.push(o);
                Ok(())
            },
            |_| {},
        )
        .unwrap();
    out.sort_by_key(|o| (o.index, o.sample));
    out
}

#[test]
fn stop_string_ends_generation_and_is_cut_from_text() {
    let m = model("neox");
    let prompt = m.tokenizer.encode("The quick brown fox").unwrap();
    let full = run(
        &m,
        vec![req(
            0,
            prompt.clone(),
            SamplingParams::default(),
            vec![],
            10,
        )],
        1,
    )
    .remove(0);
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() >= 6, "need some text: {:?}", full.text);
    // A stop string taken from the middle of the greedy continuation.
    let stop: String = chars[3..5].iter().collect();
    let cut = full.text.find(&stop).unwrap();
    let o = run(
        &m,
        vec![req(
            0,
            prompt,
            SamplingParams::default(),
            vec![stop.clone()],
            10,
        )],
        1,
    )
    .remove(0);
    assert_eq!(o.finish_reason, FinishReason::Stop);
    assert_eq!(o.text, full.text[..cut], "stop {stop:?}");
    assert!(o.token_ids.len() <= full.token_ids.len());
    assert_eq!(o.token_ids[..], full.token_ids[..o.token_ids.len()]);
}

#[test]
fn seeded_sampling_does_not_depend_on_batch() {
    let m = model("llama");
    let prompts = [
        "Hello world",
        "A much longer prompt with several words in it",
        "x",
        "café",
    ];
    let params = SamplingParams {
        temperature: 0.9,
        top_p: Some(0.95),
        top_k: Some(50),
        seed: Some(42),
        ..Default::default()
    };
    let reqs = || {
        prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                req(
                    i,
                    m.tokenizer.encode(p).unwrap(),
                    params.clone(),
                    vec![],
                    12,
                )
            })
            .collect::<Vec<_>>()
    };
    let one = run(&m, reqs(), 1);
    let four = run(&m, reqs(), 4);
    let two = run(&m, reqs(), 2);
    for i in 0..prompts.len() {
        assert_eq!(one[i].token_ids, four[i].token_ids, "prompt {i}");
        assert_eq!(one[i].token_ids, two[i].token_ids, "prompt {i}");
    }
    // A different seed gives different samples somewhere.
    let other: Vec<GenRequest> = reqs()
        .into_iter()
        .map(|mut r| {
            r.params.seed = Some(43);
            r
        })
        .collect();
    let other = run(&m, other, 4);
    assert!((0..prompts.len()).any(|i| other[i].token_ids != one[i].token_ids));
}

#[test]
fn samples_of_one_prompt_differ_and_are_reproducible() {
    let m = model("gpt2");
    let prompt = m.tokenizer.encode("Once upon a time").unwrap();
    let params = SamplingParams {
        temperature: 1.5,
        seed: Some(1),
        ..Default::default()
    };
    let reqs = || {
        (0..3)
            .map(|k| GenRequest {
                sample: k,
                ..req(0, prompt.clone(), params.clone(), vec![], 8)
            })
            .collect::<Vec<_>>()
    };
    let a = run(&m, reqs(), 3);
    let b = run(&m, reqs(), 1);
    assert_eq!(
        a.iter().map(|o| &o.token_ids).collect::<Vec<_>>(),
        b.iter().map(|o| &o.token_ids).collect::<Vec<_>>()
    );
    assert!(a[0].token_ids != a[1].token_ids || a[1].token_ids != a[2].token_ids);
}

#[test]
fn prompt_longer_than_context_is_a_user_error() {
    let m = model("gpt2");
    let limit = m.spec().max_positions;
    let prompt = vec![5u32; limit + 1];
    let err = Generator::new(&m, 1)
        .run(
            vec![req(0, prompt, SamplingParams::default(), vec![], 4)],
            |_| Ok(()),
            |_| {},
        )
        .unwrap_err();
    assert!(
        err.is_user_error() && err.to_string().contains("context"),
        "{err}"
    );
}

#[test]
fn learned_positions_stop_at_the_context_end() {
    let m = model("opt");
    let limit = m.spec().max_positions;
    let o = run(
        &m,
        vec![req(
            0,
            vec![2, 10, 11, 12],
            SamplingParams {
                repetition_penalty: Some(1.3),
                ..Default::default()
            },
            vec![],
            limit * 2,
        )],
        1,
    )
    .remove(0);
    assert!(
        o.finish_reason != FinishReason::Length || o.token_ids.len() + 4 == limit,
        "{} tokens",
        o.token_ids.len()
    );
}

#[test]
fn quantized_weights_track_f32() {
    use lmgen_core::engine::score_batch;
    use lmgen_core::model::layers::Weight;
    use lmgen_core::model::quant::QuantKind;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/llama");
    let f32m = model("llama");
    let q = load(
        &ModelLocation::Dir(dir),
        &LoadOptions {
            quantize: Some(QuantKind::Q8_0),
            ..Default::default()
        },
    )
    .unwrap();
    let b = &q.decoder.weights.blocks[0];
    assert!(
        matches!(b.qkv.weight, Weight::Quant(_)) && matches!(b.mlp_out.weight, Weight::Quant(_))
    );
    assert!(b.qkv.weight_bytes() * 3 < f32m.decoder.weights.blocks[0].qkv.weight_bytes());
    let ids = f32m
        .tokenizer
        .encode("Hello world, this is a test of quantized weights")
        .unwrap();
    let a = score_batch(&f32m, &[&ids]).unwrap().remove(0);
    let c = score_batch(&q, &[&ids]).unwrap().remove(0);
    // These fixtures have large activations; measured max difference 0.32 over the golden prompts.
    for (x, y) in a.logprobs.iter().zip(&c.logprobs) {
        assert!((x - y).abs() < 0.5, "{x} vs {y}");
    }
    // Incremental decoding still equals the full forward with quantized weights.
    let out = run(
        &q,
        vec![GenRequest {
            logprobs: true,
            top_logprobs: 0,
            ..req(0, ids.clone(), SamplingParams::default(), vec![], 6)
        }],
        1,
    )
    .remove(0);
    let mut full = ids.clone();
    full.extend(&out.token_ids);
    let s = score_batch(&q, &[&full]).unwrap().remove(0);
    for (g, f) in out
        .logprobs
        .unwrap()
        .iter()
        .zip(&s.logprobs[ids.len() - 1..])
    {
        assert!((g - f).abs() < 1e-3, "{g} vs {f}");
    }
}
