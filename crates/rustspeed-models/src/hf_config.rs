//! The model description in an HF `config.json`, for the architectures rustspeed implements:
//! GPT-2 (`GPT2LMHeadModel`) and the LLaMA family (`LlamaForCausalLM`, `MistralForCausalLM`,
//! `Qwen2ForCausalLM`).
//!
//! Keys that are absent (or `null`) take transformers' defaults for that `model_type`, because
//! that is the model transformers would build from the same file. Both the older form
//! (`rope_theta`, `rope_scaling`, `torch_dtype`) and the one transformers 5 writes
//! (`rope_parameters`, `dtype`) are read. A value that would change the computation in a way
//! rustspeed does not implement is refused rather than ignored: a model that silently differs
//! from the checkpoint's is worse than no model.
//!
//! [`ModelConfig::param_shapes`] lists the parameters exactly as transformers names and orders
//! them (`named_parameters()`, so a tied `lm_head.weight` is absent), which is also the
//! safetensors naming.

use std::path::Path;

use rustspeed_kernels::DType;
use serde_json::{Map, Value};

/// A config.json that cannot be read, or that describes a model rustspeed does not implement.
#[derive(Debug, thiserror::Error)]
pub enum HfConfigError {
    #[error("cannot read model config {file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("model config {file} is not valid JSON: {source}")]
    Json {
        file: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("model config {file}: `{key}` is {value}, expected {expected}")]
    WrongType {
        file: String,
        key: String,
        value: String,
        expected: &'static str,
    },
    #[error("model config {file}: `{key}` = {value} is not supported; supported: {supported}")]
    Unsupported {
        file: String,
        key: String,
        value: String,
        supported: String,
    },
    #[error("model config {file}: `{key}` is required {context}")]
    Missing {
        file: String,
        key: String,
        context: String,
    },
    #[error("model config {file}: `{key}` = {value}: {reason}")]
    Invalid {
        file: String,
        key: String,
        value: String,
        reason: String,
    },
}

/// The HF model class the config describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Gpt2,
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    pub const ALL: [Architecture; 4] = [
        Architecture::Gpt2,
        Architecture::Llama,
        Architecture::Mistral,
        Architecture::Qwen2,
    ];

    /// The `model_type` value in config.json.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Gpt2 => "gpt2",
            Architecture::Llama => "llama",
            Architecture::Mistral => "mistral",
            Architecture::Qwen2 => "qwen2",
        }
    }

    /// The transformers class, as written in config.json's `architectures`.
    pub fn hf_class(self) -> &'static str {
        match self {
            Architecture::Gpt2 => "GPT2LMHeadModel",
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
        }
    }

    /// GPT-2 normalises with LayerNorm (weight and bias); the LLaMA family with RMSNorm.
    pub fn uses_layer_norm(self) -> bool {
        self == Architecture::Gpt2
    }
}

/// The MLP activation (GPT-2's `activation_function`, LLaMA's `hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// tanh approximation: `gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`.
    GeluTanh,
    /// erf form: `gelu`.
    Gelu,
    /// `silu` / `swish`.
    Silu,
}

const ACTIVATIONS: &str = "gelu_new, gelu_pytorch_tanh, gelu_fast, gelu, silu, swish";

impl Activation {
    fn from_hf(name: &str) -> Option<Activation> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "gelu" => Some(Activation::Gelu),
            "silu" | "swish" => Some(Activation::Silu),
            _ => None,
        }
    }
}

/// RoPE frequency scaling (transformers' `rope_type`); `default` is `None` in [`Rope::scaling`].
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's piecewise rescaling of the inverse frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

const ROPE_TYPES: &str = "default, linear, llama3";

#[derive(Clone, Debug, PartialEq)]
pub struct Rope {
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
}

/// Dropout probabilities; GPT-2 has all three, the LLaMA family only attention dropout.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub embedding: f32,
    pub residual: f32,
    pub attention: f32,
}

