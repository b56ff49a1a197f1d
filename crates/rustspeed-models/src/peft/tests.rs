//! LoRA inside whole models: gradients against finite differences, frozen parameters untouched,
//! a fresh adapter equal to the base, save/load/merge round trips.

use super::*;
use crate::hf_config::ModelConfig;
use crate::init::NormalRng;
use crate::layer::Batch;
use crate::loader::build_model_tuned;
use crate::model::Model;
use crate::tuning::{is_adapter_param, Tuning};

const GPT2_JSON: &str = r#"{"model_type": "gpt2", "vocab_size": 11, "n_embd": 8, "n_head": 2,
    "n_layer": 2, "n_positions": 8, "n_inner": 16, "embd_pdrop": 0.0, "resid_pdrop": 0.1,
    "attn_pdrop": 0.0}"#;

const LLAMA_JSON: &str = r#"{"model_type": "llama", "vocab_size": 20, "hidden_size": 16,
    "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "tie_word_embeddings": false, "attention_bias": true}"#;

pub(crate) fn gpt2_cfg() -> ModelConfig {
    ModelConfig::from_json_str("gpt2", GPT2_JSON).unwrap()
}

pub(crate) fn llama_cfg() -> ModelConfig {
    ModelConfig::from_json_str("llama", LLAMA_JSON).unwrap()
}

pub(crate) fn lora(json: &str, cfg: &ModelConfig) -> Tuning {
    Tuning::lora(LoraConfig::from_json_str("test", json).unwrap(), cfg).unwrap()
}

/// Every parameter random (adapters included, so B is not zero and every path matters).
pub(crate) fn random_model(cfg: &ModelConfig, tuning: &Tuning, seed: u64) -> Model<f32> {
    let mut m = build_model_tuned::<f32>(cfg, tuning).unwrap();
    let mut rng = NormalRng::new(seed);
    for slot in m.layout.slots().to_vec() {
        let norm = slot.spec.shape.len() == 1 && !slot.spec.name.ends_with(".bias");
        for v in &mut m.params[slot.range()] {
            let z = rng.normal() as f32;
            *v = if norm { 1.0 + 0.1 * z } else { 0.3 * z };
        }
    }
    m
}

pub(crate) fn batch(vocab: usize, seed: u64) -> Batch {
    let mut rng = NormalRng::new(seed);
    let ids: Vec<u32> = (0..14)
        .map(|_| (rng.next_u64() % vocab as u64) as u32)
        .collect();
    let mut labels: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    labels[2] = crate::IGNORE_INDEX;
    Batch::from_hf_labels(2, 7, ids, &labels)
}

/// Finite differences of the mean loss for a few entries of every trainable parameter, and
/// exactly zero gradient for every frozen one (the layers never write there).
fn check_lora_gradients(cfg: &ModelConfig, tuning: &Tuning, seed: u64) {
    let mut m = random_model(cfg, tuning, seed);
    let b = batch(cfg.vocab_size, seed + 1);
    let dseed = 5;
    let tokens = b.label_tokens() as f32;
    let mut grads = vec![0f32; m.params.len()];
    m.forward_backward(&mut grads, &b, 1.0 / tokens, dseed);
    let mut rng = NormalRng::new(seed + 2);
    let eps = 1e-2f32;
    let mut checked = 0;
    for slot in m.layout.slots().to_vec() {
        let range = slot.range();
        if !slot.spec.trainable {
            assert!(
                grads[range].iter().all(|&g| g == 0.0),
                "frozen `{}` got a gradient",
                slot.spec.name
            );
            continue;
        }
        let scale = grads[range.clone()]
            .iter()
            .fold(1e-3f32, |a, v| a.max(v.abs()));
        for _ in 0..4 {
            let i = range.start + (rng.next_u64() % range.len() as u64) as usize;
            let orig = m.params[i];
            m.params[i] = orig + eps;
            let plus = m.forward(&b, true, dseed).mean();
            m.params[i] = orig - eps;
            let minus = m.forward(&b, true, dseed).mean();
            m.params[i] = orig;
            let numeric = ((plus - minus) / (2.0 * eps as f64)) as f32;
            assert!(
                (grads[i] - numeric).abs() <= 2e-2 * scale,
                "{}[{}]: analytic {} vs numeric {numeric} (tensor max {scale})",
                slot.spec.name,
                i - range.start,
                grads[i]
            );
            checked += 1;
        }
    }
    assert!(checked > 0);
}

