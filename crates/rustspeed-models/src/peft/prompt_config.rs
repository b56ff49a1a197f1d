//! adapter_config.json of PEFT's prompt-learning methods: `PROMPT_TUNING`, `P_TUNING` and
//! `PREFIX_TUNING` share one config type here, as they share PEFT's `PromptLearningConfig`;
//! each method's own keys are accepted only for it.

use std::path::Path;

use serde_json::{json, Map, Value};

use super::PeftError;

/// Which prompt-learning method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptKind {
    /// Trained input embeddings before the tokens (Lester et al.).
    PromptTuning,
    /// Input embeddings produced by PEFT's `PromptEncoder` (an MLP) from trained embeddings.
    PTuning,
    /// Trained key/value prefixes in every attention layer (Li & Liang), optionally produced by
    /// an MLP (`prefix_projection`).
    PrefixTuning,
}

impl PromptKind {
    pub fn peft_type(self) -> &'static str {
        match self {
            PromptKind::PromptTuning => "PROMPT_TUNING",
            PromptKind::PTuning => "P_TUNING",
            PromptKind::PrefixTuning => "PREFIX_TUNING",
        }
    }
}

/// How PEFT initialises a prompt-tuning prompt (`prompt_tuning_init`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptInit {
    /// `nn.Embedding`'s default: N(0, 1).
    Random,
    /// The word embeddings of `prompt_tuning_init_text`'s tokens, repeated or cut to
    /// `num_virtual_tokens`.
    Text,
    /// The word embeddings of token ids drawn uniformly from the vocabulary.
    SampleVocab,
}

impl PromptInit {
    fn name(self) -> &'static str {
        match self {
            PromptInit::Random => "RANDOM",
            PromptInit::Text => "TEXT",
            PromptInit::SampleVocab => "SAMPLE_VOCAB",
        }
    }
}

/// A prompt-learning adapter_config.json.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptTuningConfig {
    pub kind: PromptKind,
    pub num_virtual_tokens: usize,
    /// Prompt tuning / P-tuning: the model's hidden size. Prefix tuning: the width of one
    /// layer's key (or value) prefix per token, `num_key_value_heads * head_dim` (PEFT fills
    /// both from the base config when null).
    pub token_dim: Option<usize>,
    pub init: PromptInit,
    pub init_text: Option<String>,
    pub tokenizer_name_or_path: Option<String>,
    /// Prefix tuning: the key/value heads; others: the model's attention heads.
    pub num_attention_heads: Option<usize>,
    pub num_layers: Option<usize>,
    /// The hidden width of P-tuning's MLP and of the prefix projection (default token_dim).
    pub encoder_hidden_size: Option<usize>,
    /// Prefix tuning: an Embedding -> Linear -> Tanh -> Linear encoder produces the prefix.
    pub prefix_projection: bool,
    /// Prefix tuning `init_weights = "zero"`: the prefix (or the projection's last Linear)
    /// starts at zero.
    pub init_weights_zero: bool,
    /// P-tuning: `encoder_reparameterization_type` LSTM (a bidirectional LSTM, then a 2-Linear
    /// MLP) instead of MLP (3 Linears).
    pub lstm: bool,
    /// P-tuning: the LSTM's layers (the MLP has 3 Linears whatever it says, as in PEFT).
    pub encoder_num_layers: usize,
    /// P-tuning: dropout between LSTM layers (only 0 is implemented).
    pub encoder_dropout: f64,
    /// The prompt is held as PEFT saves it (`prompt_embeddings`: the encoder's output), without
    /// the encoder that produced it: how PEFT loads an adapter (inference mode). Not in the
    /// JSON; set by whoever loads a saved adapter.
    pub saved_form: bool,
    pub base_model_name_or_path: Option<String>,
    pub revision: Option<String>,
}

impl PromptTuningConfig {
    /// Prompt tuning with PEFT's defaults.
    pub fn new(num_virtual_tokens: usize) -> PromptTuningConfig {
        Self::of_kind(PromptKind::PromptTuning, num_virtual_tokens)
    }

    pub fn of_kind(kind: PromptKind, num_virtual_tokens: usize) -> PromptTuningConfig {
        PromptTuningConfig {
            kind,
            num_virtual_tokens,
            token_dim: None,
            init: PromptInit::Random,
            init_text: None,
            tokenizer_name_or_path: None,
            num_attention_heads: None,
            num_layers: None,
            encoder_hidden_size: None,
            prefix_projection: false,
            init_weights_zero: false,
            lstm: false,
            encoder_num_layers: 2,
            encoder_dropout: 0.0,
            saved_form: false,
            base_model_name_or_path: None,
            revision: None,
        }
    }

