//! The workers the broker knows: online ones it schedules on, and recently offline
//! ones it remembers so that a restarting worker does not make jobs unschedulable.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use bytes::Bytes;
use kiln_protocol::worker::{BackendInventory, GpuInfo, JobRef, WorkerInfo, WorkerState};
use kiln_protocol::Backend;
use serde::{Deserialize, Serialize};

use super::queue::{ClassId, Requirements};

/// A ZeroMQ routing identity: which connection a message came from or goes to.
pub type PeerId = Bytes;

/// Index of a worker in the registry's slab.
pub type WorkerIdx = usize;

/// What the broker persists about a worker so that, after a restart, it still knows
/// what the fleet can run before the workers re-register.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetRecord {
    pub worker_id: String,
    pub hostname: String,
    pub gpu: GpuInfo,
    pub backends: Vec<BackendInventory>,
    pub labels: Vec<String>,
    pub last_seen_ms: u64,
    pub version: String,
}

#[derive(Debug)]
pub struct Worker {
    pub id: Arc<str>,
    pub peer: Option<PeerId>,
    pub instance: String,
    pub hostname: String,
    pub version: String,
    pub gpu: GpuInfo,
    pub backends: Vec<BackendInventory>,
    models: HashSet<(Backend, String)>,
    pub labels: Vec<String>,
    pub loaded_model: Option<String>,
    /// Models resident in GPU memory, most recently used first (from the worker's
    /// reports; `loaded_model` alone for workers that do not report a set).
    pub resident: Vec<String>,
    pub healthy: bool,
    pub online: bool,
    /// When an online worker is declared dead without a sign of life.
    pub expires_ms: u64,
    pub last_seen_ms: u64,
    /// The attempt assigned to this worker, until its result is stored.
    pub current: Option<JobRef>,
    /// Attempts assigned after `current` (pipelined dispatch), oldest first, with
    /// when each was sent. The first starts on the worker the moment `current`
    /// ends there, without a round trip to the broker.
    pub held: Vec<(JobRef, u64)>,
    /// A held attempt the worker has started already (it reported progress for
    /// it, or named it `current` in a heartbeat) before the broker saw the
    /// previous result: it is not taken back, by an idle worker or for a more
    /// urgent job, since that would run it twice.
    pub held_running: Option<JobRef>,
    /// How many attempts the worker will hold besides `current`: what it
    /// advertised, capped by the broker's setting.
    pub max_held: u8,
    /// Models the worker will load for attempts assigned to it (current or
    /// held) that were not resident then: warm from their assignment on, so a
    /// burst of one model does not send every idle GPU loading it before the
    /// first one reports it resident.
    pub assumed: Vec<(JobRef, String)>,
    /// The models this worker adds to the registry's warm counts.
    counted: Vec<String>,
    pub jobs_done: u64,
    /// Per class: 0 not yet computed, 1 can run, 2 cannot.
    compat: Vec<u8>,
    /// "box1-gpu0 (RTX 4090)", shared by the jobs it runs.
    label: Arc<str>,
    /// The state last published in a `worker_state` event.
    pub announced: Option<WorkerState>,
    /// Why it went offline, for `workers` replies (not stored).
    pub offline_reason: Option<String>,
}

impl Worker {
    pub fn from_record(r: FleetRecord) -> Worker {
        let mut w = Worker {
            id: r.worker_id.into(),
            peer: None,
            instance: String::new(),
            hostname: r.hostname,
            version: r.version,
            gpu: r.gpu,
            backends: Vec::new(),
            models: HashSet::new(),
            labels: r.labels,
            loaded_model: None,
            resident: Vec::new(),
            healthy: false,
            online: false,
            expires_ms: 0,
            last_seen_ms: r.last_seen_ms,
            current: None,
            held: Vec::new(),
            held_running: None,
            max_held: 0,
            assumed: Vec::new(),
            counted: Vec::new(),
            jobs_done: 0,
            compat: Vec::new(),
            label: Arc::from(""),
            announced: None,
            offline_reason: None,
        };
        w.set_backends(r.backends);
        w
    }

    pub fn record(&self) -> FleetRecord {
        FleetRecord {
            worker_id: self.id.to_string(),
            hostname: self.hostname.clone(),
            gpu: self.gpu.clone(),
            backends: self.backends.clone(),
            labels: self.labels.clone(),
            last_seen_ms: self.last_seen_ms,
            version: self.version.clone(),
        }
    }

    /// Replaces the inventory and forgets cached class compatibility.
    pub fn set_backends(&mut self, backends: Vec<BackendInventory>) {
        self.models = backends
            .iter()
            .flat_map(|b| b.models.iter().map(|m| (b.backend, m.name.clone())))
            .collect();
        self.backends = backends;
        self.compat.clear();
    }

    pub fn set_labels(&mut self, labels: Vec<String>) {
        self.labels = labels;
        self.compat.clear();
    }

