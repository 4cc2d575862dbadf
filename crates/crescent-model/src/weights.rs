//! Checkpoint access: memory-mapped safetensors (single file or sharded), with every tensor's
//! name, shape and dtype checked against what the model expects.
//!
//! Large weights are used in place from the mapping, in the checkpoint's dtype (bf16 for the real
//! model); the kernels convert in registers, so memory stays ≈ the checkpoint size.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;

use crate::error::{ModelError, Result};

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where one tensor lives.
#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    /// Absolute byte range inside the file.
    start: usize,
    end: usize,
}

/// The safetensors files of one model folder, memory-mapped. Large weights can be used in
/// place ([`Checkpoint::mapped`]): the model then holds no copy, and its memory is the
/// checkpoint's pages the OS keeps resident.
pub struct Checkpoint {
    maps: Vec<Arc<Mmap>>,
    index: BTreeMap<String, Entry>,
    used: RefCell<BTreeSet<String>>,
    files: Vec<PathBuf>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("files", &self.files)
            .field("tensors", &self.index.len())
            .finish()
    }
}

/// A tensor's bytes inside a memory-mapped checkpoint file.
#[derive(Clone, Debug)]
pub struct MappedBytes {
    map: Arc<Mmap>,
    start: usize,
    end: usize,
}

impl MappedBytes {
    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }

    /// Drops this tensor's pages from the process (`madvise(MADV_DONTNEED)`; best effort,
    /// Unix only) — after a load-time conversion (quantization) read them, so that they stop
    /// counting in the resident set. The bytes stay valid: a later read faults them in again
    /// from the file.
    pub fn release(&self) {
        #[cfg(unix)]
        {
            let len = self.end - self.start;
            if len == 0 {
                return;
            }
            // SAFETY: `Mmap::map` maps the file read-only and shared (MAP_SHARED, PROT_READ).
            // MADV_DONTNEED on such a mapping only drops this process's page-table entries: the
            // next access re-reads the same file contents, so every outstanding borrow of the
            // mapping (including other tensors sharing the boundary pages) keeps seeing the
            // same bytes. The range lies inside the mapping (checked by the header validation).
            let r = unsafe {
                self.map
                    .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, self.start, len)
            };
            if let Err(e) = r {
                tracing::debug!(error = %e, "madvise(DONTNEED) failed");
            }
        }
    }
}

/// The safetensors files that make up the checkpoint in `dir`.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.exists() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| ModelError::Checkpoint(format!("cannot read {}: {e}", index.display())))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            ModelError::Checkpoint(format!("{} is not valid JSON: {e}", index.display()))
        })?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| {
                ModelError::Checkpoint(format!("{} has no \"weight_map\" object", index.display()))
            })?;
        let mut shards = BTreeSet::new();
        for (name, file) in map {
            let f = file.as_str().ok_or_else(|| {
                ModelError::Checkpoint(format!(
                    "{}: shard of `{name}` is not a string",
                    index.display()
                ))
            })?;
            if f.contains('/') || f.contains('\\') || f.contains("..") {
                return Err(ModelError::Checkpoint(format!(
                    "{}: invalid shard name {f:?}",
                    index.display()
                )));
            }
            shards.insert(f.to_string());
        }
        if shards.is_empty() {
            return Err(ModelError::Checkpoint(format!(
                "{} lists no shards",
                index.display()
            )));
        }
        let files: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
        for f in &files {
            if !f.exists() {
                return Err(ModelError::Checkpoint(format!(
                    "missing checkpoint shard {}",
                    f.display()
                )));
            }
        }
        return Ok(files);
    }
    let single = dir.join(SINGLE_FILE);
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(ModelError::Checkpoint(format!(
        "no {SINGLE_FILE} or {INDEX_FILE} in {}",
        dir.display()
    )))
}

fn dtype_name(d: safetensors::Dtype) -> String {
    format!("{d:?}").to_lowercase()
}

impl Checkpoint {
    /// Open the checkpoint of a model folder (`model.safetensors` or the shards listed by
    /// `model.safetensors.index.json`).
    pub fn open(dir: &Path) -> Result<Self> {
        let files = checkpoint_files(dir)?;
        Self::open_files(&files)
    }

