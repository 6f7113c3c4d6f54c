//! How a ComfyUI worker stops, through a real broker, real workers and the fake
//! ComfyUI: SIGTERM and SIGKILL of attach-mode and managed workers in the
//! middle of a job leave no prompt running and no orphan server, the broker
//! hears the goodbye, and the retry runs at once. Also: a managed worker never
//! adopts a server it did not start, a GPU declared in `[worker.gpu]` is what
//! the broker schedules on, and an attempt's uploads do not stay in ComfyUI's
//! input folder.

mod common;

use std::path::Path;
use std::time::Duration;

use common::comfy::*;
use kiln_protocol::worker::{GpuSource, WorkerState};
use kiln_protocol::{Backend, Client, JobId, JobSnapshot, JobSpec, JobState, Task};
use kiln_testkit::{eventually, free_port, python, Broker, BrokerOpts, Proc, Scratch};
use serde_json::Value;

/// A broker whose heartbeats are slow enough that only a goodbye (not the
/// liveness timeout of three heartbeats) can requeue a job within the waits below.
async fn slow_beat_broker(s: &Scratch) -> Broker {
    s.broker(BrokerOpts {
        heartbeat_ms: 4000,
        ..BrokerOpts::default()
    })
    .await
}

/// A broker that notices a killed worker within a second.
async fn fast_beat_broker(s: &Scratch) -> Broker {
    s.broker(BrokerOpts {
        heartbeat_ms: 200,
        ..BrokerOpts::default()
    })
    .await
}

async fn attach(s: &Scratch, broker: &Broker, fake: &Fake, id: &str) -> Proc {
    let w = s
        .worker(broker, comfy_opts(id, &format!("url = \"{}\"", fake.url)))
        .await;
    wait_healthy(&broker.client(), id).await;
    w
}

/// Prompts the fake saw abandoned by their client: queued/running ones and
/// finished ones nobody collected.
async fn abandoned(fake: &Fake) -> (Vec<Value>, Vec<Value>) {
    let v = fake.get("/fake/abandoned").await.unwrap();
    (
        v["queued"].as_array().unwrap().clone(),
        v["finished"].as_array().unwrap().clone(),
    )
}

/// The client ids of the prompts queued or running on the fake.
async fn queued_clients(fake: &Fake) -> Vec<String> {
    let q = fake.get("/queue").await.unwrap();
    ["queue_running", "queue_pending"]
        .iter()
        .flat_map(|k| q[*k].as_array().unwrap().clone())
        .map(|item| item[3]["client_id"].as_str().unwrap_or("").to_string())
        .collect()
}

async fn queue_is_empty(fake: &Fake) -> bool {
    let q = fake.get("/queue").await.unwrap();
    q["queue_running"].as_array().unwrap().is_empty()
        && q["queue_pending"].as_array().unwrap().is_empty()
}

async fn wait_attempt(client: &Client, id: JobId, attempt: u32, within: Duration) -> JobSnapshot {
    eventually(
        &format!("attempt {attempt} of {id} to run"),
        within,
        || async {
            let j = client.get(id).await.ok()?;
            (j.attempt >= attempt && j.state != JobState::Queued).then_some(j)
        },
    )
    .await
}

