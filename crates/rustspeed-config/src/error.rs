//! Every way a DeepSpeed config can be wrong, each naming the file, line and key path.

use std::fmt;
use std::path::PathBuf;

/// Where a key or value sits in the config text (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// Shared by every location of one file; keeps `ConfigError` small.
    pub source: std::sync::Arc<str>,
    pub line: u32,
    pub column: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.line)
    }
}

/// A bad DeepSpeed config. The CLI maps every variant to exit code 2 (the user's input is wrong).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the DeepSpeed config: {cause}")]
    Read {
        path: PathBuf,
        #[source]
        cause: std::io::Error,
    },
    #[error(
        "{path}: no such file, and not a urlsafe-base64 JSON config either; \
         expected a path to an existing ds_config.json"
    )]
    NotFound { path: PathBuf },
    #[error("{at}:{column}: invalid JSON: {message}", column = at.column)]
    Syntax { at: Location, message: String },
    #[error(
        "{at}: {key}: duplicate key (first set at line {first_line}); DeepSpeed refuses duplicate \
         keys, keep only one of them"
    )]
    DuplicateKey {
        at: Location,
        key: String,
        first_line: u32,
    },
    #[error("{at}: {key}: unknown key in `{block}`{suggestion}; allowed keys: {allowed}")]
    UnknownKey {
        at: Location,
        key: String,
        block: String,
        suggestion: String,
        allowed: String,
    },
    #[error("{at}: {key}: expected {expected}, got {got}")]
    WrongType {
        at: Location,
        key: String,
        expected: String,
        got: String,
    },
    #[error("{at}: {key}: {message}")]
    InvalidValue {
        at: Location,
        key: String,
        message: String,
    },
    #[error("{at}: {key}: {message}")]
    Conflict {
        at: Location,
        key: String,
        message: String,
    },
    #[error("{message}")]
    Batch { message: String },
    #[error("{key}: {message}")]
    WorldSize { key: String, message: String },
    #[error("{at}: {key}: \"auto\" is not resolved: {hint}")]
    UnresolvedAuto {
        at: Location,
        key: String,
        hint: String,
    },
    #[error(
        "{at}: {key}: the config sets {config_value} but {arg} gives {arg_value}; \
         remove one of them or make them agree (or set the key to \"auto\")"
    )]
    AutoMismatch {
        at: Location,
        key: String,
        config_value: String,
        arg: String,
        arg_value: String,
    },
    #[error("{at}: {key}: not supported yet: {message}")]
    Unsupported {
        at: Location,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// The dotted key path the error is about, when it is about one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::DuplicateKey { key, .. }
            | ConfigError::UnknownKey { key, .. }
            | ConfigError::WrongType { key, .. }
            | ConfigError::InvalidValue { key, .. }
            | ConfigError::Conflict { key, .. }
            | ConfigError::WorldSize { key, .. }
            | ConfigError::UnresolvedAuto { key, .. }
            | ConfigError::AutoMismatch { key, .. }
            | ConfigError::Unsupported { key, .. } => Some(key),
            _ => None,
        }
    }
}
