//! `rustspeed estimate`: DeepSpeed's ZeRO memory estimators and rustspeed's own per-rank figures.

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    Err(crate::exit::UsageError("not supported yet: estimate".into()).into())
}
