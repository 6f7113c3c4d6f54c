//! Client requests: authentication, submit, get, list, cancel, fetch and the
//! read-only views (workers, models, health).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use kiln_protocol::ids::check_simple_name;
use kiln_protocol::request::*;
use kiln_protocol::worker::{BrokerMessage, HealthReport, JobRef, ModelInfo};
use kiln_protocol::{
    Backend, ErrorBody, ErrorCode, JobId, JobSnapshot, JobSpec, JobState, ListFilter,
    ProtocolError, Reply, Request,
};

use super::job::Job;
use super::params_check::Refusal;
use super::queue::Requirements;
use super::registry::PeerId;
use super::{ArtifactOp, Core, Output, Record, Session, TimerKind};
use kiln_protocol::auth::token_matches;

/// Refused connections remembered at most; beyond this the set starts over (a
/// refused peer then gets one more error, never any service).
const MAX_REFUSED: usize = 100_000;

fn reply(out: &mut Vec<Output>, peer: PeerId, reply: Reply) {
    out.push(Output::Reply { peer, reply });
}

fn error(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
    ErrorBody::new(code, message)
}

impl Core {
    pub(super) fn on_bad_request(
        &mut self,
        now_ms: u64,
        peer: PeerId,
        req_id: Option<u64>,
        err: ProtocolError,
        out: &mut Vec<Output>,
    ) {
        self.stats.protocol_errors += 1;
        if self.refused.contains(&peer) {
            return;
        }
        if self.cfg.client_token.is_some() && !self.sessions.contains_key(&peer) {
            // Strangers learn nothing about what they sent, only that they must
            // authenticate.
            self.refuse(peer, req_id, out);
            return;
        }
        if let Some(s) = self.sessions.get_mut(&peer) {
            s.last_seen_ms = now_ms;
        }
        tracing::debug!(error = %err, "refused a malformed request");
        reply(out, peer, Reply::error(req_id, err));
    }

    fn refuse(&mut self, peer: PeerId, req_id: Option<u64>, out: &mut Vec<Output>) {
        if self.refused.len() >= MAX_REFUSED {
            self.refused.clear();
        }
        self.refused.insert(peer.clone());
        tracing::warn!("refused an unauthenticated client connection");
        reply(
            out,
            peer,
            Reply::error(
                req_id,
                error(
                    ErrorCode::Unauthenticated,
                    "send `hello` with a valid token first",
                ),
            ),
        );
    }

