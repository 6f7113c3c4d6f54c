//! The supervisor and the real bridge against the fake WanGP package in
//! `tests/fixtures/wan2gp`, in process (no broker): every watchdog, every way a
//! job can end, restarts and recycling.
//!
//! Python comes from `KILN_TEST_PYTHON` (set by `scripts/test`), else `python3`
//! (see `kiln_testkit::python`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::progress::ProgressFeed;
use kiln_config::Wan2gpConfig;
use kiln_protocol::worker::GpuInfo;
use kiln_protocol::{
    Backend as Kind, FailureKind, InputFile, JobId, JobSpec, LoraRef, Progress, Task,
};
use kiln_testkit::{eventually, fixture, python};
use serde_json::{json, Value};

use super::*;

const WAIT: Duration = Duration::from_secs(30);

/// A backend on the fake WanGP with fast timers, in its own scratch folder.
struct Rig {
    backend: Wan2gpBackend,
    dir: tempfile::TempDir,
    jobs: std::sync::atomic::AtomicU64,
}

fn config(tweak: impl FnOnce(&mut Wan2gpConfig)) -> Wan2gpConfig {
    let mut cfg = Wan2gpConfig {
        root: Some(fixture("wan2gp")),
        python: python(),
        heartbeat_s: 0.2,
        heartbeat_timeout_s: 5.0,
        stall_timeout_s: 20.0,
        cancel_grace_s: 5.0,
        kill_grace_s: 2.0,
        progress_interval_s: 0.0,
        ready_timeout_s: 20.0,
        ..Wan2gpConfig::default()
    };
    cfg.env.insert("PYTHONDONTWRITEBYTECODE".into(), "1".into());
    tweak(&mut cfg);
    cfg
}

async fn rig(tweak: impl FnOnce(&mut Wan2gpConfig)) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let place = Placement {
        worker_id: "test".into(),
        work_dir: dir.path().to_path_buf(),
        gpu: Some(GpuInfo {
            name: "test GPU".into(),
            uuid: "GPU-kiln-test".into(),
            total_vram_mb: 24_564,
            free_vram_mb: 24_564,
            ..GpuInfo::default()
        }),
        gpu_index: 0,
    };
    let backend = Wan2gpBackend::new(&config(tweak), &place).unwrap();
    let rig = Rig {
        backend,
        dir,
        jobs: 0.into(),
    };
    rig.wait_healthy().await;
    rig
}

impl Rig {
    async fn wait_healthy(&self) {
        eventually("the bridge to be ready", WAIT, || async {
            self.backend.health().await.healthy.then_some(())
        })
        .await;
    }

    fn starts(&self) -> u32 {
        self.backend.sup.snapshot().starts
    }

    /// Runs a job, returning its result and every distinct progress it showed.
    async fn run_with(
        &self,
        spec: JobSpec,
        cancel: CancellationToken,
    ) -> (Result<RunOutput, RunError>, Vec<Progress>) {
        let n = self.jobs.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        let job = JobRun {
            job_id: JobId(n),
            attempt: 1,
            spec: Arc::new(spec),
            degrade: 0,
            work_dir: self.dir.path().join(format!("job{n}")),
            max_outputs: None,
        };
        let (sink, rx) = ProgressSink::new();
        let seen = tokio::spawn(collect(rx));
        let result = self.backend.run(job, sink, cancel).await;
        (result, seen.await.unwrap())
    }

    async fn run(&self, spec: JobSpec) -> Result<RunOutput, RunError> {
        self.run_with(spec, CancellationToken::new()).await.0
    }
}

async fn collect(mut rx: ProgressFeed) -> Vec<Progress> {
    let mut seen: Vec<Progress> = Vec::new();
    while rx.changed().await.is_ok() {
        for p in rx.drain() {
            if seen.last() != Some(&p) {
                seen.push(p);
            }
        }
    }
    seen.extend(rx.drain());
    seen
}

fn t2v(prompt: &str, fake: Value) -> JobSpec {
    JobSpec::new(Kind::Wan2gp, Task::TextToVideo)
        .param("prompt", prompt)
        .param("resolution", "832x480")
        .param("frames", 33)
        .param("wan2gp", json!({ "_fake": fake }))
}

