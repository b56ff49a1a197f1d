//! PEFT's prompt tuning (`PROMPT_TUNING`, Lester et al. 2021): `num_virtual_tokens` trained
//! embeddings prepended to every sequence's token embeddings, the whole base frozen. Saved as
//! PEFT does: `adapter_model.safetensors` holding `prompt_embeddings` `[n, d]`, and an
//! adapter_config.json with `num_virtual_tokens`, `token_dim` and the rest.
//!
//! The virtual tokens are positions of the batch: [`prefix_batch`] puts `n` [`VIRTUAL_TOKEN`]
//! ids (labels ignored) before each sequence, as PEFT concatenates them before the embeddings,
//! so positions (GPT-2's `wpe`, LLaMA's RoPE) and causal attention cover them exactly as in
//! PEFT, and the logits have `n + T` positions per row as PEFT's do. The embedding layer puts
//! the prompt rows in place of those ids, and in backward sums their gradients into the prompt.

use std::path::Path;

use rustspeed_kernels::{DType, Float};
use safetensors::tensor::SafeTensors;
use serde_json::{json, Map, Value};

use super::adapter::{AdapterFiles, CONFIG_FILE, WEIGHTS_FILE};
use super::PeftError;
use crate::init::{name_hash, NormalRng};
use crate::layer::{Batch, IGNORE_INDEX};
use crate::model::Model;
use crate::weights::{convert_into, save_tensors, write_atomic};

/// The parameter (and PEFT's adapter key) of the prompt: `[num_virtual_tokens, hidden]`.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// The input id of a virtual-token position; outside any vocabulary, so a model without a
/// prompt fails loudly on it.
pub const VIRTUAL_TOKEN: u32 = u32::MAX;

/// How PEFT initialises the prompt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptInit {
    /// `nn.Embedding`'s default: N(0, 1).
    Random,
}

/// The `PROMPT_TUNING` fields of adapter_config.json.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptTuningConfig {
    pub num_virtual_tokens: usize,
    /// The model's hidden size (PEFT fills it from the base config when null).
    pub token_dim: Option<usize>,
    pub init: PromptInit,
    pub num_attention_heads: Option<usize>,
    pub num_layers: Option<usize>,
    pub base_model_name_or_path: Option<String>,
    pub revision: Option<String>,
}

impl PromptTuningConfig {
    pub fn new(num_virtual_tokens: usize) -> PromptTuningConfig {
        PromptTuningConfig {
            num_virtual_tokens,
            token_dim: None,
            init: PromptInit::Random,
            num_attention_heads: None,
            num_layers: None,
            base_model_name_or_path: None,
            revision: None,
        }
    }

    /// Reads `dir/adapter_config.json` (or the file itself).
    pub fn from_path(path: &Path) -> Result<PromptTuningConfig, PeftError> {
        let file = if path.is_dir() {
            path.join(CONFIG_FILE)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|source| PeftError::Io {
            path: file.clone(),
            source,
        })?;
        Self::from_json_str(&file.display().to_string(), &text)
    }

