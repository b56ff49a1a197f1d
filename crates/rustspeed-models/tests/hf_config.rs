//! HF config.json parsing: parameter counts of published models, both config forms, errors.

use rustspeed_kernels::DType;
use rustspeed_models::hf_config::{
    Activation, Architecture, AttentionType, HfConfigError, ModelConfig, RopeScaling,
};

/// openai-community/gpt2's config.json.
const GPT2_124M: &str = r#"{
  "activation_function": "gelu_new",
  "architectures": ["GPT2LMHeadModel"],
  "attn_pdrop": 0.1,
  "bos_token_id": 50256,
  "embd_pdrop": 0.1,
  "eos_token_id": 50256,
  "initializer_range": 0.02,
  "layer_norm_epsilon": 1e-05,
  "model_type": "gpt2",
  "n_ctx": 1024,
  "n_embd": 768,
  "n_head": 12,
  "n_inner": null,
  "n_layer": 12,
  "n_positions": 1024,
  "resid_pdrop": 0.1,
  "summary_activation": null,
  "summary_type": "cls_index",
  "task_specific_params": {"text-generation": {"do_sample": true, "max_length": 50}},
  "vocab_size": 50257
}"#;

/// TinyLlama/TinyLlama-1.1B's config.json.
const TINYLLAMA: &str = r#"{
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 2048,
  "initializer_range": 0.02,
  "intermediate_size": 5632,
  "max_position_embeddings": 2048,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 22,
  "num_key_value_heads": 4,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": null,
  "rope_theta": 10000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.35.0",
  "use_cache": true,
  "vocab_size": 32000
}"#;

/// Qwen/Qwen2-0.5B's config.json (tied embeddings, q/k/v biases).
const QWEN2_05B: &str = r#"{
  "architectures": ["Qwen2ForCausalLM"],
  "attention_dropout": 0.0,
  "bos_token_id": 151643,
  "eos_token_id": 151643,
  "hidden_act": "silu",
  "hidden_size": 896,
  "initializer_range": 0.02,
  "intermediate_size": 4864,
  "max_position_embeddings": 131072,
  "max_window_layers": 24,
  "model_type": "qwen2",
  "num_attention_heads": 14,
  "num_hidden_layers": 24,
  "num_key_value_heads": 2,
  "rms_norm_eps": 1e-06,
  "rope_theta": 1000000.0,
  "sliding_window": 131072,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "use_cache": true,
  "use_sliding_window": false,
  "vocab_size": 151936
}"#;

fn parse(text: &str) -> Result<ModelConfig, HfConfigError> {
    ModelConfig::from_json_str("test/config.json", text)
}

fn with(base: &str, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(base).unwrap();
    edit(v.as_object_mut().unwrap());
    v.to_string()
}

fn err_text(text: &str) -> String {
    parse(text)
        .expect_err("config should be refused")
        .to_string()
}

#[test]
fn gpt2_124m_counts_and_names() {
    let c = parse(GPT2_124M).unwrap();
    assert_eq!(c.architecture, Architecture::Gpt2);
    assert_eq!(c.intermediate_size, 3072);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.activation, Activation::GeluTanh);
    assert!(c.tie_word_embeddings);
    assert!(c.rope.is_none());
    assert_eq!(c.dtype, None);
    assert_eq!(c.dropout.residual, 0.1);
    assert_eq!(c.eos_token_ids, vec![50256]);
    assert_eq!(c.num_parameters(), 124_439_808);
    // The tied lm_head module still holds the full embedding, as DeepSpeed's walk sees it.
    assert_eq!(c.largest_layer_params(), 50257 * 768);

    let shapes = c.param_shapes();
    assert_eq!(shapes.len(), 2 + 12 * 12 + 2);
    let names: Vec<&str> = shapes.iter().take(8).map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "transformer.wte.weight",
            "transformer.wpe.weight",
            "transformer.h.0.ln_1.weight",
            "transformer.h.0.ln_1.bias",
            "transformer.h.0.attn.c_attn.weight",
            "transformer.h.0.attn.c_attn.bias",
            "transformer.h.0.attn.c_proj.weight",
            "transformer.h.0.attn.c_proj.bias",
        ]
    );
    // Conv1D stores [in, out].
    assert_eq!(shapes[4].1, vec![768, 2304]);
    let fc = shapes
        .iter()
        .find(|(n, _)| n == "transformer.h.11.mlp.c_proj.weight")
        .unwrap();
    assert_eq!(fc.1, vec![3072, 768]);
    assert_eq!(shapes.last().unwrap().0, "transformer.ln_f.bias");
    assert!(shapes.iter().all(|(n, _)| n != "lm_head.weight"));
}

