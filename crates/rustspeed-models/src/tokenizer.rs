//! Text to token ids and back, through the HF `tokenizers` crate.
//!
//! Three sources give the same [`Tokenizer`]: an HF `tokenizer.json`; GPT-2's original
//! `vocab.json` + `merges.txt` (byte-level BPE); and the vocabulary embedded in a GGUF file
//! (see `gguf.rs`). The last two are turned into a `tokenizer.json` document and loaded like the
//! first, so one well-tested code path does all encoding.
//!
//! BOS/EOS come from `tokenizer_config.json` (`bos_token`, `eos_token`) when present, because
//! `tokenizer.json` itself does not say which of its special tokens end a sequence.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

/// A tokenizer that cannot be loaded or cannot encode/decode, naming the file and value.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{source_name}: not a valid tokenizer: {message}")]
    Format {
        source_name: String,
        message: String,
    },
    #[error("{dir}: no tokenizer.json and no vocab.json + merges.txt pair")]
    NotFound { dir: PathBuf },
    #[error("{source_name}: {what} = {value:?} is not supported; supported: {supported}")]
    Unsupported {
        source_name: String,
        what: String,
        value: String,
        supported: String,
    },
    #[error("{source_name}: special token {token:?} ({role}) is not in the vocabulary")]
    UnknownSpecial {
        source_name: String,
        role: &'static str,
        token: String,
    },
    #[error("cannot encode text: {0}")]
    Encode(String),
    #[error("cannot decode ids: {0}")]
    Decode(String),
}

/// How byte-level BPE text is split into words before merging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2's regex (`'s|'t|... | ?\p{L}+| ?\p{N}+|...`).
    Gpt2,
    /// Every digit on its own, then GPT-2's regex (SmolLM / StarCoder-style vocabularies).
    DigitsThenGpt2,
    /// Llama 3's regex (digits in groups of up to three, case-insensitive contractions).
    Llama3,
}

const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-level BPE vocabulary from parts (GPT-2 files, GGUF metadata).
#[derive(Clone, Debug)]
pub struct ByteLevelBpe {
    /// Token strings in id order (byte-level alphabet: `Ġ` for space, ...).
    pub tokens: Vec<String>,
    /// Merge rules in priority order.
    pub merges: Vec<(String, String)>,
    /// Ids of tokens matched whole in the input and skipped by `decode(.., true)`.
    pub special: Vec<u32>,
    /// Ids of tokens matched whole in the input but decoded like ordinary text.
    pub user_defined: Vec<u32>,
    pub pre_tokenizer: PreTokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Whether `encode(.., add_special_tokens = true)` puts BOS first / EOS last.
    pub add_bos: bool,
    pub add_eos: bool,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TokenizerError + '_ {
    move |source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_json(path: &Path) -> Result<Value, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    serde_json::from_str(&text).map_err(|e| TokenizerError::Format {
        source_name: path.display().to_string(),
        message: e.to_string(),
    })
}

