//! DeepSpeed's `zero_to_fp32`: one fp32 state dict from a checkpoint saved by any number of
//! ranks at any ZeRO stage, written as an HF `model.safetensors` (sharded with an index).
//!
//! Streaming: each rank's optimizer file is opened on its own and only its `fp32_master` tensor
//! is read (a seek past the safetensors header to that tensor's bytes), so the Adam moments are
//! never loaded; at most one partition is in memory besides the output. With f32 training there
//! is no separate master: the model-states file holds the fp32 weights and is read tensor by
//! tensor. Frozen parameters come from the model-states file (their only copy).
//!
//! The flat layout is the trainable parameters in model order (the checkpoint's `param_shapes`),
//! cut into rank partitions recorded in each file's metadata: one range `[partition_lo,
//! partition_hi)` at stages 0-2, one range per parameter piece at stage 3 (`partition_ranges`),
//! where the parameters themselves (f32 training, frozen ones) come from each rank's
//! `param_shards` instead of the model-states file, which stage 3 does not write.
//! As DeepSpeed's stage-2 path, the partitions are concatenated and narrowed parameter by
//! parameter; a total that does not add up is "consumed X numels out of Y - something is wrong".

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use rustspeed_kernels::DType;
use rustspeed_models::weights::{save_hf_weights, WeightsError};
use rustspeed_models::{ParamLayout, ParamSpec};

use crate::checkpoint::{
    self, optim_states_file, CheckpointError, MODEL_META, MODEL_STATES, PARAM_SHARDS,
};

/// The fp32 master tensor's name in a rank's optimizer file.
pub const FP32_MASTER: &str = "fp32_master";

#[derive(Debug, thiserror::Error)]
pub enum ConsolidateError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("{dir}: no `latest` file, so there is no default tag; pass --tag (one of the global_stepN directories)")]
    NoLatest { dir: PathBuf },
    /// DeepSpeed's wording (zero_to_fp32's stage-2 sanity check), which users search for.
    #[error("{dir}: consumed {consumed} numels out of {available} - something is wrong (the parameter list in {MODEL_META} does not match the saved partitions)")]
    Consumed {
        dir: PathBuf,
        consumed: usize,
        available: usize,
    },
}

/// Every parameter in fp32, trainable ones first (in model order), then frozen ones.
pub struct Fp32State {
    pub layout: ParamLayout,
    pub params: Vec<f32>,
    /// The tag that was read.
    pub tag: String,
    pub world_size: u64,
    pub zero_stage: u8,
}

impl Fp32State {
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.layout.get(name).map(|s| &self.params[s.range()])
    }
}

/// One tensor's place in a safetensors file.
struct TensorEntry {
    dtype: String,
    shape: Vec<usize>,
    /// Absolute byte range in the file.
    bytes: std::ops::Range<u64>,
}

/// A safetensors file's header, read without its tensor data.
struct Header {
    path: PathBuf,
    tensors: HashMap<String, TensorEntry>,
    metadata: HashMap<String, String>,
}

