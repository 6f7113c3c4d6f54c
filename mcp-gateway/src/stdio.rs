//! The stdio transport: rmcp's line transport, plus an answer to a request too
//! long to read.
//!
//! rmcp reads one JSON-RPC message per line and drops a line longer than
//! [`MAX_LINE`] (16 MiB) with a log line and no reply, so a client that sent one
//! (a big image as base64) waits forever. Here the bytes on their way to rmcp are
//! watched: a line over the limit is scanned for its top-level `id` and
//! `method` as it streams past, without keeping it, and a request gets a
//! JSON-RPC error with its own id. rmcp still drops the line itself and the
//! session goes on.

use std::pin::Pin;
use std::task::{Context, Poll};

use rmcp::model::{ErrorCode, ErrorData, RequestId};
use rmcp::service::{RoleServer, RxJsonRpcMessage, TxJsonRpcMessage};
use rmcp::transport::async_rw::{AsyncRwTransport, DEFAULT_MAX_LINE_LENGTH};
use rmcp::transport::Transport;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

/// The longest line (one message, newline included) rmcp reads, in bytes.
pub const MAX_LINE: usize = DEFAULT_MAX_LINE_LENGTH;

/// A line rmcp will drop.
#[derive(Debug, Clone, PartialEq)]
pub struct Oversized {
    /// The request's id; `None` for a notification, a response, or a line whose
    /// id could not be read.
    pub id: Option<RequestId>,
    /// Whether the line had a top-level `method` (a request or notification).
    pub has_method: bool,
    /// The line's length, newline included.
    pub bytes: usize,
}

/// Longest raw `id` value kept (a number or a string).
const MAX_ID: usize = 256;

/// Follows one line of JSON byte by byte, keeping only the raw value of the
/// top-level `id` and whether a top-level `method` key appeared.
#[derive(Debug, Default)]
struct LineScan {
    bytes: usize,
    depth: u32,
    in_string: bool,
    escaped: bool,
    /// At depth 1, the next string is a key.
    expect_key: bool,
    in_key: bool,
    /// The key being read (only its first bytes: `id` and `method` are short).
    key: Vec<u8>,
    /// The value of the current depth-1 key is the id: its bytes are kept.
    capturing: bool,
    id_raw: Option<Vec<u8>>,
    capture: Vec<u8>,
    has_method: bool,
}

impl LineScan {
    fn end_capture(&mut self) {
        if self.capturing {
            self.capturing = false;
            if self.id_raw.is_none() && self.capture.len() <= MAX_ID {
                self.id_raw = Some(std::mem::take(&mut self.capture));
            }
            self.capture.clear();
        }
    }

    fn feed(&mut self, b: u8) {
        self.bytes += 1;
        if self.capturing && self.capture.len() <= MAX_ID {
            self.capture.push(b);
        }
        if self.in_string {
            if self.escaped {
                self.escaped = false;
            } else if b == b'\\' {
                self.escaped = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.in_key {
                    self.in_key = false;
                    self.has_method |= self.key == b"method";
                }
            } else if self.in_key && self.key.len() <= 8 {
                self.key.push(b);
            }
            return;
        }
        match b {
            b'"' => {
                self.in_string = true;
                if self.depth == 1 && self.expect_key {
                    self.expect_key = false;
                    self.in_key = true;
                    self.key.clear();
                }
            }
            b'{' | b'[' => {
                self.depth += 1;
                if self.depth == 1 {
                    self.expect_key = b == b'{';
                }
            }
            b'}' | b']' => {
                if self.depth == 1 {
                    if self.capturing {
                        self.capture.pop();
                    }
                    self.end_capture();
                }
                self.depth = self.depth.saturating_sub(1);
            }
            b':' if self.depth == 1 && self.key == b"id" && self.id_raw.is_none() => {
                self.capturing = true;
                self.capture.clear();
            }
            b',' if self.depth == 1 => {
                if self.capturing {
                    self.capture.pop();
                }
                self.end_capture();
                self.expect_key = true;
                self.key.clear();
            }
            _ => {}
        }
    }

    fn finish(self) -> Oversized {
        let id = self
            .id_raw
            .and_then(|raw| serde_json::from_slice::<RequestId>(raw.trim_ascii()).ok());
        Oversized {
            id,
            has_method: self.has_method,
            bytes: self.bytes,
        }
    }
}

/// Watches the lines read through it and reports those over [`MAX_LINE`].
#[derive(Debug)]
pub struct Watched<R> {
    inner: R,
    line: LineScan,
    found: mpsc::UnboundedSender<Oversized>,
}

impl<R> Watched<R> {
    pub fn new(inner: R) -> (Watched<R>, mpsc::UnboundedReceiver<Oversized>) {
        let (found, rx) = mpsc::unbounded_channel();
        let line = LineScan::default();
        (Watched { inner, line, found }, rx)
    }

    fn scan(&mut self, data: &[u8]) {
        for &b in data {
            if b == b'\n' {
                self.line.bytes += 1;
                let line = std::mem::take(&mut self.line);
                if line.bytes > MAX_LINE {
                    let _ = self.found.send(line.finish());
                }
            } else {
                self.line.feed(b);
            }
        }
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Watched<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            self.scan(&buf.filled()[before..]);
        }
        polled
    }
}

