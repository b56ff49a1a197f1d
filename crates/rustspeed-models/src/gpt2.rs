//! GPT-2 (`GPT2LMHeadModel`) on the layer protocol: an embedding layer (`wte` + `wpe` + dropout),
//! one layer per transformer block `transformer.h.{i}`, and a head (`ln_f`, the LM head tied to
//! `wte` unless the config unties it, and the chunked fused cross-entropy).
//!
//! Parameter names, shapes and order are transformers' `named_parameters()`; the Conv1D weights
//! are stored `[in, out]` as in the checkpoints.
//!
//! Dropout masks come from [`rustspeed_kernels::dropout`]: the key of a site is
//! `(ctx.dropout_seed, layer index in the model, site)`, so backward and a recomputed forward
//! regenerate the mask instead of storing it. Sites: block 0 = after `attn.c_proj`, 1 = after
//! `mlp.c_proj`, 2 = the attention probabilities (`attn_pdrop`, applied inside the tiled
//! attention kernel, which regenerates its `T x T` mask in backward); embedding 0.

use std::sync::{Arc, Mutex, MutexGuard};

use rustspeed_kernels::activation::{
    gelu_erf_backward, gelu_erf_forward, gelu_tanh_backward, gelu_tanh_forward, silu_backward,
    silu_forward,
};
use rustspeed_kernels::attention::{attention_backward, attention_forward, AttnSpec};
use rustspeed_kernels::cross_entropy::{
    lm_head_cross_entropy, lm_head_cross_entropy_loss, lm_head_logits,
};
use rustspeed_kernels::dropout::{dropout_inplace, dropout_key};
use rustspeed_kernels::embedding::{embedding_backward, embedding_forward};
use rustspeed_kernels::layernorm::{layernorm_backward, layernorm_forward};
use rustspeed_kernels::matmul::WeightLayout;
use rustspeed_kernels::residual::residual_forward;
use rustspeed_kernels::Float;

use crate::error::ModelError;
use crate::hf_config::{Activation, Architecture, ModelConfig};
use crate::init::{name_hash, NormalRng};
use crate::layer::{Batch, Ctx, Flow, Layer, LossSum};
use crate::linear::{grad_if, Linear, QuantTarget};
use crate::model::Model;
use crate::params::ParamSpec;
use crate::peft::prefix::{self, PrefixLink, PrefixSaved};
use crate::peft::prompt::{self, PromptLayer};
use crate::tuning::Tuning;
use crate::weights::NameRules;

const WTE: &str = "transformer.wte.weight";
const WPE: &str = "transformer.wpe.weight";
const LN_F_WEIGHT: &str = "transformer.ln_f.weight";
const LN_F_BIAS: &str = "transformer.ln_f.bias";
const LM_HEAD: &str = "lm_head.weight";

/// Dropout sites of a block (see the module docs).
const SITE_ATTN_RESID: u64 = 0;
const SITE_MLP_RESID: u64 = 1;
const SITE_ATTN_PROBS: u64 = 2;
const SITE_EMBEDDING: u64 = 0;

/// The sizes every GPT-2 layer needs.
#[derive(Clone, Copy, Debug)]
struct Dims {
    d: usize,
    heads: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
    max_positions: usize,
    eps: f32,
    activation: Activation,
    embd_pdrop: f32,
    resid_pdrop: f32,
    attn_pdrop: f32,
}

impl Dims {
    fn from_config(cfg: &ModelConfig) -> Self {
        Dims {
            d: cfg.hidden_size,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim,
            ffn: cfg.intermediate_size,
            vocab: cfg.vocab_size,
            max_positions: cfg.max_position_embeddings,
            eps: cfg.norm_eps as f32,
            activation: cfg.activation,
            embd_pdrop: cfg.dropout.embedding,
            resid_pdrop: cfg.dropout.residual,
            attn_pdrop: cfg.dropout.attention,
        }
    }
}

/// Whether this implementation can train the configuration faithfully, as
/// `llama::check_trainable` for the LLaMA family. Every GPT-2 configuration that parses is
/// trainable: all three dropouts (`embd_pdrop`, `resid_pdrop`, `attn_pdrop`) are implemented and
/// their range was checked when the config was read.
pub fn check_trainable(_cfg: &ModelConfig) -> Result<(), ModelError> {
    Ok(())
}

/// Builds `GPT2LMHeadModel` with zeroed parameters (fill them with [`init_weights`] or
/// `load_hf_weights` and [`name_rules`]).
pub fn build<T: Float>(cfg: &ModelConfig) -> Result<Model<T>, ModelError> {
    build_tuned(cfg, &Tuning::full())
}

/// [`build`] for `tuning`: LoRA adapters on the modules it targets (parameters
/// `<module>.lora_A.weight` `[r, in]` and `.lora_B.weight` `[out, r]` after the module's own),
/// and every parameter's `trainable` flag as it says.
pub fn build_tuned<T: Float>(cfg: &ModelConfig, tuning: &Tuning) -> Result<Model<T>, ModelError> {
    if cfg.architecture != Architecture::Gpt2 {
        return Err(ModelError::Unsupported {
            what: "architecture".into(),
            value: cfg.architecture.hf_class().into(),
            hint: Some("gpt2::build builds GPT2LMHeadModel only".into()),
        });
    }
    if cfg.num_attention_heads == 0
        || cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size
        || cfg.num_key_value_heads != cfg.num_attention_heads
    {
        return Err(ModelError::Unsupported {
            what: "n_head".into(),
            value: cfg.num_attention_heads.to_string(),
            hint: Some(format!(
                "GPT-2 needs n_embd ({}) = n_head * head_dim and no grouped-query heads",
                cfg.hidden_size
            )),
        });
    }
    let dims = Dims::from_config(cfg);
    let scratch = Arc::new(Mutex::new(Scratch::default()));
    let mut layers: Vec<Box<dyn Layer<T>>> = Vec::with_capacity(cfg.num_hidden_layers + 2);
    let plan = tuning.prompt_plan();
    let shared = plan
        .as_ref()
        .filter(|_| tuning.prefix_tokens() > 0)
        .map(|p| prefix::shared(p.n, p.width));
    layers.push(Box::new(Embedding {
        dims,
        index: 0,
        positions: Vec::new(),
        train: [tuning.trainable(WTE), tuning.trainable(WPE)],
        prompt: plan.map(|p| PromptLayer::new(p, 2, shared.clone())),
        position_offset: tuning.prefix_tokens(),
    }));
    for i in 0..cfg.num_hidden_layers {
        let mut block = Block::new(
            format!("transformer.h.{i}"),
            dims,
            i + 1,
            tuning,
            Arc::clone(&scratch),
        );
        block.prefix = shared.clone().map(|shared| PrefixLink {
            shared,
            layer: i,
            kv_dim: dims.d,
        });
        layers.push(Box::new(block));
    }
    let head_weight = if cfg.tie_word_embeddings {
        WTE
    } else {
        LM_HEAD
    };
    layers.push(Box::new(Head {
        dims,
        tied: cfg.tie_word_embeddings,
        train: [
            tuning.trainable(LN_F_WEIGHT),
            tuning.trainable(LN_F_BIAS),
            tuning.trainable(head_weight),
        ],
        x: Vec::new(),
        normed: Vec::new(),
        mean: Vec::new(),
        rstd: Vec::new(),
        dnormed: Vec::new(),
        dx: None,
        logits: Vec::new(),
    }));
    let mut model = Model::new(layers)?;
    model.tuning = tuning.clone();
    Ok(model)
}

