//! libzmq behind the seam, through the `zmq` crate.
//!
//! libzmq sockets are not thread-safe and the `zmq` crate's calls block, so each
//! socket lives on its own thread. The thread polls the socket, an eventfd that the
//! async side rings when it queues a command, and (for a DEALER) the socket's
//! monitor. What arrives goes to a bounded tokio channel; when that is full the
//! thread stops reading, so libzmq's receive high-water mark pushes back on the
//! peer instead of memory growing.
//!
//! Limits are libzmq's own: `ZMQ_MAXMSGSIZE` (a peer announcing a larger frame is
//! disconnected before anything is allocated), per-peer send/receive high-water
//! marks, `ZMQ_HANDSHAKE_IVL`, ZMTP heartbeats, `ZMQ_ROUTER_MANDATORY` (a send to a
//! stalled peer fails instead of blocking) and, with keys configured, CURVE with the
//! ZAP handler in [`super::curve`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc as smpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::backlog::{Attempt, Backlogs};
use super::caps::Caps;
use super::curve::{self, RateLimit};
use super::{BindOptions, ConnectOptions, Incoming, Routed, TransportError};

fn ctx() -> &'static zmq::Context {
    static CTX: OnceLock<zmq::Context> = OnceLock::new();
    CTX.get_or_init(|| {
        let _ = kiln_libzmq_build::linked();
        zmq::Context::new()
    })
}

pub fn has_curve() -> bool {
    zmq::has("curve") == Some(true)
}

// Monitor event numbers (zmq.h).
const EVENT_ACCEPTED: u16 = 0x0020;
const EVENT_DISCONNECTED: u16 = 0x0200;
const EVENT_HANDSHAKE_FAILED_NO_DETAIL: u16 = 0x0800;
const EVENT_HANDSHAKE_FAILED_PROTOCOL: u16 = 0x2000;
const EVENT_HANDSHAKE_FAILED_AUTH: u16 = 0x4000;

/// Commands queued per socket before `send` reports the socket overloaded.
const COMMAND_QUEUE: usize = 65_536;
/// Messages handed to the async side before the thread stops reading.
const UP_QUEUE: usize = 1024;
/// Routing ids remembered with their connection; past this the oldest half of
/// what is known is forgotten (their sessions then end on the next message).
const MAX_TRACKED_PEERS: usize = 200_000;

/// An eventfd the async side rings to wake the socket thread.
struct Wake(OwnedFd);

impl Wake {
    fn new() -> Result<Wake, TransportError> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(TransportError::Bind {
                endpoint: "eventfd".into(),
                reason: std::io::Error::last_os_error().to_string(),
            });
        }
        // SAFETY: `fd` is a fresh descriptor we own.
        Ok(Wake(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }

    fn ring(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.fd(), &one as *const u64 as *const libc::c_void, 8) };
    }

    fn drain(&self) {
        let mut n: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our non-blocking eventfd.
        unsafe { libc::read(self.fd(), &mut n as *mut u64 as *mut libc::c_void, 8) };
    }
}

enum Cmd {
    Send(Vec<Bytes>),
    Subscribe(bool, Vec<u8>),
}

/// The async side's handle on a socket thread; the thread ends when the last
/// handle is dropped.
struct Handle {
    cmds: smpsc::SyncSender<Cmd>,
    wake: Arc<Wake>,
}