    pub(super) fn on_request(
        &mut self,
        now_ms: u64,
        peer: PeerId,
        request: Request,
        out: &mut Vec<Output>,
    ) {
        let req_id = request.req_id();
        if !self.sessions.contains_key(&peer) {
            // A refused connection stays quiet until it says `hello`; a `hello` is
            // always judged, so a peer refused once (say, by a broker that had
            // just restarted) can authenticate later.
            let hello = matches!(request, Request::Hello(_));
            if self.refused.contains(&peer) && !hello {
                self.stats.protocol_errors += 1;
                return;
            }
            let authenticated = match (&self.cfg.client_token, &request) {
                (None, _) => true,
                (Some(expected), Request::Hello(h)) => token_matches(h.token.as_deref(), expected),
                (Some(_), _) => false,
            };
            if !authenticated {
                self.stats.protocol_errors += 1;
                self.refuse(peer, Some(req_id), out);
                return;
            }
            self.refused.remove(&peer);
            let name = default_client_name(&peer);
            let name = self.client_name(&name);
            self.sessions.insert(
                peer.clone(),
                Session {
                    name,
                    last_seen_ms: now_ms,
                },
            );
        }
        let session = self.sessions.get_mut(&peer).expect("session ensured above");
        session.last_seen_ms = now_ms;
        let client = session.name.clone();
        let named = match &request {
            Request::Submit(s) => s.client.as_deref(),
            Request::Resubmit(r) => r.client.as_deref(),
            _ => None,
        };
        if let Some(Err(err)) =
            named.map(|n| check_simple_name("client", n, self.cfg.limits.max_label_len))
        {
            // Not a name `hello` could have taken: a mistake, not a lost login.
            reply(out, peer, Reply::error(Some(req_id), err));
            return;
        }
        if let Some(named) = named.filter(|n| *n != &*client) {
            // The client said `hello` as `named`, but this broker has this
            // connection under another name: it restarted and forgot the login
            // (without a token nothing else tells the client). Filing the job
            // under `client` would make its idempotency key miss.
            let message = format!(
                "this connection is not logged in as {named:?} (a broker restart forgets logins): open a new connection and say `hello` again, then resend"
            );
            reply(
                out,
                peer,
                Reply::error(Some(req_id), error(ErrorCode::Unauthenticated, message)),
            );
            return;
        }

        if let Some(cause) = &self.store_fault {
            if matches!(
                request,
                Request::Submit(_) | Request::Cancel(_) | Request::Resubmit(_)
            ) {
                let message = format!(
                    "the broker cannot write its job store ({cause}); jobs already accepted are kept, and writes resume by themselves once the store can write again"
                );
                reply(
                    out,
                    peer,
                    Reply::error(Some(req_id), error(ErrorCode::Unavailable, message)),
                );
                return;
            }
        }
        match request {
            Request::Hello(h) => {
                if let Some(name) = &h.client {
                    if let Err(err) =
                        check_simple_name("client", name, self.cfg.limits.max_label_len)
                    {
                        reply(out, peer, Reply::error(Some(req_id), err));
                        return;
                    }
                    let name = self.client_name(name);
                    self.sessions.get_mut(&peer).expect("present").name = name;
                }
                let client = self.sessions[&peer].name.to_string();
                let welcome = Welcome {
                    req_id,
                    version: kiln_protocol::VERSION.to_string(),
                    client,
                    limits: self.cfg.limits.clone(),
                    features: FEATURES.iter().map(|f| f.to_string()).collect(),
                };
                reply(out, peer, Reply::Welcome(welcome));
            }
            Request::Submit(s) => {
                let r = self.submit(now_ms, client, req_id, s.job, "submitted", out);
                reply(out, peer, r);
            }
            Request::Get(g) => {
                let r = match self.jobs.get(&g.job_id) {
                    Some(job) => {
                        let mut snap = job.snapshot(true);
                        snap.queue_position = self.queue_position(job);
                        snap.waiting = self.waiting(job);
                        Reply::Job(Box::new(JobReply { req_id, job: snap }))
                    }
                    None => not_found(req_id, g.job_id),
                };
                reply(out, peer, r);
            }
            Request::List(l) => {
                let r = match self.list(&l.filter, l.cursor.as_deref()) {
                    Ok((jobs, next_cursor)) => Reply::Jobs(JobsReply {
                        req_id,
                        jobs,
                        next_cursor,
                    }),
                    Err(e) => Reply::error(Some(req_id), e),
                };
                reply(out, peer, r);
            }
            Request::Cancel(c) => self.cancel(now_ms, peer, req_id, c.job_id, out),
            Request::Resubmit(r) => match self.jobs.get(&r.job_id) {
                Some(job) => {
                    let mut spec = JobSpec::clone(&job.spec);
                    spec.idempotency_key = r.idempotency_key;
                    let note = format!("resubmitted from {}", r.job_id);
                    let mut r = self.submit(now_ms, client, req_id, spec, note, out);
                    // The key is the request's own field here, not the job's.
                    if let Reply::Error(e) = &mut r {
                        if e.error.field.as_deref() == Some("job.idempotency_key") {
                            e.error.field = Some("idempotency_key".into());
                            e.error.message = e
                                .error
                                .message
                                .replace("job.idempotency_key", "idempotency_key");
                        }
                    }
                    reply(out, peer, r);
                }
                None => reply(out, peer, not_found(req_id, r.job_id)),
            },
            Request::Fetch(f) => self.fetch(peer, req_id, f, out),
            Request::Workers(_) => {
                let mut workers: Vec<_> = self.workers.iter().map(|(_, w)| w.info()).collect();
                workers.sort_by(|a, b| a.worker_id.cmp(&b.worker_id));
                reply(out, peer, Reply::Workers(WorkersReply { req_id, workers }));
            }
            Request::Models(_) => {
                let models = self.models();
                reply(out, peer, Reply::Models(ModelsReply { req_id, models }));
            }
            Request::Health(_) => {
                let health = self.health(now_ms);
                reply(out, peer, Reply::Health(HealthReply { req_id, health }));
            }
            Request::Ping(_) => reply(out, peer, Reply::Pong(Simple { req_id })),
        }
    }

