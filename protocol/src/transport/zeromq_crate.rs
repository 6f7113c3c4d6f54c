//! The `zeromq` crate behind the seam.
//!
//! What this transport cannot do, and why it must stay behind a fence
//! (docs/security.md): it allocates whatever size a frame header announces before
//! reading it (nine bytes abort the process), its PUB takes a sync lock on the
//! async path (subscription churn can deadlock the runtime), its per-peer queues
//! count messages rather than bytes, it has no handshake timeout and no CURVE.
//! What it can do is done here: bounded per-peer send queues with a send timeout,
//! so one stalled peer never blocks the others, and peer events from the socket
//! monitor, drained continuously, so a session dies with its connection.

use std::collections::HashMap;
use std::net::ToSocketAddrs;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::channel::mpsc as fmpsc;
use futures::{FutureExt, StreamExt};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use zeromq::{
    DealerRecvHalf, DealerSendHalf, DealerSocket, PubSocket, RouterRecvHalf, RouterSendHalf,
    RouterSocket, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqError,
    ZmqMessage,
};

use super::{BindOptions, ConnectOptions, Incoming, Routed, TransportError};

fn to_msg(frames: Vec<Bytes>) -> Result<ZmqMessage, TransportError> {
    ZmqMessage::try_from(frames).map_err(|_| TransportError::Send("empty message".into()))
}

/// One DEALER, split so that sending and receiving can be raced in one `select!`.
pub struct Dealer {
    tx: DealerSendHalf,
    rx: DealerRecvHalf,
    monitor: fmpsc::Receiver<SocketEvent>,
}

impl Dealer {
    pub async fn connect(endpoint: &str, opts: ConnectOptions) -> Result<Dealer, TransportError> {
        let fail = |e: ZmqError| TransportError::Connect {
            endpoint: endpoint.to_string(),
            reason: e.to_string(),
        };
        let mut options = SocketOptions::default();
        options.connect_timeout(opts.connect_timeout);
        if let Some(id) = opts.identity {
            options.peer_identity(id.try_into().map_err(fail)?);
        }
        let mut socket = DealerSocket::with_options(options);
        let monitor = socket.monitor();
        socket.connect(endpoint).await.map_err(fail)?;
        let (tx, rx) = socket.split();
        Ok(Dealer { tx, rx, monitor })
    }

    pub async fn send(&mut self, frames: Vec<Bytes>) -> Result<(), TransportError> {
        self.tx
            .send(to_msg(frames)?)
            .await
            .map_err(|e| TransportError::Send(e.to_string()))
    }

    pub async fn next(&mut self) -> Incoming {
        tokio::select! {
            msg = self.rx.recv() => match msg {
                Ok(msg) => Incoming::Frames(msg.into_vec()),
                Err(e) => Incoming::Error(TransportError::Recv(e.to_string())),
            },
            _ = wait_lost(&mut self.monitor) => Incoming::Lost,
        }
    }
}

async fn wait_lost(monitor: &mut fmpsc::Receiver<SocketEvent>) {
    while let Some(event) = monitor.next().await {
        if matches!(event, SocketEvent::Disconnected(_)) {
            return;
        }
    }
    // The monitor channel closed: the socket is gone too.
}