#[test]
fn gpt2_untied_head_is_listed_last() {
    let c = parse(&with(GPT2_124M, |m| {
        m.insert("tie_word_embeddings".into(), false.into());
    }))
    .unwrap();
    let shapes = c.param_shapes();
    assert_eq!(
        shapes.last().unwrap(),
        &("lm_head.weight".to_string(), vec![50257, 768])
    );
    assert_eq!(c.num_parameters(), 124_439_808 + 50257 * 768);
}

#[test]
fn tinyllama_counts_and_names() {
    let c = parse(TINYLLAMA).unwrap();
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (32, 4, 64)
    );
    assert_eq!(c.dtype, Some(DType::BF16));
    assert_eq!(c.norm_eps, 1e-5);
    assert_eq!(c.activation, Activation::Silu);
    let rope = c.rope.as_ref().unwrap();
    assert_eq!((rope.theta, rope.scaling.clone()), (10000.0, None));
    assert!(!c.qkv_bias && !c.attn_output_bias && !c.mlp_bias);
    assert_eq!(c.num_parameters(), 1_100_048_384);
    assert_eq!(c.largest_layer_params(), 32000 * 2048);

    let shapes = c.param_shapes();
    assert_eq!(shapes.len(), 1 + 22 * 9 + 2);
    let layer0: Vec<(&str, &[usize])> = shapes[1..10]
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    assert_eq!(
        layer0,
        [
            ("model.layers.0.self_attn.q_proj.weight", &[2048, 2048][..]),
            ("model.layers.0.self_attn.k_proj.weight", &[256, 2048][..]),
            ("model.layers.0.self_attn.v_proj.weight", &[256, 2048][..]),
            ("model.layers.0.self_attn.o_proj.weight", &[2048, 2048][..]),
            ("model.layers.0.mlp.gate_proj.weight", &[5632, 2048][..]),
            ("model.layers.0.mlp.up_proj.weight", &[5632, 2048][..]),
            ("model.layers.0.mlp.down_proj.weight", &[2048, 5632][..]),
            ("model.layers.0.input_layernorm.weight", &[2048][..]),
            (
                "model.layers.0.post_attention_layernorm.weight",
                &[2048][..]
            ),
        ]
    );
    assert_eq!(shapes[0].0, "model.embed_tokens.weight");
    assert_eq!(shapes[shapes.len() - 2].0, "model.norm.weight");
    assert_eq!(
        shapes.last().unwrap(),
        &("lm_head.weight".to_string(), vec![32000, 2048])
    );
}

#[test]
fn llama_attention_bias_covers_all_four_projections() {
    let c = parse(&with(TINYLLAMA, |m| {
        m.insert("attention_bias".into(), true.into());
    }))
    .unwrap();
    let names: Vec<String> = c.param_shapes().into_iter().map(|(n, _)| n).collect();
    for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        assert!(names.contains(&format!("model.layers.3.self_attn.{proj}.bias")));
    }
    let extra = 22 * (2048 + 256 + 256 + 2048);
    assert_eq!(c.num_parameters(), 1_100_048_384 + extra);
}