    pub fn from_json_str(file: &str, text: &str) -> Result<PromptTuningConfig, PeftError> {
        let map: Map<String, Value> = serde_json::from_str(text).map_err(|e| PeftError::Json {
            file: file.to_string(),
            message: e.to_string(),
        })?;
        let bad = |key: &str, v: &Value, expected: &str| PeftError::Invalid {
            file: file.to_string(),
            key: key.to_string(),
            value: v.to_string(),
            expected: expected.to_string(),
        };
        let unsupported = |key: &str, v: &Value, hint: &str| PeftError::Unsupported {
            file: file.to_string(),
            key: key.to_string(),
            value: v.to_string(),
            hint: hint.to_string(),
        };
        match map.get("peft_type") {
            Some(Value::String(t)) if t == "PROMPT_TUNING" => {}
            Some(v) => return Err(bad("peft_type", v, "\"PROMPT_TUNING\"")),
            None => return Err(bad("peft_type", &Value::Null, "\"PROMPT_TUNING\"")),
        }
        let usize_of = |key: &str, v: &Value| -> Result<Option<usize>, PeftError> {
            if v.is_null() {
                return Ok(None);
            }
            v.as_u64()
                .filter(|&n| n > 0)
                .map(|n| Some(n as usize))
                .ok_or_else(|| bad(key, v, "a positive integer"))
        };
        let mut c = PromptTuningConfig::new(0);
        for (key, v) in &map {
            match key.as_str() {
                "num_virtual_tokens" => {
                    c.num_virtual_tokens = usize_of(key, v)?.ok_or_else(|| {
                        bad(key, v, "a positive integer (the prompt's length)")
                    })?
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
                "prompt_tuning_init" => match v.as_str() {
                    Some("RANDOM") => c.init = PromptInit::Random,
                    Some("TEXT") | Some("SAMPLE_VOCAB") => {
                        return Err(unsupported(
                            key,
                            v,
                            "prompt_tuning_init RANDOM is implemented; TEXT and SAMPLE_VOCAB initialisation are not (an existing adapter with trained embeddings loads whatever its init was)",
                        ))
                    }
                    _ => return Err(bad(key, v, "\"RANDOM\", \"TEXT\" or \"SAMPLE_VOCAB\"")),
                },
                "base_model_name_or_path" => {
                    c.base_model_name_or_path = v.as_str().map(str::to_string)
                }
                "revision" => c.revision = v.as_str().map(str::to_string),
                // Informational, or about how PEFT builds/serves the adapter.
                "peft_type" | "inference_mode" | "auto_mapping" | "peft_version"
                | "prompt_tuning_init_text" | "tokenizer_name_or_path" | "tokenizer_kwargs"
                | "modules_to_save" => {}
                _ => {
                    return Err(unsupported(
                        key,
                        v,
                        "an adapter_config.json key rustspeed does not know for PROMPT_TUNING",
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
        Ok(c)
    }

    /// adapter_config.json as PEFT 0.21 writes it for a causal LM.
    pub fn to_json(&self) -> Value {
        json!({
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "inference_mode": true,
            "modules_to_save": null,
            "num_attention_heads": self.num_attention_heads,
            "num_layers": self.num_layers,
            "num_transformer_submodules": 1,
            "num_virtual_tokens": self.num_virtual_tokens,
            "peft_type": "PROMPT_TUNING",
            "prompt_tuning_init": "RANDOM",
            "prompt_tuning_init_text": null,
            "revision": self.revision,
            "task_type": "CAUSAL_LM",
            "token_dim": self.token_dim,
            "tokenizer_kwargs": null,
            "tokenizer_name_or_path": null,
        })
    }
}

/// A batch with `n` virtual tokens before each of its `batch_size` sequences of `seq_len` ids,
/// from HF-style (unshifted) labels, whose virtual positions are ignored. As in PEFT the last
/// virtual token predicts each sequence's first label.
pub fn prefix_batch(
    batch_size: usize,
    seq_len: usize,
    input_ids: &[u32],
    hf_labels: &[i32],
    n: usize,
) -> Batch {
    assert_eq!(input_ids.len(), batch_size * seq_len, "input_ids length");
    assert_eq!(hf_labels.len(), batch_size * seq_len, "labels length");
    let len = n + seq_len;
    let mut ids = Vec::with_capacity(batch_size * len);
    let mut labels = Vec::with_capacity(batch_size * len);
    for b in 0..batch_size {
        let row = b * seq_len..(b + 1) * seq_len;
        ids.extend(std::iter::repeat_n(VIRTUAL_TOKEN, n));
        ids.extend_from_slice(&input_ids[row.clone()]);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, n));
        labels.extend_from_slice(&hf_labels[row]);
    }
    Batch::from_hf_labels(batch_size, len, ids, &labels)
}

/// The batch's ids with the virtual positions (the first `n` of each row) set to 0 for the
/// token-embedding lookup; panics when the batch does not carry the prefix.
pub(crate) fn real_ids(batch: &Batch, n: usize, layer: &str) -> Vec<u32> {
    assert!(
        batch.seq_len > n,
        "{layer}: prompt tuning needs each row to start with {n} virtual tokens (peft::prompt::prefix_batch); got rows of {}",
        batch.seq_len
    );
    let mut ids = batch.input_ids.clone();
    for (b, row) in ids.chunks_mut(batch.seq_len).enumerate() {
        for (t, id) in row.iter_mut().enumerate() {
            let virtual_pos = t < n;
            assert!(
                virtual_pos == (*id == VIRTUAL_TOKEN),
                "{layer}: row {b} position {t}: the {n} virtual tokens must lead each row and appear nowhere else (build batches with peft::prompt::prefix_batch)"
            );
            if virtual_pos {
                *id = 0;
            }
        }
    }
    ids
}

/// Puts the prompt rows at the virtual positions of `hidden` `[rows, d]`, plus the position
/// embedding of their position where the model adds one (GPT-2).
pub(crate) fn place_prompt<T: Float>(
    hidden: &mut [T],
    prompt: &[T],
    positions: Option<&[T]>,
    seq_len: usize,
    n: usize,
    d: usize,
) {
    for row in hidden.chunks_mut(seq_len * d) {
        for t in 0..n {
            let out = &mut row[t * d..(t + 1) * d];
            let p = &prompt[t * d..(t + 1) * d];
            match positions {
                Some(wpe) => {
                    let pos = &wpe[t * d..(t + 1) * d];
                    for ((o, p), w) in out.iter_mut().zip(p).zip(pos) {
                        *o = T::from_f32(p.to_f32() + w.to_f32());
                    }
                }
                None => out.copy_from_slice(p),
            }
        }
    }
}

/// The prompt's gradient: the sum over the batch of the upstream gradient at its positions.
pub(crate) fn prompt_backward<T: Float>(
    dprompt: &mut [f32],
    dhidden: &[T],
    seq_len: usize,
    n: usize,
    d: usize,
) {
    for row in dhidden.chunks(seq_len * d) {
        for (g, x) in dprompt.iter_mut().zip(&row[..n * d]) {
            *g += x.to_f32();
        }
    }
}

/// PEFT's initialisation (RANDOM: N(0, 1)), deterministic in `seed`.
pub fn init_prompt<T: Float>(model: &mut Model<T>, seed: u64) -> Result<(), PeftError> {
    let values = model
        .param_mut(PROMPT_EMBEDDINGS)
        .ok_or_else(|| no_prompt("init_prompt"))?;
    let mut rng = NormalRng::new(seed ^ name_hash(PROMPT_EMBEDDINGS));
    for v in values.iter_mut() {
        *v = T::from_f32(rng.normal() as f32);
    }
    Ok(())
}

fn no_prompt(what: &str) -> PeftError {
    PeftError::Adapter {
        path: "<model>".into(),
        message: format!("{what}: the model was not built for prompt tuning (Tuning::prompt)"),
    }
}

/// Writes `dir` as PEFT's prompt-tuning adapter.
pub fn save_prompt_adapter<T: Float>(
    dir: &Path,
    model: &Model<T>,
    base_model_name_or_path: Option<&str>,
) -> Result<AdapterFiles, PeftError> {
    let cfg = model
        .tuning
        .prompt_config()
        .ok_or_else(|| no_prompt("save_prompt_adapter"))?;
    let values = model
        .param(PROMPT_EMBEDDINGS)
        .ok_or_else(|| no_prompt("save_prompt_adapter"))?;
    std::fs::create_dir_all(dir).map_err(|source| PeftError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let n = cfg.num_virtual_tokens;
    let d = values.len() / n;
    let weights = dir.join(WEIGHTS_FILE);
    save_tensors(
        &weights,
        &[(PROMPT_EMBEDDINGS.to_string(), values, vec![n, d])],
        DType::F32,
    )?;
    let mut out = cfg.clone();
    out.token_dim = Some(d);
    if let Some(base) = base_model_name_or_path {
        out.base_model_name_or_path = Some(base.to_string());
    }
    let text = serde_json::to_string_pretty(&out.to_json()).expect("JSON") + "\n";
    let config = dir.join(CONFIG_FILE);
    write_atomic(&config, text.as_bytes())?;
    Ok(AdapterFiles {
        config,
        weights,
        tensors: 1,
    })
}

/// Loads `dir/adapter_model.safetensors`'s `prompt_embeddings` into a model built for prompt
/// tuning with the same number of virtual tokens.
pub fn load_prompt_adapter<T: Float>(dir: &Path, model: &mut Model<T>) -> Result<(), PeftError> {
    let path = dir.join(WEIGHTS_FILE);
    let err = |message: String| PeftError::Adapter {
        path: path.clone(),
        message,
    };
    let bytes = std::fs::read(&path).map_err(|source| PeftError::Io {
        path: path.clone(),
        source,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
    let names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
    if names.len() != 1 || names[0] != PROMPT_EMBEDDINGS {
        return Err(err(format!(
            "a prompt-tuning adapter holds exactly `{PROMPT_EMBEDDINGS}`; found {names:?}"
        )));
    }
    let view = st
        .tensor(PROMPT_EMBEDDINGS)
        .map_err(|e| err(e.to_string()))?;
    let dst = model
        .param_mut(PROMPT_EMBEDDINGS)
        .ok_or_else(|| no_prompt("load_prompt_adapter"))?;
    let numel: usize = view.shape().iter().product();
    if numel != dst.len() || view.shape().len() != 2 {
        return Err(err(format!(
            "`{PROMPT_EMBEDDINGS}` has shape {:?}; the model expects {} values ([num_virtual_tokens, hidden])",
            view.shape(),
            dst.len()
        )));
    }
    convert_into(&path, PROMPT_EMBEDDINGS, view.dtype(), view.data(), dst)?;
    Ok(())
}
