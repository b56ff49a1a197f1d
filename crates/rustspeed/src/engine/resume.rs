//! `save_checkpoint` / `load_checkpoint`: the engine's state into and out of the checkpoint
//! files of [`crate::checkpoint`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rustspeed_kernels::Float;

use super::{Engine, EngineError};
use crate::checkpoint::{
    self, optim_states_file, CheckpointError, CheckpointMeta, OutTensor, ParamShape, RngState,
    MODEL_META, MODEL_STATES,
};

const MASTER: &str = "fp32_master";

impl<T: Float> Engine<T> {
    fn param_shapes(&self, trainable: bool) -> Vec<ParamShape> {
        self.model
            .layout
            .slots()
            .iter()
            .filter(|s| s.spec.trainable == trainable)
            .map(|s| ParamShape {
                name: s.spec.name.clone(),
                shape: s.spec.shape.clone(),
            })
            .collect()
    }

    fn meta(&self, client_state: serde_json::Value) -> CheckpointMeta {
        CheckpointMeta {
            ds_version: format!("rustspeed {}", env!("CARGO_PKG_VERSION")),
            global_steps: self.global_steps,
            skipped_steps: self.skipped_steps,
            global_samples: self.global_samples,
            micro_steps: self.micro_steps,
            lr_scheduler: self.scheduler.as_ref().map(|s| s.state()),
            loss_scaler: self.scaler.clone(),
            rng: RngState {
                dropout_seed: self.seed,
                micro_steps: self.micro_steps,
            },
            compute_dtype: T::DTYPE.name().to_string(),
            optimizer: self.optimizer.spec.name().to_string(),
            param_shapes: self.param_shapes(true),
            frozen_param_shapes: self.param_shapes(false),
            dp_world_size: 1,
            mp_world_size: 1,
            zero_stage: 0,
            ds_config: self.config.to_json(),
            client_state,
        }
    }

