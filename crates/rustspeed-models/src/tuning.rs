//! What trains: every parameter (full fine-tuning), or a frozen base with LoRA adapters on
//! some linear modules plus the biases and whole modules the adapter config names. The model
//! builders read it to declare the adapter parameters and each parameter's `trainable` flag,
//! and the layers skip the gradients of frozen parameters (no dW matmul for a frozen weight).

use rustspeed_kernels::quant::QuantConfig;

use crate::hf_config::ModelConfig;
use crate::peft::prompt::PROMPT_EMBEDDINGS;
use crate::peft::targets::{self, Resolved};
use crate::peft::{LoraConfig, LoraModule, PeftError, PromptTuningConfig};

#[derive(Clone, Debug, Default)]
pub struct Tuning {
    lora: Option<LoraPlan>,
    /// Frozen linear weights held quantized (QLoRA).
    quant: Option<QuantConfig>,
    /// Prompt tuning: the whole base frozen, only the virtual-token embeddings train.
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

/// Whether `param` is a LoRA adapter parameter (never part of a base checkpoint).
pub fn is_adapter_param(param: &str) -> bool {
    param.ends_with(".lora_A.weight")
        || param.ends_with(".lora_B.weight")
        || param == PROMPT_EMBEDDINGS
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

    /// PEFT's prompt tuning on the architecture `cfg` describes: `prompt_embeddings`
    /// `[num_virtual_tokens, hidden_size]` trains, everything else is frozen.
    pub fn prompt(mut config: PromptTuningConfig, cfg: &ModelConfig) -> Result<Tuning, PeftError> {
        match config.token_dim {
            None => config.token_dim = Some(cfg.hidden_size),
            Some(d) if d != cfg.hidden_size => {
                return Err(PeftError::Invalid {
                    file: "adapter_config.json".into(),
                    key: "token_dim".into(),
                    value: d.to_string(),
                    expected: format!(
                        "the model's hidden size {} (the adapter was made for another model)",
                        cfg.hidden_size
                    ),
                })
            }
            Some(_) => {}
        }
        config.num_layers.get_or_insert(cfg.num_hidden_layers);
        config
            .num_attention_heads
            .get_or_insert(cfg.num_attention_heads);
        Ok(Tuning {
            lora: None,
            quant: None,
            prompt: Some(config),
        })
    }

    pub fn prompt_config(&self) -> Option<&PromptTuningConfig> {
        self.prompt.as_ref()
    }

    /// Virtual tokens each sequence starts with (0 without prompt tuning).
    pub fn virtual_tokens(&self) -> usize {
        self.prompt.as_ref().map_or(0, |p| p.num_virtual_tokens)
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
            return param == PROMPT_EMBEDDINGS;
        }
        match &self.lora {
            None => true,
            Some(plan) => is_adapter_param(param) || plan.resolved.trainable.contains(param),
        }
    }
}
