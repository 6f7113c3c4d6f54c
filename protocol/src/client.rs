//! The async Rust client of the broker: requests over DEALER, events over SUB.
//!
//! One [`Client`] is cheap to clone and can carry any number of concurrent requests:
//! a background task owns the DEALER, tags each request with a `req_id` and routes
//! replies back by that id. When the broker goes away the task connects a fresh
//! socket, says `hello` again and resends every request still waiting; submits carry
//! an idempotency key (one is made up when the caller gives none) so a resent submit
//! never creates a second job.
//!
//! [`Client::follow`] turns the lossy PUB stream into a reliable view of one job:
//! per-job sequence numbers reveal gaps, and a gap or a quiet spell is repaired
//! with a fresh snapshot from `get` (the Clone pattern).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot, OnceCell};
use tokio::time::Instant;

use crate::error::{ErrorBody, ErrorCode};
use crate::event::{Event, Topic};
use crate::frame::{self, check_header};
use crate::ids::{ArtifactId, JobId};
use crate::job::{JobSnapshot, JobSpec, JobState, ListFilter};
use crate::request::*;
use crate::transport::{
    Backoff, ConnectOptions, CurveClient, Dealer, Incoming, Subscriber, TransportKind,
};
use crate::worker::{HealthReport, ModelInfo, WorkerInfo};

/// Where the broker is and how to talk to it.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The broker's frontend, e.g. `tcp://127.0.0.1:5555`.
    pub endpoint: String,
    /// The broker's event PUB socket, e.g. `tcp://127.0.0.1:5557`; empty when the
    /// broker keeps its events port closed (client tokens without an authenticating
    /// transport): [`Client::follow`] then keeps a job current from `get` alone.
    pub events_endpoint: String,
    pub token: Option<String>,
    /// The name the broker files this client's jobs under (fairness, `list`).
    pub name: Option<String>,
    /// How long one request may wait for its reply, reconnects included.
    pub request_timeout: Duration,
    /// How long one connection attempt may take.
    pub connect_timeout: Duration,
    /// How often [`Follow`] asks for a snapshot when no event arrives.
    pub resync_interval: Duration,
    /// Which ZeroMQ implementation to use; it must match the broker's.
    pub transport: TransportKind,
    /// The broker's public key and ours, when the broker requires CURVE.
    pub curve: Option<CurveClient>,
}

impl ClientOptions {
    pub fn new(endpoint: impl Into<String>, events_endpoint: impl Into<String>) -> Self {
        ClientOptions {
            endpoint: endpoint.into(),
            events_endpoint: events_endpoint.into(),
            token: None,
            name: None,
            request_timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(3),
            resync_interval: Duration::from_secs(2),
            transport: TransportKind::default(),
            curve: None,
        }
    }
}

/// Everything a client call can fail with.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The broker answered with a typed error.
    #[error("broker refused the request: {0}")]
    Broker(ErrorBody),
    #[error("no reply from the broker at {endpoint} within {timeout:?} ({detail})")]
    Timeout {
        endpoint: String,
        timeout: Duration,
        detail: String,
    },
    /// Nothing answers at the endpoint (refused, unresolvable, unroutable, or not
    /// an endpoint at all), and this client has never reached the broker: calls
    /// fail at once instead of waiting out their timeout. A client that was
    /// connected before keeps retrying instead, as the broker may be restarting.
    #[error(transparent)]
    Unreachable(#[from] crate::probe::Unreachable),
    #[error("the broker sent an unexpected reply: {0}")]
    Unexpected(String),
    #[error("artifact {id} failed its integrity check: expected sha256 {expected}, got {actual}")]
    Integrity {
        id: ArtifactId,
        expected: String,
        actual: String,
    },
    #[error("the client was shut down")]
    Closed,
    /// The broker is of a version without an optional feature this call needs
    /// (absent from its `welcome.features`; docs/protocol.md, "Compatibility").
    #[error("the broker (version {version}) does not support `{feature}`: upgrade it")]
    Unsupported {
        feature: &'static str,
        version: String,
    },
}

impl ClientError {
    /// The broker's error code, when the broker answered.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Broker(e) => Some(e.code),
            _ => None,
        }
    }
}

type ReplyResult = Result<Reply, ClientError>;

struct Call {
    request: Request,
    deadline: Instant,
    reply: oneshot::Sender<ReplyResult>,
}