fn format_err(path: &Path, message: impl Into<String>) -> CheckpointError {
    CheckpointError::Format {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |cause| CheckpointError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

impl Header {
    fn read(path: &Path) -> Result<(Header, File), CheckpointError> {
        let mut f = File::open(path).map_err(io_err(path))?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).map_err(io_err(path))?;
        let n = u64::from_le_bytes(len);
        let file_len = f.metadata().map_err(io_err(path))?.len();
        if n > file_len.saturating_sub(8) || n > 100 << 20 {
            return Err(format_err(
                path,
                format!("header length {n} does not fit the file ({file_len} bytes)"),
            ));
        }
        let mut text = vec![0u8; n as usize];
        f.read_exact(&mut text).map_err(io_err(path))?;
        let json: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&text)
            .map_err(|e| format_err(path, format!("header is not a JSON object: {e}")))?;
        let data_start = 8 + n;
        let mut tensors = HashMap::new();
        let mut metadata = HashMap::new();
        for (name, v) in json {
            if name == "__metadata__" {
                if let Some(m) = v.as_object() {
                    for (k, v) in m {
                        if let Some(s) = v.as_str() {
                            metadata.insert(k.clone(), s.to_string());
                        }
                    }
                }
                continue;
            }
            let bad = || format_err(path, format!("header entry `{name}` is malformed"));
            let dtype = v["dtype"].as_str().ok_or_else(bad)?.to_string();
            let shape = v["shape"]
                .as_array()
                .ok_or_else(bad)?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(bad)?;
            let offs = v["data_offsets"].as_array().ok_or_else(bad)?;
            let (a, b) = match (
                offs.first().and_then(|x| x.as_u64()),
                offs.get(1).and_then(|x| x.as_u64()),
            ) {
                (Some(a), Some(b)) if a <= b && data_start + b <= file_len => (a, b),
                _ => return Err(bad()),
            };
            tensors.insert(
                name,
                TensorEntry {
                    dtype,
                    shape,
                    bytes: data_start + a..data_start + b,
                },
            );
        }
        Ok((
            Header {
                path: path.to_path_buf(),
                tensors,
                metadata,
            },
            f,
        ))
    }

    fn field(&self, key: &str) -> Result<usize, CheckpointError> {
        self.metadata
            .get(key)
            .and_then(|v| v.parse::<usize>().ok())
            .ok_or_else(|| {
                format_err(
                    &self.path,
                    format!("metadata `{key}` is missing or not an integer"),
                )
            })
    }

    /// Reads tensor `name` (F32, BF16 or F16) as f32 into `out` (which must have its numel).
    fn read_into(&self, f: &mut File, name: &str, out: &mut [f32]) -> Result<(), CheckpointError> {
        let mismatch = |m: String| CheckpointError::Mismatch {
            path: self.path.clone(),
            mismatch: m,
        };
        let t = self
            .tensors
            .get(name)
            .ok_or_else(|| mismatch(format!("tensor `{name}` is missing")))?;
        let size = match t.dtype.as_str() {
            "F32" => 4,
            "BF16" | "F16" => 2,
            other => {
                return Err(mismatch(format!(
                    "tensor `{name}` has dtype {other}; expected F32, BF16 or F16"
                )))
            }
        };
        let numel: usize = t.shape.iter().product();
        if numel != out.len() || (t.bytes.end - t.bytes.start) as usize != numel * size {
            return Err(mismatch(format!(
                "tensor `{name}` has shape {:?}, expected {} elements",
                t.shape,
                out.len()
            )));
        }
        f.seek(SeekFrom::Start(t.bytes.start))
            .map_err(io_err(&self.path))?;
        // In chunks, so a large tensor never needs a second full-size byte buffer.
        let mut buf = vec![0u8; (1 << 22) * size];
        let mut done = 0;
        while done < numel {
            let k = (numel - done).min(1 << 22);
            let bytes = &mut buf[..k * size];
            f.read_exact(bytes).map_err(io_err(&self.path))?;
            let dst = &mut out[done..done + k];
            match t.dtype.as_str() {
                "F32" => {
                    for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                        *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                }
                "BF16" => {
                    for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                        *d = half::bf16::from_le_bytes([b[0], b[1]]).to_f32();
                    }
                }
                _ => {
                    for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                        *d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                    }
                }
            }
            done += k;
        }
        Ok(())
    }
}

fn specs(shapes: &[checkpoint::ParamShape], trainable: bool) -> Vec<ParamSpec> {
    shapes
        .iter()
        .map(|p| ParamSpec::new(p.name.clone(), &p.shape).with_trainable(trainable))
        .collect()
}

/// Reads checkpoint `<dir>/<tag>` (tag `None`: the one `latest` names) into fp32.
pub fn consolidate_fp32(dir: &Path, tag: Option<&str>) -> Result<Fp32State, ConsolidateError> {
    let tag = checkpoint::resolve_tag(dir, tag)?.ok_or_else(|| ConsolidateError::NoLatest {
        dir: dir.to_path_buf(),
    })?;
    let tag_dir = checkpoint::tag_dir(dir, &tag)?;
    let meta = checkpoint::read_meta(&tag_dir.join(MODEL_META))?;
    let trainable = specs(&meta.param_shapes, true);
    let frozen = specs(&meta.frozen_param_shapes, false);
    let layout = ParamLayout::new(&[trainable.clone(), frozen.clone()], &[])
        .map_err(|e| format_err(&tag_dir.join(MODEL_META), e.to_string()))?;
    let mut params = vec![0f32; layout.numel()];
    let flat_numel: usize = trainable.iter().map(|s| s.numel()).sum();

    let model_path = tag_dir.join(MODEL_STATES);
    // Stage 3 saves no whole parameters: each rank's file holds its pieces of every one.
    let pieces = meta.zero_stage == 3 && !model_path.exists();
    if meta.compute_dtype == "f32" {
        // The model's own weights are the fp32 master.
        if pieces {
            read_param_pieces(&tag_dir, &layout, &mut params, |_| true)?;
        } else {
            let (model_header, mut model_file) = Header::read(&model_path)?;
            for slot in layout.slots() {
                model_header.read_into(
                    &mut model_file,
                    &slot.spec.name,
                    &mut params[slot.range()],
                )?;
            }
        }
    } else {
        let available = read_master_partitions(&tag_dir, &mut params[..flat_numel], flat_numel)?;
        // DeepSpeed's sanity check: the parameters must consume the partitions exactly.
        if flat_numel != available {
            return Err(ConsolidateError::Consumed {
                dir: tag_dir,
                consumed: flat_numel,
                available,
            });
        }
        if pieces {
            read_param_pieces(&tag_dir, &layout, &mut params, |s| !s.trainable)?;
        } else if layout.slots().iter().any(|s| !s.spec.trainable) {
            let (model_header, mut model_file) = Header::read(&model_path)?;
            for slot in layout.slots().iter().filter(|s| !s.spec.trainable) {
                model_header.read_into(
                    &mut model_file,
                    &slot.spec.name,
                    &mut params[slot.range()],
                )?;
            }
        }
    }
    Ok(Fp32State {
        layout,
        params,
        tag,
        world_size: meta.dp_world_size,
        zero_stage: meta.zero_stage,
    })
}

