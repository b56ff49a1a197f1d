//! PEFT's prefix tuning (`PREFIX_TUNING`) inside the attention layers: every layer's attention
//! sees `n` trained key/value positions before the sequence, as transformers does when PEFT
//! hands it those prefixes as `past_key_values` (a KV cache of length `n`).
//!
//! The prefix rows `[n, num_layers * 2 * kv_dim]` are made once per forward by the embedding
//! layer (see `prompt_encoder`) and shared with the blocks through [`SharedPrefix`]; PEFT's
//! `view(B, n, layers * 2, kv_heads, head_dim).permute(2, 0, 3, 1, 4).split(2)` puts layer `l`'s
//! keys at columns `2l * kv_dim..` and its values at `(2l + 1) * kv_dim..` of each row, heads
//! inside, which is the `[KVH, D]` row layout of our keys. The prefix is inserted as cached
//! keys are, after RoPE: it is never rotated. The real tokens sit at positions `n..n + T`
//! (transformers' `cache_position` starts at the cache length), which the embedding (GPT-2's
//! `wpe`) and RoPE (LLaMA) apply.
//!
//! The attention runs the causal kernel on `n + T` rows whose first `n` keys/values are the
//! prefix and whose first `n` queries are zero: real query `n + i` then sees every prefix key
//! and real keys `0..=i`, exactly the mask transformers builds for a cache (all prefix
//! positions unmasked, causal after). The dummy query rows' outputs are dropped and get a zero
//! output gradient, which gives them no part in any key or value gradient. Backward sums the
//! prefix key/value gradients over the batch into the shared gradient, which the embedding
//! layer's backward (the last to run) hands to the prefix parameters.

use std::sync::{Arc, Mutex, MutexGuard};

use rustspeed_kernels::attention::{attention_backward, attention_forward, AttnSpec};
use rustspeed_kernels::Float;

/// The prefixes of the current forward and their accumulated gradient, both `[n, width]` f32.
#[derive(Debug, Default)]
pub struct PrefixKv {
    pub n: usize,
    /// `num_layers * 2 * kv_dim`.
    pub width: usize,
    pub values: Vec<f32>,
    pub grad: Vec<f32>,
}

pub type SharedPrefix = Arc<Mutex<PrefixKv>>;

pub fn shared(n: usize, width: usize) -> SharedPrefix {
    Arc::new(Mutex::new(PrefixKv {
        n,
        width,
        values: Vec::new(),
        grad: vec![0.0; n * width],
    }))
}

pub fn lock(p: &SharedPrefix) -> MutexGuard<'_, PrefixKv> {
    // Only plain numbers live inside; a panic elsewhere leaves nothing half-built that matters.
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// A block's handle on the shared prefix: its layer number (0-based decoder layer).
#[derive(Clone, Debug)]
pub struct PrefixLink {
    pub shared: SharedPrefix,
    pub layer: usize,
    pub kv_dim: usize,
}

/// What the prefixed attention keeps for its backward: the `n + T`-row q, k, v, output and
/// logsumexp.
#[derive(Debug, Default)]
pub struct PrefixSaved<T> {
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    out: Vec<T>,
    lse: Vec<f32>,
}

impl PrefixLink {
    pub fn n(&self) -> usize {
        lock(&self.shared).n
    }

    /// `[B, n + T, w]` from `x` `[B, T, w]`: the first `n` rows of each sequence are the
    /// prefix's column block `col..col + w` (`Some`), or zero (queries).
    fn extend<T: Float>(
        &self,
        x: &[T],
        b: usize,
        t: usize,
        w: usize,
        col: Option<usize>,
    ) -> Vec<T> {
        let p = lock(&self.shared);
        let n = p.n;
        let mut out = vec![T::default(); b * (n + t) * w];
        for (bi, seq) in out.chunks_mut((n + t) * w).enumerate() {
            if let Some(col) = col {
                for j in 0..n {
                    let src = &p.values[j * p.width + col..j * p.width + col + w];
                    for (o, s) in seq[j * w..(j + 1) * w].iter_mut().zip(src) {
                        *o = T::from_f32(*s);
                    }
                }
            }
            seq[n * w..].copy_from_slice(&x[bi * t * w..(bi + 1) * t * w]);
        }
        out
    }

