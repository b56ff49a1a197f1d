//! PEFT's `LoraConfig` as `adapter_config.json` holds it: read with PEFT's defaults, written
//! with every field PEFT writes, so `PeftModel.from_pretrained` loads what we save and we load
//! what PEFT saves.
//!
//! A key whose value would change the computation in a way not implemented here (DoRA, LoftQ,
//! trainable tokens, ...) is refused with "not supported yet" rather than ignored. Keys PEFT
//! adds over time default to null/false/{}: those values are accepted whatever the key.

use std::path::Path;

use serde_json::{json, Map, Value};

use super::PeftError;

/// `target_modules` (and `exclude_modules`): PEFT's three forms.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    /// A module matches when its name equals an entry or ends with `.<entry>`.
    List(Vec<String>),
    /// A module matches when the whole name matches (Python's `re.fullmatch`).
    Regex(String),
    /// `"all-linear"`: every Linear/Conv1D module except the output head.
    AllLinear,
}

/// `bias`: which biases train with the adapter (and are saved in it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraBias {
    None,
    All,
    LoraOnly,
}

impl LoraBias {
    pub fn name(self) -> &'static str {
        match self {
            LoraBias::None => "none",
            LoraBias::All => "all",
            LoraBias::LoraOnly => "lora_only",
        }
    }
}

/// `init_lora_weights` for a fresh adapter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraInit {
    /// `true`: A Kaiming-uniform (nn.Linear's default), B zero: the adapter starts as a no-op.
    Default,
    /// `"gaussian"`: A ~ N(0, 1/r), B zero.
    Gaussian,
    /// `false`: A and B both Kaiming-uniform (nn.Linear's default): for tests, not training.
    Random,
}

/// The LoRA fields of `adapter_config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    /// `None`: PEFT's default for the model type (`c_attn` for GPT-2, `q_proj`/`v_proj` for the
    /// LLaMA family).
    pub target_modules: Option<TargetModules>,
    pub exclude_modules: Option<TargetModules>,
    pub bias: LoraBias,
    /// Scale `lora_alpha / sqrt(r)` instead of `lora_alpha / r`.
    pub use_rslora: bool,
    /// Modules trained whole and saved in the adapter (PEFT matches names ending with these).
    pub modules_to_save: Vec<String>,
    /// Informational: PEFT forces it on for Conv1D and off for Linear, and so do we.
    pub fan_in_fan_out: bool,
    pub init_lora_weights: LoraInit,
    pub layers_to_transform: Option<Vec<usize>>,
    pub layers_pattern: Option<Vec<String>>,
    /// Per-module rank and alpha overrides: pattern -> value (first matching pattern wins).
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub task_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    pub revision: Option<String>,
}

impl Default for LoraConfig {
    /// PEFT's `LoraConfig()` defaults.
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            target_modules: None,
            exclude_modules: None,
            bias: LoraBias::None,
            use_rslora: false,
            modules_to_save: Vec::new(),
            fan_in_fan_out: false,
            init_lora_weights: LoraInit::Default,
            layers_to_transform: None,
            layers_pattern: None,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            task_type: None,
            base_model_name_or_path: None,
            revision: None,
        }
    }
}

/// Keys that describe the file, not the computation.
const METADATA_KEYS: &[&str] = &[
    "auto_mapping",
    "base_model_name_or_path",
    "revision",
    "peft_version",
    "inference_mode",
    "megatron_core",
    // Only read when use_qalora is true, which is refused.
    "qalora_group_size",
    // Only matters for modules_to_save on tied weights, which is refused.
    "ensure_weight_tying",
];

fn is_default_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