    /// Open the given safetensors files as one checkpoint.
    pub fn open_files(files: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::with_capacity(files.len());
        let mut index = BTreeMap::new();
        for (fi, f) in files.iter().enumerate() {
            check_header(f)?;
            let file = std::fs::File::open(f)
                .map_err(|e| ModelError::Checkpoint(format!("cannot open {}: {e}", f.display())))?;
            // SAFETY: the file is mapped read-only; like every mmap-based loader we rely on it not
            // being truncated or rewritten while the process runs.
            let map = unsafe { Mmap::map(&file) }
                .map_err(|e| ModelError::Checkpoint(format!("cannot map {}: {e}", f.display())))?;
            let (header_len, meta) =
                safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
                    ModelError::Checkpoint(format!(
                        "{}: invalid safetensors header: {e}",
                        f.display()
                    ))
                })?;
            let base = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                index.insert(
                    name,
                    Entry {
                        file: fi,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        start: base + s,
                        end: base + e,
                    },
                );
            }
            maps.push(Arc::new(map));
        }
        Ok(Self {
            maps,
            index,
            used: RefCell::new(BTreeSet::new()),
            files: files.to_vec(),
        })
    }

    /// Whether the checkpoint holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Shape of `name` as stored.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.index.get(name).map(|e| e.shape.clone())
    }

    fn entry(&self, name: &str, shape: &[usize]) -> Result<&Entry> {
        let e = self
            .index
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.to_string(),
                expected: shape.to_vec(),
            })?;
        match e.dtype {
            safetensors::Dtype::BF16 | safetensors::Dtype::F16 | safetensors::Dtype::F32 => {}
            other => {
                return Err(ModelError::BadDtype {
                    name: name.to_string(),
                    found: dtype_name(other),
                })
            }
        }
        if e.shape != shape {
            return Err(ModelError::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                found: e.shape.clone(),
            });
        }
        self.used.borrow_mut().insert(name.to_string());
        Ok(e)
    }

    /// Load (copy) `name`, checking that its shape is `shape`; it keeps its stored dtype
    /// (bf16, f16 or f32).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let e = self.entry(name, shape)?;
        let dtype = match e.dtype {
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            _ => DType::F32,
        };
        let bytes = &self.maps[e.file][e.start..e.end];
        Tensor::from_raw_buffer(bytes, dtype, shape, &Device::Cpu)
            .map_err(|err| ModelError::Checkpoint(format!("cannot load `{name}`: {err}")))
    }

    /// `name`'s bytes in place (no copy) with its storage dtype, after the same checks as
    /// [`Checkpoint::get`].
    pub fn mapped(&self, name: &str, shape: &[usize]) -> Result<(MappedBytes, DType)> {
        let e = self.entry(name, shape)?;
        let dtype = match e.dtype {
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F16 => DType::F16,
            _ => DType::F32,
        };
        Ok((
            MappedBytes {
                map: Arc::clone(&self.maps[e.file]),
                start: e.start,
                end: e.end,
            },
            dtype,
        ))
    }

    /// Load `name` as f32 (for small vectors: norms, biases, Fourier features).
    pub fn get_f32(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        Ok(self.get(name, shape)?.to_dtype(DType::F32)?)
    }

    /// Load a 2-D tensor stored as `shape` or as its transpose (the md3 layout stores region
    /// Fourier matrices transposed, spec §3.1 notes).
    pub fn get_maybe_transposed(&self, name: &str, shape: [usize; 2]) -> Result<Tensor> {
        if let Some(found) = self.shape_of(name) {
            if found == [shape[1], shape[0]] && shape[0] != shape[1] {
                let t = self.get(name, &[shape[1], shape[0]])?;
                return Ok(t.t()?.contiguous()?);
            }
        }
        self.get(name, &shape)
    }

    /// Tensors of the file that were never loaded.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        self.index
            .keys()
            .filter(|n| !used.contains(*n))
            .cloned()
            .collect()
    }

    /// Number of tensors in the checkpoint.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the checkpoint holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

/// Validate a safetensors header before mmap-parsing it, so a truncated or corrupt file gives a
/// clear error naming the file.
fn check_header(path: &Path) -> Result<()> {
    use std::io::Read;
    let meta = std::fs::metadata(path)
        .map_err(|e| ModelError::Checkpoint(format!("cannot open {}: {e}", path.display())))?;
    let len = meta.len();
    let mut f = std::fs::File::open(path)
        .map_err(|e| ModelError::Checkpoint(format!("cannot open {}: {e}", path.display())))?;
    let mut head = [0u8; 8];
    if len < 8 || f.read_exact(&mut head).is_err() {
        return Err(ModelError::Checkpoint(format!(
            "{} is not a safetensors file (too short)",
            path.display()
        )));
    }
    let n = u64::from_le_bytes(head);
    if n == 0 || n > 100_000_000 || 8 + n > len {
        return Err(ModelError::Checkpoint(format!(
            "{} is not a valid safetensors file (header length {n}, file length {len})",
            path.display()
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|e| ModelError::Checkpoint(format!("cannot read {}: {e}", path.display())))?;
    let v: serde_json::Value = serde_json::from_slice(&header).map_err(|e| {
        ModelError::Checkpoint(format!(
            "{} has a corrupt safetensors header: {e}",
            path.display()
        ))
    })?;
    let obj = v.as_object().ok_or_else(|| {
        ModelError::Checkpoint(format!(
            "{} has a corrupt safetensors header",
            path.display()
        ))
    })?;
    let data_len = len - 8 - n;
    for (name, info) in obj {
        if name == "__metadata__" {
            continue;
        }
        let end = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|a| a.get(1))
            .and_then(|e| e.as_u64())
            .ok_or_else(|| {
                ModelError::Checkpoint(format!(
                    "{}: tensor `{name}` has no data_offsets",
                    path.display()
                ))
            })?;
        if end > data_len {
            return Err(ModelError::Checkpoint(format!(
                "{} is truncated: tensor `{name}` ends at byte {end} of a {data_len}-byte data section",
                path.display()
            )));
        }
    }
    Ok(())
}

/// A write helper used by tests and tools: save f32/bf16 tensors as one safetensors file.
pub fn save(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| ModelError::Checkpoint(format!("cannot write {}: {e}", path.display())))
}
