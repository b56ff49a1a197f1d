//! `rustspeed train` against independent references made by tools/golden/train_cli_golden.py:
//! PyTorch's training run on the packed text path (HF Trainer's defaults for a config without
//! optimizer and scheduler blocks), transformers' tokenizer for the alpaca masks, its
//! `apply_chat_template(return_assistant_tokens_mask=True)` for the chat masks, and the same
//! alpaca records as JSONL, CSV and Parquet (written by pyarrow). Also: every DeepSpeed config
//! the users brought (../shared/configs, and the copies in assets/configs) trains.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Output;

use rustspeed_data::{prepare, ChatTemplate, DataConfig, Format, SpecialIds, TryEncode};
use rustspeed_models::tokenizer::Tokenizer;
use serde_json::Value;

fn write_config(dir: &Path, config: Value) -> PathBuf {
    let path = dir.join("ds.json");
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

fn close(got: f64, want: f64, rel: f64, what: &str) {
    assert!(
        (got - want).abs() <= rel * want.abs().max(1e-12),
        "{what}: got {got}, want {want} (rel {rel})"
    );
}

#[test]
fn packed_text_run_matches_pytorch_with_hf_trainer_defaults() {
    let expected = read_json(&train_golden().join("text_expected.json"));
    let r = &expected["run"];
    let dir = tempdir("text");
    // Only the batch and clipping: HF Trainer supplies AdamW and the linear schedule.
    let ds = write_config(
        &dir,
        serde_json::json!({
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "train_batch_size": "auto",
            "gradient_clipping": "auto"
        }),
    );
    let out = dir.join("out");
    let s = |k: &str| r[k].to_string();
    let model = train_golden().join("model");
    let data = train_golden().join("text.jsonl");
    let result = run_args(&with(
        train_args(&model, &data, &ds, &out),
        &[
            "--no-shuffle",
            "--per-device-train-batch-size",
            &s("micro"),
            "--gradient-accumulation-steps",
            &s("gas"),
            "--learning-rate",
            &s("lr"),
            "--weight-decay",
            &s("weight_decay"),
            "--max-grad-norm",
            &s("max_grad_norm"),
            "--warmup-steps",
            &s("warmup_steps"),
            "--max-steps",
            &s("max_steps"),
            "--block-size",
            &s("block_size"),
            "--save-steps",
            "0",
        ],
    ));
    assert_ok(&result);
    let got = metrics(&out);
    let want = expected["steps"].as_array().unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        let step = w["step"].as_u64().unwrap();
        assert_eq!(g["step"].as_u64(), Some(step));
        assert_eq!(g["tokens"], w["tokens"], "step {step}");
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap();
        close(f(g, "lr"), f(w, "lr"), 1e-9, &format!("step {step} lr"));
        close(
            f(g, "loss"),
            f(w, "loss"),
            2e-6,
            &format!("step {step} loss"),
        );
        close(
            f(g, "grad_norm"),
            f(w, "grad_norm"),
            1e-4,
            &format!("step {step} grad_norm"),
        );
    }
    assert!(out.join("loss.png").is_file());
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&train_golden().join("model")).unwrap()
}

/// The samples the train command builds from `file` (no packing, no truncation).
fn samples(file: &Path, format: Format) -> Vec<(Vec<u32>, Vec<i32>)> {
    let tok = tokenizer();
    let mut cfg = DataConfig::new(vec![file.to_path_buf()]);
    cfg.format = Some(format);
    cfg.max_length = Some(256);
    cfg.chat_template =
        ChatTemplate::from_tokenizer_config(&train_golden().join("model/tokenizer_config.json"))
            .unwrap();
    let special = SpecialIds {
        eos: tok.eos_token_id().unwrap(),
        bos: tok.bos_token_id(),
    };
    let encode = TryEncode(|t: &str, s: bool| tok.encode(t, s));
    let prepared = prepare(&cfg, &encode, special).unwrap();
    prepared
        .train
        .samples
        .into_iter()
        .map(|s| (s.input_ids, s.labels))
        .collect()
}

fn expected_samples(name: &str) -> Vec<(Vec<u32>, Vec<i32>)> {
    let v = read_json(&train_golden().join(name));
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let ids = s["input_ids"].as_array().unwrap();
            let labels = s["labels"].as_array().unwrap();
            (
                ids.iter().map(|x| x.as_u64().unwrap() as u32).collect(),
                labels.iter().map(|x| x.as_i64().unwrap() as i32).collect(),
            )
        })
        .collect()
}