impl Handle {
    fn push(&self, cmd: Cmd) -> Result<(), TransportError> {
        match self.cmds.try_send(cmd) {
            Ok(()) => {
                self.wake.ring();
                Ok(())
            }
            Err(smpsc::TrySendError::Full(_)) => {
                Err(TransportError::Send("the socket's queue is full".into()))
            }
            Err(smpsc::TrySendError::Disconnected(_)) => Err(TransportError::Closed),
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // The thread sees the channel disconnected once woken.
        let (tx, _) = smpsc::sync_channel(1);
        drop(std::mem::replace(&mut self.cmds, tx));
        self.wake.ring();
    }
}

/// What a socket thread hands up.
enum Up {
    Routed(Routed),
    Incoming(Incoming),
}

/// What a socket does with what it reads and what it is told.
enum Role {
    Router {
        /// Each routing id's connection: the ZAP `User-Id` and its descriptor.
        conns: HashMap<Bytes, (String, RawFd)>,
        /// The routing id last seen on each descriptor, to end its session when
        /// the connection ends.
        by_fd: HashMap<RawFd, Bytes>,
        /// Peers whose backlog overflowed: nothing more is kept for them (what
        /// finds no room in their pipe is dropped) until a send gets through.
        stalled: HashSet<Bytes>,
        /// Messages refused for a moment (`EAGAIN`), sent as the pipe drains.
        backlog: Box<Backlogs>,
        log: RateLimit,
        caps: Caps,
    },
    Dealer {
        log: RateLimit,
    },
    Pub {
        caps: Caps,
    },
    Sub,
}

static NEXT_MONITOR: AtomicU64 = AtomicU64::new(1);

fn zerr(endpoint: &str, bind: bool) -> impl Fn(zmq::Error) -> TransportError + '_ {
    move |e| {
        if bind {
            TransportError::Bind {
                endpoint: endpoint.to_string(),
                reason: e.to_string(),
            }
        } else {
            TransportError::Connect {
                endpoint: endpoint.to_string(),
                reason: e.to_string(),
            }
        }
    }
}

fn ms(d: Duration) -> i32 {
    d.as_millis().min(i32::MAX as u128) as i32
}

/// Options every Kiln socket gets.
fn common(sock: &zmq::Socket, endpoint: &str, max: u64) -> zmq::Result<()> {
    sock.set_linger(0)?;
    sock.set_maxmsgsize(max.min(i64::MAX as u64) as i64)?;
    sock.set_ipv6(endpoint.contains('['))?;
    sock.set_tcp_keepalive(1)?;
    sock.set_tcp_keepalive_idle(5)?;
    sock.set_tcp_keepalive_intvl(2)?;
    sock.set_tcp_keepalive_cnt(3)?;
    Ok(())
}

/// A bound ROUTER or PUB with its limits, ZAP domain and (optionally) CURVE.
fn bound(
    kind: zmq::SocketType,
    endpoint: &str,
    opts: &BindOptions,
) -> Result<(zmq::Socket, String), TransportError> {
    let fail = zerr(endpoint, true);
    let ctx = ctx();
    let sock = ctx.socket(kind).map_err(&fail)?;
    common(&sock, endpoint, opts.max_message_bytes).map_err(&fail)?;
    let hwm = opts.peer_queue.clamp(1, i32::MAX as usize) as i32;
    sock.set_sndhwm(hwm).map_err(&fail)?;
    sock.set_rcvhwm(256).map_err(&fail)?;
    sock.set_handshake_ivl(ms(opts.handshake_timeout))
        .map_err(&fail)?;
    sock.set_heartbeat_ivl(ms(opts.heartbeat)).map_err(&fail)?;
    sock.set_heartbeat_timeout(ms(opts.heartbeat * 3))
        .map_err(&fail)?;
    sock.set_heartbeat_ttl(ms(opts.heartbeat * 3))
        .map_err(&fail)?;
    let policy = match &opts.curve {
        Some(server) => {
            if !has_curve() {
                return Err(curve::KeyError::Unsupported.into());
            }
            sock.set_curve_server(true).map_err(&fail)?;
            sock.set_curve_secretkey(&curve::raw("curve secret key", &server.keys.secret)?)
                .map_err(&fail)?;
            Some(server.allowed_raw()?)
        }
        None => None,
    };
    // Even plain ZMTP goes through ZAP: every admitted connection gets its own
    // User-Id, which binds sessions to connections.
    let domain = curve::zap(ctx).domain(policy);
    sock.set_zap_domain(&domain).map_err(&fail)?;
    if kind == zmq::ROUTER {
        sock.set_router_mandatory(true).map_err(&fail)?;
    }
    sock.bind(endpoint).map_err(&fail)?;
    let ep = sock
        .get_last_endpoint()
        .map_err(&fail)?
        .unwrap_or_else(|_| endpoint.to_string());
    Ok((sock, ep))
}

