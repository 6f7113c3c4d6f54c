//! The Prometheus endpoints of a real broker and two real sim workers, scraped
//! over HTTP and parsed by the Prometheus project's Python parser
//! (`tests/prometheus/scrape.py`), checked against the jobs that ran; and the
//! Grafana dashboard (docs/grafana/) queries only metrics the daemons export.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use kiln_protocol::{Backend, ErrorCode, JobId, JobSpec, JobState, Task};
use kiln_testkit::prometheus::{scrape, Scrape};
use kiln_testkit::{eventually, free_port, BrokerOpts, Scratch, WorkerOpts};
use serde_json::Value;

fn sim_job(steps: u32) -> JobSpec {
    JobSpec::new(Backend::Sim, Task::TextToImage)
        .param("prompt", "a kiln at dusk")
        .param("steps", steps)
        .param("width", 64)
        .param("height", 64)
}

fn worker(id: &str, metrics_port: u16) -> WorkerOpts {
    WorkerOpts {
        step_ms: 10,
        env: vec![
            (
                "KILN_WORKER__METRICS_LISTEN".into(),
                format!("127.0.0.1:{metrics_port}"),
            ),
            // One job at a time, so jobs behind busy workers wait in the broker's
            // queue (with pipelining each worker would hold one of them).
            ("KILN_WORKER__PIPELINE_DEPTH".into(), "0".into()),
        ],
        ..WorkerOpts::sim(id)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_metrics_match_the_jobs_that_ran() {
    let s = Scratch::new();
    let broker = s.broker(BrokerOpts::default()).await;
    let (p1, p2) = (free_port(), free_port());
    let _w1 = s.worker(&broker, worker("m1", p1)).await;
    let _w2 = s.worker(&broker, worker("m2", p2)).await;
    let (u1, u2) = (
        format!("http://127.0.0.1:{p1}/metrics"),
        format!("http://127.0.0.1:{p2}/metrics"),
    );
    let urls = [broker.metrics_url.as_str(), u1.as_str(), u2.as_str()];
    let client = broker.client();

    // Both workers busy: one hangs until cancelled, one runs 6 s.
    let hang = client
        .submit(sim_job(20).param("fault", "hang"))
        .await
        .unwrap()
        .job_id;
    let slow = client.submit(sim_job(600)).await.unwrap().job_id;
    eventually("both workers to be busy", Duration::from_secs(20), || {
        let client = client.clone();
        async move {
            let (h, s) = (client.get(hang).await.ok()?, client.get(slow).await.ok()?);
            (h.state == JobState::Running && s.state == JobState::Running).then_some(())
        }
    })
    .await;
    // Three quick jobs wait behind them, one of them loading a model.
    let mut quick = Vec::new();
    let mut with_model = sim_job(5);
    with_model.model = Some("sim-sd15".into());
    quick.push(client.submit(with_model).await.unwrap().job_id);
    for _ in 0..2 {
        quick.push(client.submit(sim_job(5)).await.unwrap().job_id);
    }
    let waiting = eventually("the queue depth to show 3", Duration::from_secs(10), || {
        let urls = [urls[0]];
        async move {
            let b = scrape(&urls).await.remove(0);
            let depth = b.sum(
                "kiln_broker_queue_depth",
                &[("backend", "sim"), ("priority", "0")],
            );
            (depth == 3.0).then_some(b)
        }
    })
    .await;
    assert_eq!(
        waiting.sum("kiln_broker_workers", &[("state", "busy")]),
        2.0,
        "both workers busy while the queue waits"
    );

    client.cancel(hang).await.unwrap();
    for id in quick.iter().chain([&slow]) {
        assert_eq!(client.wait(*id).await.unwrap().state, JobState::Succeeded);
    }
    assert_eq!(client.wait(hang).await.unwrap().state, JobState::Cancelled);

    // A failure, and an out-of-memory job that degrades once and then fails.
    let failed = client
        .submit(sim_job(5).param("fault", "fail"))
        .await
        .unwrap()
        .job_id;
    let mut oom = sim_job(5).param("fault", "oom");
    oom.allow_degrade = true;
    oom.max_attempts = Some(2);
    let oom = client.submit(oom).await.unwrap().job_id;
    for id in [failed, oom] {
        assert_eq!(client.wait(id).await.unwrap().state, JobState::Failed);
    }
    // Two refused requests: a backend no worker has, a job that does not exist.
    let err = client
        .submit(JobSpec::new(Backend::Comfyui, Task::TextToImage).param("prompt", "x"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Unschedulable), "{err}");
    let err = client.get(JobId(999_999)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound), "{err}");

    let mut artifact_bytes = 0;
    for id in quick.iter().chain([&slow]) {
        let snap = client.get(*id).await.unwrap();
        artifact_bytes += snap.artifacts.iter().map(|a| a.size).sum::<u64>();
    }
    assert!(artifact_bytes > 0);

    // Gauges refresh every second: wait for the settled fleet.
    let scrapes = eventually(
        "the queue to drain and workers to idle",
        Duration::from_secs(15),
        || async move {
            let all = scrape(&urls).await;
            let b = &all[0];
            let settled = b.sum("kiln_broker_workers", &[("state", "idle")]) == 2.0
                && b.sum("kiln_broker_queue_depth", &[]) == 0.0
                && b.sum("kiln_broker_artifact_bytes", &[]) as u64 == artifact_bytes
                && b.sum("kiln_broker_requests_refused_total", &[]) >= 2.0;
            settled.then_some(all)
        },
    )
    .await;
    let (b, w1, w2) = (&scrapes[0], &scrapes[1], &scrapes[2]);

    // Broker: jobs by outcome, the histograms' counts, the retry counters.
    let sim = [("backend", "sim")];
    assert_eq!(b.sum("kiln_broker_jobs_submitted_total", &sim), 7.0);
    let finished = |outcome| {
        b.sum(
            "kiln_broker_jobs_finished_total",
            &[("backend", "sim"), ("outcome", outcome)],
        )
    };
    assert_eq!(finished("succeeded"), 4.0);
    assert_eq!(finished("failed"), 2.0);
    assert_eq!(finished("cancelled"), 1.0);
    // Eight starts (the OOM job twice), each after a wait; seven ends after a run.
    assert_eq!(b.sum("kiln_broker_job_attempts_total", &sim), 8.0);
    assert_eq!(b.sum("kiln_broker_job_wait_seconds_count", &sim), 8.0);
    assert_eq!(
        b.sum("kiln_broker_job_wait_seconds_bucket", &[("le", "+Inf")]),
        8.0
    );
    let run_count = |outcome| {
        b.sum(
            "kiln_broker_job_run_seconds_count",
            &[("backend", "sim"), ("outcome", outcome)],
        )
    };
    assert_eq!(run_count("succeeded"), 4.0);
    assert_eq!(run_count("failed"), 2.0);
    assert_eq!(run_count("cancelled"), 1.0);
    // The slow job alone ran 6 s (600 steps of 10 ms).
    assert!(
        b.sum(
            "kiln_broker_job_run_seconds_sum",
            &[("outcome", "succeeded")]
        ) >= 6.0
    );
    assert_eq!(b.sum("kiln_broker_job_requeues_total", &[]), 1.0);
    assert_eq!(b.sum("kiln_broker_oom_retries_total", &[]), 1.0);
    assert_eq!(b.sum("kiln_broker_oom_degrades_total", &[]), 1.0);
    assert_eq!(b.sum("kiln_broker_model_loads_total", &[]), 1.0);
    assert_eq!(
        b.sum(
            "kiln_broker_requests_refused_total",
            &[("code", "unschedulable")]
        ),
        1.0
    );
    assert_eq!(
        b.sum(
            "kiln_broker_requests_refused_total",
            &[("code", "not_found")]
        ),
        1.0
    );
    assert_eq!(b.sum("kiln_broker_workers", &[("state", "busy")]), 0.0);
    assert_eq!(b.sum("kiln_broker_workers", &[("state", "offline")]), 0.0);
    assert!(b.sum("kiln_broker_clients_connected", &[]) >= 1.0);
    assert!(b.sum("kiln_broker_store_commit_seconds_count", &[]) >= 7.0);
    assert!(b.has("kiln_broker_store_log_bytes", &[]));
    assert_eq!(b.families["kiln_broker_job_wait_seconds"], "histogram");
    assert_eq!(b.families["kiln_broker_jobs_finished"], "counter");

    // Workers: attempts and phases add up to what the broker saw.
    let both = |name: &str, labels: &[(&str, &str)]| w1.sum(name, labels) + w2.sum(name, labels);
    assert_eq!(both("kiln_worker_attempts_total", &sim), 8.0);
    assert_eq!(
        both("kiln_worker_attempts_total", &[("outcome", "succeeded")]),
        4.0
    );
    assert_eq!(
        both("kiln_worker_attempts_total", &[("outcome", "failed")]),
        3.0
    );
    assert_eq!(
        both("kiln_worker_attempts_total", &[("outcome", "cancelled")]),
        1.0
    );
    // The sim samples only in the jobs that got past their faults.
    assert_eq!(
        both(
            "kiln_worker_job_phase_seconds_count",
            &[("phase", "sampling")]
        ),
        4.0
    );
    for (w, id) in [(w1, "m1"), (w2, "m2")] {
        assert_eq!(
            w.sum(
                "kiln_worker_backend_healthy",
                &[("worker", id), ("backend", "sim")]
            ),
            1.0
        );
        // Sim workers declare their GPU in the config: no reading, no series.
        for gpu in [
            "kiln_gpu_memory_total_bytes",
            "kiln_gpu_memory_used_bytes",
            "kiln_gpu_utilization_ratio",
            "kiln_gpu_temperature_celsius",
            "kiln_gpu_power_watts",
        ] {
            assert!(!w.has(gpu, &[]), "{gpu} is absent on {id}, not 0");
        }
    }
    assert_eq!(
        both("kiln_worker_resident_models", &[("model", "sim-sd15")]),
        1.0,
        "one worker holds the model it loaded"
    );

    // A worker with a GPU exports its readings: the worker's metrics fed by a fake
    // NVML, served and scraped the same way.
    let gpu = gpu_worker_metrics().await;
    let g = &gpu.scrape;
    assert_eq!(g.sum("kiln_gpu_temperature_celsius", &[]), 64.0);
    assert_eq!(g.sum("kiln_gpu_power_watts", &[]), 287.5);
    assert_eq!(g.sum("kiln_gpu_utilization_ratio", &[]), 0.93);
    assert_eq!(
        g.sum(
            "kiln_gpu_memory_total_bytes",
            &[("name", "NVIDIA GeForce RTX 4090")]
        ),
        24_564.0 * 1024.0 * 1024.0
    );
    assert_eq!(g.families["kiln_gpu_memory_used_bytes"], "gauge");

    // Every metric a Grafana panel queries is one of these.
    let exported: BTreeSet<String> = scrapes.iter().chain([g]).flat_map(Scrape::names).collect();
    let queried = grafana_metrics();
    assert!(queried.len() >= 20, "the dashboard queries {queried:?}");
    let missing: Vec<&String> = queried.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "the Grafana dashboard queries metrics nobody exports: {missing:?}"
    );
}

