//! ZeRO through the command: a rank killed mid-run stops the job with the watchdog's message,
//! and `rustspeed zero-to-fp32` consolidates a two-rank checkpoint into HF weights that equal
//! what the run exported.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Two-rank jobs in this file run one at a time: each is two busy processes, and the killed-rank
/// test times its watchdog, which a second job on the 2-core machine would distort.
static ONE_JOB_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn write_config(dir: &Path, stage: u8) -> PathBuf {
    let path = dir.join("ds.json");
    let config = serde_json::json!({
        "train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "bf16": {"enabled": true},
        "zero_optimization": {"stage": stage}
    });
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

/// Two ranks on the golden tiny GPT-2, file order.
fn two_rank_args(ds: &Path, out: &Path, max_steps: &str, save_steps: &str) -> Vec<String> {
    let model = train_golden().join("model");
    let data = train_golden().join("text.jsonl");
    with(
        train_args(&model, &data, ds, out),
        &[
            "--max-steps",
            max_steps,
            "--save-steps",
            save_steps,
            "--block-size",
            "16",
            "--no-shuffle",
            "--nproc-per-node",
            "2",
        ],
    )
}

/// Every process as (pid, parent pid).
fn processes() -> Vec<(u32, u32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the parenthesised command name: state, ppid, ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok());
        if let Some(ppid) = ppid {
            out.push((pid, ppid));
        }
    }
    out
}

/// The pid of the descendant of `root` whose environment has `RANK=rank` (`rustspeed train
/// --nproc-per-node` runs `rustspeed launch`, which starts the ranks).
fn rank_pid(root: u32, rank: usize) -> Option<u32> {
    let procs = processes();
    let mut family = vec![root];
    let mut i = 0;
    while i < family.len() {
        let parent = family[i];
        family.extend(procs.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    let want = format!("RANK={rank}");
    family[1..].iter().copied().find(|pid| {
        std::fs::read(format!("/proc/{pid}/environ"))
            .unwrap_or_default()
            .split(|&b| b == 0)
            .any(|kv| kv == want.as_bytes())
    })
}

#[test]
fn a_killed_rank_stops_the_job_with_the_watchdog_message() {
    let _one = ONE_JOB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    const TIMEOUT_S: u64 = 20;
    let dir = tempdir("kill");
    let ds = write_config(&dir, 2);
    let out = dir.join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_rustspeed"))
        .args(two_rank_args(&ds, &out, "100000", "0"))
        .env("RUSTSPEED_COMM_TIMEOUT", TIMEOUT_S.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Mid-run: after rank 0 logged a few optimizer steps.
    let start = Instant::now();
    let steps_logged = || {
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    while steps_logged() < 3 {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no training steps"
        );
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "the run ended early: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let victim = rank_pid(child.id(), 1).expect("rank 1's process");
    let survivor = rank_pid(child.id(), 0).expect("rank 0's process");
    let killed_at = Instant::now();
    let kill = Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let result: Output = child.wait_with_output().unwrap();
    let took = killed_at.elapsed();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(!result.status.success(), "{stderr}");
    assert!(
        took < Duration::from_secs(TIMEOUT_S),
        "the job took {took:?} to stop"
    );
    assert!(
        !Path::new(&format!("/proc/{survivor}")).exists()
            || std::fs::read_to_string(format!("/proc/{survivor}/stat"))
                .is_ok_and(|s| s.contains(") Z")),
        "rank 0 still runs"
    );
    // The launcher names the killed rank; rank 0 failed on its own, with the communicator's
    // message naming the collective it waited in and the rank that did not arrive.
    assert!(
        stderr.contains("rank 1 was killed by signal 9"),
        "launcher message: {stderr}"
    );
    assert!(
        stderr.contains("exited on their own"),
        "rank 0 was signalled instead of failing by itself: {stderr}"
    );
    let rank0: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("[rank 0]"))
        .collect();
    assert!(
        rank0.iter().any(|l| l.contains("rank 1")
            && l.contains("died")
            && l.contains("ranks that did not arrive: [1]")),
        "rank 0's watchdog message: {stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

fn tensors(path: &Path) -> std::collections::BTreeMap<String, (String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| (name, (format!("{:?}", t.dtype()), t.data().to_vec())))
        .collect()
}

#[test]
fn zero_to_fp32_of_a_two_rank_checkpoint_gives_the_exported_weights() {
    let _one = ONE_JOB_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempdir("z2f");
    let ds = write_config(&dir, 2);
    let out = dir.join("out");
    let run = Command::new(env!("CARGO_BIN_EXE_rustspeed"))
        .args(two_rank_args(&ds, &out, "2", "2"))
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let ckpt = out.join("checkpoint-2");
    let hf = dir.join("hf");
    let z2f = Command::new(env!("CARGO_BIN_EXE_rustspeed"))
        .args(["zero-to-fp32", ckpt.to_str().unwrap(), hf.to_str().unwrap()])
        .args(["--dtype", "bf16"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&z2f.stderr);
    assert!(z2f.status.success(), "{stderr}");
    assert!(stderr.contains("ZeRO stage 2, 2 ranks"), "{stderr}");
    // The bf16 weights the run exported are its fp32 masters rounded: the consolidated masters
    // rounded the same way are the same bytes, tensor by tensor, under the same HF names.
    let want = tensors(&out.join("final/model.safetensors"));
    let got = tensors(&hf.join("model.safetensors"));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (name, w) in &want {
        assert_eq!(&got[name], w, "{name}");
    }
    // config.json comes from the run's final/ (the checkpoint's sibling), with the dtype set.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(hf.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    assert!(hf.join("tokenizer.json").is_file());

    // f32 output: the masters themselves, which round to the exported bf16 values.
    let hf32 = dir.join("hf32");
    let z2f = Command::new(env!("CARGO_BIN_EXE_rustspeed"))
        .args([
            "zero-to-fp32",
            ckpt.to_str().unwrap(),
            hf32.to_str().unwrap(),
        ])
        .args(["--tag", "global_step2"])
        .output()
        .unwrap();
    assert!(
        z2f.status.success(),
        "{}",
        String::from_utf8_lossy(&z2f.stderr)
    );
    let f32s = tensors(&hf32.join("model.safetensors"));
    let mut moved = false;
    for (name, (dtype, bytes)) in &f32s {
        assert_eq!(dtype, "F32", "{name}");
        let rounded: Vec<u8> = bytes
            .chunks_exact(4)
            .flat_map(|b| {
                let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                moved |= half::bf16::from_f32(v).to_f32() != v;
                half::bf16::from_f32(v).to_le_bytes()
            })
            .collect();
        assert_eq!(rounded, want[name].1, "{name}");
    }
    assert!(
        moved,
        "the fp32 output carries the masters' extra precision"
    );

    // A missing tag is the user's mistake, named.
    let bad = Command::new(env!("CARGO_BIN_EXE_rustspeed"))
        .args([
            "zero-to-fp32",
            ckpt.to_str().unwrap(),
            hf32.to_str().unwrap(),
        ])
        .args(["--tag", "global_step99"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(stderr.contains("global_step99"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
