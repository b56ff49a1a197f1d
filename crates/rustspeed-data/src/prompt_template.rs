//! Alpaca prompt templates: Python `str.format_map` style with `{instruction}` and `{input}`
//! placeholders and `{{`/`}}` for literal braces.

use std::path::Path;

use crate::DataError;

/// tatsu-lab/stanford_alpaca train.py, `PROMPT_DICT["prompt_input"]`.
pub const ALPACA_PROMPT_INPUT: &str = "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:";
/// tatsu-lab/stanford_alpaca train.py, `PROMPT_DICT["prompt_no_input"]`.
pub const ALPACA_PROMPT_NO_INPUT: &str = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Instruction,
    Input,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptTemplate {
    with_input: Vec<Piece>,
    without_input: Vec<Piece>,
    source_name: String,
}

impl PromptTemplate {
    pub fn alpaca() -> PromptTemplate {
        PromptTemplate::new(
            ALPACA_PROMPT_INPUT,
            ALPACA_PROMPT_NO_INPUT,
            "built-in alpaca",
        )
        .expect("the built-in Alpaca templates parse")
    }

    /// Separate templates for records with and without an input (Alpaca's two prompts).
    pub fn new(
        with_input: &str,
        without_input: &str,
        source_name: &str,
    ) -> Result<PromptTemplate, DataError> {
        let with_input = parse(with_input, source_name)?;
        let without_input = parse(without_input, source_name)?;
        if without_input.contains(&Piece::Input) {
            return Err(DataError::PromptTemplate {
                source_name: source_name.to_string(),
                problem: "the template for records without input uses {input}".to_string(),
            });
        }
        Ok(PromptTemplate {
            with_input,
            without_input,
            source_name: source_name.to_string(),
        })
    }

    /// `--prompt-template FILE`. A `.json` file holds `{"prompt_input": ..., "prompt_no_input": ...}`
    /// like Alpaca's PROMPT_DICT; any other file is one template used for every record, where
    /// `{input}` becomes the empty string for records without input. One trailing newline of
    /// the file is dropped (editors add it; Alpaca's prompts end with "### Response:").
    pub fn from_file(path: &Path) -> Result<PromptTemplate, DataError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| DataError::PromptTemplate {
            source_name: name.clone(),
            problem: format!("cannot read: {e}"),
        })?;
        if path.extension().and_then(|e| e.to_str()) == Some("json") {
            let problem = |p: String| DataError::PromptTemplate {
                source_name: name.clone(),
                problem: p,
            };
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| problem(format!("bad JSON: {e}")))?;
            let get = |k: &str| {
                v.get(k)
                    .and_then(|x| x.as_str())
                    .ok_or_else(|| problem(format!("expected a string field `{k}`")))
            };
            return PromptTemplate::new(get("prompt_input")?, get("prompt_no_input")?, &name);
        }
        let text = text.strip_suffix('\n').unwrap_or(&text);
        let text = text.strip_suffix('\r').unwrap_or(text);
        let pieces = parse(text, &name)?;
        let without: Vec<Piece> = pieces
            .iter()
            .filter(|p| **p != Piece::Input)
            .cloned()
            .collect();
        Ok(PromptTemplate {
            with_input: pieces,
            without_input: without,
            source_name: name,
        })
    }

    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Whether the with-input template has an `{input}` placeholder.
    pub fn uses_input(&self) -> bool {
        self.with_input.contains(&Piece::Input)
    }

    /// Alpaca's rule: the with-input prompt when the input is non-empty.
    pub fn render(&self, instruction: &str, input: Option<&str>) -> String {
        let (pieces, input) = match input {
            Some(i) if !i.is_empty() => (&self.with_input, i),
            _ => (&self.without_input, ""),
        };
        let mut out = String::new();
        for p in pieces {
            match p {
                Piece::Literal(s) => out.push_str(s),
                Piece::Instruction => out.push_str(instruction),
                Piece::Input => out.push_str(input),
            }
        }
        out
    }
}

fn parse(template: &str, source_name: &str) -> Result<Vec<Piece>, DataError> {
    let err = |problem: String| DataError::PromptTemplate {
        source_name: source_name.to_string(),
        problem,
    };
    let mut pieces = Vec::new();
    let mut lit = String::new();
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                lit.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                lit.push('}');
            }
            '{' => {
                let name: String = chars.by_ref().take_while(|&c| c != '}').collect();
                let piece = match name.as_str() {
                    "instruction" => Piece::Instruction,
                    "input" => Piece::Input,
                    other => {
                        return Err(err(format!(
                            "unknown placeholder {{{other}}}; expected {{instruction}} or {{input}} (write {{{{ for a literal brace)"
                        )))
                    }
                };
                if !lit.is_empty() {
                    pieces.push(Piece::Literal(std::mem::take(&mut lit)));
                }
                pieces.push(piece);
            }
            '}' => return Err(err("single `}` (write }} for a literal brace)".to_string())),
            c => lit.push(c),
        }
    }
    if !lit.is_empty() {
        pieces.push(Piece::Literal(lit));
    }
    if !pieces.contains(&Piece::Instruction) {
        return Err(err(
            "the template has no {instruction} placeholder".to_string()
        ));
    }
    Ok(pieces)
}
