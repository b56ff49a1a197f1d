//! Data file readers. The reader is picked by file extension; every reader yields JSON-object
//! records tagged with their file and line (or Parquet row).

mod delimited;
mod json_array;
pub(crate) use json_array::json_type;
mod jsonl;
#[cfg(feature = "parquet")]
mod parquet_rows;
mod text_lines;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::record::ReadOutput;
use crate::DataError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    JsonLines,
    JsonArray,
    Csv,
    Tsv,
    Text,
    Parquet,
}

impl FileKind {
    pub fn from_path(path: &Path) -> Result<FileKind, DataError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("")
            .to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" | "ndjson" => Ok(FileKind::JsonLines),
            "json" => Ok(FileKind::JsonArray),
            "csv" => Ok(FileKind::Csv),
            "tsv" => Ok(FileKind::Tsv),
            "txt" => Ok(FileKind::Text),
            "parquet" => Ok(FileKind::Parquet),
            _ => Err(DataError::UnknownExtension {
                path: path.to_path_buf(),
                ext,
            }),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Turn a malformed record into a skipped one (kept in `ReadOutput::skipped`) instead of an error.
    pub skip_bad_records: bool,
    /// The field name each line of a .txt file is stored under (the text column).
    pub text_column: String,
}

impl Default for ReadOptions {
    fn default() -> ReadOptions {
        ReadOptions {
            skip_bad_records: false,
            text_column: "text".to_string(),
        }
    }
}

/// Reads every record of one data file, in file order.
pub fn read_file(path: &Path, opts: &ReadOptions) -> Result<ReadOutput, DataError> {
    let kind = FileKind::from_path(path)?;
    let file: Arc<Path> = Arc::from(path);
    let out = match kind {
        FileKind::JsonLines => jsonl::read(&file, opts.skip_bad_records)?,
        FileKind::JsonArray => json_array::read(&file, opts.skip_bad_records)?,
        FileKind::Csv => delimited::read(&file, b',', opts.skip_bad_records)?,
        FileKind::Tsv => delimited::read(&file, b'\t', opts.skip_bad_records)?,
        FileKind::Text => text_lines::read(&file, &opts.text_column, opts.skip_bad_records)?,
        #[cfg(feature = "parquet")]
        FileKind::Parquet => parquet_rows::read(&file)?,
        #[cfg(not(feature = "parquet"))]
        FileKind::Parquet => {
            return Err(DataError::ParquetDisabled {
                path: path.to_path_buf(),
            })
        }
    };
    if out.records.is_empty() && out.skipped.is_empty() {
        return Err(DataError::NoRecords {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// Reads several files as one data set, in the order given.
pub fn read_files(paths: &[PathBuf], opts: &ReadOptions) -> Result<ReadOutput, DataError> {
    let mut all = ReadOutput::default();
    for path in paths {
        let out = read_file(path, opts)?;
        all.records.extend(out.records);
        all.skipped.extend(out.skipped);
        all.blank_lines += out.blank_lines;
    }
    Ok(all)
}

pub(crate) fn io_error(path: &Path, source: std::io::Error) -> DataError {
    DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Splits file bytes into lines (1-based numbers), dropping a UTF-8 BOM and `\r` line ends.
pub(crate) fn lines(bytes: &[u8]) -> impl Iterator<Item = (u64, &[u8])> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let trailing_newline = bytes.last() == Some(&b'\n');
    let mut parts: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    if trailing_newline || bytes.is_empty() {
        parts.pop();
    }
    parts
        .into_iter()
        .enumerate()
        .map(|(i, l)| (i as u64 + 1, l.strip_suffix(b"\r").unwrap_or(l)))
}

/// serde_json's message without its " at line L column C" suffix, which counts from wherever
/// the parser started rather than from the file's start.
pub(crate) fn json_message(e: &serde_json::Error) -> String {
    let full = e.to_string();
    match full.rfind(" at line ") {
        Some(i) => full[..i].to_string(),
        None => full,
    }
}
