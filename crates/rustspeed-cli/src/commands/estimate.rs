//! `rustspeed estimate`: DeepSpeed's ZeRO memory estimators and rustspeed's own per-rank figures.

use std::path::PathBuf;

use rustspeed::memory::{
    self, DType, EstimateRow, MemorySetup, ModelStateBytes, OptimizerKind, DEFAULT_BUFFER_FACTOR,
    GIB,
};
use rustspeed_models::hf_config::ModelConfig;
use serde_json::json;

use crate::exit::UsageError;

#[derive(clap::Args)]
pub struct Args {
    /// ZeRO stage whose DeepSpeed table to print: 2 or 3.
    #[arg(long)]
    pub stage: Option<u8>,
    /// Total parameters (`1.5e9` or `1500000000`).
    #[arg(long, conflicts_with = "model")]
    pub params: Option<String>,
    /// Parameters of the largest layer (module), needed for stage 3 with --params.
    #[arg(long, conflicts_with = "model")]
    pub largest_layer_params: Option<String>,
    /// HF model directory (or its config.json): parameters are counted from the config.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    pub gpus_per_node: u64,
    #[arg(long, default_value_t = 1)]
    pub nodes: u64,
    /// Compute dtype for rustspeed's own figures.
    #[arg(long, value_enum, default_value_t = ComputeDtype::Bf16)]
    pub dtype: ComputeDtype,
    /// Optimizer for rustspeed's own figures (sets the number of fp32 states per parameter).
    #[arg(long, value_enum, default_value_t = Optimizer::Adamw)]
    pub optimizer: Optimizer,
    /// Print one JSON object on stdout instead of the tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum ComputeDtype {
    F32,
    Bf16,
    Fp16,
}

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Optimizer {
    Adam,
    Adamw,
    Lamb,
    Sgd,
    SgdMomentum,
    Lion,
    Adagrad,
}

impl Optimizer {
    fn name(self) -> &'static str {
        match self {
            Optimizer::Adam => "adam",
            Optimizer::Adamw => "adamw",
            Optimizer::Lamb => "lamb",
            Optimizer::Sgd => "sgd",
            Optimizer::SgdMomentum => "sgd-momentum",
            Optimizer::Lion => "lion",
            Optimizer::Adagrad => "adagrad",
        }
    }

    fn kind(self) -> OptimizerKind {
        match self {
            Optimizer::Adam | Optimizer::Adamw => OptimizerKind::AdamW,
            Optimizer::Lamb => OptimizerKind::Lamb,
            Optimizer::Sgd => OptimizerKind::Sgd,
            Optimizer::SgdMomentum => OptimizerKind::SgdMomentum,
            Optimizer::Lion => OptimizerKind::Lion,
            Optimizer::Adagrad => OptimizerKind::Adagrad,
        }
    }
}

/// The model as the estimators see it.
struct ModelSize {
    total: u64,
    largest_layer: Option<u64>,
    /// Trainable tensor sizes in model order, for rustspeed's per-parameter stage-3 padding.
    tensors: Vec<u64>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let stage = match args.stage {
        Some(s @ (2 | 3)) => s,
        Some(s) => {
            return Err(UsageError(format!(
                "--stage {s}: DeepSpeed's estimators exist for stages 2 and 3; use --stage 2 or --stage 3"
            ))
            .into())
        }
        None => return Err(UsageError("add --stage 2 or --stage 3".into()).into()),
    };
    if args.gpus_per_node == 0 || args.nodes == 0 {
        return Err(UsageError("--gpus-per-node and --nodes must be at least 1".into()).into());
    }
    let size = model_size(&args, stage)?;
    let rows = match stage {
        2 => memory::zero2_all_cold_rows(
            size.total,
            args.gpus_per_node,
            args.nodes,
            DEFAULT_BUFFER_FACTOR,
        ),
        _ => memory::zero3_all_cold_rows(
            size.total,
            size.largest_layer.unwrap_or(0),
            args.gpus_per_node,
            args.nodes,
            DEFAULT_BUFFER_FACTOR,
        ),
    };
    let world_size = args.gpus_per_node * args.nodes;
    let dtype = match args.dtype {
        ComputeDtype::F32 => DType::F32,
        ComputeDtype::Bf16 => DType::BF16,
        ComputeDtype::Fp16 => DType::F16,
    };
    let states = args.optimizer.kind().fp32_states_per_param();
    let own: Vec<ModelStateBytes> = (0..=3)
        .map(|stage| {
            let setup = MemorySetup {
                world_size,
                stage,
                compute_dtype: dtype,
                optimizer_states: states,
                // DeepSpeed's default stage3_param_persistence_threshold (1e5), no model cap:
                // what the engine keeps whole with a config that does not set them.
                stage3_persistent: memory::zero3_persistent_numel(&size.tensors, 100_000, u64::MAX),
            };
            memory::model_state_bytes(&size.tensors, &[], &setup)
        })
        .collect::<Result<_, _>>()?;

