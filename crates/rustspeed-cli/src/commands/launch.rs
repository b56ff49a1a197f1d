//! `rustspeed launch`: starts the ranks of a data-parallel job like `deepspeed`/torchrun.
//! One node: spawns the ranks here with RANK, LOCAL_RANK, WORLD_SIZE, ... and `[rank N] `
//! log prefixes, and stops all of them when one fails (exit code = the failed rank's).
//! Several nodes: hands the job to mpirun, srun or ssh (each node then runs
//! `rustspeed launch --launcher local --node-rank i`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use rustspeed_comm::launch::{
    self, local::describe_status, LaunchError, LocalJob, MultiNodeJob, ResourceRequest, Resources,
};

use crate::exit::UsageError;

/// DeepSpeed's and torch's default rendezvous port.
const DEFAULT_MASTER_PORT: u16 = 29500;

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Launcher {
    /// Spawn the ranks on this machine (the default on one node).
    Local,
    /// OpenMPI's mpirun (ranks read OMPI_COMM_WORLD_RANK/SIZE).
    Mpi,
    /// Slurm's srun (ranks read SLURM_PROCID/SLURM_NTASKS).
    Slurm,
    /// ssh to each node and run the local launcher there (the default on several nodes).
    Ssh,
}

#[derive(clap::Args)]
pub struct Args {
    /// Ranks per node (DeepSpeed --num_gpus). Without a hostfile: ranks on this machine (default 1).
    #[arg(long, value_name = "N")]
    pub nproc_per_node: Option<usize>,
    /// DeepSpeed hostfile (`HOST slots=N` lines). Default /job/hostfile; missing = this machine.
    #[arg(short = 'H', long, value_name = "FILE")]
    pub hostfile: Option<PathBuf>,
    /// Hosts/slots to use: NODE_SPEC[@NODE_SPEC...], NODE_SPEC = NAME[:SLOT[,SLOT...]].
    #[arg(short = 'i', long, value_name = "SPEC", conflicts_with = "exclude")]
    pub include: Option<String>,
    /// Hosts/slots not to use, same format as --include.
    #[arg(short = 'e', long, value_name = "SPEC")]
    pub exclude: Option<String>,
    /// Use the first N hosts of the hostfile.
    #[arg(long, value_name = "N")]
    pub num_nodes: Option<usize>,
    /// Address of rank 0's rendezvous store (default: 127.0.0.1 on one node, else the first host).
    #[arg(long, value_name = "ADDR")]
    pub master_addr: Option<String>,
    /// Port of rank 0's rendezvous store (default: a free port on one node, 29500 across nodes).
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
    /// How to start the ranks: local on one node, ssh on several (default), or mpi / slurm.
    #[arg(long, value_enum)]
    pub launcher: Option<Launcher>,
    /// Extra arguments for mpirun / srun / ssh, as one string (split on whitespace).
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    pub launcher_args: Option<String>,
    /// Seconds the other ranks get between SIGTERM and SIGKILL once one rank failed.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub grace_period: f64,
    /// Print what would run (each rank's environment, or the mpirun/srun/ssh lines) and exit.
    #[arg(long)]
    pub dry_run: bool,
    /// This node's index (set by the ssh launcher on each node).
    #[arg(long, hide = true, requires = "node_slots")]
    pub node_rank: Option<usize>,
    /// Ranks on every node, e.g. 4,4 (set by the ssh launcher on each node).
    #[arg(long, hide = true, value_delimiter = ',', requires = "node_rank")]
    pub node_slots: Option<Vec<usize>>,
    /// The program to start and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "PROGRAM ARGS"
    )]
    pub command: Vec<String>,
}

