//! Deterministic fuzzing of `decode` + `overlap_crops` (run as ordinary tests, in CI):
//!
//! - mutations of real and generated files in every supported format (PNG with CRCs fixed up
//!   half of the time so that mutations reach the decoder, JPEG, WebP, GIF, BMP, TIFF);
//! - random bytes behind valid magic numbers;
//! - truncations of every seed file;
//! - headers claiming huge (or zero, or overflowing) dimensions.
//!
//! Every target runs at least 1,000 cases and checks that every call returns `Ok` or a clean,
//! one-line `Err`, that nothing panics outside the decoder sandbox, that a decoded image is within
//! the limits and crops consistently, and — through a counting global allocator — that no case
//! allocates more than the configured `max_alloc_bytes` plus the crops. A failing case prints
//! its seed and index; `FUZZ_SEED=<n>` reruns a target with another seed.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{ihdr, png_chunk, png_from_chunks, read_fixture, zlib_stored, XorShift};
use crescent_image::{decode, overlap_crops, CropConfig, DecodeLimits, ImageError};

// ---------------------------------------------------------------------------------------------
// Counting allocator: current and peak live bytes of the whole process.

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every method forwards to `System` with the same arguments; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The targets share the allocation counters: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------------------------
// The case runner.

/// Limits of the fuzz loops: small enough that a case is cheap, large enough for real images.
fn fuzz_limits() -> DecodeLimits {
    DecodeLimits {
        max_pixels: 4_000_000,
        max_side: 4096,
        max_alloc_bytes: 64 << 20,
    }
}

/// Largest crop set: `max_crops + 1` crops of `crop_size²·3` bytes, plus the resized image the
/// local crops are cut from and the global crop (bounded by the same size).
fn crops_bound(cfg: &CropConfig) -> usize {
    let crop = cfg.crop_size * cfg.crop_size * 3;
    3 * (cfg.max_crops + 1) * crop
}

#[derive(Default)]
struct Stats {
    cases: usize,
    ok: usize,
    errors: BTreeMap<&'static str, usize>,
    decoder_panics: usize,
    max_extra_alloc: usize,
    slowest: Duration,
}

impl Stats {
    fn report(&self, target: &str) {
        eprintln!(
            "{target}: {} cases, {} decoded, errors {:?}, decoder panics caught {}, \
             peak extra allocation {:.1} MiB, slowest case {:?}",
            self.cases,
            self.ok,
            self.errors,
            self.decoder_panics,
            self.max_extra_alloc as f64 / (1 << 20) as f64,
            self.slowest
        );
    }
}

fn kind(e: &ImageError) -> &'static str {
    match e {
        ImageError::Empty => "empty",
        ImageError::UnknownFormat => "unknown_format",
        ImageError::Unsupported(_) => "unsupported",
        ImageError::Decode(_) => "decode",
        ImageError::TooLarge { .. } => "too_large",
        ImageError::LimitExceeded(_) => "limit_exceeded",
        ImageError::ZeroSized => "zero_sized",
        ImageError::InvalidInput(_) => "invalid_input",
    }
}

