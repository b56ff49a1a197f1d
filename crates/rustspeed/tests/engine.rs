//! The engine on a tiny model built from the layer protocol: accumulation, clipping, fp16
//! overflow skipping, bf16 vs fp32, scheduler order, parameter groups, frozen parameters and
//! memory accounting. Checkpoints are in tests/checkpoint.rs.

mod common;

use common::*;
use half::{bf16, f16};
use rustspeed::engine::{Engine, EngineOptions};
use rustspeed::optimizer::DecayRule;
use rustspeed_kernels::Float;

fn engine<T: Float>(
    json: &str,
    seed: u64,
) -> (Engine<T>, std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let built = tiny_model::<T>(seed, true);
    let e = Engine::initialize(built.model, &config(json), EngineOptions::default()).unwrap();
    (e, built.poison)
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

#[test]
fn accumulating_two_micro_batches_equals_one_batch_of_two() {
    let opt = r#""optimizer": {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.1}}, "gradient_clipping": 0.05"#;
    let (mut acc, _) = engine::<f32>(
        &format!(
            r#"{{"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, {opt}}}"#
        ),
        1,
    );
    let (mut big, _) = engine::<f32>(
        &format!(
            r#"{{"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, {opt}}}"#
        ),
        1,
    );
    let mut rng = Rng::new(7);
    for _ in 0..4 {
        let (a, b) = (batch(&mut rng, 1), batch(&mut rng, 1));
        let both = concat(&[a.clone(), b.clone()]);
        let r1 = acc.train_batch(&mut vec![a, b].into_iter()).unwrap();
        let r2 = big.train_batch(&mut std::iter::once(both)).unwrap();
        // Equal token counts per sequence: mean of means == mean over both.
        assert!(
            (r1.loss - r2.loss).abs() < 1e-5,
            "{} vs {}",
            r1.loss,
            r2.loss
        );
        let (n1, n2) = (r1.step.grad_norm, r2.step.grad_norm);
        assert!((n1 - n2).abs() < 1e-5 * n2, "grad norm {n1} vs {n2}");
        assert!(r1.step.clip_coef > 1.0, "the test should exercise clipping");
    }
    assert_eq!(acc.global_steps(), 4);
    assert_eq!(acc.micro_steps(), 8);
    assert_eq!(big.global_steps(), 4);
    let d = max_rel_diff(&acc.model().params, &big.model().params);
    assert!(d < 1e-5, "weights differ by {d} (relative)");
}

#[test]
fn boundary_and_step_only_act_every_gas_micro_batches() {
    let (mut e, _) = engine::<f32>(
        r#"{"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 3,
            "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}"#,
        2,
    );
    let mut rng = Rng::new(3);
    let w0 = e.model().params.clone();
    for k in 0..3 {
        assert_eq!(e.is_gradient_accumulation_boundary(), k == 2);
        e.forward(&batch(&mut rng, 1)).unwrap();
        e.backward().unwrap();
        let out = e.step().unwrap();
        assert_eq!(out.is_some(), k == 2, "micro-step {k}");
        if k < 2 {
            assert_eq!(e.model().params, w0, "weights move only at the boundary");
            assert!(e.grads().iter().any(|g| *g != 0.0));
        }
    }
    assert_eq!(e.global_steps(), 1);
    assert!(
        e.grads().iter().all(|g| *g == 0.0),
        "gradients are zeroed after the step"
    );
    assert!(matches!(
        e.backward(),
        Err(rustspeed::engine::EngineError::BackwardWithoutForward)
    ));
}

#[test]
fn clipping_reports_the_pre_clip_norm_and_scales_the_update() {
    // Plain SGD, lr 1: the update is exactly -grad / clip.
    let cfg = |clip: &str| {
        format!(
            r#"{{"train_batch_size": 2, "gradient_clipping": {clip},
                "optimizer": {{"type": "SGD", "params": {{"lr": 1.0}}}}}}"#
        )
    };
    let mut rng = Rng::new(11);
    let b = batch(&mut rng, 2);
    let (mut free, _) = engine::<f32>(&cfg("0"), 5);
    let (mut clipped, _) = engine::<f32>(&cfg("0.01"), 5);
    let w0 = free.model().params.clone();
    free.forward(&b).unwrap();
    free.backward().unwrap();
    let g: Vec<f32> = free.grads().to_vec();
    let norm = g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let s1 = free.step().unwrap().unwrap();
    clipped.forward(&b).unwrap();
    clipped.backward().unwrap();
    let s2 = clipped.step().unwrap().unwrap();
    assert!((s1.grad_norm - norm).abs() < 1e-9 * norm);
    assert_eq!(
        s1.grad_norm, s2.grad_norm,
        "the reported norm is taken before clipping"
    );
    assert_eq!(s1.clip_coef, 1.0);
    let expect_clip = (norm + 1e-6) / 0.01;
    assert!((s2.clip_coef - expect_clip).abs() < 1e-9 * expect_clip);
    assert_eq!(clipped.last_grad_norm(), Some(s2.grad_norm));
    // Updates: free moved by -g, clipped by -g / clip.
    let step_free: Vec<f32> = free
        .model()
        .params
        .iter()
        .zip(&w0)
        .map(|(a, b)| a - b)
        .collect();
    let step_clip: Vec<f32> = clipped
        .model()
        .params
        .iter()
        .zip(&w0)
        .map(|(a, b)| a - b)
        .collect();
    for i in 0..g.len() {
        assert!((step_free[i] + g[i]).abs() <= 1e-6 * (1.0 + g[i].abs()));
        let want = -g[i] / expect_clip as f32;
        assert!(
            (step_clip[i] - want).abs() <= 1e-6 + 1e-3 * want.abs(),
            "element {i}: {} vs {want}",
            step_clip[i]
        );
    }
}