impl LoraConfig {
    /// The LoRA scale of a module with rank `r` and alpha `alpha`.
    pub fn scale(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// Reads `dir/adapter_config.json` (or the file itself).
    pub fn from_path(path: &Path) -> Result<LoraConfig, PeftError> {
        let (file, text) = super::read_config_file(path)?;
        Self::from_json_str(&file, &text)
    }

    /// Parses adapter_config.json text; `file` names it in errors.
    pub fn from_json_str(file: &str, text: &str) -> Result<LoraConfig, PeftError> {
        let value: Value = serde_json::from_str(text).map_err(|e| PeftError::Json {
            file: file.to_string(),
            message: e.to_string(),
        })?;
        let Value::Object(map) = value else {
            return Err(PeftError::Json {
                file: file.to_string(),
                message: "the top level must be a JSON object".into(),
            });
        };
        Self::from_map(file, &map)
    }

    fn from_map(file: &str, map: &Map<String, Value>) -> Result<LoraConfig, PeftError> {
        let bad = |key: &str, v: &Value, expected: &str| PeftError::invalid(file, key, v, expected);
        let unsupported =
            |key: &str, v: &Value, hint: &str| PeftError::unsupported(file, key, v, hint);
        match map.get("peft_type") {
            Some(Value::String(t)) if t == "LORA" => {}
            None => {
                return Err(PeftError::Invalid {
                    file: file.to_string(),
                    key: "peft_type".into(),
                    value: "missing".into(),
                    expected: "\"LORA\" (is this a PEFT adapter_config.json?)".into(),
                })
            }
            Some(v) => {
                return Err(unsupported(
                    "peft_type",
                    v,
                    "rustspeed implements LoRA adapters (peft_type \"LORA\")",
                ))
            }
        }
        let mut c = LoraConfig::default();
        for (key, v) in map {
            let null = v.is_null();
            match key.as_str() {
                "peft_type" => {}
                "r" => {
                    c.r = v
                        .as_u64()
                        .filter(|&r| r > 0)
                        .ok_or_else(|| bad(key, v, "a positive integer"))?
                        as usize
                }
                "lora_alpha" => {
                    c.lora_alpha = v.as_f64().ok_or_else(|| bad(key, v, "a number"))?;
                }
                "lora_dropout" => {
                    let p = v.as_f64().ok_or_else(|| bad(key, v, "a number in [0, 1)"))?;
                    if !(0.0..1.0).contains(&p) {
                        return Err(bad(key, v, "a number in [0, 1)"));
                    }
                    c.lora_dropout = p as f32;
                }
                "target_modules" if !null => c.target_modules = Some(targets(file, key, v)?),
                "exclude_modules" if !null => {
                    let t = targets(file, key, v)?;
                    if t == TargetModules::AllLinear {
                        return Err(bad(key, v, "a list of module names or a regex"));
                    }
                    c.exclude_modules = Some(t);
                }
                "bias" => {
                    c.bias = match v.as_str() {
                        Some("none") => LoraBias::None,
                        Some("all") => LoraBias::All,
                        Some("lora_only") => LoraBias::LoraOnly,
                        _ => return Err(bad(key, v, "\"none\", \"all\" or \"lora_only\"")),
                    }
                }
                "use_rslora" => c.use_rslora = v.as_bool().ok_or_else(|| bad(key, v, "a bool"))?,
                "fan_in_fan_out" => {
                    c.fan_in_fan_out = v.as_bool().ok_or_else(|| bad(key, v, "a bool"))?
                }
                "modules_to_save" if !null => c.modules_to_save = strings(v).ok_or_else(|| {
                    bad(key, v, "a list of module names")
                })?,
                "init_lora_weights" => {
                    c.init_lora_weights = match v {
                        Value::Bool(true) => LoraInit::Default,
                        Value::Bool(false) => LoraInit::Random,
                        Value::String(s) if s.eq_ignore_ascii_case("gaussian") => {
                            LoraInit::Gaussian
                        }
                        _ => {
                            return Err(unsupported(
                                key,
                                v,
                                "supported: true, false, \"gaussian\"; PiSSA, OLoRA, EVA, CorDA and LoftQ initialisations are not implemented",
                            ))
                        }
                    }
                }
                "layers_to_transform" if !null => {
                    let layers = match v {
                        Value::Number(_) => v.as_u64().map(|n| vec![n as usize]),
                        Value::Array(a) => a
                            .iter()
                            .map(|x| x.as_u64().map(|n| n as usize))
                            .collect::<Option<Vec<_>>>(),
                        _ => None,
                    };
                    c.layers_to_transform =
                        Some(layers.ok_or_else(|| bad(key, v, "a layer index or a list of them"))?);
                }
                "layers_pattern" if !null => {
                    let p = match v {
                        Value::String(s) => Some(vec![s.clone()]),
                        _ => strings(v),
                    };
                    c.layers_pattern = Some(p.ok_or_else(|| bad(key, v, "a string or a list"))?);
                }
                "rank_pattern" | "alpha_pattern" => {
                    let Some(obj) = v.as_object() else {
                        if null {
                            continue;
                        }
                        return Err(bad(key, v, "an object {pattern: value}"));
                    };
                    for (pat, x) in obj {
                        if key == "rank_pattern" {
                            let r = x
                                .as_u64()
                                .filter(|&r| r > 0)
                                .ok_or_else(|| bad(key, v, "positive integer ranks"))?;
                            c.rank_pattern.push((pat.clone(), r as usize));
                        } else {
                            let a = x.as_f64().ok_or_else(|| bad(key, v, "numeric alphas"))?;
                            c.alpha_pattern.push((pat.clone(), a));
                        }
                    }
                }
                "task_type" if !null => {
                    let t = v.as_str().ok_or_else(|| bad(key, v, "a string"))?;
                    if t != "CAUSAL_LM" {
                        return Err(unsupported(
                            key,
                            v,
                            "rustspeed trains causal language models (task_type CAUSAL_LM or null)",
                        ));
                    }
                    c.task_type = Some(t.to_string());
                }
                "base_model_name_or_path" => c.base_model_name_or_path = v.as_str().map(Into::into),
                "revision" => c.revision = v.as_str().map(Into::into),
                "use_dora" if !is_default_off(v) => {
                    return Err(unsupported(key, v, "DoRA is not implemented; use plain LoRA"))
                }
                k if METADATA_KEYS.contains(&k) => {}
                _ if is_default_off(v) => {}
                _ => {
                    return Err(unsupported(
                        key,
                        v,
                        "rustspeed implements plain LoRA (r, lora_alpha, lora_dropout, target_modules, exclude_modules, bias, use_rslora, modules_to_save, init_lora_weights, layers_to_transform, layers_pattern, rank_pattern, alpha_pattern); remove the key or set it to its default",
                    ))
                }
            }
        }
        if c.layers_pattern.is_some() && c.layers_to_transform.is_none() {
            return Err(bad(
                "layers_pattern",
                &json!(c.layers_pattern),
                "to be set only together with layers_to_transform (as PEFT requires)",
            ));
        }
        if c.layers_to_transform.is_some()
            && matches!(c.target_modules, Some(TargetModules::Regex(_)))
        {
            return Err(bad(
                "layers_to_transform",
                &json!(c.layers_to_transform),
                "no layers_to_transform with a regex target_modules (PEFT ignores it then; select the layers in the regex)",
            ));
        }
        Ok(c)
    }

    /// `adapter_config.json` as PEFT writes it (every field, PEFT's defaults for the ones this
    /// implementation does not use), so that `PeftConfig.from_pretrained` reads it back.
    pub fn to_json(&self) -> Value {
        let targets = |t: &Option<TargetModules>| match t {
            None => Value::Null,
            Some(TargetModules::List(v)) => json!(v),
            Some(TargetModules::Regex(s)) => json!(s),
            Some(TargetModules::AllLinear) => json!("all-linear"),
        };
        let init = match self.init_lora_weights {
            LoraInit::Default => json!(true),
            LoraInit::Random => json!(false),
            LoraInit::Gaussian => json!("gaussian"),
        };
        let pattern_obj = |p: Vec<(String, Value)>| Value::Object(p.into_iter().collect());
        let mut out = json!({
            "alora_invocation_tokens": null,
            "alpha_pattern": pattern_obj(self.alpha_pattern.iter().map(|(k, a)| (k.clone(), json!(a))).collect()),
            "arrow_config": null,
            "auto_mapping": null,
            "base_model_name_or_path": self.base_model_name_or_path,
            "bias": self.bias.name(),
            "corda_config": null,
            "ensure_weight_tying": false,
            "eva_config": null,
            "exclude_modules": targets(&self.exclude_modules),
            "fan_in_fan_out": self.fan_in_fan_out,
            "inference_mode": true,
            "init_lora_weights": init,
            "layer_replication": null,
            "layers_pattern": self.layers_pattern,
            "layers_to_transform": self.layers_to_transform,
            "loftq_config": {},
            "lora_alpha": self.lora_alpha,
            "lora_bias": false,
            "lora_dropout": self.lora_dropout as f64,
            "megatron_config": null,
            "megatron_core": "megatron.core",
            "modules_to_save": if self.modules_to_save.is_empty() { Value::Null } else { json!(self.modules_to_save) },
            "peft_type": "LORA",
            "qalora_group_size": 16,
            "r": self.r,
            "rank_pattern": pattern_obj(self.rank_pattern.iter().map(|(k, r)| (k.clone(), json!(r))).collect()),
            "revision": self.revision,
            "target_modules": targets(&self.target_modules),
            "target_parameters": null,
            "task_type": self.task_type.as_deref().unwrap_or("CAUSAL_LM"),
            "trainable_token_indices": null,
            "use_dora": false,
            "use_qalora": false,
            "use_rslora": self.use_rslora,
        });
        // PEFT writes an integer alpha as an integer; keep the file looking like PEFT's.
        if self.lora_alpha.fract() == 0.0 && self.lora_alpha.abs() < 1e15 {
            out["lora_alpha"] = json!(self.lora_alpha as i64);
        }
        out
    }

    /// The per-module rank and alpha: the first `rank_pattern`/`alpha_pattern` key matching the
    /// module name (PEFT's `get_pattern_key`: `(.*\.)?(<key>)$` from the start), else `r` and
    /// `lora_alpha`.
    pub fn module_rank_alpha(&self, module: &str) -> Result<(usize, f64), PeftError> {
        let mut r = self.r;
        let mut alpha = self.lora_alpha;
        for (pat, value) in &self.rank_pattern {
            if super::targets::pattern_key_matches(pat, module)? {
                r = *value;
                break;
            }
        }
        for (pat, value) in &self.alpha_pattern {
            if super::targets::pattern_key_matches(pat, module)? {
                alpha = *value;
                break;
            }
        }
        Ok((r, alpha))
    }
}

fn strings(v: &Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_str().map(str::to_string))
        .collect()
}

