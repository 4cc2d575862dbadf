//! Paged key/value cache: a pool of fixed-size blocks shared by every sequence, each sequence
//! holding a table of block ids. Blocks are reference counted so that several sequences (and the
//! prefix cache) can share the blocks of a common prefix (BOS + image).
//!
//! Layout: `[layer][k|v][block][kv_head][slot][head_dim]` — one block's keys (or values) of one
//! layer are a contiguous `[kv_head][slot][head_dim]` slab, and a layer's slabs of consecutive
//! blocks are adjacent, so decode attention over a sequence's (mostly consecutive) blocks reads
//! long contiguous runs. Keys after RoPE and values after tau scaling (spec §6.9), stored as f32 (exact, the default with full-precision weights)
//! or f16 ([`KvDtype`]: half the bytes read per decode step and twice the positions per MiB).

use half::f16;
use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};

use crate::config::TextConfig;
use crate::error::{ModelError, Result};

/// Element type of the cached keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// f32: the reference's precision.
    #[default]
    F32,
    /// IEEE half: 11-bit significands (relative rounding ≤ 2⁻¹¹); values beyond ±65504 are
    /// saturated, not turned into infinities.
    F16,
}

impl KvDtype {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }

    /// Lower-case name (`f32`, `f16`).
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }
}

/// The pool's storage.
#[derive(Debug)]
enum KvData {
    F32(Vec<f32>),
    /// f16 bit patterns (`vec![0u16; n]` is a zeroed allocation the OS backs lazily;
    /// `vec![f16::ZERO; n]` would write every page up front).
    F16(Vec<u16>),
}

