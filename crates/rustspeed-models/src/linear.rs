//! A linear module as the blocks use it (GPT-2's Conv1D and the LLaMA family's Linear): a
//! weight that trains or is frozen, an optional bias, and an optional LoRA adapter
//! `y = x·W^T + b + scale · B(A(dropout(x)))` (PEFT's `lora.Linear`), forward and backward side
//! by side.
//!
//! The adapter's intermediate `u = dropout(x)·A^T` (`[rows, r]`) is recomputed in backward
//! rather than kept: it costs `rows·in·r` multiply-adds, what `dA` costs anyway, and the
//! dropout mask is regenerated from its key, so nothing beyond the block's own activations is
//! stored. Frozen weights get no `dW` matmul at all: that is a third of a linear layer's
//! backward, saved.

use std::sync::{Arc, OnceLock};

use rustspeed_kernels::dropout::{dropout_inplace, dropout_key};
use rustspeed_kernels::matmul::{
    column_sums_accumulate, linear_backward, linear_forward, matmul, LinearShape, WeightLayout,
};
use rustspeed_kernels::quant::{
    quant_linear_backward_input, quant_linear_forward, QuantConfig, QuantMatrix,
};
use rustspeed_kernels::residual::add_inplace;
use rustspeed_kernels::Float;

use crate::layer::Ctx;
use crate::params::ParamSpec;
use crate::tuning::{lora_a_name, lora_b_name, Tuning};

/// Dropout sites of LoRA adapters start here in a layer's numbering, clear of the block's own.
pub(crate) const LORA_SITE_BASE: u64 = 16;

/// Where a LoRA adapter's parameters sit in the layer's list, and its constants.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Lora {
    pub a: usize,
    pub b: usize,
    pub r: usize,
    pub scale: f32,
    pub dropout: f32,
    /// This adapter's dropout site within its layer.
    pub site: u64,
}

/// A frozen weight held quantized outside the flat parameter buffer, in `nn.Linear` layout
/// (`[out, in]`; a Conv1D weight is transposed when quantized). Filled once, when the weights
/// are loaded (see [`crate::model::Model::quantized`]).
pub type QuantSlot = Arc<OnceLock<QuantMatrix>>;

/// A quantized frozen weight to fill when loading: the checkpoint tensor `name` (shape as
/// stored: `[out, in]`, or `[in, out]` for a Conv1D, which is transposed before quantizing).
#[derive(Clone, Debug)]
pub struct QuantTarget {
    pub name: String,
    pub slot: QuantSlot,
    pub inp: usize,
    pub out: usize,
    pub layout: WeightLayout,
}

impl QuantTarget {
    /// The checkpoint's shape of the tensor.
    pub fn shape(&self) -> Vec<usize> {
        match self.layout {
            WeightLayout::OutIn => vec![self.out, self.inp],
            WeightLayout::InOut => vec![self.inp, self.out],
        }
    }

    /// Quantizes the checkpoint's values (in its layout) into the slot.
    pub fn fill(&self, values: &[f32], config: &QuantConfig) -> Result<(), String> {
        let owned;
        let w = match self.layout {
            WeightLayout::OutIn => values,
            WeightLayout::InOut => {
                let (inp, out) = (self.inp, self.out);
                let mut t = vec![0f32; values.len()];
                for i in 0..inp {
                    for o in 0..out {
                        t[o * inp + i] = values[i * out + o];
                    }
                }
                owned = t;
                &owned
            }
        };
        let q = QuantMatrix::try_quantize(w, self.out, self.inp, config)
            .map_err(|e| format!("`{}`: {e}", self.name))?;
        self.slot
            .set(q)
            .map_err(|_| format!("`{}` was loaded twice", self.name))
    }
}

/// The weight of a linear module.
#[derive(Clone, Debug)]
pub(crate) enum Weight {
    /// Index of the dense weight in the layer's parameter list.
    Dense(usize),
    /// A frozen quantized weight (QLoRA): forward and the input gradient dequantize a tile at a
    /// time; it has no gradient.
    Quant(QuantSlot),
}

