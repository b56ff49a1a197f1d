//! Command lines that hand a multi-node job to mpirun (OpenMPI), srun (Slurm) or ssh. Ranks
//! started by mpirun/srun find their rank in OMPI_COMM_WORLD_* / SLURM_* (see `env`); with
//! ssh, each node runs `rustspeed launch --launcher local --node-rank i` for its own ranks.

use super::{LaunchError, Resources};

/// What every multi-node launcher needs.
#[derive(Debug, Clone)]
pub struct MultiNodeJob {
    pub world: Resources,
    pub master_addr: String,
    pub master_port: u16,
    /// Extra arguments for mpirun/srun/ssh, already split.
    pub launcher_args: Vec<String>,
    pub program: String,
    pub args: Vec<String>,
    /// Environment variables to pass on to every rank (name, value).
    pub exports: Vec<(String, String)>,
}

impl MultiNodeJob {
    fn total(&self) -> usize {
        self.world.iter().map(|(_, s)| s.len()).sum()
    }
    fn exports(&self) -> Vec<(String, String)> {
        let mut e = vec![
            ("MASTER_ADDR".to_string(), self.master_addr.clone()),
            ("MASTER_PORT".to_string(), self.master_port.to_string()),
        ];
        e.extend(self.exports.iter().cloned());
        e
    }
}

/// `mpirun -np N -host h1:n1,h2:n2 --bind-to none -x MASTER_ADDR=.. -x MASTER_PORT=.. ...
/// PROGRAM ARGS` (OpenMPI; ranks placed by slot counts per host).
pub fn mpirun_command(job: &MultiNodeJob) -> Vec<String> {
    let hosts: Vec<String> = job
        .world
        .iter()
        .map(|(h, s)| format!("{h}:{}", s.len()))
        .collect();
    let mut cmd: Vec<String> = vec![
        "mpirun".into(),
        "-np".into(),
        job.total().to_string(),
        "-host".into(),
        hosts.join(","),
        "--bind-to".into(),
        "none".into(),
    ];
    cmd.extend(job.launcher_args.iter().cloned());
    for (k, v) in job.exports() {
        cmd.push("-x".into());
        cmd.push(format!("{k}={v}"));
    }
    cmd.push(job.program.clone());
    cmd.extend(job.args.iter().cloned());
    cmd
}

/// `srun -n N --nodes K --ntasks-per-node M --nodelist h1,h2 --export ALL,MASTER_ADDR=..,...
/// PROGRAM ARGS`. Slurm places the same number of tasks on every node, so the hosts must
/// have equal slot counts.
pub fn srun_command(job: &MultiNodeJob) -> Result<Vec<String>, LaunchError> {
    let per = job.world[0].1.len();
    if job.world.iter().any(|(_, s)| s.len() != per) {
        let counts: Vec<String> = job
            .world
            .iter()
            .map(|(h, s)| format!("{h}={}", s.len()))
            .collect();
        return Err(LaunchError::Usage(format!(
            "--launcher slurm needs the same number of ranks on every node, got {}; \
             adjust the hostfile or --include/--exclude",
            counts.join(", ")
        )));
    }
    let exports: Vec<String> = job
        .exports()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut cmd: Vec<String> = vec![
        "srun".into(),
        "-n".into(),
        job.total().to_string(),
        "--nodes".into(),
        job.world.len().to_string(),
        "--ntasks-per-node".into(),
        per.to_string(),
        "--nodelist".into(),
        job.world
            .iter()
            .map(|(h, _)| h.as_str())
            .collect::<Vec<_>>()
            .join(","),
        "--export".into(),
        format!("ALL,{}", exports.join(",")),
    ];
    cmd.extend(job.launcher_args.iter().cloned());
    cmd.push(job.program.clone());
    cmd.extend(job.args.iter().cloned());
    Ok(cmd)
}

