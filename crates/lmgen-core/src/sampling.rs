//! Logits processors and seeded samplers, in the order `transformers.generate` applies them:
//! repetition penalty → temperature → top-k → top-p → sample (or argmax when greedy). The
//! OpenAI presence and frequency penalties, when set, apply after the repetition penalty,
//! as vLLM applies them (to the tokens generated so far, not the prompt).
use rand::{rngs::StdRng, Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    /// OpenAI `presence_penalty`: subtracted from the logit of every token generated so far.
    pub presence_penalty: Option<f32>,
    /// OpenAI `frequency_penalty`: times the number of times a token was generated so far.
    pub frequency_penalty: Option<f32>,
    /// Base seed; each request derives its own stream from it (see [`Sampler::new`]).
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: None,
            presence_penalty: None,
            frequency_penalty: None,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// Reject values `transformers` would reject.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(format!("top_p must be in (0, 1], got {p}"));
            }
        }
        if self.top_k == Some(0) {
            return Err("top_k must be >= 1".into());
        }
        if let Some(r) = self.repetition_penalty {
            if !(r.is_finite() && r > 0.0) {
                return Err(format!("repetition_penalty must be > 0, got {r}"));
            }
        }
        for (name, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if let Some(v) = v {
                if !(-2.0..=2.0).contains(&v) {
                    return Err(format!("{name} must be between -2 and 2, got {v}"));
                }
            }
        }
        Ok(())
    }
}

/// A sampler with its own random stream. The stream depends only on the seed, the stream key
/// (see [`stream_key`]) and the sample number, never on batch composition or position.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    scratch: Vec<(f32, u32)>,
    /// Generated tokens, sorted (presence / frequency penalties).
    seen: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, key: Option<u64>, sample: u64) -> Self {
        let rng = match params.seed {
            Some(seed) => {
                let base = key.map_or(seed, |k| mix(seed, k));
                StdRng::seed_from_u64(mix(base, sample))
            }
            None => StdRng::from_os_rng(),
        };
        Self {
            params,
            rng,
            scratch: Vec::new(),
            seen: Vec::new(),
        }
    }

    /// Choose the next token from raw `logits`; `history` is prompt + generated so far, of
    /// which the last `generated` tokens were generated.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32], generated: usize) -> u32 {
        let p = &self.params;
        if let Some(r) = p.repetition_penalty.filter(|r| *r != 1.0) {
            for &t in history {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l < 0.0 { *l * r } else { *l / r };
                }
            }
        }
        let (pp, fp) = (
            p.presence_penalty.unwrap_or(0.0),
            p.frequency_penalty.unwrap_or(0.0),
        );
        if pp != 0.0 || fp != 0.0 {
            let seen = &mut self.seen;
            seen.clear();
            seen.extend_from_slice(&history[history.len() - generated.min(history.len())..]);
            seen.sort_unstable();
            for run in seen.chunk_by(|a, b| a == b) {
                if let Some(l) = logits.get_mut(run[0] as usize) {
                    *l -= pp + fp * run.len() as f32;
                }
            }
        }
        if p.is_greedy() {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        if p.top_k.is_none() && p.top_p.is_none_or(|t| t >= 1.0) {
            // Plain temperature sampling needs no sort (a full-vocabulary sort per token
            // was measured to cost ~25 % of decode time on a 49k-token vocabulary).
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let total: f64 = logits
                .iter()
                .map(|&l| (((l - max) * inv_t) as f64).exp())
                .sum();
            let mut target = self.rng.random::<f64>() * total;
            for (i, &l) in logits.iter().enumerate() {
                target -= (((l - max) * inv_t) as f64).exp();
                if target < 0.0 {
                    return i as u32;
                }
            }
            return argmax(logits);
        }
        let c = &mut self.scratch;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (l * inv_t, i as u32)),
        );
        // Descending by logit, ties by lower id first (stable, deterministic). Only the head
        // of that order is ever needed: partition (O(vocab)), then sort the head.
        let cmp = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let top_p = p.top_p.filter(|t| *t < 1.0).map(|t| t as f64);
        let max = c.iter().map(|x| x.0).fold(f32::NEG_INFINITY, f32::max);
        if let Some(k) = p.top_k.map(|k| k.max(1)).filter(|&k| k < c.len()) {
            c.select_nth_unstable_by(k - 1, cmp);
            c.truncate(k);
        }
        // With top-p, sort a growing head until it holds at least top_p of the mass: the
        // rest is then cut whatever its order.
        let mut head = c.len();
        let mut total = 0f64;
        if let Some(tp) = top_p.filter(|_| c.len() > 64) {
            total = c.iter().map(|(l, _)| ((l - max) as f64).exp()).sum();
            head = 64;
            loop {
                c.select_nth_unstable_by(head - 1, cmp);
                let mass: f64 = c[..head]
                    .iter()
                    .map(|(l, _)| ((l - max) as f64).exp())
                    .sum();
                if mass / total >= tp {
                    break;
                }
                head *= 4;
                if head >= c.len() {
                    head = c.len();
                    break;
                }
            }
        }
        c[..head].sort_unstable_by(cmp);
        let tail_mass = if head < c.len() { total } else { 0.0 };
        let c = &c[..head];
        let mut probs: Vec<f64> = c.iter().map(|(l, _)| ((l - max) as f64).exp()).collect();
        let sum: f64 = if tail_mass > 0.0 {
            tail_mass
        } else {
            probs.iter().sum()
        };
        probs.iter_mut().for_each(|x| *x /= sum);
        if let Some(top_p) = top_p {
            // transformers: drop the ascending prefix whose cumulative mass is <= 1 - top_p
            // (a tail past the head is already known to be inside it).
            let mut removed = if tail_mass > 0.0 {
                1.0 - probs.iter().sum::<f64>()
            } else {
                0.0
            };
            let mut keep = probs.len();
            while keep > 1 && removed + probs[keep - 1] <= 1.0 - top_p {
                removed += probs[keep - 1];
                keep -= 1;
            }
            probs.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let u: f64 = self.rng.random();
        let mut acc = 0.0;
        for (i, pr) in probs.iter().enumerate() {
            acc += pr;
            if u < acc {
                return c[i].1;
            }
        }
        c[probs.len() - 1].1
    }
}

