//! One bridge process: spawned in its own process group with a private pipe for
//! its messages, its stdout and stderr copied into the worker's log.
//!
//! The pipe is handed to the bridge as file descriptor 3. Its stdout is not the
//! protocol channel on purpose: Wan2GP swaps `sys.stdout` during jobs, and C
//! extensions, CUDA and ffmpeg write to descriptor 1 whenever they like.

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

use super::protocol::{encode, FromBridge, ToBridge};

/// The descriptor the bridge reads its channel from (`--ipc-fd`).
pub const IPC_FD: i32 = 3;

/// A protocol line longer than this is garbage (a runaway writer).
const MAX_LINE: usize = 16 * 1024 * 1024;

/// What to run.
#[derive(Debug, Clone)]
pub struct Launch {
    pub python: PathBuf,
    /// The bridge script, then its arguments.
    pub args: Vec<OsString>,
    pub env: Vec<(String, String)>,
    /// Where the bridge's own output lines go in the log, e.g. `wan2gp gpu0`.
    pub log_prefix: String,
}

/// What arrived on the channel.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Msg(FromBridge),
    /// A line that is not a protocol message (counted: repeated garbage means
    /// something else writes to the channel).
    Garbage(String),
    /// The channel closed: the bridge exited or closed it.
    Closed,
}

/// A running bridge process.
pub struct Process {
    child: Child,
    pid: i32,
    stdin: Option<ChildStdin>,
    pub rx: mpsc::Receiver<Incoming>,
}

