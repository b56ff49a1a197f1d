//! GGUF reading against files written by the `gguf` Python package (tools/golden/gguf_golden.py):
//! metadata of every type, dequantization matching gguf.quants.dequantize, and a tiny LLaMA
//! whose loss after loading must match transformers' on the same (dequantized) weights.

use std::path::{Path, PathBuf};

use rustspeed_models::gguf::{self, GgmlType, GgufFile, Value};
use rustspeed_models::loader::load_gguf;
use rustspeed_models::Batch;
use serde_json::Value as Json;

fn golden(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/gguf")
        .join(name)
}

fn read_json(name: &str) -> Json {
    serde_json::from_str(&std::fs::read_to_string(golden(name)).unwrap()).unwrap()
}

#[test]
fn metadata_of_every_value_type() {
    let file = GgufFile::open(&golden("tensors.gguf")).unwrap();
    assert_eq!(file.version, 3);
    let want = read_json("tensors.json");
    let meta = want["metadata"].as_object().unwrap();
    let get = |k: &str| file.get(k).unwrap_or_else(|| panic!("key {k}"));
    assert_eq!(get("t.u8"), &Value::U8(200));
    assert_eq!(get("t.i8"), &Value::I8(-100));
    assert_eq!(get("t.u16"), &Value::U16(60000));
    assert_eq!(get("t.i16"), &Value::I16(-30000));
    assert_eq!(get("t.u32"), &Value::U32(4_000_000_000));
    assert_eq!(get("t.i32"), &Value::I32(-2_000_000_000));
    assert_eq!(get("t.f32"), &Value::F32(1.5));
    assert_eq!(get("t.bool"), &Value::Bool(true));
    assert_eq!(get("t.string").as_str(), meta["t.string"].as_str());
    assert_eq!(get("t.u64").as_u64(), meta["t.u64"].as_u64());
    assert_eq!(get("t.i64"), &Value::I64(meta["t.i64"].as_i64().unwrap()));
    assert_eq!(get("t.f64"), &Value::F64(-2.25));
    assert_eq!(
        get("t.array_i32"),
        &Value::Array(vec![Value::I32(1), Value::I32(-2), Value::I32(3)])
    );
    let strs: Vec<_> = get("t.array_str")
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(strs, ["a", "bc", ""]);
    assert_eq!(get("general.alignment").as_u64(), Some(64));
}

#[test]
fn dequantized_tensors_match_the_reference_quantizers() {
    let file = GgufFile::open(&golden("tensors.gguf")).unwrap();
    let want = read_json("tensors.json");
    let tensors = want["tensors"].as_object().unwrap();
    assert_eq!(tensors.len(), 6);
    for (name, t) in tensors {
        let info = file.tensor_info(name).unwrap();
        let shape: Vec<usize> = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(info.shape(), shape, "{name}");
        let got = file.tensor_f32(name).unwrap();
        let expected: Vec<f32> = t["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(got.len(), expected.len(), "{name}");
        for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
            // Same f32 operations as the numpy reference: equal up to rounding of the last bit.
            assert!(
                (g - e).abs() <= 1e-6 * e.abs().max(1.0),
                "{name}[{i}]: {g} vs {e}"
            );
        }
    }
}

#[test]
fn hand_built_blocks_dequantize_by_ggml_formulas() {
    // Q4_1 block: d = 0.5, m = -1, nibble j low = j % 16, high = 15 - j % 16.
    let mut block = Vec::new();
    block.extend_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
    block.extend_from_slice(&half::f16::from_f32(-1.0).to_le_bytes());
    for j in 0..16u8 {
        block.push(j | ((15 - j) << 4));
    }
    let mut out = [0f32; 32];
    gguf::dequantize(GgmlType::Q4_1, &block, &mut out);
    for j in 0..16 {
        assert_eq!(out[j], j as f32 * 0.5 - 1.0);
        assert_eq!(out[j + 16], (15 - j) as f32 * 0.5 - 1.0);
    }
    // Q4_0 drops the minimum and centres the nibble at 8.
    let mut q40 = block[..2].to_vec();
    q40.extend_from_slice(&block[4..]);
    gguf::dequantize(GgmlType::Q4_0, &q40, &mut out);
    assert_eq!(out[0], -4.0);
    assert_eq!(out[16], 3.5);
    // Q8_0: signed bytes times d.
    let mut q80 = half::f16::from_f32(0.25).to_le_bytes().to_vec();
    q80.extend((0..32).map(|j| (j as i8 - 16) as u8));
    gguf::dequantize(GgmlType::Q8_0, &q80, &mut out);
    assert_eq!(out[0], -4.0);
    assert_eq!(out[31], 3.75);
}

