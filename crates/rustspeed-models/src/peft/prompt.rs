//! PEFT's prompt learning in the model: prompt tuning (`PROMPT_TUNING`, Lester et al. 2021)
//! and P-tuning (`P_TUNING`) put `num_virtual_tokens` trained (or MLP-encoded) embeddings before
//! every sequence's token embeddings; prefix tuning (`PREFIX_TUNING`, see `prefix`) gives every
//! attention layer trained key/value prefixes. The whole base stays frozen. Saved as PEFT does:
//! `adapter_model.safetensors` holding only `prompt_embeddings` (the prompt rows, an encoder's
//! output where there is one), and adapter_config.json.
//!
//! The virtual tokens are positions of the batch: [`prefix_batch`] puts `n` [`VIRTUAL_TOKEN`]
//! ids (labels ignored) before each sequence, as PEFT concatenates them before the embeddings,
//! so positions (GPT-2's `wpe`, LLaMA's RoPE) and causal attention cover them exactly as in
//! PEFT, and the logits have `n + T` positions per row as PEFT's do. The embedding layer puts
//! the prompt rows in place of those ids, and in backward sums their gradients into the prompt.
//! Prefix tuning adds no positions to the batch.

use std::path::Path;

use rustspeed_kernels::{DType, Float};
use safetensors::tensor::SafeTensors;

use super::adapter::{AdapterFiles, CONFIG_FILE, WEIGHTS_FILE};
use super::prefix::{self, SharedPrefix};
use super::prompt_config::{PromptInit, PromptKind};
use super::prompt_encoder::PromptPlan;
use super::PeftError;
use crate::init::{name_hash, NormalRng};
use crate::layer::{Batch, IGNORE_INDEX};
use crate::model::Model;
use crate::params::ParamSpec;
use crate::weights::{convert_into, save_tensors, write_atomic};

/// The parameter (and PEFT's adapter key) of the prompt: `[num_virtual_tokens, hidden]`.
pub const PROMPT_EMBEDDINGS: &str = "prompt_embeddings";

/// The input id of a virtual-token position; outside any vocabulary, so a model without a
/// prompt fails loudly on it.
pub const VIRTUAL_TOKEN: u32 = u32::MAX;

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

/// Puts the prompt rows `[n, d]` at the virtual positions of `hidden` `[rows, d]`, plus the
/// position embedding of their position where the model adds one (GPT-2).
pub(crate) fn place_prompt<T: Float>(
    hidden: &mut [T],
    prompt: &[f32],
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
                        *o = T::from_f32(p + w.to_f32());
                    }
                }
                None => {
                    for (o, p) in out.iter_mut().zip(p) {
                        *o = T::from_f32(*p);
                    }
                }
            }
        }
    }
}

/// The prompt rows' gradient `[n, d]`: the sum over the batch of the upstream gradient at the
/// virtual positions.
fn prompt_rows_grad<T: Float>(dhidden: &[T], seq_len: usize, n: usize, d: usize) -> Vec<f32> {
    let mut g = vec![0f32; n * d];
    for row in dhidden.chunks(seq_len * d) {
        for (g, x) in g.iter_mut().zip(&row[..n * d]) {
            *g += x.to_f32();
        }
    }
    g
}

/// Prompt learning's part of the embedding layer: the plan's parameters (after the layer's
/// own, from index `first`), and for prefix tuning the prefix shared with the blocks.
pub(crate) struct PromptLayer {
    pub plan: PromptPlan,
    pub first: usize,
    pub prefix: Option<SharedPrefix>,
}

impl PromptLayer {
    /// The prompt part of an embedding layer whose own parameters number `first`.
    pub fn new(plan: PromptPlan, first: usize, prefix: Option<SharedPrefix>) -> PromptLayer {
        assert_eq!(
            plan.kind == PromptKind::PrefixTuning,
            prefix.is_some(),
            "prefix tuning needs the shared prefix, and only it"
        );
        PromptLayer {
            plan,
            first,
            prefix,
        }
    }

    pub fn specs(&self) -> Vec<ParamSpec> {
        self.plan.specs()
    }

    /// Virtual tokens each row of the batch starts with (0 for prefix tuning).
    pub fn virtual_tokens(&self) -> usize {
        if self.prefix.is_some() {
            0
        } else {
            self.plan.n
        }
    }

