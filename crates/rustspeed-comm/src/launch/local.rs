//! Starting this node's ranks: environment per rank, `[rank N] ` log prefixes, and stopping
//! every rank when one fails (SIGTERM, then SIGKILL after a grace period).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{LaunchError, Resources};

/// The environment of every rank of node `node_rank` of `world` (what DeepSpeed's launch.py
/// and torchrun export): RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, LOCAL_SIZE,
/// CROSS_RANK, CROSS_SIZE, MASTER_ADDR, MASTER_PORT. Global ranks count the slots of earlier
/// nodes first (DeepSpeed's world_info order).
pub fn rank_envs(
    world: &Resources,
    node_rank: usize,
    master_addr: &str,
    master_port: u16,
) -> Vec<Vec<(String, String)>> {
    let world_size: usize = world.iter().map(|(_, s)| s.len()).sum();
    let first: usize = world[..node_rank].iter().map(|(_, s)| s.len()).sum();
    let local = world[node_rank].1.len();
    (0..local)
        .map(|lr| {
            [
                ("RANK", (first + lr).to_string()),
                ("LOCAL_RANK", lr.to_string()),
                ("WORLD_SIZE", world_size.to_string()),
                ("LOCAL_WORLD_SIZE", local.to_string()),
                ("LOCAL_SIZE", local.to_string()),
                ("CROSS_RANK", node_rank.to_string()),
                ("CROSS_SIZE", world.len().to_string()),
                ("MASTER_ADDR", master_addr.to_string()),
                ("MASTER_PORT", master_port.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
        })
        .collect()
}

/// Processes to run side by side on this machine, each with a log label.
pub struct LocalJob {
    /// (label such as "rank 3", the command to run).
    pub procs: Vec<(String, Command)>,
    /// How long ranks get to exit after SIGTERM before SIGKILL.
    pub grace: Duration,
}

impl LocalJob {
    /// One process per entry of `envs`, each running `program args` with that environment.
    pub fn ranks(
        program: &str,
        args: &[String],
        envs: &[Vec<(String, String)>],
        grace: Duration,
    ) -> LocalJob {
        let procs = envs
            .iter()
            .map(|env| {
                let rank = env
                    .iter()
                    .find(|(k, _)| k == "RANK")
                    .map_or("?", |(_, v)| v.as_str());
                let mut cmd = Command::new(program);
                cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
                (format!("rank {rank}"), cmd)
            })
            .collect();
        LocalJob { procs, grace }
    }
}

/// How a process ended, in words, and the exit code a launcher should pass on.
pub fn describe_status(st: ExitStatus) -> (String, i32) {
    if let Some(code) = st.code() {
        (format!("exited with code {code}"), code)
    } else if let Some(sig) = st.signal() {
        let name = match sig {
            libc::SIGKILL => " (SIGKILL: killed, e.g. by the OOM killer)",
            libc::SIGSEGV => " (SIGSEGV: segmentation fault)",
            libc::SIGABRT => " (SIGABRT: aborted)",
            libc::SIGTERM => " (SIGTERM)",
            libc::SIGINT => " (SIGINT)",
            libc::SIGBUS => " (SIGBUS)",
            _ => "",
        };
        (format!("was killed by signal {sig}{name}"), 128 + sig)
    } else {
        ("ended for an unknown reason".into(), 1)
    }
}

/// Copies `src` line by line to our stdout or stderr with `prefix` before each line, one
/// locked write per line so ranks' lines never interleave mid-line.
fn pump(src: impl Read + Send + 'static, prefix: String, to_stderr: bool) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(src);
        let mut line = Vec::new();
        loop {
            line.clear();
            match r.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let mut msg = Vec::with_capacity(prefix.len() + line.len() + 1);
                    msg.extend_from_slice(prefix.as_bytes());
                    msg.extend_from_slice(&line);
                    if !msg.ends_with(b"\n") {
                        msg.push(b'\n');
                    }
                    let _ = if to_stderr {
                        std::io::stderr().lock().write_all(&msg)
                    } else {
                        std::io::stdout().lock().write_all(&msg)
                    };
                }
            }
        }
    })
}

/// Signals a rank's whole process group: what it forked (data workers, a shell's children)
/// must stop with it, or they would keep its log pipes open.
fn signal(child: &Child, sig: libc::c_int) {
    signal_group(child.id(), sig);
}

fn signal_group(pid: u32, sig: libc::c_int) {
    // SAFETY: plain kill(2) on the process group our child leads.
    unsafe {
        libc::kill(-(pid as libc::pid_t), sig);
    }
}

/// Set by SIGINT/SIGTERM sent to the launcher. Ranks run in their own process groups, so a
/// terminal's Ctrl-C reaches only the launcher, which passes it on.
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    INTERRUPTED.store(sig, Ordering::SeqCst);
}

