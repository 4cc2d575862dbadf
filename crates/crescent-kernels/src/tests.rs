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
    [Isa::Portable, Isa::Avx2Fma, Isa::Avx512]
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
fn gemm_wide_tile_edges() {
    // AVX-512 GEMM: 12×32 / 6×32 tiles, leftover rows (< 6) and a ragged or
    // lone 16-wide sliver, with one and two K blocks (KC 256).
    let mut seed = 100;
    for rows in [6, 11, 12, 13, 18, 23, 25, 30] {
        for n in [16, 31, 32, 48, 65, 112] {
            for k in [5, 64, 300] {
                seed += 1;
                check::<bf16>(rows, n, k, seed % 2 == 0, seed);
                check::<f32>(rows, n, k, seed % 2 == 1, seed);
            }
        }
    }
}

#[test]
fn isa_levels() {
    assert!(Isa::Portable.is_supported());
    if Isa::Avx512.is_supported() {
        assert!(Isa::Avx2Fma.is_supported());
    }
    let d = Isa::detect();
    assert!(d.is_supported());
    if std::env::var_os("CRESCENT_KERNELS_ISA").is_none() {
        let best = [Isa::Avx512, Isa::Avx2Fma, Isa::Portable]
            .into_iter()
            .find(|i| i.is_supported());
        assert_eq!(Some(d), best);
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

/// f64 reference of `x · ŵᵀ (+ b)` for dequantized weights `wd` `[n, k]`: (value, Σ|x·w| (+|b|)).
fn reference_f64(
    x: &[f32],
    rows: usize,
    wd: &[f64],
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
) -> (Vec<f64>, Vec<f64>) {
    let mut reference = vec![0.0f64; rows * n];
    let mut scale = vec![0.0f64; rows * n];
    for r in 0..rows {
        for o in 0..n {
            let (mut s, mut a) = (0.0f64, 0.0f64);
            for i in 0..k {
                let p = x[r * k + i] as f64 * wd[o * k + i];
                s += p;
                a += p.abs();
            }
            if let Some(b) = bias {
                s += b[o] as f64;
                a += (b[o] as f64).abs();
            }
            reference[r * n + o] = s;
            scale[r * n + o] = a;
        }
    }
    (reference, scale)
}

fn assert_close(what: &str, y: &[f32], reference: &[f64], scale: &[f64], n: usize) {
    for (i, (&got, &want)) in y.iter().zip(reference).enumerate() {
        let err = (got as f64 - want).abs();
        assert!(
            err <= 1e-5 * scale[i] + 1e-30,
            "{what}: y[{}, {}] = {got}, want {want} (err {err:e}, scale {:e})",
            i / n,
            i % n,
            scale[i]
        );
    }
}

/// int8 kernels (every ISA and path) against the f64 reference of the dequantized weights.
fn check_q8(rows: usize, n: usize, k: usize, with_bias: bool, seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let x = rng.vec(rows * k);
    let w = rng.vec(n * k);
    let bias = with_bias.then(|| rng.vec(n));
    let (q, s) = quantize_q8(&w, n, k);
    let wd: Vec<f64> = (0..n * k)
        .map(|i| q[i] as f64 * s[i / k.max(1)] as f64)
        .collect();
    let (reference, scale) = reference_f64(&x, rows, &wd, n, k, bias.as_deref());
    for isa in isas() {
        for path in [Path::Gemv, Path::Gemm, Path::Auto] {
            let mut y = vec![f32::NAN; rows * n];
            matmul_q8_forced(isa, path, &x, rows, &q, &s, n, k, bias.as_deref(), &mut y);
            let what = format!("q8 {isa:?} {path:?} rows={rows} n={n} k={k} bias={with_bias}");
            assert_close(&what, &y, &reference, &scale, n);
        }
    }
}

/// int4 kernels (every ISA and path) against the f64 reference of the dequantized weights.
fn check_q4(rows: usize, n: usize, k: usize, group: usize, with_bias: bool, seed: u64) {
    VNNI_CHECKED
        .with(|vnni_checked| check_q4_inner(rows, n, k, group, with_bias, seed, vnni_checked))
}

fn check_q4_inner(
    rows: usize,
    n: usize,
    k: usize,
    group: usize,
    with_bias: bool,
    seed: u64,
    vnni_checked: &std::cell::Cell<usize>,
) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let x = rng.vec(rows * k);
    let w = rng.vec(n * k);
    let bias = with_bias.then(|| rng.vec(n));
    let (q, s) = quantize_q4(&w, n, k, group);
    let gpr = k / group;
    let wd: Vec<f64> = (0..n * k)
        .map(|i| {
            let (o, c) = (i / k, i % k);
            let b = q[o * k / 2 + c / 2];
            let v = if c % 2 == 0 { b & 15 } else { b >> 4 } as i32 - 8;
            v as f64 * f64::from(s[o * gpr + c / group])
        })
        .collect();
    let (reference, scale) = reference_f64(&x, rows, &wd, n, k, bias.as_deref());
    for isa in isas() {
        for path in [Path::Gemv, Path::Gemm, Path::Auto] {
            let mut y = vec![f32::NAN; rows * n];
            matmul_q4_forced(
                isa,
                path,
                &x,
                rows,
                &q,
                &s,
                group,
                n,
                k,
                bias.as_deref(),
                &mut y,
            );
            let what =
                format!("q4 {isa:?} {path:?} rows={rows} n={n} k={k} g={group} bias={with_bias}");
            if path != Path::Gemm && crate::quant::q4_uses_vnni(isa, rows, group, k) {
                // int8 activations: each x rounds by at most max|x in its group| / 254.
                let amax: Vec<f64> = x
                    .chunks(group)
                    .map(|g| g.iter().fold(0f64, |m, v| m.max(v.abs() as f64)))
                    .collect();
                let gpr = k / group;
                for r in 0..rows {
                    for o in 0..n {
                        let bound: f64 = (0..k)
                            .map(|i| wd[o * k + i].abs() * amax[r * gpr + i / group] / 254.0)
                            .sum::<f64>()
                            + 1e-5 * scale[r * n + o];
                        let err = (y[r * n + o] as f64 - reference[r * n + o]).abs();
                        assert!(
                            err <= bound,
                            "{what} (vnni): y[{r}, {o}] err {err:e} > {bound:e}"
                        );
                    }
                }
                vnni_checked.set(vnni_checked.get() + 1);
                continue;
            }
            assert_close(&what, &y, &reference, &scale, n);
        }
    }
}

thread_local! {
    /// Calls of `check_q4` that exercised the VNNI kernel (so a test can tell it ran).
    static VNNI_CHECKED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

#[test]
fn q8_small_shapes() {
    let mut seed = 100;
    for rows in [1, 2, 3, 5, 17, 100] {
        for n in [1, 7, 33] {
            for k in [1, 7, 16, 33, 64, 129, 400] {
                seed += 1;
                check_q8(rows, n, k, seed % 2 == 0, seed);
            }
        }
    }
}

#[test]
fn q4_small_shapes() {
    let mut seed = 200;
    for rows in [1, 2, 3, 5, 17, 100] {
        for n in [1, 7, 33] {
            // (k, group): SIMD groups (multiples of 32) and portable ones, incl. a K block of
            // odd length in the GEMM (k = 390 → kc = 195) and groups straddling it.
            for (k, g) in [
                (2, 2),
                (34, 2),
                (32, 32),
                (96, 32),
                (416, 32),
                (192, 32),
                (128, 64),
                (390, 2),
                (390, 26),
                (48, 8),
            ] {
                seed += 1;
                check_q4(rows, n, k, g, seed % 2 == 0, seed);
            }
        }
    }
}

/// The int8-activation VNNI int4 kernel (decode shapes), within its stated error bound; it must
/// actually run where the CPU has AVX-512 VNNI.
#[test]
fn q4_vnni_decode_shapes() {
    let before = VNNI_CHECKED.with(|c| c.get());
    for (i, &(n, k)) in [(5, 64), (33, 192), (64, 2048), (300, 1024), (17, 8192)]
        .iter()
        .enumerate()
    {
        check_q4(1, n, k, 32, i % 2 == 0, 900 + i as u64);
    }
    // Non-finite activations propagate (NaN, ±∞ → NaN or ±∞), as in the f32 kernels.
    for bad in [f32::NAN, f32::INFINITY] {
        let (n, k) = (9, 128);
        let mut x = vec![0.5f32; k];
        x[70] = bad;
        let w: Vec<f32> = (0..n * k).map(|i| ((i % 13) as f32 - 6.0) / 7.0).collect();
        let (q, s) = quantize_q4(&w, n, k, 32);
        let mut y = vec![0f32; n];
        matmul_q4_forced(
            Isa::detect(),
            Path::Auto,
            &x,
            1,
            &q,
            &s,
            32,
            n,
            k,
            None,
            &mut y,
        );
        assert!(y.iter().all(|v| !v.is_finite()), "{bad}: {y:?}");
    }
    let ran = VNNI_CHECKED.with(|c| c.get()) - before;
    if crate::quant::q4_uses_vnni(Isa::Avx512, 1, 32, 64) {
        // Two of the three paths (Gemv, Auto) per shape.
        assert_eq!(ran, 10, "the VNNI kernel did not run");
    } else {
        assert_eq!(ran, 0);
    }
}

/// The VNNI int4 kernel over several rows of x (batched decode: passes of up to 4 rows, a
/// weight row reused from cache between passes), within its bound; a NaN in one row of x
/// stays in that row's outputs.
#[test]
fn q4_vnni_batched_decode() {
    let before = VNNI_CHECKED.with(|c| c.get());
    let mut seed = 950;
    for rows in [2, 3, 4, 5, 9, 16] {
        for (n, k) in [(40, 2048), (17, 1024), (9, 8192), (12, 192)] {
            seed += 1;
            check_q4(rows, n, k, 32, seed % 2 == 0, seed);
        }
    }
    let ran = VNNI_CHECKED.with(|c| c.get()) - before;
    if crate::quant::q4_uses_vnni(Isa::Avx512, 2, 32, 64) {
        assert!(ran >= 24, "the VNNI kernel ran {ran} times");
    }
    let (rows, n, k) = (5, 11, 256);
    let mut x: Vec<f32> = (0..rows * k)
        .map(|i| ((i % 17) as f32 - 8.0) / 9.0)
        .collect();
    x[2 * k + 100] = f32::NAN;
    let w: Vec<f32> = (0..n * k).map(|i| ((i % 13) as f32 - 6.0) / 7.0).collect();
    let (q, s) = quantize_q4(&w, n, k, 32);
    let mut y = vec![0f32; rows * n];
    matmul_q4_forced(
        Isa::detect(),
        Path::Gemv,
        &x,
        rows,
        &q,
        &s,
        32,
        n,
        k,
        None,
        &mut y,
    );
    for r in 0..rows {
        let row = &y[r * n..(r + 1) * n];
        if r == 2 {
            assert!(row.iter().all(|v| v.is_nan()), "{row:?}");
        } else {
            assert!(row.iter().all(|v| v.is_finite()), "row {r}: {row:?}");
        }
    }
}

#[test]
fn quantized_parallel_shapes() {
    check_q8(1, 1001, 300, true, 21);
    check_q8(4, 1001, 300, false, 22);
    check_q8(37, 600, 800, true, 23);
    check_q8(200, 40, 130, false, 24);
    check_q4(1, 1001, 320, 32, true, 25);
    check_q4(4, 1001, 320, 64, false, 26);
    check_q4(37, 600, 800, 32, true, 27);
    check_q4(1000, 40, 64, 32, false, 28);
    for rows in 1..=GEMV_MAX_ROWS + 1 {
        check_q8(rows, 13, 48, rows % 2 == 0, 300 + rows as u64);
        check_q4(rows, 13, 64, 32, rows % 2 == 1, 400 + rows as u64);
    }
}

#[test]
fn q8_round_trip_bounds() {
    let mut rng = Rng(7);
    let (n, k) = (9, 301);
    let mut w = rng.vec(n * k);
    w[..k].fill(0.0); // an all-zero row
    for v in &mut w[2 * k..3 * k] {
        *v *= 1e-30; // tiny magnitudes
    }
    w[3 * k + 5] = 1e6; // one outlier
    let wb: Vec<bf16> = w.iter().map(|v| bf16::from_f32(*v)).collect();
    let (q, s) = quantize_q8(&wb, n, k);
    assert_eq!(s[0], 0.0);
    assert!(q[..k].iter().all(|v| *v == 0));
    let mut row = vec![0.0; k];
    for o in 0..n {
        let amax = wb[o * k..(o + 1) * k]
            .iter()
            .fold(0.0f32, |m, v| m.max(v.to_f32().abs()));
        assert_eq!(s[o], amax / 127.0, "row {o} scale");
        dequantize_q8_row(&q[o * k..(o + 1) * k], s[o], &mut row);
        for i in 0..k {
            let err = (wb[o * k + i].to_f32() - row[i]).abs();
            assert!(
                err <= s[o] * (0.5 + 1e-5),
                "row {o} col {i}: err {err:e} > scale/2 ({:e})",
                s[o] / 2.0
            );
            assert!(q[o * k + i] >= -127);
        }
        if amax > 0.0 {
            assert!(q[o * k..(o + 1) * k].iter().any(|v| v.abs() == 127));
        }
    }
}

#[test]
fn q4_round_trip_bounds_and_layout() {
    // Layout: low nibble = even column, value + 8; the largest magnitude maps to -8.
    // Group 1: m = -4 → scale 0.5; 0.25/0.5 = 0.5 ties to even (0); 3.9/0.5 = 7.8 clamps
    // to 7. Group 2: m = 4 → scale -0.5. Group 3: zeros → scale 0, nibbles 8.
    let w = [
        1.0f32, -4.0, 0.25, 3.9, 1.0, -2.0, 0.75, 4.0, 0.0, 0.0, 0.0, 0.0,
    ];
    let (q, s) = quantize_q4(&w, 1, 12, 4);
    assert_eq!(s, [0.5, -0.5, 0.0].map(f16::from_f32).to_vec());
    let nib = |lo: i32, hi: i32| ((lo + 8) | ((hi + 8) << 4)) as u8;
    assert_eq!(
        q,
        vec![nib(2, -8), nib(0, 7), nib(-2, 4), nib(-2, -8), 0x88, 0x88]
    );
    let mut d = [0.0; 12];
    dequantize_q4_row(&q, &s, 4, &mut d);
    assert_eq!(
        d,
        [1.0, -4.0, 0.0, 3.5, 1.0, -2.0, 1.0, 4.0, 0.0, 0.0, 0.0, 0.0]
    );

    let mut rng = Rng(9);
    let (n, k, g) = (7, 320, 32);
    let mut w = rng.vec(n * k);
    w[..g].fill(0.0);
    w[5 * k + 40] = -3e4;
    let (q, s) = quantize_q4(&w, n, k, g);
    let mut row = vec![0.0; k];
    let gpr = k / g;
    for o in 0..n {
        dequantize_q4_row(
            &q[o * k / 2..(o + 1) * k / 2],
            &s[o * gpr..(o + 1) * gpr],
            g,
            &mut row,
        );
        for i in 0..k {
            let sc = s[o * gpr + i / g].to_f32().abs();
            let amax = w[o * k + (i / g) * g..o * k + (i / g + 1) * g]
                .iter()
                .fold(0.0f32, |m, v| m.max(v.abs()));
            // The f16 scale: not below max|w| / 8, within one f16 step above it.
            let exact = amax / 8.0;
            if amax > 0.0 {
                assert!(
                    sc >= exact && sc <= exact * (1.0 + 2f32.powi(-10)),
                    "{sc} vs {exact}"
                );
            }
            let err = (w[o * k + i] - row[i]).abs();
            // ≤ scale/2 unless clamped at +7 (then ≤ scale).
            let v = w[o * k + i] / s[o * gpr + i / g].to_f32();
            let bound = if v > 7.5 { sc } else { sc * 0.5 } * (1.0 + 1e-5);
            assert!(err <= bound, "row {o} col {i}: err {err:e} > {bound:e}");
        }
    }
    assert_eq!(s[0], f16::ZERO);
    assert!(q[..g / 2].iter().all(|b| *b == 0x88));
}

#[test]
fn quantize_non_finite_gives_nan_scale() {
    let w = [1.0f32, f32::NAN, 2.0, 3.0, f32::INFINITY, 0.0, 1.0, 1.0];
    let (_, s8) = quantize_q8(&w, 2, 4);
    assert!(s8[0].is_nan() && s8[1].is_nan());
    let (_, s4) = quantize_q4(&w, 1, 8, 2);
    assert!(s4[0].is_nan() && s4[1].is_finite() && s4[2].is_nan() && s4[3].is_finite());
    // f16 scales: beyond f16's range → infinite (callers reject it); far below its normal
    // range → a subnormal scale that still covers the group (never 0), within the usual bound.
    let w = [1e6f32, 2.0, 3e-9, -1e-9, 4e-6, 1e-6];
    let (q, s4) = quantize_q4(&w, 1, 6, 2);
    assert!(s4[0].is_infinite());
    let mut d = [0f32; 6];
    dequantize_q4_row(&q, &s4, 2, &mut d);
    for g in 1..3 {
        let sc = s4[g].to_f32().abs();
        let amax = w[2 * g].abs().max(w[2 * g + 1].abs());
        assert!(
            sc >= amax / 8.0 && sc > 0.0,
            "group {g}: scale {sc} for max {amax}"
        );
        for i in 2 * g..2 * g + 2 {
            assert!(
                (w[i] - d[i]).abs() <= sc * 0.5 * (1.0 + 1e-5),
                "{i}: {} vs {}",
                w[i],
                d[i]
            );
        }
    }
}

#[test]
#[should_panic(expected = "not a multiple of group")]
fn q4_bad_group_panics() {
    quantize_q4(&[0.0f32; 10], 1, 10, 4);
}

#[test]
#[should_panic(expected = "scales has 1 elements")]
fn q8_bad_scales_panics() {
    let mut y = vec![0.0; 2];
    matmul_q8(&[0.0; 3], 1, &[0; 6], &[1.0], 2, 3, None, &mut y);
}

#[test]
fn quantized_degenerate_dims() {
    let mut y = vec![f32::NAN; 6];
    matmul_q8(&[], 2, &[], &[1.0; 3], 3, 0, Some(&[1.0, 2.0, 3.0]), &mut y);
    assert_eq!(y, [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    matmul_q4(&[], 2, &[], &[], 32, 3, 0, None, &mut y);
    assert_eq!(y, [0.0; 6]);
}

#[test]
fn strided_gemm_matches_naive() {
    // Attention-shaped views: heads of a [t, 3·w] qkv buffer, output into one head's columns.
    let (t, heads, hd) = (37, 3, 20);
    let w = heads * hd;
    let qkv: Vec<f32> = (0..t * 3 * w)
        .map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0)
        .collect();
    for h in 0..heads {
        let q = &qkv[h * hd..];
        let k = &qkv[w + h * hd..];
        let mut scores = vec![0f32; t * t];
        crate::matmul_f32_strided(
            q,
            3 * w,
            t,
            crate::Rhs::Rows { w: k, ld: 3 * w },
            t,
            hd,
            &mut scores,
            t,
        );
        for i in 0..t {
            for j in 0..t {
                let want: f64 = (0..hd)
                    .map(|d| {
                        qkv[i * 3 * w + h * hd + d] as f64 * qkv[j * 3 * w + w + h * hd + d] as f64
                    })
                    .sum();
                assert!((scores[i * t + j] as f64 - want).abs() < 1e-4);
            }
        }
        let v = &qkv[2 * w + h * hd..];
        let mut out = vec![7f32; t * w];
        crate::matmul_f32_strided(
            &scores,
            t,
            t,
            crate::Rhs::Cols { w: v, ld: 3 * w },
            hd,
            t,
            &mut out[h * hd..],
            w,
        );
        for i in 0..t {
            for d in 0..hd {
                let want: f64 = (0..t)
                    .map(|j| scores[i * t + j] as f64 * qkv[j * 3 * w + 2 * w + h * hd + d] as f64)
                    .sum();
                assert!(
                    (out[i * w + h * hd + d] as f64 - want).abs() < 1e-3,
                    "{} vs {want}",
                    out[i * w + h * hd + d]
                );
            }
            // Columns of other heads untouched.
            for c in (0..w).filter(|c| *c < h * hd || *c >= (h + 1) * hd) {
                assert_eq!(out[i * w + c], 7.0);
            }
        }
    }
}

/// `prefetch_slice` is a hint: any length (empty, shorter than a line, ending mid-line) is
/// accepted and the data is left as it was.
#[test]
fn prefetch_slice_any_length_leaves_data() {
    let v: Vec<u16> = (0..1000u16).collect();
    for (a, b) in [(0, 0), (3, 4), (1, 999), (0, 1000)] {
        crate::prefetch_slice(&v[a..b]);
    }
    crate::prefetch_slice::<f32>(&[]);
    assert!(v.iter().enumerate().all(|(i, &x)| x as usize == i));
}