/// Decode `bytes`, crop what decodes, and check every invariant. `ctx` names the case.
fn check(bytes: &[u8], limits: &DecodeLimits, stats: &mut Stats, ctx: &dyn Fn() -> String) {
    let cfg = CropConfig::default();
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let t0 = Instant::now();
    // `decode` sandboxes the third-party decoders itself; a panic anywhere else (our code,
    // `overlap_crops`) fails the test with the case's context.
    let r = std::panic::catch_unwind(|| {
        let r = decode(bytes, limits);
        let crops = r.as_ref().ok().map(|img| overlap_crops(img, &cfg));
        (r, crops)
    });
    let (r, crops) = match r {
        Ok(x) => x,
        Err(_) => panic!("panic outside the decoder sandbox: {}", ctx()),
    };
    let elapsed = t0.elapsed();
    let r_kind = r
        .as_ref()
        .map(|i| (i.width, i.height))
        .map_err(|e| e.to_string());
    stats.cases += 1;
    stats.slowest = stats.slowest.max(elapsed);
    match r {
        Ok(img) => {
            stats.ok += 1;
            assert!(img.is_consistent(), "inconsistent buffer: {}", ctx());
            assert!(img.width > 0 && img.height > 0, "zero-sized Ok: {}", ctx());
            assert!(
                img.width as u64 <= u64::from(limits.max_side)
                    && img.height as u64 <= u64::from(limits.max_side)
                    && (img.width * img.height) as u64 <= limits.max_pixels,
                "{}x{} decoded past the limits: {}",
                img.width,
                img.height,
                ctx()
            );
            let crops = crops.unwrap_or_else(|| panic!("no crops: {}", ctx()));
            let (th, tw) = crops.tiling;
            assert!(th >= 1 && tw >= 1 && th * tw <= cfg.max_crops, "{}", ctx());
            assert_eq!(crops.count, th * tw + 1, "{}", ctx());
            assert_eq!(
                crops.data.len(),
                crops.count * cfg.crop_size * cfg.crop_size * 3,
                "{}",
                ctx()
            );
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(
                !msg.is_empty() && !msg.contains('\n'),
                "unclean error {msg:?}: {}",
                ctx()
            );
            if msg.contains("decoder panicked") {
                stats.decoder_panics += 1;
            }
            *stats.errors.entry(kind(&e)).or_insert(0) += 1;
        }
    }
    let extra = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    if std::env::var_os("FUZZ_DEBUG").is_some() && extra > 32 << 20 {
        eprintln!("{} MiB: {} -> {:?}", extra >> 20, ctx(), r_kind);
    }
    stats.max_extra_alloc = stats.max_extra_alloc.max(extra);
    let bound = limits.max_alloc_bytes as usize + crops_bound(&cfg) + (8 << 20);
    assert!(
        extra <= bound,
        "allocated {extra} bytes (bound {bound}): {}",
        ctx()
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "case took {elapsed:?}: {}",
        ctx()
    );
}

fn seed(default: u64) -> u64 {
    std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------------------
// Seed files.

fn encode(img: image::DynamicImage, fmt: image::ImageFormat) -> Vec<u8> {
    let mut buf = Cursor::new(Vec::new());
    img.write_to(&mut buf, fmt).expect("encoding a seed image");
    buf.into_inner()
}

fn pattern_rgb(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 37 + y * 11) as u8,
            ((x * 5) ^ (y * 13)) as u8,
            (x * y) as u8,
        ])
    })
}

/// An animated GIF of two frames.
fn animated_gif() -> Vec<u8> {
    use image::codecs::gif::GifEncoder;
    use image::{Delay, Frame, RgbaImage};
    let mut out = Vec::new();
    {
        let mut enc = GifEncoder::new(&mut out);
        for k in 0..2u8 {
            let f = RgbaImage::from_fn(12, 9, |x, y| {
                image::Rgba([x as u8 * 20, y as u8 * k, 7, 255])
            });
            enc.encode_frame(Frame::from_parts(
                f,
                0,
                0,
                Delay::from_numer_denom_ms(10, 1),
            ))
            .expect("gif frame");
        }
    }
    out
}

/// Named seed files: the fixture PNG and JPEG plus small generated files of every format and
/// colour type.
fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use image::DynamicImage as D;
    use image::ImageFormat as F;
    let rgb = pattern_rgb(23, 17);
    let rgba = image::RgbaImage::from_fn(19, 11, |x, y| image::Rgba([x as u8, y as u8, 200, 99]));
    let grey = image::GrayImage::from_fn(31, 7, |x, y| image::Luma([(x * 8 + y) as u8]));
    let rgb16 = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(9, 8, |x, y| {
        image::Rgb([x as u16 * 7000, y as u16 * 8000, 65535])
    });
    let palette = png_from_chunks(&[
        png_chunk(b"IHDR", &ihdr(4, 2, 8, 3)),
        png_chunk(b"PLTE", &[255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 8, 7]),
        png_chunk(b"tRNS", &[255, 0, 128, 0]),
        png_chunk(b"IDAT", &zlib_stored(&[0, 0, 1, 2, 3, 0, 3, 2, 1, 0])),
    ]);
    let jpeg_big = read_fixture("images/wide_1920x1080.jpg");
    // The fixture JPEG's headers and first scan bytes: a real encoder's tables, cheap to decode.
    let jpeg_head = jpeg_big[..jpeg_big.len().min(6000)].to_vec();
    vec![
        ("png_fixture", read_fixture("images/tiny_40x30.png")),
        ("png_rgb", encode(D::ImageRgb8(rgb.clone()), F::Png)),
        ("png_rgba", encode(D::ImageRgba8(rgba.clone()), F::Png)),
        ("png_grey", encode(D::ImageLuma8(grey.clone()), F::Png)),
        ("png_rgb16", encode(D::ImageRgb16(rgb16), F::Png)),
        ("png_palette", palette),
        (
            "jpeg_rgb",
            encode(D::ImageRgb8(pattern_rgb(48, 32)), F::Jpeg),
        ),
        ("jpeg_grey", encode(D::ImageLuma8(grey), F::Jpeg)),
        ("jpeg_fixture_head", jpeg_head),
        ("webp", encode(D::ImageRgb8(rgb.clone()), F::WebP)),
        ("webp_rgba", encode(D::ImageRgba8(rgba), F::WebP)),
        ("gif", encode(D::ImageRgb8(pattern_rgb(16, 10)), F::Gif)),
        ("gif_animated", animated_gif()),
        ("bmp", encode(D::ImageRgb8(pattern_rgb(13, 6)), F::Bmp)),
        ("tiff", encode(D::ImageRgb8(rgb), F::Tiff)),
    ]
}

