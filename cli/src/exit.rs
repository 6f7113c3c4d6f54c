//! The exit codes of `kiln`, one per outcome, so scripts can tell a failed job
//! from a typo from a broker that is down. `kiln --help` prints this table and the
//! README repeats it; `cli/tests/exit_codes.rs` checks each with real processes.

use std::process::ExitCode;

/// One outcome and its code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The command did what it was asked; a followed job succeeded.
    Ok = 0,
    /// Any other error: the broker refused the request, a file could not be
    /// written, an artifact failed its integrity check.
    Error = 1,
    /// The command line is wrong (clap's own code).
    Usage = 2,
    /// A followed job (`submit --wait`, `watch`) failed.
    JobFailed = 3,
    /// A followed job was cancelled.
    JobCancelled = 4,
    /// The broker cannot be reached or did not answer.
    BrokerUnreachable = 5,
    /// The configuration (files, `KILN_*` variables, flags) is invalid.
    Config = 6,
    /// `gpu-info` could read no GPU.
    NoGpu = 7,
    /// Interrupted (Ctrl-C) while following a job; the job keeps running.
    Interrupted = 130,
}

impl From<Outcome> for ExitCode {
    fn from(o: Outcome) -> ExitCode {
        ExitCode::from(o as u8)
    }
}

/// The table for `--help` and the README.
pub const TABLE: &str = "\
Exit codes:
  0    success (a followed job succeeded)
  1    error (the broker refused the request, I/O, integrity)
  2    usage error on the command line
  3    the followed job failed
  4    the followed job was cancelled
  5    the broker cannot be reached or did not answer
  6    invalid configuration (file, KILN_* variable or flag)
  7    gpu-info: no GPU could be read
  130  interrupted while following a job (the job keeps running)";

/// The outcome of an error that ended a command.
pub fn for_error(e: &anyhow::Error) -> Outcome {
    for cause in e.chain() {
        if cause.downcast_ref::<kiln_config::ConfigError>().is_some() {
            return Outcome::Config;
        }
        if let Some(c) = cause.downcast_ref::<kiln_protocol::ClientError>() {
            return match c {
                kiln_protocol::ClientError::Unreachable(_)
                | kiln_protocol::ClientError::Timeout { .. } => Outcome::BrokerUnreachable,
                _ => Outcome::Error,
            };
        }
    }
    Outcome::Error
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_lists_every_code() {
        for o in [
            Outcome::Ok,
            Outcome::Error,
            Outcome::Usage,
            Outcome::JobFailed,
            Outcome::JobCancelled,
            Outcome::BrokerUnreachable,
            Outcome::Config,
            Outcome::NoGpu,
            Outcome::Interrupted,
        ] {
            let code = format!("\n  {:<4} ", o as u8);
            assert!(TABLE.contains(&code), "{o:?} missing from the table");
        }
    }
}
