//! Large-`rows` (prefill / vision) path: a BLIS-style blocked GEMM.
//!
//! `y[m, n] = x[m, k] · w[n, k]ᵀ`. The output features are split into
//! panels of `nc` (≈ 256) columns, one or more rayon tasks per panel. All of
//! x is packed once per call (in parallel) as 6-wide slivers per K block
//! (`ap[kk*6 + i]`), shared by every panel. For each K block of `kc`
//! (≤ `KC_MAX`) a task converts its weight panel to f32 into a per-thread
//! buffer laid out as 16-wide slivers (`bp[kk*16 + j]`) and runs the 6×16
//! register-blocked FMA micro-kernel over all (sliver of W) × (sliver of x)
//! pairs. x, W and y may be strided views (attention reads heads in place). The W sliver (kc×16 f32) stays in L1 while x slivers stream from L2.
//! With `Isa::Avx512` pairs of full W slivers (and pairs of x slivers) go
//! through a 12×32 zmm kernel instead (same packing, kc ≤ `KC_MAX_512`).

use rayon::prelude::*;

use crate::util::{div_ceil, round_up, with_call_scratch, with_scratch, SyncPtr};
use crate::weights::WeightElem;
use crate::Isa;

pub(crate) const MR: usize = 6;
pub(crate) const NR: usize = 16;
/// Max depth of a K block (W sliver = KC_MAX·16·4 B = 24 KiB, fits L1).
const KC_MAX: usize = 384;
/// Max K block with the AVX-512 kernel, which keeps two W slivers
/// (2·kc·16·4 B = 32 KiB) in L1.
const KC_MAX_512: usize = 256;
/// Rows of x packed at once (MC·kc·4 B ≤ 144 KiB, lives in L2).
const MC: usize = 96;
/// Target / max output features per panel (nc·kc·4 B ≤ 384 KiB, L2).
const NC_TARGET: usize = 256;
const NC_MAX: usize = 512;
/// Below this many multiply-adds a call runs on the calling thread only.
const PAR_MIN_MACS: usize = 1 << 20;
/// Max rows of x per task (a multiple of `MR`).
const MCHUNK_MAX: usize = 768;
/// Max rows of x packed at once (a multiple of `MCHUNK_MAX`); taller calls run in row chunks.
const PACK_ROWS_MAX: usize = 4 * MCHUNK_MAX;

/// Returns a 64-byte-aligned sub-slice of `n` floats of `v` (grown as needed).
fn aligned(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n + 16 {
        v.resize(n + 16, 0.0);
    }
    let off = v.as_ptr().align_offset(64).min(16);
    &mut v[off..off + n]
}

/// Converts rows `n0..n1` of `w`, columns `pc..pc+kcc`, into 16-wide slivers:
/// `bp[s*16*kcc + kk*16 + j] = w[n0 + 16s + j, pc + kk]` (0 past `n1`).
#[allow(clippy::too_many_arguments)]
fn pack_b<W: WeightElem>(
    isa: Isa,
    w: &[W],
    k: usize,
    n0: usize,
    n1: usize,
    pc: usize,
    kcc: usize,
    bp: &mut [f32],
    tmp: &mut Vec<f32>,
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    let nsl = div_ceil(n1 - n0, NR);
    if tmp.len() < kcc {
        tmp.resize(kcc, 0.0);
    }
    let t = &mut tmp[..kcc];
    for (s, dst) in bp[..nsl * NR * kcc].chunks_exact_mut(NR * kcc).enumerate() {
        #[cfg(target_arch = "x86_64")]
        if isa.has_avx2() && n0 + (s + 1) * NR <= n1 {
            let o = n0 + s * NR;
            // Bounds for the unchecked reads below.
            assert!((o + NR - 1) * k + pc + kcc <= w.len());
            // SAFETY: `Isa::Avx2Fma` / `Avx512` imply the CPU features; rows
            // `o .. o+16`, columns `pc .. pc+kcc` are inside `w` (asserted);
            // `dst` has exactly `16 * kcc` elements.
            unsafe {
                crate::x86::pack_b_sliver(w.as_ptr().add(o * k + pc), k, kcc, dst.as_mut_ptr())
            };
            continue;
        }
        for j in 0..NR {
            let o = n0 + s * NR + j;
            if o >= n1 {
                for kk in 0..kcc {
                    dst[kk * NR + j] = 0.0;
                }
                continue;
            }
            let src = &w[o * k + pc..o * k + pc + kcc];
            W::convert_slice(src, t);
            for (kk, v) in t.iter().enumerate() {
                dst[kk * NR + j] = *v;
            }
        }
    }
}

