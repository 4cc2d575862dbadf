//! Image preprocessing for Moondream 3 (spec §4), bit-exact with Kestrel.
//!
//! Pipeline: [`decode`] untrusted file bytes into 8-bit RGB (Kestrel's `decode_image` +
//! `ensure_srgb`), choose the crop grid with [`select_tiling`] / [`tiling_for`], resize with
//! [`resize_lanczos3`] (integer box pre-shrink followed by `fast_image_resize` 5.5.0 Lanczos3) and cut
//! the overlapping crops with [`overlap_crops`]. [`Crops::normalized_chw`] turns the u8 crops into
//! the model's `[-1, 1]` input through Kestrel's bf16 stepwise table [`pixel_lut`].
//!
//! Nothing here depends on the particular model size: every geometric quantity comes from
//! [`CropConfig`].

#![deny(missing_docs)]

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};

use fast_image_resize as fir;
use image::{ImageDecoder, ImageReader};

/// Decoded 8-bit RGB image, row-major HWC (`data.len() == width * height * 3`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels (columns).
    pub width: usize,
    /// Height in pixels (rows).
    pub height: usize,
    /// Pixels, row-major, 3 bytes (R, G, B) per pixel.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Builds an image, checking that `data.len() == width * height * 3`.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<RgbImage, ImageError> {
        let expected = width
            .checked_mul(height)
            .and_then(|n| n.checked_mul(3))
            .ok_or_else(|| {
                ImageError::InvalidInput(format!("image size {width}x{height} overflows"))
            })?;
        if data.len() != expected {
            return Err(ImageError::InvalidInput(format!(
                "RGB buffer has {} bytes, expected {expected} for {width}x{height}",
                data.len()
            )));
        }
        Ok(RgbImage {
            width,
            height,
            data,
        })
    }

    /// True when `data.len() == width * height * 3`.
    pub fn is_consistent(&self) -> bool {
        self.width
            .checked_mul(self.height)
            .and_then(|n| n.checked_mul(3))
            .is_some_and(|n| n == self.data.len())
    }
}

/// Limits applied while decoding untrusted bytes.
///
/// Dimensions are checked from the file header before any pixel data is decoded, so a small
/// file that claims a huge image (a decompression bomb) is rejected cheaply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Maximum `width * height`.
    pub max_pixels: u64,
    /// Maximum width and maximum height.
    pub max_side: u32,
    /// Maximum bytes for the decoder's buffers (decoded image plus the RGB copy).
    pub max_alloc_bytes: u64,
}

impl Default for DecodeLimits {
    /// 100 megapixels, 20000 px per side, 1 GiB of allocations.
    fn default() -> Self {
        DecodeLimits {
            max_pixels: 100_000_000,
            max_side: 20_000,
            max_alloc_bytes: 1 << 30,
        }
    }
}

/// Errors from decoding and preprocessing.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The input has no bytes.
    #[error("image is empty (0 bytes)")]
    Empty,
    /// The bytes are not a recognised image format.
    #[error("unknown image format (expected PNG, JPEG, WebP, GIF, BMP or TIFF)")]
    UnknownFormat,
    /// The format is recognised but this variant of it is not supported.
    #[error("unsupported image: {0}")]
    Unsupported(String),
    /// The file is corrupt or truncated.
    #[error("failed to decode image: {0}")]
    Decode(String),
    /// The header announces an image larger than the limits.
    #[error("image too large: {width}x{height} exceeds {limit}")]
    TooLarge {
        /// Width announced by the header.
        width: u32,
        /// Height announced by the header.
        height: u32,
        /// Which limit was exceeded.
        limit: String,
    },
    /// A decoder limit was hit before the dimensions were known or while decoding.
    #[error("image exceeds decoding limits: {0}")]
    LimitExceeded(String),
    /// The image has zero width or zero height.
    #[error("image has zero width or height")]
    ZeroSized,
    /// A caller-supplied buffer or parameter is inconsistent.
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

