//! `rustspeed estimate`, run as a user runs it.

use std::path::PathBuf;
use std::process::{Command, Output};

use serde_json::Value;

fn rustspeed(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rustspeed"))
        .args(args)
        .env_remove("RUSTSPEED_LOG")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run rustspeed")
}

fn stdout_ok(args: &[&str]) -> String {
    let out = rustspeed(args);
    assert!(
        out.status.success(),
        "rustspeed {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn json_ok(args: &[&str]) -> Value {
    let text = stdout_ok(args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not one JSON object ({e}): {text}"))
}

/// Exit code and stderr of a run that must fail.
fn failure(args: &[&str]) -> (i32, String) {
    let out = rustspeed(args);
    assert!(!out.status.success(), "rustspeed {args:?} should fail");
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

const T12_ZERO3: &[&str] = &[
    "estimate",
    "--stage",
    "3",
    "--params",
    "2851e6",
    "--largest-layer-params",
    "32e6",
    "--gpus-per-node",
    "8",
    "--nodes",
    "1",
];

#[test]
fn zero3_table_is_deepspeeds() {
    let text = stdout_ok(T12_ZERO3);
    let expected = "\
Estimated memory needed for params, optim states and gradients for a:
HW: Setup with 1 node, 8 GPUs per node.
SW: Model with 2851M total params, 32M largest layer params.
  per CPU  |  per GPU |   Options
   71.69GB |   0.12GB | offload_param=cpu , offload_optimizer=cpu , zero_init=1
  127.45GB |   0.12GB | offload_param=cpu , offload_optimizer=cpu , zero_init=0
   63.72GB |   0.78GB | offload_param=none, offload_optimizer=cpu , zero_init=1
  127.45GB |   0.78GB | offload_param=none, offload_optimizer=cpu , zero_init=0
    1.43GB |   6.09GB | offload_param=none, offload_optimizer=none, zero_init=1
  127.45GB |   6.09GB | offload_param=none, offload_optimizer=none, zero_init=0
";
    assert!(text.starts_with(expected), "{text}");
    // rustspeed's own rows follow: stage 0 with bf16 AdamW is 18 bytes per param on each rank
    // (2851e6 * 18 / 2^30 = 47.79 GB), stage 3 an eighth of it.
    assert!(text.contains("world size 8, bf16 compute, adamw"), "{text}");
    let stage0 = text
        .lines()
        .find(|l| l.trim_start().starts_with("0 |"))
        .unwrap();
    assert!(stage0.ends_with(" 47.79GB"), "{stage0}");
    let stage3 = text
        .lines()
        .find(|l| l.trim_start().starts_with("3 |"))
        .unwrap();
    assert!(stage3.ends_with("  5.97GB"), "{stage3}");
}

#[test]
fn zero2_table_matches_current_deepspeed() {
    let text = stdout_ok(&[
        "estimate",
        "--stage",
        "2",
        "--params",
        "2851000000",
        "--gpus-per-node",
        "8",
    ]);
    let expected = "\
Estimated memory needed for params, optim states and gradients for a:
HW: Setup with 1 node, 8 GPUs per node.
SW: Model with 2851M total params.
  per CPU  |  per GPU |   Options
  127.45GB |   5.31GB | offload_optimizer=cpu 
  127.45GB |  11.28GB | offload_optimizer=none
";
    assert!(text.starts_with(expected), "{text}");
}

#[test]
fn zero3_json_rows_and_rustspeed_breakdown() {
    let v = json_ok(&[T12_ZERO3, &["--json"]].concat());
    assert_eq!(v["stage"], 3);
    assert_eq!(v["params"], 2_851_000_000u64);
    assert_eq!(v["largest_layer_params"], 32_000_000u64);
    let rows = v["rows"].as_array().unwrap();
    let flags: Vec<(bool, bool, bool)> = rows
        .iter()
        .map(|r| {
            (
                r["offload_optimizer"].as_bool().unwrap(),
                r["offload_param"].as_bool().unwrap(),
                r["zero_init"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        flags,
        [
            (true, true, true),
            (true, true, false),
            (true, false, true),
            (true, false, false),
            (false, false, true),
            (false, false, false),
        ]
    );
    assert_eq!(rows[0]["cpu_bytes"], 76_977_000_000u64);
    assert_eq!(rows[0]["gpu_bytes"], 128_000_000u64);
    assert_eq!(rows[4]["cpu_bytes"], 1_536_000_000u64);
    assert_eq!(rows[4]["gpu_bytes"], 6_542_750_000u64);

    let own = &v["rustspeed"];
    assert_eq!(own["world_size"], 8);
    assert_eq!(own["dtype"], "bf16");
    assert_eq!(own["optimizer_states_per_param"], 2);
    let stages = own["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 4);
    let p = 2_851_000_000u64;
    let part = p / 8; // 2851e6 is a multiple of 2 * 8: no padding.
    let expect = [
        (2 * p, 4 * p, 4 * p, 8 * p),
        (2 * p, 4 * p, 4 * part, 8 * part),
        (2 * p, 4 * part, 4 * part, 8 * part),
        (2 * part, 4 * part, 4 * part, 8 * part),
    ];
    for (s, (w, g, m, o)) in stages.iter().zip(expect) {
        assert_eq!(s["weights_bytes"], w, "{s}");
        assert_eq!(s["grads_bytes"], g, "{s}");
        assert_eq!(s["master_bytes"], m, "{s}");
        assert_eq!(s["optimizer_bytes"], o, "{s}");
        assert_eq!(s["total_bytes"], w + g + m + o, "{s}");
    }
}

#[test]
fn zero2_json_with_f32_sgd() {
    let v = json_ok(&[
        "estimate",
        "--stage",
        "2",
        "--params",
        "1.5e9",
        "--gpus-per-node",
        "4",
        "--nodes",
        "2",
        "--dtype",
        "f32",
        "--optimizer",
        "sgd-momentum",
        "--json",
    ]);
    assert_eq!(v["params"], 1_500_000_000u64);
    assert!(v["largest_layer_params"].is_null());
    let rows = v["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (row, offload) in rows.iter().zip([true, false]) {
        assert_eq!(row["offload_optimizer"], offload);
        assert_eq!(row["offload_param"], false);
        assert_eq!(row["zero_init"], true);
    }
    // Offload: 2P on GPU; CPU P * max(4 * 8, 16) * 1.5. No offload: 2P + int(18P / 8).
    assert_eq!(rows[0]["gpu_bytes"], 3_000_000_000u64);
    assert_eq!(rows[0]["cpu_bytes"], 72_000_000_000u64);
    assert_eq!(rows[1]["gpu_bytes"], 3_000_000_000u64 + 3_375_000_000);
    assert_eq!(rows[1]["cpu_bytes"], 36_000_000_000u64); // P * 4 * gpus_per_node * 1.5
                                                         // f32 compute: no master copy; one momentum buffer.
    let stage2 = &v["rustspeed"]["stages"][2];
    assert_eq!(stage2["master_bytes"], 0);
    assert_eq!(stage2["optimizer_bytes"], 4 * 1_500_000_000u64 / 8);
    assert_eq!(v["rustspeed"]["optimizer"], "sgd-momentum");
}

/// openai-community/gpt2's config.json, shortened to the keys that matter.
const GPT2_CONFIG: &str = r#"{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
  "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12,
  "activation_function": "gelu_new", "layer_norm_epsilon": 1e-05}"#;

fn temp_model_dir(name: &str, config: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("rustspeed-estimate-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    dir
}

#[test]
fn model_dir_counts_gpt2() {
    let dir = temp_model_dir("gpt2", GPT2_CONFIG);
    let dir_arg = dir.to_str().unwrap();
    let v = json_ok(&["estimate", "--stage", "3", "--model", dir_arg, "--json"]);
    assert_eq!(v["params"], 124_439_808u64);
    // The tied lm_head module holds the whole embedding: DeepSpeed's largest layer.
    assert_eq!(v["largest_layer_params"], 50257u64 * 768);
    assert_eq!(v["rows"].as_array().unwrap().len(), 6);
    // One rank (the default): stage 3 holds every tensor whole.
    assert_eq!(
        v["rustspeed"]["stages"][3]["weights_bytes"],
        2 * 124_439_808u64
    );

    let config_path = dir.join("config.json");
    let text = stdout_ok(&[
        "estimate",
        "--stage",
        "2",
        "--model",
        config_path.to_str().unwrap(),
    ]);
    assert!(
        text.contains("SW: Model with 124M total params.\n"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_flags_are_usage_errors_naming_the_flag() {
    let (code, err) = failure(&["estimate", "--params", "1e9"]);
    assert_eq!(code, 2);
    assert!(err.contains("--stage"), "{err}");
    let (code, err) = failure(&["estimate", "--stage", "2"]);
    assert_eq!(code, 2);
    assert!(err.contains("--params") && err.contains("--model"), "{err}");
    let (code, err) = failure(&["estimate", "--stage", "3", "--params", "1e9"]);
    assert_eq!(code, 2);
    assert!(err.contains("--largest-layer-params"), "{err}");
}

#[test]
fn bad_values_are_usage_errors() {
    let (code, err) = failure(&["estimate", "--stage", "2", "--params", "1.5"]);
    assert_eq!(code, 2);
    assert!(err.contains("--params 1.5"), "{err}");
    let (code, err) = failure(&["estimate", "--stage", "1", "--params", "1e9"]);
    assert_eq!(code, 2);
    assert!(err.contains("--stage 1"), "{err}");
    let (code, _) = failure(&[
        "estimate", "--stage", "2", "--params", "1e9", "--nodes", "0",
    ]);
    assert_eq!(code, 2);
    let (code, _) = failure(&[
        "estimate", "--stage", "2", "--params", "1e9", "--dtype", "int8",
    ]);
    assert_eq!(code, 2);
}

#[test]
fn bad_model_configs_exit_2_naming_the_problem() {
    let missing = std::env::temp_dir().join("rustspeed-estimate-no-such-dir");
    let (code, err) = failure(&[
        "estimate",
        "--stage",
        "2",
        "--model",
        missing.to_str().unwrap(),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("rustspeed-estimate-no-such-dir"), "{err}");

    let dir = temp_model_dir("bert", r#"{"model_type": "bert"}"#);
    let (code, err) = failure(&["estimate", "--stage", "2", "--model", dir.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("`model_type` = bert"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
