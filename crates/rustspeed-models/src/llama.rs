//! The LLaMA family (`LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`) on the layer
//! protocol: an embedding layer, one layer per decoder block, and the head (final RMSNorm + LM
//! head + cross-entropy).
//!
//! A decoder block is HF's `LlamaDecoderLayer`:
//! `h = x + o_proj(attn(rope(q_proj(n1)), rope(k_proj(n1)), v_proj(n1)))` with `n1 = rms(x)`, then
//! `out = h + down_proj(silu(gate_proj(n2)) * up_proj(n2))` with `n2 = rms(h)`. Qwen2 adds q/k/v
//! biases, Mistral (and Qwen2 layers so configured) a sliding attention window; the differences
//! are all in [`ModelConfig`].
//!
//! Memory: a block keeps its input, `h`, q/k/v (after RoPE), the attention output and logsumexp,
//! and the gate/up projections for backward. The normalised inputs and `silu(gate) * up` are
//! recomputed in backward (elementwise, cheap next to the matmuls) rather than kept. Backward's
//! temporaries live in one [`Scratch`] shared by all blocks of a model (blocks run one at a
//! time), so their capacity is reused across blocks and steps instead of allocated per op.
//!
//! The protocol's `forward`/`backward` return no `Result`: conditions that only a bad batch can
//! cause (a token id outside the vocabulary, a label outside it) and training with attention
//! dropout (use [`check_trainable`] first) panic with a message naming the layer and the value.

use std::path::Path;
use std::sync::{Arc, Mutex};

use rustspeed_kernels::activation::{swiglu_backward, swiglu_forward};
use rustspeed_kernels::attention::{attention_backward, attention_forward, AttnSpec};
use rustspeed_kernels::cross_entropy::{
    lm_head_cross_entropy, lm_head_cross_entropy_loss, lm_head_logits,
};
use rustspeed_kernels::dropout::dropout_key;
use rustspeed_kernels::embedding::{embedding_backward, embedding_forward};
use rustspeed_kernels::matmul::WeightLayout;
use rustspeed_kernels::rmsnorm::{rmsnorm_backward, rmsnorm_forward};
use rustspeed_kernels::rope::{self, rope_backward, rope_forward, Positions, RopeTable};
use rustspeed_kernels::Float;

use crate::error::ModelError;
use crate::hf_config::{Activation, Architecture, ModelConfig, RopeScaling};
use crate::init::{name_hash, NormalRng};
use crate::layer::{Batch, Ctx, Flow, Layer, LossSum};
use crate::linear::{grad_if, Linear, QuantTarget};
use crate::model::Model;
use crate::params::ParamSpec;
use crate::peft::prefix::{self, PrefixLink, PrefixSaved};
use crate::peft::prompt::{self, PromptLayer};
use crate::tuning::Tuning;
use crate::weights::{load_hf_weights, NameRules};

const EMBED: &str = "model.embed_tokens.weight";
const FINAL_NORM: &str = "model.norm.weight";
const LM_HEAD: &str = "lm_head.weight";

fn unsupported(what: &str, value: impl ToString, hint: Option<&str>) -> ModelError {
    ModelError::Unsupported {
        what: what.to_string(),
        value: value.to_string(),
        hint: hint.map(str::to_string),
    }
}

/// Builds the model described by `cfg` with zeroed parameters (fill them with
/// [`load_hf_weights`] and [`name_rules`], or [`init_weights`]). The parameter layout lists
/// every tensor under its HF name, in transformers' `named_parameters()` order.
pub fn build<T: Float>(cfg: &ModelConfig) -> Result<Model<T>, ModelError> {
    build_tuned(cfg, &Tuning::full())
}