/// Collapses a third-party error message to one trimmed line.
fn one_line(msg: impl std::fmt::Display) -> String {
    msg.to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn map_image_error(e: image::ImageError) -> ImageError {
    match e {
        image::ImageError::Limits(l) => ImageError::LimitExceeded(one_line(l)),
        image::ImageError::Unsupported(u) => ImageError::Unsupported(one_line(u)),
        // Some decoders (BMP, WebP) refuse an oversized header with their own format error
        // ("Image too large") before our limits are even consulted: it is still an image over
        // the limits, not a corrupt one.
        image::ImageError::Decoding(d)
            if one_line(&d).to_ascii_lowercase().contains("too large") =>
        {
            ImageError::LimitExceeded(one_line(d))
        }
        other => ImageError::Decode(one_line(other)),
    }
}

/// Decode PNG / JPEG / WebP / GIF (first frame) / BMP / TIFF bytes to 8-bit RGB.
///
/// The format is detected from the content. The header dimensions are checked against `limits`
/// before decoding (and `image::Limits` is applied to the decoder too). Colour follows Kestrel
/// (`kestrel_native.decode_image` + `ensure_srgb`, i.e. the `image` crate's RGB8 conversion):
/// grey is replicated, grey+alpha → grey replicated, RGBA → the first 3 channels (alpha dropped,
/// *not* composited), palette expanded, 16-bit → 8-bit by `round(v / 257)`, float samples clamped
/// to `[0, 1]` and scaled to `0..=255`. EXIF orientation is not applied. JPEG is decoded by
/// zune-jpeg (inside the `image` crate), as Kestrel does.
///
/// Never panics on malformed input: a panic inside a third-party decoder is caught and
/// reported as [`ImageError::Decode`].
pub fn decode(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    match catch_unwind(AssertUnwindSafe(|| decode_inner(bytes, limits))) {
        Ok(r) => r,
        Err(_) => Err(ImageError::Decode(
            "decoder panicked on malformed input".into(),
        )),
    }
}

fn decode_inner(bytes: &[u8], limits: &DecodeLimits) -> Result<RgbImage, ImageError> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Decode(one_line(e)))?;
    if reader.format().is_none() {
        return Err(ImageError::UnknownFormat);
    }
    // Header pass: only the allocation limit, so that the real dimensions can be reported.
    let mut header_limits = image::Limits::default();
    header_limits.max_alloc = Some(limits.max_alloc_bytes);
    reader.limits(header_limits.clone());
    let mut decoder = reader.into_decoder().map_err(map_image_error)?;

    let (w, h) = decoder.dimensions();
    if w == 0 || h == 0 {
        return Err(ImageError::ZeroSized);
    }
    let too_large = |limit: String| ImageError::TooLarge {
        width: w,
        height: h,
        limit,
    };
    if w > limits.max_side || h > limits.max_side {
        return Err(too_large(format!(
            "the limit of {} px per side",
            limits.max_side
        )));
    }
    let pixels = u64::from(w) * u64::from(h);
    if pixels > limits.max_pixels {
        return Err(too_large(format!(
            "the limit of {} pixels",
            limits.max_pixels
        )));
    }
    let decoded_bytes = decoder.total_bytes();
    let needed = decoded_bytes.saturating_add(pixels.saturating_mul(3));
    if needed > limits.max_alloc_bytes {
        return Err(too_large(format!(
            "the allocation limit of {} bytes ({needed} needed)",
            limits.max_alloc_bytes
        )));
    }

    let mut dec_limits = image::Limits::default();
    dec_limits.max_image_width = Some(limits.max_side);
    dec_limits.max_image_height = Some(limits.max_side);
    dec_limits.max_alloc = Some(limits.max_alloc_bytes);
    dec_limits.reserve(decoded_bytes).map_err(map_image_error)?;
    decoder.set_limits(dec_limits).map_err(map_image_error)?;

    let img = image::DynamicImage::from_decoder(decoder).map_err(map_image_error)?;
    let (iw, ih) = (img.width(), img.height());
    if iw != w || ih != h {
        return Err(ImageError::Decode(format!(
            "decoder returned {iw}x{ih}, header said {w}x{h}"
        )));
    }
    let rgb = img.into_rgb8();
    RgbImage::new(iw as usize, ih as usize, rgb.into_raw())
        .map_err(|e| ImageError::Decode(e.to_string()))
}