    /// Accepts `spec` as a new job of `client` (`note` starts its history), or
    /// refuses it; the reply to send, after everything the job's acceptance put in
    /// `out`.
    fn submit(
        &mut self,
        now_ms: u64,
        client: std::sync::Arc<str>,
        req_id: u64,
        spec: JobSpec,
        note: impl Into<std::borrow::Cow<'static, str>>,
        out: &mut Vec<Output>,
    ) -> Reply {
        if let Err(e) = spec.validate(&self.cfg.limits) {
            self.stats.protocol_errors += 1;
            return Reply::error(Some(req_id), e);
        }
        if let Some(key) = &spec.idempotency_key {
            if let Some(&id) = self.idempotency.get(&(client.clone(), key.clone())) {
                let r = match self.jobs.get(&id) {
                    Some(job) if *job.spec != spec => Reply::error(
                        Some(req_id),
                        idempotency_conflict(key, id, &job.spec, &spec),
                    ),
                    job => Reply::Accepted(Accepted {
                        req_id,
                        job_id: id,
                        duplicate: true,
                        state: job.map_or(JobState::Queued, |j| j.state),
                    }),
                };
                return r;
            }
        }
        let req = Requirements::of(&spec, spec.min_vram_mb.unwrap_or(0));
        if let Err((field, why)) = self.fleet_can_run(now_ms, &req) {
            let mut body = error(ErrorCode::Unschedulable, why);
            body.field = field.map(str::to_string);
            return Reply::error(Some(req_id), body);
        }
        match self.check_described(now_ms, &req, &spec) {
            Ok(()) => {}
            Err(Refusal::Missing { field, what }) => {
                let why = format!(
                    "{what} is not installed on any {} worker that could run the job",
                    spec.backend
                );
                let mut body = error(ErrorCode::Unschedulable, why);
                body.field = Some(field);
                return Reply::error(Some(req_id), body);
            }
            Err(Refusal::Params(e)) => {
                self.stats.protocol_errors += 1;
                return Reply::error(Some(req_id), e);
            }
        }
        let queued = self.queued_per_client.get(&client).copied().unwrap_or(0);
        if queued >= self.cfg.limits.max_queued_per_client {
            let mut body = error(
                ErrorCode::QueueFull,
                format!(
                    "client {client} already has {queued} queued jobs, the limit is {}",
                    self.cfg.limits.max_queued_per_client
                ),
            );
            body.limit = Some(self.cfg.limits.max_queued_per_client);
            return Reply::error(Some(req_id), body);
        }

        let id = JobId(self.next_job_id);
        self.next_job_id += 1;
        let enqueue_seq = self.next_enqueue_seq;
        self.next_enqueue_seq += 1;
        let queue_timeout = spec
            .queue_timeout_s
            .unwrap_or(self.cfg.default_queue_timeout_s);
        let queue_deadline_ms = (queue_timeout > 0).then(|| now_ms + queue_timeout as u64 * 1000);
        let max_attempts = spec.attempts_allowed(self.cfg.default_max_attempts) as u32;
        if let Some(key) = &spec.idempotency_key {
            self.idempotency.insert((client.clone(), key.clone()), id);
        }
        let mut job = Job::new(id, std::sync::Arc::new(spec), client);
        job.max_attempts = max_attempts;
        job.min_vram_mb = req.min_vram_mb;
        job.seq = self.seq_floor;
        job.created_ms = now_ms;
        job.enqueue_seq = enqueue_seq;
        job.queue_deadline_ms = queue_deadline_ms;
        if self.cfg.persist {
            out.push(Output::Persist(Record::Spec {
                id,
                bytes: job.spec_record(),
            }));
        }
        self.jobs.insert(id, Box::new(job));
        self.stats.submitted += 1;
        self.change(now_ms, id, JobState::Queued, note, out);
        if let Some(at) = queue_deadline_ms {
            self.add_timer(at, TimerKind::QueueTimeout, id, 0);
        }
        self.enqueue(now_ms, id, out);
        let state = self.jobs[&id].state;
        Reply::Accepted(Accepted {
            req_id,
            job_id: id,
            duplicate: false,
            state,
        })
    }