#[test]
fn qwen2_has_qkv_biases_and_tied_head() {
    let c = parse(QWEN2_05B).unwrap();
    assert_eq!(c.architecture, Architecture::Qwen2);
    assert!(c.qkv_bias && !c.attn_output_bias && !c.mlp_bias);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.sliding_window, None);
    assert_eq!(c.rope.as_ref().unwrap().theta, 1e6);
    assert_eq!(c.bos_token_id, Some(151643));
    let shapes = c.param_shapes();
    let names: Vec<&str> = shapes[1..6].iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.q_proj.bias",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.0.self_attn.k_proj.bias",
            "model.layers.0.self_attn.v_proj.weight",
        ]
    );
    assert_eq!(shapes[4].1, vec![128]);
    assert!(shapes
        .iter()
        .all(|(n, _)| n != "model.layers.0.self_attn.o_proj.bias"));
    assert!(shapes.iter().all(|(n, _)| n != "lm_head.weight"));
    // Qwen2-0.5B's published count.
    assert_eq!(c.num_parameters(), 494_032_768);
    assert_eq!(c.largest_layer_params(), 151936 * 896);
}

#[test]
fn qwen2_sliding_window_starts_at_max_window_layers() {
    let c = parse(&with(QWEN2_05B, |m| {
        m.insert("use_sliding_window".into(), true.into());
        m.insert("max_window_layers".into(), 20.into());
        m.insert("sliding_window".into(), 4096.into());
    }))
    .unwrap();
    assert_eq!(c.sliding_window, Some(4096));
    assert_eq!(c.layer_sliding_window(19), None);
    assert_eq!(c.layer_sliding_window(20), Some(4096));
    assert_eq!(c.layer_types[23], AttentionType::Sliding);
}

#[test]
fn mistral_window_defaults_and_null() {
    let base = r#"{"model_type": "mistral", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "vocab_size": 100}"#;
    let c = parse(base).unwrap();
    assert_eq!(c.architecture, Architecture::Mistral);
    assert_eq!(c.sliding_window, Some(4096));
    assert_eq!(c.layer_sliding_window(1), Some(4096));
    let off = parse(&with(base, |m| {
        m.insert("sliding_window".into(), serde_json::Value::Null);
    }))
    .unwrap();
    assert_eq!(off.sliding_window, None);
    assert_eq!(off.layer_sliding_window(0), None);
    // No biases anywhere, untied head.
    let expect = 100 * 64 * 2 + 2 * (64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128 + 2 * 64) + 64;
    assert_eq!(c.num_parameters(), expect);
}

#[test]
fn old_and_new_rope_and_dtype_forms_agree() {
    let old = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 100,
        "rope_theta": 500000.0, "torch_dtype": "bfloat16",
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}"#;
    let new = r#"{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_hidden_layers": 2, "vocab_size": 100, "dtype": "bfloat16",
        "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}}"#;
    let a = parse(old).unwrap();
    let b = parse(new).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.dtype, Some(DType::BF16));
    let rope = a.rope.unwrap();
    assert_eq!(rope.theta, 500000.0);
    assert_eq!(
        rope.scaling,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        })
    );

    // Linear scaling, spelled with the oldest key `type`, against the new form.
    let linear_old = with(TINYLLAMA, |m| {
        m.insert(
            "rope_scaling".into(),
            serde_json::json!({"type": "linear", "factor": 2.0}),
        );
    });
    let linear_new = with(TINYLLAMA, |m| {
        m.remove("rope_theta");
        m.remove("rope_scaling");
        m.remove("torch_dtype");
        m.insert("dtype".into(), "bfloat16".into());
        m.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_theta": 10000.0, "rope_type": "linear", "factor": 2.0}),
        );
    });
    let a = parse(&linear_old).unwrap();
    assert_eq!(a, parse(&linear_new).unwrap());
    assert_eq!(
        a.rope.unwrap().scaling,
        Some(RopeScaling::Linear { factor: 2.0 })
    );
}

