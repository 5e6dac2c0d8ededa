//! The engine's KV memory: one preallocated pool per device in fixed-size blocks, block
//! tables per sequence, reference counts for blocks shared between sequences (the samples of
//! one prompt, identical prompt prefixes across requests), and the prefix cache.
//!
//! Only *full* blocks are ever shared: a sequence writes its keys and values into its last,
//! private block, and a block becomes shareable (registered under the hash of its tokens and
//! of everything before it, as vLLM does) once it is full. Sharing therefore never needs a
//! copy: copy-on-write reduces to "the partial last block is never shared".
mod dense;
pub mod gpu_paged;
mod pool;

pub use dense::SeqCache;
pub use pool::KvPool;

use std::collections::{BTreeSet, HashMap};

/// Tokens per block.
pub const BLOCK_SIZE: usize = 16;

/// Hash chain value of a full block: depends on the scope, every earlier token and this block's tokens.
pub type BlockHash = u64;

/// A sequence's KV state: its blocks and how many positions hold computed keys and values.
#[derive(Debug, Clone, Default)]
pub struct BlockTable {
    pub blocks: Vec<u32>,
    /// Positions with keys and values stored.
    pub len: usize,
    /// Hash of each full block in `blocks`, in order (the chain of the prefix cache).
    pub hashes: Vec<BlockHash>,
}

impl BlockTable {
    /// Blocks needed to hold `tokens` positions.
    pub fn blocks_for(tokens: usize) -> usize {
        tokens.div_ceil(BLOCK_SIZE)
    }
}

#[derive(Debug, Clone)]
struct Cached {
    hash: BlockHash,
    parent: BlockHash,
    tokens: Vec<u32>,
}

/// Allocation of pool blocks: free list, reference counts, prefix cache with LRU eviction.
#[derive(Debug)]
pub struct BlockManager {
    num_blocks: usize,
    /// Free blocks, highest id first so that `pop` hands out low ids (the pool's pages are
    /// touched from the start, so resident memory follows the blocks in use).
    free: Vec<u32>,
    refs: Vec<u32>,
    /// Full blocks registered in the prefix cache.
    by_hash: HashMap<BlockHash, u32>,
    cached: Vec<Option<Cached>>,
    /// Cached blocks nobody uses, by release time: handed out (evicted) oldest first.
    idle: BTreeSet<(u64, u32)>,
    released_at: Vec<u64>,
    clock: u64,
    prefix_cache: bool,
}

