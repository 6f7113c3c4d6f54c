//! The broker core alone, no sockets: 1,000 workers and 1,000,000 queued jobs.
//!
//! Prints submit throughput, scheduling decisions per second (a worker reports a
//! result and the core picks and assigns its next job: fairness, classes,
//! affinity, events and records included) and the memory a queued job costs
//! beyond its parameters, measured with a counting allocator. Three runs: no
//! records (the in-memory broker), state records in the named encoding of earlier
//! releases (the baseline), and in the positional encoding written now.
//!
//!     cargo bench -p kiln-broker --bench core
//!     KILN_BENCH_JOBS=100000 cargo bench -p kiln-broker --bench core   (quicker)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use kiln_broker::core::{Core, CoreConfig, Input, Output};
use kiln_protocol::request::{Request, Submit};
use kiln_protocol::worker::*;
use kiln_protocol::{Backend, JobId, JobSpec, Reply, Task};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// CPU time this thread has used: on a machine shared with other work, the
/// rate per CPU second says what the core costs when wall time cannot.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

const MODELS: [&str; 4] = ["sdxl", "flux-dev", "wan-14b", "sd15"];

fn spec(i: u64) -> JobSpec {
    let mut s = JobSpec::new(Backend::Sim, Task::TextToImage)
        .param("prompt", format!("a lighthouse in a storm, variation {i}"))
        .param("seed", i)
        .param("steps", 30);
    s.model = Some(MODELS[(i % 4) as usize].to_string());
    // Like the Rust client, which always sends one (a UUID).
    s.idempotency_key = Some(format!("00000000-0000-4000-8000-{i:012}"));
    // A quarter of the jobs need a big GPU.
    if i % 4 == 2 {
        s.min_vram_mb = Some(40_000);
    }
    s
}

fn register(core: &mut Core, i: usize, out: &mut Vec<Output>) {
    let vram = [8_192, 12_288, 16_384, 24_576, 49_152][i % 5];
    let models = MODELS
        .iter()
        .map(|m| ModelEntry {
            name: m.to_string(),
            kind: "checkpoints".into(),
        })
        .collect();
    let reg = Register {
        token: None,
        worker_id: format!("w{i}"),
        instance: format!("i{i}"),
        hostname: format!("box{}", i / 8),
        version: "bench".into(),
        gpu: GpuInfo {
            name: "GPU".into(),
            total_vram_mb: vram,
            free_vram_mb: vram,
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
        loaded_model: Some(MODELS[i % 4].to_string()),
        current: None,
        unacked: None,
        held: Vec::new(),
        max_held: 0,
        resident: Vec::new(),
    };
    core.handle(
        0,
        Input::Worker {
            peer: Bytes::from(format!("w{i}")),
            msg: WorkerMessage::Register(Box::new(reg)),
        },
        out,
    );
}

fn submit(core: &mut Core, i: u64, now: u64, out: &mut Vec<Output>) {
    let peer = Bytes::from(format!("client{}", i % 1000));
    core.handle(
        now,
        Input::Request {
            peer,
            request: Request::Submit(Submit {
                req_id: i,
                job: spec(i),
                client: None,
            }),
        },
        out,
    );
}

/// The (worker, job, attempt) of each Assign in `out`.
fn assigned(out: &[Output]) -> impl Iterator<Item = (Bytes, JobId, u32)> + '_ {
    out.iter().filter_map(|o| match o {
        Output::ToWorker {
            peer,
            msg: BrokerMessage::Assign(a),
        } => Some((peer.clone(), a.job_id, a.attempt)),
        _ => None,
    })
}

/// Whether and how the core encodes job state records.
#[derive(Clone, Copy)]
enum Records {
    Off,
    /// Version 1, the named msgpack map of earlier releases: the baseline.
    Named,
    /// Version 2, positional: what the durable broker writes now.
    Positional,
}

