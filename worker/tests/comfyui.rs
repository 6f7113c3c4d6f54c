//! The ComfyUI backend through a real broker and worker, against the fake ComfyUI
//! of `tests/fixtures/comfyui/fake_comfyui.py` (which replays the behaviour
//! recorded from a real v0.27.0 / v0.3.64 server), and against a real ComfyUI
//! when `KILN_TEST_COMFYUI_URL` is set.

use std::path::Path;
use std::time::Duration;

use kiln_protocol::client::hex;
use kiln_protocol::worker::WorkerState;
use kiln_protocol::{Backend, Client, FailureKind, JobId, JobSnapshot, JobSpec, JobState, Task};
mod common;

use common::comfy::*;
use kiln_testkit::{eventually, free_port, python, BrokerOpts, Scratch};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Follows a job to its end, checking that progress never goes backwards.
async fn run_to_end(client: &Client, id: JobId) -> (JobSnapshot, Vec<f64>) {
    let mut follow = client.follow(id).await.unwrap();
    let mut pcts = Vec::new();
    let mut last = None;
    while let Some(snap) = tokio::time::timeout(Duration::from_secs(60), follow.next())
        .await
        .expect("the job to move on")
    {
        let snap = snap.unwrap();
        if let (JobState::Running, Some(p)) = (snap.state, &snap.progress) {
            pcts.push(p.pct);
        }
        last = Some(snap);
    }
    (last.unwrap(), pcts)
}

async fn succeed(client: &Client, spec: JobSpec) -> (JobSnapshot, Vec<(String, String, Vec<u8>)>) {
    let id = client.submit(spec).await.unwrap().job_id;
    let (done, pcts) = run_to_end(client, id).await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert!(
        pcts.windows(2).all(|w| w[0] <= w[1]),
        "progress is monotone: {pcts:?}"
    );
    let mut files = Vec::new();
    for meta in &done.artifacts {
        let art = client.fetch_artifact(meta.id).await.unwrap();
        assert_eq!(hex(&Sha256::digest(&art.data)), meta.sha256);
        files.push((
            meta.name.clone(),
            meta.media_type.clone(),
            art.data.to_vec(),
        ));
    }
    (done, files)
}

