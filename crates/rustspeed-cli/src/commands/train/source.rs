//! What training reads before the engine starts: the model source (HF directory or GGUF: its
//! config, tokenizer and chat template) and the data, turned into train and eval samples.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use rustspeed_data::{
    ChatTemplate, Columns, DataConfig, EvalData, Format, PreparedData, PromptTemplate, SpecialIds,
};
use rustspeed_models::export::read_config_json;
use rustspeed_models::gguf::GgufFile;
use rustspeed_models::hf_config::ModelConfig;
use rustspeed_models::tokenizer::Tokenizer;

use super::Args;
use crate::commands::eval::DataError;
use crate::exit::UsageError;

/// What the model source provides before its weights are loaded in the training dtype.
pub struct Source {
    pub config: ModelConfig,
    pub config_json: serde_json::Value,
    pub tokenizer: Tokenizer,
    /// The model's own chat template, if it has one.
    pub chat_template: Option<ChatTemplate>,
    /// The HF directory whose tokenizer files the export copies; `None` for GGUF.
    pub hf_dir: Option<PathBuf>,
}

pub fn open_source(path: &Path) -> anyhow::Result<Source> {
    let data_err = |e: rustspeed_data::DataError| DataError(e.to_string());
    if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
        let file = GgufFile::open(path)?;
        let tokenizer = file.tokenizer()?;
        let token = |id: Option<u32>| id.and_then(|i| tokenizer.inner().id_to_token(i));
        let chat_template = match file.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
            Some(src) => Some(
                ChatTemplate::new(
                    src,
                    &format!("{} tokenizer.chat_template", path.display()),
                    token(tokenizer.bos_token_id()),
                    token(tokenizer.eos_token_id()),
                )
                .map_err(data_err)?,
            ),
            None => None,
        };
        return Ok(Source {
            config: file.model_config()?,
            config_json: file.config_json()?,
            tokenizer,
            chat_template,
            hf_dir: None,
        });
    }
    if !path.join("config.json").is_file() {
        return Err(UsageError(format!(
            "{}: not a model (an HF directory with config.json, or a .gguf file)",
            path.display()
        ))
        .into());
    }
    let tokenizer = Tokenizer::from_dir(path).map_err(|e| {
        UsageError(format!(
            "{}: no usable tokenizer to encode the data: {e}",
            path.display()
        ))
    })?;
    let tc = path.join("tokenizer_config.json");
    let chat_template = if tc.is_file() {
        ChatTemplate::from_tokenizer_config(&tc).map_err(data_err)?
    } else {
        None
    };
    Ok(Source {
        config: ModelConfig::from_path(path)?,
        config_json: read_config_json(path)?,
        tokenizer,
        chat_template,
        hf_dir: Some(path.to_path_buf()),
    })
}

/// Reads, formats, tokenizes and packs or truncates the training data (and the eval data).
pub fn prepare_data(
    args: &Args,
    source: &Source,
    block_size: usize,
    max_positions: usize,
) -> anyhow::Result<PreparedData> {
    let data_err = |e: rustspeed_data::DataError| DataError(e.to_string());
    let mut cfg = DataConfig::new(vec![args.data.clone()]);
    cfg.format = args
        .format
        .as_deref()
        .map(Format::from_str)
        .transpose()
        .map_err(data_err)?;
    cfg.eval = match (&args.eval_data[..], args.eval_split) {
        ([], None) => EvalData::None,
        ([], Some(f)) => EvalData::Fraction(f),
        (files, _) => EvalData::Files(files.to_vec()),
    };
    let d = Columns::default();
    cfg.columns = Columns {
        text: args.text_column.clone().unwrap_or(d.text),
        instruction: args.instruction_column.clone().unwrap_or(d.instruction),
        input: args.input_column.clone().unwrap_or(d.input),
        output: args.output_column.clone().unwrap_or(d.output),
        messages: args.messages_column.clone().unwrap_or(d.messages),
    };
    if let Some(path) = &args.prompt_template {
        cfg.prompt_template = PromptTemplate::from_file(path).map_err(data_err)?;
    }
    cfg.chat_template = source.chat_template.clone();
    cfg.skip_bad_records = args.skip_bad_records;
    cfg.packing = args.packing;
    cfg.block_size = block_size;
    cfg.max_length = Some(args.max_length.unwrap_or(max_positions));
    cfg.seed = args.seed;
    let tok = &source.tokenizer;
    let eos = tok.eos_token_id().ok_or_else(|| {
        UsageError(format!(
            "{}: the tokenizer names no EOS token (needed to end and pad samples)",
            args.model.display()
        ))
    })?;
    let special = SpecialIds {
        eos,
        bos: tok.bos_token_id(),
    };
    let encode = rustspeed_data::TryEncode(|t: &str, s: bool| tok.encode(t, s));
    let prepared = rustspeed_data::prepare(&cfg, &encode, special).map_err(data_err)?;
    if prepared.format == Format::Chat && source.chat_template.is_none() {
        tracing::warn!(
            "{} has no chat template; rendering conversations with the built-in ChatML template",
            args.model.display()
        );
    }
    let s = &prepared.train.summary;
    tracing::info!(
        "data {}: format {}, packing {}, {} records -> {} samples, {} tokens ({} with loss), {} truncated, {} skipped",
        args.data.display(),
        prepared.format,
        prepared.packing,
        s.records,
        s.samples,
        s.tokens,
        s.loss_tokens,
        s.truncated_samples,
        s.skipped_records
    );
    for m in &s.skipped_messages {
        tracing::warn!("skipped: {m}");
    }
    Ok(prepared)
}