fn is_gone(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

fn read_pid(file: &Path) -> i32 {
    std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_an_attached_worker_cancels_the_prompt_says_goodbye_and_the_retry_runs_at_once()
{
    let s = Scratch::new();
    let fake = Fake::start(&s, "0.27.0").await;
    let broker = slow_beat_broker(&s).await;
    let client = broker.client();
    let mut w1 = attach(&s, &broker, &fake, "t1").await;

    let id = client.submit(slow_job(600)).await.unwrap().job_id;
    wait_progress(&client, id).await;
    let w2 = attach(&s, &broker, &fake, "t2").await;

    let status = w1.stop().expect("the worker was running");
    assert!(status.success(), "a clean exit: {status:?}");
    let left = queued_clients(&fake).await;
    assert!(
        !left.iter().any(|c| c.starts_with("kiln-t1-")),
        "the prompt was cancelled before the worker exited: {left:?}"
    );
    // With heartbeats every 4 s the broker would notice the loss only after 12 s.
    let retry = wait_attempt(&client, id, 2, Duration::from_secs(8)).await;
    assert_eq!(retry.worker.as_deref(), Some("t2"), "{retry:?}");
    let done = tokio::time::timeout(Duration::from_secs(60), client.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    assert_eq!(done.attempt, 2);
    assert!(
        done.history
            .iter()
            .any(|t| t.note.contains("said goodbye") && t.note.contains("was stopped")),
        "{:?}",
        done.history
    );
    assert_eq!(
        abandoned(&fake).await,
        (vec![], vec![]),
        "no prompt ran on for a worker that is gone"
    );
    let log = w1.log();
    assert!(
        log.contains("stopping the running job before exiting"),
        "{log}"
    );

    // An idle worker's goodbye arrives too.
    drop(w2);
    let mut w3 = attach(&s, &broker, &fake, "t3").await;
    w3.stop();
    eventually(
        "the broker to see t3 offline",
        Duration::from_secs(6),
        || async {
            let workers = client.workers().await.ok()?;
            workers
                .iter()
                .any(|w| w.worker_id == "t3" && w.state == WorkerState::Offline)
                .then_some(())
        },
    )
    .await;
    assert!(
        broker
            .log()
            .contains("worker left: said goodbye: worker shutting down"),
        "{}",
        broker.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_an_attached_worker_leaves_no_prompt_behind_once_it_is_back() {
    let s = Scratch::new();
    let fake = Fake::start(&s, "0.27.0").await;
    let broker = fast_beat_broker(&s).await;
    let client = broker.client();
    let mut w1 = attach(&s, &broker, &fake, "k1").await;
    let id = client.submit(slow_job(3000)).await.unwrap().job_id;
    wait_progress(&client, id).await;
    w1.kill9();
    assert!(
        !queue_is_empty(&fake).await,
        "a killed worker cannot cancel: the prompt runs on"
    );
    // The same worker comes back and cancels what its earlier process left.
    w1.restart();
    eventually(
        "the abandoned prompt to be cancelled",
        Duration::from_secs(20),
        || async { queue_is_empty(&fake).await.then_some(()) },
    )
    .await;
    assert!(
        w1.log()
            .contains("cancelling a prompt left behind by an earlier process"),
        "{}",
        w1.log()
    );
    let retry = wait_attempt(&client, id, 2, Duration::from_secs(20)).await;
    assert_eq!(retry.worker.as_deref(), Some("k1"));
    client.cancel(id).await.unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), client.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state, JobState::Cancelled);
    eventually("the fake to be idle", Duration::from_secs(10), || async {
        queue_is_empty(&fake).await.then_some(())
    })
    .await;
    assert_eq!(abandoned(&fake).await, (vec![], vec![]));
}

/// A managed worker's config, with the fake as its `main.py`.
fn managed_toml(s: &Scratch, name: &str, port: u16) -> (String, std::path::PathBuf) {
    let dir = s.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let pid_file = dir.join("comfyui.pid");
    let mut args = fake_args(&dir, "0.27.0");
    let main_py = args.remove(0);
    args.extend(["--pid-file".into(), pid_file.display().to_string()]);
    let toml = format!(
        "mode = \"managed\"\npython = \"{}\"\nmain_py = \"{main_py}\"\nport = {port}\nargs = {}\nrestart_min_s = 1\nrestart_max_s = 1\nstart_timeout_s = 30",
        python().display(),
        serde_json::to_string(&args).unwrap()
    );
    (toml, pid_file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_comfyui_dies_with_its_worker_and_sigterm_stops_both_cleanly() {
    let s = Scratch::new();
    let broker = fast_beat_broker(&s).await;
    let client = broker.client();
    let port = free_port();
    let (toml, pid_file) = managed_toml(&s, "managed", port);
    let mut worker = s.worker(&broker, comfy_opts("m1", &toml)).await;
    wait_healthy(&client, "m1").await;
    let id = client.submit(slow_job(3000)).await.unwrap().job_id;
    wait_progress(&client, id).await;
    let first = read_pid(&pid_file);

    worker.kill9();
    eventually(
        "the managed ComfyUI to die with its worker",
        Duration::from_secs(10),
        || async { is_gone(first).then_some(()) },
    )
    .await;

    // The next worker starts its own server on the free port; the job retries.
    worker.restart();
    let retry = wait_attempt(&client, id, 2, Duration::from_secs(40)).await;
    assert_eq!(retry.worker.as_deref(), Some("m1"));
    let second = read_pid(&pid_file);
    assert_ne!(first, second, "a server of its own");
    let log = worker.log();
    assert!(!log.contains("not adopting"), "{log}");

    // SIGTERM mid-job: the prompt is cancelled, goodbye said, the server stopped.
    let status = worker.stop().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        is_gone(second),
        "the managed ComfyUI stopped with its worker"
    );
    let snap = client.get(id).await.unwrap();
    assert_eq!(snap.state, JobState::Queued, "{snap:?}");
    assert!(
        snap.history
            .iter()
            .any(|t| t.note.contains("said goodbye") && t.note.contains("was stopped")),
        "{:?}",
        snap.history
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_managed_worker_never_adopts_a_server_it_did_not_start() {
    let s = Scratch::new();
    let broker = fast_beat_broker(&s).await;
    let client = broker.client();
    // Someone else's server (an orphan, another install) holds the port.
    let mut squatter = Fake::start(&s, "0.27.0").await;
    let port: u16 = squatter.url.rsplit(':').next().unwrap().parse().unwrap();
    let (toml, pid_file) = managed_toml(&s, "managed", port);
    let worker = s.worker(&broker, comfy_opts("m2", &toml)).await;
    let detail = eventually(
        "the worker to report the port taken",
        Duration::from_secs(20),
        || async {
            let workers = client.workers().await.ok()?;
            let w = workers.into_iter().find(|w| w.worker_id == "m2")?;
            let b = w.backends.first()?;
            let d = b.detail.clone().unwrap_or_default();
            (!b.healthy && d.contains("not adopting")).then_some(d)
        },
    )
    .await;
    assert!(detail.contains(&port.to_string()), "{detail}");
    assert!(!pid_file.exists(), "no server of its own was started");
    let log = squatter.log().await;
    assert!(
        !log.iter().any(|l| l.starts_with("POST /prompt")),
        "nothing ran on the foreign server: {log:?}"
    );

    // Once the port is free the worker starts its own server and becomes healthy.
    squatter.proc.stop();
    wait_healthy(&client, "m2").await;
    assert!(!is_gone(read_pid(&pid_file)));
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gpu_declared_in_the_config_is_not_overridden_by_comfyui() {
    let s = Scratch::new();
    let fake = Fake::start(&s, "0.27.0").await;
    let broker = fast_beat_broker(&s).await;
    let client = broker.client();
    let opts = kiln_testkit::WorkerOpts {
        vram_mb: 8192,
        ..comfy_opts("g1", &format!("url = \"{}\"", fake.url))
    };
    let _w = s.worker(&broker, opts).await;
    wait_healthy(&client, "g1").await;
    let w = client
        .workers()
        .await
        .unwrap()
        .into_iter()
        .find(|w| w.worker_id == "g1")
        .unwrap();
    assert_eq!(
        (w.gpu.name.as_str(), w.gpu.total_vram_mb, w.gpu.source),
        ("test GPU", 8192, GpuSource::Config),
        "the fake's /system_stats says cpu with 23.5 GiB: {w:?}"
    );
    let mut spec = slow_job(10);
    spec.min_vram_mb = Some(16_000);
    let err = client.submit(spec).await.unwrap_err();
    assert!(err.to_string().contains("16000"), "{err}");
}

fn with_input(name: &str, file: &str) -> JobSpec {
    let mut spec = JobSpec::new(Backend::Comfyui, Task::Workflow);
    spec.workflow = Some(workflow(name));
    spec.inputs.push(input(file, "image/png"));
    spec
}

/// Attach mode with no `input_dir`: the folder is found from the server's
/// command line (the fake, like ComfyUI, echoes it in `/system_stats`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempts_uploads_are_removed_from_the_input_folder_comfyui_names() {
    let s = Scratch::new();
    let fake = Fake::start(&s, "0.27.0").await;
    let port = fake.url.rsplit(':').next().unwrap();
    let input_dir = s.path().join(format!("comfyui-{port}")).join("input");
    let broker = fast_beat_broker(&s).await;
    let client = broker.client();
    let toml = format!("url = \"{}\"", fake.url);
    let w = s.worker(&broker, comfy_opts("u1", &toml)).await;
    wait_healthy(&client, "u1").await;
    let raw = with_input;
    // One that succeeds and one that fails at run time on its upload.
    for (spec, state) in [
        (
            raw("10_loadimage_subfolder_preview", "upload_test.png"),
            JobState::Succeeded,
        ),
        (
            raw("07_runtime_error_broken_upload", "broken.png"),
            JobState::Failed,
        ),
    ] {
        let id = client.submit(spec).await.unwrap().job_id;
        let done = tokio::time::timeout(Duration::from_secs(60), client.wait(id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done.state, state, "{done:?}");
        let uploaded = fake
            .log()
            .await
            .into_iter()
            .filter(|l| l.starts_with(&format!("POST /upload/image kiln/{id}-1/")))
            .count();
        assert_eq!(uploaded, 1, "the input went into the attempt's own folder");
        assert!(
            !input_dir.join(format!("kiln/{id}-1")).exists(),
            "the attempt's uploads were removed"
        );
    }
    assert!(
        input_dir.join("kiln").is_dir(),
        "the fake stored the uploads there"
    );
    let log = w.log();
    assert!(
        log.contains("found ComfyUI's input folder") && log.contains("/system_stats"),
        "the worker says where it found the folder:\n{log}"
    );
}

/// A server whose command line names no folder this host can resolve (a
/// relative `--base-directory`), and an `input_dir` that is not its input
/// folder: nothing is removed, nothing wrong is touched, and the worker says
/// so once, naming the setting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_stay_and_the_worker_says_why_when_it_cannot_see_the_input_folder() {
    let s = Scratch::new();
    let (fake, input_dir) = Fake::start_relative(&s, "0.27.0").await;
    let wrong = s.path().join("not-comfyui-input");
    std::fs::create_dir_all(&wrong).unwrap();
    let broker = fast_beat_broker(&s).await;
    let client = broker.client();
    let toml = format!(
        "url = \"{}\"\ninput_dir = \"{}\"",
        fake.url,
        wrong.display()
    );
    let w = s.worker(&broker, comfy_opts("u2", &toml)).await;
    wait_healthy(&client, "u2").await;
    for _ in 0..2 {
        let spec = with_input("10_loadimage_subfolder_preview", "upload_test.png");
        let id = client.submit(spec).await.unwrap().job_id;
        let done = tokio::time::timeout(Duration::from_secs(60), client.wait(id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(done.state, JobState::Succeeded, "{done:?}");
        assert!(
            input_dir
                .join(format!("kiln/{id}-1/upload_test.png"))
                .is_file(),
            "the upload stays on the server"
        );
    }
    assert_eq!(
        std::fs::read_dir(&wrong).unwrap().count(),
        0,
        "nothing made or touched there"
    );
    let log = w.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("uploads stay on the ComfyUI server"))
        .collect();
    assert_eq!(warnings.len(), 1, "said once:\n{log}");
    assert!(
        warnings[0].contains("worker.comfyui.input_dir")
            && warnings[0].contains("not-comfyui-input"),
        "{}",
        warnings[0]
    );
}
