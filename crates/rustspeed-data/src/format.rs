//! Data formats, the field (column) names they read, and format detection.

use std::fmt;
use std::str::FromStr;

use crate::record::Record;
use crate::DataError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// A text field (or one text per line of a .txt file); packed by default.
    Text,
    /// `instruction`, optional `input`, `output`: loss on the output only.
    Alpaca,
    /// `messages: [{role, content}, ...]`: loss on assistant turns only.
    Chat,
}

impl FromStr for Format {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Format, DataError> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(Format::Text),
            "alpaca" => Ok(Format::Alpaca),
            "chat" => Ok(Format::Chat),
            _ => Err(DataError::InvalidOption {
                name: "--format",
                value: s.to_string(),
                expected: "text, alpaca or chat",
            }),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Text => "text",
            Format::Alpaca => "alpaca",
            Format::Chat => "chat",
        })
    }
}

/// Field names the formats read (`--text-column`, `--instruction-column`, ...). They apply to
/// every file type, not only CSV.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    pub text: String,
    pub instruction: String,
    pub input: String,
    pub output: String,
    pub messages: String,
}

impl Default for Columns {
    fn default() -> Columns {
        Columns {
            text: "text".to_string(),
            instruction: "instruction".to_string(),
            input: "input".to_string(),
            output: "output".to_string(),
            messages: "messages".to_string(),
        }
    }
}

/// How many leading records detection looks at.
pub const DETECT_RECORDS: usize = 16;

/// Picks the format from the fields of the first records: `messages` means chat,
/// `instruction` + `output` means alpaca, `text` means text. Every inspected record must point
/// to exactly one format, otherwise the user has to say which.
pub fn detect_format(records: &[Record], cols: &Columns) -> Result<Format, DataError> {
    let mut found: Option<Format> = None;
    for rec in records.iter().take(DETECT_RECORDS) {
        let has = |k: &str| rec.fields.contains_key(k);
        let mut candidates = Vec::new();
        if has(&cols.messages) {
            candidates.push(Format::Chat);
        }
        if has(&cols.instruction) && has(&cols.output) {
            candidates.push(Format::Alpaca);
        }
        if has(&cols.text) {
            candidates.push(Format::Text);
        }
        let this = match candidates.as_slice() {
            [one] => *one,
            [] => {
                let keys: Vec<&str> = rec.fields.keys().map(String::as_str).collect();
                return Err(DataError::UndetectedFormat {
                    reason: format!(
                        "{}: fields [{}] match none of `{}` (text), `{}`+`{}` (alpaca), `{}` (chat)",
                        rec.loc,
                        keys.join(", "),
                        cols.text,
                        cols.instruction,
                        cols.output,
                        cols.messages
                    ),
                });
            }
            many => {
                let names: Vec<String> = many.iter().map(Format::to_string).collect();
                return Err(DataError::UndetectedFormat {
                    reason: format!(
                        "{}: fields match several formats ({})",
                        rec.loc,
                        names.join(", ")
                    ),
                });
            }
        };
        match found {
            Some(prev) if prev != this => {
                return Err(DataError::UndetectedFormat {
                    reason: format!(
                        "{}: looks like {this} but earlier records look like {prev}",
                        rec.loc
                    ),
                })
            }
            _ => found = Some(this),
        }
    }
    found.ok_or_else(|| DataError::UndetectedFormat {
        reason: "there are no records to inspect".to_string(),
    })
}
