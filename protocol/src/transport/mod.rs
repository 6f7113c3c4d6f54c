//! The transport seam: the few socket operations Kiln needs, over either ZeroMQ
//! implementation.
//!
//! Kiln talks ZMTP with four socket types: a DEALER to the broker (clients,
//! workers), the broker's ROUTERs and PUB, and a SUB for events. Everything else in
//! Kiln uses the types here, so no other module names a socket crate.
//!
//! Two transports sit behind it, both compiled into every binary and chosen by the
//! `transport` key of each program's config table ([`TransportKind`]):
//! - [`TransportKind::Zeromq`], the pure-Rust `zeromq` crate: no encryption and
//!   defects an outside caller cannot fix (docs/security.md); loopback and fenced
//!   networks only.
//! - [`TransportKind::Libzmq`], the reference C library (`zmq` crate over libzmq
//!   4.3.5 built with libsodium): byte limits (`ZMQ_MAXMSGSIZE`), high-water marks,
//!   handshake timeouts, ZMTP heartbeats and CURVE encryption with ZAP
//!   authentication on every socket.
//!
//! A peer's connection is what a session is bound to: the ROUTER reports
//! [`Routed::Gone`] for a routing id whose connection ended or was replaced, so the
//! broker forgets whatever that id had proved.

mod backlog;
mod backoff;
mod caps;
pub mod curve;
mod libzmq;
mod zeromq_crate;

use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

pub use backoff::Backoff;
pub use curve::{CurveClient, CurveKeyPair, CurveServer, KeyError};

/// Which ZeroMQ implementation a program uses (`transport = "zeromq" | "libzmq"`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// The pure-Rust `zeromq` crate: loopback and fenced networks only (a frame
    /// header can abort it, its queues count messages, not bytes).
    Zeromq,
    /// libzmq 4.3.5 through the `zmq` crate: bounded, CURVE-capable, the one to
    /// expose beyond loopback (docs/security.md). The default.
    #[default]
    Libzmq,
}

impl TransportKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Zeromq => "zeromq",
            TransportKind::Libzmq => "libzmq",
        }
    }
}

impl std::fmt::Display for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whatever a socket operation can fail with, on either transport.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    #[error("cannot bind {endpoint}: {reason}")]
    Bind { endpoint: String, reason: String },
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("send failed: {0}")]
    Send(String),
    #[error("receive failed: {0}")]
    Recv(String),
    /// CURVE is configured but this transport cannot do it.
    #[error("CURVE is configured but the {0} transport has no CURVE; use transport = \"libzmq\"")]
    NoCurve(TransportKind),
    #[error("the socket is closed")]
    Closed,
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// Limits and timers of a bound socket (ROUTER or PUB).
#[derive(Debug, Clone)]
pub struct BindOptions {
    /// Messages larger than this are refused; on libzmq a peer announcing a larger
    /// frame is disconnected before the frame is read (`ZMQ_MAXMSGSIZE`).
    pub max_message_bytes: u64,
    /// Messages queued for one peer (send high-water mark); past it and a bounded
    /// backlog the peer is reported [`Routed::Stalled`] and messages that find no
    /// room are dropped.
    pub peer_queue: usize,
    /// CURVE server keys and the public keys allowed in; `None` for plain ZMTP.
    pub curve: Option<CurveServer>,
    /// A connection that has not finished its handshake by then is closed.
    pub handshake_timeout: Duration,
    /// ZMTP PING interval; a peer silent for three intervals is dropped.
    pub heartbeat: Duration,
    /// Connections held at once; a connection accepted past it is closed at once
    /// (libzmq; the `zeromq` crate cannot close a chosen peer).
    pub max_connections: usize,
    /// Connections one IP address holds at once (libzmq).
    pub max_connections_per_address: usize,
}

impl Default for BindOptions {
    fn default() -> Self {
        BindOptions {
            max_message_bytes: 64 * 1024 * 1024,
            peer_queue: 8192,
            curve: None,
            handshake_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(5),
            max_connections: 4096,
            max_connections_per_address: 256,
        }
    }
}