/// [`build`] for `tuning`: LoRA adapters on the modules it targets (parameters
/// `<module>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]` after the module's own),
/// and every parameter's `trainable` flag as it says.
pub fn build_tuned<T: Float>(cfg: &ModelConfig, tuning: &Tuning) -> Result<Model<T>, ModelError> {
    if !matches!(
        cfg.architecture,
        Architecture::Llama | Architecture::Mistral | Architecture::Qwen2
    ) {
        return Err(unsupported(
            "architecture",
            cfg.architecture.hf_class(),
            Some("the LLaMA family builds LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
        ));
    }
    if cfg.activation != Activation::Silu {
        return Err(unsupported(
            "hidden_act",
            format!("{:?}", cfg.activation),
            Some("the LLaMA family's MLP is implemented with SwiGLU (silu) only"),
        ));
    }
    let rope_cfg = cfg
        .rope
        .as_ref()
        .ok_or_else(|| unsupported("rope_parameters", "none", Some("LLaMA needs RoPE")))?;
    let scaling = match rope_cfg.scaling {
        None => rope::RopeScaling::None,
        Some(RopeScaling::Linear { factor }) => rope::RopeScaling::Linear {
            factor: factor as f32,
        },
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => rope::RopeScaling::Llama3 {
            factor: factor as f32,
            low_freq_factor: low_freq_factor as f32,
            high_freq_factor: high_freq_factor as f32,
            original_max_position_embeddings,
        },
    };
    let theta = rope_cfg.theta as f32;
    // Validates head_dim, theta and the scaling once, so forward never meets a bad table.
    let table = RopeTable::new(cfg.head_dim, theta, &scaling, 0)
        .map_err(|e| unsupported("rope_parameters", e, None))?;

    let scratch = Arc::new(Mutex::new(Scratch::default()));
    let mut layers: Vec<Box<dyn Layer<T>>> = Vec::with_capacity(cfg.num_hidden_layers + 2);
    let plan = tuning.prompt_plan();
    let shared = plan
        .as_ref()
        .filter(|_| tuning.prefix_tokens() > 0)
        .map(|p| prefix::shared(p.n, p.width));
    layers.push(Box::new(Embedding {
        vocab: cfg.vocab_size,
        d: cfg.hidden_size,
        train: tuning.trainable(EMBED),
        prompt: plan.map(|p| PromptLayer::new(p, 1, shared.clone())),
    }));
    for i in 0..cfg.num_hidden_layers {
        let mut block = Decoder::new(
            cfg,
            tuning,
            i,
            table.clone(),
            scaling.clone(),
            theta,
            scratch.clone(),
        );
        block.prefix = shared.clone().map(|shared| PrefixLink {
            shared,
            layer: i,
            kv_dim: cfg.num_key_value_heads * cfg.head_dim,
        });
        block.position_offset = tuning.prefix_tokens();
        layers.push(Box::new(block));
    }
    layers.push(Box::new(Head::new(cfg, tuning)));
    let mut model = Model::new(layers)?;
    model.tuning = tuning.clone();
    Ok(model)
}

/// Fails when training this configuration would need something not implemented. Everything
/// the LLaMA family's configs describe trains today (attention dropout included); kept so the
/// train command checks every architecture the same way.
pub fn check_trainable(_cfg: &ModelConfig) -> Result<(), ModelError> {
    Ok(())
}

/// Checkpoint tensors to skip: a tied `lm_head.weight` saved anyway, and the rotary
/// `inv_freq` buffers older transformers versions stored.
pub fn name_rules(cfg: &ModelConfig) -> NameRules {
    let mut ignore = vec![".rotary_emb.inv_freq".to_string()];
    if cfg.tie_word_embeddings {
        ignore.push(LM_HEAD.to_string());
    }
    NameRules {
        ignore,
        optional_prefix: None,
    }
}

/// Reads `dir/config.json`, builds the model and loads its safetensors weights.
pub fn load_pretrained<T: Float>(dir: &Path) -> Result<(ModelConfig, Model<T>), ModelError> {
    let cfg = ModelConfig::from_path(dir)?;
    let mut model = build::<T>(&cfg)?;
    load_hf_weights(dir, &model.layout, &mut model.params, &name_rules(&cfg))?;
    Ok((cfg, model))
}

/// HF's `_init_weights`: Linear and Embedding weights ~ N(0, `cfg.initializer_range`), biases 0,
/// RMSNorm weights 1.
///
/// The normal draws are deterministic: each tensor gets its own splitmix64 stream seeded from
/// `seed` and the FNV-1a hash of its name, turned into normals by Box-Muller (f64). A tensor's
/// values therefore depend only on the seed and its name, not on which other tensors exist.
/// They do not reproduce PyTorch's generator.
pub fn init_weights<T: Float>(model: &mut Model<T>, cfg: &ModelConfig, seed: u64) {
    debug_assert!(matches!(
        cfg.architecture,
        Architecture::Llama | Architecture::Mistral | Architecture::Qwen2
    ));
    let slots: Vec<_> = model.layout.slots().to_vec();
    for slot in slots {
        let values = &mut model.params[slot.range()];
        let name = slot.spec.name.as_str();
        if name.ends_with("norm.weight") {
            values.fill(T::from_f32(1.0));
        } else if name.ends_with(".bias") {
            values.fill(T::from_f32(0.0));
        } else {
            let mut rng = NormalRng::new(seed ^ name_hash(name));
            for v in values.iter_mut() {
                *v = T::from_f32(rng.normal() as f32 * cfg.initializer_range as f32);
            }
        }
    }
}

/// The f32 logits `[rows.len(), vocab]` of the given rows (indices into the batch's
/// `batch_size * seq_len` positions), evaluated without dropout. Runs every layer but the head,
/// then the final norm and the LM head on the selected rows only.
pub fn logits<T: Float>(
    model: &mut Model<T>,
    cfg: &ModelConfig,
    batch: &Batch,
    rows: &[usize],
) -> Result<Vec<f32>, ModelError> {
    let flow = model.forward_to_head(batch);
    let d = cfg.hidden_size;
    let n = batch.rows();
    let norm = model
        .param(FINAL_NORM)
        .expect("the head declares model.norm.weight");
    let mut normed = vec![T::default(); n * d];
    let mut rstd = vec![0f32; n];
    rmsnorm_forward(
        &mut normed,
        &mut rstd,
        &flow.hidden,
        norm,
        n,
        d,
        cfg.norm_eps as f32,
    );
    let weight = model
        .param(LM_HEAD)
        .or_else(|| model.param(EMBED))
        .expect("the model has an LM head weight");
    let mut out = vec![0f32; rows.len() * cfg.vocab_size];
    lm_head_logits(&mut out, &normed, weight, rows, d, cfg.vocab_size).map_err(|e| {
        unsupported(
            "logits rows",
            e,
            Some("rows index the batch's B*T positions"),
        )
    })?;
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Embedding

struct Embedding {
    vocab: usize,
    d: usize,
    train: bool,
    /// Prompt learning's parameters (after the token embeddings).
    prompt: Option<PromptLayer>,
}

impl<T: Float> Layer<T> for Embedding {
    fn name(&self) -> &str {
        "model.embed_tokens"
    }

    fn own_params(&self) -> Vec<ParamSpec> {
        let mut specs =
            vec![ParamSpec::new(EMBED, &[self.vocab, self.d]).with_trainable(self.train)];
        if let Some(p) = &self.prompt {
            specs.extend(p.specs());
        }
        specs
    }

    fn forward(&mut self, params: &[&[T]], flow: &mut Flow<T>, ctx: &Ctx) {
        let batch = ctx.batch;
        let n = self.prompt.as_ref().map_or(0, |p| p.virtual_tokens());
        let real;
        let ids = if n > 0 {
            real = prompt::real_ids(batch, n, "model.embed_tokens");
            &real
        } else {
            &batch.input_ids
        };
        flow.hidden.resize(ids.len() * self.d, T::default());
        if let Err(e) = embedding_forward(&mut flow.hidden, ids, params[0], None, self.d) {
            panic!("model.embed_tokens: {e}");
        }
        if let Some(rows) = self.prompt.as_ref().and_then(|p| p.forward(params)) {
            prompt::place_prompt(&mut flow.hidden, &rows, None, batch.seq_len, n, self.d);
        }
    }

    fn backward(
        &mut self,
        params: &[&[T]],
        grads: &mut [&mut [f32]],
        flow: &mut Flow<T>,
        ctx: &Ctx,
    ) {
        let ids = &ctx.batch.input_ids;
        if let Some(p) = &self.prompt {
            p.backward(params, grads, &flow.hidden, ctx.batch.seq_len);
            // Prompt learning freezes the token embeddings (their ids at virtual positions are
            // placeholders), so they never train here.
            assert!(
                !self.train,
                "model.embed_tokens: trains only with full fine-tuning"
            );
        }
        if self.train {
            if let Err(e) = embedding_backward(grads[0], ids, &flow.hidden, self.d) {
                panic!("model.embed_tokens: {e}");
            }
        }
        // Token ids have no gradient.
        flow.hidden = Vec::new();
    }

    fn clear(&mut self) {}
}

// ---------------------------------------------------------------------------------------------
// Decoder block

/// What a block's forward keeps for its backward.
#[derive(Default)]
struct Saved<T> {
    x: Vec<T>,
    h: Vec<T>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    att: Vec<T>,
    lse: Vec<f32>,
    gate: Vec<T>,
    up: Vec<T>,
    rstd1: Vec<f32>,
    rstd2: Vec<f32>,
    /// The attention's `n + T` rows under prefix tuning.
    prefix: PrefixSaved<T>,
}

/// Temporaries of forward (evaluation) and backward, shared by all blocks of a model.
#[derive(Default)]
struct Scratch<T> {
    normed: Vec<T>,
    rstd: Vec<f32>,
    mid: Vec<T>,
    dmid: Vec<T>,
    dup: Vec<T>,
    dnormed: Vec<T>,
    datt: Vec<T>,
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
}

/// Resizes `v` to `n` elements, keeping its capacity (contents are overwritten by the caller).
fn sized<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    v.resize(n, T::default());
    &mut v[..n]
}

struct Decoder<T> {
    name: String,
    specs: Vec<ParamSpec>,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    norm1: usize,
    norm2: usize,
    d: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    eps: f32,
    window: Option<usize>,
    attention_dropout: f32,
    /// Position in the model's layer list (the embedding is 0), keying this layer's dropout.
    index: usize,
    rope: RopeTable,
    rope_scaling: rope::RopeScaling,
    rope_theta: f32,
    saved: Option<Saved<T>>,
    scratch: Arc<Mutex<Scratch<T>>>,
    /// Prefix tuning's keys and values for this layer.
    prefix: Option<PrefixLink>,
    /// Where the tokens' positions (RoPE) start: prefix tuning's prefix length, else 0.
    position_offset: usize,
}

impl<T: Float> Decoder<T> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: &ModelConfig,
        tuning: &Tuning,
        index: usize,
        rope: RopeTable,
        rope_scaling: rope::RopeScaling,
        rope_theta: f32,
        scratch: Arc<Mutex<Scratch<T>>>,
    ) -> Self {
        let name = format!("model.layers.{index}");
        let d = cfg.hidden_size;
        let q_out = cfg.num_attention_heads * cfg.head_dim;
        let kv_out = cfg.num_key_value_heads * cfg.head_dim;
        let ffn = cfg.intermediate_size;
        let mut specs = Vec::new();
        // HF's named_parameters() order: self_attn (q, k, v, o), mlp (gate, up, down), norms.
        let mut site = 0;
        let mut linear = |module: &str, inp: usize, out: usize, bias: bool| {
            let module = format!("{name}.{module}");
            site += 1;
            Linear::declare(
                &mut specs,
                &module,
                inp,
                out,
                WeightLayout::OutIn,
                bias,
                tuning,
                site,
            )
        };
        let q = linear("self_attn.q_proj", d, q_out, cfg.qkv_bias);
        let k = linear("self_attn.k_proj", d, kv_out, cfg.qkv_bias);
        let v = linear("self_attn.v_proj", d, kv_out, cfg.qkv_bias);
        let o = linear("self_attn.o_proj", q_out, d, cfg.attn_output_bias);
        let gate = linear("mlp.gate_proj", d, ffn, cfg.mlp_bias);
        let up = linear("mlp.up_proj", d, ffn, cfg.mlp_bias);
        let down = linear("mlp.down_proj", ffn, d, cfg.mlp_bias);
        let mut norm = |module: &str| {
            let param = format!("{name}.{module}.weight");
            let trainable = tuning.trainable(&param);
            specs.push(ParamSpec::new(param, &[d]).with_trainable(trainable));
            specs.len() - 1
        };
        let norm1 = norm("input_layernorm");
        let norm2 = norm("post_attention_layernorm");
        Decoder {
            name,
            specs,
            q,
            k,
            v,
            o,
            gate,
            up,
            down,
            norm1,
            norm2,
            d,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            ffn,
            eps: cfg.norm_eps as f32,
            window: cfg.layer_sliding_window(index),
            attention_dropout: cfg.dropout.attention,
            index: index + 1,
            rope,
            rope_scaling,
            rope_theta,
            saved: None,
            scratch,
            prefix: None,
            position_offset: 0,
        }
    }

    /// Grows the RoPE table to cover `seq` positions (to the next power of two, so a few sizes
    /// serve every batch).
    fn ensure_rope(&mut self, seq: usize) {
        if self.rope.max_positions < seq {
            let n = seq.next_power_of_two();
            self.rope = RopeTable::new(self.head_dim, self.rope_theta, &self.rope_scaling, n)
                .expect("rope parameters were validated when the model was built");
        }
    }

    /// The attention call; in training, attention-probability dropout (`attention_dropout`)
    /// keyed by (dropout seed, layer), so backward regenerates the forward's mask.
    fn spec(&self, ctx: &Ctx, train: bool) -> AttnSpec {
        let batch = ctx.batch;
        let spec = AttnSpec::new(
            batch.batch_size,
            batch.seq_len,
            self.heads,
            self.kv_heads,
            self.head_dim,
        )
        .with_window(self.window);
        if train {
            let key = dropout_key(ctx.dropout_seed, self.index as u64, 0);
            spec.with_dropout(self.attention_dropout, key)
        } else {
            spec
        }
    }

    fn rope_apply(&self, x: &mut [T], batch: &Batch, heads: usize, forward: bool) {
        let (b, t) = (batch.batch_size, batch.seq_len);
        let result = if forward {
            rope_forward(
                x,
                &self.rope,
                b,
                t,
                heads,
                Positions::Offset(self.position_offset),
            )
        } else {
            rope_backward(
                x,
                &self.rope,
                b,
                t,
                heads,
                Positions::Offset(self.position_offset),
            )
        };
        if let Err(e) = result {
            panic!("{}: {e}", self.name);
        }
    }
}