/// Whether a decoder layer attends to every earlier position or only a sliding window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionType {
    Full,
    Sliding,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    /// LayerNorm `layer_norm_epsilon` (GPT-2) or RMSNorm `rms_norm_eps`.
    pub norm_eps: f64,
    pub activation: Activation,
    /// `None` for GPT-2, which has learned position embeddings.
    pub rope: Option<Rope>,
    /// The dtype the checkpoint was saved in, when the config says.
    pub dtype: Option<DType>,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (GPT-2's fused `c_attn` always has one).
    pub qkv_bias: bool,
    /// Bias on the attention output projection (`o_proj` / `c_proj`).
    pub attn_output_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// Window length for layers whose [`AttentionType`] is `Sliding`.
    pub sliding_window: Option<usize>,
    /// One entry per decoder layer.
    pub layer_types: Vec<AttentionType>,
    pub dropout: Dropout,
    pub bos_token_id: Option<u32>,
    /// Llama 3 configs list several end-of-sequence tokens.
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// Standard deviation of the normal weight initialisation (HF `initializer_range`).
    pub initializer_range: f64,
}

/// One torch module's direct parameters, as DeepSpeed's `model.modules()` walk sees them.
struct Module {
    params: Vec<(String, Vec<usize>)>,
    /// The parameters belong to another module too (the tied `lm_head`): DeepSpeed counts them
    /// for this module's size, `named_parameters()` lists them once.
    shared: bool,
}

impl ModelConfig {
    /// Reads `path`, or `path/config.json` when `path` is a directory.
    pub fn from_path(path: &Path) -> Result<ModelConfig, HfConfigError> {
        let file = if path.is_dir() {
            path.join("config.json")
        } else {
            path.to_path_buf()
        };
        let name = file.display().to_string();
        let text = std::fs::read_to_string(&file).map_err(|source| HfConfigError::Io {
            file: name.clone(),
            source,
        })?;
        parse(&name, &text)
    }

    /// Parses config.json text; `file` names it in errors.
    pub fn from_json_str(file: &str, text: &str) -> Result<ModelConfig, HfConfigError> {
        parse(file, text)
    }

