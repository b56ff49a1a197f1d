//! HF chat templates rendered with minijinja, configured the way transformers configures
//! Jinja: `trim_blocks` and `lstrip_blocks` on, a `raise_exception` function, a `tojson`
//! filter with Python `json.dumps` output (non-ASCII kept, `", "`/`": "` separators), and
//! Python string/dict methods (`.strip()`, `.items()`, ...) through minijinja-contrib.
//! `{% generation %}...{% endgeneration %}` blocks (HF's assistant-mask markers) are turned into
//! private-use marker characters so the renderer can report which text they enclosed.

use std::path::Path;

use minijinja::value::{Kwargs, Value as JinjaValue};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::Value;

use crate::DataError;

/// ChatML, used when the tokenizer has no `chat_template` (the template transformers used to
/// fall back to): `<|im_start|>{role}\n{content}<|im_end|>\n` per message, and
/// `<|im_start|>assistant\n` as the generation prompt.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

pub(crate) const GEN_START: char = '\u{E000}';
pub(crate) const GEN_END: char = '\u{E001}';

#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source_name: String,
    has_generation_markers: bool,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    pub fn new(
        source: &str,
        source_name: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<ChatTemplate, DataError> {
        let (rewritten, has_generation_markers) = replace_generation_tags(source);
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat_template", rewritten)
            .map_err(|e| DataError::ChatTemplateLoad {
                source_name: source_name.to_string(),
                problem: format!("does not parse: {e:#}"),
            })?;
        Ok(ChatTemplate {
            env,
            source_name: source_name.to_string(),
            has_generation_markers,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
        })
    }

    pub fn chatml() -> ChatTemplate {
        ChatTemplate::new(CHATML_TEMPLATE, "built-in ChatML", None, None).expect("ChatML parses")
    }

    /// Reads `chat_template`, `bos_token` and `eos_token` from a tokenizer_config.json. `Ok(None)`
    /// when the file has no chat template. A list of named templates uses the one named "default".
    pub fn from_tokenizer_config(path: &Path) -> Result<Option<ChatTemplate>, DataError> {
        let name = path.display().to_string();
        let problem = |p: String| DataError::ChatTemplateLoad {
            source_name: name.clone(),
            problem: p,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| problem(format!("cannot read: {e}")))?;
        let cfg: Value =
            serde_json::from_str(&text).map_err(|e| problem(format!("bad JSON: {e}")))?;
        let source = match cfg.get("chat_template") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template")?.as_str())
                .map(str::to_string)
                .ok_or_else(|| {
                    problem(
                        "`chat_template` is a list without a template named \"default\""
                            .to_string(),
                    )
                })?,
            Some(_) => {
                return Err(problem(
                    "`chat_template` must be a string or a list of {name, template}".to_string(),
                ))
            }
        };
        let token = |key: &str| match cfg.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        ChatTemplate::new(
            &source,
            &format!("{name} chat_template"),
            token("bos_token"),
            token("eos_token"),
        )
        .map(Some)
    }

    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    pub fn has_generation_markers(&self) -> bool {
        self.has_generation_markers
    }

    /// Renders the conversation; the text contains GEN_START/GEN_END around generation blocks.
    pub(crate) fn render_marked(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let tmpl = self
            .env
            .get_template("chat_template")
            .map_err(|e| e.to_string())?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        tmpl.render(ctx).map_err(|e| format!("{e:#}"))
    }

    /// Renders the conversation as the model sees it (generation markers removed).
    pub fn render(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String, String> {
        let text = self.render_marked(messages, add_generation_prompt)?;
        Ok(text.replace([GEN_START, GEN_END], ""))
    }
}

fn raise_exception(message: String) -> Result<JinjaValue, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=indent, separators=..., sort_keys=...)`.
fn tojson(value: JinjaValue, kwargs: Kwargs) -> Result<JinjaValue, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([a, b]) => (a.clone(), b.clone()),
        Some(_) => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ))
        }
        // Python drops the space after the item separator when indenting.
        None if indent.is_some() => (",".to_string(), ": ".to_string()),
        None => (", ".to_string(), ": ".to_string()),
    };
    let style = PyJson {
        indent,
        item_sep,
        key_sep,
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    style.write(&json, 0, &mut out);
    Ok(JinjaValue::from_safe_string(out))
}

struct PyJson {
    indent: Option<usize>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl PyJson {
    fn newline(&self, level: usize, out: &mut String) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * level));
        }
    }

    fn write(&self, v: &Value, level: usize, out: &mut String) {
        match v {
            Value::Array(items) if !items.is_empty() => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(item, level + 1, out);
                }
                self.newline(level, out);
                out.push(']');
            }
            Value::Object(map) if !map.is_empty() => {
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, item)) in entries.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    out.push_str(&Value::String(k.clone()).to_string());
                    out.push_str(&self.key_sep);
                    self.write(item, level + 1, out);
                }
                self.newline(level, out);
                out.push('}');
            }
            // Scalars and empty containers: serde_json escapes strings like Python's json
            // (\" \\ \n \r \t \b \f, other controls as \u00XX, non-ASCII kept).
            other => out.push_str(&other.to_string()),
        }
    }
}

/// Rewrites `{% generation %}`/`{% endgeneration %}` (with any `-`/`+` whitespace control) into
/// expressions printing the marker characters. An expression is not a block tag, so the
/// `trim_blocks`/`lstrip_blocks` effects the tag would have had are applied here: the newline
/// right after it is dropped and so is the indentation before it on its line, unless `+` says
/// otherwise.
fn replace_generation_tags(source: &str) -> (String, bool) {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    let mut found = false;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        match parse_generation_tag(tag) {
            Some(t) => {
                found = true;
                if t.left.is_empty() {
                    let line_start = out.rfind('\n').map_or(0, |i| i + 1);
                    if out[line_start..].chars().all(|c| c == ' ' || c == '\t') {
                        out.truncate(line_start);
                    }
                }
                let marker = if t.is_end { GEN_END } else { GEN_START };
                let strip = |c: &str| if c == "-" { "-" } else { "" };
                out.push_str(&format!(
                    "{{{{{} \"{marker}\" {}}}}}",
                    strip(t.left),
                    strip(t.right)
                ));
                rest = &tag[t.len..];
                if t.right.is_empty() {
                    rest = rest
                        .strip_prefix("\r\n")
                        .or_else(|| rest.strip_prefix('\n'))
                        .unwrap_or(rest);
                }
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    (out, found)
}

struct GenerationTag<'a> {
    len: usize,
    left: &'a str,
    is_end: bool,
    right: &'a str,
}

/// Parses `{%[-+]? (end)?generation [-+]?%}` at the start of `s`.
fn parse_generation_tag(s: &str) -> Option<GenerationTag<'_>> {
    let mut i = 2;
    let b = s.as_bytes();
    let control = |i: usize| match b.get(i) {
        Some(b'-') => "-",
        Some(b'+') => "+",
        _ => "",
    };
    let left = control(i);
    i += left.len();
    while b.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    let is_end = s[i..].starts_with("endgeneration");
    let word = if is_end {
        "endgeneration"
    } else {
        "generation"
    };
    if !s[i..].starts_with(word) {
        return None;
    }
    i += word.len();
    let ws_start = i;
    while b.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    if i == ws_start && !matches!(b.get(i), Some(b'-' | b'+' | b'%')) {
        return None;
    }
    let right = control(i);
    i += right.len();
    if !s[i..].starts_with("%}") {
        return None;
    }
    Some(GenerationTag {
        len: i + 2,
        left,
        is_end,
        right,
    })
}