#[test]
fn alpaca_masks_match_transformers_from_jsonl_csv_and_parquet() {
    let want = expected_samples("alpaca_expected.json");
    for file in ["alpaca.jsonl", "alpaca.csv", "alpaca.parquet"] {
        let got = samples(&train_golden().join(file), Format::Alpaca);
        assert_eq!(got.len(), want.len(), "{file}");
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g, w, "{file} record {i}");
        }
    }
}

#[test]
fn chat_masks_match_transformers_assistant_masks() {
    let want = expected_samples("chat_expected.json");
    let got = samples(&train_golden().join("chat.jsonl"), Format::Chat);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g.0, w.0, "conversation {i}: input_ids");
        assert_eq!(g.1, w.1, "conversation {i}: labels");
    }
}

fn short_run(data: &Path, ds: &Path, out: &Path, extra: &[&str]) -> Output {
    let model = train_golden().join("model");
    let args = with(
        train_args(&model, data, ds, out),
        &[
            "--max-steps",
            "2",
            "--save-steps",
            "0",
            "--block-size",
            "16",
        ],
    );
    run_args(&with(args, extra))
}

#[test]
fn csv_and_parquet_train_exactly_like_jsonl() {
    let dir = tempdir("formats");
    let ds = write_config(
        &dir,
        serde_json::json!({"train_batch_size": 4, "gradient_accumulation_steps": 2}),
    );
    let mut runs = Vec::new();
    for file in ["alpaca.jsonl", "alpaca.csv", "alpaca.parquet"] {
        let out = dir.join(file.replace('.', "-"));
        assert_ok(&short_run(
            &train_golden().join(file),
            &ds,
            &out,
            &["--learning-rate", "1e-3"],
        ));
        runs.push(metrics(&out));
    }
    for run in &runs[1..] {
        assert_eq!(run.len(), 2);
        for (a, b) in runs[0].iter().zip(run) {
            for key in ["loss", "grad_norm", "tokens", "lr"] {
                assert_eq!(a[key], b[key], "{key}");
            }
        }
    }
}

/// The seed documents' configs, as written: fp16 and bf16, ZeRO-2, CPU offload, no optimizer
/// block, a global batch larger than the data (one partial step per epoch).
#[test]
fn every_user_config_trains() {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut configs = Vec::new();
    for d in [
        here.join("../../../shared/configs"),
        here.join("../../assets/configs"),
    ] {
        if let Ok(entries) = std::fs::read_dir(&d) {
            configs.extend(
                entries
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "json")),
            );
        }
    }
    assert!(
        configs.len() >= 4,
        "expected the seed configs in ../shared/configs or assets/configs, found {configs:?}"
    );
    let dir = tempdir("configs");
    let data = train_golden().join("text.jsonl");
    for (i, cfg) in configs.iter().enumerate() {
        let out = dir.join(format!("run{i}"));
        let result = short_run(&data, cfg, &out, &[]);
        assert!(
            result.status.success(),
            "{}: {}",
            cfg.display(),
            String::from_utf8_lossy(&result.stderr)
        );
        let m = metrics(&out);
        assert_eq!(m.len(), 2, "{}", cfg.display());
        assert!(
            m.iter().all(|l| l["loss"].as_f64().unwrap().is_finite()),
            "{}: {m:?}",
            cfg.display()
        );
        assert!(out.join("final/config.json").is_file());
    }
}

