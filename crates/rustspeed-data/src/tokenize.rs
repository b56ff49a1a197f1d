//! The tokenizer interface this crate needs, so it does not depend on a tokenizer library:
//! `encode(text, add_special_tokens)` plus the BOS/EOS ids.

use std::fmt::Display;

pub trait Tokenize {
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String>;
}

/// Any infallible closure `Fn(&str, bool) -> Vec<u32>` is a tokenizer.
impl<F> Tokenize for F
where
    F: Fn(&str, bool) -> Vec<u32>,
{
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        Ok(self(text, add_special_tokens))
    }
}

/// Adapts a fallible closure (such as a wrapper around `tokenizers::Tokenizer::encode`).
pub struct TryEncode<F>(pub F);

impl<F, E> Tokenize for TryEncode<F>
where
    F: Fn(&str, bool) -> Result<Vec<u32>, E>,
    E: Display,
{
    fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        (self.0)(text, add_special_tokens).map_err(|e| e.to_string())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub eos: u32,
    pub bos: Option<u32>,
}
