//! Preprocessing of every fixture image against `expected/preprocess_*.json` and the exact
//! crop PNGs in `expected/crops/`.

mod common;

use common::{load_png_rgb, read_fixture, read_json, sha256_hex};
use crescent_image::{
    decode, overlap_crops, pixel_lut, preprocess, CropConfig, Crops, DecodeLimits, RgbImage,
};

#[test]
fn helpers() {
    common::helpers_self_check();
}

fn preprocess_files() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(common::fixture_dir().join("expected"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            (name.starts_with("preprocess_") && name.ends_with(".json")).then_some(name)
        })
        .collect();
    v.sort();
    assert_eq!(v.len(), 7, "expected 7 preprocess fixtures, found {v:?}");
    v
}

fn pair(v: &serde_json::Value) -> (usize, usize) {
    (
        v[0].as_u64().unwrap() as usize,
        v[1].as_u64().unwrap() as usize,
    )
}

fn rel_close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1e-3)
}

/// Checks tiling, sizes, crop hash, crop PNGs and statistics of `crops` against fixture `exp`.
fn check_crops(name: &str, exp: &serde_json::Value, crops: &Crops) {
    let cfg = CropConfig::default();
    assert_eq!(crops.tiling, pair(&exp["tiling"]), "{name}: tiling");
    assert_eq!(
        crops.count,
        exp["n_crops"].as_u64().unwrap() as usize,
        "{name}: n_crops"
    );
    assert_eq!(
        cfg.resized_hw(crops.tiling),
        pair(&exp["resized_hw"]),
        "{name}: resized_hw"
    );
    assert_eq!(crops.size, 378);

    let files = exp["crops"].as_array().unwrap();
    assert_eq!(files.len(), crops.count);
    for (k, f) in files.iter().enumerate() {
        let (w, h, px) = load_png_rgb(f.as_str().unwrap());
        assert_eq!((w, h), (378, 378));
        let got = crops.crop(k).unwrap();
        if got != px.as_slice() {
            let diff = got.iter().zip(&px).filter(|(a, b)| a != b).count();
            let maxd = got
                .iter()
                .zip(&px)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            panic!("{name}: crop {k} differs in {diff} values (max |diff| {maxd})");
        }
    }
    assert_eq!(
        sha256_hex(&crops.data),
        exp["crops_uint8_sha256"].as_str().unwrap(),
        "{name}: crops_uint8_sha256"
    );

    // Statistics of the normalised values.
    let stats = &exp["stats"];
    let sum: u64 = crops.data.iter().map(|&v| u64::from(v)).sum();
    assert_eq!(
        sum,
        stats["uint8_sum"].as_u64().unwrap(),
        "{name}: uint8_sum"
    );
    let norm = crops.normalized_chw();
    assert_eq!(norm.len(), crops.count * 3 * 378 * 378);
    let n = norm.len() as f64;
    let mean = norm.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
    let var = norm
        .iter()
        .map(|&v| (f64::from(v) - mean).powi(2))
        .sum::<f64>()
        / (n - 1.0);
    let (mn, mx) = norm
        .iter()
        .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert!(
        rel_close(mean, stats["normalized_mean"].as_f64().unwrap(), 1e-9),
        "{name}: mean {mean} vs {}",
        stats["normalized_mean"]
    );
    assert!(
        rel_close(var.sqrt(), stats["normalized_std"].as_f64().unwrap(), 1e-9),
        "{name}: std {} vs {}",
        var.sqrt(),
        stats["normalized_std"]
    );
    assert_eq!(f64::from(mn), stats["normalized_min"].as_f64().unwrap());
    assert_eq!(f64::from(mx), stats["normalized_max"].as_f64().unwrap());
    let plane = 378 * 378;
    for (k, row) in stats["per_crop_channel_mean"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        for c in 0..3 {
            let s = &norm[(k * 3 + c) * plane..][..plane];
            let m = s.iter().map(|&v| f64::from(v)).sum::<f64>() / plane as f64;
            let want = row[c].as_f64().unwrap();
            assert!(
                rel_close(m, want, 1e-9),
                "{name}: crop {k} channel {c} mean {m} vs {want}"
            );
        }
    }
}

#[test]
fn preprocess_fixtures_end_to_end() {
    let cfg = CropConfig::default();
    let limits = DecodeLimits::default();
    let mut jpeg_decode_mismatch = Vec::new();
    for file in preprocess_files() {
        let exp = read_json(&format!("expected/{file}"));
        let image = exp["image"].as_str().unwrap();
        let bytes = read_fixture(image);
        let (img, crops) = preprocess(&bytes, &cfg, &limits).unwrap();
        assert_eq!(
            img.width,
            exp["width"].as_u64().unwrap() as usize,
            "{image}"
        );
        assert_eq!(
            img.height,
            exp["height"].as_u64().unwrap() as usize,
            "{image}"
        );
        assert_eq!(img.data.len(), img.width * img.height * 3);
        let decoded_ok = sha256_hex(&img.data) == exp["decoded_rgb_sha256"].as_str().unwrap();
        if image.ends_with(".png") {
            assert!(decoded_ok, "{image}: decoded_rgb_sha256 mismatch");
        } else if !decoded_ok {
            jpeg_decode_mismatch.push(image.to_string());
            continue;
        }
        check_crops(image, &exp, &crops);
    }
    assert!(
        jpeg_decode_mismatch.is_empty(),
        "JPEG decode differs from kestrel_native for {jpeg_decode_mismatch:?}"
    );
}

