//! Checkpoints in DeepSpeed's layout, as safetensors + JSON (no pickles):
//!
//! ```text
//! <dir>/latest                                   the tag, written last
//! <dir>/<tag>/                                   default tag: global_step{N}
//!     mp_rank_00_model_states.safetensors        model parameters (compute dtype, HF names)
//!     mp_rank_00_model_states.json               counters, scheduler, loss scaler, RNG seed,
//!                                                config, version, parameter names/shapes,
//!                                                client state
//!     zero_pp_rank_{r}_mp_rank_00_optim_states.safetensors
//!                                                fp32 master + optimizer states of rank r's
//!                                                partition; partition layout in its metadata
//!                                                (`partition_ranges`); at ZeRO stage 3 also
//!                                                rank r's pieces of every parameter
//!                                                (`param_shards`), and then no rank writes
//!                                                the whole-model safetensors above
//! ```
//!
//! Writes are atomic: the tag directory is written under `.<tag>.tmp`, every file fsynced,
//! the directory renamed into place, then `latest` replaced through its own temporary file.
//! A run killed at any moment leaves the previous checkpoint and `latest` intact; leftover
//! temporary directories are never read and are replaced by the next save.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use rustspeed_kernels::DType;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::loss_scaler::LossScaler;
use crate::lr_schedule::LrSchedulerState;

pub const LATEST: &str = "latest";
pub const MODEL_STATES: &str = "mp_rank_00_model_states.safetensors";
pub const MODEL_META: &str = "mp_rank_00_model_states.json";

/// The optimizer-state file of data-parallel rank `rank`.
pub fn optim_states_file(rank: u64) -> String {
    format!("zero_pp_rank_{rank}_mp_rank_00_optim_states.safetensors")
}