#[test]
fn fp16_overflow_skips_exactly_that_step_and_holds_the_scheduler() {
    for hysteresis in [1u32, 2] {
        let json = format!(
            r#"{{"train_batch_size": 2, "gradient_clipping": 1.0,
                "fp16": {{"enabled": true, "initial_scale_power": 8, "hysteresis": {hysteresis}}},
                "optimizer": {{"type": "AdamW", "params": {{"lr": 0.01}}}},
                "scheduler": {{"type": "WarmupLR", "params": {{"warmup_min_lr": 0.001, "warmup_max_lr": 0.01, "warmup_num_steps": 10, "warmup_type": "linear"}}}}}}"#
        );
        let (mut e, poison) = engine::<f16>(&json, 3);
        let mut rng = Rng::new(5);
        let mut outcomes = Vec::new();
        for step in 1..=5 {
            let before = f32s(&e.model().params);
            if step == 3 {
                poison.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            let r = e
                .train_batch(&mut std::iter::once(batch(&mut rng, 2)))
                .unwrap();
            assert_eq!(r.step.skipped, step == 3, "step {step}");
            let after = f32s(&e.model().params);
            assert_eq!(
                before == after,
                step == 3,
                "weights change except on the skipped step"
            );
            outcomes.push(r.step);
        }
        assert_eq!(e.global_steps(), 5);
        assert_eq!(e.skipped_steps(), 1);
        let lrs: Vec<f64> = outcomes.iter().map(|o| o.lr).collect();
        // DeepSpeed's order: step 1 runs at construction's minimum (iteration -1), step 2 at
        // iteration 0 (linear warmup: still the minimum); the skipped step 3 used iteration 1
        // and did not advance the scheduler, so step 4 uses iteration 1 again.
        let warm = |i: f64| 0.001 + 0.009 * i / 10.0;
        let want = [warm(0.0), warm(0.0), warm(1.0), warm(1.0), warm(2.0)];
        for (got, want) in lrs.iter().zip(want) {
            assert!((got - want).abs() < 1e-15, "lrs {lrs:?}");
        }
        let scales: Vec<f64> = outcomes.iter().map(|o| o.loss_scale).collect();
        let after_overflow = if hysteresis == 1 { 128.0 } else { 256.0 };
        assert_eq!(
            scales,
            vec![256.0, 256.0, 256.0, after_overflow, after_overflow]
        );
        assert_eq!(e.loss_scale(), after_overflow);
        assert!(!outcomes[2].grad_norm.is_finite());
        assert!(outcomes
            .iter()
            .enumerate()
            .all(|(i, o)| i == 2 || o.grad_norm.is_finite()));
    }
}

