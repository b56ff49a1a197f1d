//! Parity with HF PEFT on the tiny GPT-2 and LLaMA goldens, recorded by
//! tools/golden/lora_golden.py: a PEFT adapter (non-zero B, trained biases, a trained lm_head)
//! loaded onto its base gives PEFT's logits and loss; merging gives `merge_and_unload`'s weights;
//! the adapter we save has PEFT's keys, shapes and config, and the merged directory we write
//! loads as a plain model with the adapted model's loss.
//!
//! Tolerances (f32): logits 1e-5 of the largest |logit|, loss 1e-5 relative, merged weights
//! 1e-6 of each tensor's largest |value|.
//!
//! The test also leaves our re-saved adapter and its eval loss under the cargo target dir; the
//! golden script checks that PEFT loads it and agrees (`lora_golden.py --check DIR`, the path is
//! printed).

mod common;

use std::path::{Path, PathBuf};

use rustspeed_kernels::DType;
use rustspeed_models::hf_config::ModelConfig;
use rustspeed_models::loader::{load_model, load_model_tuned};
use rustspeed_models::peft::adapter::{param_counts, WEIGHTS_FILE};
use rustspeed_models::peft::merge::{merge_adapter_dir, merge_lora};
use rustspeed_models::peft::{load_adapter, save_adapter, LoraConfig};
use rustspeed_models::{gpt2, llama, Batch, Model, Tuning};
use serde_json::Value;

use common::{f32_tensors, open_case};

struct Case {
    base: PathBuf,
    dir: PathBuf,
    cfg: ModelConfig,
    json: Value,
}

impl Case {
    fn open(name: &'static str) -> Case {
        let (base, dir, cfg, json) = open_case(name);
        Case {
            base,
            dir,
            cfg,
            json,
        }
    }

    fn adapter(&self) -> PathBuf {
        self.dir.join("adapter")
    }

    fn tuning(&self) -> Tuning {
        Tuning::lora(LoraConfig::from_path(&self.adapter()).unwrap(), &self.cfg).unwrap()
    }

    /// The base with PEFT's adapter loaded.
    fn model(&self) -> Model<f32> {
        let mut m = load_model_tuned::<f32>(&self.base, &self.tuning(), 0)
            .unwrap()
            .model;
        load_adapter(&self.adapter(), &mut m).unwrap();
        m
    }

    fn batch(&self) -> Batch {
        let rows = |k: &str| -> Vec<i64> {
            self.json[k]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()))
                .collect()
        };
        let ids: Vec<u32> = rows("input_ids").iter().map(|&x| x as u32).collect();
        let labels: Vec<i32> = rows("labels").iter().map(|&x| x as i32).collect();
        let b = self.json["input_ids"].as_array().unwrap().len();
        Batch::from_hf_labels(b, ids.len() / b, ids, &labels)
    }

    fn logits(&self, m: &mut Model<f32>, batch: &Batch) -> Vec<f32> {
        let rows: Vec<usize> = (0..batch.rows()).collect();
        match self.json["model"].as_str().unwrap() {
            "gpt2" => gpt2::logits(m, &self.cfg, batch, &rows),
            _ => llama::logits(m, &self.cfg, batch, &rows).unwrap(),
        }
    }
}

fn check_logits_and_loss(name: &'static str) {
    let case = Case::open(name);
    let mut m = case.model();
    let batch = case.batch();
    let got = case.logits(&mut m, &batch);
    let want = &f32_tensors(&case.dir.join("logits.safetensors"))["logits"].1;
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= 1e-5 * scale,
        "{name}: logits differ from PEFT's by {worst} (max |logit| {scale})"
    );
    let loss = m.forward(&batch, false, 0).mean();
    let want_loss = case.json["loss"].as_f64().unwrap();
    assert!(
        (loss - want_loss).abs() <= 1e-5 * want_loss,
        "{name}: loss {loss} vs PEFT {want_loss}"
    );
    // PEFT's print_trainable_parameters; its total also counts the second copy of each
    // modules_to_save module, which we do not make.
    let counts = param_counts(&m);
    assert_eq!(
        counts.trainable,
        case.json["trainable_params"].as_u64().unwrap()
    );
    let copies: u64 = if name == "lora_llama" {
        (case.cfg.vocab_size * case.cfg.hidden_size) as u64
    } else {
        0
    };
    assert_eq!(
        counts.total + copies,
        case.json["all_params"].as_u64().unwrap()
    );
}

