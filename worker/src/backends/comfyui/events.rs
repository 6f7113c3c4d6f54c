//! The worker's one WebSocket to ComfyUI, and the events read from it.
//!
//! One task per backend owns the socket under one client id for the worker's whole
//! life and fans events out to the running job through a broadcast channel. When
//! the socket drops it is reconnected the safe way (API.md §7.2): the old socket is
//! closed and its close awaited before a new one opens with the same client id, so
//! the server's cleanup of the old socket cannot unregister the new one. Events sent
//! during the gap are lost; the job reconciles over HTTP after every reconnect.

use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use kiln_protocol::transport::Backoff;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// Something the socket saw.
#[derive(Debug, Clone)]
pub enum WsEvent {
    /// A JSON frame `{"type": kind, "data": data}`.
    Json {
        kind: String,
        data: Value,
    },
    /// A preview image (binary type 1, or type 4 with its metadata).
    Preview {
        prompt_id: Option<String>,
        image_type: String,
        image: Bytes,
    },
    /// The socket is (again) connected; anything before may have been missed.
    Connected,
    Disconnected,
}

impl WsEvent {
    /// The prompt a JSON event belongs to, if it names one.
    pub fn prompt_id(&self) -> Option<&str> {
        match self {
            WsEvent::Json { data, .. } => data.get("prompt_id").and_then(Value::as_str),
            WsEvent::Preview { prompt_id, .. } => prompt_id.as_deref(),
            _ => None,
        }
    }
}