    /// Every parameter as transformers' `named_parameters()` lists it: HF name and shape, in
    /// model order. GPT-2's Conv1D weights are `[in, out]`; LLaMA's Linear weights `[out, in]`.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.modules()
            .into_iter()
            .filter(|m| !m.shared)
            .flat_map(|m| m.params)
            .collect()
    }

    /// Total parameter count, tied embeddings counted once.
    pub fn num_parameters(&self) -> u64 {
        self.param_shapes()
            .iter()
            .map(|(_, shape)| numel(shape))
            .sum()
    }

    /// DeepSpeed's `largest_layer_params`: the largest sum of a single module's own parameters
    /// (`m.parameters(recurse=False)`), the tied `lm_head` included with its shared weight.
    pub fn largest_layer_params(&self) -> u64 {
        self.modules()
            .iter()
            .map(|m| m.params.iter().map(|(_, s)| numel(s)).sum::<u64>())
            .max()
            .unwrap_or(0)
    }

    /// The sliding window of decoder layer `layer`, if it has one.
    pub fn layer_sliding_window(&self, layer: usize) -> Option<usize> {
        match self.layer_types.get(layer) {
            Some(AttentionType::Sliding) => self.sliding_window,
            _ => None,
        }
    }

    fn modules(&self) -> Vec<Module> {
        match self.architecture {
            Architecture::Gpt2 => self.gpt2_modules(),
            _ => self.llama_modules(),
        }
    }

    fn gpt2_modules(&self) -> Vec<Module> {
        let d = self.hidden_size;
        let ffn = self.intermediate_size;
        let mut out = vec![
            own(vec![p("transformer.wte.weight", &[self.vocab_size, d])]),
            own(vec![p(
                "transformer.wpe.weight",
                &[self.max_position_embeddings, d],
            )]),
        ];
        let norm = |name: &str| {
            own(vec![
                p(&format!("{name}.weight"), &[d]),
                p(&format!("{name}.bias"), &[d]),
            ])
        };
        let conv1d = |name: &str, inp: usize, outp: usize| {
            own(vec![
                p(&format!("{name}.weight"), &[inp, outp]),
                p(&format!("{name}.bias"), &[outp]),
            ])
        };
        for i in 0..self.num_hidden_layers {
            let h = format!("transformer.h.{i}");
            out.push(norm(&format!("{h}.ln_1")));
            out.push(conv1d(&format!("{h}.attn.c_attn"), d, 3 * d));
            out.push(conv1d(&format!("{h}.attn.c_proj"), d, d));
            out.push(norm(&format!("{h}.ln_2")));
            out.push(conv1d(&format!("{h}.mlp.c_fc"), d, ffn));
            out.push(conv1d(&format!("{h}.mlp.c_proj"), ffn, d));
        }
        out.push(norm("transformer.ln_f"));
        out.push(self.lm_head());
        out
    }

    fn llama_modules(&self) -> Vec<Module> {
        let d = self.hidden_size;
        let q_out = self.num_attention_heads * self.head_dim;
        let kv_out = self.num_key_value_heads * self.head_dim;
        let ffn = self.intermediate_size;
        let linear = |name: &str, inp: usize, outp: usize, bias: bool| {
            let mut params = vec![p(&format!("{name}.weight"), &[outp, inp])];
            if bias {
                params.push(p(&format!("{name}.bias"), &[outp]));
            }
            own(params)
        };
        let mut out = vec![own(vec![p(
            "model.embed_tokens.weight",
            &[self.vocab_size, d],
        )])];
        for i in 0..self.num_hidden_layers {
            let l = format!("model.layers.{i}");
            out.push(linear(
                &format!("{l}.self_attn.q_proj"),
                d,
                q_out,
                self.qkv_bias,
            ));
            out.push(linear(
                &format!("{l}.self_attn.k_proj"),
                d,
                kv_out,
                self.qkv_bias,
            ));
            out.push(linear(
                &format!("{l}.self_attn.v_proj"),
                d,
                kv_out,
                self.qkv_bias,
            ));
            out.push(linear(
                &format!("{l}.self_attn.o_proj"),
                q_out,
                d,
                self.attn_output_bias,
            ));
            out.push(linear(&format!("{l}.mlp.gate_proj"), d, ffn, self.mlp_bias));
            out.push(linear(&format!("{l}.mlp.up_proj"), d, ffn, self.mlp_bias));
            out.push(linear(&format!("{l}.mlp.down_proj"), ffn, d, self.mlp_bias));
            out.push(own(vec![p(&format!("{l}.input_layernorm.weight"), &[d])]));
            out.push(own(vec![p(
                &format!("{l}.post_attention_layernorm.weight"),
                &[d],
            )]));
        }
        out.push(own(vec![p("model.norm.weight", &[d])]));
        out.push(self.lm_head());
        out
    }

    fn lm_head(&self) -> Module {
        Module {
            params: vec![p("lm_head.weight", &[self.vocab_size, self.hidden_size])],
            shared: self.tie_word_embeddings,
        }
    }
}

fn p(name: &str, shape: &[usize]) -> (String, Vec<usize>) {
    (name.to_string(), shape.to_vec())
}

fn own(params: Vec<(String, Vec<usize>)>) -> Module {
    Module {
        params,
        shared: false,
    }
}

fn numel(shape: &[usize]) -> u64 {
    shape.iter().map(|&d| d as u64).product()
}

/// Typed access to one JSON object, every error naming the file and the key path.
struct Reader<'a> {
    file: &'a str,
    prefix: &'a str,
    obj: &'a Map<String, Value>,
}

impl<'a> Reader<'a> {
    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The value at `key`, with JSON `null` read as absent (transformers writes `null` for unset).
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn wrong(&self, key: &str, value: &Value, expected: &'static str) -> HfConfigError {
        HfConfigError::WrongType {
            file: self.file.to_string(),
            key: self.key(key),
            value: value.to_string(),
            expected,
        }
    }

    fn invalid(&self, key: &str, value: impl ToString, reason: impl Into<String>) -> HfConfigError {
        HfConfigError::Invalid {
            file: self.file.to_string(),
            key: self.key(key),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    fn unsupported(&self, key: &str, value: impl ToString, supported: &str) -> HfConfigError {
        HfConfigError::Unsupported {
            file: self.file.to_string(),
            key: self.key(key),
            value: value.to_string(),
            supported: supported.to_string(),
        }
    }

    fn missing(&self, key: &str, context: impl Into<String>) -> HfConfigError {
        HfConfigError::Missing {
            file: self.file.to_string(),
            key: self.key(key),
            context: context.into(),
        }
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, HfConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.wrong(key, v, "a non-negative integer")),
        }
    }