/// One linear module of a layer: indices into the layer's parameter list and shapes.
#[derive(Clone, Debug)]
pub(crate) struct Linear {
    pub inp: usize,
    pub out: usize,
    pub layout: WeightLayout,
    /// The module's checkpoint name, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    pub weight: Weight,
    pub b: Option<usize>,
    pub train_w: bool,
    pub train_b: bool,
    pub lora: Option<Lora>,
}

impl Linear {
    /// Declares module `module`'s parameters in `specs` (weight, bias, then LoRA A and B when
    /// `tuning` gives it an adapter: PEFT's `named_parameters()` order) and returns where they
    /// are. `site` numbers the adapter's dropout within the layer.
    #[allow(clippy::too_many_arguments)]
    pub fn declare(
        specs: &mut Vec<ParamSpec>,
        module: &str,
        inp: usize,
        out: usize,
        layout: WeightLayout,
        bias: bool,
        tuning: &Tuning,
        site: u64,
    ) -> Linear {
        let mut push = |name: String, shape: &[usize]| {
            let mut spec = ParamSpec::new(name, shape);
            spec.trainable = tuning.trainable(&spec.name);
            specs.push(spec);
            (specs.len() - 1, specs[specs.len() - 1].trainable)
        };
        let w_shape = match layout {
            WeightLayout::OutIn => [out, inp],
            WeightLayout::InOut => [inp, out],
        };
        let w_name = format!("{module}.weight");
        let (weight, train_w) = match tuning.quantization() {
            // Quantize only what stays frozen: a trained weight needs its dense values.
            Some(_) if !tuning.trainable(&w_name) => (Weight::Quant(QuantSlot::default()), false),
            _ => {
                let (w, t) = push(w_name, &w_shape);
                (Weight::Dense(w), t)
            }
        };
        let (b, train_b) = if bias {
            let (i, t) = push(format!("{module}.bias"), &[out]);
            (Some(i), t)
        } else {
            (None, false)
        };
        let lora = tuning.lora_module(module).map(|m| {
            assert_eq!(
                (m.inp, m.out),
                (inp, out),
                "{module}: the adapter plan's shape disagrees with the model's"
            );
            let (a, _) = push(lora_a_name(module), &[m.r, inp]);
            let (b, _) = push(lora_b_name(module), &[out, m.r]);
            Lora {
                a,
                b,
                r: m.r,
                scale: m.scale,
                dropout: m.dropout,
                site: LORA_SITE_BASE + site,
            }
        });
        Linear {
            inp,
            out,
            layout,
            module: module.to_string(),
            weight,
            b,
            train_w,
            train_b,
            lora,
        }
    }

    /// What loading must fill when the weight is held quantized.
    pub fn quant_target(&self) -> Option<QuantTarget> {
        match &self.weight {
            Weight::Quant(slot) => Some(QuantTarget {
                name: format!("{}.weight", self.module),
                slot: slot.clone(),
                inp: self.inp,
                out: self.out,
                layout: self.layout,
            }),
            Weight::Dense(_) => None,
        }
    }

    /// The quantized weight, once loaded.
    fn quant(slot: &QuantSlot) -> &QuantMatrix {
        slot.get()
            .expect("a quantized weight is filled when the model's weights are loaded")
    }

    pub fn shape(&self, rows: usize) -> LinearShape {
        LinearShape {
            rows,
            in_features: self.inp,
            out_features: self.out,
            layout: self.layout,
        }
    }

    /// The adapter's dropout key when this call drops (training with `lora_dropout > 0`).
    fn lora_key(lora: &Lora, ctx: &Ctx, train: bool, layer: usize) -> Option<u64> {
        (train && lora.dropout > 0.0)
            .then(|| dropout_key(ctx.dropout_seed, layer as u64, lora.site))
    }