/// Fills `flat` from every rank's `fp32_master`, one file at a time; returns the number of
/// elements the partitions hold together (which must be the flat length).
fn read_master_partitions(
    tag_dir: &Path,
    flat: &mut [f32],
    flat_numel: usize,
) -> Result<usize, ConsolidateError> {
    let first = tag_dir.join(optim_states_file(0));
    let count = Header::read(&first)?.0.field("partition_count")?;
    let mut available = 0usize;
    for r in 0..count {
        let path = tag_dir.join(optim_states_file(r as u64));
        let (h, mut f) = Header::read(&path)?;
        let saved = h.field("flat_numel")?;
        let (ranges, len) = checkpoint::partition_ranges(&h.metadata, &path)?;
        let end = ranges.iter().map(|(r, _)| r.end).max().unwrap_or(0);
        if end > flat_numel || saved != flat_numel {
            // The file disagrees with the parameter list: report it as DeepSpeed does.
            return Err(ConsolidateError::Consumed {
                dir: tag_dir.to_path_buf(),
                consumed: flat_numel,
                available: saved.max(end),
            });
        }
        match ranges.as_slice() {
            // Stages 0-2: one contiguous piece, read in place.
            [(range, 0)] if range.len() == len => {
                h.read_into(&mut f, FP32_MASTER, &mut flat[range.clone()])?;
            }
            // Stage 3: one piece per parameter, padded; one rank's partition in memory.
            _ => {
                let mut v = vec![0f32; len];
                h.read_into(&mut f, FP32_MASTER, &mut v)?;
                let whole = [(0..flat_numel, 0)];
                checkpoint::copy_overlaps(&ranges, &v, &whole, flat, |x| x);
            }
        }
        available += ranges.iter().map(|(r, _)| r.len()).sum::<usize>();
    }
    Ok(available)
}

/// Stage 3: the parameters `select` picks, from every rank's [`PARAM_SHARDS`] pieces.
fn read_param_pieces(
    tag_dir: &Path,
    layout: &ParamLayout,
    params: &mut [f32],
    select: impl Fn(&ParamSpec) -> bool,
) -> Result<(), ConsolidateError> {
    let first = tag_dir.join(optim_states_file(0));
    let count = Header::read(&first)?.0.field("partition_count")?;
    let want: usize = layout
        .slots()
        .iter()
        .filter(|s| select(&s.spec))
        .map(|s| s.spec.numel())
        .sum();
    let mut copied = 0;
    for r in 0..count {
        let path = tag_dir.join(optim_states_file(r as u64));
        let (h, mut f) = Header::read(&path)?;
        let entries = checkpoint::param_shard_entries(&h.metadata, &path)?;
        let len = h
            .tensors
            .get(PARAM_SHARDS)
            .map_or(0, |t| t.shape.iter().product());
        let mut v = vec![0f32; len];
        h.read_into(&mut f, PARAM_SHARDS, &mut v)?;
        for (name, src) in &entries {
            let slot = layout.get(name).ok_or_else(|| {
                format_err(&path, format!("parameter `{name}` is not in {MODEL_META}"))
            })?;
            if select(&slot.spec) {
                let dst = [(0..slot.spec.numel(), slot.offset)];
                copied +=
                    checkpoint::copy_overlaps(std::slice::from_ref(src), &v, &dst, params, |x| x);
            }
        }
    }
    if copied != want {
        return Err(format_err(
            tag_dir,
            format!("the ranks' parameter pieces cover {copied} of {want} elements"),
        )
        .into());
    }
    Ok(())
}

/// Writes the state as an HF weights file set in `dtype` (sharded above `max_shard_bytes`,
/// with `model.safetensors.index.json`). Weight files of an earlier run in `out` that this one
/// does not rewrite are removed first, since transformers would read them.
pub fn save_fp32_state(
    state: &Fp32State,
    out: &Path,
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<(), ConsolidateError> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    for entry in std::fs::read_dir(out).map_err(io_err(out))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "model.safetensors"
            || name == "model.safetensors.index.json"
            || (name.starts_with("model-") && name.ends_with(".safetensors"))
        {
            let p = entry.path();
            std::fs::remove_file(&p).map_err(io_err(&p))?;
        }
    }
    save_hf_weights(out, &state.layout, &state.params, dtype, max_shard_bytes)?;
    Ok(())
}
