//! Model-state memory: DeepSpeed's ZeRO estimators, and the bytes rustspeed itself allocates.
//!
//! # DeepSpeed's estimators
//!
//! [`estimate_zero2_model_states_mem_needs`] and [`estimate_zero3_model_states_mem_needs`]
//! reproduce `deepspeed/runtime/zero/stage_1_and_2.py` and `stage3.py` (DeepSpeed 0.19)
//! operation for operation, including Python's float arithmetic and `int()` truncation, so the
//! printed tables match DeepSpeed's to the last digit. They are DeepSpeed's rules of thumb for a
//! CUDA run (fp16 weights, Adam), not a description of what rustspeed allocates.
//!
//! # rustspeed's own model states, per rank
//!
//! [`model_state_bytes`] is the exact amount of memory the engine holds for model states on one
//! data-parallel rank; the engine is tested against it. With `w` the compute dtype's size
//! (f32 4, bf16/f16 2), `k` the number of fp32 optimizer states per element (AdamW 2,
//! SGD with momentum 1, SGD 0, Lion 1, Adagrad 1), `P` the trainable element count and `N` the
//! data-parallel world size:
//!
//! | component | stage 0 | stage 1 | stage 2 | stage 3 |
//! |---|---|---|---|---|
//! | compute weights | `w·P` | `w·P` | `w·P` | `w·(S3 + R)` |
//! | gradients (fp32) | `4·P` | `4·N·S12` | `4·S12` | `4·S3` |
//! | fp32 master (16-bit compute only) | `4·P` | `4·S12` | `4·S12` | `4·S3` |
//! | optimizer states | `4k·P` | `4k·S12` | `4k·S12` | `4k·S3` |
//!
//! * `S12`, the stage 1-2 partition, follows DeepSpeed: all trainable parameters form one flat
//!   buffer, padded to a multiple of `2·N` elements, split into `N` equal parts; every rank's
//!   part has that size, the last one's padding included. Stage 1 keeps the whole padded
//!   gradient buffer (`N·S12`), reduce-scattered at the accumulation boundary.
//! * `R`, stage 3's persistent parameters: those of at most `stage3_param_persistence_threshold`
//!   elements (within `stage3_model_persistence_threshold` in total, [`zero3_persistent_numel`])
//!   are also kept whole on every rank.
//! * One rank (`N = 1`) partitions nothing: every stage costs what stage 0 does.
//! * `S3`, the stage 3 partition, follows DeepSpeed's `ds_tensor`: each parameter is split on its
//!   own into `ceil(numel/N)` elements per rank (the last rank zero-padded), summed over params.
//! * Gradients are accumulated in fp32 whatever the compute dtype.
//! * With f32 compute the weights are the master copy, so no separate master exists.
//! * Frozen parameters only have compute weights: `w·F` at stages 0-2, per-parameter shards at 3.
//!
//! Not included: activations, communication buckets, the transient per-layer gradient scratch
//! of stages 2-3 and the gathered layer of stage 3 (DeepSpeed's `largest_layer_memory`).

pub use rustspeed_kernels::DType;

/// Bytes in DeepSpeed's "GB" (`2**30`).
pub const GIB: f64 = 1_073_741_824.0;

