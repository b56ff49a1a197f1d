//! One error type for every backend. It is `Clone` because a failed collective breaks the
//! communicator: every later call returns the same error instead of hanging on a half-done
//! protocol (NCCL's "communicator aborted" behaviour).

use std::fmt;

/// What went wrong, for callers that want to react (tests, the engine's exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A collective or send/recv did not finish within the watchdog timeout.
    Timeout,
    /// A peer process exited (or dropped its communicator) while others waited for it.
    PeerDied,
    /// Ranks called different collectives (or the same one with different sizes).
    Mismatch,
    /// Another rank failed and aborted the group; the message is that rank's.
    Aborted,
    /// The caller passed buffers that cannot work (wrong lengths, bad rank, ...).
    InvalidArgument,
    /// Rendezvous or shared-memory setup failed (environment, store, /dev/shm).
    Setup,
    /// Recognised but not implemented.
    NotSupported,
}

/// An error from `rustspeed-comm`, with a message written for the person running the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommError {
    pub kind: ErrorKind,
    pub message: String,
}

impl CommError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        CommError {
            kind,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, message)
    }
    pub fn setup(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Setup, message)
    }
    pub fn not_supported(what: impl fmt::Display) -> Self {
        Self::new(
            ErrorKind::NotSupported,
            format!("not supported yet: {what}"),
        )
    }
}

impl fmt::Display for CommError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CommError {}

pub type Result<T, E = CommError> = std::result::Result<T, E>;