/// Binds a socket. TCP listeners get keepalive (idle 5 s, 2 s × 3 probes) so dead
/// peers are noticed, and address reuse so a restarted broker rebinds at once.
async fn bind<S: Socket>(socket: &mut S, endpoint: &str) -> Result<String, TransportError> {
    let fail = |reason: String| TransportError::Bind {
        endpoint: endpoint.to_string(),
        reason,
    };
    let Some(hostport) = endpoint.strip_prefix("tcp://") else {
        return socket
            .bind(endpoint)
            .await
            .map(|e| e.to_string())
            .map_err(|e| fail(e.to_string()));
    };
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| fail(e.to_string()))?
        .next()
        .ok_or_else(|| fail("address resolves to nothing".into()))?;
    let sock = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(|e| fail(e.to_string()))?;
    sock.set_reuse_address(true)
        .map_err(|e| fail(e.to_string()))?;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(5))
        .with_interval(Duration::from_secs(2))
        .with_retries(3);
    sock.set_tcp_keepalive(&keepalive)
        .map_err(|e| fail(e.to_string()))?;
    sock.bind(&addr.into()).map_err(|e| fail(e.to_string()))?;
    sock.listen(1024).map_err(|e| fail(e.to_string()))?;
    let listener: std::net::TcpListener = sock.into();
    socket
        .bind_listener(listener)
        .await
        .map(|e| e.to_string())
        .map_err(|e| fail(e.to_string()))
}

pub async fn bind_router(
    endpoint: &str,
    opts: BindOptions,
) -> Result<(RouterRx, RouterTx, String), TransportError> {
    let mut socket = RouterSocket::new();
    let monitor = socket.monitor();
    let ep = bind(&mut socket, endpoint).await?;
    let (tx, rx) = socket.split();
    let (stalled_tx, stalled_rx) = mpsc::unbounded_channel();
    let outbox = Outbox {
        router: tx,
        peers: Mutex::new(HashMap::new()),
        capacity: opts.peer_queue.max(1),
        rt: Handle::current(),
        stalled: stalled_tx,
    };
    Ok((
        RouterRx {
            rx,
            monitor,
            stalled: stalled_rx,
        },
        RouterTx(Arc::new(outbox)),
        ep,
    ))
}

/// A ROUTER's receive half with its monitor: peer events come before messages,
/// so a replaced connection is reported before its successor's first message.
pub struct RouterRx {
    rx: RouterRecvHalf,
    monitor: fmpsc::Receiver<SocketEvent>,
    stalled: mpsc::UnboundedReceiver<Routed>,
}

impl RouterRx {
    pub async fn recv(&mut self) -> Option<Routed> {
        loop {
            tokio::select! {
                biased;
                Some(s) = self.stalled.recv() => return Some(s),
                event = self.monitor.next() => match event {
                    // A new connection under an id voids whatever the id had proved.
                    Some(SocketEvent::Accepted(_, id)) | Some(SocketEvent::Disconnected(id)) => {
                        return Some(Routed::Gone { peer: Bytes::from(Vec::from(id)) })
                    }
                    Some(_) => continue,
                    None => return None,
                },
                msg = self.rx.recv() => match msg {
                    Ok(m) => {
                        let mut frames = m.into_vec();
                        if frames.is_empty() {
                            continue;
                        }
                        let peer = frames.remove(0);
                        return Some(Routed::Message { peer, frames });
                    }
                    Err(ZmqError::NoMessage) => return None,
                    Err(e) => {
                        tracing::debug!(error = %e, "receive error; continuing");
                        continue;
                    }
                },
            }
        }
    }
}

/// How long a peer task waits on one send before declaring the peer stalled.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// An idle peer task exits after this; the next message starts a new one.
const PEER_IDLE: Duration = Duration::from_secs(300);

/// Sends to the peers of one ROUTER, each through its own task and bounded queue
/// (the crate's own queues count 100,000 messages per peer).
struct Outbox {
    router: RouterSendHalf,
    peers: Mutex<HashMap<Bytes, mpsc::Sender<ZmqMessage>>>,
    capacity: usize,
    rt: Handle,
    stalled: mpsc::UnboundedSender<Routed>,
}

#[derive(Clone)]
pub struct RouterTx(Arc<Outbox>);

