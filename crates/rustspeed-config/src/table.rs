//! The one table of every config key: its DeepSpeed 0.19.x default, whether the rustspeed
//! engine honours it, and a one-line description. docs/CONFIG.md is checked against it.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Status {
    /// Fully handled (by the config crate itself where the key only affects validation).
    Implemented,
    /// Read and validated now; the engine honours it once the named issue lands.
    Planned(u32),
    /// Refused with "not supported yet: <key>" when set to a non-default value.
    NotSupported,
}

impl Status {
    pub fn label(self) -> String {
        match self {
            Status::Implemented => "implemented".into(),
            Status::Planned(issue) => format!("planned: issue {issue}"),
            Status::NotSupported => "not supported yet".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct KeyInfo {
    pub path: &'static str,
    /// The default as JSON text, or a phrase in parentheses when it depends on other keys.
    pub default: &'static str,
    pub status: Status,
    pub description: &'static str,
    /// Values of a key that are nevertheless not supported (e.g. nvme offload).
    pub unsupported_values: &'static [&'static str],
}

const I: Status = Status::Implemented;
const NS: Status = Status::NotSupported;

const fn k(
    path: &'static str,
    default: &'static str,
    status: Status,
    description: &'static str,
) -> KeyInfo {
    KeyInfo {
        path,
        default,
        status,
        description,
        unsupported_values: &[],
    }
}

const fn kv(
    path: &'static str,
    default: &'static str,
    status: Status,
    description: &'static str,
    unsupported_values: &'static [&'static str],
) -> KeyInfo {
    KeyInfo {
        path,
        default,
        status,
        description,
        unsupported_values,
    }
}

/// Top-level blocks kept as written because nothing of them is supported yet.
pub const RAW_BLOCKS: [&str; 18] = [
    "elasticity",
    "autotuning",
    "data_efficiency",
    "curriculum_learning",
    "amp",
    "eigenvalue",
    "progressive_layer_drop",
    "quantize_training",
    "hybrid_engine",
    "compile",
    "torch_autocast",
    "tensor_parallel",
    "nebula",
    "weight_quantization",
    "timers",
    "expert_parallel",
    "zenflow",
    "comet",
];

pub static KEYS: &[KeyInfo] = &[
    // Batch triple (REFERENCE §1.2).
    k("train_batch_size", "null", I, "global batch: micro batch * accumulation steps * data-parallel world size"),
    k("train_micro_batch_size_per_gpu", "null", I, "samples per rank per forward/backward"),
    k("gradient_accumulation_steps", "null", I, "micro-batches per optimizer step (the loss is divided by it)"),
    // Optimizer.
    k("optimizer", "null", I, "optimizer block {type, params}; absent: the client supplies one"),
    kv("optimizer.type", "null", I, "adam, adamw, lamb, lion, adagrad, sgd (case-insensitive); 1-bit and mu-P/Muon types are not supported yet", &["onebitadam", "zerooneadam", "onebitlamb", "muadam", "muadamw", "musgd", "muon"]),
    k("optimizer.legacy_fusion", "false", NS, "legacy fused fp16 optimizer path"),
    k("optimizer.params", "{}", I, "constructor arguments of the optimizer type"),
    k("optimizer.params.lr", "0.001", I, "learning rate (Adagrad: 0.01)"),
    k("optimizer.params.betas", "[0.9, 0.999]", I, "Adam/Lamb/Lion (beta1, beta2)"),
    k("optimizer.params.eps", "1e-8", I, "denominator epsilon (Adagrad: 1e-10)"),
    k("optimizer.params.weight_decay", "0", I, "weight decay (decoupled in AdamW mode)"),
    k("optimizer.params.bias_correction", "true", I, "Adam/Lamb bias correction"),
    k("optimizer.params.adam_w_mode", "true", I, "type adam: decoupled weight decay (AdamW) unless false"),
    k("optimizer.params.torch_adam", "false", I, "use the reference (torch) Adam; rustspeed has one Adam kernel"),
    k("optimizer.params.amsgrad", "false", NS, "AMSGrad variant (FusedAdam refuses it)"),
    k("optimizer.params.eps_inside_sqrt", "false", I, "Lamb: epsilon inside the square root"),
    k("optimizer.params.max_grad_norm", "0", NS, "Lamb: per-optimizer gradient norm clip"),
    k("optimizer.params.max_coeff", "10.0", I, "Lamb: trust-ratio upper bound"),
    k("optimizer.params.min_coeff", "0.01", I, "Lamb: trust-ratio lower bound"),
    k("optimizer.params.momentum", "0", I, "SGD momentum"),
    k("optimizer.params.dampening", "0", I, "SGD dampening"),
    k("optimizer.params.nesterov", "false", I, "SGD Nesterov momentum"),
    k("optimizer.params.lr_decay", "0", NS, "Adagrad learning-rate decay"),
    k("optimizer.params.initial_accumulator_value", "0", I, "Adagrad initial accumulator"),
    k("zero_allow_untested_optimizer", "false", I, "allow SGD/Adagrad (torch optimizers) with ZeRO"),
    k("zero_force_ds_cpu_optimizer", "true", I, "DeepSpeed forces its CPU Adam with offload; rustspeed's CPU optimizer is always its own"),
    // Scheduler (REFERENCE §1.4).
    k("scheduler", "null", I, "LR scheduler block {type, params}"),
    k("scheduler.type", "null", I, "LRRangeTest, OneCycle, WarmupLR, WarmupDecayLR, WarmupCosineLR (case-sensitive)"),
    k("scheduler.params", "{}", I, "constructor arguments of the scheduler type"),
    k("scheduler.params.warmup_min_lr", "0", I, "WarmupLR/WarmupDecayLR: starting lr"),
    k("scheduler.params.warmup_max_lr", "(optimizer lr; WarmupDecayLR: 0.001)", I, "WarmupLR/WarmupDecayLR: lr at the end of warmup"),
    k("scheduler.params.warmup_num_steps", "1000", I, "warmup length in steps (positive)"),
    k("scheduler.params.warmup_type", "\"log\"", I, "log or linear warmup"),
    k("scheduler.params.total_num_steps", "(required)", I, "WarmupDecayLR/WarmupCosineLR: total training steps"),
    k("scheduler.params.warmup_min_ratio", "0", I, "WarmupCosineLR: starting ratio of the optimizer lr"),
    k("scheduler.params.cos_min_ratio", "0.0001", I, "WarmupCosineLR: final ratio"),
    k("scheduler.params.cycle_min_lr", "(required)", I, "OneCycle: lowest lr"),
    k("scheduler.params.cycle_max_lr", "(required)", I, "OneCycle: highest lr"),
    k("scheduler.params.decay_lr_rate", "0", I, "OneCycle: decay after the cycle"),
    k("scheduler.params.cycle_first_step_size", "2000", I, "OneCycle: steps of the rising half"),
    k("scheduler.params.cycle_second_step_size", "(cycle_first_step_size)", I, "OneCycle: steps of the falling half"),
    k("scheduler.params.cycle_first_stair_count", "0", I, "OneCycle: stairs in the first half"),
    k("scheduler.params.cycle_second_stair_count", "(cycle_first_stair_count)", I, "OneCycle: stairs in the second half"),
    k("scheduler.params.decay_step_size", "0", I, "OneCycle: decay interval"),
    k("scheduler.params.cycle_momentum", "true", I, "OneCycle: cycle beta1 inversely to lr"),
    k("scheduler.params.cycle_min_mom", "0.8", I, "OneCycle: lowest momentum"),
    k("scheduler.params.cycle_max_mom", "0.9", I, "OneCycle: highest momentum"),
    k("scheduler.params.decay_mom_rate", "0", I, "OneCycle: momentum decay"),
    k("scheduler.params.lr_range_test_min_lr", "0.001", I, "LRRangeTest: starting lr"),
    k("scheduler.params.lr_range_test_step_size", "2000", I, "LRRangeTest: steps per increase"),
    k("scheduler.params.lr_range_test_step_rate", "1.0", I, "LRRangeTest: increase rate"),
    k("scheduler.params.lr_range_test_staircase", "false", I, "LRRangeTest: staircase increase"),
    k("scheduler.params.last_batch_iteration", "-1", I, "iteration to resume the schedule from"),
    // Precision (REFERENCE §1.3).
    k("fp16", "null", I, "fp16 mixed-precision block"),
    k("fp16.enabled", "false", I, "fp16 mixed precision with loss scaling"),
    k("fp16.auto_cast", "false", NS, "cast inputs to fp16 automatically"),
    k("fp16.loss_scale", "0", I, "static loss scale; 0 = dynamic"),
    k("fp16.initial_scale_power", "16", I, "dynamic scaling starts at 2**power"),
    k("fp16.loss_scale_window", "1000", I, "clean steps before the scale doubles"),
    k("fp16.hysteresis", "2", I, "overflows tolerated before the scale halves"),
    k("fp16.consecutive_hysteresis", "false", I, "restore hysteresis on every clean step"),
    k("fp16.min_loss_scale", "1", I, "lowest dynamic scale"),
    k("fp16.fp16_master_weights_and_grads", "false", NS, "keep master weights in fp16"),
    k("bf16", "null", I, "bf16 mixed-precision block (legacy name: bfloat16)"),
    k("bf16.enabled", "false", I, "bf16 mixed precision (legacy block name: bfloat16)"),
    k("bf16.immediate_grad_update", "false", NS, "apply bf16 gradients immediately"),
    k("bf16.check_grad_overflow", "true", I, "skip steps whose bf16 gradients overflow"),
    k("bf16.bf16_master_weights_and_grads", "false", NS, "keep master weights in bf16 (ZeRO 1-3)"),
    k("bf16.bf16_optimizer_states", "false", NS, "keep optimizer states in bf16 (needs bf16 master weights)"),
    k("gradient_clipping", "1.0", I, "clip the global gradient L2 norm; 0 disables (default 1.0 since DeepSpeed 0.19.3)"),
    k("steps_per_print", "null", I, "log progress every N steps; null: never"),
    k("wall_clock_breakdown", "false", NS, "time forward/backward/step"),
    k("memory_breakdown", "false", NS, "log memory use at each step"),
    k("dump_state", "false", NS, "print the engine state after initialisation"),
    k("prescale_gradients", "false", I, "divide gradients by the world size before summing them over ranks"),
    k("gradient_predivide_factor", "1.0", I, "divide gradients by this before summing over ranks; a mean multiplies by factor/world after"),
    k("gradient_allreduce_op", "\"mean\"", I, "mean or sum (case-insensitive); sum is refused with ZeRO 3"),
    k("communication_data_type", "null", NS, "dtype of gradient communication"),
    k("seq_parallel_communication_data_type", "\"fp32\"", NS, "dtype of sequence-parallel communication"),
    k("sparse_gradients", "false", NS, "sparse embedding gradients"),
    k("dataloader_drop_last", "false", I, "drop the last incomplete batch"),
    k("managed_gradient_accumulation", "true", NS, "false: every step() is an accumulation boundary"),
    k("sequence_parallel_size", "1", NS, "Ulysses sequence parallelism (divides the data-parallel world)"),
    k("disable_allgather", "false", NS, "legacy: skip the parameter all-gather"),
    k("use_data_before_expert_parallelism", "false", NS, "MoE group ordering"),
    k("allgather_size", "5e8", I, "legacy all-gather bucket (elements) used with \"zero_optimization\": true"),
    // ZeRO (REFERENCE §1.1, §1.7).
    k("zero_optimization", "null", I, "ZeRO block; legacy true means stage 1"),
    k("zero_optimization.stage", "0", I, "0 off, 1 optimizer states, 2 + gradients, 3 + parameters"),
    k("zero_optimization.contiguous_gradients", "true", I, "gradients always live in one flat buffer here (nothing to fragment); false changes nothing"),
    k("zero_optimization.reduce_scatter", "true", I, "stages 1-2: false all-reduces the gradients (stage 2: each bucket) and keeps the rank's part; stage 3 always reduce-scatters"),
    k("zero_optimization.reduce_bucket_size", "5e8", I, "elements per gradient reduce bucket (stage 2; stage 3 reduces one layer at a time)"),
    k("zero_optimization.use_multi_rank_bucket_allreduce", "true", NS, "multi-rank bucket all-reduce"),
    k("zero_optimization.allgather_partitions", "true", I, "stages 1-2: false broadcasts each rank's updated partition instead of all-gathering"),
    k("zero_optimization.allgather_bucket_size", "5e8", I, "stages 1-2: elements of updated weights all-gathered per round (a multiple of 2)"),
    k("zero_optimization.overlap_comm", "(stage == 3)", I, "overlap gradient reduction with backward"),
    k("zero_optimization.load_from_fp32_weights", "true", I, "on resume take the fp32 masters from the checkpoint (false: from its 16-bit weights)"),
    k("zero_optimization.elastic_checkpoint", "false", NS, "elastic ZeRO checkpoints"),
    k("zero_optimization.sub_group_size", "1e9", I, "stage 3 optimizer sub-groups: the step needs no per-group buffers here, so every value steps alike"),
    k("zero_optimization.stage3_prefetch_bucket_size", "5e7", I, "stage 3: elements of the next layers gathered ahead of use, at least one layer when > 0; 0 none (alias prefetch_bucket_size)"),
    k("zero_optimization.stage3_param_persistence_threshold", "1e5", I, "stage 3: params smaller than this stay unpartitioned (alias param_persistence_threshold)"),
    k("zero_optimization.stage3_model_persistence_threshold", "9223372036854775807", I, "stage 3: cap on persistent elements (alias model_persistence_threshold)"),
    k("zero_optimization.stage3_max_live_parameters", "1e9", I, "stage 3: prefetch stops while this many elements are gathered (alias max_live_parameters)"),
    k("zero_optimization.stage3_max_reuse_distance", "1e9", I, "stage 3: a layer used again within this many elements of the step's trace stays gathered (alias max_reuse_distance)"),
    k("zero_optimization.stage3_gather_16bit_weights_on_model_save", "false", I, "stage 3: exports (train's HF directory) always gather the 16-bit weights (alias gather_16bit_weights_on_model_save)"),
    k("zero_optimization.stage3_gather_fp16_weights_on_model_save", "false", I, "deprecated name of stage3_gather_16bit_weights_on_model_save"),
    k("zero_optimization.stage3_module_granularity_threshold", "0", NS, "stage 3: leaf-module fetch granularity"),
    k("zero_optimization.stage3_use_all_reduce_for_fetch_params", "false", NS, "stage 3: fetch params with all-reduce"),
    k("zero_optimization.stage3_allgather_sequential", "false", NS, "stage 3: sequential all-gathers"),
    k("zero_optimization.ignore_unused_parameters", "true", I, "every trainable parameter gets a gradient here (zero if unused), so false never fails"),
    k("zero_optimization.legacy_stage1", "false", NS, "DeepSpeed's old stage-1 implementation"),
    k("zero_optimization.round_robin_gradients", "false", NS, "round-robin gradient partition copy"),
    k("zero_optimization.zero_hpz_partition_size", "1", NS, "ZeRO++ hierarchical partition size"),
    k("zero_optimization.zero_quantized_weights", "false", NS, "ZeRO++ quantized weight communication"),
    k("zero_optimization.zero_quantized_nontrainable_weights", "false", NS, "ZeRO++ quantized frozen weights"),
    k("zero_optimization.zero_quantized_gradients", "false", NS, "ZeRO++ quantized gradient communication"),
    k("zero_optimization.mics_shard_size", "-1", NS, "MiCS shard group size"),
    k("zero_optimization.mics_hierarchical_params_gather", "false", NS, "MiCS hierarchical all-gather"),
    k("zero_optimization.memory_efficient_linear", "true", NS, "stage 3 memory-efficient linear autograd function"),
    k("zero_optimization.pipeline_loading_checkpoint", "false", NS, "load checkpoints through the pipeline"),
    k("zero_optimization.override_module_apply", "true", NS, "stage 3: gather params in module.apply"),
    k("zero_optimization.log_trace_cache_warnings", "false", NS, "stage 3 trace cache warnings"),
    k("zero_optimization.enable_sanity_checks", "false", NS, "stage 3 sanity checks"),
    k("zero_optimization.cpu_offload", "false", I, "deprecated: offload_optimizer.device cpu"),
    k("zero_optimization.cpu_offload_param", "false", NS, "deprecated: offload_param.device cpu"),
    k("zero_optimization.cpu_offload_use_pin_memory", "false", I, "deprecated: pin_memory of the offload blocks"),
    k("zero_optimization.offload_optimizer", "null", I, "optimizer state offload block"),
    kv("zero_optimization.offload_optimizer.device", "\"none\"", I, "none, cpu or nvme (nvme: not supported yet)", &["nvme"]),
    k("zero_optimization.offload_optimizer.nvme_path", "null", NS, "NVMe directory for offload"),
    k("zero_optimization.offload_optimizer.buffer_count", "4", NS, "NVMe swap buffers"),
    k("zero_optimization.offload_optimizer.pin_memory", "true", I, "page-locked host buffers (CPU backend: host memory already)"),
    k("zero_optimization.offload_optimizer.pipeline_read", "false", NS, "NVMe read pipelining"),
    k("zero_optimization.offload_optimizer.pipeline_write", "false", NS, "NVMe write pipelining"),
    k("zero_optimization.offload_optimizer.fast_init", "false", NS, "fast NVMe initialisation"),
    k("zero_optimization.offload_optimizer.ratio", "1.0", NS, "fraction offloaded (< 1 needs stage 3)"),
    k("zero_optimization.offload_optimizer.super_offload", "false", NS, "SuperOffload"),
    k("zero_optimization.offload_optimizer.cpuadam_cores_perc", "0.8", NS, "share of cores for CPU Adam"),
    k("zero_optimization.offload_param", "null", NS, "parameter offload block (stage 3 only)"),
    k("zero_optimization.offload_param.device", "\"none\"", NS, "none, cpu or nvme"),
    k("zero_optimization.offload_param.nvme_path", "null", NS, "NVMe directory for parameter offload"),
    k("zero_optimization.offload_param.buffer_count", "5", NS, "parameter swap buffers"),
    k("zero_optimization.offload_param.buffer_size", "1e8", NS, "parameter swap buffer size"),
    k("zero_optimization.offload_param.max_in_cpu", "1e9", NS, "parameter elements kept in CPU memory"),
    k("zero_optimization.offload_param.pin_memory", "true", NS, "page-locked parameter buffers"),
    // Activation checkpointing.
    k("activation_checkpointing", "null", NS, "activation checkpointing block"),
    k("activation_checkpointing.partition_activations", "false", NS, "partition checkpointed activations across model-parallel ranks"),
    k("activation_checkpointing.contiguous_memory_optimization", "false", NS, "copy checkpoints into a contiguous buffer"),
    k("activation_checkpointing.cpu_checkpointing", "false", NS, "keep checkpoints in CPU memory"),
    k("activation_checkpointing.number_checkpoints", "null", NS, "number of checkpoints (for contiguous memory)"),
    k("activation_checkpointing.synchronize_checkpoint_boundary", "false", NS, "synchronise at checkpoint boundaries"),
    k("activation_checkpointing.profile", "false", NS, "profile checkpointing"),
    // Pipeline.
    k("pipeline", "null", NS, "pipeline parallelism block (incompatible with ZeRO 2/3)"),
    k("pipeline.stages", "\"auto\"", NS, "number of pipeline stages"),
    k("pipeline.partition", "\"best\"", NS, "layer partition method"),
    k("pipeline.seed_layers", "false", NS, "seed each layer differently"),
    k("pipeline.activation_checkpoint_interval", "0", NS, "layers between activation checkpoints"),
    k("pipeline.pipe_partitioned", "true", NS, "partition activations between stages"),
    k("pipeline.grad_partitioned", "true", NS, "partition gradients between stages"),
    // Sparse attention.
    k("sparse_attention", "null", NS, "block-sparse attention (Triton kernels in DeepSpeed)"),
    k("sparse_attention.mode", "\"fixed\"", NS, "dense, fixed, variable, bigbird, bslongformer"),
    k("sparse_attention.block", "16", NS, "block size"),
    k("sparse_attention.different_layout_per_head", "false", NS, "per-head layouts"),
    k("sparse_attention.num_local_blocks", "4", NS, "local blocks (fixed)"),
    k("sparse_attention.num_global_blocks", "1", NS, "global blocks"),
    k("sparse_attention.attention", "\"bidirectional\"", NS, "bidirectional or unidirectional"),
    k("sparse_attention.horizontal_global_attention", "false", NS, "horizontal global attention"),
    k("sparse_attention.num_different_global_patterns", "1", NS, "global patterns"),
    k("sparse_attention.num_random_blocks", "0", NS, "random blocks"),
    k("sparse_attention.local_window_blocks", "[4]", NS, "local window blocks (variable)"),
    k("sparse_attention.global_block_indices", "[0]", NS, "global block indices"),
    k("sparse_attention.global_block_end_indices", "null", NS, "global block end indices"),
    k("sparse_attention.num_sliding_window_blocks", "3", NS, "sliding window blocks"),
    // AIO (NVMe).
    k("aio", "null", NS, "asynchronous NVMe I/O block"),
    k("aio.block_size", "1048576", NS, "NVMe I/O block size"),
    k("aio.queue_depth", "8", NS, "NVMe queue depth"),
    k("aio.intra_op_parallelism", "1", NS, "NVMe I/O threads (alias thread_count)"),
    k("aio.single_submit", "false", NS, "submit requests one by one"),
    k("aio.overlap_events", "true", NS, "overlap submission and completion"),
    k("aio.use_gds", "false", NS, "GPUDirect Storage"),
    // Checkpoint.
    k("checkpoint", "null", I, "checkpoint block"),
    k("checkpoint.tag_validation", "\"Warn\"", I, "when ranks pass different tags: Ignore, Warn (save under rank 0's tag) or Fail (case-insensitive)"),
    k("checkpoint.load_universal", "false", NS, "load a universal checkpoint"),
    k("checkpoint.use_node_local_storage", "false", NS, "save per node"),
    k("checkpoint.parallel_write", "null", NS, "parallel checkpoint writes"),
    k("checkpoint.parallel_write.pipeline_stage", "false", NS, "parallel checkpoint writes per pipeline stage"),
    // Data types.
    k("data_types", "null", I, "data types block"),
    kv("data_types.grad_accum_dtype", "null", I, "dtype of gradient accumulation (fp32 planned; fp16/bf16 not supported yet)", &["fp16", "bf16"]),
    k("data_types.param_dtype", "null", NS, "dtype of parameters"),
    // Monitors and profilers.
    k("tensorboard", "null", NS, "TensorBoard monitor block"),
    k("tensorboard.enabled", "false", NS, "TensorBoard monitor"),
    k("tensorboard.output_path", "\"\"", NS, "TensorBoard output directory"),
    k("tensorboard.job_name", "\"DeepSpeedJobName\"", NS, "TensorBoard job name"),
    k("csv_monitor", "null", NS, "CSV monitor block"),
    k("csv_monitor.enabled", "false", NS, "CSV monitor"),
    k("csv_monitor.output_path", "\"\"", NS, "CSV output directory"),
    k("csv_monitor.job_name", "\"DeepSpeedJobName\"", NS, "CSV job name"),
    k("wandb", "null", NS, "Weights & Biases monitor block"),
    k("wandb.enabled", "false", NS, "Weights & Biases monitor"),
    k("wandb.group", "null", NS, "W&B group"),
    k("wandb.team", "null", NS, "W&B team"),
    k("wandb.project", "\"deepspeed\"", NS, "W&B project"),
    k("comet", "null", NS, "Comet monitor block"),
    k("flops_profiler", "null", NS, "FLOPs profiler block"),
    k("flops_profiler.enabled", "false", NS, "FLOPs profiler"),
    k("flops_profiler.recompute_fwd_factor", "0.0", NS, "recomputed forward share"),
    k("flops_profiler.profile_step", "1", NS, "step to profile"),
    k("flops_profiler.module_depth", "-1", NS, "module depth to print"),
    k("flops_profiler.top_modules", "1", NS, "top modules to print"),
    k("flops_profiler.detailed", "true", NS, "detailed profile"),
    k("flops_profiler.output_file", "null", NS, "profile output file"),
    k("comms_logger", "null", NS, "communication logger block"),
    k("comms_logger.enabled", "false", NS, "communication logger"),
    k("comms_logger.verbose", "false", NS, "log every operation"),
    k("comms_logger.prof_all", "true", NS, "profile all operations"),
    k("comms_logger.debug", "false", NS, "include caller names"),
    k("comms_logger.prof_ops", "[]", NS, "operations to profile"),
    k("compression_training", "null", NS, "ZeroQuant / pruning / layer reduction (sub-blocks kept as written)"),
    // Whole blocks that are not supported yet.
    k("elasticity", "null", NS, "elastic training (refused when enabled)"),
    k("autotuning", "null", NS, "DeepSpeed autotuner"),
    k("data_efficiency", "null", NS, "data sampling / routing efficiency"),
    k("curriculum_learning", "null", NS, "curriculum learning"),
    k("amp", "null", NS, "NVIDIA Apex AMP"),
    k("eigenvalue", "null", NS, "eigenvalue computation"),
    k("progressive_layer_drop", "null", NS, "progressive layer dropping"),
    k("quantize_training", "null", NS, "MoQ quantize-aware training"),
    k("hybrid_engine", "null", NS, "RLHF hybrid engine"),
    k("compile", "null", NS, "torch.compile / DeepCompile"),
    k("torch_autocast", "null", NS, "torch autocast"),
    k("tensor_parallel", "null", NS, "AutoTP training"),
    k("nebula", "null", NS, "Nebula checkpoint service"),
    k("weight_quantization", "null", NS, "post-training weight quantization"),
    k("timers", "null", NS, "throughput timers"),
    k("expert_parallel", "null", NS, "expert parallelism"),
    k("zenflow", "null", NS, "ZenFlow"),
];

/// Other spellings of a key, mapped onto the table's name.
const ALIASES: [(&str, &str); 9] = [
    ("bfloat16.", "bf16."),
    (
        "zero_optimization.prefetch_bucket_size",
        "zero_optimization.stage3_prefetch_bucket_size",
    ),
    (
        "zero_optimization.param_persistence_threshold",
        "zero_optimization.stage3_param_persistence_threshold",
    ),
    (
        "zero_optimization.model_persistence_threshold",
        "zero_optimization.stage3_model_persistence_threshold",
    ),
    (
        "zero_optimization.max_live_parameters",
        "zero_optimization.stage3_max_live_parameters",
    ),
    (
        "zero_optimization.max_reuse_distance",
        "zero_optimization.stage3_max_reuse_distance",
    ),
    (
        "zero_optimization.gather_16bit_weights_on_model_save",
        "zero_optimization.stage3_gather_16bit_weights_on_model_save",
    ),
    (
        "zero_optimization.module_granularity_threshold",
        "zero_optimization.stage3_module_granularity_threshold",
    ),
    ("aio.thread_count", "aio.intra_op_parallelism"),
];

const MORE_ALIASES: [(&str, &str); 2] = [
    (
        "zero_optimization.use_all_reduce_for_fetch_params",
        "zero_optimization.stage3_use_all_reduce_for_fetch_params",
    ),
    (
        "zero_optimization.allgather_sequential",
        "zero_optimization.stage3_allgather_sequential",
    ),
];

/// The table's name for `path`.
pub fn canonical(path: &str) -> String {
    for (from, to) in ALIASES.iter().chain(MORE_ALIASES.iter()) {
        if let Some(block) = from.strip_suffix('.') {
            if let Some(rest) = path.strip_prefix(from) {
                return format!("{to}{rest}");
            }
            if path == block {
                return to.trim_end_matches('.').to_string();
            }
        } else if path == *from {
            return to.to_string();
        }
    }
    path.to_string()
}

pub fn lookup(path: &str) -> Option<&'static KeyInfo> {
    let path = canonical(path);
    KEYS.iter().find(|k| k.path == path)
}

/// The table as markdown rows, for docs/CONFIG.md.
pub fn markdown_table() -> String {
    let mut out = String::from("| key | default | status | description |\n|---|---|---|---|\n");
    for k in KEYS {
        let mut status = k.status.label();
        if !k.unsupported_values.is_empty() {
            status.push_str(&format!(
                " (not supported yet: {})",
                k.unsupported_values.join(", ")
            ));
        }
        out.push_str(&format!(
            "| `{}` | `{}` | {} | {} |\n",
            k.path, k.default, status, k.description
        ));
    }
    out
}
