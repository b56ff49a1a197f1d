//! Who am I: rank and world from the variables launchers set.

use crate::error::{CommError, Result};

/// A rank's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankInfo {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
}

impl RankInfo {
    pub fn single() -> RankInfo {
        RankInfo::local(0, 1)
    }

    /// Rank `rank` of `world` ranks all on this machine.
    pub fn local(rank: usize, world: usize) -> RankInfo {
        RankInfo {
            rank,
            world_size: world,
            local_rank: rank,
            local_world_size: world,
        }
    }

    /// torchrun / `rustspeed launch` (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE), then
    /// OpenMPI (OMPI_COMM_WORLD_*), then PMI (MPICH, Intel MPI: PMI_RANK, PMI_SIZE), then
    /// Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID). Nothing set: a world of one.
    pub fn from_env() -> Result<RankInfo> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// `from_env` over any variable lookup (tests, or an environment captured elsewhere).
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<RankInfo> {
        let var_usize = |name: &str| parse_usize(name, get(name));
        const SOURCES: [(&str, &str, &str, &str); 4] = [
            ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"),
            (
                "OMPI_COMM_WORLD_RANK",
                "OMPI_COMM_WORLD_SIZE",
                "OMPI_COMM_WORLD_LOCAL_RANK",
                "OMPI_COMM_WORLD_LOCAL_SIZE",
            ),
            ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
            (
                "SLURM_PROCID",
                "SLURM_NTASKS",
                "SLURM_LOCALID",
                "SLURM_NTASKS_PER_NODE",
            ),
        ];
        for (rank_var, size_var, local_var, local_size_var) in SOURCES {
            let (rank, size) = (var_usize(rank_var)?, var_usize(size_var)?);
            let (rank, world_size) = match (rank, size) {
                (Some(r), Some(s)) => (r, s),
                (None, None) => continue,
                _ => {
                    return Err(CommError::setup(format!(
                        "{rank_var} and {size_var} must be set together (got only one); \
                         start ranks with `rustspeed launch` or torchrun"
                    )))
                }
            };
            if world_size == 0 || rank >= world_size {
                return Err(CommError::setup(format!(
                    "{rank_var}={rank} with {size_var}={world_size}: expected 0 <= rank < world size"
                )));
            }
            // LOCAL_WORLD_SIZE absent (older launchers): assume one machine; the shm backend's
            // host check catches the multi-node case.
            let local_rank = var_usize(local_var)?.unwrap_or(rank);
            let local_world_size = match var_usize(local_size_var)? {
                Some(n) => n,
                None if rank_var == "RANK" => var_usize("LOCAL_SIZE")?.unwrap_or(world_size),
                None => world_size,
            };
            return Ok(RankInfo {
                rank,
                world_size,
                local_rank,
                local_world_size,
            });
        }
        Ok(RankInfo::single())
    }
}

/// MASTER_ADDR and MASTER_PORT, needed when the world has more than one rank.
pub fn master() -> Result<(String, u16)> {
    let addr = std::env::var("MASTER_ADDR").map_err(|_| {
        CommError::setup(
            "MASTER_ADDR is not set: with WORLD_SIZE > 1 every rank needs the address of rank 0's rendezvous store \
             (start ranks with `rustspeed launch`, or set MASTER_ADDR and MASTER_PORT)",
        )
    })?;
    let port = var_usize("MASTER_PORT")?.ok_or_else(|| {
        CommError::setup(
            "MASTER_PORT is not set: with WORLD_SIZE > 1 every rank needs rank 0's rendezvous port \
             (start ranks with `rustspeed launch`, or set MASTER_ADDR and MASTER_PORT)",
        )
    })?;
    if port == 0 || port > 65535 {
        return Err(CommError::setup(format!(
            "MASTER_PORT={port}: expected a port in 1..=65535"
        )));
    }
    Ok((addr, port as u16))
}

pub(crate) fn var_usize(name: &str) -> Result<Option<usize>> {
    parse_usize(name, std::env::var(name).ok())
}

fn parse_usize(name: &str, value: Option<String>) -> Result<Option<usize>> {
    match value {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| {
            CommError::setup(format!("{name}={v:?}: expected a non-negative integer"))
        }),
    }
}

pub(crate) fn var_f64(name: &str) -> Result<Option<f64>> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(v) => v
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| CommError::setup(format!("{name}={v:?}: expected a number"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(vars: &[(&str, &str)]) -> Result<RankInfo> {
        RankInfo::from_vars(|n| {
            vars.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn launcher_variables() {
        assert_eq!(info(&[]).unwrap(), RankInfo::single());
        let torchrun = info(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "8"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
        ]);
        assert_eq!(
            torchrun.unwrap(),
            RankInfo {
                rank: 3,
                world_size: 8,
                local_rank: 1,
                local_world_size: 2
            }
        );
        // DeepSpeed's launch.py sets LOCAL_SIZE, not LOCAL_WORLD_SIZE.
        let ds = info(&[
            ("RANK", "1"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_SIZE", "4"),
        ]);
        assert_eq!(ds.unwrap().local_world_size, 4);
        let ompi = info(&[
            ("OMPI_COMM_WORLD_RANK", "5"),
            ("OMPI_COMM_WORLD_SIZE", "6"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "2"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "3"),
        ]);
        assert_eq!(
            ompi.unwrap(),
            RankInfo {
                rank: 5,
                world_size: 6,
                local_rank: 2,
                local_world_size: 3
            }
        );
        let pmi = info(&[("PMI_RANK", "1"), ("PMI_SIZE", "2")]).unwrap();
        assert_eq!((pmi.rank, pmi.world_size, pmi.local_rank), (1, 2, 1));
        let slurm = info(&[
            ("SLURM_PROCID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_LOCALID", "0"),
        ]);
        assert_eq!(slurm.unwrap().world_size, 2);
    }

    #[test]
    fn bad_variables_name_themselves() {
        let e = info(&[("RANK", "2"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(e.message.contains("RANK=2 with WORLD_SIZE=2"), "{e}");
        let e = info(&[("RANK", "0")]).unwrap_err();
        assert!(
            e.message
                .contains("RANK and WORLD_SIZE must be set together"),
            "{e}"
        );
        let e = info(&[("RANK", "x"), ("WORLD_SIZE", "2")]).unwrap_err();
        assert!(
            e.message
                .contains("RANK=\"x\": expected a non-negative integer"),
            "{e}"
        );
    }
}