    /// A size that must be at least 1.
    fn dim(&self, key: &str, default: usize) -> Result<usize, HfConfigError> {
        let n = self.opt_usize(key)?.unwrap_or(default);
        if n == 0 {
            return Err(self.invalid(key, n, "must be at least 1"));
        }
        Ok(n)
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, HfConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.wrong(key, v, "a number")),
        }
    }

    fn positive(&self, key: &str, default: f64) -> Result<f64, HfConfigError> {
        let x = self.opt_f64(key)?.unwrap_or(default);
        if !(x > 0.0 && x.is_finite()) {
            return Err(self.invalid(key, x, "must be a positive number"));
        }
        Ok(x)
    }

    fn required_positive(&self, key: &str, context: &str) -> Result<f64, HfConfigError> {
        if self.get(key).is_none() {
            return Err(self.missing(key, context));
        }
        self.positive(key, 1.0)
    }

    fn probability(&self, key: &str, default: f64) -> Result<f32, HfConfigError> {
        let x = self.opt_f64(key)?.unwrap_or(default);
        if !(0.0..1.0).contains(&x) {
            return Err(self.invalid(key, x, "a dropout probability must be in [0, 1)"));
        }
        Ok(x as f32)
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool, HfConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.wrong(key, v, "true or false")),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>, HfConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.wrong(key, v, "a string")),
        }
    }

    fn token_id(&self, key: &str, default: Option<u32>) -> Result<Option<u32>, HfConfigError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| self.wrong(key, v, "a token id")),
        }
    }

    fn token_ids(&self, key: &str, default: Option<u32>) -> Result<Vec<u32>, HfConfigError> {
        let Some(v) = self.get(key) else {
            return Ok(default.into_iter().collect());
        };
        let as_id = |x: &Value| x.as_u64().and_then(|n| u32::try_from(n).ok());
        match v {
            Value::Array(items) => items
                .iter()
                .map(|x| as_id(x).ok_or_else(|| self.wrong(key, v, "a token id or a list of them")))
                .collect(),
            _ => as_id(v)
                .map(|id| vec![id])
                .ok_or_else(|| self.wrong(key, v, "a token id or a list of them")),
        }
    }

    fn object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>, HfConfigError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.wrong(key, v, "an object")),
        }
    }

    /// Refuses a flag whose non-default value changes the model in a way not implemented.
    fn refuse_if(&self, key: &str, default: bool) -> Result<(), HfConfigError> {
        let value = self.bool_or(key, default)?;
        if value != default {
            return Err(self.unsupported(key, value, &default.to_string()));
        }
        Ok(())
    }
}

fn parse(file: &str, text: &str) -> Result<ModelConfig, HfConfigError> {
    let root: Value = serde_json::from_str(text).map_err(|source| HfConfigError::Json {
        file: file.to_string(),
        source,
    })?;
    let Value::Object(obj) = &root else {
        return Err(HfConfigError::WrongType {
            file: file.to_string(),
            key: "<root>".into(),
            value: root.to_string(),
            expected: "a JSON object",
        });
    };
    let r = Reader {
        file,
        prefix: "",
        obj,
    };
    let supported_types = Architecture::ALL.map(|a| a.model_type()).join(", ");
    let model_type = r
        .opt_str("model_type")?
        .ok_or_else(|| r.missing("model_type", format!("(one of {supported_types})")))?;
    let architecture = Architecture::ALL
        .into_iter()
        .find(|a| a.model_type() == model_type)
        .ok_or_else(|| r.unsupported("model_type", model_type, &supported_types))?;
    check_architectures(&r, architecture)?;
    if r.get("quantization_config").is_some() {
        return Err(r.unsupported(
            "quantization_config",
            "(present)",
            "unquantized checkpoints (f32, f16, bf16)",
        ));
    }
    let dtype = parse_dtype(&r)?;
    let config = match architecture {
        Architecture::Gpt2 => parse_gpt2(&r, dtype)?,
        _ => parse_llama_family(&r, architecture, dtype)?,
    };
    Ok(config)
}