// ---------------------------------------------------------------------------------------------
// Mutations.

const INTERESTING_U32: [u32; 10] = [
    0,
    1,
    0x7f,
    0xff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_fffe,
    0xffff_ffff,
];

fn mutate(b: &mut Vec<u8>, rng: &mut XorShift, donor: &[u8]) {
    if b.is_empty() {
        b.push(rng.next_u64() as u8);
        return;
    }
    let i = rng.below(b.len());
    match rng.below(10) {
        0 => b[i] = rng.next_u64() as u8,
        1 => b[i] ^= 1 << rng.below(8),
        2 => {
            // An interesting 32-bit value, big or little endian.
            let v = INTERESTING_U32[rng.below(INTERESTING_U32.len())];
            let bytes = if rng.below(2) == 0 {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            };
            for (k, x) in bytes.iter().enumerate() {
                if let Some(y) = b.get_mut(i + k) {
                    *y = *x;
                }
            }
        }
        3 => {
            let n = 1 + rng.below(64.min(b.len() - i));
            b.drain(i..i + n);
        }
        4 => {
            let n = 1 + rng.below(64);
            let fill = rng.next_u64() as u8;
            b.splice(i..i, std::iter::repeat_n(fill, n));
        }
        5 => {
            // Duplicate a slice (repeated chunks, markers, frames).
            let n = 1 + rng.below(256.min(b.len() - i));
            let s = b[i..i + n].to_vec();
            let at = rng.below(b.len());
            b.splice(at..at, s);
        }
        6 => b.truncate(i.max(1)),
        7 => {
            // Splice in a piece of another file.
            if !donor.is_empty() {
                let j = rng.below(donor.len());
                let n = 1 + rng.below(128.min(donor.len() - j));
                let end = (i + n).min(b.len());
                b.splice(i..end, donor[j..j + n].iter().copied());
            }
        }
        _ => {
            // The header region, where dimensions, chunk lengths and tables live.
            let h = rng.below(b.len().min(64));
            b[h] = rng.next_u64() as u8;
        }
    }
}

/// Recompute every PNG chunk CRC (so that a mutated chunk passes the CRC check and reaches the
/// chunk parser); stops at the first chunk whose length runs past the end.
fn fix_png_crcs(b: &mut [u8]) {
    if !b.starts_with(&common::PNG_SIGNATURE) {
        return;
    }
    let mut at = 8;
    while at + 12 <= b.len() {
        let len = u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize;
        let Some(end) = (at + 8).checked_add(len) else {
            return;
        };
        if end + 4 > b.len() {
            return;
        }
        let crc = common::crc32(&b[at + 4..end]);
        b[end..end + 4].copy_from_slice(&crc.to_be_bytes());
        at = end + 4;
    }
}