#[test]
fn gpt2_lora_gradients_match_finite_differences_and_base_gets_none() {
    let cfg = gpt2_cfg();
    let t = lora(
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 6, "lora_dropout": 0.2,
            "target_modules": ["c_attn", "c_proj", "c_fc"], "bias": "lora_only"}"#,
        &cfg,
    );
    let m = build_model_tuned::<f32>(&cfg, &t).unwrap();
    let trainable: Vec<&str> = m
        .layout
        .slots()
        .iter()
        .filter(|s| s.spec.trainable)
        .map(|s| s.spec.name.as_str())
        .collect();
    // 4 adapted modules per block (attn.c_proj and mlp.c_proj both match "c_proj"), A, B and
    // the module's bias each.
    assert_eq!(trainable.len(), 2 * 4 * 3, "{trainable:?}");
    assert!(trainable.contains(&"transformer.h.1.mlp.c_proj.lora_B.weight"));
    assert!(trainable.contains(&"transformer.h.0.attn.c_attn.bias"));
    check_lora_gradients(&cfg, &t, 3);
}

#[test]
fn llama_lora_gradients_match_finite_differences_rslora_modules_to_save() {
    let cfg = llama_cfg();
    let t = lora(
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 4, "use_rslora": true,
            "lora_dropout": 0.1, "target_modules": "all-linear", "modules_to_save": ["lm_head"],
            "bias": "all"}"#,
        &cfg,
    );
    let plan = t.lora_plan().unwrap();
    assert_eq!(plan.resolved.lora.len(), 2 * 7);
    assert_eq!(
        plan.resolved.lora["model.layers.0.mlp.up_proj"].scale, 2.0,
        "rsLoRA: alpha / sqrt(r)"
    );
    check_lora_gradients(&cfg, &t, 7);
}

#[test]
fn a_fresh_adapter_leaves_the_model_unchanged() {
    for cfg in [gpt2_cfg(), llama_cfg()] {
        let base_tuning = Tuning::full();
        let base = random_model(&cfg, &base_tuning, 11);
        let t = lora(
            r#"{"peft_type": "LORA", "target_modules": "all-linear", "r": 3}"#,
            &cfg,
        );
        let mut m = build_model_tuned::<f32>(&cfg, &t).unwrap();
        for slot in base.layout.slots() {
            m.param_mut(&slot.spec.name)
                .unwrap()
                .copy_from_slice(base.param(&slot.spec.name).unwrap());
        }
        adapter::init_lora(&mut m, 1).unwrap();
        // A is Kaiming-uniform within 1/sqrt(in), B zero.
        for slot in m.layout.slots() {
            let v = &m.params[slot.range()];
            if slot.spec.name.ends_with("lora_A.weight") {
                let bound = 1.0 / (slot.spec.shape[1] as f32).sqrt();
                assert!(v.iter().all(|x| x.abs() <= bound) && v.iter().any(|&x| x != 0.0));
            } else if slot.spec.name.ends_with("lora_B.weight") {
                assert!(v.iter().all(|&x| x == 0.0));
            }
        }
        let b = batch(cfg.vocab_size, 3);
        let mut base = base;
        assert_eq!(m.forward(&b, false, 0), base.forward(&b, false, 0));
        let counts = adapter::param_counts(&m);
        let lora_numel: usize = m
            .layout
            .slots()
            .iter()
            .filter(|s| is_adapter_param(&s.spec.name))
            .map(|s| s.spec.numel())
            .sum();
        assert_eq!(counts.trainable, lora_numel as u64);
        assert_eq!(counts.total, (base.params.len() + lora_numel) as u64);
    }
}