/// rmcp's stdio transport with the oversized-request answer.
pub struct Stdio<R: AsyncRead + Unpin, W: AsyncWrite> {
    inner: AsyncRwTransport<RoleServer, Watched<R>, W>,
    oversized: mpsc::UnboundedReceiver<Oversized>,
}

impl<R, W> Stdio<R, W>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    pub fn new(read: R, write: W) -> Self {
        let (read, oversized) = Watched::new(read);
        Stdio {
            inner: AsyncRwTransport::new_server(read, write).with_max_line_length(MAX_LINE),
            oversized,
        }
    }

    async fn answer(&mut self, line: Oversized) {
        let Some(id) = line.id.filter(|_| line.has_method) else {
            tracing::warn!(
                bytes = line.bytes,
                limit = MAX_LINE,
                "dropped a message longer than the stdio limit; it had no request id to answer"
            );
            return;
        };
        tracing::warn!(bytes = line.bytes, limit = MAX_LINE, id = %id, "refused a request longer than the stdio limit");
        let error = ErrorData::new(
            ErrorCode::INVALID_REQUEST,
            format!(
                "the request is {} bytes long; kiln-mcp reads at most {} bytes (16 MiB) per message over stdio. \
                 Give large images by `path` instead of `base64`.",
                line.bytes, MAX_LINE
            ),
            Some(serde_json::json!({"bytes": line.bytes, "limit_bytes": MAX_LINE})),
        );
        let reply = TxJsonRpcMessage::<RoleServer>::error(error, Some(id));
        if let Err(e) = self.inner.send(reply).await {
            tracing::warn!(error = %e, "cannot answer the oversized request");
        }
    }
}

impl<R, W> Transport<RoleServer> for Stdio<R, W>
where
    R: AsyncRead + Send + Unpin + 'static,
    W: AsyncWrite + Send + Unpin + 'static,
{
    type Error = std::io::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleServer>,
    ) -> impl std::future::Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.inner.send(item)
    }

    async fn receive(&mut self) -> Option<RxJsonRpcMessage<RoleServer>> {
        loop {
            // rmcp's receive keeps a half-read line across cancellation.
            tokio::select! {
                biased;
                Some(line) = self.oversized.recv() => self.answer(line).await,
                msg = self.inner.receive() => return msg,
            }
        }
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.inner.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(line: &str) -> Oversized {
        let mut s = LineScan::default();
        for &b in line.as_bytes() {
            s.feed(b);
        }
        s.finish()
    }

    #[test]
    fn the_id_is_read_wherever_it_is_and_nested_ids_are_not() {
        let big = "A".repeat(10_000);
        // Python SDK order: id first.
        let o = scan(&format!(
            r#"{{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{{"arguments":{{"image":"{big}"}}}}}}"#
        ));
        assert_eq!((o.id, o.has_method), (Some(RequestId::Number(7)), true));
        // TypeScript SDK order: id last, after the huge params.
        let o = scan(&format!(
            r#"{{"method":"tools/call","params":{{"id":99,"x":"{big}\"id\":5,"}},"jsonrpc":"2.0","id" : "req-1" }}"#
        ));
        assert_eq!(o.id, Some(RequestId::String("req-1".into())));
        assert!(o.has_method);
        // A notification; a response (no method); an id that is not one.
        let o = scan(r#"{"jsonrpc":"2.0","method":"notifications/progress","params":{"id":3}}"#);
        assert_eq!((o.id, o.has_method), (None, true));
        let o = scan(r#"{"jsonrpc":"2.0","id":4,"result":{"method":"x"}}"#);
        assert_eq!((o.id, o.has_method), (Some(RequestId::Number(4)), false));
        let o = scan(r#"{"id":{"a":1},"method":"m"}"#);
        assert_eq!(o.id, None);
        // Not JSON at all.
        assert_eq!(scan("garbage \" \\ { [").id, None);
    }

    #[tokio::test]
    async fn lines_over_the_limit_are_reported_and_others_are_not() {
        use tokio::io::AsyncReadExt;
        let mut input = br#"{"jsonrpc":"2.0","id":1,"method":"ping"}"#.to_vec();
        input.push(b'\n');
        let pad = "x".repeat(MAX_LINE);
        input.extend(
            format!(r#"{{"method":"tools/call","params":{{"p":"{pad}"}},"id":2}}"#).bytes(),
        );
        input.push(b'\n');
        let total = input.len();
        let (mut watched, mut found) = Watched::new(&input[..]);
        let mut sink = Vec::new();
        watched.read_to_end(&mut sink).await.unwrap();
        assert_eq!(sink.len(), total, "every byte passes through");
        let o = found.try_recv().unwrap();
        assert_eq!(o.id, Some(RequestId::Number(2)));
        assert!(o.bytes > MAX_LINE);
        assert!(found.try_recv().is_err(), "the short line is not reported");
    }
}