    /// Whether any worker the broker knows (online, or offline for less than the
    /// fleet memory) could run jobs with these requirements; if not, why not, in
    /// terms an operator can act on.
    /// Whether some worker of the fleet could run a job with `req`; if none, the
    /// spec field at fault (`job.backend`, `job.model`, `job.min_vram_mb`,
    /// `job.labels`; none when no worker has registered) and why.
    pub(super) fn fleet_can_run(
        &self,
        now_ms: u64,
        req: &Requirements,
    ) -> Result<(), (Option<&'static str>, String)> {
        let in_fleet = |w: &&super::Worker| self.in_fleet(now_ms, w);
        // The common case, without collecting anything: some worker fits.
        let mut fleet = self.workers.iter().map(|(_, w)| w).filter(in_fleet);
        if fleet.any(|w| w.can_run(req)) {
            return Ok(());
        }
        // Refused: work out why, in terms an operator can act on.
        let fleet: Vec<_> = self
            .workers
            .iter()
            .map(|(_, w)| w)
            .filter(in_fleet)
            .collect();
        if fleet.is_empty() {
            return Err((None, "no workers have registered with this broker".into()));
        }
        let with_backend: Vec<_> = fleet
            .iter()
            .filter(|w| w.backends.iter().any(|b| b.backend == req.backend))
            .collect();
        if with_backend.is_empty() {
            let mut offered: Vec<Backend> = fleet
                .iter()
                .flat_map(|w| w.backends.iter().map(|b| b.backend))
                .collect();
            offered.sort();
            offered.dedup();
            let offered: Vec<&str> = offered.iter().map(|b| b.as_str()).collect();
            return Err((
                Some("job.backend"),
                format!(
                    "no worker offers backend {}; the fleet offers {}",
                    req.backend,
                    offered.join(", ")
                ),
            ));
        }
        let mut why = String::new();
        if let Some(model) = &req.model {
            let has_model: Vec<_> = with_backend
                .iter()
                .filter(|w| {
                    w.can_run(&Requirements {
                        model: Some(model.clone()),
                        min_vram_mb: 0,
                        labels: vec![],
                        backend: req.backend,
                    })
                })
                .collect();
            if has_model.is_empty() {
                let _ = write!(
                    why,
                    "model {model:?} is not installed on any {} worker",
                    req.backend
                );
                return Err((Some("job.model"), why));
            }
        }
        let largest = with_backend
            .iter()
            .max_by_key(|w| w.gpu.total_vram_mb)
            .expect("non-empty");
        if largest.gpu.total_vram_mb < req.min_vram_mb {
            return Err((
                Some("job.min_vram_mb"),
                format!(
                    "needs {} MiB of GPU memory; the largest {} GPU has {} MiB ({} on {})",
                    req.min_vram_mb,
                    req.backend,
                    largest.gpu.total_vram_mb,
                    largest.gpu.name,
                    largest.id
                ),
            ));
        }
        if !req.labels.is_empty()
            && !with_backend
                .iter()
                .any(|w| req.labels.iter().all(|l| w.labels.contains(l)))
        {
            return Err((
                Some("job.labels"),
                format!(
                    "no {} worker carries all of the labels [{}]",
                    req.backend,
                    req.labels.join(", ")
                ),
            ));
        }
        Err((
            None,
            format!(
                "no single {} worker has the model, memory and labels together",
                req.backend
            ),
        ))
    }

    fn cancel(&mut self, now_ms: u64, peer: PeerId, req_id: u64, id: JobId, out: &mut Vec<Output>) {
        let Some(job) = self.jobs.get_mut(&id) else {
            reply(out, peer, not_found(req_id, id));
            return;
        };
        let state = match job.state {
            JobState::Queued => {
                self.end_queued(now_ms, id, JobState::Cancelled, None, out);
                JobState::Cancelled
            }
            JobState::Running => {
                if !job.cancel_requested {
                    job.cancel_requested = true;
                    let attempt = job.attempt;
                    let worker = job.worker.clone();
                    if let Some(peer) = worker
                        .and_then(|w| self.workers.by_id(&w))
                        .and_then(|idx| self.workers.get(idx).peer.clone())
                    {
                        out.push(Output::ToWorker {
                            peer,
                            msg: BrokerMessage::Cancel(JobRef {
                                job_id: id,
                                attempt,
                            }),
                        });
                    }
                    self.publish_job(now_ms, id, "cancel requested".into(), out);
                    let grace = self.cfg.cancel_grace_ms;
                    self.add_timer(now_ms + grace, TimerKind::CancelGrace, id, attempt);
                }
                JobState::Running
            }
            JobState::Cancelled => JobState::Cancelled,
            done @ (JobState::Succeeded | JobState::Failed) => {
                let body = error(
                    ErrorCode::InvalidState,
                    format!("job {id} already {done}; nothing to cancel"),
                );
                reply(out, peer, Reply::error(Some(req_id), body));
                return;
            }
        };
        reply(
            out,
            peer,
            Reply::Cancelled(CancelReply {
                req_id,
                job_id: id,
                state,
            }),
        );
    }