    /// Whether an encoder (P-tuning's MLP, the prefix projection) produces the prompt from
    /// the trained parameters; false when the prompt is trained (or loaded) directly.
    pub fn has_encoder(&self) -> bool {
        !self.saved_form
            && match self.kind {
                PromptKind::PromptTuning => false,
                PromptKind::PTuning => true,
                PromptKind::PrefixTuning => self.prefix_projection,
            }
    }

    /// Reads `dir/adapter_config.json` (or the file itself).
    pub fn from_path(path: &Path) -> Result<PromptTuningConfig, PeftError> {
        let (file, text) = super::read_config_file(path)?;
        Self::from_json_str(&file, &text)
    }

    pub fn from_json_str(file: &str, text: &str) -> Result<PromptTuningConfig, PeftError> {
        let map: Map<String, Value> = serde_json::from_str(text).map_err(|e| PeftError::Json {
            file: file.to_string(),
            message: e.to_string(),
        })?;
        let bad = |key: &str, v: &Value, expected: &str| PeftError::invalid(file, key, v, expected);
        let unsupported =
            |key: &str, v: &Value, hint: &str| PeftError::unsupported(file, key, v, hint);
        let expected_types = "\"PROMPT_TUNING\", \"P_TUNING\" or \"PREFIX_TUNING\"";
        let kind = match map.get("peft_type") {
            Some(Value::String(t)) if t == "PROMPT_TUNING" => PromptKind::PromptTuning,
            Some(Value::String(t)) if t == "P_TUNING" => PromptKind::PTuning,
            Some(Value::String(t)) if t == "PREFIX_TUNING" => PromptKind::PrefixTuning,
            Some(v) => return Err(bad("peft_type", v, expected_types)),
            None => return Err(bad("peft_type", &Value::Null, expected_types)),
        };
        let usize_of = |key: &str, v: &Value| -> Result<Option<usize>, PeftError> {
            if v.is_null() {
                return Ok(None);
            }
            v.as_u64()
                .filter(|&n| n > 0)
                .map(|n| Some(n as usize))
                .ok_or_else(|| bad(key, v, "a positive integer"))
        };
        let string_of = |v: &Value| v.as_str().map(str::to_string);
        let mut c = PromptTuningConfig::of_kind(kind, 0);
        let (prompt, p_tuning, prefix) = (
            kind == PromptKind::PromptTuning,
            kind == PromptKind::PTuning,
            kind == PromptKind::PrefixTuning,
        );
        for (key, v) in &map {
            match key.as_str() {
                "num_virtual_tokens" => {
                    c.num_virtual_tokens = usize_of(key, v)?
                        .ok_or_else(|| bad(key, v, "a positive integer (the prompt's length)"))?
                }
                "token_dim" => c.token_dim = usize_of(key, v)?,
                "num_attention_heads" => c.num_attention_heads = usize_of(key, v)?,
                "num_layers" => c.num_layers = usize_of(key, v)?,
                "num_transformer_submodules" => {
                    if !(v.is_null() || v.as_u64() == Some(1)) {
                        return Err(unsupported(
                            key,
                            v,
                            "decoder-only causal LMs have one transformer submodule",
                        ));
                    }
                }
                "task_type" => {
                    if !(v.is_null() || v.as_str() == Some("CAUSAL_LM")) {
                        return Err(unsupported(
                            key,
                            v,
                            "rustspeed trains causal language models (task_type CAUSAL_LM)",
                        ));
                    }
                }
                "prompt_tuning_init" if prompt => {
                    c.init = match v.as_str() {
                        Some("RANDOM") => PromptInit::Random,
                        Some("TEXT") => PromptInit::Text,
                        Some("SAMPLE_VOCAB") => PromptInit::SampleVocab,
                        _ => return Err(bad(key, v, "\"RANDOM\", \"TEXT\" or \"SAMPLE_VOCAB\"")),
                    }
                }
                "prompt_tuning_init_text" if prompt => c.init_text = string_of(v),
                "tokenizer_name_or_path" if prompt => c.tokenizer_name_or_path = string_of(v),
                "tokenizer_kwargs" if prompt => {
                    if !(v.is_null() || v.as_object().is_some_and(|m| m.is_empty())) {
                        return Err(unsupported(
                            key,
                            v,
                            "the prompt's init text is tokenized with the tokenizer as it is saved; remove tokenizer_kwargs",
                        ));
                    }
                }
                "encoder_reparameterization_type" if p_tuning => {
                    c.lstm = match v.as_str() {
                        Some("MLP") => false,
                        Some("LSTM") => true,
                        _ => return Err(bad(key, v, "\"MLP\" or \"LSTM\"")),
                    }
                }
                "encoder_num_layers" if p_tuning => {
                    c.encoder_num_layers = usize_of(key, v)?.unwrap_or(2)
                }
                "encoder_dropout" if p_tuning => {
                    c.encoder_dropout = match v {
                        Value::Null => 0.0,
                        _ => v
                            .as_f64()
                            .filter(|p| (0.0..1.0).contains(p))
                            .ok_or_else(|| bad(key, v, "a probability in [0, 1)"))?,
                    }
                }
                "encoder_hidden_size" if p_tuning || prefix => {
                    c.encoder_hidden_size = usize_of(key, v)?
                }
                "prefix_projection" if prefix => {
                    c.prefix_projection = match v {
                        Value::Null => false,
                        _ => v.as_bool().ok_or_else(|| bad(key, v, "true or false"))?,
                    }
                }
                "init_weights" if prefix => {
                    c.init_weights_zero = match v.as_str() {
                        None if v.is_null() => false,
                        Some("zero") => true,
                        _ => return Err(bad(key, v, "null or \"zero\"")),
                    }
                }
                "base_model_name_or_path" => c.base_model_name_or_path = string_of(v),
                "revision" => c.revision = string_of(v),
                "modules_to_save" => {
                    if !(v.is_null() || v.as_array().is_some_and(|a| a.is_empty())) {
                        return Err(unsupported(
                            key,
                            v,
                            "prompt learning trains only the prompt; modules_to_save is not implemented with it",
                        ));
                    }
                }
                // Informational, or about how PEFT builds/serves the adapter.
                "peft_type" | "inference_mode" | "auto_mapping" | "peft_version" => {}
                _ => {
                    return Err(unsupported(
                        key,
                        v,
                        &format!(
                            "an adapter_config.json key rustspeed does not know for {}",
                            kind.peft_type()
                        ),
                    ))
                }
            }
        }
        if c.num_virtual_tokens == 0 {
            return Err(bad(
                "num_virtual_tokens",
                &Value::Null,
                "a positive integer",
            ));
        }
        if c.lstm && c.encoder_dropout != 0.0 {
            return Err(unsupported(
                "encoder_dropout",
                &json!(c.encoder_dropout),
                "dropout between the LSTM encoder's layers is not implemented; use 0.0",
            ));
        }
        if c.init == PromptInit::Text && c.init_text.as_deref().is_none_or(str::is_empty) {
            return Err(bad(
                "prompt_tuning_init_text",
                &Value::Null,
                "the text whose tokens initialise the prompt (prompt_tuning_init is TEXT)",
            ));
        }
        Ok(c)
    }