    /// `y = x·W^T + b + lora(x)`, or with `residual` the same added onto `y`. `layer` is the
    /// layer's index in the model (it keys the adapter's dropout mask, as the block's own).
    #[allow(clippy::too_many_arguments)]
    pub fn forward<T: Float>(
        &self,
        y: &mut [T],
        x: &[T],
        params: &[&[T]],
        rows: usize,
        residual: bool,
        ctx: &Ctx,
        layer: usize,
    ) {
        let bias = self.b.map(|i| params[i]);
        let w = match &self.weight {
            Weight::Dense(w) => *w,
            Weight::Quant(q) => {
                quant_linear_forward(y, x, Self::quant(q), bias, rows, residual);
                self.lora_forward(y, x, params, rows, ctx, layer);
                return;
            }
        };
        if residual {
            if let Some(b) = bias {
                for row in y.chunks_exact_mut(self.out) {
                    add_inplace(row, b);
                }
            }
            // Accumulating onto the residual stream rounds the branch once, with the sum.
            matmul(
                y,
                x,
                params[w],
                rows,
                self.inp,
                self.out,
                false,
                self.layout == WeightLayout::OutIn,
                true,
            );
        } else {
            linear_forward(y, x, params[w], bias, self.shape(rows));
        }
        self.lora_forward(y, x, params, rows, ctx, layer);
    }

    /// `y += lora(x)` when the module has an adapter.
    fn lora_forward<T: Float>(
        &self,
        y: &mut [T],
        x: &[T],
        params: &[&[T]],
        rows: usize,
        ctx: &Ctx,
        layer: usize,
    ) {
        if let Some(lora) = &self.lora {
            let key = Self::lora_key(lora, ctx, ctx.train, layer);
            let (u, _) = self.lora_down(lora, x, params, rows, key);
            // y += (scale·u)·B^T with B [out, r].
            matmul(
                y,
                &u,
                params[lora.b],
                rows,
                lora.r,
                self.out,
                false,
                true,
                true,
            );
        }
    }

    /// `scale · dropout(x)·A^T` (f32 `[rows, r]`) and the dropped input when dropout applied.
    fn lora_down<T: Float>(
        &self,
        lora: &Lora,
        x: &[T],
        params: &[&[T]],
        rows: usize,
        key: Option<u64>,
    ) -> (Vec<f32>, Option<Vec<T>>) {
        let dropped = key.map(|key| {
            let mut xd = x.to_vec();
            dropout_inplace(&mut xd, lora.dropout, key, 0);
            xd
        });
        let xd = dropped.as_deref().unwrap_or(x);
        let mut u = vec![0f32; rows * lora.r];
        matmul(
            &mut u,
            xd,
            params[lora.a],
            rows,
            self.inp,
            lora.r,
            false,
            true,
            false,
        );
        u.iter_mut().for_each(|v| *v *= lora.scale);
        (u, dropped)
    }

