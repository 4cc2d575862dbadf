//! `--model` resolution that honours `HF_HUB_OFFLINE`: with it set, a Hub id is looked up in
//! the local Hugging Face cache only and never touches the network (hf-hub 0.4, used by
//! [`crescent_model::hub`], ignores the variable).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use crescent_model::hub::{self, TOKENIZER_REPO};
use crescent_model::model::ModelFiles;
use crescent_model::weights::{INDEX_FILE, SINGLE_FILE};

/// Whether `HF_HUB_OFFLINE` asks for offline mode (`1`, `true`, `yes`, `on`).
pub fn hub_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// Resolve `--model`: a local folder as is; a Hub id from the cache when offline, otherwise
/// through [`hub::resolve`] (which downloads with progress bars on stderr).
pub fn resolve_model(spec: &str) -> Result<ModelFiles> {
    let p = Path::new(spec);
    if !p.exists() && hub::is_hub_id(spec) && hub_offline() {
        return from_cache(spec);
    }
    Ok(hub::resolve(spec)?)
}

/// The files of Hub model `id` found in the local cache, or an error naming what is missing.
fn from_cache(id: &str) -> Result<ModelFiles> {
    let cache = hf_hub::Cache::from_env();
    let missing = |file: &str| {
        anyhow!(
            "HF_HUB_OFFLINE is set and {file} of {id} is not in the Hugging Face cache ({}); \
             pass --model DIR with a local copy",
            cache.path().display()
        )
    };
    let repo = cache.model(id.to_string());
    let config = repo
        .get("config.json")
        .ok_or_else(|| missing("config.json"))?;
    let dir = config
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    match repo.get(INDEX_FILE) {
        Some(index) => {
            let text = std::fs::read_to_string(&index)
                .with_context(|| format!("cannot read {}", index.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", index.display()))?;
            let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
                bail!("{} has no \"weight_map\" object", index.display());
            };
            for shard in map.values().filter_map(|s| s.as_str()) {
                repo.get(shard).ok_or_else(|| missing(shard))?;
            }
        }
        None => {
            repo.get(SINGLE_FILE).ok_or_else(|| missing(SINGLE_FILE))?;
        }
    }
    let tokenizer = repo
        .get("tokenizer.json")
        .or_else(|| {
            cache
                .model(TOKENIZER_REPO.to_string())
                .get("tokenizer.json")
        })
        .ok_or_else(|| missing("tokenizer.json"))?;
    Ok(ModelFiles {
        config: dir.join("config.json"),
        dir,
        tokenizer,
    })
}