/// Runs the tiny model for two steps with one process and with `--nproc-per-node 2` under
/// `zero` (a `zero_optimization` block) and asserts the same losses, grad norms, lrs and eval
/// losses step by step, each rank's model-state bytes equal to the memory model's, and rank 0
/// alone writing the outputs. Returns the two output directories.
fn assert_two_ranks_train_like_one(name: &str, zero: Value, extra: &[&str]) -> [PathBuf; 2] {
    let stage = zero["stage"].as_u64().unwrap();
    let dir = tempdir(name);
    let ds = write_config(
        &dir,
        serde_json::json!({
            "train_batch_size": 4,
            "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
            "gradient_clipping": 1.0,
            "zero_optimization": zero
        }),
    );
    let data = train_golden().join("text.jsonl");
    let outs = [dir.join("out-1"), dir.join("out-2")];
    let runs: Vec<Vec<Value>> = [None, Some("2")]
        .iter()
        .zip(&outs)
        .map(|(ranks, out)| {
            let mut flags = vec!["--no-shuffle", "--warmup-steps", "1"];
            flags.extend(extra);
            if let Some(n) = ranks {
                flags.extend(["--nproc-per-node", n]);
            }
            let result = short_run(&data, &ds, out, &flags);
            assert_ok(&result);
            if ranks.is_some() {
                let stderr = String::from_utf8_lossy(&result.stderr);
                // Every rank reports its own model-state bytes, equal to the memory model's.
                for r in 0..2 {
                    let line = stderr
                        .lines()
                        .find(|l| {
                            l.contains(&format!("rank {r} of 2, ZeRO stage {stage}: model states"))
                        })
                        .unwrap_or_else(|| panic!("{name}: rank {r}'s memory line: {stderr}"));
                    let (got, want) = line.split_once("; memory model ").unwrap();
                    assert!(got.contains(&format!("model states {want} (")), "{line}");
                }
            }
            metrics(out)
        })
        .collect();
    let train = |m: &[Value]| -> Vec<Value> {
        m.iter()
            .filter(|l| l.get("loss").is_some())
            .cloned()
            .collect()
    };
    let (one, two) = (train(&runs[0]), train(&runs[1]));
    assert_eq!(one.len(), 2);
    assert_eq!(two.len(), 2, "rank 0 alone writes metrics.jsonl");
    for (a, b) in one.iter().zip(&two) {
        assert_eq!(a["tokens"], b["tokens"]);
        for key in ["loss", "grad_norm", "lr"] {
            close(
                b[key].as_f64().unwrap(),
                a[key].as_f64().unwrap(),
                1e-5,
                &format!("{name}: step {} {key}", a["step"]),
            );
        }
    }
    let evals = |m: &[Value]| -> Vec<f64> {
        m.iter()
            .filter_map(|l| l.get("eval_loss").and_then(Value::as_f64))
            .collect()
    };
    let (e1, e2) = (evals(&runs[0]), evals(&runs[1]));
    assert_eq!(e1.len(), e2.len());
    for (a, b) in e1.iter().zip(&e2) {
        close(*b, *a, 1e-5, &format!("{name}: eval_loss"));
    }
    outs
}

/// `--nproc-per-node 2` (the launcher, shared-memory collectives, ZeRO-2) trains like one
/// process.
#[test]
fn two_ranks_at_stage_2_train_like_one_process() {
    let outs = assert_two_ranks_train_like_one("ranks-2", serde_json::json!({"stage": 2}), &[]);
    for out in outs {
        assert!(out.join("final/config.json").is_file());
    }
}

/// The same at ZeRO-3 (every parameter partitioned, gathered layer by layer), with an eval
/// split, which every rank evaluates at stage 3, and the export gathered from the pieces: the
/// same whole model as one process writes.
#[test]
fn two_ranks_at_stage_3_train_like_one_process() {
    let outs = assert_two_ranks_train_like_one(
        "ranks-3",
        serde_json::json!({"stage": 3, "stage3_param_persistence_threshold": 0}),
        &["--eval-split", "0.25"],
    );
    let evals = metrics(&outs[1])
        .iter()
        .filter(|l| l.get("eval_loss").is_some())
        .count();
    assert!(evals > 0, "the eval split was evaluated");
    let [one, two] = outs.map(|o| std::fs::read(o.join("final/model.safetensors")).unwrap());
    assert_eq!(one.len(), two.len());
}

/// LoRA and QLoRA under ZeRO over two ranks: only the adapters are in the flat buffer that the
/// ranks partition (at stage 3 the frozen dense weights are partitioned too, the quantized ones
/// stay whole); the saved adapters equal the single process's.
#[test]
fn lora_and_qlora_over_two_ranks_train_like_one_process() {
    let lora = ["--lora-r", "4", "--lora-target-modules", "c_attn,c_fc"];
    for (name, stage, quant) in [
        ("lora-ranks", 1, None),
        ("qlora-ranks", 2, Some("nf4")),
        ("lora-ranks-3", 3, None),
        ("qlora-ranks-3", 3, Some("nf4")),
    ] {
        let mut flags = lora.to_vec();
        if let Some(q) = quant {
            flags.extend(["--quantize", q, "--double-quant"]);
        }
        let outs =
            assert_two_ranks_train_like_one(name, serde_json::json!({"stage": stage}), &flags);
        let [one, two] = outs.map(|o| {
            let bytes = std::fs::read(o.join("final/adapter_model.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut t: Vec<(String, Vec<f32>)> = st
                .tensors()
                .into_iter()
                .map(|(k, v)| {
                    assert_eq!(v.dtype(), safetensors::Dtype::F32, "{k}");
                    let f = v
                        .data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect();
                    (k, f)
                })
                .collect();
            t.sort_by(|a, b| a.0.cmp(&b.0));
            t
        });
        assert_eq!(one.len(), two.len(), "{name}: adapter tensors");
        assert!(!one.is_empty());
        // Values near zero (lora_B starts at 0) are Adam steps, whose normalisation turns the
        // two runs' reassociation differences (gradient sums in another order over 2 ranks)
        // into ~1e-8 absolute: compare those absolutely at 1e-7.
        for ((k, a), (_, b)) in one.iter().zip(&two) {
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= 1e-5 * x.abs().max(1e-2),
                    "{name}: {k}: {x} vs {y}"
                );
            }
        }
    }
}