/// A random dense model saved as an HF directory (what a QLoRA run loads and quantizes).
fn saved_base(json: &str, seed: u64) -> std::path::PathBuf {
    let cfg = ModelConfig::from_json_str("base", json).unwrap();
    let m = random_model(&cfg, &Tuning::full(), seed);
    let dir = std::env::temp_dir().join(format!("rustspeed-qlora-{}-{seed}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config: serde_json::Value = serde_json::from_str(json).unwrap();
    crate::export::save_pretrained(
        &dir,
        &config,
        &m,
        rustspeed_kernels::DType::F32,
        None,
        crate::export::DEFAULT_MAX_SHARD_BYTES,
    )
    .unwrap();
    dir
}

/// The quantized model against a dense one whose base weights are the dequantized ones, same
/// adapters (random B so they matter): same loss, same adapter gradients.
#[test]
fn qlora_forward_and_gradients_equal_dense_with_dequantized_weights() {
    use rustspeed_kernels::matmul::WeightLayout;
    use rustspeed_kernels::quant::QuantConfig;
    for (json, seed) in [(GPT2_JSON, 21), (LLAMA_JSON, 22)] {
        let dir = saved_base(json, seed);
        let cfg = ModelConfig::from_json_str("base", json).unwrap();
        let plain = lora(
            r#"{"peft_type": "LORA", "target_modules": "all-linear", "r": 2, "bias": "lora_only"}"#,
            &cfg,
        );
        for q in [
            QuantConfig::nf4(true),
            QuantConfig::fp4(false),
            QuantConfig::int8(),
        ] {
            let tuning = plain.clone().with_quantization(q).unwrap();
            let mut qm = crate::loader::load_model_tuned::<f32>(&dir, &tuning, 1)
                .unwrap()
                .model;
            let mut dm = crate::loader::load_model_tuned::<f32>(&dir, &plain, 1)
                .unwrap()
                .model;
            // Memory is the point: the quantized weights are not in the parameter buffer.
            assert!(!qm.quantized.is_empty());
            assert_eq!(qm.params.len() + qm.quantized_numel(), dm.params.len());
            // Well under half of f32 storage even at these tiny shapes (scales dominate).
            assert!(qm.quantized_bytes() < qm.quantized_numel() * 2);
            for t in &qm.quantized {
                let mut w = vec![0f32; t.inp * t.out];
                t.slot.get().unwrap().dequantize_into(&mut w);
                let dst = dm.param_mut(&t.name).unwrap();
                match t.layout {
                    WeightLayout::OutIn => dst.copy_from_slice(&w),
                    WeightLayout::InOut => {
                        for o in 0..t.out {
                            for i in 0..t.inp {
                                dst[i * t.out + o] = w[o * t.inp + i];
                            }
                        }
                    }
                }
            }
            let mut rng = NormalRng::new(seed);
            for slot in qm.layout.slots().to_vec() {
                if slot.spec.trainable {
                    let v: Vec<f32> = (0..slot.spec.numel())
                        .map(|_| 0.2 * rng.normal() as f32)
                        .collect();
                    qm.params[slot.range()].copy_from_slice(&v);
                    dm.param_mut(&slot.spec.name).unwrap().copy_from_slice(&v);
                }
            }
            let b = batch(cfg.vocab_size, 4);
            let mut gq = vec![0f32; qm.params.len()];
            let mut gd = vec![0f32; dm.params.len()];
            let lq = qm.forward_backward(&mut gq, &b, 0.1, 3).mean();
            let ld = dm.forward_backward(&mut gd, &b, 0.1, 3).mean();
            assert!(
                (lq - ld).abs() <= 1e-5 * ld,
                "{q:?}: loss {lq} vs dense {ld}"
            );
            for slot in qm.layout.slots() {
                let d = dm.layout.get(&slot.spec.name).unwrap();
                assert_eq!(d.spec.trainable, slot.spec.trainable);
                if !slot.spec.trainable {
                    continue;
                }
                let (a, b) = (&gq[slot.range()], &gd[d.range()]);
                let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                for (x, y) in a.iter().zip(b) {
                    assert!(
                        (x - y).abs() <= 1e-4 * scale,
                        "{q:?} `{}`: {x} vs dense {y}",
                        slot.spec.name
                    );
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn qlora_training_lowers_the_loss() {
    use rustspeed_kernels::quant::QuantConfig;
    let dir = saved_base(LLAMA_JSON, 31);
    let cfg = llama_cfg();
    let tuning = lora(
        r#"{"peft_type": "LORA", "target_modules": "all-linear", "r": 4}"#,
        &cfg,
    )
    .with_quantization(QuantConfig::nf4(true))
    .unwrap();
    let mut m = crate::loader::load_model_tuned::<f32>(&dir, &tuning, 5)
        .unwrap()
        .model;
    m.enable_gradient_checkpointing();
    let b = batch(cfg.vocab_size, 6);
    let first = m.forward(&b, false, 0).mean();
    for step in 0..40 {
        let mut g = vec![0f32; m.params.len()];
        m.forward_backward(&mut g, &b, 1.0 / b.label_tokens() as f32, step);
        for slot in m.layout.slots().to_vec() {
            if slot.spec.trainable {
                for i in slot.range() {
                    m.params[i] -= 0.5 * g[i];
                }
            }
        }
    }
    let last = m.forward(&b, false, 0).mean();
    assert!(last < 0.8 * first, "loss {first} -> {last}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn quantization_needs_adapters() {
    let err = Tuning::full()
        .with_quantization(rustspeed_kernels::quant::QuantConfig::nf4(false))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not supported yet") && err.contains("LoRA"),
        "{err}"
    );
}