/// Geometry of the crops (from the model's vision config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropConfig {
    /// Side of every square crop in pixels (378).
    pub crop_size: usize,
    /// Side of a vision patch in pixels (14).
    pub patch_size: usize,
    /// Overlap margin in patches on each side of a local crop (4).
    pub overlap_margin: usize,
    /// Maximum number of local crops (12).
    pub max_crops: usize,
}

impl Default for CropConfig {
    /// Moondream 3: crop 378, patch 14, margin 4, at most 12 local crops.
    fn default() -> Self {
        CropConfig {
            crop_size: 378,
            patch_size: 14,
            overlap_margin: 4,
            max_crops: 12,
        }
    }
}

impl CropConfig {
    /// Crop grid in patches: `crop_size / patch_size` (0 when `patch_size == 0`).
    pub fn grid(&self) -> usize {
        self.crop_size.checked_div(self.patch_size).unwrap_or(0)
    }

    /// Margin in pixels on each side: `overlap_margin * patch_size`.
    pub fn margin_px(&self) -> usize {
        self.overlap_margin.saturating_mul(self.patch_size)
    }

    /// Usable window (stride between local crops) in pixels:
    /// `(grid - 2 * overlap_margin) * patch_size`, 0 if the margins cover the whole grid.
    pub fn window(&self) -> usize {
        self.grid()
            .saturating_sub(self.overlap_margin.saturating_mul(2))
            .saturating_mul(self.patch_size)
    }

    /// Size `(height, width)` of the image the local crops are cut from for a given tiling:
    /// `(th * window + 2 * margin_px, tw * window + 2 * margin_px)`.
    pub fn resized_hw(&self, tiling: (usize, usize)) -> (usize, usize) {
        let m2 = self.margin_px().saturating_mul(2);
        let w = self.window();
        (
            tiling.0.saturating_mul(w).saturating_add(m2),
            tiling.1.saturating_mul(w).saturating_add(m2),
        )
    }
}

/// Tile grid `(rows, cols)` for a margin-stripped image size, exactly as spec §4.3 (f64
/// arithmetic, as the Python reference). `crop_window` is the usable window in pixels (266).
pub fn select_tiling(
    height: usize,
    width: usize,
    crop_window: usize,
    max_crops: usize,
) -> (usize, usize) {
    if height <= crop_window || width <= crop_window || crop_window == 0 {
        return (1, 1);
    }
    let (h, w, c, n) = (
        height as f64,
        width as f64,
        crop_window as f64,
        max_crops as f64,
    );
    let min_h = (h / c).ceil();
    let min_w = (w / c).ceil();
    if min_h * min_w > n {
        let ratio = (n / (min_h * min_w)).sqrt();
        let th = (min_h * ratio).floor().max(1.0);
        let tw = (min_w * ratio).floor().max(1.0);
        return (th as usize, tw as usize);
    }
    let mut th = (n * h / w).sqrt().floor();
    let mut tw = (n * w / h).sqrt().floor();
    th = th.max(min_h);
    tw = tw.max(min_w);
    if th * tw > n {
        if tw > th {
            tw = (n / th).floor();
        } else {
            th = (n / tw).floor();
        }
    }
    (th.max(1.0) as usize, tw.max(1.0) as usize)
}

/// Tiling for an original image of `height x width` pixels:
/// `select_tiling(max(1, H - 2*margin_px), max(1, W - 2*margin_px), window, max_crops)` with
/// `window = (grid - 2*margin) * patch`, `grid = crop_size / patch_size`,
/// `margin_px = overlap_margin * patch_size`.
pub fn tiling_for(height: usize, width: usize, cfg: &CropConfig) -> (usize, usize) {
    let m2 = cfg.margin_px().saturating_mul(2);
    select_tiling(
        height.saturating_sub(m2).max(1),
        width.saturating_sub(m2).max(1),
        cfg.window(),
        cfg.max_crops,
    )
}