#[test]
fn fp16_gradients_carry_the_loss_scale() {
    let json = r#"{"train_batch_size": 1, "gradient_clipping": 0,
        "fp16": {"enabled": true, "loss_scale": 1024},
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}"#;
    let json32 = r#"{"train_batch_size": 1, "gradient_clipping": 0,
        "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}"#;
    let (mut h, _) = engine::<f16>(json, 9);
    let (mut f, _) = engine::<f32>(json32, 9);
    let b = batch(&mut Rng::new(1), 1);
    h.forward(&b).unwrap();
    h.backward().unwrap();
    f.forward(&b).unwrap();
    f.backward().unwrap();
    let gh = h.grads().iter().map(|g| g / 1024.0).collect::<Vec<_>>();
    let d = max_rel_diff(f.grads(), &gh);
    assert!(d < 2e-2, "fp16 grads / 1024 vs fp32 grads: {d}");
    let r = h.step().unwrap().unwrap();
    assert_eq!(r.loss_scale, 1024.0);
    let norm32 = f.step().unwrap().unwrap().grad_norm;
    assert!(
        (r.grad_norm - norm32).abs() < 2e-2 * norm32,
        "norm is unscaled"
    );
}

#[test]
fn bf16_tracks_fp32_within_half_a_percent_over_20_steps() {
    let json = |bf: bool| {
        format!(
            r#"{{"train_batch_size": 4, "bf16": {{"enabled": {bf}}},
                "optimizer": {{"type": "AdamW", "params": {{"lr": 0.01, "weight_decay": 0.01}}}}}}"#
        )
    };
    let (mut f, _) = engine::<f32>(&json(false), 21);
    let (mut h, _) = engine::<bf16>(&json(true), 21);
    assert_eq!(f32s(&h.model().params), f.model().params, "same start");
    // Two batches in turn: the model can fit them, so the loss must fall.
    let mut rng = Rng::new(4);
    let data = [batch(&mut rng, 4), batch(&mut rng, 4)];
    let mut worst = 0f32;
    let (mut first, mut last) = (0f32, 0f32);
    for step in 0..20 {
        let b = data[step % 2].clone();
        let lf = f.train_batch(&mut std::iter::once(b.clone())).unwrap().loss;
        let lh = h.train_batch(&mut std::iter::once(b)).unwrap().loss;
        worst = worst.max((lf - lh).abs() / lf);
        if step == 1 {
            first = lf;
        }
        if step == 19 {
            last = lf;
        }
    }
    assert!(last < first, "training lowers the loss ({first} -> {last})");
    assert!(
        worst < 5e-3,
        "bf16 loss differs from fp32 by {worst} (relative)"
    );
    eprintln!("bf16 vs fp32 over 20 steps: worst relative loss difference {worst}, fp32 loss {first} -> {last}");
    // The fp32 master, rounded, is what the bf16 model holds.
    let rounded: Vec<f32> = h
        .master_weights()
        .iter()
        .map(|m| bf16::from_f32(*m).to_f32())
        .collect();
    assert_eq!(rounded, f32s(&h.model().params));
}

#[test]
fn first_step_runs_at_the_schedulers_minimum() {
    let (mut e, _) = engine::<f32>(
        r#"{"train_batch_size": 1,
            "optimizer": {"type": "SGD", "params": {"lr": 0.5}},
            "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.001, "warmup_num_steps": 10}}}"#,
        1,
    );
    assert_eq!(e.lr(), 0.0, "construction sets the minimum");
    let w0 = e.model().params.clone();
    let mut rng = Rng::new(2);
    let r = e
        .train_batch(&mut std::iter::once(batch(&mut rng, 1)))
        .unwrap();
    assert_eq!(r.step.lr, 0.0);
    assert_eq!(
        e.model().params,
        w0,
        "lr 0: the first step does not move the weights"
    );
    // Iteration 0 of log warmup is still the minimum: log(1) / log(10) = 0.
    assert_eq!(e.lr(), 0.0);
    let r = e
        .train_batch(&mut std::iter::once(batch(&mut rng, 1)))
        .unwrap();
    assert_eq!(r.step.lr, 0.0);
    assert_eq!(e.model().params, w0);
    // Iteration 1: 1e-3 * ln 2 / ln 10 (REFERENCE.md T5).
    assert!((e.lr() - 3.0103e-4).abs() < 1e-8, "{}", e.lr());
    let r = e
        .train_batch(&mut std::iter::once(batch(&mut rng, 1)))
        .unwrap();
    assert!((r.step.lr - 3.0103e-4).abs() < 1e-8);
    assert_ne!(e.model().params, w0);
}

