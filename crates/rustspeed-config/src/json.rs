//! A small JSON reader that remembers the line and column of every key and value, so that
//! errors can point at `ds_config.json:12`. Strict JSON, plus `//` and `#` line comments because
//! DeepSpeed reads hjson and users paste commented configs. Duplicate keys are refused here, as
//! DeepSpeed's `dict_raise_error_on_duplicate_keys` does.

use crate::error::{ConfigError, Location};

#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub kind: Kind,
    pub line: u32,
    pub column: u32,
}

/// A number keeps its text so that integer keys can tell `2e8` (a whole number) from `2.5`.
#[derive(Debug, Clone, PartialEq)]
pub struct Number {
    pub text: String,
    pub value: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub key: String,
    pub line: u32,
    pub column: u32,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Kind {
    Null,
    Bool(bool),
    Number(Number),
    String(String),
    Array(Vec<Value>),
    Object(Vec<Member>),
}

impl Value {
    pub fn new(kind: Kind, line: u32, column: u32) -> Value {
        Value { kind, line, column }
    }

    pub fn as_object(&self) -> Option<&[Member]> {
        match &self.kind {
            Kind::Object(m) => Some(m),
            _ => None,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_object()?
            .iter()
            .find(|m| m.key == key)
            .map(|m| &m.value)
    }

    pub fn is_auto(&self) -> bool {
        matches!(&self.kind, Kind::String(s) if s == "auto")
    }

    /// A short description for "expected X, got Y" messages.
    pub fn describe(&self) -> String {
        match &self.kind {
            Kind::Null => "null".into(),
            Kind::Bool(b) => format!("{b} (a boolean)"),
            Kind::Number(n) => format!("{} (a number)", n.text),
            Kind::String(s) => format!("\"{s}\" (a string)"),
            Kind::Array(_) => "an array".into(),
            Kind::Object(_) => "an object".into(),
        }
    }

    /// The value as plain JSON (positions dropped).
    pub fn to_json(&self) -> serde_json::Value {
        match &self.kind {
            Kind::Null => serde_json::Value::Null,
            Kind::Bool(b) => (*b).into(),
            Kind::Number(n) => number_to_json(n),
            Kind::String(s) => s.clone().into(),
            Kind::Array(items) => items.iter().map(Value::to_json).collect(),
            Kind::Object(members) => members
                .iter()
                .map(|m| (m.key.clone(), m.value.to_json()))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        }
    }
}

fn number_to_json(n: &Number) -> serde_json::Value {
    if let Ok(i) = n.text.parse::<i64>() {
        return i.into();
    }
    if n.value.fract() == 0.0 && n.value.abs() < 9.0e15 {
        return (n.value as i64).into();
    }
    serde_json::Number::from_f64(n.value)
        .map(serde_json::Value::Number)
        .unwrap_or(serde_json::Value::Null)
}

/// Parses `text` (named `source` in errors). The top level must be an object.
pub fn parse(text: &str, source: &str) -> Result<Value, ConfigError> {
    let mut p = Parser {
        bytes: text.as_bytes(),
        pos: 0,
        line: 1,
        line_start: 0,
        source,
        path: Vec::new(),
    };
    p.skip_ws()?;
    let value = p.value()?;
    p.skip_ws()?;
    if p.pos < p.bytes.len() {
        return Err(p.syntax("unexpected text after the end of the top-level object"));
    }
    if value.as_object().is_none() {
        return Err(ConfigError::WrongType {
            at: Location {
                source: source.into(),
                line: value.line,
                column: value.column,
            },
            key: "<top level>".into(),
            expected: "a JSON object".into(),
            got: value.describe(),
        });
    }
    Ok(value)
}

struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
    line: u32,
    line_start: usize,
    source: &'a str,
    /// Key path of the object being read, for duplicate-key messages.
    path: Vec<String>,
}

impl Parser<'_> {
    fn column(&self) -> u32 {
        (self.pos - self.line_start + 1) as u32
    }

    fn location(&self) -> Location {
        Location {
            source: self.source.into(),
            line: self.line,
            column: self.column(),
        }
    }

