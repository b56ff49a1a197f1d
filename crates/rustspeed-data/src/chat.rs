//! The chat format: render `messages` with the chat template, tokenize without special tokens
//! (the template writes them, as in transformers' `apply_chat_template`), and take the loss on
//! assistant turns only.
//!
//! Assistant spans come from the template's `{% generation %}` blocks when it has them (the
//! template author's own statement of what the model generates, as transformers'
//! `return_assistant_tokens_mask` uses). Otherwise they come from rendering prefixes, as TRL
//! did before generation markers: turn i covers the text between
//! `render(messages[..i], add_generation_prompt=true)` and `render(messages[..=i])`, which
//! includes the end-of-turn tokens the model must learn to emit. A template that does not
//! render conversations prefix-stably is an error rather than a silently wrong mask.
//! Character spans become token spans by tokenizing the text before each boundary.

use serde_json::Value;

use crate::chat_template::{ChatTemplate, GEN_END, GEN_START};
use crate::read::json_type;
use crate::record::Record;
use crate::sample::{Sample, IGNORE_INDEX};
use crate::tokenize::Tokenize;
use crate::DataError;

pub fn chat_sample(
    rec: &Record,
    messages_column: &str,
    template: &ChatTemplate,
    tok: &dyn Tokenize,
) -> Result<Sample, DataError> {
    let messages = messages(rec, messages_column)?;
    let render_err = |message: String| DataError::ChatRender {
        loc: rec.loc.clone(),
        message: format!("{}: {message}", template.source_name()),
    };
    let encode = |text: &str| {
        tok.encode(text, false)
            .map_err(|message| DataError::Tokenizer {
                loc: rec.loc.clone(),
                message,
            })
    };
    let (text, spans) = if template.has_generation_markers() {
        marked_spans(
            &template
                .render_marked(messages, false)
                .map_err(render_err)?,
        )
        .map_err(|m| render_err(m.to_string()))?
    } else {
        prefix_spans(messages, template).map_err(render_err)?
    };
    let input_ids = encode(&text)?;
    let mut labels = vec![IGNORE_INDEX; input_ids.len()];
    for (start, end) in spans {
        let from = encode(&text[..start])?.len();
        let to = encode(&text[..end])?.len().min(input_ids.len());
        for i in from..to {
            labels[i] = input_ids[i] as i32;
        }
    }
    Ok(Sample { input_ids, labels })
}

fn messages<'r>(rec: &'r Record, column: &str) -> Result<&'r [Value], DataError> {
    let list = match rec.fields.get(column) {
        Some(Value::Array(list)) => list,
        Some(other) => {
            return Err(DataError::field(
                &rec.loc,
                column,
                format!(
                    "expected an array of {{role, content}} objects, found {}",
                    json_type(other)
                ),
            ))
        }
        None => return Err(DataError::field(&rec.loc, column, "missing")),
    };
    for (i, m) in list.iter().enumerate() {
        let name = |k: &str| format!("{column}[{i}].{k}");
        let Value::Object(obj) = m else {
            return Err(DataError::field(
                &rec.loc,
                &format!("{column}[{i}]"),
                format!(
                    "expected a {{role, content}} object, found {}",
                    json_type(m)
                ),
            ));
        };
        for key in ["role", "content"] {
            match obj.get(key) {
                Some(Value::String(_)) => {}
                Some(other) => {
                    return Err(DataError::field(
                        &rec.loc,
                        &name(key),
                        format!("expected a string, found {}", json_type(other)),
                    ))
                }
                None => return Err(DataError::field(&rec.loc, &name(key), "missing")),
            }
        }
    }
    Ok(list)
}

fn is_assistant(m: &Value) -> bool {
    m.get("role").and_then(Value::as_str) == Some("assistant")
}

/// The rendered conversation and the byte spans the loss is taken on.
type Rendered = (String, Vec<(usize, usize)>);

/// Byte spans of assistant turns by prefix rendering; returns the full text too.
fn prefix_spans(messages: &[Value], template: &ChatTemplate) -> Result<Rendered, String> {
    let full = template.render(messages, false)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if !is_assistant(m) {
            continue;
        }
        let before = template.render(&messages[..i], true)?;
        let through = template.render(&messages[..=i], false)?;
        if !through.starts_with(&before) || !full.starts_with(&through) {
            return Err(format!(
                "the template does not render conversations prefix-stably at message {i} (rendering a \
                 shorter conversation is not a prefix of rendering a longer one), so assistant tokens \
                 cannot be located; add {{% generation %}} markers to the template"
            ));
        }
        spans.push((before.len(), through.len()));
    }
    Ok((full, spans))
}

/// Byte spans between generation markers, in the text with the markers removed.
fn marked_spans(marked: &str) -> Result<Rendered, &'static str> {
    let mut text = String::with_capacity(marked.len());
    let mut spans = Vec::new();
    let mut open: Option<usize> = None;
    for c in marked.chars() {
        match c {
            GEN_START if open.is_none() => open = Some(text.len()),
            GEN_END => match open.take() {
                Some(start) => spans.push((start, text.len())),
                None => return Err("{% endgeneration %} without {% generation %}"),
            },
            GEN_START => return Err("nested {% generation %} blocks"),
            c => text.push(c),
        }
    }
    if open.is_some() {
        return Err("{% generation %} without {% endgeneration %}");
    }
    Ok((text, spans))
}
