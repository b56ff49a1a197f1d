//! LoRA adapter weights: PEFT's initialisation, and `adapter_model.safetensors` in and out with
//! PEFT's key names.
//!
//! PEFT saves every trainable parameter of the adapter under `base_model.model.<name>`, without
//! the adapter name: `...q_proj.lora_A.weight`, `...q_proj.lora_B.weight`; the bias of a
//! LoRA-wrapped module as `<module>.base_layer.bias` (its module became `base_layer`), other
//! biases and `modules_to_save` parameters under their own names.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use rustspeed_kernels::{DType, Float};
use safetensors::tensor::SafeTensors;

use super::config::{LoraInit, TargetModules};
use super::PeftError;
use crate::init::{name_hash, NormalRng};
use crate::model::Model;
use crate::params::ParamSlot;
use crate::tuning::is_adapter_param;
use crate::weights::{convert_into, save_tensors, write_atomic};

const PREFIX: &str = "base_model.model.";
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// What [`save_adapter`] wrote.
#[derive(Clone, Debug, PartialEq)]
pub struct AdapterFiles {
    pub config: PathBuf,
    pub weights: PathBuf,
    /// Number of tensors saved.
    pub tensors: usize,
}

fn no_lora(what: &str) -> PeftError {
    PeftError::Adapter {
        path: PathBuf::from("<model>"),
        message: format!("{what}: the model was built without a LoRA plan (build it with a Tuning from Tuning::lora)"),
    }
}

/// The key PEFT saves parameter `name` under.
pub fn peft_key<T: Float>(model: &Model<T>, name: &str) -> String {
    if let Some(module) = name.strip_suffix(".bias") {
        if model.tuning.lora_module(module).is_some() {
            return format!("{PREFIX}{module}.base_layer.bias");
        }
    }
    format!("{PREFIX}{name}")
}

/// Our parameter name for a PEFT key: the prefix and `base_layer.` removed, and the adapter
/// name too if a file carries it (`lora_A.default.weight`).
fn our_name(key: &str) -> Option<String> {
    let rest = key.strip_prefix(PREFIX)?;
    let mut name = rest.replace(".base_layer.", ".");
    for part in [".lora_A.", ".lora_B."] {
        if let Some(i) = name.find(part) {
            let tail = &name[i + part.len()..];
            if let Some((_adapter, last)) = tail.split_once('.') {
                if last == "weight" {
                    name = format!("{}{part}weight", &name[..i]);
                }
            }
        }
    }
    Some(name)
}

/// The parameters an adapter holds: every trainable parameter of a LoRA-tuned model.
fn adapter_slots<T: Float>(model: &Model<T>) -> Vec<&ParamSlot> {
    model
        .layout
        .slots()
        .iter()
        .filter(|s| s.spec.trainable)
        .collect()
}

/// PEFT's initialisation of every LoRA pair (per `init_lora_weights`): A as `nn.Linear`'s
/// default (Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))), B zero, so the
/// adapted model starts equal to the base. Seeded per parameter name, so it does not depend on
/// which other parameters exist; it does not reproduce torch's generator.
pub fn init_lora<T: Float>(model: &mut Model<T>, seed: u64) -> Result<(), PeftError> {
    let plan = model
        .tuning
        .lora_plan()
        .ok_or_else(|| no_lora("init_lora"))?;
    let init = plan.config.init_lora_weights;
    let slots: Vec<ParamSlot> = model.layout.slots().to_vec();
    for slot in slots {
        let name = slot.spec.name.as_str();
        let is_a = name.ends_with(".lora_A.weight");
        if !is_a && !name.ends_with(".lora_B.weight") {
            continue;
        }
        let fan_in = slot.spec.shape[1];
        let r = if is_a {
            slot.spec.shape[0]
        } else {
            slot.spec.shape[1]
        };
        let mut rng = NormalRng::new(seed ^ name_hash(name).rotate_left(23));
        let bound = 1.0 / (fan_in as f64).sqrt();
        let values = &mut model.params[slot.range()];
        for v in values.iter_mut() {
            let x = match (init, is_a) {
                (LoraInit::Default, true) | (LoraInit::Random, _) => {
                    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                    (2.0 * u - 1.0) * bound
                }
                (LoraInit::Gaussian, true) => rng.normal() / r as f64,
                (LoraInit::Default | LoraInit::Gaussian, false) => 0.0,
            };
            *v = T::from_f32(x as f32);
        }
    }
    Ok(())
}

