//! Resize and crop-extraction behaviour beyond the fixtures (values verified against
//! `kestrel_native.resize_lanczos3` 0.1.8 when the tests were written).

use crescent_image::{overlap_crops, resize_lanczos3, tiling_for, CropConfig, RgbImage};

fn solid(h: usize, w: usize, v: u8) -> RgbImage {
    RgbImage::new(w, h, vec![v; w * h * 3]).unwrap()
}

#[test]
fn identity_and_degenerate_sizes() {
    let mut img = solid(5, 7, 0);
    for (i, v) in img.data.iter_mut().enumerate() {
        *v = (i * 37 % 256) as u8;
    }
    assert_eq!(resize_lanczos3(&img, 5, 7), img);
    let z = resize_lanczos3(&img, 0, 7);
    assert_eq!((z.height, z.width, z.data.len()), (0, 7, 0));
    // Zero-sized or inconsistent sources give a black image of the target size, no panic.
    let empty = RgbImage {
        width: 0,
        height: 3,
        data: vec![],
    };
    assert_eq!(resize_lanczos3(&empty, 4, 4).data, vec![0; 48]);
    let broken = RgbImage {
        width: 10,
        height: 10,
        data: vec![1; 5],
    };
    assert_eq!(resize_lanczos3(&broken, 2, 2).data, vec![0; 12]);
    assert!(RgbImage::new(10, 10, vec![0; 5]).is_err());
}

#[test]
fn solid_colours_stay_solid() {
    // Lanczos weights are normalised and the box pre-shrink is exact for these n (for large n
    // the fixed-point reciprocal can round up by one level, e.g. 254 -> 255 for n = 2000).
    for &(h, w, th, tw) in &[
        (30, 40, 378, 378),
        (1000, 1000, 378, 378),
        (1400, 300, 378, 378),
        (600, 800, 644, 1176),
        (2000, 100, 100, 10),
    ] {
        for v in [0u8, 1, 128, 254, 255] {
            let out = resize_lanczos3(&solid(h, w, v), th, tw);
            assert!(out.data.iter().all(|&x| x == v), "{h}x{w}->{th}x{tw} v={v}");
        }
    }
}

#[test]
fn preshrink_wraps_like_kestrel() {
    // n = 31*31 = 961: (255*961 * ceil(65536/961)) >> 16 = 258, which Kestrel truncates to 2.
    let out = resize_lanczos3(&solid(310, 310, 255), 10, 10);
    assert!(out.data.iter().all(|&x| x == 2), "{:?}", &out.data[..6]);
    // n = 52*52 = 2704 -> 263 -> 7.
    let out = resize_lanczos3(&solid(520, 520, 255), 10, 10);
    assert!(out.data.iter().all(|&x| x == 7));
    // n = 40*40 = 1600: ceil(65536/1600) * 1600 = 65600 < 65793, no overflow.
    let out = resize_lanczos3(&solid(400, 400, 255), 10, 10);
    assert!(out.data.iter().all(|&x| x == 255));
}

#[test]
fn crops_cover_the_resized_image() {
    // Local crops are exact windows of the tile-target resize, at stride `window`.
    let cfg = CropConfig::default();
    let (h, w) = (700, 1500);
    let mut img = solid(h, w, 0);
    for (i, v) in img.data.iter_mut().enumerate() {
        *v = ((i / 3) % 251 + (i % 3) * 3) as u8;
    }
    let crops = overlap_crops(&img, &cfg);
    let t = tiling_for(h, w, &cfg);
    assert_eq!(crops.tiling, t);
    assert_eq!(crops.count, t.0 * t.1 + 1);
    let (rh, rw) = cfg.resized_hw(t);
    let r = resize_lanczos3(&img, rh, rw);
    let g = resize_lanczos3(&img, 378, 378);
    assert_eq!(crops.crop(0).unwrap(), g.data.as_slice());
    for i in 0..t.0 {
        for j in 0..t.1 {
            let c = crops.crop(1 + i * t.1 + j).unwrap();
            for y in [0usize, 1, 200, 377] {
                for x in [0usize, 5, 377] {
                    let (sy, sx) = (i * 266 + y, j * 266 + x);
                    assert_eq!(
                        &c[(y * 378 + x) * 3..][..3],
                        &r.data[(sy * rw + sx) * 3..][..3]
                    );
                }
            }
        }
    }
    assert!(crops.crop(crops.count).is_none());
}

#[test]
fn odd_geometry_does_not_panic() {
    // crop_size not a multiple of patch_size: crops may extend past the resized image and are
    // zero-filled there.
    let cfg = CropConfig {
        crop_size: 100,
        patch_size: 14,
        overlap_margin: 1,
        max_crops: 4,
    };
    let crops = overlap_crops(&solid(300, 500, 200), &cfg);
    assert_eq!(crops.size, 100);
    assert_eq!(crops.data.len(), crops.count * 100 * 100 * 3);
    let tiny = overlap_crops(&solid(1, 1, 9), &CropConfig::default());
    assert_eq!(tiny.tiling, (1, 1));
    assert!(tiny.data.iter().all(|&v| v == 9));
}
