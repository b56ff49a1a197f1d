//! From data files to samples: read, detect the format, split off eval, tokenize, mask,
//! pack or truncate, and count everything that was cut, dropped or skipped.

use std::path::PathBuf;

use crate::alpaca::alpaca_sample;
use crate::chat::chat_sample;
use crate::chat_template::ChatTemplate;
use crate::format::{detect_format, Columns, Format};
use crate::prompt_template::PromptTemplate;
use crate::read::{read_files, ReadOptions};
use crate::record::Record;
use crate::sample::Sample;
use crate::split::split_eval;
use crate::summary::Summary;
use crate::text::{encode_document, pack};
use crate::tokenize::{SpecialIds, Tokenize};
use crate::DataError;

#[derive(Debug, Clone, PartialEq)]
pub enum EvalData {
    None,
    /// `--eval-data FILE...`
    Files(Vec<PathBuf>),
    /// `--eval-split FRACTION` of the training records, chosen by the seed.
    Fraction(f64),
}

#[derive(Debug, Clone)]
pub struct DataConfig {
    pub train_files: Vec<PathBuf>,
    pub eval: EvalData,
    /// `None`: detected from the first records.
    pub format: Option<Format>,
    pub columns: Columns,
    /// `None`: on for the text format, off otherwise. Only the text format packs.
    pub packing: Option<bool>,
    pub block_size: usize,
    /// Longest unpacked sample; longer ones are truncated (and counted).
    pub max_length: Option<usize>,
    pub prompt_template: PromptTemplate,
    /// `None`: the built-in ChatML template.
    pub chat_template: Option<ChatTemplate>,
    pub skip_bad_records: bool,
    pub seed: u64,
}

impl DataConfig {
    pub fn new(train_files: Vec<PathBuf>) -> DataConfig {
        DataConfig {
            train_files,
            eval: EvalData::None,
            format: None,
            columns: Columns::default(),
            packing: None,
            block_size: 1024,
            max_length: None,
            prompt_template: PromptTemplate::alpaca(),
            chat_template: None,
            skip_bad_records: false,
            seed: 42,
        }
    }

    /// Whether `format` is packed under this configuration.
    pub fn packing_for(&self, format: Format) -> Result<bool, DataError> {
        match (format, self.packing) {
            (Format::Text, p) => Ok(p.unwrap_or(true)),
            (_, Some(true)) => Err(DataError::InvalidOption {
                name: "--packing",
                value: format!("true with --format {format}"),
                expected:
                    "packing only with the text format (alpaca and chat samples keep their masks)",
            }),
            (_, _) => Ok(false),
        }
    }

