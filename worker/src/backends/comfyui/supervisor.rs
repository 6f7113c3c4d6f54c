//! Managed mode: the worker runs ComfyUI itself, one instance per GPU.
//!
//! The process gets its own port and database, sees only the worker's GPU, and
//! its output is copied into the worker's log with a `comfyui[gpu<N>]` prefix
//! (ANSI colour codes removed). It is ready when `/system_stats` answers (API.md
//! §1.1). When it exits it is started again after a backoff that doubles (reset
//! once it stayed up a minute); when the worker stops its process group gets
//! SIGTERM, then SIGKILL after ten seconds.
//!
//! The server never outlives its worker and a worker never adopts a server it
//! did not start:
//! - the child runs in its own process group with `PR_SET_PDEATHSIG = SIGKILL`,
//!   so a worker killed with SIGKILL (or crashing) takes its ComfyUI with it;
//! - before each start the port must be free: if something already listens
//!   there (an orphan, another install), the start is refused and retried after
//!   the backoff, with the reason in the backend's health, instead of taking that
//!   server's `/system_stats` answer for our own server being ready;
//! - readiness counts only while our own child is alive.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use kiln_config::ComfyUiConfig;
use kiln_protocol::transport::Backoff;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::api::Api;

/// Where the managed process is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProcState {
    Starting,
    Ready,
    /// Exited (or failed to start); restarting after a backoff.
    Down(String),
    Stopped,
}

/// The command line of a managed ComfyUI.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: Option<PathBuf>,
}

impl Launch {
    pub fn from_config(cfg: &ComfyUiConfig, gpu_index: u32, port: u16) -> Launch {
        let main_py = cfg.main_py.clone().unwrap_or_default();
        let mut args = vec![
            main_py.display().to_string(),
            "--listen".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
            "--disable-auto-launch".into(),
        ];
        if cfg.pin_gpu {
            args.extend(["--cuda-device".into(), gpu_index.to_string()]);
        }
        if !cfg.database_url.is_empty() {
            args.extend(["--database-url".into(), cfg.database_url.clone()]);
        }
        args.extend(cfg.args.iter().cloned());
        let cwd = cfg.work_dir.clone().or_else(|| {
            main_py
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .map(PathBuf::from)
        });
        Launch {
            program: cfg.python.clone(),
            args,
            cwd,
        }
    }
}

/// Handle of the supervising task.
pub struct Supervisor {
    state: watch::Receiver<ProcState>,
    stop: CancellationToken,
    done: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// Timing of the supervision loop.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub start_timeout: Duration,
    pub restart_min: Duration,
    pub restart_max: Duration,
}

impl Supervisor {
    pub fn spawn(launch: Launch, api: Api, timing: Timing, gpu_index: u32) -> Supervisor {
        let (tx, state) = watch::channel(ProcState::Starting);
        let stop = CancellationToken::new();
        let task = tokio::spawn(supervise(launch, api, timing, gpu_index, tx, stop.clone()));
        Supervisor {
            state,
            stop,
            done: tokio::sync::Mutex::new(Some(task)),
        }
    }

    pub fn state(&self) -> ProcState {
        self.state.borrow().clone()
    }

    /// Stops the process and the supervision; returns once it has exited.
    pub async fn stop(&self) {
        self.stop.cancel();
        if let Some(task) = self.done.lock().await.take() {
            let _ = task.await;
        }
    }
}

async fn supervise(
    launch: Launch,
    api: Api,
    timing: Timing,
    gpu: u32,
    state: watch::Sender<ProcState>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(timing.restart_min, timing.restart_max);
    while !stop.is_cancelled() {
        state.send_replace(ProcState::Starting);
        let started = tokio::time::Instant::now();
        let port = api_port(&api);
        let reason = match port.map(port_is_free).unwrap_or(Ok(())) {
            Err(why) => why,
            Ok(()) => match start(&launch, gpu) {
                Ok(mut child) => {
                    tracing::info!(gpu, pid = child.id(), program = %launch.program.display(), args = ?launch.args, "started a managed ComfyUI");
                    let reason = run_until_exit(&mut child, &api, timing, &state, &stop).await;
                    if stop.is_cancelled() {
                        terminate(&mut child).await;
                        break;
                    }
                    reason
                }
                Err(e) => format!("cannot start {}: {e}", launch.program.display()),
            },
        };
        if started.elapsed() > Duration::from_secs(60) {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        tracing::warn!(gpu, reason = %reason, "managed ComfyUI is down; restarting in {delay:?}");
        state.send_replace(ProcState::Down(reason));
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    state.send_replace(ProcState::Stopped);
}

/// The port of the managed server's address.
fn api_port(api: &Api) -> Option<u16> {
    let base = api.base();
    let after_host = base.rsplit_once(':')?.1;
    after_host.trim_end_matches('/').parse().ok()
}

/// Whether nothing listens on `127.0.0.1:port`, so the server that answers there
/// after our start can only be ours.
fn port_is_free(port: u16) -> Result<(), String> {
    match std::net::TcpListener::bind(("127.0.0.1", port)) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(format!(
            "port {port} is already in use by a process this worker did not start \
             (an orphaned ComfyUI?); not adopting it"
        )),
        Err(e) => Err(format!("cannot check port {port}: {e}")),
    }
}

fn start(launch: &Launch, gpu: u32) -> std::io::Result<Child> {
    let mut cmd = Command::new(&launch.program);
    cmd.args(&launch.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own group, so a stop reaches whatever ComfyUI itself starts.
        .process_group(0);
    // SAFETY: between fork and exec only async-signal-safe calls (prctl,
    // getppid, _exit) are made.
    let parent = std::process::id() as libc::pid_t;
    unsafe {
        cmd.pre_exec(move || {
            // Dies with the thread that spawned it (the worker's runtime thread).
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // The worker died before the prctl: do not run as an orphan.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    if let Some(cwd) = &launch.cwd {
        cmd.current_dir(cwd);
    }
    let mut child = cmd.spawn()?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(forward_lines(out, gpu));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(forward_lines(err, gpu));
    }
    Ok(child)
}

/// Copies the process's output into the worker's log, one event per line.
async fn forward_lines<R: tokio::io::AsyncRead + Unpin>(stream: R, gpu: u32) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = strip_ansi(&line);
        tracing::info!(target: "comfyui", "comfyui[gpu{gpu}] {line}");
    }
}

/// Removes ANSI escape sequences (CSI colour codes such as `ESC[32m`, OSC
/// titles, lone escapes) from a line of a child's output.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.peek() {
            // CSI: parameters and intermediates, then one final byte @..~.
            Some('[') => {
                chars.next();
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            // OSC: up to BEL or ESC \.
            Some(']') => {
                chars.next();
                while let Some(c) = chars.next() {
                    if c == '\u{7}' {
                        break;
                    }
                    if c == '\u{1b}' {
                        chars.next();
                        break;
                    }
                }
            }
            // A two-character escape.
            Some(_) => {
                chars.next();
            }
            None => {}
        }
    }
    out
}