/// NVML as an RTX 4090 under load answers it.
struct FakeNvml;

impl kiln_worker::gpu::GpuSource for FakeNvml {
    fn device_count(&self) -> Result<u32, kiln_worker::gpu::GpuError> {
        Ok(1)
    }
    fn read(&self, _: u32) -> Result<kiln_worker::gpu::DeviceReading, kiln_worker::gpu::GpuError> {
        Ok(kiln_worker::gpu::DeviceReading {
            name: "NVIDIA GeForce RTX 4090".into(),
            uuid: "GPU-5f2a".into(),
            memory: kiln_worker::gpu::MemoryReading::Known {
                total_bytes: 24_564 * 1024 * 1024,
                free_bytes: 4_000 * 1024 * 1024,
            },
            utilization_pct: Some(93),
            temperature_c: Some(64),
            power_mw: Some(287_500),
        })
    }
}

/// A worker's metrics with a GPU, served on an ephemeral port and scraped.
struct GpuScrape {
    scrape: Scrape,
    _server: kiln_metrics::MetricsServer,
}

async fn gpu_worker_metrics() -> GpuScrape {
    let probe = kiln_worker::gpu::GpuProbe::new(
        Some(Box::new(FakeNvml)),
        None,
        kiln_config::GpuConfig::default(),
        false,
        || None,
    );
    let status = kiln_worker::Status {
        gpu: probe.probe().unwrap(),
        backends: Vec::new(),
        healthy: true,
    };
    let metrics = kiln_worker::metrics::WorkerMetrics::new("gpu-box-gpu0");
    metrics.update(&status, &[]);
    let server = kiln_metrics::serve("127.0.0.1:0".parse().unwrap(), "test", metrics.registry())
        .await
        .unwrap();
    let url = format!("http://{}/metrics", server.addr());
    GpuScrape {
        scrape: scrape(&[url.as_str()]).await.remove(0),
        _server: server,
    }
}

/// The `kiln_*` metric names in every panel query of the shipped dashboard.
fn grafana_metrics() -> BTreeSet<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana/kiln-fleet.json");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("dashboard JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard, &mut exprs);
    assert!(!exprs.is_empty(), "no panel queries in {}", path.display());
    let name = regex::Regex::new(r"\bkiln_[a-z0-9_]+").unwrap();
    exprs
        .iter()
        .flat_map(|e| name.find_iter(e).map(|m| m.as_str().to_string()))
        .collect()
}

fn collect_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("expr" | "query", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::Object(q)) => {
                        if let Some(Value::String(s)) = q.get("query") {
                            out.push(s.clone());
                        }
                    }
                    _ => collect_exprs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|i| collect_exprs(i, out)),
        _ => {}
    }
}