fn connected(
    kind: zmq::SocketType,
    endpoint: &str,
    opts: &ConnectOptions,
) -> Result<zmq::Socket, TransportError> {
    let fail = zerr(endpoint, false);
    let sock = ctx().socket(kind).map_err(&fail)?;
    common(&sock, endpoint, opts.max_message_bytes).map_err(&fail)?;
    if let Some(id) = &opts.identity {
        sock.set_identity(id).map_err(&fail)?;
    }
    sock.set_reconnect_ivl(100).map_err(&fail)?;
    sock.set_reconnect_ivl_max(2000).map_err(&fail)?;
    sock.set_connect_timeout(ms(opts.connect_timeout))
        .map_err(&fail)?;
    sock.set_heartbeat_ivl(2000).map_err(&fail)?;
    sock.set_heartbeat_timeout(6000).map_err(&fail)?;
    if let Some(c) = &opts.curve {
        if !has_curve() {
            return Err(curve::KeyError::Unsupported.into());
        }
        sock.set_curve_serverkey(&curve::raw("broker public key", &c.server_public)?)
            .map_err(&fail)?;
        sock.set_curve_publickey(&curve::raw("curve public key", &c.keys.public)?)
            .map_err(&fail)?;
        sock.set_curve_secretkey(&curve::raw("curve secret key", &c.keys.secret)?)
            .map_err(&fail)?;
    }
    Ok(sock)
}

fn monitor(sock: &zmq::Socket, events: u16) -> Result<zmq::Socket, TransportError> {
    let addr = format!(
        "inproc://kiln-monitor-{}",
        NEXT_MONITOR.fetch_add(1, Ordering::Relaxed)
    );
    let fail = zerr(&addr, false);
    sock.monitor(&addr, events as i32).map_err(&fail)?;
    let m = ctx().socket(zmq::PAIR).map_err(&fail)?;
    m.connect(&addr).map_err(&fail)?;
    Ok(m)
}

/// Starts the thread that owns `sock`.
fn spawn(
    name: &str,
    sock: zmq::Socket,
    mon: Option<zmq::Socket>,
    role: Role,
) -> Result<(Handle, mpsc::Receiver<Up>), TransportError> {
    let wake = Arc::new(Wake::new()?);
    let (cmds_tx, cmds_rx) = smpsc::sync_channel(COMMAND_QUEUE);
    let (up_tx, up_rx) = mpsc::channel(UP_QUEUE);
    let thread_wake = wake.clone();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || run(sock, mon, role, cmds_rx, thread_wake, up_tx))
        .map_err(|e| TransportError::Bind {
            endpoint: name.into(),
            reason: e.to_string(),
        })?;
    Ok((
        Handle {
            cmds: cmds_tx,
            wake,
        },
        up_rx,
    ))
}

/// Serves the socket until its handle is dropped, then closes it and its monitor
/// in the one safe order.
///
/// libzmq sends monitor events from its I/O thread with a *blocking* send to the
/// monitor's PAIR. Closing the PAIR while the socket still reports to it (and
/// `zmq_close` does not stop the monitor until the reaper gets to it) leaves the
/// I/O thread blocked for good on the next event, a disconnect, say: every socket
/// of the process then stops (libzmq issue 3575). Two clients in one process hit
/// it whenever one dropped its connection while the other was busy. So the
/// monitor is stopped first (`zmq_socket_monitor(s, NULL, 0)`, synchronous), then
/// the PAIR and the socket are closed.
fn run(
    mut sock: zmq::Socket,
    mon: Option<zmq::Socket>,
    role: Role,
    cmds: smpsc::Receiver<Cmd>,
    wake: Arc<Wake>,
    up: mpsc::Sender<Up>,
) {
    serve(&sock, mon.as_ref(), role, cmds, wake, up);
    if mon.is_some() {
        // SAFETY: `sock` is a live socket owned by this thread; a null endpoint
        // stops its monitor.
        unsafe { zmq_sys::zmq_socket_monitor(sock.as_mut_ptr(), std::ptr::null(), 0) };
    }
    drop(mon);
    drop(sock);
}