fn targets(file: &str, key: &str, v: &Value) -> Result<TargetModules, PeftError> {
    match v {
        Value::String(s) if s.eq_ignore_ascii_case("all-linear") => Ok(TargetModules::AllLinear),
        Value::String(s) => Ok(TargetModules::Regex(s.clone())),
        Value::Array(_) => strings(v)
            .map(TargetModules::List)
            .ok_or_else(|| PeftError::Invalid {
                file: file.to_string(),
                key: key.to_string(),
                value: v.to_string(),
                expected: "a list of module names, a regex string or \"all-linear\"".into(),
            }),
        _ => Err(PeftError::Invalid {
            file: file.to_string(),
            key: key.to_string(),
            value: v.to_string(),
            expected: "a list of module names, a regex string or \"all-linear\"".into(),
        }),
    }
}

/// The LoRA options of `rustspeed train` (`--lora-r`, `--lora-alpha`, `--lora-dropout`,
/// `--lora-target-modules`): a comma-separated list of names, `all-linear`, or (when it
/// contains regex metacharacters) a regex.
pub fn target_modules_from_flag(flag: &str) -> TargetModules {
    let flag = flag.trim();
    if flag.eq_ignore_ascii_case("all-linear") {
        TargetModules::AllLinear
    } else if flag.contains(|c: char| "*+?()[]|^$\\".contains(c)) {
        TargetModules::Regex(flag.to_string())
    } else {
        TargetModules::List(
            flag.split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEFT_GPT2: &str = r#"{
      "alora_invocation_tokens": null, "alpha_pattern": {}, "arrow_config": null,
      "auto_mapping": {"base_model_class": "GPT2LMHeadModel", "parent_library": "transformers.models.gpt2.modeling_gpt2"},
      "base_model_name_or_path": "gpt2", "bias": "lora_only", "corda_config": null,
      "ensure_weight_tying": false, "eva_config": null, "exclude_modules": null,
      "fan_in_fan_out": true, "inference_mode": true, "init_lora_weights": true,
      "kasa_config": null, "layer_replication": null, "layers_pattern": null,
      "layers_to_transform": null, "loftq_config": {}, "lora_alpha": 8, "lora_bias": false,
      "lora_dropout": 0.0, "lora_ga_config": null, "megatron_config": null,
      "megatron_core": "megatron.core", "modules_to_save": null, "monteclora_config": null,
      "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16, "r": 4,
      "rank_pattern": {}, "revision": null, "target_modules": ["c_attn", "c_fc", "c_proj"],
      "target_parameters": null, "task_type": null, "trainable_token_indices": null,
      "use_bdlora": null, "use_dora": false, "use_qalora": false, "use_rslora": false,
      "velora_config": null
    }"#;

    #[test]
    fn reads_a_peft_written_config() {
        let c = LoraConfig::from_json_str("a.json", PEFT_GPT2).unwrap();
        assert_eq!(c.r, 4);
        assert_eq!(c.lora_alpha, 8.0);
        assert_eq!(c.bias, LoraBias::LoraOnly);
        assert!(c.fan_in_fan_out);
        assert_eq!(
            c.target_modules,
            Some(TargetModules::List(vec![
                "c_attn".into(),
                "c_fc".into(),
                "c_proj".into()
            ]))
        );
        assert_eq!(c.scale(4, 8.0), 2.0);
        // What we write reads back the same.
        let again = LoraConfig::from_json_str("b.json", &c.to_json().to_string()).unwrap();
        assert_eq!(
            again,
            LoraConfig {
                task_type: Some("CAUSAL_LM".into()),
                ..c
            }
        );
    }

    #[test]
    fn rslora_scale_and_patterns() {
        let c = LoraConfig::from_json_str(
            "c.json",
            r#"{"peft_type": "LORA", "r": 16, "lora_alpha": 32, "use_rslora": true,
                "target_modules": ".*\\.(q|v)_proj", "rank_pattern": {"q_proj": 4},
                "alpha_pattern": {"layers.1.v_proj": 2}}"#,
        )
        .unwrap();
        assert_eq!(c.scale(16, 32.0), 8.0);
        assert_eq!(
            c.target_modules,
            Some(TargetModules::Regex(".*\\.(q|v)_proj".into()))
        );
        assert_eq!(
            c.module_rank_alpha("model.layers.0.self_attn.q_proj")
                .unwrap(),
            (4, 32.0)
        );
        assert_eq!(
            c.module_rank_alpha("model.layers.1.v_proj").unwrap(),
            (16, 2.0)
        );
        assert_eq!(
            c.module_rank_alpha("model.layers.0.self_attn.v_proj")
                .unwrap(),
            (16, 32.0)
        );
    }

    #[test]
    fn unsupported_values_fail_loudly_naming_the_key() {
        for (key, value) in [
            ("use_dora", "true"),
            ("init_lora_weights", "\"pissa\""),
            ("lora_bias", "true"),
            ("trainable_token_indices", "[1, 2]"),
            ("layer_replication", "[[0, 1]]"),
            ("task_type", "\"SEQ_CLS\""),
        ] {
            let text = format!(r#"{{"peft_type": "LORA", "{key}": {value}}}"#);
            let err = LoraConfig::from_json_str("x.json", &text)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("not supported yet") && err.contains(key) && err.contains("x.json"),
                "{err}"
            );
        }
        let err = LoraConfig::from_json_str("x.json", r#"{"peft_type": "PROMPT_TUNING"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not supported yet") && err.contains("PROMPT_TUNING"),
            "{err}"
        );
        let err = LoraConfig::from_json_str("x.json", r#"{"peft_type": "LORA", "bias": "some"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bias") && err.contains("lora_only"), "{err}");
    }

    #[test]
    fn flag_forms() {
        assert_eq!(
            target_modules_from_flag("all-linear"),
            TargetModules::AllLinear
        );
        assert_eq!(
            target_modules_from_flag("q_proj, v_proj"),
            TargetModules::List(vec!["q_proj".into(), "v_proj".into()])
        );
        assert_eq!(
            target_modules_from_flag(".*(q|v)_proj"),
            TargetModules::Regex(".*(q|v)_proj".into())
        );
    }
}