    /// Backward of [`Linear::forward`] (a training forward): parameter gradients of the trainable
    /// parameters accumulate into `grads` (the layer's views); `dx`, when wanted, is overwritten
    /// or, with `accumulate_dx`, added to.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: Float>(
        &self,
        mut dx: Option<&mut [T]>,
        accumulate_dx: bool,
        dy: &[T],
        x: &[T],
        params: &[&[T]],
        grads: &mut [&mut [f32]],
        rows: usize,
        ctx: &Ctx,
        layer: usize,
    ) {
        match &self.weight {
            Weight::Dense(w) => {
                let w = *w;
                let mut dw = self.train_w.then(|| std::mem::take(&mut grads[w]));
                let mut db = match self.b {
                    Some(i) if self.train_b => Some(std::mem::take(&mut grads[i])),
                    _ => None,
                };
                linear_backward(
                    dx.as_deref_mut(),
                    accumulate_dx,
                    dw.as_deref_mut(),
                    db.as_deref_mut(),
                    dy,
                    x,
                    params[w],
                    self.shape(rows),
                );
                if let Some(dw) = dw {
                    grads[w] = dw;
                }
                if let (Some(i), Some(db)) = (self.b, db) {
                    grads[i] = db;
                }
            }
            Weight::Quant(q) => {
                if let Some(dx) = dx.as_deref_mut() {
                    quant_linear_backward_input(dx, dy, Self::quant(q), rows, accumulate_dx);
                }
                if let Some(i) = self.b.filter(|_| self.train_b) {
                    column_sums_accumulate(&mut *grads[i], dy, rows, self.out);
                }
            }
        }
        let Some(lora) = &self.lora else {
            return;
        };
        let (r, s) = (lora.r, lora.scale);
        let key = Self::lora_key(lora, ctx, true, layer);
        let (su, dropped) = self.lora_down(lora, x, params, rows, key);
        let xd = dropped.as_deref().unwrap_or(x);
        // dB[out, r] += dy^T · (s·u)
        matmul(
            &mut *grads[lora.b],
            dy,
            &su,
            self.out,
            rows,
            r,
            true,
            false,
            true,
        );
        // du[rows, r] = s · dy · B
        let mut du = vec![0f32; rows * r];
        matmul(
            &mut du,
            dy,
            params[lora.b],
            rows,
            self.out,
            r,
            false,
            false,
            false,
        );
        du.iter_mut().for_each(|v| *v *= s);
        // dA[r, in] += du^T · dropout(x)
        matmul(
            &mut *grads[lora.a],
            &du,
            xd,
            r,
            rows,
            self.inp,
            true,
            false,
            true,
        );
        let Some(dx) = dx else {
            return;
        };
        match key {
            // dx += du · A
            None => matmul(
                dx,
                &du,
                params[lora.a],
                rows,
                r,
                self.inp,
                false,
                false,
                true,
            ),
            Some(key) => {
                let mut dxd = vec![0f32; rows * self.inp];
                matmul(
                    &mut dxd,
                    &du,
                    params[lora.a],
                    rows,
                    r,
                    self.inp,
                    false,
                    false,
                    false,
                );
                dropout_inplace(&mut dxd, lora.dropout, key, 0);
                for (d, g) in dx.iter_mut().zip(&dxd) {
                    *d = T::from_f32(d.to_f32() + g);
                }
            }
        }
    }
}

