//! HF weights in and out: `model.safetensors` or a sharded `model.safetensors.index.json`,
//! read into a model's flat buffer by name (converting f32/f16/bf16 to the compute dtype), and
//! written back with the same names so transformers and vLLM load the result.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rustspeed_kernels::{DType, Float};
use safetensors::tensor::{Dtype as StDtype, SafeTensors, View};

use rustspeed_kernels::quant::QuantConfig;

use crate::linear::QuantTarget;
use crate::model::Model;
use crate::params::ParamLayout;

/// Where weight files are read or written, and what went wrong, naming the file and tensor.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("{dir}: no model.safetensors or model.safetensors.index.json (pytorch_model.bin is not read: convert it to safetensors with transformers' save_pretrained(safe_serialization=True))")]
    NoWeights { dir: PathBuf },
    #[error(
        "{path}: tensor `{name}` has dtype {dtype}; only F32, F16 and BF16 weights can be loaded"
    )]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("{path}: tensor `{name}` has shape {got:?}, the model expects {want:?}")]
    Shape {
        path: PathBuf,
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("{dir}: missing tensor(s) the model needs: {names}")]
    Missing { dir: PathBuf, names: String },
    #[error("{dir}: unexpected tensor(s) the model does not have: {names} (is config.json the right architecture?)")]
    Unexpected { dir: PathBuf, names: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> WeightsError + '_ {
    move |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Names the architecture's checkpoints may hold beyond the model's parameters.
#[derive(Clone, Debug, Default)]
pub struct NameRules {
    /// Tensors to skip silently: exact names, or suffixes starting with '.' (GPT-2's `.attn.bias`
    /// causal-mask buffers), e.g. a tied `lm_head.weight` stored anyway.
    pub ignore: Vec<String>,
    /// A prefix some checkpoints omit (`transformer.` for the original GPT-2 files): a tensor
    /// `h.0.ln_1.weight` then fills `transformer.h.0.ln_1.weight`.
    pub optional_prefix: Option<String>,
}

impl NameRules {
    fn ignored(&self, name: &str) -> bool {
        self.ignore.iter().any(|pat| {
            if pat.starts_with('.') {
                name.ends_with(pat.as_str())
            } else {
                name == pat
            }
        })
    }
}

/// The safetensors files of an HF model directory (one file, or the shards of an index).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.is_file() {
        return Err(WeightsError::NoWeights {
            dir: dir.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| WeightsError::Format {
            path: index.clone(),
            message: e.to_string(),
        })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| WeightsError::Format {
            path: index.clone(),
            message: "no \"weight_map\" object".into(),
        })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for file in map.values() {
        let name = file.as_str().ok_or_else(|| WeightsError::Format {
            path: index.clone(),
            message: format!("weight_map value {file} is not a file name"),
        })?;
        let path = dir.join(name);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    Ok(files)
}

/// Fills `params` (laid out by `layout`) from the safetensors weights in `dir`. Every parameter
/// must be found exactly once with the right shape (except LoRA adapter parameters, which a
/// base checkpoint never holds); any other tensor is an error unless the rules ignore it.
pub fn load_hf_weights<T: Float>(
    dir: &Path,
    layout: &ParamLayout,
    params: &mut [T],
    rules: &NameRules,
) -> Result<(), WeightsError> {
    load_hf_weights_quantized(dir, layout, params, rules, &[], None)
}

/// [`load_hf_weights`] into a model: its parameters, and the frozen weights it holds quantized
/// (QLoRA), which are quantized one tensor at a time as they are read, so no dense copy of the
/// base ever exists whole.
pub fn load_model_weights<T: Float>(
    dir: &Path,
    model: &mut Model<T>,
    rules: &NameRules,
) -> Result<(), WeightsError> {
    let quant = model.tuning.quantization().copied();
    load_hf_weights_quantized(
        dir,
        &model.layout,
        &mut model.params,
        rules,
        &model.quantized,
        quant.as_ref(),
    )
}

fn load_hf_weights_quantized<T: Float>(
    dir: &Path,
    layout: &ParamLayout,
    params: &mut [T],
    rules: &NameRules,
    quantized: &[QuantTarget],
    quant: Option<&QuantConfig>,
) -> Result<(), WeightsError> {
    assert_eq!(params.len(), layout.numel(), "parameter buffer size");
    let quant_index: HashMap<&str, &QuantTarget> =
        quantized.iter().map(|q| (q.name.as_str(), q)).collect();
    let mut quant_filled = 0usize;
    let mut filled = vec![false; layout.slots().len()];
    let index: HashMap<&str, usize> = layout
        .slots()
        .iter()
        .enumerate()
        .map(|(i, s)| (s.spec.name.as_str(), i))
        .collect();
    let mut unexpected = Vec::new();
    for path in weight_files(dir)? {
        let file = File::open(&path).map_err(io_err(&path))?;
        // SAFETY: the file is only read while mapped; a concurrent writer would be a user error
        // that at worst yields wrong numbers, as with any reader.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io_err(&path))?;
        let st = SafeTensors::deserialize(&map).map_err(|e| WeightsError::Format {
            path: path.clone(),
            message: e.to_string(),
        })?;
        for (name, view) in st.tensors() {
            let slot_id = index.get(name.as_str()).copied().or_else(|| {
                let prefix = rules.optional_prefix.as_deref()?;
                index.get(format!("{prefix}{name}").as_str()).copied()
            });
            let Some(id) = slot_id else {
                let target = quant_index.get(name.as_str()).copied().or_else(|| {
                    let prefix = rules.optional_prefix.as_deref()?;
                    quant_index.get(format!("{prefix}{name}").as_str()).copied()
                });
                if let (Some(target), Some(cfg)) = (target, quant) {
                    if view.shape() != target.shape().as_slice() {
                        return Err(WeightsError::Shape {
                            path,
                            name,
                            got: view.shape().to_vec(),
                            want: target.shape(),
                        });
                    }
                    let mut dense = vec![0f32; target.inp * target.out];
                    convert_into(&path, &name, view.dtype(), view.data(), &mut dense)?;
                    target
                        .fill(&dense, cfg)
                        .map_err(|message| WeightsError::Format {
                            path: path.clone(),
                            message,
                        })?;
                    quant_filled += 1;
                } else if !rules.ignored(&name) {
                    unexpected.push(name);
                }
                continue;
            };
            let slot = &layout.slots()[id];
            if view.shape() != slot.spec.shape.as_slice() {
                return Err(WeightsError::Shape {
                    path,
                    name,
                    got: view.shape().to_vec(),
                    want: slot.spec.shape.clone(),
                });
            }
            convert_into(
                &path,
                &name,
                view.dtype(),
                view.data(),
                &mut params[slot.range()],
            )?;
            filled[id] = true;
        }
    }
    if !unexpected.is_empty() {
        unexpected.sort();
        return Err(WeightsError::Unexpected {
            dir: dir.to_path_buf(),
            names: unexpected.join(", "),
        });
    }
    let mut missing: Vec<&str> = layout
        .slots()
        .iter()
        .zip(&filled)
        .filter(|(s, f)| !**f && !crate::tuning::is_adapter_param(&s.spec.name))
        .map(|(s, _)| s.spec.name.as_str())
        .collect();
    if quant_filled != quantized.len() {
        missing.extend(
            quantized
                .iter()
                .filter(|q| q.slot.get().is_none())
                .map(|q| q.name.as_str()),
        );
    }
    if !missing.is_empty() {
        return Err(WeightsError::Missing {
            dir: dir.to_path_buf(),
            names: missing.join(", "),
        });
    }
    Ok(())
}

pub(crate) fn convert_into<T: Float>(
    path: &Path,
    name: &str,
    dtype: StDtype,
    bytes: &[u8],
    out: &mut [T],
) -> Result<(), WeightsError> {
    let chunks = |n: usize| bytes.chunks_exact(n);
    match dtype {
        StDtype::F32 => {
            for (o, b) in out.iter_mut().zip(chunks(4)) {
                *o = T::from_f32(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
        StDtype::BF16 => {
            for (o, b) in out.iter_mut().zip(chunks(2)) {
                *o = T::from_f32(bf16::from_le_bytes([b[0], b[1]]).to_f32());
            }
        }
        StDtype::F16 => {
            for (o, b) in out.iter_mut().zip(chunks(2)) {
                *o = T::from_f32(f16::from_le_bytes([b[0], b[1]]).to_f32());
            }
        }
        other => {
            return Err(WeightsError::Dtype {
                path: path.to_path_buf(),
                name: name.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    }
    Ok(())
}

/// One tensor to write: its values converted to the output dtype when serialised.
struct OutTensor<'a, T> {
    values: &'a [T],
    shape: Vec<usize>,
    dtype: DType,
}

impl<T: Float> View for OutTensor<'_, T> {
    fn dtype(&self) -> StDtype {
        match self.dtype {
            DType::F32 => StDtype::F32,
            DType::BF16 => StDtype::BF16,
            DType::F16 => StDtype::F16,
        }
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let mut out = Vec::with_capacity(self.data_len());
        for v in self.values {
            let f = v.to_f32();
            match self.dtype {
                DType::F32 => out.extend_from_slice(&f.to_le_bytes()),
                DType::BF16 => out.extend_from_slice(&bf16::from_f32(f).to_le_bytes()),
                DType::F16 => out.extend_from_slice(&f16::from_f32(f).to_le_bytes()),
            }
        }
        Cow::Owned(out)
    }

    fn data_len(&self) -> usize {
        self.values.len() * self.dtype.size_in_bytes()
    }
}

/// Writes `tensors` (name, values, shape) to the safetensors file `path` in `dtype`, through a
/// temporary name and a rename.
pub fn save_tensors<T: Float>(
    path: &Path,
    tensors: &[(String, &[T], Vec<usize>)],
    dtype: DType,
) -> Result<(), WeightsError> {
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let views: Vec<(String, OutTensor<T>)> = tensors
        .iter()
        .map(|(name, values, shape)| {
            assert_eq!(
                values.len(),
                shape.iter().product::<usize>(),
                "save_tensors: `{name}` values and shape disagree"
            );
            let t = OutTensor {
                values,
                shape: shape.clone(),
                dtype,
            };
            (name.clone(), t)
        })
        .collect();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    safetensors::tensor::serialize_to_file(views, Some(metadata), &tmp).map_err(|e| {
        WeightsError::Format {
            path: tmp.clone(),
            message: e.to_string(),
        }
    })?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

/// Default shard limit, as transformers' `save_pretrained(max_shard_size="5GB")`.
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Writes every parameter of `layout` from `params` into `dir` as `model.safetensors`, or as
/// `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` when the total
/// exceeds `max_shard_bytes`. Each file is written under a temporary name and renamed, so a
/// crash never leaves a truncated file under the final name.
pub fn save_hf_weights<T: Float>(
    dir: &Path,
    layout: &ParamLayout,
    params: &[T],
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<(), WeightsError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut shard_bytes = 0usize;
    for (i, slot) in layout.slots().iter().enumerate() {
        let bytes = slot.spec.numel() * dtype.size_in_bytes();
        if shard_bytes > 0 && shard_bytes + bytes > max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shards.last_mut().expect("one shard").push(i);
        shard_bytes += bytes;
    }
    let n = shards.len();
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let mut weight_map = BTreeMap::new();
    for (k, ids) in shards.iter().enumerate() {
        let file_name = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
        };
        let tensors: Vec<(String, OutTensor<T>)> = ids
            .iter()
            .map(|&i| {
                let slot = &layout.slots()[i];
                weight_map.insert(slot.spec.name.clone(), file_name.clone());
                let tensor = OutTensor {
                    values: &params[slot.range()],
                    shape: slot.spec.shape.clone(),
                    dtype,
                };
                (slot.spec.name.clone(), tensor)
            })
            .collect();
        let path = dir.join(&file_name);
        let tmp = dir.join(format!(".{file_name}.tmp"));
        safetensors::tensor::serialize_to_file(tensors, Some(metadata.clone()), &tmp).map_err(
            |e| WeightsError::Format {
                path: tmp.clone(),
                message: e.to_string(),
            },
        )?;
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    }
    if n > 1 {
        let total: usize = layout.numel() * dtype.size_in_bytes();
        let index = serde_json::json!({
            "metadata": {"total_size": total},
            "weight_map": weight_map,
        });
        let path = dir.join("model.safetensors.index.json");
        write_atomic(
            &path,
            serde_json::to_string_pretty(&index)
                .expect("json")
                .as_bytes(),
        )?;
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), WeightsError> {
    use std::io::Write;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::ParamSpec;

    fn layout() -> ParamLayout {
        ParamLayout::new(
            &[
                vec![ParamSpec::new("a.weight", &[2, 3])],
                vec![
                    ParamSpec::new("b.weight", &[4]),
                    ParamSpec::new("b.bias", &[1]),
                ],
            ],
            &[],
        )
        .unwrap()
    }

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32 * 0.25 - 1.0).collect()
    }

    #[test]
    fn round_trip_single_file_and_shards() {
        let layout = layout();
        let params = values(layout.numel());
        for (max, files) in [(DEFAULT_MAX_SHARD_BYTES, 1), (20, 2)] {
            let dir = tempdir();
            save_hf_weights(&dir, &layout, &params, DType::F32, max).unwrap();
            assert_eq!(weight_files(&dir).unwrap().len(), files);
            let mut back = vec![0f32; layout.numel()];
            load_hf_weights(&dir, &layout, &mut back, &NameRules::default()).unwrap();
            assert_eq!(back, params);
        }
    }

    #[test]
    fn bf16_files_load_into_f32() {
        let layout = layout();
        let params = values(layout.numel());
        let dir = tempdir();
        save_hf_weights(&dir, &layout, &params, DType::BF16, DEFAULT_MAX_SHARD_BYTES).unwrap();
        let mut back = vec![0f32; layout.numel()];
        load_hf_weights(&dir, &layout, &mut back, &NameRules::default()).unwrap();
        // Multiples of 0.25 in [-1, 1.25] are exact in bf16.
        assert_eq!(back, params);
    }

    #[test]
    fn missing_unexpected_and_misshaped_tensors_are_named() {
        let small = ParamLayout::new(&[vec![ParamSpec::new("a.weight", &[2, 3])]], &[]).unwrap();
        let dir = tempdir();
        save_hf_weights(
            &dir,
            &small,
            &values(6),
            DType::F32,
            DEFAULT_MAX_SHARD_BYTES,
        )
        .unwrap();
        let layout = layout();
        let mut buf = vec![0f32; layout.numel()];
        let err = load_hf_weights(&dir, &layout, &mut buf, &NameRules::default()).unwrap_err();
        assert!(err.to_string().contains("b.weight, b.bias"), "{err}");

        let full = tempdir();
        save_hf_weights(
            &full,
            &layout,
            &values(11),
            DType::F32,
            DEFAULT_MAX_SHARD_BYTES,
        )
        .unwrap();
        let mut small_buf = vec![0f32; 6];
        let err =
            load_hf_weights(&full, &small, &mut small_buf, &NameRules::default()).unwrap_err();
        assert!(err.to_string().contains("unexpected tensor(s)"), "{err}");
        let rules = NameRules {
            ignore: vec!["b.weight".into(), ".bias".into()],
            optional_prefix: None,
        };
        load_hf_weights(&full, &small, &mut small_buf, &rules).unwrap();

        let other = ParamLayout::new(&[vec![ParamSpec::new("a.weight", &[3, 2])]], &[]).unwrap();
        let err = load_hf_weights(&dir, &other, &mut small_buf, &NameRules::default()).unwrap_err();
        assert!(err.to_string().contains("shape [2, 3]"), "{err}");
    }

    #[test]
    fn optional_prefix_maps_original_gpt2_names() {
        let bare = ParamLayout::new(&[vec![ParamSpec::new("wte.weight", &[2])]], &[]).unwrap();
        let dir = tempdir();
        save_hf_weights(
            &dir,
            &bare,
            &[1.0f32, 2.0],
            DType::F32,
            DEFAULT_MAX_SHARD_BYTES,
        )
        .unwrap();
        let prefixed =
            ParamLayout::new(&[vec![ParamSpec::new("transformer.wte.weight", &[2])]], &[]).unwrap();
        let mut buf = [0f32; 2];
        let rules = NameRules {
            ignore: vec![],
            optional_prefix: Some("transformer.".into()),
        };
        load_hf_weights(&dir, &prefixed, &mut buf, &rules).unwrap();
        assert_eq!(buf, [1.0, 2.0]);
    }

    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rustspeed-weights-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
