//! Decoding of untrusted bytes: bad inputs give clear errors (never panics), colour types are
//! converted as Kestrel does.

mod common;

use common::{ihdr, png_chunk, png_from_chunks, read_fixture, zlib_stored, XorShift};
use crescent_image::{decode, preprocess, CropConfig, DecodeLimits, ImageError};
use image::ImageEncoder;

fn limits() -> DecodeLimits {
    DecodeLimits::default()
}

fn expect_err(bytes: &[u8], what: &str) -> ImageError {
    match decode(bytes, &limits()) {
        Ok(img) => panic!(
            "{what}: decoded to {}x{}, expected an error",
            img.width, img.height
        ),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                !msg.is_empty() && !msg.contains('\n'),
                "{what}: message {msg:?}"
            );
            e
        }
    }
}

fn encode_png(w: u32, h: u32, data: &[u8], ct: image::ExtendedColorType) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(data, w, h, ct)
        .unwrap();
    out
}

#[test]
fn empty_and_unknown() {
    assert!(matches!(expect_err(&[], "empty"), ImageError::Empty));
    assert!(matches!(
        expect_err(b"hello, this is not an image at all\n", "text"),
        ImageError::UnknownFormat
    ));
    assert!(matches!(
        expect_err(&[0u8; 64], "zeros"),
        ImageError::UnknownFormat
    ));
    // A signature and nothing else.
    expect_err(&common::PNG_SIGNATURE, "png signature only");
    expect_err(&[0xff, 0xd8, 0xff], "jpeg SOI only");
    expect_err(b"GIF89a", "gif magic only");
    expect_err(b"BM", "bmp magic only");
    expect_err(b"RIFF\0\0\0\0WEBPVP8 ", "webp header only");
    expect_err(b"II*\0", "tiff header only");
}

#[test]
fn truncated_files() {
    for f in [
        "images/landscape_800x600.png",
        "images/tiny_40x30.png",
        "images/wide_1920x1080.jpg",
    ] {
        let bytes = read_fixture(f);
        for cut in [bytes.len() / 2, 40, 100, bytes.len() - 20] {
            let r = decode(&bytes[..cut], &limits());
            if f.ends_with(".png") || cut < 1000 {
                let e = r
                    .err()
                    .unwrap_or_else(|| panic!("{f} cut at {cut} decoded"));
                assert!(!e.to_string().is_empty());
            }
            // zune-jpeg may decode a truncated JPEG (grey fill) without error: only no panic.
        }
    }
    let jpeg = read_fixture("images/wide_1920x1080.jpg");
    let half = decode(&jpeg[..jpeg.len() / 2], &limits());
    eprintln!(
        "truncated JPEG (half): {:?}",
        half.as_ref().map(|i| (i.width, i.height))
    );
}

#[test]
fn zero_sized_header() {
    for (w, h) in [(0u32, 10u32), (10, 0), (0, 0)] {
        let png = png_from_chunks(&[
            png_chunk(b"IHDR", &ihdr(w, h, 8, 2)),
            png_chunk(b"IDAT", &zlib_stored(&[])),
        ]);
        let e = expect_err(&png, "zero-sized png");
        assert!(
            matches!(e, ImageError::ZeroSized | ImageError::Decode(_)),
            "{w}x{h}: {e}"
        );
    }
}