    fn fetch(&mut self, peer: PeerId, req_id: u64, f: Fetch, out: &mut Vec<Output>) {
        let meta = self
            .jobs
            .get(&f.artifact_id.job)
            .and_then(|j| j.artifacts.iter().find(|a| a.id == f.artifact_id));
        let Some(meta) = meta else {
            let body = error(
                ErrorCode::NotFound,
                format!("no artifact {}", f.artifact_id),
            );
            reply(out, peer, Reply::error(Some(req_id), body));
            return;
        };
        if f.offset > meta.size {
            let err = ProtocolError::invalid(
                "offset",
                format!(
                    "{} is past the end of a {}-byte artifact",
                    f.offset, meta.size
                ),
            );
            reply(out, peer, Reply::error(Some(req_id), err));
            return;
        }
        let max = self.cfg.limits.max_chunk_bytes;
        if f.max_len == Some(0) {
            let err = ProtocolError::invalid(
                "max_len",
                format!(
                    "must be at least 1 (a larger one is capped at max_chunk_bytes = {max}), got 0"
                ),
            );
            reply(out, peer, Reply::error(Some(req_id), err));
            return;
        }
        // Larger requests get a chunk of the limit, as documented.
        let len = f.max_len.unwrap_or(max).min(max).min(meta.size - f.offset);
        out.push(Output::Artifact(ArtifactOp::Read {
            peer,
            req_id,
            meta: meta.clone(),
            offset: f.offset,
            len,
        }));
    }

    /// One page of matching jobs, newest first, and the cursor of the next page
    /// when there are more. The cursor is the id of the last job returned (opaque
    /// to clients): the next page holds older jobs only, so jobs submitted while a
    /// client pages never shift or repeat what it sees.
    fn list(
        &self,
        filter: &ListFilter,
        cursor: Option<&str>,
    ) -> Result<(Vec<JobSnapshot>, Option<String>), ProtocolError> {
        let before = match cursor {
            None => None,
            Some(c) => {
                // A cursor is a job id this broker handed out: one it never
                // assigned is not from a reply.
                let id = c.parse::<JobId>().ok().filter(|id| id.0 < self.next_job_id);
                Some(id.ok_or_else(|| {
                    ProtocolError::invalid(
                        "cursor",
                        "not a cursor from a `jobs` reply's next_cursor",
                    )
                })?)
            }
        };
        if filter.limit == Some(0) {
            return Err(ProtocolError::invalid(
                "filter.limit",
                format!(
                    "must be at least 1 (a larger one is capped at max_list = {}), got 0",
                    self.cfg.limits.max_list
                ),
            ));
        }
        let limit = filter
            .limit
            .unwrap_or(self.cfg.limits.max_list)
            .min(self.cfg.limits.max_list) as usize;
        let mut matching: Vec<&Job> = self
            .jobs
            .values()
            .map(|j| &**j)
            .filter(|j| before.is_none_or(|b| j.id < b))
            .filter(|j| filter.states.is_empty() || filter.states.contains(&j.state))
            .filter(|j| filter.backend.is_none_or(|b| j.spec.backend == b))
            .filter(|j| filter.client.as_deref().is_none_or(|c| &*j.client == c))
            .filter(|j| {
                filter
                    .worker
                    .as_deref()
                    .is_none_or(|w| j.worker.as_deref() == Some(w))
            })
            .collect();
        // Newest first; select before sorting so a huge table costs O(n).
        let more = matching.len() > limit;
        if more {
            matching.select_nth_unstable_by(limit, |a, b| b.id.cmp(&a.id));
            matching.truncate(limit);
        }
        matching.sort_unstable_by_key(|j| std::cmp::Reverse(j.id));
        let next = more
            .then(|| matching.last().map(|j| j.id.to_string()))
            .flatten();
        Ok((
            matching.into_iter().map(|j| j.snapshot(false)).collect(),
            next,
        ))
    }