    fn partition_metadata(&self) -> HashMap<String, String> {
        let p = &self.optimizer.partition;
        [
            ("format", "rustspeed".to_string()),
            ("optimizer", self.optimizer.spec.name().to_string()),
            ("optimizer_step", self.optimizer.step.to_string()),
            ("zero_stage", "0".to_string()),
            ("partition_count", "1".to_string()),
            ("partition_lo", p.start.to_string()),
            ("partition_hi", p.end.to_string()),
            ("flat_numel", self.flat.numel.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    /// Saves every model state under `<dir>/<tag>` (default `global_step{N}`) and points
    /// `<dir>/latest` at it. Returns the tag directory. Saving between accumulation
    /// boundaries is allowed; the partly accumulated gradients are not saved (as DeepSpeed).
    pub fn save_checkpoint(
        &self,
        dir: &Path,
        tag: Option<&str>,
        client_state: serde_json::Value,
    ) -> Result<PathBuf, EngineError> {
        let tag = tag
            .map(str::to_string)
            .unwrap_or_else(|| format!("global_step{}", self.global_steps));
        let model_path = dir.join(&tag).join(MODEL_STATES);
        let model_tensors: Vec<OutTensor> = self
            .model
            .layout
            .slots()
            .iter()
            .map(|s| OutTensor {
                name: s.spec.name.clone(),
                dtype: T::DTYPE,
                shape: s.spec.shape.clone(),
                bytes: checkpoint::encode(
                    self.model.params[s.range()].iter().map(|v| v.to_f32()),
                    T::DTYPE,
                ),
            })
            .collect();
        let model_meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        let model_bytes = checkpoint::serialize(&model_tensors, model_meta, &model_path)?;

        let optim_name = optim_states_file(0);
        let optim_path = dir.join(&tag).join(&optim_name);
        let mut optim_tensors = Vec::new();
        if !self.master.is_empty() {
            optim_tensors.push(OutTensor::f32(MASTER, &self.master));
        }
        for (name, values) in self
            .optimizer
            .spec
            .state_names()
            .iter()
            .zip(&self.optimizer.states)
        {
            optim_tensors.push(OutTensor::f32(name, values));
        }
        let optim_bytes =
            checkpoint::serialize(&optim_tensors, self.partition_metadata(), &optim_path)?;
        let meta = serde_json::to_vec_pretty(&self.meta(client_state)).expect("plain data");
        let files = vec![
            (MODEL_STATES.to_string(), model_bytes),
            (MODEL_META.to_string(), meta),
            (optim_name, optim_bytes),
        ];
        let path = checkpoint::write_checkpoint(dir, &tag, &files)?;
        tracing::info!("saved checkpoint {}", path.display());
        Ok(path)
    }

    /// Loads `<dir>/<tag>` (tag `None`: the one `latest` names) into this engine and returns
    /// the client state. `Ok(None)` with a warning when there is no `latest`. A checkpoint
    /// of another model (parameter names or shapes), optimizer, dtype or partitioning is an
    /// error naming the difference; nothing is changed then.
    pub fn load_checkpoint(
        &mut self,
        dir: &Path,
        tag: Option<&str>,
    ) -> Result<Option<serde_json::Value>, EngineError> {
        let Some(tag) = checkpoint::resolve_tag(dir, tag)? else {
            return Ok(None);
        };
        let tag_dir = checkpoint::tag_dir(dir, &tag)?;
        let meta_path = tag_dir.join(MODEL_META);
        let meta = checkpoint::read_meta(&meta_path)?;
        let mismatch = |m: String| CheckpointError::Mismatch {
            path: tag_dir.clone(),
            mismatch: m,
        };
        check_shapes("trainable", &meta.param_shapes, &self.param_shapes(true))
            .map_err(mismatch)?;
        check_shapes(
            "frozen",
            &meta.frozen_param_shapes,
            &self.param_shapes(false),
        )
        .map_err(mismatch)?;
        let ours = self.optimizer.spec.name();
        if meta.optimizer != ours {
            return Err(mismatch(format!(
                "optimizer is `{}` in the checkpoint, `{ours}` in the config",
                meta.optimizer
            ))
            .into());
        }
        if meta.compute_dtype != T::DTYPE.name() {
            return Err(mismatch(format!(
                "compute dtype is {} in the checkpoint, {} here",
                meta.compute_dtype,
                T::DTYPE
            ))
            .into());
        }
        if meta.dp_world_size != 1 {
            return Err(mismatch(format!(
                "saved with data-parallel world size {}, loading with 1",
                meta.dp_world_size
            ))
            .into());
        }
        if meta.lr_scheduler.is_some() != self.scheduler.is_some() {
            return Err(mismatch(format!(
                "the checkpoint {} an LR scheduler but the config {}",
                if meta.lr_scheduler.is_some() {
                    "has"
                } else {
                    "has no"
                },
                if self.scheduler.is_some() {
                    "has one"
                } else {
                    "has none"
                }
            ))
            .into());
        }

        let model_path = tag_dir.join(MODEL_STATES);
        let model_bytes = checkpoint::read_file(&model_path)?;
        let st = checkpoint::parse(&model_bytes, &model_path)?;
        let mut params = Vec::with_capacity(self.model.params.len());
        for s in self.model.layout.slots() {
            let v =
                checkpoint::read_values(&st, &s.spec.name, T::DTYPE, s.spec.numel(), &model_path)?;
            params.push((s.range(), v));
        }

        let optim_path = tag_dir.join(optim_states_file(0));
        let optim_bytes = checkpoint::read_file(&optim_path)?;
        let info = checkpoint::metadata(&optim_bytes, &optim_path)?;
        let want = self.partition_metadata();
        for key in [
            "partition_count",
            "partition_lo",
            "partition_hi",
            "flat_numel",
            "optimizer",
        ] {
            if info.get(key) != want.get(key) {
                return Err(CheckpointError::Mismatch {
                    path: optim_path,
                    mismatch: format!(
                        "{key} is {:?} in the checkpoint, {:?} here",
                        info.get(key),
                        want.get(key)
                    ),
                }
                .into());
            }
        }
        let optimizer_step: u64 = info
            .get("optimizer_step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| CheckpointError::Format {
                path: optim_path.clone(),
                message: "metadata `optimizer_step` is missing or not an integer".into(),
            })?;
        let st = checkpoint::parse(&optim_bytes, &optim_path)?;
        let n = self.optimizer.partition.len();
        let master = if self.master.is_empty() {
            Vec::new()
        } else {
            checkpoint::read_values(&st, MASTER, rustspeed_kernels::DType::F32, n, &optim_path)?
        };
        let mut states = Vec::new();
        for name in self.optimizer.spec.state_names() {
            states.push(checkpoint::read_values(
                &st,
                name,
                rustspeed_kernels::DType::F32,
                n,
                &optim_path,
            )?);
        }

        // Everything is read and checked: apply.
        for (range, v) in params {
            for (dst, x) in self.model.params[range].iter_mut().zip(v) {
                *dst = T::from_f32(x);
            }
        }
        self.master = master;
        self.optimizer.states = states;
        self.optimizer.step = optimizer_step;
        if let (Some(s), Some(state)) = (&mut self.scheduler, meta.lr_scheduler) {
            s.load_state(state);
        }
        self.scaler = meta.loss_scaler;
        self.global_steps = meta.global_steps;
        self.skipped_steps = meta.skipped_steps;
        self.global_samples = meta.global_samples;
        self.micro_steps = meta.rng.micro_steps;
        self.seed = meta.rng.dropout_seed;
        self.grads.fill(0.0);
        self.pending = None;
        tracing::info!(
            "loaded checkpoint {} (global step {})",
            tag_dir.display(),
            self.global_steps
        );
        Ok(Some(meta.client_state))
    }
}

/// The first difference between the checkpoint's parameter list and ours.
fn check_shapes(what: &str, saved: &[ParamShape], ours: &[ParamShape]) -> Result<(), String> {
    for (i, (a, b)) in saved.iter().zip(ours).enumerate() {
        if a.name != b.name {
            return Err(format!(
                "{what} parameter #{i} is `{}` in the checkpoint, `{}` in the model",
                a.name, b.name
            ));
        }
        if a.shape != b.shape {
            return Err(format!(
                "{what} parameter `{}` has shape {:?} in the checkpoint, {:?} in the model",
                a.name, a.shape, b.shape
            ));
        }
    }
    match saved.len().cmp(&ours.len()) {
        std::cmp::Ordering::Less => Err(format!(
            "the model has {what} parameter `{}` that the checkpoint lacks ({} vs {} {what} parameters)",
            ours[saved.len()].name,
            saved.len(),
            ours.len()
        )),
        std::cmp::Ordering::Greater => Err(format!(
            "the checkpoint has {what} parameter `{}` that the model lacks ({} vs {} {what} parameters)",
            saved[ours.len()].name,
            saved.len(),
            ours.len()
        )),
        std::cmp::Ordering::Equal => Ok(()),
    }
}