/// `bos_token` / `eos_token` in tokenizer_config.json: a string or an AddedToken object.
fn config_token(config: &Value, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads the tokenizer of an HF model directory: `tokenizer.json` if present, else GPT-2
    /// style `vocab.json` + `merges.txt`; BOS/EOS from `tokenizer_config.json` if present.
    pub fn from_dir(dir: &Path) -> Result<Tokenizer, TokenizerError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            read_json(&config_path)?
        } else {
            Value::Null
        };
        let tokenizer_json = dir.join("tokenizer.json");
        let mut tok = if tokenizer_json.is_file() {
            Tokenizer::from_tokenizer_json(&tokenizer_json)?
        } else if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            let add_bos = config.get("add_bos_token").and_then(Value::as_bool);
            Tokenizer::from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt"), add_bos)?
        } else {
            return Err(TokenizerError::NotFound {
                dir: dir.to_path_buf(),
            });
        };
        let source_name = config_path.display().to_string();
        for (key, role) in [("bos_token", "bos_token"), ("eos_token", "eos_token")] {
            let Some(token) = config_token(&config, key) else {
                continue;
            };
            let id =
                tok.inner
                    .token_to_id(&token)
                    .ok_or_else(|| TokenizerError::UnknownSpecial {
                        source_name: source_name.clone(),
                        role,
                        token,
                    })?;
            if key == "bos_token" {
                tok.bos = Some(id);
            } else {
                tok.eos = Some(id);
            }
        }
        Ok(tok)
    }

    /// Loads an HF `tokenizer.json` (BOS/EOS unknown: see [`Tokenizer::from_dir`]).
    pub fn from_tokenizer_json(path: &Path) -> Result<Tokenizer, TokenizerError> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        Tokenizer::from_json_bytes(&path.display().to_string(), &bytes, None, None)
    }

    /// Parses `tokenizer.json` text; `source_name` names it in errors.
    pub fn from_json_bytes(
        source_name: &str,
        bytes: &[u8],
        bos: Option<u32>,
        eos: Option<u32>,
    ) -> Result<Tokenizer, TokenizerError> {
        let inner =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| TokenizerError::Format {
                source_name: source_name.to_string(),
                message: e.to_string(),
            })?;
        Ok(Tokenizer { inner, bos, eos })
    }

    /// GPT-2's original files: `vocab.json` (token → id) and `merges.txt` (`#version` line, then
    /// one `left right` pair per line). `<|endoftext|>`, when present, is BOS and EOS as in
    /// transformers' `GPT2Tokenizer`; BOS is prepended only when `add_bos` says so.
    pub fn from_vocab_merges(
        vocab_path: &Path,
        merges_path: &Path,
        add_bos: Option<bool>,
    ) -> Result<Tokenizer, TokenizerError> {
        let vocab_name = vocab_path.display().to_string();
        let vocab = read_json(vocab_path)?;
        let Value::Object(map) = vocab else {
            return Err(TokenizerError::Format {
                source_name: vocab_name,
                message: "expected a JSON object mapping tokens to ids".into(),
            });
        };
        let mut pairs: Vec<(u32, String)> = Vec::with_capacity(map.len());
        for (token, id) in map {
            let id = id
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| TokenizerError::Format {
                    source_name: vocab_name.clone(),
                    message: format!(
                        "token {token:?} has id {id}, expected a non-negative integer"
                    ),
                })?;
            pairs.push((id, token));
        }
        pairs.sort();
        for (i, (id, token)) in pairs.iter().enumerate() {
            if *id as usize != i {
                return Err(TokenizerError::Format {
                    source_name: vocab_name,
                    message: format!("ids are not 0..n: token {token:?} has id {id} at rank {i}"),
                });
            }
        }
        let tokens: Vec<String> = pairs.into_iter().map(|(_, t)| t).collect();
        let text = std::fs::read_to_string(merges_path).map_err(io_err(merges_path))?;
        let mut merges = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.starts_with("#version") || line.trim().is_empty() {
                continue;
            }
            let (a, b) = line.split_once(' ').ok_or_else(|| TokenizerError::Format {
                source_name: format!("{}:{}", merges_path.display(), n + 1),
                message: format!("expected `left right`, got {line:?}"),
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        let eot = tokens.iter().position(|t| t == "<|endoftext|>");
        let eot = eot.map(|i| i as u32);
        ByteLevelBpe {
            tokens,
            merges,
            special: eot.into_iter().collect(),
            user_defined: Vec::new(),
            pre_tokenizer: PreTokenizer::Gpt2,
            bos: eot,
            eos: eot,
            add_bos: add_bos.unwrap_or(false),
            add_eos: false,
        }
        .build(&vocab_name)
    }

    /// Token ids of `text`; with `add_special_tokens`, the tokenizer's BOS/EOS template applies.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode_fast(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }

    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The underlying `tokenizers` object, for what this wrapper does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

impl ByteLevelBpe {
    /// The equivalent `tokenizer.json` document (as transformers writes for GPT-2-style models).
    pub fn to_tokenizer_json(&self) -> Value {
        let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
        let pre_tokenizer = match self.pre_tokenizer {
            PreTokenizer::Gpt2 => byte_level(true),
            PreTokenizer::DigitsThenGpt2 => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
            PreTokenizer::Llama3 => json!({"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": false},
                byte_level(false)]}),
        };
        let mut vocab = Map::with_capacity(self.tokens.len());
        for (id, token) in self.tokens.iter().enumerate() {
            // A duplicated string keeps its first id, as llama.cpp's token-to-id map does.
            vocab.entry(token.clone()).or_insert(json!(id));
        }
        let merges: Vec<Value> = self.merges.iter().map(|(a, b)| json!([a, b])).collect();
        let flagged = self.special.iter().map(|&id| (id, true));
        let flagged = flagged.chain(self.user_defined.iter().map(|&id| (id, false)));
        let added: Vec<Value> = flagged
            .filter_map(|(id, special)| {
                let content = self.tokens.get(id as usize)?;
                Some(
                    json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": special}),
                )
            })
            .collect();
        let post_processor = self.template();
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer,
            "post_processor": post_processor.unwrap_or_else(|| byte_level(true)),
            "decoder": byte_level(true),
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges,
            },
        })
    }

    /// A TemplateProcessing post-processor adding BOS/EOS, when either is asked for.
    fn template(&self) -> Option<Value> {
        let mut specials = Map::new();
        let mut piece = |id: Option<u32>| -> Option<Value> {
            let content = self.tokens.get(id? as usize)?.clone();
            specials.insert(
                content.clone(),
                json!({"id": content, "ids": [id?], "tokens": [content]}),
            );
            Some(json!({"SpecialToken": {"id": content, "type_id": 0}}))
        };
        let bos = if self.add_bos { piece(self.bos) } else { None };
        let eos = if self.add_eos { piece(self.eos) } else { None };
        if bos.is_none() && eos.is_none() {
            return None;
        }
        let seq = |name: &str| json!({"Sequence": {"id": name, "type_id": 0}});
        let mut single = Vec::new();
        single.extend(bos.clone());
        single.push(seq("A"));
        single.extend(eos.clone());
        let mut pair = single.clone();
        pair.extend(bos);
        pair.push(seq("B"));
        pair.extend(eos);
        Some(
            json!({"type": "TemplateProcessing", "single": single, "pair": pair,
            "special_tokens": specials}),
        )
    }

    /// Loads the vocabulary as a [`Tokenizer`]; `source_name` names it in errors.
    pub fn build(&self, source_name: &str) -> Result<Tokenizer, TokenizerError> {
        for (role, id) in [("bos", self.bos), ("eos", self.eos)] {
            if let Some(id) = id.filter(|&id| id as usize >= self.tokens.len()) {
                return Err(TokenizerError::Format {
                    source_name: source_name.to_string(),
                    message: format!(
                        "{role} id {id} is outside the vocabulary of {}",
                        self.tokens.len()
                    ),
                });
            }
        }
        let doc = serde_json::to_vec(&self.to_tokenizer_json()).expect("json");
        Tokenizer::from_json_bytes(source_name, &doc, self.bos, self.eos)
    }
}