fn run(records: Records, workers: usize, jobs: u64) {
    let cfg = CoreConfig {
        persist: !matches!(records, Records::Off),
        named_records: matches!(records, Records::Named),
        ..CoreConfig::default()
    };
    let mut core = Core::new(cfg, 0);
    let mut out = Vec::with_capacity(64);
    for i in 0..workers {
        register(&mut core, i, &mut out);
    }
    out.clear();
    // Occupy every worker so the next jobs queue up.
    let mut running: Vec<(Bytes, JobId, u32)> = Vec::new();
    let mut i = 0u64;
    while running.len() < workers {
        submit(&mut core, i, 1, &mut out);
        running.extend(assigned(&out));
        out.clear();
        i += 1;
        assert!(i < 10 * workers as u64, "workers never filled");
    }

    // What the client sent (parameters, model name, idempotency key), to subtract
    // from the per-job cost.
    let before_params = live();
    let sample = spec(7);
    let client_data = (
        sample.params.clone(),
        sample.model.clone(),
        sample.idempotency_key.clone(),
    );
    let params_bytes = live() - before_params;
    drop(client_data);

    let queued_before = core.queued() as u64;
    let mem_before = live();
    let t = Instant::now();
    for n in 0..jobs {
        submit(&mut core, i + n, 2, &mut out);
        debug_assert!(out.iter().any(|o| matches!(
            o,
            Output::Reply {
                reply: Reply::Accepted(_),
                ..
            }
        )));
        out.clear();
    }
    let submit_secs = t.elapsed().as_secs_f64();
    let per_job = (live() - mem_before) as f64 / jobs as f64;
    assert_eq!(core.queued() as u64, queued_before + jobs);

    // Decisions: each running job finishes and its worker takes the next one.
    let t = Instant::now();
    let cpu = thread_cpu();
    let mut decisions = 0u64;
    let mut cursor = 0usize;
    let mut idle = 0usize;
    while core.queued() > 0 && idle < running.len() {
        let slot = cursor % running.len();
        cursor += 1;
        let (peer, job, attempt) = running[slot].clone();
        let finished = Finished {
            job_id: job,
            attempt,
            outcome: Outcome::Succeeded {
                outputs: vec![],
                info: Default::default(),
            },
            loaded_model: None,
        };
        core.handle(
            3,
            Input::Worker {
                peer: peer.clone(),
                msg: WorkerMessage::Finished(finished),
            },
            &mut out,
        );
        match assigned(&out).next() {
            Some(next) => {
                running[slot] = next;
                decisions += 1;
                idle = 0;
            }
            None => idle += 1, // this worker can run nothing that is left
        }
        out.clear();
    }
    let decide_secs = t.elapsed().as_secs_f64();
    let decide_cpu = (thread_cpu() - cpu).as_secs_f64();
    println!(
        "core (records {}): {workers} workers, {jobs} queued jobs",
        match records {
            Records::Off => "off",
            Records::Named => "encoded named, version 1",
            Records::Positional => "encoded positional, version 2",
        }
    );
    println!("  submit       {:>10.0} jobs/s", jobs as f64 / submit_secs);
    println!(
        "  scheduling   {:>10.0} decisions/s ({decisions} decisions in {decide_secs:.2} s; target >= 200,000/s)",
        decisions as f64 / decide_secs
    );
    println!(
        "               {:>10.0} decisions per CPU second of this thread ({decide_cpu:.2} s; the machine is shared)",
        decisions as f64 / decide_cpu
    );
    println!(
        "  memory       {:>10.0} bytes per queued job beyond the {params_bytes} bytes of parameters, model and key it carries (target <= 1024)",
        per_job - params_bytes as f64
    );
}

fn main() {
    let jobs = std::env::var("KILN_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let workers = std::env::var("KILN_BENCH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000);
    run(Records::Off, workers, jobs);
    run(Records::Named, workers, jobs);
    run(Records::Positional, workers, jobs);
}
