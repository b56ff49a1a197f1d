//! PEFT's prompt learning against HF PEFT on the tiny GPT-2 and LLaMA (grouped-query) goldens
//! from tools/golden/prompt_golden.py: prompt tuning, P-tuning (MLP and LSTM encoders), prefix tuning
//! with and without the projection. From PEFT's trained parameters (its adapter, or its
//! encoder's parameters) the logits (virtual positions included) and the loss are PEFT's, and
//! so are the gradients of every trainable parameter; the trainable / all parameter counts are
//! PEFT's; the adapter we save has PEFT's key, shape, values and config, and loaded back (as
//! PEFT loads it: the saved prompt rows, no encoder) gives the loss PEFT gives on its own saved
//! adapter.
//!
//! Tolerances (f32): logits 1e-5 of the largest |logit|, loss 1e-5 relative, gradients 1e-4 of
//! their largest |value|.

mod common;

use std::path::{Path, PathBuf};

use rustspeed_models::hf_config::ModelConfig;
use rustspeed_models::loader::load_model_tuned;
use rustspeed_models::peft::adapter::param_counts;
use rustspeed_models::peft::{load_adapter, prefix_batch, save_adapter, PromptTuningConfig};
use rustspeed_models::{gpt2, llama, Batch, Model, Tuning};
use serde_json::Value;

use common::{f32_tensors, open_case};

struct Case {
    name: &'static str,
    base: PathBuf,
    dir: PathBuf,
    cfg: ModelConfig,
    json: Value,
}

impl Case {
    fn open(name: &'static str) -> Case {
        let (base, dir, cfg, json) = open_case(name);
        Case {
            name,
            base,
            dir,
            cfg,
            json,
        }
    }

    fn config(&self) -> PromptTuningConfig {
        PromptTuningConfig::from_path(&self.dir.join("adapter")).unwrap()
    }

    /// The model as PEFT trains it: from encoder.safetensors where PEFT has an encoder, else
    /// from PEFT's adapter (the prompt rows are the trained parameter).
    fn model(&self) -> Model<f32> {
        let tuning = Tuning::prompt(self.config(), &self.cfg).unwrap();
        let mut m = load_model_tuned::<f32>(&self.base, &tuning, 0)
            .unwrap()
            .model;
        let encoder = self.dir.join("encoder.safetensors");
        if encoder.exists() {
            for (name, (shape, values)) in f32_tensors(&encoder) {
                let slot = m
                    .layout
                    .get(&name)
                    .unwrap_or_else(|| panic!("{name}"))
                    .clone();
                assert_eq!(slot.spec.shape, shape, "{name}");
                m.params[slot.range()].copy_from_slice(&values);
            }
        } else {
            load_adapter(&self.dir.join("adapter"), &mut m).unwrap();
        }
        m
    }