/// DeepSpeed's `additional_buffer_factor` default.
pub const DEFAULT_BUFFER_FACTOR: f64 = 1.5;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MemoryError {
    #[error("{what} must be at least 1, got 0")]
    Zero { what: &'static str },
    #[error("ZeRO stage {0} does not exist; stages are 0, 1, 2 and 3")]
    Stage(u8),
}

/// DeepSpeed's `estimate_zero2_model_states_mem_needs`: `(cpu_bytes, gpu_bytes)`.
pub fn estimate_zero2_model_states_mem_needs(
    total_params: u64,
    num_gpus_per_node: u64,
    num_nodes: u64,
    cpu_offload: bool,
    additional_buffer_factor: f64,
) -> (u64, u64) {
    let p = total_params as f64;
    let total_gpus = num_nodes * num_gpus_per_node;
    let (cpu, gpu) = if cpu_offload {
        let gpu = 2.0 * p;
        let cpu = p * (4 * total_gpus).max(16) as f64 * additional_buffer_factor;
        (cpu, gpu)
    } else {
        // 2 bytes of 16-bit params, and per partition: 2 grads16 + 4 grads32 + 4 params32 +
        // 8 Adam (DeepSpeed PR #5099; the docs still show the older 4P + 16P/N).
        let gpu = 2.0 * p + py_int(18.0 * p / total_gpus as f64);
        let cpu = p * 4.0 * num_gpus_per_node as f64 * additional_buffer_factor;
        (cpu, gpu)
    };
    (py_int(cpu) as u64, py_int(gpu) as u64)
}

/// DeepSpeed's `estimate_zero3_model_states_mem_needs`: `(cpu_bytes, gpu_bytes)`. The third value
/// DeepSpeed returns, `largest_layer_memory`, is `4 * largest_layer_params`.
#[allow(clippy::too_many_arguments)]
pub fn estimate_zero3_model_states_mem_needs(
    total_params: u64,
    largest_layer_params: u64,
    num_gpus_per_node: u64,
    num_nodes: u64,
    cpu_offload: bool,
    cpu_offload_params: bool,
    zero_init: bool,
    additional_buffer_factor: f64,
) -> (u64, u64) {
    let p = total_params as f64;
    let total_gpus = (num_nodes * num_gpus_per_node) as f64;
    let gpn = num_gpus_per_node as f64;
    let gpus_factor = 1.0 / num_nodes as f64;
    let largest_layer_memory = 4.0 * largest_layer_params as f64;
    // Python evaluates `P * a * b * c` left to right; keep that order for identical rounding.
    let (cpu, gpu) = match (cpu_offload, cpu_offload_params) {
        (true, true) => {
            let cpu = if zero_init {
                p * 18.0 * gpus_factor * additional_buffer_factor
            } else {
                p * (4.0 * gpn).max(18.0 * gpus_factor) * additional_buffer_factor
            };
            (cpu, largest_layer_memory)
        }
        (true, false) => {
            let gpu = largest_layer_memory + py_int(2.0 * p / total_gpus);
            let cpu = if zero_init {
                p * 16.0 * gpus_factor * additional_buffer_factor
            } else {
                p * (4.0 * gpn).max(16.0 * gpus_factor) * additional_buffer_factor
            };
            (cpu, gpu)
        }
        (false, _) => {
            let gpu = largest_layer_memory + py_int(18.0 * p / total_gpus);
            let cpu = if zero_init {
                largest_layer_params as f64 * 4.0 * gpn * additional_buffer_factor
            } else {
                p * 4.0 * gpn * additional_buffer_factor
            };
            (cpu, gpu)
        }
    };
    (py_int(cpu) as u64, py_int(gpu) as u64)
}

/// Python's `int()` of a non-negative float: truncation toward zero.
fn py_int(x: f64) -> f64 {
    x.trunc()
}

/// One row of DeepSpeed's `_all_cold` table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EstimateRow {
    pub offload_optimizer: bool,
    pub offload_param: bool,
    pub zero_init: bool,
    pub cpu_bytes: u64,
    pub gpu_bytes: u64,
}

/// The rows of `estimate_zero2_model_states_mem_needs_all_cold`: optimizer offload on, then off.
/// ZeRO-2 has neither parameter offload nor `zero.Init`, reported as `false` and `true`.
pub fn zero2_all_cold_rows(
    total_params: u64,
    num_gpus_per_node: u64,
    num_nodes: u64,
    additional_buffer_factor: f64,
) -> Vec<EstimateRow> {
    [true, false]
        .into_iter()
        .map(|offload| {
            let (cpu_bytes, gpu_bytes) = estimate_zero2_model_states_mem_needs(
                total_params,
                num_gpus_per_node,
                num_nodes,
                offload,
                additional_buffer_factor,
            );
            EstimateRow {
                offload_optimizer: offload,
                offload_param: false,
                zero_init: true,
                cpu_bytes,
                gpu_bytes,
            }
        })
        .collect()
}