#[test]
fn biases_and_norm_weights_do_not_decay() {
    // Two engines differing only in weight decay, one step from the same weights and batch:
    // the gradients are equal, so the no-decay group must end bitwise identical.
    let json = |wd: f64| {
        format!(
            r#"{{"train_batch_size": 1,
                "optimizer": {{"type": "AdamW", "params": {{"lr": 0.01, "weight_decay": {wd}}}}}}}"#
        )
    };
    let (mut a, _) = engine::<f32>(&json(0.0), 3);
    let (mut b, _) = engine::<f32>(&json(0.5), 3);
    let x = batch(&mut Rng::new(8), 1);
    a.train_batch(&mut std::iter::once(x.clone())).unwrap();
    b.train_batch(&mut std::iter::once(x.clone())).unwrap();
    for name in ["fc.bias", "ln_f.weight"] {
        assert_eq!(
            a.model().param(name),
            b.model().param(name),
            "{name} decayed"
        );
    }
    for name in ["wte.weight", "fc.weight", "lm_head.weight"] {
        assert_ne!(
            a.model().param(name),
            b.model().param(name),
            "{name} did not decay"
        );
    }
    // A custom rule that decays everything changes the bias too.
    let built = tiny_model::<f32>(3, true);
    let opts = EngineOptions {
        decay_rule: DecayRule::All,
        ..Default::default()
    };
    let mut c = Engine::initialize(built.model, &config(&json(0.5)), opts).unwrap();
    c.train_batch(&mut std::iter::once(x)).unwrap();
    assert_ne!(a.model().param("fc.bias"), c.model().param("fc.bias"));
}

#[test]
fn frozen_parameters_have_no_state_and_stay_put() {
    let built = tiny_model::<bf16>(4, false);
    let json = r#"{"train_batch_size": 2, "bf16": {"enabled": true},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.01}}}"#;
    let mut e = Engine::initialize(built.model, &config(json), EngineOptions::default()).unwrap();
    let frozen = e.model().param("ln_f.weight").unwrap().to_vec();
    let trainable = VOCAB * WIDTH * 2 + WIDTH * WIDTH + WIDTH;
    assert_eq!(e.flat_layout().numel, trainable);
    assert_eq!(e.grads().len(), trainable);
    assert_eq!(e.master_weights().len(), trainable);
    let mut rng = Rng::new(1);
    for _ in 0..3 {
        e.train_batch(&mut std::iter::once(batch(&mut rng, 2)))
            .unwrap();
    }
    assert_eq!(e.model().param("ln_f.weight").unwrap(), &frozen[..]);
    let bytes = e.model_state_bytes();
    assert_eq!(bytes, e.expected_model_state_bytes().unwrap());
    let all = (trainable + WIDTH) as u64;
    assert_eq!(bytes.weights, 2 * all);
    assert_eq!(bytes.grads, 4 * trainable as u64);
    assert_eq!(bytes.master, 4 * trainable as u64);
    assert_eq!(bytes.optimizer, 8 * trainable as u64);
}

