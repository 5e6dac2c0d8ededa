//! The paged executor against the tensor path (the unpaged reference): block boundaries inside
//! prompts, preemption when the pool is full, shared prefixes, n samples of one prompt. Results
//! must not depend on any of them.
use lmgen_core::engine::{Admission, GenOutput, GenRequest, Generator, RunStats};
use lmgen_core::hub::ModelLocation;
use lmgen_core::kv::BLOCK_SIZE;
use lmgen_core::sampling::SamplingParams;
use lmgen_core::{load, LoadOptions, Model};
use std::path::PathBuf;

fn model(name: &str) -> Model {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name);
    load(&ModelLocation::Dir(dir), &LoadOptions::default()).unwrap()
}

/// Deterministic pseudo-random token ids below `vocab`.
fn tokens(seed: u32, n: usize, vocab: usize) -> Vec<u32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 8) % vocab as u32
        })
        .collect()
}

fn req(
    index: usize,
    sample: usize,
    prompt: Vec<u32>,
    params: &SamplingParams,
    n: usize,
) -> GenRequest {
    GenRequest {
        index,
        sample,
        prompt_ids: prompt,
        max_new_tokens: n,
        params: params.clone(),
        stop: vec![],
        logprobs: true,
        top_logprobs: 0,
        ignore_eos: true,
        stream_key: Some(index as u64),
    }
}

/// One request per prompt (index = position), `n` new tokens each.
fn reqs_for(prompts: &[Vec<u32>], params: &SamplingParams, n: usize) -> Vec<GenRequest> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| req(i, 0, p.clone(), params, n))
        .collect()
}

/// Prompts of the given lengths, seeded `seed0`, `seed0 + 1`, ...
fn prompts_of(lengths: &[usize], seed0: u32, vocab: usize) -> Vec<Vec<u32>> {
    lengths
        .iter()
        .enumerate()
        .map(|(i, &n)| tokens(i as u32 + seed0, n, vocab))
        .collect()
}

fn run(g: &Generator, reqs: Vec<GenRequest>) -> (Vec<GenOutput>, RunStats) {
    let mut out: Vec<GenOutput> = Vec::new();
    let stats = g
        .run_with_stats(
            reqs,
            |o| {
                out.push(o);
                Ok(())
            },
            |_| {},
        )
        .unwrap();
    out.sort_by_key(|o| (o.index, o.sample));
    (out, stats)
}

fn assert_same(name: &str, a: &[GenOutput], b: &[GenOutput], tol: f32) {
    assert_eq!(a.len(), b.len(), "{name}: record count");
    for (x, y) in a.iter().zip(b) {
        assert_eq!((x.index, x.sample), (y.index, y.sample), "{name}");
        assert_eq!(
            x.token_ids, y.token_ids,
            "{name}: request {} sample {}",
            x.index, x.sample
        );
        let (lx, ly) = (x.logprobs.as_ref().unwrap(), y.logprobs.as_ref().unwrap());
        for (p, q) in lx.iter().zip(ly) {
            assert!(
                (p - q).abs() <= tol,
                "{name}: request {}: logprob {p} vs {q}",
                x.index
            );
        }
    }
}

/// Prompts whose lengths straddle block boundaries (1, 15, 16, 17, 31, 33, 40 tokens).
fn boundary_prompts(vocab: usize) -> Vec<Vec<u32>> {
    let lengths = [
        1,
        BLOCK_SIZE - 1,
        BLOCK_SIZE,
        BLOCK_SIZE + 1,
        2 * BLOCK_SIZE - 1,
        2 * BLOCK_SIZE + 1,
        40,
    ];
    prompts_of(&lengths, 0, vocab)
}

