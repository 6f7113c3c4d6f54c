//! End to end over loopback TCP on both transports (`libzmq`, `zeromq`), each
//! beside a bare DEALER/ROUTER echo over the same transport, and a bare fsync.
//!
//! Starts the real `kiln-broker` (in memory, then durable) and four `kiln-worker`
//! processes with the sim backend, and a client in this process on one thread,
//! and measures:
//! - no-op job latency: submit → the client sees the `succeeded` event, one job
//!   at a time (p50/p99);
//! - throughput: jobs completed per second with many submits in flight;
//! - the same two measures for a bare DEALER/ROUTER echo on the same machine, so
//!   the broker's overhead reads as a ratio, and the latency of appending to a
//!   file and syncing it, the floor of a durable commit.
//!
//! A no-op job is a sim job with zero steps and zero outputs. The binaries are
//! the release ones, so build them first:
//!
//!     cargo build --release --bins && cargo bench -p kiln-broker --bench e2e
//!     KILN_BENCH_JOBS=5000 cargo bench -p kiln-broker --bench e2e   (quicker)
//!     KILN_BENCH_IN_PROCESS=1 cargo bench -p kiln-broker --bench e2e  (broker
//!         and workers as tasks in this process, no binaries needed)

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::percentile;
use kiln_broker::{Broker, BrokerSettings};
use kiln_config::KilnConfig;
use kiln_protocol::transport::{
    BindOptions, ConnectOptions, Dealer, Incoming, Routed, Router, TransportKind,
};
use kiln_protocol::{Backend, Client, ClientOptions, Event, JobSpec, JobState, Task};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

fn noop() -> JobSpec {
    JobSpec::new(Backend::Sim, Task::TextToImage)
        .param("steps", 0)
        .param("count", 0)
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct Figures {
    p50: Duration,
    p99: Duration,
    per_sec: f64,
}

fn print(name: &str, f: &Figures) {
    println!(
        "{name:<44} p50 {:>8.1} µs   p99 {:>8.1} µs   {:>9.0} /s",
        micros(f.p50),
        micros(f.p99),
        f.per_sec
    );
}

async fn echo_baseline(kind: TransportKind, rounds: usize) -> Figures {
    // The echo server gets its own thread and runtime, as the broker has its own process.
    let (ep_tx, ep_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let (mut rx, tx, ep) = Router::bind(kind, "tcp://127.0.0.1:0", BindOptions::default())
                .await
                .unwrap();
            ep_tx.send(ep).unwrap();
            while let Some(r) = rx.recv().await {
                if let Routed::Message { peer, frames } = r {
                    tx.send(peer, frames);
                }
            }
        });
    });
    let ep = ep_rx.await.unwrap();
    let mut dealer = Dealer::connect(kind, &ep, ConnectOptions::default())
        .await
        .unwrap();
    let body = Bytes::from(vec![7u8; 68]);
    let frames = move || vec![Bytes::from_static(b"KILN1"), body.clone()];
    async fn reply(d: &mut Dealer) {
        loop {
            match d.next().await {
                Incoming::Frames(_) => return,
                Incoming::Error(_) => continue,
                Incoming::Lost => panic!("echo connection lost"),
            }
        }
    }
    let mut lat = Vec::with_capacity(rounds);
    for i in 0..rounds + rounds / 10 {
        let t = Instant::now();
        dealer.send(frames()).await.unwrap();
        reply(&mut dealer).await;
        if i >= rounds / 10 {
            lat.push(t.elapsed());
        }
    }
    lat.sort();
    // Throughput with 1,000 in flight: each reply lets the next request go.
    let total = rounds * 10;
    let window = 1000.min(total);
    let t = Instant::now();
    for _ in 0..window {
        dealer.send(frames()).await.unwrap();
    }
    for sent in window..total + window {
        reply(&mut dealer).await;
        if sent < total {
            dealer.send(frames()).await.unwrap();
        }
    }
    Figures {
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        per_sec: total as f64 / t.elapsed().as_secs_f64(),
    }
}

fn fsync_baseline(rounds: usize) -> Figures {
    let mut lat = common::fsync_latencies(rounds);
    let per_sec = rounds as f64 / lat.iter().sum::<Duration>().as_secs_f64();
    lat.sort();
    Figures {
        p50: percentile(&lat, 0.5),
        p99: percentile(&lat, 0.99),
        per_sec,
    }
}

/// The system under test: real processes (the default, like a deployment), or
/// everything in this process (`KILN_BENCH_IN_PROCESS=1`).
struct Cluster {
    client: Client,
    run: Running,
}