/// Installs the SIGINT/SIGTERM handlers for the duration of a launch, restoring the old ones.
struct SignalGuard(Vec<(libc::c_int, libc::sighandler_t)>);

impl SignalGuard {
    fn install() -> SignalGuard {
        INTERRUPTED.store(0, Ordering::SeqCst);
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        SignalGuard(
            [libc::SIGINT, libc::SIGTERM]
                .into_iter()
                .map(|s| (s, unsafe { libc::signal(s, handler) }))
                .collect(),
        )
    }
}

impl Drop for SignalGuard {
    fn drop(&mut self) {
        for &(s, old) in &self.0 {
            // SAFETY: restores what `install` replaced.
            unsafe { libc::signal(s, old) };
        }
    }
}

/// How long the other ranks get to exit by themselves after one fails, before SIGTERM.
const SETTLE: Duration = Duration::from_secs(2);

/// Runs the job to completion. When a process fails (non-zero exit or signal), the others
/// get SIGTERM, then SIGKILL after `grace`, and the error names the first failure.
pub fn run_local(job: LocalJob) -> Result<(), LaunchError> {
    let _signals = SignalGuard::install();
    let mut children: Vec<(String, Child)> = Vec::new();
    let mut pumps = Vec::new();
    for (label, mut cmd) in job.procs {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null())
            .process_group(0);
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                for (_, c) in children.iter_mut() {
                    signal(c, libc::SIGKILL);
                    let _ = c.wait();
                }
                return Err(LaunchError::Io(format!(
                    "cannot start {label} ({:?}): {e}",
                    cmd.get_program()
                )));
            }
        };
        let prefix = format!("[{label}] ");
        pumps.push(pump(child.stdout.take().unwrap(), prefix.clone(), false));
        pumps.push(pump(child.stderr.take().unwrap(), prefix, true));
        children.push((label, child));
    }
    // One waiter thread per rank reports its exit the moment it happens, so when a dead rank
    // makes the others fail too, the first failure is the cause, not whichever a poll saw first.
    let (tx, rx) = std::sync::mpsc::channel::<(usize, ExitStatus)>();
    let mut ranks: Vec<(String, u32)> = Vec::new();
    for (i, (label, mut child)) in children.into_iter().enumerate() {
        ranks.push((label, child.id()));
        let tx = tx.clone();
        std::thread::spawn(move || {
            // An error from wait(2) would leave nothing to report: count it as a failure.
            let st = child
                .wait()
                .unwrap_or_else(|_| ExitStatus::from_raw(1 << 8));
            let _ = tx.send((i, st));
        });
    }
    let mut status: Vec<Option<ExitStatus>> = vec![None; ranks.len()];
    let mut failure: Option<(usize, ExitStatus)> = None;
    let mut term_sent: Option<Instant> = None;
    let mut killed = false;
    let mut stopped_by_signal = false;
    let mut failed_at: Option<Instant> = None;
    let mut signalled = 0usize;
    while status.iter().any(Option::is_none) {
        let first = rx.recv_timeout(Duration::from_millis(20)).ok();
        for (i, st) in first
            .into_iter()
            .chain(std::iter::from_fn(|| rx.try_recv().ok()))
        {
            status[i] = Some(st);
            if !st.success() && failure.is_none() {
                failure = Some((i, st));
            }
        }
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        if failure.is_some() && failed_at.is_none() {
            failed_at = Some(Instant::now());
        }
        // After a rank fails, the others get a moment to exit on their own: their communicator
        // notices the dead peer at its next collective and fails with the watchdog's message
        // (naming the operation and the missing rank), which says more than a SIGTERM would.
        let settled = failed_at.is_some_and(|t| t.elapsed() >= job.grace.min(SETTLE));
        if (settled || interrupted != 0) && term_sent.is_none() {
            stopped_by_signal = failure.is_none();
            for (i, (_, pid)) in ranks.iter().enumerate() {
                if status[i].is_none() {
                    signal_group(*pid, libc::SIGTERM);
                    signalled += 1;
                }
            }
            term_sent = Some(Instant::now());
        }
        if let Some(t) = term_sent {
            if !killed && t.elapsed() >= job.grace {
                for (i, (_, pid)) in ranks.iter().enumerate() {
                    if status[i].is_none() {
                        signal_group(*pid, libc::SIGKILL);
                    }
                }
                killed = true;
            }
        }
    }
    // The pipes close when the last process holding them exits; one that escaped its process
    // group (setsid) must not keep the launcher waiting.
    let deadline = Instant::now() + Duration::from_secs(2);
    while pumps.iter().any(|p| !p.is_finished()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let interrupted = INTERRUPTED.load(Ordering::SeqCst);
    if stopped_by_signal {
        return Err(LaunchError::RankFailed {
            message: format!(
                "launcher interrupted by signal {interrupted}; all ranks were stopped"
            ),
            exit_code: 128 + interrupted,
        });
    }
    match failure {
        None => Ok(()),
        Some((i, st)) => {
            let (how, exit_code) = describe_status(st);
            let others = ranks.len() - 1;
            let how_stopped = format!("(SIGTERM, SIGKILL after {:.0}s)", job.grace.as_secs_f64());
            let stopped = if signalled == others && others > 0 {
                format!("; the other {others} process(es) were stopped {how_stopped}")
            } else if signalled > 0 {
                format!(
                    "; {signalled} of the other {others} process(es) were stopped {how_stopped}, the rest exited on their own"
                )
            } else if others > 0 {
                format!("; the other {others} process(es) exited on their own")
            } else {
                String::new()
            };
            Err(LaunchError::RankFailed {
                message: format!("{} {how}{stopped}", ranks[i].0),
                exit_code,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str, envs: &[Vec<(String, String)>], grace_ms: u64) -> LocalJob {
        LocalJob::ranks(
            "sh",
            &["-c".into(), script.into()],
            envs,
            Duration::from_millis(grace_ms),
        )
    }

    fn world(n: usize) -> Resources {
        vec![("localhost".into(), (0..n).collect())]
    }

    #[test]
    fn env_of_each_rank_on_the_second_node() {
        let w: Resources = vec![("a".into(), vec![0, 1, 2]), ("b".into(), vec![1, 3])];
        let envs = rank_envs(&w, 1, "a", 29501);
        assert_eq!(envs.len(), 2);
        let get = |r: usize, k: &str| envs[r].iter().find(|(n, _)| n == k).unwrap().1.clone();
        assert_eq!(get(0, "RANK"), "3");
        assert_eq!(get(1, "RANK"), "4");
        assert_eq!(get(1, "LOCAL_RANK"), "1");
        assert_eq!(get(1, "WORLD_SIZE"), "5");
        assert_eq!(get(1, "LOCAL_WORLD_SIZE"), "2");
        assert_eq!(get(1, "LOCAL_SIZE"), "2");
        assert_eq!(get(1, "CROSS_RANK"), "1");
        assert_eq!(get(1, "CROSS_SIZE"), "2");
        assert_eq!(get(0, "MASTER_ADDR"), "a");
        assert_eq!(get(0, "MASTER_PORT"), "29501");
    }

    #[test]
    fn all_ranks_succeed() {
        let envs = rank_envs(&world(3), 0, "127.0.0.1", 1);
        run_local(sh("test \"$WORLD_SIZE\" = 3", &envs, 1000)).unwrap();
    }

    #[test]
    fn failing_rank_stops_the_others() {
        let envs = rank_envs(&world(3), 0, "127.0.0.1", 1);
        let t0 = Instant::now();
        let e = run_local(sh(
            "if [ \"$RANK\" = 1 ]; then sleep 0.2; exit 3; fi; sleep 30",
            &envs,
            5000,
        ))
        .unwrap_err();
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
        assert_eq!(
            e,
            LaunchError::RankFailed {
                message: "rank 1 exited with code 3; the other 2 process(es) were stopped (SIGTERM, SIGKILL after 5s)"
                    .into(),
                exit_code: 3
            }
        );
    }

    #[test]
    fn ranks_that_exit_on_their_own_after_a_failure_are_not_signalled() {
        // What a watchdog does: the survivors notice the dead peer and fail by themselves.
        let envs = rank_envs(&world(3), 0, "127.0.0.1", 1);
        let e = run_local(sh(
            "if [ \"$RANK\" = 1 ]; then exit 3; fi; sleep 0.5; exit 1",
            &envs,
            5000,
        ))
        .unwrap_err();
        assert_eq!(
            e,
            LaunchError::RankFailed {
                message: "rank 1 exited with code 3; the other 2 process(es) exited on their own"
                    .into(),
                exit_code: 3
            }
        );
    }

    #[test]
    fn rank_ignoring_sigterm_is_killed_after_the_grace_period() {
        let envs = rank_envs(&world(2), 0, "127.0.0.1", 1);
        let t0 = Instant::now();
        let e = run_local(sh(
            "if [ \"$RANK\" = 0 ]; then kill -9 $$; fi; trap '' TERM; sleep 30 & wait; sleep 30",
            &envs,
            300,
        ))
        .unwrap_err();
        let LaunchError::RankFailed { message, exit_code } = e else {
            panic!("{e:?}")
        };
        assert_eq!(exit_code, 128 + 9);
        assert!(
            message.starts_with("rank 0 was killed by signal 9 (SIGKILL"),
            "{message}"
        );
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    }

    #[test]
    fn missing_program_is_an_io_error() {
        let envs = rank_envs(&world(2), 0, "127.0.0.1", 1);
        let job = LocalJob::ranks("/nonexistent/prog", &[], &envs, Duration::from_secs(1));
        let e = run_local(job).unwrap_err().to_string();
        assert!(
            e.contains("cannot start rank 0") && e.contains("/nonexistent/prog"),
            "{e}"
        );
    }
}
