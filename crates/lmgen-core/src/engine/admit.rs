//! Admission under a KV pool too small for every sequence at full length.
//!
//! Admitting a request whenever its prompt fits over-commits the pool: the running sequences
//! keep growing, the pool fills, and the youngest are preempted and recomputed, again and
//! again. Admission here keeps blocks for the growth still to come, as SGLang's scheduler
//! does: a sequence that cannot stop early (`ignore_eos`) will generate exactly its remaining
//! `max_new_tokens`; any other is expected to generate a fraction of them (of at most 4,096),
//! a ratio that starts at 0.7, decays step by step to 0.098 while nothing is preempted, and is
//! reset from the running sequences' progress when something is.
//! A request is admitted only if, with the running sequences, the pool holds everyone at
//! every step until they finish (each sequence's blocks come back when it finishes).
use crate::kv::BlockTable;

/// One sequence's demand on the pool.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Demand {
    /// Tokens whose keys and values the next step needs (prompt and generated so far).
    pub len: usize,
    /// Tokens still to be generated (expected or exact).
    pub left: usize,
}

/// Expected share of the remaining new tokens that sequences able to stop early generate.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Growth {
    ratio: f64,
}

impl Growth {
    /// SGLang's defaults (`SGLANG_INIT_NEW_TOKEN_RATIO`, its minimum factor and decay steps,
    /// `retract_decode_steps`).
    const INIT: f64 = 0.7;
    const MIN: f64 = Self::INIT * 0.14;
    const DECAY: f64 = (Self::INIT - Self::MIN) / 600.0;
    const RETRACT_STEPS: usize = 20;
    /// Remaining new tokens counted at most (`CLIP_MAX_NEW_TOKENS_ESTIMATION`), so that a
    /// huge `max_new_tokens` that EOS will cut short does not keep everyone else out.
    const CLIP: usize = 4096;

    pub fn new() -> Self {
        Self { ratio: Self::INIT }
    }

    /// Tokens a sequence is expected to still generate.
    pub fn left(&self, max_new: usize, generated: usize, ignore_eos: bool) -> usize {
        let left = max_new.saturating_sub(generated).max(1);
        if ignore_eos {
            left
        } else {
            let counted = left.min(Self::CLIP);
            ((counted as f64 * self.ratio).round() as usize).clamp(1, counted)
        }
    }

    /// A step ran without preemption.
    pub fn decay(&mut self) {
        self.ratio = (self.ratio - Self::DECAY).max(Self::MIN);
    }

    /// Sequences were preempted: expect the running ones (`(generated, max_new)`) to go as
    /// far as they have gone plus 20 tokens each.
    pub fn preempted(&mut self, running: impl Iterator<Item = (usize, usize)>) {
        let (mut done, mut max, mut n) = (0, 0, 0);
        for (g, m) in running {
            done += g;
            max += m;
            n += 1;
        }
        if max > 0 {
            self.ratio = ((done + Self::RETRACT_STEPS * n) as f64 / max as f64).min(1.0);
        }
    }
}

/// Blocks a sequence holds at its largest: `len` tokens now, `left` more generated (the last
/// is never fed back), at most `limit` tokens.
pub(crate) fn peak_blocks(d: Demand, limit: Option<usize>) -> usize {
    let peak = d.len + d.left - 1;
    BlockTable::blocks_for(limit.map_or(peak, |l| peak.min(l)))
}

/// Whether `seqs` fit in `capacity` blocks at every step until each has finished, every one
/// growing by a token a step and giving its blocks back when done. Usage peaks just before a
/// sequence finishes, so it is checked at those steps only.
pub(crate) fn fits(seqs: &mut [Demand], capacity: usize, limit: Option<usize>) -> bool {
    seqs.sort_unstable_by_key(|d| d.left);
    (0..seqs.len()).all(|i| {
        let t = seqs[i].left;
        let used: usize = seqs[i..]
            .iter()
            .map(|&d| peak_blocks(Demand { left: t, ..d }, limit))
            .sum();
        used <= capacity
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::BLOCK_SIZE;

    fn d(len: usize, left: usize) -> Demand {
        Demand { len, left }
    }

    #[test]
    fn a_sequence_alone_needs_its_final_length() {
        // 40 tokens now, 30 to come: 40 + 29 fed = 69 positions, 5 blocks of 16.
        assert_eq!(peak_blocks(d(40, 30), None), 5);
        assert_eq!(peak_blocks(d(40, 30), Some(48)), 3);
        assert!(fits(&mut [d(40, 30)], 5, None));
        assert!(!fits(&mut [d(40, 30)], 4, None));
    }

    #[test]
    fn blocks_given_back_by_finished_sequences_count() {
        // Two sequences of one block each now. The first finishes after 1 more token, the
        // second grows to 4 blocks: 2 blocks at the first's end, then 4 for the second alone.
        let mut s = [d(BLOCK_SIZE, 3 * BLOCK_SIZE + 1), d(BLOCK_SIZE, 1)];
        assert!(fits(&mut s, 4, None));
        // Both at 4 blocks at once need 8.
        let mut s = [
            d(BLOCK_SIZE, 3 * BLOCK_SIZE + 1),
            d(BLOCK_SIZE, 3 * BLOCK_SIZE + 1),
        ];
        assert!(!fits(&mut s, 7, None));
        assert!(fits(&mut s, 8, None));
        // Staggered: 3 then 4 blocks at their ends; at the first's end the second has 3.
        let mut s = [
            d(BLOCK_SIZE, 2 * BLOCK_SIZE + 1),
            d(BLOCK_SIZE, 3 * BLOCK_SIZE + 1),
        ];
        assert!(!fits(&mut s, 5, None));
        assert!(fits(&mut s, 6, None));
    }

    #[test]
    fn the_ratio_decays_and_resets_on_preemption() {
        let mut g = Growth::new();
        assert_eq!(g.left(100, 0, false), 70);
        assert_eq!(g.left(100, 0, true), 100);
        assert_eq!(g.left(100, 100, false), 1);
        // Long requests that can stop are counted up to 4,096 remaining tokens.
        assert_eq!(
            g.left(100_000, 0, false),
            (4096.0f64 * 0.7).round() as usize
        );
        assert_eq!(g.left(100_000, 0, true), 100_000);
        for _ in 0..1000 {
            g.decay();
        }
        assert_eq!(g.left(100, 0, false), 10);
        assert_eq!(g.left(100, 0, true), 100);
        // Two sequences of 100 new tokens, 30 and 50 generated: (80 + 40) / 200.
        g.preempted([(30, 100), (50, 100)].into_iter());
        assert_eq!(g.left(100, 0, false), 60);
        g.preempted([(95, 100)].into_iter());
        assert_eq!(g.left(100, 0, false), 100);
    }
}