impl<T: Float> Layer<T> for Decoder<T> {
    fn name(&self) -> &str {
        &self.name
    }

    fn own_params(&self) -> Vec<ParamSpec> {
        self.specs.clone()
    }

    fn quantized(&self) -> Vec<QuantTarget> {
        [
            &self.q, &self.k, &self.v, &self.o, &self.gate, &self.up, &self.down,
        ]
        .into_iter()
        .filter_map(Linear::quant_target)
        .collect()
    }

    fn forward(&mut self, params: &[&[T]], flow: &mut Flow<T>, ctx: &Ctx) {
        let batch = ctx.batch;
        let rows = batch.rows();
        let (d, ffn) = (self.d, self.ffn);
        let spec = self.spec(ctx, ctx.train);
        self.ensure_rope(self.position_offset + batch.seq_len);
        let x = std::mem::take(&mut flow.hidden);
        assert_eq!(
            x.len(),
            rows * d,
            "{}: input is not [B*T, hidden]",
            self.name
        );

        let scratch = self.scratch.clone();
        let mut scratch = scratch.lock().expect("scratch lock");
        let Scratch { normed, mid, .. } = &mut *scratch;
        let mut s = Saved {
            rstd1: vec![0f32; rows],
            rstd2: vec![0f32; rows],
            q: vec![T::default(); rows * self.q.out],
            k: vec![T::default(); rows * self.k.out],
            v: vec![T::default(); rows * self.v.out],
            att: vec![T::default(); rows * self.q.out],
            lse: vec![0f32; spec.lse_len()],
            gate: vec![T::default(); rows * ffn],
            up: vec![T::default(); rows * ffn],
            ..Saved::default()
        };

        let n1 = sized(normed, rows * d);
        rmsnorm_forward(n1, &mut s.rstd1, &x, params[self.norm1], rows, d, self.eps);
        let layer = self.index;
        for (lin, out) in [
            (&self.q, &mut s.q),
            (&self.k, &mut s.k),
            (&self.v, &mut s.v),
        ] {
            lin.forward(out, n1, params, rows, false, ctx, layer);
        }
        self.rope_apply(&mut s.q, batch, self.heads, true);
        self.rope_apply(&mut s.k, batch, self.kv_heads, true);
        let result = match &self.prefix {
            None => attention_forward(&mut s.att, &mut s.lse, &s.q, &s.k, &s.v, &spec),
            Some(link) => {
                link.attention_forward(&mut s.att, &mut s.prefix, &s.q, &s.k, &s.v, &spec)
            }
        };
        if let Err(e) = result {
            panic!("{}: {e}", self.name);
        }
        let mut h = x.clone();
        self.o
            .forward(&mut h, &s.att, params, rows, true, ctx, layer);

        let n2 = sized(normed, rows * d);
        rmsnorm_forward(n2, &mut s.rstd2, &h, params[self.norm2], rows, d, self.eps);
        for (lin, out) in [(&self.gate, &mut s.gate), (&self.up, &mut s.up)] {
            lin.forward(out, n2, params, rows, false, ctx, layer);
        }
        let m = sized(mid, rows * ffn);
        swiglu_forward(m, &s.gate, &s.up);
        let mut out = h.clone();
        self.down
            .forward(&mut out, m, params, rows, true, ctx, layer);
        drop(scratch);

        flow.hidden = out;
        if ctx.train {
            s.x = x;
            s.h = h;
            self.saved = Some(s);
        }
    }