    /// adapter_config.json as PEFT 0.21 writes it for a causal LM.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "inference_mode": true,
            "modules_to_save": null,
            "num_attention_heads": self.num_attention_heads,
            "num_layers": self.num_layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.num_virtual_tokens,
            "peft_type": self.kind.peft_type(),
            "revision": self.revision,
            "task_type": "CAUSAL_LM",
            "token_dim": self.token_dim,
        });
        let extra = match self.kind {
            PromptKind::PromptTuning => json!({
                "prompt_tuning_init": self.init.name(),
                "prompt_tuning_init_text": self.init_text,
                "tokenizer_kwargs": null,
                "tokenizer_name_or_path": self.tokenizer_name_or_path,
            }),
            PromptKind::PTuning => json!({
                "encoder_dropout": self.encoder_dropout,
                "encoder_hidden_size": self.encoder_hidden_size,
                "encoder_num_layers": self.encoder_num_layers,
                "encoder_reparameterization_type": if self.lstm { "LSTM" } else { "MLP" },
            }),
            PromptKind::PrefixTuning => json!({
                "encoder_hidden_size": self.encoder_hidden_size,
                "init_weights": if self.init_weights_zero { json!("zero") } else { Value::Null },
                "prefix_projection": self.prefix_projection,
            }),
        };
        let map = v.as_object_mut().expect("an object");
        for (k, x) in extra.as_object().expect("an object") {
            map.insert(k.clone(), x.clone());
        }
        v
    }
}