/// Decodes one binary frame (API.md §7.4). Text frames (type 3) carry no prompt id
/// and are broadcast to every socket, so they are of no use to a job: `None`, as for
/// unknown types.
pub fn decode_binary(frame: &[u8]) -> Option<WsEvent> {
    let u32_at = |at: usize| {
        frame
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    match u32_at(0)? {
        1 => {
            let image_type = match u32_at(4)? {
                1 => "image/jpeg",
                2 => "image/png",
                _ => return None,
            };
            Some(WsEvent::Preview {
                prompt_id: None,
                image_type: image_type.into(),
                image: Bytes::copy_from_slice(&frame[8..]),
            })
        }
        4 => {
            let len = u32_at(4)? as usize;
            let meta: Value = serde_json::from_slice(frame.get(8..8 + len)?).ok()?;
            Some(WsEvent::Preview {
                prompt_id: meta
                    .get("prompt_id")
                    .and_then(Value::as_str)
                    .map(String::from),
                image_type: meta
                    .get("image_type")
                    .and_then(Value::as_str)
                    .unwrap_or("image/png")
                    .into(),
                image: Bytes::copy_from_slice(&frame[8 + len..]),
            })
        }
        _ => None,
    }
}

/// Parses a text frame; unknown shapes are ignored.
pub fn decode_text(text: &str) -> Option<WsEvent> {
    let v: Value = serde_json::from_str(text).ok()?;
    let kind = v.get("type")?.as_str()?.to_string();
    let data = v.get("data").cloned().unwrap_or(Value::Null);
    Some(WsEvent::Json { kind, data })
}

/// The handle jobs use: subscribe to events and see whether the socket is up.
#[derive(Clone)]
pub struct EventStream {
    tx: broadcast::Sender<WsEvent>,
    connected: watch::Receiver<bool>,
}

impl EventStream {
    /// Starts the socket task for `url`; it stops when `shutdown` fires.
    pub fn spawn(url: String, shutdown: CancellationToken) -> EventStream {
        let (tx, _) = broadcast::channel(4096);
        let (connected_tx, connected) = watch::channel(false);
        tokio::spawn(run_socket(url, tx.clone(), connected_tx, shutdown));
        EventStream { tx, connected }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<WsEvent> {
        self.tx.subscribe()
    }

    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Waits until the socket is connected, at most `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let mut rx = self.connected.clone();
        tokio::time::timeout(timeout, rx.wait_for(|c| *c))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

/// How long a socket may stay silent (pings unanswered) before it is replaced.
const SILENCE_LIMIT: Duration = Duration::from_secs(30);
const PING_EVERY: Duration = Duration::from_secs(10);

async fn run_socket(
    url: String,
    tx: broadcast::Sender<WsEvent>,
    connected: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(url.as_str())) => r,
        };
        let mut ws = match attempt {
            Ok(Ok((ws, _))) => ws,
            Ok(Err(e)) => {
                tracing::debug!(%url, error = %e, "ComfyUI WebSocket connect failed");
                wait(&mut backoff, &shutdown).await;
                continue;
            }
            Err(_) => {
                tracing::debug!(%url, "ComfyUI WebSocket connect timed out");
                wait(&mut backoff, &shutdown).await;
                continue;
            }
        };
        // Ask for previews with their prompt id (type 4) so they can be filtered.
        let hello = json!({"type": "feature_flags", "data": {"supports_preview_metadata": true}});
        if ws.send(Message::text(hello.to_string())).await.is_err() {
            wait(&mut backoff, &shutdown).await;
            continue;
        }
        backoff.reset();
        tracing::info!(%url, "ComfyUI WebSocket connected");
        connected.send_replace(true);
        let _ = tx.send(WsEvent::Connected);
        let mut last_heard = tokio::time::Instant::now();
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.reset();
        let why = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break "worker shutting down",
                _ = ping.tick() => {
                    if last_heard.elapsed() > SILENCE_LIMIT {
                        break "no answer to pings";
                    }
                    if ws.send(Message::Ping(Bytes::new())).await.is_err() {
                        break "ping failed";
                    }
                }
                msg = ws.next() => {
                    last_heard = tokio::time::Instant::now();
                    match msg {
                        None => break "closed by the server",
                        Some(Err(_)) => break "read error",
                        Some(Ok(Message::Text(t))) => if let Some(ev) = decode_text(t.as_str()) { let _ = tx.send(ev); },
                        Some(Ok(Message::Binary(b))) => if let Some(ev) = decode_binary(&b) { let _ = tx.send(ev); },
                        Some(Ok(Message::Close(_))) => break "closed by the server",
                        Some(Ok(_)) => {}
                    }
                }
            }
        };
        // Close the old socket completely before a new one with the same client id
        // may open (the same-id reconnect race of API.md §7.2).
        let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
        drop(ws);
        connected.send_replace(false);
        let _ = tx.send(WsEvent::Disconnected);
        if shutdown.is_cancelled() {
            return;
        }
        tracing::warn!(%url, reason = why, "ComfyUI WebSocket lost; reconnecting");
        wait(&mut backoff, &shutdown).await;
    }
}

async fn wait(backoff: &mut Backoff, shutdown: &CancellationToken) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(backoff.next_delay()) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_frames_decode_as_the_reference_lays_them_out() {
        // Type 1: u32 type, u32 format (2 = PNG), image.
        let mut t1 = vec![0, 0, 0, 1, 0, 0, 0, 2];
        t1.extend_from_slice(b"\x89PNGdata");
        match decode_binary(&t1).unwrap() {
            WsEvent::Preview {
                prompt_id,
                image_type,
                image,
            } => {
                assert_eq!((prompt_id, image_type.as_str()), (None, "image/png"));
                assert_eq!(&image[..4], b"\x89PNG");
            }
            other => panic!("{other:?}"),
        }
        // Type 4: u32 type, u32 metadata length, metadata JSON, image.
        let meta = br#"{"node_id": "3", "prompt_id": "e1c6", "display_node_id": "3", "parent_node_id": null, "real_node_id": "3", "image_type": "image/png"}"#;
        let mut t4 = vec![0, 0, 0, 4];
        t4.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        t4.extend_from_slice(meta);
        t4.extend_from_slice(b"\x89PNG");
        assert_eq!(decode_binary(&t4).unwrap().prompt_id(), Some("e1c6"));
        // Type 3 (broadcast text without a prompt id) and unknown types are ignored.
        let mut t3 = vec![0, 0, 0, 3, 0, 0, 0, 1, b'2'];
        t3.extend_from_slice(b"width: 320");
        assert!(decode_binary(&t3).is_none());
        assert!(decode_binary(&[0, 0, 0, 9]).is_none());
        assert!(decode_binary(&[0, 0]).is_none());
    }

    #[test]
    fn text_frames_keep_type_and_data() {
        let ev = decode_text(r#"{"type": "executing", "data": {"node": null, "prompt_id": "p1"}}"#)
            .unwrap();
        assert_eq!(ev.prompt_id(), Some("p1"));
        assert!(decode_text("not json").is_none());
    }
}
