//! CSV and TSV with a header row; every cell becomes a string field named by its header.

use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};

use super::io_error;
use crate::record::{Location, ReadOutput, Record};
use crate::DataError;

pub(super) fn read(
    file: &Arc<Path>,
    delimiter: u8,
    skip_bad: bool,
) -> Result<ReadOutput, DataError> {
    let bytes = std::fs::read(file).map_err(|e| io_error(file, e))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .flexible(false)
        .from_reader(bytes);
    let headers = reader
        .headers()
        .map_err(|e| DataError::BadCsv {
            loc: Location::line(file, 1),
            message: format!("cannot read the header row: {e}"),
        })?
        .clone();
    let mut out = ReadOutput::default();
    let mut row = csv::StringRecord::new();
    loop {
        let line = reader.position().line() + 1;
        match reader.read_record(&mut row) {
            Ok(false) => break,
            Ok(true) => {
                let line = row.position().map_or(line, |p| p.line());
                let mut fields = Map::new();
                for (name, cell) in headers.iter().zip(row.iter()) {
                    fields.insert(name.to_string(), Value::String(cell.to_string()));
                }
                out.records.push(Record {
                    loc: Location::line(file, line),
                    fields,
                });
            }
            Err(e) => {
                let line = e.position().map_or(line, |p| p.line());
                let err = DataError::BadCsv {
                    loc: Location::line(file, line),
                    message: csv_message(&e, headers.len()),
                };
                if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                    return Err(err);
                }
                out.bad(err, skip_bad)?;
            }
        }
    }
    Ok(out)
}

fn csv_message(e: &csv::Error, n_headers: usize) -> String {
    match e.kind() {
        csv::ErrorKind::UnequalLengths { len, .. } => {
            format!("found {len} fields, expected {n_headers} (as many as the header row)")
        }
        csv::ErrorKind::Utf8 { err, .. } => format!("not valid UTF-8: {err}"),
        _ => e.to_string(),
    }
}