#[test]
fn paged_equals_tensor_path_for_every_family() {
    let greedy = SamplingParams::default();
    for name in [
        "llama",
        "mistral-swa",
        "neox",
        "bloom",
        "opt",
        "gpt2",
        "opt-postnorm",
        "bloom-postln",
        "neox-seq",
        "opt-proj",
        "gemma",
        "gemma2",
        "gemma3",
        "qwen3",
        "phi3",
        "olmo",
        "olmo2",
        "stablelm",
        "stablelm-qkln-par",
        "starcoder2",
        "phi",
        "phi-qkln",
        "gptj",
        "falcon",
        "falcon-mq",
        "falcon-rw",
        "falcon-rw-long",
        "gpt-bigcode",
        "gpt-bigcode-mha",
        "mpt",
        "mixtral",
        "mixtral-ties",
        "qwen2-moe",
        "qwen3-moe",
        "olmoe",
    ] {
        let m = model(name);
        assert!(m.decoder.cpu_step_supported(), "{name}");
        let prompts = boundary_prompts(m.spec().vocab_size);
        let reqs = || reqs_for(&prompts, &greedy, 20);
        let mut tensor = Generator::new(&m, 3);
        tensor.paged = false;
        let (want, _) = run(&tensor, reqs());
        // Batch 3 and batch 1, with prompts prefilled in chunks of 5 tokens.
        let (batched, _) = run(&Generator::new(&m, 3), reqs());
        assert_same(name, &batched, &want, 1e-4);
        let mut chunked = Generator::new(&m, 1);
        chunked.max_step_tokens = 5;
        let (got, _) = run(&chunked, reqs());
        assert_same(&format!("{name} chunked"), &got, &want, 1e-4);
        assert_same(&format!("{name} batched vs chunked"), &batched, &got, 1e-5);
    }
}

#[test]
fn preemption_when_the_pool_is_full_changes_nothing() {
    let m = model("llama");
    let params = SamplingParams {
        temperature: 0.9,
        top_p: Some(0.95),
        seed: Some(5),
        ..Default::default()
    };
    let prompts = boundary_prompts(m.spec().vocab_size);
    let reqs = || reqs_for(&prompts, &params, 30);
    let (want, free) = run(&Generator::new(&m, 8), reqs());
    assert_eq!(free.preemptions, 0);
    // A pool of 8 blocks: the longest request (40 + 30 tokens) needs 5 alone; all 7 need 22.
    // Admitted on their prompts alone, sequences outgrow it and are preempted.
    let mut tight = Generator::new(&m, 8);
    tight.kv_memory = Some(8 * m.decoder.kv_block_bytes());
    tight.admission = Admission::Prompt;
    let (got, stats) = run(&tight, reqs());
    assert_eq!(stats.pool_blocks, 8);
    assert!(
        stats.preemptions > 0,
        "the pool was large enough: no preemption tested"
    );
    assert_same("preempted", &got, &want, 1e-4);
    // Admission that keeps blocks for the growth to come: requests that run to their
    // max_new_tokens (ignore_eos) are never preempted.
    tight.admission = Admission::Reserve;
    let (got, stats) = run(&tight, reqs());
    assert_eq!(stats.preemptions, 0, "{stats:?}");
    assert_same("reserved", &got, &want, 1e-4);
    // Requests that may stop early are admitted on an estimate of their growth: whatever it
    // preempts, the results are those of the roomy pool.
    let eos_reqs = || {
        let mut r = reqs();
        for q in &mut r {
            q.ignore_eos = false;
        }
        r
    };
    let (want, _) = run(&Generator::new(&m, 8), eos_reqs());
    for admission in [Admission::Reserve, Admission::Prompt] {
        tight.admission = admission;
        let (got, _) = run(&tight, eos_reqs());
        assert_same(&format!("{admission:?}, may stop"), &got, &want, 1e-4);
    }
}