    fn backward(
        &mut self,
        params: &[&[T]],
        grads: &mut [&mut [f32]],
        flow: &mut Flow<T>,
        ctx: &Ctx,
    ) {
        let s = self
            .saved
            .take()
            .unwrap_or_else(|| panic!("{}: backward without a training forward", self.name));
        let batch = ctx.batch;
        let rows = batch.rows();
        let (d, ffn) = (self.d, self.ffn);
        let spec = self.spec(ctx, true);
        // The output gradient becomes dh (plus the MLP branch), then dx (plus the attention branch).
        let mut dres = std::mem::take(&mut flow.hidden);
        assert_eq!(
            dres.len(),
            rows * d,
            "{}: output gradient is not [B*T, hidden]",
            self.name
        );

        let scratch = self.scratch.clone();
        let mut scratch = scratch.lock().expect("scratch lock");
        let Scratch {
            normed,
            rstd,
            mid,
            dmid,
            dup,
            dnormed,
            datt,
            dq,
            dk,
            dv,
        } = &mut *scratch;

        // MLP branch.
        let m = sized(mid, rows * ffn);
        swiglu_forward(m, &s.gate, &s.up);
        let dm = sized(dmid, rows * ffn);
        let layer = self.index;
        #[rustfmt::skip]
        self.down.backward(Some(&mut *dm), false, &dres, m, params, grads, rows, ctx, layer);
        // silu(gate) * up is dead now: its buffer takes dgate.
        let dgate = m;
        let du = sized(dup, rows * ffn);
        swiglu_backward(dgate, du, &s.gate, &s.up, dm);
        let n2 = sized(normed, rows * d);
        rmsnorm_forward(
            n2,
            sized(rstd, rows),
            &s.h,
            params[self.norm2],
            rows,
            d,
            self.eps,
        );
        let dn = sized(dnormed, rows * d);
        #[rustfmt::skip]
        self.gate.backward(Some(&mut *dn), false, dgate, n2, params, grads, rows, ctx, layer);
        #[rustfmt::skip]
        self.up.backward(Some(&mut *dn), true, du, n2, params, grads, rows, ctx, layer);
        let dw2 = std::mem::take(&mut grads[self.norm2]);
        rmsnorm_backward(
            &mut dres,
            true,
            self.specs[self.norm2].trainable.then_some(&mut *dw2),
            dn,
            &s.h,
            params[self.norm2],
            &s.rstd2,
            rows,
            d,
        );
        grads[self.norm2] = dw2;

        // Attention branch.
        let da = sized(datt, rows * self.q.out);
        #[rustfmt::skip]
        self.o.backward(Some(&mut *da), false, &dres, &s.att, params, grads, rows, ctx, layer);
        let (dq, dk, dv) = (
            sized(dq, rows * self.q.out),
            sized(dk, rows * self.k.out),
            sized(dv, rows * self.v.out),
        );
        let result = match &self.prefix {
            None => attention_backward(dq, dk, dv, da, &s.q, &s.k, &s.v, &s.att, &s.lse, &spec),
            Some(link) => link.attention_backward(dq, dk, dv, da, &s.prefix, &spec),
        };
        if let Err(e) = result {
            panic!("{}: {e}", self.name);
        }
        self.rope_apply(dq, batch, self.heads, false);
        self.rope_apply(dk, batch, self.kv_heads, false);
        let n1 = sized(normed, rows * d);
        rmsnorm_forward(
            n1,
            sized(rstd, rows),
            &s.x,
            params[self.norm1],
            rows,
            d,
            self.eps,
        );
        let dn = sized(dnormed, rows * d);
        #[rustfmt::skip]
        self.q.backward(Some(&mut *dn), false, dq, n1, params, grads, rows, ctx, layer);
        #[rustfmt::skip]
        self.k.backward(Some(&mut *dn), true, dk, n1, params, grads, rows, ctx, layer);
        #[rustfmt::skip]
        self.v.backward(Some(&mut *dn), true, dv, n1, params, grads, rows, ctx, layer);
        let dw1 = std::mem::take(&mut grads[self.norm1]);
        rmsnorm_backward(
            &mut dres,
            true,
            self.specs[self.norm1].trainable.then_some(&mut *dw1),
            dn,
            &s.x,
            params[self.norm1],
            &s.rstd1,
            rows,
            d,
        );
        grads[self.norm1] = dw1;

        flow.hidden = dres;
    }

