//! DeepSpeed's `ds_config.json`: parse, validate and resolve it with DeepSpeed 0.19.x semantics.
//!
//! ```no_run
//! use rustspeed_config::{load, resolve, ResolveOptions, WorldSize};
//! let raw = load(std::path::Path::new("ds_config.json"))?;
//! let cfg = resolve(&raw, &ResolveOptions { world_size: WorldSize::from_env()?, training_args: None })?;
//! println!("ZeRO stage {}, {} per rank", cfg.zero_stage(), cfg.micro_batch_size());
//! # Ok::<(), rustspeed_config::ConfigError>(())
//! ```

mod auto;
mod base64;
mod batch;
mod blocks;
mod config;
mod error;
mod json;
mod optimizer;
mod precision;
mod reader;
mod scheduler;
mod suggest;
pub mod table;
mod zero;

#[cfg(test)]
mod tests;

use std::path::Path;

pub use auto::TrainingArgs;
pub use batch::{BatchSizes, GivenBatch, WorldSize, WorldSizeSource, LAUNCHER_VARS};
pub use blocks::{
    ActivationCheckpointingConfig, AioConfig, CheckpointConfig, CommsLoggerConfig, DataTypesConfig,
    FlopsProfilerConfig, MonitorConfig, PipelineConfig, SparseAttentionConfig, TagValidation,
};
pub use config::{resolve, AllreduceOp, DsConfig, RawConfig, ResolveOptions};
pub use error::{ConfigError, Location};
pub use optimizer::{
    AdagradParams, AdamParams, LambParams, LionParams, Optimizer, OptimizerConfig, SgdParams,
};
pub use precision::{Bf16Config, Fp16Config, Precision};
pub use reader::SetKey;
pub use scheduler::{Scheduler, SchedulerConfig, Warmup, WarmupType};
pub use table::{KeyInfo, Status};
pub use zero::{OffloadDevice, OffloadOptimizerConfig, OffloadParamConfig, ZeroConfig};

/// Parses config text; `source` names it in error messages.
pub fn parse(text: &str, source: &str) -> Result<RawConfig, ConfigError> {
    Ok(RawConfig {
        source: source.to_string(),
        root: json::parse(text, source)?,
    })
}

/// Reads a config file. Like DeepSpeed, an argument that is not an existing file but is a
/// urlsafe-base64 encoded JSON object is accepted as the config itself.
pub fn load(path: &Path) -> Result<RawConfig, ConfigError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, &path.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let decoded = path
                .to_str()
                .and_then(base64::decode)
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .filter(|text| text.trim_start().starts_with('{'));
            match decoded {
                Some(text) => parse(&text, "<base64 config>"),
                None => Err(ConfigError::NotFound {
                    path: path.to_path_buf(),
                }),
            }
        }
        Err(cause) => Err(ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        }),
    }
}

/// `load` then `resolve`.
pub fn load_and_resolve(path: &Path, opts: &ResolveOptions) -> Result<DsConfig, ConfigError> {
    resolve(&load(path)?, opts)
}