/// What GPT-2 checkpoints hold besides the parameters: the causal-mask buffers `.attn.bias` and
/// `.attn.masked_bias` of older transformers versions, a tied `lm_head.weight` saved anyway, and
/// names without the `transformer.` prefix (the original OpenAI conversion).
pub fn name_rules(cfg: &ModelConfig) -> NameRules {
    let mut ignore = vec![".attn.bias".to_string(), ".attn.masked_bias".to_string()];
    if cfg.tie_word_embeddings {
        ignore.push(LM_HEAD.to_string());
    }
    NameRules {
        ignore,
        optional_prefix: Some("transformer.".into()),
    }
}

/// HF's `GPT2PreTrainedModel._init_weights` with the config's `initializer_range` r (0.02 in
/// every published GPT-2 config): weights of Conv1D, Linear and Embedding ~ N(0, r), biases 0,
/// LayerNorm weight 1, and every `c_proj.weight` ~ N(0, r / sqrt(2 * n_layer)).
///
/// The generator: each parameter draws from its own splitmix64 stream seeded by `seed` and an
/// FNV-1a hash of its name, through Box-Muller on 53-bit uniforms; so a parameter's values do
/// not depend on which other parameters exist or in which order they are initialised.
pub fn init_weights<T: Float>(model: &mut Model<T>, cfg: &ModelConfig, seed: u64) {
    let range = cfg.initializer_range;
    let proj_std = range / (2.0 * cfg.num_hidden_layers.max(1) as f64).sqrt();
    let slots: Vec<_> = model.layout.slots().to_vec();
    for slot in slots {
        let name = slot.spec.name.as_str();
        let values = &mut model.params[slot.range()];
        let is_norm = name.contains(".ln_");
        if name.ends_with(".bias") {
            values.fill(T::from_f32(0.0));
        } else if is_norm {
            values.fill(T::from_f32(1.0));
        } else {
            let std = if name.ends_with("c_proj.weight") {
                proj_std
            } else {
                range
            };
            let mut rng = NormalRng::new(seed ^ name_hash(name).rotate_left(17));
            for v in values.iter_mut() {
                *v = T::from_f32((rng.normal() * std) as f32);
            }
        }
    }
}

/// The f32 logits `[rows.len(), vocab]` of the given rows (`b * seq_len + t`) of `batch`: every
/// layer but the head runs in evaluation mode, then `ln_f` and the LM head. For parity tests
/// (all rows) and generation (the last row of each sequence).
pub fn logits<T: Float>(
    model: &mut Model<T>,
    cfg: &ModelConfig,
    batch: &Batch,
    rows: &[usize],
) -> Vec<f32> {
    let n = batch.rows();
    if let Some(&bad) = rows.iter().find(|&&r| r >= n) {
        panic!("gpt2::logits: row {bad} requested, the batch has {n} rows");
    }
    let flow = model.forward_to_head(batch);
    let d = cfg.hidden_size;
    let weight_name = if cfg.tie_word_embeddings {
        WTE
    } else {
        LM_HEAD
    };
    let param = |name: &str| {
        model
            .param(name)
            .unwrap_or_else(|| panic!("gpt2::logits: the model has no parameter `{name}`"))
    };
    let mut normed = vec![T::default(); n * d];
    let (mut mean, mut rstd) = (vec![0f32; n], vec![0f32; n]);
    layernorm_forward(
        &mut normed,
        &mut mean,
        &mut rstd,
        &flow.hidden,
        param(LN_F_WEIGHT),
        param(LN_F_BIAS),
        n,
        d,
        cfg.norm_eps as f32,
    );
    let mut out = vec![0f32; rows.len() * cfg.vocab_size];
    lm_head_logits(
        &mut out,
        &normed,
        param(weight_name),
        rows,
        d,
        cfg.vocab_size,
    )
    .expect("rows were checked above");
    out
}

/// Position ids `offset..offset + seq_len` for every sequence (HF's default without
/// `position_ids`: the cache length, prefix tuning's prefix, onwards).
fn fill_positions(positions: &mut Vec<u32>, batch: &Batch, offset: usize) {
    positions.clear();
    for _ in 0..batch.batch_size {
        positions.extend(offset as u32..(offset + batch.seq_len) as u32);
    }
}

/// `transformer.wte` + `transformer.wpe`, then embedding dropout.
struct Embedding {
    dims: Dims,
    index: usize,
    positions: Vec<u32>,
    /// Whether `wte` and `wpe` train.
    train: [bool; 2],
    /// Prompt learning's parameters (after `wte` and `wpe`).
    prompt: Option<PromptLayer>,
    /// Where the tokens' positions start: prefix tuning's prefix length, else 0.
    position_offset: usize,
}

impl Embedding {
    fn virtual_tokens(&self) -> usize {
        self.prompt.as_ref().map_or(0, |p| p.virtual_tokens())
    }

    fn check_batch(&self, batch: &Batch) {
        assert!(
            batch.seq_len + self.position_offset <= self.dims.max_positions,
            "GPT-2: sequence length {} (after a prefix of {}) exceeds n_positions = {}",
            batch.seq_len,
            self.position_offset,
            self.dims.max_positions
        );
        assert_eq!(
            batch.input_ids.len(),
            batch.rows(),
            "GPT-2: input_ids length"
        );
    }
}

