//! `rustspeed config check` on every seed config of ../shared/configs, and on bad configs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const CONFIGS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/configs");

fn rustspeed(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rustspeed"))
        .args(args)
        // The world size must come from the flag or the default, not from whoever runs the tests.
        .env_remove("WORLD_SIZE")
        .env_remove("OMPI_COMM_WORLD_SIZE")
        .env_remove("PMI_SIZE")
        .env_remove("SLURM_NTASKS")
        .output()
        .expect("run the rustspeed binary")
}

fn check_json(file: &Path, world: u64) -> serde_json::Value {
    let out = rustspeed(&[
        "config",
        "check",
        file.to_str().unwrap(),
        "--world-size",
        &world.to_string(),
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON object on stdout")
}

fn triple(v: &serde_json::Value) -> (u64, u64, u64) {
    let n = |k: &str| v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"));
    (
        n("train_batch_size"),
        n("train_micro_batch_size_per_gpu"),
        n("gradient_accumulation_steps"),
    )
}

fn seed(name: &str) -> PathBuf {
    Path::new(CONFIGS).join(name)
}

#[test]
fn every_seed_config_passes_with_asserted_values() {
    let mut seen: Vec<String> = std::fs::read_dir(CONFIGS)
        .expect("../shared/configs exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".json"))
        .collect();
    seen.sort();
    let checked = [
        "seed_gpt2_fp16_zero2.json",
        "seed_inline_gpt2.json",
        "seed_qlora_bf16_zero2.json",
        "seed_zero2_offload_fp16.json",
    ];
    assert_eq!(seen, checked, "a new seed config needs its assertions here");

    let v = check_json(&seed("seed_gpt2_fp16_zero2.json"), 1);
    assert_eq!(triple(&v), (8, 2, 4));
    assert_eq!(
        (v["world_size"].as_u64(), v["world_size_source"].as_str()),
        (Some(1), Some("flag"))
    );
    assert_eq!(v["precision"], "fp16");
    assert_eq!(v["zero_stage"], 2);
    assert_eq!(v["offload_optimizer"], "none");
    assert_eq!(
        v["resolved"]["zero_optimization"]["reduce_bucket_size"],
        200_000_000
    );
    assert_eq!(v["resolved"]["fp16"]["loss_scale_window"], 100);
    assert_eq!(v["resolved"]["steps_per_print"], 100);

    let v = check_json(&seed("seed_inline_gpt2.json"), 1);
    assert_eq!(triple(&v), (4, 4, 1));
    assert_eq!(v["precision"], "fp16");
    assert_eq!(v["zero_stage"], 2);
    assert_eq!(v["resolved"]["zero_optimization"]["overlap_comm"], false);
    assert_eq!(v["gradient_clipping"], 1.0);

    let v = check_json(&seed("seed_qlora_bf16_zero2.json"), 1);
    assert_eq!(triple(&v), (8, 1, 8));
    assert_eq!(v["precision"], "bf16");
    assert_eq!(v["zero_stage"], 2);
    assert_eq!(v["optimizer"]["type"], "adamw");
    assert_eq!(v["optimizer"]["adam_w_mode"], true);
    assert_eq!(v["optimizer"]["lr"], 2e-4);
    assert_eq!(v["optimizer"]["weight_decay"], 0.01);

    for (world, micro) in [(8, 8), (1, 64)] {
        let v = check_json(&seed("seed_zero2_offload_fp16.json"), world);
        assert_eq!(triple(&v), (64, micro, 1));
        assert_eq!(v["world_size"], world);
        assert_eq!(v["precision"], "fp16");
        assert_eq!(v["zero_stage"], 2);
        assert_eq!(v["offload_optimizer"], "cpu");
        assert_eq!(
            v["resolved"]["zero_optimization"]["offload_optimizer"]["pin_memory"],
            true
        );
        assert_eq!(v["optimizer"]["lr"], 0.00015);
        assert_eq!(v["unsupported_keys"], serde_json::json!([]));
    }
}

#[test]
fn human_summary_names_derived_values_and_world_source() {
    let out = rustspeed(&[
        "config",
        "check",
        seed("seed_qlora_bf16_zero2.json").to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("micro 1 (derived)"), "{text}");
    assert!(text.contains("world size:   1 from the default"), "{text}");
    assert!(text.contains("AdamW"), "{text}");
    assert!(text.contains("precision:    bf16"), "{text}");
}

fn write_temp(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rustspeed-config-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn check_fails(path: &Path, extra: &[&str]) -> String {
    let mut args = vec!["config", "check", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = rustspeed(&args);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(out.stdout.is_empty());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn bad_config_exits_two_naming_the_key() {
    let path = write_temp(
        "bad_device.json",
        "{\n  \"train_batch_size\": 8,\n  \"zero_optimization\": {\n    \"stage\": 2,\n    \"offload_optimizer\": {\"device\": \"gpu\"}\n  }\n}\n",
    );
    let err = check_fails(&path, &["--json"]);
    assert!(
        err.contains("bad_device.json:5: zero_optimization.offload_optimizer.device"),
        "{err}"
    );
    assert!(err.contains("\"none\", \"cpu\", \"nvme\""), "{err}");

    let path = write_temp(
        "typo.json",
        "{\"train_batch_size\": 8, \"fp16\": {\"enabeld\": true}}",
    );
    let err = check_fails(&path, &[]);
    assert!(
        err.contains("fp16.enabeld") && err.contains("did you mean `enabled`?"),
        "{err}"
    );
}

#[test]
fn batch_mismatch_explains_world_size() {
    let path = write_temp(
        "issue6914.json",
        r#"{"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1}"#,
    );
    let err = check_fails(&path, &[]);
    assert!(err.contains("8 != 2 * 1 * 1"), "{err}");
    assert!(err.contains("from the default"), "{err}");
    assert!(err.contains("--world-size 4"), "{err}");
    assert!(rustspeed(&[
        "config",
        "check",
        path.to_str().unwrap(),
        "--world-size",
        "4"
    ])
    .status
    .success());
}

#[test]
fn missing_file_and_auto_exit_two() {
    let err = check_fails(Path::new("/nonexistent/ds_config.json"), &[]);
    assert!(err.contains("/nonexistent/ds_config.json"), "{err}");
    let path = write_temp(
        "auto.json",
        r#"{"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4}"#,
    );
    let err = check_fails(&path, &[]);
    assert!(
        err.contains("train_batch_size") && err.contains("--per-device-train-batch-size"),
        "{err}"
    );
}
