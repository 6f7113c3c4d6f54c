//! Kiln's overhead against ComfyUI alone (issue #16, item 5).
//!
//! 500 short jobs (a workflow of tens of milliseconds) on the fake ComfyUI of
//! `tests/fixtures/comfyui/fake_comfyui.py`, run twice over, each time on a fresh
//! fake:
//! - **direct**: every prompt posted straight to ComfyUI's queue (`POST /prompt`),
//!   the way a script uses ComfyUI alone; done when the WebSocket says the last
//!   prompt finished;
//! - **through Kiln**: every job submitted to a real `kiln-broker` (durable) with
//!   one `kiln-worker` attached to the fake; done when the client has seen every
//!   job succeed. Once per `worker.pipeline_depth` in `KILN_BENCH_PIPELINE`
//!   (default `0,1`; `default` leaves the setting out, for a worker without it).
//!
//! It prints the wall times, their ratio (Kiln over direct), and the idle gap the
//! generator saw between the end of one prompt and the start of the next, p50 and
//! p99, from the fake's own record of when each prompt started and ended executing
//! (`GET /fake/timings`), with the HTTP requests the client made inside those
//! gaps (when, after the previous prompt ended, and how long each took): the
//! profile of the gap as the generator sees it. Each prompt differs (the colour of its first node), so
//! ComfyUI's node cache does not skip any work.
//!
//!     cargo build --release --bins && cargo bench -p kiln-worker --bench comfyui_overhead
//!     KILN_BENCH_JOBS=100 KILN_BENCH_PIPELINE=1 cargo bench -p kiln-worker --bench comfyui_overhead
//!
//! The binaries are those beside the bench executable (`target/release` under
//! `cargo bench`), and the fake runs on `KILN_TEST_PYTHON` (a Python with aiohttp).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::comfy::{comfy_opts, wait_healthy, workflow, Fake};
use futures::StreamExt;
use kiln_protocol::{Backend, JobSpec, JobState, Task};
use kiln_testkit::{BrokerOpts, Scratch};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Milliseconds per progress step of the fake (its `--step-ms`).
const STEP_MS: &str = "3";

/// The workflow of job `i`: an empty 1024² image, a 2× upscale with a model (9
/// progress steps) and a saved PNG. The colour makes every prompt different.
fn job(i: u64) -> Value {
    let mut w = workflow("03_progress_upscale");
    w["1"]["inputs"]["batch_size"] = json!(1);
    w["1"]["inputs"]["color"] = json!(i % 0xff_ffff);
    w["4"]["inputs"]["filename_prefix"] = json!("bench/overhead");
    w
}