/// A connection to one broker. Clone it freely; all clones share one DEALER.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    opts: ClientOptions,
    calls: mpsc::Sender<Call>,
    next_req_id: AtomicU64,
    welcome: Arc<Mutex<Option<Welcome>>>,
    hub: OnceCell<mpsc::UnboundedSender<HubCommand>>,
}

/// An artifact's bytes after their sha256 was checked.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub id: ArtifactId,
    pub name: String,
    pub media_type: String,
    pub sha256: String,
    pub data: Vec<u8>,
}

impl Client {
    /// Starts the client. It connects in the background; the first request waits
    /// for the connection (within its timeout).
    pub fn connect(mut opts: ClientOptions) -> Client {
        // Idempotency keys belong to the client name: keep one name across
        // reconnects, so a resent submit finds its first job.
        if opts.name.is_none() {
            let id = uuid::Uuid::new_v4().simple().to_string();
            opts.name = Some(format!("client-{}", &id[..12]));
        }
        let (calls, rx) = mpsc::channel(4096);
        let welcome = Arc::new(Mutex::new(None));
        tokio::spawn(drive(opts.clone(), rx, welcome.clone()));
        Client {
            inner: Arc::new(Inner {
                opts,
                calls,
                next_req_id: AtomicU64::new(1),
                welcome,
                hub: OnceCell::new(),
            }),
        }
    }

    pub fn options(&self) -> &ClientOptions {
        &self.inner.opts
    }

    /// The broker's `welcome` (version, client name, limits) once connected.
    pub fn welcome(&self) -> Option<Welcome> {
        self.inner.welcome.lock().ok()?.clone()
    }

    /// Sends one request and waits for its reply. Errors from the broker come back
    /// as [`ClientError::Broker`].
    pub async fn request(&self, mut request: Request) -> ReplyResult {
        let req_id = self.inner.next_req_id.fetch_add(1, Ordering::Relaxed);
        request.set_req_id(req_id);
        let (tx, rx) = oneshot::channel();
        let call = Call {
            request,
            deadline: Instant::now() + self.inner.opts.request_timeout,
            reply: tx,
        };
        self.inner
            .calls
            .send(call)
            .await
            .map_err(|_| ClientError::Closed)?;
        match rx.await.map_err(|_| ClientError::Closed)? {
            Ok(Reply::Error(e)) => Err(ClientError::Broker(e.error)),
            other => other,
        }
    }

    /// Submits a job. Without an idempotency key one is made up, so that the
    /// client's own resend after a reconnect can never create a second job.
    pub async fn submit(&self, mut job: JobSpec) -> Result<Accepted, ClientError> {
        if job.idempotency_key.is_none() {
            job.idempotency_key = Some(uuid::Uuid::new_v4().to_string());
        }
        match self
            .request(Request::Submit(Submit {
                req_id: 0,
                job,
                client: self.inner.opts.name.clone(),
            }))
            .await?
        {
            Reply::Accepted(a) => Ok(a),
            other => Err(unexpected(other)),
        }
    }

    pub async fn get(&self, job_id: JobId) -> Result<JobSnapshot, ClientError> {
        match self
            .request(Request::Get(Get { req_id: 0, job_id }))
            .await?
        {
            Reply::Job(j) => Ok(j.job),
            other => Err(unexpected(other)),
        }
    }

    /// The first page of matching jobs, newest first (see [`Client::list_page`]).
    pub async fn list(&self, filter: ListFilter) -> Result<Vec<JobSnapshot>, ClientError> {
        Ok(self.list_page(filter, None).await?.jobs)
    }

    /// One page of matching jobs; pass the reply's `next_cursor` to get the next.
    pub async fn list_page(
        &self,
        filter: ListFilter,
        cursor: Option<String>,
    ) -> Result<JobsReply, ClientError> {
        match self
            .request(Request::List(List {
                req_id: 0,
                filter,
                cursor,
            }))
            .await?
        {
            Reply::Jobs(j) => Ok(j),
            other => Err(unexpected(other)),
        }
    }

