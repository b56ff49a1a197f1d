//! The layer protocol, GPT-2 and the LLaMA family, and HF formats.

pub mod error;
pub mod export;
pub mod gguf;
pub mod gpt2;
pub mod hf_config;
pub mod init;
pub mod layer;
pub mod linear;
pub mod llama;
pub mod loader;
pub mod model;
pub mod params;
pub mod peft;
pub mod recompute;
pub mod tokenizer;
pub mod tuning;
pub mod weights;

pub use error::ModelError;
pub use layer::{Batch, Ctx, Flow, Layer, LossSum, IGNORE_INDEX};
pub use model::Model;
pub use params::{ParamLayout, ParamSpec};
pub use tuning::Tuning;