/// Integer pre-shrink factor for one axis: `floor(src / dst)` if `src / dst > 2.5`, else 1.
fn shrink_factor(src: usize, dst: usize) -> usize {
    let s = src as f64 / dst as f64;
    if s > 2.5 {
        (s.floor() as usize).max(1)
    } else {
        1
    }
}

/// Sum aligned `ky x kx` blocks (the remainder rows / columns are dropped) and scale each sum by
/// the fixed-point reciprocal `(sum * ceil(65536 / n)) >> 16`, `n = kx * ky`, truncated to u8.
///
/// The truncation reproduces Kestrel bit for bit: for some `n > 257` (e.g. 315, 961) a block
/// averaging about 255 gives 256..263, which Kestrel (and the Python reference model) wrap to
/// 0..7. That only happens for near-white blocks in downscales by more than ~16x on both axes
/// combined (e.g. the global crop of an 8000x6000 photo).
fn box_preshrink(img: &RgbImage, ky: usize, kx: usize) -> RgbImage {
    let oh = img.height / ky;
    let ow = img.width / kx;
    let n = (kx * ky) as u64;
    let recip = 65536u64.div_ceil(n);
    let stride = img.width * 3;
    let mut acc = vec![0u64; ow * 3];
    let mut out = vec![0u8; oh * ow * 3];
    for (oy, out_row) in out.chunks_exact_mut(ow * 3).enumerate() {
        acc.iter_mut().for_each(|a| *a = 0);
        for dy in 0..ky {
            let row = &img.data[(oy * ky + dy) * stride..][..ow * kx * 3];
            for (ox, block) in row.chunks_exact(kx * 3).enumerate() {
                let (mut r, mut g, mut b) = (0u64, 0u64, 0u64);
                for px in block.chunks_exact(3) {
                    r += u64::from(px[0]);
                    g += u64::from(px[1]);
                    b += u64::from(px[2]);
                }
                acc[ox * 3] += r;
                acc[ox * 3 + 1] += g;
                acc[ox * 3 + 2] += b;
            }
        }
        for (o, &s) in out_row.iter_mut().zip(acc.iter()) {
            *o = ((s * recip) >> 16) as u8; // wraps like Kestrel
        }
    }
    RgbImage {
        width: ow,
        height: oh,
        data: out,
    }
}

/// Kestrel's resize (`kestrel_native.resize_lanczos3`): when an axis is shrunk by more than
/// 2.5x, first an integer box pre-shrink by `k = floor(src / dst)` on that axis (fixed-point
/// reciprocal `(sum * ceil(65536 / n)) >> 16`, truncated to u8 exactly as Kestrel does, see the
/// note on wrapping below), then `fast_image_resize` 5.5.0
/// `Convolution(Lanczos3)` on `U8x3` to `target_h x target_w`.
///
/// Wrapping: for pre-shrink block sizes `n = kx * ky` where `n * ceil(65536 / n) >= 65793`
/// (e.g. 315 = 21x15, the global crop of an 8000x6000 image) a near-white block overflows to
/// 256..263 and wraps to 0..7, as in `kestrel_native` 0.1.8; this function keeps that behaviour
/// for bit-exactness.
///
/// A zero-sized source or an inconsistent buffer (`data.len() != width * height * 3`) yields an
/// all-zero image of the target size; a zero target yields an empty image.
pub fn resize_lanczos3(img: &RgbImage, target_h: usize, target_w: usize) -> RgbImage {
    let mut out = RgbImage {
        width: target_w,
        height: target_h,
        data: vec![0u8; target_w.saturating_mul(target_h).saturating_mul(3)],
    };
    if target_h == 0 || target_w == 0 || img.width == 0 || img.height == 0 || !img.is_consistent() {
        return out;
    }
    let ky = shrink_factor(img.height, target_h);
    let kx = shrink_factor(img.width, target_w);
    let shrunk;
    let src = if kx > 1 || ky > 1 {
        shrunk = box_preshrink(img, ky, kx);
        &shrunk
    } else {
        img
    };
    let (Ok(sw), Ok(sh), Ok(dw), Ok(dh)) = (
        u32::try_from(src.width),
        u32::try_from(src.height),
        u32::try_from(target_w),
        u32::try_from(target_h),
    ) else {
        return out;
    };
    let Ok(src_view) = fir::images::ImageRef::new(sw, sh, &src.data, fir::PixelType::U8x3) else {
        return out;
    };
    let Ok(mut dst_view) =
        fir::images::Image::from_slice_u8(dw, dh, &mut out.data, fir::PixelType::U8x3)
    else {
        return out;
    };
    let options = fir::ResizeOptions::new()
        .resize_alg(fir::ResizeAlg::Convolution(fir::FilterType::Lanczos3));
    let mut resizer = fir::Resizer::new();
    if resizer.resize(&src_view, &mut dst_view, &options).is_err() {
        out.data.iter_mut().for_each(|v| *v = 0);
    }
    out
}

