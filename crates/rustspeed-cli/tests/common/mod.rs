//! What the command-line tests share: scratch directories, running the binary, and reading
//! what a run wrote. Each test binary uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

/// The tiny GPT-2 with a ChatML template and the data of tools/golden/train_cli_golden.py.
pub fn train_golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/train")
}

/// A fresh, empty scratch directory for one test (per process, so test binaries never share).
pub fn tempdir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rustspeed-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs the `rustspeed` binary to completion.
pub fn rustspeed(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rustspeed"))
        .args(args)
        .output()
        .unwrap()
}

pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "status {:?}, stderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The objects of `OUT/metrics.jsonl`, in order.
pub fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `rustspeed train` with its four required flags; tests append the rest.
pub fn train_args(model: &Path, data: &Path, ds: &Path, out: &Path) -> Vec<String> {
    let path = |p: &Path| p.to_str().unwrap().to_string();
    vec![
        "train".into(),
        "--model".into(),
        path(model),
        "--data".into(),
        path(data),
        "--deepspeed".into(),
        path(ds),
        "--output-dir".into(),
        path(out),
    ]
}

/// Appends string flags to an argument list.
pub fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Runs `rustspeed` with owned arguments.
pub fn run_args(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rustspeed"))
        .args(args)
        .output()
        .unwrap()
}
