//! Save a model as an HF directory that transformers' `from_pretrained` loads unchanged:
//! config.json (the source config, its dtype fields set to the saved dtype), the weights under
//! their HF names (sharded with an index above a size limit), and the source's tokenizer files.
//!
//! Every file is written through a temporary name and renamed into place, weights first and
//! config.json last, so a reader never sees a half-written file, and a directory with a
//! config.json has its weights.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rustspeed_kernels::{DType, Float};

use crate::model::Model;
use crate::weights::{self, save_hf_weights, write_atomic, WeightsError};

/// Tokenizer and generation files copied from the source directory when present.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// transformers' shard size default (`max_shard_size="5GB"`).
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON: {message}")]
    ConfigJson { path: PathBuf, message: String },
    #[error("the model config to save is {found}; an HF config.json must be a JSON object")]
    ConfigNotObject { found: &'static str },
    #[error(transparent)]
    Weights(#[from] WeightsError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The dtype's name in HF configs (`torch_dtype` / `dtype`).
pub fn hf_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
    }
}

/// Reads a config.json, given the file or its directory.
pub fn read_config_json(path: &Path) -> Result<serde_json::Value, ExportError> {
    let file = if path.is_dir() {
        path.join("config.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(io_err(&file))?;
    serde_json::from_str(&text).map_err(|e| ExportError::ConfigJson {
        path: file,
        message: e.to_string(),
    })
}

/// The config to write: the source's, with both dtype keys (transformers 4's `torch_dtype`,
/// transformers 5's `dtype`) naming the saved dtype, so either version loads it as saved.
pub fn export_config(
    config: &serde_json::Value,
    dtype: DType,
) -> Result<serde_json::Value, ExportError> {
    let mut out = config.clone();
    let obj = out.as_object_mut().ok_or(ExportError::ConfigNotObject {
        found: json_kind(config),
    })?;
    let name = serde_json::Value::from(hf_dtype_name(dtype));
    obj.insert("torch_dtype".into(), name.clone());
    obj.insert("dtype".into(), name);
    Ok(out)
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// What [`save_pretrained`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct SavedModel {
    pub dir: PathBuf,
    /// The safetensors files (one, or the shards), then the index when sharded.
    pub weight_files: Vec<PathBuf>,
    /// The tokenizer and generation files copied from the source.
    pub copied: Vec<PathBuf>,
}

/// Writes `model` to `dir` as an HF model directory: weights in `dtype` (sharded above
/// `max_shard_bytes` per file), `config` with its dtype set, and the [`TOKENIZER_FILES`] found in
/// `tokenizer_src`. Weight files of an earlier save that this one did not rewrite (other shard
/// counts, a stale index) are removed, since transformers would read them.
pub fn save_pretrained<T: Float>(
    dir: &Path,
    config: &serde_json::Value,
    model: &Model<T>,
    dtype: DType,
    tokenizer_src: Option<&Path>,
    max_shard_bytes: usize,
) -> Result<SavedModel, ExportError> {
    let config = export_config(config, dtype)?;
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    save_hf_weights(dir, &model.layout, &model.params, dtype, max_shard_bytes)?;
    // save_hf_weights starts a new shard only when a tensor would overflow a non-empty one, so
    // it shards exactly when the total exceeds the limit and there are two tensors or more.
    let total = model.layout.numel() * dtype.size_in_bytes();
    let sharded = total > max_shard_bytes && model.layout.slots().len() > 1;
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    if sharded && single.exists() {
        // A stale single file would shadow the fresh index for every reader.
        std::fs::remove_file(&single).map_err(io_err(&single))?;
    }
    let mut weight_files = weights::weight_files(dir)?;
    // The index lists files in tensor-name order; shard order reads better.
    weight_files.sort();
    let mut keep: HashSet<PathBuf> = weight_files.iter().cloned().collect();
    if sharded {
        keep.insert(index.clone());
    }
    remove_stale_weights(dir, &keep)?;

    let mut copied = Vec::new();
    if let Some(src) = tokenizer_src {
        let same_dir = match (src.canonicalize(), dir.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        for name in TOKENIZER_FILES {
            let from = src.join(name);
            if !from.is_file() {
                continue;
            }
            let to = dir.join(name);
            if !same_dir {
                let bytes = std::fs::read(&from).map_err(io_err(&from))?;
                write_atomic(&to, &bytes)?;
            }
            copied.push(to);
        }
    }

    let text = serde_json::to_string_pretty(&config).expect("a JSON value serialises") + "\n";
    write_atomic(&dir.join("config.json"), text.as_bytes())?;

    let mut files = weight_files;
    if sharded {
        files.push(index);
    }
    Ok(SavedModel {
        dir: dir.to_path_buf(),
        weight_files: files,
        copied,
    })
}

/// Removes `model.safetensors`, `model-*-of-*.safetensors` and the index when not in `keep`.
fn remove_stale_weights(dir: &Path, keep: &HashSet<PathBuf>) -> Result<(), ExportError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let is_weights = name == "model.safetensors"
            || name == "model.safetensors.index.json"
            || (name.starts_with("model-") && name.ends_with(".safetensors"));
        if is_weights && !keep.contains(&path) {
            std::fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}