/// Writes `dir/adapter_config.json` and `dir/adapter_model.safetensors` (f32, PEFT's keys) for
/// a LoRA-tuned model, so that `PeftModel.from_pretrained(base, dir)` loads it.
/// `base_model_name_or_path` is recorded in the config when given.
pub fn save_adapter<T: Float>(
    dir: &Path,
    model: &Model<T>,
    base_model_name_or_path: Option<&str>,
) -> Result<AdapterFiles, PeftError> {
    if model.tuning.prompt_config().is_some() {
        return super::prompt::save_prompt_adapter(dir, model, base_model_name_or_path);
    }
    let plan = model
        .tuning
        .lora_plan()
        .ok_or_else(|| no_lora("save_adapter"))?;
    std::fs::create_dir_all(dir).map_err(|source| PeftError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let f32_values: Vec<(String, Vec<f32>, Vec<usize>)> = adapter_slots(model)
        .into_iter()
        .map(|s| {
            let v = model.params[s.range()].iter().map(|x| x.to_f32()).collect();
            (peft_key(model, &s.spec.name), v, s.spec.shape.clone())
        })
        .collect();
    let tensors: Vec<(String, &[f32], Vec<usize>)> = f32_values
        .iter()
        .map(|(k, v, s)| (k.clone(), v.as_slice(), s.clone()))
        .collect();
    let weights = dir.join(WEIGHTS_FILE);
    save_tensors(&weights, &tensors, DType::F32)?;

    let mut config = plan.config.clone();
    // PEFT writes "all-linear" resolved to the module names it found.
    if config.target_modules == Some(TargetModules::AllLinear) {
        config.target_modules = Some(TargetModules::List(
            plan.resolved.lora.keys().cloned().collect(),
        ));
    }
    if let Some(base) = base_model_name_or_path {
        config.base_model_name_or_path = Some(base.to_string());
    }
    let text = serde_json::to_string_pretty(&config.to_json()).expect("JSON") + "\n";
    let config_path = dir.join(CONFIG_FILE);
    write_atomic(&config_path, text.as_bytes())?;
    Ok(AdapterFiles {
        config: config_path,
        weights,
        tensors: tensors.len(),
    })
}

/// Loads `dir/adapter_model.safetensors` into a model built with the adapter's config (every
/// LoRA pair must be present; a tensor for a parameter the config does not train is an error).
pub fn load_adapter<T: Float>(dir: &Path, model: &mut Model<T>) -> Result<(), PeftError> {
    if model.tuning.prompt_config().is_some() {
        return super::prompt::load_prompt_adapter(dir, model);
    }
    if model.tuning.lora_plan().is_none() {
        return Err(no_lora("load_adapter"));
    }
    let path = dir.join(WEIGHTS_FILE);
    if !path.is_file() {
        let hint = if dir.join("adapter_model.bin").is_file() {
            " (adapter_model.bin is a pickle; re-save the adapter with PEFT's save_pretrained(safe_serialization=True))"
        } else {
            ""
        };
        return Err(PeftError::Adapter {
            path,
            message: format!("no adapter weights{hint}"),
        });
    }
    let adapter_err = |message: String| PeftError::Adapter {
        path: path.clone(),
        message,
    };
    let file = File::open(&path).map_err(|source| PeftError::Io {
        path: path.clone(),
        source,
    })?;
    // SAFETY: read-only mapping of a file we only read; see weights::load_hf_weights.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| PeftError::Io {
        path: path.clone(),
        source,
    })?;
    let st = SafeTensors::deserialize(&map)
        .map_err(|e| adapter_err(format!("not a valid safetensors file: {e}")))?;
    let wanted: HashMap<String, ParamSlot> = adapter_slots(model)
        .into_iter()
        .map(|s| (s.spec.name.clone(), s.clone()))
        .collect();
    let mut filled = std::collections::HashSet::new();
    for (key, view) in st.tensors() {
        let name = our_name(&key).ok_or_else(|| {
            adapter_err(format!(
                "tensor `{key}` does not start with `{PREFIX}`; is this a PEFT LoRA adapter?"
            ))
        })?;
        let Some(slot) = wanted.get(&name) else {
            let why = if model.layout.get(&name).is_some() {
                "a parameter the adapter config keeps frozen (check its bias and modules_to_save)"
            } else {
                "no parameter of this model (was the adapter made for another base model or config?)"
            };
            return Err(adapter_err(format!("tensor `{key}` is {why}")));
        };
        if view.shape() != slot.spec.shape.as_slice() {
            return Err(adapter_err(format!(
                "tensor `{key}` has shape {:?}, the model's `{name}` is {:?} (is `r` in adapter_config.json right?)",
                view.shape(),
                slot.spec.shape
            )));
        }
        convert_into(
            &path,
            &key,
            view.dtype(),
            view.data(),
            &mut model.params[slot.range()],
        )?;
        filled.insert(name);
    }
    let mut missing: Vec<&str> = wanted
        .keys()
        .filter(|n| !filled.contains(*n))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        missing.sort();
        let adapter_missing = missing.iter().any(|n| is_adapter_param(n));
        return Err(adapter_err(format!(
            "missing tensor(s) for {}: {}",
            if adapter_missing {
                "LoRA parameters the config targets"
            } else {
                "parameters the config trains (bias / modules_to_save)"
            },
            missing.join(", ")
        )));
    }
    Ok(())
}

/// Trainable and total parameter counts, printed as PEFT's `print_trainable_parameters`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamCounts {
    pub trainable: u64,
    pub total: u64,
}

impl std::fmt::Display for ParamCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = if self.total == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.total as f64
        };
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {pct:.4}",
            thousands(self.trainable),
            thousands(self.total)
        )
    }
}

fn thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The model's trainable and total parameter counts (PEFT also counts its second copy of each
/// `modules_to_save` module in the total; there is no copy here).
pub fn param_counts<T: Float>(model: &Model<T>) -> ParamCounts {
    ParamCounts {
        trainable: model.layout.trainable_numel() as u64,
        total: (model.layout.numel() + model.quantized_numel()) as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_mapping_round_trips() {
        assert_eq!(
            our_name("base_model.model.transformer.h.0.attn.c_attn.base_layer.bias").unwrap(),
            "transformer.h.0.attn.c_attn.bias"
        );
        assert_eq!(
            our_name("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight")
                .unwrap(),
            "model.layers.0.self_attn.q_proj.lora_A.weight"
        );
        assert_eq!(
            our_name("base_model.model.lm_head.weight").unwrap(),
            "lm_head.weight"
        );
        assert!(our_name("model.layers.0.self_attn.q_proj.lora_A.weight").is_none());
        assert_eq!(
            ParamCounts {
                trainable: 4672,
                total: 33664
            }
            .to_string(),
            "trainable params: 4,672 || all params: 33,664 || trainable%: 13.8783"
        );
    }
}
