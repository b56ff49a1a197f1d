//! The rustspeed engine: DeepSpeed's training engine for explicit layers on flat buffers.

pub mod loss_scaler;
pub mod lr_schedule;
pub mod memory;