fn check_architectures(r: &Reader, arch: Architecture) -> Result<(), HfConfigError> {
    let Some(v) = r.get("architectures") else {
        return Ok(());
    };
    let Value::Array(classes) = v else {
        return Err(r.wrong("architectures", v, "a list of class names"));
    };
    for class in classes {
        if class.as_str() != Some(arch.hf_class()) {
            return Err(r.unsupported("architectures", v, arch.hf_class()));
        }
    }
    Ok(())
}

fn parse_dtype(r: &Reader) -> Result<Option<DType>, HfConfigError> {
    // transformers 5 writes `dtype`; older versions `torch_dtype`.
    let key = if r.get("dtype").is_some() {
        "dtype"
    } else {
        "torch_dtype"
    };
    let Some(name) = r.opt_str(key)? else {
        return Ok(None);
    };
    match name {
        "float32" | "float" => Ok(Some(DType::F32)),
        "bfloat16" => Ok(Some(DType::BF16)),
        "float16" | "half" => Ok(Some(DType::F16)),
        _ => Err(r.unsupported(key, name, "float32, bfloat16, float16")),
    }
}

fn parse_gpt2(r: &Reader, dtype: Option<DType>) -> Result<ModelConfig, HfConfigError> {
    // Attention variants the GPT-2 layers do not implement.
    r.refuse_if("scale_attn_by_inverse_layer_idx", false)?;
    r.refuse_if("reorder_and_upcast_attn", false)?;
    r.refuse_if("scale_attn_weights", true)?;
    r.refuse_if("add_cross_attention", false)?;

    let hidden_size = r.dim("n_embd", 768)?;
    let num_heads = r.dim("n_head", 12)?;
    if hidden_size % num_heads != 0 {
        return Err(r.invalid(
            "n_head",
            num_heads,
            format!("must divide n_embd = {hidden_size}"),
        ));
    }
    let num_layers = r.dim("n_layer", 12)?;
    let act_name = r.opt_str("activation_function")?.unwrap_or("gelu_new");
    let activation = Activation::from_hf(act_name)
        .ok_or_else(|| r.unsupported("activation_function", act_name, ACTIVATIONS))?;
    Ok(ModelConfig {
        architecture: Architecture::Gpt2,
        vocab_size: r.dim("vocab_size", 50257)?,
        hidden_size,
        num_hidden_layers: num_layers,
        num_attention_heads: num_heads,
        num_key_value_heads: num_heads,
        head_dim: hidden_size / num_heads,
        intermediate_size: r.dim("n_inner", 4 * hidden_size)?,
        max_position_embeddings: r.dim("n_positions", 1024)?,
        norm_eps: r.positive("layer_norm_epsilon", 1e-5)?,
        activation,
        rope: None,
        dtype,
        tie_word_embeddings: r.bool_or("tie_word_embeddings", true)?,
        qkv_bias: true,
        attn_output_bias: true,
        mlp_bias: true,
        sliding_window: None,
        layer_types: vec![AttentionType::Full; num_layers],
        dropout: Dropout {
            embedding: r.probability("embd_pdrop", 0.1)?,
            residual: r.probability("resid_pdrop", 0.1)?,
            attention: r.probability("attn_pdrop", 0.1)?,
        },
        bos_token_id: r.token_id("bos_token_id", Some(50256))?,
        eos_token_ids: r.token_ids("eos_token_id", Some(50256))?,
        pad_token_id: r.token_id("pad_token_id", None)?,
        initializer_range: r.positive("initializer_range", 0.02)?,
    })
}

/// transformers' defaults for the keys the LLaMA-family configs share.
struct FamilyDefaults {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_heads: usize,
    num_kv_heads: Option<usize>,
    max_positions: usize,
    bos: Option<u32>,
    eos: Option<u32>,
}

