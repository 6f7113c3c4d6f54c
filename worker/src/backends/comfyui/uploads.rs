//! An attempt's uploads in ComfyUI's input folder, and their removal.
//!
//! ComfyUI never deletes an upload, has no call that deletes one, and no call
//! that names its input folder (API.md §6.2, §13). What a client can learn is
//! the server's command line, which `/system_stats` echoes as `system.argv`.
//! ComfyUI's `comfy/cli_args.py` and `main.py` put the input folder at
//! `--input-directory`, else `<--base-directory>/input`, else `input/` beside
//! `main.py`, each made absolute against the server's own working directory.
//!
//! So the worker gathers candidates (the configured `worker.comfyui.input_dir`,
//! managed mode's own launch arguments, and what the command line names when it
//! names an absolute path), and uses the first one where it finds the very
//! bytes it has just uploaded: proof that this host sees ComfyUI's input folder.
//! There it removes the attempt's folder (`input/kiln/<job>-<attempt>/`) once
//! the prompt is over. When no candidate holds the upload (a server on another
//! host, a relative path), the uploads stay on the server and the worker says
//! so once, naming the setting that would let it clean up.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use kiln_config::{ComfyUiConfig, ComfyUiMode};
use serde_json::Value;

use super::api::FileRef;
use crate::backend::JobRun;

/// Where an attempt's uploads go, under ComfyUI's `input/`.
pub fn upload_folder(job: &JobRun) -> String {
    format!("kiln/{}-{}", job.job_id, job.attempt)
}

/// Where a candidate input folder came from, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Config,
    LaunchArgs,
    ServerArgv,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Config => "worker.comfyui.input_dir",
            Source::LaunchArgs => "the managed server's launch arguments",
            Source::ServerArgv => "the server's command line in /system_stats",
        })
    }
}

/// The value of an `argparse` option in `args`: `--flag V`, `--flag=V`, or an
/// unambiguous abbreviation (at least `min` bytes long) as argparse allows; the
/// last one wins, as in argparse.
fn option<'a>(args: &'a [String], flag: &str, min: usize) -> Option<&'a str> {
    let mut found = None;
    let mut i = 0;
    while i < args.len() {
        let arg = args[i].as_str();
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v)),
            _ => (arg, None),
        };
        if name.len() >= min && flag.starts_with(name) {
            match inline {
                Some(v) => found = Some(v),
                None => {
                    found = args.get(i + 1).map(String::as_str);
                    i += 1;
                }
            }
        }
        i += 1;
    }
    found
}

/// ComfyUI's input folder as named by its command line (`argv[0]` is
/// `main.py`), when the command line names it by an absolute path.
pub fn input_dir_from_argv(argv: &[String]) -> Option<PathBuf> {
    let rest = argv.get(1..).unwrap_or_default();
    if let Some(dir) = option(rest, "--input-directory", "--input".len()) {
        return Some(PathBuf::from(dir)).filter(|p| p.is_absolute());
    }
    if let Some(base) = option(rest, "--base-directory", "--base".len()) {
        return Some(PathBuf::from(base).join("input")).filter(|p| p.is_absolute());
    }
    let main = Path::new(argv.first()?);
    main.is_absolute()
        .then(|| main.parent().map(|d| d.join("input")))
        .flatten()
}

/// Finds the input folder for each attempt and removes its uploads.
#[derive(Debug)]
pub struct Uploads {
    configured: Option<PathBuf>,
    /// Managed mode: what the worker's own launch arguments say.
    launch: Option<PathBuf>,
    /// The folder where the current attempt's upload was found.
    found: Mutex<Option<PathBuf>>,
    /// The "uploads stay" warning was given.
    warned: AtomicBool,
    /// The folder in use was logged.
    announced: Mutex<Option<PathBuf>>,
}

impl Uploads {
    pub fn new(cfg: &ComfyUiConfig) -> Uploads {
        let launch = (cfg.mode == ComfyUiMode::Managed)
            .then(|| {
                let mut argv = vec![cfg
                    .main_py
                    .as_ref()
                    .map_or_else(String::new, |p| p.display().to_string())];
                argv.extend(cfg.args.iter().cloned());
                input_dir_from_argv(&argv)
            })
            .flatten();
        Uploads {
            configured: cfg.input_dir.clone(),
            launch,
            found: Mutex::new(None),
            warned: AtomicBool::new(false),
            announced: Mutex::new(None),
        }
    }

