//! Small shared helpers: raw output pointer shared across rayon tasks and
//! per-thread scratch buffers.

use std::cell::RefCell;

/// A raw pointer to the output matrix that rayon tasks may share.
///
/// Every task writes a disjoint set of output elements (disjoint output
/// columns and/or disjoint row ranges), so no two threads ever touch the same
/// element; the pointer is only used while the `&mut [f32]` it came from is
/// borrowed by the calling function.
#[derive(Clone, Copy)]
pub(crate) struct SyncPtr(pub(crate) *mut f32);

impl SyncPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw pointer).
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: see the type's doc — tasks write disjoint elements of a buffer that
// outlives the parallel section (the caller holds its `&mut` borrow).
unsafe impl Send for SyncPtr {}
// SAFETY: as above; sharing the pointer value itself is harmless.
unsafe impl Sync for SyncPtr {}

/// Per-thread reusable buffers (packed panels), so the hot path does not
/// allocate (a 300 KB `Vec` would be an mmap + page faults on every call).
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) b: Vec<f32>,
    pub(crate) t: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    static CALL_SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's call-level buffer (used by the calling thread
/// for data shared by all tasks of one call, e.g. the re-laid-out `x`). Kept
/// separate from [`with_scratch`] because the calling thread may also run
/// tasks of the same call. Falls back to a temporary buffer on re-entrancy.
pub(crate) fn with_call_scratch<R>(f: impl FnOnce(&mut Vec<f32>) -> R) -> R {
    CALL_SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Vec::new()),
    })
}

/// Runs `f` with this thread's scratch buffers. If they are already in use
/// (re-entrancy: a rayon worker that is waiting inside one of our parallel
/// sections may steal a task that calls into the kernels again), `f` gets a
/// fresh, temporary set instead of panicking.
pub(crate) fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(&mut s),
        Err(_) => f(&mut Scratch::default()),
    })
}

/// Grows `v` to at least `n` elements (contents unspecified) and returns the
/// first `n`.
pub(crate) fn ensure_len(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

pub(crate) fn div_ceil(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

pub(crate) fn round_up(a: usize, b: usize) -> usize {
    a.div_ceil(b) * b
}

/// Runs `f` on a thread of the rayon pool the kernels use (directly if already on one), so the
/// kernels' many parallel sections inside `f` fork and join among the pool's threads instead
/// of each one waking the pool from outside and putting the caller to sleep (a decode step has
/// ~50 of them; in a hot loop of small GEMVs this halves the time per call).
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// A vector of `n` copies of `fill` whose memory the kernel is asked to back with transparent
/// huge pages (2 MiB, `MADV_HUGEPAGE`, best effort, Linux only) before it is first touched.
/// For buffers that decode streams once per token (quantized weights, the KV pool): 4 KiB pages
/// cost a TLB walk per page and restart the hardware prefetcher at every page boundary.
pub fn huge_vec<T: Copy>(n: usize, fill: T) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    advise_huge(v.as_mut_ptr().cast(), n * std::mem::size_of::<T>());
    v.resize(n, fill);
    v
}

/// Asks the kernel to back the not-yet-touched pages of `v` with transparent huge pages, as
/// [`huge_vec`] does (for a zeroed allocation that should stay lazily backed).
pub fn advise_huge_pages<T>(v: &mut [T]) {
    advise_huge(v.as_mut_ptr().cast(), std::mem::size_of_val(v));
}

/// `madvise(MADV_HUGEPAGE)` on the whole 2 MiB-aligned part of `[p, p + len)`.
fn advise_huge(p: *mut u8, len: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = (p as usize).div_ceil(HUGE) * HUGE;
        let end = (p as usize + len) / HUGE * HUGE;
        if end > start {
            // SAFETY: the range lies inside an allocation we own; MADV_HUGEPAGE changes only
            // how the kernel backs it, never its contents. Failure is harmless (ignored).
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (p, len);
}

/// Bytes below which glibc's `malloc` serves a request from its heaps instead of a fresh
/// `mmap`, and the free space its heaps keep instead of returning it, as set by
/// [`tune_allocator`].
pub const ALLOCATOR_RETAIN_BYTES: usize = 32 << 20;

/// Tunes glibc's allocator for a process that runs the model (call once, at startup, before
/// other threads exist): buffers up to [`ALLOCATOR_RETAIN_BYTES`] come from malloc's heaps, and
/// the heaps keep up to that much free space. A prompt pass allocates and frees tens of
/// activation buffers of 1–32 MiB per layer; with glibc's defaults many of them are fresh
/// mappings, so every pass re-faults and re-zeroes their pages (on md3-medium's 735-token
/// prefill: page faults, zeroing and unmapping were 6 % of the profile, and prefill ran 15–17 %
/// slower). Costs up to that much extra resident memory per malloc arena. Does nothing where
/// the user set `MALLOC_MMAP_THRESHOLD_` or `MALLOC_TRIM_THRESHOLD_` (glibc's own knobs), and
/// off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_some()
            || std::env::var_os("MALLOC_TRIM_THRESHOLD_").is_some();
        if !user_set {
            let v = ALLOCATOR_RETAIN_BYTES as libc::c_int;
            // SAFETY: `mallopt` only changes allocator parameters; both values are in the
            // ranges glibc accepts (the mmap threshold's maximum is 32 MiB on 64-bit).
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, v);
                libc::mallopt(libc::M_TRIM_THRESHOLD, v);
            }
        }
    }
}

/// Asks the CPU to start loading every cache line of `s` into L1 (x86-64 `prefetcht0`; a no-op
/// elsewhere). For latency-bound walks over data the hardware prefetcher does not run ahead of,
/// such as a decode step's scattered KV-cache blocks.
#[inline]
pub fn prefetch_slice<T>(s: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = s.as_ptr().cast::<i8>();
        let bytes = std::mem::size_of_val(s);
        let mut o = 0;
        while o < bytes {
            // SAFETY: a prefetch never faults and `p + o` stays inside `s`.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.add(o)) };
            o += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = s;
}
