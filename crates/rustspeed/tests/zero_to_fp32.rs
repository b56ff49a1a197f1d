//! REFERENCE §5 T10 (DeepSpeed's `TestZeroToFP32`): a 53-element model, 4 Linear(3,3) and a
//! Linear(4,1), trained at ZeRO stages 2 and 3 over 2 ranks (the odd count exercises the padding
//! to 2 * world = 56 at stage 2, each parameter's own ceil(numel / 2) at stage 3), saved, and
//! consolidated: the fp32 state equals the live fp32 parameters
//! (the gathered fp32 masters in bf16 training, the model's own weights in f32 training), with
//! and without a frozen layer. A parameter list that does not match the partitions is
//! DeepSpeed's "consumed X numels out of Y" error.

mod common;

use common::{config_for_world, on_ranks, scratch_dir, Rng};
use half::bf16;
use rustspeed::consolidate::{consolidate_fp32, save_fp32_state, ConsolidateError};
use rustspeed::engine::Engine;
use rustspeed_kernels::{DType, Float};
use rustspeed_models::{Batch, Ctx, Flow, Layer, LossSum, Model, ParamSpec, IGNORE_INDEX};

const HIDDEN: usize = 3;

/// Token id -> three fixed features (no parameters).
struct Features;

impl<T: Float> Layer<T> for Features {
    fn name(&self) -> &str {
        "features"
    }
    fn own_params(&self) -> Vec<ParamSpec> {
        Vec::new()
    }
    fn forward(&mut self, _: &[&[T]], flow: &mut Flow<T>, ctx: &Ctx) {
        flow.hidden = ctx
            .batch
            .input_ids
            .iter()
            .flat_map(|&id| {
                let t = id as f32;
                [(t % 5.0) / 5.0 - 0.4, (t % 3.0) / 3.0 - 0.3, 0.5]
            })
            .map(T::from_f32)
            .collect();
    }
    fn backward(&mut self, _: &[&[T]], _: &mut [&mut [f32]], flow: &mut Flow<T>, _: &Ctx) {
        flow.hidden.clear();
    }
    fn clear(&mut self) {}
}

/// `y = tanh(x W^T + b)`, W `[out, in]`, in plain loops (3 x 3 needs no kernel).
struct Linear {
    name: String,
    frozen: bool,
    x: Vec<f32>,
    y: Vec<f32>,
}

impl<T: Float> Layer<T> for Linear {
    fn name(&self) -> &str {
        &self.name
    }
    fn own_params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::new(format!("{}.weight", self.name), &[HIDDEN, HIDDEN])
                .with_trainable(!self.frozen),
            ParamSpec::new(format!("{}.bias", self.name), &[HIDDEN]).with_trainable(!self.frozen),
        ]
    }
    fn forward(&mut self, p: &[&[T]], flow: &mut Flow<T>, _: &Ctx) {
        self.x = flow.hidden.iter().map(|v| v.to_f32()).collect();
        self.y = self
            .x
            .chunks(HIDDEN)
            .flat_map(|x| {
                (0..HIDDEN).map(move |o| {
                    let mut s = p[1][o].to_f32();
                    for (i, xi) in x.iter().enumerate() {
                        s += p[0][o * HIDDEN + i].to_f32() * xi;
                    }
                    s.tanh()
                })
            })
            .collect();
        flow.hidden = self.y.iter().map(|&v| T::from_f32(v)).collect();
    }
    fn backward(&mut self, p: &[&[T]], g: &mut [&mut [f32]], flow: &mut Flow<T>, _: &Ctx) {
        let mut dx = vec![0f32; self.x.len()];
        for (r, x) in self.x.chunks(HIDDEN).enumerate() {
            for o in 0..HIDDEN {
                let y = self.y[r * HIDDEN + o];
                let dz = flow.hidden[r * HIDDEN + o].to_f32() * (1.0 - y * y);
                g[1][o] += dz;
                for (i, xi) in x.iter().enumerate() {
                    g[0][o * HIDDEN + i] += dz * xi;
                    dx[r * HIDDEN + i] += dz * p[0][o * HIDDEN + i].to_f32();
                }
            }
        }
        flow.hidden = dx.into_iter().map(T::from_f32).collect();
    }
    fn clear(&mut self) {
        self.x.clear();
        self.y.clear();
    }
}

/// Linear(4, 1) on the hidden state and a constant 1, then half the squared error against
/// the label scaled into [0, 1); one "token" per label.
struct Head {
    x: Vec<f32>,
    err: Vec<f32>,
}

