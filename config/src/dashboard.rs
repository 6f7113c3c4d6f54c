//! The `[dashboard]` table: settings of `kiln-dashboard`, the web dashboard.
//!
//! The dashboard reaches the broker through the `[client]` table (endpoints, token,
//! name), like the CLI and the MCP gateway; this table holds what is particular to
//! serving people in a browser.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{invalid, resolve_secret, ConfigError, Secret};

/// Settings of the web dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DashboardConfig {
    /// Address the dashboard serves HTTP on. Loopback by default; any other address
    /// needs a token.
    pub bind: String,
    /// Token people (`/login`) and scripts (`Authorization: Bearer …`) must present.
    /// Also read from `token_file` or the systemd credential `kiln-dashboard-token`.
    pub token: Option<Secret>,
    /// A file holding `token`.
    #[schemars(example = &"/etc/kiln/dashboard-token")]
    pub token_file: Option<PathBuf>,
    /// `Host` header values accepted (a guard against DNS rebinding), e.g.
    /// `gpu-box.lan:8790`. Empty means the loopback names `localhost`, `127.0.0.1`
    /// and `[::1]` (any port), plus the bind address itself.
    #[schemars(example = ["gpu-box.lan:8790"])]
    pub allowed_hosts: Vec<String>,
    /// How often, in milliseconds, the broker is asked for its workers and active
    /// jobs. Events update the pages between polls; when the broker keeps its
    /// events port closed (client tokens without CURVE) this is the refresh rate.
    pub poll_ms: u64,
    /// Most queued jobs the Queue page lists (the total is always shown).
    pub queue_limit: u64,
    /// Queued jobs, from the head of the queue, whose reason for waiting is asked
    /// for on each refresh of the Queue page (one `get` each).
    pub waiting_detail_limit: u64,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        DashboardConfig {
            bind: "127.0.0.1:8790".into(),
            token: None,
            token_file: None,
            allowed_hosts: Vec::new(),
            poll_ms: 1000,
            queue_limit: 500,
            waiting_detail_limit: 100,
        }
    }
}

impl DashboardConfig {
    /// The token, resolved from inline, file or credential.
    pub fn resolved_token(&self) -> Result<Option<Secret>, ConfigError> {
        resolve_secret(
            "dashboard.token",
            &self.token,
            &self.token_file,
            "kiln-dashboard-token",
        )
    }

    /// Checks what serde cannot.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.bind.parse::<std::net::SocketAddr>().is_err() {
            return invalid(
                "dashboard.bind",
                &format!("{:?} is not an address like 127.0.0.1:8790", self.bind),
            );
        }
        if !(100..=60_000).contains(&self.poll_ms) {
            return invalid("dashboard.poll_ms", "must be between 100 and 60000");
        }
        if !(1..=10_000).contains(&self.queue_limit) {
            return invalid("dashboard.queue_limit", "must be between 1 and 10000");
        }
        if self.waiting_detail_limit > self.queue_limit {
            return invalid(
                "dashboard.waiting_detail_limit",
                "must be at most dashboard.queue_limit",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(cfg: DashboardConfig) -> String {
        match cfg.validate().unwrap_err() {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn defaults_are_loopback_and_valid() {
        let cfg = DashboardConfig::default();
        cfg.validate().unwrap();
        let addr: std::net::SocketAddr = cfg.bind.parse().unwrap();
        assert!(addr.ip().is_loopback());
        assert!(cfg.token.is_none());
    }

    #[test]
    fn bad_values_name_their_key() {
        let bad = |f: fn(&mut DashboardConfig)| {
            let mut c = DashboardConfig::default();
            f(&mut c);
            key_of(c)
        };
        assert_eq!(bad(|c| c.bind = "localhost".into()), "dashboard.bind");
        assert_eq!(bad(|c| c.poll_ms = 5), "dashboard.poll_ms");
        assert_eq!(bad(|c| c.queue_limit = 0), "dashboard.queue_limit");
        assert_eq!(
            bad(|c| c.waiting_detail_limit = 501),
            "dashboard.waiting_detail_limit"
        );
    }
}