    /// Computes the prompt rows. Prefix tuning hands them to the blocks and returns `None`;
    /// the others return them for [`place_prompt`].
    pub fn forward<T: Float>(&self, params: &[&[T]]) -> Option<Vec<f32>> {
        let rows = self.plan.rows(&params[self.first..]);
        match &self.prefix {
            Some(shared) => {
                let mut p = prefix::lock(shared);
                p.values = rows;
                None
            }
            None => Some(rows),
        }
    }

    /// Accumulates the prompt parameters' gradients: from the virtual positions of `dhidden`
    /// (`[rows, d]`, input prompts) or from the gradient the blocks left in the shared prefix,
    /// which it resets for the next micro-batch.
    pub fn backward<T: Float>(
        &self,
        params: &[&[T]],
        grads: &mut [&mut [f32]],
        dhidden: &[T],
        seq_len: usize,
    ) {
        let drows = match &self.prefix {
            Some(shared) => {
                let mut p = prefix::lock(shared);
                let zero = vec![0f32; p.grad.len()];
                std::mem::replace(&mut p.grad, zero)
            }
            None => prompt_rows_grad(dhidden, seq_len, self.plan.n, self.plan.width),
        };
        self.plan
            .backward(&params[self.first..], &mut grads[self.first..], &drows);
    }
}

fn no_prompt(what: &str) -> PeftError {
    PeftError::Adapter {
        path: "<model>".into(),
        message: format!("{what}: the model was not built for prompt learning (Tuning::prompt)"),
    }
}

/// The name of the model's word embeddings (what TEXT and SAMPLE_VOCAB copy from).
fn word_embeddings<T: Float>(model: &Model<T>) -> &'static str {
    ["transformer.wte.weight", "model.embed_tokens.weight"]
        .into_iter()
        .find(|n| model.layout.get(n).is_some())
        .expect("GPT-2 and the LLaMA family have word embeddings")
}

/// PEFT's initialisation, deterministic in `seed`: RANDOM N(0, 1) prompt rows, P-tuning's and
/// the prefix projection's encoders as `torch.nn` initialises them, prefix tuning's
/// `init_weights = "zero"`, and for SAMPLE_VOCAB the word embeddings of uniformly drawn token
/// ids (not torch's generator, so not the same ids). TEXT needs the tokenizer: the loader
/// leaves it RANDOM and the caller follows with [`init_prompt_from_tokens`].
pub fn init_prompt<T: Float>(model: &mut Model<T>, seed: u64) -> Result<(), PeftError> {
    let cfg = model
        .tuning
        .prompt_config()
        .ok_or_else(|| no_prompt("init_prompt"))?
        .clone();
    let plan = model.tuning.prompt_plan().expect("a prompt config");
    let slots: Vec<_> = plan
        .specs()
        .iter()
        .map(|s| model.layout.get(&s.name).expect("declared").range())
        .collect();
    let mut views = crate::params::disjoint_mut(&mut model.params, &slots);
    plan.init(&mut views, cfg.init_weights_zero, seed);
    if cfg.init == PromptInit::SampleVocab && cfg.kind == PromptKind::PromptTuning {
        let vocab = model
            .layout
            .get(word_embeddings(model))
            .expect("word embeddings")
            .spec
            .shape[0];
        let mut rng = NormalRng::new(seed ^ name_hash("SAMPLE_VOCAB"));
        let ids: Vec<u32> = (0..cfg.num_virtual_tokens)
            .map(|_| (rng.next_u64() % vocab as u64) as u32)
            .collect();
        init_prompt_from_tokens(model, &ids)?;
    }
    Ok(())
}