#[test]
fn jpeg_resize_from_lossless_decoded_copy() {
    // Independent of the JPEG decoder: start from the lossless copy of the decoded pixels.
    for file in preprocess_files() {
        let exp = read_json(&format!("expected/{file}"));
        let Some(png) = exp.get("decoded_rgb_png").and_then(|v| v.as_str()) else {
            continue;
        };
        let (w, h, px) = load_png_rgb(png);
        let img = RgbImage::new(w, h, px).unwrap();
        assert_eq!(
            sha256_hex(&img.data),
            exp["decoded_rgb_sha256"].as_str().unwrap(),
            "{png}"
        );
        let crops = overlap_crops(&img, &CropConfig::default());
        check_crops(png, &exp, &crops);
    }
}

#[test]
fn crops_from_fixture_pngs() {
    let exp = read_json("expected/preprocess_landscape_800x600.json");
    let tiling = pair(&exp["tiling"]);
    let mut data = Vec::new();
    for f in exp["crops"].as_array().unwrap() {
        data.extend(load_png_rgb(f.as_str().unwrap()).2);
    }
    let crops = Crops::from_parts(tiling, 378, data.clone()).unwrap();
    assert_eq!(crops.count, tiling.0 * tiling.1 + 1);
    check_crops("from_parts", &exp, &crops);
    // Wrong sizes are rejected.
    assert!(Crops::from_parts(tiling, 378, data[1..].to_vec()).is_err());
    assert!(Crops::from_parts((0, 4), 378, Vec::new()).is_err());
    assert!(Crops::from_parts((1, 1), 0, Vec::new()).is_err());
    assert!(Crops::from_parts((usize::MAX, 2), 378, Vec::new()).is_err());
}

#[test]
fn normalized_layout_is_chw() {
    let mut data = vec![0u8; 2 * 2 * 2 * 3];
    // crop 1, pixel (y=1, x=0): rgb = (64, 128, 255)
    let off = 2 * 2 * 3 + 2 * 3;
    data[off..off + 3].copy_from_slice(&[64, 128, 255]);
    let crops = Crops::from_parts((1, 1), 2, data).unwrap();
    let n = crops.normalized_chw();
    assert_eq!(n.len(), 2 * 3 * 4);
    let lut = pixel_lut();
    let at = |k: usize, c: usize, y: usize, x: usize| n[((k * 3 + c) * 2 + y) * 2 + x];
    assert_eq!(at(1, 0, 1, 0), lut[64]);
    assert_eq!(at(1, 1, 1, 0), lut[128]);
    assert_eq!(at(1, 2, 1, 0), lut[255]);
    assert_eq!(at(0, 2, 1, 0), -1.0);
    assert_eq!(at(1, 2, 0, 0), -1.0);
}

#[test]
fn pixel_lut_values() {
    let lut = pixel_lut();
    assert_eq!(lut[0], -1.0);
    assert_eq!(lut[64], -0.496_093_75);
    assert_eq!(lut[128], 0.007_812_5);
    assert_eq!(lut[255], 1.0);
    // Monotone non-decreasing, within [-1, 1], every value a multiple of 2^-8.
    for u in 1..256 {
        assert!(lut[u] >= lut[u - 1]);
    }
    for v in lut {
        assert!((-1.0..=1.0).contains(&v));
        assert_eq!((v * 256.0).fract(), 0.0);
    }
    // Differs from the single-rounding (u/255 - 0.5)/0.5 on exactly 128 values (spec §4.5).
    let differ = (0..256)
        .filter(|&u| {
            let once = half_round(((u as f32 / 255.0) - 0.5) / 0.5);
            once != lut[u]
        })
        .count();
    assert_eq!(differ, 128);
}

/// bf16 round-to-nearest-even, independent of the crate's implementation (via f64 arithmetic).
fn half_round(x: f32) -> f32 {
    if x == 0.0 {
        return x;
    }
    let e = f64::from(x.abs()).log2().floor();
    let q = 2f64.powf(e - 7.0);
    let r = f64::from(x) / q;
    let fl = r.floor();
    let rounded = if r - fl > 0.5 || (r - fl == 0.5 && fl % 2.0 != 0.0) {
        fl + 1.0
    } else {
        fl
    };
    (rounded * q) as f32
}

#[test]
fn decode_fixture_modes() {
    // The grey PNG decodes to replicated channels; the RGBA PNG keeps its RGB where alpha is 0.
    let limits = DecodeLimits::default();
    let gray = decode(&read_fixture("images/gray_500x375.png"), &limits).unwrap();
    assert!(gray
        .data
        .chunks_exact(3)
        .all(|p| p[0] == p[1] && p[1] == p[2]));
    let src = image::load_from_memory(&read_fixture("images/rgba_640x480.png"))
        .unwrap()
        .into_rgba8();
    let rgb = decode(&read_fixture("images/rgba_640x480.png"), &limits).unwrap();
    let mut transparent = 0;
    for (p, q) in src.pixels().zip(rgb.data.chunks_exact(3)) {
        assert_eq!(&p.0[..3], q);
        transparent += usize::from(p.0[3] == 0);
    }
    assert!(transparent > 0, "fixture should contain transparent pixels");
}