/// Waits for readiness, then for the exit; returns why the process is gone.
async fn run_until_exit(
    child: &mut Child,
    api: &Api,
    timing: Timing,
    state: &watch::Sender<ProcState>,
    stop: &CancellationToken,
) -> String {
    let deadline = tokio::time::Instant::now() + timing.start_timeout;
    let mut ready = false;
    loop {
        tokio::select! {
            biased;
            _ = stop.cancelled() => return "stopping".into(),
            exit = child.wait() => {
                return match exit {
                    Ok(status) => format!("exited with {status}"),
                    Err(e) => format!("lost the process: {e}"),
                };
            }
            _ = tokio::time::sleep(Duration::from_millis(250)), if !ready => {
                // Our own child must still be running for the answer to be its.
                if api.system_stats().await.is_ok() && matches!(child.try_wait(), Ok(None)) {
                    ready = true;
                    tracing::info!("managed ComfyUI is ready at {}", api.base());
                    state.send_replace(ProcState::Ready);
                } else if tokio::time::Instant::now() > deadline {
                    let _ = child.start_kill();
                    let _ = child.wait().await;
                    return format!("did not answer /system_stats within {:?}", timing.start_timeout);
                }
            }
        }
    }
}

/// SIGTERM to the process group, then SIGKILL to it after ten seconds.
async fn terminate(child: &mut Child) {
    let Some(pid) = child.id() else {
        return; // already reaped
    };
    // SAFETY: kill(2) on our own child's process group has no memory effects.
    unsafe {
        libc::kill(-(pid as i32), libc::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        tracing::warn!(pid, "managed ComfyUI ignored SIGTERM for 10 s; killing it");
    }
    // Anything left in the group (the server's own children) goes too.
    unsafe {
        libc::kill(-(pid as i32), libc::SIGKILL);
    }
    let _ = child.wait().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_colour_codes_are_stripped_from_comfyui_output() {
        assert_eq!(
            strip_ansi("\u{1b}[32mINFO\u{1b}[0m Starting server \u{1b}[1;33mwarn\u{1b}[m"),
            "INFO Starting server warn"
        );
        assert_eq!(strip_ansi("\u{1b}]0;title\u{7}plain"), "plain");
        assert_eq!(
            strip_ansi("no escapes: 100%|####|"),
            "no escapes: 100%|####|"
        );
        assert_eq!(strip_ansi("trailing \u{1b}"), "trailing ");
    }

    #[test]
    fn a_port_someone_else_listens_on_is_refused() {
        let held = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
        let port = held.local_addr().unwrap().port();
        let err = port_is_free(port).unwrap_err();
        assert!(err.contains("not adopting"), "{err}");
        drop(held);
        assert_eq!(port_is_free(port), Ok(()));
        let api = Api::new(&format!("http://127.0.0.1:{port}"), Duration::from_secs(1));
        assert_eq!(api_port(&api), Some(port));
    }

    #[test]
    fn the_command_line_pins_the_gpu_and_adds_the_operators_args() {
        let cfg = ComfyUiConfig {
            main_py: Some("/opt/ComfyUI/main.py".into()),
            python: "/opt/ComfyUI/venv/bin/python".into(),
            args: vec!["--highvram".into()],
            ..ComfyUiConfig::default()
        };
        let l = Launch::from_config(&cfg, 3, 8191);
        assert_eq!(l.program, PathBuf::from("/opt/ComfyUI/venv/bin/python"));
        assert_eq!(l.cwd, Some(PathBuf::from("/opt/ComfyUI")));
        let line = l.args.join(" ");
        assert_eq!(
            line,
            "/opt/ComfyUI/main.py --listen 127.0.0.1 --port 8191 --disable-auto-launch --cuda-device 3 --database-url sqlite:///:memory: --highvram"
        );
    }
}
