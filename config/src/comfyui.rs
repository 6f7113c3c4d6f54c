//! `[worker.comfyui]`: how a worker reaches ComfyUI, attached to a running server
//! or starting and supervising its own.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// Whether the worker drives a ComfyUI someone else runs, or runs its own.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ComfyUiMode {
    /// A ComfyUI already running at `url` (started by the operator or systemd).
    #[default]
    Attach,
    /// The worker starts `python main_py` itself on `port`, pinned to the worker's
    /// GPU, restarts it when it exits and stops it when the worker stops.
    Managed,
}

/// The ComfyUI backend of a worker.
///
/// Defaults: attach to `http://127.0.0.1:8188`, no templates folder beyond the
/// built-in ones, 30 s HTTP timeout, prompts may run for up to 6 hours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ComfyUiConfig {
    /// `attach`: drive the server at `url`. `managed`: start `python main_py`,
    /// pinned to this worker's GPU, restart it when it exits, stop it with the worker.
    pub mode: ComfyUiMode,
    /// The server in attach mode (`http://host:port`, plain HTTP: ComfyUI has no
    /// authentication, keep it on loopback or a private network).
    pub url: String,
    /// Managed mode: the Python interpreter of ComfyUI's environment.
    #[schemars(example = &"/opt/ComfyUI/venv/bin/python")]
    pub python: PathBuf,
    /// Managed mode: ComfyUI's `main.py`.
    #[schemars(example = &"/opt/ComfyUI/main.py")]
    pub main_py: Option<PathBuf>,
    /// Managed mode: extra arguments after Kiln's own (`--listen`, `--port`,
    /// `--cuda-device`, `--disable-auto-launch`, `--database-url`).
    #[schemars(example = ["--disable-api-nodes", "--preview-method", "none"])]
    pub args: Vec<String>,
    /// Managed mode: the port; 0 means `8188 + worker.gpu.index`.
    pub port: u16,
    /// Managed mode: pass `--cuda-device <worker.gpu.index>` so the server sees
    /// only this worker's GPU. Turn off for a CPU-only server (`args = ["--cpu"]`).
    pub pin_gpu: bool,
    /// Managed mode: `--database-url` of the instance, so several instances on one
    /// install do not fight over one database. Empty: not passed.
    pub database_url: String,
    /// Managed mode: working directory of the process (default: the folder of `main_py`).
    #[schemars(example = &"/opt/ComfyUI")]
    pub work_dir: Option<PathBuf>,
    /// Managed mode: how long a start may take until `/system_stats` answers.
    pub start_timeout_s: u64,
    /// Managed mode: first delay before a restart; doubles up to `restart_max_s`.
    pub restart_min_s: u64,
    /// Managed mode: longest delay between restarts.
    pub restart_max_s: u64,
    /// The operator's workflow templates: `<name>.json` files, each an API-format
    /// graph with named parameter bindings (see the README). A file named like a
    /// built-in (`text_to_image`, ...) replaces it.
    #[schemars(example = &"/etc/kiln/comfyui-templates")]
    pub templates_dir: Option<PathBuf>,
    /// Timeout of one HTTP request (uploads and downloads included).
    pub http_timeout_s: u64,
    /// Longest time a prompt may stay queued or running in ComfyUI.
    pub prompt_timeout_s: u64,
    /// How often a running prompt is reconciled over HTTP, in case WebSocket
    /// events were lost.
    pub poll_ms: u64,
    /// How long the server may stay unreachable during a job before the attempt
    /// fails (retryable).
    pub unreachable_timeout_s: u64,
    /// How long a cancel may take to be confirmed by ComfyUI.
    pub cancel_timeout_s: u64,
    /// Model folders reported as the worker's inventory.
    pub model_folders: Vec<String>,
    /// ComfyUI's input folder as this host sees it. ComfyUI has no call that
    /// deletes an upload, so the worker removes each attempt's uploads
    /// (`input/kiln/<job>-<attempt>/`) itself once the prompt is over, from the
    /// first folder that holds the file it has just uploaded: this one, the
    /// one a managed server was launched with, then the one the server's
    /// command line (echoed by `/system_stats`) names
    /// with an absolute `--input-directory`, `--base-directory` or `main.py`
    /// path. Needed when the server uses relative or default paths, or this
    /// host mounts the folder elsewhere; when no folder matches (a server on
    /// another host), uploads stay on the server and the worker logs it once.
    #[schemars(example = &"/opt/ComfyUI/input")]
    pub input_dir: Option<PathBuf>,
}