/// The six rows of `estimate_zero3_model_states_mem_needs_all_cold`, in DeepSpeed's order:
/// optimizer offload (on, off) x parameter offload (on, off; on only with optimizer offload) x
/// `zero_init` (on, off).
pub fn zero3_all_cold_rows(
    total_params: u64,
    largest_layer_params: u64,
    num_gpus_per_node: u64,
    num_nodes: u64,
    additional_buffer_factor: f64,
) -> Vec<EstimateRow> {
    let mut rows = Vec::with_capacity(6);
    for offload_optimizer in [true, false] {
        for offload_param in [true, false] {
            if offload_param && !offload_optimizer {
                continue;
            }
            for zero_init in [true, false] {
                let (cpu_bytes, gpu_bytes) = estimate_zero3_model_states_mem_needs(
                    total_params,
                    largest_layer_params,
                    num_gpus_per_node,
                    num_nodes,
                    offload_optimizer,
                    offload_param,
                    zero_init,
                    additional_buffer_factor,
                );
                rows.push(EstimateRow {
                    offload_optimizer,
                    offload_param,
                    zero_init,
                    cpu_bytes,
                    gpu_bytes,
                });
            }
        }
    }
    rows
}

/// DeepSpeed's table header: the three lines before the column titles.
fn table_header(
    total_params: u64,
    largest_layer_params: Option<u64>,
    num_gpus_per_node: u64,
    num_nodes: u64,
) -> String {
    let nodes = if num_nodes > 1 { "nodes" } else { "node" };
    let gpus = if num_gpus_per_node > 1 { "GPUs" } else { "GPU" };
    let millions = |n: u64| (n as f64 / 1e6).trunc() as u64;
    let mut sw = format!("SW: Model with {}M total params", millions(total_params));
    if let Some(l) = largest_layer_params {
        sw.push_str(&format!(", {}M largest layer params", millions(l)));
    }
    format!(
        "Estimated memory needed for params, optim states and gradients for a:\n\
         HW: Setup with {num_nodes} {nodes}, {num_gpus_per_node} {gpus} per node.\n\
         {sw}.\n  per CPU  |  per GPU |   Options\n"
    )
}

fn table_row(row: &EstimateRow, options: &str) -> String {
    format!(
        " {:7.2}GB | {:6.2}GB | {options}\n",
        row.cpu_bytes as f64 / GIB,
        row.gpu_bytes as f64 / GIB
    )
}

/// DeepSpeed pads the device name with `f'{OffloadDeviceEnum.cpu:4}'` to line up with "none".
fn device(offload: bool) -> &'static str {
    if offload {
        "cpu "
    } else {
        "none"
    }
}

/// The text `estimate_zero2_model_states_mem_needs_all_cold` prints.
pub fn format_zero2_table(
    total_params: u64,
    num_gpus_per_node: u64,
    num_nodes: u64,
    rows: &[EstimateRow],
) -> String {
    let mut out = table_header(total_params, None, num_gpus_per_node, num_nodes);
    for row in rows {
        let options = format!("offload_optimizer={}", device(row.offload_optimizer));
        out.push_str(&table_row(row, &options));
    }
    out
}

/// The text `estimate_zero3_model_states_mem_needs_all_cold` prints.
pub fn format_zero3_table(
    total_params: u64,
    largest_layer_params: u64,
    num_gpus_per_node: u64,
    num_nodes: u64,
    rows: &[EstimateRow],
) -> String {
    let mut out = table_header(
        total_params,
        Some(largest_layer_params),
        num_gpus_per_node,
        num_nodes,
    );
    for row in rows {
        let options = format!(
            "offload_param={}, offload_optimizer={}, zero_init={}",
            device(row.offload_param),
            device(row.offload_optimizer),
            u8::from(row.zero_init)
        );
        out.push_str(&table_row(row, &options));
    }
    out
}

