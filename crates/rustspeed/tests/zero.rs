//! The equivalence matrix: ZeRO stages 0-3 over 1, 2 and 4 ranks (threads with the shared-memory
//! communicator) train exactly like one process on the same global batches, in f32 and bf16.
//! DeepSpeed's users report that its stages disagree (REFERENCE §4 item 11); ours must not.
//! Also REFERENCE T8 (gradient_allreduce_op sum doubles the gradient at world 2) and the
//! stage-1/2 partition rule (padding to 2 * world, equal pieces).

mod common;

use common::*;
use half::bf16;
use rustspeed::engine::{Engine, EngineOptions};
use rustspeed_kernels::Float;
use rustspeed_models::Batch;

const STEPS: usize = 4;
const GLOBAL: usize = 4;

/// Stage 3 keeps every parameter of at most `stage3_param_persistence_threshold` (1e5 by
/// default) elements whole; the tiny model's are all smaller, so the tests set 0 unless they test
/// persistence itself.
fn json(stage: u8, extra: &str) -> String {
    json_zero(stage, r#", "stage3_param_persistence_threshold": 0"#, extra)
}

fn json_zero(stage: u8, zero: &str, extra: &str) -> String {
    format!(
        r#"{{"train_batch_size": {GLOBAL}, "train_micro_batch_size_per_gpu": 1,
            "optimizer": {{"type": "AdamW", "params": {{"lr": 0.02, "weight_decay": 0.1}}}},
            "gradient_clipping": 0.5, "zero_optimization": {{"stage": {stage} {zero}}} {extra}}}"#
    )
}

/// The global batches: STEPS steps of GLOBAL sequences.
fn data() -> Vec<Vec<Batch>> {
    let mut rng = Rng::new(99);
    (0..STEPS)
        .map(|_| (0..GLOBAL).map(|_| batch(&mut rng, 1)).collect())
        .collect()
}

struct Run {
    losses: Vec<f32>,
    norms: Vec<f64>,
    params: Vec<f32>,
}

/// Trains on `world` ranks; returns rank 0's view (every rank must agree, which is checked).
fn run<T: Float>(world: usize, stage: u8, extra: &str) -> Run {
    run_json::<T>(world, &json(stage, extra), 0..STEPS, None, None)
}

fn run_steps<T: Float>(
    world: usize,
    stage: u8,
    extra: &str,
    steps: std::ops::Range<usize>,
    load: Option<&std::path::Path>,
    save: Option<&std::path::Path>,
) -> Run {
    run_json::<T>(world, &json(stage, extra), steps, load, save)
}

