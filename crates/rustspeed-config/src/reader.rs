//! Typed reading of one JSON object ("block") of the config. Every key the code asks for is
//! remembered, so that whatever the user wrote and nobody asked for is reported as unknown
//! (DeepSpeed's pydantic blocks use `extra="forbid"`), with the closest valid key suggested.

use std::cell::RefCell;

use crate::auto;
use crate::error::{ConfigError, Location};
use crate::json::{Kind, Member, Value};
use crate::suggest;

/// A key the user wrote, with its value as written (used for "not supported yet" checks).
#[derive(Debug, Clone, PartialEq)]
pub struct SetKey {
    pub path: String,
    pub value: serde_json::Value,
    pub line: u32,
}

/// Shared state of one resolution: the source name and what has been seen.
pub(crate) struct Ctx {
    pub source: std::sync::Arc<str>,
    pub set: RefCell<Vec<SetKey>>,
    pub warnings: RefCell<Vec<String>>,
}

impl Ctx {
    pub fn new(source: &str) -> Ctx {
        Ctx {
            source: source.into(),
            set: RefCell::new(Vec::new()),
            warnings: RefCell::new(Vec::new()),
        }
    }

    pub fn loc(&self, line: u32, column: u32) -> Location {
        Location {
            source: self.source.clone(),
            line,
            column,
        }
    }

    pub fn warn(&self, message: String) {
        tracing::warn!("{message}");
        self.warnings.borrow_mut().push(message);
    }
}

pub(crate) struct Block<'a> {
    ctx: &'a Ctx,
    path: String,
    line: u32,
    column: u32,
    members: &'a [Member],
    known: Vec<&'static str>,
}

