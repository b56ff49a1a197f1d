//! Parameter-efficient fine-tuning in HF PEFT's formats: LoRA configs (`adapter_config.json`),
//! which modules they touch, adapter weights (`adapter_model.safetensors`) in and out, and
//! merging an adapter into its base model; and the prompt-learning methods (prompt tuning,
//! P-tuning, prefix tuning) with their adapters.

pub mod adapter;
pub mod config;
pub mod lstm;
pub mod merge;
pub mod prefix;
pub mod prompt;
pub mod prompt_config;
pub mod prompt_encoder;
pub mod targets;

use std::path::PathBuf;

pub use adapter::{load_adapter, save_adapter, AdapterFiles};
pub use config::{LoraBias, LoraConfig, LoraInit, TargetModules};
pub use prompt::prefix_batch;
pub use prompt_config::{PromptInit, PromptKind, PromptTuningConfig};
pub use targets::LoraModule;

use crate::error::ModelError;
use serde_json::Value;

use crate::export::ExportError;
use crate::weights::WeightsError;

#[derive(Debug, thiserror::Error)]
pub enum PeftError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: not valid JSON: {message}")]
    Json { file: String, message: String },
    #[error("{file}: `{key}` = {value}; expected {expected}")]
    Invalid {
        file: String,
        key: String,
        value: String,
        expected: String,
    },
    #[error("not supported yet: {file}: `{key}` = {value} ({hint})")]
    Unsupported {
        file: String,
        key: String,
        value: String,
        hint: String,
    },
    #[error("{path}: {message}")]
    Adapter { path: PathBuf, message: String },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Export(#[from] ExportError),
}

impl PeftError {
    /// `file`'s `key` holds `value`, not what `expected` says.
    pub(crate) fn invalid(file: &str, key: &str, value: &Value, expected: &str) -> PeftError {
        PeftError::Invalid {
            file: file.to_string(),
            key: key.to_string(),
            value: value.to_string(),
            expected: expected.to_string(),
        }
    }

    /// `file`'s `key` = `value` is PEFT's but not implemented here (`hint`: what is).
    pub(crate) fn unsupported(file: &str, key: &str, value: &Value, hint: &str) -> PeftError {
        PeftError::Unsupported {
            file: file.to_string(),
            key: key.to_string(),
            value: value.to_string(),
            hint: hint.to_string(),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;

/// `path`'s adapter_config.json (`path` is the adapter directory or the file itself): its name
/// for error messages and its text.
pub(crate) fn read_config_file(path: &std::path::Path) -> Result<(String, String), PeftError> {
    let file = if path.is_dir() {
        path.join(adapter::CONFIG_FILE)
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|source| PeftError::Io {
        path: file.clone(),
        source,
    })?;
    Ok((file.display().to_string(), text))
}

/// The PEFT methods rustspeed reads from adapter_config.json.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdapterKind {
    Lora,
    /// PROMPT_TUNING, P_TUNING or PREFIX_TUNING.
    Prompt(PromptKind),
}

/// Which method adapter_config.json text (`file` names it in errors) describes; other
/// `peft_type`s fail as not supported yet, naming the type.
pub fn adapter_kind(file: &str, text: &str) -> Result<AdapterKind, PeftError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| PeftError::Json {
        file: file.to_string(),
        message: e.to_string(),
    })?;
    match value.get("peft_type").and_then(|v| v.as_str()) {
        Some("LORA") => Ok(AdapterKind::Lora),
        Some("PROMPT_TUNING") => Ok(AdapterKind::Prompt(PromptKind::PromptTuning)),
        Some("P_TUNING") => Ok(AdapterKind::Prompt(PromptKind::PTuning)),
        Some("PREFIX_TUNING") => Ok(AdapterKind::Prompt(PromptKind::PrefixTuning)),
        Some(other) => Err(PeftError::Unsupported {
            file: file.to_string(),
            key: "peft_type".into(),
            value: format!("\"{other}\""),
            hint: "rustspeed implements LORA, PROMPT_TUNING, P_TUNING and PREFIX_TUNING adapters".into(),
        }),
        None => Err(PeftError::Invalid {
            file: file.to_string(),
            key: "peft_type".into(),
            value: "missing".into(),
            expected: "\"LORA\", \"PROMPT_TUNING\", \"P_TUNING\" or \"PREFIX_TUNING\" (is this a PEFT adapter_config.json?)".into(),
        }),
    }
}