impl Process {
    pub fn spawn(launch: &Launch) -> io::Result<Process> {
        let (reader, writer) = io::pipe()?;
        let writer_fd = writer.as_raw_fd();
        let mut cmd = Command::new(&launch.python);
        cmd.args(&launch.args)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            // Its own group, so SIGTERM/SIGKILL reach ffmpeg and other children too.
            .process_group(0);
        // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl).
        unsafe {
            cmd.pre_exec(move || {
                if writer_fd == IPC_FD {
                    // Already in place: just let it survive exec.
                    if libc::fcntl(IPC_FD, libc::F_SETFD, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(writer_fd, IPC_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        // Only the child may hold the write end, so its exit closes the channel.
        drop(writer);
        let pid = child.id().map_or(0, |p| p as i32);
        let stdin = child.stdin.take();
        if let Some(out) = child.stdout.take() {
            tokio::spawn(copy_to_log(
                BufReader::new(out),
                format!("{} stdout", launch.log_prefix),
            ));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(copy_to_log(BufReader::new(err), launch.log_prefix.clone()));
        }
        let receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(OwnedFd::from(reader))?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(read_channel(BufReader::new(receiver), tx));
        Ok(Process {
            child,
            pid,
            stdin,
            rx,
        })
    }

    /// Writes one command; an error means the bridge is gone.
    pub async fn send(&mut self, cmd: &ToBridge) -> io::Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stdin closed"))?;
        stdin.write_all(&encode(cmd)).await?;
        stdin.flush().await
    }

    /// Sends `sig` to the whole process group.
    pub fn signal_group(&self, sig: i32) {
        if self.pid > 0 {
            // SAFETY: plain kill(2) on our own child's group.
            unsafe {
                libc::kill(-self.pid, sig);
            }
        }
    }

    /// Waits up to `timeout` for the bridge to exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// SIGTERM to the group, SIGKILL after `grace`, and a last SIGKILL for any
    /// child (ffmpeg) left behind. Returns how the bridge ended.
    pub async fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        self.signal_group(libc::SIGTERM);
        let status = match self.wait_exit(grace).await {
            Some(s) => Some(s),
            None => {
                tracing::warn!(
                    pid = self.pid,
                    "the Wan2GP bridge ignored SIGTERM; sending SIGKILL to its process group"
                );
                self.signal_group(libc::SIGKILL);
                self.wait_exit(Duration::from_secs(10)).await
            }
        };
        self.signal_group(libc::SIGKILL);
        status
    }

    /// Closes stdin (the bridge exits when it reads end-of-file).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }
}

/// Reads protocol lines until the channel closes.
async fn read_channel<R: AsyncBufRead + Unpin>(mut reader: R, tx: mpsc::Sender<Incoming>) {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let item = match read_line_capped(&mut reader, &mut buf, MAX_LINE).await {
            Ok(false) => Incoming::Closed,
            Err(e) => {
                tracing::warn!(error = %e, "reading the Wan2GP bridge's channel failed");
                Incoming::Closed
            }
            Ok(true) => {
                let line = trim_line(&buf);
                if line.is_empty() {
                    continue;
                }
                match serde_json::from_slice::<FromBridge>(line) {
                    Ok(msg) => Incoming::Msg(msg),
                    Err(_) => Incoming::Garbage(
                        String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned(),
                    ),
                }
            }
        };
        let closed = item == Incoming::Closed;
        if tx.send(item).await.is_err() || closed {
            return;
        }
    }
}

fn trim_line(buf: &[u8]) -> &[u8] {
    let end = buf
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(0, |i| i + 1);
    &buf[..end]
}

/// Reads up to and including `\n` into `buf`, keeping at most `max` bytes (the
/// rest of a longer line is skipped). `Ok(false)` at end of input.
async fn read_line_capped<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<bool> {
    let mut any = false;
    loop {
        let chunk = reader.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(any);
        }
        any = true;
        let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        let room = max.saturating_sub(buf.len());
        buf.extend_from_slice(&chunk[..take.min(room)]);
        reader.consume(take);
        if done {
            return Ok(true);
        }
    }
}

/// Copies a stream of the bridge into the worker's log, one line at a time
/// (Wan2GP's progress bars end lines with `\r`).
async fn copy_to_log<R: AsyncBufRead + Unpin>(mut reader: R, prefix: String) {
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match read_line_capped(&mut reader, &mut buf, 64 * 1024).await {
            Ok(true) => {
                for part in String::from_utf8_lossy(&buf).split(['\r', '\n']) {
                    let part = part.trim_end();
                    if !part.is_empty() {
                        tracing::info!("[{prefix}] {part}");
                    }
                }
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn long_lines_are_capped_and_the_rest_skipped() {
        let data: &[u8] = b"short\nxxxxxxxxxxxxxxxx\nlast";
        let mut r = BufReader::with_capacity(4, data);
        let mut buf = Vec::new();
        assert!(read_line_capped(&mut r, &mut buf, 8).await.unwrap());
        assert_eq!(buf, b"short\n");
        buf.clear();
        assert!(read_line_capped(&mut r, &mut buf, 8).await.unwrap());
        assert_eq!(buf, b"xxxxxxxx");
        buf.clear();
        assert!(read_line_capped(&mut r, &mut buf, 8).await.unwrap());
        assert_eq!(buf, b"last");
        buf.clear();
        assert!(!read_line_capped(&mut r, &mut buf, 8).await.unwrap());
    }

    #[tokio::test]
    async fn the_channel_sorts_messages_from_garbage() {
        let data: &[u8] =
            b"{\"v\":1,\"type\":\"pong\",\"req_id\":3}\nnot json\n\n{\"v\":1,\"type\":\"bye\"}\n";
        let (tx, mut rx) = mpsc::channel(8);
        read_channel(BufReader::new(data), tx).await;
        assert_eq!(
            rx.recv().await,
            Some(Incoming::Msg(FromBridge::Pong { req_id: 3 }))
        );
        assert_eq!(rx.recv().await, Some(Incoming::Garbage("not json".into())));
        assert_eq!(rx.recv().await, Some(Incoming::Msg(FromBridge::Bye)));
        assert_eq!(rx.recv().await, Some(Incoming::Closed));
    }
}
