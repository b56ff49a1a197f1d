//! `rustspeed eval`: causal-LM loss and perplexity of a model (HF directory or .gguf) on a text
//! file. Each text is scored on its own: tokenized with the tokenizer's special tokens,
//! truncated to `--max-length`, and every position after the first predicted from the tokens
//! before it. The loss is the total negative log-likelihood over the number of predicted tokens
//! of all texts (so long texts weigh more, as one long concatenated corpus would).
//!
//! Lines may instead hold pre-tokenized records, `{"input_ids": [...], "labels": [...]}` (labels
//! optional, -100 ignored, as HF datasets give them), scored the same way without a tokenizer.
//!
//! `--adapter DIR` evaluates the base with a PEFT adapter attached: LoRA (not merged), or a
//! prompt-learning adapter loaded as PEFT loads one (the saved prompt rows; prompt tuning and
//! P-tuning prepend them to each text, whose loss counts only its real tokens, the first one
//! included as the prompt predicts it; prefix tuning gives them to every attention layer).
//! `--quantize nf4|fp4|int8` holds the base's frozen linears quantized as QLoRA training does.
//!
//! Texts of similar length are batched together (sorted by length, right-padded with labels
//! ignored on padding) so that short texts do not each pay a whole forward pass; causal
//! attention means padding after a text never changes its scores.

use std::path::{Path, PathBuf};

use anyhow::Context;
use half::bf16;
use rustspeed_kernels::Float;
use rustspeed_models::hf_config::Architecture;
use rustspeed_models::loader::{load_model, load_model_tuned, model_config, LoadError};
use rustspeed_models::peft::{self, prefix_batch, AdapterKind, LoraConfig, PromptTuningConfig};
use rustspeed_models::{Batch, Tuning, IGNORE_INDEX};
use serde_json::json;

use crate::exit::UsageError;

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory (config.json, safetensors, tokenizer) or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL with a `text` field per line (or pre-tokenized `input_ids` and optional `labels`),
    /// or a .txt file with one text per line.
    #[arg(long)]
    pub data: PathBuf,
    /// Tokens per text at most (default: the model's maximum positions).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Compute dtype.
    #[arg(long, value_enum, default_value_t = EvalDtype::F32)]
    pub dtype: EvalDtype,
    /// Texts per forward pass (texts of similar length are grouped).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Print {"loss", "perplexity", "tokens"} as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// A PEFT adapter directory to attach to the base (adapter_config.json +
    /// adapter_model.safetensors): LoRA, PROMPT_TUNING, P_TUNING or PREFIX_TUNING, e.g.
    /// OUT/final of `rustspeed train --lora-r ...`.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Hold the base's frozen linears quantized (nf4, fp4 or int8), as QLoRA trains them.
    #[arg(long)]
    pub quantize: Option<String>,
    /// Quantize nf4/fp4 block absmax values too (bitsandbytes' double quantization).
    #[arg(long)]
    pub double_quant: bool,
    /// The quantized layers' compute dtype (bnb_4bit_compute_dtype): f32, bf16 or f16;
    /// default --dtype.
    #[arg(long)]
    pub compute_dtype: Option<String>,
}

/// One line of the data file.
#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    Text(String),
    /// Token ids with HF labels (the ids themselves when the line has none).
    Tokens {
        input_ids: Vec<u32>,
        labels: Vec<i32>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum EvalDtype {
    F32,
    Bf16,
}

/// A bad line or unreadable data file: the user's input, exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DataError(pub String);

/// The result of an evaluation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EvalResult {
    pub loss: f64,
    pub perplexity: f64,
    /// Predicted tokens counted.
    pub tokens: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.batch_size == 0 {
        return Err(UsageError("--batch-size must be at least 1".into()).into());
    }
    if args.max_length.is_some_and(|n| n < 2) {
        return Err(UsageError(
            "--max-length must be at least 2 (one token predicts the next)".into(),
        )
        .into());
    }
    super::quantize::check_quant_flags(
        args.quantize.as_deref(),
        args.double_quant,
        args.compute_dtype.as_deref(),
    )?;
    let tuning = tuning_from_args(&args)?;
    let records = read_records(&args.data)?;
    let result = match args.dtype {
        EvalDtype::F32 => evaluate::<f32>(&args, tuning.as_ref(), &records)?,
        EvalDtype::Bf16 => evaluate::<bf16>(&args, tuning.as_ref(), &records)?,
    };
    if args.json {
        let out =
            json!({"loss": result.loss, "perplexity": result.perplexity, "tokens": result.tokens});
        println!("{out}");
    } else {
        println!("loss: {:.6}", result.loss);
        println!("perplexity: {:.4}", result.perplexity);
        println!("tokens: {}", result.tokens);
    }
    Ok(())
}

