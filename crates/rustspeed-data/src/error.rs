//! The crate's error type. Every record-level error carries the record's location so a user
//! can open the file at the right line.

use std::path::PathBuf;

use crate::record::Location;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: unsupported data file extension `{ext}`; expected .jsonl, .ndjson, .json, .csv, .tsv, .txt or .parquet"
    )]
    UnknownExtension { path: PathBuf, ext: String },
    #[error("{path}: Parquet support was not compiled in (enable the `parquet` feature of rustspeed-data)")]
    ParquetDisabled { path: PathBuf },
    #[error("{path}: bad Parquet file: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("{loc}: bad JSON: {message}")]
    BadJson { loc: Location, message: String },
    #[error("{loc}: bad CSV row: {message}")]
    BadCsv { loc: Location, message: String },
    #[error("{loc}: {message}")]
    BadRecord { loc: Location, message: String },
    #[error("{loc}: field `{field}`: {problem}")]
    BadField {
        loc: Location,
        field: String,
        problem: String,
    },
    #[error("{path}: the data has no records")]
    NoRecords { path: PathBuf },
    #[error("cannot detect the data format: {reason}; pass --format text, alpaca or chat")]
    UndetectedFormat { reason: String },
    #[error("prompt template {source_name}: {problem}")]
    PromptTemplate {
        source_name: String,
        problem: String,
    },
    #[error("chat template {source_name}: {problem}")]
    ChatTemplateLoad {
        source_name: String,
        problem: String,
    },
    #[error("{loc}: chat template: {message}")]
    ChatRender { loc: Location, message: String },
    #[error("{loc}: tokenizer failed: {message}")]
    Tokenizer { loc: Location, message: String },
    #[error("cannot resume the data order: the checkpoint has {field} = {saved}, the current data has {now}")]
    ResumeMismatch {
        field: &'static str,
        saved: String,
        now: String,
    },
    #[error("invalid data option {name} = {value}: expected {expected}")]
    InvalidOption {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
}

impl DataError {
    pub(crate) fn field(loc: &Location, field: &str, problem: impl Into<String>) -> DataError {
        DataError::BadField {
            loc: loc.clone(),
            field: field.to_string(),
            problem: problem.into(),
        }
    }
}