    pub fn set_total_vram(&mut self, gpu: GpuInfo) {
        if gpu.total_vram_mb != self.gpu.total_vram_mb {
            self.compat.clear();
        }
        if gpu.name != self.gpu.name || self.label.is_empty() {
            self.label = Arc::from(format!("{} ({})", self.id, gpu.name));
        }
        self.gpu = gpu;
    }

    /// Whether the worker could ever run jobs with these requirements (ignoring
    /// health and whether it is busy).
    pub fn can_run(&self, req: &Requirements) -> bool {
        self.backends.iter().any(|b| b.backend == req.backend)
            && req
                .model
                .as_ref()
                .is_none_or(|m| self.models.contains(&(req.backend, m.clone())))
            && self.gpu.total_vram_mb >= req.min_vram_mb
            && req.labels.iter().all(|l| self.labels.contains(l))
    }

    /// [`Worker::can_run`] memoised per class.
    pub fn can_run_class(&mut self, class: ClassId, req: &Requirements) -> bool {
        let i = class as usize;
        if self.compat.len() <= i {
            self.compat.resize(i + 1, 0);
        }
        if self.compat[i] == 0 {
            self.compat[i] = if self.can_run(req) { 1 } else { 2 };
        }
        self.compat[i] == 1
    }

    /// Healthy for this backend right now.
    pub fn backend_healthy(&self, backend: Backend) -> bool {
        self.healthy
            && self
                .backends
                .iter()
                .any(|b| b.backend == backend && b.healthy)
    }

    /// What this worker adds to the warm counts: nothing while offline, else its
    /// loaded model, its resident set and the models it will load for its
    /// attempts, each once.
    fn warm_models(&self) -> impl Iterator<Item = &String> {
        let loaded = self.loaded_model.as_ref().filter(|_| self.online);
        let resident = self.resident.iter().enumerate().filter(move |(i, m)| {
            self.online && Some(*m) != loaded && !self.resident[..*i].contains(m)
        });
        let assumed = self.assumed.iter().enumerate().filter(move |(i, (_, m))| {
            self.online
                && Some(m) != loaded
                && !self.resident.contains(m)
                && !self.assumed[..*i].iter().any(|(_, a)| a == m)
        });
        loaded
            .into_iter()
            .chain(resident.map(|(_, m)| m))
            .chain(assumed.map(|(_, (_, m))| m))
    }

    /// Whether the worker holds `r` and has not started it yet (it may be
    /// taken back).
    pub fn holds_unstarted(&self, r: JobRef) -> bool {
        self.held_running != Some(r) && self.held.iter().any(|(h, _)| *h == r)
    }

    /// Whether `model` is resident, or will be for an attempt it has.
    pub fn is_warm(&self, model: &str) -> bool {
        self.has_resident(model) || self.assumed.iter().any(|(_, m)| m == model)
    }

    /// Online, healthy and reachable: the broker may give it work.
    pub fn ready(&self) -> bool {
        self.online && self.healthy && self.peer.is_some()
    }

    /// Whether `model` is resident in GPU memory (no load needed to run it).
    pub fn has_resident(&self, model: &str) -> bool {
        self.loaded_model.as_deref() == Some(model) || self.resident.iter().any(|m| m == model)
    }

    /// Whether the worker is busy yet may take another attempt to hold.
    pub fn can_hold(&self) -> bool {
        self.current.is_some() && self.held.len() < self.max_held as usize
    }

    pub fn state(&self) -> WorkerState {
        if !self.online {
            WorkerState::Offline
        } else if self.current.is_some() {
            WorkerState::Busy
        } else if !self.healthy {
            WorkerState::Unhealthy
        } else {
            WorkerState::Idle
        }
    }

    pub fn info(&self) -> WorkerInfo {
        WorkerInfo {
            worker_id: self.id.to_string(),
            hostname: self.hostname.clone(),
            state: self.state(),
            gpu: self.gpu.clone(),
            backends: self.backends.clone(),
            labels: self.labels.clone(),
            loaded_model: self.loaded_model.clone(),
            // `loaded_model` first: a result names it before the next
            // heartbeat's resident list does.
            resident: self
                .loaded_model
                .iter()
                .chain(
                    self.resident
                        .iter()
                        .filter(|m| Some(*m) != self.loaded_model.as_ref()),
                )
                .cloned()
                .collect(),
            current_job: self.current.map(|r| r.job_id),
            jobs_done: self.jobs_done,
            last_seen_ms: self.last_seen_ms,
            version: self.version.clone(),
            offline_reason: (!self.online)
                .then(|| self.offline_reason.clone())
                .flatten(),
        }
    }

    /// "box1-gpu0 (RTX 4090)", for progress messages.
    pub fn gpu_label(&self) -> Arc<str> {
        if self.label.is_empty() {
            return Arc::from(format!("{} ({})", self.id, self.gpu.name));
        }
        self.label.clone()
    }
}

/// All workers, addressable by slab index, routing identity and worker id.
#[derive(Default)]
pub struct Registry {
    slab: Vec<Option<Worker>>,
    free: Vec<WorkerIdx>,
    by_peer: HashMap<PeerId, WorkerIdx>,
    by_id: HashMap<Arc<str>, WorkerIdx>,
    /// Online, healthy workers without a job: candidates for a new job.
    idle: BTreeSet<WorkerIdx>,
    /// Online, healthy, busy workers with room to hold another attempt.
    open: BTreeSet<WorkerIdx>,
    /// Per model: online workers that have it resident.
    warm: HashMap<String, u32>,
}

