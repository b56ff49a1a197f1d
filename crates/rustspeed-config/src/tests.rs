//! Resolution tests: DeepSpeed's own cases (REFERENCE §5 T1, T2, T9), one test per error class,
//! defaults, HF "auto", and the support table.

use crate::*;

fn opts(world: u64) -> ResolveOptions {
    ResolveOptions {
        world_size: WorldSize::flag(world),
        training_args: None,
    }
}

fn resolve_text(text: &str) -> Result<DsConfig, ConfigError> {
    resolve(&parse(text, "ds.json")?, &opts(1))
}

fn err(text: &str) -> ConfigError {
    resolve_text(text).expect_err("config should be refused")
}

/// Asserts the error is about `key` and its message says so.
fn assert_names(e: &ConfigError, key: &str) {
    let msg = e.to_string();
    assert_eq!(e.key(), Some(key), "{msg}");
    assert!(msg.contains(key), "{msg}");
    assert!(msg.starts_with("ds.json:"), "{msg}");
}

const BASE: &str = r#""train_batch_size": 8, "train_micro_batch_size_per_gpu": 8"#;

fn with(extra: &str) -> String {
    format!("{{{BASE}, {extra}}}")
}

#[test]
fn t1_batch_keys_through_the_whole_config() {
    let cfg = resolve(
        &parse(
            r#"{"train_batch_size": 32, "gradient_accumulation_steps": 2}"#,
            "t1.json",
        )
        .unwrap(),
        &opts(2),
    )
    .unwrap();
    assert_eq!(
        (
            cfg.train_batch_size(),
            cfg.micro_batch_size(),
            cfg.gradient_accumulation_steps()
        ),
        (32, 8, 2)
    );
    assert_eq!(cfg.batch.derived, vec!["train_micro_batch_size_per_gpu"]);
    let e = resolve(
        &parse(r#"{"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}"#, "t1.json").unwrap(),
        &opts(1),
    )
    .unwrap_err();
    assert!(matches!(e, ConfigError::Batch { .. }));
    assert!(e.to_string().contains("8 != 2 * 1 * 1"), "{e}");
}

#[test]
fn t2_gradient_allreduce_op() {
    assert_eq!(
        resolve_text(&with(r#""gradient_allreduce_op": "mean""#))
            .unwrap()
            .gradient_allreduce_op,
        AllreduceOp::Mean
    );
    assert_eq!(
        resolve_text(&with(r#""gradient_allreduce_op": "SUM""#))
            .unwrap()
            .gradient_allreduce_op,
        AllreduceOp::Sum
    );
    assert_eq!(
        resolve_text(&with("\"fp16\": {}"))
            .unwrap()
            .gradient_allreduce_op,
        AllreduceOp::Mean
    );
    let e = err(&with(r#""gradient_allreduce_op": "max""#));
    assert_names(&e, "gradient_allreduce_op");
    assert!(
        e.to_string().contains("Invalid gradient_allreduce_op"),
        "{e}"
    );
    let e = err(&with(
        r#""gradient_allreduce_op": "sum", "zero_optimization": {"stage": 3}"#,
    ));
    assert_names(&e, "gradient_allreduce_op");
    assert!(
        e.to_string().contains("not supported with ZeRO stage 3"),
        "{e}"
    );
}

#[test]
fn t2_gather_16bit_aliases_and_bfloat16() {
    for key in [
        "stage3_gather_16bit_weights_on_model_save",
        "stage3_gather_fp16_weights_on_model_save",
    ] {
        let cfg = resolve_text(&with(&format!(
            r#""zero_optimization": {{"stage": 3, "{key}": true}}"#
        )))
        .unwrap();
        assert!(
            cfg.zero_optimization.gather_16bit_weights_on_model_save,
            "{key}"
        );
    }
    for key in ["bf16", "bfloat16"] {
        let cfg = resolve_text(&with(&format!(r#""{key}": {{"enabled": true}}"#))).unwrap();
        assert_eq!(cfg.precision, Precision::Bf16, "{key}");
    }
}

#[test]
fn t9_allgather_bucket_size_alignment() {
    let ok = resolve_text(&with(
        r#""zero_optimization": {"stage": 2, "allgather_bucket_size": 1000}"#,
    ))
    .unwrap();
    assert_eq!(ok.zero_optimization.allgather_bucket_size, 1000);
    let e = err(&with(
        r#""zero_optimization": {"stage": 2, "allgather_bucket_size": 1001}"#,
    ));
    assert_names(&e, "zero_optimization.allgather_bucket_size");
    assert!(
        e.to_string()
            .contains("allgather_bucket_size must be a multiple of nccl_start_alignment_factor"),
        "{e}"
    );
}

#[test]
fn defaults_pinned_to_deepspeed_0_19() {
    let cfg = resolve_text(&format!("{{{BASE}}}")).unwrap();
    assert_eq!(cfg.gradient_clipping, 1.0);
    assert_eq!(cfg.steps_per_print, None);
    assert_eq!(cfg.precision, Precision::Fp32);
    assert_eq!(cfg.zero_stage(), 0);
    assert!(cfg.bf16.check_grad_overflow);
    assert_eq!(cfg.fp16.initial_loss_scale(), 65536.0);
    assert_eq!(cfg.checkpoint.tag_validation, TagValidation::Warn);
    for stage in 0..=3u8 {
        let cfg = resolve_text(&with(&format!(
            r#""zero_optimization": {{"stage": {stage}, "offload_optimizer": {{"device": "cpu"}}}}"#
        )))
        .unwrap();
        let z = &cfg.zero_optimization;
        assert_eq!(
            z.overlap_comm,
            stage == 3,
            "overlap_comm default for stage {stage}"
        );
        assert_eq!(
            (z.reduce_bucket_size, z.allgather_bucket_size),
            (500_000_000, 500_000_000)
        );
        assert!(z.offload_optimizer.as_ref().unwrap().pin_memory);
        assert_eq!(z.prefetch_bucket_size, 50_000_000);
        assert_eq!(z.param_persistence_threshold, 100_000);
    }
    let z = resolve_text(&with(
        r#""zero_optimization": {"stage": 3, "overlap_comm": false}"#,
    ))
    .unwrap()
    .zero_optimization;
    assert!(!z.overlap_comm);
}

#[test]
fn legacy_zero_optimization_true_is_stage_one() {
    let cfg = resolve_text(&with(r#""zero_optimization": true, "allgather_size": 2e8"#)).unwrap();
    assert_eq!(cfg.zero_stage(), 1);
    assert_eq!(cfg.zero_optimization.allgather_bucket_size, 200_000_000);
    assert_eq!(
        resolve_text(&with(r#""zero_optimization": false"#))
            .unwrap()
            .zero_stage(),
        0
    );
}

#[test]
fn adam_means_adamw_unless_adam_w_mode_false() {
    let adam = |params: &str, ty: &str| {
        let cfg = resolve_text(&with(&format!(
            r#""optimizer": {{"type": "{ty}", "params": {{{params}}}}}"#
        )))
        .unwrap();
        match cfg.optimizer.unwrap().optimizer {
            Optimizer::Adam(p) => p,
            other => panic!("{other:?}"),
        }
    };
    let p = adam("", "Adam");
    assert!(p.adam_w_mode);
    assert_eq!(
        (p.lr, p.betas, p.eps, p.weight_decay, p.bias_correction),
        (1e-3, [0.9, 0.999], 1e-8, 0.0, true)
    );
    assert!(!adam(r#""adam_w_mode": false"#, "adam").adam_w_mode);
    assert!(
        adam(r#""adam_w_mode": false"#, "ADAMW").adam_w_mode,
        "type adamw is always decoupled"
    );
    assert!(adam(r#""torch_adam": true, "lr": 2e-4"#, "AdamW").torch_adam);
}

#[test]
fn optimizer_params_are_checked_per_type() {
    let e = err(&with(
        r#""optimizer": {"type": "Adam", "params": {"lr": 1e-4, "momentum": 0.9}}"#,
    ));
    assert_names(&e, "optimizer.params.momentum");
    let e = err(&with(
        r#""optimizer": {"type": "Lion", "params": {"eps": 1e-8}}"#,
    ));
    assert_names(&e, "optimizer.params.eps");
    let cfg = resolve_text(&with(
        r#""optimizer": {"type": "sgd", "params": {"lr": 0.1, "momentum": 0.9}}"#,
    ))
    .unwrap();
    assert!(
        matches!(cfg.optimizer.unwrap().optimizer, Optimizer::Sgd(SgdParams { momentum, .. }) if momentum == 0.9)
    );
    let e = err(&with(r#""optimizer": {"type": "Adamm"}"#));
    assert_names(&e, "optimizer.type");
    assert!(e.to_string().contains("did you mean \"adam\"?"), "{e}");
    let e = err(&with(
        r#""optimizer": {"type": "sgd"}, "zero_optimization": {"stage": 1}"#,
    ));
    assert_names(&e, "optimizer.type");
    assert!(
        e.to_string().contains("zero_allow_untested_optimizer"),
        "{e}"
    );
    let e = err(&with(
        r#""optimizer": {"type": "adam", "params": {"betas": [0.9]}}"#,
    ));
    assert_names(&e, "optimizer.params.betas");
}

#[test]
fn scheduler_params_per_type() {
    let cfg = resolve_text(&with(r#""scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 100, "warmup_num_steps": 10}}"#)).unwrap();
    let s = cfg.scheduler.unwrap();
    match s.scheduler {
        Scheduler::WarmupDecayLR {
            warmup,
            total_num_steps,
        } => {
            assert_eq!(
                (
                    total_num_steps,
                    warmup.warmup_num_steps,
                    warmup.warmup_max_lr
                ),
                (100, 10, Some(0.001))
            );
        }
        other => panic!("{other:?}"),
    }
    let e = err(&with(
        r#""scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": -5}}"#,
    ));
    assert_names(&e, "scheduler.params.warmup_num_steps");
    let e = err(&with(
        r#""scheduler": {"type": "WarmupCosineLR", "params": {}}"#,
    ));
    assert_names(&e, "scheduler.params.total_num_steps");
    let e = err(&with(
        r#""scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.1, "cycle_max_lr": 1, "warmup_num_steps": 3}}"#,
    ));
    assert_names(&e, "scheduler.params.warmup_num_steps");
    let e = err(&with(r#""scheduler": {"type": "warmuplr"}"#));
    assert!(e.to_string().contains("did you mean \"WarmupLR\"?"), "{e}");
}

// One test per error class of issue 2 §2.

#[test]
fn error_duplicate_key() {
    let e = err("{\"train_batch_size\": 8,\n\"train_batch_size\": 16}");
    assert_names(&e, "train_batch_size");
    assert!(e.to_string().starts_with("ds.json:2:"), "{e}");
    assert!(e.to_string().contains("line 1"), "{e}");
}

#[test]
fn error_unknown_key_in_block_suggests_closest() {
    let e = err(&with(
        "\"zero_optimization\": {\"stage\": 2,\n \"reduce_bucket_sise\": 5e8}",
    ));
    assert_names(&e, "zero_optimization.reduce_bucket_sise");
    assert!(
        e.to_string().contains("did you mean `reduce_bucket_size`?"),
        "{e}"
    );
    assert!(e.to_string().starts_with("ds.json:2:"), "{e}");
}

#[test]
fn unknown_top_level_key_is_a_warning() {
    let cfg = resolve_text(&with(r#""train_batch_sise": 8, "my_own_key": 1"#)).unwrap();
    assert_eq!(cfg.warnings.len(), 2, "{:?}", cfg.warnings);
    assert!(
        cfg.warnings[0].contains("train_batch_sise")
            && cfg.warnings[0].contains("did you mean `train_batch_size`?")
    );
}

#[test]
fn error_wrong_type() {
    let e = err(&with(r#""fp16": {"enabled": "yes"}"#));
    assert_names(&e, "fp16.enabled");
    assert!(matches!(e, ConfigError::WrongType { .. }));
    let e = err(&with(r#""zero_optimization": {"reduce_bucket_size": 2.5}"#));
    assert_names(&e, "zero_optimization.reduce_bucket_size");
    let e = err(&with(r#""zero_optimization": ["stage", 2]"#));
    assert_names(&e, "zero_optimization");
}

#[test]
fn integer_sizes_written_as_floats() {
    let cfg = resolve_text(&with(r#""zero_optimization": {"stage": 2, "reduce_bucket_size": 2e8, "allgather_bucket_size": 5.0E8}"#)).unwrap();
    assert_eq!(cfg.zero_optimization.reduce_bucket_size, 200_000_000);
    assert_eq!(cfg.zero_optimization.allgather_bucket_size, 500_000_000);
}

#[test]
fn error_enum_value_lists_allowed() {
    let e = err(&with(
        "\"zero_optimization\": {\n\"stage\": 2,\n\"offload_optimizer\": {\"device\": \"gpu\"}}",
    ));
    let msg = e.to_string();
    assert!(
        msg.starts_with("ds.json:3: zero_optimization.offload_optimizer.device: expected one of \"none\", \"cpu\", \"nvme\", got \"gpu\""),
        "{msg}"
    );
}

#[test]
fn error_out_of_range() {
    let e = err(&with(r#""zero_optimization": {"reduce_bucket_size": -1}"#));
    assert_names(&e, "zero_optimization.reduce_bucket_size");
    let e = err(&with(r#""zero_optimization": {"stage": 4}"#));
    assert_names(&e, "zero_optimization.stage");
    assert!(
        e.to_string().contains("Maximum supported ZeRO stage is 3"),
        "{e}"
    );
    let e = err(&with(r#""fp16": {"enabled": true, "loss_scale": -1}"#));
    assert_names(&e, "fp16.loss_scale");
    let e = err(&with(r#""fp16": {"enabled": true, "loss_scale": true}"#));
    assert_names(&e, "fp16.loss_scale");
    let e = err(&with(
        r#""fp16": {"enabled": true, "loss_scale_window": 0}"#,
    ));
    assert_names(&e, "fp16.loss_scale_window");
    let e = err(&with(r#""fp16": {"enabled": true, "min_loss_scale": 0}"#));
    assert_names(&e, "fp16.min_loss_scale");
    assert!(resolve_text(&with(
        r#""fp16": {"enabled": true, "loss_scale": 128, "min_loss_scale": 0}"#
    ))
    .is_ok());
    let e = err(&with(r#""gradient_clipping": -1"#));
    assert_names(&e, "gradient_clipping");
    let e = err(&with(
        r#""zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 1.5}}"#,
    ));
    assert_names(&e, "zero_optimization.offload_optimizer.ratio");
}

#[test]
fn error_fp16_and_bf16_both_enabled() {
    let e = err(&with(
        r#""fp16": {"enabled": true}, "bf16": {"enabled": true}"#,
    ));
    assert_names(&e, "bf16.enabled");
    assert!(matches!(e, ConfigError::Conflict { .. }));
}

#[test]
fn error_pipeline_with_stage_two() {
    let e = err(&with(
        r#""pipeline": {"stages": 2}, "zero_optimization": {"stage": 2}"#,
    ));
    assert_names(&e, "zero_optimization.stage");
    assert!(
        e.to_string()
            .contains("incompatible with pipeline parallelism"),
        "{e}"
    );
    assert!(resolve_text(&with(
        r#""pipeline": {"stages": 2}, "zero_optimization": {"stage": 1}"#
    ))
    .is_ok());
}

#[test]
fn error_offload_param_and_partial_ratio_need_stage_three() {
    let e = err(&with(
        r#""zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}"#,
    ));
    assert_names(&e, "zero_optimization.offload_param.device");
    let e = err(&with(
        r#""zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}"#,
    ));
    assert_names(&e, "zero_optimization.offload_optimizer.ratio");
    assert!(
        e.to_string()
            .contains("Partial offloading only supported for ZeRO Stage 3"),
        "{e}"
    );
    assert!(resolve_text(&with(r#""zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}"#)).is_ok());
}

#[test]
fn error_elasticity_refused() {
    let e = err(&with(
        r#""elasticity": {"enabled": true, "max_train_batch_size": 64}"#,
    ));
    assert_names(&e, "elasticity");
    assert!(e.to_string().contains("not supported yet"), "{e}");
}

#[test]
fn error_alias_disagreement() {
    let e = err(&with(
        r#""zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": 10, "prefetch_bucket_size": 20}"#,
    ));
    assert_names(&e, "zero_optimization.prefetch_bucket_size");
}

// HF "auto".

const AUTO: &str = r#"{
  "train_batch_size": "auto",
  "train_micro_batch_size_per_gpu": "auto",
  "gradient_accumulation_steps": "auto",
  "gradient_clipping": "auto",
  "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
  "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto", "warmup_num_steps": "auto", "total_num_steps": "auto"}},
  "bf16": {"enabled": "auto"},
  "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"}
}"#;

fn hf_args() -> TrainingArgs {
    TrainingArgs {
        per_device_train_batch_size: Some(4),
        gradient_accumulation_steps: Some(2),
        learning_rate: Some(5e-5),
        adam_beta1: Some(0.9),
        adam_beta2: Some(0.95),
        adam_epsilon: Some(1e-6),
        weight_decay: Some(0.1),
        max_grad_norm: Some(0.5),
        warmup_steps: None,
        warmup_ratio: Some(0.1),
        max_steps: Some(1000),
        fp16: Some(false),
        bf16: Some(true),
        hidden_size: Some(64),
        hf_defaults: false,
    }
}

/// Unset arguments fill "auto" with TrainingArguments' defaults, and never contradict an
/// explicit value (HF would compare its defaults too; rustspeed only checks given flags).
#[test]
fn hf_defaults_fill_auto_but_never_contradict() {
    let json = r#"{
  "train_micro_batch_size_per_gpu": 2,
  "train_batch_size": "auto",
  "gradient_clipping": "auto",
  "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "weight_decay": "auto", "betas": "auto", "eps": "auto"}},
  "bf16": {"enabled": "auto"}
}"#;
    let raw = parse(json, "ds.json").unwrap();
    let args = TrainingArgs {
        max_steps: Some(10),
        hf_defaults: true,
        ..TrainingArgs::default()
    };
    let cfg = resolve(
        &raw,
        &ResolveOptions {
            world_size: WorldSize::flag(1),
            training_args: Some(args),
        },
    )
    .unwrap();
    assert_eq!((cfg.train_batch_size(), cfg.micro_batch_size()), (2, 2));
    assert_eq!(cfg.gradient_clipping, 1.0);
    assert_eq!(cfg.precision, Precision::Fp32);
    match cfg.optimizer.as_ref().unwrap().optimizer {
        Optimizer::Adam(ref p) => assert_eq!(
            (p.lr, p.betas, p.eps, p.weight_decay),
            (3e-4, [0.9, 0.999], 1e-8, 0.0)
        ),
        ref other => panic!("{other:?}"),
    }
}

#[test]
fn auto_filled_like_hf_trainer() {
    let raw = parse(AUTO, "ds.json").unwrap();
    let cfg = resolve(
        &raw,
        &ResolveOptions {
            world_size: WorldSize::flag(2),
            training_args: Some(hf_args()),
        },
    )
    .unwrap();
    assert_eq!(
        (
            cfg.train_batch_size(),
            cfg.micro_batch_size(),
            cfg.gradient_accumulation_steps()
        ),
        (16, 4, 2)
    );
    assert_eq!(cfg.gradient_clipping, 0.5);
    assert_eq!(cfg.precision, Precision::Bf16);
    match cfg.optimizer.as_ref().unwrap().optimizer {
        Optimizer::Adam(ref p) => assert_eq!(
            (p.lr, p.betas, p.eps, p.weight_decay),
            (5e-5, [0.9, 0.95], 1e-6, 0.1)
        ),
        ref other => panic!("{other:?}"),
    }
    match cfg.scheduler.as_ref().unwrap().scheduler {
        Scheduler::WarmupDecayLR {
            ref warmup,
            total_num_steps,
        } => {
            assert_eq!(
                (
                    warmup.warmup_min_lr,
                    warmup.warmup_max_lr,
                    warmup.warmup_num_steps,
                    total_num_steps
                ),
                (0.0, Some(5e-5), 100, 1000)
            );
        }
        ref other => panic!("{other:?}"),
    }
    let z = &cfg.zero_optimization;
    assert_eq!(
        (
            z.reduce_bucket_size,
            z.prefetch_bucket_size,
            z.param_persistence_threshold
        ),
        (4096, 3686, 640)
    );
}

#[test]
fn auto_unresolved_names_the_flag() {
    let e = resolve_text(r#"{"train_batch_size": 8, "train_micro_batch_size_per_gpu": "auto"}"#)
        .unwrap_err();
    assert_names(&e, "train_micro_batch_size_per_gpu");
    assert!(
        e.to_string().contains("--per-device-train-batch-size"),
        "{e}"
    );
    let e = resolve_text(&with(
        r#""optimizer": {"type": "adam", "params": {"lr": "auto"}}"#,
    ))
    .unwrap_err();
    assert!(e.to_string().contains("--learning-rate"), "{e}");
    let e = resolve_text(&with(r#""steps_per_print": "auto""#)).unwrap_err();
    assert!(matches!(e, ConfigError::UnresolvedAuto { .. }), "{e}");
    let args = TrainingArgs {
        learning_rate: Some(1e-4),
        ..TrainingArgs::default()
    };
    let raw = parse(r#"{"train_batch_size": 8, "optimizer": {"type": "adam", "params": {"lr": "auto", "eps": "auto"}}}"#, "ds.json").unwrap();
    let e = resolve(
        &raw,
        &ResolveOptions {
            world_size: WorldSize::flag(1),
            training_args: Some(args),
        },
    )
    .unwrap_err();
    assert_names(&e, "optimizer.params.eps");
    assert!(e.to_string().contains("--adam-epsilon"), "{e}");
}

#[test]
fn auto_mismatch_names_both() {
    let raw = parse(
        r#"{"train_batch_size": 8, "optimizer": {"type": "adam", "params": {"lr": 3e-4}}}"#,
        "ds.json",
    )
    .unwrap();
    let args = TrainingArgs {
        learning_rate: Some(1e-4),
        ..TrainingArgs::default()
    };
    let e = resolve(
        &raw,
        &ResolveOptions {
            world_size: WorldSize::flag(1),
            training_args: Some(args.clone()),
        },
    )
    .unwrap_err();
    assert_names(&e, "optimizer.params.lr");
    let msg = e.to_string();
    assert!(msg.contains("0.0003") || msg.contains("3e-4"), "{msg}");
    assert!(
        msg.contains("--learning-rate") && msg.contains("0.0001"),
        "{msg}"
    );
    let raw = parse(
        r#"{"train_batch_size": 8, "optimizer": {"type": "adam", "params": {"lr": 1e-4}}}"#,
        "ds.json",
    )
    .unwrap();
    assert!(resolve(
        &raw,
        &ResolveOptions {
            world_size: WorldSize::flag(1),
            training_args: Some(args)
        }
    )
    .is_ok());
}

// Support status.

#[test]
fn unsupported_keys_are_those_set_to_non_defaults() {
    let cfg = resolve_text(&with(
        r#"
        "fp16": {"enabled": true, "loss_scale_window": 100},
        "memory_breakdown": false,
        "tensorboard": {"enabled": false, "output_path": "/tmp/tb"},
        "wandb": {"enabled": true},
        "zero_optimization": {"stage": 3, "zero_quantized_weights": true,
            "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"},
            "offload_param": {"device": "none"}},
        "sparse_attention": {"mode": "fixed"},
        "autotuning": {"enabled": false},
        "curriculum_learning": {"enabled": true}"#,
    ))
    .unwrap();
    let mut got = cfg.unsupported_keys();
    got.sort();
    assert_eq!(
        got,
        vec![
            "curriculum_learning",
            "wandb.enabled",
            "zero_optimization.offload_optimizer.device",
            "zero_optimization.offload_optimizer.nvme_path",
            "zero_optimization.zero_quantized_weights",
        ]
    );
    let planned = cfg.planned_keys();
    // Stages 0-2 run over ranks (issue 6); stage 3 is refused by the engine, not the table.
    assert!(!planned.iter().any(|(k, _)| k == "zero_optimization.stage"));
    // fp16 loss scaling is implemented by the engine (issue 4): neither planned nor refused.
    assert!(!planned.iter().any(|(k, _)| k == "fp16.loss_scale_window"));
    let cfg = resolve_text(&with(
        r#""optimizer": {"type": "OneBitAdam", "params": {"freeze_step": 10}}"#,
    ))
    .unwrap();
    assert_eq!(cfg.unsupported_keys(), vec!["optimizer.type"]);
}

#[test]
fn every_key_read_is_in_the_table() {
    let everything = r#"{
      "train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
      "optimizer": {"type": "adam", "legacy_fusion": false, "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
         "weight_decay": 0, "bias_correction": true, "adam_w_mode": true, "torch_adam": false, "amsgrad": false}},
      "scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0, "cycle_max_lr": 1, "decay_lr_rate": 0,
         "cycle_first_step_size": 10, "cycle_second_step_size": 10, "cycle_first_stair_count": 0,
         "cycle_second_stair_count": 0, "decay_step_size": 0, "cycle_momentum": true, "cycle_min_mom": 0.8,
         "cycle_max_mom": 0.9, "decay_mom_rate": 0, "last_batch_iteration": -1}},
      "fp16": {"enabled": false, "auto_cast": false, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
         "hysteresis": 2, "consecutive_hysteresis": false, "min_loss_scale": 1, "fp16_master_weights_and_grads": false},
      "bfloat16": {"enabled": false, "immediate_grad_update": false, "check_grad_overflow": true,
         "bf16_master_weights_and_grads": false, "bf16_optimizer_states": false},
      "zero_optimization": {"stage": 1, "contiguous_gradients": true, "reduce_scatter": true, "reduce_bucket_size": 5e8,
         "use_multi_rank_bucket_allreduce": true, "allgather_partitions": true, "allgather_bucket_size": 5e8,
         "overlap_comm": false, "load_from_fp32_weights": true, "elastic_checkpoint": false, "sub_group_size": 1e9,
         "prefetch_bucket_size": 5e7, "param_persistence_threshold": 1e5, "model_persistence_threshold": 1e9,
         "max_live_parameters": 1e9, "max_reuse_distance": 1e9, "gather_16bit_weights_on_model_save": false,
         "stage3_gather_fp16_weights_on_model_save": false, "module_granularity_threshold": 0,
         "use_all_reduce_for_fetch_params": false, "allgather_sequential": false, "ignore_unused_parameters": true,
         "legacy_stage1": false, "round_robin_gradients": false, "zero_hpz_partition_size": 1,
         "zero_quantized_weights": false, "zero_quantized_nontrainable_weights": false, "zero_quantized_gradients": false,
         "mics_shard_size": -1, "mics_hierarchical_params_gather": false, "memory_efficient_linear": true,
         "pipeline_loading_checkpoint": false, "override_module_apply": true, "log_trace_cache_warnings": false,
         "enable_sanity_checks": false, "cpu_offload": false, "cpu_offload_param": false, "cpu_offload_use_pin_memory": true,
         "offload_optimizer": {"device": "cpu", "nvme_path": null, "buffer_count": 4, "pin_memory": true, "pipeline_read": false,
            "pipeline_write": false, "fast_init": false, "ratio": 1.0, "super_offload": false, "cpuadam_cores_perc": 0.8}},
      "gradient_clipping": 1.0, "steps_per_print": 10, "wall_clock_breakdown": false, "memory_breakdown": false,
      "dump_state": false, "prescale_gradients": false, "gradient_predivide_factor": 1.0, "gradient_allreduce_op": "mean",
      "communication_data_type": null, "seq_parallel_communication_data_type": "fp32", "sparse_gradients": false,
      "zero_allow_untested_optimizer": false, "zero_force_ds_cpu_optimizer": true, "dataloader_drop_last": false,
      "managed_gradient_accumulation": true, "sequence_parallel_size": 1, "disable_allgather": false,
      "use_data_before_expert_parallelism": false,
      "activation_checkpointing": {"partition_activations": false, "contiguous_memory_optimization": false,
         "cpu_checkpointing": false, "number_checkpoints": null, "synchronize_checkpoint_boundary": false, "profile": false},
      "pipeline": {"stages": "auto", "partition": "best", "seed_layers": false, "activation_checkpoint_interval": 0,
         "pipe_partitioned": true, "grad_partitioned": true},
      "sparse_attention": {"mode": "fixed", "block": 16, "different_layout_per_head": false, "num_local_blocks": 4,
         "num_global_blocks": 1, "attention": "bidirectional", "horizontal_global_attention": false,
         "num_different_global_patterns": 1, "num_random_blocks": 0, "local_window_blocks": [4],
         "global_block_indices": [0], "global_block_end_indices": null, "num_sliding_window_blocks": 3},
      "aio": {"block_size": 1048576, "queue_depth": 8, "thread_count": 1, "single_submit": false, "overlap_events": true, "use_gds": false},
      "checkpoint": {"tag_validation": "fail", "load_universal": false, "use_node_local_storage": false, "parallel_write": {"pipeline_stage": false}},
      "data_types": {"grad_accum_dtype": "fp32", "param_dtype": null},
      "tensorboard": {"enabled": false, "output_path": "", "job_name": "x"},
      "csv_monitor": {"enabled": false, "output_path": "", "job_name": "x"},
      "wandb": {"enabled": false, "group": null, "team": null, "project": "p"},
      "flops_profiler": {"enabled": false, "recompute_fwd_factor": 0.0, "profile_step": 1, "module_depth": -1,
         "top_modules": 1, "detailed": true, "output_file": null},
      "comms_logger": {"enabled": false, "verbose": false, "prof_all": true, "debug": false, "prof_ops": []},
      "compression_training": {"weight_quantization": {"shared_parameters": {}}},
      "elasticity": {"enabled": false}, "comet": {"enabled": false}
    }"#;
    let cfg = resolve_text(everything).unwrap();
    assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
    assert_eq!(cfg.checkpoint.tag_validation, TagValidation::Fail);
    let missing: Vec<&str> = cfg
        .set_keys
        .iter()
        .map(|s| s.path.as_str())
        .filter(|p| {
            table::lookup(p).is_none()
                && !p.starts_with("compression_training.")
                && !p.starts_with("elasticity.")
                && !p.starts_with("comet.")
        })
        .collect();
    assert!(
        missing.is_empty(),
        "keys read but missing from the table: {missing:?}"
    );
    assert!(
        cfg.unsupported_keys().is_empty() || cfg.unsupported_keys() == vec!["compression_training"],
        "{:?}",
        cfg.unsupported_keys()
    );
}

#[test]
fn docs_list_every_key_of_the_table() {
    let doc = include_str!("../../../docs/CONFIG.md");
    let missing: Vec<&str> = table::KEYS
        .iter()
        .map(|k| k.path)
        .filter(|p| !doc.contains(&format!("`{p}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/CONFIG.md lacks {missing:?}; paste table::markdown_table() into it"
    );
    for k in table::KEYS {
        let row = doc
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", k.path)))
            .unwrap();
        assert!(
            row.contains(&k.status.label()),
            "docs/CONFIG.md has a stale status for {}",
            k.path
        );
        assert!(
            row.contains(&format!("`{}`", k.default)),
            "docs/CONFIG.md has a stale default for {}",
            k.path
        );
    }
}

#[test]
fn to_json_round_trips_resolved_values() {
    let cfg = resolve_text(&with(
        r#""fp16": {"enabled": true}, "zero_optimization": {"stage": 2}"#,
    ))
    .unwrap();
    let j = cfg.to_json();
    assert_eq!(j["precision"], "fp16");
    assert_eq!(j["zero_optimization"]["stage"], 2);
    assert_eq!(j["batch"]["train_batch_size"], 8);
    assert_eq!(j["gradient_clipping"], 1.0);
}

#[test]
fn load_reports_missing_file_and_accepts_base64() {
    let e = load(std::path::Path::new("/nonexistent/ds_config.json")).unwrap_err();
    assert!(matches!(e, ConfigError::NotFound { .. }));
    assert!(e.to_string().contains("/nonexistent/ds_config.json"), "{e}");
    // urlsafe base64 of {"train_batch_size": 4}
    let raw = load(std::path::Path::new("eyJ0cmFpbl9iYXRjaF9zaXplIjogNH0=")).unwrap();
    assert_eq!(resolve(&raw, &opts(1)).unwrap().train_batch_size(), 4);
}