/// The optimizers whose state sizes rustspeed knows, by fp32 states per trainable element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    /// Adam, AdamW: first and second moments.
    AdamW,
    /// Lamb: first and second moments.
    Lamb,
    /// SGD with momentum: one momentum buffer.
    SgdMomentum,
    /// Plain SGD: no state.
    Sgd,
    /// Lion: one momentum buffer.
    Lion,
    /// Adagrad: the squared-gradient sum.
    Adagrad,
}

impl OptimizerKind {
    pub fn fp32_states_per_param(self) -> u64 {
        match self {
            OptimizerKind::AdamW | OptimizerKind::Lamb => 2,
            OptimizerKind::SgdMomentum | OptimizerKind::Lion | OptimizerKind::Adagrad => 1,
            OptimizerKind::Sgd => 0,
        }
    }
}

/// What [`model_state_bytes`] needs to know about the run.
#[derive(Clone, Copy, Debug)]
pub struct MemorySetup {
    pub world_size: u64,
    pub stage: u8,
    pub compute_dtype: DType,
    /// fp32 optimizer states per trainable element ([`OptimizerKind::fp32_states_per_param`]).
    pub optimizer_states: u64,
    /// Stage 3: elements of the persistent parameters, kept whole besides their pieces
    /// ([`zero3_persistent_numel`]; 0 when nothing persists).
    pub stage3_persistent: u64,
}

/// Per-rank model-state bytes by component (see the module docs for the model).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelStateBytes {
    /// Compute-dtype weights, trainable and frozen.
    pub weights: u64,
    /// fp32 gradients.
    pub grads: u64,
    /// fp32 master weights (zero with f32 compute).
    pub master: u64,
    /// fp32 optimizer states.
    pub optimizer: u64,
    pub total: u64,
}

/// Elements one rank owns of the stage 1-2 flat buffer: DeepSpeed pads it to a multiple of
/// `2 * world_size` (`nccl_start_alignment_factor`) and splits it evenly.
pub fn zero12_partition_numel(trainable_numel: u64, world_size: u64) -> u64 {
    let alignment = 2 * world_size;
    trainable_numel.div_ceil(alignment) * alignment / world_size
}

/// Elements one rank owns at stage 3: every parameter split on its own, `ceil(numel / N)`.
pub fn zero3_partition_numel(numels: &[u64], world_size: u64) -> u64 {
    numels.iter().map(|n| n.div_ceil(world_size)).sum()
}

/// Elements of the parameters stage 3 keeps whole on every rank, DeepSpeed's
/// `mark_persistent_parameters`: in model order, each of at most `threshold` elements unless it
/// would take the total past `model_threshold`.
pub fn zero3_persistent_numel(
    numels_in_model_order: &[u64],
    threshold: u64,
    model_threshold: u64,
) -> u64 {
    let mut total = 0u64;
    for &n in numels_in_model_order {
        if n <= threshold && total.saturating_add(n) <= model_threshold {
            total += n;
        }
    }
    total
}