impl RouterTx {
    pub fn send(&self, peer: Bytes, mut frames: Vec<Bytes>) {
        let this = &self.0;
        frames.insert(0, peer.clone());
        let Ok(mut msg) = to_msg(frames) else { return };
        let mut peers = this.peers.lock().unwrap_or_else(|p| p.into_inner());
        // Fast path: with no backlog for this peer, hand the message to the socket
        // now. Only a full socket queue (a stalled peer) needs the peer task; the
        // future is dropped unsent then, so the copy goes that way instead.
        if peers.get(&peer).is_none_or(|tx| tx.is_closed()) {
            peers.remove(&peer);
            let mut router = this.router.clone();
            match router.send(msg.clone()).now_or_never() {
                Some(Ok(())) => return,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "peer not reachable");
                    return;
                }
                None => {}
            }
        }
        for _ in 0..2 {
            let tx = peers.entry(peer.clone()).or_insert_with(|| {
                let (tx, rx) = mpsc::channel(this.capacity);
                this.rt.spawn(peer_task(
                    this.router.clone(),
                    rx,
                    peer.clone(),
                    this.stalled.clone(),
                ));
                tx
            });
            match tx.try_send(msg) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!("a peer's send queue is full; dropping its messages");
                    peers.remove(&peer);
                    let _ = this.stalled.send(Routed::Stalled { peer });
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(m)) => {
                    peers.remove(&peer);
                    msg = m;
                }
            }
        }
    }
}

async fn peer_task(
    mut router: RouterSendHalf,
    mut rx: mpsc::Receiver<ZmqMessage>,
    peer: Bytes,
    stalled: mpsc::UnboundedSender<Routed>,
) {
    loop {
        let msg = match tokio::time::timeout(PEER_IDLE, rx.recv()).await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(_) => {
                // Idle: close, but deliver anything that raced in.
                rx.close();
                while let Ok(m) = rx.try_recv() {
                    let _ = tokio::time::timeout(SEND_TIMEOUT, router.send(m)).await;
                }
                return;
            }
        };
        match tokio::time::timeout(SEND_TIMEOUT, router.send(msg)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                // Not connected (any more). A worker keeps its job until its
                // heartbeats stop: it may be reconnecting.
                tracing::debug!(error = %e, "peer not reachable");
                rx.close();
                return;
            }
            Err(_) => {
                tracing::warn!(
                    "a peer stopped reading for {SEND_TIMEOUT:?}; treating it as unreachable"
                );
                let _ = stalled.send(Routed::Stalled { peer });
                rx.close();
                return;
            }
        }
    }
}

pub async fn bind_pub(
    endpoint: &str,
    _opts: BindOptions,
) -> Result<(mpsc::Sender<Vec<Bytes>>, String), TransportError> {
    let mut socket = PubSocket::new();
    let ep = bind(&mut socket, endpoint).await?;
    let (tx, mut rx) = mpsc::channel::<Vec<Bytes>>(65_536);
    tokio::spawn(async move {
        while let Some(frames) = rx.recv().await {
            let Ok(msg) = to_msg(frames) else { continue };
            if let Err(e) = socket.send(msg).await {
                tracing::debug!(error = %e, "publish failed");
            }
        }
    });
    Ok((tx, ep))
}

pub struct Subscriber(SubSocket);

impl Subscriber {
    pub async fn connect(endpoint: &str) -> Result<Subscriber, TransportError> {
        let mut sub = SubSocket::new();
        sub.connect(endpoint)
            .await
            .map_err(|e| TransportError::Connect {
                endpoint: endpoint.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Subscriber(sub))
    }

    pub async fn subscribe(&mut self, prefix: &str) -> Result<(), TransportError> {
        self.0
            .subscribe(prefix)
            .await
            .map_err(|e| TransportError::Send(e.to_string()))
    }

    pub async fn unsubscribe(&mut self, prefix: &str) -> Result<(), TransportError> {
        self.0
            .unsubscribe(prefix)
            .await
            .map_err(|e| TransportError::Send(e.to_string()))
    }

    pub async fn recv(&mut self) -> Result<Vec<Bytes>, TransportError> {
        self.0
            .recv()
            .await
            .map(|m| m.into_vec())
            .map_err(|e| TransportError::Recv(e.to_string()))
    }
}