    /// Adds the prefix rows of `dx` `[B, n + T, w]`, summed over the batch, to the shared
    /// gradient's columns `col..col + w`, and writes the real rows into `real` `[B, T, w]`.
    fn split_grad<T: Float>(
        &self,
        real: &mut [T],
        dx: &[T],
        b: usize,
        t: usize,
        w: usize,
        col: usize,
    ) {
        let mut p = lock(&self.shared);
        let (n, width) = (p.n, p.width);
        for bi in 0..b {
            let seq = &dx[bi * (n + t) * w..(bi + 1) * (n + t) * w];
            for j in 0..n {
                let dst = &mut p.grad[j * width + col..j * width + col + w];
                for (g, x) in dst.iter_mut().zip(&seq[j * w..(j + 1) * w]) {
                    *g += x.to_f32();
                }
            }
            real[bi * t * w..(bi + 1) * t * w].copy_from_slice(&seq[n * w..]);
        }
    }

    /// Attention of the real rows over the prefix and themselves: `out` `[B, T, H, D]` from
    /// `q` `[B, T, H, D]`, `k`, `v` `[B, T, KVH, D]` (RoPE already applied); `spec` describes
    /// the real rows (`seq = T`), its dropout and window apply over the `n + T` rows.
    pub fn attention_forward<T: Float>(
        &self,
        out: &mut [T],
        saved: &mut PrefixSaved<T>,
        q: &[T],
        k: &[T],
        v: &[T],
        spec: &AttnSpec,
    ) -> Result<(), rustspeed_kernels::attention::AttentionError> {
        let (b, t) = (spec.batch, spec.seq);
        let qw = spec.heads * spec.head_dim;
        let kw = spec.kv_heads * spec.head_dim;
        assert_eq!(kw, self.kv_dim, "prefix tuning: key width");
        let n = self.n();
        let full = AttnSpec {
            seq: n + t,
            ..*spec
        };
        saved.q = self.extend(q, b, t, qw, None);
        saved.k = self.extend(k, b, t, kw, Some(2 * self.layer * kw));
        saved.v = self.extend(v, b, t, kw, Some((2 * self.layer + 1) * kw));
        saved.out.resize(full.q_len(), T::default());
        saved.lse.resize(full.lse_len(), 0.0);
        attention_forward(
            &mut saved.out,
            &mut saved.lse,
            &saved.q,
            &saved.k,
            &saved.v,
            &full,
        )?;
        for (bi, o) in out.chunks_mut(t * qw).enumerate() {
            let seq = &saved.out[bi * (n + t) * qw..(bi + 1) * (n + t) * qw];
            o.copy_from_slice(&seq[n * qw..]);
        }
        Ok(())
    }

    /// Backward of [`PrefixLink::attention_forward`]: overwrites `dq`, `dk`, `dv` (real rows)
    /// and adds the prefix's key/value gradients to the shared gradient.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_backward<T: Float>(
        &self,
        dq: &mut [T],
        dk: &mut [T],
        dv: &mut [T],
        dout: &[T],
        saved: &PrefixSaved<T>,
        spec: &AttnSpec,
    ) -> Result<(), rustspeed_kernels::attention::AttentionError> {
        let (b, t) = (spec.batch, spec.seq);
        let qw = spec.heads * spec.head_dim;
        let kw = spec.kv_heads * spec.head_dim;
        let n = self.n();
        let full = AttnSpec {
            seq: n + t,
            ..*spec
        };
        let dout_full = self.extend(dout, b, t, qw, None);
        let mut dq_full = vec![T::default(); full.q_len()];
        let mut dk_full = vec![T::default(); full.kv_len()];
        let mut dv_full = vec![T::default(); full.kv_len()];
        attention_backward(
            &mut dq_full,
            &mut dk_full,
            &mut dv_full,
            &dout_full,
            &saved.q,
            &saved.k,
            &saved.v,
            &saved.out,
            &saved.lse,
            &full,
        )?;
        for (bi, d) in dq.chunks_mut(t * qw).enumerate() {
            d.copy_from_slice(&dq_full[(bi * (n + t) + n) * qw..(bi + 1) * (n + t) * qw]);
        }
        self.split_grad(dk, &dk_full, b, t, kw, 2 * self.layer * kw);
        self.split_grad(dv, &dv_full, b, t, kw, (2 * self.layer + 1) * kw);
        Ok(())
    }
}
