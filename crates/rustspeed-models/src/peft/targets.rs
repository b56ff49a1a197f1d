//! Which modules an adapter touches, decided as PEFT decides it, over the module names
//! transformers' `named_modules()` gives (`transformer.h.0.attn.c_attn`,
//! `model.layers.0.self_attn.q_proj`, ...).
//!
//! - `target_modules` list: a module matches when its name equals an entry or ends with
//!   `.<entry>`; with `layers_to_transform`, only modules inside those layer indices.
//! - `target_modules` string: Python's `re.fullmatch` against the whole name.
//! - `"all-linear"`: every Linear/Conv1D module except the output head.
//! - `exclude_modules` and `modules_to_save` remove modules from the targets.
//! - `modules_to_save`: modules whose name ends with an entry train whole.
//!
//! A target that is not a Linear/Conv1D module fails (PEFT fails too); LoRA on embeddings and
//! on the LM head are PEFT features not implemented here, and say so.

use std::collections::{BTreeMap, BTreeSet};

use fancy_regex::Regex;
use rustspeed_kernels::matmul::WeightLayout;

use super::config::{LoraBias, LoraConfig, TargetModules};
use super::PeftError;
use crate::hf_config::{Architecture, ModelConfig};

#[derive(Clone, Debug, PartialEq)]
pub enum ModuleKind {
    /// `nn.Linear` (`[out, in]` weight) or GPT-2's `Conv1D` (`[in, out]`).
    Linear {
        inp: usize,
        out: usize,
        layout: WeightLayout,
    },
    Embedding,
    Norm,
    /// The output projection (`lm_head`), tied or not.
    LmHead,
    /// A module that only holds other modules (`model.layers.0.self_attn`).
    Container,
}

#[derive(Clone, Debug)]
pub struct ModuleInfo {
    pub name: String,
    pub kind: ModuleKind,
}

/// The modules of the architecture `cfg` describes, parents before children.
pub fn modules(cfg: &ModelConfig) -> Vec<ModuleInfo> {
    let mut leaves: Vec<ModuleInfo> = Vec::new();
    let mut seen = BTreeSet::new();
    for (param, shape) in cfg.param_shapes() {
        let module = param.rsplit_once('.').map(|(m, _)| m).unwrap_or("");
        if !seen.insert(module.to_string()) {
            continue;
        }
        let leaf = module.rsplit('.').next().unwrap_or(module);
        let kind = if matches!(leaf, "wte" | "wpe" | "embed_tokens") {
            ModuleKind::Embedding
        } else if leaf == "lm_head" {
            ModuleKind::LmHead
        } else if shape.len() == 2 {
            match cfg.architecture {
                Architecture::Gpt2 => ModuleKind::Linear {
                    inp: shape[0],
                    out: shape[1],
                    layout: WeightLayout::InOut,
                },
                _ => ModuleKind::Linear {
                    inp: shape[1],
                    out: shape[0],
                    layout: WeightLayout::OutIn,
                },
            }
        } else {
            ModuleKind::Norm
        };
        leaves.push(ModuleInfo {
            name: module.to_string(),
            kind,
        });
    }
    if !seen.contains("lm_head") {
        // Tied: transformers still has the module, sharing the embedding's weight.
        leaves.push(ModuleInfo {
            name: "lm_head".into(),
            kind: ModuleKind::LmHead,
        });
    }
    let mut out = Vec::new();
    let mut containers = BTreeSet::new();
    for leaf in leaves {
        let parts: Vec<&str> = leaf.name.split('.').collect();
        for i in 1..parts.len() {
            let parent = parts[..i].join(".");
            if containers.insert(parent.clone()) {
                out.push(ModuleInfo {
                    name: parent,
                    kind: ModuleKind::Container,
                });
            }
        }
        out.push(leaf);
    }
    out
}

