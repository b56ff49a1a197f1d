//! `save_checkpoint` / `load_checkpoint`: the engine's state into and out of the checkpoint
//! files of [`crate::checkpoint`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rustspeed_kernels::Float;

use rustspeed_config::TagValidation;

use super::{Engine, EngineError};
use crate::checkpoint::{
    self, copy_overlaps, encode_ranges, optim_states_file, CheckpointError, CheckpointMeta,
    OutTensor, ParamShape, Placed, RngState, MODEL_META, MODEL_STATES, PARAM_SHARDS, PARTITION_LEN,
    PARTITION_RANGES,
};

const MASTER: &str = crate::consolidate::FP32_MASTER;

/// A rank's piece of the optimizer: fp32 master (empty in fp32 training), the optimizer's
/// state buffers, and its step count.
type Partition = (Vec<f32>, Vec<Vec<f32>>, u64);

/// What `Engine::load_checkpoint_with` restores; the default restores everything.
#[derive(Debug, Clone, Copy)]
pub struct LoadOptions {
    /// fp32 master weights and optimizer state. When false the masters are set from the
    /// loaded weights and the optimizer state is left as it is (DeepSpeed's
    /// `load_optimizer_states=False`); the optimizer may then differ from the saved one.
    pub optimizer_states: bool,
    /// The LR scheduler's position (false: left as it is).
    pub lr_scheduler_states: bool,
    /// Only the weights (DeepSpeed's `load_module_only`): step counters, loss scaler, data
    /// position, scheduler and optimizer state are left as they are.
    pub module_only: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            optimizer_states: true,
            lr_scheduler_states: true,
            module_only: false,
        }
    }
}

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
            dp_world_size: self.rank_and_world().1 as u64,
            mp_world_size: 1,
            zero_stage: self.effective_stage(),
            ds_config: self.config.to_json(),
            client_state,
        }
    }

    /// The ZeRO stage in effect: the config's over several ranks, 0 in one process.
    fn effective_stage(&self) -> u8 {
        self.dp.as_ref().map_or(0, |d| d.stage)
    }

    /// Whether each rank holds (and saves) only its piece of the optimizer state.
    fn partitioned(&self) -> bool {
        self.effective_stage() >= 1
    }

    /// The flat (trainable) ranges this rank's fp32 partition holds, with their offsets in it.
    fn my_ranges(&self) -> Vec<Placed> {
        match &self.z3 {
            Some(z) => z.layout.train_ranges(),
            None => vec![(self.optimizer.partition.clone(), 0)],
        }
    }

    /// Where the parameters this rank holds live: (name, element range, offset in the
    /// buffer), the buffer being `model.params` (whole) or, at stage 3, the shard buffer.
    fn my_params(&self) -> Vec<(String, Placed)> {
        match &self.z3 {
            Some(z) => z
                .layout
                .slots
                .iter()
                .map(|p| (p.name.clone(), (p.owned(z.layout.rank), p.offset)))
                .filter(|(_, (r, _))| !r.is_empty())
                .collect(),
            None => self
                .model
                .layout
                .slots()
                .iter()
                .map(|s| (s.spec.name.clone(), (0..s.spec.numel(), s.offset)))
                .collect(),
        }
    }

    fn partition_metadata(&self) -> HashMap<String, String> {
        let p = &self.optimizer.partition;
        let count = if self.partitioned() {
            self.rank_and_world().1
        } else {
            1
        };
        let mut m: HashMap<String, String> = [
            ("format", "rustspeed".to_string()),
            ("optimizer", self.optimizer.spec.name().to_string()),
            ("optimizer_step", self.optimizer.step.to_string()),
            ("zero_stage", self.effective_stage().to_string()),
            ("partition_count", count.to_string()),
            ("flat_numel", self.flat.numel.to_string()),
            (PARTITION_RANGES, encode_ranges(&self.my_ranges())),
            (PARTITION_LEN, self.optimizer.len.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        if self.z3.is_none() {
            // The one contiguous range, as files before PARTITION_RANGES recorded it.
            m.insert("partition_lo".into(), p.start.to_string());
            m.insert("partition_hi".into(), p.end.to_string());
        } else {
            let entries: Vec<(String, usize, usize, usize)> = self
                .my_params()
                .into_iter()
                .map(|(n, (r, o))| (n, r.start, r.end, o))
                .collect();
            m.insert(
                PARAM_SHARDS.into(),
                serde_json::to_string(&entries).expect("plain data"),
            );
        }
        m
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
        let tag = self.agreed_tag(tag)?;
        let rank = self.rank_and_world().0;
        let barrier = || -> Result<(), EngineError> {
            match &self.dp {
                Some(d) => Ok(d.comm.barrier()?),
                None => Ok(()),
            }
        };
        // Rank 0 opens the temporary directory, every rank writes its files into it, rank 0
        // renames it into place: the checkpoint appears whole or not at all.
        barrier()?;
        if rank == 0 {
            checkpoint::begin_checkpoint(dir, &tag)?;
        }
        barrier()?;
        let tmp = checkpoint::temp_dir(dir, &tag);
        if rank == 0 || self.partitioned() {
            let name = optim_states_file(rank as u64);
            let bytes = self.optim_bytes(&tmp.join(&name))?;
            checkpoint::put_file(&tmp, &name, &bytes)?;
        }
        // At stage 3 no rank holds the whole parameters: each rank's file holds its pieces.
        if rank == 0 && self.z3.is_none() {
            let model_path = tmp.join(MODEL_STATES);
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
            let model_meta: HashMap<String, String> =
                [("format".to_string(), "pt".to_string())].into();
            let model_bytes = checkpoint::serialize(&model_tensors, model_meta, &model_path)?;
            checkpoint::put_file(&tmp, MODEL_STATES, &model_bytes)?;
        }
        if rank == 0 {
            let meta = serde_json::to_vec_pretty(&self.meta(client_state)).expect("plain data");
            checkpoint::put_file(&tmp, MODEL_META, &meta)?;
        }
        barrier()?;
        let path = if rank == 0 {
            let path = checkpoint::commit_checkpoint(dir, &tag)?;
            tracing::info!("saved checkpoint {}", path.display());
            path
        } else {
            dir.join(&tag)
        };
        barrier()?;
        Ok(path)
    }

    /// This rank's optimizer file: fp32 master (16-bit training) and the optimizer states of
    /// its partition, with the partition in the metadata.
    fn optim_bytes(&self, path: &Path) -> Result<Vec<u8>, EngineError> {
        let mut tensors = Vec::new();
        if !self.master.is_empty() {
            tensors.push(OutTensor::f32(MASTER, &self.master));
        }
        for (name, values) in self
            .optimizer
            .spec
            .state_names()
            .iter()
            .zip(&self.optimizer.states)
        {
            tensors.push(OutTensor::f32(name, values));
        }
        if let Some(z3) = &self.z3 {
            tensors.push(OutTensor {
                name: PARAM_SHARDS.to_string(),
                dtype: T::DTYPE,
                shape: vec![z3.shards.len()],
                bytes: checkpoint::encode(z3.shards.iter().map(|v| v.to_f32()), T::DTYPE),
            });
        }
        Ok(checkpoint::serialize(
            &tensors,
            self.partition_metadata(),
            path,
        )?)
    }

    /// DeepSpeed's `checkpoint.tag_validation` over ranks: rank 0's tag is sent to every rank;
    /// when any rank's differs, "Warn" logs it and saves under rank 0's tag, "Fail" is an error
    /// on every rank (nothing written), "Ignore" skips the check.
    fn agreed_tag(&self, tag: String) -> Result<String, EngineError> {
        let Some(d) = &self.dp else {
            return Ok(tag);
        };
        let mode = self.config.checkpoint.tag_validation;
        if mode == TagValidation::Ignore {
            return Ok(tag);
        }
        // One f32 per byte: exact.
        let mut len = [tag.len() as f32];
        d.comm.broadcast(&mut len, 0)?;
        let mut bytes: Vec<f32> = if d.rank() == 0 {
            tag.bytes().map(f32::from).collect()
        } else {
            vec![0.0; len[0] as usize]
        };
        d.comm.broadcast(&mut bytes, 0)?;
        let root = String::from_utf8_lossy(&bytes.iter().map(|&b| b as u8).collect::<Vec<_>>())
            .into_owned();
        if d.sum(u64::from(root != tag))? == 0 {
            return Ok(tag);
        }
        match mode {
            TagValidation::Fail => Err(EngineError::TagMismatch {
                rank: d.rank(),
                ours: tag,
                root,
            }),
            _ => {
                if root != tag {
                    tracing::warn!(
                        "checkpoint tag `{tag}` on rank {} differs from rank 0's; saving under `{root}` (checkpoint.tag_validation \"Warn\")",
                        d.rank()
                    );
                }
                Ok(root)
            }
        }
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
        self.load_checkpoint_with(dir, tag, LoadOptions::default())
    }

    /// `load_checkpoint` restoring only what `options` asks for (DeepSpeed's
    /// `load_optimizer_states`, `load_lr_scheduler_states`, `load_module_only`).
    pub fn load_checkpoint_with(
        &mut self,
        dir: &Path,
        tag: Option<&str>,
        options: LoadOptions,
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
        let optimizer = options.optimizer_states && !options.module_only;
        let scheduler = options.lr_scheduler_states && !options.module_only;
        if optimizer && meta.optimizer != ours {
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
        if scheduler && meta.lr_scheduler.is_some() != self.scheduler.is_some() {
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

        let params = self.read_params(&tag_dir)?;
        let partition = if optimizer {
            Some(self.read_partition(&tag_dir)?)
        } else {
            None
        };

        // Everything is read and checked: apply.
        match &mut self.z3 {
            Some(z3) => {
                z3.shards = params;
                z3.refresh_resident()?;
                self.model.params = Vec::new();
            }
            None => self.model.params = params,
        }
        // Without optimizer states, or with ZeRO's `load_from_fp32_weights: false`, the fp32
        // masters follow the loaded 16-bit weights (DeepSpeed's `_restore_from_bit16_weights`);
        // the optimizer state stays as it is when not loaded.
        let fp32_masters =
            self.config.zero_stage() == 0 || self.config.zero_optimization.load_from_fp32_weights;
        let from_weights = partition.is_none() || !fp32_masters;
        if let Some((master, states, optimizer_step)) = partition {
            self.master = master;
            self.optimizer.states = states;
            self.optimizer.step = optimizer_step;
        }
        if from_weights && !self.master.is_empty() {
            self.master = super::master_from_weights(
                self.z3.as_ref(),
                &self.flat,
                &self.model.params,
                self.optimizer.partition.clone(),
                self.master.len(),
            );
        }
        if scheduler {
            if let (Some(s), Some(state)) = (&mut self.scheduler, meta.lr_scheduler) {
                s.load_state(state);
            }
        }
        if !options.module_only {
            self.scaler = meta.loss_scaler;
            self.global_steps = meta.global_steps;
            self.skipped_steps = meta.skipped_steps;
            self.global_samples = meta.global_samples;
            self.micro_steps = meta.rng.micro_steps;
            self.seed = meta.rng.dropout_seed;
        }
        self.grads.fill(0.0);
        self.pending = None;
        tracing::info!(
            "loaded checkpoint {} (global step {})",
            tag_dir.display(),
            self.global_steps
        );
        Ok(Some(meta.client_state))
    }

    /// The parameters this rank holds ([`Engine::my_params`]), from the whole parameters of a
    /// stage 0-2 checkpoint or from every rank's pieces of a stage-3 one.
    fn read_params(&self, tag_dir: &Path) -> Result<Vec<T>, EngineError> {
        let mine = self.my_params();
        let len = match &self.z3 {
            Some(z) => z.layout.shard_numel,
            None => self.model.layout.numel(),
        };
        let mut out = vec![T::default(); len];
        let want: usize = mine.iter().map(|(_, (r, _))| r.len()).sum();
        let mut copied = 0;
        let model_path = tag_dir.join(MODEL_STATES);
        if model_path.exists() {
            let model_bytes = checkpoint::read_file(&model_path)?;
            let st = checkpoint::parse(&model_bytes, &model_path)?;
            for (name, dst) in &mine {
                let numel = self
                    .model
                    .layout
                    .get(name)
                    .expect("our own slot")
                    .spec
                    .numel();
                let v = checkpoint::read_values(&st, name, T::DTYPE, numel, &model_path)?;
                copied += copy_overlaps(
                    &[(0..numel, 0)],
                    &v,
                    std::slice::from_ref(dst),
                    &mut out,
                    T::from_f32,
                );
            }
        } else {
            let first = tag_dir.join(optim_states_file(0));
            let info = checkpoint::metadata(&checkpoint::read_file(&first)?, &first)?;
            let count = info
                .get("partition_count")
                .and_then(|v| v.parse::<usize>().ok())
                .ok_or_else(|| CheckpointError::Format {
                    path: first.clone(),
                    message: "metadata `partition_count` is missing or not an integer".into(),
                })?;
            let by_name: HashMap<&str, &Placed> =
                mine.iter().map(|(n, p)| (n.as_str(), p)).collect();
            for r in 0..count {
                let path = tag_dir.join(optim_states_file(r as u64));
                let bytes = checkpoint::read_file(&path)?;
                let info = checkpoint::metadata(&bytes, &path)?;
                let entries = checkpoint::param_shard_entries(&info, &path)?;
                let st = checkpoint::parse(&bytes, &path)?;
                let numel = st
                    .tensor(PARAM_SHARDS)
                    .map(|t| t.shape().iter().product())
                    .unwrap_or(0);
                let v = checkpoint::read_values(&st, PARAM_SHARDS, T::DTYPE, numel, &path)?;
                for (name, src) in &entries {
                    let Some(dst) = by_name.get(name.as_str()) else {
                        return Err(CheckpointError::Mismatch {
                            path,
                            mismatch: format!("parameter `{name}` is not in the model"),
                        }
                        .into());
                    };
                    copied += copy_overlaps(
                        std::slice::from_ref(src),
                        &v,
                        std::slice::from_ref(*dst),
                        &mut out,
                        T::from_f32,
                    );
                }
            }
        }
        if copied != want {
            return Err(CheckpointError::Format {
                path: tag_dir.to_path_buf(),
                message: format!(
                    "the saved parameters cover {copied} of the {want} elements this rank holds"
                ),
            }
            .into());
        }
        Ok(out)
    }

    /// This rank's partition of the fp32 master and optimizer states, assembled from every
    /// saved rank's file that overlaps it: a checkpoint saved with N ranks loads with M ranks
    /// at any stage (the flat layout is the same; only the cut differs).
    fn read_partition(&self, tag_dir: &Path) -> Result<Partition, EngineError> {
        let first = tag_dir.join(optim_states_file(0));
        let mut first_bytes = checkpoint::read_file(&first)?;
        let info = checkpoint::metadata(&first_bytes, &first)?;
        let field = |info: &HashMap<String, String>, key: &str, path: &Path| {
            info.get(key)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| CheckpointError::Format {
                    path: path.to_path_buf(),
                    message: format!("metadata `{key}` is missing or not an integer"),
                })
        };
        let count = field(&info, "partition_count", &first)? as usize;
        let want = self.partition_metadata();
        let mine = self.my_ranges();
        let n = self.optimizer.len;
        let need: usize = mine.iter().map(|(r, _)| r.len()).sum();
        let with_master = !self.master.is_empty();
        let names = self.optimizer.spec.state_names();
        let mut master = vec![0f32; if with_master { n } else { 0 }];
        let mut states = vec![vec![0f32; n]; names.len()];
        let (mut covered, mut optimizer_step) = (0usize, None);
        for r in 0..count {
            let path = tag_dir.join(optim_states_file(r as u64));
            let bytes = if r == 0 {
                std::mem::take(&mut first_bytes)
            } else {
                checkpoint::read_file(&path)?
            };
            let info = checkpoint::metadata(&bytes, &path)?;
            for key in ["flat_numel", "optimizer"] {
                if info.get(key) != want.get(key) {
                    return Err(CheckpointError::Mismatch {
                        path,
                        mismatch: format!(
                            "{key} is {:?} in the checkpoint, {:?} here",
                            info.get(key),
                            want.get(key)
                        ),
                    }
                    .into());
                }
            }
            let step = field(&info, "optimizer_step", &path)?;
            if *optimizer_step.get_or_insert(step) != step {
                return Err(CheckpointError::Format {
                    path,
                    message: "ranks saved different optimizer steps".into(),
                }
                .into());
            }
            let (theirs, len) = checkpoint::partition_ranges(&info, &path)?;
            let overlap = checkpoint::overlap_len(&theirs, &mine);
            if overlap == 0 {
                continue;
            }
            let st = checkpoint::parse(&bytes, &path)?;
            let f32_ = rustspeed_kernels::DType::F32;
            let copy = |name: &str, dst: &mut [f32]| -> Result<(), EngineError> {
                let v = checkpoint::read_values(&st, name, f32_, len, &path)?;
                copy_overlaps(&theirs, &v, &mine, dst, |x| x);
                Ok(())
            };
            if with_master {
                copy(MASTER, &mut master)?;
            }
            for (name, dst) in names.iter().zip(&mut states) {
                copy(name, dst)?;
            }
            covered += overlap;
        }
        if covered != need {
            return Err(CheckpointError::Format {
                path: tag_dir.to_path_buf(),
                message: format!(
                    "the saved partitions cover {covered} of the {need} elements this rank holds"
                ),
            }
            .into());
        }
        Ok((master, states, optimizer_step.unwrap_or(0)))
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
