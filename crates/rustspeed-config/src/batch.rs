//! The batch triple, resolved exactly as DeepSpeed's `_set_batch_related_parameters` and
//! `_batch_assertion` (config.py), but with errors that say which values were given, which were
//! derived, and where the data-parallel world size came from (DeepSpeed issue #6914).

use std::fmt;

use serde::Serialize;

use crate::error::ConfigError;

/// Where the data-parallel world size came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "var", rename_all = "snake_case")]
pub enum WorldSizeSource {
    /// `--world-size` on the command line.
    Flag,
    /// A launcher environment variable, e.g. `WORLD_SIZE`.
    LauncherEnv(String),
    /// Nothing said otherwise: one rank, as DeepSpeed without torch.distributed.
    Default,
}

impl fmt::Display for WorldSizeSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorldSizeSource::Flag => write!(f, "--world-size"),
            WorldSizeSource::LauncherEnv(var) => write!(f, "the launcher environment ({var})"),
            WorldSizeSource::Default => write!(
                f,
                "the default (no --world-size, and none of {} set)",
                LAUNCHER_VARS.join("/")
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WorldSize {
    pub value: u64,
    pub source: WorldSizeSource,
}

/// Launcher variables holding the world size, in the order they are trusted.
pub const LAUNCHER_VARS: [&str; 4] = [
    "WORLD_SIZE",
    "OMPI_COMM_WORLD_SIZE",
    "PMI_SIZE",
    "SLURM_NTASKS",
];

impl WorldSize {
    pub fn flag(value: u64) -> WorldSize {
        WorldSize {
            value,
            source: WorldSizeSource::Flag,
        }
    }

    pub fn default_one() -> WorldSize {
        WorldSize {
            value: 1,
            source: WorldSizeSource::Default,
        }
    }

    /// Reads WORLD_SIZE, then OMPI_COMM_WORLD_SIZE, PMI_SIZE, SLURM_NTASKS; else 1.
    pub fn from_env() -> Result<WorldSize, ConfigError> {
        Self::from_lookup(|var| std::env::var(var).ok())
    }

    /// `--world-size` when given, else [`WorldSize::from_env`].
    pub fn from_flag_or_env(flag: Option<u64>) -> Result<WorldSize, ConfigError> {
        match flag {
            Some(0) => Err(ConfigError::WorldSize {
                key: "--world-size".into(),
                message: "must be at least 1, got 0".into(),
            }),
            Some(n) => Ok(WorldSize::flag(n)),
            None => WorldSize::from_env(),
        }
    }

    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<WorldSize, ConfigError> {
        for var in LAUNCHER_VARS {
            let Some(text) = lookup(var) else { continue };
            let value = text
                .trim()
                .parse::<u64>()
                .ok()
                .filter(|v| *v > 0)
                .ok_or_else(|| ConfigError::WorldSize {
                    key: var.to_string(),
                    message: format!("expected a positive integer world size, got \"{text}\""),
                })?;
            return Ok(WorldSize {
                value,
                source: WorldSizeSource::LauncherEnv(var.to_string()),
            });
        }
        Ok(WorldSize::default_one())
    }
}

/// The three batch values as the config gave them (`None` = not given).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GivenBatch {
    pub train_batch_size: Option<u64>,
    pub train_micro_batch_size_per_gpu: Option<u64>,
    pub gradient_accumulation_steps: Option<u64>,
}

/// The resolved batch triple and what was derived rather than given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BatchSizes {
    pub train_batch_size: u64,
    pub train_micro_batch_size_per_gpu: u64,
    pub gradient_accumulation_steps: u64,
    pub world_size: WorldSize,
    /// Names of the keys that were derived, in triple order.
    pub derived: Vec<&'static str>,
}

const TB: &str = "train_batch_size";
const MB: &str = "train_micro_batch_size_per_gpu";
const GAS: &str = "gradient_accumulation_steps";

