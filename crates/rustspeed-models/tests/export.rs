//! `export::save_pretrained`: round trips through `load_hf_weights`, sharding, dtype fields,
//! tokenizer files, stale-file cleanup. That transformers loads the result is checked by hand
//! with `tools/golden/export_check.py` on the directories `export_golden_models` writes.

use std::path::{Path, PathBuf};

use half::bf16;
use rustspeed_kernels::{DType, Float};
use rustspeed_models::export::{
    read_config_json, save_pretrained, ExportError, DEFAULT_MAX_SHARD_BYTES,
};
use rustspeed_models::hf_config::ModelConfig;
use rustspeed_models::loader::{build_model, name_rules};
use rustspeed_models::weights::load_hf_weights;
use rustspeed_models::Model;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name)
}

/// A fresh directory under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("rustspeed-export-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn load<T: Float>(dir: &Path) -> Model<T> {
    let cfg = ModelConfig::from_path(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut model = build_model::<T>(&cfg).unwrap();
    load_hf_weights(dir, &model.layout, &mut model.params, &name_rules(&cfg))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    model
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn gpt2_round_trips_bit_exactly_in_f32() {
    let src = golden("gpt2");
    let model = load::<f32>(&src);
    let out = TempDir::new("gpt2");
    let config = read_config_json(&src).unwrap();
    let saved = save_pretrained(
        &out.0,
        &config,
        &model,
        DType::F32,
        Some(&src),
        DEFAULT_MAX_SHARD_BYTES,
    )
    .unwrap();
    assert_eq!(saved.weight_files, vec![out.0.join("model.safetensors")]);
    assert_eq!(files(&out.0), ["config.json", "model.safetensors"]);

    let back = load::<f32>(&out.0);
    assert_eq!(back.layout.slots().len(), model.layout.slots().len());
    for slot in model.layout.slots() {
        let name = &slot.spec.name;
        let got = back.param(name).unwrap_or_else(|| panic!("`{name}` lost"));
        let same = got
            .iter()
            .zip(model.param(name).unwrap())
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "`{name}` changed in the round trip");
    }

    // The config is the source's, with both dtype keys naming the saved dtype.
    let written = read_config_json(&out.0).unwrap();
    assert_eq!(written["torch_dtype"], "float32");
    assert_eq!(written["dtype"], "float32");
    let mut expected = config.clone();
    expected["torch_dtype"] = "float32".into();
    expected["dtype"] = "float32".into();
    assert_eq!(written, expected);
}

#[test]
fn llama_shards_above_the_limit_and_loads_back() {
    let src = golden("llama");
    let model = load::<f32>(&src);
    let out = TempDir::new("llama-shards");
    let config = read_config_json(&src.join("config.json")).unwrap();
    let limit = 16 * 1024;
    let saved = save_pretrained(&out.0, &config, &model, DType::F32, Some(&src), limit).unwrap();

    let index_path = out.0.join("model.safetensors.index.json");
    assert_eq!(saved.weight_files.last(), Some(&index_path));
    let shards = &saved.weight_files[..saved.weight_files.len() - 1];
    assert!(
        shards.len() > 2,
        "{} shards for {} bytes",
        shards.len(),
        4 * model.params.len()
    );
    for (k, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards.len());
        assert_eq!(shard.file_name().unwrap().to_str(), Some(name.as_str()));
        // A shard exceeds the limit only when it holds a single tensor that does.
        let bytes = std::fs::metadata(shard).unwrap().len() as usize;
        let header = 8 + 4096;
        let tensors = safetensors::SafeTensors::deserialize(&std::fs::read(shard).unwrap())
            .unwrap()
            .len();
        assert!(
            bytes <= limit + header || tensors == 1,
            "{name}: {bytes} bytes, {tensors} tensors"
        );
    }
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), model.layout.slots().len());
    assert_eq!(
        index["metadata"]["total_size"].as_u64(),
        Some(4 * model.params.len() as u64)
    );
    // The golden llama directory has a generation_config.json and no tokenizer.
    assert_eq!(saved.copied, vec![out.0.join("generation_config.json")]);
    assert_eq!(
        std::fs::read(out.0.join("generation_config.json")).unwrap(),
        std::fs::read(src.join("generation_config.json")).unwrap()
    );

    let back = load::<f32>(&out.0);
    assert_eq!(back.params, model.params);

    // Saving again unsharded leaves no shard or index behind for transformers to trip on.
    save_pretrained(
        &out.0,
        &config,
        &model,
        DType::F32,
        None,
        DEFAULT_MAX_SHARD_BYTES,
    )
    .unwrap();
    assert_eq!(
        files(&out.0),
        ["config.json", "generation_config.json", "model.safetensors"]
    );
    // And sharded again: the single file goes, or it would shadow the index.
    save_pretrained(&out.0, &config, &model, DType::F32, None, limit).unwrap();
    assert!(!out.0.join("model.safetensors").exists());
    assert_eq!(load::<f32>(&out.0).params, model.params);
}