impl<T: Float> Layer<T> for Head {
    fn name(&self) -> &str {
        "head"
    }
    fn own_params(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::new("head.weight", &[1, HIDDEN + 1]),
            ParamSpec::new("head.bias", &[1]),
        ]
    }
    fn forward(&mut self, p: &[&[T]], flow: &mut Flow<T>, ctx: &Ctx) {
        self.x = flow.hidden.iter().map(|v| v.to_f32()).collect();
        self.err.clear();
        let mut loss = LossSum::default();
        for (x, &label) in self.x.chunks(HIDDEN).zip(&ctx.batch.labels) {
            let mut y = p[1][0].to_f32() + p[0][HIDDEN].to_f32();
            for (i, xi) in x.iter().enumerate() {
                y += p[0][i].to_f32() * xi;
            }
            let e = if label == IGNORE_INDEX {
                0.0
            } else {
                y - label as f32 / 32.0
            };
            if label != IGNORE_INDEX {
                loss.nll += 0.5 * (e as f64) * (e as f64);
                loss.tokens += 1;
            }
            self.err.push(e);
        }
        flow.loss = Some(loss);
    }
    fn backward(&mut self, p: &[&[T]], g: &mut [&mut [f32]], flow: &mut Flow<T>, ctx: &Ctx) {
        let mut dx = vec![0f32; self.x.len()];
        for (r, x) in self.x.chunks(HIDDEN).enumerate() {
            let dy = self.err[r] * ctx.grad_scale;
            g[1][0] += dy;
            g[0][HIDDEN] += dy;
            for (i, xi) in x.iter().enumerate() {
                g[0][i] += dy * xi;
                dx[r * HIDDEN + i] = dy * p[0][i].to_f32();
            }
        }
        flow.hidden = dx.into_iter().map(T::from_f32).collect();
    }
    fn clear(&mut self) {
        self.x.clear();
        self.err.clear();
    }
}

fn model<T: Float>(frozen_first: bool) -> Model<T> {
    let mut layers: Vec<Box<dyn Layer<T>>> = vec![Box::new(Features)];
    for i in 0..4 {
        layers.push(Box::new(Linear {
            name: format!("linears.{i}"),
            frozen: frozen_first && i == 0,
            x: Vec::new(),
            y: Vec::new(),
        }));
    }
    layers.push(Box::new(Head {
        x: Vec::new(),
        err: Vec::new(),
    }));
    let mut m = Model::new(layers).unwrap();
    let mut rng = Rng::new(7);
    for v in &mut m.params {
        *v = T::from_f32(rng.weight(0.8));
    }
    m
}

fn batch(rng: &mut Rng) -> Batch {
    let ids: Vec<u32> = (0..6).map(|_| (rng.next_u64() % 32) as u32).collect();
    let hf: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
    Batch::from_hf_labels(1, 6, ids, &hf)
}

const JSON: &str = r#"{"train_batch_size": 4, "train_micro_batch_size_per_gpu": 1,
    "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "weight_decay": 0.01}},
    "zero_optimization": {"stage": STAGE, "stage3_param_persistence_threshold": 0} PRECISION}"#;

/// Trains 3 steps on 2 ranks and saves into `dir`; returns every trainable parameter's live
/// fp32 value in flat order (gathered from both ranks' masters in 16-bit training) and the
/// model's weights.
fn train_and_save<T: Float>(
    precision: &str,
    frozen: bool,
    dir: &std::path::Path,
    stage: u8,
) -> Vec<f32> {
    let json = JSON
        .replace("PRECISION", precision)
        .replace("STAGE", &stage.to_string());
    let cfg = config_for_world(&json, 2);
    let mut rng = Rng::new(5);
    let data: Vec<Vec<Batch>> = (0..3)
        .map(|_| (0..4).map(|_| batch(&mut rng)).collect())
        .collect();
    type Placed = (std::ops::Range<usize>, usize);
    let pieces: Vec<(Vec<Placed>, Vec<f32>, Vec<f32>)> = on_ranks(2, |rank, options| {
        let mut e = Engine::initialize(model::<T>(frozen), &cfg, options).unwrap();
        for step in &data {
            e.train_partial_batch(step[rank * 2..rank * 2 + 2].to_vec())
                .unwrap();
        }
        e.save_checkpoint(dir, None, serde_json::json!({})).unwrap();
        let params = e
            .full_params()
            .unwrap()
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let ranges = match e.zero3_layout() {
            Some(z) => z.train_ranges(),
            None => vec![(e.optimizer().partition.clone(), 0)],
        };
        (ranges, e.master_weights().to_vec(), params)
    });
    let model_params = pieces[0].2.clone();
    if T::DTYPE == DType::F32 {
        return model_params;
    }
    let trainable = model::<T>(frozen).layout.trainable_numel();
    let mut flat = vec![f32::NAN; trainable];
    for (ranges, master, _) in &pieces {
        for (r, at) in ranges {
            flat[r.clone()].copy_from_slice(&master[*at..*at + r.len()]);
        }
    }
    assert!(
        flat.iter().all(|v| !v.is_nan()),
        "the ranks' pieces cover every element"
    );
    flat
}

