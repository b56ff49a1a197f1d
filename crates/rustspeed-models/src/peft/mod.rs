//! Parameter-efficient fine-tuning in HF PEFT's formats: LoRA configs (`adapter_config.json`),
//! which modules they touch, adapter weights (`adapter_model.safetensors`) in and out, and
//! merging an adapter into its base model.

pub mod adapter;
pub mod config;
pub mod merge;
pub mod targets;

use std::path::PathBuf;

pub use adapter::{load_adapter, save_adapter, AdapterFiles};
pub use config::{LoraBias, LoraConfig, LoraInit, TargetModules};
pub use targets::LoraModule;

use crate::error::ModelError;
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

#[cfg(test)]
pub(crate) mod tests;