#[test]
fn gpt2_adapter_gives_pefts_logits_and_loss() {
    check_logits_and_loss("lora_gpt2");
}

#[test]
fn llama_adapter_gives_pefts_logits_and_loss() {
    check_logits_and_loss("lora_llama");
}

fn check_merge(name: &'static str) {
    let case = Case::open(name);
    let m = case.model();
    let merged = merge_lora(&m, &case.cfg).unwrap();
    let want = f32_tensors(&case.dir.join("merged.safetensors"));
    assert_eq!(
        merged.layout.slots().len(),
        want.len(),
        "{name}: tensor count"
    );
    for slot in merged.layout.slots() {
        let (shape, w) = &want[&slot.spec.name];
        assert_eq!(shape, &slot.spec.shape);
        let got = &merged.params[slot.range()];
        let scale = w.iter().fold(1e-12f32, |a, v| a.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(w).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * scale,
                "{name}: merged `{}`[{i}] {g} vs PEFT {w}",
                slot.spec.name
            );
        }
    }

    // The merged HF directory loads as a plain model with the adapted model's loss.
    let out = scratch(&format!("{name}-merged"));
    merge_adapter_dir(&case.base, &case.adapter(), &out, DType::F32).unwrap();
    let mut plain = load_model::<f32>(&out).unwrap().model;
    let mut adapted = m;
    let batch = case.batch();
    let a = adapted.forward(&batch, false, 0).mean();
    let p = plain.forward(&batch, false, 0).mean();
    assert!(
        (a - p).abs() <= 1e-5 * a,
        "{name}: merged loss {p} vs adapted {a}"
    );
}

#[test]
fn gpt2_merge_equals_pefts_merge_and_unload() {
    check_merge("lora_gpt2");
}

#[test]
fn llama_merge_equals_pefts_merge_and_unload() {
    check_merge("lora_llama");
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn check_save_round_trip(name: &'static str) {
    let case = Case::open(name);
    let m = case.model();
    let out = scratch(&format!("{name}-adapter"));
    let files = save_adapter(&out, &m, Some("tiny")).unwrap();
    // Same keys, shapes and values as PEFT's own file.
    let ours = f32_tensors(&files.weights);
    let peft = f32_tensors(&case.adapter().join(WEIGHTS_FILE));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        peft.keys().collect::<Vec<_>>(),
        "{name}: adapter keys"
    );
    for (k, (shape, v)) in &peft {
        assert_eq!(&ours[k].0, shape, "{k}");
        assert_eq!(&ours[k].1, v, "{k}");
    }
    // The config reads back as PEFT's, but for where the base lives.
    let mut ours_cfg = LoraConfig::from_path(&out).unwrap();
    let mut peft_cfg = LoraConfig::from_path(&case.adapter()).unwrap();
    assert_eq!(ours_cfg.base_model_name_or_path.as_deref(), Some("tiny"));
    ours_cfg.base_model_name_or_path = None;
    peft_cfg.base_model_name_or_path = None;
    peft_cfg.task_type = Some("CAUSAL_LM".into());
    // PEFT writes the resolved all-linear list as a set (no fixed order).
    for c in [&mut ours_cfg, &mut peft_cfg] {
        if let Some(rustspeed_models::peft::TargetModules::List(l)) = &mut c.target_modules {
            l.sort();
        }
    }
    assert_eq!(ours_cfg, peft_cfg, "{name}: adapter_config.json");
    // And it loads back into a fresh model, identically.
    let mut again = load_model_tuned::<f32>(&case.base, &case.tuning(), 99)
        .unwrap()
        .model;
    load_adapter(&out, &mut again).unwrap();
    assert_eq!(again.params, m.params);

    let mut m = m;
    let loss = m.forward(&case.batch(), false, 0).mean();
    let eval = serde_json::json!({"case": name, "loss": loss});
    std::fs::write(out.join("rustspeed_eval.json"), eval.to_string()).unwrap();
    println!(
        "{name}: check with /work/golden-venv/bin/python tools/golden/lora_golden.py --check {}",
        out.display()
    );
}

#[test]
fn gpt2_saved_adapter_is_pefts_format() {
    check_save_round_trip("lora_gpt2");
}

#[test]
fn llama_saved_adapter_is_pefts_format() {
    check_save_round_trip("lora_llama");
}