/// What one way of running the jobs measured.
struct Phase {
    name: String,
    wall: Duration,
    /// From the fake: how long each prompt executed, and the gaps between them.
    seen: Seen,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// What the generator saw: each prompt's execution, the idle gaps between them,
/// and what the client asked over HTTP inside those gaps.
struct Seen {
    exec: Vec<Duration>,
    gaps: Vec<Duration>,
    profile: Vec<String>,
}

/// The fake's record of every prompt it executed, in order, and of every request.
async fn timings(fake: &Fake, jobs: u64) -> Seen {
    let t = fake.get("/fake/timings").await.expect("the fake's timings");
    let spans: Vec<(u64, u64)> = t["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["start_ns"].as_u64().unwrap(),
                e["end_ns"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        spans.len() as u64,
        jobs,
        "every job ran exactly once on the generator"
    );
    let exec = spans
        .iter()
        .map(|(s, e)| Duration::from_nanos(e - s))
        .collect();
    let mut gaps: Vec<Duration> = spans
        .windows(2)
        .map(|w| Duration::from_nanos(w[1].0.saturating_sub(w[0].1)))
        .collect();
    gaps.sort();
    // The requests that arrived inside a gap: when (after the previous prompt
    // ended) and for how long, per kind of request.
    let requests: Vec<(u64, u64, String)> = t["requests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let path = r[3].as_str().unwrap();
            let path = path.strip_prefix("/api").unwrap_or(path);
            let first = path.split('/').nth(1).unwrap_or("");
            (
                r[0].as_u64().unwrap(),
                r[1].as_u64().unwrap(),
                format!("{} /{first}", r[2].as_str().unwrap()),
            )
        })
        .collect();
    let mut kinds: std::collections::BTreeMap<String, (Vec<Duration>, Vec<Duration>)> =
        Default::default();
    for w in spans.windows(2) {
        let (from, to) = (w[0].1, w[1].0);
        for (arrived, answered, kind) in &requests {
            if *arrived >= from && *arrived <= to {
                let e = kinds.entry(kind.clone()).or_default();
                e.0.push(Duration::from_nanos(arrived - from));
                e.1.push(Duration::from_nanos(answered.saturating_sub(*arrived)));
            }
        }
    }
    let gap_count = spans.len().saturating_sub(1).max(1);
    let mut profile: Vec<(Duration, String)> = kinds
        .into_iter()
        .map(|(kind, (mut at, mut took))| {
            at.sort();
            took.sort();
            let at50 = percentile(&at, 0.5);
            (
                at50,
                format!(
                    "{kind} ({:.2} per gap) at +{:.2} ms, answered in {:.2} ms",
                    at.len() as f64 / gap_count as f64,
                    ms(at50),
                    ms(percentile(&took, 0.5))
                ),
            )
        })
        .collect();
    profile.sort();
    Seen {
        exec,
        gaps,
        profile: profile.into_iter().map(|(_, p)| p).collect(),
    }
}

async fn direct(s: &Scratch, jobs: u64) -> Phase {
    let fake = Fake::start_with(s, "0.27.0", &["--step-ms", STEP_MS]).await;
    let client_id = uuid::Uuid::new_v4().simple().to_string();
    let ws_url = format!(
        "{}/ws?clientId={client_id}",
        fake.url.replace("http://", "ws://")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();
    let t = Instant::now();
    let mut last = String::new();
    for i in 0..jobs {
        last = uuid::Uuid::new_v4().hyphenated().to_string();
        let resp = fake
            .post(
                "/prompt",
                json!({"prompt": job(i), "client_id": client_id, "prompt_id": last}),
            )
            .await;
        assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    }
    // Done when the last prompt's `executing` with a null node arrives (written
    // after its history, API.md §5).
    while let Some(msg) = ws.next().await {
        let Ok(Message::Text(text)) = msg else {
            continue;
        };
        let v: Value = serde_json::from_str(&text).unwrap();
        if v["type"] == "executing" && v["data"]["node"].is_null() && v["data"]["prompt_id"] == last
        {
            break;
        }
    }
    let wall = t.elapsed();
    Phase {
        name: "direct to ComfyUI's queue".into(),
        wall,
        seen: timings(&fake, jobs).await,
    }
}

async fn through_kiln(s: &Scratch, jobs: u64, depth: Option<u32>) -> Phase {
    let fake = Fake::start_with(s, "0.27.0", &["--step-ms", STEP_MS]).await;
    let broker = s.broker(BrokerOpts::default()).await;
    let id = format!(
        "bench-{}",
        depth.map_or("default".into(), |d| d.to_string())
    );
    let mut opts = comfy_opts(&id, &format!("url = \"{}\"", fake.url));
    if let Some(d) = depth {
        opts.env
            .push(("KILN_WORKER__PIPELINE_DEPTH".into(), d.to_string()));
    }
    let _worker = s.worker(&broker, opts).await;
    let client = broker.client();
    wait_healthy(&client, &id).await;
    let t = Instant::now();
    let mut ids = Vec::with_capacity(jobs as usize);
    for i in 0..jobs {
        let mut spec = JobSpec::new(Backend::Comfyui, Task::Workflow);
        spec.workflow = Some(job(i));
        ids.push(client.submit(spec).await.unwrap().job_id);
    }
    // One client, one worker, one priority: the jobs finish in order, so each wait
    // returns about when its job ends.
    for id in &ids {
        let done = client.wait(*id).await.unwrap();
        assert_eq!(done.state, JobState::Succeeded, "{id}: {:?}", done.error);
    }
    let wall = t.elapsed();
    Phase {
        name: format!(
            "Kiln, 1 worker, pipeline_depth {}",
            depth.map_or("default".into(), |d| d.to_string())
        ),
        wall,
        seen: timings(&fake, jobs).await,
    }
}

fn print(p: &Phase, direct: Option<&Phase>) {
    let mut exec = p.seen.exec.clone();
    exec.sort();
    let busy: Duration = exec.iter().sum();
    let gaps = &p.seen.gaps;
    let ratio = direct.map_or(String::new(), |d| {
        format!(
            "   ratio {:.3} (target <= 1.05)",
            p.wall.as_secs_f64() / d.wall.as_secs_f64()
        )
    });
    println!(
        "{:<36} wall {:>7.2} s{ratio}\n{:<36} prompt p50 {:.1} ms, generator busy {:.1} % of the wall, idle gap p50 {:.3} ms p99 {:.3} ms max {:.3} ms",
        p.name,
        p.wall.as_secs_f64(),
        "",
        ms(percentile(&exec, 0.5)),
        100.0 * busy.as_secs_f64() / p.wall.as_secs_f64(),
        ms(percentile(gaps, 0.5)),
        ms(percentile(gaps, 0.99)),
        ms(gaps.last().copied().unwrap_or_default()),
    );
    for line in &p.seen.profile {
        println!("{:<36}   in the gaps: {line}", "");
    }
}

fn main() {
    let jobs: u64 = std::env::var("KILN_BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let depths: Vec<Option<u32>> = std::env::var("KILN_BENCH_PIPELINE")
        .unwrap_or_else(|_| "0,1".into())
        .split(',')
        .map(|d| match d.trim() {
            "default" => None,
            d => Some(d.parse().expect("KILN_BENCH_PIPELINE: depths, e.g. 0,1")),
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = Scratch::new();
        println!(
            "ComfyUI overhead: {jobs} jobs on the fake ComfyUI (--step-ms {STEP_MS}), direct vs through Kiln"
        );
        let d = direct(&s, jobs).await;
        print(&d, None);
        for depth in depths {
            let k = through_kiln(&s, jobs, depth).await;
            print(&k, Some(&d));
        }
    });
}