fn compile(what: &str, pattern: &str) -> Result<Regex, PeftError> {
    Regex::new(pattern).map_err(|e| PeftError::Invalid {
        file: "adapter config".into(),
        key: what.into(),
        value: format!("{pattern:?}"),
        expected: format!("a Python regular expression this engine can compile ({e})"),
    })
}

fn is_match(re: &Regex, what: &str, s: &str) -> Result<bool, PeftError> {
    re.is_match(s).map_err(|e| PeftError::Invalid {
        file: "adapter config".into(),
        key: what.into(),
        value: re.as_str().to_string(),
        expected: format!("a regular expression that can be evaluated ({e})"),
    })
}

/// Python's `re.fullmatch(pattern, key)`.
fn fullmatch(what: &str, pattern: &str, key: &str) -> Result<bool, PeftError> {
    is_match(&compile(what, &format!(r"^(?:{pattern})\z"))?, what, key)
}

/// PEFT's `get_pattern_key` test for `rank_pattern`/`alpha_pattern`: `re.match(r"(.*\.)?(key)$")`.
pub fn pattern_key_matches(pattern: &str, module: &str) -> Result<bool, PeftError> {
    is_match(
        &compile(
            "rank_pattern/alpha_pattern",
            &format!(r"^(?:.*\.)?(?:{pattern})\z"),
        )?,
        "rank_pattern/alpha_pattern",
        module,
    )
}

fn list_matches(list: &[String], key: &str) -> bool {
    list.iter()
        .any(|t| key == t || key.ends_with(&format!(".{t}")))
}

/// The layer index `layers_to_transform` looks at: the first `<name>.<digits>.` segment (or the
/// first `<layers_pattern>.<digits>.`), as PEFT's `check_target_module_exists`.
fn layer_index(config: &LoraConfig, key: &str) -> Result<Option<usize>, PeftError> {
    let patterns: Vec<String> = match &config.layers_pattern {
        None => vec![r"^.*?\.[^.]*\.(\d+)\.".to_string()],
        Some(p) if p.is_empty() => vec![r"^.*?\.[^.]*\.(\d+)\.".to_string()],
        Some(p) => p
            .iter()
            .map(|pat| format!(r"^(?:|.*?\.){pat}\.(\d+)\."))
            .collect(),
    };
    for pattern in patterns {
        let re = compile("layers_pattern", &pattern)?;
        let caps = re.captures(key).map_err(|e| PeftError::Invalid {
            file: "adapter config".into(),
            key: "layers_pattern".into(),
            value: pattern.clone(),
            expected: e.to_string(),
        })?;
        if let Some(c) = caps {
            return Ok(c.get(1).and_then(|m| m.as_str().parse().ok()));
        }
    }
    Ok(None)
}

/// One LoRA-wrapped module.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraModule {
    pub r: usize,
    pub alpha: f64,
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f32,
    pub dropout: f32,
    pub inp: usize,
    pub out: usize,
    pub layout: WeightLayout,
}

/// What an adapter config means for one architecture.
#[derive(Clone, Debug, Default)]
pub struct Resolved {
    /// Module name -> its LoRA.
    pub lora: BTreeMap<String, LoraModule>,
    /// Base parameters that train with the adapter (biases, modules_to_save), by HF name.
    pub trainable: BTreeSet<String>,
}

/// PEFT's default `target_modules` per model type (its
/// `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`).
fn default_targets(cfg: &ModelConfig) -> TargetModules {
    match cfg.architecture {
        Architecture::Gpt2 => TargetModules::List(vec!["c_attn".into()]),
        _ => TargetModules::List(vec!["q_proj".into(), "v_proj".into()]),
    }
}

