//! One way to set up logs for every Kiln program.

use tracing_subscriber::EnvFilter;

/// Logs to stderr (never stdout: in stdio MCP mode stdout is the protocol
/// channel, and the CLI's stdout is for results). The filter comes from `KILN_LOG`,
/// then `RUST_LOG`, then `default`; ANSI colours only on a terminal.
pub fn init(default: &str) {
    let filter = std::env::var("KILN_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| default.to_string());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .try_init();
}
