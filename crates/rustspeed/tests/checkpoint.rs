//! Checkpoints: exact resume, DeepSpeed's layout, missing `latest`, leftovers of a killed
//! save, and incompatible checkpoints.

mod common;

use common::*;
use half::bf16;
use rustspeed::checkpoint::{optim_states_file, MODEL_META, MODEL_STATES};
use rustspeed::engine::{Engine, EngineOptions};
use rustspeed_kernels::Float;
use serde_json::json;

const CFG: &str = r#"{"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 0.02, "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 10, "warmup_num_steps": 3, "warmup_max_lr": 0.02}}}"#;

fn fresh<T: Float>(json: &str) -> Engine<T> {
    let built = tiny_model::<T>(17, true);
    Engine::initialize(built.model, &config(json), EngineOptions::default()).unwrap()
}

fn data() -> Vec<rustspeed_models::Batch> {
    let mut rng = Rng::new(99);
    (0..12).map(|_| batch(&mut rng, 1)).collect()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn resume_is_exact<T: Float>(json: &str, name: &str) {
    let data = data();
    let mut straight = fresh::<T>(json);
    let mut it = data.clone().into_iter();
    let losses: Vec<f32> = (0..6)
        .map(|_| straight.train_batch(&mut it).unwrap().loss)
        .collect();

    let dir = scratch_dir(name);
    let mut first = fresh::<T>(json);
    let mut it = data.into_iter();
    let mut resumed: Vec<f32> = (0..3)
        .map(|_| first.train_batch(&mut it).unwrap().loss)
        .collect();
    let path = first
        .save_checkpoint(&dir, None, json!({"data_position": 6}))
        .unwrap();
    assert!(path.ends_with("global_step3"));
    drop(first);

    let mut second = fresh::<T>(json);
    let client = second.load_checkpoint(&dir, None).unwrap().unwrap();
    assert_eq!(client, json!({"data_position": 6}));
    assert_eq!(second.global_steps(), 3);
    assert_eq!(second.micro_steps(), 6);
    resumed.extend((0..3).map(|_| second.train_batch(&mut it).unwrap().loss));

    assert_eq!(
        bits(&losses),
        bits(&resumed),
        "losses {losses:?} vs {resumed:?}"
    );
    assert_eq!(
        bits(&f32s(&straight.model().params)),
        bits(&f32s(&second.model().params)),
        "weights"
    );
    assert_eq!(
        bits(straight.master_weights()),
        bits(second.master_weights())
    );
    for (a, b) in straight
        .optimizer()
        .states
        .iter()
        .zip(&second.optimizer().states)
    {
        assert_eq!(bits(a), bits(b), "optimizer state");
    }
    assert_eq!(straight.lr(), second.lr());
    assert_eq!(straight.global_samples(), second.global_samples());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn n_steps_equal_half_save_load_half_bitwise_fp32() {
    resume_is_exact::<f32>(CFG, "resume-f32");
}

#[test]
fn n_steps_equal_half_save_load_half_bitwise_bf16() {
    let json = CFG.replacen('{', r#"{"bf16": {"enabled": true},"#, 1);
    resume_is_exact::<bf16>(&json, "resume-bf16");
}

#[test]
fn layout_is_deepspeeds_with_safetensors_and_json() {
    let dir = scratch_dir("layout");
    let mut e = fresh::<f32>(CFG);
    e.train_batch(&mut data().into_iter()).unwrap();
    e.save_checkpoint(&dir, None, json!({})).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("latest")).unwrap(),
        "global_step1"
    );
    let tag = dir.join("global_step1");
    for f in [
        MODEL_STATES.to_string(),
        MODEL_META.to_string(),
        optim_states_file(0),
    ] {
        assert!(tag.join(&f).is_file(), "{f} missing");
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tag.join(MODEL_META)).unwrap()).unwrap();
    assert_eq!(meta["global_steps"], 1);
    assert_eq!(meta["skipped_steps"], 0);
    assert_eq!(meta["global_samples"], 2);
    assert_eq!(meta["optimizer"], "adamw");
    assert_eq!(meta["lr_scheduler"]["last_batch_iteration"], 0);
    assert_eq!(meta["param_shapes"][0]["name"], "wte.weight");
    assert_eq!(meta["param_shapes"][0]["shape"], json!([VOCAB, WIDTH]));
    assert!(meta["ds_version"]
        .as_str()
        .unwrap()
        .starts_with("rustspeed "));
    assert_eq!(meta["ds_config"]["gradient_clipping"], 1.0);
    let bytes = std::fs::read(tag.join(MODEL_STATES)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let wte = st.tensor("wte.weight").unwrap();
    assert_eq!(wte.shape(), &[VOCAB, WIDTH]);
    let bytes = std::fs::read(tag.join(optim_states_file(0))).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names = st.names();
    names.sort();
    assert_eq!(names, ["exp_avg", "exp_avg_sq"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_latest_is_ok_none_and_a_killed_save_is_ignored() {
    let dir = scratch_dir("latest");
    let mut e = fresh::<f32>(CFG);
    assert_eq!(e.load_checkpoint(&dir, None).unwrap(), None);
    assert_eq!(e.global_steps(), 0);
    e.train_batch(&mut data().into_iter()).unwrap();
    let w1 = e.model().params.clone();
    e.save_checkpoint(&dir, None, json!({"k": 1})).unwrap();
    // A later save killed midway: its temporary directory holds garbage.
    std::fs::create_dir_all(dir.join(".global_step2.tmp")).unwrap();
    std::fs::write(dir.join(".global_step2.tmp").join(MODEL_STATES), b"garbage").unwrap();
    let mut f = fresh::<f32>(CFG);
    assert_eq!(
        f.load_checkpoint(&dir, None).unwrap(),
        Some(json!({"k": 1}))
    );
    assert_eq!(f.model().params, w1);
    // An explicit tag that does not exist is an error naming it.
    let err = f
        .load_checkpoint(&dir, Some("global_step9"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("global_step9"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn incompatible_checkpoints_name_the_mismatch() {
    let dir = scratch_dir("mismatch");
    let e = fresh::<f32>(CFG);
    e.save_checkpoint(&dir, Some("t"), json!(null)).unwrap();

    // Another optimizer.
    let sgd = CFG.replace(r#""type": "AdamW""#, r#""type": "SGD""#);
    let mut other = fresh::<f32>(&sgd);
    let before = other.model().params.clone();
    let err = other
        .load_checkpoint(&dir, Some("t"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("adamw") && err.contains("sgd"), "{err}");
    assert_eq!(
        other.model().params,
        before,
        "a failed load changes nothing"
    );

    // Another model: ln_f frozen moves a parameter from trainable to frozen.
    let built = tiny_model::<f32>(17, false);
    let mut frozen =
        Engine::initialize(built.model, &config(CFG), EngineOptions::default()).unwrap();
    let err = frozen
        .load_checkpoint(&dir, Some("t"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("ln_f.weight"), "{err}");

    // Another dtype.
    let mut half = fresh::<bf16>(&CFG.replacen('{', r#"{"bf16": {"enabled": true},"#, 1));
    let err = half
        .load_checkpoint(&dir, Some("t"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("bf16") && err.contains("f32"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// REFERENCE T11's variants of `load_checkpoint`: `load_module_only`, `load_optimizer_states=
/// False` and `load_lr_scheduler_states=False` (and ZeRO's `load_from_fp32_weights: false`), each restoring what DeepSpeed's does and leaving
/// the rest of the engine as it was. bf16 so the masters (fp32) and weights (bf16) differ.
#[test]
fn load_module_only_and_without_optimizer_or_scheduler_states() {
    use rustspeed::engine::LoadOptions;
    let json = CFG.replacen('{', r#"{"bf16": {"enabled": true},"#, 1);
    let dir = scratch_dir("load-options");
    let mut saved = fresh::<bf16>(&json);
    let mut it = data().into_iter();
    for _ in 0..3 {
        saved.train_batch(&mut it).unwrap();
    }
    saved.save_checkpoint(&dir, None, json!({"k": 3})).unwrap();
    let weights_as_f32: Vec<f32> = f32s(&saved.model().params);
    assert_ne!(
        bits(saved.master_weights()),
        bits(&weights_as_f32),
        "bf16 weights round the masters"
    );
    let untouched = fresh::<bf16>(&json);
    let zero_state = untouched.optimizer().states.clone();
    let lr0 = untouched.lr();
    let load = |opts: LoadOptions| {
        let mut e = fresh::<bf16>(&json);
        let client = e.load_checkpoint_with(&dir, None, opts).unwrap();
        assert_eq!(client, Some(json!({"k": 3})));
        assert_eq!(
            e.model().params,
            saved.model().params,
            "weights always load"
        );
        e
    };

    // Weights only: masters from the weights, counters/scheduler/optimizer as they were.
    let e = load(LoadOptions {
        module_only: true,
        ..LoadOptions::default()
    });
    assert_eq!(bits(e.master_weights()), bits(&weights_as_f32));
    assert_eq!(
        (e.global_steps(), e.micro_steps(), e.global_samples()),
        (0, 0, 0)
    );
    assert_eq!(e.optimizer().states, zero_state);
    assert_eq!(e.lr(), lr0);

    // Without optimizer states: counters and scheduler load, masters follow the weights.
    let e = load(LoadOptions {
        optimizer_states: false,
        ..LoadOptions::default()
    });
    assert_eq!(bits(e.master_weights()), bits(&weights_as_f32));
    assert_eq!(e.global_steps(), 3);
    assert_eq!(e.lr(), saved.lr());
    assert_eq!(e.optimizer().states, zero_state);

    // Without scheduler states: everything but the scheduler's position.
    let e = load(LoadOptions {
        lr_scheduler_states: false,
        ..LoadOptions::default()
    });
    assert_eq!(bits(e.master_weights()), bits(saved.master_weights()));
    assert_eq!(e.optimizer().states, saved.optimizer().states);
    assert_eq!(e.global_steps(), 3);
    assert_eq!(e.lr(), lr0);
    assert_ne!(lr0, saved.lr(), "the warmup moved the saved lr");

    // ZeRO's `load_from_fp32_weights: false`: optimizer state loads, masters from the weights.
    let bit16 = json.replacen(
        '{',
        r#"{"zero_optimization": {"stage": 1, "load_from_fp32_weights": false},"#,
        1,
    );
    let mut e = fresh::<bf16>(&bit16);
    e.load_checkpoint(&dir, None).unwrap();
    assert_eq!(bits(e.master_weights()), bits(&weights_as_f32));
    assert_eq!(e.optimizer().states, saved.optimizer().states);
    assert_eq!(e.global_steps(), 3);

    // An optimizer the checkpoint does not have is fine when its state is not loaded.
    let sgd = json.replace(
        r#""type": "AdamW", "params": {"lr": 0.02, "weight_decay": 0.1}"#,
        r#""type": "SGD", "params": {"lr": 0.02}"#,
    );
    assert_ne!(sgd, json);
    let mut e = fresh::<bf16>(&sgd);
    assert!(e.load_checkpoint(&dir, None).is_err(), "optimizer mismatch");
    e.load_checkpoint_with(
        &dir,
        None,
        LoadOptions {
            module_only: true,
            ..LoadOptions::default()
        },
    )
    .unwrap();
    assert_eq!(e.model().params, saved.model().params);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// T11's edge cases: a save right after initialization, and one between the micro-batches of
/// an accumulation (the partial gradient is not part of a checkpoint, as in DeepSpeed): loading
/// gives the saved weights, optimizer state and micro-step, with the accumulation restarted.
#[test]
fn immediate_save_and_save_inside_an_accumulation_round_trip() {
    let dir = scratch_dir("edge-saves");
    let e = fresh::<f32>(CFG);
    e.save_checkpoint(&dir, Some("init"), json!(null)).unwrap();
    let mut f = fresh::<f32>(CFG);
    f.load_checkpoint(&dir, Some("init")).unwrap();
    assert_eq!(f.model().params, e.model().params);
    assert_eq!((f.global_steps(), f.micro_steps()), (0, 0));

    let mut e = fresh::<f32>(CFG);
    let mut it = data().into_iter();
    e.train_batch(&mut it).unwrap();
    let b = it.next().unwrap();
    e.forward(&b).unwrap();
    e.backward().unwrap();
    assert!(
        e.step().unwrap().is_none(),
        "the first of two micro-batches"
    );
    assert!(e.grads().iter().any(|&g| g != 0.0), "a partial gradient");
    e.save_checkpoint(&dir, Some("mid"), json!(null)).unwrap();
    let mut f = fresh::<f32>(CFG);
    f.load_checkpoint(&dir, Some("mid")).unwrap();
    assert_eq!(f.model().params, e.model().params);
    assert_eq!(f.optimizer().states, e.optimizer().states);
    assert_eq!(f.micro_steps(), e.micro_steps());
    assert_eq!(f.global_steps(), 1);
    assert!(f.grads().iter().all(|&g| g == 0.0), "accumulation restarts");
    std::fs::remove_dir_all(&dir).unwrap();
}
