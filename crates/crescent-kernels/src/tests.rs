use super::*;
use rayon::prelude::*;

/// xorshift64* → uniform in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
        (v as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
}

trait FromF32: WeightElem {
    fn from_f32(v: f32) -> Self;
}
impl FromF32 for f32 {
    fn from_f32(v: f32) -> Self {
        v
    }
}
impl FromF32 for bf16 {
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}
impl FromF32 for f16 {
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

fn isas() -> Vec<Isa> {
    [Isa::Portable, Isa::Avx2Fma]
        .into_iter()
        .filter(|i| i.is_supported())
        .collect()
}

/// Checks every path/ISA against an f64 reference:
/// |y - ref| <= 1e-5 · Σ|x·w| (+ |bias| slack).
fn check<W: FromF32>(rows: usize, n: usize, k: usize, with_bias: bool, seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let x = rng.vec(rows * k);
    let w: Vec<W> = rng.vec(n * k).into_iter().map(W::from_f32).collect();
    let bias = with_bias.then(|| rng.vec(n));
    let mut reference = vec![0.0f64; rows * n];
    let mut scale = vec![0.0f64; rows * n];
    for r in 0..rows {
        for o in 0..n {
            let (mut s, mut a) = (0.0f64, 0.0f64);
            for i in 0..k {
                let p = x[r * k + i] as f64 * w[o * k + i].to_f32() as f64;
                s += p;
                a += p.abs();
            }
            if let Some(b) = &bias {
                s += b[o] as f64;
                a += (b[o] as f64).abs();
            }
            reference[r * n + o] = s;
            scale[r * n + o] = a;
        }
    }
    for isa in isas() {
        for path in [Path::Gemv, Path::Gemm, Path::Auto] {
            let mut y = vec![f32::NAN; rows * n];
            matmul_forced(isa, path, &x, rows, &w, n, k, bias.as_deref(), &mut y);
            for (i, (&got, &want)) in y.iter().zip(&reference).enumerate() {
                let err = (got as f64 - want).abs();
                assert!(
                    err <= 1e-5 * scale[i] + 1e-30,
                    "{} {isa:?} {path:?} rows={rows} n={n} k={k} bias={with_bias}: \
                     y[{}, {}] = {got}, want {want} (err {err:e}, scale {:e})",
                    W::NAME,
                    i / n,
                    i % n,
                    scale[i]
                );
            }
        }
    }
}

#[test]
fn small_shapes_all_dtypes() {
    let mut seed = 1;
    for rows in [1, 2, 3, 5, 17, 100] {
        for n in [1, 7, 33] {
            for k in [1, 7, 16, 33, 129, 400] {
                seed += 1;
                let bias = seed % 2 == 0;
                check::<bf16>(rows, n, k, bias, seed);
                check::<f32>(rows, n, k, !bias, seed);
                check::<f16>(rows, n, k, bias, seed);
            }
        }
    }
}

#[test]
fn every_gemv_row_count() {
    for rows in 1..=GEMV_MAX_ROWS + 1 {
        check::<bf16>(rows, 13, 48, rows % 2 == 0, rows as u64);
    }
}

#[test]
fn parallel_shapes() {
    // Several GEMM panels incl. a ragged one, several K blocks, row split.
    check::<bf16>(37, 600, 800, true, 11);
    check::<f32>(13, 1030, 300, false, 12);
    check::<f16>(200, 40, 130, true, 13);
    // More rows than one GEMM task takes (row chunks), serial and parallel.
    check::<f32>(800, 20, 24, true, 15);
    check::<bf16>(1000, 40, 40, false, 16);
    // Parallel GEMV chunks with a ragged last chunk.
    check::<bf16>(4, 1001, 300, false, 14);
}

#[test]
fn degenerate_dims() {
    let mut y = vec![f32::NAN; 6];
    matmul_bf16(&[], 2, &[], 3, 0, Some(&[1.0, 2.0, 3.0]), &mut y);
    assert_eq!(y, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    matmul_f32(&[], 2, &[], 3, 0, None, &mut y);
    assert_eq!(y, [0.0; 6]);
    let mut empty: [f32; 0] = [];
    matmul_bf16(&[], 0, &[bf16::ONE; 4], 2, 2, None, &mut empty);
    matmul_bf16(&[1.0; 4], 2, &[], 0, 2, None, &mut empty);
}

#[test]
fn nested_calls_from_rayon_tasks() {
    // Kernels called from inside rayon tasks (re-entrant scratch use).
    let (rows, n, k) = (20, 300, 200);
    let x: Vec<f32> = (0..rows * k).map(|i| (i % 7) as f32 - 3.0).collect();
    let w: Vec<bf16> = (0..n * k)
        .map(|i| bf16::from_f32((i % 5) as f32 - 2.0))
        .collect();
    let mut expect = vec![0.0; rows * n];
    matmul_bf16(&x, rows, &w, n, k, None, &mut expect);
    let outs: Vec<Vec<f32>> = (0..8)
        .into_par_iter()
        .map(|i| {
            let r = if i % 2 == 0 { rows } else { 3 };
            let mut y = vec![0.0; r * n];
            matmul_bf16(&x[..r * k], r, &w, n, k, None, &mut y);
            y
        })
        .collect();
    for (i, y) in outs.iter().enumerate() {
        assert_eq!(&y[..], &expect[..y.len()], "task {i}");
    }
}

#[test]
#[should_panic(expected = "w has 5 elements")]
fn bad_weight_len_panics() {
    let mut y = vec![0.0; 2];
    matmul_bf16(&[0.0; 3], 1, &[bf16::ZERO; 5], 2, 3, None, &mut y);
}

#[test]
#[should_panic(expected = "bias has 1 elements")]
fn bad_bias_len_panics() {
    let mut y = vec![0.0; 2];
    matmul_f32(&[0.0; 3], 1, &[0.0; 6], 2, 3, Some(&[0.0]), &mut y);
}

#[test]
fn deinterleave_layout() {
    let x: Vec<f32> = (0..2 * 19).map(|i| i as f32).collect();
    let mut d = vec![0.0; x.len()];
    gemv::deinterleave_x(&x, 19, &mut d);
    let row0: Vec<f32> = (0..8)
        .map(|i| 2.0 * i as f32)
        .chain((0..8).map(|i| 2.0 * i as f32 + 1.0))
        .chain([16.0, 17.0, 18.0])
        .collect();
    assert_eq!(&d[..19], &row0[..]);
    assert_eq!(d[19], 19.0);
    assert_eq!(d[20], 21.0);
}
