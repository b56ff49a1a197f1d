//! The rustspeed engine: DeepSpeed's training engine for explicit layers on flat buffers.

pub mod checkpoint;
pub mod consolidate;
pub mod engine;
pub mod loss_scaler;
pub mod lr_schedule;
pub mod memory;
pub mod optimizer;
pub mod precision;
pub mod rss;