    pub async fn cancel(&self, job_id: JobId) -> Result<CancelReply, ClientError> {
        match self
            .request(Request::Cancel(Cancel { req_id: 0, job_id }))
            .await?
        {
            Reply::Cancelled(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    /// Submits a new job with the whole stored spec of `job_id` (see
    /// [`Resubmit`]), under this client's name. Like [`Client::submit`], a key is
    /// made up when none is given, so a resend after a reconnect makes one job.
    pub async fn resubmit(
        &self,
        job_id: JobId,
        idempotency_key: Option<String>,
    ) -> Result<Accepted, ClientError> {
        self.require_feature("resubmit").await?;
        let key = idempotency_key.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        match self
            .request(Request::Resubmit(Resubmit {
                req_id: 0,
                job_id,
                idempotency_key: Some(key),
                client: self.inner.opts.name.clone(),
            }))
            .await?
        {
            Reply::Accepted(a) => Ok(a),
            other => Err(unexpected(other)),
        }
    }

    pub async fn workers(&self) -> Result<Vec<WorkerInfo>, ClientError> {
        match self.request(Request::Workers(Simple { req_id: 0 })).await? {
            Reply::Workers(w) => Ok(w.workers),
            other => Err(unexpected(other)),
        }
    }

    pub async fn models(&self) -> Result<Vec<ModelInfo>, ClientError> {
        match self.request(Request::Models(Simple { req_id: 0 })).await? {
            Reply::Models(m) => Ok(m.models),
            other => Err(unexpected(other)),
        }
    }

    pub async fn health(&self) -> Result<HealthReport, ClientError> {
        match self.request(Request::Health(Simple { req_id: 0 })).await? {
            Reply::Health(h) => Ok(h.health),
            other => Err(unexpected(other)),
        }
    }

    /// Fails with [`ClientError::Unsupported`] when the broker's `welcome` does
    /// not announce `feature` (connecting first if no `welcome` came yet), so an
    /// older broker is not sent a request it cannot read.
    pub async fn require_feature(&self, feature: &'static str) -> Result<(), ClientError> {
        if self.welcome().is_none() {
            self.ping().await?;
        }
        match self.welcome() {
            Some(w) if !w.features.iter().any(|f| f == feature) => Err(ClientError::Unsupported {
                feature,
                version: w.version,
            }),
            _ => Ok(()),
        }
    }

    pub async fn ping(&self) -> Result<(), ClientError> {
        match self.request(Request::Ping(Simple { req_id: 0 })).await? {
            Reply::Pong(_) => Ok(()),
            other => Err(unexpected(other)),
        }
    }

    /// Reads one chunk of an artifact.
    pub async fn fetch_chunk(
        &self,
        artifact_id: ArtifactId,
        offset: u64,
        max_len: Option<u64>,
    ) -> Result<Chunk, ClientError> {
        let request = Request::Fetch(Fetch {
            req_id: 0,
            artifact_id,
            offset,
            max_len,
        });
        match self.request(request).await? {
            Reply::Chunk(c) => Ok(c),
            other => Err(unexpected(other)),
        }
    }

    /// Downloads a whole artifact chunk by chunk and checks its sha256.
    pub async fn fetch_artifact(&self, id: ArtifactId) -> Result<Artifact, ClientError> {
        let mut data = Vec::new();
        let mut hasher = Sha256::new();
        loop {
            let chunk = self.fetch_chunk(id, data.len() as u64, None).await?;
            if chunk.offset != data.len() as u64 {
                return Err(ClientError::Unexpected(format!(
                    "chunk at offset {} while {} bytes were read",
                    chunk.offset,
                    data.len()
                )));
            }
            hasher.update(&chunk.data);
            data.extend_from_slice(&chunk.data);
            if chunk.eof || data.len() as u64 >= chunk.total {
                let actual = hex(&hasher.finalize());
                if actual != chunk.sha256 || data.len() as u64 != chunk.total {
                    return Err(ClientError::Integrity {
                        id,
                        expected: chunk.sha256,
                        actual,
                    });
                }
                return Ok(Artifact {
                    id,
                    name: chunk.name,
                    media_type: chunk.media_type,
                    sha256: chunk.sha256,
                    data,
                });
            }
            if chunk.data.is_empty() {
                return Err(ClientError::Unexpected("empty chunk before eof".into()));
            }
        }
    }

    /// Receives every event whose topic starts with `prefix` (`job/`, `job/j4/`,
    /// `worker/`). Events are lossy; use [`Client::follow`] for a job's state.
    pub async fn subscribe(&self, prefix: &str) -> Result<EventStream, ClientError> {
        let hub = self
            .inner
            .hub
            .get_or_init(|| async { start_hub(&self.inner.opts) })
            .await
            .clone();
        let (tx, rx) = mpsc::channel(1024);
        let (done_tx, done_rx) = oneshot::channel();
        let id = self.inner.next_req_id.fetch_add(1, Ordering::Relaxed);
        hub.send(HubCommand::Subscribe {
            id,
            prefix: prefix.to_string(),
            events: tx,
            done: done_tx,
        })
        .map_err(|_| ClientError::Closed)?;
        // The hub acknowledges once the subscription went out (or at once if it is
        // still connecting; `follow` copes with either by resyncing).
        let _ = done_rx.await;
        Ok(EventStream { id, rx, hub })
    }

    /// Follows one job to its end: yields its snapshot, then an updated snapshot on
    /// every event, and ends after the terminal state. Survives lost events and a
    /// broker restart.
    pub async fn follow(&self, job_id: JobId) -> Result<Follow, ClientError> {
        let events = self.subscribe(&Topic::job(job_id)).await?;
        Ok(Follow {
            client: self.clone(),
            job_id,
            events,
            current: None,
            finished: false,
        })
    }

    /// Follows a job to its end and returns the final snapshot.
    pub async fn wait(&self, job_id: JobId) -> Result<JobSnapshot, ClientError> {
        let mut follow = self.follow(job_id).await?;
        let mut last = None;
        while let Some(snapshot) = follow.next().await {
            last = Some(snapshot?);
        }
        last.ok_or(ClientError::Closed)
    }
}

fn unexpected(reply: Reply) -> ClientError {
    ClientError::Unexpected(format!("{reply:?}").chars().take(200).collect())
}

/// Lowercase hex of bytes: digests, and routing ids in logs.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// How many times in a row a call may be resent after a fresh `hello` before the
/// broker's `unauthenticated` is passed to the caller.
const MAX_REAUTHS: u32 = 3;

/// The DEALER's owner: sends calls, matches replies, reconnects, resends.
async fn drive(
    opts: ClientOptions,
    mut calls: mpsc::Receiver<Call>,
    welcome: Arc<Mutex<Option<Welcome>>>,
) {
    let mut pending: HashMap<u64, Call> = HashMap::new();
    let mut conn: Option<Dealer> = None;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let mut retry_at = Instant::now();
    let mut last_error = String::from("not connected yet");
    let mut calls_open = true;
    // Logins repeated because the broker answered `unauthenticated` since the
    // last answered call; bounded so a broker that keeps forgetting cannot spin us.
    let mut reauths = 0u32;

    loop {
        let now = Instant::now();
        expire(&mut pending, now, &opts, &last_error);
        if !calls_open && pending.is_empty() {
            return;
        }
        if conn.is_none() && now >= retry_at && (calls_open || !pending.is_empty()) {
            match connect_and_hello(&opts).await {
                Ok((mut c, w)) => {
                    if let Ok(mut slot) = welcome.lock() {
                        *slot = Some(w);
                    }
                    backoff.reset();
                    let mut ok = true;
                    for call in pending.values() {
                        if c.send(frame::encode(&call.request)).await.is_err() {
                            ok = false;
                            break;
                        }
                    }
                    if ok {
                        conn = Some(c);
                    } else {
                        retry_at = Instant::now() + backoff.next_delay();
                    }
                }
                Err(e) => {
                    last_error = e.to_string();
                    let never_connected = welcome.lock().map_or(true, |w| w.is_none());
                    let definitive = match &e {
                        // Refused (bad token): every waiting call gets the refusal.
                        ClientError::Broker(_) => true,
                        ClientError::Unreachable(_) => never_connected,
                        _ => false,
                    };
                    if definitive {
                        for (_, call) in pending.drain() {
                            let _ = call.reply.send(Err(e.clone()));
                        }
                    }
                    retry_at = Instant::now() + backoff.next_delay();
                }
            }
            continue;
        }

        let wake = pending
            .values()
            .map(|c| c.deadline)
            .min()
            .into_iter()
            .chain(conn.is_none().then_some(retry_at))
            .min()
            .unwrap_or_else(|| now + Duration::from_secs(3600));

        tokio::select! {
            call = calls.recv(), if calls_open => match call {
                None => calls_open = false,
                Some(call) => {
                    let req_id = call.request.req_id();
                    if conn.is_none() && welcome.lock().map_or(true, |w| w.is_none()) {
                        // Never connected: try now, so a broker that is down is
                        // reported at once and one that just came up is used.
                        retry_at = Instant::now();
                    }
                    if let Some(c) = conn.as_mut() {
                        if let Err(e) = c.send(frame::encode(&call.request)).await {
                            last_error = format!("send failed: {e}");
                            conn = None;
                            retry_at = Instant::now();
                        }
                    }
                    pending.insert(req_id, call);
                }
            },
            incoming = next_incoming(&mut conn) => match incoming {
                Incoming::Frames(frames) => match frame::decode::<Reply>(&frames, usize::MAX) {
                    Ok(Reply::Error(e))
                        if e.error.code == ErrorCode::Unauthenticated
                            && reauths < MAX_REAUTHS
                            && e.req_id.is_some_and(|id| pending.contains_key(&id)) =>
                    {
                        // The broker no longer knows this connection's session (it
                        // restarted, or the transport reconnected underneath): log in
                        // again on a fresh connection and resend what is waiting. A
                        // wrong token ends there, refused by `hello` itself.
                        reauths += 1;
                        tracing::info!("the broker forgot this client's session; saying hello again");
                        last_error = "the broker asked for hello again".into();
                        conn = None;
                        retry_at = Instant::now();
                    }
                    Ok(reply) => {
                        if let Some(call) = reply.req_id().and_then(|id| pending.remove(&id)) {
                            reauths = 0;
                            let _ = call.reply.send(Ok(reply));
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "undecodable reply from broker"),
                },
                Incoming::Error(e) => tracing::debug!(error = %e, "receive error; continuing"),
                Incoming::Lost => {
                    last_error = "connection to the broker was lost".into();
                    conn = None;
                    retry_at = Instant::now();
                }
            },
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

async fn next_incoming(conn: &mut Option<Dealer>) -> Incoming {
    match conn {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

fn expire(pending: &mut HashMap<u64, Call>, now: Instant, opts: &ClientOptions, why: &str) {
    let expired: Vec<u64> = pending
        .iter()
        .filter(|(_, c)| c.deadline <= now)
        .map(|(id, _)| *id)
        .collect();
    for id in expired {
        if let Some(call) = pending.remove(&id) {
            let _ = call.reply.send(Err(ClientError::Timeout {
                endpoint: opts.endpoint.clone(),
                timeout: opts.request_timeout,
                detail: why.to_string(),
            }));
        }
    }
}

/// Connects a fresh DEALER and introduces the client with `hello`.
async fn connect_and_hello(opts: &ClientOptions) -> Result<(Dealer, Welcome), ClientError> {
    let timeout = |detail: String| ClientError::Timeout {
        endpoint: opts.endpoint.clone(),
        timeout: opts.connect_timeout,
        detail,
    };
    crate::probe::probe(&opts.endpoint, opts.connect_timeout).await?;
    let mut conn = Dealer::connect(opts.transport, &opts.endpoint, connect_options(opts))
        .await
        .map_err(|e| timeout(format!("connect failed: {e}")))?;
    let hello = Request::Hello(Hello {
        req_id: 0,
        token: opts.token.clone(),
        client: opts.name.clone(),
    });
    conn.send(frame::encode(&hello))
        .await
        .map_err(|e| timeout(format!("send failed: {e}")))?;
    let deadline = Instant::now() + opts.connect_timeout;
    loop {
        let incoming = tokio::time::timeout_at(deadline, conn.next())
            .await
            .map_err(|_| timeout("no welcome from the broker".into()))?;
        match incoming {
            Incoming::Frames(frames) => match frame::decode::<Reply>(&frames, usize::MAX) {
                Ok(Reply::Welcome(w)) => return Ok((conn, w)),
                Ok(Reply::Error(e)) if e.req_id == Some(0) => {
                    return Err(ClientError::Broker(e.error))
                }
                // The answer to our hello that this client cannot read: say why
                // rather than waiting for a welcome that has come.
                Err(e)
                    if frames
                        .get(1)
                        .and_then(|b| frame::peek_envelope(b))
                        .is_some_and(|env| {
                            env.req_id == Some(0) && env.kind.as_deref() == Some("welcome")
                        }) =>
                {
                    return Err(timeout(format!(
                        "the broker's welcome does not decode: {e}"
                    )))
                }
                // A late reply to a request of an earlier connection: not ours now.
                _ => continue,
            },
            Incoming::Error(_) => continue,
            Incoming::Lost => return Err(timeout("connection lost during hello".into())),
        }
    }
}

fn connect_options(opts: &ClientOptions) -> ConnectOptions {
    ConnectOptions {
        identity: None,
        connect_timeout: opts.connect_timeout,
        curve: opts.curve.clone(),
        ..ConnectOptions::default()
    }
}

enum HubCommand {
    Subscribe {
        id: u64,
        prefix: String,
        events: mpsc::Sender<Event>,
        done: oneshot::Sender<()>,
    },
    Unsubscribe {
        id: u64,
    },
}

/// Events under one topic prefix. Dropping it unsubscribes.
pub struct EventStream {
    id: u64,
    rx: mpsc::Receiver<Event>,
    hub: mpsc::UnboundedSender<HubCommand>,
}

impl EventStream {
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let _ = self.hub.send(HubCommand::Unsubscribe { id: self.id });
    }
}

fn start_hub(opts: &ClientOptions) -> mpsc::UnboundedSender<HubCommand> {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(run_hub(
        opts.transport,
        opts.events_endpoint.clone(),
        connect_options(opts),
        rx,
    ));
    tx
}

/// Owns the SUB socket (which, unlike DEALER, reconnects by itself) and fans events
/// out to subscribers by topic prefix.
async fn run_hub(
    kind: TransportKind,
    endpoint: String,
    copts: ConnectOptions,
    mut commands: mpsc::UnboundedReceiver<HubCommand>,
) {
    if endpoint.is_empty() {
        // No events port: subscriptions are accepted and stay silent, so `follow`
        // keeps the job current from `get` snapshots alone.
        let mut open = Vec::new();
        while let Some(cmd) = commands.recv().await {
            match cmd {
                HubCommand::Subscribe {
                    id, events, done, ..
                } => {
                    open.push((id, events));
                    let _ = done.send(());
                }
                HubCommand::Unsubscribe { id } => open.retain(|(i, _)| *i != id),
            }
        }
        return;
    }
    struct Listener {
        id: u64,
        prefix: String,
        events: mpsc::Sender<Event>,
    }
    let mut subscribers: Vec<Listener> = Vec::new();
    let mut early: Vec<HubCommand> = Vec::new();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    // Subscriptions made while connecting are applied once connected; their callers
    // are released at once and rely on snapshots meanwhile.
    let mut sub = loop {
        tokio::select! {
            res = Subscriber::connect(kind, &endpoint, copts.clone()) => match res {
                Ok(sub) => break sub,
                Err(e) => {
                    tracing::debug!(error = %e, %endpoint, "event socket connect failed; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            },
            cmd = commands.recv() => match cmd {
                None => return,
                Some(HubCommand::Subscribe { id, prefix, events, done }) => {
                    let _ = done.send(());
                    early.push(HubCommand::Subscribe { id, prefix, events, done: oneshot::channel().0 });
                }
                Some(other) => early.push(other),
            },
        }
    };

    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut pending_cmds: std::collections::VecDeque<HubCommand> = early.into();
    loop {
        let cmd = match pending_cmds.pop_front() {
            Some(c) => Some(c),
            None => {
                tokio::select! {
                    cmd = commands.recv() => match cmd {
                        None => return,
                        Some(c) => Some(c),
                    },
                    msg = sub.recv() => {
                        if let Ok(frames) = msg {
                            dispatch(&frames, &subscribers);
                        }
                        None
                    }
                }
            }
        };
        match cmd {
            Some(HubCommand::Subscribe {
                id,
                prefix,
                events,
                done,
            }) => {
                let count = counts.entry(prefix.clone()).or_insert(0);
                if *count == 0 {
                    if let Err(e) = sub.subscribe(&prefix).await {
                        tracing::warn!(error = %e, "subscribe failed");
                    }
                }
                *count += 1;
                subscribers.push(Listener { id, prefix, events });
                let _ = done.send(());
            }
            Some(HubCommand::Unsubscribe { id }) => {
                if let Some(pos) = subscribers.iter().position(|s| s.id == id) {
                    let s = subscribers.swap_remove(pos);
                    if let Some(count) = counts.get_mut(&s.prefix) {
                        *count -= 1;
                        if *count == 0 {
                            counts.remove(&s.prefix);
                            let _ = sub.unsubscribe(&s.prefix).await;
                        }
                    }
                }
            }
            None => {}
        }
    }

    fn dispatch(frames: &[Bytes], subscribers: &[Listener]) {
        if frames.len() != 3 || check_header(&frames[1]).is_err() {
            return;
        }
        let Ok(topic) = std::str::from_utf8(&frames[0]) else {
            return;
        };
        let Ok(event) = frame::decode_body::<Event>(&frames[2], usize::MAX) else {
            return;
        };
        for s in subscribers.iter() {
            if topic.starts_with(&s.prefix) {
                // A full subscriber loses the event; its follower resyncs.
                let _ = s.events.try_send(event.clone());
            }
        }
    }
}

/// A reliable view of one job; see [`Client::follow`].
pub struct Follow {
    client: Client,
    job_id: JobId,
    events: EventStream,
    current: Option<JobSnapshot>,
    finished: bool,
}

impl Follow {
    pub fn job_id(&self) -> JobId {
        self.job_id
    }

    /// The next snapshot of the job, `None` after the terminal one.
    pub async fn next(&mut self) -> Option<Result<JobSnapshot, ClientError>> {
        if self.finished {
            return None;
        }
        let Some(current) = self.current.as_ref() else {
            return Some(self.resync().await);
        };
        let mut seen = current.seq;
        loop {
            let resync = self.client.inner.opts.resync_interval;
            match tokio::time::timeout(resync, self.events.recv()).await {
                Ok(Some(event)) => {
                    let Some(seq) = event.seq() else { continue };
                    if seq <= seen {
                        continue; // already reflected in the snapshot
                    }
                    let current = self.current.as_mut().expect("set above");
                    let terminal = matches!(&event, Event::JobState(e) if e.state.is_terminal());
                    if seq == seen + 1 && !terminal {
                        apply(current, event);
                        return Some(Ok(current.clone()));
                    }
                    // A gap, or the end: the broker's snapshot is authoritative.
                    match self.client.get(self.job_id).await {
                        Ok(snap) if snap.seq > seen => return Some(Ok(self.accept(snap))),
                        Ok(_) => seen = seq.max(seen),
                        Err(e) => return Some(Err(e)),
                    }
                }
                Ok(None) | Err(_) => match self.client.get(self.job_id).await {
                    Ok(snap) if snap.seq > seen => return Some(Ok(self.accept(snap))),
                    Ok(_) => {}
                    Err(e) if e.code() == Some(ErrorCode::NotFound) => {
                        self.finished = true;
                        return Some(Err(e));
                    }
                    Err(e) => return Some(Err(e)),
                },
            }
        }
    }

    async fn resync(&mut self) -> Result<JobSnapshot, ClientError> {
        match self.client.get(self.job_id).await {
            Ok(snap) => Ok(self.accept(snap)),
            Err(e) => {
                if e.code() == Some(ErrorCode::NotFound) {
                    self.finished = true;
                }
                Err(e)
            }
        }
    }

    fn accept(&mut self, snap: JobSnapshot) -> JobSnapshot {
        if snap.state.is_terminal() {
            self.finished = true;
        }
        self.current = Some(snap.clone());
        snap
    }
}

/// Folds a non-terminal event into a snapshot.
fn apply(snap: &mut JobSnapshot, event: Event) {
    match event {
        Event::JobProgress(e) => {
            snap.seq = e.seq;
            snap.attempt = e.attempt;
            snap.worker = Some(e.worker.to_string());
            if !e.gpu.is_empty() {
                snap.gpu = Some(e.gpu.to_string());
            }
            snap.progress = Some(e.progress);
        }
        Event::JobState(e) => {
            snap.seq = e.seq;
            if e.state != snap.state && e.state == JobState::Queued {
                snap.progress = None;
            }
            snap.state = e.state;
            snap.attempt = e.attempt;
            snap.worker = e.worker.as_deref().map(str::to_string);
            snap.error = e.error;
            snap.cancel_requested = e.cancel_requested;
            if !e.artifacts.is_empty() {
                snap.artifacts = e.artifacts;
            }
        }
        Event::WorkerState(_) => {}
    }
}