/// A contiguous run of cached vectors (see [`KvPool::block_run`]).
#[derive(Debug, Clone, Copy)]
pub enum KvRun<'a> {
    /// f32 storage.
    F32(&'a [f32]),
    /// f16 storage.
    F16(&'a [f16]),
}

/// Default positions per block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// The block pool.
#[derive(Debug)]
pub struct KvPool {
    block_size: usize,
    n_layers: usize,
    heads: usize,
    head_dim: usize,
    data: KvData,
    refcnt: Vec<u32>,
    free: Vec<u32>,
}

impl KvPool {
    /// A pool of `n_blocks` blocks of `block_size` positions for the decoder `cfg`, storing
    /// `dtype`. Memory is reserved lazily by the OS (zeroed pages are only backed once written).
    pub fn new(cfg: &TextConfig, block_size: usize, n_blocks: usize, dtype: KvDtype) -> Self {
        let block_size = block_size.max(1);
        let heads = cfg.n_kv_heads;
        let head_dim = cfg.head_dim();
        let block_len = cfg.n_layers * 2 * heads * block_size * head_dim;
        Self {
            block_size,
            n_layers: cfg.n_layers,
            heads,
            head_dim,
            // Zeroed (lazily backed) allocations, backed by huge pages as they are touched:
            // decode streams the cache every step.
            data: match dtype {
                KvDtype::F32 => {
                    let mut d = vec![0f32; block_len * n_blocks];
                    crescent_kernels::advise_huge_pages(&mut d);
                    KvData::F32(d)
                }
                KvDtype::F16 => {
                    let mut d = vec![0u16; block_len * n_blocks];
                    crescent_kernels::advise_huge_pages(&mut d);
                    KvData::F16(d)
                }
            },
            refcnt: vec![0; n_blocks],
            free: (0..n_blocks as u32).rev().collect(),
        }
    }

    /// A pool using about `mb` MiB.
    pub fn with_memory_mb(cfg: &TextConfig, block_size: usize, mb: usize, dtype: KvDtype) -> Self {
        let per_block = Self::bytes_per_block(cfg, block_size, dtype).max(1);
        let n = (mb.saturating_mul(1 << 20) / per_block).max(1);
        Self::new(cfg, block_size, n, dtype)
    }

    /// Bytes of one block.
    pub fn bytes_per_block(cfg: &TextConfig, block_size: usize, dtype: KvDtype) -> usize {
        cfg.n_layers * 2 * cfg.n_kv_heads * block_size * cfg.head_dim() * dtype.bytes()
    }

    /// Element type stored.
    pub fn dtype(&self) -> KvDtype {
        match self.data {
            KvData::F32(_) => KvDtype::F32,
            KvData::F16(_) => KvDtype::F16,
        }
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

    /// Elements of one (layer, k|v) slab of one block: `[head][slot][head_dim]`.
    fn slab_len(&self) -> usize {
        self.heads * self.block_size * self.head_dim
    }

    fn offset(&self, block: u32, layer: usize, kv: usize, head: usize, slot: usize) -> usize {
        ((layer * 2 + kv) * self.total_blocks() + block as usize) * self.slab_len()
            + (head * self.block_size + slot) * self.head_dim
    }

    /// Key (kv = 0) or value (kv = 1) vector of one head at one position of a sequence, as f32
    /// into `out` (`head_dim` floats).
    pub fn read(
        &self,
        seq: &SeqKv,
        layer: usize,
        kv: usize,
        head: usize,
        pos: usize,
        out: &mut [f32],
    ) {
        let b = seq.blocks[pos / self.block_size];
        let o = self.offset(b, layer, kv, head, pos % self.block_size);
        match &self.data {
            KvData::F32(d) => out.copy_from_slice(&d[o..o + self.head_dim]),
            KvData::F16(d) => {
                for (a, v) in out
                    .iter_mut()
                    .zip(d[o..o + self.head_dim].reinterpret_cast::<f16>())
                {
                    *a = v.to_f32();
                }
            }
        }
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
    ) -> KvRun<'_> {
        let o = self.offset(seq.blocks[block_index], layer, kv, head, 0);
        let r = o..o + len * self.head_dim;
        match &self.data {
            KvData::F32(d) => KvRun::F32(&d[r]),
            KvData::F16(d) => KvRun::F16(d[r].reinterpret_cast()),
        }
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
        match &mut self.data {
            KvData::F32(d) => d[o..o + self.head_dim].copy_from_slice(v),
            KvData::F16(d) => {
                // Saturate instead of overflowing to ±∞ (NaN stays NaN), then convert the whole
                // vector at once (F16C when available).
                let mut tmp = [0f32; 256];
                let dst = d[o..o + self.head_dim].reinterpret_cast_mut::<f16>();
                if self.head_dim <= tmp.len() {
                    let t = &mut tmp[..self.head_dim];
                    for (a, &x) in t.iter_mut().zip(v) {
                        *a = x.clamp(-65504.0, 65504.0);
                    }
                    dst.convert_from_f32_slice(t);
                } else {
                    for (a, &x) in dst.iter_mut().zip(v) {
                        *a = f16::from_f32(x.clamp(-65504.0, 65504.0));
                    }
                }
            }
        }
    }

    fn copy_block(&mut self, from: u32, to: u32) {
        let n = self.slab_len();
        for lk in 0..self.n_layers * 2 {
            let (f, t) = (
                self.offset(from, lk / 2, lk % 2, 0, 0),
                self.offset(to, lk / 2, lk % 2, 0, 0),
            );
            match &mut self.data {
                KvData::F32(d) => d.copy_within(f..f + n, t),
                KvData::F16(d) => d.copy_within(f..f + n, t),
            }
        }
    }

    /// Elements per key/value vector.
    pub fn head_dim(&self) -> usize {
        self.head_dim
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

    fn vector(
        pool: &KvPool,
        seq: &SeqKv,
        layer: usize,
        kv: usize,
        head: usize,
        pos: usize,
    ) -> Vec<f32> {
        let mut v = vec![0f32; 8];
        pool.read(seq, layer, kv, head, pos, &mut v);
        v
    }

    #[test]
    fn reserve_fork_release_balance() {
        for dtype in [KvDtype::F32, KvDtype::F16] {
            reserve_fork_release_balance_with(dtype);
        }
    }

    fn reserve_fork_release_balance_with(dtype: KvDtype) {
        let c = cfg();
        let mut pool = KvPool::new(&c, 4, 10, dtype);
        let mut a = SeqKv::new();
        a.reserve(&mut pool, 10).unwrap();
        a.advance(10);
        assert_eq!(pool.used_blocks(), 3);
        let v: Vec<f32> = (0..8).map(|i| i as f32).collect();
        pool.write(&a, 1, 0, 1, 9, &v);
        let mut b = a.fork(&mut pool).unwrap();
        // two full blocks shared, the partial third copied
        assert_eq!(pool.used_blocks(), 4);
        assert_eq!(vector(&pool, &b, 1, 0, 1, 9), v);
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
        let mut pool = KvPool::new(&c, 4, 2, KvDtype::F32);
        let mut a = SeqKv::new();
        assert!(a.reserve(&mut pool, 9).is_err());
        a.release(&mut pool);
        assert_eq!(pool.free_blocks(), 2);
    }

    #[test]
    fn f16_rounds_and_saturates() {
        let c = cfg();
        let mut pool = KvPool::new(&c, 4, 1, KvDtype::F16);
        assert_eq!(
            KvPool::bytes_per_block(&c, 4, KvDtype::F16) * 2,
            KvPool::bytes_per_block(&c, 4, KvDtype::F32)
        );
        let mut a = SeqKv::new();
        a.reserve(&mut pool, 1).unwrap();
        a.advance(1);
        let v = [1.0f32 / 3.0, -1e6, 1e6, 65504.0, 1e-3, 0.0, -2.5, f32::NAN];
        pool.write(&a, 0, 1, 0, 0, &v);
        let got = vector(&pool, &a, 0, 1, 0, 0);
        assert!((got[0] - 1.0 / 3.0).abs() <= (1.0 / 3.0) * 2f32.powi(-11));
        assert_eq!(&got[1..7], &[-65504.0, 65504.0, 65504.0, got[4], 0.0, -2.5]);
        assert!((got[4] - 1e-3).abs() <= 1e-3 * 2f32.powi(-11));
        assert!(got[7].is_nan());
    }
}
