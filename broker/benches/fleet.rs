//! The fleet simulator: the real broker core driven in virtual time by simulated
//! GPUs, against the dispatchers people run in front of ComfyUI farms.
//!
//! Each simulated GPU has a speed and a VRAM size; each model a VRAM size, a load
//! time and a generation time (at speed 1). A GPU keeps models resident up to its
//! VRAM and evicts the least recently used one to load another. Dispatchers:
//!
//! - `round-robin`: each job, as it arrives, goes to the next GPU that can hold
//!   its model, into that GPU's own queue (ComfyUI's queue): no dispatch delay.
//! - `shortest-queue`: each job goes to the capable GPU with the fewest jobs
//!   queued or running.
//! - `kiln before #16`: the real core, one job at a time per worker
//!   (`max_held = 0`), placement by the queue's order (`load_aware = false`).
//! - `kiln`: the real core, workers holding their next job (depth 1) and
//!   placement that counts loads.
//! - `lower bound`: makespan >= max(total work / total speed, every job's arrival
//!   plus its run on the fastest GPU that can hold it); loads >= the distinct
//!   models requested (every GPU starts empty).
//!
//! Kiln's workers talk to the core with a delay: a result reaches the broker
//! `RESULT_DELAY_MS` after the GPU is done (fetching outputs from ComfyUI,
//! uploading, verifying), an assignment reaches a worker `ASSIGN_DELAY_MS` after
//! the broker sends it. The baselines get no delay at all.
//!
//!     cargo bench -p kiln-broker --bench fleet
//!     KILN_FLEET=studio cargo bench -p kiln-broker --bench fleet   (one scenario)
//!     KILN_FLEET_LOAD_WEIGHT=8 cargo bench ...   (placement's load_weight)
//!     KILN_FLEET_AFFINITY_MS=600000 cargo bench ...   (its fairness bound, in ms)

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use kiln_broker::core::{Core, CoreConfig, Input, Output};
use kiln_protocol::request::{Request, Submit};
use kiln_protocol::worker::*;
use kiln_protocol::{Backend, JobId, JobSpec, Reply, Task};

const RESULT_DELAY_MS: u64 = 50;
const ASSIGN_DELAY_MS: u64 = 2;

#[derive(Clone)]
struct Model {
    name: String,
    vram_mb: u64,
    load_ms: u64,
    run_ms: u64,
}

#[derive(Clone, Copy)]
struct Gpu {
    vram_mb: u64,
    /// Generation speed relative to the reference GPU (an RTX 4090 = 1.0).
    speed: f64,
}

#[derive(Clone, Copy)]
struct Job {
    at_ms: u64,
    client: usize,
    model: usize,
}

struct Scenario {
    name: &'static str,
    gpus: Vec<Gpu>,
    models: Vec<Model>,
    jobs: Vec<Job>,
    clients: usize,
}

/// SplitMix64: a small deterministic generator, so every run sees the same
/// scenario.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Exponential with the given mean (Poisson arrivals).
    fn exp(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
}

fn model(name: &str, vram_gb: f64, load_s: f64, run_s: f64) -> Model {
    Model {
        name: name.into(),
        vram_mb: (vram_gb * 1024.0) as u64,
        load_ms: (load_s * 1000.0) as u64,
        run_ms: (run_s * 1000.0) as u64,
    }
}

/// The reference models (see docs/performance.md for where the figures come
/// from): VRAM of the weights, load from local NVMe into the GPU, one generation
/// at the usual settings on an RTX 4090.
fn reference_models() -> Vec<Model> {
    vec![
        model("sd15", 2.1, 3.0, 1.5),
        model("sdxl-base", 6.9, 9.0, 6.0),
        model("sdxl-turbo", 6.9, 9.0, 1.0),
        model("flux-schnell-fp8", 11.9, 25.0, 4.0),
        model("flux-dev-fp8", 11.9, 25.0, 18.0),
        model("wan2.1-t2v-14b-fp8", 15.0, 60.0, 300.0),
    ]
}

