//! Parquet through the crate's row API: no arrow, only what reading needs. Nested columns
//! (a `messages` list of structs) become JSON arrays and objects.

use std::path::Path;
use std::sync::Arc;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::{Field, Row};
use serde_json::{Map, Number, Value};

use super::io_error;
use crate::record::{Location, ReadOutput, Record};
use crate::DataError;

pub(super) fn read(file: &Arc<Path>) -> Result<ReadOutput, DataError> {
    let bad = |e: parquet::errors::ParquetError| DataError::Parquet {
        path: file.to_path_buf(),
        message: e.to_string(),
    };
    let handle = std::fs::File::open(file).map_err(|e| io_error(file, e))?;
    let reader = SerializedFileReader::new(handle).map_err(bad)?;
    let rows = reader.get_row_iter(None).map_err(bad)?;
    let mut out = ReadOutput::default();
    for (i, row) in rows.enumerate() {
        let row = row.map_err(bad)?;
        out.records.push(Record {
            loc: Location::row(file, i as u64 + 1),
            fields: row_to_object(&row),
        });
    }
    Ok(out)
}

fn row_to_object(row: &Row) -> Map<String, Value> {
    row.get_column_iter()
        .map(|(name, field)| (name.clone(), field_to_json(field)))
        .collect()
}

fn field_to_json(field: &Field) -> Value {
    let float = |x: f64| Number::from_f64(x).map_or(Value::Null, Value::Number);
    match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(x) => Value::from(*x),
        Field::Short(x) => Value::from(*x),
        Field::Int(x) => Value::from(*x),
        Field::Long(x) => Value::from(*x),
        Field::UByte(x) => Value::from(*x),
        Field::UShort(x) => Value::from(*x),
        Field::UInt(x) => Value::from(*x),
        Field::ULong(x) => Value::from(*x),
        Field::Float16(x) => float(f64::from(f32::from(*x))),
        Field::Float(x) => float(f64::from(*x)),
        Field::Double(x) => float(*x),
        Field::Str(s) => Value::String(s.clone()),
        // Strings written without the UTF8 annotation arrive as raw bytes.
        Field::Bytes(b) => match std::str::from_utf8(b.data()) {
            Ok(s) => Value::String(s.to_string()),
            Err(_) => Value::Array(b.data().iter().map(|&x| Value::from(x)).collect()),
        },
        Field::Group(row) => Value::Object(row_to_object(row)),
        Field::ListInternal(list) => {
            Value::Array(list.elements().iter().map(field_to_json).collect())
        }
        Field::MapInternal(map) => {
            let mut obj = Map::new();
            for (k, v) in map.entries() {
                let key = match k {
                    Field::Str(s) => s.clone(),
                    other => other.to_string(),
                };
                obj.insert(key, field_to_json(v));
            }
            Value::Object(obj)
        }
        // Binary, decimal and temporal columns are never text fields; their display form is
        // enough for an error message naming a wrong type.
        other => Value::String(other.to_string()),
    }
}
