//! Training data for `rustspeed train`: readers for JSONL, JSON arrays, CSV/TSV, plain text
//! and Parquet; the text (packed or not), alpaca and chat formats with their loss masks;
//! right-padded batches; and a seeded, resumable data order with data-parallel sharding.
//!
//! The tokenizer is anything implementing [`Tokenize`] (an `Fn(&str, bool) -> Vec<u32>` closure
//! does), so this crate does not depend on a tokenizer library.

mod alpaca;
mod batch;
mod chat;
mod chat_template;
mod dataset;
mod error;
mod fields;
mod format;
mod order;
mod prompt_template;
pub mod read;
mod record;
pub mod rng;
mod sample;
mod shard;
mod split;
mod summary;
mod text;
mod tokenize;

pub use alpaca::alpaca_sample;
pub use batch::{collate, Batch};
pub use chat::chat_sample;
pub use chat_template::{ChatTemplate, CHATML_TEMPLATE};
pub use dataset::{build_samples, prepare, DataConfig, Dataset, EvalData, PreparedData};
pub use error::DataError;
pub use format::{detect_format, Columns, Format, DETECT_RECORDS};
pub use order::{DataCursor, DataOrder, DataState, Step};
pub use prompt_template::{PromptTemplate, ALPACA_PROMPT_INPUT, ALPACA_PROMPT_NO_INPUT};
pub use read::{read_file, read_files, FileKind, ReadOptions};
pub use record::{Location, ReadOutput, Record};
pub use sample::{Sample, IGNORE_INDEX};
pub use shard::{micro_batches, rank_share};
pub use split::split_eval;
pub use summary::Summary;
pub use text::{encode_document, pack};
pub use tokenize::{SpecialIds, Tokenize, TryEncode};