/// LoRA through the command: a PEFT adapter directory as the output (PEFT's key names), a
/// merged model with --merge, QLoRA (NF4 base) training, and continuing from the adapter.
#[test]
fn lora_and_qlora_runs_write_peft_adapters() {
    let dir = tempdir("lora");
    let ds = write_config(
        &dir,
        serde_json::json!({"train_batch_size": 4, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}),
    );
    let data = train_golden().join("text.jsonl");
    let out = dir.join("lora");
    let lora = [
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
        "--lora-target-modules",
        "c_attn,c_fc",
        "--merge",
        "--warmup-steps",
        "1",
    ];
    let result = short_run(&data, &ds, &out, &lora);
    assert_ok(&result);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(stderr.contains("trainable params:"), "{stderr}");
    let cfg = read_json(&out.join("final/adapter_config.json"));
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["peft_type"], "LORA");
    let bytes = std::fs::read(out.join("final/adapter_model.safetensors")).unwrap();
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(4096)]);
    assert!(
        text.contains("base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"),
        "PEFT key names"
    );
    assert!(out.join("merged/config.json").is_file());
    rustspeed_models::loader::load_model::<f32>(&out.join("merged")).unwrap();

    // QLoRA: NF4 base with double quantization.
    let q = dir.join("qlora");
    let mut args = lora[..6].to_vec();
    args.extend(["--quantize", "nf4", "--double-quant", "--warmup-steps", "1"]);
    assert_ok(&short_run(&data, &ds, &q, &args));
    assert!(q.join("final/adapter_model.safetensors").is_file());
    let m = metrics(&q);
    assert!(m.iter().all(|l| l["loss"].as_f64().unwrap().is_finite()));

    // Continue the first adapter.
    let adapter = out.join("final");
    let more = dir.join("more");
    assert_ok(&short_run(
        &data,
        &ds,
        &more,
        &[
            "--adapter",
            adapter.to_str().unwrap(),
            "--warmup-steps",
            "1",
        ],
    ));
    // A quantized base without adapters is refused before any work.
    let refused = short_run(&data, &ds, &dir.join("bad"), &["--quantize", "nf4"]);
    assert_eq!(refused.status.code(), Some(2));
    // Flags that only qualify --quantize are refused without it, not ignored.
    for flags in [&["--double-quant"][..], &["--compute-dtype", "bf16"]] {
        let mut args = lora[..6].to_vec();
        args.extend(flags);
        let out = short_run(&data, &ds, &dir.join("bad2"), &args);
        assert_eq!(out.status.code(), Some(2), "{flags:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("needs --quantize"));
    }

    // bnb_4bit_compute_dtype bf16 under the f32 model: the quantized layers compute in bf16,
    // so the first loss moves by bf16 rounding only.
    let qb = dir.join("qlora-bf16");
    let mut args = lora[..6].to_vec();
    args.extend([
        "--quantize",
        "nf4",
        "--double-quant",
        "--compute-dtype",
        "bf16",
    ]);
    args.extend(["--warmup-steps", "1"]);
    assert_ok(&short_run(&data, &ds, &qb, &args));
    let (f32_loss, bf16_loss) = (
        m[0]["loss"].as_f64().unwrap(),
        metrics(&qb)[0]["loss"].as_f64().unwrap(),
    );
    assert_ne!(f32_loss, bf16_loss, "the compute dtype was applied");
    close(bf16_loss, f32_loss, 1e-2, "bf16-compute loss");
    let mut args = lora[..6].to_vec();
    args.extend(["--quantize", "nf4", "--compute-dtype", "f64"]);
    let bad = short_run(&data, &ds, &dir.join("bad3"), &args);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("expected f32, bf16 or f16"));
}