impl BlockManager {
    pub fn new(num_blocks: usize, prefix_cache: bool) -> Self {
        Self {
            num_blocks,
            free: (0..num_blocks as u32).rev().collect(),
            refs: vec![0; num_blocks],
            by_hash: HashMap::new(),
            cached: vec![None; num_blocks],
            idle: BTreeSet::new(),
            released_at: vec![0; num_blocks],
            clock: 0,
            prefix_cache,
        }
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// Blocks that can be handed out now (free, or cached but unused).
    pub fn available(&self) -> usize {
        self.free.len() + self.idle.len()
    }

    /// Blocks referenced by at least one sequence.
    pub fn in_use(&self) -> usize {
        self.num_blocks - self.available()
    }

    fn allocate(&mut self) -> Option<u32> {
        let b = match self.free.pop() {
            Some(b) => b,
            None => {
                // Evict the least recently released cached block.
                let (_, b) = self.idle.pop_first()?;
                if let Some(c) = self.cached[b as usize].take() {
                    self.by_hash.remove(&c.hash);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    fn release(&mut self, b: u32) {
        let r = &mut self.refs[b as usize];
        debug_assert!(*r > 0, "block {b} released twice");
        *r -= 1;
        if *r == 0 {
            if self.cached[b as usize].is_some() {
                self.clock += 1;
                self.released_at[b as usize] = self.clock;
                self.idle.insert((self.clock, b));
            } else {
                self.free.push(b);
            }
        }
    }

    /// Give back every block of `t` and empty it.
    pub fn free_table(&mut self, t: &mut BlockTable) {
        for b in t.blocks.drain(..) {
            self.release(b);
        }
        t.hashes.clear();
        t.len = 0;
    }

    /// Make room in `t` for positions up to `total` (exclusive). `false` (and nothing
    /// allocated) when the pool does not have the blocks.
    pub fn reserve(&mut self, t: &mut BlockTable, total: usize) -> bool {
        let need = BlockTable::blocks_for(total).saturating_sub(t.blocks.len());
        if need > self.available() {
            return false;
        }
        for _ in 0..need {
            let b = self
                .allocate()
                .unwrap_or_else(|| unreachable!("checked available"));
            t.blocks.push(b);
        }
        true
    }

    /// Chain hash of a full block.
    pub fn chain(parent: BlockHash, tokens: &[u32]) -> BlockHash {
        // FNV-1a over the parent and the tokens, then a 64-bit finalizer (splitmix):
        // cheap, deterministic across runs; hits are verified against the stored tokens.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ parent.rotate_left(17);
        for &t in tokens {
            for b in t.to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h ^= h >> 30;
        h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 27;
        h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
        h ^ (h >> 31)
    }

    /// Root of the hash chain for a request. Requests share prefixes within one scope: with
    /// the prefix cache on, all requests (scope 0); with it off, only the samples of one input.
    pub fn root(&self, input_index: usize) -> BlockHash {
        if self.prefix_cache {
            0x9e37_79b9_7f4a_7c15
        } else {
            Self::chain(
                0x51_7cc1_b727_220a,
                &[input_index as u32, (input_index >> 32) as u32],
            )
        }
    }

    /// Attach to an empty `t` the longest run of cached full blocks that prefix `tokens`,
    /// leaving at least the last token to be computed (its logits are needed). Returns the
    /// number of positions reused.
    pub fn match_prefix(&mut self, t: &mut BlockTable, root: BlockHash, tokens: &[u32]) -> usize {
        debug_assert!(t.blocks.is_empty());
        let usable = tokens.len().saturating_sub(1) / BLOCK_SIZE;
        let mut parent = root;
        for chunk in tokens.chunks_exact(BLOCK_SIZE).take(usable) {
            let h = Self::chain(parent, chunk);
            let Some(&b) = self.by_hash.get(&h) else {
                break;
            };
            let ok = self.cached[b as usize]
                .as_ref()
                .is_some_and(|c| c.parent == parent && c.tokens == chunk);
            if !ok {
                break;
            }
            if self.refs[b as usize] == 0 {
                self.idle.remove(&(self.released_at[b as usize], b));
            }
            self.refs[b as usize] += 1;
            t.blocks.push(b);
            t.hashes.push(h);
            parent = h;
        }
        t.len = t.blocks.len() * BLOCK_SIZE;
        t.len
    }

    /// After keys and values for `tokens[..t.len]` were written: register the blocks that
    /// became full so later requests can share them.
    pub fn commit_full_blocks(&mut self, t: &mut BlockTable, root: BlockHash, tokens: &[u32]) {
        let full = t.len / BLOCK_SIZE;
        while t.hashes.len() < full {
            let i = t.hashes.len();
            let parent = t.hashes.last().copied().unwrap_or(root);
            let chunk = &tokens[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
            let h = Self::chain(parent, chunk);
            t.hashes.push(h);
            let b = t.blocks[i];
            if self.cached[b as usize].is_none() && !self.by_hash.contains_key(&h) {
                self.by_hash.insert(h, b);
                self.cached[b as usize] = Some(Cached {
                    hash: h,
                    parent,
                    tokens: chunk.to_vec(),
                });
            }
        }
    }
}

/// `MemAvailable` of this machine (Linux), in bytes.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_and_free_account_blocks() {
        let mut m = BlockManager::new(4, true);
        let mut a = BlockTable::default();
        assert!(m.reserve(&mut a, 17));
        assert_eq!(a.blocks, vec![0, 1]);
        assert_eq!(m.available(), 2);
        let mut b = BlockTable::default();
        assert!(!m.reserve(&mut b, 3 * BLOCK_SIZE), "only two blocks left");
        assert!(b.blocks.is_empty());
        m.free_table(&mut a);
        assert_eq!(m.available(), 4);
        assert!(m.reserve(&mut b, 4 * BLOCK_SIZE));
    }

    #[test]
    fn prefix_blocks_are_shared_and_evicted_last() {
        let mut m = BlockManager::new(6, true);
        let root = m.root(0);
        let toks: Vec<u32> = (0..40).collect();
        let mut a = BlockTable::default();
        assert!(m.reserve(&mut a, toks.len()));
        a.len = toks.len();
        m.commit_full_blocks(&mut a, root, &toks);
        assert_eq!(a.hashes.len(), 2);

        // Same first 2 blocks, different tail: shares 2 blocks.
        let mut other = toks[..32].to_vec();
        other.extend([7, 7, 7]);
        let mut b = BlockTable::default();
        assert_eq!(m.match_prefix(&mut b, root, &other), 32);
        assert_eq!(b.blocks, a.blocks[..2]);
        // A prompt of exactly 32 tokens reuses only one block: its last token must be computed.
        let mut c = BlockTable::default();
        assert_eq!(m.match_prefix(&mut c, root, &toks[..32]), 16);

        // Freed cached blocks stay matchable until the pool needs them.
        m.free_table(&mut a);
        m.free_table(&mut b);
        m.free_table(&mut c);
        let mut d = BlockTable::default();
        assert_eq!(m.match_prefix(&mut d, root, &other), 32);
        m.free_table(&mut d);
        let mut e = BlockTable::default();
        assert!(
            m.reserve(&mut e, 6 * BLOCK_SIZE),
            "idle cached blocks are evicted on demand"
        );
        m.free_table(&mut e);
        let mut f = BlockTable::default();
        assert_eq!(m.match_prefix(&mut f, root, &other), 0, "evicted");
    }

    #[test]
    fn scopes_separate_requests_when_prefix_cache_is_off() {
        let mut m = BlockManager::new(8, false);
        let toks: Vec<u32> = (0..20).collect();
        let mut a = BlockTable::default();
        assert!(m.reserve(&mut a, 20));
        a.len = 20;
        m.commit_full_blocks(&mut a, m.root(3), &toks);
        let mut same_input = BlockTable::default();
        assert_eq!(m.match_prefix(&mut same_input, m.root(3), &toks), 16);
        let mut other_input = BlockTable::default();
        assert_eq!(m.match_prefix(&mut other_input, m.root(4), &toks), 0);
    }
}
