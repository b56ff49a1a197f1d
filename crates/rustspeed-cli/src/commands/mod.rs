//! One module per subcommand.

pub mod config_check;
pub mod estimate;
pub mod eval;
pub mod launch;
pub mod merge_lora;
pub mod quantize;
pub mod train;
pub mod zero_to_fp32;