/// Under a small pool, admission that reserves growth runs the same work with fewer
/// preemptions (and so less recomputation) than admission on prompts alone.
#[test]
fn reserving_growth_avoids_recomputation() {
    let m = model("llama");
    let vocab = m.spec().vocab_size;
    let prompts: Vec<Vec<u32>> = (0..12).map(|i| tokens(100 + i, 20, vocab)).collect();
    let reqs = || reqs_for(&prompts, &SamplingParams::default(), 40);
    // 20 + 40 tokens: 4 blocks each at the end; 12 blocks hold 3 at full length.
    let mut g = Generator::new(&m, 12);
    g.kv_memory = Some(12 * m.decoder.kv_block_bytes());
    let mut prompt_tokens = [0usize; 2];
    let mut outs = Vec::new();
    for (k, admission) in [Admission::Prompt, Admission::Reserve]
        .into_iter()
        .enumerate()
    {
        g.admission = admission;
        let mut out = Vec::new();
        let stats = g
            .run_with_stats(
                reqs(),
                |o| {
                    out.push(o);
                    Ok(())
                },
                |s| prompt_tokens[k] += s.prompt_tokens,
            )
            .unwrap();
        out.sort_by_key(|o| o.index);
        outs.push((out, stats));
    }
    let ((by_prompt, s_prompt), (reserved, s_reserved)) = (&outs[0], &outs[1]);
    assert!(s_prompt.preemptions > 0, "{s_prompt:?}");
    assert_eq!(s_reserved.preemptions, 0, "{s_reserved:?}");
    // Without preemption every prompt is computed once.
    assert_eq!(prompt_tokens[1], 12 * 20);
    assert!(prompt_tokens[0] > prompt_tokens[1], "{prompt_tokens:?}");
    assert_same("admission", reserved, by_prompt, 1e-4);
}

/// The error of a request of `prompt` tokens and `new` new ones in a pool of `blocks` blocks.
fn pool_error(blocks: usize, prompt: usize, new: usize) -> String {
    let m = model("llama");
    let mut g = Generator::new(&m, 2);
    g.kv_memory = Some(blocks * m.decoder.kv_block_bytes());
    let p = tokens(1, prompt, m.spec().vocab_size);
    g.run(
        vec![req(0, 0, p, &SamplingParams::default(), new)],
        |_| Ok(()),
        |_| {},
    )
    .unwrap_err()
    .to_string()
}

#[test]
fn a_request_that_cannot_grow_in_the_pool_alone_is_a_clear_error() {
    // 40 + 30 tokens need 5 blocks; the pool has 4 (the prompt alone would fit).
    let err = pool_error(4, 40, 30);
    assert!(
        err.contains("request 0: 40 tokens and up to 30 new need 5 KV blocks")
            && err.contains("--max-new-tokens"),
        "{err}"
    );
}

#[test]
fn a_prompt_that_cannot_fit_alone_is_a_clear_error() {
    let err = pool_error(2, 40, 4);
    assert!(
        err.contains("KV blocks") && err.contains("--kv-memory"),
        "{err}"
    );
}

#[test]
fn shared_prefixes_are_computed_once_with_the_same_results() {
    let m = model("llama");
    let vocab = m.spec().vocab_size;
    let header = tokens(99, 3 * BLOCK_SIZE + 5, vocab);
    let prompts: Vec<Vec<u32>> = (0..5)
        .map(|i| {
            let mut p = header.clone();
            p.extend(tokens(i, 3 + i as usize, vocab));
            p
        })
        .collect();
    let params = SamplingParams {
        temperature: 0.8,
        seed: Some(11),
        ..Default::default()
    };
    let reqs = || reqs_for(&prompts, &params, 12);
    let mut off = Generator::new(&m, 2);
    off.prefix_cache = false;
    let (want, s_off) = run(&off, reqs());
    assert_eq!(s_off.reused_tokens, 0);
    let (got, s_on) = run(&Generator::new(&m, 2), reqs());
    // Requests after the first two reuse the header's 3 full blocks.
    assert!(s_on.reused_tokens >= 3 * 3 * BLOCK_SIZE, "{s_on:?}");
    assert_same("prefix cache", &got, &want, 1e-4);
}

#[test]
fn samples_of_one_prompt_share_its_blocks() {
    let m = model("llama");
    let prompt = tokens(7, 2 * BLOCK_SIZE + 3, m.spec().vocab_size);
    let params = SamplingParams {
        temperature: 1.0,
        seed: Some(3),
        ..Default::default()
    };
    let reqs = || {
        (0..4)
            .map(|k| req(0, k, prompt.clone(), &params, 10))
            .collect::<Vec<_>>()
    };
    let mut shared = Generator::new(&m, 4);
    shared.prefix_cache = false; // samples share even without the cross-request cache
    let (got, stats) = run(&shared, reqs());
    assert_eq!(stats.reused_tokens, 3 * 2 * BLOCK_SIZE, "{stats:?}");
    let mut tensor = Generator::new(&m, 4);
    tensor.paged = false;
    let (want, _) = run(&tensor, reqs());
    assert_same("n samples", &got, &want, 1e-4);
    assert!(
        got.windows(2).any(|w| w[0].token_ids != w[1].token_ids),
        "samples differ"
    );
}