    fn read_options(&self) -> ReadOptions {
        ReadOptions {
            skip_bad_records: self.skip_bad_records,
            text_column: self.columns.text.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Dataset {
    pub samples: Vec<Sample>,
    pub summary: Summary,
}

#[derive(Debug, Clone)]
pub struct PreparedData {
    pub format: Format,
    pub packing: bool,
    pub train: Dataset,
    pub eval: Option<Dataset>,
}

/// Everything the train command needs from the data options.
pub fn prepare(
    cfg: &DataConfig,
    tok: &dyn Tokenize,
    special: SpecialIds,
) -> Result<PreparedData, DataError> {
    if cfg.block_size == 0 {
        return Err(DataError::InvalidOption {
            name: "--block-size",
            value: "0".to_string(),
            expected: "a positive number of tokens",
        });
    }
    if cfg.max_length == Some(0) {
        return Err(DataError::InvalidOption {
            name: "--max-length",
            value: "0".to_string(),
            expected: "a positive number of tokens",
        });
    }
    let read = read_files(&cfg.train_files, &cfg.read_options())?;
    let mut train_summary = Summary {
        blank_lines: read.blank_lines,
        ..Summary::default()
    };
    read.skipped.iter().for_each(|e| train_summary.skip(e));
    let format = match cfg.format {
        Some(f) => f,
        None => detect_format(&read.records, &cfg.columns)?,
    };
    let packing = cfg.packing_for(format)?;

    let (train_records, eval_part) = match &cfg.eval {
        EvalData::None => (read.records, None),
        EvalData::Fraction(f) => {
            let (train_idx, eval_idx) = split_eval(read.records.len(), *f, cfg.seed)?;
            let mut slots: Vec<Option<Record>> = read.records.into_iter().map(Some).collect();
            let mut take = |idx: Vec<usize>| -> Vec<Record> {
                idx.into_iter().filter_map(|i| slots[i].take()).collect()
            };
            let eval = take(eval_idx);
            (take(train_idx), Some((eval, Summary::default())))
        }
        EvalData::Files(paths) => {
            let eval_read = read_files(paths, &cfg.read_options())?;
            let mut s = Summary {
                blank_lines: eval_read.blank_lines,
                ..Summary::default()
            };
            eval_read.skipped.iter().for_each(|e| s.skip(e));
            (read.records, Some((eval_read.records, s)))
        }
    };

    let train_samples = build_samples(
        &train_records,
        cfg,
        format,
        packing,
        tok,
        special,
        &mut train_summary,
    )?;
    let eval = match eval_part {
        None => None,
        Some((records, mut summary)) => {
            let samples =
                build_samples(&records, cfg, format, packing, tok, special, &mut summary)?;
            Some(Dataset { samples, summary })
        }
    };
    Ok(PreparedData {
        format,
        packing,
        train: Dataset {
            samples: train_samples,
            summary: train_summary,
        },
        eval,
    })
}

/// Turns records into samples of `format`; malformed records are errors, or skipped and
/// counted under `skip_bad_records`.
pub fn build_samples(
    records: &[Record],
    cfg: &DataConfig,
    format: Format,
    packing: bool,
    tok: &dyn Tokenize,
    special: SpecialIds,
    summary: &mut Summary,
) -> Result<Vec<Sample>, DataError> {
    let handle = |r: Result<(), DataError>, summary: &mut Summary| match r {
        Err(e) if cfg.skip_bad_records => {
            summary.skip(&e);
            Ok(())
        }
        other => other,
    };
    let mut samples = Vec::new();
    if packing {
        let mut docs = Vec::new();
        for rec in records {
            let r = encode_document(rec, &cfg.columns.text, tok, special).map(|d| docs.push(d));
            handle(r, summary)?;
        }
        summary.records += docs.len();
        let (blocks, dropped) = pack(docs, cfg.block_size);
        summary.packing_dropped_tokens += dropped;
        samples = blocks;
    } else {
        let chatml;
        let chat_template = match &cfg.chat_template {
            Some(t) => t,
            None => {
                chatml = ChatTemplate::chatml();
                &chatml
            }
        };
        for rec in records {
            let sample = match format {
                Format::Text => {
                    encode_document(rec, &cfg.columns.text, tok, special).map(Sample::all_targets)
                }
                Format::Alpaca => {
                    alpaca_sample(rec, &cfg.columns, &cfg.prompt_template, tok, special)
                }
                Format::Chat => chat_sample(rec, &cfg.columns.messages, chat_template, tok),
            };
            let r = sample.map(|mut s| {
                summary.records += 1;
                if let Some(max) = cfg.max_length {
                    let cut = s.truncate(max);
                    if cut > 0 {
                        summary.truncated_samples += 1;
                        summary.truncated_tokens += cut;
                    }
                }
                if s.num_loss_tokens() == 0 {
                    summary.dropped_without_labels += 1;
                } else {
                    samples.push(s);
                }
            });
            handle(r, summary)?;
        }
    }
    summary.samples += samples.len();
    summary.tokens += samples.iter().map(Sample::len).sum::<usize>();
    summary.loss_tokens += samples.iter().map(Sample::num_loss_tokens).sum::<usize>();
    Ok(samples)
}