/// How a DEALER or SUB connects.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// A routing id of our choosing (workers); `None` lets the ROUTER pick one.
    pub identity: Option<Bytes>,
    pub connect_timeout: Duration,
    /// The broker's public key and ours; `None` for plain ZMTP.
    pub curve: Option<CurveClient>,
    /// Incoming messages larger than this drop the connection (libzmq).
    pub max_message_bytes: u64,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            identity: None,
            connect_timeout: Duration::from_secs(3),
            curve: None,
            max_message_bytes: 256 * 1024 * 1024,
        }
    }
}

/// What [`Dealer::next`] saw.
#[derive(Debug)]
pub enum Incoming {
    Frames(Vec<Bytes>),
    /// A receive error that does not end the connection (a codec hiccup): log it.
    Error(TransportError),
    /// The peer is gone; drop this connection and make a new one.
    Lost,
}

/// One DEALER connection that knows when it has lost its peer.
///
/// The `zeromq` crate's DEALER never reconnects once an established connection
/// drops (upstream #143), and a restarted broker has forgotten every session
/// anyway, so on either transport the owner drops a lost DEALER and connects a new
/// one, then introduces itself again.
pub struct Dealer {
    inner: DealerInner,
}

enum DealerInner {
    Zeromq(zeromq_crate::Dealer),
    Libzmq(libzmq::Dealer),
}

impl Dealer {
    /// Connects to `endpoint` (retrying refused connections until the connect
    /// timeout on `zeromq`; in the background on `libzmq`).
    pub async fn connect(
        kind: TransportKind,
        endpoint: &str,
        opts: ConnectOptions,
    ) -> Result<Dealer, TransportError> {
        let inner = match kind {
            TransportKind::Zeromq => {
                if opts.curve.is_some() {
                    return Err(TransportError::NoCurve(kind));
                }
                DealerInner::Zeromq(zeromq_crate::Dealer::connect(endpoint, opts).await?)
            }
            TransportKind::Libzmq => DealerInner::Libzmq(libzmq::Dealer::connect(endpoint, opts)?),
        };
        Ok(Dealer { inner })
    }

    /// Sends one multipart message.
    pub async fn send(
        &mut self,
        frames: impl IntoIterator<Item = Bytes>,
    ) -> Result<(), TransportError> {
        let frames: Vec<Bytes> = frames.into_iter().collect();
        match &mut self.inner {
            DealerInner::Zeromq(d) => d.send(frames).await,
            DealerInner::Libzmq(d) => d.send(frames).await,
        }
    }

    /// The next message, or [`Incoming::Lost`] when the peer went away. Cancel-safe,
    /// so it can sit in a `select!` beside other work.
    pub async fn next(&mut self) -> Incoming {
        match &mut self.inner {
            DealerInner::Zeromq(d) => d.next().await,
            DealerInner::Libzmq(d) => d.next().await,
        }
    }
}

/// What a ROUTER's receive side yields.
#[derive(Debug)]
pub enum Routed {
    /// A message from the peer with this routing id.
    Message { peer: Bytes, frames: Vec<Bytes> },
    /// This routing id's connection ended or a new connection took the id:
    /// anything it had proved (a `hello`, a `register`) is void.
    Gone { peer: Bytes },
    /// The peer stopped reading: its queue (bounded by [`BindOptions::peer_queue`]
    /// and a backlog of 16 MiB or 10 s) is full, and messages to it that find no
    /// room are dropped.
    Stalled { peer: Bytes },
}

/// A bound ROUTER: [`RouterRx`] yields what peers send, [`RouterTx`] (cheap to
/// clone, never blocks) sends to one peer by routing id.
pub struct Router;

impl Router {
    /// Binds `endpoint`; returns the endpoint actually bound (port 0 resolved).
    pub async fn bind(
        kind: TransportKind,
        endpoint: &str,
        opts: BindOptions,
    ) -> Result<(RouterRx, RouterTx, String), TransportError> {
        match kind {
            TransportKind::Zeromq => {
                if opts.curve.is_some() {
                    return Err(TransportError::NoCurve(kind));
                }
                let (rx, tx, ep) = zeromq_crate::bind_router(endpoint, opts).await?;
                Ok((RouterRx::Zeromq(rx), RouterTx::Zeromq(tx), ep))
            }
            TransportKind::Libzmq => {
                let (rx, tx, ep) = libzmq::bind_router(endpoint, opts)?;
                Ok((RouterRx::Libzmq(rx), RouterTx::Libzmq(tx), ep))
            }
        }
    }
}

