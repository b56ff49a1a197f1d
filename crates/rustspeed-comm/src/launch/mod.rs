//! Launcher core: DeepSpeed's hostfile and --include/--exclude rules (REFERENCE §1.6,
//! `deepspeed/launcher/runner.py`), the environment each rank gets, a local launcher that
//! streams prefixed logs and stops every rank when one fails, and the command lines that hand
//! multi-node jobs to mpirun, srun or ssh.

pub mod filter;
pub mod hostfile;
pub mod local;
pub mod multinode;

pub use filter::{parse_inclusion_exclusion, parse_resource_filter, Resources};
pub use hostfile::{fetch_hostfile, parse_hostfile};
pub use local::{rank_envs, run_local, LocalJob};
pub use multinode::{mpirun_command, srun_command, ssh_commands, MultiNodeJob};

use std::fmt;

/// Why a launch did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaunchError {
    /// The user's input (hostfile, --include/--exclude, flags) is wrong; exit code 2.
    Usage(String),
    /// A rank (or node) failed; `exit_code` is what the launcher should exit with (the rank's
    /// own code, or 128 + signal like a shell).
    RankFailed { message: String, exit_code: i32 },
    /// Starting or watching processes failed.
    Io(String),
}

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LaunchError::Usage(m) | LaunchError::Io(m) => f.write_str(m),
            LaunchError::RankFailed { message, .. } => f.write_str(message),
        }
    }
}

impl std::error::Error for LaunchError {}

/// What the user asked for; `resolve` turns it into hosts and slots like DeepSpeed's runner.
#[derive(Debug, Clone, Default)]
pub struct ResourceRequest {
    /// Hostfile path; DeepSpeed's default is /job/hostfile. A missing file means "this
    /// machine only", as in DeepSpeed.
    pub hostfile: Option<std::path::PathBuf>,
    pub include: String,
    pub exclude: String,
    /// Use the first N hosts (DeepSpeed --num_nodes).
    pub num_nodes: Option<usize>,
    /// Ranks per node (DeepSpeed --num_gpus): without a hostfile, the local slot count; with
    /// one, each host's slots are cut to 0..N.
    pub nproc_per_node: Option<usize>,
}

/// The hostfile DeepSpeed reads when none is named.
pub const DEFAULT_HOSTFILE: &str = "/job/hostfile";

/// Hosts and slots to launch on, in hostfile order (DeepSpeed `runner.main`'s resolution).
pub fn resolve(req: &ResourceRequest) -> Result<Resources, LaunchError> {
    let filtering = !req.include.is_empty() || !req.exclude.is_empty();
    if filtering && (req.num_nodes.is_some() || req.nproc_per_node.is_some()) {
        return Err(LaunchError::Usage(
            "--num-nodes/--nproc-per-node cannot be combined with --include/--exclude (as in DeepSpeed): \
             name the hosts and slots in the --include/--exclude spec instead"
                .into(),
        ));
    }
    if req.num_nodes == Some(0) || req.nproc_per_node == Some(0) {
        return Err(LaunchError::Usage(
            "--num-nodes and --nproc-per-node must be at least 1".into(),
        ));
    }
    let path = req
        .hostfile
        .clone()
        .unwrap_or_else(|| DEFAULT_HOSTFILE.into());
    let pool = match fetch_hostfile(&path)? {
        Some(pool) => pool,
        None => {
            if req.hostfile.is_some() && req.num_nodes.is_some_and(|n| n > 1) {
                return Err(LaunchError::Usage(format!(
                    "--num-nodes {} needs a hostfile, and {} does not exist",
                    req.num_nodes.unwrap(),
                    path.display()
                )));
            }
            vec![("localhost".to_string(), req.nproc_per_node.unwrap_or(1))]
        }
    };
    let mut active = parse_inclusion_exclusion(&pool, &req.include, &req.exclude)?;
    if let Some(n) = req.num_nodes {
        if n > active.len() {
            return Err(LaunchError::Usage(format!(
                "--num-nodes {n}: only {} host(s) available ({})",
                active.len(),
                active
                    .iter()
                    .map(|(h, _)| h.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        active.truncate(n);
    }
    if let Some(n) = req.nproc_per_node {
        for (_, slots) in active.iter_mut() {
            *slots = (0..n).collect();
        }
    }
    if active.is_empty() {
        return Err(LaunchError::Usage(
            "no hosts left to launch on after --include/--exclude".into(),
        ));
    }
    Ok(active)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> std::path::PathBuf {
        let p =
            std::env::temp_dir().join(format!("rustspeed-hostfile-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn num_nodes_and_nproc_with_filters_are_usage_errors() {
        // DeepSpeed's test_num_plus_parser: every combination raises.
        for (nodes, nproc) in [(Some(1), None), (Some(1), Some(1)), (None, Some(1))] {
            for (inc, exc) in [("localhost", ""), ("", "localhost")] {
                let req = ResourceRequest {
                    num_nodes: nodes,
                    nproc_per_node: nproc,
                    include: inc.into(),
                    exclude: exc.into(),
                    ..Default::default()
                };
                assert!(matches!(resolve(&req), Err(LaunchError::Usage(_))));
            }
        }
    }

    #[test]
    fn missing_hostfile_means_local() {
        let req = ResourceRequest {
            hostfile: Some("/nonexistent/hostfile".into()),
            nproc_per_node: Some(3),
            ..Default::default()
        };
        assert_eq!(
            resolve(&req).unwrap(),
            vec![("localhost".into(), vec![0, 1, 2])]
        );
    }

    #[test]
    fn num_nodes_and_nproc_cut_the_hostfile() {
        let p = write("cut", "a slots=4\nb slots=4\nc slots=2\n");
        let req = ResourceRequest {
            hostfile: Some(p.clone()),
            num_nodes: Some(2),
            nproc_per_node: Some(2),
            ..Default::default()
        };
        assert_eq!(
            resolve(&req).unwrap(),
            vec![("a".into(), vec![0, 1]), ("b".into(), vec![0, 1])]
        );
        let req = ResourceRequest {
            hostfile: Some(p.clone()),
            exclude: "a@b:0".into(),
            ..Default::default()
        };
        assert_eq!(
            resolve(&req).unwrap(),
            vec![("b".into(), vec![1, 2, 3]), ("c".into(), vec![0, 1])]
        );
        let req = ResourceRequest {
            hostfile: Some(p.clone()),
            num_nodes: Some(4),
            ..Default::default()
        };
        assert!(resolve(&req)
            .unwrap_err()
            .to_string()
            .contains("only 3 host(s)"));
        std::fs::remove_file(p).unwrap();
    }
}
