//! The `rustspeed` command: DeepSpeed's engine and tools in one binary.

mod commands;
mod exit;
mod logging;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rustspeed",
    version,
    about = "DeepSpeed, rebuilt in Rust: ZeRO training, fine-tuning and tools driven by ds_config.json"
)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace). RUSTSPEED_LOG=<filter> overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with DeepSpeed config files (ds_config.json).
    #[command(subcommand)]
    Config(ConfigCommand),
    /// DeepSpeed's ZeRO memory estimators, plus rustspeed's own per-rank model-state bytes.
    Estimate(commands::estimate::Args),
    /// Causal-LM loss and perplexity of a model (HF directory or .gguf) on a text file.
    Eval(commands::eval::Args),
    /// Start N ranks of a program (like torchrun/deepspeed): local, or mpirun/srun/ssh across nodes.
    Launch(commands::launch::Args),
    /// Fold a PEFT LoRA adapter into its base model and write a plain HF model directory.
    MergeLora(commands::merge_lora::Args),
    /// Fine-tune a model on a data file with a DeepSpeed config (HF Trainer-style flags).
    Train(Box<commands::train::Args>),
    /// Consolidate a ZeRO checkpoint (any world size and stage) into HF fp32/bf16 safetensors.
    ZeroToFp32(commands::zero_to_fp32::Args),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a ds_config.json and print the resolved values.
    Check(commands::config_check::Args),
}

fn main() {
    rustspeed_kernels::alloc::retain_freed_memory();
    let cli = Cli::parse();
    logging::init(cli.verbose);
    let result = match cli.command {
        Command::Config(ConfigCommand::Check(args)) => commands::config_check::run(args),
        Command::Estimate(args) => commands::estimate::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Launch(args) => commands::launch::run(args),
        Command::MergeLora(args) => commands::merge_lora::run(args),
        Command::Train(args) => commands::train::run(*args),
        Command::ZeroToFp32(args) => commands::zero_to_fp32::run(args),
    };
    if let Err(err) = result {
        std::process::exit(exit::report(&err));
    }
}
