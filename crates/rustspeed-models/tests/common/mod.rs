//! What the PEFT golden tests share: the golden directories written by tools/golden/*.py and
//! their f32 safetensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rustspeed_models::hf_config::ModelConfig;
use safetensors::tensor::Dtype;
use safetensors::SafeTensors;
use serde_json::Value;

pub fn golden_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// Every tensor of an f32 safetensors file: name -> (shape, values).
pub fn f32_tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let st = SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{name}");
            let v = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, (view.shape().to_vec(), v))
        })
        .collect()
}

/// A golden case directory: (its base model's directory, the case directory, the base's config,
/// golden.json).
pub fn open_case(name: &str) -> (PathBuf, PathBuf, ModelConfig, Value) {
    let dir = golden_dir(name);
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let base = golden_dir(json["model"].as_str().unwrap());
    let cfg = ModelConfig::from_path(&base).unwrap();
    (base, dir, cfg, json)
}