fn serve(
    sock: &zmq::Socket,
    mon: Option<&zmq::Socket>,
    mut role: Role,
    cmds: smpsc::Receiver<Cmd>,
    wake: Arc<Wake>,
    up: mpsc::Sender<Up>,
) {
    let mut pending: VecDeque<Up> = VecDeque::new();
    let reads = !matches!(role, Role::Pub { .. });
    loop {
        while let Some(u) = pending.pop_front() {
            match up.try_send(u) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(u)) => {
                    pending.push_front(u);
                    break;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
        let reading = reads && pending.is_empty();
        {
            let mut items = vec![
                sock.as_poll_item(if reading {
                    zmq::POLLIN
                } else {
                    zmq::PollEvents::empty()
                }),
                zmq::PollItem::from_fd(wake.fd(), zmq::POLLIN),
            ];
            if let Some(m) = mon {
                items.push(m.as_poll_item(zmq::POLLIN));
            }
            // With messages waiting for room upstairs or in a peer's pipe, look
            // again in a millisecond.
            let timeout = if pending.is_empty() && !role.waiting_to_send() {
                -1
            } else {
                1
            };
            if zmq::poll(&mut items, timeout).is_err() {
                continue;
            }
        }
        wake.drain();
        loop {
            match cmds.try_recv() {
                Ok(cmd) => role.command(sock, cmd, &mut pending),
                Err(smpsc::TryRecvError::Empty) => break,
                Err(smpsc::TryRecvError::Disconnected) => return,
            }
        }
        role.flush(sock, &mut pending);
        if let Some(m) = mon {
            while let Ok(frames) = m.recv_multipart(zmq::DONTWAIT) {
                if let Some(ev) = frames.first().filter(|f| f.len() >= 6) {
                    let event = u16::from_le_bytes([ev[0], ev[1]]);
                    // The event's value: a descriptor for accepted/disconnected.
                    let value = u32::from_le_bytes([ev[2], ev[3], ev[4], ev[5]]);
                    let endpoint = frames
                        .get(1)
                        .map(|e| String::from_utf8_lossy(e).to_string())
                        .unwrap_or_default();
                    role.event(event, value as RawFd, &endpoint, &mut pending);
                }
            }
        }
        if reading {
            // Read what is there, up to a batch, then serve commands again.
            for _ in 0..256 {
                match recv(sock) {
                    Some((frames, origin)) => role.message(frames, origin, &mut pending),
                    None => break,
                }
                if pending.len() >= 64 {
                    break;
                }
            }
        }
    }
}

/// Where a message came from: its connection's ZAP `User-Id` and descriptor.
struct Origin {
    user: Option<String>,
    /// libzmq's `__fd` property (what `ZMQ_SRCFD` reads); -1 if absent.
    fd: RawFd,
}

/// One multipart message with its origin, without waiting.
fn recv(sock: &zmq::Socket) -> Option<(Vec<Bytes>, Origin)> {
    let mut first = sock.recv_msg(zmq::DONTWAIT).ok()?;
    let user = first.gets("User-Id").map(str::to_string);
    let fd = first
        .gets("__fd")
        .and_then(|f| f.parse().ok())
        .unwrap_or(-1);
    let mut more = first.get_more();
    let mut frames = vec![Bytes::copy_from_slice(&first)];
    while more {
        let Ok(m) = sock.recv_msg(0) else { break };
        more = m.get_more();
        frames.push(Bytes::copy_from_slice(&m));
    }
    Some((frames, Origin { user, fd }))
}

impl Role {
    fn command(&mut self, sock: &zmq::Socket, cmd: Cmd, up: &mut VecDeque<Up>) {
        match cmd {
            Cmd::Subscribe(on, prefix) => {
                let r = if on {
                    sock.set_subscribe(&prefix)
                } else {
                    sock.set_unsubscribe(&prefix)
                };
                if let Err(e) = r {
                    tracing::warn!(error = %e, "subscription change failed");
                }
            }
            Cmd::Send(frames) => match self {
                Role::Router {
                    stalled,
                    backlog,
                    log,
                    ..
                } => {
                    let peer = frames.first().cloned().unwrap_or_default();
                    let now = Instant::now();
                    if backlog.has(&peer) {
                        // Behind what already waits for this peer, in order.
                        if !backlog.push(peer.clone(), frames, now) {
                            declare_stalled(peer, stalled, log, up);
                        }
                        return;
                    }
                    match attempt(sock, &frames) {
                        Attempt::Sent => {
                            if !stalled.is_empty() {
                                stalled.remove(&peer);
                            }
                        }
                        // A peer already found stalled gets nothing kept for it.
                        Attempt::Full if stalled.contains(&peer) => {}
                        Attempt::Full => {
                            if !backlog.push(peer.clone(), frames, now) {
                                declare_stalled(peer, stalled, log, up);
                            }
                        }
                        // Gone (or never there): a worker may be reconnecting.
                        Attempt::Undeliverable => {}
                    }
                }
                Role::Dealer { log } => {
                    let result = sock.send_multipart(frames.iter().map(|b| &b[..]), zmq::DONTWAIT);
                    if let Err(e) = result {
                        if let Some(suppressed) = log.allow(Instant::now()) {
                            tracing::warn!(error = %e, suppressed, "cannot queue a message to the broker; dropped");
                        }
                    }
                }
                Role::Pub { .. } | Role::Sub => {
                    let _ = sock.send_multipart(frames.iter().map(|b| &b[..]), zmq::DONTWAIT);
                }
            },
        }
    }

    /// Whether messages wait for room in a peer's pipe (the thread then looks
    /// again within a millisecond).
    fn waiting_to_send(&self) -> bool {
        matches!(self, Role::Router { backlog, .. } if !backlog.is_empty())
    }

    /// Sends what waits in the backlogs while the pipes take it; a peer whose
    /// oldest message waited too long is reported stalled.
    fn flush(&mut self, sock: &zmq::Socket, up: &mut VecDeque<Up>) {
        if let Role::Router {
            stalled,
            backlog,
            log,
            ..
        } = self
        {
            if backlog.is_empty() {
                return;
            }
            for peer in backlog.flush(Instant::now(), |frames| attempt(sock, frames)) {
                declare_stalled(peer, stalled, log, up);
            }
        }
    }

    fn message(&mut self, mut frames: Vec<Bytes>, origin: Origin, up: &mut VecDeque<Up>) {
        match self {
            Role::Router { conns, by_fd, .. } => {
                if frames.len() < 2 {
                    return;
                }
                let peer = frames.remove(0);
                let conn = (origin.user.unwrap_or_default(), origin.fd);
                match conns.get(&peer) {
                    Some(known) if *known == conn => {}
                    known => {
                        // A new connection under this id: void what the old one proved.
                        if known.is_some() {
                            up.push_back(Up::Routed(Routed::Gone { peer: peer.clone() }));
                        }
                        if conns.len() >= MAX_TRACKED_PEERS {
                            let drop: Vec<Bytes> =
                                conns.keys().take(MAX_TRACKED_PEERS / 2).cloned().collect();
                            for p in drop {
                                conns.remove(&p);
                            }
                            by_fd.retain(|_, p| conns.contains_key(p));
                        }
                        if conn.1 >= 0 {
                            by_fd.insert(conn.1, peer.clone());
                        }
                        conns.insert(peer.clone(), conn);
                    }
                }
                up.push_back(Up::Routed(Routed::Message { peer, frames }));
            }
            Role::Dealer { .. } | Role::Sub => up.push_back(Up::Incoming(Incoming::Frames(frames))),
            Role::Pub { .. } => {}
        }
    }

    fn event(&mut self, event: u16, fd: RawFd, endpoint: &str, up: &mut VecDeque<Up>) {
        match self {
            Role::Router {
                conns,
                by_fd,
                caps,
                stalled,
                backlog,
                ..
            } => match event {
                EVENT_ACCEPTED => caps.accepted(fd, endpoint),
                EVENT_DISCONNECTED => {
                    caps.closed(fd);
                    // The connection ended: its routing id's session ends with it.
                    if let Some(peer) = by_fd.remove(&fd) {
                        if conns.get(&peer).is_some_and(|(_, f)| *f == fd) {
                            conns.remove(&peer);
                            stalled.remove(&peer);
                            backlog.forget(&peer);
                            up.push_back(Up::Routed(Routed::Gone { peer }));
                        }
                    }
                }
                _ => {}
            },
            Role::Pub { caps } => match event {
                EVENT_ACCEPTED => caps.accepted(fd, endpoint),
                EVENT_DISCONNECTED => caps.closed(fd),
                _ => {}
            },
            Role::Dealer { log } => match event {
                EVENT_DISCONNECTED => up.push_back(Up::Incoming(Incoming::Lost)),
                EVENT_HANDSHAKE_FAILED_AUTH
                | EVENT_HANDSHAKE_FAILED_PROTOCOL
                | EVENT_HANDSHAKE_FAILED_NO_DETAIL => {
                    let why = if event == EVENT_HANDSHAKE_FAILED_AUTH {
                        "the broker refused our CURVE key"
                    } else {
                        "the handshake failed (a CURVE key or protocol mismatch?)"
                    };
                    if let Some(suppressed) = log.allow(Instant::now()) {
                        tracing::warn!(%endpoint, suppressed, "{why}");
                    }
                    up.push_back(Up::Incoming(Incoming::Error(TransportError::Recv(
                        format!("{endpoint}: {why}"),
                    ))));
                }
                _ => {}
            },
            Role::Sub => {}
        }
    }
}

/// One non-blocking send of a routed message (routing id first).
fn attempt(sock: &zmq::Socket, frames: &[Bytes]) -> Attempt {
    match sock.send_multipart(frames.iter().map(|b| &b[..]), zmq::DONTWAIT) {
        Ok(()) => Attempt::Sent,
        Err(zmq::Error::EAGAIN) => Attempt::Full,
        Err(e) => {
            tracing::debug!(error = %e, "peer not reachable");
            Attempt::Undeliverable
        }
    }
}

/// A peer that stopped reading: logged (rate-limited), reported once, and sent
/// nothing more until a send to it succeeds again.
fn declare_stalled(
    peer: Bytes,
    stalled: &mut HashSet<Bytes>,
    log: &mut RateLimit,
    up: &mut VecDeque<Up>,
) {
    if stalled.insert(peer.clone()) {
        if let Some(suppressed) = log.allow(Instant::now()) {
            tracing::warn!(suppressed, peer = %crate::client::hex(&peer), "a peer stopped reading and its queue is full; dropping its messages");
        }
        up.push_back(Up::Routed(Routed::Stalled { peer }));
    }
}

pub struct Dealer {
    handle: Handle,
    up: mpsc::Receiver<Up>,
}

impl Dealer {
    pub fn connect(endpoint: &str, opts: ConnectOptions) -> Result<Dealer, TransportError> {
        let sock = connected(zmq::DEALER, endpoint, &opts)?;
        sock.set_sndhwm(10_000).map_err(zerr(endpoint, false))?;
        let mon = monitor(
            &sock,
            EVENT_DISCONNECTED
                | EVENT_HANDSHAKE_FAILED_AUTH
                | EVENT_HANDSHAKE_FAILED_PROTOCOL
                | EVENT_HANDSHAKE_FAILED_NO_DETAIL,
        )?;
        sock.connect(endpoint).map_err(zerr(endpoint, false))?;
        let role = Role::Dealer {
            log: RateLimit::new(Duration::from_secs(10)),
        };
        let (handle, up) = spawn("kiln-zmq-dealer", sock, Some(mon), role)?;
        Ok(Dealer { handle, up })
    }

    pub async fn send(&mut self, frames: Vec<Bytes>) -> Result<(), TransportError> {
        self.handle.push(Cmd::Send(frames))
    }

    pub async fn next(&mut self) -> Incoming {
        match self.up.recv().await {
            Some(Up::Incoming(i)) => i,
            Some(Up::Routed(_)) => Incoming::Error(TransportError::Recv("unexpected".into())),
            None => Incoming::Lost,
        }
    }
}

pub fn bind_router(
    endpoint: &str,
    opts: BindOptions,
) -> Result<(RouterRx, RouterTx, String), TransportError> {
    let (sock, ep) = bound(zmq::ROUTER, endpoint, &opts)?;
    let mon = monitor(&sock, EVENT_ACCEPTED | EVENT_DISCONNECTED)?;
    let role = Role::Router {
        conns: HashMap::new(),
        by_fd: HashMap::new(),
        stalled: HashSet::new(),
        backlog: Box::default(),
        log: RateLimit::new(Duration::from_secs(10)),
        caps: Caps::new(&opts),
    };
    let (handle, up) = spawn("kiln-zmq-router", sock, Some(mon), role)?;
    Ok((RouterRx(up), RouterTx(Arc::new(handle)), ep))
}

pub struct RouterRx(mpsc::Receiver<Up>);

impl RouterRx {
    pub async fn recv(&mut self) -> Option<Routed> {
        loop {
            match self.0.recv().await? {
                Up::Routed(r) => return Some(r),
                Up::Incoming(_) => continue,
            }
        }
    }
}

#[derive(Clone)]
pub struct RouterTx(Arc<Handle>);

impl RouterTx {
    pub fn send(&self, peer: Bytes, mut frames: Vec<Bytes>) {
        frames.insert(0, peer);
        if let Err(e) = self.0.push(Cmd::Send(frames)) {
            tracing::warn!(error = %e, "router send dropped");
        }
    }
}

pub struct Publisher(Handle);

pub fn bind_pub(endpoint: &str, opts: BindOptions) -> Result<(Publisher, String), TransportError> {
    let (sock, ep) = bound(zmq::PUB, endpoint, &opts)?;
    let mon = monitor(&sock, EVENT_ACCEPTED | EVENT_DISCONNECTED)?;
    let role = Role::Pub {
        caps: Caps::new(&opts),
    };
    let (handle, _up) = spawn("kiln-zmq-pub", sock, Some(mon), role)?;
    Ok((Publisher(handle), ep))
}

impl Publisher {
    pub fn send(&self, frames: Vec<Bytes>) -> bool {
        self.0.push(Cmd::Send(frames)).is_ok()
    }
}

pub struct Subscriber {
    handle: Handle,
    up: mpsc::Receiver<Up>,
}

impl Subscriber {
    pub fn connect(endpoint: &str, opts: ConnectOptions) -> Result<Subscriber, TransportError> {
        let sock = connected(zmq::SUB, endpoint, &opts)?;
        sock.set_rcvhwm(10_000).map_err(zerr(endpoint, false))?;
        sock.connect(endpoint).map_err(zerr(endpoint, false))?;
        let (handle, up) = spawn("kiln-zmq-sub", sock, None, Role::Sub)?;
        Ok(Subscriber { handle, up })
    }

    pub fn subscribe(&mut self, prefix: &str, on: bool) -> Result<(), TransportError> {
        self.handle
            .push(Cmd::Subscribe(on, prefix.as_bytes().to_vec()))
    }

    pub async fn recv(&mut self) -> Result<Vec<Bytes>, TransportError> {
        loop {
            match self.up.recv().await {
                Some(Up::Incoming(Incoming::Frames(f))) => return Ok(f),
                Some(_) => continue,
                None => return Err(TransportError::Closed),
            }
        }
    }
}
