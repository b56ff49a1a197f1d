//! What trains: every parameter (full fine-tuning), or a frozen base with LoRA adapters on
//! some linear modules plus the biases and whole modules the adapter config names. The model
//! builders read it to declare the adapter parameters and each parameter's `trainable` flag,
//! and the layers skip the gradients of frozen parameters (no dW matmul for a frozen weight).

use rustspeed_kernels::quant::QuantConfig;

use crate::hf_config::ModelConfig;
use crate::peft::prompt::PROMPT_EMBEDDINGS;
use crate::peft::prompt_encoder::PromptPlan;
use crate::peft::targets::{self, Resolved};
use crate::peft::{LoraConfig, LoraModule, PeftError, PromptKind, PromptTuningConfig};

#[derive(Clone, Debug, Default)]
pub struct Tuning {
    lora: Option<LoraPlan>,
    /// Frozen linear weights held quantized (QLoRA).
    quant: Option<QuantConfig>,
    /// Prompt learning (prompt tuning, P-tuning, prefix tuning): the whole base frozen, only
    /// the prompt (and its encoder) trains.
    prompt: Option<PromptTuningConfig>,
}

/// A LoRA config resolved against one architecture.
#[derive(Clone, Debug)]
pub struct LoraPlan {
    pub config: LoraConfig,
    pub resolved: Resolved,
}

/// Our name of a module's LoRA A (`[r, in]`) and B (`[out, r]`): PEFT's saved key without the
/// `base_model.model.` prefix.
pub fn lora_a_name(module: &str) -> String {
    format!("{module}.lora_A.weight")
}

pub fn lora_b_name(module: &str) -> String {
    format!("{module}.lora_B.weight")
}

/// Whether `param` is an adapter parameter (LoRA or prompt learning; never part of a base
/// checkpoint).
pub fn is_adapter_param(param: &str) -> bool {
    param.ends_with(".lora_A.weight")
        || param.ends_with(".lora_B.weight")
        || param == PROMPT_EMBEDDINGS
        || param.starts_with("prompt_encoder.")
}

impl Tuning {
    /// Full fine-tuning: every parameter trains, no adapters.
    pub fn full() -> Tuning {
        Tuning::default()
    }

    /// LoRA per `config` on the architecture `cfg` describes; fails as PEFT would on targets
    /// that do not exist or are not linear.
    pub fn lora(config: LoraConfig, cfg: &ModelConfig) -> Result<Tuning, PeftError> {
        let resolved = targets::resolve(&config, cfg)?;
        Ok(Tuning {
            lora: Some(LoraPlan { config, resolved }),
            quant: None,
            prompt: None,
        })
    }

    /// PEFT's prompt learning (`config.kind`) on the architecture `cfg` describes: the prompt
    /// parameters train, everything else is frozen. Fills `token_dim`, `num_layers` and
    /// `num_attention_heads` as PEFT's `_prepare_prompt_learning_config` does (for prefix tuning
    /// with grouped-query heads: `num_key_value_heads * head_dim` and `num_key_value_heads`),
    /// and refuses values that do not fit the model.
    pub fn prompt(mut config: PromptTuningConfig, cfg: &ModelConfig) -> Result<Tuning, PeftError> {
        let prefix = config.kind == PromptKind::PrefixTuning;
        let (dim, heads) = if prefix {
            (
                cfg.num_key_value_heads * cfg.head_dim,
                cfg.num_key_value_heads,
            )
        } else {
            (cfg.hidden_size, cfg.num_attention_heads)
        };
        let invalid = |key: &str, v: usize, expected: String| PeftError::Invalid {
            file: "adapter_config.json".into(),
            key: key.into(),
            value: v.to_string(),
            expected,
        };
        let what = if prefix {
            "num_key_value_heads * head_dim"
        } else {
            "the hidden size"
        };
        match config.token_dim {
            Some(d) if d != dim => {
                return Err(invalid(
                    "token_dim",
                    d,
                    format!("{what} of the model, {dim} (was the adapter made for another model?)"),
                ))
            }
            _ => config.token_dim = Some(dim),
        }
        match config.num_layers {
            Some(l) if l != cfg.num_hidden_layers => {
                return Err(invalid(
                    "num_layers",
                    l,
                    format!("the model's {} layers", cfg.num_hidden_layers),
                ))
            }
            _ => config.num_layers = Some(cfg.num_hidden_layers),
        }
        match config.num_attention_heads {
            // Only prefix tuning reads it (to split the prefix into heads).
            Some(h) if prefix && h != heads => {
                return Err(invalid(
                    "num_attention_heads",
                    h,
                    format!("the model's {heads} key/value heads"),
                ))
            }
            Some(_) => {}
            None => config.num_attention_heads = Some(heads),
        }
        if config.has_encoder() {
            config.encoder_hidden_size.get_or_insert(dim);
        }
        Ok(Tuning {
            lora: None,
            quant: None,
            prompt: Some(config),
        })
    }