    /// Queued jobs that the same workers would take first (higher priority, or
    /// the same priority and older). Exact, but O(queue), so only computed for
    /// queues up to 50,000 jobs.
    pub(super) fn queue_position(&self, job: &Job) -> Option<u64> {
        let slot = job.slot?;
        if self.queue.len() > 50_000 {
            return None;
        }
        Some(
            self.queue
                .iter()
                .filter(|(_, s)| {
                    s.class == slot.class
                        && (s.priority > slot.priority
                            || (s.priority == slot.priority && s.seq < slot.seq))
                })
                .count() as u64,
        )
    }

    fn models(&self) -> Vec<ModelInfo> {
        // Keyed by kind too: a Wan2GP LoRA id is relative to its family's
        // folder, so one name can be two LoRAs (`lora:wan`, `lora:flux`).
        let mut models: BTreeMap<(Backend, String, String), ModelInfo> = BTreeMap::new();
        for (_, w) in self.workers.iter().filter(|(_, w)| w.online) {
            for inv in &w.backends {
                for m in &inv.models {
                    let entry = models
                        .entry((inv.backend, m.name.clone(), m.kind.clone()))
                        .or_insert_with(|| ModelInfo {
                            name: m.name.clone(),
                            kind: m.kind.clone(),
                            backend: inv.backend,
                            workers: Vec::new(),
                            loaded_on: Vec::new(),
                        });
                    entry.workers.push(w.id.to_string());
                    if w.loaded_model.as_deref() == Some(m.name.as_str()) {
                        entry.loaded_on.push(w.id.to_string());
                    }
                }
            }
        }
        models.into_values().collect()
    }

    fn health(&self, now_ms: u64) -> HealthReport {
        let mut h = HealthReport {
            version: kiln_protocol::VERSION.to_string(),
            uptime_s: now_ms.saturating_sub(self.started_ms) / 1000,
            durable: self.cfg.persist,
            workers_online: 0,
            workers_idle: 0,
            workers_busy: 0,
            workers_unhealthy: 0,
            queued: self.queued() as u64,
            running: self.running as u64,
            finished: self.stats.succeeded + self.stats.failed + self.stats.cancelled,
            protocol_errors: self.stats.protocol_errors,
        };
        for (_, w) in self.workers.iter() {
            use kiln_protocol::worker::WorkerState::*;
            match w.state() {
                Idle => h.workers_idle += 1,
                Busy => h.workers_busy += 1,
                Unhealthy => h.workers_unhealthy += 1,
                Offline => continue,
            }
            h.workers_online += 1;
        }
        h
    }
}

/// The error for a key reused with a different job, naming the first field that
/// differs (as payment APIs do with their idempotency keys).
fn idempotency_conflict(key: &str, id: JobId, first: &JobSpec, now: &JobSpec) -> ErrorBody {
    let a = serde_json::to_value(first).unwrap_or_default();
    let b = serde_json::to_value(now).unwrap_or_default();
    let differs = first_difference(&a, &b);
    let mut body = error(
        ErrorCode::IdempotencyConflict,
        format!(
            "idempotency key {key:?} was used for job {id} with a different job{}; use a new key \
             for a new job",
            differs
                .as_deref()
                .map(|f| format!(" ({f} differs)"))
                .unwrap_or_default()
        ),
    );
    body.field = Some("job.idempotency_key".into());
    body
}

/// The path of the first field (in key order, nested into maps) where two
/// specs differ: `job.params.prompt`, `job.max_attempts`.
fn first_difference(a: &serde_json::Value, b: &serde_json::Value) -> Option<String> {
    fn walk(
        path: String,
        a: Option<&serde_json::Value>,
        b: Option<&serde_json::Value>,
    ) -> Option<String> {
        match (a, b) {
            (Some(serde_json::Value::Object(a)), Some(serde_json::Value::Object(b))) => {
                let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
                keys.sort_unstable();
                keys.dedup();
                keys.into_iter()
                    .find_map(|k| walk(format!("{path}.{k}"), a.get(k), b.get(k)))
            }
            (a, b) if a != b => Some(path),
            _ => None,
        }
    }
    walk("job".into(), Some(a), Some(b))
}

fn not_found(req_id: u64, id: JobId) -> Reply {
    Reply::error(
        Some(req_id),
        error(ErrorCode::NotFound, format!("no job {id}")),
    )
}

/// A connection without a `hello` name is filed under its routing id.
fn default_client_name(peer: &PeerId) -> String {
    let mut s = String::from("conn-");
    for b in peer.iter().take(32) {
        let _ = write!(s, "{b:02x}");
    }
    s
}