/// rustspeed's model-state bytes on one rank, for trainable and frozen parameter sizes given in
/// model order.
pub fn model_state_bytes(
    trainable: &[u64],
    frozen: &[u64],
    setup: &MemorySetup,
) -> Result<ModelStateBytes, MemoryError> {
    let n = setup.world_size;
    if n == 0 {
        return Err(MemoryError::Zero { what: "world size" });
    }
    if setup.stage > 3 {
        return Err(MemoryError::Stage(setup.stage));
    }
    let w = setup.compute_dtype.size_in_bytes() as u64;
    let p: u64 = trainable.iter().sum();
    let f: u64 = frozen.iter().sum();
    let s12 = zero12_partition_numel(p, n);
    let s3 = zero3_partition_numel(trainable, n);

    let stage = if n == 1 { 0 } else { setup.stage };
    let (weight_elems, grad_elems, state_elems) = match stage {
        0 => (p + f, p, p),
        1 => (p + f, n * s12, s12),
        2 => (p + f, s12, s12),
        _ => (
            s3 + zero3_partition_numel(frozen, n) + setup.stage3_persistent,
            s3,
            s3,
        ),
    };
    let weights = w * weight_elems;
    let grads = 4 * grad_elems;
    let master = if setup.compute_dtype == DType::F32 {
        0
    } else {
        4 * state_elems
    };
    let optimizer = 4 * setup.optimizer_states * state_elems;
    Ok(ModelStateBytes {
        weights,
        grads,
        master,
        optimizer,
        total: weights + grads + master + optimizer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 2_851_000_000;
    const L: u64 = 32_000_000;

    fn gb(bytes: u64) -> String {
        format!("{:.2}", bytes as f64 / GIB)
    }

    fn gb_pairs(rows: &[EstimateRow]) -> Vec<(String, String)> {
        rows.iter()
            .map(|r| (gb(r.cpu_bytes), gb(r.gpu_bytes)))
            .collect()
    }

    fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
        expected
            .iter()
            .map(|(c, g)| (c.to_string(), g.to_string()))
            .collect()
    }

    #[test]
    fn zero3_rows_match_deepspeed_docs() {
        let rows = zero3_all_cold_rows(P, L, 8, 1, DEFAULT_BUFFER_FACTOR);
        assert_eq!(
            gb_pairs(&rows),
            pairs(&[
                ("71.69", "0.12"),
                ("127.45", "0.12"),
                ("63.72", "0.78"),
                ("127.45", "0.78"),
                ("1.43", "6.09"),
                ("127.45", "6.09"),
            ])
        );
        let flags: Vec<(bool, bool, bool)> = rows
            .iter()
            .map(|r| (r.offload_optimizer, r.offload_param, r.zero_init))
            .collect();
        assert_eq!(
            flags,
            [
                (true, true, true),
                (true, true, false),
                (true, false, true),
                (true, false, false),
                (false, false, true),
                (false, false, false),
            ]
        );
        // Exact bytes, worked by hand from the formulas.
        assert_eq!(rows[0].cpu_bytes, 2_851_000_000 * 18 * 3 / 2);
        assert_eq!(rows[0].gpu_bytes, 128_000_000);
        assert_eq!(rows[2].gpu_bytes, 128_000_000 + 712_750_000);
        assert_eq!(rows[4].cpu_bytes, 32_000_000 * 4 * 8 * 3 / 2);
        assert_eq!(rows[4].gpu_bytes, 128_000_000 + 6_414_750_000);
    }

    #[test]
    fn zero2_rows_follow_the_code_not_the_old_docs() {
        let rows = zero2_all_cold_rows(P, 8, 1, DEFAULT_BUFFER_FACTOR);
        assert_eq!(
            gb_pairs(&rows),
            pairs(&[("127.45", "5.31"), ("127.45", "11.28")])
        );
        assert_eq!(rows[1].gpu_bytes, 2 * P + 18 * P / 8);
        assert!(rows.iter().all(|r| !r.offload_param && r.zero_init));
    }

    #[test]
    fn tinyllama_zero2_on_one_gpu() {
        let rows = zero2_all_cold_rows(1_100_048_384, 1, 1, DEFAULT_BUFFER_FACTOR);
        assert_eq!(
            gb_pairs(&rows),
            pairs(&[("24.59", "2.05"), ("6.15", "20.49")])
        );
    }

    #[test]
    fn multi_node_uses_gpus_factor_and_truncates() {
        // 2 nodes x 4 GPUs: gpus_factor 0.5; 4*gpn = 16 > 18*0.5 = 9 without zero.Init.
        let (cpu, gpu) =
            estimate_zero3_model_states_mem_needs(1001, 10, 4, 2, true, false, true, 1.5);
        assert_eq!(cpu, (1001.0_f64 * 16.0 * 0.5 * 1.5) as u64);
        assert_eq!(gpu, 40 + 250); // int(2002 / 8) = 250
        let (cpu, _) =
            estimate_zero3_model_states_mem_needs(1001, 10, 4, 2, true, true, false, 1.5);
        assert_eq!(cpu, 1001 * 16 * 3 / 2);
        // ZeRO-2 offload takes max(4 * total_gpus, 16) over all nodes.
        let (cpu, gpu) = estimate_zero2_model_states_mem_needs(1001, 4, 2, true, 1.5);
        assert_eq!((cpu, gpu), (1001 * 32 * 3 / 2, 2002));
    }

    #[test]
    fn tables_print_like_deepspeed() {
        let rows = zero3_all_cold_rows(P, L, 8, 1, DEFAULT_BUFFER_FACTOR);
        let text = format_zero3_table(P, L, 8, 1, &rows);
        let expected = "\
Estimated memory needed for params, optim states and gradients for a:
HW: Setup with 1 node, 8 GPUs per node.
SW: Model with 2851M total params, 32M largest layer params.
  per CPU  |  per GPU |   Options
   71.69GB |   0.12GB | offload_param=cpu , offload_optimizer=cpu , zero_init=1
  127.45GB |   0.12GB | offload_param=cpu , offload_optimizer=cpu , zero_init=0
   63.72GB |   0.78GB | offload_param=none, offload_optimizer=cpu , zero_init=1
  127.45GB |   0.78GB | offload_param=none, offload_optimizer=cpu , zero_init=0
    1.43GB |   6.09GB | offload_param=none, offload_optimizer=none, zero_init=1
  127.45GB |   6.09GB | offload_param=none, offload_optimizer=none, zero_init=0
";
        assert_eq!(text, expected);

        let rows = zero2_all_cold_rows(P, 1, 2, DEFAULT_BUFFER_FACTOR);
        let text = format_zero2_table(P, 1, 2, &rows);
        assert!(text.starts_with(
            "Estimated memory needed for params, optim states and gradients for a:\n\
             HW: Setup with 2 nodes, 1 GPU per node.\n\
             SW: Model with 2851M total params.\n  per CPU  |  per GPU |   Options\n"
        ));
        assert!(text.ends_with("GB | offload_optimizer=none\n"), "{text}");
    }

    /// 53 elements in 5 tensors: stage 1-2 pads the flat buffer, stage 3 pads each tensor.
    const SIZES: [u64; 5] = [10, 20, 7, 13, 3];

    fn setup(world_size: u64, stage: u8, dtype: DType, k: u64) -> MemorySetup {
        MemorySetup {
            world_size,
            stage,
            compute_dtype: dtype,
            optimizer_states: k,
            stage3_persistent: 0,
        }
    }

    fn bytes(weights: u64, grads: u64, master: u64, optimizer: u64) -> ModelStateBytes {
        ModelStateBytes {
            weights,
            grads,
            master,
            optimizer,
            total: weights + grads + master + optimizer,
        }
    }

    #[test]
    fn partitions_pad_like_deepspeed() {
        // N=2: alignment 4, 53 -> 56, 28 each; per tensor 5+10+4+7+2 = 28.
        assert_eq!(zero12_partition_numel(53, 2), 28);
        assert_eq!(zero3_partition_numel(&SIZES, 2), 28);
        // N=4: alignment 8, 53 -> 56, 14 each; per tensor 3+5+2+4+1 = 15.
        assert_eq!(zero12_partition_numel(53, 4), 14);
        assert_eq!(zero3_partition_numel(&SIZES, 4), 15);
        // Already aligned: no padding.
        assert_eq!(zero12_partition_numel(64, 4), 16);
        assert_eq!(zero12_partition_numel(53, 1), 54);
    }

    #[test]
    fn bf16_adamw_per_stage_over_four_ranks() {
        let get = |stage| model_state_bytes(&SIZES, &[], &setup(4, stage, DType::BF16, 2)).unwrap();
        assert_eq!(get(0), bytes(2 * 53, 4 * 53, 4 * 53, 8 * 53));
        // Stage 1 keeps the whole gradient buffer, padded to 56 for the reduce-scatter.
        assert_eq!(get(1), bytes(2 * 53, 4 * 56, 4 * 14, 8 * 14));
        assert_eq!(get(2), bytes(2 * 53, 4 * 14, 4 * 14, 8 * 14));
        assert_eq!(get(3), bytes(2 * 15, 4 * 15, 4 * 15, 8 * 15));
        assert_eq!(get(3).total, 30 + 60 + 60 + 120);
    }

    #[test]
    fn f32_has_no_master_and_sgd_no_state() {
        let s = model_state_bytes(&SIZES, &[], &setup(2, 2, DType::F32, 0)).unwrap();
        assert_eq!(s, bytes(4 * 53, 4 * 28, 0, 0));
        let s = model_state_bytes(&SIZES, &[], &setup(2, 1, DType::F16, 1)).unwrap();
        assert_eq!(s, bytes(2 * 53, 4 * 56, 4 * 28, 4 * 28));
    }

    #[test]
    fn frozen_params_only_cost_weights() {
        let frozen = [9, 6];
        let s = model_state_bytes(&SIZES, &frozen, &setup(2, 2, DType::BF16, 2)).unwrap();
        assert_eq!(s, bytes(2 * (53 + 15), 4 * 28, 4 * 28, 8 * 28));
        // Stage 3 shards frozen params too: ceil(9/2) + ceil(6/2) = 8.
        let s = model_state_bytes(&SIZES, &frozen, &setup(2, 3, DType::BF16, 2)).unwrap();
        assert_eq!(s, bytes(2 * (28 + 8), 4 * 28, 4 * 28, 8 * 28));
    }

    #[test]
    fn one_rank_bf16_adamw_costs_18_bytes_per_param() {
        // 2 weights + 4 fp32 grads + 4 master + 8 states: the ZeRO paper's 16 bytes, plus 2
        // because rustspeed accumulates gradients in fp32 where the paper counts 16-bit ones.
        let p = [1_000_000];
        let s = model_state_bytes(&p, &[], &setup(1, 0, DType::BF16, 2)).unwrap();
        assert_eq!(s.total, 18_000_000);
    }

    #[test]
    fn one_rank_is_stage_0_and_persistent_params_stay_whole() {
        for stage in 0..4 {
            let s = model_state_bytes(&SIZES, &[], &setup(1, stage, DType::BF16, 2)).unwrap();
            assert_eq!(s, bytes(2 * 53, 4 * 53, 4 * 53, 8 * 53), "stage {stage}");
        }
        // Threshold 10: 10, 7 and 3 persist (20 elements); a model cap of 15 stops after 10.
        assert_eq!(zero3_persistent_numel(&SIZES, 10, u64::MAX), 20);
        assert_eq!(zero3_persistent_numel(&SIZES, 10, 15), 13);
        let mut z3 = setup(2, 3, DType::BF16, 2);
        z3.stage3_persistent = 20;
        let s = model_state_bytes(&SIZES, &[], &z3).unwrap();
        assert_eq!(s, bytes(2 * (28 + 20), 4 * 28, 4 * 28, 8 * 28));
    }

    #[test]
    fn invalid_setups_are_errors() {
        assert_eq!(
            model_state_bytes(&SIZES, &[], &setup(0, 0, DType::BF16, 2)),
            Err(MemoryError::Zero { what: "world size" })
        );
        assert_eq!(
            model_state_bytes(&SIZES, &[], &setup(2, 4, DType::BF16, 2)),
            Err(MemoryError::Stage(4))
        );
    }
}