#[test]
fn fuzz_mutated_files() {
    let _g = serial();
    let seed0 = seed(0x00c0_ffee_1234_5678);
    let mut rng = XorShift(seed0);
    let seeds = seeds();
    let limits = fuzz_limits();
    let mut stats = Stats::default();
    let mut per_seed: BTreeMap<&str, usize> = BTreeMap::new();
    // Every seed decodes as it is.
    for (name, bytes) in &seeds {
        let img = decode(bytes, &limits);
        if *name != "jpeg_fixture_head" {
            assert!(img.is_ok(), "seed {name}: {:?}", img.err());
        }
    }
    let cases = 1500;
    for case in 0..cases {
        let (name, src) = &seeds[case % seeds.len()];
        let (_, donor) = &seeds[rng.below(seeds.len())];
        let mut b = src.clone();
        for _ in 0..1 + rng.below(6) {
            mutate(&mut b, &mut rng, donor);
        }
        if name.starts_with("png") && rng.below(2) == 0 {
            fix_png_crcs(&mut b);
        }
        check(&b, &limits, &mut stats, &|| {
            format!("mutated {name}, seed {seed0:#x}, case {case}")
        });
        *per_seed.entry(name).or_insert(0) += 1;
    }
    stats.report("mutated files");
    assert!(stats.cases >= 1000);
    assert!(stats.ok > 0 && stats.errors.values().sum::<usize>() > 0);
}

#[test]
fn fuzz_random_bytes_behind_magic_numbers() {
    let _g = serial();
    let seed0 = seed(0x0bad_5eed_0000_0001);
    let mut rng = XorShift(seed0);
    let limits = fuzz_limits();
    let mut stats = Stats::default();
    let magics: [&[u8]; 10] = [
        &common::PNG_SIGNATURE,
        &[0xff, 0xd8, 0xff, 0xe0],
        &[0xff, 0xd8, 0xff, 0xdb],
        b"GIF89a",
        b"GIF87a",
        b"RIFF\0\0\0\0WEBPVP8 ",
        b"RIFF\0\0\0\0WEBPVP8L",
        b"BM",
        b"II*\0",
        b"MM\0*",
    ];
    for case in 0..1200 {
        let magic = magics[case % magics.len()];
        let mut b = magic.to_vec();
        let cap = if rng.below(8) == 0 { 20_000 } else { 600 };
        let n = rng.below(cap);
        b.extend((0..n).map(|_| rng.next_u64() as u8));
        if magic == common::PNG_SIGNATURE {
            // Random chunks with valid CRCs, IHDR first half of the time.
            b.truncate(8);
            if rng.below(2) == 0 {
                let w = 1 + rng.below(300) as u32;
                let h = 1 + rng.below(300) as u32;
                let depth = [1u8, 2, 4, 8, 16][rng.below(5)];
                let ct = [0u8, 2, 3, 4, 6, 7][rng.below(6)];
                b.extend(png_chunk(b"IHDR", &ihdr(w, h, depth, ct)));
            }
            for _ in 0..rng.below(5) {
                let kind: &[u8; 4] =
                    [b"IDAT", b"PLTE", b"tRNS", b"gAMA", b"zzzz", b"acTL"][rng.below(6)];
                let len = rng.below(400);
                let data: Vec<u8> = if kind == b"IDAT" && rng.below(2) == 0 {
                    // A valid zlib stream of random filtered rows.
                    zlib_stored(&(0..len).map(|_| rng.next_u64() as u8).collect::<Vec<_>>())
                } else {
                    (0..len).map(|_| rng.next_u64() as u8).collect()
                };
                b.extend(png_chunk(kind, &data));
            }
            if rng.below(2) == 0 {
                b.extend(png_chunk(b"IEND", &[]));
            }
        } else if magic.starts_with(b"RIFF") {
            let riff = (b.len() as u32).saturating_sub(8);
            let v = if rng.below(4) == 0 {
                rng.next_u64() as u32
            } else {
                riff
            };
            b[4..8].copy_from_slice(&v.to_le_bytes());
        }
        check(&b, &limits, &mut stats, &|| {
            format!(
                "random bytes behind {:?}, seed {seed0:#x}, case {case}",
                String::from_utf8_lossy(magic)
            )
        });
    }
    stats.report("random bytes behind magic numbers");
    assert!(stats.cases >= 1000);
}

#[test]
fn fuzz_truncations() {
    let _g = serial();
    let seed0 = seed(0x7_0000_7eed);
    let mut rng = XorShift(seed0);
    let limits = fuzz_limits();
    let mut stats = Stats::default();
    let seeds = seeds();
    let mut cases = 0;
    for (name, bytes) in &seeds {
        // Every cut in the first 80 bytes (signatures and headers), then random cuts.
        let cuts: Vec<usize> = (0..bytes.len().min(80))
            .chain((0..20).map(|_| rng.below(bytes.len())))
            .collect();
        for cut in cuts {
            check(&bytes[..cut], &limits, &mut stats, &|| {
                format!("{name} truncated to {cut} bytes, seed {seed0:#x}")
            });
            cases += 1;
        }
    }
    stats.report("truncations");
    assert!(cases >= 1000, "{cases}");
}

