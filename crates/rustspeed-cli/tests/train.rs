//! `rustspeed train` end to end on the tiny random GPT-2 of tests/golden/eval (it has a
//! tokenizer): metrics per step, the exported model, exact resume, and exit 2 on bad input.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/eval")
}

/// 24 short texts of a small vocabulary, and a config whose batch, optimizer and scheduler
/// values are all "auto" (filled from the flags).
fn inputs(dir: &Path) -> (PathBuf, PathBuf) {
    let words = [
        "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "to",
        "be",
    ];
    let mut lines = String::new();
    for i in 0..24usize {
        let text: Vec<&str> = (0..12)
            .map(|j| words[(i * 7 + j * 5) % words.len()])
            .collect();
        lines += &serde_json::json!({ "text": text.join(" ") }).to_string();
        lines.push('\n');
    }
    let data = dir.join("data.jsonl");
    std::fs::write(&data, lines).unwrap();
    let ds = dir.join("ds.json");
    let config = serde_json::json!({
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_num_steps": "auto", "total_num_steps": "auto", "warmup_max_lr": "auto"}}
    });
    std::fs::write(&ds, config.to_string()).unwrap();
    (data, ds)
}

fn train(data: &Path, ds: &Path, out: &Path, extra: &[&str]) -> Output {
    let args = with(
        train_args(&model_dir(), data, ds, out),
        &[
            "--per-device-train-batch-size",
            "2",
            "--gradient-accumulation-steps",
            "2",
            "--learning-rate",
            "1e-3",
            "--weight-decay",
            "0.01",
            "--max-grad-norm",
            "1.0",
            "--warmup-steps",
            "2",
            "--max-steps",
            "6",
            "--block-size",
            "16",
            "--logging-steps",
            "2",
            "--save-steps",
            "3",
        ],
    );
    run_args(&with(args, extra))
}

#[test]
fn run_writes_metrics_per_step_checkpoints_and_a_loadable_model() {
    let dir = tempdir("run");
    let (data, ds) = inputs(&dir);
    let out = dir.join("out");
    let result = train(&data, &ds, &out, &[]);
    assert_ok(&result);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("step 2: loss"), "no log line: {stderr}");
    assert!(
        !stderr.contains("step 3: loss"),
        "logged off-schedule: {stderr}"
    );
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(stdout.contains("trained 6 steps"), "summary: {stdout}");

    let lines = metrics(&out);
    assert_eq!(lines.len(), 6);
    let fields = [
        "step",
        "epoch",
        "loss",
        "lr",
        "grad_norm",
        "loss_scale",
        "skipped",
        "tokens",
        "tokens_per_second",
    ];
    for (i, line) in lines.iter().enumerate() {
        let obj = line.as_object().unwrap();
        assert_eq!(obj.len(), fields.len(), "{line}");
        for f in fields {
            assert!(obj.contains_key(f), "{f} missing in {line}");
        }
        assert_eq!(line["step"].as_u64(), Some(i as u64 + 1));
        // Packed blocks of 16 tokens, 4 per step.
        assert_eq!(line["tokens"].as_u64(), Some(64));
        assert_eq!(line["skipped"], Value::Bool(false));
        assert!(line["loss"].as_f64().unwrap().is_finite());
    }
    // WarmupDecayLR with 2 warmup steps of 6 (linear warmup from 0, then linear decay).
    let lr: Vec<f64> = lines.iter().map(|l| l["lr"].as_f64().unwrap()).collect();
    assert!(lr[0] < lr[2] && (lr[2] - 1e-3).abs() < 1e-12, "{lr:?}");
    assert!(lr[5] < lr[3], "{lr:?}");
    let (first, last) = (
        lines[0]["loss"].as_f64().unwrap(),
        lines[5]["loss"].as_f64().unwrap(),
    );
    assert!(last < first, "loss did not fall: {first} -> {last}");

    assert!(out.join("checkpoint-3").is_dir() && out.join("checkpoint-6").is_dir());
    let source = rustspeed_models::loader::load_model::<f32>(&model_dir()).unwrap();
    let final_model = rustspeed_models::loader::load_model::<f32>(&out.join("final")).unwrap();
    assert_eq!(
        final_model.model.layout.numel(),
        source.model.layout.numel()
    );
    assert!(final_model.tokenizer.is_some());
    assert_ne!(
        final_model.model.params, source.model.params,
        "weights unchanged"
    );
}