impl<T: Float> Layer<T> for Embedding {
    fn name(&self) -> &str {
        "transformer.wte+wpe"
    }

    fn own_params(&self) -> Vec<ParamSpec> {
        let d = self.dims.d;
        let mut specs = vec![
            ParamSpec::new(WTE, &[self.dims.vocab, d]).with_trainable(self.train[0]),
            ParamSpec::new(WPE, &[self.dims.max_positions, d]).with_trainable(self.train[1]),
        ];
        if let Some(p) = &self.prompt {
            specs.extend(p.specs());
        }
        specs
    }

    fn forward(&mut self, params: &[&[T]], flow: &mut Flow<T>, ctx: &Ctx) {
        let batch = ctx.batch;
        self.check_batch(batch);
        fill_positions(&mut self.positions, batch, self.position_offset);
        let d = self.dims.d;
        flow.hidden.resize(batch.rows() * d, T::default());
        flow.loss = None;
        let n = self.virtual_tokens();
        let real;
        let ids = if n > 0 {
            real = prompt::real_ids(batch, n, "GPT-2 embedding");
            &real
        } else {
            &batch.input_ids
        };
        embedding_forward(
            &mut flow.hidden,
            ids,
            params[0],
            Some((params[1], &self.positions)),
            d,
        )
        .unwrap_or_else(|e| panic!("GPT-2 embedding: {e}"));
        if let Some(rows) = self.prompt.as_ref().and_then(|p| p.forward(params)) {
            // HF GPT-2 adds wpe to inputs_embeds, virtual tokens included.
            prompt::place_prompt(
                &mut flow.hidden,
                &rows,
                Some(params[1]),
                batch.seq_len,
                n,
                d,
            );
        }
        if ctx.train {
            let key = dropout_key(ctx.dropout_seed, self.index as u64, SITE_EMBEDDING);
            dropout_inplace(&mut flow.hidden, self.dims.embd_pdrop, key, 0);
        }
    }

    fn backward(
        &mut self,
        params: &[&[T]],
        grads: &mut [&mut [f32]],
        flow: &mut Flow<T>,
        ctx: &Ctx,
    ) {
        let batch = ctx.batch;
        self.check_batch(batch);
        if self.train == [false, false] && self.prompt.is_none() {
            flow.hidden.clear();
            return;
        }
        fill_positions(&mut self.positions, batch, self.position_offset);
        let key = dropout_key(ctx.dropout_seed, self.index as u64, SITE_EMBEDDING);
        dropout_inplace(&mut flow.hidden, self.dims.embd_pdrop, key, 0);
        let d = self.dims.d;
        if let Some(p) = &self.prompt {
            p.backward(params, grads, &flow.hidden, batch.seq_len);
            // Prompt learning freezes wte (its ids at virtual positions are placeholders).
            assert!(
                !self.train[0],
                "GPT-2 embedding: wte trains only without a prompt"
            );
        }
        let (wte, wpe) = pair(grads, 0);
        if self.train[0] {
            embedding_backward(wte, &batch.input_ids, &flow.hidden, d)
                .unwrap_or_else(|e| panic!("GPT-2 embedding backward: {e}"));
        }
        if self.train[1] {
            embedding_backward(wpe, &self.positions, &flow.hidden, d)
                .unwrap_or_else(|e| panic!("GPT-2 embedding backward: {e}"));
        }
        // The token ids have no gradient.
        flow.hidden.clear();
    }

    fn clear(&mut self) {
        self.positions = Vec::new();
    }
}

/// What a block's forward keeps for its backward.
#[derive(Default)]
struct Acts<T> {
    /// The block's input (the residual stream).
    x: Vec<T>,
    ln1: Vec<T>,
    mean1: Vec<f32>,
    rstd1: Vec<f32>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    att: Vec<T>,
    lse: Vec<f32>,
    /// The residual stream after the attention branch.
    x2: Vec<T>,
    ln2: Vec<T>,
    mean2: Vec<f32>,
    rstd2: Vec<f32>,
    fc: Vec<T>,
    act: Vec<T>,
    /// The attention's `n + T` rows under prefix tuning.
    prefix: PrefixSaved<T>,
}

/// Temporaries shared by all blocks of a model (the blocks run one at a time): the fused qkv
/// projection, branch outputs, backward's gradient buffers, and the activations of evaluation
/// forwards, which nothing keeps. Sharing keeps their capacity across calls without one copy
/// per block.
#[derive(Default)]
struct Scratch<T> {
    qkv: Vec<T>,
    branch: Vec<T>,
    eval: Acts<T>,
    dbranch: Vec<T>,
    dffn: Vec<T>,
    dd: Vec<T>,
    dq: Vec<T>,
    dk: Vec<T>,
    dv: Vec<T>,
    dqkv: Vec<T>,
}

/// `transformer.h.{i}`: `x + drop(attn(ln_1(x)))`, then `+ drop(mlp(ln_2(.)))`.
struct Block<T> {
    name: String,
    dims: Dims,
    index: usize,
    acts: Acts<T>,
    scratch: Arc<Mutex<Scratch<T>>>,
    /// The parameters in transformers' order (each Conv1D's LoRA after its weight and bias).
    specs: Vec<ParamSpec>,
    /// `ln_1` and `ln_2`: indices of weight and bias.
    ln1: [usize; 2],
    ln2: [usize; 2],
    c_attn: Linear,
    c_proj: Linear,
    c_fc: Linear,
    mlp_proj: Linear,
    /// Prefix tuning's keys and values for this layer.
    prefix: Option<PrefixLink>,
}

