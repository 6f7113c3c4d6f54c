//! A DEALER connection that knows when it has lost its peer.
//!
//! The zeromq crate's DEALER never reconnects once an established connection drops
//! (upstream #143): after a broker restart its sends fail and its receives hang. Both
//! the [`Client`](crate::Client) and the worker therefore watch the socket's monitor
//! and, on `Disconnected`, drop the socket and connect a fresh one.

use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc;
use futures::StreamExt;
use zeromq::{
    DealerRecvHalf, DealerSendHalf, DealerSocket, Socket, SocketEvent, SocketOptions, SocketRecv,
    SocketSend, ZmqError, ZmqMessage,
};

/// One live DEALER connection, split so that sending and receiving can be raced in
/// one `select!`.
pub struct DealerConn {
    pub tx: DealerSendHalf,
    pub rx: DealerRecvHalf,
    monitor: mpsc::Receiver<SocketEvent>,
}

impl DealerConn {
    /// Connects to `endpoint`, retrying refused connections until `timeout`.
    pub async fn connect(
        endpoint: &str,
        identity: Option<Bytes>,
        timeout: Duration,
    ) -> Result<DealerConn, ZmqError> {
        let mut options = SocketOptions::default();
        options.connect_timeout(timeout);
        if let Some(id) = identity {
            options.peer_identity(id.try_into()?);
        }
        let mut socket = DealerSocket::with_options(options);
        let monitor = socket.monitor();
        socket.connect(endpoint).await?;
        let (tx, rx) = socket.split();
        Ok(DealerConn { tx, rx, monitor })
    }

    pub async fn send(&mut self, frames: impl IntoIterator<Item = Bytes>) -> Result<(), ZmqError> {
        let frames: Vec<Bytes> = frames.into_iter().collect();
        let msg = ZmqMessage::try_from(frames).map_err(|_| ZmqError::Other("empty message"))?;
        self.tx.send(msg).await
    }

    /// Receives the next message's frames. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Vec<Bytes>, ZmqError> {
        Ok(self.rx.recv().await?.into_vec())
    }

    /// Resolves when the monitor reports the peer gone. Cancel-safe.
    pub async fn lost(&mut self) {
        wait_lost(&mut self.monitor).await
    }

    /// The next message, or `Incoming::Lost` when the peer went away. Cancel-safe,
    /// so it can sit in a `select!` beside other work.
    pub async fn next(&mut self) -> Incoming {
        tokio::select! {
            msg = self.rx.recv() => match msg {
                Ok(msg) => Incoming::Frames(msg.into_vec()),
                Err(e) => Incoming::Error(e),
            },
            _ = wait_lost(&mut self.monitor) => Incoming::Lost,
        }
    }
}

/// What [`DealerConn::next`] saw.
#[derive(Debug)]
pub enum Incoming {
    Frames(Vec<Bytes>),
    /// A receive error that does not end the connection (a codec hiccup): log it.
    Error(ZmqError),
    /// The peer is gone; drop this connection and make a new one.
    Lost,
}

async fn wait_lost(monitor: &mut mpsc::Receiver<SocketEvent>) {
    while let Some(event) = monitor.next().await {
        if matches!(event, SocketEvent::Disconnected(_)) {
            return;
        }
    }
    // The monitor channel closed: the socket is gone too.
}

/// Exponential backoff for reconnect loops: 1 s doubling to 32 s by default.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            next: min,
            min,
            max,
        }
    }

    /// The delay to wait now; doubles the following one.
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_secs(1), Duration::from_secs(32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::default();
        let got: Vec<u64> = (0..8).map(|_| b.next_delay().as_secs()).collect();
        assert_eq!(got, [1, 2, 4, 8, 16, 32, 32, 32]);
        b.reset();
        assert_eq!(b.next_delay().as_secs(), 1);
    }
}
