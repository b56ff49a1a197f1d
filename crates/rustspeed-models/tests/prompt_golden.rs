//! PEFT prompt tuning (PROMPT_TUNING) against HF PEFT on the tiny GPT-2 and LLaMA goldens from
//! tools/golden/prompt_golden.py: PEFT's adapter loads; with the virtual tokens prepended the
//! logits (virtual positions included) and the loss are PEFT's, and so is the gradient of the
//! loss with respect to the prompt embeddings (the only trainable parameter); the adapter we
//! save has PEFT's key, shape and config.
//!
//! Tolerances (f32): logits 1e-5 of the largest |logit|, loss 1e-5 relative, gradient 1e-4 of
//! its largest |value|.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rustspeed_models::hf_config::ModelConfig;
use rustspeed_models::loader::load_model_tuned;
use rustspeed_models::peft::adapter::param_counts;
use rustspeed_models::peft::prompt::PROMPT_EMBEDDINGS;
use rustspeed_models::peft::{load_adapter, prefix_batch, save_adapter, PromptTuningConfig};
use rustspeed_models::{gpt2, llama, Batch, Model, Tuning};
use safetensors::SafeTensors;
use serde_json::Value;

fn golden_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

fn f32_tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let v = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, (view.shape().to_vec(), v))
        })
        .collect()
}

struct Case {
    name: &'static str,
    base: PathBuf,
    dir: PathBuf,
    cfg: ModelConfig,
    json: Value,
}

impl Case {
    fn open(name: &'static str) -> Case {
        let dir = golden_dir(name);
        let json: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let base = golden_dir(json["model"].as_str().unwrap());
        let cfg = ModelConfig::from_path(&base).unwrap();
        Case {
            name,
            base,
            dir,
            cfg,
            json,
        }
    }

    fn tuning(&self) -> Tuning {
        let c = PromptTuningConfig::from_path(&self.dir.join("adapter")).unwrap();
        Tuning::prompt(c, &self.cfg).unwrap()
    }

    fn model(&self) -> Model<f32> {
        let mut m = load_model_tuned::<f32>(&self.base, &self.tuning(), 0)
            .unwrap()
            .model;
        load_adapter(&self.dir.join("adapter"), &mut m).unwrap();
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
        let n = self.json["num_virtual_tokens"].as_u64().unwrap() as usize;
        prefix_batch(b, ids.len() / b, &ids, &labels, n)
    }

    fn logits(&self, m: &mut Model<f32>, batch: &Batch) -> Vec<f32> {
        let rows: Vec<usize> = (0..batch.rows()).collect();
        match self.json["model"].as_str().unwrap() {
            "gpt2" => gpt2::logits(m, &self.cfg, batch, &rows),
            _ => llama::logits(m, &self.cfg, batch, &rows).unwrap(),
        }
    }
}

fn close(got: &[f32], want: &[f32], rel: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-12f32, |a, v| a.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rel * scale,
            "{what}[{i}]: {g} vs PEFT {w} (scale {scale})"
        );
    }
}

fn check(name: &'static str) {
    let case = Case::open(name);
    let mut m = case.model();
    let golden = f32_tensors(&case.dir.join("logits.safetensors"));
    let batch = case.batch();
    close(
        &case.logits(&mut m, &batch),
        &golden["logits"].1,
        1e-5,
        &format!("{name} logits"),
    );

    // Forward + backward as training runs it: PEFT's loss and prompt gradient.
    let mut grads = vec![0f32; m.params.len()];
    let scale = 1.0 / batch.label_tokens() as f32;
    let loss = m.train_forward(&mut grads, &batch, scale, 0).mean();
    m.backward(&mut grads, &batch, scale, 0);
    let want = case.json["loss"].as_f64().unwrap();
    assert!(
        ((loss - want) / want).abs() < 1e-5,
        "{name}: loss {loss} vs PEFT {want}"
    );
    let slot = m
        .layout
        .slots()
        .iter()
        .find(|s| s.spec.name == PROMPT_EMBEDDINGS)
        .unwrap()
        .clone();
    close(
        &grads[slot.range()],
        &golden["prompt_grad"].1,
        1e-4,
        &format!("{name} prompt grad"),
    );
    // Only the prompt trains; nothing else got a gradient.
    let counts = param_counts(&m);
    assert_eq!(counts.trainable as usize, slot.range().len());
    for s in m.layout.slots() {
        if s.spec.name != PROMPT_EMBEDDINGS {
            assert!(!s.spec.trainable, "{}", s.spec.name);
        }
    }

    // Saved in PEFT's format: the same key, shape and values, and the config reads back.
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-adapter"));
    let _ = std::fs::remove_dir_all(&out);
    save_adapter(&out, &m, Some("tiny")).unwrap();
    let ours = f32_tensors(&out.join("adapter_model.safetensors"));
    let peft = f32_tensors(&case.dir.join("adapter/adapter_model.safetensors"));
    assert_eq!(ours, peft, "{name}: adapter tensors");
    let mut a = PromptTuningConfig::from_path(&out).unwrap();
    let mut b = PromptTuningConfig::from_path(&case.dir.join("adapter")).unwrap();
    assert_eq!(a.base_model_name_or_path.as_deref(), Some("tiny"));
    a.base_model_name_or_path = None;
    b.base_model_name_or_path = None;
    assert_eq!(a, b, "{name}: adapter_config.json");
    println!(
        "{}: check with /work/golden-venv/bin/python tools/golden/prompt_golden.py --check {} {}",
        case.name,
        out.display(),
        case.name
    );
}

#[test]
fn gpt2_prompt_tuning_matches_peft() {
    check("prompt_gpt2");
}

#[test]
fn llama_prompt_tuning_matches_peft() {
    check("prompt_llama");
}

/// A batch without the virtual-token prefix is refused rather than silently misread.
#[test]
#[should_panic(expected = "virtual tokens must lead each row")]
fn batch_without_prefix_panics() {
    let case = Case::open("prompt_llama");
    let mut m = case.model();
    let ids: Vec<u32> = (0..8).collect();
    let labels: Vec<i32> = (0..8).collect();
    m.forward(&Batch::from_hf_labels(1, 8, ids, &labels), false, 0);
}

/// Other prompt-learning methods fail loudly, naming the peft_type.
#[test]
fn prefix_and_p_tuning_are_not_supported_yet() {
    for t in ["PREFIX_TUNING", "P_TUNING"] {
        let text = format!(r#"{{"peft_type": "{t}", "num_virtual_tokens": 4}}"#);
        let err = rustspeed_models::peft::adapter_kind("a.json", &text).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("not supported yet") && msg.contains(t),
            "{msg}"
        );
    }
}