pub fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

/// log-sum-exp of one row, in f64 accumulation.
fn log_sum_exp(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    (logits
        .iter()
        .map(|&l| ((l - max) as f64).exp())
        .sum::<f64>())
    .ln() as f32
        + max
}

/// log-softmax of one row, in f64 accumulation.
pub fn log_softmax_row(logits: &[f32]) -> Vec<f32> {
    let lse = log_sum_exp(logits);
    logits.iter().map(|&l| l - lse).collect()
}

/// Natural-log probability of `tok` under `logits` (log-softmax in f64 accumulation).
pub fn logprob_of(logits: &[f32], tok: u32) -> f32 {
    logits[tok as usize] - log_sum_exp(logits)
}

/// The `n` most likely tokens under the unmodified distribution of `logits`, with their
/// natural-log probabilities, most likely first (ties: lower id first). O(vocab).
pub fn top_logprobs(logits: &[f32], n: usize) -> Vec<(u32, f32)> {
    let n = n.min(logits.len());
    if n == 0 {
        return Vec::new();
    }
    let lse = log_sum_exp(logits);
    let cmp = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &l) in logits.iter().enumerate() {
        if top.len() == n && l <= top[n - 1].1 {
            continue;
        }
        let at = top.partition_point(|x| cmp(x, &(i as u32, l)).is_lt());
        top.insert(at, (i as u32, l));
        top.truncate(n);
    }
    top.into_iter().map(|(i, l)| (i, l - lse)).collect()
}