#[test]
fn resumed_run_matches_an_uninterrupted_one() {
    let dir = tempdir("resume");
    let (data, ds) = inputs(&dir);
    let straight = dir.join("straight");
    assert_ok(&train(&data, &ds, &straight, &[]));

    // An interrupted run: everything after the step-3 checkpoint is lost.
    let resumed = dir.join("resumed");
    assert_ok(&train(&data, &ds, &resumed, &[]));
    std::fs::remove_dir_all(resumed.join("checkpoint-6")).unwrap();
    std::fs::remove_dir_all(resumed.join("final")).unwrap();
    let ckpt = resumed.join("checkpoint-3");
    assert_ok(&train(
        &data,
        &ds,
        &resumed,
        &["--resume-from-checkpoint", ckpt.to_str().unwrap()],
    ));
    let (a, b) = (metrics(&straight), metrics(&resumed));
    assert_eq!(b.len(), 6, "metrics after resume: {b:?}");
    for (x, y) in a.iter().zip(&b) {
        for key in ["step", "loss", "lr", "grad_norm", "tokens"] {
            assert_eq!(x[key], y[key], "{key}: {x} vs {y}");
        }
    }
    // Without a value: the newest checkpoint of the output dir (step 6: nothing left to do).
    let again = train(&data, &ds, &resumed, &["--resume-from-checkpoint"]);
    assert_ok(&again);
    assert_eq!(metrics(&resumed).len(), 6);
}

#[test]
fn bad_record_exits_2_naming_file_and_line() {
    let dir = tempdir("bad");
    let (data, ds) = inputs(&dir);
    let mut text = std::fs::read_to_string(&data).unwrap();
    text += "{\"text\": \"fine\"}\n{\"text\": 3\n";
    std::fs::write(&data, text).unwrap();
    let out = train(&data, &ds, &dir.join("out"), &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let at = format!("{}:26", data.display());
    assert!(stderr.contains(&at), "expected {at} in: {stderr}");
}

/// --skip-bad-records: the same malformed record becomes a counted warning, and nothing else of
/// the data is lost.
#[test]
fn skip_bad_records_counts_and_continues() {
    let dir = tempdir("skip");
    let (data, ds) = inputs(&dir);
    let mut text = std::fs::read_to_string(&data).unwrap();
    text += "{\"text\": 3}\n";
    std::fs::write(&data, text).unwrap();
    let out = train(&data, &ds, &dir.join("out"), &["--skip-bad-records"]);
    assert_ok(&out);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("24 records") && stdout.contains("1 skipped"),
        "{stdout}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:25", data.display())),
        "{stderr}"
    );
}

#[test]
fn flag_contradicting_the_config_exits_2() {
    let dir = tempdir("mismatch");
    let (data, ds) = inputs(&dir);
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&ds).unwrap()).unwrap();
    config["train_micro_batch_size_per_gpu"] = Value::from(4);
    std::fs::write(&ds, config.to_string()).unwrap();
    let out = train(&data, &ds, &dir.join("out"), &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("train_micro_batch_size_per_gpu")
            && stderr.contains("--per-device-train-batch-size"),
        "{stderr}"
    );
}

#[test]
fn precision_flag_the_config_does_not_take_exits_2() {
    let dir = tempdir("bf16");
    let (data, ds) = inputs(&dir);
    let out = train(&data, &ds, &dir.join("out"), &["--bf16"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--bf16") && stderr.contains("bf16.enabled"),
        "{stderr}"
    );
}

#[test]
fn bf16_run_trains_and_exports_bf16() {
    let dir = tempdir("bf16-run");
    let (data, ds) = inputs(&dir);
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&ds).unwrap()).unwrap();
    config["bf16"] = serde_json::json!({"enabled": "auto"});
    std::fs::write(&ds, config.to_string()).unwrap();
    let out = dir.join("out");
    assert_ok(&train(&data, &ds, &out, &["--bf16"]));
    assert_eq!(metrics(&out).len(), 6);
    let exported: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("final/config.json")).unwrap())
            .unwrap();
    let text = exported.to_string();
    assert!(text.contains("bfloat16"), "{text}");
}

#[test]
fn eval_split_evaluates_on_schedule_rotates_checkpoints_and_plots() {
    let dir = tempdir("eval");
    let (data, ds) = inputs(&dir);
    let out = dir.join("out");
    let result = train(
        &data,
        &ds,
        &out,
        &[
            "--eval-split",
            "0.25",
            "--eval-on-start",
            "--eval-steps",
            "4",
            "--save-total-limit",
            "1",
        ],
    );
    assert_ok(&result);
    let lines = metrics(&out);
    let evals: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("eval_loss").is_some())
        .collect();
    // Before training, at step 4 and at the end (step 6), one object each with exactly these
    // fields.
    assert_eq!(evals.len(), 3, "{lines:?}");
    for (e, step) in evals.iter().zip([0, 4, 6]) {
        assert_eq!(e.as_object().unwrap().len(), 2, "{e}");
        assert_eq!(e["step"].as_u64(), Some(step));
        assert!(e["eval_loss"].as_f64().unwrap().is_finite());
    }
    assert_eq!(lines.len(), 9);
    // Checkpoints at steps 3 and 6 (--save-steps 3); the limit keeps the newest.
    let kept: Vec<bool> = [3, 6]
        .iter()
        .map(|n| out.join(format!("checkpoint-{n}")).is_dir())
        .collect();
    assert_eq!(kept, [false, true], "--save-total-limit 1");
    let png = std::fs::read(out.join("loss.png")).unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    let stdout = String::from_utf8_lossy(&result.stdout);
    assert!(stdout.contains("eval_loss"), "{stdout}");
}