#[test]
fn model_state_bytes_equal_the_memory_model_at_stage_0() {
    let n = (VOCAB * WIDTH * 2 + WIDTH * WIDTH + 2 * WIDTH) as u64;
    let cases: [(&str, &str, u64, u64, u64); 4] = [
        ("f32", r#""optimizer": {"type": "AdamW"}"#, 4, 0, 8),
        (
            "bf16",
            r#""bf16": {"enabled": true}, "optimizer": {"type": "Lion"}"#,
            2,
            4,
            4,
        ),
        (
            "f16",
            r#""fp16": {"enabled": true}, "optimizer": {"type": "SGD", "params": {"momentum": 0.9}}"#,
            2,
            4,
            4,
        ),
        ("f32", r#""optimizer": {"type": "SGD"}"#, 4, 0, 0),
    ];
    for (dtype, blocks, w, master, opt) in cases {
        let json = format!(r#"{{"train_batch_size": 1, {blocks}}}"#);
        let (bytes, expected) = match dtype {
            "f32" => {
                let (e, _) = engine::<f32>(&json, 1);
                (
                    e.model_state_bytes(),
                    e.expected_model_state_bytes().unwrap(),
                )
            }
            "bf16" => {
                let (e, _) = engine::<bf16>(&json, 1);
                (
                    e.model_state_bytes(),
                    e.expected_model_state_bytes().unwrap(),
                )
            }
            _ => {
                let (e, _) = engine::<f16>(&json, 1);
                (
                    e.model_state_bytes(),
                    e.expected_model_state_bytes().unwrap(),
                )
            }
        };
        assert_eq!(bytes, expected, "{blocks}");
        assert_eq!(bytes.weights, w * n, "{blocks}");
        assert_eq!(bytes.grads, 4 * n, "{blocks}");
        assert_eq!(bytes.master, master * n, "{blocks}");
        assert_eq!(bytes.optimizer, opt * n, "{blocks}");
    }
}

#[test]
fn config_and_model_dtype_must_agree() {
    let built = tiny_model::<f32>(1, true);
    let err = Engine::initialize(
        built.model,
        &config(
            r#"{"train_batch_size": 1, "bf16": {"enabled": true}, "optimizer": {"type": "Adam"}}"#,
        ),
        EngineOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("bf16") && err.contains("f32"), "{err}");
    let built = tiny_model::<f32>(1, true);
    let err = Engine::initialize(
        built.model,
        &config(r#"{"train_batch_size": 1}"#),
        EngineOptions::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("optimizer"), "{err}");
}

#[test]
fn a_partial_step_averages_the_micro_batches_it_has() {
    // gas 3, but the epoch's last step has 2 micro-batches: it must equal a gas-2 engine's step,
    // and the step after it must start at a boundary again.
    let opt = r#""optimizer": {"type": "AdamW", "params": {"lr": 0.01}}"#;
    let (mut three, _) = engine::<f32>(
        &format!(
            r#"{{"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 3, {opt}}}"#
        ),
        4,
    );
    let (mut two, _) = engine::<f32>(
        &format!(
            r#"{{"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2, {opt}}}"#
        ),
        4,
    );
    let mut rng = Rng::new(11);
    let (a, b) = (batch(&mut rng, 1), batch(&mut rng, 1));
    let r3 = three
        .train_partial_batch(vec![a.clone(), b.clone()])
        .unwrap();
    let r2 = two.train_batch(&mut vec![a, b].into_iter()).unwrap();
    assert_eq!(r3.loss, r2.loss);
    assert_eq!(r3.step.grad_norm, r2.step.grad_norm);
    assert_eq!(three.model().params, two.model().params);
    assert_eq!(three.global_steps(), 1);
    assert_eq!(
        three.micro_steps(),
        3,
        "the counter jumps to the next boundary"
    );
    assert_eq!(three.global_samples(), 2);
    // A full step follows normally.
    let full: Vec<_> = (0..3).map(|_| batch(&mut rng, 1)).collect();
    three.train_partial_batch(full).unwrap();
    assert_eq!((three.global_steps(), three.micro_steps()), (2, 6));
    for bad in [0usize, 4] {
        let batches: Vec<_> = (0..bad).map(|_| batch(&mut rng, 1)).collect();
        assert!(matches!(
            three.train_partial_batch(batches),
            Err(rustspeed::engine::EngineError::PartialStep { .. })
        ));
    }
}

#[test]
fn the_fallback_schedule_applies_only_without_a_scheduler_block() {
    use rustspeed::lr_schedule::{HfScheduleParams, HfScheduleType, LrScheduleParams};
    let options = || EngineOptions {
        fallback_schedule: Some(LrScheduleParams::Hf(HfScheduleParams {
            kind: HfScheduleType::Linear,
            warmup_steps: 2,
            total_steps: 4,
        })),
        ..EngineOptions::default()
    };
    let opt = r#""train_batch_size": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}"#;
    let built = tiny_model::<f32>(5, true);
    let mut e = Engine::initialize(built.model, &config(&format!("{{{opt}}}")), options()).unwrap();
    let mut rng = Rng::new(1);
    let mut lrs = Vec::new();
    for _ in 0..4 {
        lrs.push(
            e.train_batch(&mut std::iter::once(batch(&mut rng, 1)))
                .unwrap()
                .step
                .lr,
        );
    }
    let want = [0.0, 0.05, 0.1, 0.05];
    for (g, w) in lrs.iter().zip(want) {
        assert!((g - w).abs() < 1e-12, "{lrs:?} vs {want:?}");
    }
    // The config's own scheduler wins.
    let with_block = format!(
        r#"{{{opt}, "scheduler": {{"type": "WarmupLR", "params": {{"warmup_min_lr": 0.01, "warmup_max_lr": 0.1, "warmup_num_steps": 10}}}}}}"#
    );
    let built = tiny_model::<f32>(5, true);
    let mut e = Engine::initialize(built.model, &config(&with_block), options()).unwrap();
    let r = e
        .train_batch(&mut std::iter::once(batch(&mut rng, 1)))
        .unwrap();
    assert!((r.step.lr - 0.01).abs() < 1e-12);
}