/// 8 GPUs (4 fast with 24 GB, 4 at half speed with 12 GB), 6 models, 2,000 jobs
/// in bursts of one model from 3 clients over an hour.
fn studio() -> Scenario {
    let mut rng = Rng(16);
    let mut gpus = vec![
        Gpu {
            vram_mb: 24_576,
            speed: 1.0
        };
        4
    ];
    gpus.extend(vec![
        Gpu {
            vram_mb: 12_288,
            speed: 0.5
        };
        4
    ]);
    let models = reference_models();
    let mut jobs = Vec::new();
    while jobs.len() < 2_000 {
        let client = rng.below(3) as usize;
        let at_ms = rng.below(3_600_000);
        // Mostly image bursts; now and then a few videos.
        let (m, n) = if rng.below(20) == 0 {
            (5, 1 + rng.below(4))
        } else {
            (rng.below(5) as usize, 10 + rng.below(60))
        };
        for _ in 0..n.min(2_000 - jobs.len() as u64) {
            jobs.push(Job {
                at_ms,
                client,
                model: m,
            });
        }
    }
    jobs.sort_by_key(|j| j.at_ms);
    Scenario {
        name: "studio",
        gpus,
        models,
        jobs,
        clients: 3,
    }
}

/// Models chosen by a Zipf law of exponent 1 over `n` models.
fn zipf(rng: &mut Rng, n: usize) -> usize {
    let h: f64 = (1..=n).map(|k| 1.0 / k as f64).sum();
    let mut x = rng.unit() * h;
    for k in 1..=n {
        x -= 1.0 / k as f64;
        if x <= 0.0 {
            return k - 1;
        }
    }
    n - 1
}

/// Poisson arrivals at `load` times the fleet's capacity.
fn poisson_jobs(
    rng: &mut Rng,
    n: usize,
    gpus: &[Gpu],
    models: &[Model],
    clients: usize,
    load: f64,
    pick: impl Fn(&mut Rng) -> usize,
) -> Vec<Job> {
    let picks: Vec<usize> = (0..n).map(|_| pick(rng)).collect();
    let work: f64 = picks.iter().map(|&m| models[m].run_ms as f64).sum();
    let speed: f64 = gpus.iter().map(|g| g.speed).sum();
    // Mean gap so that arriving work is `load` times what the fleet can do.
    let gap = work / speed / n as f64 / load;
    let mut t = 0.0;
    picks
        .into_iter()
        .map(|model| {
            t += rng.exp(gap);
            Job {
                at_ms: t as u64,
                client: rng.below(clients as u64) as usize,
                model,
            }
        })
        .collect()
}

/// 300 GPUs of three kinds, 40 models, 50,000 jobs from 10 clients, Poisson
/// arrivals at 85% of capacity, model popularity by Zipf's law.
fn farm() -> Scenario {
    let mut rng = Rng(300);
    let mut gpus = Vec::new();
    for _ in 0..100 {
        gpus.push(Gpu {
            vram_mb: 24_576,
            speed: 1.0,
        });
        gpus.push(Gpu {
            vram_mb: 49_152,
            speed: 1.4,
        });
        gpus.push(Gpu {
            vram_mb: 16_384,
            speed: 0.6,
        });
    }
    let base = reference_models();
    let models: Vec<Model> = (0..40)
        .map(|i| {
            // Fine-tunes of the reference families, video kept rare.
            let b = &base[if i % 10 == 9 { 5 } else { i % 5 }];
            Model {
                name: format!("{}-v{i}", b.name),
                ..b.clone()
            }
        })
        .collect();
    let jobs = poisson_jobs(&mut rng, 50_000, &gpus, &models, 10, 0.85, |r| zipf(r, 40));
    Scenario {
        name: "farm",
        gpus,
        models,
        jobs,
        clients: 10,
    }
}