/// Steps `steps` of the data on `world` ranks, first loading the checkpoint in `load` (if
/// any) and finally saving one into `save` (if any).
fn run_json<T: Float>(
    world: usize,
    json: &str,
    steps: std::ops::Range<usize>,
    load: Option<&std::path::Path>,
    save: Option<&std::path::Path>,
) -> Run {
    let data = data();
    let cfg = config_for_world(json, world as u64);
    let results: Vec<Run> = on_ranks(world, |rank, options| {
        let mut e = Engine::initialize(tiny_model::<T>(3, true).model, &cfg, options).unwrap();
        if let Some(dir) = load {
            e.load_checkpoint(dir, None).unwrap().unwrap();
        }
        let (mut losses, mut norms) = (Vec::new(), Vec::new());
        for step in &data[steps.clone()] {
            // Contiguous rank shares of the global batch, as the data crate cuts them.
            let per = GLOBAL / world;
            let mine: Vec<Batch> = step[rank * per..(rank + 1) * per].to_vec();
            let r = e.train_partial_batch(mine).unwrap();
            losses.push(r.loss);
            norms.push(r.step.grad_norm);
        }
        if let Some(dir) = save {
            e.save_checkpoint(dir, None, serde_json::json!({})).unwrap();
        }
        if cfg.zero_stage() >= 2 && world > 1 {
            // Only this rank's partition of the gradients, never the full buffer.
            let flat = e.flat_layout().numel;
            assert!(e.grads().len() <= flat.div_ceil(world) + 2 * world);
        }
        if cfg.zero_stage() == 3 && world > 1 {
            assert!(
                e.model().params.is_empty(),
                "stage 3 must not keep the whole parameters"
            );
        }
        Run {
            losses,
            norms,
            // A collective at stage 3: every rank gathers.
            params: f32s(&e.full_params().unwrap()),
        }
    });
    for r in &results[1..] {
        assert_eq!(r.params, results[0].params, "ranks disagree on the weights");
        assert_eq!(r.losses, results[0].losses, "ranks disagree on the loss");
    }
    results.into_iter().next().unwrap()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

fn assert_same(got: &Run, want: &Run, tol: f64, what: &str) {
    for (i, (a, b)) in got.losses.iter().zip(&want.losses).enumerate() {
        assert!(
            rel(*a as f64, *b as f64) < tol,
            "{what}: step {i} loss {a} vs {b}"
        );
    }
    for (i, (a, b)) in got.norms.iter().zip(&want.norms).enumerate() {
        assert!(rel(*a, *b) < tol, "{what}: step {i} grad norm {a} vs {b}");
    }
    let scale = want.params.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let diff = got
        .params
        .iter()
        .zip(&want.params)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs() as f64));
    assert!(
        diff / scale < tol,
        "{what}: weights differ by {diff} (scale {scale})"
    );
}

#[test]
fn stages_0_to_3_over_1_2_4_ranks_match_one_process_f32() {
    let base = run::<f32>(1, 0, "");
    for world in [2, 4] {
        for stage in [0, 1, 2, 3] {
            let got = run::<f32>(world, stage, "");
            assert_same(
                &got,
                &base,
                1e-5,
                &format!("f32 world {world} stage {stage}"),
            );
        }
    }
}

#[test]
fn stages_0_to_3_over_2_and_4_ranks_match_one_process_bf16() {
    let bf = r#", "bf16": {"enabled": true}"#;
    let base = run::<bf16>(1, 0, bf);
    for world in [2, 4] {
        for stage in [0, 1, 2, 3] {
            let got = run::<bf16>(world, stage, bf);
            // bf16 weights: the same fp32 master arithmetic, rounded to bf16 (8 bits of mantissa).
            assert_same(
                &got,
                &base,
                1e-2,
                &format!("bf16 world {world} stage {stage}"),
            );
        }
    }
}

