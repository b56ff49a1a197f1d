//! PEFT's prompt learning through the command line: `rustspeed train` with
//! `--num-virtual-tokens` or a `--peft-config` of each method (prompt tuning, P-tuning, prefix
//! tuning with and without projection) lowers the loss and writes PEFT's adapter; `--adapter`
//! continues what PEFT's format allows; TEXT initialisation equals PEFT's
//! (tools/golden/prompt_golden.py); and `rustspeed eval --adapter` gives the loss PEFT gives
//! with each golden adapter.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

fn models_golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../rustspeed-models/tests/golden")
        .join(name)
}

fn write(dir: &Path, name: &str, v: Value) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, v.to_string()).unwrap();
    path
}

/// The f32 tensors of a safetensors file: name -> (shape, values).
fn tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            let vals = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (n, v.shape().to_vec(), vals)
        })
        .collect()
}

/// A 20-step run on the CLI golden text with evaluation on the same text at 0 and 20.
fn run(dir: &Path, tag: &str, lr: f64, steps: &str, extra: &[&str]) -> (PathBuf, Output) {
    let ds = write(
        dir,
        &format!("ds-{tag}.json"),
        serde_json::json!({"train_batch_size": 4, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": lr}}}),
    );
    let data = train_golden().join("text.jsonl");
    let out = dir.join(tag);
    let args = with(
        train_args(&train_golden().join("model"), &data, &ds, &out),
        &[
            "--max-steps",
            steps,
            "--save-steps",
            "0",
            "--block-size",
            "16",
            "--eval-data",
            data.to_str().unwrap(),
            "--eval-on-start",
            "--eval-steps",
            "20",
        ],
    );
    let output = run_args(&with(args, extra));
    (out, output)
}

fn eval_loss(model: &Path, data: &Path, adapter: Option<&Path>) -> (f64, u64) {
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    let out = rustspeed(&args);
    assert_ok(&out);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    (v["loss"].as_f64().unwrap(), v["tokens"].as_u64().unwrap())
}

/// (tag, flags, peft_type, saved shape, trainable parameters).
type Case = (&'static str, Vec<String>, &'static str, [usize; 2], u64);

#[test]
fn each_method_trains_and_writes_a_peft_adapter() {
    let dir = tempdir("prompt-methods");
    // (tag, flags, peft_type, saved shape, PEFT's trainable parameter count on this model:
    // n * d; + the MLP d->16->16->d; + the LSTM and its MLP; n * 2 layers * 2 * d; + the
    // projection d->16->128).
    let cases: Vec<Case> = vec![
        (
            "prompt",
            vec!["--num-virtual-tokens".into(), "4".into()],
            "PROMPT_TUNING",
            [4, 32],
            128,
        ),
        (
            "ptuning",
            vec![
                "--peft-config".into(),
                write(
                    &dir,
                    "ptuning.json",
                    serde_json::json!({"peft_type": "P_TUNING", "task_type": "CAUSAL_LM",
                        "num_virtual_tokens": 4, "encoder_hidden_size": 16}),
                )
                .display()
                .to_string(),
            ],
            "P_TUNING",
            [4, 32],
            128 + (32 * 16 + 16) + (16 * 16 + 16) + (16 * 32 + 32),
        ),
        (
            "ptuninglstm",
            vec![
                "--peft-config".into(),
                write(
                    &dir,
                    "ptuninglstm.json",
                    serde_json::json!({"peft_type": "P_TUNING", "task_type": "CAUSAL_LM",
                        "num_virtual_tokens": 4, "encoder_hidden_size": 16,
                        "encoder_reparameterization_type": "LSTM"}),
                )
                .display()
                .to_string(),
            ],
            "P_TUNING",
            [4, 32],
            // 2 layers x 2 directions x (W_ih [64, 32] + W_hh [64, 16] + 2 biases [64]).
            128 + 4 * (64 * 32 + 64 * 16 + 128) + 2 * (32 * 32 + 32),
        ),
        (
            "prefix",
            vec![
                "--peft-config".into(),
                write(
                    &dir,
                    "prefix.json",
                    serde_json::json!({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
                        "num_virtual_tokens": 4}),
                )
                .display()
                .to_string(),
            ],
            "PREFIX_TUNING",
            [4, 128],
            512,
        ),
        (
            "prefixproj",
            vec![
                "--peft-config".into(),
                write(
                    &dir,
                    "prefixproj.json",
                    serde_json::json!({"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
                        "num_virtual_tokens": 4, "prefix_projection": true,
                        "encoder_hidden_size": 16}),
                )
                .display()
                .to_string(),
            ],
            "PREFIX_TUNING",
            [4, 128],
            128 + (32 * 16 + 16) + (16 * 128 + 128),
        ),
    ];
    let model = train_golden().join("model");
    let data = train_golden().join("text.jsonl");
    for (tag, flags, peft_type, shape, trainable) in cases {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let (out, result) = run(&dir, tag, 0.1, "20", &flags);
        assert_ok(&result);
        let stderr = String::from_utf8_lossy(&result.stderr);
        // PEFT's print_trainable_parameters line, its count with thousands separators.
        let counted = stderr
            .split("trainable params: ")
            .nth(1)
            .and_then(|rest| rest.split(" ||").next())
            .unwrap_or_else(|| panic!("{tag}: no trainable-params line in {stderr}"));
        assert!(
            counted.contains(',') || trainable < 1000,
            "{tag}: {counted}"
        );
        assert_eq!(
            counted.replace(',', "").parse::<u64>().unwrap(),
            trainable,
            "{tag}"
        );

        // The loss on the training text fell.
        let evals: Vec<f64> = metrics(&out)
            .iter()
            .filter_map(|m| m["eval_loss"].as_f64())
            .collect();
        assert_eq!(evals.len(), 2, "{tag}");
        assert!(
            evals[1] < evals[0] - 1e-3,
            "{tag}: eval loss {} -> {}",
            evals[0],
            evals[1]
        );

        // PEFT's adapter: only prompt_embeddings (an encoder's output where there is one).
        let final_dir = out.join("final");
        let c = read_json(&final_dir.join("adapter_config.json"));
        assert_eq!(c["peft_type"], peft_type, "{tag}");
        assert_eq!(c["num_virtual_tokens"], 4, "{tag}");
        let t = tensors(&final_dir.join("adapter_model.safetensors"));
        assert_eq!(t.len(), 1, "{tag}");
        assert_eq!(
            (t[0].0.as_str(), &t[0].1[..]),
            ("prompt_embeddings", &shape[..])
        );

        // `rustspeed eval --adapter`: the trained prompt beats the one it started from (the
        // same seed's initialisation, written by a run that does not move it).
        let (init, r0) = run(&dir, &format!("{tag}-init"), 0.0, "1", &flags);
        assert_ok(&r0);
        let (trained, tokens) = eval_loss(&model, &data, Some(&final_dir));
        let (start, _) = eval_loss(&model, &data, Some(&init.join("final")));
        assert!(trained < start - 1e-3, "{tag}: eval {start} -> {trained}");
        // Prompt tuning and P-tuning also predict each text's first token (from the prompt).
        let (_, plain_tokens) = eval_loss(&model, &data, None);
        let texts = 30;
        let want = if tag.starts_with("prefix") {
            plain_tokens
        } else {
            plain_tokens + texts
        };
        assert_eq!(tokens, want, "{tag}: tokens counted");

        // Continuing: the trained parameter is what PEFT saves only without an encoder.
        let adapter = final_dir.display().to_string();
        let (_, more) = run(
            &dir,
            &format!("{tag}-more"),
            0.1,
            "1",
            &["--adapter", &adapter],
        );
        if tag == "prompt" || tag == "prefix" {
            assert_ok(&more);
        } else {
            assert_eq!(more.status.code(), Some(2), "{tag}");
            let e = String::from_utf8_lossy(&more.stderr);
            assert!(e.contains("not supported yet"), "{tag}: {e}");
        }
    }
}

/// prompt_tuning_init TEXT: the word embeddings of the text's tokens, repeated, as PEFT.
#[test]
fn text_initialisation_is_pefts() {
    let dir = tempdir("prompt-text");
    let config = write(
        &dir,
        "text.json",
        serde_json::json!({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
            "num_virtual_tokens": 6, "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": "the fox"}),
    );
    // Learning rate 0: the saved prompt is the initial one.
    let (out, result) = run(
        &dir,
        "text",
        0.0,
        "1",
        &["--peft-config", config.to_str().unwrap()],
    );
    assert_ok(&result);
    let ours = tensors(&out.join("final/adapter_model.safetensors"));
    let peft = tensors(&train_golden().join("prompt_text_init.safetensors"));
    assert_eq!(ours, peft);
    // PEFT needs the tokenizer named to load a TEXT config: the base model's.
    let c = read_json(&out.join("final/adapter_config.json"));
    assert_eq!(
        c["tokenizer_name_or_path"].as_str(),
        Some(train_golden().join("model").to_str().unwrap())
    );
}

#[test]
fn what_prompt_learning_cannot_do_is_refused() {
    let dir = tempdir("prompt-refused");
    let lstm = write(
        &dir,
        "lstm.json",
        serde_json::json!({"peft_type": "P_TUNING", "num_virtual_tokens": 4,
            "encoder_reparameterization_type": "LSTM", "encoder_dropout": 0.1}),
    );
    for (tag, flags, says) in [
        (
            "merge",
            vec!["--num-virtual-tokens", "4", "--merge"],
            "--merge needs LoRA",
        ),
        (
            "quantize",
            vec!["--num-virtual-tokens", "4", "--quantize", "nf4"],
            "not supported yet",
        ),
        (
            "both",
            vec!["--num-virtual-tokens", "4", "--lora-r", "4"],
            "one way",
        ),
        (
            "lstm",
            vec!["--peft-config", lstm.to_str().unwrap()],
            "not supported yet",
        ),
        ("zero", vec!["--num-virtual-tokens", "0"], "0"),
    ] {
        let (_, out) = run(&dir, tag, 0.1, "1", &flags);
        assert_eq!(out.status.code(), Some(2), "{tag}");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(says), "{tag}: {e}");
    }
}

/// `eval --adapter` with PEFT's own adapters (tools/golden/prompt_golden.py) on their batch
/// gives the loss PeftModel.from_pretrained gives.
#[test]
fn eval_with_pefts_prompt_adapters_gives_pefts_loss() {
    let dir = tempdir("prompt-eval");
    for method in ["prompt", "ptuning", "ptuninglstm", "prefix", "prefixproj"] {
        for base in ["gpt2", "llama"] {
            let case = format!("{method}_{base}");
            let g = read_json(&models_golden(&case).join("golden.json"));
            let mut lines = String::new();
            for (i, l) in g["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .zip(g["labels"].as_array().unwrap())
            {
                lines.push_str(&serde_json::json!({"input_ids": i, "labels": l}).to_string());
                lines.push('\n');
            }
            let data = dir.join(format!("{case}.jsonl"));
            std::fs::write(&data, lines).unwrap();
            let adapter = models_golden(&case).join("adapter");
            let (loss, _) = eval_loss(&models_golden(base), &data, Some(&adapter));
            let want = g["saved_adapter_loss"].as_f64().unwrap();
            assert!(
                ((loss - want) / want).abs() < 1e-5,
                "{case}: eval --adapter {loss} vs PEFT {want}"
            );
        }
    }
}