/// The adapter (and quantized base) `--adapter` / `--quantize` ask for; `None` for the plain model.
fn tuning_from_args(args: &Args) -> anyhow::Result<Option<Tuning>> {
    let Some(dir) = &args.adapter else {
        if let Some(q) = &args.quantize {
            return Err(UsageError(format!(
                "not supported yet: --quantize {q} without --adapter (rustspeed quantizes a base only under adapters; evaluate the dense base, or give --adapter DIR)"
            ))
            .into());
        }
        return Ok(None);
    };
    let usage = |e: peft::PeftError| UsageError(format!("--adapter {}: {e}", dir.display()));
    let config_file = dir.join(peft::adapter::CONFIG_FILE);
    let text = std::fs::read_to_string(&config_file)
        .map_err(|e| UsageError(format!("--adapter {}: {e}", config_file.display())))?;
    let cfg = model_config(&args.model)?;
    if let AdapterKind::Prompt(kind) =
        peft::adapter_kind(&config_file.display().to_string(), &text).map_err(usage)?
    {
        if let Some(q) = &args.quantize {
            return Err(UsageError(format!(
                "not supported yet: --quantize {q} with a {} adapter (rustspeed quantizes a base only under LoRA)",
                kind.peft_type()
            ))
            .into());
        }
        let mut prompt = PromptTuningConfig::from_path(dir).map_err(usage)?;
        // As PEFT loads it (inference mode): the saved rows, no encoder.
        prompt.saved_form = true;
        return Ok(Some(Tuning::prompt(prompt, &cfg).map_err(usage)?));
    }
    let lora = LoraConfig::from_path(dir).map_err(usage)?;
    let mut tuning = Tuning::lora(lora, &cfg).map_err(usage)?;
    if let Some(q) = &args.quantize {
        let qc =
            super::quantize::quant_config(q, args.double_quant, args.compute_dtype.as_deref())?;
        tuning = tuning.with_quantization(qc).map_err(usage)?;
    }
    Ok(Some(tuning))
}

/// The records of a JSONL file (`text`, or `input_ids` [+ `labels`]) or a .txt file (one text
/// per line; blank lines skipped).
pub fn read_records(path: &Path) -> anyhow::Result<Vec<Record>> {
    let content = std::fs::read_to_string(path)
        .map_err(|e| DataError(format!("cannot read data file {}: {e}", path.display())))?;
    let is_txt = path.extension().is_some_and(|e| e == "txt");
    let mut records = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if is_txt {
            records.push(Record::Text(line.to_string()));
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| DataError(format!("{at}: not valid JSON: {e}")))?;
        if let Some(ids) = value.get("input_ids") {
            records.push(token_record(&at, ids, value.get("labels"))?);
            continue;
        }
        match value.get("text") {
            Some(serde_json::Value::String(s)) => records.push(Record::Text(s.clone())),
            Some(other) => {
                return Err(DataError(format!("{at}: `text` is {other}, expected a string")).into())
            }
            None => {
                return Err(DataError(format!(
                    "{at}: no `text` field (each line must be a JSON object with a string `text`, or `input_ids`)"
                ))
                .into())
            }
        }
    }
    if records.is_empty() {
        return Err(DataError(format!("{}: no texts", path.display())).into());
    }
    Ok(records)
}

fn token_record(
    at: &str,
    ids: &serde_json::Value,
    labels: Option<&serde_json::Value>,
) -> anyhow::Result<Record> {
    let ints = |key: &str, v: &serde_json::Value| -> anyhow::Result<Vec<i64>> {
        v.as_array()
            .and_then(|a| a.iter().map(|x| x.as_i64()).collect::<Option<Vec<_>>>())
            .ok_or_else(|| DataError(format!("{at}: `{key}` must be an array of integers")).into())
    };
    let input_ids = ints("input_ids", ids)?
        .into_iter()
        .map(|x| u32::try_from(x).map_err(|_| DataError(format!("{at}: `input_ids` has {x}"))))
        .collect::<Result<Vec<u32>, _>>()?;
    let labels = match labels {
        None | Some(serde_json::Value::Null) => input_ids.iter().map(|&x| x as i32).collect(),
        Some(v) => {
            let l = ints("labels", v)?;
            if l.len() != input_ids.len() {
                return Err(DataError(format!(
                    "{at}: {} labels for {} input_ids (they must be the same length)",
                    l.len(),
                    input_ids.len()
                ))
                .into());
            }
            l.into_iter().map(|x| x as i32).collect()
        }
    };
    Ok(Record::Tokens { input_ids, labels })
}