/// The receive side of a ROUTER.
pub enum RouterRx {
    Zeromq(zeromq_crate::RouterRx),
    Libzmq(libzmq::RouterRx),
}

impl RouterRx {
    /// The next event; `None` once the socket is closed.
    pub async fn recv(&mut self) -> Option<Routed> {
        match self {
            RouterRx::Zeromq(r) => r.recv().await,
            RouterRx::Libzmq(r) => r.recv().await,
        }
    }
}

/// The send side of a ROUTER.
#[derive(Clone)]
pub enum RouterTx {
    Zeromq(zeromq_crate::RouterTx),
    Libzmq(libzmq::RouterTx),
}

impl RouterTx {
    /// Queues `frames` for `peer` without waiting. A message to an unknown peer is
    /// dropped; a peer whose queue is full is reported [`Routed::Stalled`].
    pub fn send(&self, peer: Bytes, frames: Vec<Bytes>) {
        match self {
            RouterTx::Zeromq(t) => t.send(peer, frames),
            RouterTx::Libzmq(t) => t.send(peer, frames),
        }
    }
}

/// A bound PUB. Sending never waits: a full queue drops the message (PUB is lossy
/// by design; followers resync).
pub struct Publisher {
    inner: PubInner,
}

enum PubInner {
    Zeromq(tokio::sync::mpsc::Sender<Vec<Bytes>>),
    Libzmq(libzmq::Publisher),
}

impl Publisher {
    /// Binds `endpoint`; returns the publisher and the endpoint actually bound.
    pub async fn bind(
        kind: TransportKind,
        endpoint: &str,
        opts: BindOptions,
    ) -> Result<(Publisher, String), TransportError> {
        let (inner, ep) = match kind {
            TransportKind::Zeromq => {
                if opts.curve.is_some() {
                    return Err(TransportError::NoCurve(kind));
                }
                let (tx, ep) = zeromq_crate::bind_pub(endpoint, opts).await?;
                (PubInner::Zeromq(tx), ep)
            }
            TransportKind::Libzmq => {
                let (p, ep) = libzmq::bind_pub(endpoint, opts)?;
                (PubInner::Libzmq(p), ep)
            }
        };
        Ok((Publisher { inner }, ep))
    }

    /// Publishes one message; `false` if it was dropped.
    pub fn send(&self, frames: Vec<Bytes>) -> bool {
        match &self.inner {
            PubInner::Zeromq(tx) => tx.try_send(frames).is_ok(),
            PubInner::Libzmq(p) => p.send(frames),
        }
    }
}

/// A SUB connected to a PUB. It reconnects by itself on both transports.
pub struct Subscriber {
    inner: SubInner,
}

enum SubInner {
    Zeromq(zeromq_crate::Subscriber),
    Libzmq(libzmq::Subscriber),
}

impl Subscriber {
    pub async fn connect(
        kind: TransportKind,
        endpoint: &str,
        opts: ConnectOptions,
    ) -> Result<Subscriber, TransportError> {
        let inner = match kind {
            TransportKind::Zeromq => {
                if opts.curve.is_some() {
                    return Err(TransportError::NoCurve(kind));
                }
                SubInner::Zeromq(zeromq_crate::Subscriber::connect(endpoint).await?)
            }
            TransportKind::Libzmq => SubInner::Libzmq(libzmq::Subscriber::connect(endpoint, opts)?),
        };
        Ok(Subscriber { inner })
    }

    pub async fn subscribe(&mut self, prefix: &str) -> Result<(), TransportError> {
        match &mut self.inner {
            SubInner::Zeromq(s) => s.subscribe(prefix).await,
            SubInner::Libzmq(s) => s.subscribe(prefix, true),
        }
    }

    pub async fn unsubscribe(&mut self, prefix: &str) -> Result<(), TransportError> {
        match &mut self.inner {
            SubInner::Zeromq(s) => s.unsubscribe(prefix).await,
            SubInner::Libzmq(s) => s.subscribe(prefix, false),
        }
    }

    /// The next message. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Vec<Bytes>, TransportError> {
        match &mut self.inner {
            SubInner::Zeromq(s) => s.recv().await,
            SubInner::Libzmq(s) => s.recv().await,
        }
    }
}

/// Whether this binary's libzmq can do CURVE (it is built with libsodium; a build
/// without it must say so rather than run in the clear).
pub fn libzmq_has_curve() -> bool {
    libzmq::has_curve()
}