// ---------------------------------------------------------------------------------------------
// Headers claiming huge dimensions.

/// A dimension drawn from the edges: 0, 1, around the limits, 2^14, 2^16, 2^24, 2^31, 2^32.
fn dim(rng: &mut XorShift) -> u32 {
    const EDGES: [u32; 16] = [
        0,
        1,
        2,
        4095,
        4096,
        4097,
        16_383,
        16_384,
        20_001,
        30_000,
        65_535,
        65_536,
        0xff_ffff,
        0x7fff_ffff,
        0x8000_0000,
        0xffff_ffff,
    ];
    match rng.below(3) {
        0 => rng.next_u64() as u32,
        1 => rng.below(70_000) as u32,
        _ => EDGES[rng.below(EDGES.len())],
    }
}

fn huge_png(w: u32, h: u32, rng: &mut XorShift) -> Vec<u8> {
    let depth = [1u8, 8, 16][rng.below(3)];
    let ct = [0u8, 2, 6][rng.below(3)];
    png_from_chunks(&[
        png_chunk(b"IHDR", &ihdr(w, h, depth, ct)),
        png_chunk(b"IDAT", &zlib_stored(&vec![0u8; rng.below(4000)])),
    ])
}

fn huge_jpeg(w: u32, h: u32, template: &[u8]) -> Vec<u8> {
    // Patch the SOF0 dimensions of a real (small) JPEG.
    let mut b = template.to_vec();
    if let Some(i) = b.windows(2).position(|m| m == [0xff, 0xc0]) {
        let (w16, h16) = (w as u16, h as u16);
        b[i + 5..i + 7].copy_from_slice(&h16.to_be_bytes());
        b[i + 7..i + 9].copy_from_slice(&w16.to_be_bytes());
    }
    b
}

fn huge_gif(w: u32, h: u32, frame_too: bool) -> Vec<u8> {
    let (w16, h16) = (w as u16, h as u16);
    let mut b = b"GIF89a".to_vec();
    b.extend(w16.to_le_bytes());
    b.extend(h16.to_le_bytes());
    b.extend([0x80, 0, 0]); // global colour table of 2 entries
    b.extend([0, 0, 0, 255, 255, 255]);
    b.push(0x2c);
    b.extend([0, 0, 0, 0]);
    if frame_too {
        b.extend(w16.to_le_bytes());
        b.extend(h16.to_le_bytes());
    } else {
        b.extend([1, 0, 1, 0]);
    }
    b.push(0);
    b.extend([2, 2, 0x44, 0x01, 0]); // LZW: min code size 2, one pixel
    b.push(0x3b);
    b
}

fn riff(chunks: &[(&[u8; 4], Vec<u8>)], bogus_size: Option<u32>) -> Vec<u8> {
    let mut body = b"WEBP".to_vec();
    for (kind, data) in chunks {
        body.extend_from_slice(*kind);
        body.extend((data.len() as u32).to_le_bytes());
        body.extend(data);
        if data.len() % 2 == 1 {
            body.push(0);
        }
    }
    let mut b = b"RIFF".to_vec();
    b.extend(bogus_size.unwrap_or(body.len() as u32).to_le_bytes());
    b.extend(body);
    b
}

fn huge_webp(w: u32, h: u32, rng: &mut XorShift) -> Vec<u8> {
    match rng.below(3) {
        0 => {
            // VP8X canvas: 24-bit (size - 1) fields.
            let mut x = vec![0u8; 10];
            x[4..7].copy_from_slice(&w.wrapping_sub(1).to_le_bytes()[..3]);
            x[7..10].copy_from_slice(&h.wrapping_sub(1).to_le_bytes()[..3]);
            let mut l = vec![0x2f];
            l.extend(0u32.to_le_bytes());
            l.extend([0u8; 16]);
            riff(&[(b"VP8X", x), (b"VP8L", l)], None)
        }
        1 => {
            // VP8L: 14-bit (size - 1) fields.
            let bits = (w.wrapping_sub(1) & 0x3fff) | ((h.wrapping_sub(1) & 0x3fff) << 14);
            let mut l = vec![0x2f];
            l.extend(bits.to_le_bytes());
            l.extend((0..rng.below(64)).map(|_| rng.next_u64() as u8));
            riff(&[(b"VP8L", l)], None)
        }
        _ => {
            // VP8 key frame: 14-bit sizes after the start code.
            let mut v = vec![0x10, 0x02, 0x00, 0x9d, 0x01, 0x2a];
            v.extend(((w & 0x3fff) as u16).to_le_bytes());
            v.extend(((h & 0x3fff) as u16).to_le_bytes());
            v.extend((0..rng.below(64)).map(|_| rng.next_u64() as u8));
            riff(&[(b"VP8 ", v)], None)
        }
    }
}

