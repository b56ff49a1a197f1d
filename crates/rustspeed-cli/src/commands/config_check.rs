//! `rustspeed config check`: validate a ds_config.json and print the resolved values.

use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Path to the DeepSpeed config (ds_config.json).
    pub file: PathBuf,
    /// Data-parallel world size for the batch-size arithmetic (default: launcher environment, else 1).
    #[arg(long)]
    pub world_size: Option<u64>,
    /// Print one JSON object on stdout instead of the human summary.
    #[arg(long)]
    pub json: bool,
}

pub fn run(_args: Args) -> anyhow::Result<()> {
    Err(crate::exit::UsageError("not supported yet: config check".into()).into())
}
