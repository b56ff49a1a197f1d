//! A raw record as read from a data file: a JSON object plus where it came from.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};

/// Where a record starts: a 1-based line for text-like files (JSONL, JSON arrays, CSV, TSV,
/// .txt) or a 1-based row for Parquet, which has no lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: Arc<Path>,
    pub line: u64,
    pub is_row: bool,
}

impl Location {
    pub fn line(file: &Arc<Path>, line: u64) -> Location {
        Location {
            file: Arc::clone(file),
            line,
            is_row: false,
        }
    }

    pub fn row(file: &Arc<Path>, row: u64) -> Location {
        Location {
            file: Arc::clone(file),
            line: row,
            is_row: true,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_row {
            write!(f, "{}: row {}", self.file.display(), self.line)
        } else {
            write!(f, "{}:{}", self.file.display(), self.line)
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub loc: Location,
    pub fields: Map<String, Value>,
}

/// What a reader produced: the good records, and (with `skip_bad_records`) the errors of the
/// records it skipped.
#[derive(Debug, Default)]
pub struct ReadOutput {
    pub records: Vec<Record>,
    pub skipped: Vec<crate::DataError>,
    /// Whitespace-only lines of JSONL and .txt files: not records, not errors.
    pub blank_lines: usize,
}

impl ReadOutput {
    /// Records a bad record: fatal unless the caller asked to skip bad records.
    pub(crate) fn bad(
        &mut self,
        err: crate::DataError,
        skip_bad: bool,
    ) -> Result<(), crate::DataError> {
        if skip_bad {
            self.skipped.push(err);
            Ok(())
        } else {
            Err(err)
        }
    }
}