/// PEFT's TEXT initialisation of a prompt-tuning prompt from the token ids of
/// `prompt_tuning_init_text` (as the tokenizer gives them, special tokens included): cut or
/// repeated to `num_virtual_tokens`, then those rows of the word embeddings copied.
pub fn init_prompt_from_tokens<T: Float>(
    model: &mut Model<T>,
    ids: &[u32],
) -> Result<(), PeftError> {
    let n = model.tuning.virtual_tokens();
    if model.tuning.prompt_config().map(|c| c.kind) != Some(PromptKind::PromptTuning) {
        return Err(no_prompt("init_prompt_from_tokens (prompt tuning only)"));
    }
    let wte = model
        .layout
        .get(word_embeddings(model))
        .expect("word embeddings");
    let (vocab, d) = (wte.spec.shape[0], wte.spec.shape[1]);
    if ids.is_empty() {
        return Err(PeftError::Invalid {
            file: "adapter_config.json".into(),
            key: "prompt_tuning_init_text".into(),
            value: "\"\"".into(),
            expected: "a text with at least one token".into(),
        });
    }
    if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(PeftError::Invalid {
            file: "adapter_config.json".into(),
            key: "prompt_tuning_init_text".into(),
            value: format!("token id {bad}"),
            expected: format!("ids below the model's vocabulary size {vocab}"),
        });
    }
    let rows: Vec<T> = ids
        .iter()
        .cycle()
        .take(n)
        .flat_map(|&i| model.params[wte.offset + i as usize * d..][..d].to_vec())
        .collect();
    model
        .param_mut(PROMPT_EMBEDDINGS)
        .ok_or_else(|| no_prompt("init_prompt_from_tokens"))?
        .copy_from_slice(&rows);
    Ok(())
}

/// Writes `dir` as PEFT's adapter: `prompt_embeddings` holding the prompt rows (for P-tuning
/// and the prefix projection, the encoder's output, as PEFT's `get_prompt_embedding_to_save`).
pub fn save_prompt_adapter<T: Float>(
    dir: &Path,
    model: &Model<T>,
    base_model_name_or_path: Option<&str>,
) -> Result<AdapterFiles, PeftError> {
    let cfg = model
        .tuning
        .prompt_config()
        .ok_or_else(|| no_prompt("save_prompt_adapter"))?;
    let plan = model.tuning.prompt_plan().expect("a prompt config");
    let views: Vec<&[T]> = plan
        .specs()
        .iter()
        .map(|s| model.param(&s.name).expect("declared"))
        .collect();
    let rows = plan.rows(&views);
    std::fs::create_dir_all(dir).map_err(|source| PeftError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let weights = dir.join(WEIGHTS_FILE);
    save_tensors(
        &weights,
        &[(
            PROMPT_EMBEDDINGS.to_string(),
            &rows[..],
            vec![plan.n, plan.width],
        )],
        DType::F32,
    )?;
    let mut out = cfg.clone();
    if let Some(base) = base_model_name_or_path {
        out.base_model_name_or_path = Some(base.to_string());
        // PEFT refuses a TEXT config without a tokenizer; without one named, the base
        // model's tokenized the text.
        if out.init == PromptInit::Text && out.tokenizer_name_or_path.is_none() {
            out.tokenizer_name_or_path = Some(base.to_string());
        }
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

/// Loads `dir/adapter_model.safetensors`'s `prompt_embeddings` into a model built for its
/// config in the saved form (`PromptTuningConfig::saved_form`, always so for prompt tuning and
/// prefix tuning without projection).
pub fn load_prompt_adapter<T: Float>(dir: &Path, model: &mut Model<T>) -> Result<(), PeftError> {
    let path = dir.join(WEIGHTS_FILE);
    let err = |message: String| PeftError::Adapter {
        path: path.clone(),
        message,
    };
    if model.tuning.prompt_plan().is_some_and(|p| p.has_encoder()) {
        return Err(err(
            "not supported yet: continuing a P-tuning or prefix-projection adapter (PEFT saves only the encoder's output, not the encoder; PEFT refuses to train a loaded prompt-learning adapter too)".into(),
        ));
    }
    let bytes = std::fs::read(&path).map_err(|source| PeftError::Io {
        path: path.clone(),
        source,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| err(e.to_string()))?;
    let names: Vec<String> = st.names().into_iter().map(|n| n.to_string()).collect();
    if names.len() != 1 || names[0] != PROMPT_EMBEDDINGS {
        return Err(err(format!(
            "a prompt-learning adapter holds exactly `{PROMPT_EMBEDDINGS}`; found {names:?}"
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
            "`{PROMPT_EMBEDDINGS}` has shape {:?}; the model expects {} values ([num_virtual_tokens, width] with width the hidden size, or num_layers * 2 * token_dim for prefix tuning)",
            view.shape(),
            dst.len()
        )));
    }
    convert_into(&path, PROMPT_EMBEDDINGS, view.dtype(), view.data(), dst)?;
    Ok(())
}
