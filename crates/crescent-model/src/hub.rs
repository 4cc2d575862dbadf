//! Resolving `--model`: a local folder, or a Hugging Face Hub id downloaded into the HF cache
//! (with progress bars on stderr) when the machine is online.

use std::path::{Path, PathBuf};

use crate::error::{ModelError, Result};
use crate::model::ModelFiles;
use crate::weights::{INDEX_FILE, SINGLE_FILE};

/// The default model id.
pub const DEFAULT_MODEL: &str = "moondream/moondream3-preview";
/// Hub repository holding the Moondream 3 tokenizer (spec §2.3).
pub const TOKENIZER_REPO: &str = "moondream/starmie-v1";

/// Whether `spec` looks like a Hub id (`owner/name`) rather than a path.
pub fn is_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && !p.starts_with('.')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        })
}

/// Resolve a `--model` argument to local files: an existing folder is used as is; a Hub id is
/// downloaded (or found in the HF cache).
pub fn resolve(spec: &str) -> Result<ModelFiles> {
    let p = Path::new(spec);
    if p.is_dir() {
        return Ok(ModelFiles::in_dir(p));
    }
    if p.exists() {
        return Err(ModelError::Checkpoint(format!(
            "--model {spec} is a file; pass the model folder"
        )));
    }
    if !is_hub_id(spec) {
        return Err(ModelError::Checkpoint(format!(
            "model folder {spec} does not exist"
        )));
    }
    download(spec)
}

fn api() -> Result<hf_hub::api::sync::Api> {
    hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| ModelError::Download(format!("cannot set up the Hub client: {e}")))
}

/// Download (or find in the cache) the files of Hub model `id`.
pub fn download(id: &str) -> Result<ModelFiles> {
    let api = api()?;
    let repo = api.model(id.to_string());
    let hint = |e: &dyn std::fmt::Display| {
        ModelError::Download(format!(
            "cannot fetch {id} from the Hugging Face Hub ({e}); when offline, pass --model DIR with a local copy"
        ))
    };
    let config = repo.get("config.json").map_err(|e| hint(&e))?;
    let dir = config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    match repo.get(INDEX_FILE) {
        Ok(index) => {
            let text = std::fs::read_to_string(&index).map_err(|e| {
                ModelError::Download(format!("cannot read {}: {e}", index.display()))
            })?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                ModelError::Download(format!("{INDEX_FILE} of {id} is not valid JSON: {e}"))
            })?;
            let mut shards: Vec<String> = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.values()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for s in shards {
                repo.get(&s).map_err(|e| hint(&e))?;
            }
        }
        Err(_) => {
            repo.get(SINGLE_FILE).map_err(|e| hint(&e))?;
        }
    }
    let tokenizer = match repo.get("tokenizer.json") {
        Ok(t) => t,
        Err(_) => api
            .model(TOKENIZER_REPO.to_string())
            .get("tokenizer.json")
            .map_err(|e| hint(&e))?,
    };
    Ok(ModelFiles {
        config: dir.join("config.json"),
        dir,
        tokenizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_and_paths() {
        assert!(is_hub_id("moondream/moondream3-preview"));
        assert!(!is_hub_id("./models/md3"));
        assert!(!is_hub_id("/abs/path"));
        assert!(!is_hub_id("a/b/c"));
        assert!(!is_hub_id("../x"));
    }

    #[test]
    fn local_folder_resolves_without_network() {
        let d = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/md3-tiny");
        let f = resolve(d).unwrap();
        assert!(f.tokenizer.exists());
        assert!(f.config.exists());
        let e = resolve("/definitely/not/here").unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
    }
}
