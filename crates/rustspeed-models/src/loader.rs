//! One entry point for "a model on disk": an HF directory (config.json, safetensors, tokenizer)
//! or a llama.cpp `.gguf` file (metadata, quantized weights and the tokenizer in one file).
//! Both give the same [`LoadedModel`]: the config, the model with its parameters filled in the
//! requested compute dtype, and the tokenizer.

use std::path::{Path, PathBuf};

use rustspeed_kernels::Float;

use crate::error::ModelError;
use crate::gguf::{GgufError, GgufFile};
use crate::hf_config::{Architecture, ModelConfig};
use crate::model::Model;
use crate::tokenizer::{Tokenizer, TokenizerError};
use crate::tuning::{is_adapter_param, Tuning};
use crate::weights::{load_model_weights, NameRules};
use crate::{gpt2, llama};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Gguf(#[from] GgufError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error("{path}: quantizing a frozen weight: {message}")]
    Quantize { path: PathBuf, message: String },
    #[error("{path}: neither an HF model directory (with config.json) nor a .gguf file")]
    NotAModel { path: PathBuf },
    #[error("{path}: the model needs tensor `{name}` (GGUF `{gguf}`), which the file lacks")]
    MissingTensor {
        path: PathBuf,
        name: String,
        gguf: String,
    },
    #[error("{path}: tensor `{gguf}` holds `{name}`, which this model does not have (is the architecture right?)")]
    UnexpectedTensor {
        path: PathBuf,
        name: String,
        gguf: String,
    },
    #[error("{path}: tensor `{gguf}` has HF shape {got:?}; `{name}` needs {want:?}")]
    Shape {
        path: PathBuf,
        name: String,
        gguf: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
}

pub struct LoadedModel<T: Float> {
    pub config: ModelConfig,
    pub model: Model<T>,
    /// `None` for an HF directory without tokenizer files.
    pub tokenizer: Option<Tokenizer>,
}

/// Builds the (zeroed) model `cfg` describes, with the architecture's layers.
pub fn build_model<T: Float>(cfg: &ModelConfig) -> Result<Model<T>, ModelError> {
    build_model_tuned(cfg, &Tuning::full())
}

/// [`build_model`] with LoRA adapters and frozen parameters as `tuning` says.
pub fn build_model_tuned<T: Float>(
    cfg: &ModelConfig,
    tuning: &Tuning,
) -> Result<Model<T>, ModelError> {
    match cfg.architecture {
        Architecture::Gpt2 => gpt2::build_tuned(cfg, tuning),
        Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 => {
            llama::build_tuned(cfg, tuning)
        }
    }
}

/// The checkpoint names the architecture tolerates beyond its parameters.
pub fn name_rules(cfg: &ModelConfig) -> NameRules {
    match cfg.architecture {
        Architecture::Gpt2 => gpt2::name_rules(cfg),
        Architecture::Llama | Architecture::Mistral | Architecture::Qwen2 => llama::name_rules(cfg),
    }
}

/// Loads `path`: a `.gguf` file, or an HF directory (or its config.json).
pub fn load_model<T: Float>(path: &Path) -> Result<LoadedModel<T>, LoadError> {
    load_model_tuned(path, &Tuning::full(), 0)
}

/// [`load_model`] for `tuning` (build it with [`Tuning::lora`] from the config that
/// [`crate::hf_config::ModelConfig::from_path`] or [`model_config`] reads): the base weights from
/// `path`, the LoRA pairs initialised as PEFT does with `lora_seed` (A random, B zero; load a
/// saved adapter over them with [`crate::peft::load_adapter`]).
pub fn load_model_tuned<T: Float>(
    path: &Path,
    tuning: &Tuning,
    lora_seed: u64,
) -> Result<LoadedModel<T>, LoadError> {
    let mut loaded = if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        load_gguf_tuned(path, tuning)?
    } else {
        load_hf_dir_tuned(model_dir(path)?, tuning)?
    };
    if tuning.lora_plan().is_some() {
        crate::peft::adapter::init_lora(&mut loaded.model, lora_seed)
            .expect("the model was built with the LoRA plan");
    }
    if tuning.prompt_config().is_some() {
        crate::peft::prompt::init_prompt(&mut loaded.model, lora_seed)
            .expect("the model was built for prompt tuning");
    }
    Ok(loaded)
}

/// The config of the model at `path` (a `.gguf` file or an HF directory), to resolve a
/// [`Tuning`] against before loading.
pub fn model_config(path: &Path) -> Result<ModelConfig, LoadError> {
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        return Ok(GgufFile::open(path)?.model_config()?);
    }
    Ok(ModelConfig::from_path(model_dir(path)?).map_err(ModelError::from)?)
}

/// The HF directory `path` names (itself, or the parent of its config.json).
fn model_dir(path: &Path) -> Result<&Path, LoadError> {
    let dir = if path.is_file() && path.file_name().is_some_and(|n| n == "config.json") {
        path.parent().unwrap_or(Path::new("."))
    } else {
        path
    };
    if !dir.join("config.json").is_file() {
        return Err(LoadError::NotAModel {
            path: path.to_path_buf(),
        });
    }
    Ok(dir)
}