/// DeepSpeed's resolution for the data-parallel `world` size.
pub fn resolve(given: GivenBatch, world: &WorldSize) -> Result<BatchSizes, ConfigError> {
    let w = world.value;
    if w == 0 {
        return Err(ConfigError::WorldSize {
            key: "world size".into(),
            message: format!("must be at least 1, got 0 (from {})", world.source),
        });
    }
    let GivenBatch {
        train_batch_size: tb,
        train_micro_batch_size_per_gpu: mb,
        gradient_accumulation_steps: gas,
    } = given;
    let mut derived: Vec<(&'static str, String)> = Vec::new();
    let (tb, mb, gas) =
        match (tb, mb, gas) {
            (Some(tb), Some(mb), Some(gas)) => (tb, mb, gas),
            (Some(tb), Some(mb), None) => {
                let gas = tb.checked_div(mb).map_or(0, |g| g / w);
                derived.push((GAS, format!("({tb} // {mb}) // {w}")));
                (tb, mb, gas)
            }
            (Some(tb), None, Some(gas)) => {
                let mb = (tb / w).checked_div(gas).unwrap_or(0);
                derived.push((MB, format!("({tb} // {w}) // {gas}")));
                (tb, mb, gas)
            }
            (None, Some(mb), Some(gas)) => {
                derived.push((TB, format!("{mb} * {gas} * {w}")));
                (mb * gas * w, mb, gas)
            }
            (Some(tb), None, None) => {
                derived.push((MB, format!("{tb} // {w}")));
                derived.push((
                    GAS,
                    "1 (the default when only train_batch_size is given)".into(),
                ));
                (tb, tb / w, 1)
            }
            (None, Some(mb), None) => {
                derived.push((TB, format!("{mb} * {w}")));
                derived.push((GAS, "1 (the default)".into()));
                (mb * w, mb, 1)
            }
            (None, None, _) => return Err(batch_error(
                "Either train_batch_size or train_micro_batch_size_per_gpu needs to be provided",
                given,
                &[],
                world,
                "set train_batch_size (the global batch) or train_micro_batch_size_per_gpu",
            )),
        };
    let fail = |assertion: String, hint: String| {
        Err(batch_error(&assertion, given, &derived, world, &hint))
    };
    if tb == 0 {
        return fail(
            format!("Train batch size: {tb} has to be greater than 0"),
            "train_batch_size must be at least 1".into(),
        );
    }
    if mb == 0 {
        return fail(
            format!("Micro batch size per gpu: {mb} has to be greater than 0"),
            format!(
                "train_batch_size {tb} is smaller than world size {w} times gradient_accumulation_steps; \
                 use a larger train_batch_size or fewer ranks"
            ),
        );
    }
    if gas == 0 {
        return fail(
            format!("Gradient accumulation steps: {gas} has to be greater than 0"),
            format!(
                "train_batch_size {tb} is smaller than train_micro_batch_size_per_gpu {mb} times world size {w}"
            ),
        );
    }
    if tb != mb * gas * w {
        let mut hint = format!(
            "with world size {w} from {}, train_batch_size {tb} needs \
             train_micro_batch_size_per_gpu * gradient_accumulation_steps = {}",
            world.source,
            if tb % w == 0 {
                (tb / w).to_string()
            } else {
                format!("{tb}/{w}, which is not a whole number")
            }
        );
        if tb % (mb * gas) == 0 {
            let n = tb / (mb * gas);
            hint.push_str(&format!("; pass --world-size {n} if you launch {n} ranks"));
        }
        if tb % (mb * w) == 0 && given.gradient_accumulation_steps.is_some() {
            hint.push_str(&format!(
                "; or set gradient_accumulation_steps to {}",
                tb / (mb * w)
            ));
        }
        hint.push_str("; or give only two of the three keys and let the third be derived");
        return fail(
            format!(
                "Check batch related parameters. train_batch_size is not equal to \
                 micro_batch_per_gpu * gradient_acc_step * world_size {tb} != {mb} * {gas} * {w}"
            ),
            hint,
        );
    }
    Ok(BatchSizes {
        train_batch_size: tb,
        train_micro_batch_size_per_gpu: mb,
        gradient_accumulation_steps: gas,
        world_size: world.clone(),
        derived: derived.iter().map(|(k, _)| *k).collect(),
    })
}

fn batch_error(
    assertion: &str,
    given: GivenBatch,
    derived: &[(&'static str, String)],
    world: &WorldSize,
    hint: &str,
) -> ConfigError {
    let given_list: Vec<String> = [
        (TB, given.train_batch_size),
        (MB, given.train_micro_batch_size_per_gpu),
        (GAS, given.gradient_accumulation_steps),
    ]
    .iter()
    .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
    .collect();
    let derived_list: Vec<String> = derived
        .iter()
        .map(|(k, how)| format!("{k} = {how}"))
        .collect();
    ConfigError::Batch {
        message: format!(
            "batch size: {assertion}\n  given in the config: {}\n  derived: {}\n  \
             data-parallel world size: {} from {}\n  hint: {hint}",
            if given_list.is_empty() {
                "nothing".into()
            } else {
                given_list.join(", ")
            },
            if derived_list.is_empty() {
                "nothing".into()
            } else {
                derived_list.join(", ")
            },
            world.value,
            world.source,
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(tb: Option<u64>, mb: Option<u64>, gas: Option<u64>) -> GivenBatch {
        GivenBatch {
            train_batch_size: tb,
            train_micro_batch_size_per_gpu: mb,
            gradient_accumulation_steps: gas,
        }
    }

    fn triple(r: &BatchSizes) -> (u64, u64, u64) {
        (
            r.train_batch_size,
            r.train_micro_batch_size_per_gpu,
            r.gradient_accumulation_steps,
        )
    }

    fn err(given: GivenBatch, world: u64) -> String {
        resolve(given, &WorldSize::flag(world))
            .unwrap_err()
            .to_string()
    }

    /// REFERENCE §5 T1 (tests/unit/runtime/test_ds_config_dict.py::TestBatchConfig), world 2.
    #[test]
    fn t1_batch_table_world_two() {
        let ws = WorldSize::flag(2);
        for given in [
            g(Some(32), Some(16), Some(1)),
            g(Some(32), Some(16), None),
            g(Some(32), None, None),
            g(None, Some(16), None),
        ] {
            assert_eq!(
                triple(&resolve(given, &ws).unwrap()),
                (32, 16, 1),
                "{given:?}"
            );
        }
        for given in [
            g(Some(32), Some(8), Some(2)),
            g(Some(32), Some(8), None),
            g(Some(32), None, Some(2)),
            g(None, Some(8), Some(2)),
        ] {
            assert_eq!(
                triple(&resolve(given, &ws).unwrap()),
                (32, 8, 2),
                "{given:?}"
            );
        }
        assert!(err(g(Some(33), Some(17), Some(2)), 2).contains("33 != 17 * 2 * 2"));
        assert!(err(g(Some(32), Some(18), Some(1)), 2).contains("32 != 18 * 1 * 2"));
        for given in [g(Some(33), Some(17), None), g(Some(32), Some(18), None)] {
            assert!(
                err(given, 2).contains("Gradient accumulation steps: 0 has to be greater than 0")
            );
        }
        assert!(err(g(Some(33), None, Some(2)), 2).contains("33 != 8 * 2 * 2"));
        for given in [g(None, None, Some(2)), g(None, None, None)] {
            assert!(err(given, 2).contains(
                "Either train_batch_size or train_micro_batch_size_per_gpu needs to be provided"
            ));
        }
        assert!(err(g(Some(1), None, None), 2)
            .contains("Micro batch size per gpu: 0 has to be greater than 0"));
    }

    /// The world=1 (8,2,1) case of DeepSpeed issue #6914, with the explanation it lacked.
    #[test]
    fn t1_world_one_explains_sources() {
        let msg = resolve(g(Some(8), Some(2), Some(1)), &WorldSize::default_one())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("8 != 2 * 1 * 1"), "{msg}");
        assert!(msg.contains("given in the config: train_batch_size=8, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1"), "{msg}");
        assert!(msg.contains("world size: 1 from the default"), "{msg}");
        assert!(
            msg.contains("pass --world-size 4 if you launch 4 ranks"),
            "{msg}"
        );
        assert!(
            msg.contains("set gradient_accumulation_steps to 4"),
            "{msg}"
        );
    }

    #[test]
    fn derived_values_are_named() {
        let r = resolve(g(Some(8), None, Some(8)), &WorldSize::default_one()).unwrap();
        assert_eq!(triple(&r), (8, 1, 8));
        assert_eq!(r.derived, vec![MB]);
        let msg = err(g(Some(8), None, Some(8)), 3);
        assert!(
            msg.contains("derived: train_micro_batch_size_per_gpu = (8 // 3) // 8"),
            "{msg}"
        );
        assert!(msg.contains("from --world-size"), "{msg}");
    }

    #[test]
    fn world_size_from_env_order_and_errors() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let ws = WorldSize::from_lookup(env(&[("PMI_SIZE", "3"), ("WORLD_SIZE", "4")])).unwrap();
        assert_eq!(ws.value, 4);
        assert_eq!(ws.source, WorldSizeSource::LauncherEnv("WORLD_SIZE".into()));
        let ws = WorldSize::from_lookup(env(&[("SLURM_NTASKS", "2")])).unwrap();
        assert_eq!(
            ws.source,
            WorldSizeSource::LauncherEnv("SLURM_NTASKS".into())
        );
        assert_eq!(
            WorldSize::from_lookup(env(&[])).unwrap(),
            WorldSize::default_one()
        );
        let e = WorldSize::from_lookup(env(&[("WORLD_SIZE", "two")])).unwrap_err();
        assert!(e.to_string().contains("WORLD_SIZE"), "{e}");
        let msg = resolve(
            g(Some(8), Some(2), Some(1)),
            &WorldSize::from_lookup(env(&[("WORLD_SIZE", "2")])).unwrap(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            msg.contains("from the launcher environment (WORLD_SIZE)"),
            "{msg}"
        );
    }
}