    fn clear(&mut self) {
        self.saved = None;
    }
}

// ---------------------------------------------------------------------------------------------
// Head: final RMSNorm, LM head and cross-entropy

struct Head<T> {
    vocab: usize,
    d: usize,
    eps: f32,
    tied: bool,
    /// Whether the final norm and the head weight (tied or own) train.
    train: [bool; 2],
    /// The input and its rstd, kept for backward.
    saved: Option<(Vec<T>, Vec<f32>)>,
    /// The input gradient `forward_backward` computed, for `backward` to hand back.
    dx: Option<Vec<T>>,
    normed: Vec<T>,
    logits: Vec<f32>,
}

impl<T: Float> Head<T> {
    fn new(cfg: &ModelConfig, tuning: &Tuning) -> Self {
        let weight = if cfg.tie_word_embeddings {
            EMBED
        } else {
            LM_HEAD
        };
        Head {
            vocab: cfg.vocab_size,
            d: cfg.hidden_size,
            eps: cfg.norm_eps as f32,
            tied: cfg.tie_word_embeddings,
            train: [tuning.trainable(FINAL_NORM), tuning.trainable(weight)],
            saved: None,
            dx: None,
            normed: Vec::new(),
            logits: Vec::new(),
        }
    }

    /// The final RMSNorm of `flow.hidden` into `self.normed`; returns the input and its rstd.
    fn normalize(&mut self, params: &[&[T]], flow: &mut Flow<T>, ctx: &Ctx) -> (Vec<T>, Vec<f32>) {
        let rows = ctx.batch.rows();
        let x = std::mem::take(&mut flow.hidden);
        assert_eq!(
            x.len(),
            rows * self.d,
            "lm_head: input is not [B*T, hidden]"
        );
        self.dx = None;
        let mut rstd = vec![0f32; rows];
        let normed = sized(&mut self.normed, rows * self.d);
        rmsnorm_forward(normed, &mut rstd, &x, params[0], rows, self.d, self.eps);
        (x, rstd)
    }

