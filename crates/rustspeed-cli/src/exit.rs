//! The top-level error handler: one clear message, and an exit code that tells the user's
//! mistakes (2: usage, config, data) from failures of the run itself (1).

/// A mistake in how the command was called (flags, missing files, bad values).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Exit code for an error: 130 for a Ctrl-C that stopped training cleanly, 2 when any cause
/// in the chain is the user's input, else 1.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if err.is::<crate::commands::train::Interrupted>() {
        return 130;
    }
    let user_error = err.chain().any(|cause| {
        cause.is::<UsageError>()
            || cause.is::<rustspeed_config::ConfigError>()
            || cause.is::<rustspeed_models::hf_config::HfConfigError>()
            || cause.is::<crate::commands::eval::DataError>()
    });
    if user_error {
        2
    } else {
        1
    }
}

/// Prints the error (with its backtrace only when RUST_BACKTRACE asks) and returns the exit code.
pub fn report(err: &anyhow::Error) -> i32 {
    let backtrace = std::env::var("RUST_BACKTRACE").is_ok_and(|v| v != "0");
    if backtrace {
        eprintln!("error: {err:?}");
    } else {
        eprintln!("error: {err:#}");
    }
    exit_code(err)
}