fn check<T: Float>(precision: &str, frozen: bool, name: &str, stage: u8) {
    let dir = scratch_dir(name);
    let live = train_and_save::<T>(precision, frozen, &dir, stage);
    let state = consolidate_fp32(&dir, None).unwrap();
    assert_eq!(state.layout.numel(), 53);
    assert_eq!(state.zero_stage, stage);
    assert_eq!(state.world_size, 2);
    let reference = model::<T>(frozen);
    let trainable = reference.layout.trainable_numel();
    if T::DTYPE == DType::F32 {
        // Every parameter, frozen ones included, is the model's own fp32 weight.
        for slot in reference.layout.slots() {
            assert_eq!(
                state.get(&slot.spec.name).unwrap(),
                &live[slot.range()],
                "{}",
                slot.spec.name
            );
        }
    } else {
        assert_eq!(live.len(), trainable);
        assert_eq!(&state.params[..trainable], &live[..], "fp32 masters");
        // The masters moved away from the bf16 start: this is not a copy of the model file.
        assert!(state.params[..trainable]
            .iter()
            .any(|v| bf16::from_f32(*v).to_f32() != *v));
        for slot in reference
            .layout
            .slots()
            .iter()
            .filter(|s| !s.spec.trainable)
        {
            let init: Vec<f32> = reference.params[slot.range()]
                .iter()
                .map(|v| v.to_f32())
                .collect();
            assert_eq!(state.get(&slot.spec.name).unwrap(), &init[..]);
        }
    }

    // Written as HF weights, read back with the safetensors crate: same values, HF names.
    let out = dir.join("hf");
    save_fp32_state(&state, &out, DType::F32, usize::MAX).unwrap();
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), reference.layout.slots().len());
    let t = st.tensor("linears.3.weight").unwrap();
    assert_eq!(t.shape(), &[3, 3]);
    let got: Vec<f32> = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(got, state.get("linears.3.weight").unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn t10_stage2_world2_bf16_masters_consolidate_exactly() {
    check::<bf16>(r#", "bf16": {"enabled": true}"#, false, "t10-bf16", 2);
}

#[test]
fn t10_stage3_world2_bf16_masters_consolidate_exactly() {
    check::<bf16>(r#", "bf16": {"enabled": true}"#, false, "t10-z3-bf16", 3);
}

#[test]
fn t10_stage3_world2_bf16_with_a_frozen_layer() {
    check::<bf16>(
        r#", "bf16": {"enabled": true}"#,
        true,
        "t10-z3-bf16-frozen",
        3,
    );
}

#[test]
fn t10_stage3_world2_f32_pieces_are_the_master() {
    check::<f32>("", true, "t10-z3-f32", 3);
}

#[test]
fn t10_stage2_world2_bf16_with_a_frozen_layer() {
    check::<bf16>(r#", "bf16": {"enabled": true}"#, true, "t10-bf16-frozen", 2);
}

#[test]
fn t10_stage2_world2_f32_model_states_are_the_master() {
    check::<f32>("", false, "t10-f32", 2);
}

#[test]
fn a_parameter_list_that_does_not_match_the_partitions_is_the_consumed_error() {
    let dir = scratch_dir("t10-consumed");
    train_and_save::<bf16>(r#", "bf16": {"enabled": true}"#, false, &dir, 2);
    let tag = std::fs::read_to_string(dir.join("latest")).unwrap();
    let meta_path = dir.join(tag.trim()).join("mp_rank_00_model_states.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&meta_path).unwrap()).unwrap();
    // One parameter fewer than was saved: 48 of the 53 elements.
    meta["param_shapes"].as_array_mut().unwrap().pop();
    std::fs::write(&meta_path, meta.to_string()).unwrap();
    let err = match consolidate_fp32(&dir, None) {
        Err(e @ ConsolidateError::Consumed { .. }) => e.to_string(),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("a mismatched parameter list was consolidated"),
    };
    assert!(
        err.contains("consumed 52 numels out of 53 - something is wrong"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn sharding_writes_an_index_and_bf16_output_rounds() {
    let dir = scratch_dir("t10-shards");
    train_and_save::<bf16>(r#", "bf16": {"enabled": true}"#, false, &dir, 2);
    let state = consolidate_fp32(&dir, None).unwrap();
    let out = dir.join("hf");
    // A stale single file from an earlier run must not survive next to the shards.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("model.safetensors"), b"stale").unwrap();
    save_fp32_state(&state, &out, DType::BF16, 40).unwrap();
    assert!(!out.join("model.safetensors").exists());
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), 10);
    let file = map["head.weight"].as_str().unwrap();
    let bytes = std::fs::read(out.join(file)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("head.weight").unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::BF16);
    let got: Vec<f32> = t
        .data()
        .chunks_exact(2)
        .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect();
    let want: Vec<f32> = state
        .get("head.weight")
        .unwrap()
        .iter()
        .map(|v| bf16::from_f32(*v).to_f32())
        .collect();
    assert_eq!(got, want);
    std::fs::remove_dir_all(&dir).unwrap();
}