/// 32 GPUs; one model takes 80% of 5,000 jobs, 30 others share the rest.
fn hot_model() -> Scenario {
    let mut rng = Rng(32);
    let gpus = vec![
        Gpu {
            vram_mb: 24_576,
            speed: 1.0
        };
        32
    ];
    let base = reference_models();
    let mut models = vec![Model {
        name: "hot-sdxl".into(),
        ..base[1].clone()
    }];
    for i in 0..30 {
        let b = &base[[0, 1, 2, 3, 4][i % 5]];
        models.push(Model {
            name: format!("tail-{}-{i}", b.name),
            ..b.clone()
        });
    }
    let jobs = poisson_jobs(&mut rng, 5_000, &gpus, &models, 4, 0.9, |r| {
        if r.below(10) < 8 {
            0
        } else {
            1 + r.below(30) as usize
        }
    });
    Scenario {
        name: "hot model",
        gpus,
        models,
        jobs,
        clients: 4,
    }
}

/// A GPU's memory: resident models, most recently used first.
#[derive(Default, Clone)]
struct Vram {
    resident: Vec<usize>,
}

impl Vram {
    /// Makes `m` resident (evicting the least recently used as needed); returns
    /// whether a load was needed.
    fn use_model(&mut self, m: usize, models: &[Model], capacity: u64) -> bool {
        if let Some(i) = self.resident.iter().position(|&r| r == m) {
            self.resident.remove(i);
            self.resident.insert(0, m);
            return false;
        }
        let mut used: u64 = self.resident.iter().map(|&r| models[r].vram_mb).sum();
        while used + models[m].vram_mb > capacity {
            let out = self.resident.pop().expect("a model fits an empty GPU");
            used -= models[out].vram_mb;
        }
        self.resident.insert(0, m);
        true
    }
}

/// What happened to each job, and to each GPU.
struct Record {
    start: Vec<u64>,
    end: Vec<u64>,
    loads: u64,
    bytes_loaded: u64,
    generating_ms: u64,
}

impl Record {
    fn new(n: usize) -> Record {
        Record {
            start: vec![0; n],
            end: vec![0; n],
            loads: 0,
            bytes_loaded: 0,
            generating_ms: 0,
        }
    }

    /// Runs job `j` on GPU `g` from `now`; returns when it ends and how long it
    /// generates (counted when it completes: a cancelled run is waste).
    fn run(&mut self, s: &Scenario, vram: &mut Vram, g: usize, j: usize, now: u64) -> (u64, u64) {
        let m = s.jobs[j].model;
        let model = &s.models[m];
        let gpu = s.gpus[g];
        let mut t = now;
        if vram.use_model(m, &s.models, gpu.vram_mb) {
            self.loads += 1;
            self.bytes_loaded += model.vram_mb << 20;
            t += model.load_ms;
        }
        let run = (model.run_ms as f64 / gpu.speed) as u64;
        self.start[j] = now;
        self.end[j] = t + run;
        (t + run, run)
    }
}

fn fits(s: &Scenario, g: usize, m: usize) -> bool {
    s.models[m].vram_mb <= s.gpus[g].vram_mb
}

#[derive(Clone, Copy)]
enum Push {
    RoundRobin,
    ShortestQueue,
}