    pub fn prompt_config(&self) -> Option<&PromptTuningConfig> {
        self.prompt.as_ref()
    }

    /// How the prompt's parameters make the prompt rows.
    pub fn prompt_plan(&self) -> Option<PromptPlan> {
        self.prompt.as_ref().map(PromptPlan::new)
    }

    /// Virtual tokens each sequence of a batch starts with (prompt tuning and P-tuning; 0
    /// otherwise, prefix tuning included: its prefix lives inside the attention layers).
    pub fn virtual_tokens(&self) -> usize {
        match &self.prompt {
            Some(p) if p.kind != PromptKind::PrefixTuning => p.num_virtual_tokens,
            _ => 0,
        }
    }

    /// Prefix tuning's prefix length (0 without prefix tuning).
    pub fn prefix_tokens(&self) -> usize {
        match &self.prompt {
            Some(p) if p.kind == PromptKind::PrefixTuning => p.num_virtual_tokens,
            _ => 0,
        }
    }

    /// Holds every frozen Linear/Conv1D weight of the blocks quantized (`--quantize`), as
    /// bitsandbytes does: embeddings, norms and the LM head stay dense. The dense values are
    /// quantized as they are loaded and never kept. Only with adapters: a trained weight needs
    /// its dense values.
    pub fn with_quantization(mut self, quant: QuantConfig) -> Result<Tuning, PeftError> {
        if self.lora.is_none() {
            return Err(PeftError::Unsupported {
                file: "--quantize".into(),
                key: "quantize".into(),
                value: quant.format.name().into(),
                hint: "a quantized base trains only through adapters; add LoRA (--lora-r or --peft-config) or drop --quantize".into(),
            });
        }
        quant.validate().map_err(|e| PeftError::Invalid {
            file: "--quantize".into(),
            key: "quantize".into(),
            value: quant.format.name().into(),
            expected: e.to_string(),
        })?;
        self.quant = Some(quant);
        Ok(self)
    }

    pub fn quantization(&self) -> Option<&QuantConfig> {
        self.quant.as_ref()
    }

    pub fn lora_plan(&self) -> Option<&LoraPlan> {
        self.lora.as_ref()
    }

    /// The LoRA of module `module` (e.g. `model.layers.0.self_attn.q_proj`), if it has one.
    pub fn lora_module(&self, module: &str) -> Option<LoraModule> {
        self.lora.as_ref()?.resolved.lora.get(module).copied()
    }

    /// Whether the parameter named `param` trains.
    pub fn trainable(&self, param: &str) -> bool {
        if self.prompt.is_some() {
            return param == PROMPT_EMBEDDINGS || param.starts_with("prompt_encoder.");
        }
        match &self.lora {
            None => true,
            Some(plan) => is_adapter_param(param) || plan.resolved.trainable.contains(param),
        }
    }
}
