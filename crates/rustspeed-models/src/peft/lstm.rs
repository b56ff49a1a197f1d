//! `torch.nn.LSTM(bidirectional=True, batch_first=True)` over one short sequence, forward and
//! backward side by side: P-tuning's LSTM prompt encoder runs it over its `n` virtual-token
//! embeddings. Gate order and equations are torch's: gates = W_ih x + b_ih + W_hh h + b_hh
//! split as (i, f, g, o); c = f * c_prev + i * g; h = o * tanh(c). Layer k > 0 reads
//! `[forward h, backward h]` of layer k - 1. Parameters per layer and direction (`_reverse`
//! suffix for the backward one), in torch's order: weight_ih `[4h, in]`, weight_hh `[4h, h]`,
//! bias_ih `[4h]`, bias_hh `[4h]`. Everything is f32 and tiny, so plain loops.

/// Per direction of a layer: the parameters' four slices.
pub struct DirParams<'a> {
    pub w_ih: &'a [f32],
    pub w_hh: &'a [f32],
    pub b_ih: &'a [f32],
    pub b_hh: &'a [f32],
}

pub struct DirGrads<'a> {
    pub w_ih: &'a mut [f32],
    pub w_hh: &'a mut [f32],
    pub b_ih: &'a mut [f32],
    pub b_hh: &'a mut [f32],
}

