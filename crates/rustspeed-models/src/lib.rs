//! The layer protocol, GPT-2 and the LLaMA family, and HF formats.

pub mod hf_config;