/// Quotes `s` for a POSIX shell (the remote side of ssh runs one shell command line).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// One `ssh HOST 'cd CWD && env ... LAUNCHER launch --launcher local --node-rank i ...'` per
/// node. `launcher` is the rustspeed binary's path on the nodes, `cwd` the directory to run in.
pub fn ssh_commands(job: &MultiNodeJob, launcher: &str, cwd: &str) -> Vec<Vec<String>> {
    let slots: Vec<String> = job.world.iter().map(|(_, s)| s.len().to_string()).collect();
    job.world
        .iter()
        .enumerate()
        .map(|(i, (host, _))| {
            let mut remote: Vec<String> =
                vec!["cd".into(), shell_quote(cwd), "&&".into(), "env".into()];
            for (k, v) in &job.exports {
                remote.push(shell_quote(&format!("{k}={v}")));
            }
            remote.extend(
                [
                    launcher,
                    "launch",
                    "--launcher",
                    "local",
                    "--node-rank",
                    &i.to_string(),
                    "--node-slots",
                    &slots.join(","),
                    "--master-addr",
                    &job.master_addr,
                    "--master-port",
                    &job.master_port.to_string(),
                    "--",
                    &job.program,
                ]
                .iter()
                .map(|s| shell_quote(s)),
            );
            remote.extend(job.args.iter().map(|a| shell_quote(a)));
            let mut cmd: Vec<String> = vec!["ssh".into()];
            cmd.extend(job.launcher_args.iter().cloned());
            cmd.push(host.clone());
            cmd.push(remote.join(" "));
            cmd
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> MultiNodeJob {
        MultiNodeJob {
            world: vec![
                ("worker-0".into(), vec![0, 1]),
                ("worker-1".into(), vec![0, 2]),
            ],
            master_addr: "worker-0".into(),
            master_port: 29500,
            launcher_args: vec![],
            program: "rustspeed".into(),
            args: vec!["train".into(), "--lr".into(), "1e-4".into(), "it's".into()],
            exports: vec![("RUSTSPEED_COMM_TIMEOUT".into(), "60".into())],
        }
    }

    #[test]
    fn mpirun_line() {
        assert_eq!(
            mpirun_command(&job()).join(" "),
            "mpirun -np 4 -host worker-0:2,worker-1:2 --bind-to none -x MASTER_ADDR=worker-0 \
             -x MASTER_PORT=29500 -x RUSTSPEED_COMM_TIMEOUT=60 rustspeed train --lr 1e-4 it's"
        );
    }

    #[test]
    fn srun_line_and_uneven_nodes() {
        let mut j = job();
        j.launcher_args = vec!["--partition".into(), "gpu".into()];
        assert_eq!(
            srun_command(&j).unwrap().join(" "),
            "srun -n 4 --nodes 2 --ntasks-per-node 2 --nodelist worker-0,worker-1 \
             --export ALL,MASTER_ADDR=worker-0,MASTER_PORT=29500,RUSTSPEED_COMM_TIMEOUT=60 \
             --partition gpu rustspeed train --lr 1e-4 it's"
        );
        j.world[1].1.push(3);
        let e = srun_command(&j).unwrap_err().to_string();
        assert!(e.contains("worker-0=2, worker-1=3"), "{e}");
    }

    #[test]
    fn ssh_lines_run_the_local_launcher_per_node() {
        let mut j = job();
        j.launcher_args = vec!["-p".into(), "2222".into()];
        let cmds = ssh_commands(&j, "/opt/bin/rustspeed", "/home/me/run dir");
        assert_eq!(cmds.len(), 2);
        assert_eq!(&cmds[1][..4], ["ssh", "-p", "2222", "worker-1"]);
        assert_eq!(
            cmds[1][4],
            "cd '/home/me/run dir' && env RUSTSPEED_COMM_TIMEOUT=60 /opt/bin/rustspeed launch --launcher local \
             --node-rank 1 --node-slots 2,2 --master-addr worker-0 --master-port 29500 -- rustspeed train --lr 1e-4 'it'\\''s'"
        );
    }
}
