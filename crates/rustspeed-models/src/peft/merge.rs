//! Merging a LoRA adapter into its base (PEFT's `merge_and_unload`): `W += scale · B·A` for
//! each adapted module (`W^T += ...` for GPT-2's Conv1D, whose weight is `[in, out]`), giving a
//! plain model with the base's parameter names that transformers loads without PEFT. Trained
//! biases and `modules_to_save` parameters are the merged model's values as they are.

use std::path::Path;

use rustspeed_kernels::matmul::{matmul, WeightLayout};
use rustspeed_kernels::{DType, Float};

use super::{load_adapter, LoraConfig, PeftError};
use crate::export::{read_config_json, save_pretrained, SavedModel, DEFAULT_MAX_SHARD_BYTES};
use crate::hf_config::ModelConfig;
use crate::loader::{build_model_tuned, load_hf_dir_tuned};
use crate::model::Model;
use crate::tuning::{lora_a_name, lora_b_name, Tuning};

/// The merged model: `model`'s base parameters with every adapter folded in (computed in f32,
/// rounded once to `T`).
pub fn merge_lora<T: Float>(model: &Model<T>, cfg: &ModelConfig) -> Result<Model<T>, PeftError> {
    let plan = model.tuning.lora_plan().ok_or_else(|| PeftError::Adapter {
        path: "<model>".into(),
        message: "merge_lora: the model has no LoRA adapters".into(),
    })?;
    if !model.quantized.is_empty() {
        return Err(PeftError::Unsupported {
            file: "merge".into(),
            key: "quantize".into(),
            value: format!("{} quantized base weights", model.quantized.len()),
            hint: "merging into a quantized base would round the merged weights to 4/8 bits; merge the adapter into the dense base (rustspeed merge-lora --model BASE --adapter OUT/final)".into(),
        });
    }
    let mut merged = build_model_tuned::<T>(cfg, &Tuning::full())?;
    for slot in merged.layout.slots().to_vec() {
        let src = model
            .param(&slot.spec.name)
            .ok_or_else(|| PeftError::Adapter {
                path: "<model>".into(),
                message: format!(
                    "merge_lora: the adapted model lacks base parameter `{}`",
                    slot.spec.name
                ),
            })?;
        merged.params[slot.range()].copy_from_slice(src);
    }
    for (module, lora) in &plan.resolved.lora {
        let a = model
            .param(&lora_a_name(module))
            .expect("declared by the builder");
        let b = model
            .param(&lora_b_name(module))
            .expect("declared by the builder");
        let (r, inp, out) = (lora.r, lora.inp, lora.out);
        // delta[out, in] = B[out, r] · A[r, in]; Conv1D stores W as [in, out], so form delta^T
        // = A^T · B^T there.
        let mut delta = vec![0f32; inp * out];
        match lora.layout {
            WeightLayout::OutIn => matmul(&mut delta, b, a, out, r, inp, false, false, false),
            WeightLayout::InOut => matmul(&mut delta, a, b, inp, r, out, true, true, false),
        }
        let w = merged
            .param_mut(&format!("{module}.weight"))
            .expect("an adapted module has a weight");
        for (w, d) in w.iter_mut().zip(&delta) {
            *w = T::from_f32(w.to_f32() + lora.scale * d);
        }
    }
    Ok(merged)
}

/// `rustspeed merge-lora`: loads the base model in `model_dir` and the adapter in `adapter_dir`,
/// merges them and writes an HF model directory to `out_dir` in `dtype` (config.json from the
/// base with its dtype set, tokenizer files copied).
pub fn merge_adapter_dir(
    model_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    dtype: DType,
) -> Result<SavedModel, PeftError> {
    let lora = LoraConfig::from_path(adapter_dir)?;
    let cfg = ModelConfig::from_path(model_dir).map_err(crate::error::ModelError::from)?;
    let tuning = Tuning::lora(lora, &cfg)?;
    let mut loaded =
        load_hf_dir_tuned::<f32>(model_dir, &tuning).map_err(|e| PeftError::Adapter {
            path: model_dir.to_path_buf(),
            message: e.to_string(),
        })?;
    load_adapter(adapter_dir, &mut loaded.model)?;
    let merged = merge_lora(&loaded.model, &cfg)?;
    drop(loaded);
    let config = read_config_json(model_dir)?;
    Ok(save_pretrained(
        out_dir,
        &config,
        &merged,
        dtype,
        Some(model_dir),
        DEFAULT_MAX_SHARD_BYTES,
    )?)
}
