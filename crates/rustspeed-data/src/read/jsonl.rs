//! JSON Lines: one JSON object per line; blank lines are ignored.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use super::{io_error, lines};
use crate::record::{Location, ReadOutput, Record};
use crate::DataError;

pub(super) fn read(file: &Arc<Path>, skip_bad: bool) -> Result<ReadOutput, DataError> {
    let bytes = std::fs::read(file).map_err(|e| io_error(file, e))?;
    let mut out = ReadOutput::default();
    for (line_no, line) in lines(&bytes) {
        let loc = Location::line(file, line_no);
        if line.iter().all(u8::is_ascii_whitespace) {
            out.blank_lines += 1;
            continue;
        }
        match parse_object(line, &loc) {
            Ok(rec) => out.records.push(rec),
            Err(e) => out.bad(e, skip_bad)?,
        }
    }
    Ok(out)
}

fn parse_object(line: &[u8], loc: &Location) -> Result<Record, DataError> {
    let value: Value = serde_json::from_slice(line).map_err(|e| DataError::BadJson {
        loc: loc.clone(),
        message: format!("{} at column {}", super::json_message(&e), e.column()),
    })?;
    super::json_array::into_record(value, loc)
}
