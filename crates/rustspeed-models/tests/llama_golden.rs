//! Parity with transformers for the LLaMA family: tiny random models and their logits, loss and
//! parameter gradients recorded by `tools/golden/llama_golden.py` (f32, eager attention).
//!
//! Tolerances: loss and logits within 1e-5 relative (logits: relative to the largest |logit|);
//! each gradient within 1e-4 of its tensor's largest |value|.

use std::path::{Path, PathBuf};

use rustspeed_models::hf_config::ModelConfig;
use rustspeed_models::{llama, Batch};
use safetensors::tensor::{Dtype, SafeTensors};

struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    fn open(dir: &Path) -> Golden {
        let path = dir.join("golden.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Golden { bytes }
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("golden.safetensors")
    }

    fn f32(&self, name: &str) -> Vec<f32> {
        let st = self.tensors();
        let view = st
            .tensor(name)
            .unwrap_or_else(|e| panic!("golden `{name}`: {e}"));
        assert_eq!(view.dtype(), Dtype::F32, "golden `{name}` dtype");
        view.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    /// An int64 tensor and its shape.
    fn i64(&self, name: &str) -> (Vec<i64>, Vec<usize>) {
        let st = self.tensors();
        let view = st
            .tensor(name)
            .unwrap_or_else(|e| panic!("golden `{name}`: {e}"));
        assert_eq!(view.dtype(), Dtype::I64, "golden `{name}` dtype");
        let values = view
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (values, view.shape().to_vec())
    }
}

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(case)
}

fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = max_abs(want).max(1e-12);
    let (i, err) = got
        .iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs())
        .enumerate()
        .fold(
            (0, 0f32),
            |best, (i, e)| if e > best.1 { (i, e) } else { best },
        );
    assert!(
        err <= tol * scale,
        "{what}: max error {err:e} at {i} (got {}, want {}) exceeds {tol:e} x max|want| {scale:e}",
        got[i],
        want[i]
    );
}

fn check_case(case: &str) {
    let dir = case_dir(case);
    let golden = Golden::open(&dir);
    let (cfg, mut model) = llama::load_pretrained::<f32>(&dir).expect("load tiny model");
    let (ids, shape) = golden.i64("input_ids");
    let (hf_labels, _) = golden.i64("labels");
    let (b, t) = (shape[0], shape[1]);
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let hf_labels: Vec<i32> = hf_labels.iter().map(|&l| l as i32).collect();
    let batch = Batch::from_hf_labels(b, t, ids, &hf_labels);

    let rows: Vec<usize> = (0..b * t).collect();
    let logits = llama::logits(&mut model, &cfg, &batch, &rows).unwrap();
    assert_close(
        &format!("{case} logits"),
        &logits,
        &golden.f32("logits"),
        1e-5,
    );

    let loss = model.forward(&batch, true, 0);
    let want_loss = golden.f32("loss")[0];
    assert_eq!(loss.tokens, batch.label_tokens());
    let got_loss = loss.mean() as f32;
    assert!(
        (got_loss - want_loss).abs() <= 1e-5 * want_loss.abs(),
        "{case} loss {got_loss} vs transformers {want_loss}"
    );

    let mut grads = vec![0f32; model.params.len()];
    model.backward(&mut grads, &batch, 1.0 / loss.tokens as f32, 0);
    let mut checked = 0;
    for slot in model.layout.slots() {
        let want = golden.f32(&format!("grad.{}", slot.spec.name));
        assert_close(
            &format!("{case} grad of {}", slot.spec.name),
            &grads[slot.range()],
            &want,
            1e-4,
        );
        checked += 1;
    }
    // Every gradient transformers recorded was compared (tied lm_head appears once in both).
    let recorded = golden
        .tensors()
        .names()
        .iter()
        .filter(|n| n.starts_with("grad."))
        .count();
    assert_eq!(
        checked, recorded,
        "{case}: parameters vs recorded gradients"
    );
    assert_eq!(
        model.layout.slots().len(),
        cfg.param_shapes().len(),
        "{case}: layout vs config"
    );
}

#[test]
fn llama_matches_transformers() {
    check_case("llama");
}

#[test]
fn llama3_rope_scaling_matches_transformers() {
    check_case("llama3_rope");
}

#[test]
fn mistral_sliding_window_matches_transformers() {
    let cfg = ModelConfig::from_path(&case_dir("mistral")).unwrap();
    assert_eq!(cfg.layer_sliding_window(0), Some(4));
    check_case("mistral");
}

#[test]
fn qwen2_biases_and_tied_embeddings_match_transformers() {
    let cfg = ModelConfig::from_path(&case_dir("qwen2")).unwrap();
    assert!(cfg.qkv_bias && cfg.tie_word_embeddings);
    check_case("qwen2");
}

/// bf16 storage (f32 accumulation) stays close to transformers' f32 loss on the same weights.
#[test]
fn bf16_loss_is_close_to_f32_golden() {
    let dir = case_dir("llama");
    let golden = Golden::open(&dir);
    let (_, mut model) = llama::load_pretrained::<half::bf16>(&dir).unwrap();
    let (ids, shape) = golden.i64("input_ids");
    let (hf_labels, _) = golden.i64("labels");
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let hf_labels: Vec<i32> = hf_labels.iter().map(|&l| l as i32).collect();
    let batch = Batch::from_hf_labels(shape[0], shape[1], ids, &hf_labels);
    let got = model.forward(&batch, false, 0).mean() as f32;
    let want = golden.f32("loss")[0];
    assert!(
        (got - want).abs() <= 2e-2 * want,
        "bf16 loss {got} vs f32 {want}"
    );
}