/// The samples of a prompt run side by side once its prompt is computed, not one after the
/// other.
#[test]
fn samples_of_a_prompt_run_together() {
    let m = model("llama");
    let params = SamplingParams {
        temperature: 1.0,
        seed: Some(9),
        ..Default::default()
    };
    let reqs: Vec<GenRequest> = (0..4)
        .map(|k| req(0, k, tokens(3, 20, m.spec().vocab_size), &params, 12))
        .collect();
    let mut steps = Vec::new();
    Generator::new(&m, 4)
        .run(reqs, |_| Ok(()), |s| steps.push(s))
        .unwrap();
    // The first sample's prompt, then the other three join it (their prompt's last 4 tokens,
    // past the shared block) and all four decode together.
    assert_eq!(steps[0].in_flight, 1, "{steps:?}");
    assert!(
        steps[1..].iter().take(11).all(|s| s.in_flight == 4),
        "{steps:?}"
    );
    assert_eq!(steps.len(), 13, "{steps:?}");
}

/// Phi-3 longrope (`original_max_position_embeddings` 12): a sequence that outgrows it while
/// generating is recomputed with the long factors once, as transformers does, on either path,
/// in any batch, with prompts prefilled in chunks (rotated for their whole length), and after
/// preemption in a full pool.
#[test]
fn longrope_sequences_are_recomputed_once_when_they_cross() {
    let m = model("phi3-longrope");
    let vocab = m.spec().vocab_size;
    assert_eq!(m.spec().longrope_original_max(), Some(12));
    let prompts = prompts_of(&[1, 5, 11, 12, 13, 20, 40], 40, vocab);
    let greedy = SamplingParams::default();
    let reqs = || reqs_for(&prompts, &greedy, 20);
    let mut tensor = Generator::new(&m, 3);
    tensor.paged = false;
    let (want, s) = run(&tensor, reqs());
    // The prompts of 1, 5, 11 and 12 tokens cross 12 while generating.
    assert_eq!(s.rope_recomputes, 4, "{s:?}");
    let (got, s) = run(&Generator::new(&m, 3), reqs());
    assert_eq!(s.rope_recomputes, 4, "{s:?}");
    assert_same("longrope paged", &got, &want, 1e-4);
    let mut chunked = Generator::new(&m, 1);
    chunked.max_step_tokens = 5;
    let (got, _) = run(&chunked, reqs());
    assert_same("longrope chunked", &got, &want, 1e-4);
    let mut tight = Generator::new(&m, 7);
    tight.kv_memory = Some(6 * m.decoder.kv_block_bytes());
    tight.admission = Admission::Prompt;
    let (got, s) = run(&tight, reqs());
    assert!(s.preemptions > 0, "no preemption tested: {s:?}");
    assert_same("longrope preempted", &got, &want, 1e-4);
}

/// Falcon's bfloat16 ALiBi products past position 256 are the same on the paged CPU kernel
/// and the tensor path (what GPUs run).
#[test]
fn falcon_alibi_past_256_paged_equals_tensor_path() {
    let m = model("falcon-rw-long");
    let vocab = m.spec().vocab_size;
    let prompts = prompts_of(&[300, 270], 7, vocab);
    let greedy = SamplingParams::default();
    let reqs = || reqs_for(&prompts, &greedy, 8);
    let mut tensor = Generator::new(&m, 2);
    tensor.paged = false;
    let (want, _) = run(&tensor, reqs());
    let (got, _) = run(&Generator::new(&m, 2), reqs());
    assert_same("falcon-rw-long", &got, &want, 1e-4);
}