/// The overlapping crops of one image, u8, `[count, size, size, 3]` (HWC per crop).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Crops {
    /// Local tile grid `(rows, cols)`.
    pub tiling: (usize, usize),
    /// Number of crops: `rows * cols + 1` (global crop first).
    pub count: usize,
    /// Side of each crop in pixels.
    pub size: usize,
    /// Pixels `[count, size, size, 3]`, row-major.
    pub data: Vec<u8>,
}

/// The overlapping crops of an image: index 0 is the global crop (the whole image resized to
/// `crop_size x crop_size`, aspect ratio not preserved); then the local crops in row-major order,
/// crop `1 + i*tw + j` = `R[i*window .., j*window ..]` (`crop_size` square) where `R` is the image
/// resized to [`CropConfig::resized_hw`] of the tiling from [`tiling_for`]. Any part of a crop
/// outside `R` (only possible if `crop_size` is not a multiple of `patch_size`) is zero.
pub fn overlap_crops(img: &RgbImage, cfg: &CropConfig) -> Crops {
    let tiling = tiling_for(img.height, img.width, cfg);
    let (th, tw) = tiling;
    let (rh, rw) = cfg.resized_hw(tiling);
    let size = cfg.crop_size;
    let window = cfg.window();
    let count = th * tw + 1;
    let crop_bytes = size * size * 3;
    let mut data = vec![0u8; count * crop_bytes];

    let global = resize_lanczos3(img, size, size);
    data[..crop_bytes].copy_from_slice(&global.data);
    drop(global);

    let resized = resize_lanczos3(img, rh, rw);
    for i in 0..th {
        for j in 0..tw {
            let crop = &mut data[(1 + i * tw + j) * crop_bytes..][..crop_bytes];
            let (y0, x0) = (i * window, j * window);
            let rows = size.min(rh.saturating_sub(y0));
            let cols = size.min(rw.saturating_sub(x0));
            if rows == 0 || cols == 0 {
                continue;
            }
            for y in 0..rows {
                let src = &resized.data[((y0 + y) * rw + x0) * 3..][..cols * 3];
                crop[y * size * 3..][..cols * 3].copy_from_slice(src);
            }
        }
    }
    Crops {
        tiling,
        count,
        size,
        data,
    }
}

impl Crops {
    /// Normalised pixels `[count, 3, size, size]` (channel-first) through [`pixel_lut`].
    pub fn normalized_chw(&self) -> Vec<f32> {
        let lut = pixel_lut();
        let plane = self.size * self.size;
        let mut out = vec![0f32; self.count * 3 * plane];
        for (src, dst) in self
            .data
            .chunks_exact(plane * 3)
            .zip(out.chunks_exact_mut(plane * 3))
        {
            let (r, gb) = dst.split_at_mut(plane);
            let (g, b) = gb.split_at_mut(plane);
            for (k, px) in src.chunks_exact(3).enumerate() {
                r[k] = lut[px[0] as usize];
                g[k] = lut[px[1] as usize];
                b[k] = lut[px[2] as usize];
            }
        }
        out
    }

