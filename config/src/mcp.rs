//! The `[mcp]` table: settings of `kiln-mcp`, the MCP gateway.
//!
//! The gateway reaches the broker through the `[client]` table (endpoints, token,
//! name); this table holds what is particular to MCP: the HTTP transport and its
//! guards, where outputs may be written, and the defaults of the generate tools.

use std::path::PathBuf;

use kiln_protocol::Backend;
use serde::{Deserialize, Serialize};

use crate::{invalid, resolve_secret, ConfigError, Secret};

/// Settings of the MCP gateway.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct McpConfig {
    /// Address of the streamable HTTP transport (`kiln-mcp --http` without an
    /// address). Loopback by default; any other address needs a token.
    pub http_bind: String,
    /// The path the MCP endpoint is served under.
    pub http_path: String,
    /// Bearer token HTTP clients must present (`Authorization: Bearer …`). Also read
    /// from `token_file` or the systemd credential `kiln-mcp-token`.
    pub token: Option<Secret>,
    /// A file holding `token`.
    #[schemars(example = &"/etc/kiln/mcp-token")]
    pub token_file: Option<PathBuf>,
    /// `Host` header values accepted over HTTP (a guard against DNS rebinding). Empty
    /// means the loopback names `localhost`, `127.0.0.1` and `::1`.
    #[schemars(example = ["gpu-box.lan:8765"])]
    pub allowed_hosts: Vec<String>,
    /// Browser origins accepted over HTTP, e.g. `https://app.example.com:443`. Empty
    /// means pages served from the machine itself (`localhost`, `127.0.0.1`,
    /// `[::1]`, any port); requests with any other `Origin` are refused.
    pub allowed_origins: Vec<String>,
    /// Where the gateway keeps a copy of every output it returns, so a desktop
    /// assistant can name a file on disk. No copies when unset.
    #[schemars(example = &"/var/lib/kiln/mcp-outputs")]
    pub output_dir: Option<PathBuf>,
    /// Directories `save_output` may write into and input images may be read from.
    /// Nothing outside them is ever touched; empty means no file access at all.
    #[schemars(example = ["/srv/games/my-game/assets"])]
    pub allowed_roots: Vec<PathBuf>,
    /// Largest inline image content of one tool result, in bytes of base64. Bigger
    /// images are scaled down and re-encoded to fit; the full file stays available
    /// as a resource.
    pub inline_image_max_bytes: u64,
    /// How long the generate tools wait for their result before returning the job
    /// ids, states and progress instead (the jobs keep running). The default stays
    /// under the 60 s request timeout of the TypeScript SDK (MCP Inspector, Claude
    /// Desktop), so the assistant gets the handle rather than a timeout.
    pub wait_timeout_s: u64,
    /// The longest `timeout_s` a caller may ask for.
    pub max_wait_timeout_s: u64,
    /// Backend of image tools when the call names none (if the fleet has it;
    /// otherwise the gateway picks one the fleet offers).
    pub image_backend: Backend,
    /// Backend of `generate_video` when the call names none.
    pub video_backend: Backend,
    /// Priority of the jobs the gateway submits (-10 to 10).
    pub priority: i8,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            http_bind: "127.0.0.1:8765".into(),
            http_path: "/mcp".into(),
            token: None,
            token_file: None,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
            output_dir: None,
            allowed_roots: Vec::new(),
            inline_image_max_bytes: 1024 * 1024,
            wait_timeout_s: 45,
            max_wait_timeout_s: 3600,
            image_backend: Backend::Comfyui,
            video_backend: Backend::Wan2gp,
            priority: 0,
        }
    }
}

impl McpConfig {
    /// The HTTP bearer token, resolved from inline, file or credential.
    pub fn resolved_token(&self) -> Result<Option<Secret>, ConfigError> {
        resolve_secret("mcp.token", &self.token, &self.token_file, "kiln-mcp-token")
    }

    /// Checks what serde cannot.
    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        if self.http_bind.parse::<std::net::SocketAddr>().is_err() {
            return invalid(
                "mcp.http_bind",
                &format!("{:?} is not an address like 127.0.0.1:8765", self.http_bind),
            );
        }
        if !self.http_path.starts_with('/') || self.http_path.len() < 2 {
            return invalid("mcp.http_path", "must be a path like /mcp");
        }
        if self.inline_image_max_bytes < 16 * 1024 {
            return invalid("mcp.inline_image_max_bytes", "must be at least 16384");
        }
        if self.wait_timeout_s == 0 || self.wait_timeout_s > self.max_wait_timeout_s {
            return invalid(
                "mcp.wait_timeout_s",
                "must be at least 1 and at most mcp.max_wait_timeout_s",
            );
        }
        if !(-10..=10).contains(&self.priority) {
            return invalid("mcp.priority", "must be between -10 and 10");
        }
        for root in &self.allowed_roots {
            if !root.is_absolute() {
                return invalid(
                    "mcp.allowed_roots",
                    &format!("{} must be an absolute path", root.display()),
                );
            }
        }
        if let Some(dir) = &self.output_dir {
            if !dir.is_absolute() {
                return invalid("mcp.output_dir", "must be an absolute path");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(cfg: McpConfig) -> String {
        match cfg.validate().unwrap_err() {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("{other}"),
        }
    }

    #[test]
    fn defaults_are_loopback_and_valid() {
        let cfg = McpConfig::default();
        cfg.validate().unwrap();
        let addr: std::net::SocketAddr = cfg.http_bind.parse().unwrap();
        assert!(addr.ip().is_loopback());
        assert_eq!(cfg.inline_image_max_bytes, 1024 * 1024);
        assert!(
            cfg.allowed_roots.is_empty(),
            "no file access unless configured"
        );
    }

    #[test]
    fn bad_values_name_their_key() {
        let bad = |f: fn(&mut McpConfig)| {
            let mut c = McpConfig::default();
            f(&mut c);
            key_of(c)
        };
        assert_eq!(bad(|c| c.http_bind = "localhost".into()), "mcp.http_bind");
        assert_eq!(bad(|c| c.http_path = "mcp".into()), "mcp.http_path");
        assert_eq!(
            bad(|c| c.allowed_roots = vec!["assets".into()]),
            "mcp.allowed_roots"
        );
        assert_eq!(bad(|c| c.output_dir = Some("out".into())), "mcp.output_dir");
        assert_eq!(bad(|c| c.wait_timeout_s = 7200), "mcp.wait_timeout_s");
        assert_eq!(
            bad(|c| c.inline_image_max_bytes = 10),
            "mcp.inline_image_max_bytes"
        );
        assert_eq!(bad(|c| c.priority = 11), "mcp.priority");
    }

    #[test]
    fn the_token_resolves_from_a_file() {
        let dir = std::env::temp_dir().join(format!("kiln-mcp-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("token");
        std::fs::write(&file, "  abc123\n").unwrap();
        let cfg = McpConfig {
            token_file: Some(file),
            ..McpConfig::default()
        };
        assert_eq!(cfg.resolved_token().unwrap().unwrap().expose(), "abc123");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