/// Resolves `config` against the architecture's modules.
pub fn resolve(config: &LoraConfig, cfg: &ModelConfig) -> Result<Resolved, PeftError> {
    let mods = modules(cfg);
    let targets = config
        .target_modules
        .clone()
        .unwrap_or_else(|| default_targets(cfg));
    let tied_names = tied_modules(cfg);
    let mut resolved = Resolved::default();

    for m in &mods {
        // exclude_modules and modules_to_save keep a module out of the targets.
        let excluded = match &config.exclude_modules {
            Some(TargetModules::Regex(p)) => fullmatch("exclude_modules", p, &m.name)?,
            Some(TargetModules::List(l)) => list_matches(l, &m.name),
            _ => false,
        };
        let mut saved = false;
        for s in &config.modules_to_save {
            let re = compile("modules_to_save", &format!(r"^(?:|.*\.){s}(?:$|\..*)"))?;
            saved |= is_match(&re, "modules_to_save", &m.name)?;
        }
        if excluded || saved {
            continue;
        }
        let hit = match &targets {
            TargetModules::AllLinear => matches!(m.kind, ModuleKind::Linear { .. }),
            TargetModules::Regex(p) => fullmatch("target_modules", p, &m.name)?,
            TargetModules::List(l) => {
                let mut hit = list_matches(l, &m.name);
                if hit {
                    if let Some(layers) = &config.layers_to_transform {
                        hit = layer_index(config, &m.name)?.is_some_and(|i| layers.contains(&i));
                    }
                }
                hit
            }
        };
        if !hit {
            continue;
        }
        match m.kind {
            ModuleKind::Linear { inp, out, layout } => {
                let (r, alpha) = config.module_rank_alpha(&m.name)?;
                resolved.lora.insert(
                    m.name.clone(),
                    LoraModule {
                        r,
                        alpha,
                        scale: config.scale(r, alpha) as f32,
                        dropout: config.lora_dropout,
                        inp,
                        out,
                        layout,
                    },
                );
            }
            ModuleKind::Embedding | ModuleKind::LmHead => {
                return Err(PeftError::Unsupported {
                    file: "adapter config".into(),
                    key: "target_modules".into(),
                    value: format!("{} (matches `{}`)", target_text(&targets), m.name),
                    hint: "LoRA on embeddings and on the LM head is not implemented; target the Linear modules, or list the module in modules_to_save".into(),
                })
            }
            ModuleKind::Norm | ModuleKind::Container => {
                return Err(PeftError::Invalid {
                    file: "adapter config".into(),
                    key: "target_modules".into(),
                    value: format!("{} (matches `{}`)", target_text(&targets), m.name),
                    expected: format!(
                        "names of Linear/Conv1D modules only (`{}` is a {}); e.g. {}",
                        m.name,
                        if m.kind == ModuleKind::Norm { "norm" } else { "container module" },
                        linear_examples(&mods)
                    ),
                })
            }
        }
    }
    if resolved.lora.is_empty() {
        return Err(PeftError::Invalid {
            file: "adapter config".into(),
            key: "target_modules".into(),
            value: target_text(&targets),
            expected: format!(
                "at least one module of the {} model to match (PEFT: \"Target modules not found in the base model\"); its Linear modules are e.g. {}",
                cfg.architecture.hf_class(),
                linear_examples(&mods)
            ),
        });
    }

    let params = cfg.param_shapes();
    match config.bias {
        LoraBias::None => {}
        LoraBias::All => {
            for (name, _) in &params {
                if name.ends_with(".bias") {
                    resolved.trainable.insert(name.clone());
                }
            }
        }
        LoraBias::LoraOnly => {
            for module in resolved.lora.keys() {
                let bias = format!("{module}.bias");
                if params.iter().any(|(n, _)| *n == bias) {
                    resolved.trainable.insert(bias);
                }
            }
        }
    }
    for entry in &config.modules_to_save {
        let matched: Vec<&ModuleInfo> = mods
            .iter()
            .filter(|m| m.name.ends_with(entry.as_str()))
            .collect();
        if matched.is_empty() {
            return Err(PeftError::Invalid {
                file: "adapter config".into(),
                key: "modules_to_save".into(),
                value: format!("{entry:?}"),
                expected: format!(
                    "a module name of the {} model (e.g. lm_head, {})",
                    cfg.architecture.hf_class(),
                    linear_examples(&mods)
                ),
            });
        }
        for m in matched {
            if tied_names.contains(&m.name) {
                return Err(PeftError::Unsupported {
                    file: "adapter config".into(),
                    key: "modules_to_save".into(),
                    value: format!("{entry:?} (matches `{}`)", m.name),
                    hint: "the input embedding and the LM head share one tensor in this model (tie_word_embeddings); PEFT would train a separate copy of it".into(),
                });
            }
            let prefix = format!("{}.", m.name);
            for (name, _) in &params {
                if name.starts_with(&prefix) {
                    resolved.trainable.insert(name.clone());
                }
            }
        }
    }
    Ok(resolved)
}

