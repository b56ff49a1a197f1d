//! DeepSpeed's `ds_config.json`: parse, validate and resolve it with DeepSpeed 0.19.x semantics.

/// Placeholder until the config crate lands.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);