/// Stage 3's knobs change when and how parameters travel, never the arithmetic: blocking
/// gathers and reductions (no prefetch, no overlap), and persistent small parameters
/// (fc.bias and ln_f.weight, 16 elements each, stay whole on every rank).
#[test]
fn stage_3_prefetch_overlap_and_persistence_train_alike_f32() {
    let base = run::<f32>(1, 0, "");
    for (world, zero) in [
        (
            2,
            r#", "stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0, "overlap_comm": false"#,
        ),
        (4, r#", "stage3_param_persistence_threshold": 16"#),
        (2, ""),
    ] {
        let got = run_json::<f32>(world, &json_zero(3, zero, ""), 0..STEPS, None, None);
        assert_same(&got, &base, 1e-5, &format!("world {world} stage 3 {zero}"));
    }
}

/// Stage 2 reduces each layer's gradients in buckets as its backward ends: tiny buckets that
/// straddle the partitions' boundaries, blocking or overlapped, train like one process.
#[test]
fn stage_2_buckets_and_overlap_train_alike_f32() {
    let base = run::<f32>(1, 0, "");
    for (world, zero) in [
        (2, r#", "reduce_bucket_size": 7, "overlap_comm": true"#),
        (4, r#", "reduce_bucket_size": 100, "overlap_comm": false"#),
        (4, r#", "reduce_bucket_size": 1, "overlap_comm": true"#),
    ] {
        let got = run_json::<f32>(world, &json_zero(2, zero, ""), 0..STEPS, None, None);
        assert_same(&got, &base, 1e-5, &format!("world {world} stage 2 {zero}"));
    }
}

/// An epoch's last, partial step where the ranks have different numbers of micro-batches
/// (3 over 2 ranks: 2 and 1): at stages 2 and 3 the rank with fewer joins the others' gathers
/// and reductions with nothing to add, and the step equals one process's over the 3.
#[test]
fn stages_2_3_partial_step_with_uneven_micro_batches() {
    for stage in [1, 2, 3] {
        uneven_partial_step(stage);
    }
}

fn uneven_partial_step(stage: u8) {
    let data = data();
    let one = {
        let cfg = config_for_world(&json(0, ""), 1);
        let mut e = Engine::initialize(
            tiny_model::<f32>(3, true).model,
            &cfg,
            EngineOptions::default(),
        )
        .unwrap();
        let r = e.train_partial_batch(data[0][..3].to_vec()).unwrap();
        let r2 = e.train_partial_batch(data[1].clone()).unwrap();
        (r.loss, r.step.grad_norm, r2.loss, f32s(&e.model().params))
    };
    let cfg = config_for_world(&json(stage, ""), 2);
    let got = on_ranks(2, |rank, options| {
        let mut e = Engine::initialize(tiny_model::<f32>(3, true).model, &cfg, options).unwrap();
        let mine = if rank == 0 {
            data[0][..2].to_vec()
        } else {
            data[0][2..3].to_vec()
        };
        let r = e.train_partial_batch(mine).unwrap();
        let r2 = e
            .train_partial_batch(data[1][rank * 2..rank * 2 + 2].to_vec())
            .unwrap();
        (
            r.loss,
            r.step.grad_norm,
            r2.loss,
            f32s(&e.full_params().unwrap()),
        )
    });
    for g in &got {
        assert!(
            rel(g.0 as f64, one.0 as f64) < 1e-5,
            "loss {} vs {}",
            g.0,
            one.0
        );
        assert!(rel(g.1, one.1) < 1e-5, "grad norm {} vs {}", g.1, one.1);
        assert!(
            rel(g.2 as f64, one.2 as f64) < 1e-5,
            "next loss {} vs {}",
            g.2,
            one.2
        );
        let diff =
            g.3.iter()
                .zip(&one.3)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(diff < 1e-5, "weights differ by {diff}");
    }
}

/// T8: with `gradient_allreduce_op: sum` the gradient is world times the mean's (here seen in
/// the reported norm, before clipping).
#[test]
fn allreduce_sum_doubles_the_gradient_at_world_2() {
    for stage in [0, 1, 2] {
        let mean = run::<f32>(2, stage, "");
        let sum = run::<f32>(2, stage, r#", "gradient_allreduce_op": "sum""#);
        assert!(
            rel(sum.norms[0], 2.0 * mean.norms[0]) < 1e-5,
            "stage {stage}: {} vs 2 x {}",
            sum.norms[0],
            mean.norms[0]
        );
    }
}

/// DeepSpeed's reduction arithmetic knobs: `prescale_gradients` and `gradient_predivide_factor`
/// (divide before the sum, multiply after) and `reduce_scatter: false` (all-reduce, keep the
/// part) change rounding only; `allgather_partitions: false` (each owner broadcasts) and small
/// `allgather_bucket_size` rounds change nothing. Every stage, worlds 2 and 4.
#[test]
fn reduction_and_gather_knobs_train_like_one_process_f32() {
    let base = run::<f32>(1, 0, "");
    let zero_knobs = [
        r#", "reduce_scatter": false"#,
        r#", "allgather_partitions": false"#,
        r#", "allgather_bucket_size": 10"#,
        r#", "reduce_scatter": false, "allgather_partitions": false, "allgather_bucket_size": 6, "reduce_bucket_size": 7"#,
    ];
    let top_knobs = [
        r#", "prescale_gradients": true"#,
        r#", "gradient_predivide_factor": 2.0"#,
        r#", "gradient_predivide_factor": 3.0"#,
    ];
    for world in [2, 4] {
        for stage in [0, 1, 2, 3] {
            for zero in zero_knobs {
                let json = json_zero(
                    stage,
                    &format!(r#", "stage3_param_persistence_threshold": 0{zero}"#),
                    "",
                );
                let got = run_json::<f32>(world, &json, 0..STEPS, None, None);
                assert_same(
                    &got,
                    &base,
                    1e-5,
                    &format!("world {world} stage {stage} {zero}"),
                );
            }
            for top in top_knobs {
                let got = run::<f32>(world, stage, top);
                assert_same(
                    &got,
                    &base,
                    1e-5,
                    &format!("world {world} stage {stage} {top}"),
                );
            }
        }
    }
}

/// With `gradient_allreduce_op: sum`, `gradient_predivide_factor` f divides the summed
/// gradient by f (DeepSpeed multiplies back only for a mean): at world 2, f = 2 is the mean.
/// (A sum is refused at stage 3, as DeepSpeed does.)
#[test]
fn predivide_factor_with_sum_divides_the_sum() {
    for stage in [0, 1, 2] {
        let mean = run::<f32>(2, stage, "");
        let sum_over_2 = run::<f32>(
            2,
            stage,
            r#", "gradient_allreduce_op": "sum", "gradient_predivide_factor": 2.0"#,
        );
        assert!(
            rel(sum_over_2.norms[0], mean.norms[0]) < 1e-5,
            "stage {stage}: {} vs {}",
            sum_over_2.norms[0],
            mean.norms[0]
        );
        let sum_over_4 = run::<f32>(
            2,
            stage,
            r#", "gradient_allreduce_op": "sum", "gradient_predivide_factor": 4.0"#,
        );
        assert!(
            rel(sum_over_4.norms[0], 0.5 * mean.norms[0]) < 1e-5,
            "stage {stage}"
        );
    }
}

/// Checkpoints that move: saved by 2 ranks at stage 2 or 3 (each rank writes its partition, at
/// stage 3 its pieces of the parameters too), resumed by 1 rank, by 4 ranks at stages 1-3 and by
/// 2 ranks at stages 0 and 3; the rest of the run equals the uninterrupted one.
#[test]
fn a_checkpoint_saved_by_2_ranks_resumes_on_1_and_4() {
    for save_stage in [2, 3] {
        checkpoint_moves(save_stage);
    }
}

fn checkpoint_moves(save_stage: u8) {
    for (label, extra) in [("f32", ""), ("bf16", r#", "bf16": {"enabled": true}"#)] {
        let tol = if extra.is_empty() { 1e-5 } else { 1e-2 };
        let straight = |world, stage| {
            if extra.is_empty() {
                run::<f32>(world, stage, extra)
            } else {
                run::<bf16>(world, stage, extra)
            }
        };
        let base = straight(1, 0);
        let dir = scratch_dir(&format!("zero-move-{label}-{save_stage}"));
        let half = STEPS / 2;
        let part = |world, stage, steps: std::ops::Range<usize>, load, save| {
            if extra.is_empty() {
                run_steps::<f32>(world, stage, extra, steps, load, save)
            } else {
                run_steps::<bf16>(world, stage, extra, steps, load, save)
            }
        };
        part(2, save_stage, 0..half, None, Some(&dir));
        let files: Vec<String> = std::fs::read_dir(dir.join(format!("global_step{half}")))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        for r in 0..2 {
            let f = format!("zero_pp_rank_{r}_mp_rank_00_optim_states.safetensors");
            assert!(files.contains(&f), "{f} missing in {files:?}");
        }
        let tag = dir.join(format!("global_step{half}"));
        assert_eq!(
            tag.join("mp_rank_00_model_states.safetensors").exists(),
            save_stage < 3,
            "stage 3 saves pieces, not the whole parameters"
        );
        for (world, stage) in [(1, 0), (4, 1), (4, 2), (2, 0), (4, 3), (2, 3)] {
            let rest = part(world, stage, half..STEPS, Some(&dir), None);
            let want = Run {
                losses: base.losses[half..].to_vec(),
                norms: base.norms[half..].to_vec(),
                params: base.params.clone(),
            };
            assert_same(
                &rest,
                &want,
                tol,
                &format!(
                    "{label}: saved at stage {save_stage}, resumed on {world} ranks, stage {stage}"
                ),
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// The bytes every rank's engine allocates for model states equal `rustspeed::memory`'s
/// per-rank figure, for stages 0-3 at worlds 1, 2 and 4, f32 and bf16, with a frozen
/// parameter, and at stage 3 with persistent parameters.
#[test]
fn model_state_bytes_per_rank_match_the_memory_model() {
    fn check<T: Float>(world: usize, stage: u8, zero: &str, extra: &str) -> Vec<u64> {
        let cfg = config_for_world(&json_zero(stage, zero, extra), world as u64);
        on_ranks(world, |_, options| {
            // ln_f frozen: 1296 trainable + 16 frozen elements.
            let model = tiny_model::<T>(3, false).model;
            let e = Engine::initialize(model, &cfg, options).unwrap();
            let got = e.model_state_bytes();
            let want = e.expected_model_state_bytes().unwrap();
            assert_eq!(got, want, "world {world} stage {stage} {zero} {extra}");
            got.total
        })
    }
    let bf = r#", "bf16": {"enabled": true}"#;
    for world in [1, 2, 4] {
        for stage in 0..=3 {
            check::<f32>(
                world,
                stage,
                r#", "stage3_param_persistence_threshold": 0"#,
                "",
            );
            check::<bf16>(
                world,
                stage,
                r#", "stage3_param_persistence_threshold": 0"#,
                bf,
            );
        }
        check::<bf16>(
            world,
            3,
            r#", "stage3_param_persistence_threshold": 16"#,
            bf,
        );
    }
    // Worked by hand, world 4 stage 3 bf16 AdamW: pieces of 512, 256, 16, 16 (frozen) and 512
    // elements are 128 + 64 + 4 + 4 + 128 = 328, 324 of them trainable:
    // 2 * 328 weights + (4 grads + 4 master + 8 Adam) * 324.
    let totals = check::<bf16>(4, 3, r#", "stage3_param_persistence_threshold": 0"#, bf);
    assert_eq!(totals, vec![2 * 328 + 16 * 324; 4]);
    // Stage 2 over 2 ranks: 1296 trainable, aligned to 4, halves of 648.
    let totals = check::<bf16>(2, 2, "", bf);
    assert_eq!(totals, vec![2 * 1312 + 16 * 648; 2]);
}

/// DeepSpeed's `checkpoint.tag_validation` when ranks pass different tags: "Fail" errors on
/// every rank and writes nothing; "Warn" (the default) saves under rank 0's tag.
#[test]
fn checkpoint_tag_validation_over_ranks() {
    for mode in ["Fail", "Warn"] {
        let dir = scratch_dir(&format!("tag-{mode}"));
        let json = json(
            1,
            &format!(r#", "checkpoint": {{"tag_validation": "{mode}"}}"#),
        );
        let cfg = config_for_world(&json, 2);
        let results = on_ranks(2, |rank, options| {
            let e = Engine::initialize(tiny_model::<f32>(3, true).model, &cfg, options).unwrap();
            e.save_checkpoint(&dir, Some(&format!("tag{rank}")), serde_json::json!({}))
                .map_err(|e| e.to_string())
        });
        if mode == "Fail" {
            for r in &results {
                let e = r.as_ref().unwrap_err();
                assert!(e.contains("differs from rank 0's `tag0`"), "{e}");
            }
            assert!(!dir.join("tag0").exists() && !dir.join("tag1").exists());
        } else {
            for r in &results {
                assert!(r.as_ref().unwrap().ends_with("tag0"), "{r:?}");
            }
            assert!(dir.join("tag0").is_dir() && !dir.join("tag1").exists());
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