/// Modules whose weight is shared between the embedding and the head.
fn tied_modules(cfg: &ModelConfig) -> BTreeSet<String> {
    if !cfg.tie_word_embeddings {
        return BTreeSet::new();
    }
    let embed = match cfg.architecture {
        Architecture::Gpt2 => "transformer.wte",
        _ => "model.embed_tokens",
    };
    [embed.to_string(), "lm_head".to_string()].into()
}

fn target_text(t: &TargetModules) -> String {
    match t {
        TargetModules::List(l) => format!("{l:?}"),
        TargetModules::Regex(r) => format!("{r:?}"),
        TargetModules::AllLinear => "\"all-linear\"".into(),
    }
}

fn linear_examples(mods: &[ModuleInfo]) -> String {
    let mut leaves: Vec<&str> = mods
        .iter()
        .filter(|m| matches!(m.kind, ModuleKind::Linear { .. }))
        .map(|m| m.name.rsplit('.').next().unwrap_or(&m.name))
        .collect();
    leaves.sort();
    leaves.dedup();
    leaves.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpt2() -> ModelConfig {
        ModelConfig::from_json_str(
            "gpt2",
            r#"{"model_type": "gpt2", "vocab_size": 11, "n_embd": 8, "n_head": 2, "n_layer": 2,
                "n_positions": 8, "n_inner": 16}"#,
        )
        .unwrap()
    }

    fn llama() -> ModelConfig {
        ModelConfig::from_json_str(
            "llama",
            r#"{"model_type": "llama", "vocab_size": 20, "hidden_size": 16,
                "intermediate_size": 24, "num_hidden_layers": 3, "num_attention_heads": 4,
                "num_key_value_heads": 2, "tie_word_embeddings": false}"#,
        )
        .unwrap()
    }

    fn cfg(json: &str) -> LoraConfig {
        LoraConfig::from_json_str("t.json", json).unwrap()
    }

    fn names(r: &Resolved) -> Vec<String> {
        r.lora.keys().cloned().collect()
    }

    #[test]
    fn list_suffix_regex_and_all_linear() {
        let c = cfg(
            r#"{"peft_type": "LORA", "target_modules": ["q_proj", "model.layers.2.mlp.up_proj"]}"#,
        );
        let r = resolve(&c, &llama()).unwrap();
        assert_eq!(
            names(&r),
            [
                "model.layers.0.self_attn.q_proj",
                "model.layers.1.self_attn.q_proj",
                "model.layers.2.mlp.up_proj",
                "model.layers.2.self_attn.q_proj"
            ]
        );
        // A suffix must follow a dot: "proj" alone matches nothing.
        let c = cfg(r#"{"peft_type": "LORA", "target_modules": ["proj"]}"#);
        assert!(resolve(&c, &llama())
            .unwrap_err()
            .to_string()
            .contains("q_proj"));
        let c = cfg(r#"{"peft_type": "LORA", "target_modules": ".*layers\\.1\\..*(k|v)_proj"}"#);
        assert_eq!(
            names(&resolve(&c, &llama()).unwrap()),
            [
                "model.layers.1.self_attn.k_proj",
                "model.layers.1.self_attn.v_proj"
            ]
        );
        // fullmatch: a regex matching a prefix only is no match.
        let c = cfg(r#"{"peft_type": "LORA", "target_modules": "model\\.layers\\.1"}"#);
        assert!(resolve(&c, &llama()).is_err());
        let c = cfg(r#"{"peft_type": "LORA", "target_modules": "all-linear"}"#);
        let r = resolve(&c, &llama()).unwrap();
        assert_eq!(r.lora.len(), 3 * 7);
        assert!(!r.lora.contains_key("lm_head"));
        let r = resolve(&c, &gpt2()).unwrap();
        assert_eq!(r.lora.len(), 2 * 4);
        let attn = r.lora["transformer.h.0.attn.c_attn"];
        assert_eq!(
            (attn.inp, attn.out, attn.layout),
            (8, 24, WeightLayout::InOut)
        );
    }

    #[test]
    fn defaults_layers_exclusions_bias_and_modules_to_save() {
        let r = resolve(&cfg(r#"{"peft_type": "LORA"}"#), &gpt2()).unwrap();
        assert_eq!(
            names(&r),
            ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
        );
        let c = cfg(
            r#"{"peft_type": "LORA", "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 2],
                "exclude_modules": ["model.layers.2.self_attn.v_proj"], "modules_to_save": ["lm_head"],
                "r": 4, "lora_alpha": 16, "rank_pattern": {"v_proj": 2}}"#,
        );
        let r = resolve(&c, &llama()).unwrap();
        assert_eq!(
            names(&r),
            [
                "model.layers.0.self_attn.q_proj",
                "model.layers.0.self_attn.v_proj",
                "model.layers.2.self_attn.q_proj"
            ]
        );
        assert_eq!(r.lora["model.layers.0.self_attn.q_proj"].scale, 4.0);
        assert_eq!(r.lora["model.layers.0.self_attn.v_proj"].r, 2);
        assert_eq!(r.lora["model.layers.0.self_attn.v_proj"].scale, 8.0);
        assert_eq!(r.trainable, ["lm_head.weight".to_string()].into());

        let c = cfg(r#"{"peft_type": "LORA", "target_modules": ["c_attn"], "bias": "lora_only"}"#);
        let r = resolve(&c, &gpt2()).unwrap();
        assert_eq!(
            r.trainable,
            [
                "transformer.h.0.attn.c_attn.bias".to_string(),
                "transformer.h.1.attn.c_attn.bias".to_string()
            ]
            .into()
        );
        let c = cfg(r#"{"peft_type": "LORA", "target_modules": ["c_attn"], "bias": "all"}"#);
        let r = resolve(&c, &gpt2()).unwrap();
        assert!(r.trainable.contains("transformer.ln_f.bias"));
        assert!(r.trainable.contains("transformer.h.1.mlp.c_fc.bias"));
        assert!(!r.trainable.iter().any(|n| n.ends_with(".weight")));
    }

    #[test]
    fn non_linear_targets_fail() {
        for (json, want) in [
            (
                r#"{"peft_type": "LORA", "target_modules": ["ln_1"]}"#,
                "norm",
            ),
            (
                r#"{"peft_type": "LORA", "target_modules": ["attn"]}"#,
                "container",
            ),
            (
                r#"{"peft_type": "LORA", "target_modules": ["wte"]}"#,
                "not supported yet",
            ),
            (
                r#"{"peft_type": "LORA", "target_modules": ["lm_head"]}"#,
                "not supported yet",
            ),
            (
                r#"{"peft_type": "LORA", "target_modules": ["c_attn"], "modules_to_save": ["lm_head"]}"#,
                "tie_word_embeddings",
            ),
            (
                r#"{"peft_type": "LORA", "target_modules": ["c_attn"], "modules_to_save": ["nothing"]}"#,
                "modules_to_save",
            ),
        ] {
            let err = resolve(&cfg(json), &gpt2()).unwrap_err().to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
    }
}