    if args.json {
        let own_json: Vec<_> = own
            .iter()
            .enumerate()
            .map(|(stage, b)| {
                json!({
                    "stage": stage,
                    "weights_bytes": b.weights,
                    "grads_bytes": b.grads,
                    "master_bytes": b.master,
                    "optimizer_bytes": b.optimizer,
                    "total_bytes": b.total,
                })
            })
            .collect();
        let out = json!({
            "stage": stage,
            "params": size.total,
            "largest_layer_params": size.largest_layer,
            "gpus_per_node": args.gpus_per_node,
            "nodes": args.nodes,
            "rows": rows.iter().map(row_json).collect::<Vec<_>>(),
            "rustspeed": {
                "world_size": world_size,
                "dtype": dtype.name(),
                "optimizer": args.optimizer.name(),
                "optimizer_states_per_param": states,
                "stages": own_json,
            },
        });
        println!("{out}");
        return Ok(());
    }

    let table = match stage {
        2 => memory::format_zero2_table(size.total, args.gpus_per_node, args.nodes, &rows),
        _ => memory::format_zero3_table(
            size.total,
            size.largest_layer.unwrap_or(0),
            args.gpus_per_node,
            args.nodes,
            &rows,
        ),
    };
    print!("{table}");
    println!();
    println!(
        "rustspeed model states per rank (world size {world_size}, {} compute, {}: {states} fp32 state(s)/param; activations not included):",
        dtype.name(),
        args.optimizer.name()
    );
    println!(" stage |  weights |    grads |   master | optimizer |    total");
    for (stage, b) in own.iter().enumerate() {
        println!(
            " {stage:>5} | {} | {} | {} | {:>9} | {}",
            gb(b.weights),
            gb(b.grads),
            gb(b.master),
            gb(b.optimizer),
            gb(b.total)
        );
    }
    Ok(())
}

fn row_json(row: &EstimateRow) -> serde_json::Value {
    json!({
        "offload_optimizer": row.offload_optimizer,
        "offload_param": row.offload_param,
        "zero_init": row.zero_init,
        "cpu_bytes": row.cpu_bytes,
        "gpu_bytes": row.gpu_bytes,
    })
}

fn gb(bytes: u64) -> String {
    format!("{:6.2}GB", bytes as f64 / GIB)
}

fn model_size(args: &Args, stage: u8) -> anyhow::Result<ModelSize> {
    if let Some(path) = &args.model {
        let config = ModelConfig::from_path(path)?;
        let tensors = config
            .param_shapes()
            .iter()
            .map(|(_, shape)| shape.iter().map(|&d| d as u64).product())
            .collect();
        return Ok(ModelSize {
            total: config.num_parameters(),
            largest_layer: Some(config.largest_layer_params()),
            tensors,
        });
    }
    let Some(params) = &args.params else {
        return Err(UsageError(
            "add --params N (the total parameter count, e.g. 1.5e9) or --model DIR (an HF model directory)"
                .into(),
        )
        .into());
    };
    let total = parse_count("--params", params)?;
    let largest_layer = match &args.largest_layer_params {
        Some(l) => Some(parse_count("--largest-layer-params", l)?),
        None if stage == 3 => {
            return Err(UsageError(
                "add --largest-layer-params N: the ZeRO-3 estimate needs the parameter count of the largest layer"
                    .into(),
            )
            .into())
        }
        None => None,
    };
    // Without a model, rustspeed's figures treat it as one flat tensor.
    Ok(ModelSize {
        total,
        largest_layer,
        tensors: vec![total],
    })
}

/// A parameter count written as an integer or in float notation (`1.5e9`), which must be whole.
fn parse_count(flag: &str, text: &str) -> Result<u64, UsageError> {
    let bad = || {
        UsageError(format!(
            "{flag} {text}: expected a whole, non-negative number of parameters such as 124439808 or 1.5e9"
        ))
    };
    if let Ok(n) = text.parse::<u64>() {
        return Ok(n);
    }
    let x: f64 = text.parse().map_err(|_| bad())?;
    // Up to 2^53 every whole number is exact in f64; beyond, the written value was not exact.
    if !(x.is_finite() && x >= 0.0 && x.fract() == 0.0 && x <= 9_007_199_254_740_992.0) {
        return Err(bad());
    }
    Ok(x as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_count;

    #[test]
    fn counts_accept_integers_and_float_notation() {
        assert_eq!(parse_count("--params", "124439808").unwrap(), 124_439_808);
        assert_eq!(parse_count("--params", "1.5e9").unwrap(), 1_500_000_000);
        assert_eq!(parse_count("--params", "2851e6").unwrap(), 2_851_000_000);
        for bad in ["1.5", "-3", "abc", "1e300", "inf"] {
            let msg = parse_count("--params", bad).unwrap_err().0;
            assert!(msg.contains(&format!("--params {bad}")), "{msg}");
        }
    }
}