/// What the fake WanGP recorded about the settings it received.
fn facts_of(out: &RunOutput, index: usize) -> Value {
    let OutputData::File(path) = &out.outputs[index].data else {
        panic!("a file")
    };
    let bytes = std::fs::read(path).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    let start = text.find('{').unwrap();
    let end = text.rfind('}').unwrap();
    serde_json::from_str(&text[start..=end]).unwrap()
}

fn failure(r: Result<RunOutput, RunError>) -> JobError {
    match r {
        Err(RunError::Failed(e)) => e,
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_report_steps_keep_the_model_loaded_and_list_the_inventory() {
    let rig = rig(|_| {}).await;
    let mut spec = t2v(
        "a red fox\n\nin deep snow",
        json!({"steps": 6, "step_s": 0.03}),
    );
    spec.loras.push(LoraRef {
        name: "kiln_style.safetensors".into(),
        strength: 0.7,
    });
    spec = spec.param("seed", 99);
    let (first, progress) = rig.run_with(spec.clone(), CancellationToken::new()).await;
    let first = first.unwrap();
    let steps: Vec<u32> = progress
        .iter()
        .filter_map(|p| p.step.filter(|_| p.steps == Some(6)))
        .collect();
    // Steps of one stage may be merged on the way, so a watcher may miss a step or two.
    assert!(
        steps.len() >= 3 && steps.windows(2).all(|w| w[0] < w[1]),
        "steps arrive in order: {progress:?}"
    );
    assert!(
        progress.windows(2).all(|w| w[0].pct <= w[1].pct),
        "progress never goes back"
    );
    assert!(
        progress
            .iter()
            .any(|p| p.stage.starts_with("Denoising ") && p.stage.ends_with("/6")),
        "{progress:?}"
    );
    assert!(
        progress
            .iter()
            .any(|p| p.stage.to_lowercase().contains("loading model")),
        "{progress:?}"
    );
    assert_eq!(progress.last().map(|p| p.pct), Some(100.0));

    assert_eq!(first.outputs.len(), 1);
    let out = &first.outputs[0];
    assert_eq!(
        (out.name.as_str(), out.media_type.as_str()),
        ("j1-1.mp4", "video/mp4")
    );
    let OutputData::File(path) = &out.data else {
        panic!()
    };
    assert!(
        path.starts_with(rig.dir.path().join("job1")),
        "moved into the attempt's folder: {}",
        path.display()
    );
    let facts = facts_of(&first, 0);
    assert_eq!(
        facts["prompt"], "a red fox\n\nin deep snow",
        "a blank line does not split the prompt"
    );
    assert_eq!(facts["multi_prompts_gen_type"], "FG");
    assert_eq!(facts["seed"], 99);
    assert_eq!(facts["video_length"], 33);
    assert_eq!(facts["profile"], "3", "the 24 GB row's profile");
    assert_eq!(facts["loras"], json!(["kiln_style.safetensors"]));
    assert_eq!(facts["loras_multipliers"], "0.7");
    assert_eq!(
        facts["cuda_visible_devices"], "GPU-kiln-test",
        "pinned to the worker's GPU"
    );
    assert_eq!(first.info["model_load"], true);
    assert!(
        first.info["generator"].as_str().unwrap().contains("WanGP"),
        "{:?}",
        first.info
    );
    assert_eq!(rig.backend.loaded_model().as_deref(), Some("t2v_2_2"));

    let second = rig
        .run(t2v("the same model again", json!({"steps": 2})))
        .await
        .unwrap();
    assert_eq!(second.info["model_load"], false, "the model stayed loaded");
    assert_eq!(second.info["bridge_pid"], first.info["bridge_pid"]);

    let inventory = rig.backend.inventory().await;
    let has = |name: &str, kind: &str| inventory.iter().any(|m| m.name == name && m.kind == kind);
    assert!(
        has("t2v_2_2", "model_type") && has("flux", "model_type"),
        "{inventory:?}"
    );
    assert!(
        has("kiln_style.safetensors", "lora:wan") && has("kiln_ink.safetensors", "lora:flux"),
        "{inventory:?}"
    );
    assert!(
        !inventory.iter().any(|m| m.name == "ltx2_22B"),
        "weights not downloaded: not offered"
    );

    // Refusals name the field.
    let mut bad = t2v("x", json!({}));
    bad.loras.push(LoraRef {
        name: "nope.safetensors".into(),
        strength: 1.0,
    });
    let e = failure(rig.run(bad).await);
    assert!(
        e.message.contains("job.loras[0]") && e.message.contains("kiln_style"),
        "{}",
        e.message
    );
    let mut unknown = t2v("x", json!({}));
    unknown.model = Some("no_such_model".into());
    assert!(failure(rig.run(unknown).await)
        .message
        .contains("job.model"));
    let mut missing = t2v("x", json!({}));
    missing.model = Some("ltx2_22B".into());
    assert!(failure(rig.run(missing).await)
        .message
        .contains("not downloaded"));
    // WanGP's own validation: an explicit "PG" splits on the blank line.
    let pg = t2v("one\n\ntwo", json!({})).param("wan2gp", json!({"multi_prompts_gen_type": "PG"}));
    let e = failure(rig.run(pg).await);
    assert_eq!(
        (e.kind, e.retryable),
        (FailureKind::InvalidInput, false),
        "{}",
        e.message
    );
    assert_eq!(rig.starts(), 1, "nothing above needed a restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_to_image_and_image_to_video() {
    let rig = rig(|_| {}).await;
    let spec = JobSpec::new(Kind::Wan2gp, Task::TextToImage)
        .param("prompt", "an ink drawing of a kiln")
        .param("count", 2)
        .param("wan2gp", json!({"_fake": {"steps": 2}}));
    let out = rig.run(spec).await.unwrap();
    assert_eq!(out.outputs.len(), 2);
    assert!(out.outputs.iter().all(|o| o.media_type == "image/jpeg"));
    let facts = facts_of(&out, 0);
    assert_eq!(
        facts["model_type"], "flux",
        "the default text-to-image model"
    );
    assert_eq!(
        facts["resolution"], "1024x1024",
        "the model's default resolution"
    );

    let mut spec = JobSpec::new(Kind::Wan2gp, Task::ImageToVideo)
        .param("prompt", "it starts to move")
        .param("wan2gp", json!({"_fake": {"steps": 2}}));
    assert!(failure(rig.run(spec.clone()).await)
        .message
        .contains("job.inputs"));
    spec.inputs.push(InputFile {
        name: "start.png".into(),
        media_type: "image/png".into(),
        data: b"\x89PNG fake".to_vec(),
    });
    let out = rig.run(spec).await.unwrap();
    let facts = facts_of(&out, 0);
    assert_eq!(facts["model_type"], "i2v_2_2");
    let start = facts["image_start"].as_str().unwrap();
    assert!(
        Path::new(start).is_absolute() && start.ends_with("input_start.png"),
        "{start}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_fatal_errors_crashes_and_stdout_are_told_apart() {
    let rig = rig(|_| {}).await;
    let e = failure(rig.run(t2v("x", json!({"outcome": "oom"}))).await);
    assert_eq!(
        (e.kind, e.retryable),
        (FailureKind::OutOfMemory, true),
        "{}",
        e.message
    );
    assert!(e.message.contains("unsufficient VRAM"), "{}", e.message);
    let e = failure(rig.run(t2v("x", json!({"outcome": "error"}))).await);
    assert_eq!(
        (e.kind, e.retryable),
        (FailureKind::Backend, false),
        "{}",
        e.message
    );
    assert_eq!(rig.starts(), 1, "OOM and ordinary errors keep the bridge");

    let out = rig
        .run(t2v("chatty", json!({"stdout": true, "steps": 2})))
        .await
        .unwrap();
    assert_eq!(
        out.outputs.len(),
        1,
        "stray stdout does not corrupt the channel"
    );

    let e = failure(rig.run(t2v("x", json!({"outcome": "cuda_fault"}))).await);
    assert_eq!(
        (e.kind, e.retryable),
        (FailureKind::Backend, true),
        "{}",
        e.message
    );
    assert!(e.message.contains("illegal memory access"), "{}", e.message);
    rig.wait_healthy().await;
    let ok = rig
        .run(t2v("after the fault", json!({"steps": 1})))
        .await
        .unwrap();
    assert_eq!(rig.starts(), 2, "a fatal CUDA error restarts the bridge");
    assert_eq!(
        ok.info["model_load"], true,
        "a new bridge loads the model again"
    );

    let e = failure(rig.run(t2v("x", json!({"outcome": "crash"}))).await);
    assert_eq!(
        (e.kind, e.retryable),
        (FailureKind::Backend, true),
        "{}",
        e.message
    );
    assert!(e.message.contains("exited"), "{}", e.message);
    rig.run(t2v("after the crash", json!({"steps": 1})))
        .await
        .unwrap();
    assert_eq!(rig.starts(), 3);

    let e = failure(rig.run(t2v("x", json!({"outcome": "pollute"}))).await);
    assert!(e.message.contains("polluted"), "{}", e.message);
    rig.run(t2v("after the pollution", json!({"steps": 1})))
        .await
        .unwrap();
    assert_eq!(rig.starts(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_a_model_load_takes_effect_after_the_load() {
    // WanGP cannot interrupt a load (22 s seen on a real one): the cancel is
    // honoured once the weights are in, within cancel_grace, so the bridge stays
    // and the model it loaded stays warm for the next job.
    let rig = rig(|c| c.cancel_grace_s = 30.0).await;
    let cancel = CancellationToken::new();
    let job = JobRun {
        job_id: JobId(900),
        attempt: 1,
        spec: Arc::new(t2v(
            "slow load",
            json!({"load_s": 1.5, "steps": 500, "step_s": 0.02}),
        )),
        degrade: 0,
        work_dir: rig.dir.path().join("job900"),
        max_outputs: None,
    };
    let (sink, mut rx) = ProgressSink::new();
    let run = rig.backend.run(job, sink, cancel.clone());
    let cancel_while_loading = async {
        loop {
            rx.changed().await.unwrap();
            let loading = rx
                .latest()
                .as_ref()
                .is_some_and(|p| p.stage.to_ascii_lowercase().contains("loading"));
            if loading {
                cancel.cancel();
                return;
            }
        }
    };
    let (r, ()) = tokio::join!(run, cancel_while_loading);
    assert_eq!(r.unwrap_err(), RunError::Cancelled);
    let next = rig.run(t2v("next", json!({"steps": 1}))).await.unwrap();
    assert_eq!(
        next.info["model_load"], false,
        "the interrupted job's load completed"
    );
    assert_eq!(
        rig.starts(),
        1,
        "the cancel was honoured after the load, no kill"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_a_job_and_escalates_to_kill_when_it_hangs() {
    let rig = rig(|c| {
        c.cancel_grace_s = 0.5;
        c.kill_grace_s = 0.5;
        c.env
            .insert("FAKE_WAN2GP_IGNORE_SIGTERM".into(), "1".into());
    })
    .await;
    // A job that honours the cancel: the bridge stays.
    let cancel = CancellationToken::new();
    let (result, progress) = {
        let c = cancel.clone();
        let run = rig.run_with(t2v("long", json!({"steps": 500, "step_s": 0.02})), c);
        let cancel_after_a_step = async {
            eventually("a step", WAIT, || async {
                rig.backend
                    .sup
                    .snapshot()
                    .loaded_model
                    .is_some()
                    .then_some(())
            })
            .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            cancel.cancel();
        };
        let (r, ()) = tokio::join!(run, cancel_after_a_step);
        r
    };
    assert_eq!(result.unwrap_err(), RunError::Cancelled);
    assert!(
        progress.iter().all(|p| p.step.is_none_or(|s| s < 500)),
        "stopped early"
    );
    rig.run(t2v("next", json!({"steps": 1}))).await.unwrap();
    assert_eq!(rig.starts(), 1, "an honoured cancel keeps the bridge");

    // A hung job deaf to cancel and to SIGTERM: run() still returns at once, then
    // the group is killed and the bridge restarts.
    let cancel = CancellationToken::new();
    let hung = {
        let c = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            c.cancel();
        });
        rig.run_with(t2v("stuck", json!({"outcome": "hang"})), cancel.clone())
    };
    let started = std::time::Instant::now();
    let (result, _) = hung.await;
    assert_eq!(result.unwrap_err(), RunError::Cancelled);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "run() returns promptly on cancel"
    );
    let before = rig.backend.sup.snapshot().ready.unwrap().pid;
    let next = rig
        .run(t2v("after the kill", json!({"steps": 1})))
        .await
        .unwrap();
    assert_eq!(rig.starts(), 2, "the hung bridge was killed and restarted");
    assert_ne!(next.info["bridge_pid"], json!(before));
    assert!(!process_alive(before), "the old bridge is gone");
}

fn process_alive(pid: u32) -> bool {
    // Signal 0 checks existence; a zombie would still count, so read its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.split(") ").nth(1).unwrap_or("").starts_with('Z'))
        .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdogs_kill_stalled_jobs_and_wedged_bridges() {
    let rig = rig(|c| {
        c.stall_timeout_s = 0.7;
        c.heartbeat_timeout_s = 1.0;
        c.kill_grace_s = 0.5;
    })
    .await;
    let e = failure(rig.run(t2v("stuck", json!({"outcome": "hang"}))).await);
    assert_eq!((e.kind, e.retryable), (FailureKind::Backend, true));
    assert!(e.message.contains("stalled"), "{}", e.message);
    rig.wait_healthy().await;
    assert_eq!(rig.starts(), 2);

    // Freeze the bridge: its heartbeats stop, so it is killed and replaced.
    let pid = rig.backend.sup.snapshot().ready.unwrap().pid;
    unsafe {
        libc::kill(pid as i32, libc::SIGSTOP);
    }
    eventually("a new bridge after the frozen one", WAIT, || async {
        (rig.starts() == 3).then_some(())
    })
    .await;
    rig.wait_healthy().await;
    assert!(!process_alive(pid));
    rig.run(t2v("alive again", json!({"steps": 1})))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_starts_are_reported_and_jobs_fail_fast() {
    let broken = Wan2gpBackend::new(
        &config(|c| {
            c.env.insert("FAKE_WAN2GP_INIT_FAIL".into(), "1".into());
        }),
        &Placement {
            worker_id: "t".into(),
            work_dir: tempfile::tempdir().unwrap().keep(),
            gpu: None,
            gpu_index: 3,
        },
    )
    .unwrap();
    let detail = eventually("the start to fail", WAIT, || async {
        broken
            .health()
            .await
            .detail
            .filter(|d| d.contains("did not start"))
    })
    .await;
    assert!(
        detail.contains("Incorrect version of mmgp"),
        "WanGP's own words: {detail}"
    );
    let job = JobRun {
        job_id: JobId(1),
        attempt: 1,
        spec: Arc::new(t2v("x", json!({}))),
        degrade: 0,
        work_dir: std::env::temp_dir(),
        max_outputs: None,
    };
    let (sink, _rx) = ProgressSink::new();
    let e = failure(broken.run(job, sink, CancellationToken::new()).await);
    assert!(
        e.retryable && e.message.contains("not running"),
        "{}",
        e.message
    );
    broken.shutdown().await;

    let slow = Wan2gpBackend::new(
        &config(|c| {
            c.ready_timeout_s = 0.5;
            c.env.insert("FAKE_WAN2GP_INIT_S".into(), "20".into());
        }),
        &Placement {
            worker_id: "t".into(),
            work_dir: tempfile::tempdir().unwrap().keep(),
            gpu: None,
            gpu_index: 0,
        },
    )
    .unwrap();
    eventually("the ready timeout", WAIT, || async {
        slow.health()
            .await
            .detail
            .filter(|d| d.contains("no `ready` within"))
    })
    .await;
    slow.shutdown().await;

    let err = Wan2gpBackend::new(
        &Wan2gpConfig {
            root: Some(std::env::temp_dir()),
            ..Wan2gpConfig::default()
        },
        &Placement {
            worker_id: "t".into(),
            work_dir: std::env::temp_dir(),
            gpu: None,
            gpu_index: 0,
        },
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("shared/api.py"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycling_and_warm_up() {
    let rig = rig(|c| {
        c.recycle_after_jobs = 2;
        c.warmup_model = Some("t2v_2_2".into());
    })
    .await;
    eventually("the warm-up to load the model", WAIT, || async {
        rig.backend.loaded_model().filter(|m| m == "t2v_2_2")
    })
    .await;
    let a = rig.run(t2v("one", json!({"steps": 1}))).await.unwrap();
    assert_eq!(
        a.info["model_load"], false,
        "warmed up before the first job"
    );
    let b = rig.run(t2v("two", json!({"steps": 1}))).await.unwrap();
    assert_eq!(a.info["bridge_pid"], b.info["bridge_pid"]);
    // Two jobs (warm-ups do not count) reached the limit: recycled after job two.
    let c = rig.run(t2v("three", json!({"steps": 1}))).await.unwrap();
    assert_ne!(b.info["bridge_pid"], c.info["bridge_pid"], "recycled");
    assert_eq!(rig.starts(), 2);
    rig.backend.shutdown().await;
    assert!(!rig.backend.health().await.healthy);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recycling_by_memory_size() {
    // Any Python process is bigger than 1 MiB, so every job is followed by a recycle.
    let rig = rig(|c| c.recycle_rss_mb = 1).await;
    eventually("a heartbeat with the bridge's memory", WAIT, || async {
        rig.backend.sup.snapshot().rss_mb
    })
    .await;
    let a = rig.run(t2v("one", json!({"steps": 1}))).await.unwrap();
    rig.wait_healthy().await;
    let b = rig.run(t2v("two", json!({"steps": 1}))).await.unwrap();
    assert_ne!(a.info["bridge_pid"], b.info["bridge_pid"]);
}

/// Talks the bridge protocol directly, command by command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_speaks_the_protocol() {
    use super::process::{Incoming, Process};
    use super::protocol::{FromBridge, ToBridge};

    let dir = tempfile::tempdir().unwrap();
    let place = Placement {
        worker_id: "t".into(),
        work_dir: dir.path().into(),
        gpu: None,
        gpu_index: 0,
    };
    let (launch, row) = prepare(&config(|c| c.heartbeat_s = 30.0), &place).unwrap();
    assert_eq!(row, 4, "an unknown GPU gets the smallest row");
    let mut p = Process::spawn(&launch).unwrap();
    async fn next(p: &mut Process) -> FromBridge {
        loop {
            match tokio::time::timeout(WAIT, p.rx.recv())
                .await
                .expect("a message")
                .expect("open")
            {
                Incoming::Msg(FromBridge::Heartbeat(_) | FromBridge::Log(_)) => continue,
                Incoming::Msg(m) => return m,
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    async fn ask(p: &mut Process, req_id: u64, op: &str, args: Value) -> Result<Value, String> {
        p.send(&ToBridge::Query {
            req_id,
            op: op.into(),
            args,
        })
        .await
        .unwrap();
        match next(p).await {
            FromBridge::Reply {
                req_id: r,
                data,
                error,
            } if r == req_id => error.map_or(Ok(data.unwrap_or(Value::Null)), Err),
            other => panic!("expected the reply to {req_id}, got {other:?}"),
        }
    }
    let FromBridge::Ready(ready) = next(&mut p).await else {
        panic!("ready first")
    };
    assert_eq!(ready.cli_args, ["--profile", "5"]);
    assert_eq!(ready.wangp_version.as_deref(), Some("12.60-kiln-fake"));

    p.send(&ToBridge::Ping { req_id: 1 }).await.unwrap();
    assert_eq!(next(&mut p).await, FromBridge::Pong { req_id: 1 });
    let images = ask(&mut p, 2, "list_models", json!({"main_output": "image"}))
        .await
        .unwrap();
    assert_eq!(images.as_array().unwrap().len(), 1);
    assert_eq!(images[0]["model_type"], "flux");
    let schema = ask(&mut p, 3, "model_schema", json!({"model_type": "t2v_2_2"}))
        .await
        .unwrap();
    assert_eq!(schema["metadata"]["frames_minimum"], 5);
    let defaults = ask(
        &mut p,
        4,
        "default_settings",
        json!({"model_type": "t2v_2_2"}),
    )
    .await
    .unwrap();
    assert_eq!(defaults["resolution"], "832x480");
    let loras = ask(&mut p, 5, "list_loras", json!({"model_type": "t2v_2_2"}))
        .await
        .unwrap();
    assert_eq!(
        loras["loras"],
        json!([
            "anime/kiln_ink.safetensors",
            "kiln_motion.safetensors",
            "kiln_style.safetensors"
        ]),
        "relative to the family's folder, subfolders included, sorted without case"
    );
    let missing = ask(&mut p, 6, "availability", json!({"model_type": "ltx2_22B"}))
        .await
        .unwrap();
    assert_eq!(missing["available"], false);
    assert!(
        ask(&mut p, 7, "default_settings", json!({"model_type": "nope"}))
            .await
            .unwrap_err()
            .contains("Unknown model_type")
    );
    assert!(ask(&mut p, 8, "format_disk", json!({}))
        .await
        .unwrap_err()
        .contains("unknown query"));

    let submit = |job_id: &str, settings: Value| ToBridge::Submit {
        job_id: job_id.into(),
        settings: settings.as_object().unwrap().clone(),
        want_preview: false,
    };
    p.send(&submit("bad", json!({"prompt": "no model"})))
        .await
        .unwrap();
    assert!(
        matches!(next(&mut p).await, FromBridge::Rejected { reason, .. } if reason == "bad_request")
    );
    let slow =
        json!({"model_type": "t2v_2_2", "prompt": "x", "_fake": {"steps": 1000, "step_s": 0.02}});
    p.send(&submit("a", slow.clone())).await.unwrap();
    assert_eq!(
        next(&mut p).await,
        FromBridge::Accepted { job_id: "a".into() }
    );
    p.send(&submit("b", slow)).await.unwrap();
    p.send(&ToBridge::Query {
        req_id: 9,
        op: "inventory".into(),
        args: Value::Null,
    })
    .await
    .unwrap();
    p.send(&ToBridge::Cancel { job_id: "a".into() })
        .await
        .unwrap();
    let mut seen = Vec::new();
    loop {
        match next(&mut p).await {
            FromBridge::Progress(_) | FromBridge::Status(_) | FromBridge::Info(_) => {}
            FromBridge::Cancelled { job_id } => {
                seen.push(format!("cancelled {job_id}"));
                break;
            }
            FromBridge::Rejected { job_id, reason, .. } => {
                seen.push(format!("rejected {job_id} {reason}"))
            }
            FromBridge::Reply { req_id, error, .. } => {
                seen.push(format!("reply {req_id} {}", error.unwrap_or_default()))
            }
            FromBridge::CancelAck { job_id } => seen.push(format!("cancel_ack {job_id}")),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            "rejected b busy",
            "reply 9 busy: queries are answered between jobs",
            "cancel_ack a",
            "cancelled a"
        ]
    );

    p.send(&ToBridge::Warmup {
        job_id: "w".into(),
        model_type: "flux".into(),
    })
    .await
    .unwrap();
    assert_eq!(
        next(&mut p).await,
        FromBridge::Accepted { job_id: "w".into() }
    );
    let result = loop {
        match next(&mut p).await {
            FromBridge::Result(r) => break r,
            FromBridge::Progress(_) | FromBridge::Status(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(result.loaded_model.as_deref(), Some("flux"));
    assert!(Path::new(&result.files[0]).is_file());

    p.send(&ToBridge::Unload { req_id: 10 }).await.unwrap();
    assert!(matches!(
        next(&mut p).await,
        FromBridge::Reply {
            req_id: 10,
            error: None,
            ..
        }
    ));
    p.send(&ToBridge::Shutdown { grace_s: 1.0 }).await.unwrap();
    assert_eq!(next(&mut p).await, FromBridge::Bye);
    assert!(p.wait_exit(WAIT).await.unwrap().success());
}
