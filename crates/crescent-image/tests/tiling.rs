//! Tiling selection (spec §4.3) against the fixture table and the spec's worked examples.

mod common;

use crescent_image::{select_tiling, tiling_for, CropConfig};

#[test]
fn tiling_table_fixture() {
    let t = common::read_json("expected/tiling_table.json");
    let cfg = CropConfig {
        crop_size: t["crop_size"].as_u64().unwrap() as usize,
        patch_size: t["patch_size"].as_u64().unwrap() as usize,
        overlap_margin: t["overlap_margin"].as_u64().unwrap() as usize,
        max_crops: t["max_crops"].as_u64().unwrap() as usize,
    };
    assert_eq!(cfg, CropConfig::default());
    let cases = t["cases"].as_array().unwrap();
    assert!(cases.len() > 10);
    for c in cases {
        let w = c["width"].as_u64().unwrap() as usize;
        let h = c["height"].as_u64().unwrap() as usize;
        let want = (
            c["tiling"][0].as_u64().unwrap() as usize,
            c["tiling"][1].as_u64().unwrap() as usize,
        );
        let got = tiling_for(h, w, &cfg);
        assert_eq!(got, want, "tiling for {w}x{h} (WxH)");
        assert_eq!(
            got.0 * got.1 + 1,
            c["n_crops"].as_u64().unwrap() as usize,
            "n_crops for {w}x{h}"
        );
        let rhw = (
            c["resized_hw"][0].as_u64().unwrap() as usize,
            c["resized_hw"][1].as_u64().unwrap() as usize,
        );
        assert_eq!(cfg.resized_hw(got), rhw, "resized_hw for {w}x{h}");
    }
}

/// (H, W), tiling, resize target, reconstructed grid.
type Example = (
    (usize, usize),
    (usize, usize),
    (usize, usize),
    (usize, usize),
);

#[test]
fn spec_worked_examples() {
    // (H, W) -> (th, tw), target TH x TW, recon grid (spec §4.3 table).
    let table: &[Example] = &[
        ((300, 300), (1, 1), (378, 378), (27, 27)),
        ((378, 378), (1, 1), (378, 378), (27, 27)),
        ((500, 500), (3, 3), (910, 910), (65, 65)),
        ((600, 800), (2, 4), (644, 1176), (46, 84)),
        ((640, 480), (4, 2), (1176, 644), (84, 46)),
        ((768, 1024), (3, 4), (910, 1176), (65, 84)),
        ((1024, 1024), (3, 3), (910, 910), (65, 65)),
        ((1080, 1920), (2, 4), (644, 1176), (46, 84)),
        ((1920, 1080), (4, 2), (1176, 644), (84, 46)),
        ((2048, 1536), (4, 3), (1176, 910), (84, 65)),
        ((4000, 4000), (3, 3), (910, 910), (65, 65)),
        ((400, 3000), (1, 8), (378, 2240), (27, 160)),
    ];
    let cfg = CropConfig::default();
    assert_eq!(cfg.window(), 266);
    assert_eq!(cfg.margin_px(), 56);
    for &((h, w), tiling, target, recon) in table {
        let t = tiling_for(h, w, &cfg);
        assert_eq!(t, tiling, "{h}x{w}");
        assert_eq!(cfg.resized_hw(t), target, "{h}x{w}");
        let g = cfg.grid() - 2 * cfg.overlap_margin;
        assert_eq!(
            (
                g * t.0 + 2 * cfg.overlap_margin,
                g * t.1 + 2 * cfg.overlap_margin
            ),
            recon
        );
    }
}

#[test]
fn select_tiling_properties() {
    // Never zero, (1, 1) for anything within one window, at most max_crops for ordinary
    // aspect ratios.
    for n in [1usize, 4, 12, 30] {
        for h in (1..6000).step_by(97) {
            for w in (1..6000).step_by(89) {
                let (th, tw) = select_tiling(h, w, 266, n);
                assert!(th >= 1 && tw >= 1);
                if h <= 266 || w <= 266 {
                    assert_eq!((th, tw), (1, 1));
                }
                if n == 12 && h.max(w) <= 12 * h.min(w) {
                    assert!(th * tw <= n, "{h}x{w} n={n} -> {th}x{tw}");
                }
            }
        }
    }
    // The reference rule (step 3 with max(1, .)) can exceed max_crops for extreme aspect
    // ratios; this is Kestrel's behaviour and is kept: 500x20000 (HxW) gives 1x21.
    assert_eq!(tiling_for(500, 20000, &CropConfig::default()), (1, 21));
    assert_eq!(select_tiling(292, 1870, 266, 1), (1, 2));
    // Degenerate configurations do not panic.
    assert_eq!(select_tiling(1000, 1000, 0, 12), (1, 1));
    assert_eq!(select_tiling(1000, 1000, 266, 0), (1, 1));
    let bad = CropConfig {
        crop_size: 378,
        patch_size: 0,
        overlap_margin: 4,
        max_crops: 12,
    };
    assert_eq!(tiling_for(1000, 1000, &bad), (1, 1));
    let big_margin = CropConfig {
        overlap_margin: 20,
        ..CropConfig::default()
    };
    assert_eq!(big_margin.window(), 0);
    assert_eq!(tiling_for(5000, 5000, &big_margin), (1, 1));
}

#[test]
fn other_geometry_from_config() {
    // Nothing is hard-coded: a different crop geometry follows the same formulas.
    let cfg = CropConfig {
        crop_size: 224,
        patch_size: 16,
        overlap_margin: 2,
        max_crops: 6,
    };
    assert_eq!(cfg.grid(), 14);
    assert_eq!(cfg.window(), 160);
    assert_eq!(cfg.margin_px(), 32);
    let t = tiling_for(1000, 500, &cfg);
    assert_eq!(t, select_tiling(1000 - 64, 500 - 64, 160, 6));
    assert_eq!(cfg.resized_hw(t), (t.0 * 160 + 64, t.1 * 160 + 64));
}
