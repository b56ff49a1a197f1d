//! The trained parameters of prompt learning and what they produce: the prompt rows, `[n,
//! width]`, that prompt tuning and P-tuning put before the tokens (width = hidden size) and
//! prefix tuning splits into per-layer keys and values (width = num_layers * 2 * token_dim).
//!
//! Three forms, as in PEFT: the rows themselves (`prompt_embeddings`: prompt tuning, prefix
//! tuning without projection, and any adapter loaded as PEFT saves it), P-tuning's
//! `PromptEncoder` over a trained embedding (MLP: Linear, ReLU, Linear, ReLU, Linear; or LSTM: a
//! bidirectional LSTM then Linear, ReLU, Linear), and the prefix projection (Linear, Tanh,
//! Linear). The encoders are tiny (`n` rows), so they run in
//! f32 on every forward, and backward recomputes their activations instead of keeping them.

use rustspeed_kernels::matmul::{linear_backward, linear_forward, LinearShape, WeightLayout};
use rustspeed_kernels::Float;

use super::lstm::{self, LstmActs};
use super::prompt::PROMPT_EMBEDDINGS;
use super::prompt_config::{PromptKind, PromptTuningConfig};
use crate::init::{name_hash, NormalRng};
use crate::params::ParamSpec;

/// The embedding an encoder reads (PEFT: `prompt_encoder.default.embedding.weight`).
pub const ENCODER_EMBEDDING: &str = "prompt_encoder.embedding.weight";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Act {
    Relu,
    Tanh,
}

/// One Linear of an encoder: `[out, in]` weight and `[out]` bias, named as PEFT's module.
#[derive(Clone, Debug, PartialEq)]
struct EncLinear {
    module: String,
    inp: usize,
    out: usize,
}

/// How the prompt rows come from the parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct PromptPlan {
    pub kind: PromptKind,
    /// Virtual tokens (rows).
    pub n: usize,
    /// Width of a row.
    pub width: usize,
    /// Width of the encoder's embedding (its first Linear's input).
    embed_dim: usize,
    /// P-tuning's LSTM before the Linears: (layers, hidden size).
    lstm: Option<(usize, usize)>,
    /// The encoder's Linears, activation `act` between consecutive ones; empty without one.
    linears: Vec<EncLinear>,
    act: Act,
}

impl PromptPlan {
    /// The plan of `cfg` (token_dim, num_layers filled in by `Tuning::prompt`).
    pub fn new(cfg: &PromptTuningConfig) -> PromptPlan {
        let td = cfg.token_dim.expect("token_dim is filled from the model");
        let layers = cfg.num_layers.expect("num_layers is filled from the model");
        let hidden = cfg.encoder_hidden_size.unwrap_or(td);
        let n = cfg.num_virtual_tokens;
        let lin = |module: &str, inp, out| EncLinear {
            module: format!("prompt_encoder.{module}"),
            inp,
            out,
        };
        let lstm = (cfg.kind == PromptKind::PTuning && cfg.lstm && cfg.has_encoder())
            .then_some((cfg.encoder_num_layers, hidden));
        let (width, linears, act) = match cfg.kind {
            PromptKind::PromptTuning => (td, vec![], Act::Relu),
            PromptKind::PTuning if lstm.is_some() => (
                td,
                vec![
                    lin("mlp_head.0", 2 * hidden, 2 * hidden),
                    lin("mlp_head.2", 2 * hidden, td),
                ],
                Act::Relu,
            ),
            PromptKind::PTuning => (
                td,
                vec![
                    lin("mlp_head.0", td, hidden),
                    lin("mlp_head.2", hidden, hidden),
                    lin("mlp_head.4", hidden, td),
                ],
                Act::Relu,
            ),
            PromptKind::PrefixTuning => {
                let w = layers * 2 * td;
                let linears = if cfg.prefix_projection {
                    vec![
                        lin("transform.0", td, hidden),
                        lin("transform.2", hidden, w),
                    ]
                } else {
                    vec![]
                };
                (w, linears, Act::Tanh)
            }
        };
        let linears = if cfg.has_encoder() { linears } else { vec![] };
        PromptPlan {
            kind: cfg.kind,
            n,
            width,
            embed_dim: if linears.is_empty() { width } else { td },
            lstm,
            linears,
            act,
        }
    }