impl<T: Float> Block<T> {
    fn new(
        name: String,
        dims: Dims,
        index: usize,
        tuning: &Tuning,
        scratch: Arc<Mutex<Scratch<T>>>,
    ) -> Self {
        let Dims { d, ffn, .. } = dims;
        let mut specs = Vec::new();
        let norm = |specs: &mut Vec<ParamSpec>, module: &str| {
            let mut ids = [0; 2];
            for (k, p) in ["weight", "bias"].iter().enumerate() {
                let name = format!("{name}.{module}.{p}");
                let trainable = tuning.trainable(&name);
                ids[k] = specs.len();
                specs.push(ParamSpec::new(name, &[d]).with_trainable(trainable));
            }
            ids
        };
        let conv = |specs: &mut Vec<ParamSpec>, module: &str, inp, out, site| {
            let module = format!("{name}.{module}");
            Linear::declare(
                specs,
                &module,
                inp,
                out,
                WeightLayout::InOut,
                true,
                tuning,
                site,
            )
        };
        let ln1 = norm(&mut specs, "ln_1");
        let c_attn = conv(&mut specs, "attn.c_attn", d, 3 * d, 0);
        let c_proj = conv(&mut specs, "attn.c_proj", d, d, 1);
        let ln2 = norm(&mut specs, "ln_2");
        let c_fc = conv(&mut specs, "mlp.c_fc", d, ffn, 2);
        let mlp_proj = conv(&mut specs, "mlp.c_proj", ffn, d, 3);
        Block {
            name,
            dims,
            index,
            acts: Acts::default(),
            scratch,
            specs,
            ln1,
            ln2,
            c_attn,
            c_proj,
            c_fc,
            mlp_proj,
            prefix: None,
        }
    }
}

/// The gradient views of a norm's weight and bias (`ids`), `None` where frozen.
fn norm_grads<'a>(
    specs: &[ParamSpec],
    grads: &'a mut [&mut [f32]],
    ids: [usize; 2],
) -> (Option<&'a mut [f32]>, Option<&'a mut [f32]>) {
    debug_assert_eq!(ids[1], ids[0] + 1);
    let (w, b) = pair(grads, ids[0]);
    (
        specs[ids[0]].trainable.then_some(w),
        specs[ids[1]].trainable.then_some(b),
    )
}

/// Resizes a buffer whose contents will be overwritten.
fn sized<T: Copy + Default>(v: &mut Vec<T>, n: usize) -> &mut [T] {
    v.resize(n, T::default());
    &mut v[..]
}

/// Two consecutive gradient views (a weight and its bias).
fn pair<'a>(grads: &'a mut [&mut [f32]], i: usize) -> (&'a mut [f32], &'a mut [f32]) {
    let (a, b) = grads.split_at_mut(i + 1);
    (&mut *a[i], &mut *b[0])
}

fn act_forward<T: Float>(activation: Activation, out: &mut [T], x: &[T]) {
    match activation {
        Activation::GeluTanh => gelu_tanh_forward(out, x),
        Activation::Gelu => gelu_erf_forward(out, x),
        Activation::Silu => silu_forward(out, x),
    }
}