    /// Build from crops loaded elsewhere (e.g. the fixture crop PNGs): `data` is
    /// `[tiling.0 * tiling.1 + 1, size, size, 3]`.
    pub fn from_parts(
        tiling: (usize, usize),
        size: usize,
        data: Vec<u8>,
    ) -> Result<Crops, ImageError> {
        if tiling.0 == 0 || tiling.1 == 0 || size == 0 {
            return Err(ImageError::InvalidInput(format!(
                "tiling {tiling:?} and crop size {size} must be non-zero"
            )));
        }
        let count = tiling
            .0
            .checked_mul(tiling.1)
            .and_then(|n| n.checked_add(1))
            .ok_or_else(|| ImageError::InvalidInput(format!("tiling {tiling:?} overflows")))?;
        let expected = size
            .checked_mul(size)
            .and_then(|n| n.checked_mul(3))
            .and_then(|n| n.checked_mul(count))
            .ok_or_else(|| ImageError::InvalidInput(format!("crop size {size} overflows")))?;
        if data.len() != expected {
            return Err(ImageError::InvalidInput(format!(
                "crop buffer has {} bytes, expected {expected} ({count} crops of {size}x{size}x3)",
                data.len()
            )));
        }
        Ok(Crops {
            tiling,
            count,
            size,
            data,
        })
    }

    /// The u8 pixels of crop `index` (`[size, size, 3]`), if it exists.
    pub fn crop(&self, index: usize) -> Option<&[u8]> {
        let n = self.size * self.size * 3;
        self.data
            .get(index.checked_mul(n)?..index.checked_add(1)?.checked_mul(n)?)
    }
}

/// Round an f32 to bfloat16 precision (round to nearest, ties to even), returned as f32.
fn bf16_round(x: f32) -> f32 {
    let bits = x.to_bits();
    if x.is_nan() {
        return f32::from_bits((bits & 0xffff_0000) | 0x0040_0000);
    }
    let lsb = (bits >> 16) & 1;
    let rounded = bits.wrapping_add(0x7fff + lsb) & 0xffff_0000;
    f32::from_bits(rounded)
}

/// Kestrel's bf16 stepwise normalisation table:
/// `v(u) = 2 * bf16(bf16(bf16(u) / 255) - 0.5)` (each operation in f32, rounded to bf16).
/// `v(0) = -1`, `v(64) = -0.49609375`, `v(128) = 0.0078125`, `v(255) = 1`.
pub fn pixel_lut() -> [f32; 256] {
    let mut lut = [0f32; 256];
    for (u, v) in lut.iter_mut().enumerate() {
        let x = bf16_round(u as f32);
        let x = bf16_round(x / 255.0);
        let x = bf16_round(x - 0.5);
        *v = x * 2.0;
    }
    lut
}

/// Convenience: [`decode`] then [`overlap_crops`].
pub fn preprocess(
    bytes: &[u8],
    cfg: &CropConfig,
    limits: &DecodeLimits,
) -> Result<(RgbImage, Crops), ImageError> {
    let img = decode(bytes, limits)?;
    let crops = overlap_crops(&img, cfg);
    Ok((img, crops))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding() {
        assert_eq!(bf16_round(1.0), 1.0);
        // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: rounds to even (1).
        assert_eq!(bf16_round(1.0 + 1.0 / 256.0), 1.0);
        assert_eq!(bf16_round(1.0 + 3.0 / 256.0), 1.0 + 4.0 / 256.0);
        assert_eq!(bf16_round(-0.0).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn preshrink_fixed_point() {
        // n = 70: floor(sum / n) and the fixed-point reciprocal differ for some sums.
        let img = RgbImage {
            width: 70,
            height: 1,
            data: vec![255; 70 * 3],
        };
        let s = box_preshrink(&img, 1, 70);
        assert_eq!((s.width, s.height), (1, 1));
        assert_eq!(s.data, vec![255, 255, 255]);
    }
}