    pub fn has_encoder(&self) -> bool {
        !self.linears.is_empty()
    }

    /// The parameters in PEFT's order (all trainable).
    pub fn specs(&self) -> Vec<ParamSpec> {
        if !self.has_encoder() {
            return vec![ParamSpec::new(PROMPT_EMBEDDINGS, &[self.n, self.width])];
        }
        let mut specs = vec![ParamSpec::new(ENCODER_EMBEDDING, &[self.n, self.embed_dim])];
        if let Some((layers, h)) = self.lstm {
            for (name, shape) in lstm::param_shapes(layers, self.embed_dim, h) {
                specs.push(ParamSpec::new(
                    format!("prompt_encoder.lstm_head.{name}"),
                    &shape,
                ));
            }
        }
        for l in &self.linears {
            specs.push(ParamSpec::new(
                format!("{}.weight", l.module),
                &[l.out, l.inp],
            ));
            specs.push(ParamSpec::new(format!("{}.bias", l.module), &[l.out]));
        }
        specs
    }

    /// The prompt rows `[n, width]` from the plan's parameters (`params` holds exactly them,
    /// in [`PromptPlan::specs`] order).
    pub fn rows<T: Float>(&self, params: &[&[T]]) -> Vec<f32> {
        self.run(params).rows
    }

    /// Index of the first Linear's weight among the parameters.
    fn first_linear(&self) -> usize {
        1 + self.lstm.map_or(0, |(layers, _)| 8 * layers)
    }

    fn lstm_params<T: Float>(&self, params: &[&[T]]) -> Vec<Vec<f32>> {
        params[1..self.first_linear()]
            .iter()
            .map(|p| p.iter().map(|v| v.to_f32()).collect())
            .collect()
    }

    /// Runs the encoder, keeping what backward needs.
    fn run<T: Float>(&self, params: &[&[T]]) -> Run {
        let f32s = |x: &[T]| x.iter().map(|v| v.to_f32()).collect::<Vec<f32>>();
        let mut x = f32s(params[0]);
        let mut lstm_acts = None;
        if let Some((_, h)) = self.lstm {
            let (y, acts) = lstm::forward(&x, self.n, self.embed_dim, h, &self.lstm_params(params));
            lstm_acts = Some(acts);
            x = y;
        }
        let base = self.first_linear();
        let mut inputs = Vec::with_capacity(self.linears.len());
        for (i, l) in self.linears.iter().enumerate() {
            let mut y = vec![0f32; self.n * l.out];
            let (w, b) = (f32s(params[base + 2 * i]), f32s(params[base + 1 + 2 * i]));
            linear_forward(&mut y, &x, &w, Some(&b), self.shape(l));
            if i + 1 < self.linears.len() {
                match self.act {
                    Act::Relu => y.iter_mut().for_each(|v| *v = v.max(0.0)),
                    Act::Tanh => y.iter_mut().for_each(|v| *v = v.tanh()),
                }
            }
            inputs.push(std::mem::replace(&mut x, y));
        }
        Run {
            rows: x,
            inputs,
            lstm: lstm_acts,
        }
    }

    fn shape(&self, l: &EncLinear) -> LinearShape {
        LinearShape {
            rows: self.n,
            in_features: l.inp,
            out_features: l.out,
            layout: WeightLayout::OutIn,
        }
    }