    /// A saved adapter loaded as PEFT loads one: the prompt rows, no encoder.
    fn saved_model(&self, dir: &Path) -> Model<f32> {
        let mut c = PromptTuningConfig::from_path(dir).unwrap();
        c.saved_form = true;
        let tuning = Tuning::prompt(c, &self.cfg).unwrap();
        let mut m = load_model_tuned::<f32>(&self.base, &tuning, 0)
            .unwrap()
            .model;
        load_adapter(dir, &mut m).unwrap();
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
        let tuning = Tuning::prompt(self.config(), &self.cfg).unwrap();
        prefix_batch(b, ids.len() / b, &ids, &labels, tuning.virtual_tokens())
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

fn loss_close(got: f64, want: f64, what: &str) {
    assert!(
        ((got - want) / want).abs() < 1e-5,
        "{what}: loss {got} vs PEFT {want}"
    );
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

    // Forward + backward as training runs it: PEFT's loss and gradients.
    let mut grads = vec![0f32; m.params.len()];
    let scale = 1.0 / batch.label_tokens() as f32;
    let loss = m.train_forward(&mut grads, &batch, scale, 0).mean();
    m.backward(&mut grads, &batch, scale, 0);
    loss_close(loss, case.json["loss"].as_f64().unwrap(), name);
    let trainable: Vec<_> = m
        .layout
        .slots()
        .iter()
        .filter(|s| s.spec.trainable)
        .cloned()
        .collect();
    let want: Vec<&String> = golden.keys().filter(|k| k.starts_with("grad.")).collect();
    assert_eq!(
        trainable.len(),
        want.len(),
        "{name}: trainable parameters {want:?}"
    );
    for slot in &trainable {
        let g = &golden[&format!("grad.{}", slot.spec.name)];
        assert_eq!(g.0, slot.spec.shape, "{name}: {}", slot.spec.name);
        close(
            &grads[slot.range()],
            &g.1,
            1e-4,
            &format!("{name} grad {}", slot.spec.name),
        );
    }
    // Activation checkpointing recomputes the blocks (which read the shared prefix) in
    // backward: the same gradients.
    let mut ckpt = case.model();
    ckpt.enable_gradient_checkpointing();
    let mut g2 = vec![0f32; ckpt.params.len()];
    ckpt.train_forward(&mut g2, &batch, scale, 0);
    ckpt.backward(&mut g2, &batch, scale, 0);
    assert_eq!(g2, grads, "{name}: gradients with checkpointing");
    // PEFT's print_trainable_parameters numbers.
    let counts = param_counts(&m);
    assert_eq!(
        counts.trainable,
        case.json["trainable_params"].as_u64().unwrap()
    );
    assert_eq!(counts.total, case.json["all_params"].as_u64().unwrap());

    // Saved in PEFT's format: the same key, shape and values, and the config reads back.
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-adapter"));
    let _ = std::fs::remove_dir_all(&out);
    save_adapter(&out, &m, Some("tiny")).unwrap();
    let ours = f32_tensors(&out.join("adapter_model.safetensors"));
    let peft = f32_tensors(&case.dir.join("adapter/adapter_model.safetensors"));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        peft.keys().collect::<Vec<_>>()
    );
    for (k, (shape, v)) in &peft {
        assert_eq!(&ours[k].0, shape, "{name}: {k}");
        close(&ours[k].1, v, 1e-6, &format!("{name} saved {k}"));
    }
    let mut a = PromptTuningConfig::from_path(&out).unwrap();
    let mut b = case.config();
    assert_eq!(a.base_model_name_or_path.as_deref(), Some("tiny"));
    a.base_model_name_or_path = None;
    b.base_model_name_or_path = None;
    // PEFT writes the defaults it filled in (token_dim, heads, layers, encoder width).
    let filled = Tuning::prompt(b, &case.cfg).unwrap();
    assert_eq!(
        &a,
        filled.prompt_config().unwrap(),
        "{name}: adapter_config.json"
    );

    // Loaded back as PEFT loads it: the loss PEFT gives on its saved adapter.
    let mut saved = case.saved_model(&out);
    let reloaded = saved.forward(&batch, false, 0).mean();
    loss_close(
        reloaded,
        case.json["saved_adapter_loss"].as_f64().unwrap(),
        &format!("{name} reloaded"),
    );
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

#[test]
fn gpt2_p_tuning_matches_peft() {
    check("ptuning_gpt2");
}

#[test]
fn llama_p_tuning_matches_peft() {
    check("ptuning_llama");
}

#[test]
fn gpt2_p_tuning_lstm_matches_peft() {
    check("ptuninglstm_gpt2");
}

#[test]
fn llama_p_tuning_lstm_matches_peft() {
    check("ptuninglstm_llama");
}

#[test]
fn gpt2_prefix_tuning_matches_peft() {
    check("prefix_gpt2");
}

#[test]
fn llama_prefix_tuning_with_grouped_kv_heads_matches_peft() {
    check("prefix_llama");
}

#[test]
fn gpt2_prefix_projection_matches_peft() {
    check("prefixproj_gpt2");
}

#[test]
fn llama_prefix_projection_matches_peft() {
    check("prefixproj_llama");
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

/// What is recognised but not implemented fails loudly, naming the file, key and value.
#[test]
fn unimplemented_prompt_options_are_refused() {
    for (text, key) in [
        (
            r#"{"peft_type": "P_TUNING", "num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM", "encoder_dropout": 0.1}"#,
            "encoder_dropout",
        ),
        (
            r#"{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "num_transformer_submodules": 2}"#,
            "num_transformer_submodules",
        ),
        (
            r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "task_type": "SEQ_2_SEQ_LM"}"#,
            "task_type",
        ),
    ] {
        let msg = PromptTuningConfig::from_json_str("a.json", text)
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("not supported yet") && msg.contains("a.json") && msg.contains(key),
            "{msg}"
        );
    }
    // A key of another method is not silently ignored.
    let msg = PromptTuningConfig::from_json_str(
        "a.json",
        r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "prefix_projection": true}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("prefix_projection"), "{msg}");
}

/// An adapter made for another model (or the wrong GQA shape) is refused with the reason.
#[test]
fn prefix_shapes_must_fit_the_model() {
    let case = Case::open("prefix_llama");
    let mut c = case.config();
    assert_eq!(
        c.token_dim,
        Some(16),
        "PEFT: num_key_value_heads * head_dim"
    );
    assert_eq!(c.num_attention_heads, Some(2));
    c.token_dim = Some(32);
    let msg = Tuning::prompt(c, &case.cfg).unwrap_err().to_string();
    assert!(msg.contains("token_dim") && msg.contains("16"), "{msg}");
}