    fn syntax(&self, message: &str) -> ConfigError {
        ConfigError::Syntax {
            at: self.location(),
            message: message.into(),
        }
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn bump(&mut self) -> Option<u8> {
        let b = self.peek()?;
        self.pos += 1;
        if b == b'\n' {
            self.line += 1;
            self.line_start = self.pos;
        }
        Some(b)
    }

    fn skip_ws(&mut self) -> Result<(), ConfigError> {
        loop {
            match self.peek() {
                Some(b' ' | b'\t' | b'\r' | b'\n') => {
                    self.bump();
                }
                Some(b'#') => self.skip_line(),
                Some(b'/') if self.bytes.get(self.pos + 1) == Some(&b'/') => self.skip_line(),
                Some(b'/') => {
                    return Err(self.syntax("only `//` and `#` line comments are accepted"))
                }
                _ => return Ok(()),
            }
        }
    }

    fn skip_line(&mut self) {
        while let Some(b) = self.peek() {
            if b == b'\n' {
                break;
            }
            self.bump();
        }
    }

    fn value(&mut self) -> Result<Value, ConfigError> {
        let (line, column) = (self.line, self.column());
        let kind = match self.peek() {
            None => return Err(self.syntax("unexpected end of input, expected a value")),
            Some(b'{') => self.object()?,
            Some(b'[') => self.array()?,
            Some(b'"') => Kind::String(self.string()?),
            Some(b'-' | b'0'..=b'9') => Kind::Number(self.number()?),
            Some(b't') => self.literal("true", Kind::Bool(true))?,
            Some(b'f') => self.literal("false", Kind::Bool(false))?,
            Some(b'n') => self.literal("null", Kind::Null)?,
            Some(b) => {
                return Err(self.syntax(&format!(
                    "unexpected character `{}`, expected a value",
                    b as char
                )))
            }
        };
        Ok(Value::new(kind, line, column))
    }

    fn literal(&mut self, word: &str, kind: Kind) -> Result<Kind, ConfigError> {
        if self.bytes[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(kind)
        } else {
            Err(self.syntax(
                "unexpected word (strings need double quotes; true/false/null are lower case)",
            ))
        }
    }

    fn object(&mut self) -> Result<Kind, ConfigError> {
        self.bump();
        let mut members: Vec<Member> = Vec::new();
        self.skip_ws()?;
        if self.peek() == Some(b'}') {
            self.bump();
            return Ok(Kind::Object(members));
        }
        loop {
            self.skip_ws()?;
            if self.peek() != Some(b'"') {
                return Err(self.syntax("expected a double-quoted key"));
            }
            let (line, column) = (self.line, self.column());
            let key = self.string()?;
            if let Some(first) = members.iter().find(|m| m.key == key) {
                let mut path = self.path.clone();
                path.push(key.clone());
                return Err(ConfigError::DuplicateKey {
                    at: Location {
                        source: self.source.into(),
                        line,
                        column,
                    },
                    key: path.join("."),
                    first_line: first.line,
                });
            }
            self.skip_ws()?;
            if self.bump() != Some(b':') {
                return Err(self.syntax("expected `:` after the key"));
            }
            self.skip_ws()?;
            self.path.push(key.clone());
            let value = self.value()?;
            self.path.pop();
            members.push(Member {
                key,
                line,
                column,
                value,
            });
            self.skip_ws()?;
            match self.peek() {
                Some(b',') => {
                    self.bump();
                    self.skip_ws()?;
                    if self.peek() == Some(b'}') {
                        return Err(self.syntax("trailing comma before `}`"));
                    }
                }
                Some(b'}') => {
                    self.bump();
                    return Ok(Kind::Object(members));
                }
                _ => return Err(self.syntax("expected `,` or `}` after a member")),
            }
        }
    }

    fn array(&mut self) -> Result<Kind, ConfigError> {
        self.bump();
        let mut items = Vec::new();
        self.skip_ws()?;
        if self.peek() == Some(b']') {
            self.bump();
            return Ok(Kind::Array(items));
        }
        loop {
            self.skip_ws()?;
            self.path.push(format!("[{}]", items.len()));
            items.push(self.value()?);
            self.path.pop();
            self.skip_ws()?;
            match self.peek() {
                Some(b',') => {
                    self.bump();
                    self.skip_ws()?;
                    if self.peek() == Some(b']') {
                        return Err(self.syntax("trailing comma before `]`"));
                    }
                }
                Some(b']') => {
                    self.bump();
                    return Ok(Kind::Array(items));
                }
                _ => return Err(self.syntax("expected `,` or `]` in an array")),
            }
        }
    }

    fn string(&mut self) -> Result<String, ConfigError> {
        self.bump();
        let mut out: Vec<u8> = Vec::new();
        loop {
            match self.bump() {
                None => return Err(self.syntax("unterminated string")),
                Some(b'"') => break,
                Some(b'\n') => return Err(self.syntax("newline inside a string")),
                Some(b'\\') => {
                    let c = match self.bump() {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => self.unicode_escape()?,
                        _ => return Err(self.syntax("invalid escape in a string")),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                }
                Some(b) if b < 0x20 => return Err(self.syntax("control character inside a string")),
                Some(b) => out.push(b),
            }
        }
        String::from_utf8(out).map_err(|_| self.syntax("string is not valid UTF-8"))
    }

    fn hex4(&mut self) -> Result<u32, ConfigError> {
        let end = self.pos + 4;
        let digits = self
            .bytes
            .get(self.pos..end)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u32::from_str_radix(d, 16).ok())
            .ok_or_else(|| self.syntax("`\\u` needs four hex digits"))?;
        self.pos = end;
        Ok(digits)
    }

    fn unicode_escape(&mut self) -> Result<char, ConfigError> {
        let hi = self.hex4()?;
        let code = if (0xD800..0xDC00).contains(&hi) {
            if !self.bytes[self.pos..].starts_with(b"\\u") {
                return Err(self.syntax("unpaired surrogate in `\\u` escape"));
            }
            self.pos += 2;
            let lo = self.hex4()?;
            if !(0xDC00..0xE000).contains(&lo) {
                return Err(self.syntax("invalid low surrogate in `\\u` escape"));
            }
            0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
        } else {
            hi
        };
        char::from_u32(code).ok_or_else(|| self.syntax("invalid `\\u` escape"))
    }

    fn number(&mut self) -> Result<Number, ConfigError> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek() {
            Some(b'0') => self.pos += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return Err(self.syntax("invalid number")),
        }
        if self.peek() == Some(b'.') {
            self.pos += 1;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.syntax("invalid number: digits must follow `.`"));
            }
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.peek(), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return Err(self.syntax("invalid number: digits must follow the exponent"));
            }
            self.digits();
        }
        let text = std::str::from_utf8(&self.bytes[start..self.pos])
            .expect("number bytes are ASCII")
            .to_string();
        let value: f64 = text.parse().map_err(|_| self.syntax("invalid number"))?;
        if !value.is_finite() {
            return Err(self.syntax("number out of range"));
        }
        Ok(Number { text, value })
    }

    fn digits(&mut self) {
        while matches!(self.peek(), Some(b'0'..=b'9')) {
            self.pos += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_lines_and_columns_of_keys_and_values() {
        let v = parse("{\n  \"a\": {\n    \"b\": 2e8\n  }\n}", "x.json").unwrap();
        let a = &v.as_object().unwrap()[0];
        assert_eq!((a.line, a.column), (2, 3));
        let b = &a.value.as_object().unwrap()[0];
        assert_eq!(
            (b.line, b.column, b.value.line, b.value.column),
            (3, 5, 3, 10)
        );
        assert_eq!(b.value.to_json(), serde_json::json!(200000000));
    }

    #[test]
    fn duplicate_key_names_path_and_both_lines() {
        let text = "{\n\"zero_optimization\": {\n \"stage\": 1,\n \"stage\": 2\n}\n}";
        let err = parse(text, "ds.json").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(
            err,
            ConfigError::DuplicateKey { first_line: 3, .. }
        ));
        assert!(
            msg.starts_with("ds.json:4: zero_optimization.stage"),
            "{msg}"
        );
        assert!(msg.contains("line 3"), "{msg}");
    }

    #[test]
    fn accepts_line_comments_only() {
        let text = "# hjson header\n{\n // the batch\n \"a\": 1, # trailing\n \"b\": \"//not a comment\"\n}";
        let v = parse(text, "c.json").unwrap();
        assert_eq!(
            v.to_json(),
            serde_json::json!({"a": 1, "b": "//not a comment"})
        );
        assert!(matches!(
            parse("{/* no */ \"a\": 1}", "c.json"),
            Err(ConfigError::Syntax { .. })
        ));
    }

    #[test]
    fn strict_json_elsewhere() {
        for bad in [
            "{\"a\": 1,}",
            "{a: 1}",
            "{\"a\": 'x'}",
            "{\"a\": 01}",
            "{\"a\": NaN}",
            "{\"a\": [1,]}",
            "{\"a\": 1} x",
            "{\"a\": .5}",
        ] {
            assert!(
                matches!(parse(bad, "s.json"), Err(ConfigError::Syntax { .. })),
                "{bad} should be refused"
            );
        }
        assert!(matches!(
            parse("[1]", "s.json"),
            Err(ConfigError::WrongType { .. })
        ));
    }

    #[test]
    fn syntax_error_position() {
        let err = parse("{\n  \"a\": 1\n  \"b\": 2\n}", "p.json").unwrap_err();
        assert!(
            err.to_string().starts_with("p.json:3:3: invalid JSON"),
            "{err}"
        );
    }

    #[test]
    fn string_escapes() {
        let v = parse(r#"{"s": "a\"b\\c\u00e9\ud83d\ude00\n"}"#, "e.json").unwrap();
        assert_eq!(
            v.get("s").unwrap().to_json(),
            serde_json::json!("a\"b\\cé😀\n")
        );
    }
}