#[test]
fn huge_header_claims() {
    // A valid IHDR claiming 100000 x 100000 with a single tiny IDAT: rejected from the header.
    let png = png_from_chunks(&[
        png_chunk(b"IHDR", &ihdr(100_000, 100_000, 8, 2)),
        png_chunk(b"IDAT", &zlib_stored(&[0, 1, 2, 3])),
    ]);
    match expect_err(&png, "100000x100000 png") {
        ImageError::TooLarge { width, height, .. } => {
            assert_eq!((width, height), (100_000, 100_000))
        }
        e => panic!("unexpected error {e}"),
    }
    // Within the side limit but over the pixel limit.
    let png = png_from_chunks(&[
        png_chunk(b"IHDR", &ihdr(15_000, 15_000, 8, 2)),
        png_chunk(b"IDAT", &zlib_stored(&[0])),
    ]);
    let e = expect_err(&png, "15000x15000 png");
    assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("pixels"), "{e}");
    // Over the allocation limit (16-bit RGBA, 8 bytes per pixel).
    let small = DecodeLimits {
        max_alloc_bytes: 1 << 20,
        ..DecodeLimits::default()
    };
    let png = png_from_chunks(&[
        png_chunk(b"IHDR", &ihdr(400, 400, 16, 6)),
        png_chunk(b"IDAT", &zlib_stored(&[0])),
    ]);
    let e = decode(&png, &small).unwrap_err();
    assert!(matches!(e, ImageError::TooLarge { .. }), "{e}");
    // Custom side limit.
    let tight = DecodeLimits {
        max_side: 100,
        ..DecodeLimits::default()
    };
    let e = decode(&read_fixture("images/landscape_800x600.png"), &tight).unwrap_err();
    assert!(e.to_string().contains("800x600"), "{e}");
    // JPEG header claims are checked too.
    let e = decode(&read_fixture("images/wide_1920x1080.jpg"), &tight).unwrap_err();
    assert!(
        matches!(
            e,
            ImageError::TooLarge {
                width: 1920,
                height: 1080,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn decompression_bomb_png() {
    // 20000 x 20000 grey image of zeros: ~400 MB raw, compressed to a few hundred KB by the
    // encoder; the default limits reject it from the header (400 Mpx > 100 Mpx), quickly.
    // Built with stored deflate blocks of one row repeated would be too big, so only the
    // first rows are present: the decoder must never get that far anyway.
    let row = vec![0u8; 20_001];
    let mut raw = Vec::new();
    for _ in 0..4 {
        raw.extend_from_slice(&row);
    }
    let png = png_from_chunks(&[
        png_chunk(b"IHDR", &ihdr(20_000, 20_000, 8, 0)),
        png_chunk(b"IDAT", &zlib_stored(&raw)),
    ]);
    let t = std::time::Instant::now();
    let e = expect_err(&png, "bomb");
    assert!(
        matches!(
            e,
            ImageError::TooLarge {
                width: 20_000,
                height: 20_000,
                ..
            }
        ),
        "{e}"
    );
    assert!(t.elapsed().as_secs_f64() < 1.0);
    // Also via preprocess.
    assert!(preprocess(&png, &CropConfig::default(), &limits()).is_err());
}

#[test]
fn colour_conversions() {
    use image::ExtendedColorType as C;
    // 16-bit RGB: round(v / 257).
    let vals16: [u16; 6] = [0, 128, 129, 257 * 100 + 128, 257 * 100 + 129, 65535];
    let mut be = Vec::new();
    for v in vals16 {
        be.extend_from_slice(&v.to_ne_bytes());
    }
    let png = encode_png(2, 1, &be, C::Rgb16);
    let img = decode(&png, &limits()).unwrap();
    let want: Vec<u8> = vals16
        .iter()
        .map(|&v| (f64::from(v) / 257.0).round() as u8)
        .collect();
    assert_eq!(img.data, want);
    assert_eq!(want, vec![0, 0, 1, 100, 101, 255]);

    // 16-bit grey.
    let mut g16 = Vec::new();
    for v in [0u16, 32896, 65535] {
        g16.extend_from_slice(&v.to_ne_bytes());
    }
    let img = decode(&encode_png(3, 1, &g16, C::L16), &limits()).unwrap();
    assert_eq!(img.data, vec![0, 0, 0, 128, 128, 128, 255, 255, 255]);

    // 16-bit RGBA: alpha dropped.
    let mut rgba16 = Vec::new();
    for v in [65535u16, 0, 257 * 7, 0] {
        rgba16.extend_from_slice(&v.to_ne_bytes());
    }
    let img = decode(&encode_png(1, 1, &rgba16, C::Rgba16), &limits()).unwrap();
    assert_eq!(img.data, vec![255, 0, 7]);

    // Grey + alpha: grey replicated, alpha ignored.
    let la = [10u8, 0, 200, 255, 77, 128];
    let img = decode(&encode_png(3, 1, &la, C::La8), &limits()).unwrap();
    assert_eq!(img.data, vec![10, 10, 10, 200, 200, 200, 77, 77, 77]);

    // Grey.
    let img = decode(&encode_png(2, 1, &[3, 250], C::L8), &limits()).unwrap();
    assert_eq!(img.data, vec![3, 3, 3, 250, 250, 250]);

    // RGBA: alpha dropped, not composited (fully transparent pixel keeps its RGB).
    let rgba = [1u8, 2, 3, 0, 200, 100, 50, 128];
    let img = decode(&encode_png(2, 1, &rgba, C::Rgba8), &limits()).unwrap();
    assert_eq!(img.data, vec![1, 2, 3, 200, 100, 50]);

    // Palette PNG (hand-built: PLTE + 8-bit indices), with a tRNS chunk that must not matter.
    let plte = [255u8, 0, 0, 0, 255, 0, 0, 0, 255, 9, 8, 7];
    let raw = [0u8, 0, 1, 2, 3, 0, 3, 2, 1, 0];
    let png = png_from_chunks(&[
        png_chunk(b"IHDR", &ihdr(4, 2, 8, 3)),
        png_chunk(b"PLTE", &plte),
        png_chunk(b"tRNS", &[255, 0, 128, 0]),
        png_chunk(b"IDAT", &zlib_stored(&raw)),
    ]);
    let img = decode(&png, &limits()).unwrap();
    assert_eq!((img.width, img.height), (4, 2));
    assert_eq!(
        img.data,
        vec![
            255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 8, 7, //
            9, 8, 7, 0, 0, 255, 0, 255, 0, 255, 0, 0
        ]
    );

    // 1-bit grey (sub-byte depth): 0 -> 0, 1 -> 255.
    let png = png_from_chunks(&[
        png_chunk(b"IHDR", &ihdr(3, 1, 1, 0)),
        png_chunk(b"IDAT", &zlib_stored(&[0, 0b1010_0000])),
    ]);
    let img = decode(&png, &limits()).unwrap();
    assert_eq!(img.data, vec![255, 255, 255, 0, 0, 0, 255, 255, 255]);
}

#[test]
fn other_formats_roundtrip() {
    // Lossless formats written by the image crate decode to the same RGB.
    let (w, h) = (7u32, 5u32);
    let mut rgb = Vec::new();
    let mut rng = XorShift(99);
    for _ in 0..w * h * 3 {
        rgb.push(rng.next_u64() as u8);
    }
    let src = image::RgbImage::from_raw(w, h, rgb.clone()).unwrap();
    for fmt in [
        image::ImageFormat::Bmp,
        image::ImageFormat::Tiff,
        image::ImageFormat::Png,
    ] {
        let mut buf = std::io::Cursor::new(Vec::new());
        src.write_to(&mut buf, fmt).unwrap();
        let img = decode(buf.get_ref(), &limits()).unwrap();
        assert_eq!((img.width, img.height), (w as usize, h as usize), "{fmt:?}");
        assert_eq!(img.data, rgb, "{fmt:?}");
    }
    // GIF: first frame, palette expanded (a 2-colour image is stored losslessly).
    let mut two = Vec::new();
    for i in 0..w * h {
        two.extend_from_slice(if i % 3 == 0 {
            &[255, 0, 0]
        } else {
            &[0, 0, 255]
        });
    }
    let src = image::RgbImage::from_raw(w, h, two.clone()).unwrap();
    let mut buf = std::io::Cursor::new(Vec::new());
    src.write_to(&mut buf, image::ImageFormat::Gif).unwrap();
    let img = decode(buf.get_ref(), &limits()).unwrap();
    assert_eq!(img.data, two);
    // WebP (lossless encoder in the image crate).
    let mut buf = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_raw(w, h, rgb.clone())
        .unwrap()
        .write_to(&mut buf, image::ImageFormat::WebP)
        .unwrap();
    let img = decode(buf.get_ref(), &limits()).unwrap();
    assert_eq!(img.data, rgb);
}

#[test]
fn random_mutations_never_panic() {
    let base = read_fixture("images/tiny_40x30.png");
    let jpeg = read_fixture("images/wide_1920x1080.jpg");
    let small_jpeg = {
        // A small JPEG so that the loop stays fast.
        let img =
            image::RgbImage::from_fn(48, 32, |x, y| image::Rgb([x as u8 * 5, y as u8 * 7, 99]));
        let mut buf = std::io::Cursor::new(Vec::new());
        img.write_to(&mut buf, image::ImageFormat::Jpeg).unwrap();
        buf.into_inner()
    };
    assert!(!jpeg.is_empty());
    let mut rng = XorShift(0x5eed_1234_abcd_ef01);
    let (mut ok, mut err) = (0, 0);
    for case in 0..1000 {
        let src = if case % 2 == 0 { &base } else { &small_jpeg };
        let mut b = src.clone();
        let n_mut = 1 + rng.below(8);
        for _ in 0..n_mut {
            match rng.below(4) {
                0 => {
                    let i = rng.below(b.len());
                    b[i] = rng.next_u64() as u8;
                }
                1 => {
                    let i = rng.below(b.len());
                    b[i] ^= 1 << rng.below(8);
                }
                2 => {
                    let cut = rng.below(b.len()) + 1;
                    b.truncate(cut);
                }
                _ => {
                    // Header region, where dimensions and chunk lengths live.
                    let i = rng.below(b.len().min(64));
                    b[i] = rng.next_u64() as u8;
                }
            }
        }
        match decode(&b, &limits()) {
            Ok(img) => {
                assert_eq!(img.data.len(), img.width * img.height * 3);
                ok += 1;
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                err += 1;
            }
        }
    }
    eprintln!("mutations: {ok} decoded, {err} rejected");
    assert!(err > 0);
}
