//! Paged key/value cache: a pool of fixed-size blocks shared by every sequence, each sequence
//! holding a table of block ids. Blocks are reference counted so that several sequences (and the
//! prefix cache) can share the blocks of a common prefix (BOS + image).
//!
//! Layout of one block: `[layer][k|v][kv_head][slot][head_dim]` in f32, keys after RoPE and values
//! after tau scaling (spec §6.9).

use crate::config::TextConfig;
use crate::error::{ModelError, Result};

/// Default positions per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The block pool.
#[derive(Debug)]
pub struct KvPool {
    block_size: usize,
    n_layers: usize,
    heads: usize,
    head_dim: usize,
    block_len: usize,
    data: Vec<f32>,
    refcnt: Vec<u32>,
    free: Vec<u32>,
}

impl KvPool {
    /// A pool of `n_blocks` blocks of `block_size` positions for the decoder `cfg`. Memory is
    /// reserved lazily by the OS (zeroed pages are only backed once written).
    pub fn new(cfg: &TextConfig, block_size: usize, n_blocks: usize) -> Self {
        let block_size = block_size.max(1);
        let heads = cfg.n_kv_heads;
        let head_dim = cfg.head_dim();
        let block_len = cfg.n_layers * 2 * heads * block_size * head_dim;
        Self {
            block_size,
            n_layers: cfg.n_layers,
            heads,
            head_dim,
            block_len,
            data: vec![0f32; block_len * n_blocks],
            refcnt: vec![0; n_blocks],
            free: (0..n_blocks as u32).rev().collect(),
        }
    }

    /// A pool using about `mb` MiB.
    pub fn with_memory_mb(cfg: &TextConfig, block_size: usize, mb: usize) -> Self {
        let per_block = Self::bytes_per_block(cfg, block_size).max(1);
        let n = (mb.saturating_mul(1 << 20) / per_block).max(1);
        Self::new(cfg, block_size, n)
    }

    /// Bytes of one block.
    pub fn bytes_per_block(cfg: &TextConfig, block_size: usize) -> usize {
        cfg.n_layers * 2 * cfg.n_kv_heads * block_size * cfg.head_dim() * 4
    }

    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Total blocks.
    pub fn total_blocks(&self) -> usize {
        self.refcnt.len()
    }

    /// Blocks not referenced by anyone.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Blocks in use.
    pub fn used_blocks(&self) -> usize {
        self.total_blocks() - self.free_blocks()
    }

    /// Blocks needed to hold `positions` positions.
    pub fn blocks_for(&self, positions: usize) -> usize {
        positions.div_ceil(self.block_size)
    }

    fn alloc(&mut self) -> Option<u32> {
        let b = self.free.pop()?;
        self.refcnt[b as usize] = 1;
        Some(b)
    }

    /// Add a reference to block `b`.
    pub fn retain(&mut self, b: u32) {
        self.refcnt[b as usize] += 1;
    }

    /// Drop a reference to block `b`; it returns to the free list at zero.
    pub fn release(&mut self, b: u32) {
        let r = &mut self.refcnt[b as usize];
        debug_assert!(*r > 0, "double release of KV block {b}");
        *r = r.saturating_sub(1);
        if *r == 0 {
            self.free.push(b);
        }
    }

    fn offset(&self, block: u32, layer: usize, kv: usize, head: usize, slot: usize) -> usize {
        block as usize * self.block_len
            + (((layer * 2 + kv) * self.heads + head) * self.block_size + slot) * self.head_dim
    }

    /// Key (kv = 0) or value (kv = 1) vector of one head at one position of a sequence.
    pub fn vector(&self, seq: &SeqKv, layer: usize, kv: usize, head: usize, pos: usize) -> &[f32] {
        let b = seq.blocks[pos / self.block_size];
        let o = self.offset(b, layer, kv, head, pos % self.block_size);
        &self.data[o..o + self.head_dim]
    }

    /// Contiguous run of key/value vectors of one head inside one block: positions
    /// `block_index·bs .. block_index·bs + len` of the sequence.
    pub fn block_run(
        &self,
        seq: &SeqKv,
        layer: usize,
        kv: usize,
        head: usize,
        block_index: usize,
        len: usize,
    ) -> &[f32] {
        let o = self.offset(seq.blocks[block_index], layer, kv, head, 0);
        &self.data[o..o + len * self.head_dim]
    }

