//! Wan2GP as it really behaves at the pinned commit, through the real broker,
//! worker and bridge on the corrected fake WanGP: what an idle worker reports as
//! loaded, which failures restart the bridge, how error texts and submit
//! exceptions come back, image names and LoRA ids.

mod common;

use common::wan2gp::*;
use kiln_protocol::{Backend, Client, FailureKind, JobSpec, JobState, LoraRef, Task};
use kiln_testkit::eventually;
use serde_json::json;

/// The worker's record at the broker.
async fn w1(client: &Client) -> kiln_protocol::worker::WorkerInfo {
    client
        .workers()
        .await
        .unwrap()
        .into_iter()
        .find(|w| w.worker_id == "w1")
        .unwrap()
}

/// Waits for two more of the worker's heartbeats to reach the broker (each
/// carries what the bridge's latest heartbeat said is loaded).
async fn two_heartbeats(client: &Client) {
    let seen = w1(client).await.last_seen_ms;
    eventually("two more worker heartbeats", WAIT, || async {
        (w1(client).await.last_seen_ms >= seen + 1500).then_some(())
    })
    .await;
}

/// The bridge's process id, from the info of a successful job.
async fn bridge_pid(client: &Client) -> u64 {
    let id = client
        .submit(t2v("a probe", json!({"steps": 1})))
        .await
        .unwrap()
        .job_id;
    let snap = finish(client, id).await;
    assert_eq!(snap.state, JobState::Succeeded, "{:?}", snap.error);
    snap.info["bridge_pid"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_with_nothing_loaded_reports_no_model() {
    let OneWorker { client, .. } = &one_worker(&[]).await;
    two_heartbeats(client).await;
    assert_eq!(
        w1(client).await.loaded_model,
        None,
        "wgp.transformer_type is \"t2v\" from import on, but nothing is loaded"
    );
    bridge_pid(client).await;
    two_heartbeats(client).await;
    assert_eq!(w1(client).await.loaded_model.as_deref(), Some("t2v_2_2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_cuda_faults_restart_the_bridge_and_error_texts_keep_their_quotes() {
    let OneWorker { client, .. } = &one_worker(&[]).await;
    let pid = bridge_pid(client).await;

    // A bad pass-through setting: WanGP's validation raises a TypeError that
    // escapes the task, reported with stage "runtime".
    let spec = t2v("x", json!({})).param("wan2gp", json!({"guidance_phases": "abc"}));
    let id = client.submit(spec).await.unwrap().job_id;
    let snap = finish(client, id).await;
    let err = snap.error.unwrap();
    assert_eq!(snap.state, JobState::Failed);
    assert_eq!(snap.attempt, 1, "not retried: it would fail the same way");
    assert!(
        err.message
            .contains("'<' not supported between instances of 'int' and 'str'"),
        "the quotes inside the message are kept: {}",
        err.message
    );
    assert!(!err.message.contains("restarting"), "{}", err.message);

    // A generic generation error arrives as the repr of a Gradio error.
    let id = client
        .submit(t2v("x", json!({"outcome": "error"})))
        .await
        .unwrap()
        .job_id;
    let err = finish(client, id).await.error.unwrap();
    assert!(
        err.message.contains(
            "Wan2GP failed: The generation of the video has encountered an error, please check your terminal for more information. 'ValueError: a test failure'"
        ),
        "{}",
        err.message
    );
    assert_eq!(
        bridge_pid(client).await,
        pid,
        "neither failure restarted the bridge"
    );

    // A CUDA fault does.
    let id = client
        .submit(t2v("x", json!({"outcome": "cuda_fault"})))
        .await
        .unwrap()
        .job_id;
    let snap = finish(client, id).await;
    assert!(
        snap.history
            .iter()
            .any(|t| t.note.contains("fatal error and is restarting")),
        "{:?}",
        snap.history
    );
    assert_ne!(
        bridge_pid(client).await,
        pid,
        "a fresh bridge after the fault"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_that_raises_is_answered_at_once() {
    let OneWorker { client, .. } = &one_worker(&[]).await;
    let id = client
        .submit(t2v("x", json!({"submit_raises": "KeyError"})))
        .await
        .unwrap()
        .job_id;
    // The stall watchdog would have answered after 900 s.
    let snap = finish(client, id).await;
    let err = snap.error.unwrap();
    assert_eq!(
        (err.kind, snap.attempt),
        (FailureKind::Backend, 1),
        "{err:?}"
    );
    assert!(
        err.message.contains("refused the job (error): KeyError"),
        "{}",
        err.message
    );
    assert!(!err.message.contains("busy"), "{}", err.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_numbered_jpegs_and_lora_ids_keep_their_family_and_folder() {
    let OneWorker { client, .. } = &one_worker(&[]).await;
    let spec = JobSpec::new(Backend::Wan2gp, Task::TextToImage)
        .param("prompt", "two ink drawings")
        .param("count", 2)
        .param("wan2gp", json!({"_fake": {"steps": 1}}));
    let id = client.submit(spec).await.unwrap().job_id;
    let snap = finish(client, id).await;
    assert_eq!(snap.state, JobState::Succeeded, "{:?}", snap.error);
    let names: Vec<&str> = snap.artifacts.iter().map(|a| a.name.as_str()).collect();
    let stem = format!("{}-1", snap.job_id);
    assert_eq!(names, [format!("{stem}.jpg"), format!("{stem}_1.jpg")]);
    assert!(snap.artifacts.iter().all(|a| a.media_type == "image/jpeg"));

    // The same relative id in two families is two LoRAs.
    let models = client.models().await.unwrap();
    let lora = |kind: &str| {
        models
            .iter()
            .any(|m| m.name == "anime/kiln_ink.safetensors" && m.kind == kind)
    };
    assert!(lora("lora:wan") && lora("lora:flux"), "{models:?}");
    let mut spec = t2v("with a LoRA in a subfolder", json!({"steps": 1}));
    spec.loras.push(LoraRef {
        name: "anime/kiln_ink.safetensors".into(),
        strength: 0.5,
    });
    let id = client.submit(spec).await.unwrap().job_id;
    let snap = finish(client, id).await;
    assert_eq!(snap.state, JobState::Succeeded, "{:?}", snap.error);
    let settings = recorded(client, &snap).await;
    assert_eq!(settings["loras"], json!(["anime/kiln_ink.safetensors"]));
}