impl Registry {
    pub fn get(&self, idx: WorkerIdx) -> &Worker {
        self.slab[idx].as_ref().expect("live worker index")
    }

    pub fn get_mut(&mut self, idx: WorkerIdx) -> &mut Worker {
        self.slab[idx].as_mut().expect("live worker index")
    }

    pub fn by_peer(&self, peer: &PeerId) -> Option<WorkerIdx> {
        self.by_peer.get(peer).copied()
    }

    pub fn by_id(&self, id: &str) -> Option<WorkerIdx> {
        self.by_id.get(id).copied()
    }

    pub fn insert(&mut self, worker: Worker) -> WorkerIdx {
        let id = worker.id.clone();
        let idx = match self.free.pop() {
            Some(i) => {
                self.slab[i] = Some(worker);
                i
            }
            None => {
                self.slab.push(Some(worker));
                self.slab.len() - 1
            }
        };
        self.by_id.insert(id, idx);
        idx
    }

    pub fn remove(&mut self, idx: WorkerIdx) -> Option<Worker> {
        self.slab.get(idx)?.as_ref()?;
        let gone = std::mem::take(&mut self.get_mut(idx).counted);
        self.uncount(&gone);
        let w = self.slab.get_mut(idx)?.take()?;
        self.by_id.remove(&w.id);
        if let Some(p) = &w.peer {
            self.by_peer.remove(p);
        }
        self.idle.remove(&idx);
        self.open.remove(&idx);
        self.free.push(idx);
        Some(w)
    }

    /// Binds a worker to a (new) connection.
    pub fn attach_peer(&mut self, idx: WorkerIdx, peer: PeerId) {
        let w = self.slab[idx].as_mut().expect("live worker index");
        if let Some(old) = w.peer.replace(peer.clone()) {
            self.by_peer.remove(&old);
        }
        self.by_peer.insert(peer, idx);
    }

    pub fn detach_peer(&mut self, idx: WorkerIdx) {
        let w = self.slab[idx].as_mut().expect("live worker index");
        if let Some(old) = w.peer.take() {
            self.by_peer.remove(&old);
        }
    }

    /// Re-derives whether the worker belongs in the idle and open sets; call after
    /// changing `online`, `healthy`, `current` or `held`.
    pub fn refresh_idle(&mut self, idx: WorkerIdx) {
        self.refresh_warm(idx);
        let w = self.get(idx);
        let ready = w.ready();
        let (idle, open) = (ready && w.current.is_none(), ready && w.can_hold());
        if idle {
            self.idle.insert(idx);
        } else {
            self.idle.remove(&idx);
        }
        if open {
            self.open.insert(idx);
        } else {
            self.open.remove(&idx);
        }
    }

    /// Re-derives what the worker adds to the warm counts; call after changing
    /// `online`, `loaded_model` or `resident`. Returns whether the warm count of
    /// some model fell (the worker evicted it or went offline): jobs that were
    /// left to warm GPUs may be worth a load now.
    pub fn refresh_warm(&mut self, idx: WorkerIdx) -> bool {
        let w = self.get_mut(idx);
        if !w.assumed.is_empty() {
            let (current, held) = (w.current, &w.held);
            w.assumed
                .retain(|(r, _)| current == Some(*r) || held.iter().any(|(h, _)| h == r));
        }
        // Called on every assignment: compare before allocating anything.
        if w.warm_models().eq(w.counted.iter()) {
            return false;
        }
        let now: Vec<String> = w.warm_models().cloned().collect();
        let old = std::mem::replace(&mut w.counted, now.clone());
        let fell = old.iter().any(|m| !now.contains(m));
        self.uncount(&old);
        for m in now {
            *self.warm.entry(m).or_insert(0) += 1;
        }
        fell
    }

    fn uncount(&mut self, models: &[String]) {
        for m in models {
            if let Some(n) = self.warm.get_mut(m) {
                *n -= 1;
                if *n == 0 {
                    self.warm.remove(m);
                }
            }
        }
    }

    /// Online workers that have `model` resident.
    pub fn warm_count(&self, model: &str) -> u32 {
        self.warm.get(model).copied().unwrap_or(0)
    }

    pub fn idle(&self) -> impl Iterator<Item = WorkerIdx> + '_ {
        self.idle.iter().copied()
    }

    /// Busy workers that may hold another attempt.
    pub fn open(&self) -> impl Iterator<Item = WorkerIdx> + '_ {
        self.open.iter().copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (WorkerIdx, &Worker)> {
        self.slab
            .iter()
            .enumerate()
            .filter_map(|(i, w)| w.as_ref().map(|w| (i, w)))
    }

    pub fn indices(&self) -> Vec<WorkerIdx> {
        self.iter().map(|(i, _)| i).collect()
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}
