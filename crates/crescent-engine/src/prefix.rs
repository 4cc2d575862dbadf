//! Prefix cache: the KV blocks of `[BOS] + image` per image (keyed by the hash of the decoded
//! pixels), least-recently-used eviction. A hit skips both the vision encoder and the image
//! prefill; the blocks are shared with every sequence forked from them.

use crescent_model::{KvPool, SeqKv};

struct Entry {
    hash: [u8; 32],
    kv: SeqKv,
    last_used: u64,
}

/// Cached image prefixes.
pub struct PrefixCache {
    entries: Vec<Entry>,
    capacity: usize,
    tick: u64,
}

impl PrefixCache {
    /// A cache holding at most `capacity` images (0 disables it).
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: Vec::new(),
            capacity,
            tick: 0,
        }
    }

    /// Images cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// KV blocks held by the cached prefixes (shared with the jobs forked from them).
    pub fn blocks(&self) -> usize {
        self.entries.iter().map(|e| e.kv.blocks().len()).sum()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `hash` is cached (does not count as a use).
    pub fn contains(&self, hash: &[u8; 32]) -> bool {
        self.entries.iter().any(|e| &e.hash == hash)
    }

    /// The cached prefix of `hash`, marking it recently used.
    pub fn get(&mut self, hash: &[u8; 32]) -> Option<&SeqKv> {
        self.tick += 1;
        let tick = self.tick;
        let e = self.entries.iter_mut().find(|e| &e.hash == hash)?;
        e.last_used = tick;
        Some(&e.kv)
    }

    /// Add a prefix (taking over its block references); evicts the least recently used entry
    /// beyond capacity. With capacity 0 the blocks are released at once.
    pub fn insert(&mut self, hash: [u8; 32], mut kv: SeqKv, pool: &mut KvPool) {
        if self.capacity == 0 || self.contains(&hash) {
            kv.release(pool);
            return;
        }
        while self.entries.len() >= self.capacity {
            if !self.evict_one(pool, None) {
                break;
            }
        }
        self.tick += 1;
        self.entries.push(Entry {
            hash,
            kv,
            last_used: self.tick,
        });
    }

    /// Evict the least recently used entry other than `keep`; false when there is none.
    pub fn evict_one(&mut self, pool: &mut KvPool, keep: Option<&[u8; 32]>) -> bool {
        let victim = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| Some(&e.hash) != keep)
            .min_by_key(|(_, e)| e.last_used)
            .map(|(i, _)| i);
        match victim {
            Some(i) => {
                let mut e = self.entries.swap_remove(i);
                e.kv.release(pool);
                true
            }
            None => false,
        }
    }

    /// Drop everything.
    pub fn clear(&mut self, pool: &mut KvPool) {
        for mut e in self.entries.drain(..) {
            e.kv.release(pool);
        }
    }
}