fn evaluate<T: Float>(
    args: &Args,
    tuning: Option<&Tuning>,
    records: &[Record],
) -> anyhow::Result<EvalResult> {
    let not_a_model = |e: LoadError| match e {
        LoadError::NotAModel { .. } => anyhow::Error::new(UsageError(e.to_string())),
        other => anyhow::Error::new(other),
    };
    let mut loaded = match tuning {
        None => load_model::<T>(&args.model).map_err(not_a_model)?,
        Some(t) => load_model_tuned::<T>(&args.model, t, 0).map_err(not_a_model)?,
    };
    if let Some(dir) = &args.adapter {
        peft::load_adapter(dir, &mut loaded.model)?;
    }
    let virtual_tokens = tuning.map_or(0, |t| t.virtual_tokens());
    // GPT-2's position embeddings end at n_positions; the prompt (or prefix) takes the first.
    let reserved = match loaded.config.architecture {
        Architecture::Gpt2 => tuning.map_or(0, |t| t.virtual_tokens() + t.prefix_tokens()),
        _ => 0,
    };
    let max_positions = loaded
        .config
        .max_position_embeddings
        .saturating_sub(reserved);
    let max_len = args.max_length.unwrap_or(max_positions).min(max_positions);
    // (input ids, HF labels) per sequence.
    let mut seqs: Vec<(Vec<u32>, Vec<i32>)> = Vec::with_capacity(records.len());
    for record in records {
        let (mut ids, mut labels) = match record {
            Record::Tokens { input_ids, labels } => (input_ids.clone(), labels.clone()),
            Record::Text(text) => {
                let tokenizer = loaded.tokenizer.as_ref().ok_or_else(|| {
                    UsageError(format!(
                        "{}: no tokenizer (tokenizer.json, or vocab.json + merges.txt) to encode the texts; give pre-tokenized `input_ids` lines instead",
                        args.model.display()
                    ))
                })?;
                let ids = tokenizer
                    .encode(text, true)
                    .with_context(|| format!("tokenizing {:?}", abbreviate(text)))?;
                let labels = ids.iter().map(|&x| x as i32).collect();
                (ids, labels)
            }
        };
        if let Some(&bad) = ids
            .iter()
            .find(|&&x| x as usize >= loaded.config.vocab_size)
        {
            return Err(DataError(format!(
                "{}: token id {bad} is outside the model's vocabulary ({} tokens)",
                args.data.display(),
                loaded.config.vocab_size
            ))
            .into());
        }
        ids.truncate(max_len);
        labels.truncate(max_len);
        if ids.len() >= 2 {
            seqs.push((ids, labels));
        }
    }
    if seqs.is_empty() {
        return Err(DataError(format!(
            "{}: no text has two or more tokens, so nothing is predicted",
            args.data.display()
        ))
        .into());
    }
    let mut model = loaded.model;
    // Longest first, so the progress bar's rate settles early and batches share a length.
    seqs.sort_by_key(|s| std::cmp::Reverse(s.0.len()));
    let total_tokens: usize = seqs.iter().map(|s| s.0.len() - 1).sum();
    let progress = progress_bar(total_tokens);
    let mut nll = 0f64;
    let mut tokens = 0usize;
    for group in seqs.chunks(args.batch_size) {
        let batch = pad_batch(group, virtual_tokens);
        let sum = model.forward(&batch, false, 0);
        nll += sum.nll;
        tokens += sum.tokens;
        progress.inc(sum.tokens as u64);
    }
    progress.finish_and_clear();
    let loss = nll / tokens as f64;
    Ok(EvalResult {
        loss,
        perplexity: loss.exp(),
        tokens,
    })
}

/// Right-pads `seqs` to the longest; padding is token 0 with ignored labels. With
/// `virtual_tokens`, each row starts with that many virtual-token positions (prompt tuning).
fn pad_batch(seqs: &[(Vec<u32>, Vec<i32>)], virtual_tokens: usize) -> Batch {
    let seq_len = seqs.iter().map(|s| s.0.len()).max().unwrap_or(0);
    let mut input_ids = vec![0u32; seqs.len() * seq_len];
    let mut labels = vec![IGNORE_INDEX; seqs.len() * seq_len];
    for (b, (ids, l)) in seqs.iter().enumerate() {
        let row = b * seq_len;
        input_ids[row..row + ids.len()].copy_from_slice(ids);
        labels[row..row + l.len()].copy_from_slice(l);
    }
    prefix_batch(seqs.len(), seq_len, &input_ids, &labels, virtual_tokens)
}

/// A token-count bar on stderr; indicatif draws nothing when stderr is not a terminal.
fn progress_bar(total: usize) -> indicatif::ProgressBar {
    // Short evaluations finish before a bar would be useful.
    if total < 4096 {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "eval {bar:40} {pos}/{len} tokens ({per_sec}, eta {eta})",
        )
        .expect("valid template"),
    );
    bar
}

fn abbreviate(text: &str) -> String {
    let mut s: String = text.chars().take(40).collect();
    if s.len() < text.len() {
        s.push_str("...");
    }
    s
}