impl Default for ComfyUiConfig {
    fn default() -> Self {
        ComfyUiConfig {
            mode: ComfyUiMode::Attach,
            url: "http://127.0.0.1:8188".into(),
            python: PathBuf::from("python3"),
            main_py: None,
            args: Vec::new(),
            port: 0,
            pin_gpu: true,
            database_url: "sqlite:///:memory:".into(),
            work_dir: None,
            start_timeout_s: 180,
            restart_min_s: 1,
            restart_max_s: 60,
            templates_dir: None,
            http_timeout_s: 30,
            prompt_timeout_s: 6 * 3600,
            poll_ms: 2000,
            unreachable_timeout_s: 300,
            cancel_timeout_s: 15,
            input_dir: None,
            model_folders: [
                "checkpoints",
                "diffusion_models",
                "loras",
                "vae",
                "text_encoders",
                "clip_vision",
                "upscale_models",
                "controlnet",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

impl ComfyUiConfig {
    /// Checks what serde cannot; keys are named from the root of the config.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: &str| {
            Err(ConfigError::Invalid {
                key: format!("worker.comfyui.{key}"),
                message: message.into(),
            })
        };
        match self.mode {
            ComfyUiMode::Attach => {
                let rest = self.url.strip_prefix("http://");
                if rest.is_none_or(|r| r.trim_end_matches('/').is_empty()) {
                    return invalid(
                        "url",
                        &format!(
                            "{:?} must be a plain http:// URL such as http://127.0.0.1:8188",
                            self.url
                        ),
                    );
                }
            }
            ComfyUiMode::Managed => {
                if self.main_py.is_none() {
                    return invalid(
                        "main_py",
                        "managed mode needs the path of ComfyUI's main.py",
                    );
                }
            }
        }
        if self.http_timeout_s == 0 || self.prompt_timeout_s == 0 || self.cancel_timeout_s == 0 {
            return invalid("http_timeout_s", "timeouts must be at least 1 second");
        }
        if self.poll_ms < 50 {
            return invalid("poll_ms", "must be at least 50");
        }
        if self.restart_min_s == 0 || self.restart_max_s < self.restart_min_s {
            return invalid(
                "restart_min_s",
                "must be at least 1 and at most restart_max_s",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_name_their_key() {
        ComfyUiConfig::default().validate().unwrap();
        let bad = ComfyUiConfig {
            url: "https://gpu-box:8188".into(),
            ..ComfyUiConfig::default()
        };
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("worker.comfyui.url"), "{err}");
        let managed = ComfyUiConfig {
            mode: ComfyUiMode::Managed,
            ..ComfyUiConfig::default()
        };
        assert!(managed
            .validate()
            .unwrap_err()
            .to_string()
            .contains("worker.comfyui.main_py"));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure returns figment::Error
    fn the_example_config_parses() {
        // Inside a Jail: other tests set KILN_* variables process-wide meanwhile.
        figment::Jail::expect_with(|_| {
            check_example();
            Ok(())
        });
    }

    fn check_example() {
        // The example file shows the defaults; the ComfyUI examples are comments.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kiln.example.toml");
        let cfg = crate::KilnConfig::load(std::slice::from_ref(&path)).unwrap();
        let c = &cfg.worker.comfyui;
        assert_eq!(*c, ComfyUiConfig::default());
        assert_eq!(
            (c.mode, c.url.as_str()),
            (ComfyUiMode::Attach, "http://127.0.0.1:8188")
        );
        assert!(c.model_folders.iter().any(|f| f == "loras"));
        let text = std::fs::read_to_string(path).unwrap();
        assert!(
            text.contains("# main_py = \"/opt/ComfyUI/main.py\""),
            "{text}"
        );
    }
}