#[test]
fn reads_a_directory_or_a_file() {
    let dir = std::env::temp_dir().join(format!("rustspeed-hf-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), GPT2_124M).unwrap();
    let from_dir = ModelConfig::from_path(&dir).unwrap();
    let from_file = ModelConfig::from_path(&dir.join("config.json")).unwrap();
    assert_eq!(from_dir, from_file);
    let missing = ModelConfig::from_path(&dir.join("nope.json"))
        .unwrap_err()
        .to_string();
    assert!(missing.contains("nope.json"), "{missing}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn unsupported_model_type_lists_supported_ones() {
    let msg = err_text(r#"{"model_type": "bert", "hidden_size": 768}"#);
    assert!(msg.contains("test/config.json"), "{msg}");
    assert!(msg.contains("`model_type` = bert"), "{msg}");
    assert!(msg.contains("gpt2, llama, mistral, qwen2"), "{msg}");
    let msg = err_text(r#"{"hidden_size": 768}"#);
    assert!(msg.contains("`model_type` is required"), "{msg}");
}

#[test]
fn unsupported_gpt2_attention_variants() {
    for key in [
        "scale_attn_by_inverse_layer_idx",
        "reorder_and_upcast_attn",
        "add_cross_attention",
    ] {
        let msg = err_text(&with(GPT2_124M, |m| {
            m.insert(key.into(), true.into());
        }));
        assert!(
            msg.contains(&format!("`{key}` = true is not supported")),
            "{msg}"
        );
    }
    let msg = err_text(&with(GPT2_124M, |m| {
        m.insert("activation_function".into(), "relu".into());
    }));
    assert!(msg.contains("`activation_function` = relu"), "{msg}");
    assert!(msg.contains("gelu_new"), "{msg}");
}

#[test]
fn unsupported_rope_type_names_the_key() {
    let msg = err_text(&with(TINYLLAMA, |m| {
        m.insert(
            "rope_scaling".into(),
            serde_json::json!({"rope_type": "yarn", "factor": 4.0}),
        );
    }));
    assert!(msg.contains("`rope_scaling.rope_type` = yarn"), "{msg}");
    assert!(msg.contains("default, linear, llama3"), "{msg}");
    let msg = err_text(&with(TINYLLAMA, |m| {
        m.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "linear"}),
        );
    }));
    assert!(
        msg.contains("`rope_parameters.factor` is required"),
        "{msg}"
    );
}

#[test]
fn bad_values_name_key_and_value() {
    let msg = err_text(&with(TINYLLAMA, |m| {
        m.insert("num_key_value_heads".into(), 5.into());
    }));
    assert!(msg.contains("`num_key_value_heads` = 5"), "{msg}");
    assert!(msg.contains("divide num_attention_heads = 32"), "{msg}");
    let msg = err_text(&with(TINYLLAMA, |m| {
        m.insert("hidden_size".into(), "2048".into());
    }));
    assert!(msg.contains("`hidden_size` is \"2048\""), "{msg}");
    assert!(msg.contains("integer"), "{msg}");
    let msg = err_text(&with(TINYLLAMA, |m| {
        m.insert("torch_dtype".into(), "int8".into());
    }));
    assert!(msg.contains("`torch_dtype` = int8"), "{msg}");
    let msg = err_text(&with(TINYLLAMA, |m| {
        m.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForSequenceClassification"]),
        );
    }));
    assert!(msg.contains("`architectures`"), "{msg}");
    assert!(msg.contains("LlamaForCausalLM"), "{msg}");
    let msg = err_text("{\"model_type\": ");
    assert!(msg.contains("not valid JSON"), "{msg}");
}

#[test]
fn initializer_range_is_read_with_hf_default() {
    let default = ModelConfig::from_json_str(
        "config.json",
        r#"{"model_type": "llama", "hidden_size": 16, "num_attention_heads": 2,
            "num_hidden_layers": 1, "intermediate_size": 32, "vocab_size": 10}"#,
    )
    .unwrap();
    assert_eq!(default.initializer_range, 0.02);
    let set = ModelConfig::from_json_str(
        "config.json",
        r#"{"model_type": "gpt2", "n_embd": 16, "n_head": 2, "n_layer": 1, "vocab_size": 10,
            "initializer_range": 0.05}"#,
    )
    .unwrap();
    assert_eq!(set.initializer_range, 0.05);
    let mut model = rustspeed_models::gpt2::build::<f32>(&set).unwrap();
    rustspeed_models::gpt2::init_weights(&mut model, &set, 3);
    let wte = model.param("transformer.wte.weight").unwrap();
    let std = (wte.iter().map(|v| v * v).sum::<f32>() / wte.len() as f32).sqrt();
    assert!((std - 0.05).abs() < 0.01, "std {std}");
}
