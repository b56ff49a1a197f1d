//! Typed access to record fields, with errors that name the record and the field.

use serde_json::Value;

use crate::read::json_type;
use crate::record::Record;
use crate::DataError;

pub(crate) fn required_str<'r>(rec: &'r Record, field: &str) -> Result<&'r str, DataError> {
    match rec.fields.get(field) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(DataError::field(
            &rec.loc,
            field,
            format!("expected a string, found {}", json_type(other)),
        )),
        None => Err(DataError::field(
            &rec.loc,
            field,
            format!("missing (the record has fields [{}])", field_names(rec)),
        )),
    }
}

/// A field that may be absent, null or empty, all meaning "none".
pub(crate) fn optional_str<'r>(rec: &'r Record, field: &str) -> Result<Option<&'r str>, DataError> {
    match rec.fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(DataError::field(
            &rec.loc,
            field,
            format!("expected a string or null, found {}", json_type(other)),
        )),
    }
}

fn field_names(rec: &Record) -> String {
    rec.fields
        .keys()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}