fn huge_tiff(w: u32, h: u32) -> Vec<u8> {
    let entries: [(u16, u16, u32, u32); 8] = [
        (256, 4, 1, w),   // ImageWidth, LONG
        (257, 4, 1, h),   // ImageLength
        (258, 3, 1, 8),   // BitsPerSample
        (259, 3, 1, 1),   // Compression: none
        (262, 3, 1, 1),   // Photometric: black is zero
        (273, 4, 1, 200), // StripOffsets
        (278, 4, 1, h),   // RowsPerStrip
        (279, 4, 1, 16),  // StripByteCounts
    ];
    let mut b = b"II*\0".to_vec();
    b.extend(8u32.to_le_bytes());
    b.extend((entries.len() as u16).to_le_bytes());
    for (tag, ty, count, value) in entries {
        b.extend(tag.to_le_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(count.to_le_bytes());
        if ty == 3 {
            b.extend((value as u16).to_le_bytes());
            b.extend([0, 0]);
        } else {
            b.extend(value.to_le_bytes());
        }
    }
    b.extend(0u32.to_le_bytes());
    b.resize(216, 0);
    b
}

#[test]
fn fuzz_huge_dimension_headers() {
    let _g = serial();
    let seed0 = seed(0x0051_2e00_0bad);
    let mut rng = XorShift(seed0);
    let template = encode(
        image::DynamicImage::ImageRgb8(pattern_rgb(16, 16)),
        image::ImageFormat::Jpeg,
    );
    // The fuzz limits for most cases, the server's defaults (and a 50 Mpx cap, the CLI's
    // default) for some: a header over them must be refused before any pixel is decoded.
    let server = DecodeLimits {
        max_pixels: 50_000_000,
        ..DecodeLimits::default()
    };
    let mut stats = Stats::default();
    for case in 0..1200 {
        let (w, h) = (dim(&mut rng), dim(&mut rng));
        let fmt = case % 6;
        let b = match fmt {
            0 => huge_png(w, h, &mut rng),
            1 => huge_jpeg(w, h, &template),
            2 => huge_gif(w, h, rng.below(2) == 0),
            3 => huge_webp(w, h, &mut rng),
            4 => common::bmp_header(w as i32, h as i32),
            _ => huge_tiff(w, h),
        };
        // What the header really says once the format has masked the fields (VP8L and VP8
        // sizes are 14-bit, VP8X 24-bit, JPEG and GIF 16-bit).
        let header = image::ImageReader::new(Cursor::new(&b))
            .with_guessed_format()
            .ok()
            .and_then(|r| r.into_dimensions().ok());
        // The server limits only where the header is over them (a claim within them is real
        // work: a legitimate 50 Mpx image takes seconds, which the fuzz loop cannot afford).
        let over_server = header.is_none_or(|(hw, hh)| {
            u64::from(hw) * u64::from(hh) > server.max_pixels
                || hw > server.max_side
                || hh > server.max_side
        });
        let limits = if over_server && case % 2 == 0 {
            server
        } else {
            fuzz_limits()
        };
        let t0 = Instant::now();
        check(&b, &limits, &mut stats, &|| {
            format!("format {fmt} from {w}x{h}, header {header:?}, seed {seed0:#x}, case {case}")
        });
        if limits == server {
            assert!(
                t0.elapsed() < Duration::from_secs(1),
                "format {fmt} with header {header:?} took {:?} under the server limits",
                t0.elapsed()
            );
        }
    }
    stats.report("huge dimension headers");
    assert!(stats.cases >= 1000);
    assert!(stats.errors.get("too_large").copied().unwrap_or(0) > 100);
}