/// A dispatcher that pushes each job into one GPU's own queue on arrival.
fn push_dispatch(s: &Scenario, how: Push) -> Record {
    let n = s.jobs.len();
    let mut rec = Record::new(n);
    let mut vram = vec![Vram::default(); s.gpus.len()];
    let mut queues: Vec<VecDeque<usize>> = vec![VecDeque::new(); s.gpus.len()];
    let mut busy = vec![false; s.gpus.len()];
    let mut done: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
    let mut next_rr = 0;
    let mut j = 0;
    loop {
        let arrival = s.jobs.get(j).map(|x| x.at_ms);
        let finish = done.peek().map(|Reverse((t, _))| *t);
        let (now, is_arrival) = match (arrival, finish) {
            (None, None) => break,
            (Some(a), Some(f)) if f <= a => (f, false),
            (Some(a), _) => (a, true),
            (None, Some(f)) => (f, false),
        };
        let g = if is_arrival {
            let m = s.jobs[j].model;
            let g = match how {
                Push::RoundRobin => loop {
                    let g = next_rr % s.gpus.len();
                    next_rr += 1;
                    if fits(s, g, m) {
                        break g;
                    }
                },
                Push::ShortestQueue => (0..s.gpus.len())
                    .filter(|&g| fits(s, g, m))
                    .min_by_key(|&g| queues[g].len() + busy[g] as usize)
                    .expect("some GPU holds every model"),
            };
            queues[g].push_back(j);
            j += 1;
            g
        } else {
            let Reverse((_, g)) = done.pop().expect("peeked");
            busy[g] = false;
            g
        };
        if !busy[g] {
            if let Some(next) = queues[g].pop_front() {
                busy[g] = true;
                let (end, run) = rec.run(s, &mut vram[g], g, next, now);
                rec.generating_ms += run;
                done.push(Reverse((end, g)));
            }
        }
    }
    rec
}

/// Something that happens at a time in the Kiln simulation.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// A GPU finished its job (of this run number: a cancelled run's end is
    /// stale).
    GpuDone(usize, u64),
    /// A message from a worker reaches the broker.
    ToBroker(usize, u64),
    /// A message from the broker reaches a worker.
    ToWorker(usize, u64),
    Arrival(usize),
    /// The core asked to be woken (`Core::poll_timeout`).
    Tick,
}

/// A simulated Kiln worker: what its GPU runs and what it holds.
struct SimWorker {
    /// The attempt, its job, how long it generates, when it started and how
    /// long it loaded (what the sim backend reports in a result's info).
    running: Option<(JobRef, usize, u64, u64, u64)>,
    runs: u64,
    staged: VecDeque<(JobRef, usize)>,
    vram: Vram,
    sent_resident: Vec<usize>,
}

