//! Image inputs: `data:image/...;base64,` URIs or bare base64, decoded and preprocessed off the
//! async workers.

use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine as _;
use crescent_engine::{EngineHandle, ImageInput};
use crescent_image::DecodeLimits;

use crate::error::ApiError;

const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Decode an image URL (a `data:` URI with base64 payload, or bare base64) to bytes; `field`
/// names the field in errors.
pub fn decode_image_url(field: &str, url: &str) -> Result<Vec<u8>, ApiError> {
    let url = url.trim();
    let payload = if let Some(rest) = strip_prefix_ci(url, "data:") {
        let Some((meta, data)) = rest.split_once(',') else {
            return Err(ApiError::bad_field(
                field,
                "invalid_image_url",
                "malformed data URI (no ',' separator)",
            ));
        };
        if !meta
            .split(';')
            .any(|p| p.trim().eq_ignore_ascii_case("base64"))
        {
            return Err(ApiError::bad_field(
                field,
                "invalid_image_url",
                "data URI must be base64-encoded (`data:image/...;base64,...`)",
            ));
        }
        data
    } else if strip_prefix_ci(url, "http://").is_some()
        || strip_prefix_ci(url, "https://").is_some()
    {
        return Err(ApiError::bad_field(
            field,
            "invalid_image_url",
            "remote image URLs are not fetched; send a `data:image/...;base64,` URI or bare base64",
        ));
    } else {
        url
    };
    if payload.is_empty() {
        return Err(ApiError::bad_field(
            field,
            "invalid_base64",
            "empty image data",
        ));
    }
    let compact: Vec<u8> = payload
        .bytes()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    let res = if compact.iter().any(|&b| b == b'-' || b == b'_') {
        URL_SAFE_LENIENT.decode(&compact)
    } else {
        STANDARD_LENIENT.decode(&compact)
    };
    res.map_err(|e| ApiError::bad_field(field, "invalid_base64", format!("invalid base64: {e}")))
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Decode `url` and preprocess the image for the engine's model on the blocking pool.
pub async fn load_image(
    engine: &EngineHandle,
    field: &str,
    url: String,
    limits: DecodeLimits,
) -> Result<ImageInput, ApiError> {
    let model = std::sync::Arc::clone(engine.model());
    let field_owned = field.to_string();
    // Bound concurrent decodes: each may allocate up to the decode limits, so an unbounded
    // number of them could exhaust memory under a burst of large images.
    let _permit = decode_permits()
        .acquire()
        .await
        .map_err(|_| ApiError::internal("image decoder closed"))?;
    let task = tokio::task::spawn_blocking(move || {
        let bytes = decode_image_url(&field_owned, &url)?;
        drop(url);
        crescent_engine::prepare_image(&model, &bytes, &limits)
            .map_err(|e| ApiError::from_image(&field_owned, &e))
    });
    match task.await {
        Ok(r) => r,
        Err(e) => Err(ApiError::internal(format!(
            "image decoding task failed: {e}"
        ))),
    }
}

/// Concurrent image decodes allowed (twice the cores, at least 2).
fn decode_permits() -> &'static tokio::sync::Semaphore {
    static SEM: std::sync::OnceLock<tokio::sync::Semaphore> = std::sync::OnceLock::new();
    SEM.get_or_init(|| {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get());
        tokio::sync::Semaphore::new((2 * n).max(2))
    })
}