/// What the checkpoint's JSON records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// `rustspeed <version>` (DeepSpeed's `ds_version`).
    pub ds_version: String,
    pub global_steps: u64,
    pub skipped_steps: u64,
    pub global_samples: u64,
    pub micro_steps: u64,
    pub lr_scheduler: Option<LrSchedulerState>,
    pub loss_scaler: LossScaler,
    pub rng: RngState,
    /// `f32`, `bf16` or `f16`.
    pub compute_dtype: String,
    /// [`crate::optimizer::OptimizerSpec::name`].
    pub optimizer: String,
    /// Trainable parameters in model order.
    pub param_shapes: Vec<ParamShape>,
    pub frozen_param_shapes: Vec<ParamShape>,
    pub dp_world_size: u64,
    pub mp_world_size: u64,
    pub zero_stage: u8,
    /// The resolved DeepSpeed config.
    pub ds_config: serde_json::Value,
    /// The caller's state (the train command stores its data position here).
    pub client_state: serde_json::Value,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamShape {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Randomness to restore: dropout masks derive from the seed and the micro-step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub dropout_seed: u64,
    pub micro_steps: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("checkpoint tag `{0}` is not a plain directory name (it must be non-empty, not start with '.', and contain no '/' or '\\')")]
    BadTag(String),
    #[error("checkpoint {path} does not exist (tag `{tag}`)")]
    MissingTag { path: PathBuf, tag: String },
    #[error("{path}: not a valid checkpoint file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("checkpoint {path} does not match this engine: {mismatch}")]
    Mismatch { path: PathBuf, mismatch: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |cause| CheckpointError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// A tensor to write: raw little-endian bytes.
pub struct OutTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl OutTensor {
    pub fn f32(name: &str, values: &[f32]) -> OutTensor {
        OutTensor {
            name: name.to_string(),
            dtype: DType::F32,
            shape: vec![values.len()],
            bytes: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

fn st_dtype(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::BF16 => StDtype::BF16,
        DType::F16 => StDtype::F16,
    }
}

/// Serialises tensors (in the given order) with `metadata` into safetensors bytes.
pub fn serialize(
    tensors: &[OutTensor],
    metadata: HashMap<String, String>,
    path: &Path,
) -> Result<Vec<u8>, CheckpointError> {
    let format = |message: String| CheckpointError::Format {
        path: path.to_path_buf(),
        message,
    };
    let views = tensors
        .iter()
        .map(|t| {
            TensorView::new(st_dtype(t.dtype), t.shape.clone(), &t.bytes)
                .map(|v| (t.name.clone(), v))
                .map_err(|e| format(format!("tensor `{}`: {e}", t.name)))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::tensor::serialize(views, Some(metadata)).map_err(|e| format(e.to_string()))
}

fn check_tag(tag: &str) -> Result<(), CheckpointError> {
    if tag.is_empty() || tag.starts_with('.') || tag.contains('/') || tag.contains('\\') {
        return Err(CheckpointError::BadTag(tag.to_string()));
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let mut f = File::create(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Writes `<dir>/<tag>/` holding `files` atomically, then points `latest` at it.
/// Returns the tag directory.
pub fn write_checkpoint(
    dir: &Path,
    tag: &str,
    files: &[(String, Vec<u8>)],
) -> Result<PathBuf, CheckpointError> {
    let tmp = begin_checkpoint(dir, tag)?;
    for (name, bytes) in files {
        put_file(&tmp, name, bytes)?;
    }
    commit_checkpoint(dir, tag)
}

/// First phase of a save (one writer, rank 0): a fresh temporary directory for `tag`.
/// Every rank then [`put_file`]s into it, and rank 0 [`commit_checkpoint`]s.
pub fn begin_checkpoint(dir: &Path, tag: &str) -> Result<PathBuf, CheckpointError> {
    check_tag(tag)?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = temp_dir(dir, tag);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;
    Ok(tmp)
}

/// Where a save of `tag` is written before it is renamed into place.
pub fn temp_dir(dir: &Path, tag: &str) -> PathBuf {
    dir.join(format!(".{tag}.tmp"))
}

/// Writes one file of a checkpoint being saved, fsynced.
pub fn put_file(tmp: &Path, name: &str, bytes: &[u8]) -> Result<(), CheckpointError> {
    write_synced(&tmp.join(name), bytes)
}

/// Last phase of a save (rank 0, after every rank's files are written): the temporary
/// directory is renamed into place, then `latest` replaced.
pub fn commit_checkpoint(dir: &Path, tag: &str) -> Result<PathBuf, CheckpointError> {
    let tmp = temp_dir(dir, tag);
    sync_dir(&tmp)?;
    let target = dir.join(tag);
    // Saving the same tag twice replaces it (as DeepSpeed does); the old copy is moved
    // aside first because a directory cannot be renamed over a non-empty one.
    let old = dir.join(format!(".{tag}.old"));
    if target.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        std::fs::rename(&target, &old).map_err(io(&target))?;
    }
    std::fs::rename(&tmp, &target).map_err(io(&tmp))?;
    sync_dir(dir)?;
    if old.exists() {
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    }
    let latest_tmp = dir.join(format!(".{LATEST}.tmp"));
    write_synced(&latest_tmp, tag.as_bytes())?;
    let latest = dir.join(LATEST);
    std::fs::rename(&latest_tmp, &latest).map_err(io(&latest))?;
    sync_dir(dir)?;
    Ok(target)
}

/// The tag to load: `tag` if given, else the content of `<dir>/latest`; `None` (with a
/// warning, as DeepSpeed) when there is no `latest`.
pub fn resolve_tag(dir: &Path, tag: Option<&str>) -> Result<Option<String>, CheckpointError> {
    if let Some(t) = tag {
        check_tag(t)?;
        return Ok(Some(t.to_string()));
    }
    let latest = dir.join(LATEST);
    match std::fs::read_to_string(&latest) {
        Ok(text) => {
            let t = text.trim().to_string();
            check_tag(&t)?;
            Ok(Some(t))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                "unable to find latest file at {}; no checkpoint loaded. Pass a tag explicitly if you meant to load one",
                latest.display()
            );
            Ok(None)
        }
        Err(cause) => Err(CheckpointError::Io {
            path: latest,
            cause,
        }),
    }
}

/// The directory of `tag` under `dir`, which must exist.
pub fn tag_dir(dir: &Path, tag: &str) -> Result<PathBuf, CheckpointError> {
    let path = dir.join(tag);
    if path.is_dir() {
        Ok(path)
    } else {
        Err(CheckpointError::MissingTag {
            path,
            tag: tag.to_string(),
        })
    }
}

pub fn read_file(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    std::fs::read(path).map_err(io(path))
}

pub fn read_meta(path: &Path) -> Result<CheckpointMeta, CheckpointError> {
    let bytes = read_file(path)?;
    serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Parses safetensors bytes read from `path`.
pub fn parse<'a>(bytes: &'a [u8], path: &Path) -> Result<SafeTensors<'a>, CheckpointError> {
    SafeTensors::deserialize(bytes).map_err(|e| CheckpointError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The file's `__metadata__` map (empty when absent).
pub fn metadata(bytes: &[u8], path: &Path) -> Result<HashMap<String, String>, CheckpointError> {
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| CheckpointError::Format {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// A tensor's values as f32, checked to have `dtype` and `numel` elements.
pub fn read_values(
    st: &SafeTensors<'_>,
    name: &str,
    dtype: DType,
    numel: usize,
    path: &Path,
) -> Result<Vec<f32>, CheckpointError> {
    let mismatch = |m: String| CheckpointError::Mismatch {
        path: path.to_path_buf(),
        mismatch: m,
    };
    let t = st
        .tensor(name)
        .map_err(|_| mismatch(format!("tensor `{name}` is missing")))?;
    if t.dtype() != st_dtype(dtype) {
        return Err(mismatch(format!(
            "tensor `{name}` is {:?}, expected {:?}",
            t.dtype(),
            st_dtype(dtype)
        )));
    }
    let got: usize = t.shape().iter().product();
    if got != numel {
        return Err(mismatch(format!(
            "tensor `{name}` has {got} elements (shape {:?}), expected {numel}",
            t.shape()
        )));
    }
    let data = t.data();
    Ok(match dtype {
        DType::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        DType::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
    })
}

/// Optimizer-file metadata: the flat (trainable) ranges the file's fp32 tensors hold, as JSON
/// `[[lo, hi, offset], ...]` (elements `lo..hi` of the flat layout at `offset` in the tensors).
/// Stages 0-2 hold one range; stage 3 one per parameter piece.
pub const PARTITION_RANGES: &str = "partition_ranges";
/// Optimizer-file metadata: the fp32 tensors' length (stage 3 pieces carry zero padding).
pub const PARTITION_LEN: &str = "partition_len";
/// Stage 3: the tensor holding a rank's pieces of every parameter in the compute dtype, and the
/// metadata key describing it as JSON `[[name, lo, hi, offset], ...]` (elements `lo..hi` of
/// parameter `name` at `offset`).
pub const PARAM_SHARDS: &str = "param_shards";

/// A range of some coordinate system and where it starts in a file's tensor.
pub type Placed = (std::ops::Range<usize>, usize);

pub fn encode_ranges(ranges: &[Placed]) -> String {
    let v: Vec<[usize; 3]> = ranges.iter().map(|(r, o)| [r.start, r.end, *o]).collect();
    serde_json::to_string(&v).expect("plain data")
}

/// The ranges an optimizer file holds and its tensors' length: [`PARTITION_RANGES`] and
/// [`PARTITION_LEN`], or for files without them `partition_lo..partition_hi` at 0.
pub fn partition_ranges(
    info: &HashMap<String, String>,
    path: &Path,
) -> Result<(Vec<Placed>, usize), CheckpointError> {
    let format = |message: String| CheckpointError::Format {
        path: path.to_path_buf(),
        message,
    };
    let int = |key: &str| {
        info.get(key)
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or_else(|| format(format!("metadata `{key}` is missing or not an integer")))
    };
    if let Some(text) = info.get(PARTITION_RANGES) {
        let v: Vec<[usize; 3]> = serde_json::from_str(text)
            .map_err(|e| format(format!("metadata `{PARTITION_RANGES}` is malformed: {e}")))?;
        let len = int(PARTITION_LEN)?;
        let ranges: Vec<Placed> = v.into_iter().map(|[a, b, o]| (a..b, o)).collect();
        if let Some((r, o)) = ranges
            .iter()
            .find(|(r, o)| r.end < r.start || o + r.len() > len)
        {
            return Err(format(format!(
                "range {r:?} at {o} does not fit the tensors' {len} elements"
            )));
        }
        return Ok((ranges, len));
    }
    let (lo, hi) = (int("partition_lo")?, int("partition_hi")?);
    if hi < lo {
        return Err(format(format!(
            "partition [{lo}, {hi}) is empty or reversed"
        )));
    }
    Ok((vec![(lo..hi, 0)], hi - lo))
}

/// Stage 3's [`PARAM_SHARDS`] entries: (parameter name, element range, offset).
pub fn param_shard_entries(
    info: &HashMap<String, String>,
    path: &Path,
) -> Result<Vec<(String, Placed)>, CheckpointError> {
    let text = info.get(PARAM_SHARDS).ok_or_else(|| CheckpointError::Format {
        path: path.to_path_buf(),
        message: format!("metadata `{PARAM_SHARDS}` is missing (a stage-3 file holds the parameters' pieces)"),
    })?;
    let v: Vec<(String, usize, usize, usize)> =
        serde_json::from_str(text).map_err(|e| CheckpointError::Format {
            path: path.to_path_buf(),
            message: format!("metadata `{PARAM_SHARDS}` is malformed: {e}"),
        })?;
    Ok(v.into_iter().map(|(n, a, b, o)| (n, (a..b, o))).collect())
}

/// How many elements the ranges of `src` and `dst` share.
pub fn overlap_len(src: &[Placed], dst: &[Placed]) -> usize {
    src.iter()
        .flat_map(|(s, _)| dst.iter().map(move |(d, _)| (s, d)))
        .map(|(s, d)| s.end.min(d.end).saturating_sub(s.start.max(d.start)))
        .sum()
}

/// Copies what `src` (ranges placed in `src_data`) holds of the ranges of `dst` (placed in
/// `dst_data`); returns how many elements it copied.
pub fn copy_overlaps<T: Copy, U: Copy>(
    src: &[Placed],
    src_data: &[T],
    dst: &[Placed],
    dst_data: &mut [U],
    convert: impl Fn(T) -> U,
) -> usize {
    let mut copied = 0;
    for (s, so) in src {
        for (d, doff) in dst {
            let (a, b) = (s.start.max(d.start), s.end.min(d.end));
            if a >= b {
                continue;
            }
            let from = &src_data[so + a - s.start..so + b - s.start];
            let to = &mut dst_data[doff + a - d.start..doff + b - d.start];
            for (t, f) in to.iter_mut().zip(from) {
                *t = convert(*f);
            }
            copied += b - a;
        }
    }
    copied
}

/// Little-endian bytes of values stored in `dtype` (given as f32, which every bf16/f16
/// value converts to and back from exactly).
pub fn encode(values: impl Iterator<Item = f32>, dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => values.flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => values
            .flat_map(|v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
        DType::F16 => values
            .flat_map(|v| half::f16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("rustspeed-ckpt-unit-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn write_is_atomic_and_latest_last() {
        let dir = scratch("atomic");
        write_checkpoint(&dir, "a", &[("f".into(), b"1".to_vec())]).unwrap();
        assert_eq!(resolve_tag(&dir, None).unwrap().as_deref(), Some("a"));
        // A half-written later save (killed before the rename) leaves `a` as the latest.
        std::fs::create_dir_all(dir.join(".b.tmp")).unwrap();
        std::fs::write(dir.join(".b.tmp/f"), b"partial").unwrap();
        assert_eq!(resolve_tag(&dir, None).unwrap().as_deref(), Some("a"));
        // The next save of `b` replaces the leftover; saving `a` again replaces `a`.
        write_checkpoint(&dir, "b", &[("f".into(), b"2".to_vec())]).unwrap();
        assert_eq!(std::fs::read(dir.join("b/f")).unwrap(), b"2");
        write_checkpoint(&dir, "a", &[("f".into(), b"3".to_vec())]).unwrap();
        assert_eq!(std::fs::read(dir.join("a/f")).unwrap(), b"3");
        assert_eq!(resolve_tag(&dir, None).unwrap().as_deref(), Some("a"));
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "temporary names left: {leftovers:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_tags_and_missing_latest() {
        let dir = scratch("tags");
        for bad in ["", ".x", "a/b"] {
            assert!(matches!(
                write_checkpoint(&dir, bad, &[]),
                Err(CheckpointError::BadTag(_))
            ));
        }
        assert_eq!(resolve_tag(&dir, None).unwrap(), None);
        let err = tag_dir(&dir, "nope").unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn encode_and_read_back_every_dtype() {
        let vals = [1.5f32, -0.25, 96.0, 0.0];
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let t = OutTensor {
                name: "x".into(),
                dtype,
                shape: vec![2, 2],
                bytes: encode(vals.iter().copied(), dtype),
            };
            let p = Path::new("mem");
            let bytes = serialize(&[t], HashMap::new(), p).unwrap();
            let st = parse(&bytes, p).unwrap();
            let back = read_values(&st, "x", dtype, 4, p).unwrap();
            assert_eq!(back, vals.to_vec(), "{dtype}");
            let err = read_values(&st, "x", dtype, 5, p).unwrap_err().to_string();
            assert!(err.contains("expected 5"), "{err}");
        }
    }
}