#[test]
fn nvme_offload_and_a_foreign_checkpoint_exit_2() {
    let dir = tempdir("refuse");
    let (data, ds) = inputs(&dir);
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&ds).unwrap()).unwrap();
    config["zero_optimization"] = serde_json::json!({"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}});
    let nvme = dir.join("nvme.json");
    std::fs::write(&nvme, config.to_string()).unwrap();
    let out = train(&data, &nvme, &dir.join("out"), &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not supported yet") && stderr.contains("offload_optimizer.device"),
        "{stderr}"
    );

    let missing = train(
        &data,
        &ds,
        &dir.join("out2"),
        &[
            "--resume-from-checkpoint",
            dir.join("nope").to_str().unwrap(),
        ],
    );
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such directory"));
}

/// Ctrl-C during training saves a checkpoint and exits 130; resuming from it gives the same
/// steps as a run that was never interrupted.
#[test]
fn ctrl_c_saves_a_checkpoint_that_resumes_exactly() {
    let dir = tempdir("sigint");
    let (data, ds) = inputs(&dir);
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&ds).unwrap()).unwrap();
    // A schedule that does not depend on the total step count, so a long run and a short one
    // agree on every step's lr.
    config.as_object_mut().unwrap().remove("scheduler");
    std::fs::write(&ds, config.to_string()).unwrap();
    let out = dir.join("out");
    let model = model_dir();
    let base = |out: &Path, steps: &str| -> Vec<String> {
        with(
            train_args(&model, &data, &ds, out),
            &[
                "--per-device-train-batch-size",
                "2",
                "--gradient-accumulation-steps",
                "1",
                "--learning-rate",
                "1e-3",
                "--weight-decay",
                "0",
                "--max-grad-norm",
                "1.0",
                "--lr-scheduler-type",
                "constant",
                "--block-size",
                "16",
                "--save-steps",
                "0",
                "--max-steps",
                steps,
            ],
        )
    };
    let child = Command::new(env!("CARGO_BIN_EXE_rustspeed"))
        .args(base(&out, "100000"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics_path = out.join("metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics_path)
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 3
    {
        assert!(t0.elapsed().as_secs() < 120, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let result = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted at step"), "{stderr}");
    let saved = metrics(&out);
    let n = saved.len();
    let ckpt = out.join(format!("checkpoint-{n}"));
    assert!(ckpt.is_dir(), "no {} after Ctrl-C", ckpt.display());

    // Resume for two more steps, and compare with a straight run of n + 2 steps.
    let total = (n + 2).to_string();
    let mut resume = base(&out, &total);
    resume.extend(["--resume-from-checkpoint".to_string()]);
    let r = Command::new(env!("CARGO_BIN_EXE_rustspeed"))
        .args(&resume)
        .output()
        .unwrap();
    assert_ok(&r);
    let straight = dir.join("straight");
    let s = Command::new(env!("CARGO_BIN_EXE_rustspeed"))
        .args(base(&straight, &total))
        .output()
        .unwrap();
    assert_ok(&s);
    let (a, b) = (metrics(&straight), metrics(&out));
    assert_eq!(a.len(), n + 2);
    assert_eq!(b.len(), n + 2);
    for (x, y) in a.iter().zip(&b) {
        for key in ["step", "loss", "lr", "grad_norm", "tokens"] {
            assert_eq!(x[key], y[key], "{key}: {x} vs {y}");
        }
    }
}

/// A GGUF source: its embedded tokenizer encodes the data, and the export is an HF directory
/// with the tokenizer written out.
#[test]
fn trains_from_a_gguf_file_and_exports_an_hf_directory() {
    let dir = tempdir("gguf");
    let (data, ds) = inputs(&dir);
    let gguf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../rustspeed-models/tests/golden/gguf/llama.gguf");
    let out = dir.join("out");
    let result = run_args(&with(
        train_args(&gguf, &data, &ds, &out),
        &[
            "--per-device-train-batch-size",
            "2",
            "--gradient-accumulation-steps",
            "1",
            "--learning-rate",
            "1e-3",
            "--warmup-steps",
            "1",
            "--max-steps",
            "2",
            "--block-size",
            "8",
            "--save-steps",
            "0",
        ],
    ));
    assert_ok(&result);
    assert_eq!(metrics(&out).len(), 2);
    let exported = rustspeed_models::loader::load_model::<f32>(&out.join("final")).unwrap();
    assert!(exported.tokenizer.is_some(), "tokenizer.json written");
}

/// --gradient-checkpointing recomputes activations in backward: the same steps, bit for bit.
#[test]
fn gradient_checkpointing_trains_identically() {
    let dir = tempdir("ckpting");
    let (data, ds) = inputs(&dir);
    let (a, b) = (dir.join("plain"), dir.join("recompute"));
    assert_ok(&train(&data, &ds, &a, &[]));
    assert_ok(&train(&data, &ds, &b, &["--gradient-checkpointing"]));
    let (x, y) = (metrics(&a), metrics(&b));
    assert_eq!(x.len(), y.len());
    for (p, q) in x.iter().zip(&y) {
        for key in ["loss", "grad_norm", "lr"] {
            assert_eq!(p[key], q[key], "{key}: {p} vs {q}");
        }
    }
}
