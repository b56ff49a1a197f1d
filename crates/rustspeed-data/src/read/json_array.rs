//! A JSON file holding one array of record objects. Each element is parsed on its own so that
//! its error can name the line it starts on.

use std::path::Path;
use std::sync::Arc;

use serde_json::Value;

use super::io_error;
use crate::record::{Location, ReadOutput, Record};
use crate::DataError;

pub(super) fn read(file: &Arc<Path>, skip_bad: bool) -> Result<ReadOutput, DataError> {
    let bytes = std::fs::read(file).map_err(|e| io_error(file, e))?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let mut cursor = Cursor {
        bytes,
        pos: 0,
        line: 1,
    };
    let mut out = ReadOutput::default();
    cursor.skip_ws();
    if cursor.peek() != Some(b'[') {
        return Err(DataError::BadRecord {
            loc: Location::line(file, cursor.line),
            message: "expected a JSON array of record objects (use .jsonl for one object per line)"
                .to_string(),
        });
    }
    cursor.advance(1);
    cursor.skip_ws();
    if cursor.peek() == Some(b']') {
        return Ok(out);
    }
    loop {
        cursor.skip_ws();
        let loc = Location::line(file, cursor.line);
        // A syntax error inside the array leaves no safe place to resume, so it is fatal even
        // when bad records are skipped.
        let mut stream =
            serde_json::Deserializer::from_slice(&cursor.bytes[cursor.pos..]).into_iter::<Value>();
        let value = match stream.next() {
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                return Err(DataError::BadJson {
                    loc: Location::line(file, loc.line + e.line() as u64 - 1),
                    message: super::json_message(&e),
                })
            }
            None => {
                return Err(DataError::BadJson {
                    loc,
                    message: "unexpected end of file inside the array".to_string(),
                })
            }
        };
        cursor.advance(stream.byte_offset());
        match into_record(value, &loc) {
            Ok(rec) => out.records.push(rec),
            Err(e) => out.bad(e, skip_bad)?,
        }
        cursor.skip_ws();
        match cursor.peek() {
            Some(b',') => cursor.advance(1),
            Some(b']') => break,
            _ => {
                return Err(DataError::BadJson {
                    loc: Location::line(file, cursor.line),
                    message: "expected `,` or `]` after an array element".to_string(),
                })
            }
        }
    }
    Ok(out)
}

pub(super) fn into_record(value: Value, loc: &Location) -> Result<Record, DataError> {
    match value {
        Value::Object(fields) => Ok(Record {
            loc: loc.clone(),
            fields,
        }),
        other => Err(DataError::BadRecord {
            loc: loc.clone(),
            message: format!("expected a JSON object, found {}", json_type(&other)),
        }),
    }
}

pub fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    line: u64,
}

impl Cursor<'_> {
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn advance(&mut self, n: usize) {
        let end = (self.pos + n).min(self.bytes.len());
        self.line += self.bytes[self.pos..end]
            .iter()
            .filter(|&&b| b == b'\n')
            .count() as u64;
        self.pos = end;
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.advance(1);
        }
    }
}
