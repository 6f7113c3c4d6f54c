//! The Wan2GP backend end to end: the real broker and worker binaries, the real
//! bridge (written out by the worker) and the fake WanGP package in
//! `tests/fixtures/wan2gp` in place of a Wan2GP install.
//!
//! Python comes from `KILN_TEST_PYTHON` (set by `scripts/test`), else `python3`.

mod common;

use common::wan2gp::*;
use kiln_protocol::{FailureKind, JobState, LoraRef};
use kiln_testkit::{eventually, BrokerOpts, Scratch};
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_stream_progress_the_model_stays_loaded_and_models_are_listed() {
    let OneWorker { client, .. } = &one_worker(&[]).await;
    let models = client.models().await.unwrap();
    let has = |name: &str, kind: &str| {
        models
            .iter()
            .any(|m| m.name == name && m.kind == kind && m.workers == ["w1"])
    };
    assert!(
        has("t2v_2_2", "model_type") && has("i2v_2_2", "model_type") && has("flux", "model_type"),
        "{models:?}"
    );
    assert!(
        has("kiln_style.safetensors", "lora:wan") && has("kiln_ink.safetensors", "lora:flux"),
        "{models:?}"
    );
    assert!(
        !models.iter().any(|m| m.name == "ltx2_22B"),
        "weights not downloaded: not offered"
    );

    // The worker's parameter description is enforced at submit, before any
    // GPU time: each of these is refused naming its field.
    for (key, value, field) in [
        ("seed", json!(-1), "job.params.seed"),
        ("width", json!(100_000), "job.params.width"),
        ("stepz", json!(10), "job.params.stepz"),
    ] {
        let bad = t2v("refused", json!({})).param(key, value);
        common::assert_refused_naming(client, bad, field).await;
    }

    let mut spec = t2v("a kiln at dusk", json!({"steps": 8, "step_s": 0.05}));
    spec.loras.push(LoraRef {
        name: "kiln_style.safetensors".into(),
        strength: 0.5,
    });
    let first = client.submit(spec).await.unwrap().job_id;
    let mut follow = client.follow(first).await.unwrap();
    let mut steps = Vec::new();
    let mut last = None;
    while let Some(snap) = tokio::time::timeout(WAIT, follow.next()).await.unwrap() {
        let snap = snap.unwrap();
        if let Some(p) = &snap.progress {
            if let (Some(step), Some(8)) = (p.step, p.steps) {
                assert!(p.stage.starts_with("Denoising"), "{}", p.stage);
                steps.push(step);
            }
        }
        last = Some(snap);
    }
    let first = last.unwrap();
    assert_eq!(first.state, JobState::Succeeded, "{:?}", first.error);
    assert!(
        steps.len() >= 2,
        "step progress reached the client: {steps:?}"
    );
    assert_eq!(first.artifacts.len(), 1);
    assert_eq!(first.artifacts[0].name, format!("{}-1.mp4", first.job_id));
    assert_eq!(first.artifacts[0].media_type, "video/mp4");
    let settings = recorded(client, &first).await;
    assert_eq!(settings["resolution"], "832x480");
    assert_eq!(settings["loras_multipliers"], "0.5");
    assert_eq!(
        settings["seed"], first.info["seed"],
        "the seed that ran is reported"
    );
    assert!(first.info["generator"].as_str().unwrap().contains("WanGP"));

    let second = client
        .submit(t2v("the same model again", json!({"steps": 2})))
        .await
        .unwrap()
        .job_id;
    let second = finish(client, second).await;
    assert_eq!(second.state, JobState::Succeeded);
    let loads: Vec<&Value> = [&first, &second]
        .iter()
        .map(|s| &s.info["model_load"])
        .collect();
    assert_eq!(
        loads,
        [&json!(true), &json!(false)],
        "one load for two jobs"
    );
    let workers = client.workers().await.unwrap();
    assert_eq!(
        workers[0].loaded_model.as_deref(),
        Some("t2v_2_2"),
        "reported for affinity"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_mid_job_and_a_hung_job_is_killed_and_the_bridge_restarts() {
    // The fake ignores SIGTERM, so the escalation has to go all the way to SIGKILL.
    let OneWorker { client, worker, .. } =
        &one_worker(&[("FAKE_WAN2GP_IGNORE_SIGTERM", "1")]).await;
    let warm = finish(
        client,
        client
            .submit(t2v("warm", json!({"steps": 1})))
            .await
            .unwrap()
            .job_id,
    )
    .await;
    let first_pid = warm.info["bridge_pid"].clone();

    // A job that honours the cancel.
    let id = client
        .submit(t2v("long", json!({"steps": 2000, "step_s": 0.02})))
        .await
        .unwrap()
        .job_id;
    wait_state(client, id, "a few steps", |s| {
        s.progress
            .as_ref()
            .is_some_and(|p| p.step.unwrap_or(0) >= 2)
    })
    .await;
    client.cancel(id).await.unwrap();
    let snap = finish(client, id).await;
    assert_eq!(snap.state, JobState::Cancelled);

    // A job that hangs, deaf to the cancel and to SIGTERM.
    let id = client
        .submit(t2v("stuck", json!({"outcome": "hang"})))
        .await
        .unwrap()
        .job_id;
    wait_state(client, id, "the hung job to start", |s| {
        s.progress
            .as_ref()
            .is_some_and(|p| p.stage.starts_with("Encoding"))
    })
    .await;
    client.cancel(id).await.unwrap();
    assert_eq!(finish(client, id).await.state, JobState::Cancelled);

    let after = finish(
        client,
        client
            .submit(t2v("after", json!({"steps": 1})))
            .await
            .unwrap()
            .job_id,
    )
    .await;
    assert_eq!(after.state, JobState::Succeeded, "{:?}", after.error);
    assert_ne!(after.info["bridge_pid"], first_pid, "a new bridge");
    let log = worker.log();
    assert!(
        log.contains("ignored SIGTERM; sending SIGKILL"),
        "escalated to SIGKILL"
    );
    assert_eq!(
        log.matches("Wan2GP bridge ready").count(),
        2,
        "restarted once (the honoured cancel kept it)"
    );
    assert!(
        log.contains("[wan2gp w1] fake wgp: a C extension writing"),
        "the bridge's output is in the log, prefixed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_restarts_the_bridge_and_the_next_job_succeeds() {
    let OneWorker { client, worker, .. } = &one_worker(&[]).await;
    let mut crash = t2v("boom", json!({"outcome": "crash"}));
    crash.max_attempts = Some(1);
    let snap = finish(client, client.submit(crash).await.unwrap().job_id).await;
    assert_eq!(snap.state, JobState::Failed);
    let error = snap.error.unwrap();
    assert!(
        error.message.contains("exited during the job"),
        "{}",
        error.message
    );

    let next = finish(
        client,
        client
            .submit(t2v("next", json!({"steps": 2})))
            .await
            .unwrap()
            .job_id,
    )
    .await;
    assert_eq!(next.state, JobState::Succeeded, "{:?}", next.error);
    assert_eq!(
        next.info["model_load"], true,
        "a fresh bridge loads the model again"
    );
    assert_eq!(worker.log().matches("Wan2GP bridge ready").count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_moves_the_job_to_a_gpu_with_more_memory() {
    let s = Scratch::new();
    let broker = s.broker(BrokerOpts::default()).await;
    let _big = s.worker(&broker, wan2gp_worker("big", 24_576, &[])).await;
    // This worker's "GPU" runs out of memory on any frame.
    let _small = s
        .worker(
            &broker,
            wan2gp_worker("small", 12_288, &[("FAKE_WAN2GP_OOM_ABOVE_PIXELS", "1")]),
        )
        .await;
    let client = broker.client();
    eventually("both workers' models", WAIT, || async {
        let models = client.models().await.ok()?;
        models
            .iter()
            .any(|m| m.name == "t2v_2_2" && m.workers.len() == 2)
            .then_some(())
    })
    .await;

    // Keep the big GPU busy so the job lands on the small one first.
    let mut blocker = t2v("blocker", json!({"steps": 100_000, "step_s": 0.02}));
    blocker.min_vram_mb = Some(20_000);
    let blocker = client.submit(blocker).await.unwrap().job_id;
    wait_state(&client, blocker, "the blocker on the big GPU", |s| {
        s.state == JobState::Running && s.worker.as_deref() == Some("big")
    })
    .await;

    let id = client
        .submit(t2v("needs memory", json!({"steps": 2})))
        .await
        .unwrap()
        .job_id;
    // Back in the queue after the OOM (with pipelined dispatch the busy big GPU
    // may already hold it as its next job: queued, with attempt 2 on `big`).
    let requeued = wait_state(&client, id, "the OOM on the small GPU", |s| {
        s.state == JobState::Queued && s.error.is_some()
    })
    .await;
    assert_eq!(requeued.tries, 1, "{requeued:?}");
    let oom = requeued.error.clone().unwrap();
    assert_eq!(oom.kind, FailureKind::OutOfMemory, "{}", oom.message);
    assert!(oom.message.contains("unsufficient VRAM"), "{}", oom.message);
    client.cancel(blocker).await.unwrap();

    let done = finish(&client, id).await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert_eq!((done.worker.as_deref(), done.attempt), (Some("big"), 2));
    assert_eq!(done.degrade, 0, "a bigger GPU existed, so no degrade");
    assert!(
        done.history
            .iter()
            .any(|t| t.note.contains("retrying on a GPU with more memory")),
        "{:?}",
        done.history
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_on_the_largest_gpu_steps_down_the_vram_table_when_allowed() {
    let OneWorker { client, .. } = &one_worker(&[]).await;
    // 1280x720 runs out of memory here; anything up to 300,000 pixels fits.
    let spec = || {
        t2v(
            "a big scene",
            json!({"steps": 2, "oom_above_pixels": 300_000}),
        )
        .param("resolution", "1280x720")
        .param("frames", 81)
    };

    let strict = finish(client, client.submit(spec()).await.unwrap().job_id).await;
    assert_eq!(strict.state, JobState::Failed);
    let e = strict.error.unwrap();
    assert_eq!(
        (e.kind, e.retryable),
        (FailureKind::OutOfMemory, false),
        "{}",
        e.message
    );
    assert!(
        e.message.contains("no GPU in the fleet has more"),
        "{}",
        e.message
    );

    let mut lenient = spec();
    lenient.allow_degrade = true;
    let done = finish(client, client.submit(lenient).await.unwrap().job_id).await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert_eq!((done.attempt, done.degrade), (2, 1));
    assert!(
        done.history
            .iter()
            .any(|t| t.note.contains("retrying at the next lower setting")),
        "the job's record says so: {:?}",
        done.history
    );
    // One row down from the 12 GB row (the smallest that fits 1280x720/81): 8 GB.
    assert_eq!(done.info["degrade"], 1);
    assert_eq!(done.info["resolution"], "720x400");
    assert_eq!(done.info["frames"], 73);
    assert_eq!(done.info["profile"], 4.5);
    assert!(done.info["adjusted"]
        .as_str()
        .unwrap()
        .contains("1280x720 with 81 frames"));
    let settings = recorded(client, &done).await;
    assert_eq!(
        (
            settings["resolution"].as_str(),
            settings["video_length"].as_u64()
        ),
        (Some("720x400"), Some(73))
    );
    assert_eq!(
        settings["profile"], "4.5",
        "Wan2GP ran with the lower row's profile"
    );
}

#[test]
fn kiln_gpu_info_shows_the_configured_vram_table() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        "[worker.gpu]\nnvml = false\nname = \"RTX 4080\"\ntotal_vram_mb = 16376\n\
         [[worker.wan2gp.vram_table]]\nmin_vram_mb = 16384\nprofile = 3.5\nmax_resolution = \"1024x576\"\nmax_frames = 81\n\
         [[worker.wan2gp.vram_table]]\nmin_vram_mb = 8192\nprofile = 5\nmax_resolution = \"640x360\"\nmax_frames = 41\n",
    )
    .unwrap();
    let out = std::process::Command::new(kiln_testkit::bin("kiln"))
        .args(["--config", config.to_str().unwrap(), "gpu-info"])
        .env_remove("KILN_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("wan2gp   profile 3.5, video up to 1024x576 and 81 frames"),
        "{text}"
    );
    assert!(text.contains("640x360"), "the whole table is shown: {text}");
    assert!(
        !text.contains("1920x1080"),
        "the configured table replaces the default: {text}"
    );
}