fn kiln_dispatch(s: &Scenario, pipelined: bool) -> (Record, f64) {
    let n = s.jobs.len();
    let mut rec = Record::new(n);
    let cfg = CoreConfig {
        // Virtual hours without heartbeats: liveness is not what is measured.
        heartbeat_ms: 1 << 40,
        max_held: if pipelined { 1 } else { 0 },
        load_aware: pipelined,
        // Placement's settings, overridable for tuning.
        load_weight: env_or("KILN_FLEET_LOAD_WEIGHT", CoreConfig::default().load_weight),
        affinity_max_wait_ms: env_or(
            "KILN_FLEET_AFFINITY_MS",
            CoreConfig::default().affinity_max_wait_ms,
        ),
        limits: kiln_protocol::Limits {
            max_queued_per_client: u64::MAX,
            ..Default::default()
        },
        ..CoreConfig::default()
    };
    let mut core = Core::new(cfg, 0);
    let mut out = Vec::new();
    let mut events: BinaryHeap<Reverse<(u64, u64, Event)>> = BinaryHeap::new();
    let mut seq = 0u64;
    let mut messages: HashMap<u64, WorkerMessage> = HashMap::new();
    let mut assigns: HashMap<u64, BrokerMessage> = HashMap::new();
    fn push(events: &mut BinaryHeap<Reverse<(u64, u64, Event)>>, seq: &mut u64, at: u64, e: Event) {
        *seq += 1;
        events.push(Reverse((at, *seq, e)));
    }
    let peers: Vec<Bytes> = (0..s.gpus.len())
        .map(|g| Bytes::from(format!("gpu{g}")))
        .collect();
    let peer_idx: HashMap<Bytes, usize> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), i))
        .collect();
    let mut workers: Vec<SimWorker> = (0..s.gpus.len())
        .map(|_| SimWorker {
            running: None,
            runs: 0,
            staged: VecDeque::new(),
            vram: Vram::default(),
            sent_resident: Vec::new(),
        })
        .collect();
    for (g, gpu) in s.gpus.iter().enumerate() {
        let models = s
            .models
            .iter()
            .filter(|m| m.vram_mb <= gpu.vram_mb)
            .map(|m| ModelEntry {
                name: m.name.clone(),
                kind: "checkpoints".into(),
            })
            .collect();
        let reg = Register {
            token: None,
            worker_id: format!("gpu{g}"),
            instance: "sim".into(),
            hostname: "sim".into(),
            version: "sim".into(),
            gpu: GpuInfo {
                name: format!("sim x{}", gpu.speed),
                total_vram_mb: gpu.vram_mb,
                free_vram_mb: gpu.vram_mb,
                ..GpuInfo::default()
            },
            backends: vec![BackendInventory {
                backend: Backend::Sim,
                healthy: true,
                models,
                detail: None,
                params: None,
            }],
            labels: vec![],
            loaded_model: None,
            resident: vec![],
            current: None,
            unacked: None,
            held: vec![],
            max_held: if pipelined { 1 } else { 0 },
        };
        core.handle(
            0,
            Input::Worker {
                peer: peers[g].clone(),
                msg: WorkerMessage::Register(Box::new(reg)),
            },
            &mut out,
        );
    }
    out.clear();
    let clients: Vec<Bytes> = (0..s.clients)
        .map(|c| Bytes::from(format!("client{c}")))
        .collect();
    for (j, job) in s.jobs.iter().enumerate() {
        push(&mut events, &mut seq, job.at_ms, Event::Arrival(j));
    }
    let mut job_of: HashMap<JobId, usize> = HashMap::new();
    let mut decisions = 0u64;
    let mut core_ns = 0u128;
    let mut tick_at: Option<u64> = None;
    while let Some(Reverse((now, _, ev))) = events.pop() {
        // Starts the next job on a GPU; returns the messages it sends.
        let start = |w: &mut SimWorker,
                     rec: &mut Record,
                     g: usize,
                     r: JobRef,
                     j: usize,
                     events: &mut BinaryHeap<Reverse<(u64, u64, Event)>>,
                     seq: &mut u64| {
            let loads = rec.loads;
            let (end, run) = rec.run(s, &mut w.vram, g, j, now);
            let load_ms = if rec.loads > loads {
                s.models[s.jobs[j].model].load_ms
            } else {
                0
            };
            w.running = Some((r, j, run, now, load_ms));
            w.runs += 1;
            *seq += 1;
            events.push(Reverse((end, *seq, Event::GpuDone(g, w.runs))));
        };
        let mut to_broker: Vec<(usize, WorkerMessage)> = Vec::new();
        match ev {
            Event::Arrival(j) => {
                let job = s.jobs[j];
                let mut spec = JobSpec::new(Backend::Sim, Task::TextToImage);
                spec.model = Some(s.models[job.model].name.clone());
                let t = Instant::now();
                core.handle(
                    now,
                    Input::Request {
                        peer: clients[job.client].clone(),
                        request: Request::Submit(Submit {
                            req_id: j as u64,
                            job: spec,
                            client: None,
                        }),
                    },
                    &mut out,
                );
                core_ns += t.elapsed().as_nanos();
                for o in &out {
                    if let Output::Reply {
                        reply: Reply::Accepted(a),
                        ..
                    } = o
                    {
                        job_of.insert(a.job_id, j);
                    }
                }
            }
            Event::GpuDone(g, run) => {
                let w = &mut workers[g];
                if w.runs != run || w.running.is_none() {
                    continue; // that run was cancelled
                }
                let (r, _, generated, started, load_ms) =
                    w.running.take().expect("a GPU was running");
                rec.generating_ms += generated;
                // As the sim backend and the runner report it.
                let info = serde_json::json!({
                    "worker_started_ms": started,
                    "worker_ended_ms": now,
                    "load_ms": load_ms,
                });
                let loaded = w.vram.resident.first().map(|&m| s.models[m].name.clone());
                to_broker.push((
                    g,
                    WorkerMessage::Finished(Finished {
                        job_id: r.job_id,
                        attempt: r.attempt,
                        outcome: Outcome::Succeeded {
                            outputs: vec![],
                            info: info.as_object().cloned().unwrap_or_default(),
                        },
                        loaded_model: loaded,
                    }),
                ));
                // The held job starts at once: no round trip.
                if let Some((r, j)) = workers[g].staged.pop_front() {
                    start(&mut workers[g], &mut rec, g, r, j, &mut events, &mut seq);
                }
            }
            Event::ToWorker(g, key) => match assigns.remove(&key) {
                Some(BrokerMessage::Assign(a)) => {
                    let j = job_of[&a.job_id];
                    let r = JobRef {
                        job_id: a.job_id,
                        attempt: a.attempt,
                    };
                    let w = &mut workers[g];
                    if let Some((busy, ..)) = w.running {
                        if a.hold && w.staged.is_empty() {
                            w.staged.push_back((r, j));
                            continue;
                        }
                        // As the real worker: busy, and no room to hold it.
                        to_broker.push((
                            g,
                            WorkerMessage::Refused(Refused {
                                job_id: r.job_id,
                                attempt: r.attempt,
                                busy_with: busy,
                            }),
                        ));
                    } else {
                        start(w, &mut rec, g, r, j, &mut events, &mut seq);
                    }
                }
                Some(BrokerMessage::Cancel(r)) => {
                    let w = &mut workers[g];
                    w.staged.retain(|(s, _)| *s != r);
                    if w.running.is_some_and(|(x, ..)| x == r) {
                        // A held job the broker took back had already started:
                        // stop it and report, as the real worker does.
                        w.running = None;
                        to_broker.push((
                            g,
                            WorkerMessage::Finished(Finished {
                                job_id: r.job_id,
                                attempt: r.attempt,
                                outcome: Outcome::Cancelled,
                                loaded_model: None,
                            }),
                        ));
                        if let Some((r, j)) = w.staged.pop_front() {
                            start(w, &mut rec, g, r, j, &mut events, &mut seq);
                        }
                    }
                }
                _ => {}
            },
            Event::Tick => {
                if tick_at == Some(now) {
                    tick_at = None;
                }
                let t = Instant::now();
                core.handle(now, Input::Tick, &mut out);
                core_ns += t.elapsed().as_nanos();
            }
            Event::ToBroker(g, key) => {
                let msg = messages.remove(&key).expect("queued message");
                decisions += matches!(msg, WorkerMessage::Finished(_)) as u64;
                let t = Instant::now();
                core.handle(
                    now,
                    Input::Worker {
                        peer: peers[g].clone(),
                        msg,
                    },
                    &mut out,
                );
                core_ns += t.elapsed().as_nanos();
            }
        }
        // Workers report what they hold and, when it changed, what is resident.
        for (g, w) in workers.iter_mut().enumerate() {
            if pipelined && w.vram.resident != w.sent_resident {
                w.sent_resident = w.vram.resident.clone();
                to_broker.push((
                    g,
                    WorkerMessage::Heartbeat(Heartbeat {
                        free_vram_mb: 0,
                        utilization_pct: None,
                        temperature_c: None,
                        power_mw: None,
                        current: w.running.map(|(r, ..)| r),
                        held: w.staged.iter().map(|(r, _)| *r).collect(),
                        loaded_model: w.vram.resident.first().map(|&m| s.models[m].name.clone()),
                        resident: Some(
                            w.vram
                                .resident
                                .iter()
                                .map(|&m| s.models[m].name.clone())
                                .collect(),
                        ),
                        healthy: true,
                        backends: None,
                    }),
                ));
            }
        }
        for (g, msg) in to_broker {
            let delay = if matches!(msg, WorkerMessage::Finished(_)) {
                RESULT_DELAY_MS
            } else {
                ASSIGN_DELAY_MS
            };
            let key = seq + 1;
            messages.insert(key, msg);
            push(&mut events, &mut seq, now + delay, Event::ToBroker(g, key));
        }
        for o in out.drain(..) {
            if let Output::ToWorker { peer, msg } = o {
                if matches!(msg, BrokerMessage::Assign(_) | BrokerMessage::Cancel(_)) {
                    let g = peer_idx[&peer];
                    let key = seq + 1;
                    assigns.insert(key, msg);
                    push(
                        &mut events,
                        &mut seq,
                        now + ASSIGN_DELAY_MS,
                        Event::ToWorker(g, key),
                    );
                }
            }
        }
        // Wake the core when it asks to be, while there is work left.
        if let Some(at) = core.poll_timeout() {
            let at = at.max(now);
            if (core.stats().succeeded as usize) < n && tick_at.is_none_or(|t| at < t) {
                tick_at = Some(at);
                push(&mut events, &mut seq, at, Event::Tick);
            }
        }
    }
    assert_eq!(core.stats().succeeded as usize, n, "every job ran once");
    (rec, decisions as f64 / (core_ns as f64 / 1e9))
}