async fn fail(client: &Client, spec: JobSpec) -> JobSnapshot {
    let id = client.submit(spec).await.unwrap().job_id;
    let done = tokio::time::timeout(Duration::from_secs(60), client.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state, JobState::Failed, "{done:?}");
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfyui_brings_home_every_output_kind_with_monotone_progress() {
    let s = Scratch::new();
    let fake = Fake::start(&s, "0.27.0").await;
    let broker = s
        .broker(BrokerOpts {
            heartbeat_ms: 200,
            ..BrokerOpts::default()
        })
        .await;
    let metrics_port = free_port();
    let mut opts = comfy_opts("c1", &format!("url = \"{}\"", fake.url));
    opts.env.push((
        "KILN_WORKER__METRICS_LISTEN".into(),
        format!("127.0.0.1:{metrics_port}"),
    ));
    let _w = s.worker(&broker, opts).await;
    let client = broker.client();
    wait_healthy(&client, "c1").await;

    // Inventory: models by folder, and the templates.
    let workers = client.workers().await.unwrap();
    let inv = &workers[0].backends[0];
    assert!(
        inv.models
            .iter()
            .any(|m| m.name == "sd15.safetensors" && m.kind == "checkpoints"),
        "{inv:?}"
    );
    assert!(inv
        .models
        .iter()
        .any(|m| m.name == "detail.safetensors" && m.kind == "loras"));
    assert!(inv
        .models
        .iter()
        .any(|m| m.name == "text_to_image" && m.kind == "workflow_template"));

    // Text to image through the built-in template, with a LoRA: step progress.
    let mut spec = JobSpec::new(Backend::Comfyui, Task::TextToImage)
        .param("prompt", "a kiln at dusk")
        .param("steps", 60)
        .param("width", 512)
        .param("height", 512);
    spec.model = Some("sd15.safetensors".into());
    spec.loras = vec![kiln_protocol::LoraRef {
        name: "detail.safetensors".into(),
        strength: 0.7,
    }];
    let id = client.submit(spec.clone()).await.unwrap().job_id;
    let mut follow = client.follow(id).await.unwrap();
    let mut stages = Vec::new();
    let mut done = None;
    while let Some(snap) = follow.next().await {
        let snap = snap.unwrap();
        if let Some(p) = &snap.progress {
            stages.push((p.pct, p.stage.clone()));
        }
        done = Some(snap);
    }
    let done = done.unwrap();
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert!(stages.windows(2).all(|w| w[0].0 <= w[1].0), "{stages:?}");
    assert!(
        stages
            .iter()
            .any(|(_, st)| st.starts_with("KSampler ") && st.contains("/60 (node")),
        "{stages:?}"
    );
    assert_eq!(done.artifacts.len(), 1);
    assert_eq!(done.artifacts[0].media_type, "image/png");
    assert!(done.info["seed"].as_u64().is_some());
    assert_eq!(done.info["model"], "sd15.safetensors");
    let worker = client.workers().await.unwrap().remove(0);
    assert_eq!(
        worker.loaded_model.as_deref(),
        Some("sd15.safetensors"),
        "affinity sees the loaded model"
    );
    // A new job without a seed gets a new seed, so the cache cannot answer it.
    let (again, _) = succeed(&client, spec).await;
    assert_ne!(again.info["seed"], done.info["seed"]);

    // Video and animated WebP, both reported under `images` with `animated`.
    let (_, files) = succeed(&client, raw("06_video_mp4_webp")).await;
    let kinds: Vec<&str> = files.iter().map(|(_, t, _)| t.as_str()).collect();
    assert_eq!(kinds, ["video/mp4", "image/webp"], "{files:?}");
    assert_eq!(&files[0].2[4..8], b"ftyp");

    // Audio from an uploaded input.
    let mut audio = raw("09_audio_roundtrip");
    audio.inputs.push(input("tone.wav", "audio/wav"));
    let (_, files) = succeed(&client, audio).await;
    assert_eq!((files.len(), files[0].1.as_str()), (1, "audio/flac"));
    assert_eq!(&files[0].2[..4], b"fLaC");

    // Text output.
    let (_, files) = succeed(&client, raw("05_text_getimagesize")).await;
    assert_eq!(
        files,
        vec![(
            "3_text_0.txt".to_string(),
            "text/plain".to_string(),
            b"320".to_vec()
        )]
    );

    // An upload in a subfolder; the temp preview is not an output next to a saved image.
    let mut sub = raw("10_loadimage_subfolder_preview");
    sub.inputs.push(input("upload_test.png", "image/png"));
    let (_, files) = succeed(&client, sub).await;
    assert_eq!(
        files.len(),
        1,
        "{:?}",
        files.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    assert!(files[0].0.starts_with("from_upload_"), "{}", files[0].0);
    let log = fake.log().await;
    assert!(
        log.iter().any(
            |l| l.starts_with("POST /upload/image kiln/j") && l.ends_with("-1/upload_test.png")
        ),
        "{log:?}"
    );

    // Image to image and text to video through the built-in templates.
    let mut i2i = JobSpec::new(Backend::Comfyui, Task::ImageToImage)
        .param("prompt", "glaze")
        .param("strength", 0.4)
        .param("steps", 5);
    i2i.model = Some("sd15.safetensors".into());
    i2i.inputs.push(input("upload_test.png", "image/png"));
    let (_, files) = succeed(&client, i2i).await;
    assert_eq!(files[0].1, "image/png");
    let mut t2v = JobSpec::new(Backend::Comfyui, Task::TextToVideo)
        .param("prompt", "waves")
        .param("steps", 5)
        .param("frames", 17);
    t2v.model = Some("wan2.1_t2v_1.3B_fp16.safetensors".into());
    let (_, files) = succeed(&client, t2v).await;
    assert_eq!(files[0].1, "video/mp4");

    // The worker timed each job's phases on ComfyUI: eight jobs queued, sampled
    // and downloaded, three of them with inputs to upload.
    let url = format!("http://127.0.0.1:{metrics_port}/metrics");
    let m = kiln_testkit::prometheus::scrape(&[url.as_str()])
        .await
        .remove(0);
    let phase = |p| {
        m.sum(
            "kiln_worker_job_phase_seconds_count",
            &[("backend", "comfyui"), ("phase", p)],
        )
    };
    assert_eq!(
        [
            phase("upload"),
            phase("queued"),
            phase("sampling"),
            phase("download")
        ],
        [3.0, 8.0, 8.0, 8.0]
    );
    assert!(
        m.sum(
            "kiln_worker_job_phase_seconds_sum",
            &[("phase", "sampling")]
        ) > 0.0
    );
    assert_eq!(
        m.sum(
            "kiln_worker_attempts_total",
            &[("backend", "comfyui"), ("outcome", "succeeded")]
        ),
        8.0
    );
    assert_eq!(
        m.sum("kiln_worker_backend_healthy", &[("backend", "comfyui")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfyui_validation_and_runtime_errors_name_the_node() {
    let s = Scratch::new();
    let fake = Fake::start(&s, "0.27.0").await;
    let (broker, _w) = attached(&s, &fake, "c2").await;
    let client = broker.client();

    // Checked against /object_info before anything is queued.
    let mut spec = JobSpec::new(Backend::Comfyui, Task::TextToImage)
        .param("prompt", "x")
        .param("width", 8)
        .param("sampler", "bogus");
    spec.model = Some("sd15.safetensors".into());
    let done = fail(&client, spec).await;
    let err = done.error.unwrap();
    assert_eq!(err.kind, FailureKind::InvalidInput);
    assert!(
        err.message.contains(
            "node 4 (EmptyLatentImage) input width: value 8 is smaller than the minimum 16"
        ),
        "{}",
        err.message
    );
    assert!(err.message.contains("node 5 (KSampler) input sampler_name: value \"bogus\" is not in the list; allowed: \"euler\""), "{}", err.message);
    assert_eq!(done.attempt, 1, "invalid input is not retried");
    let mut unknown = raw("01_empty_invert_save");
    unknown.workflow.as_mut().unwrap()["2"]["class_type"] = json!("NoSuchNode");
    let err = fail(&client, unknown).await.error.unwrap();
    assert!(
        err.message
            .contains("node 2 (NoSuchNode): node class NoSuchNode is not installed"),
        "{}",
        err.message
    );
    assert!(
        !fake
            .log()
            .await
            .iter()
            .any(|l| l.starts_with("POST /prompt")),
        "nothing was queued"
    );

    // What only the server checks comes back from its 400 with the node's details.
    let mut mismatch = JobSpec::new(Backend::Comfyui, Task::Workflow);
    mismatch.workflow = Some(json!({
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
    }));
    let err = fail(&client, mismatch).await.error.unwrap();
    assert_eq!(err.kind, FailureKind::InvalidInput);
    assert!(
        err.message
            .contains("node 3 (SaveImage): return_type_mismatch"),
        "{}",
        err.message
    );

    // A graph that validates but fails at run time (recorded trace 07).
    let mut broken = raw("07_runtime_error_broken_upload");
    broken.inputs.push(input("broken.png", "image/png"));
    let done = fail(&client, broken).await;
    let err = done.error.unwrap();
    assert_eq!(err.kind, FailureKind::Backend);
    assert!(
        err.message
            .contains("node 1 (LoadImage) failed: PIL.UnidentifiedImageError"),
        "{}",
        err.message
    );
    assert_eq!(done.attempt, 1);
}

/// Issue #12: an override naming an input its node lacks, and a graph with more
/// output nodes than the broker keeps, fail once with the node and input (or the
/// count and the setting) named, before anything is queued on ComfyUI; a batch that
/// turns out to make too many files fails once, naming the count, not three times
/// as a retryable upload error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfyui_unknown_override_inputs_and_too_many_outputs_fail_once_with_the_reason() {
    let s = Scratch::new();
    let fake = Fake::start(&s, "0.27.0").await;
    let (broker, _w) = attached(&s, &fake, "c9").await;
    let client = broker.client();
    let queued = |log: Vec<String>| log.iter().filter(|l| l.starts_with("POST /prompt")).count();

    // What the worker's description covers is refused at submit, naming the
    // field, before anything reaches ComfyUI.
    let t2i = || JobSpec::new(Backend::Comfyui, Task::TextToImage).param("prompt", "a fox");
    for (bad, field) in [
        (t2i().param("steps", "abc"), "job.params.steps"),
        (t2i().param("stepz", 10), "job.params.stepz"),
        (
            t2i().param("filename_prefix", "renders/v1..final"),
            "job.params.filename_prefix",
        ),
    ] {
        common::assert_refused_naming(&client, bad, field).await;
    }

    let mut typo = raw("01_empty_invert_save").param("overrides", json!({"1": {"colour": 1}}));
    typo.max_attempts = Some(3);
    let done = fail(&client, typo).await;
    let err = done.error.unwrap();
    assert_eq!(err.kind, FailureKind::InvalidInput);
    assert!(!err.retryable);
    assert!(
        err.message
            .contains("node 1 (EmptyImage) input colour: params.overrides.1.colour: EmptyImage has no input \"colour\""),
        "{}",
        err.message
    );
    assert_eq!(done.tries, 1, "not retried");

    let mut graph = json!({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}});
    for i in 0..65 {
        graph[format!("{}", 10 + i)] = json!({"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": format!("many/{i}")}});
    }
    let mut many = JobSpec::new(Backend::Comfyui, Task::Workflow);
    many.workflow = Some(graph);
    many.max_attempts = Some(3);
    let done = fail(&client, many).await;
    let err = done.error.unwrap();
    assert_eq!(err.kind, FailureKind::InvalidInput);
    assert!(
        err.message.contains("the workflow has 65 output nodes, over the limit of 64 outputs per job (`broker.limits.max_artifacts_per_job`)"),
        "{}",
        err.message
    );
    assert_eq!(done.tries, 1, "not retried");
    assert_eq!(queued(fake.log().await), 0, "nothing was queued");

    // One output node with a batch of 65: only the run can tell.
    let mut batch = JobSpec::new(Backend::Comfyui, Task::Workflow);
    batch.workflow = Some(json!({
        "1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 65, "color": 0}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "batch"}}
    }));
    batch.max_attempts = Some(3);
    let done = fail(&client, batch).await;
    let err = done.error.unwrap();
    assert!(
        err.message
            .contains("the job made 65 outputs, over the limit of 64")
            && err.message.contains("broker.limits.max_artifacts_per_job"),
        "{}",
        err.message
    );
    assert!(!err.retryable);
    assert_eq!(done.tries, 1, "not retried");
    assert_eq!(queued(fake.log().await), 1, "queued once");
}

async fn cancel_and_confirm(client: &Client, id: JobId) -> JobSnapshot {
    client.cancel(id).await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), client.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state, JobState::Cancelled, "{done:?}");
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfyui_cancel_while_running_and_while_pending_uses_the_jobs_api() {
    let s = Scratch::new();
    let fake = Fake::start(&s, "0.27.0").await;
    let (broker, _w) = attached(&s, &fake, "c3").await;
    let client = broker.client();

    let id = client.submit(slow_job(3000)).await.unwrap().job_id;
    wait_progress(&client, id).await;
    cancel_and_confirm(&client, id).await;
    let log = fake.log().await;
    let prompt = log
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("POST /prompt "))
        .unwrap()
        .to_string();
    assert!(
        log.contains(&format!("POST /api/jobs/{prompt}/cancel")),
        "{log:?}"
    );
    // ComfyUI writes the history entry just after the interrupt event that
    // confirmed the cancel, so wait for it.
    let last_message = eventually(
        "the interrupted prompt's history",
        Duration::from_secs(10),
        || {
            let (fake, prompt) = (&fake, &prompt);
            async move {
                let history = fake.get(&format!("/history/{prompt}")).await?;
                let messages = history[prompt.as_str()]["status"]["messages"]
                    .as_array()?
                    .clone();
                messages.last().map(|m| m[0].clone())
            }
        },
    )
    .await;
    assert_eq!(last_message, "execution_interrupted");

    // Pending: someone else's long prompt holds ComfyUI, ours waits in its queue.
    let mut busy = workflow("08_slow_interruptible");
    busy["1"]["inputs"]["batch_size"] = json!(30);
    let resp = fake
        .post("/prompt", json!({"prompt": busy, "client_id": "bystander"}))
        .await;
    assert!(resp.status().is_success());
    let id = client.submit(slow_job(5)).await.unwrap().job_id;
    let queued = eventually(
        "our prompt to wait in ComfyUI's queue",
        Duration::from_secs(20),
        || async {
            let q = fake.get("/queue").await?;
            let pending = q["queue_pending"].as_array()?;
            pending
                .first()
                .and_then(|item| item[1].as_str().map(String::from))
        },
    )
    .await;
    cancel_and_confirm(&client, id).await;
    assert!(fake
        .log()
        .await
        .contains(&format!("POST /api/jobs/{queued}/cancel")));
    assert_eq!(
        fake.get(&format!("/history/{queued}")).await.unwrap(),
        json!({}),
        "a dequeued prompt leaves no history"
    );
    let q = fake.get("/queue").await.unwrap();
    assert_eq!(q["queue_pending"], json!([]));
    assert_eq!(
        q["queue_running"].as_array().unwrap().len(),
        1,
        "the bystander still runs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfyui_v0_3_64_is_cancelled_by_interrupt_and_health_follows_the_server() {
    let s = Scratch::new();
    let mut fake = Fake::start(&s, "0.3.64").await;
    let (broker, _w) = attached(&s, &fake, "c4").await;
    let client = broker.client();
    let (done, _) = succeed(&client, raw("01_empty_invert_save")).await;
    assert_eq!(done.artifacts[0].media_type, "image/png");

    let id = client.submit(slow_job(3000)).await.unwrap().job_id;
    wait_progress(&client, id).await;
    cancel_and_confirm(&client, id).await;
    let log = fake.log().await;
    let prompt = log
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("POST /prompt "))
        .unwrap()
        .to_string();
    assert!(
        log.contains(&format!("POST /interrupt {prompt}")),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.starts_with("POST /queue delete") && l.contains(&prompt)),
        "{log:?}"
    );

    // A ComfyUI that goes away takes the worker out of scheduling until it is
    // back; the restarted server has forgotten every prompt.
    fake.proc.kill9();
    wait_state(&client, "c4", WorkerState::Unhealthy).await;
    fake.proc.restart();
    wait_healthy(&client, "c4").await;
    assert_eq!(
        fake.get(&format!("/history/{prompt}")).await.unwrap(),
        json!({})
    );
    let (done, _) = succeed(&client, raw("05_text_getimagesize")).await;
    assert_eq!(done.attempt, 1);
}