/// What one direction's forward keeps: per step, the activated gates (i, f, g, o) and the
/// cell and hidden states, in time order.
pub struct DirActs {
    gates: Vec<f32>,
    c: Vec<f32>,
    h: Vec<f32>,
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// The time steps in processing order.
fn steps(n: usize, reverse: bool) -> Vec<usize> {
    if reverse {
        (0..n).rev().collect()
    } else {
        (0..n).collect()
    }
}

/// One direction over `x` `[n, inp]`: the hidden states `[n, h]` (in time order) and what
/// backward needs.
pub fn direction_forward(
    x: &[f32],
    n: usize,
    inp: usize,
    h: usize,
    p: &DirParams,
    reverse: bool,
) -> DirActs {
    let mut acts = DirActs {
        gates: vec![0.0; n * 4 * h],
        c: vec![0.0; n * h],
        h: vec![0.0; n * h],
    };
    let (mut hp, mut cp) = (vec![0f32; h], vec![0f32; h]);
    for t in steps(n, reverse) {
        let xt = &x[t * inp..(t + 1) * inp];
        let g = &mut acts.gates[t * 4 * h..(t + 1) * 4 * h];
        for (r, gr) in g.iter_mut().enumerate() {
            let wi = &p.w_ih[r * inp..(r + 1) * inp];
            let wh = &p.w_hh[r * h..(r + 1) * h];
            let mut s = p.b_ih[r] + p.b_hh[r];
            s += wi.iter().zip(xt).map(|(a, b)| a * b).sum::<f32>();
            s += wh.iter().zip(&hp).map(|(a, b)| a * b).sum::<f32>();
            *gr = s;
        }
        for j in 0..h {
            let (i, f, gg, o) = (
                sigmoid(g[j]),
                sigmoid(g[h + j]),
                g[2 * h + j].tanh(),
                sigmoid(g[3 * h + j]),
            );
            g[j] = i;
            g[h + j] = f;
            g[2 * h + j] = gg;
            g[3 * h + j] = o;
            let c = f * cp[j] + i * gg;
            acts.c[t * h + j] = c;
            acts.h[t * h + j] = o * c.tanh();
        }
        hp.copy_from_slice(&acts.h[t * h..(t + 1) * h]);
        cp.copy_from_slice(&acts.c[t * h..(t + 1) * h]);
    }
    acts
}

/// Backward of [`direction_forward`] given the gradient of its hidden states `dh` `[n, h]`:
/// accumulates the parameter gradients and adds the input gradient to `dx` `[n, inp]`.
#[allow(clippy::too_many_arguments)]
pub fn direction_backward(
    dx: &mut [f32],
    g: &mut DirGrads,
    dh: &[f32],
    x: &[f32],
    a: &DirActs,
    n: usize,
    inp: usize,
    h: usize,
    p: &DirParams,
    reverse: bool,
) {
    let (mut dh_next, mut dc_next) = (vec![0f32; h], vec![0f32; h]);
    let mut da = vec![0f32; 4 * h];
    let order = steps(n, reverse);
    for (k, &t) in order.iter().enumerate().rev() {
        // The state this step started from: the previous step's, zero at the first.
        let prev = (k > 0).then(|| order[k - 1]);
        let gt = &a.gates[t * 4 * h..(t + 1) * 4 * h];
        for j in 0..h {
            let (i, f, gg, o) = (gt[j], gt[h + j], gt[2 * h + j], gt[3 * h + j]);
            let c = a.c[t * h + j];
            let c_prev = prev.map_or(0.0, |q| a.c[q * h + j]);
            let tc = c.tanh();
            let dhj = dh[t * h + j] + dh_next[j];
            let dc = dc_next[j] + dhj * o * (1.0 - tc * tc);
            da[j] = dc * gg * i * (1.0 - i);
            da[h + j] = dc * c_prev * f * (1.0 - f);
            da[2 * h + j] = dc * i * (1.0 - gg * gg);
            da[3 * h + j] = dhj * tc * o * (1.0 - o);
            dc_next[j] = dc * f;
        }
        let xt = &x[t * inp..(t + 1) * inp];
        let dxt = &mut dx[t * inp..(t + 1) * inp];
        dh_next.fill(0.0);
        for (r, &d) in da.iter().enumerate() {
            g.b_ih[r] += d;
            g.b_hh[r] += d;
            let wi = &p.w_ih[r * inp..(r + 1) * inp];
            for ((gw, xv), (dxv, w)) in g.w_ih[r * inp..(r + 1) * inp]
                .iter_mut()
                .zip(xt)
                .zip(dxt.iter_mut().zip(wi))
            {
                *gw += d * xv;
                *dxv += d * w;
            }
            if let Some(q) = prev {
                let hp = &a.h[q * h..(q + 1) * h];
                for (gw, hv) in g.w_hh[r * h..(r + 1) * h].iter_mut().zip(hp) {
                    *gw += d * hv;
                }
            }
            let wh = &p.w_hh[r * h..(r + 1) * h];
            for (dn, w) in dh_next.iter_mut().zip(wh) {
                *dn += d * w;
            }
        }
    }
}

/// The parameter names of a `layers`-layer bidirectional LSTM in torch's order, with shapes.
pub fn param_shapes(layers: usize, inp: usize, h: usize) -> Vec<(String, Vec<usize>)> {
    let mut out = Vec::new();
    for l in 0..layers {
        let in_l = if l == 0 { inp } else { 2 * h };
        for suffix in ["", "_reverse"] {
            out.push((format!("weight_ih_l{l}{suffix}"), vec![4 * h, in_l]));
            out.push((format!("weight_hh_l{l}{suffix}"), vec![4 * h, h]));
            out.push((format!("bias_ih_l{l}{suffix}"), vec![4 * h]));
            out.push((format!("bias_hh_l{l}{suffix}"), vec![4 * h]));
        }
    }
    out
}

/// Saved activations of the whole LSTM: per layer its input and both directions' states.
pub struct LstmActs {
    inputs: Vec<Vec<f32>>,
    dirs: Vec<[DirActs; 2]>,
}

/// The bidirectional LSTM over `x` `[n, inp]` with `params` in [`param_shapes`] order;
/// returns the last layer's `[n, 2h]` output (forward h then backward h per step).
pub fn forward(
    x: &[f32],
    n: usize,
    inp: usize,
    h: usize,
    params: &[Vec<f32>],
) -> (Vec<f32>, LstmActs) {
    let layers = params.len() / 8;
    let mut acts = LstmActs {
        inputs: Vec::new(),
        dirs: Vec::new(),
    };
    let mut cur = x.to_vec();
    for l in 0..layers {
        let in_l = if l == 0 { inp } else { 2 * h };
        let dir = |d: usize| {
            let p = &params[8 * l + 4 * d..8 * l + 4 * d + 4];
            DirParams {
                w_ih: &p[0],
                w_hh: &p[1],
                b_ih: &p[2],
                b_hh: &p[3],
            }
        };
        let fwd = direction_forward(&cur, n, in_l, h, &dir(0), false);
        let bwd = direction_forward(&cur, n, in_l, h, &dir(1), true);
        let mut out = vec![0f32; n * 2 * h];
        for t in 0..n {
            out[t * 2 * h..t * 2 * h + h].copy_from_slice(&fwd.h[t * h..(t + 1) * h]);
            out[t * 2 * h + h..(t + 1) * 2 * h].copy_from_slice(&bwd.h[t * h..(t + 1) * h]);
        }
        acts.inputs.push(std::mem::replace(&mut cur, out));
        acts.dirs.push([fwd, bwd]);
    }
    (cur, acts)
}

/// Backward of [`forward`] given the output gradient `dout` `[n, 2h]`: accumulates into
/// `grads` (same order as the parameters) and returns the input gradient `[n, inp]`.
pub fn backward(
    dout: &[f32],
    acts: &LstmActs,
    n: usize,
    inp: usize,
    h: usize,
    params: &[Vec<f32>],
    grads: &mut [&mut [f32]],
) -> Vec<f32> {
    let layers = params.len() / 8;
    let mut dy = dout.to_vec();
    for l in (0..layers).rev() {
        let in_l = if l == 0 { inp } else { 2 * h };
        let mut dx = vec![0f32; n * in_l];
        for d in 0..2 {
            let mut dh = vec![0f32; n * h];
            for t in 0..n {
                dh[t * h..(t + 1) * h]
                    .copy_from_slice(&dy[t * 2 * h + d * h..t * 2 * h + (d + 1) * h]);
            }
            let p = &params[8 * l + 4 * d..8 * l + 4 * d + 4];
            let dp = DirParams {
                w_ih: &p[0],
                w_hh: &p[1],
                b_ih: &p[2],
                b_hh: &p[3],
            };
            let [w_ih, w_hh, b_ih, b_hh] = &mut grads[8 * l + 4 * d..8 * l + 4 * d + 4] else {
                unreachable!("four parameters per direction")
            };
            let mut g = DirGrads {
                w_ih,
                w_hh,
                b_ih,
                b_hh,
            };
            direction_backward(
                &mut dx,
                &mut g,
                &dh,
                &acts.inputs[l],
                &acts.dirs[l][d],
                n,
                in_l,
                h,
                &dp,
                d == 1,
            );
        }
        dy = dx;
    }
    dy
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::init::NormalRng;

    #[test]
    fn gradients_match_finite_differences() {
        let (n, inp, h, layers) = (4, 3, 2, 2);
        let shapes = param_shapes(layers, inp, h);
        let mut rng = NormalRng::new(11);
        let mut params: Vec<Vec<f32>> = shapes
            .iter()
            .map(|(_, s)| {
                (0..s.iter().product::<usize>())
                    .map(|_| rng.normal() as f32 * 0.7)
                    .collect()
            })
            .collect();
        let mut x: Vec<f32> = (0..n * inp).map(|_| rng.normal() as f32).collect();
        let probe: Vec<f32> = (0..n * 2 * h).map(|_| rng.normal() as f32).collect();
        let f = |params: &[Vec<f32>], x: &[f32]| -> f64 {
            let (y, _) = forward(x, n, inp, h, params);
            y.iter().zip(&probe).map(|(a, b)| (a * b) as f64).sum()
        };
        let (_, acts) = forward(&x, n, inp, h, &params);
        let mut grads: Vec<Vec<f32>> = params.iter().map(|p| vec![0.0; p.len()]).collect();
        let mut views: Vec<&mut [f32]> = grads.iter_mut().map(|g| &mut g[..]).collect();
        let dx = backward(&probe, &acts, n, inp, h, &params, &mut views);
        let eps = 1e-2f32;
        let check = |got: f32, num: f64, what: &str| {
            assert!(
                (got as f64 - num).abs() < 2e-3 * (1.0 + num.abs()),
                "{what}: analytic {got} vs numeric {num}"
            );
        };
        for k in 0..params.len() {
            for i in 0..params[k].len() {
                let orig = params[k][i];
                params[k][i] = orig + eps;
                let plus = f(&params, &x);
                params[k][i] = orig - eps;
                let minus = f(&params, &x);
                params[k][i] = orig;
                let num = (plus - minus) / (2.0 * eps as f64);
                check(grads[k][i], num, &format!("{}[{i}]", shapes[k].0));
            }
        }
        for i in 0..x.len() {
            let orig = x[i];
            x[i] = orig + eps;
            let plus = f(&params, &x);
            x[i] = orig - eps;
            let minus = f(&params, &x);
            x[i] = orig;
            check(
                dx[i],
                (plus - minus) / (2.0 * eps as f64),
                &format!("x[{i}]"),
            );
        }
    }
}