struct Row {
    name: &'static str,
    makespan_ms: u64,
    wait_p50_ms: u64,
    wait_p95_ms: u64,
    busy: f64,
    loads: u64,
    bytes_loaded: u64,
    worst_slowdown: f64,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summarize(s: &Scenario, name: &'static str, rec: &Record) -> Row {
    let first = s.jobs.iter().map(|j| j.at_ms).min().unwrap_or(0);
    let makespan = rec.end.iter().copied().max().unwrap_or(0) - first;
    let mut waits: Vec<u64> = (0..s.jobs.len())
        .map(|j| rec.start[j] - s.jobs[j].at_ms)
        .collect();
    waits.sort_unstable();
    let fastest = s.gpus.iter().map(|g| g.speed).fold(0.0, f64::max);
    let mut per_client = vec![(0.0, 0usize); s.clients];
    for (j, job) in s.jobs.iter().enumerate() {
        let ideal = s.models[job.model].run_ms as f64 / fastest;
        let took = (rec.end[j] - job.at_ms) as f64;
        per_client[job.client].0 += took / ideal.max(1.0);
        per_client[job.client].1 += 1;
    }
    let worst = per_client
        .iter()
        .filter(|c| c.1 > 0)
        .map(|c| c.0 / c.1 as f64)
        .fold(0.0, f64::max);
    Row {
        name,
        makespan_ms: makespan,
        wait_p50_ms: percentile(&waits, 0.5),
        wait_p95_ms: percentile(&waits, 0.95),
        busy: rec.generating_ms as f64 / (s.gpus.len() as f64 * makespan as f64),
        loads: rec.loads,
        bytes_loaded: rec.bytes_loaded,
        worst_slowdown: worst,
    }
}

/// Makespan and loads no dispatcher can beat (see the module docs).
fn lower_bound(s: &Scenario) -> (u64, u64) {
    let speed: f64 = s.gpus.iter().map(|g| g.speed).sum();
    let work: f64 = s.jobs.iter().map(|j| s.models[j.model].run_ms as f64).sum();
    let first = s.jobs.iter().map(|j| j.at_ms).min().unwrap_or(0);
    let tail = s
        .jobs
        .iter()
        .map(|j| {
            let fastest = (0..s.gpus.len())
                .filter(|&g| fits(s, g, j.model))
                .map(|g| s.gpus[g].speed)
                .fold(0.0, f64::max);
            j.at_ms - first + (s.models[j.model].run_ms as f64 / fastest) as u64
        })
        .max()
        .unwrap_or(0);
    let mut distinct: Vec<usize> = s.jobs.iter().map(|j| j.model).collect();
    distinct.sort_unstable();
    distinct.dedup();
    (((work / speed) as u64).max(tail), distinct.len() as u64)
}

fn run(s: &Scenario) {
    let work_h: f64 = s
        .jobs
        .iter()
        .map(|j| s.models[j.model].run_ms as f64)
        .sum::<f64>()
        / 3.6e6;
    println!(
        "\n## {}: {} GPUs, {} models, {} jobs from {} clients ({work_h:.1} GPU-hours of generation at speed 1)",
        s.name,
        s.gpus.len(),
        s.models.len(),
        s.jobs.len(),
        s.clients
    );
    let (lb_makespan, lb_loads) = lower_bound(s);
    let t = Instant::now();
    let rr = summarize(s, "round-robin", &push_dispatch(s, Push::RoundRobin));
    let sq = summarize(s, "shortest-queue", &push_dispatch(s, Push::ShortestQueue));
    let (before, before_rate) = kiln_dispatch(s, false);
    let before = summarize(s, "kiln before #16", &before);
    let (kiln, kiln_rate) = kiln_dispatch(s, true);
    let kiln = summarize(s, "kiln", &kiln);
    println!(
        "{:<16} {:>11} {:>7} {:>10} {:>10} {:>6} {:>7} {:>7} {:>9} {:>13}",
        "dispatcher",
        "makespan s",
        "x bound",
        "wait p50 s",
        "wait p95 s",
        "busy",
        "loads",
        "x sq",
        "GB loaded",
        "worst client"
    );
    println!(
        "{:<16} {:>11.0} {:>7.2} {:>10} {:>10} {:>6} {:>7} {:>7.2} {:>9} {:>13}",
        "lower bound",
        lb_makespan as f64 / 1000.0,
        1.0,
        "-",
        "-",
        "-",
        lb_loads,
        lb_loads as f64 / sq.loads.max(1) as f64,
        "-",
        "-"
    );
    for r in [&rr, &sq, &before, &kiln] {
        println!(
            "{:<16} {:>11.0} {:>7.2} {:>10.1} {:>10.1} {:>5.0}% {:>7} {:>7.2} {:>9.0} {:>12.1}x",
            r.name,
            r.makespan_ms as f64 / 1000.0,
            r.makespan_ms as f64 / lb_makespan as f64,
            r.wait_p50_ms as f64 / 1000.0,
            r.wait_p95_ms as f64 / 1000.0,
            r.busy * 100.0,
            r.loads,
            r.loads as f64 / sq.loads.max(1) as f64,
            r.bytes_loaded as f64 / (1u64 << 30) as f64,
            r.worst_slowdown
        );
    }
    println!(
        "targets: makespan {:.2}x the bound (<= 1.2), loads {:.2}x shortest-queue (<= 0.5); core time per decision: {:.0}/s before, {:.0}/s kiln; simulated in {:.1} s",
        kiln.makespan_ms as f64 / lb_makespan as f64,
        kiln.loads as f64 / sq.loads.max(1) as f64,
        before_rate,
        kiln_rate,
        t.elapsed().as_secs_f64()
    );
}

/// The value of environment variable `name` (for tuning), else `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let only = std::env::var("KILN_FLEET").ok();
    type Make = fn() -> Scenario;
    let scenarios: [(&str, Make); 3] = [("studio", studio), ("farm", farm), ("hot", hot_model)];
    println!(
        "fleet simulator: result delay {RESULT_DELAY_MS} ms, assignment delay {ASSIGN_DELAY_MS} ms (Kiln only; the push baselines get none)"
    );
    for (key, make) in scenarios {
        if only.as_deref().is_some_and(|o| o != key) {
            continue;
        }
        run(&make());
    }
}