/// The gradient view of parameter `i` when it trains.
pub(crate) fn grad_if<'a>(
    grads: &'a mut [&mut [f32]],
    i: usize,
    trainable: bool,
) -> Option<&'a mut [f32]> {
    if trainable {
        Some(&mut *grads[i])
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::NormalRng;
    use crate::layer::Batch;

    fn randn(rng: &mut NormalRng, n: usize, s: f64) -> Vec<f32> {
        (0..n).map(|_| (rng.normal() * s) as f32).collect()
    }

    /// `sum(y * g)` for a fixed `g`, so its gradient with respect to y is `g`.
    fn objective(lin: &Linear, x: &[f32], params: &[Vec<f32>], g: &[f32], ctx: &Ctx) -> f64 {
        let views: Vec<&[f32]> = params.iter().map(|p| p.as_slice()).collect();
        let mut y = vec![0f32; g.len()];
        lin.forward(&mut y, x, &views, x.len() / lin.inp, false, ctx, 3);
        y.iter()
            .zip(g)
            .map(|(a, b)| (*a as f64) * (*b as f64))
            .sum()
    }

    fn check(layout: WeightLayout, dropout: f32, train_w: bool) {
        let (rows, inp, out, r) = (6, 5, 4, 3);
        let lin = Linear {
            inp,
            out,
            layout,
            module: "m".into(),
            weight: Weight::Dense(0),
            b: Some(1),
            train_w,
            train_b: true,
            lora: Some(Lora {
                a: 2,
                b: 3,
                r,
                scale: 1.7,
                dropout,
                site: LORA_SITE_BASE,
            }),
        };
        let mut rng = NormalRng::new(5);
        let mut params = vec![
            randn(&mut rng, inp * out, 0.5),
            randn(&mut rng, out, 0.5),
            randn(&mut rng, r * inp, 0.5),
            randn(&mut rng, out * r, 0.5),
        ];
        let mut x = randn(&mut rng, rows * inp, 1.0);
        let g = randn(&mut rng, rows * out, 1.0);
        let batch = Batch::default();
        let ctx = Ctx {
            batch: &batch,
            train: true,
            dropout_seed: 77,
            grad_scale: 1.0,
        };
        let mut grads: Vec<Vec<f32>> = params.iter().map(|p| vec![0f32; p.len()]).collect();
        let mut dx = vec![0f32; x.len()];
        {
            let views: Vec<&[f32]> = params.iter().map(|p| p.as_slice()).collect();
            let mut gviews: Vec<&mut [f32]> = grads.iter_mut().map(|v| v.as_mut_slice()).collect();
            lin.backward(
                Some(&mut dx),
                false,
                &g,
                &x,
                &views,
                &mut gviews,
                rows,
                &ctx,
                3,
            );
        }
        if !train_w {
            assert!(
                grads[0].iter().all(|&v| v == 0.0),
                "a frozen weight gets no gradient"
            );
        }
        let eps = 1e-2f32;
        let check_one = |name: &str, analytic: &[f32], get: &mut dyn FnMut(usize, f32) -> f64| {
            for (i, &a) in analytic.iter().enumerate() {
                let numeric = (get(i, eps) - get(i, -eps)) / (2.0 * eps as f64);
                assert!(
                    (a as f64 - numeric).abs() < 2e-3 * (1.0 + numeric.abs()),
                    "{layout:?} p={dropout} {name}[{i}]: analytic {a} numeric {numeric}"
                );
            }
        };
        for k in 0..4 {
            if k == 0 && !train_w {
                continue;
            }
            let analytic = grads[k].clone();
            let mut get = |i: usize, e: f32| {
                let orig = params[k][i];
                params[k][i] = orig + e;
                let v = objective(&lin, &x, &params, &g, &ctx);
                params[k][i] = orig;
                v
            };
            check_one(["W", "b", "A", "B"][k], &analytic, &mut get);
        }
        let mut get = |i: usize, e: f32| {
            let orig = x[i];
            x[i] = orig + e;
            let v = objective(&lin, &x, &params, &g, &ctx);
            x[i] = orig;
            v
        };
        check_one("x", &dx, &mut get);
    }

    #[test]
    fn lora_linear_gradients_match_finite_differences() {
        for layout in [WeightLayout::OutIn, WeightLayout::InOut] {
            check(layout, 0.0, true);
            check(layout, 0.4, false);
        }
    }

    #[test]
    fn lora_dropout_is_off_in_evaluation() {
        let lin = Linear {
            inp: 2,
            out: 2,
            layout: WeightLayout::OutIn,
            module: "m".into(),
            weight: Weight::Dense(0),
            b: None,
            train_w: false,
            train_b: false,
            lora: Some(Lora {
                a: 1,
                b: 2,
                r: 1,
                scale: 1.0,
                dropout: 0.5,
                site: LORA_SITE_BASE,
            }),
        };
        let params: Vec<&[f32]> = vec![&[1.0, 0.0, 0.0, 1.0], &[1.0, 1.0], &[1.0, -1.0]];
        let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let batch = Batch::default();
        let mut ctx = Ctx {
            batch: &batch,
            train: false,
            dropout_seed: 1,
            grad_scale: 1.0,
        };
        let mut y = [0f32; 8];
        lin.forward(&mut y, &x, &params, 4, false, &ctx, 1);
        // y = x + (x0 + x1) * [1, -1]
        assert_eq!(y, [4.0, -1.0, 10.0, -3.0, 16.0, -5.0, 22.0, -7.0]);
        ctx.train = true;
        let mut yt = [0f32; 8];
        lin.forward(&mut yt, &x, &params, 4, false, &ctx, 1);
        assert_ne!(y, yt, "training drops the adapter's input");
    }
}