pub fn run(args: Args) -> Result<()> {
    let (program, prog_args) = (args.command[0].clone(), args.command[1..].to_vec());
    if !(args.grace_period >= 0.0 && args.grace_period.is_finite()) {
        return Err(UsageError(format!(
            "--grace-period {}: expected a non-negative number of seconds",
            args.grace_period
        ))
        .into());
    }
    let grace = Duration::from_secs_f64(args.grace_period);

    // The remote half of `--launcher ssh`: this node's ranks of a known world.
    if let (Some(node_rank), Some(slots)) = (args.node_rank, &args.node_slots) {
        if node_rank >= slots.len() {
            return Err(UsageError(format!(
                "--node-rank {node_rank} with {} nodes in --node-slots",
                slots.len()
            ))
            .into());
        }
        let world: Resources = slots
            .iter()
            .enumerate()
            .map(|(i, &n)| (format!("node{i}"), (0..n).collect()))
            .collect();
        let addr = args
            .master_addr
            .clone()
            .ok_or_else(|| UsageError("--node-rank needs --master-addr (rank 0's host)".into()))?;
        let port = args.master_port.unwrap_or(DEFAULT_MASTER_PORT);
        return run_here(
            &world,
            node_rank,
            &addr,
            port,
            &program,
            &prog_args,
            grace,
            args.dry_run,
        );
    }

    let req = ResourceRequest {
        hostfile: args.hostfile.clone(),
        include: args.include.clone().unwrap_or_default(),
        exclude: args.exclude.clone().unwrap_or_default(),
        num_nodes: args.num_nodes,
        nproc_per_node: args.nproc_per_node,
    };
    let world = launch::resolve(&req).map_err(usage)?;
    let launcher = args.launcher.unwrap_or(if world.len() == 1 {
        Launcher::Local
    } else {
        Launcher::Ssh
    });
    let launcher_args: Vec<String> = args
        .launcher_args
        .as_deref()
        .unwrap_or("")
        .split_whitespace()
        .map(String::from)
        .collect();

    if launcher == Launcher::Local {
        if world.len() > 1 {
            let hosts: Vec<&str> = world.iter().map(|(h, _)| h.as_str()).collect();
            return Err(UsageError(format!(
                "--launcher local starts ranks on this machine only, but {} hosts are selected ({}); \
                 use --launcher ssh|mpi|slurm, or --include a single host",
                world.len(),
                hosts.join(", ")
            ))
            .into());
        }
        let addr = args
            .master_addr
            .clone()
            .unwrap_or_else(|| "127.0.0.1".into());
        let port = match args.master_port {
            Some(p) => p,
            None => local_port(),
        };
        return run_here(
            &world,
            0,
            &addr,
            port,
            &program,
            &prog_args,
            grace,
            args.dry_run,
        );
    }

    let job = MultiNodeJob {
        master_addr: args
            .master_addr
            .clone()
            .unwrap_or_else(|| world[0].0.clone()),
        master_port: args.master_port.unwrap_or(DEFAULT_MASTER_PORT),
        world,
        launcher_args,
        program,
        args: prog_args,
        exports: exports(),
    };
    let cmds: Vec<Vec<String>> = match launcher {
        Launcher::Mpi => vec![launch::mpirun_command(&job)],
        Launcher::Slurm => vec![launch::srun_command(&job).map_err(usage)?],
        Launcher::Ssh => {
            let exe = std::env::current_exe().context("locating the rustspeed binary")?;
            let cwd = std::env::current_dir().context("reading the current directory")?;
            launch::ssh_commands(&job, &exe.to_string_lossy(), &cwd.to_string_lossy())
        }
        Launcher::Local => unreachable!(),
    };
    if args.dry_run {
        for c in &cmds {
            println!("{}", shell_line(c));
        }
        return Ok(());
    }
    if launcher == Launcher::Ssh {
        let procs = cmds
            .iter()
            .zip(&job.world)
            .enumerate()
            .map(|(i, (c, (host, _)))| {
                let mut cmd = Command::new(&c[0]);
                cmd.args(&c[1..]);
                (format!("node {i} ({host})"), cmd)
            })
            .collect();
        return finish(launch::run_local(LocalJob { procs, grace }));
    }
    let status = Command::new(&cmds[0][0])
        .args(&cmds[0][1..])
        .status()
        .with_context(|| format!("cannot start {} (is it installed and on PATH?)", cmds[0][0]))?;
    if !status.success() {
        let (how, code) = describe_status(status);
        eprintln!("error: {} {how}", cmds[0][0]);
        std::process::exit(code);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_here(
    world: &Resources,
    node_rank: usize,
    addr: &str,
    port: u16,
    program: &str,
    args: &[String],
    grace: Duration,
    dry_run: bool,
) -> Result<()> {
    let envs = launch::rank_envs(world, node_rank, addr, port);
    if dry_run {
        for env in &envs {
            let vars: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let mut line = vec![program.to_string()];
            line.extend(args.iter().cloned());
            println!("{} {}", vars.join(" "), shell_line(&line));
        }
        return Ok(());
    }
    finish(launch::run_local(LocalJob::ranks(
        program, args, &envs, grace,
    )))
}

/// Success, a usage error (exit 2), or a failed rank: print which and how, and exit with the
/// rank's own exit code (128 + signal for a signal) so scripts see what the rank saw.
fn finish(r: Result<(), LaunchError>) -> Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(LaunchError::RankFailed { message, exit_code }) => {
            eprintln!("error: {message}");
            std::process::exit(if exit_code == 0 { 1 } else { exit_code });
        }
        Err(e @ LaunchError::Usage(_)) => Err(usage(e)),
        Err(LaunchError::Io(m)) => Err(anyhow::anyhow!(m)),
    }
}

fn usage(e: LaunchError) -> anyhow::Error {
    UsageError(e.to_string()).into()
}

/// On one node the store's port is internal to the job, so it is one the kernel hands out as
/// free (not 29500): two jobs started at the same instant on one machine cannot collide, as
/// they could with "29500 if it looks free". Naming --master-port explicitly disables this.
fn local_port() -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map_or(DEFAULT_MASTER_PORT, |a| a.port())
}

/// Variables passed on to remote ranks: RUSTSPEED_*, NCCL_* and OMP_NUM_THREADS from this
/// environment, then the KEY=VALUE lines of `.deepspeed_env` (or $DS_ENV_FILE) in the home and
/// current directories, as DeepSpeed's runner does.
fn exports() -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            k.starts_with("RUSTSPEED_") || k.starts_with("NCCL_") || k == "OMP_NUM_THREADS"
        })
        .collect();
    let name = std::env::var("DS_ENV_FILE").unwrap_or_else(|_| ".deepspeed_env".into());
    let dirs = [std::env::var("HOME").ok(), Some(".".into())];
    for dir in dirs.into_iter().flatten() {
        if let Ok(text) = std::fs::read_to_string(PathBuf::from(dir).join(&name)) {
            for line in text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
            {
                if let Some((k, v)) = line.split_once('=') {
                    out.retain(|(x, _)| x != k.trim());
                    out.push((k.trim().to_string(), v.trim().to_string()));
                }
            }
        }
    }
    out.sort();
    out
}

fn shell_line(words: &[String]) -> String {
    words
        .iter()
        .map(|w| launch::multinode::shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ")
}
