//! Plain text: each non-blank line is one text record.

use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::{io_error, lines};
use crate::record::{Location, ReadOutput, Record};
use crate::DataError;

pub(super) fn read(
    file: &Arc<Path>,
    text_column: &str,
    skip_bad: bool,
) -> Result<ReadOutput, DataError> {
    let bytes = std::fs::read(file).map_err(|e| io_error(file, e))?;
    let mut out = ReadOutput::default();
    for (line_no, line) in lines(&bytes) {
        let loc = Location::line(file, line_no);
        let text = match std::str::from_utf8(line) {
            Ok(t) => t,
            Err(e) => {
                out.bad(
                    DataError::BadRecord {
                        loc,
                        message: format!("not valid UTF-8: {e}"),
                    },
                    skip_bad,
                )?;
                continue;
            }
        };
        // Blank lines would otherwise become lone EOS tokens in the packed stream.
        if text.trim().is_empty() {
            out.blank_lines += 1;
            continue;
        }
        let mut fields = Map::new();
        fields.insert(text_column.to_string(), Value::String(text.to_string()));
        out.records.push(Record { loc, fields });
    }
    Ok(out)
}