async fn wait_state(client: &Client, id: &str, state: WorkerState) {
    eventually(
        &format!("worker {id} to be {state:?}"),
        Duration::from_secs(30),
        || async {
            let workers = client.workers().await.ok()?;
            workers
                .iter()
                .any(|w| w.worker_id == id && w.state == state)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfyui_websocket_drop_mid_job_reconnects_and_finishes() {
    let s = Scratch::new();
    let fake = Fake::start(&s, "0.27.0").await;
    let (broker, _w) = attached(&s, &fake, "c5").await;
    let client = broker.client();
    let id = client.submit(slow_job(300)).await.unwrap().job_id;
    wait_progress(&client, id).await;
    let dropped = body_json(fake.post("/fake/drop_ws", json!({})).await).await;
    assert_eq!(dropped["dropped"], 1);
    let (done, pcts) = run_to_end(&client, id).await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert!(pcts.windows(2).all(|w| w[0] <= w[1]), "{pcts:?}");
    let sockets: Vec<String> = fake
        .log()
        .await
        .into_iter()
        .filter(|l| l.starts_with("WS "))
        .collect();
    assert!(
        sockets.len() >= 2 && sockets.iter().all(|c| *c == sockets[0]),
        "reconnected with the same client id: {sockets:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfyui_killed_mid_job_in_managed_mode_is_restarted_and_the_job_retried() {
    let s = Scratch::new();
    let broker = s
        .broker(BrokerOpts {
            heartbeat_ms: 200,
            ..BrokerOpts::default()
        })
        .await;
    let dir = s.path().join("managed");
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("comfyui.pid");
    let mut args = fake_args(&dir, "0.27.0");
    let main_py = args.remove(0);
    args.extend(["--pid-file".into(), pid_file.display().to_string()]);
    let toml = format!(
        "mode = \"managed\"\npython = \"{}\"\nmain_py = \"{main_py}\"\nport = {}\nargs = {}\nrestart_min_s = 1\nrestart_max_s = 2\nstart_timeout_s = 30",
        python().display(),
        free_port(),
        serde_json::to_string(&args).unwrap()
    );
    let mut worker = s.worker(&broker, comfy_opts("m1", &toml)).await;
    let client = broker.client();
    wait_healthy(&client, "m1").await;
    let first_pid = std::fs::read_to_string(&pid_file).unwrap();

    let id = client.submit(slow_job(400)).await.unwrap().job_id;
    wait_progress(&client, id).await;
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let done = tokio::time::timeout(Duration::from_secs(90), client.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(done.attempt, 2, "the vanished prompt was retried");
    assert_ne!(
        std::fs::read_to_string(&pid_file).unwrap(),
        first_pid,
        "a new ComfyUI process"
    );
    let log = worker.log();
    assert!(
        log.contains("comfyui[gpu0] fake ComfyUI 0.27.0 listening"),
        "ComfyUI's output is in the worker's log"
    );
    assert!(log.contains("managed ComfyUI is down"), "{log}");

    // The worker stops its ComfyUI when it stops.
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    worker.stop();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(" Z ")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_comfyui_runs_the_reference_workflows() {
    let Ok(url) = std::env::var("KILN_TEST_COMFYUI_URL") else {
        println!("real_comfyui: skipped (set KILN_TEST_COMFYUI_URL=http://host:port to run the weight-free reference workflows against a real ComfyUI)");
        return;
    };
    let s = Scratch::new();
    let broker = s.broker(BrokerOpts::default()).await;
    let _w = s
        .worker(&broker, comfy_opts("real", &format!("url = \"{url}\"")))
        .await;
    let client = broker.client();
    wait_healthy(&client, "real").await;
    for (name, inputs, kinds) in [
        ("01_empty_invert_save", vec![], vec!["image/png"]),
        ("04_progress_ws_preview", vec![], vec!["image/png"; 4]),
        ("05_text_getimagesize", vec![], vec!["text/plain"]),
        ("06_video_mp4_webp", vec![], vec!["video/mp4", "image/webp"]),
        (
            "09_audio_roundtrip",
            vec![input("tone.wav", "audio/wav")],
            vec!["audio/flac"],
        ),
        (
            "10_loadimage_subfolder_preview",
            vec![input("upload_test.png", "image/png")],
            vec!["image/png"],
        ),
    ] {
        let mut spec = raw(name);
        spec.inputs = inputs;
        let (_, files) = succeed(&client, spec).await;
        let got: Vec<&str> = files.iter().map(|(_, t, _)| t.as_str()).collect();
        assert_eq!(got, kinds, "{name}");
        println!("real_comfyui: {name} ok ({} outputs)", files.len());
    }
    let mut broken = raw("07_runtime_error_broken_upload");
    broken.inputs.push(input("broken.png", "image/png"));
    let err = fail(&client, broken).await.error.unwrap();
    assert!(err.message.contains("LoadImage"), "{}", err.message);
}

/// Reads a response body as JSON.
async fn body_json(resp: reqwest::Response) -> Value {
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

/// What a recorded or observed WebSocket frame was, for comparing orders:
/// the JSON type (with the node of `executing`), or `bin<type>`.
fn tokens_of_trace(name: &str) -> Vec<String> {
    let text = std::fs::read_to_string(fixtures().join("traces").join(name)).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| match v["kind"].as_str() {
            Some("text") => Some(token(&v["msg"])),
            Some("binary") => Some(format!("bin{}", v["event_type"])),
            _ => None,
        })
        .collect()
}

fn token(msg: &Value) -> String {
    match msg["type"].as_str().unwrap() {
        "executing" => format!(
            "executing:{}",
            msg["data"]["node"].as_str().unwrap_or("null")
        ),
        other => other.to_string(),
    }
}

/// Opens a socket as `client`, posts `graph`, and returns the frames up to
/// `executing {node: null}` for it.
async fn observe(fake: &Fake, client: &str, graph: &Value) -> Vec<String> {
    use futures::StreamExt;
    let url = format!(
        "{}/ws?clientId={client}",
        fake.url.replace("http://", "ws://")
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let id = uuid::Uuid::new_v4().to_string();
    let mut tokens = Vec::new();
    // The first frame comes before anything is posted.
    let first = ws.next().await.unwrap().unwrap();
    tokens.push(token(
        &serde_json::from_str(first.to_text().unwrap()).unwrap(),
    ));
    let resp = fake
        .post(
            "/prompt",
            json!({"prompt": graph, "client_id": client, "prompt_id": id}),
        )
        .await;
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap());
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if msg.is_binary() {
            let b = msg.into_data();
            tokens.push(format!(
                "bin{}",
                u32::from_be_bytes([b[0], b[1], b[2], b[3]])
            ));
            continue;
        }
        let v: Value = serde_json::from_str(msg.to_text().unwrap()).unwrap();
        tokens.push(token(&v));
        if v["type"] == "executing" && v["data"]["node"].is_null() && v["data"]["prompt_id"] == id {
            return tokens;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_comfyui_replays_the_recorded_message_order() {
    let s = Scratch::new();
    let fake = Fake::start(&s, "0.27.0").await;
    let wf01 = workflow("01_empty_invert_save");
    assert_eq!(
        observe(&fake, "fixture-client-1", &wf01).await,
        tokens_of_trace("ws_trace_01_empty_invert_save.jsonl")
    );
    // The same graph again comes from the cache, with the old file.
    assert_eq!(
        observe(&fake, "fixture-client-1", &wf01).await,
        tokens_of_trace("ws_trace_01b_cached_rerun.jsonl")
    );
    assert_eq!(
        observe(&fake, "fixture-client-1", &workflow("05_text_getimagesize")).await,
        tokens_of_trace("ws_trace_05_text_getimagesize.jsonl")
    );
    assert_eq!(
        observe(
            &fake,
            "fixture-client-1",
            &workflow("04_progress_ws_preview")
        )
        .await,
        tokens_of_trace("ws_trace_04_progress_ws_preview_legacy.jsonl")
    );
    let form = reqwest::multipart::Form::new().part(
        "image",
        reqwest::multipart::Part::bytes(
            std::fs::read(fixtures().join("workflows/inputs/broken.png")).unwrap(),
        )
        .file_name("broken.png"),
    );
    let up = fake
        .http
        .post(format!("{}/upload/image", fake.url))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(
        body_json(up).await,
        json!({"name": "broken.png", "subfolder": "", "type": "input"})
    );
    assert_eq!(
        observe(
            &fake,
            "fixture-client-1",
            &workflow("07_runtime_error_broken_upload")
        )
        .await,
        tokens_of_trace("ws_trace_07_runtime_error.jsonl")
    );
    // Throttled progress (v0.27): the first and the last step, far fewer between.
    let tokens = observe(&fake, "fixture-client-1", &workflow("03_progress_upscale")).await;
    let progress = tokens.iter().filter(|t| *t == "progress").count();
    assert!(
        (2..18).contains(&progress),
        "18 steps gave {progress} progress events"
    );
    let history = fake.get("/history").await.unwrap();
    let upscaled = history.as_object().unwrap().values().filter(|e| {
        e["outputs"]["4"]["images"]
            .as_array()
            .is_some_and(|i| i.len() == 2)
    });
    assert_eq!(upscaled.count(), 1, "two images in one `images` list");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_comfyui_answers_bad_prompts_like_the_recording() {
    let s = Scratch::new();
    let fake = Fake::start(&s, "0.27.0").await;
    let text = std::fs::read_to_string(fixtures().join("traces/invalid_prompts.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&text).unwrap();
    let node_error_types = |v: &Value| -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = v["node_errors"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, e)| {
                        (
                            k.clone(),
                            e["errors"]
                                .as_array()
                                .unwrap()
                                .iter()
                                .map(|x| x["type"].as_str().unwrap().to_string())
                                .collect(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    };
    for case in cases {
        let name = case["case"].as_str().unwrap();
        let path = if name.starts_with("POST /queue") {
            "/queue"
        } else {
            "/prompt"
        };
        let body = match &case["request"] {
            Value::String(raw) => raw.clone(),
            v => v.to_string(),
        };
        let resp = fake
            .http
            .post(format!("{}{path}", fake.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status().as_u16() as u64,
            case["status"].as_u64().unwrap(),
            "{name}"
        );
        let content_type = resp.headers()["content-type"].to_str().unwrap().to_string();
        assert_eq!(
            content_type,
            case["content_type"].as_str().unwrap(),
            "{name}"
        );
        let got = resp.text().await.unwrap();
        let want = &case["response"];
        if let Value::String(raw) = want {
            assert_eq!(&got, raw, "{name}");
            continue;
        }
        let got: Value = serde_json::from_str(&got).unwrap();
        assert_eq!(got["error"]["type"], want["error"]["type"], "{name}: {got}");
        assert_eq!(
            node_error_types(&got),
            node_error_types(want),
            "{name}: {got}"
        );
        for (id, errors) in want["node_errors"].as_object().into_iter().flatten() {
            for (i, e) in errors["errors"].as_array().unwrap().iter().enumerate() {
                let mine = &got["node_errors"][id]["errors"][i];
                if e["type"] != "exception_during_inner_validation" {
                    assert_eq!(mine["details"], e["details"], "{name}");
                }
            }
            assert_eq!(
                got["node_errors"][id]["dependent_outputs"], errors["dependent_outputs"],
                "{name}"
            );
        }
    }
}