/// Packs all of `x` (`m` rows with stride `lda`, `k` columns) into 6-wide slivers per K
/// block: block `pc .. pc+kcc` starts at `pc * m_pad` and holds
/// `ap[pc*m_pad + s*6*kcc + kk*6 + i] = x[(6s + i)*lda + pc + kk]` (0 past row `m`).
/// Slivers are packed in parallel when the call is parallel.
#[allow(clippy::too_many_arguments)]
fn pack_a_all(x: &[f32], lda: usize, m: usize, k: usize, kc: usize, ap: &mut [f32], par: bool) {
    let m_pad = round_up(m, MR);
    let msl = m_pad / MR;
    // One sliver (6 rows × all K blocks) per unit of work: its pieces are disjoint.
    let ptr = SyncPtr(ap.as_mut_ptr());
    assert!(ap.len() >= m_pad * k);
    let one = |s: usize| {
        let base = ptr.get();
        let mut pc = 0;
        while pc < k {
            let kcc = kc.min(k - pc);
            // SAFETY: sliver `s` of K block `pc` is `ap[pc*m_pad + s*6*kcc ..][..6*kcc]`,
            // inside `ap` (asserted length) and written by this closure call only.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(base.add(pc * m_pad + s * MR * kcc), MR * kcc)
            };
            for i in 0..MR {
                let r = s * MR + i;
                if r >= m {
                    for kk in 0..kcc {
                        dst[kk * MR + i] = 0.0;
                    }
                    continue;
                }
                let src = &x[r * lda + pc..r * lda + pc + kcc];
                for (kk, v) in src.iter().enumerate() {
                    dst[kk * MR + i] = *v;
                }
            }
            pc += kcc;
        }
    };
    if par && msl > 1 {
        (0..msl).into_par_iter().with_min_len(8).for_each(one);
    } else {
        (0..msl).for_each(one);
    }
}

/// A weight matrix the GEMM can pack: anything that can write 16-wide f32 slivers of its rows
/// (dense bf16/f16/f32 weights, or quantized ones dequantized on the fly).
pub(crate) trait PackB: Sync {
    /// Writes rows `n0..n1` (`n1 - n0 <= nc`), columns `pc..pc+kcc` as 16-wide slivers:
    /// `bp[s*16*kcc + kk*16 + j] = w[n0 + 16s + j, pc + kk]` (0 past `n1`). `k` is the row
    /// length; `tmp` is scratch.
    #[allow(clippy::too_many_arguments)]
    fn pack_b(
        &self,
        isa: Isa,
        k: usize,
        n0: usize,
        n1: usize,
        pc: usize,
        kcc: usize,
        bp: &mut [f32],
        tmp: &mut Vec<f32>,
    );
}

/// Dense weights in their storage dtype.
pub(crate) struct Dense<'a, W>(pub(crate) &'a [W]);

impl<W: WeightElem> PackB for Dense<'_, W> {
    fn pack_b(
        &self,
        isa: Isa,
        k: usize,
        n0: usize,
        n1: usize,
        pc: usize,
        kcc: usize,
        bp: &mut [f32],
        tmp: &mut Vec<f32>,
    ) {
        pack_b(isa, self.0, k, n0, n1, pc, kcc, bp, tmp);
    }
}

/// f32 rows with a stride: element `(j, i)` (output feature `j`, input `i`) at `w[j*ld + i]`.
pub(crate) struct RowsLd<'a> {
    pub(crate) w: &'a [f32],
    pub(crate) ld: usize,
}

impl PackB for RowsLd<'_> {
    fn pack_b(
        &self,
        isa: Isa,
        _k: usize,
        n0: usize,
        n1: usize,
        pc: usize,
        kcc: usize,
        bp: &mut [f32],
        tmp: &mut Vec<f32>,
    ) {
        pack_b(isa, self.w, self.ld, n0, n1, pc, kcc, bp, tmp);
    }
}