#[test]
fn corrupt_headers_are_refused_with_the_offset() {
    let good = std::fs::read(golden("tensors.gguf")).unwrap();
    let path = Path::new("x.gguf");
    let mut bad_magic = good.clone();
    bad_magic[0] = b'X';
    let err = GgufFile::from_bytes(path, bad_magic)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("x.gguf") && err.contains("magic"), "{err}");

    let mut v1 = good.clone();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    let err = GgufFile::from_bytes(path, v1).err().unwrap().to_string();
    assert!(err.contains("version 1"), "{err}");

    let err = GgufFile::from_bytes(path, good[..100].to_vec())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("truncated") || err.contains("past the end"),
        "{err}"
    );

    // Cutting into the tensor data (past the header) names the tensor that no longer fits.
    let err = GgufFile::from_bytes(path, good[..good.len() - 8].to_vec())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("runs past the end"), "{err}");
}

#[test]
fn unsupported_architecture_is_named() {
    let file = GgufFile::open(&golden("tensors.gguf")).unwrap();
    let err = file.model_config().unwrap_err().to_string();
    assert!(
        err.contains("general.architecture") && err.contains("\"test\""),
        "{err}"
    );
    let err = file.tokenizer().unwrap_err().to_string();
    assert!(err.contains("tokenizer.ggml.model"), "{err}");
}

#[test]
fn rope_unpermutation_inverts_llama_cpp_permute() {
    // llama.cpp: rows of each head reordered from [half, j] to [j, half].
    let (n_head, d, row_len) = (3, 4, 2);
    let rows = n_head * d;
    let hf: Vec<f32> = (0..rows * row_len).map(|i| i as f32).collect();
    let mut permuted = vec![0f32; hf.len()];
    for head in 0..n_head {
        for h in 0..2 {
            for j in 0..d / 2 {
                let src = (head * d + h * d / 2 + j) * row_len;
                let dst = (head * d + 2 * j + h) * row_len;
                permuted[dst..dst + row_len].copy_from_slice(&hf[src..src + row_len]);
            }
        }
    }
    assert_ne!(permuted, hf);
    assert_eq!(
        gguf::unpermute_rope_rows(&permuted, rows, row_len, n_head),
        hf
    );
}

#[test]
fn tiny_llama_config_tokenizer_and_names() {
    let file = GgufFile::open(&golden("llama.gguf")).unwrap();
    let cfg = file.model_config().unwrap();
    assert_eq!(
        (
            cfg.hidden_size,
            cfg.num_hidden_layers,
            cfg.num_attention_heads
        ),
        (32, 2, 4)
    );
    assert_eq!((cfg.num_key_value_heads, cfg.head_dim), (2, 8));
    assert_eq!(
        (cfg.intermediate_size, cfg.max_position_embeddings),
        (64, 64)
    );
    assert!(cfg.tie_word_embeddings, "no output.weight means tied");
    assert_eq!(cfg.rope.as_ref().unwrap().theta, 10000.0);
    assert_eq!(cfg.bos_token_id, Some(1));
    assert_eq!(cfg.eos_token_ids, vec![2]);

    let tok = file.tokenizer().unwrap();
    assert_eq!(tok.vocab_size(), cfg.vocab_size);
    assert_eq!((tok.bos_token_id(), tok.eos_token_id()), (Some(1), Some(2)));
    let want = read_json("llama.json");
    for (text, ids) in want["encodings"].as_object().unwrap() {
        let ids: Vec<u32> = ids
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tok.encode(text, true).unwrap(), ids, "{text:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), *text);
    }
    let names = file.hf_names().unwrap();
    assert!(names.contains(&(
        "blk.1.ffn_down.weight".into(),
        "model.layers.1.mlp.down_proj.weight".into()
    )));
}

#[test]
fn tiny_llama_loss_matches_transformers() {
    let want = read_json("llama.json");
    let loaded = load_gguf::<f32>(&golden("llama.gguf")).unwrap();
    let mut model = loaded.model;
    let sample = |name: &str, row: usize| {
        let p = model.param(name).unwrap();
        p[row * 32..row * 32 + 4].to_vec()
    };
    let as_f32 = |v: &Json| -> Vec<f32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    assert_eq!(
        sample("model.embed_tokens.weight", 3),
        as_f32(&want["embed_sample"])
    );
    // Row 1 of q_proj is GGUF row 2: only right if the rope permutation was undone.
    assert_eq!(
        sample("model.layers.0.self_attn.q_proj.weight", 1),
        as_f32(&want["q_proj_0_row1"])
    );
    let text = want["loss_text"].as_str().unwrap();
    let ids = loaded.tokenizer.unwrap().encode(text, true).unwrap();
    let labels: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let batch = Batch::from_hf_labels(1, ids.len(), ids, &labels);
    let loss = model.forward(&batch, false, 0).mean();
    let expected = want["loss"].as_f64().unwrap();
    assert!(
        ((loss - expected) / expected).abs() < 1e-5,
        "loss {loss} vs transformers {expected}"
    );
}