fn family_defaults(arch: Architecture) -> FamilyDefaults {
    match arch {
        Architecture::Mistral => FamilyDefaults {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_heads: 32,
            num_kv_heads: Some(8),
            max_positions: 4096 * 32,
            bos: Some(1),
            eos: Some(2),
        },
        Architecture::Qwen2 => FamilyDefaults {
            vocab_size: 151936,
            hidden_size: 4096,
            intermediate_size: 22016,
            num_heads: 32,
            num_kv_heads: Some(32),
            max_positions: 32768,
            bos: None,
            eos: None,
        },
        _ => FamilyDefaults {
            vocab_size: 32000,
            hidden_size: 4096,
            intermediate_size: 11008,
            num_heads: 32,
            num_kv_heads: None,
            max_positions: 2048,
            bos: Some(1),
            eos: Some(2),
        },
    }
}

fn parse_llama_family(
    r: &Reader,
    arch: Architecture,
    dtype: Option<DType>,
) -> Result<ModelConfig, HfConfigError> {
    let defaults = family_defaults(arch);
    let hidden_size = r.dim("hidden_size", defaults.hidden_size)?;
    let num_heads = r.dim("num_attention_heads", defaults.num_heads)?;
    let num_kv_heads = r.dim(
        "num_key_value_heads",
        defaults.num_kv_heads.unwrap_or(num_heads),
    )?;
    if num_heads % num_kv_heads != 0 {
        return Err(r.invalid(
            "num_key_value_heads",
            num_kv_heads,
            format!("must divide num_attention_heads = {num_heads}"),
        ));
    }
    let head_dim = match r.opt_usize("head_dim")? {
        Some(0) => return Err(r.invalid("head_dim", 0, "must be at least 1")),
        Some(h) => h,
        None if hidden_size % num_heads != 0 => {
            return Err(r.invalid(
                "num_attention_heads",
                num_heads,
                format!("must divide hidden_size = {hidden_size} when head_dim is not given"),
            ))
        }
        None => hidden_size / num_heads,
    };
    let num_layers = r.dim("num_hidden_layers", 32)?;
    let act_name = r.opt_str("hidden_act")?.unwrap_or("silu");
    let activation = Activation::from_hf(act_name)
        .ok_or_else(|| r.unsupported("hidden_act", act_name, ACTIVATIONS))?;
    let max_positions = r.dim("max_position_embeddings", defaults.max_positions)?;

    // Bias layout: LLaMA's `attention_bias` covers q/k/v/o; Mistral has none; Qwen2 always has
    // q/k/v biases and never an o_proj bias.
    let (qkv_bias, attn_output_bias, mlp_bias) = match arch {
        Architecture::Llama => {
            let attention_bias = r.bool_or("attention_bias", false)?;
            (
                attention_bias,
                attention_bias,
                r.bool_or("mlp_bias", false)?,
            )
        }
        Architecture::Qwen2 => (true, false, false),
        _ => (false, false, false),
    };
    let (sliding_window, layer_types) = parse_sliding_window(r, arch, num_layers)?;
    Ok(ModelConfig {
        architecture: arch,
        vocab_size: r.dim("vocab_size", defaults.vocab_size)?,
        hidden_size,
        num_hidden_layers: num_layers,
        num_attention_heads: num_heads,
        num_key_value_heads: num_kv_heads,
        head_dim,
        intermediate_size: r.dim("intermediate_size", defaults.intermediate_size)?,
        max_position_embeddings: max_positions,
        norm_eps: r.positive("rms_norm_eps", 1e-6)?,
        activation,
        rope: Some(parse_rope(r)?),
        dtype,
        tie_word_embeddings: r.bool_or("tie_word_embeddings", false)?,
        qkv_bias,
        attn_output_bias,
        mlp_bias,
        sliding_window,
        layer_types,
        dropout: Dropout {
            embedding: 0.0,
            residual: 0.0,
            attention: r.probability("attention_dropout", 0.0)?,
        },
        bos_token_id: r.token_id("bos_token_id", defaults.bos)?,
        eos_token_ids: r.token_ids("eos_token_id", defaults.eos)?,
        pad_token_id: r.token_id("pad_token_id", None)?,
        initializer_range: r.positive("initializer_range", 0.02)?,
    })
}