/// Loads an HF model directory: config.json, its safetensors weights and, when present, its
/// tokenizer.
pub fn load_hf_dir<T: Float>(dir: &Path) -> Result<LoadedModel<T>, LoadError> {
    load_hf_dir_tuned(dir, &Tuning::full())
}

/// [`load_hf_dir`] for `tuning`; the LoRA parameters are left zero.
pub fn load_hf_dir_tuned<T: Float>(
    dir: &Path,
    tuning: &Tuning,
) -> Result<LoadedModel<T>, LoadError> {
    let config = ModelConfig::from_path(dir).map_err(ModelError::from)?;
    let mut model = build_model_tuned::<T>(&config, tuning)?;
    load_model_weights(dir, &mut model, &name_rules(&config)).map_err(ModelError::from)?;
    let tokenizer = match Tokenizer::from_dir(dir) {
        Ok(t) => Some(t),
        Err(TokenizerError::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    Ok(LoadedModel {
        config,
        model,
        tokenizer,
    })
}

/// Loads a LLaMA-architecture GGUF file, dequantizing every tensor into the compute dtype.
pub fn load_gguf<T: Float>(path: &Path) -> Result<LoadedModel<T>, LoadError> {
    load_gguf_tuned(path, &Tuning::full())
}

fn load_gguf_tuned<T: Float>(path: &Path, tuning: &Tuning) -> Result<LoadedModel<T>, LoadError> {
    let file = GgufFile::open(path)?;
    let config = file.model_config()?;
    let tokenizer = file.tokenizer()?;
    let mut model = build_model_tuned::<T>(&config, tuning)?;
    fill_from_gguf(&file, &config, &mut model)?;
    Ok(LoadedModel {
        config,
        model,
        tokenizer: Some(tokenizer),
    })
}

/// Fills every parameter of `model` from the GGUF tensors; every tensor must be used and every
/// parameter found, with the HF shape.
pub fn fill_from_gguf<T: Float>(
    file: &GgufFile,
    cfg: &ModelConfig,
    model: &mut Model<T>,
) -> Result<(), LoadError> {
    let mut filled = vec![false; model.layout.slots().len()];
    let quant = model.tuning.quantization().copied();
    for (gguf, name) in file.hf_names()? {
        if let (Some(q), Some(qc)) = (model.quantized.iter().find(|q| q.name == name), &quant) {
            let info = file.tensor_info(&gguf).expect("listed by hf_names");
            if info.shape() != q.shape() {
                return Err(LoadError::Shape {
                    path: file.path.clone(),
                    name,
                    gguf,
                    got: info.shape(),
                    want: q.shape(),
                });
            }
            let values = file.hf_tensor(&gguf, cfg.num_attention_heads, cfg.num_key_value_heads)?;
            q.fill(&values, qc).map_err(|message| LoadError::Quantize {
                path: file.path.clone(),
                message,
            })?;
            continue;
        }
        let Some(id) = model
            .layout
            .slots()
            .iter()
            .position(|s| s.spec.name == name)
        else {
            return Err(LoadError::UnexpectedTensor {
                path: file.path.clone(),
                name,
                gguf,
            });
        };
        let slot = &model.layout.slots()[id];
        let info = file.tensor_info(&gguf).expect("listed by hf_names");
        if info.shape() != slot.spec.shape {
            return Err(LoadError::Shape {
                path: file.path.clone(),
                name,
                gguf,
                got: info.shape(),
                want: slot.spec.shape.clone(),
            });
        }
        let values = file.hf_tensor(&gguf, cfg.num_attention_heads, cfg.num_key_value_heads)?;
        let range = slot.range();
        for (dst, &v) in model.params[range].iter_mut().zip(&values) {
            *dst = T::from_f32(v);
        }
        filled[id] = true;
    }
    if let Some(q) = model.quantized.iter().find(|q| q.slot.get().is_none()) {
        return Err(LoadError::MissingTensor {
            path: file.path.clone(),
            name: q.name.clone(),
            gguf: gguf_name(&q.name).unwrap_or_else(|| "?".into()),
        });
    }
    let needed = |id: usize| !is_adapter_param(&model.layout.slots()[id].spec.name);
    if let Some(id) = (0..filled.len()).find(|&id| !filled[id] && needed(id)) {
        let name = model.layout.slots()[id].spec.name.clone();
        let gguf = gguf_name(&name).unwrap_or_else(|| "?".into());
        return Err(LoadError::MissingTensor {
            path: file.path.clone(),
            name,
            gguf,
        });
    }
    Ok(())
}

/// The llama.cpp name of an HF LLaMA parameter name (for error messages).
fn gguf_name(hf: &str) -> Option<String> {
    let mut probe = vec![
        "token_embd.weight".to_string(),
        "output_norm.weight".to_string(),
        "output.weight".to_string(),
    ];
    let layer: usize = hf
        .strip_prefix("model.layers.")
        .and_then(|r| r.split('.').next()?.parse().ok())
        .unwrap_or(0);
    for m in [
        "attn_norm",
        "ffn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
    ] {
        for s in ["weight", "bias"] {
            probe.push(format!("blk.{layer}.{m}.{s}"));
        }
    }
    probe
        .into_iter()
        .find(|g| crate::gguf::hf_name(g).as_deref() == Some(hf))
}
