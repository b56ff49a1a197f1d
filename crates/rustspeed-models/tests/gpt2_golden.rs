//! Parity with transformers' GPT2LMHeadModel: loss, logits and every parameter gradient of a tiny
//! random model on a fixed batch, recorded by tools/golden/gpt2_golden.py.
//!
//! Tolerances (f32): loss 1e-5 relative; logits 1e-5 of the largest |logit|; each gradient 1e-4
//! of its tensor's largest |value|.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::bf16;
use rustspeed_models::hf_config::ModelConfig;
use rustspeed_models::weights::load_hf_weights;
use rustspeed_models::{gpt2, Batch, Model};
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;

fn case_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(case)
}

/// The golden tensors, converted to f32 (or i64 for the integer ones).
struct Golden {
    floats: HashMap<String, (Vec<usize>, Vec<f32>)>,
    ints: HashMap<String, Vec<i64>>,
}

fn read_golden(dir: &Path) -> Golden {
    let bytes = std::fs::read(dir.join("golden.safetensors")).expect("golden.safetensors");
    let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let mut golden = Golden {
        floats: HashMap::new(),
        ints: HashMap::new(),
    };
    for (name, view) in st.tensors() {
        match view.dtype() {
            Dtype::F32 => {
                let v = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                golden.floats.insert(name, (view.shape().to_vec(), v));
            }
            Dtype::I64 => {
                let v = view
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                    .collect();
                golden.ints.insert(name, v);
            }
            other => panic!("golden tensor {name}: unexpected dtype {other:?}"),
        }
    }
    golden
}

impl Golden {
    fn f32s(&self, name: &str) -> &[f32] {
        &self
            .floats
            .get(name)
            .unwrap_or_else(|| panic!("golden has no `{name}`"))
            .1
    }

    fn batch(&self) -> Batch {
        let (shape, _) = &self.floats["logits"];
        let (b, t) = (shape[0], shape[1]);
        let ids = self.ints["input_ids"].iter().map(|&x| x as u32).collect();
        let labels: Vec<i32> = self.ints["labels"].iter().map(|&x| x as i32).collect();
        Batch::from_hf_labels(b, t, ids, &labels)
    }
}

fn load<T: rustspeed_kernels::Float>(dir: &Path) -> (ModelConfig, Model<T>) {
    let cfg = ModelConfig::from_path(dir).expect("config.json");
    let mut model = gpt2::build::<T>(&cfg).expect("build");
    load_hf_weights(
        dir,
        &model.layout,
        &mut model.params,
        &gpt2::name_rules(&cfg),
    )
    .expect("load weights");
    (cfg, model)
}

/// `max |got - want| <= tol * max |want|`, reporting the worst element.
fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want
        .iter()
        .fold(0f64, |m, &w| m.max(w.abs() as f64))
        .max(1e-12);
    let (worst, err) = got
        .iter()
        .zip(want)
        .map(|(&g, &w)| (g as f64 - w as f64).abs())
        .enumerate()
        .fold(
            (0, 0f64),
            |acc, (i, e)| if e > acc.1 { (i, e) } else { acc },
        );
    assert!(
        err <= tol * scale,
        "{what}[{worst}]: got {}, want {} (error {err:.2e} > {tol:.0e} x max {scale:.3e})",
        got[worst],
        want[worst]
    );
}

fn check_f32_parity(case: &str) {
    let dir = case_dir(case);
    let golden = read_golden(&dir);
    let (cfg, mut model) = load::<f32>(&dir);
    let batch = golden.batch();

    let rows: Vec<usize> = (0..batch.rows()).collect();
    let logits = gpt2::logits(&mut model, &cfg, &batch, &rows);
    assert_close("logits", &logits, golden.f32s("logits"), 1e-5);

    let seed = 0;
    let loss = model.forward(&batch, true, seed);
    let want = golden.f32s("loss")[0] as f64;
    assert!(
        (loss.mean() - want).abs() <= 1e-5 * want,
        "loss {} vs transformers {want}",
        loss.mean()
    );

    let mut grads = vec![0f32; model.params.len()];
    model.backward(&mut grads, &batch, 1.0 / loss.tokens as f32, seed);
    let mut checked = 0;
    for slot in model.layout.slots() {
        let name = &slot.spec.name;
        let want = golden.f32s(&format!("grad.{name}"));
        assert_close(&format!("grad.{name}"), &grads[slot.range()], want, 1e-4);
        checked += 1;
    }
    let golden_grads = golden
        .floats
        .keys()
        .filter(|k| k.starts_with("grad."))
        .count();
    assert_eq!(
        checked, golden_grads,
        "every golden gradient has a parameter"
    );
}

#[test]
fn f32_matches_transformers() {
    check_f32_parity("gpt2");
}

/// The bf16 checkpoint loads into an f32 model exactly (the reference ran in f32 on the
/// bf16-rounded weights).
#[test]
fn bf16_checkpoint_matches_transformers_in_f32() {
    check_f32_parity("gpt2_bf16");
}

/// The same checkpoint computed in bf16: loss within 1%, logits within 3% of the largest.
#[test]
fn bf16_compute_is_close_to_transformers() {
    let dir = case_dir("gpt2_bf16");
    let golden = read_golden(&dir);
    let (cfg, mut model) = load::<bf16>(&dir);
    let batch = golden.batch();
    let want = golden.f32s("loss")[0] as f64;
    let got = model.forward(&batch, false, 0).mean();
    assert!(
        (got - want).abs() <= 1e-2 * want,
        "bf16 loss {got} vs {want}"
    );
    let rows: Vec<usize> = (0..batch.rows()).collect();
    let logits = gpt2::logits(&mut model, &cfg, &batch, &rows);
    assert_close("bf16 logits", &logits, golden.f32s("logits"), 3e-2);
}