    /// The fused kernel over `self.normed` (the norm of `x`; `grads`: norm weight, head
    /// weight), then the norm's backward; returns the input gradient and the loss.
    fn head_backward(
        &mut self,
        params: &[&[T]],
        grads: &mut [&mut [f32]],
        (x, rstd): (&[T], &[f32]),
        ctx: &Ctx,
    ) -> (Vec<T>, LossSum) {
        let rows = ctx.batch.rows();
        let d = self.d;
        let mut dnormed = vec![T::default(); rows * d];
        let stats = lm_head_cross_entropy(
            &mut dnormed,
            grad_if(grads, 1, self.train[1]),
            &self.normed[..rows * d],
            params[1],
            &ctx.batch.labels,
            rows,
            d,
            self.vocab,
            ctx.grad_scale,
            &mut self.logits,
        )
        .unwrap_or_else(|e| panic!("lm_head: {e}"));
        let mut dx = vec![T::default(); rows * d];
        rmsnorm_backward(
            &mut dx,
            false,
            grad_if(grads, 0, self.train[0]),
            &dnormed,
            x,
            params[0],
            rstd,
            rows,
            d,
        );
        let loss = LossSum {
            nll: stats.nll_sum,
            tokens: stats.count,
        };
        (dx, loss)
    }
}

impl<T: Float> Layer<T> for Head<T> {
    fn name(&self) -> &str {
        "lm_head"
    }

    fn own_params(&self) -> Vec<ParamSpec> {
        let mut specs = vec![ParamSpec::new(FINAL_NORM, &[self.d]).with_trainable(self.train[0])];
        if !self.tied {
            specs
                .push(ParamSpec::new(LM_HEAD, &[self.vocab, self.d]).with_trainable(self.train[1]));
        }
        specs
    }

    fn tied_params(&self) -> Vec<String> {
        if self.tied {
            vec![EMBED.to_string()]
        } else {
            Vec::new()
        }
    }

    fn forward(&mut self, params: &[&[T]], flow: &mut Flow<T>, ctx: &Ctx) {
        let (x, rstd) = self.normalize(params, flow, ctx);
        // Without the gradient scale (plain forward), training recomputes the logits in
        // backward, so no [rows, vocab] buffer ever outlives one chunk.
        let rows = ctx.batch.rows();
        let stats = lm_head_cross_entropy_loss(
            &self.normed[..rows * self.d],
            params[1],
            &ctx.batch.labels,
            rows,
            self.d,
            self.vocab,
            &mut self.logits,
        )
        .unwrap_or_else(|e| panic!("lm_head: {e}"));
        flow.loss = Some(LossSum {
            nll: stats.nll_sum,
            tokens: stats.count,
        });
        if ctx.train {
            self.saved = Some((x, rstd));
        }
    }

    fn forward_backward(
        &mut self,
        params: &[&[T]],
        grads: &mut [&mut [f32]],
        flow: &mut Flow<T>,
        ctx: &Ctx,
    ) -> bool {
        if !ctx.train {
            return false;
        }
        let (x, rstd) = self.normalize(params, flow, ctx);
        self.saved = None;
        let (dx, loss) = self.head_backward(params, grads, (&x, &rstd), ctx);
        flow.loss = Some(loss);
        self.dx = Some(dx);
        true
    }

    fn backward(
        &mut self,
        params: &[&[T]],
        grads: &mut [&mut [f32]],
        flow: &mut Flow<T>,
        ctx: &Ctx,
    ) {
        let rows = ctx.batch.rows();
        let dx = match self.dx.take() {
            Some(dx) => dx,
            None => {
                let (x, rstd) = self
                    .saved
                    .take()
                    .expect("lm_head: backward without a training forward");
                // self.normed is the head's own buffer, but recomputing it (elementwise) keeps
                // backward correct even if an evaluation forward ran in between.
                let normed = sized(&mut self.normed, rows * self.d);
                rmsnorm_forward(
                    normed,
                    &mut vec![0f32; rows],
                    &x,
                    params[0],
                    rows,
                    self.d,
                    self.eps,
                );
                self.head_backward(params, grads, (&x, &rstd), ctx).0
            }
        };
        assert_eq!(
            dx.len(),
            rows * self.d,
            "lm_head: backward of another batch than its forward"
        );
        flow.hidden = dx;
    }

    fn clear(&mut self) {
        self.saved = None;
        self.dx = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused_check::assert_fused_matches_unfused;
    use half::bf16;

    /// LLaMA with every optional bias and tied embeddings.
    const LLAMA: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 20, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 100.0,
        "attention_bias": true, "mlp_bias": true, "tie_word_embeddings": true
    }"#;