    /// Accumulates into `grads` (the plan's parameters' gradient views) the gradient given
    /// that of the rows, `drows` `[n, width]`.
    pub fn backward<T: Float>(&self, params: &[&[T]], grads: &mut [&mut [f32]], drows: &[f32]) {
        assert_eq!(drows.len(), self.n * self.width, "prompt rows gradient");
        if !self.has_encoder() {
            grads[0].iter_mut().zip(drows).for_each(|(g, d)| *g += d);
            return;
        }
        let run = self.run(params);
        let inputs = &run.inputs;
        let base = self.first_linear();
        let mut dy = drows.to_vec();
        for (i, l) in self.linears.iter().enumerate().rev() {
            let w: Vec<f32> = params[base + 2 * i].iter().map(|v| v.to_f32()).collect();
            let x = &inputs[i];
            let mut dx = vec![0f32; self.n * l.inp];
            let (gw, gb) = pair(grads, base + 2 * i);
            linear_backward(
                Some(&mut dx),
                false,
                Some(gw),
                Some(gb),
                &dy,
                x,
                &w,
                self.shape(l),
            );
            if i > 0 {
                // x is the previous Linear's activated output.
                match self.act {
                    Act::Relu => dx
                        .iter_mut()
                        .zip(x)
                        .for_each(|(d, &a)| *d = if a > 0.0 { *d } else { 0.0 }),
                    Act::Tanh => dx.iter_mut().zip(x).for_each(|(d, &a)| *d *= 1.0 - a * a),
                }
            }
            dy = dx;
        }
        if let (Some((_, h)), Some(acts)) = (self.lstm, &run.lstm) {
            let p = self.lstm_params(params);
            dy = lstm::backward(
                &dy,
                acts,
                self.n,
                self.embed_dim,
                h,
                &p,
                &mut grads[1..base],
            );
        }
        grads[0].iter_mut().zip(&dy).for_each(|(g, d)| *g += d);
    }

    /// PEFT's initialisation, deterministic in `seed` (not torch's generator): embeddings
    /// N(0, 1) (`nn.Embedding`), Linears U(-1/sqrt(in), 1/sqrt(in)) for weight and bias
    /// (`nn.Linear`), and prefix tuning's `init_weights = "zero"` zeroing the prefix or the
    /// projection's last Linear. `values` are the plan's parameters in order.
    pub fn init<T: Float>(&self, values: &mut [&mut [T]], zero_last: bool, seed: u64) {
        let specs = self.specs();
        let base = self.first_linear();
        let last_linear = specs.len().saturating_sub(2);
        for (k, (spec, v)) in specs.iter().zip(values.iter_mut()).enumerate() {
            let mut rng = NormalRng::new(seed ^ name_hash(&spec.name));
            let zero = zero_last && (k >= last_linear || !self.has_encoder());
            if zero {
                v.fill(T::from_f32(0.0));
            } else if k == 0 {
                v.iter_mut()
                    .for_each(|x| *x = T::from_f32(rng.normal() as f32));
            } else {
                // torch: LSTM parameters U(-1/sqrt(hidden)), Linears U(-1/sqrt(in)).
                let fan = match self.lstm {
                    Some((_, h)) if k < base => h,
                    _ => self.linears[(k - base) / 2].inp,
                };
                let bound = 1.0 / (fan as f64).sqrt();
                v.iter_mut().for_each(|x| {
                    let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
                    *x = T::from_f32(((2.0 * u - 1.0) * bound) as f32);
                });
            }
        }
    }
}

/// The encoder's output and what its backward needs: each Linear's input (the embedding or the
/// LSTM's output, then the activations) and the LSTM's states.
struct Run {
    rows: Vec<f32>,
    inputs: Vec<Vec<f32>>,
    lstm: Option<LstmActs>,
}