/// The stream key of a record sampled with a job-wide seed: a stable hash (FNV-1a, 64 bit)
/// of its id as JSON, so the record samples the same in any position, batch or shard.
pub fn stream_key(id_json: &str) -> u64 {
    id_json.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// splitmix64-style mixing of a seed with a stream number.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(t: f32) -> SamplingParams {
        SamplingParams {
            temperature: t,
            seed: Some(7),
            ..Default::default()
        }
    }

    #[test]
    fn greedy_is_argmax_after_repetition_penalty() {
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: Some(10.0),
                ..params(0.0)
            },
            Some(0),
            0,
        );
        // token 2 would win, but it was already generated and gets penalized below token 1.
        assert_eq!(s.sample(&mut [0.0, 2.0, 3.0], &[2], 0), 1);
        let mut s = Sampler::new(params(0.0), Some(0), 0);
        assert_eq!(s.sample(&mut [0.0, 2.0, 3.0], &[2], 0), 2);
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens_only() {
        let pen = |pp: f32, fp: f32| {
            Sampler::new(
                SamplingParams {
                    presence_penalty: Some(pp),
                    frequency_penalty: Some(fp),
                    ..params(0.0)
                },
                Some(0),
                0,
            )
        };
        // history: prompt [1, 1] then generated [2, 2, 0]
        let h = [1, 1, 2, 2, 0];
        let mut l = [0.0f32, 1.0, 2.0, 0.5];
        pen(0.5, 0.25).sample(&mut l, &h, 3);
        // 0: once (0.5 + 0.25), 1: prompt only (untouched), 2: twice (0.5 + 0.5), 3: never
        assert_eq!(l, [-0.75, 1.0, 1.0, 0.5]);
        // the generated token 2 would win without penalties; with them token 1 does
        assert_eq!(pen(0.0, 0.0).sample(&mut [0.0, 1.0, 2.0, 0.5], &h, 3), 2);
        assert_eq!(pen(1.0, 0.0).sample(&mut [0.0, 1.0, 2.0, 0.5], &h, 3), 1);
        // negative penalties favour repeats
        assert_eq!(pen(-2.0, 0.0).sample(&mut [-5.0, 1.9, 0.0, 0.5], &h, 3), 2);
        assert!(SamplingParams {
            presence_penalty: Some(2.5),
            ..params(1.0)
        }
        .validate()
        .unwrap_err()
        .contains("presence_penalty"));
    }

    #[test]
    fn top_logprobs_are_the_most_likely_tokens_in_order() {
        let logits = [0.5f32, 2.0, -1.0, 2.0, 1.0];
        let lse = log_sum_exp(&logits);
        let top = top_logprobs(&logits, 3);
        assert_eq!(
            top.iter().map(|t| t.0).collect::<Vec<_>>(),
            [1, 3, 4],
            "ties: lower id first"
        );
        assert!((top[2].1 - (1.0 - lse)).abs() < 1e-6);
        assert_eq!(top_logprobs(&logits, 9).len(), 5);
        assert!(top_logprobs(&logits, 0).is_empty());
        let sum: f32 = top_logprobs(&logits, 5).iter().map(|t| t.1.exp()).sum();
        assert!((sum - 1.0).abs() < 1e-5);
    }

    #[test]
    fn top_k_one_and_tiny_top_p_are_greedy() {
        let logits = [0.1f32, 1.5, 1.4, -2.0];
        for p in [
            SamplingParams {
                top_k: Some(1),
                ..params(1.0)
            },
            SamplingParams {
                top_p: Some(0.01),
                ..params(1.0)
            },
        ] {
            let mut s = Sampler::new(p, Some(3), 0);
            for _ in 0..50 {
                assert_eq!(s.sample(&mut logits.clone(), &[], 0), 1);
            }
        }
    }

    #[test]
    fn seeded_streams_are_reproducible_and_distinct_per_request() {
        let draw = |req| {
            let mut s = Sampler::new(params(1.0), Some(req), 0);
            (0..32)
                .map(|_| s.sample(&mut [0.0f32; 16], &[], 0))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
        // A request's own seed: the stream depends on the seed and the sample alone.
        let own = |seed, sample| {
            let mut s = Sampler::new(
                SamplingParams {
                    seed: Some(seed),
                    ..params(1.0)
                },
                None,
                sample,
            );
            (0..32)
                .map(|_| s.sample(&mut [0.0f32; 16], &[], 0))
                .collect::<Vec<_>>()
        };
        assert_eq!(own(5, 0), own(5, 0));
        assert_ne!(own(5, 0), own(5, 1));
        assert_ne!(own(5, 0), own(6, 0));
        assert_ne!(stream_key("0"), stream_key("1"));
        assert_eq!(stream_key("\"a\""), stream_key("\"a\""));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        // p = softmax([ln 3, 0]) = [0.75, 0.25]
        let mut s = Sampler::new(params(1.0), Some(0), 0);
        let n = 20000;
        let ones = (0..n)
            .filter(|_| s.sample(&mut [3f32.ln(), 0.0], &[], 0) == 1)
            .count();
        let frac = ones as f64 / n as f64;
        assert!((frac - 0.25).abs() < 0.02, "{frac}");
    }

    #[test]
    fn log_softmax_normalizes() {
        let l = log_softmax_row(&[1.0, 2.0, 3.0]);
        let s: f32 = l.iter().map(|x| x.exp()).sum();
        assert!((s - 1.0).abs() < 1e-6);
    }

    /// The full-sort reference: sort the whole vocabulary, top-k, top-p as transformers.
    fn reference(logits: &[f32], t: f32, top_k: Option<usize>, top_p: Option<f32>, u: f64) -> u32 {
        let mut c: Vec<(f32, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (l / t, i as u32))
            .collect();
        c.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        if let Some(k) = top_k {
            c.truncate(k.max(1));
        }
        let max = c[0].0;
        let mut probs: Vec<f64> = c.iter().map(|(l, _)| ((l - max) as f64).exp()).collect();
        let sum: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= sum);
        if let Some(tp) = top_p.filter(|t| *t < 1.0) {
            let (mut removed, mut keep) = (0.0f64, probs.len());
            while keep > 1 && removed + probs[keep - 1] <= 1.0 - tp as f64 {
                removed += probs[keep - 1];
                keep -= 1;
            }
            probs.truncate(keep);
            let s: f64 = probs.iter().sum();
            probs.iter_mut().for_each(|x| *x /= s);
        }
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if u < acc {
                return c[i].1;
            }
        }
        c[probs.len() - 1].1
    }

    #[test]
    fn partial_sort_samples_what_a_full_sort_samples() {
        let mut g = StdRng::seed_from_u64(9);
        for case in 0..300 {
            let vocab = [50, 1000, 5000][case % 3];
            // Peaked and flat distributions, with ties.
            let spread = [0.5f32, 3.0, 12.0][case / 3 % 3];
            let logits: Vec<f32> = (0..vocab)
                .map(|_| (g.random::<f32>() * spread * 8.0).round() / 8.0)
                .collect();
            let top_k = [None, Some(1), Some(40), Some(300)][case % 4];
            let top_p = [Some(0.9f32), None, Some(0.5), Some(0.99), Some(1.0)][case % 5];
            if top_k.is_none() && top_p.is_none_or(|t| t >= 1.0) {
                continue;
            }
            let params = SamplingParams {
                temperature: 0.8,
                top_k,
                top_p,
                seed: Some(case as u64),
                ..Default::default()
            };
            let mut s = Sampler::new(params.clone(), Some(0), 0);
            let mut rng = Sampler::new(params, Some(0), 0).rng;
            for _ in 0..5 {
                let got = s.sample(&mut logits.clone(), &[], 0);
                let want = reference(&logits, 0.8, top_k, top_p, rng.random());
                assert_eq!(
                    got, want,
                    "case {case}: vocab {vocab} k {top_k:?} p {top_p:?}"
                );
            }
        }
    }
}
