//! Weight element types the kernels accept (sealed: `f32`, `bf16`, `f16`).

use half::{bf16, f16};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::bf16 {}
    impl Sealed for half::f16 {}
}

/// Storage kind of a weight element; lets generic kernels pick the right
/// SIMD load at compile time (the `match` on an associated const folds away).
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightKind {
    F32,
    Bf16,
    F16,
}

/// A weight element type: `f32`, `half::bf16` or `half::f16`. Weights are
/// converted to f32 (exactly) before being multiplied; accumulation is f32.
pub trait WeightElem: sealed::Sealed + Copy + Send + Sync + 'static {
    /// Short name for reports ("f32", "bf16", "f16").
    const NAME: &'static str;
    #[doc(hidden)]
    const KIND: WeightKind;
    /// Exact conversion to f32.
    fn to_f32(self) -> f32;
    /// Converts `src` into `dst` (same length) element-wise.
    fn convert_slice(src: &[Self], dst: &mut [f32]);
}

impl WeightElem for f32 {
    const NAME: &'static str = "f32";
    const KIND: WeightKind = WeightKind::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn convert_slice(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl WeightElem for bf16 {
    const NAME: &'static str = "bf16";
    const KIND: WeightKind = WeightKind::Bf16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        // bf16 is the upper half of an f32: the conversion is a shift (exact,
        // NaN payloads preserved bit-for-bit).
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[inline]
    fn convert_slice(src: &[Self], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len(), "convert_slice: length mismatch");
        // Plain loop: LLVM vectorises it (zero-extend + shift).
        for (d, s) in dst.iter_mut().zip(src) {
            *d = f32::from_bits(u32::from(s.to_bits()) << 16);
        }
    }
}

impl WeightElem for f16 {
    const NAME: &'static str = "f16";
    const KIND: WeightKind = WeightKind::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline]
    fn convert_slice(src: &[Self], dst: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        // `half` uses F16C when the CPU has it (runtime-detected).
        src.convert_to_f32_slice(dst);
    }
}