enum Running {
    InProcess {
        broker: Broker,
        stop: CancellationToken,
        _state: tempfile::TempDir,
    },
    /// Dropped in this order: the processes are killed, then their files removed.
    Processes {
        _workers: Vec<kiln_testkit::Proc>,
        _broker: Box<kiln_testkit::Broker>,
        _scratch: kiln_testkit::Scratch,
    },
}

impl Cluster {
    async fn stop(self) {
        match self.run {
            Running::InProcess { broker, stop, .. } => {
                stop.cancel();
                broker.shutdown().await.unwrap();
            }
            Running::Processes { .. } => {} // dropping kills them
        }
    }
}

/// Starts the release binaries: `kiln-broker` and `workers` × `kiln-worker`,
/// logging only warnings.
async fn processes(kind: TransportKind, durable: bool, workers: usize) -> Cluster {
    use kiln_testkit::{BrokerOpts, Scratch, WorkerOpts};
    let scratch = Scratch::new();
    // `KILN_BENCH_LOG` sets the daemons' log filter (warnings only by default).
    let level = std::env::var("KILN_BENCH_LOG").unwrap_or_else(|_| "warn".into());
    let quiet = vec![("KILN_LOG".to_string(), level)];
    let broker = scratch
        .broker(BrokerOpts {
            durable,
            transport: kind,
            env: quiet.clone(),
            ..BrokerOpts::default()
        })
        .await;
    let mut procs = Vec::new();
    for i in 0..workers {
        let opts = WorkerOpts {
            env: quiet.clone(),
            ..WorkerOpts::sim(&format!("bench{i}"))
        };
        procs.push(scratch.worker(&broker, opts).await);
    }
    Cluster {
        client: broker.client(),
        run: Running::Processes {
            _workers: procs,
            _broker: Box::new(broker),
            _scratch: scratch,
        },
    }
}

async fn in_process(kind: TransportKind, durable: bool, workers: usize) -> Cluster {
    let state = tempfile::tempdir().unwrap();
    let mut cfg = KilnConfig::default();
    cfg.broker.frontend = "tcp://127.0.0.1:0".into();
    cfg.broker.backend = "tcp://127.0.0.1:0".into();
    cfg.broker.events = "tcp://127.0.0.1:0".into();
    cfg.broker.state_dir = state.path().to_path_buf();
    cfg.broker.durable = durable;
    cfg.broker.transport = kind;
    cfg.worker.transport = kind;
    let broker = Broker::start(BrokerSettings::from_config(&cfg).unwrap())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    for i in 0..workers {
        let mut w = cfg.clone();
        w.worker.id = Some(format!("bench{i}"));
        w.worker.broker = broker.endpoints().backend.clone();
        w.worker.gpu.nvml = false;
        w.worker.gpu.name = Some("bench GPU".into());
        w.worker.gpu.total_vram_mb = Some(24_576);
        w.worker.work_dir = Some(state.path().join(format!("w{i}")));
        let worker = kiln_worker::build(&w).unwrap();
        let status = worker.status().await.unwrap();
        tokio::spawn(worker.run(status, stop.clone()));
    }
    let ep = broker.endpoints();
    let mut opts = ClientOptions::new(ep.frontend.clone(), ep.events.clone().unwrap_or_default());
    opts.transport = kind;
    let client = Client::connect(opts);
    kiln_testkit::eventually("the workers to register", Duration::from_secs(30), || {
        let client = client.clone();
        async move { (client.workers().await.ok()?.len() >= workers).then_some(()) }
    })
    .await;
    Cluster {
        client,
        run: Running::InProcess {
            broker,
            stop,
            _state: state,
        },
    }
}

