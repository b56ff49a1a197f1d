//! `rustspeed config check`: validate a ds_config.json and print the resolved values.

use std::path::PathBuf;

use rustspeed_config::{DsConfig, Optimizer, ResolveOptions, WorldSize, WorldSizeSource};
use serde_json::json;

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

pub fn run(args: Args) -> anyhow::Result<()> {
    let world_size = WorldSize::from_flag_or_env(args.world_size)?;
    let raw = rustspeed_config::load(&args.file)?;
    let cfg = rustspeed_config::resolve(
        &raw,
        &ResolveOptions {
            world_size,
            training_args: None,
        },
    )?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary_json(&cfg))?);
    } else {
        print!("{}", summary_text(&args.file, &cfg));
    }
    Ok(())
}

fn source_json(source: &WorldSizeSource) -> serde_json::Value {
    match source {
        WorldSizeSource::Flag => json!("flag"),
        WorldSizeSource::LauncherEnv(var) => json!(format!("env:{var}")),
        WorldSizeSource::Default => json!("default"),
    }
}

fn optimizer_json(cfg: &DsConfig) -> serde_json::Value {
    let Some(opt) = &cfg.optimizer else {
        return serde_json::Value::Null;
    };
    let mut value = serde_json::to_value(&opt.optimizer).unwrap_or_default();
    if let Some(obj) = value.as_object_mut() {
        obj.remove("kind");
        obj.insert("type".into(), json!(opt.type_name));
    }
    value
}

fn summary_json(cfg: &DsConfig) -> serde_json::Value {
    let z = &cfg.zero_optimization;
    json!({
        "train_batch_size": cfg.train_batch_size(),
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size(),
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps(),
        "derived": cfg.batch.derived,
        "world_size": cfg.batch.world_size.value,
        "world_size_source": source_json(&cfg.batch.world_size.source),
        "zero_stage": cfg.zero_stage(),
        "precision": cfg.precision.as_str(),
        "offload_optimizer": z.offload_optimizer_device(),
        "offload_param": z.offload_param_device(),
        "optimizer": optimizer_json(cfg),
        "scheduler": cfg.scheduler,
        "gradient_clipping": cfg.gradient_clipping,
        "warnings": cfg.warnings,
        "unsupported_keys": cfg.unsupported_keys(),
        "resolved": cfg.to_json(),
    })
}

fn summary_text(file: &std::path::Path, cfg: &DsConfig) -> String {
    let b = &cfg.batch;
    let mark = |key: &str| {
        if b.derived.contains(&key) {
            " (derived)"
        } else {
            ""
        }
    };
    let z = &cfg.zero_optimization;
    let mut out = format!("{}: valid DeepSpeed config\n", file.display());
    out += &format!(
        "  batch:        train_batch_size {}{} = micro {}{} x accumulation {}{} x world {}\n",
        b.train_batch_size,
        mark("train_batch_size"),
        b.train_micro_batch_size_per_gpu,
        mark("train_micro_batch_size_per_gpu"),
        b.gradient_accumulation_steps,
        mark("gradient_accumulation_steps"),
        b.world_size.value
    );
    out += &format!(
        "  world size:   {} from {}\n",
        b.world_size.value, b.world_size.source
    );
    out += &format!("  precision:    {}", cfg.precision.as_str());
    if cfg.fp16.enabled {
        if cfg.fp16.dynamic_loss_scale() {
            out += &format!(
                " (dynamic loss scale from 2^{}, window {}, hysteresis {}, min {})",
                cfg.fp16.initial_scale_power,
                cfg.fp16.loss_scale_window,
                cfg.fp16.hysteresis,
                cfg.fp16.min_loss_scale
            );
        } else {
            out += &format!(" (static loss scale {})", cfg.fp16.loss_scale);
        }
    }
    out += "\n";
    out += &format!(
        "  ZeRO:         stage {}, offload optimizer {}, offload params {}, overlap_comm {}, \
         reduce bucket {}, allgather bucket {}\n",
        z.stage,
        device_name(z.offload_optimizer_device()),
        device_name(z.offload_param_device()),
        z.overlap_comm,
        z.reduce_bucket_size,
        z.allgather_bucket_size
    );
    out += "  optimizer:    ";
    out += &match &cfg.optimizer {
        None => "none in the config (the training code supplies one)".to_string(),
        Some(opt) => match &opt.optimizer {
            Optimizer::Adam(p) => format!(
                "{} ({} mode) lr {} betas [{}, {}] eps {} weight_decay {} bias_correction {}",
                opt.type_name,
                if p.adam_w_mode {
                    "AdamW, decoupled weight decay"
                } else {
                    "Adam, L2 weight decay"
                },
                p.lr,
                p.betas[0],
                p.betas[1],
                p.eps,
                p.weight_decay,
                p.bias_correction
            ),
            other => format!(
                "{} {}",
                opt.type_name,
                serde_json::to_string(other).unwrap_or_default()
            ),
        },
    };
    out += "\n";
    out += &format!(
        "  scheduler:    {}\n",
        cfg.scheduler
            .as_ref()
            .map_or("none".to_string(), |s| format!(
                "{} {}",
                s.type_name(),
                serde_json::to_string(&s.scheduler).unwrap_or_default()
            ))
    );
    out += &format!(
        "  clipping:     {}\n",
        if cfg.gradient_clipping > 0.0 {
            format!("global norm {}", cfg.gradient_clipping)
        } else {
            "off".into()
        }
    );
    for w in &cfg.warnings {
        out += &format!("  warning:      {w}\n");
    }
    for key in cfg.unsupported_keys() {
        out += &format!("  not supported yet: {key}\n");
    }
    out
}

fn device_name(d: rustspeed_config::OffloadDevice) -> &'static str {
    match d {
        rustspeed_config::OffloadDevice::None => "none",
        rustspeed_config::OffloadDevice::Cpu => "cpu",
        rustspeed_config::OffloadDevice::Nvme => "nvme",
    }
}