    /// After the attempt's first upload: finds the candidate folder holding
    /// `stored` with exactly `data`. `stats` is `/system_stats`, if it answered.
    pub async fn locate(&self, stored: &FileRef, data: &[u8], stats: Option<&Value>) {
        let argv: Option<Vec<String>> = stats
            .and_then(|s| s.pointer("/system/argv"))
            .and_then(|a| serde_json::from_value(a.clone()).ok());
        let candidates: Vec<(PathBuf, Source)> = [
            self.configured.clone().map(|d| (d, Source::Config)),
            self.launch.clone().map(|d| (d, Source::LaunchArgs)),
            argv.as_deref()
                .and_then(input_dir_from_argv)
                .map(|d| (d, Source::ServerArgv)),
        ]
        .into_iter()
        .flatten()
        .collect();
        let rel = PathBuf::from(stored.input_path());
        let safe = rel.components().all(|c| matches!(c, Component::Normal(_)));
        let mut hit = None;
        if safe {
            for (dir, source) in &candidates {
                if holds(&dir.join(&rel), data).await {
                    hit = Some((dir.clone(), *source));
                    break;
                }
            }
        }
        *self.found.lock().expect("not poisoned") = hit.as_ref().map(|(d, _)| d.clone());
        match hit {
            Some((dir, source)) => {
                let mut announced = self.announced.lock().expect("not poisoned");
                if announced.as_ref() != Some(&dir) {
                    tracing::info!(folder = %dir.display(), from = %source, "found ComfyUI's input folder; each attempt's uploads are removed from it afterwards");
                    *announced = Some(dir);
                }
            }
            None if !self.warned.swap(true, Ordering::Relaxed) => {
                let tried: Vec<String> = candidates
                    .iter()
                    .map(|(d, s)| format!("{} (from {s})", d.display()))
                    .collect();
                let tried = if tried.is_empty() {
                    "none: ComfyUI does not report its input folder, and its command line names no absolute --input-directory, --base-directory or main.py path".to_string()
                } else {
                    format!("{} (none holds the file just uploaded)", tried.join(", "))
                };
                tracing::warn!(
                    "uploads stay on the ComfyUI server, in its input/kiln/<job>-<attempt>/ folders: \
                     this worker cannot see ComfyUI's input folder (candidates: {tried}). \
                     Set worker.comfyui.input_dir to that folder as this host mounts it to have them removed"
                );
            }
            None => {}
        }
    }

    /// Removes the attempt's uploads when their folder was found.
    pub async fn remove(&self, job: &JobRun) {
        let Some(input) = self.found.lock().expect("not poisoned").take() else {
            return;
        };
        let folder = input.join(upload_folder(job));
        match tokio::fs::remove_dir_all(&folder).await {
            Ok(()) => tracing::debug!(folder = %folder.display(), "removed the attempt's uploads"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(folder = %folder.display(), error = %e, "cannot remove the attempt's uploads")
            }
        }
    }
}

/// Whether `path` holds exactly `data`.
async fn holds(path: &Path, data: &[u8]) -> bool {
    match tokio::fs::metadata(path).await {
        Ok(m) if m.is_file() && m.len() == data.len() as u64 => {}
        _ => return false,
    }
    tokio::fs::read(path).await.is_ok_and(|bytes| bytes == data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn the_command_line_names_the_input_folder_as_comfyui_reads_it() {
        let dir = |s: &str| input_dir_from_argv(&argv(s));
        // The recorded v0.27.0 argv: relative main.py, no folder flags.
        assert_eq!(dir("main.py --cpu --listen 127.0.0.1 --port 8188"), None);
        assert_eq!(
            dir("/opt/ComfyUI/main.py --cpu"),
            Some("/opt/ComfyUI/input".into())
        );
        assert_eq!(
            dir("main.py --base-directory /srv/c"),
            Some("/srv/c/input".into())
        );
        // --input-directory overrides --base-directory; `=` and abbreviations.
        assert_eq!(
            dir("main.py --input-directory=/in --base-directory /srv/c"),
            Some("/in".into())
        );
        assert_eq!(dir("main.py --input /a --input /b"), Some("/b".into()));
        assert_eq!(dir("main.py --base=/b"), Some("/b/input".into()));
        // Relative to a working directory this host does not know.
        assert_eq!(dir("/opt/ComfyUI/main.py --base-directory rel"), None);
        assert_eq!(dir("/opt/ComfyUI/main.py --input-directory in"), None);
        // Not the flag: `--in` is too short to be read as --input-directory.
        assert_eq!(dir("main.py --in /x"), None);
        assert_eq!(dir(""), None);
    }

    #[tokio::test]
    async fn only_a_folder_holding_the_uploaded_bytes_is_used() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        let other = tmp.path().join("other");
        std::fs::create_dir_all(real.join("kiln/j1-1")).unwrap();
        std::fs::create_dir_all(other.join("kiln/j1-1")).unwrap();
        std::fs::write(real.join("kiln/j1-1/a.png"), b"the bytes").unwrap();
        std::fs::write(other.join("kiln/j1-1/a.png"), b"other byte").unwrap();
        let cfg = ComfyUiConfig {
            input_dir: Some(other.clone()),
            ..ComfyUiConfig::default()
        };
        let uploads = Uploads::new(&cfg);
        let stored = FileRef {
            filename: "a.png".into(),
            subfolder: "kiln/j1-1".into(),
            kind: "input".into(),
        };
        let stats = serde_json::json!({"system": {"argv": ["main.py", "--base-directory", tmp.path().join("x").display().to_string(), "--input-directory", real.display().to_string()]}});
        uploads.locate(&stored, b"the bytes", Some(&stats)).await;
        assert_eq!(*uploads.found.lock().unwrap(), Some(real.clone()));
        // Same length, different bytes: not it.
        uploads.locate(&stored, b"xhe bytes", Some(&stats)).await;
        assert_eq!(*uploads.found.lock().unwrap(), None);
        // A server-given name that climbs out is never followed.
        let climbing = FileRef {
            subfolder: "../real/kiln/j1-1".into(),
            ..stored
        };
        uploads.locate(&climbing, b"the bytes", Some(&stats)).await;
        assert_eq!(*uploads.found.lock().unwrap(), None);
    }
}