async fn kiln_figures(
    c: &Cluster,
    latency_jobs: usize,
    throughput_jobs: usize,
) -> (Figures, usize) {
    let client = &c.client;
    let mut events = client.subscribe("job/").await.unwrap();
    // Let the subscription reach the broker: run jobs until their events arrive.
    loop {
        let id = client.submit(noop()).await.unwrap().job_id;
        let seen = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(e) = events.recv().await {
                if matches!(&e, Event::JobState(s) if s.job_id == id && s.state == JobState::Succeeded) {
                    return;
                }
            }
        })
        .await;
        if seen.is_ok() {
            break;
        }
    }
    let mut lat = Vec::with_capacity(latency_jobs);
    let mut fallbacks = 0;
    for i in 0..latency_jobs + latency_jobs / 10 {
        let t = Instant::now();
        let id = client.submit(noop()).await.unwrap().job_id;
        let seen = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(e) = events.recv().await {
                if matches!(&e, Event::JobState(s) if s.job_id == id && s.state.is_terminal()) {
                    return;
                }
            }
        })
        .await;
        if seen.is_err() {
            fallbacks += 1;
            client.wait(id).await.unwrap();
        }
        if i >= latency_jobs / 10 {
            lat.push(t.elapsed());
        }
    }
    lat.sort();
    drop(events);

    // Throughput: many submits in flight and at most WINDOW jobs outstanding (a
    // producer that outruns the workers would only grow the queue). Completions
    // are counted from the event stream; `health` settles the count at the end.
    const WINDOW: u64 = 2_000;
    let before = client.health().await.unwrap().finished;
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let wake = Arc::new(tokio::sync::Notify::new());
    let mut events = client.subscribe("job/").await.unwrap();
    let counter = {
        let (done, wake) = (done.clone(), wake.clone());
        tokio::spawn(async move {
            while let Some(e) = events.recv().await {
                if matches!(&e, Event::JobState(s) if s.state.is_terminal()) {
                    done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    wake.notify_one();
                }
            }
        })
    };
    let t = Instant::now();
    let inflight = Arc::new(Semaphore::new(256));
    let mut submitted = 0u64;
    let mut tasks = Vec::new();
    while submitted < throughput_jobs as u64 {
        let finished = done.load(std::sync::atomic::Ordering::Relaxed);
        if submitted.saturating_sub(finished) >= WINDOW {
            // Events are lossy: fall back to `health` if none come for a while.
            if tokio::time::timeout(Duration::from_millis(50), wake.notified())
                .await
                .is_err()
            {
                let h = client.health().await.unwrap().finished - before;
                done.fetch_max(h, std::sync::atomic::Ordering::Relaxed);
            }
            continue;
        }
        let burst = (WINDOW - (submitted - finished)).min(throughput_jobs as u64 - submitted);
        for _ in 0..burst {
            let permit = inflight.clone().acquire_owned().await.unwrap();
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                client.submit(noop()).await.unwrap();
                drop(permit);
            }));
        }
        submitted += burst;
    }
    for t in tasks {
        t.await.unwrap();
    }
    loop {
        if done.load(std::sync::atomic::Ordering::Relaxed) >= throughput_jobs as u64 {
            break;
        }
        if tokio::time::timeout(Duration::from_millis(50), wake.notified())
            .await
            .is_err()
        {
            let h = client.health().await.unwrap().finished - before;
            done.fetch_max(h, std::sync::atomic::Ordering::Relaxed);
        }
    }
    counter.abort();
    let per_sec = throughput_jobs as f64 / t.elapsed().as_secs_f64();
    (
        Figures {
            p50: percentile(&lat, 0.5),
            p99: percentile(&lat, 0.99),
            per_sec,
        },
        fallbacks,
    )
}

fn main() {
    let jobs: usize = std::env::var("KILN_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    // One thread for the client side, like a script or the CLI: no wake-ups
    // between runtime threads inside the measuring process.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("loopback TCP, {} cores; latency over {} sequential round trips/jobs, throughput over {jobs}", std::thread::available_parallelism().map_or(0, |n| n.get()), jobs / 10);
        print("append + fdatasync (baseline)", &fsync_baseline(jobs / 10));
        for kind in [TransportKind::Libzmq, TransportKind::Zeromq] {
            let echo = echo_baseline(kind, jobs / 10).await;
            print(&format!("{kind}: bare DEALER/ROUTER echo (baseline)"), &echo);
            for durable in [false, true] {
                let c = if std::env::var_os("KILN_BENCH_IN_PROCESS").is_some() {
                    in_process(kind, durable, 4).await
                } else {
                    processes(kind, durable, 4).await
                };
                let (f, fallbacks) = kiln_figures(&c, jobs / 10, jobs).await;
                let name = format!(
                    "{kind}: kiln no-op job, 4 workers, {}",
                    if durable { "durable" } else { "in memory" }
                );
                print(&name, &f);
                println!(
                    "{:<44} latency {:.1}x the echo, throughput {:.2}x{}",
                    "",
                    micros(f.p50) / micros(echo.p50),
                    f.per_sec / echo.per_sec,
                    if fallbacks > 0 { format!(" ({fallbacks} events missed, recovered by get)") } else { String::new() }
                );
                c.stop().await;
            }
        }
    });
}