/// Two consecutive gradient views (a weight and its bias).
fn pair<'a>(grads: &'a mut [&mut [f32]], i: usize) -> (&'a mut [f32], &'a mut [f32]) {
    let (a, b) = grads.split_at_mut(i + 1);
    (&mut *a[i], &mut *b[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(kind: PromptKind, projection: bool) -> PromptPlan {
        plan_with(kind, projection, false)
    }

    fn plan_with(kind: PromptKind, projection: bool, lstm: bool) -> PromptPlan {
        let mut c = PromptTuningConfig::of_kind(kind, 3);
        c.lstm = lstm;
        c.token_dim = Some(4);
        c.num_layers = Some(2);
        c.encoder_hidden_size = Some(5);
        c.prefix_projection = projection;
        PromptPlan::new(&c)
    }

    /// The encoders' gradients against central differences of a random linear functional.
    #[test]
    fn encoder_gradients_match_finite_differences() {
        for (kind, projection, lstm) in [
            (PromptKind::PTuning, false, false),
            (PromptKind::PTuning, false, true),
            (PromptKind::PrefixTuning, true, false),
            (PromptKind::PrefixTuning, false, false),
        ] {
            let p = plan_with(kind, projection, lstm);
            let specs = p.specs();
            let mut values: Vec<Vec<f64>> = specs.iter().map(|s| vec![0.0; s.numel()]).collect();
            let mut rng = NormalRng::new(7);
            for v in values.iter_mut().flatten() {
                *v = rng.normal() * 0.8;
            }
            let probe: Vec<f32> = (0..p.n * p.width).map(|_| rng.normal() as f32).collect();
            let f = |vals: &[Vec<f64>]| -> f64 {
                let as32: Vec<Vec<f32>> = vals
                    .iter()
                    .map(|v| v.iter().map(|&x| x as f32).collect())
                    .collect();
                let views: Vec<&[f32]> = as32.iter().map(|v| &v[..]).collect();
                p.rows(&views)
                    .iter()
                    .zip(&probe)
                    .map(|(a, b)| (a * b) as f64)
                    .sum()
            };
            let as32: Vec<Vec<f32>> = values
                .iter()
                .map(|v| v.iter().map(|&x| x as f32).collect())
                .collect();
            let views: Vec<&[f32]> = as32.iter().map(|v| &v[..]).collect();
            let mut grads: Vec<Vec<f32>> = specs.iter().map(|s| vec![0.0; s.numel()]).collect();
            let mut gviews: Vec<&mut [f32]> = grads.iter_mut().map(|g| &mut g[..]).collect();
            p.backward(&views, &mut gviews, &probe);
            let eps = 1e-3;
            for (k, spec) in specs.iter().enumerate() {
                for i in 0..spec.numel() {
                    let orig = values[k][i];
                    values[k][i] = orig + eps;
                    let plus = f(&values);
                    values[k][i] = orig - eps;
                    let minus = f(&values);
                    values[k][i] = orig;
                    let num = (plus - minus) / (2.0 * eps);
                    let got = grads[k][i] as f64;
                    assert!(
                        (got - num).abs() < 2e-2 * (1.0 + num.abs()),
                        "{kind:?} {}[{i}]: analytic {got} vs numeric {num}",
                        spec.name
                    );
                }
            }
        }
    }

    #[test]
    fn shapes_and_names_are_peft_s() {
        let names = |p: &PromptPlan| -> Vec<(String, Vec<usize>)> {
            p.specs().into_iter().map(|s| (s.name, s.shape)).collect()
        };
        let p = plan(PromptKind::PTuning, false);
        assert_eq!(
            names(&p),
            vec![
                (ENCODER_EMBEDDING.to_string(), vec![3, 4]),
                ("prompt_encoder.mlp_head.0.weight".into(), vec![5, 4]),
                ("prompt_encoder.mlp_head.0.bias".into(), vec![5]),
                ("prompt_encoder.mlp_head.2.weight".into(), vec![5, 5]),
                ("prompt_encoder.mlp_head.2.bias".into(), vec![5]),
                ("prompt_encoder.mlp_head.4.weight".into(), vec![4, 5]),
                ("prompt_encoder.mlp_head.4.bias".into(), vec![4]),
            ]
        );
        let p = plan(PromptKind::PrefixTuning, true);
        assert_eq!(p.width, 16);
        assert_eq!(
            names(&p)[4],
            ("prompt_encoder.transform.2.bias".into(), vec![16])
        );
        let p = plan(PromptKind::PrefixTuning, false);
        assert_eq!(
            names(&p),
            vec![(PROMPT_EMBEDDINGS.to_string(), vec![3, 16])]
        );
    }
}