fn parse_sliding_window(
    r: &Reader,
    arch: Architecture,
    num_layers: usize,
) -> Result<(Option<usize>, Vec<AttentionType>), HfConfigError> {
    let all_full = vec![AttentionType::Full; num_layers];
    match arch {
        Architecture::Mistral => {
            // MistralConfig defaults sliding_window to 4096; an explicit null turns it off.
            let window = match r.obj.get("sliding_window") {
                None => Some(4096),
                Some(Value::Null) => None,
                Some(_) => Some(r.dim("sliding_window", 4096)?),
            };
            let types = match window {
                Some(_) => vec![AttentionType::Sliding; num_layers],
                None => all_full,
            };
            Ok((window, types))
        }
        Architecture::Qwen2 => {
            if !r.bool_or("use_sliding_window", false)? {
                return Ok((None, all_full));
            }
            let window = r.dim("sliding_window", 4096)?;
            let types = match r.get("layer_types") {
                Some(v) => parse_layer_types(r, v, num_layers)?,
                None => {
                    // Qwen2Config: layers from max_window_layers on use the window.
                    let from = r.opt_usize("max_window_layers")?.unwrap_or(28);
                    (0..num_layers)
                        .map(|i| {
                            if i >= from {
                                AttentionType::Sliding
                            } else {
                                AttentionType::Full
                            }
                        })
                        .collect()
                }
            };
            Ok((Some(window), types))
        }
        _ => Ok((None, all_full)),
    }
}

fn parse_layer_types(
    r: &Reader,
    v: &Value,
    num_layers: usize,
) -> Result<Vec<AttentionType>, HfConfigError> {
    let expected = "a list of \"full_attention\" / \"sliding_attention\", one per layer";
    let Value::Array(items) = v else {
        return Err(r.wrong("layer_types", v, expected));
    };
    if items.len() != num_layers {
        return Err(r.invalid(
            "layer_types",
            v,
            format!("has {} entries for {num_layers} layers", items.len()),
        ));
    }
    items
        .iter()
        .map(|item| match item.as_str() {
            Some("full_attention") => Ok(AttentionType::Full),
            Some("sliding_attention") => Ok(AttentionType::Sliding),
            _ => Err(r.unsupported("layer_types", item, "full_attention, sliding_attention")),
        })
        .collect()
}

fn parse_rope(r: &Reader) -> Result<Rope, HfConfigError> {
    // transformers 5 keeps theta and scaling together in `rope_parameters`; older configs use
    // top-level `rope_theta` and an optional `rope_scaling` object.
    let (params, params_key) = match r.object("rope_parameters")? {
        Some(m) => (Some(m), "rope_parameters"),
        None => (r.object("rope_scaling")?, "rope_scaling"),
    };
    let old_theta = r.positive("rope_theta", 10000.0)?;
    let Some(params) = params else {
        return Ok(Rope {
            theta: old_theta,
            scaling: None,
        });
    };
    let prefix = format!("{params_key}.");
    let sub = Reader {
        file: r.file,
        prefix: &prefix,
        obj: params,
    };
    let theta = if params_key == "rope_parameters" {
        let theta = sub.positive("rope_theta", old_theta)?;
        if r.get("rope_theta").is_some() && theta != old_theta {
            return Err(r.invalid(
                "rope_theta",
                old_theta,
                format!("disagrees with rope_parameters.rope_theta = {theta}"),
            ));
        }
        theta
    } else {
        old_theta
    };
    // Older configs spell it `type`, newer `rope_type`.
    let type_key = if sub.get("rope_type").is_some() {
        "rope_type"
    } else {
        "type"
    };
    let rope_type = sub.opt_str(type_key)?.unwrap_or("default");
    let scaling = match rope_type {
        "default" => None,
        "linear" => Some(RopeScaling::Linear {
            factor: sub.required_positive("factor", "for linear RoPE scaling")?,
        }),
        "llama3" => {
            let context = "for llama3 RoPE scaling";
            let original = sub
                .opt_usize("original_max_position_embeddings")?
                .ok_or_else(|| sub.missing("original_max_position_embeddings", context))?;
            Some(RopeScaling::Llama3 {
                factor: sub.required_positive("factor", context)?,
                low_freq_factor: sub.required_positive("low_freq_factor", context)?,
                high_freq_factor: sub.required_positive("high_freq_factor", context)?,
                original_max_position_embeddings: original,
            })
        }
        other => return Err(sub.unsupported(type_key, other, ROPE_TYPES)),
    };
    Ok(Rope { theta, scaling })
}
