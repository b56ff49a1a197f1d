//! `rustspeed merge-lora` against PEFT's `merge_and_unload()` on the tiny GPT-2 (Conv1D,
//! lora_only biases) and LLaMA (all-linear, rsLoRA, a trained lm_head) goldens of
//! rustspeed-models (tools/golden/lora_golden.py), and against the merged model
//! `rustspeed train --merge` writes.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

fn models_golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../rustspeed-models/tests/golden")
        .join(name)
}

/// Every tensor of a safetensors file as f32 (bf16/f16 widened), with its stored dtype.
fn tensors(path: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let d = view.data();
            let v: Vec<f32> = match view.dtype() {
                Dtype::F32 => d
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                Dtype::BF16 => d
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                Dtype::F16 => d
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (name, (view.dtype(), view.shape().to_vec(), v))
        })
        .collect()
}

fn merge(model: &Path, adapter: &Path, out: &Path, dtype: Option<&str>) -> Output {
    let mut args = vec![
        "merge-lora",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    if let Some(d) = dtype {
        args.extend(["--dtype", d]);
    }
    rustspeed(&args)
}

/// merge-lora's weights equal PEFT's merge_and_unload (f32: 1e-6 of each tensor's largest
/// |value|; bf16: PEFT's value rounded to bf16, within one bf16 step).
fn check_against_peft(case: &str, base: &str) {
    let dir = tempdir(case);
    let golden = models_golden(case);
    let want = tensors(&golden.join("merged.safetensors"));
    for dtype in [None, Some("bf16")] {
        let out = dir.join(dtype.unwrap_or("default"));
        assert_ok(&merge(
            &models_golden(base),
            &golden.join("adapter"),
            &out,
            dtype,
        ));
        assert!(out.join("config.json").is_file());
        let got = tensors(&out.join("model.safetensors"));
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{case}: tensor names"
        );
        for (name, (_, shape, w)) in &want {
            let (dt, gshape, g) = &got[name];
            assert_eq!(gshape, shape, "{case}: {name} shape");
            let scale = w.iter().fold(1e-12f32, |a, v| a.max(v.abs()));
            let (want_dt, tol) = match dtype {
                // The tiny bases are float32 in config.json, so that is the default.
                None => (Dtype::F32, 1e-6 * scale),
                _ => (Dtype::BF16, scale / 128.0),
            };
            assert_eq!(*dt, want_dt, "{case}: {name} dtype");
            for (i, (g, w)) in g.iter().zip(w).enumerate() {
                assert!(
                    (g - w).abs() <= tol,
                    "{case} {dtype:?}: merged `{name}`[{i}] {g} vs PEFT {w}"
                );
            }
        }
    }
}

#[test]
fn gpt2_merge_lora_equals_pefts_merge_and_unload() {
    check_against_peft("lora_gpt2", "gpt2");
}

#[test]
fn llama_merge_lora_equals_pefts_merge_and_unload() {
    check_against_peft("lora_llama", "llama");
}

/// `train --merge` and a standalone merge of the adapter it saved write the same weights.
#[test]
fn merge_lora_equals_train_merge() {
    let dir = tempdir("train");
    let train_golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/train");
    let model = train_golden.join("model");
    let ds = dir.join("ds.json");
    std::fs::write(
        &ds,
        r#"{"train_batch_size": 4, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}"#,
    )
    .unwrap();
    let out = dir.join("run");
    let data = train_golden.join("text.jsonl");
    assert_ok(&run_args(&with(
        train_args(&model, &data, &ds, &out),
        &[
            "--max-steps",
            "2",
            "--save-steps",
            "0",
            "--block-size",
            "16",
            "--warmup-steps",
            "1",
            "--lora-r",
            "4",
            "--lora-alpha",
            "8",
            "--lora-target-modules",
            "c_attn,c_proj,c_fc",
            "--merge",
        ],
    )));
    let standalone = dir.join("standalone");
    assert_ok(&merge(&model, &out.join("final"), &standalone, None));
    let a = tensors(&out.join("merged/model.safetensors"));
    let b = tensors(&standalone.join("model.safetensors"));
    assert_eq!(a, b, "train --merge and merge-lora differ");
    // The adapter trained (B moved off zero), so the merge changed the base.
    let base = tensors(&model.join("model.safetensors"));
    let w = "transformer.h.0.attn.c_attn.weight";
    assert_ne!(base[w].2, a[w].2, "{w}: the merge left the base unchanged");
    for f in ["tokenizer.json", "config.json"] {
        assert!(standalone.join(f).is_file(), "{f} not written");
    }
}

#[test]
fn bad_inputs_are_usage_errors() {
    let dir = tempdir("bad");
    let base = models_golden("gpt2");
    // No adapter there.
    let r = merge(&base, &dir, &dir.join("o"), None);
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("adapter_config.json"));
    // An adapter for a different architecture: its target modules do not exist.
    let r = merge(
        &base,
        &models_golden("lora_llama/adapter"),
        &dir.join("o2"),
        None,
    );
    assert_eq!(
        r.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    // Output over an input.
    let r = merge(&base, &models_golden("lora_gpt2/adapter"), &base, None);
    assert_eq!(r.status.code(), Some(2));
}
