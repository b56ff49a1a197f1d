//! `rustspeed eval`: causal-LM loss and perplexity of a model (HF directory or .gguf) on a text
//! file. Each text is scored on its own: tokenized with the tokenizer's special tokens,
//! truncated to `--max-length`, and every position after the first predicted from the tokens
//! before it. The loss is the total negative log-likelihood over the number of predicted tokens
//! of all texts (so long texts weigh more, as one long concatenated corpus would).
//!
//! Texts of similar length are batched together (sorted by length, right-padded with labels
//! ignored on padding) so that short texts do not each pay a whole forward pass; causal
//! attention means padding after a text never changes its scores.

use std::path::{Path, PathBuf};

use anyhow::Context;
use half::bf16;
use rustspeed_kernels::Float;
use rustspeed_models::loader::{load_model, LoadError};
use rustspeed_models::{Batch, IGNORE_INDEX};
use serde_json::json;

use crate::exit::UsageError;

#[derive(clap::Args)]
pub struct Args {
    /// HF model directory (config.json, safetensors, tokenizer) or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// JSONL with a `text` field per line, or a .txt file with one text per line.
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
    let texts = read_texts(&args.data)?;
    let result = match args.dtype {
        EvalDtype::F32 => evaluate::<f32>(&args, &texts)?,
        EvalDtype::Bf16 => evaluate::<bf16>(&args, &texts)?,
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

/// The texts of a JSONL file (`text` field) or a .txt file (one per line; blank lines skipped).
pub fn read_texts(path: &Path) -> anyhow::Result<Vec<String>> {
    let content = std::fs::read_to_string(path)
        .map_err(|e| DataError(format!("cannot read data file {}: {e}", path.display())))?;
    let is_txt = path.extension().is_some_and(|e| e == "txt");
    let mut texts = Vec::new();
    for (i, line) in content.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if is_txt {
            texts.push(line.to_string());
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let value: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| DataError(format!("{at}: not valid JSON: {e}")))?;
        match value.get("text") {
            Some(serde_json::Value::String(s)) => texts.push(s.clone()),
            Some(other) => {
                return Err(DataError(format!("{at}: `text` is {other}, expected a string")).into())
            }
            None => {
                return Err(DataError(format!(
                    "{at}: no `text` field (each line must be a JSON object with a string `text`)"
                ))
                .into())
            }
        }
    }
    if texts.is_empty() {
        return Err(DataError(format!("{}: no texts", path.display())).into());
    }
    Ok(texts)
}

fn evaluate<T: Float>(args: &Args, texts: &[String]) -> anyhow::Result<EvalResult> {
    let loaded = load_model::<T>(&args.model).map_err(|e| match e {
        LoadError::NotAModel { .. } => anyhow::Error::new(UsageError(e.to_string())),
        other => anyhow::Error::new(other),
    })?;
    let tokenizer = loaded.tokenizer.as_ref().ok_or_else(|| {
        UsageError(format!(
            "{}: no tokenizer (tokenizer.json, or vocab.json + merges.txt) to encode the texts",
            args.model.display()
        ))
    })?;
    let max_len = args
        .max_length
        .unwrap_or(loaded.config.max_position_embeddings)
        .min(loaded.config.max_position_embeddings);
    let mut seqs = Vec::with_capacity(texts.len());
    for text in texts {
        let mut ids = tokenizer
            .encode(text, true)
            .with_context(|| format!("tokenizing {:?}", abbreviate(text)))?;
        ids.truncate(max_len);
        if ids.len() >= 2 {
            seqs.push(ids);
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
    seqs.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let total_tokens: usize = seqs.iter().map(|s| s.len() - 1).sum();
    let progress = progress_bar(total_tokens);
    let mut nll = 0f64;
    let mut tokens = 0usize;
    for group in seqs.chunks(args.batch_size) {
        let batch = pad_batch(group);
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

/// Right-pads `seqs` to the longest; padding is token 0 with ignored labels.
fn pad_batch(seqs: &[Vec<u32>]) -> Batch {
    let seq_len = seqs.iter().map(Vec::len).max().unwrap_or(0);
    let mut input_ids = vec![0u32; seqs.len() * seq_len];
    let mut labels = vec![IGNORE_INDEX; seqs.len() * seq_len];
    for (b, s) in seqs.iter().enumerate() {
        let row = b * seq_len;
        input_ids[row..row + s.len()].copy_from_slice(s);
        for (l, &id) in labels[row..row + s.len()].iter_mut().zip(s) {
            *l = id as i32;
        }
    }
    Batch::from_hf_labels(seqs.len(), seq_len, input_ids, &labels)
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