    /// Qwen2 whose second layer uses a sliding window of 3, untied head.
    const QWEN2: &str = r#"{
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": 20, "hidden_size": 16, "intermediate_size": 24,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
        "use_sliding_window": true, "sliding_window": 3, "max_window_layers": 1,
        "tie_word_embeddings": false
    }"#;

    fn cfg(json: &str) -> ModelConfig {
        ModelConfig::from_json_str("test config.json", json).unwrap()
    }

    fn cfg_with(json: &str, key: &str, value: serde_json::Value) -> ModelConfig {
        let mut v: serde_json::Value = serde_json::from_str(json).unwrap();
        v[key] = value;
        cfg(&v.to_string())
    }

    /// Random weights big enough that every path matters (norm weights around 1).
    fn model<T: Float>(cfg: &ModelConfig, seed: u64) -> Model<T> {
        let mut m = build::<T>(cfg).unwrap();
        let mut rng = NormalRng::new(seed);
        let slots: Vec<_> = m.layout.slots().to_vec();
        for slot in slots {
            let norm = slot.spec.name.ends_with("norm.weight");
            for v in &mut m.params[slot.range()] {
                let z = rng.normal() as f32;
                *v = T::from_f32(if norm { 1.0 + 0.1 * z } else { 0.3 * z });
            }
        }
        m
    }

    fn batch(vocab: usize, b: usize, t: usize, seed: u64) -> Batch {
        let mut rng = NormalRng::new(seed);
        let ids: Vec<u32> = (0..b * t)
            .map(|_| (rng.next_u64() % vocab as u64) as u32)
            .collect();
        let mut labels: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        labels[0] = crate::IGNORE_INDEX;
        labels[b * t - 2] = crate::IGNORE_INDEX;
        Batch::from_hf_labels(b, t, ids, &labels)
    }

    fn to_f32_params<T: Float>(m: &Model<T>) -> Vec<f32> {
        m.params.iter().map(|v| v.to_f32()).collect()
    }

    #[test]
    fn layout_is_transformers_named_parameters() {
        for json in [LLAMA, QWEN2] {
            let cfg = cfg(json);
            let m = build::<f32>(&cfg).unwrap();
            let got: Vec<(String, Vec<usize>)> = m
                .layout
                .slots()
                .iter()
                .map(|s| (s.spec.name.clone(), s.spec.shape.clone()))
                .collect();
            assert_eq!(got, cfg.param_shapes());
        }
        let tied = build::<f32>(&cfg(LLAMA)).unwrap();
        assert!(tied.param(LM_HEAD).is_none());
        assert!(tied.param("model.layers.1.self_attn.o_proj.bias").is_some());
        assert!(tied.param("model.layers.0.mlp.down_proj.bias").is_some());
    }

    /// Central differences of the mean loss against the analytic gradient, a few entries of every
    /// parameter tensor (so every layer's backward, including the tied head and the window).
    fn check_gradients(cfg: &ModelConfig, seed: u64) {
        let mut m = model::<f32>(cfg, seed);
        let b = batch(cfg.vocab_size, 2, 7, seed + 1);
        let loss = m.forward(&b, true, 0);
        let mut grads = vec![0f32; m.params.len()];
        m.backward(&mut grads, &b, 1.0 / loss.tokens as f32, 0);
        let eps = 1e-2f32;
        let mut rng = NormalRng::new(seed + 2);
        let slots: Vec<_> = m.layout.slots().to_vec();
        for slot in slots {
            let range = slot.range();
            let g = &grads[range.clone()];
            let scale = g.iter().fold(0f32, |a, v| a.max(v.abs())).max(1e-3);
            for _ in 0..4 {
                let i = range.start + (rng.next_u64() % range.len() as u64) as usize;
                let orig = m.params[i];
                // Training mode with the same dropout seed: the masks are fixed, so the loss
                // is a deterministic function of the parameters (equal to eval without dropout).
                m.params[i] = orig + eps;
                let plus = m.forward(&b, true, 0).mean();
                m.params[i] = orig - eps;
                let minus = m.forward(&b, true, 0).mean();
                m.params[i] = orig;
                let numeric = ((plus - minus) / (2.0 * eps as f64)) as f32;
                let err = (grads[i] - numeric).abs();
                assert!(
                    err <= 2e-2 * scale,
                    "{}[{}]: analytic {} vs numeric {numeric} (tensor max {scale})",
                    slot.spec.name,
                    i - range.start,
                    grads[i]
                );
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences_llama_biases_tied() {
        check_gradients(&cfg(LLAMA), 11);
    }

    #[test]
    fn gradients_match_finite_differences_qwen2_window_linear_rope() {
        let cfg = cfg(QWEN2);
        assert_eq!(cfg.layer_sliding_window(0), None);
        assert_eq!(cfg.layer_sliding_window(1), Some(3));
        check_gradients(&cfg, 21);
    }

    fn check_fused_matches_unfused(cfg: &ModelConfig, seed: u64) {
        let mut m = model::<f32>(cfg, seed);
        let b = batch(cfg.vocab_size, 2, 7, seed + 1);
        let start: Vec<f32> = (0..m.params.len()).map(|i| (i % 7) as f32 * 0.02).collect();
        assert_fused_matches_unfused(&mut m, &b, &start, 0.29, 3);
    }

    #[test]
    fn fused_head_matches_forward_then_backward_tied() {
        check_fused_matches_unfused(&cfg(LLAMA), 31);
    }

    #[test]
    fn fused_head_matches_forward_then_backward_untied_with_dropout() {
        check_fused_matches_unfused(&cfg_with(QWEN2, "attention_dropout", 0.2.into()), 41);
    }

    #[test]
    fn sliding_window_changes_the_loss_only_beyond_the_window() {
        let with = cfg(QWEN2);
        let without = cfg_with(QWEN2, "use_sliding_window", false.into());
        let mut a = model::<f32>(&with, 3);
        let mut b = build::<f32>(&without).unwrap();
        b.params.copy_from_slice(&a.params);
        let short = batch(20, 2, 3, 4);
        assert_eq!(a.forward(&short, false, 0), b.forward(&short, false, 0));
        let long = batch(20, 2, 9, 4);
        assert_ne!(a.forward(&long, false, 0), b.forward(&long, false, 0));
    }

    #[test]
    fn backward_accumulates_and_zero_dropout_is_deterministic() {
        let cfg = cfg(LLAMA);
        let mut m = model::<f32>(&cfg, 5);
        let b = batch(20, 2, 6, 6);
        let first = m.forward(&b, true, 1);
        let mut once = vec![0f32; m.params.len()];
        m.backward(&mut once, &b, 0.5, 1);
        let second = m.forward(&b, true, 2);
        assert_eq!(first, second);
        assert_eq!(first, m.forward(&b, false, 3));
        let mut twice = once.clone();
        m.backward(&mut twice, &b, 0.5, 2);
        // Accumulating inside the matmul rounds the sum once, so allow f32 rounding.
        let scale = once.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(scale > 0.0);
        for (t, o) in twice.iter().zip(&once) {
            assert!((t - 2.0 * o).abs() <= 1e-6 * scale, "{t} vs 2 x {o}");
        }
    }

    #[test]
    fn logits_give_the_loss() {
        let cfg = cfg(QWEN2);
        let mut m = model::<f32>(&cfg, 7);
        let b = batch(20, 2, 5, 8);
        let loss = m.forward(&b, false, 0);
        let rows: Vec<usize> = (0..b.rows()).collect();
        let all = logits(&mut m, &cfg, &b, &rows).unwrap();
        let mut nll = 0f64;
        for (r, &label) in b.labels.iter().enumerate() {
            if label == crate::IGNORE_INDEX {
                continue;
            }
            let row = &all[r * 20..(r + 1) * 20];
            let max = row.iter().fold(f32::MIN, |a, &v| a.max(v)) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&v| (v as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            nll += lse - row[label as usize] as f64;
        }
        assert!((nll - loss.nll).abs() < 1e-4 * nll, "{nll} vs {}", loss.nll);
        let last = logits(&mut m, &cfg, &b, &[b.rows() - 1]).unwrap();
        assert_eq!(last, all[(b.rows() - 1) * 20..]);
        assert!(logits(&mut m, &cfg, &b, &[b.rows()]).is_err());
    }

    /// bf16 storage with f32 accumulation: loss within 1% and logits within 5% of the largest
    /// logit of the f32 model with the same (bf16-representable) weights.
    #[test]
    fn bf16_forward_is_close_to_f32() {
        let cfg = cfg(LLAMA);
        let m16 = model::<bf16>(&cfg, 9);
        let mut m16 = m16;
        let mut m32 = build::<f32>(&cfg).unwrap();
        m32.params.copy_from_slice(&to_f32_params(&m16));
        let b = batch(20, 2, 8, 10);
        let l32 = m32.forward(&b, false, 0).mean();
        let l16 = m16.forward(&b, false, 0).mean();
        assert!((l32 - l16).abs() < 1e-2 * l32, "bf16 {l16} vs f32 {l32}");
        let rows: Vec<usize> = (0..b.rows()).collect();
        let g32 = logits(&mut m32, &cfg, &b, &rows).unwrap();
        let g16 = logits(&mut m16, &cfg, &b, &rows).unwrap();
        let scale = g32.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (a, b) in g32.iter().zip(&g16) {
            assert!((a - b).abs() < 5e-2 * scale, "{a} vs {b}");
        }
        // Training in bf16 runs end to end and gives finite gradients.
        m16.forward(&b, true, 0);
        let mut grads = vec![0f32; m16.params.len()];
        m16.backward(&mut grads, &b, 0.1, 0);
        assert!(grads.iter().all(|g| g.is_finite()) && grads.iter().any(|&g| g != 0.0));
    }

    #[test]
    fn attention_dropout_is_seeded_and_off_in_evaluation() {
        let cfg = cfg_with(LLAMA, "attention_dropout", 0.3.into());
        assert!(check_trainable(&cfg).is_ok());
        let plain = cfg_with(LLAMA, "attention_dropout", 0.0.into());
        let mut m = model::<f32>(&cfg, 1);
        let mut reference = model::<f32>(&plain, 1);
        let b = batch(20, 2, 6, 2);
        let eval = m.forward(&b, false, 0);
        assert_eq!(
            eval,
            reference.forward(&b, false, 0),
            "evaluation never drops"
        );
        let a = m.forward(&b, true, 7);
        let again = m.forward(&b, true, 7);
        let other = m.forward(&b, true, 8);
        assert_eq!(a, again, "same seed, same masks");
        assert_ne!(a, other, "another seed draws other masks");
        assert_ne!(a, eval, "training drops attention probabilities");
    }

    #[test]
    fn gradients_match_finite_differences_with_attention_dropout() {
        check_gradients(&cfg_with(LLAMA, "attention_dropout", 0.3.into()), 5);
    }

    #[test]
    fn unsupported_configs_are_named() {
        let gelu = cfg_with(LLAMA, "hidden_act", "gelu".into());
        let err = build::<f32>(&gelu).err().unwrap().to_string();
        assert!(err.contains("hidden_act") && err.contains("Gelu"), "{err}");
        let gpt2 = ModelConfig::from_json_str(
            "gpt2.json",
            r#"{"model_type": "gpt2", "n_embd": 16, "n_head": 2, "n_layer": 1,
                "vocab_size": 20, "n_positions": 8}"#,
        )
        .unwrap();
        let err = build::<f32>(&gpt2).err().unwrap().to_string();
        assert!(err.contains("GPT2LMHeadModel"), "{err}");
    }

    #[test]
    fn init_weights_follow_hf_and_are_seeded() {
        let cfg = cfg(LLAMA);
        let mut a = build::<f32>(&cfg).unwrap();
        init_weights(&mut a, &cfg, 42);
        let mut b = build::<f32>(&cfg).unwrap();
        init_weights(&mut b, &cfg, 42);
        assert_eq!(a.params, b.params);
        init_weights(&mut b, &cfg, 43);
        assert_ne!(a.params, b.params);
        assert!(a
            .param("model.norm.weight")
            .unwrap()
            .iter()
            .all(|&v| v == 1.0));
        let bias = a.param("model.layers.0.self_attn.q_proj.bias").unwrap();
        assert!(bias.iter().all(|&v| v == 0.0));
        // A large tensor's sample mean and standard deviation.
        let w: Vec<f32> = a
            .layout
            .slots()
            .iter()
            .filter(|s| s.spec.name.ends_with("proj.weight"))
            .flat_map(|s| a.params[s.range()].to_vec())
            .collect();
        let n = w.len() as f64;
        let mean = w.iter().map(|&v| v as f64).sum::<f64>() / n;
        let std = (w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((std - 0.02).abs() < 1e-3, "std {std}");
    }

    #[test]
    fn name_rules_skip_tied_head_and_rotary_buffers() {
        let tied = name_rules(&cfg(LLAMA));
        assert!(tied.ignore.contains(&LM_HEAD.to_string()));
        assert!(tied.ignore.contains(&".rotary_emb.inv_freq".to_string()));
        assert!(!name_rules(&cfg(QWEN2))
            .ignore
            .contains(&LM_HEAD.to_string()));
    }
}