    /// Write a key/value vector.
    pub fn write(
        &mut self,
        seq: &SeqKv,
        layer: usize,
        kv: usize,
        head: usize,
        pos: usize,
        v: &[f32],
    ) {
        let b = seq.blocks[pos / self.block_size];
        debug_assert_eq!(self.refcnt[b as usize], 1, "write into a shared KV block");
        let o = self.offset(b, layer, kv, head, pos % self.block_size);
        self.data[o..o + self.head_dim].copy_from_slice(v);
    }

    fn copy_block(&mut self, from: u32, to: u32) {
        let (f, t) = (from as usize * self.block_len, to as usize * self.block_len);
        self.data.copy_within(f..f + self.block_len, t);
    }

    /// Key/value heads per layer.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Layers per block (for sanity checks).
    pub fn n_layers(&self) -> usize {
        self.n_layers
    }
}

/// The block table of one sequence.
#[derive(Debug, Default, Clone)]
pub struct SeqKv {
    blocks: Vec<u32>,
    len: usize,
}

impl SeqKv {
    /// An empty sequence.
    pub fn new() -> Self {
        Self::default()
    }

    /// Positions filled.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Blocks held.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Make room for `n` more positions; fails (holding what it had) when the pool is exhausted.
    pub fn reserve(&mut self, pool: &mut KvPool, n: usize) -> Result<()> {
        let need = pool.blocks_for(self.len + n);
        while self.blocks.len() < need {
            match pool.alloc() {
                Some(b) => self.blocks.push(b),
                None => {
                    return Err(ModelError::Input(format!(
                        "KV cache exhausted: {} more positions do not fit ({} of {} blocks free)",
                        n,
                        pool.free_blocks(),
                        pool.total_blocks()
                    )))
                }
            }
        }
        Ok(())
    }

    /// Blocks that reserving `n` more positions would take from the pool.
    pub fn blocks_needed(&self, pool: &KvPool, n: usize) -> usize {
        pool.blocks_for(self.len + n)
            .saturating_sub(self.blocks.len())
    }

    /// Mark `n` reserved positions as filled.
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// A new sequence starting with this one's `len` positions: full blocks are shared
    /// (reference counted), a partially filled last block is copied so the new sequence can keep
    /// writing into it.
    pub fn fork(&self, pool: &mut KvPool) -> Result<SeqKv> {
        let bs = pool.block_size();
        let full = self.len / bs;
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for &b in &self.blocks[..full] {
            pool.retain(b);
            blocks.push(b);
        }
        if !self.len.is_multiple_of(bs) {
            let Some(nb) = pool.alloc() else {
                for &b in &blocks {
                    pool.release(b);
                }
                return Err(ModelError::Input(
                    "KV cache exhausted while sharing a prefix".into(),
                ));
            };
            pool.copy_block(self.blocks[full], nb);
            blocks.push(nb);
        }
        Ok(SeqKv {
            blocks,
            len: self.len,
        })
    }

    /// Return every block to the pool.
    pub fn release(&mut self, pool: &mut KvPool) {
        for b in self.blocks.drain(..) {
            pool.release(b);
        }
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TextConfig {
        TextConfig {
            dim: 16,
            n_heads: 2,
            n_kv_heads: 2,
            n_layers: 2,
            ..TextConfig::default()
        }
    }

    #[test]
    fn reserve_fork_release_balance() {
        let c = cfg();
        let mut pool = KvPool::new(&c, 4, 10);
        let mut a = SeqKv::new();
        a.reserve(&mut pool, 10).unwrap();
        a.advance(10);
        assert_eq!(pool.used_blocks(), 3);
        let v: Vec<f32> = (0..8).map(|i| i as f32).collect();
        pool.write(&a, 1, 0, 1, 9, &v);
        let mut b = a.fork(&mut pool).unwrap();
        // two full blocks shared, the partial third copied
        assert_eq!(pool.used_blocks(), 4);
        assert_eq!(pool.vector(&b, 1, 0, 1, 9), &v[..]);
        assert_eq!(&b.blocks()[..2], &a.blocks()[..2]);
        assert_ne!(b.blocks()[2], a.blocks()[2]);
        b.reserve(&mut pool, 20).unwrap();
        a.release(&mut pool);
        assert_eq!(pool.used_blocks(), b.blocks().len());
        b.release(&mut pool);
        assert_eq!(pool.used_blocks(), 0);
    }

    #[test]
    fn exhaustion_is_an_error_not_a_panic() {
        let c = cfg();
        let mut pool = KvPool::new(&c, 4, 2);
        let mut a = SeqKv::new();
        assert!(a.reserve(&mut pool, 9).is_err());
        a.release(&mut pool);
        assert_eq!(pool.free_blocks(), 2);
    }
}