impl<'a> Block<'a> {
    pub fn root(ctx: &'a Ctx, value: &'a Value) -> Block<'a> {
        Block {
            ctx,
            path: String::new(),
            line: value.line,
            column: value.column,
            members: value.as_object().unwrap_or(&[]),
            known: Vec::new(),
        }
    }

    /// A block that is absent from the config: every getter returns its default.
    pub fn empty(ctx: &'a Ctx, path: &str) -> Block<'a> {
        Block {
            ctx,
            path: path.to_string(),
            line: 0,
            column: 0,
            members: &[],
            known: Vec::new(),
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        }
    }

    /// Where the block itself starts (for errors about a key that is missing from it).
    pub fn location(&self) -> Location {
        self.ctx.loc(self.line, self.column)
    }

    pub fn at(&self, m: &Member) -> Location {
        self.ctx.loc(m.line, m.column)
    }

    pub fn ctx(&self) -> &'a Ctx {
        self.ctx
    }

    pub fn has(&self, key: &str) -> bool {
        self.members.iter().any(|m| m.key == key)
    }

    /// The member named `key`, if present; marks the key as valid for this block.
    pub fn member(&mut self, key: &'static str) -> Option<&'a Member> {
        self.known.push(key);
        let m = self.members.iter().find(|m| m.key == key)?;
        let path = self.key_path(key);
        let mut set = self.ctx.set.borrow_mut();
        if !set.iter().any(|s| s.path == path) {
            set.push(SetKey {
                path,
                value: m.value.to_json(),
                line: m.line,
            });
        }
        Some(m)
    }

    /// The first present of several spellings of one key (pydantic aliases); setting two
    /// spellings to different values is a conflict.
    pub fn member_alias(
        &mut self,
        keys: &[&'static str],
    ) -> Result<Option<&'a Member>, ConfigError> {
        let mut found: Option<&'a Member> = None;
        for key in keys {
            if let Some(m) = self.member(key) {
                match found {
                    Some(f) if f.value.to_json() != m.value.to_json() => {
                        return Err(ConfigError::Conflict {
                            at: self.at(m),
                            key: self.key_path(&m.key),
                            message: format!(
                                "`{}` and `{}` are two names of the same setting and disagree \
                                 ({} vs {}); keep one",
                                f.key,
                                m.key,
                                f.value.describe(),
                                m.value.describe()
                            ),
                        })
                    }
                    Some(_) => {}
                    None => found = Some(m),
                }
            }
        }
        Ok(found)
    }

    pub fn wrong_type(&self, m: &Member, expected: &str) -> ConfigError {
        let key = self.key_path(&m.key);
        if m.value.is_auto() {
            return ConfigError::UnresolvedAuto {
                at: self.at(m),
                hint: auto::unresolved_hint(&key),
                key,
            };
        }
        ConfigError::WrongType {
            at: self.at(m),
            key,
            expected: expected.to_string(),
            got: m.value.describe(),
        }
    }

    pub fn invalid(&self, m: &Member, message: impl Into<String>) -> ConfigError {
        ConfigError::InvalidValue {
            at: self.at(m),
            key: self.key_path(&m.key),
            message: message.into(),
        }
    }

    pub fn as_bool(&self, m: &Member) -> Result<bool, ConfigError> {
        match m.value.kind {
            Kind::Bool(b) => Ok(b),
            _ => Err(self.wrong_type(m, "true or false")),
        }
    }

    pub fn as_f64(&self, m: &Member) -> Result<f64, ConfigError> {
        match &m.value.kind {
            Kind::Number(n) => Ok(n.value),
            _ => Err(self.wrong_type(m, "a number")),
        }
    }

    /// A whole number; `2e8` is accepted because DeepSpeed configs write sizes that way.
    pub fn as_i64(&self, m: &Member) -> Result<i64, ConfigError> {
        let Kind::Number(n) = &m.value.kind else {
            return Err(self.wrong_type(m, "an integer"));
        };
        if let Ok(i) = n.text.parse::<i64>() {
            return Ok(i);
        }
        if n.value.fract() != 0.0 {
            return Err(self.wrong_type(m, "an integer (a whole number such as 5e8)"));
        }
        if n.value.abs() > 9.2e18 {
            return Err(self.invalid(m, format!("{} is too large for an integer", n.text)));
        }
        Ok(n.value as i64)
    }

    pub fn as_u64(&self, m: &Member) -> Result<u64, ConfigError> {
        let i = self.as_i64(m)?;
        u64::try_from(i).map_err(|_| self.invalid(m, format!("must be >= 0, got {i}")))
    }

    pub fn as_str(&self, m: &'a Member) -> Result<&'a str, ConfigError> {
        match &m.value.kind {
            Kind::String(s) => Ok(s),
            _ => Err(self.wrong_type(m, "a string")),
        }
    }

    /// Optional getters accept `null` as "not set", like DeepSpeed's `Optional[...]` fields.
    fn present(&mut self, key: &'static str) -> Option<&'a Member> {
        self.member(key)
            .filter(|m| !matches!(m.value.kind, Kind::Null))
    }

    pub fn bool(&mut self, key: &'static str, default: bool) -> Result<bool, ConfigError> {
        self.member(key).map_or(Ok(default), |m| self.as_bool(m))
    }

    pub fn f64(&mut self, key: &'static str, default: f64) -> Result<f64, ConfigError> {
        self.member(key).map_or(Ok(default), |m| self.as_f64(m))
    }

    pub fn opt_f64(&mut self, key: &'static str) -> Result<Option<f64>, ConfigError> {
        self.present(key).map(|m| self.as_f64(m)).transpose()
    }

    pub fn u64(&mut self, key: &'static str, default: u64) -> Result<u64, ConfigError> {
        self.member(key).map_or(Ok(default), |m| self.as_u64(m))
    }

    pub fn opt_u64(&mut self, key: &'static str) -> Result<Option<u64>, ConfigError> {
        self.present(key).map(|m| self.as_u64(m)).transpose()
    }

    pub fn i64(&mut self, key: &'static str, default: i64) -> Result<i64, ConfigError> {
        self.member(key).map_or(Ok(default), |m| self.as_i64(m))
    }

    pub fn opt_string(&mut self, key: &'static str) -> Result<Option<String>, ConfigError> {
        self.present(key)
            .map(|m| self.as_str(m).map(str::to_string))
            .transpose()
    }

    pub fn string(&mut self, key: &'static str, default: &str) -> Result<String, ConfigError> {
        Ok(self.opt_string(key)?.unwrap_or_else(|| default.to_string()))
    }

    /// A number in `[lo, hi]`.
    pub fn f64_in(
        &mut self,
        key: &'static str,
        default: f64,
        lo: f64,
        hi: f64,
    ) -> Result<f64, ConfigError> {
        let Some(m) = self.member(key) else {
            return Ok(default);
        };
        let v = self.as_f64(m)?;
        if !(lo..=hi).contains(&v) {
            return Err(self.invalid(m, format!("must be between {lo} and {hi}, got {v}")));
        }
        Ok(v)
    }

    /// One of `allowed`; returns the allowed spelling. Case-insensitive where DeepSpeed is.
    pub fn choice(
        &mut self,
        key: &'static str,
        allowed: &[&'static str],
        default: &'static str,
        case_insensitive: bool,
    ) -> Result<&'static str, ConfigError> {
        let Some(m) = self.present(key) else {
            return Ok(default);
        };
        self.as_choice(m, allowed, case_insensitive)
    }

    pub fn as_choice(
        &self,
        m: &'a Member,
        allowed: &[&'static str],
        case_insensitive: bool,
    ) -> Result<&'static str, ConfigError> {
        let s = self.as_str(m)?;
        let hit = allowed.iter().find(|a| {
            if case_insensitive {
                a.eq_ignore_ascii_case(s)
            } else {
                **a == s
            }
        });
        if let Some(a) = hit {
            return Ok(a);
        }
        let list = allowed
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let hint = suggest::closest(s, allowed.iter().copied())
            .map(|c| format!(" (did you mean \"{c}\"?)"))
            .unwrap_or_default();
        Err(self.invalid(m, format!("expected one of {list}, got \"{s}\"{hint}")))
    }

    /// A list of numbers (e.g. Adam's betas).
    pub fn f64_list(&mut self, key: &'static str) -> Result<Option<Vec<f64>>, ConfigError> {
        let Some(m) = self.present(key) else {
            return Ok(None);
        };
        let Kind::Array(items) = &m.value.kind else {
            return Err(self.wrong_type(m, "an array of numbers"));
        };
        items
            .iter()
            .map(|v| match &v.kind {
                Kind::Number(n) => Ok(n.value),
                _ => Err(self.wrong_type(m, "an array of numbers")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// A nested object. `null` counts as absent.
    pub fn block(&mut self, key: &'static str) -> Result<Option<Block<'a>>, ConfigError> {
        let Some(m) = self.present(key) else {
            return Ok(None);
        };
        self.as_block(m).map(Some)
    }

    pub fn as_block(&self, m: &'a Member) -> Result<Block<'a>, ConfigError> {
        match &m.value.kind {
            Kind::Object(members) => Ok(Block {
                ctx: self.ctx,
                path: self.key_path(&m.key),
                line: m.value.line,
                column: m.value.column,
                members,
                known: Vec::new(),
            }),
            _ => Err(self.wrong_type(m, "an object")),
        }
    }

    /// The nested object, or an empty block when it is absent (all defaults).
    pub fn block_or_empty(&mut self, key: &'static str) -> Result<Block<'a>, ConfigError> {
        let path = self.key_path(key);
        Ok(self
            .block(key)?
            .unwrap_or_else(|| Block::empty(self.ctx, &path)))
    }

    fn unknown(&self) -> impl Iterator<Item = &'a Member> + '_ {
        self.members
            .iter()
            .filter(|m| !self.known.contains(&m.key.as_str()))
    }

    /// Refuses keys nobody asked for.
    pub fn finish(self) -> Result<(), ConfigError> {
        let Some(m) = self.unknown().next() else {
            return Ok(());
        };
        let suggestion = suggest::closest(&m.key, self.known.iter().copied())
            .map(|c| format!(" (did you mean `{c}`?)"))
            .unwrap_or_default();
        let mut allowed: Vec<&str> = self.known.clone();
        allowed.sort_unstable();
        allowed.dedup();
        Err(ConfigError::UnknownKey {
            at: self.at(m),
            key: self.key_path(&m.key),
            block: self.path.clone(),
            suggestion,
            allowed: allowed.join(", "),
        })
    }

    /// Top level: DeepSpeed ignores unknown keys there; we warn instead of staying silent.
    pub fn finish_with_warnings(self) {
        let unknown: Vec<&Member> = self.unknown().collect();
        for m in unknown {
            let suggestion = suggest::closest(&m.key, self.known.iter().copied())
                .map(|c| format!(" (did you mean `{c}`?)"))
                .unwrap_or_default();
            self.ctx.warn(format!(
                "{}: {}: unknown top-level key, ignored{suggestion}",
                self.at(m),
                m.key
            ));
        }
    }
}