#[test]
fn bf16_save_rounds_once_and_says_bfloat16() {
    let src = golden("llama");
    let model = load::<f32>(&src);
    let out = TempDir::new("llama-bf16");
    let config = read_config_json(&src).unwrap();
    save_pretrained(
        &out.0,
        &config,
        &model,
        DType::BF16,
        None,
        DEFAULT_MAX_SHARD_BYTES,
    )
    .unwrap();
    let written = read_config_json(&out.0).unwrap();
    assert_eq!(written["torch_dtype"], "bfloat16");
    assert_eq!(written["dtype"], "bfloat16");
    let size = std::fs::metadata(out.0.join("model.safetensors"))
        .unwrap()
        .len() as usize;
    assert!(
        size < 2 * model.params.len() + 8192,
        "{size} bytes is not bf16"
    );

    let back = load::<f32>(&out.0);
    let rounded: Vec<f32> = model
        .params
        .iter()
        .map(|&x| bf16::from_f32(x).to_f32())
        .collect();
    assert_eq!(back.params, rounded);
    // A bf16 model saved as bf16 is bit exact.
    let model16 = load::<bf16>(&out.0);
    let again = TempDir::new("llama-bf16-again");
    save_pretrained(
        &again.0,
        &config,
        &model16,
        DType::BF16,
        None,
        DEFAULT_MAX_SHARD_BYTES,
    )
    .unwrap();
    assert_eq!(
        std::fs::read(again.0.join("model.safetensors")).unwrap(),
        std::fs::read(out.0.join("model.safetensors")).unwrap()
    );
}

#[test]
fn tokenizer_files_are_copied_byte_for_byte() {
    let src = TempDir::new("tok-src");
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(golden("gpt2").join(name), src.0.join(name)).unwrap();
    }
    std::fs::write(src.0.join("vocab.json"), br#"{"a": 0, "b": 1}"#).unwrap();
    std::fs::write(src.0.join("merges.txt"), "#version: 0.2\na b\n").unwrap();
    std::fs::write(src.0.join("tokenizer_config.json"), "{}").unwrap();
    std::fs::write(src.0.join("notes.txt"), "not a tokenizer file").unwrap();
    let model = load::<f32>(&src.0);
    let out = TempDir::new("tok-out");
    let config = read_config_json(&src.0).unwrap();
    let saved = save_pretrained(
        &out.0,
        &config,
        &model,
        DType::F16,
        Some(&src.0),
        DEFAULT_MAX_SHARD_BYTES,
    )
    .unwrap();
    assert_eq!(saved.copied.len(), 3);
    assert_eq!(
        files(&out.0),
        [
            "config.json",
            "merges.txt",
            "model.safetensors",
            "tokenizer_config.json",
            "vocab.json"
        ]
    );
    for name in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        assert_eq!(
            std::fs::read(out.0.join(name)).unwrap(),
            std::fs::read(src.0.join(name)).unwrap(),
            "{name}"
        );
    }
    assert_eq!(read_config_json(&out.0).unwrap()["dtype"], "float16");

    // Exporting into the source directory itself keeps its tokenizer files intact.
    save_pretrained(
        &src.0,
        &config,
        &model,
        DType::F32,
        Some(&src.0),
        DEFAULT_MAX_SHARD_BYTES,
    )
    .unwrap();
    assert_eq!(
        std::fs::read(src.0.join("vocab.json")).unwrap(),
        br#"{"a": 0, "b": 1}"#
    );
    assert_eq!(load::<f32>(&src.0).params, model.params);
}

#[test]
fn a_config_that_is_not_an_object_is_an_error() {
    let model = load::<f32>(&golden("gpt2"));
    let out = TempDir::new("bad-config");
    let err = save_pretrained(
        &out.0,
        &serde_json::json!([1, 2]),
        &model,
        DType::F32,
        None,
        DEFAULT_MAX_SHARD_BYTES,
    )
    .unwrap_err();
    assert!(matches!(err, ExportError::ConfigNotObject { .. }), "{err}");
    assert!(err.to_string().contains("an array"), "{err}");
    assert!(!out.0.join("model.safetensors").exists(), "nothing written");
}

/// Writes the golden models re-exported by rustspeed for `tools/golden/export_check.py`:
/// `cargo test -p rustspeed-models --test export -- --ignored`, then
/// `/work/golden-venv/bin/python tools/golden/export_check.py` (both default to
/// `$TMPDIR/rustspeed-export`; override with RUSTSPEED_EXPORT_DIR).
#[test]
#[ignore = "writes directories for the by-hand transformers check"]
fn export_golden_models() {
    let root = std::env::var_os("RUSTSPEED_EXPORT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("rustspeed-export"));
    // (source, output, dtype, shard limit)
    let cases = [
        ("gpt2", "gpt2_f32", DType::F32, DEFAULT_MAX_SHARD_BYTES),
        ("gpt2", "gpt2_bf16", DType::BF16, DEFAULT_MAX_SHARD_BYTES),
        ("llama", "llama_f32_sharded", DType::F32, 32 * 1024),
        ("llama", "llama_bf16", DType::BF16, DEFAULT_MAX_SHARD_BYTES),
        (
            "mistral",
            "mistral_f32",
            DType::F32,
            DEFAULT_MAX_SHARD_BYTES,
        ),
        ("qwen2", "qwen2_f32", DType::F32, DEFAULT_MAX_SHARD_BYTES),
    ];
    for (src, name, dtype, limit) in cases {
        let src = golden(src);
        let model = load::<f32>(&src);
        let config = read_config_json(&src).unwrap();
        let out = root.join(name);
        let saved = save_pretrained(&out, &config, &model, dtype, Some(&src), limit).unwrap();
        println!("{}: {:?}", out.display(), saved.weight_files);
    }
}