/// f32 K-major matrix: element `(j, i)` (output feature `j`, input `i`) at `w[i*ld + j]`,
/// i.e. `y = x · w` for a row-major `w` `[k, n]` (attention's `P · V`).
pub(crate) struct KMajor<'a> {
    pub(crate) w: &'a [f32],
    pub(crate) ld: usize,
}

impl PackB for KMajor<'_> {
    fn pack_b(
        &self,
        _isa: Isa,
        _k: usize,
        n0: usize,
        n1: usize,
        pc: usize,
        kcc: usize,
        bp: &mut [f32],
        _tmp: &mut Vec<f32>,
    ) {
        let nsl = div_ceil(n1 - n0, NR);
        for (s, dst) in bp[..nsl * NR * kcc].chunks_exact_mut(NR * kcc).enumerate() {
            let j0 = n0 + s * NR;
            let nr = NR.min(n1 - j0);
            for (kk, d) in dst.chunks_exact_mut(NR).enumerate() {
                let src = &self.w[(pc + kk) * self.ld + j0..(pc + kk) * self.ld + j0 + nr];
                d[..nr].copy_from_slice(src);
                d[nr..].fill(0.0);
            }
        }
    }
}

/// Transposes 16 row-major f32 rows (`src[j*kcc + kk]`, `j < 16`) into one 16-wide sliver
/// `dst[kk*16 + j]` (used after dequantizing a sliver's rows).
pub(crate) fn transpose_sliver(isa: Isa, src: &[f32], kcc: usize, dst: &mut [f32]) {
    assert!(src.len() >= NR * kcc && dst.len() >= NR * kcc);
    #[cfg(target_arch = "x86_64")]
    if isa.has_avx2() {
        // SAFETY: `Isa::Avx2Fma` / `Avx512` imply the CPU features; 16 rows of `kcc` floats with
        // stride `kcc` are readable from `src` and `dst` holds `16 * kcc` (asserted above).
        unsafe { crate::x86::pack_b_sliver(src.as_ptr(), kcc, kcc, dst.as_mut_ptr()) };
        return;
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    for (j, row) in src[..NR * kcc].chunks_exact(kcc).enumerate() {
        for (kk, v) in row.iter().enumerate() {
            dst[kk * NR + j] = *v;
        }
    }
}

/// Runs the micro-kernel for one 6×16 tile.
///
/// # Safety
/// `c` must be valid for 6 rows × 16 floats with stride `ldc`, written by no
/// other thread; `a`/`b` hold `kc*6` / `kc*16` floats; `bias` has ≥ 16.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn tile(
    isa: Isa,
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    init: bool,
    bias: Option<&[f32]>,
) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::Avx2Fma` / `Avx512` imply detected features; extents as per
        // this function's contract (checked in debug builds).
        Isa::Avx2Fma | Isa::Avx512 => {
            debug_assert!(a.len() >= kc * MR && b.len() >= kc * NR);
            crate::x86::kernel_6x16(
                kc,
                a.as_ptr(),
                b.as_ptr(),
                c,
                ldc,
                init,
                bias.map_or(core::ptr::null(), |b| b[..16].as_ptr()),
            )
        }
        // SAFETY: forwarded contract.
        _ => crate::portable::kernel_6x16(kc, a, b, c, ldc, init, bias),
    }
}

/// One task: output rows `m0..m1`, output features `n0..n1`.
#[allow(clippy::too_many_arguments)]
fn task<B: PackB>(
    isa: Isa,
    apk: &[f32],
    m_pad: usize,
    m0: usize,
    m1: usize,
    w: &B,
    n: usize,
    n0: usize,
    n1: usize,
    k: usize,
    kc: usize,
    bias: Option<&[f32]>,
    y: SyncPtr,
) {
    let nb = n1 - n0;
    let nsl = div_ceil(nb, NR);
    with_scratch(|s| {
        let bp = aligned(&mut s.b, nsl * NR * kc);
        let mut pc = 0;
        while pc < k {
            let kcc = kc.min(k - pc);
            let init = pc == 0;
            w.pack_b(isa, k, n0, n1, pc, kcc, bp, &mut s.t);
            let mut ic = m0;
            while ic < m1 {
                let mc = MC.min(m1 - ic);
                let msl = div_ceil(mc, MR);
                // This row block's slivers of the packed x (`ic` is a multiple of MR).
                let ap = &apk[pc * m_pad + ic * kcc..pc * m_pad + (ic + msl * MR) * kcc];
                // One 6×16 tile (edge tiles through a local buffer).
                let tile16 = |js: usize, is: usize| {
                    let bsl = &bp[js * NR * kcc..(js + 1) * NR * kcc];
                    let col = n0 + js * NR;
                    let nr = NR.min(n1 - col);
                    let mut bias_pad = [0.0f32; NR];
                    let bias_t: Option<&[f32]> = match bias {
                        Some(b) if nr == NR => Some(&b[col..col + NR]),
                        Some(b) => {
                            bias_pad[..nr].copy_from_slice(&b[col..col + nr]);
                            Some(&bias_pad)
                        }
                        None => None,
                    };
                    let asl = &ap[is * MR * kcc..(is + 1) * MR * kcc];
                    let row = ic + is * MR;
                    let mr = MR.min(ic + mc - row);
                    if mr == MR && nr == NR {
                        // SAFETY: rows `row..row+6` < m1 <= m and columns
                        // `col..col+16` <= n1 <= n lie inside the live
                        // `m * n` output; this task is the only writer
                        // of rows m0..m1 × columns n0..n1.
                        unsafe {
                            tile(isa, kcc, asl, bsl, y.0.add(row * n + col), n, init, bias_t)
                        };
                    } else {
                        // Edge tile: compute in a local 6×16 buffer and
                        // copy the valid `mr × nr` part in/out.
                        let mut buf = [0.0f32; MR * NR];
                        for i in 0..mr {
                            for j in 0..nr {
                                // SAFETY: (row+i, col+j) is inside this
                                // task's exclusive output block.
                                if !init {
                                    buf[i * NR + j] = unsafe { *y.0.add((row + i) * n + col + j) };
                                }
                            }
                        }
                        // SAFETY: `buf` is a local 6×16 tile, ldc = 16.
                        unsafe { tile(isa, kcc, asl, bsl, buf.as_mut_ptr(), NR, init, bias_t) };
                        for i in 0..mr {
                            for j in 0..nr {
                                // SAFETY: as above.
                                unsafe { *y.0.add((row + i) * n + col + j) = buf[i * NR + j] };
                            }
                        }
                    }
                };
                let mut js = 0;
                while js < nsl {
                    #[cfg(target_arch = "x86_64")]
                    if isa == Isa::Avx512 && n0 + (js + 2) * NR <= n1 {
                        // Two full W slivers: 12×32 / 6×32 zmm tiles; rows
                        // left over (< 6) as 6×16 edge tiles.
                        let col = n0 + js * NR;
                        let bsl = &bp[js * NR * kcc..(js + 2) * NR * kcc];
                        let bias_t =
                            bias.map_or(core::ptr::null(), |b| b[col..col + 2 * NR].as_ptr());
                        let mut is = 0;
                        while is < msl {
                            let row = ic + is * MR;
                            let left = ic + mc - row;
                            let ma = if left >= 2 * MR { 2 } else { 1 };
                            if left < MR {
                                tile16(js, is);
                                tile16(js + 1, is);
                            } else {
                                let asl = &ap[is * MR * kcc..(is + ma) * MR * kcc];
                                let c = y.0.wrapping_add(row * n + col);
                                // SAFETY: `Isa::Avx512` implies AVX-512F was
                                // detected; `asl` holds `ma` 6-row slivers and
                                // `bsl` two 16-wide slivers of depth `kcc`;
                                // rows `row..row+6·ma` <= m1 and columns
                                // `col..col+32` <= n1 lie inside the live
                                // `m * n` output, which only this task writes
                                // there; `bias_t` is null or has 32 floats.
                                unsafe {
                                    if ma == 2 {
                                        crate::x86::kernel_avx512::<2>(
                                            kcc,
                                            asl.as_ptr(),
                                            bsl.as_ptr(),
                                            c,
                                            n,
                                            init,
                                            bias_t,
                                        )
                                    } else {
                                        crate::x86::kernel_avx512::<1>(
                                            kcc,
                                            asl.as_ptr(),
                                            bsl.as_ptr(),
                                            c,
                                            n,
                                            init,
                                            bias_t,
                                        )
                                    }
                                };
                            }
                            is += ma;
                        }
                        js += 2;
                        continue;
                    }
                    for is in 0..msl {
                        tile16(js, is);
                    }
                    js += 1;
                }
                ic += mc;
            }
            pc += kcc;
        }
    });
}

/// `y[m, n] = x[m, k] · w[n, k]ᵀ (+ bias)`; arguments already validated,
/// `k > 0`. Contiguous x and y.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<B: PackB>(
    isa: Isa,
    x: &[f32],
    m: usize,
    w: &B,
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    gemm_ld(isa, x, k, m, w, n, k, bias, y, n);
}

/// [`gemm`] with row strides: row `r` of x at `x[r*lda..]`, of y at `y[r*ldy..]` (only the
/// first `n` columns of each y row are written). `k > 0`, `lda >= k`, `ldy >= n`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_ld<B: PackB>(
    isa: Isa,
    x: &[f32],
    lda: usize,
    m: usize,
    w: &B,
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    y: &mut [f32],
    ldy: usize,
) {
    debug_assert!(k > 0 && lda >= k && ldy >= n);
    assert!(m == 0 || ((m - 1) * lda + k <= x.len() && (m - 1) * ldy + n <= y.len()));
    if m > PACK_ROWS_MAX {
        // Bound the packed copy of x (≤ PACK_ROWS_MAX · k floats per thread, kept for reuse).
        let mut r = 0;
        while r < m {
            let len = PACK_ROWS_MAX.min(m - r);
            gemm_ld(
                isa,
                &x[r * lda..],
                lda,
                len,
                w,
                n,
                k,
                bias,
                &mut y[r * ldy..],
                ldy,
            );
            r += len;
        }
        return;
    }
    let yp = SyncPtr(y.as_mut_ptr());
    let kc_max = if isa == Isa::Avx512 {
        KC_MAX_512
    } else {
        KC_MAX
    };
    let kc = div_ceil(k, div_ceil(k, kc_max));
    let threads = rayon::current_num_threads().max(1);
    let serial = threads == 1 || m.saturating_mul(n).saturating_mul(k) < PAR_MIN_MACS;

    // Panels of ~NC_TARGET columns; their count rounded up to a multiple of
    // the thread count so equal-sized tasks balance.
    let mut npan = div_ceil(n, NC_TARGET);
    if !serial && npan > 1 {
        npan = round_up(npan, threads);
    }
    let nc = round_up(div_ceil(n, npan), NR).min(NC_MAX);
    let npan = div_ceil(n, nc);
    // Too few panels to keep every thread busy: also split the rows.
    let msplit = if serial || npan >= 2 * threads || npan.is_multiple_of(threads) {
        1
    } else {
        div_ceil(2 * threads, npan).min(div_ceil(m, MR))
    };
    // Large m: bound the rows per task so its output block and rows of x
    // stay cache-resident across the K blocks (9477 × 1152 → 4304, one
    // thread: 97 → 114 GFLOP/s).
    let mchunk = round_up(div_ceil(m, msplit), MR).min(MCHUNK_MAX);
    let msplit = div_ceil(m, mchunk);
    let m_pad = round_up(m, MR);

    with_call_scratch(|buf| {
        // x packed once for every panel (it used to be re-packed per panel: 9 % of vision).
        let apk = aligned(buf, m_pad * k);
        pack_a_all(x, lda, m, k, kc, apk, !serial);
        let apk = &*apk;
        // Row-chunk-major task order: consecutive tasks (which rayon hands to the
        // same thread) share their rows of x, and sweep all weight panels.
        let run = |t: usize| {
            let (s, p) = (t / npan, t % npan);
            let (n0, n1) = (p * nc, ((p + 1) * nc).min(n));
            let (m0, m1) = (s * mchunk, ((s + 1) * mchunk).min(m));
            task(isa, apk, m_pad, m0, m1, w, ldy, n0, n1, k, kc, bias, yp);
        };
        if serial {
            (0..npan * msplit).for_each(run);
        } else {
            (0..npan * msplit).into_par_iter().for_each(run);
        }
    });
}