fn act_backward<T: Float>(activation: Activation, dx: &mut [T], x: &[T], dout: &[T]) {
    match activation {
        Activation::GeluTanh => gelu_tanh_backward(dx, x, dout),
        Activation::Gelu => gelu_erf_backward(dx, x, dout),
        Activation::Silu => silu_backward(dx, x, dout),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic in another block's kernel leaves only scratch contents behind, which every use
    // overwrites, so a poisoned lock is safe to reuse.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: Float> Block<T> {
    /// The attention call; `train` turns on attention-probability dropout (`attn_pdrop`),
    /// keyed like the block's other dropouts so that backward regenerates the same mask.
    fn attn_spec(&self, ctx: &Ctx, train: bool) -> AttnSpec {
        let dm = &self.dims;
        let spec = AttnSpec::new(
            ctx.batch.batch_size,
            ctx.batch.seq_len,
            dm.heads,
            dm.heads,
            dm.head_dim,
        );
        if train {
            let key = dropout_key(ctx.dropout_seed, self.index as u64, SITE_ATTN_PROBS);
            spec.with_dropout(dm.attn_pdrop, key)
        } else {
            spec
        }
    }

    /// The forward pass into `acts`; `flow.hidden` is swapped into `acts.x` and replaced by the
    /// block's output.
    fn run_forward(
        &self,
        acts: &mut Acts<T>,
        qkv: &mut Vec<T>,
        branch: &mut Vec<T>,
        params: &[&[T]],
        flow: &mut Flow<T>,
        ctx: &Ctx,
    ) {
        let Dims { d, ffn, eps, .. } = self.dims;
        let n = ctx.batch.rows();
        assert_eq!(
            flow.hidden.len(),
            n * d,
            "{}: input has {} elements, expected rows*n_embd = {n}*{d}",
            self.name,
            flow.hidden.len()
        );
        std::mem::swap(&mut acts.x, &mut flow.hidden);
        let x = &acts.x;

        let index = self.index;
        layernorm_forward(
            sized(&mut acts.ln1, n * d),
            sized(&mut acts.mean1, n),
            sized(&mut acts.rstd1, n),
            x,
            params[self.ln1[0]],
            params[self.ln1[1]],
            n,
            d,
            eps,
        );
        let qkv = sized(qkv, n * 3 * d);
        self.c_attn
            .forward(qkv, &acts.ln1, params, n, false, ctx, index);
        let (q, k, v) = (
            sized(&mut acts.q, n * d),
            sized(&mut acts.k, n * d),
            sized(&mut acts.v, n * d),
        );
        for (r, row) in qkv.chunks_exact(3 * d).enumerate() {
            q[r * d..(r + 1) * d].copy_from_slice(&row[..d]);
            k[r * d..(r + 1) * d].copy_from_slice(&row[d..2 * d]);
            v[r * d..(r + 1) * d].copy_from_slice(&row[2 * d..]);
        }
        let spec = self.attn_spec(ctx, ctx.train);
        match &self.prefix {
            None => attention_forward(
                sized(&mut acts.att, n * d),
                sized(&mut acts.lse, spec.lse_len()),
                &acts.q,
                &acts.k,
                &acts.v,
                &spec,
            ),
            Some(link) => link.attention_forward(
                sized(&mut acts.att, n * d),
                &mut acts.prefix,
                &acts.q,
                &acts.k,
                &acts.v,
                &spec,
            ),
        }
        .unwrap_or_else(|e| panic!("{}: {e}", self.name));
        let branch = sized(branch, n * d);
        self.c_proj
            .forward(branch, &acts.att, params, n, false, ctx, index);
        if ctx.train {
            let key = dropout_key(ctx.dropout_seed, self.index as u64, SITE_ATTN_RESID);
            dropout_inplace(branch, self.dims.resid_pdrop, key, 0);
        }
        residual_forward(sized(&mut acts.x2, n * d), x, branch);

        layernorm_forward(
            sized(&mut acts.ln2, n * d),
            sized(&mut acts.mean2, n),
            sized(&mut acts.rstd2, n),
            &acts.x2,
            params[self.ln2[0]],
            params[self.ln2[1]],
            n,
            d,
            eps,
        );
        self.c_fc.forward(
            sized(&mut acts.fc, n * ffn),
            &acts.ln2,
            params,
            n,
            false,
            ctx,
            index,
        );
        act_forward(
            self.dims.activation,
            sized(&mut acts.act, n * ffn),
            &acts.fc,
        );
        self.mlp_proj
            .forward(branch, &acts.act, params, n, false, ctx, index);
        if ctx.train {
            let key = dropout_key(ctx.dropout_seed, self.index as u64, SITE_MLP_RESID);
            dropout_inplace(branch, self.dims.resid_pdrop, key, 0);
        }
        residual_forward(sized(&mut flow.hidden, n * d), &acts.x2, branch);
    }
}

impl<T: Float> Layer<T> for Block<T> {
    fn name(&self) -> &str {
        &self.name
    }

    fn own_params(&self) -> Vec<ParamSpec> {
        self.specs.clone()
    }

    fn quantized(&self) -> Vec<QuantTarget> {
        [&self.c_attn, &self.c_proj, &self.c_fc, &self.mlp_proj]
            .into_iter()
            .filter_map(Linear::quant_target)
            .collect()
    }

    fn forward(&mut self, params: &[&[T]], flow: &mut Flow<T>, ctx: &Ctx) {
        let scratch = Arc::clone(&self.scratch);
        let mut guard = lock(&scratch);
        let s = &mut *guard;
        if ctx.train {
            let mut acts = std::mem::take(&mut self.acts);
            self.run_forward(&mut acts, &mut s.qkv, &mut s.branch, params, flow, ctx);
            self.acts = acts;
        } else {
            self.run_forward(&mut s.eval, &mut s.qkv, &mut s.branch, params, flow, ctx);
        }
    }

    fn backward(
        &mut self,
        params: &[&[T]],
        grads: &mut [&mut [f32]],
        flow: &mut Flow<T>,
        ctx: &Ctx,
    ) {
        let Dims { d, ffn, .. } = self.dims;
        let n = ctx.batch.rows();
        // Backward only follows a training forward, whose attention dropped.
        let spec = self.attn_spec(ctx, true);
        let a = &mut self.acts;
        assert_eq!(
            a.x.len(),
            n * d,
            "{}: backward without a training forward",
            self.name
        );
        let g = &mut flow.hidden;
        assert_eq!(g.len(), n * d, "{}: output gradient size", self.name);
        let scratch = Arc::clone(&self.scratch);
        let mut guard = lock(&scratch);
        let s = &mut *guard;
        let seed = ctx.dropout_seed;
        let index = self.index as u64;

        // MLP branch: out = x2 + drop(c_proj(act(c_fc(ln_2(x2))))).
        let dbranch = sized(&mut s.dbranch, n * d);
        dbranch.copy_from_slice(g);
        let key = dropout_key(seed, index, SITE_MLP_RESID);
        dropout_inplace(dbranch, self.dims.resid_pdrop, key, 0);
        let dffn = sized(&mut s.dffn, n * ffn);
        let i = self.index;
        #[rustfmt::skip]
        self.mlp_proj.backward(Some(&mut *dffn), false, dbranch, &a.act, params, grads, n, ctx, i);
        // `act` is dead from here on: it receives the gradient of `fc`.
        let mut dfc = std::mem::take(&mut a.act);
        act_backward(self.dims.activation, &mut dfc, &a.fc, dffn);
        let dd = sized(&mut s.dd, n * d);
        #[rustfmt::skip]
        self.c_fc.backward(Some(&mut *dd), false, &dfc, &a.ln2, params, grads, n, ctx, i);
        let (gw, gb) = norm_grads(&self.specs, grads, self.ln2);
        layernorm_backward(
            g,
            true,
            gw,
            gb,
            dd,
            &a.x2,
            params[self.ln2[0]],
            &a.mean2,
            &a.rstd2,
            n,
            d,
        );

        // Attention branch: x2 = x + drop(c_proj(attn(split(c_attn(ln_1(x)))))).
        dbranch.copy_from_slice(g);
        let key = dropout_key(seed, index, SITE_ATTN_RESID);
        dropout_inplace(dbranch, self.dims.resid_pdrop, key, 0);
        #[rustfmt::skip]
        self.c_proj.backward(Some(&mut *dd), false, dbranch, &a.att, params, grads, n, ctx, i);
        let (dq, dk, dv) = (
            sized(&mut s.dq, n * d),
            sized(&mut s.dk, n * d),
            sized(&mut s.dv, n * d),
        );
        match &self.prefix {
            None => attention_backward(dq, dk, dv, dd, &a.q, &a.k, &a.v, &a.att, &a.lse, &spec),
            Some(link) => link.attention_backward(dq, dk, dv, dd, &a.prefix, &spec),
        }
        .unwrap_or_else(|e| panic!("{}: {e}", self.name));
        let dqkv = sized(&mut s.dqkv, n * 3 * d);
        for (r, row) in dqkv.chunks_exact_mut(3 * d).enumerate() {
            row[..d].copy_from_slice(&dq[r * d..(r + 1) * d]);
            row[d..2 * d].copy_from_slice(&dk[r * d..(r + 1) * d]);
            row[2 * d..].copy_from_slice(&dv[r * d..(r + 1) * d]);
        }
        #[rustfmt::skip]
        self.c_attn.backward(Some(&mut *dd), false, dqkv, &a.ln1, params, grads, n, ctx, i);
        let (gw, gb) = norm_grads(&self.specs, grads, self.ln1);
        layernorm_backward(
            g,
            true,
            gw,
            gb,
            dd,
            &a.x,
            params[self.ln1[0]],
            &a.mean1,
            &a.rstd1,
            n,
            d,
        );
    }

    fn clear(&mut self) {
        self.acts = Acts::default();
    }
}

/// `transformer.ln_f`, the LM head (tied to `wte` or its own `lm_head.weight`) and the loss.
///
/// Training goes through `forward_backward` when the caller knows the gradient scale: one pass
/// of the fused head + cross-entropy kernel gives the loss and every gradient, and only the
/// input gradient waits for `backward`. Plain `forward` computes the loss only, and its
/// `backward` then recomputes the logits chunk by chunk (keeping the logits of every position
/// between the two passes is what the chunked kernel exists to avoid).
struct Head<T> {
    dims: Dims,
    tied: bool,
    /// Whether `ln_f.weight`, `ln_f.bias` and the head weight (tied or own) train.
    train: [bool; 3],
    x: Vec<T>,
    normed: Vec<T>,
    mean: Vec<f32>,
    rstd: Vec<f32>,
    dnormed: Vec<T>,
    /// The input gradient `forward_backward` computed, for `backward` to hand back.
    dx: Option<Vec<T>>,
    /// One chunk of f32 logits, reused across calls.
    logits: Vec<f32>,
}

impl<T: Float> Head<T> {
    /// `ln_f` of `flow.hidden` into `self.normed` (keeping the input in `self.x`).
    fn normalize(&mut self, params: &[&[T]], flow: &mut Flow<T>, ctx: &Ctx) {
        let Dims { d, eps, .. } = self.dims;
        let n = ctx.batch.rows();
        assert_eq!(flow.hidden.len(), n * d, "lm_head: input size");
        assert_eq!(ctx.batch.labels.len(), n, "lm_head: labels length");
        std::mem::swap(&mut self.x, &mut flow.hidden);
        flow.hidden.clear();
        self.dx = None;
        layernorm_forward(
            sized(&mut self.normed, n * d),
            sized(&mut self.mean, n),
            sized(&mut self.rstd, n),
            &self.x,
            params[0],
            params[1],
            n,
            d,
            eps,
        );
    }

    /// The fused kernel over `self.normed` (`grads`: ln_f weight, ln_f bias, head weight), then
    /// `ln_f`'s backward; returns the input gradient and the loss.
    fn head_backward(
        &mut self,
        params: &[&[T]],
        grads: &mut [&mut [f32]],
        ctx: &Ctx,
    ) -> (Vec<T>, LossSum) {
        let Dims { d, vocab, .. } = self.dims;
        let n = ctx.batch.rows();
        assert_eq!(self.x.len(), n * d, "lm_head: backward without a forward");
        let (ln, head) = grads.split_at_mut(2);
        let stats = lm_head_cross_entropy(
            sized(&mut self.dnormed, n * d),
            grad_if(head, 0, self.train[2]),
            &self.normed,
            params[2],
            &ctx.batch.labels,
            n,
            d,
            vocab,
            ctx.grad_scale,
            &mut self.logits,
        )
        .unwrap_or_else(|e| panic!("lm_head: {e}"));
        let (gw, gb) = pair(ln, 0);
        let mut dx = vec![T::default(); n * d];
        layernorm_backward(
            &mut dx,
            false,
            self.train[0].then_some(gw),
            self.train[1].then_some(gb),
            &self.dnormed,
            &self.x,
            params[0],
            &self.mean,
            &self.rstd,
            n,
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
        let d = self.dims.d;
        let mut own = vec![
            ParamSpec::new(LN_F_WEIGHT, &[d]).with_trainable(self.train[0]),
            ParamSpec::new(LN_F_BIAS, &[d]).with_trainable(self.train[1]),
        ];
        if !self.tied {
            own.push(ParamSpec::new(LM_HEAD, &[self.dims.vocab, d]).with_trainable(self.train[2]));
        }
        own
    }

    fn tied_params(&self) -> Vec<String> {
        if self.tied {
            vec![WTE.to_string()]
        } else {
            Vec::new()
        }
    }

    fn forward(&mut self, params: &[&[T]], flow: &mut Flow<T>, ctx: &Ctx) {
        self.normalize(params, flow, ctx);
        let Dims { d, vocab, .. } = self.dims;
        let stats = lm_head_cross_entropy_loss(
            &self.normed,
            params[2],
            &ctx.batch.labels,
            ctx.batch.rows(),
            d,
            vocab,
            &mut self.logits,
        )
        .unwrap_or_else(|e| panic!("lm_head: {e}"));
        flow.loss = Some(LossSum {
            nll: stats.nll_sum,
            tokens: stats.count,
        });
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
        self.normalize(params, flow, ctx);
        let (dx, loss) = self.head_backward(params, grads, ctx);
        flow.loss = Some(loss);
        self.dx = Some(dx);
        // What backward would need is spent: free it now rather than at `clear`.
        self.x = Vec::new();
        true
    }

    fn backward(
        &mut self,
        params: &[&[T]],
        grads: &mut [&mut [f32]],
        flow: &mut Flow<T>,
        ctx: &Ctx,
    ) {
        let dx = match self.dx.take() {
            Some(dx) => dx,
            None => self.head_backward(params, grads, ctx).0,
        };
        assert_eq!(
            dx.len(),
            ctx.batch.rows() * self.dims.d,
            "lm_head: backward of another batch than its forward"
        );
        flow.hidden = dx;
    }

    fn clear(&mut self) {
        self.x = Vec::new();
        self.normed = Vec::new();
        self.mean = Vec::new();
        self.rstd = Vec::new();
        self.dnormed = Vec::new();
        self.dx = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fused_check::assert_fused_matches_unfused;
    use half::bf16;

    /// A tiny GPT-2: vocab 11, n_embd 8, 2 heads, 2 layers, 8 positions, n_inner 16.
    fn config(overrides: serde_json::Value) -> ModelConfig {
        let mut json = serde_json::json!({
            "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
            "vocab_size": 11, "n_embd": 8, "n_head": 2, "n_layer": 2, "n_positions": 8,
            "n_inner": 16, "embd_pdrop": 0.0, "resid_pdrop": 0.0, "attn_pdrop": 0.0,
        });
        for (k, v) in overrides.as_object().expect("object") {
            json[k] = v.clone();
        }
        ModelConfig::from_json_str("test config.json", &json.to_string()).unwrap()
    }

    /// Weights large enough that attention, GELU and LayerNorm are far from linear.
    fn random_model(cfg: &ModelConfig, seed: u64) -> Model<f32> {
        let mut model = build::<f32>(cfg).unwrap();
        let mut rng = NormalRng::new(seed ^ name_hash("test").rotate_left(17));
        for slot in model.layout.slots().to_vec() {
            let norm_weight = slot.spec.name.contains(".ln_") && slot.spec.name.ends_with("weight");
            for v in &mut model.params[slot.range()] {
                let r = rng.normal() as f32;
                *v = if norm_weight { 1.0 + 0.2 * r } else { 0.4 * r };
            }
        }
        model
    }

    fn batch() -> Batch {
        let ids: Vec<u32> = (0..14).map(|i| (i * 7 + 3) % 11).collect();
        let mut labels: Vec<i32> = ids.iter().map(|&t| t as i32).collect();
        labels[0] = -100;
        labels[12] = -100;
        Batch::from_hf_labels(2, 7, ids, &labels)
    }

    fn mean_loss(model: &mut Model<f32>, batch: &Batch, seed: u64) -> f64 {
        model.forward(batch, true, seed).mean()
    }

    fn check_fd(cfg: &ModelConfig) {
        let mut model = random_model(cfg, 1);
        let batch = batch();
        let seed = 99;
        let loss = model.forward(&batch, true, seed);
        let mut grads = vec![0f32; model.params.len()];
        model.backward(&mut grads, &batch, 1.0 / loss.tokens as f32, seed);
        let eps = 1e-2f32;
        for slot in model.layout.slots().to_vec() {
            let range = slot.range();
            let analytic = &grads[range.clone()];
            let mut numeric = Vec::with_capacity(range.len());
            for i in range.clone() {
                let orig = model.params[i];
                model.params[i] = orig + eps;
                let plus = mean_loss(&mut model, &batch, seed);
                model.params[i] = orig - eps;
                let minus = mean_loss(&mut model, &batch, seed);
                model.params[i] = orig;
                numeric.push((plus - minus) / (2.0 * eps as f64));
            }
            let scale = numeric.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            for (j, (a, n)) in analytic.iter().zip(&numeric).enumerate() {
                let err = (*a as f64 - n).abs() / scale;
                assert!(
                    err < 2e-2,
                    "{}[{j}]: analytic {a} vs numeric {n} (error {err:.1e} of max {scale:.1e})",
                    slot.spec.name
                );
            }
        }
    }

    #[test]
    fn finite_differences_tied_gelu_new_with_dropout() {
        check_fd(&config(
            serde_json::json!({"embd_pdrop": 0.1, "resid_pdrop": 0.2}),
        ));
    }

    #[test]
    fn finite_differences_with_attention_dropout() {
        check_fd(&config(serde_json::json!({"attn_pdrop": 0.3})));
    }

    #[test]
    fn finite_differences_untied_exact_gelu() {
        check_fd(&config(serde_json::json!({
            "tie_word_embeddings": false, "activation_function": "gelu", "n_layer": 1,
        })));
    }

    fn check_fused_matches_unfused(cfg: &ModelConfig) {
        let mut model = random_model(cfg, 7);
        let start: Vec<f32> = (0..model.params.len())
            .map(|i| (i % 13) as f32 * 0.01)
            .collect();
        assert_fused_matches_unfused(&mut model, &batch(), &start, 0.37, 5);
    }

    #[test]
    fn fused_head_matches_forward_then_backward_tied_with_dropout() {
        check_fused_matches_unfused(&config(
            serde_json::json!({"embd_pdrop": 0.1, "resid_pdrop": 0.2, "attn_pdrop": 0.1}),
        ));
    }

    #[test]
    fn fused_head_matches_forward_then_backward_untied() {
        check_fused_matches_unfused(&config(serde_json::json!({"tie_word_embeddings": false})));
    }

    #[test]
    fn parameters_are_named_shaped_and_ordered_as_transformers() {
        for tied in [true, false] {
            let cfg = config(serde_json::json!({"tie_word_embeddings": tied}));
            let model = build::<f32>(&cfg).unwrap();
            let ours: Vec<(String, Vec<usize>)> = model
                .layout
                .slots()
                .iter()
                .map(|s| (s.spec.name.clone(), s.spec.shape.clone()))
                .collect();
            assert_eq!(ours, cfg.param_shapes(), "tied = {tied}");
        }
    }

    #[test]
    fn gradients_accumulate_across_backward_calls() {
        let cfg = config(serde_json::json!({}));
        let mut model = random_model(&cfg, 2);
        let batch = batch();
        let mut once = vec![0f32; model.params.len()];
        model.forward(&batch, true, 0);
        model.backward(&mut once, &batch, 0.1, 0);
        let mut twice = vec![0f32; model.params.len()];
        for _ in 0..2 {
            model.forward(&batch, true, 0);
            model.backward(&mut twice, &batch, 0.1, 0);
        }
        for (a, b) in once.iter().zip(&twice) {
            assert!((2.0 * a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{a} {b}");
        }
        assert!(once.iter().any(|&g| g != 0.0));
    }

    #[test]
    fn logits_agree_with_the_loss() {
        let cfg = config(serde_json::json!({"tie_word_embeddings": false}));
        let mut model = random_model(&cfg, 3);
        let batch = batch();
        let rows: Vec<usize> = (0..batch.rows()).collect();
        let logits = logits(&mut model, &cfg, &batch, &rows);
        let v = cfg.vocab_size;
        let (mut nll, mut count) = (0f64, 0);
        for (r, &label) in batch.labels.iter().enumerate() {
            if label < 0 {
                continue;
            }
            let row = &logits[r * v..(r + 1) * v];
            let max = row.iter().fold(f32::MIN, |m, &x| m.max(x)) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            nll += lse - row[label as usize] as f64;
            count += 1;
        }
        let loss = model.forward(&batch, false, 0);
        assert_eq!(loss.tokens, count);
        assert!((loss.nll - nll).abs() < 1e-4 * nll, "{} vs {nll}", loss.nll);
    }

    #[test]
    fn bf16_forward_is_close_to_f32() {
        let cfg = config(serde_json::json!({}));
        let mut model = random_model(&cfg, 4);
        let mut half = build::<bf16>(&cfg).unwrap();
        for (h, f) in half.params.iter_mut().zip(&model.params) {
            *h = bf16::from_f32(*f);
        }
        // Same (bf16-rounded) weights in both, so only activation rounding differs.
        for (f, h) in model.params.iter_mut().zip(&half.params) {
            *f = h.to_f32();
        }
        let batch = batch();
        let want = model.forward(&batch, false, 0).mean();
        let got = half.forward(&batch, false, 0).mean();
        // bf16 keeps 8 bits of mantissa (relative rounding 2^-9 per op, a few dozen ops deep).
        assert!((got - want).abs() < 2e-2 * want, "bf16 {got} vs f32 {want}");
        let rows: Vec<usize> = (0..batch.rows()).collect();
        let lf = logits(&mut model, &cfg, &batch, &rows);
        let lh = logits(&mut half, &cfg, &batch, &rows);
        let scale = lf.iter().fold(0f32, |m, x| m.max(x.abs()));
        for (a, b) in lf.iter().zip(&lh) {
            assert!(
                (a - b).abs() < 3e-2 * scale,
                "logit {b} vs {a} (max {scale})"
            );
        }
    }

    #[test]
    fn dropout_is_seeded_and_zero_dropout_is_exact() {
        let batch = batch();
        let plain = config(serde_json::json!({}));
        let mut model = random_model(&plain, 5);
        let eval = model.forward(&batch, false, 0);
        // No dropout: training and evaluation forwards are bitwise equal, whatever the seed.
        assert_eq!(model.forward(&batch, true, 1), eval);
        assert_eq!(model.forward(&batch, true, 2), eval);

        let dropping = config(serde_json::json!({"embd_pdrop": 0.1, "resid_pdrop": 0.3}));
        let mut model2 = build::<f32>(&dropping).unwrap();
        model2.params.copy_from_slice(&model.params);
        // Evaluation never drops.
        assert_eq!(model2.forward(&batch, false, 7), eval);
        let a = model2.forward(&batch, true, 7);
        let b = model2.forward(&batch, true, 7);
        let c = model2.forward(&batch, true, 8);
        assert_eq!(a, b);
        assert_ne!(a.nll, eval.nll);
        assert_ne!(a.nll, c.nll);
    }

    #[test]
    fn attention_dropout_is_seeded_and_off_in_evaluation() {
        let batch = batch();
        let plain = config(serde_json::json!({}));
        let mut model = random_model(&plain, 6);
        let eval = model.forward(&batch, false, 0);
        // Stock GPT-2 configs have attn_pdrop 0.1.
        let cfg = config(serde_json::json!({"attn_pdrop": 0.1}));
        check_trainable(&cfg).unwrap();
        let mut dropping = build::<f32>(&cfg).unwrap();
        dropping.params.copy_from_slice(&model.params);
        assert_eq!(dropping.forward(&batch, false, 3), eval);
        let a = dropping.forward(&batch, true, 3);
        assert_eq!(dropping.forward(&batch, true, 3), a);
        assert_ne!(a.nll, eval.nll);
        assert_ne!(dropping.forward(&batch, true, 4).nll, a.nll);
        // Same seed, same gradients; the backward regenerates the forward's masks (checked
        // against finite differences above).
        let grads = |m: &mut Model<f32>, seed| {
            let mut g = vec![0f32; m.params.len()];
            m.forward(&batch, true, seed);
            m.backward(&mut g, &batch, 0.1, seed);
            g
        };
        let g3 = grads(&mut dropping, 3);
        assert_eq!(grads(&mut dropping, 3), g3);
        assert_ne!(grads(&mut dropping, 4), g3);
    }

    #[test]
    fn other_architectures_are_refused() {
        let json = r#"{"model_type": "llama", "architectures": ["LlamaForCausalLM"],
            "vocab_size": 11, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2}"#;
        let cfg = ModelConfig::from_json_str("llama config.json", json).unwrap();
        let err = build::<f32>(&cfg).err().expect("refused").to_string();
        assert!(err.contains("LlamaForCausalLM"), "{err}");
    }

    #[test]
    fn init_weights_follows_hf_and_is_seeded() {
        let cfg = config(serde_json::json!({
            "n_embd": 64, "n_inner": 256, "vocab_size": 200, "n_positions": 32, "n_layer": 2,
        }));
        let mut model = build::<f32>(&cfg).unwrap();
        init_weights(&mut model, &cfg, 42);
        let std = |name: &str| {
            let v = model.param(name).unwrap();
            let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
            assert!(mean.abs() < 0.005, "{name}: mean {mean}");
            (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
        };
        let close = |got: f64, want: f64, name: &str| {
            assert!(
                (got - want).abs() < 0.05 * want,
                "{name}: std {got}, want {want}"
            );
        };
        for name in [
            WTE,
            WPE,
            "transformer.h.0.attn.c_attn.weight",
            "transformer.h.1.mlp.c_fc.weight",
        ] {
            close(std(name), 0.02, name);
        }
        for name in [
            "transformer.h.0.attn.c_proj.weight",
            "transformer.h.1.mlp.c_proj.weight",
        ] {
            close(std(name), 0.01, name); // 0.02 / sqrt(2 * 2)
        }
        assert!(model
            .param("transformer.h.0.ln_1.weight")
            .unwrap()
            .iter()
            .all(|&x| x == 1.0));
        assert!(model.param(LN_F_BIAS).unwrap().iter().all(|&x| x == 0.0));
        assert!(model
            .param("transformer.h.1.mlp.c_fc.bias")
            .unwrap()
            .iter()
            .all(|&x| x == 0.0));
        let first = model.params.clone();
        init_weights(&mut model, &cfg, 42);
        assert_eq!(model.params, first);
        init_weights(&mut model, &cfg, 43);
        assert_ne!(model.params, first);
        // Distinct parameters get distinct streams.
        assert_ne!(
            model.param("transformer.h.0.attn.c_proj.weight").unwrap()[..8],
            model.param("transformer.h.1.attn.c_proj.weight").unwrap()[..8]
        );
    }

    #[test]
    fn name_rules_ignore_buffers_and_tied_head() {
        let tied = name_rules(&config(serde_json::json!({})));
        assert!(tied.ignore.contains(&".attn.bias".to_string()));
        assert!(tied.ignore.contains(&LM_HEAD.to_string()));
        let untied = name_rules(&config(serde_json::json!({"tie_word_embeddings": false})));
        assert!(!untied.ignore.contains(&LM_HEAD.to_string()));
        assert_eq!(untied.optional_prefix.as_deref(), Some("transformer."));
    }
}
