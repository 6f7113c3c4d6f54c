//! Pipelined dispatch on ComfyUI: a held job's prompt waits in ComfyUI's own
//! queue behind the running one, so ComfyUI starts it the moment the GPU is
//! free; a held job taken back leaves that queue without running. Against the
//! fake ComfyUI of `tests/fixtures/comfyui/fake_comfyui.py`, through a real
//! broker and worker (`pipeline_depth` 1, the default).

use std::time::Duration;

use kiln_protocol::{JobId, JobSnapshot, JobState};
use kiln_testkit::{eventually, Scratch};
use serde_json::{json, Value};

mod common;

use common::comfy::*;

/// The id of the prompt waiting in the fake's queue, once there is one.
async fn pending_prompt(fake: &Fake) -> String {
    eventually(
        "a prompt waiting in ComfyUI's queue",
        Duration::from_secs(20),
        || async {
            let q = fake.get("/queue").await?;
            let pending = q["queue_pending"].as_array()?;
            pending
                .first()
                .and_then(|item| item[1].as_str().map(String::from))
        },
    )
    .await
}

async fn finished(client: &kiln_protocol::Client, id: JobId) -> JobSnapshot {
    tokio::time::timeout(Duration::from_secs(60), client.wait(id))
        .await
        .expect("the job ends")
        .unwrap()
}

/// When the fake started and ended executing `prompt_id` (monotonic ns).
fn span(timings: &Value, prompt_id: &str) -> Option<(u64, u64)> {
    timings["prompts"].as_array()?.iter().find_map(|p| {
        (p["prompt_id"] == prompt_id).then(|| {
            (
                p["start_ns"].as_u64().unwrap(),
                p["end_ns"].as_u64().unwrap(),
            )
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_job_waits_in_comfyuis_queue_and_runs_from_there() {
    let s = Scratch::new();
    let fake = Fake::start(&s, "0.27.0").await;
    let (broker, _w) = attached(&s, &fake, "stage1").await;
    let client = broker.client();

    let first = client.submit(slow_job(200)).await.unwrap().job_id;
    wait_progress(&client, first).await;
    let second = client.submit(slow_job(5)).await.unwrap().job_id;
    let staged = pending_prompt(&fake).await;
    let held = client.get(second).await.unwrap();
    assert_eq!(held.state, JobState::Queued, "held, not running: {held:?}");
    assert_eq!(client.get(first).await.unwrap().state, JobState::Running);

    let a = finished(&client, first).await;
    let b = finished(&client, second).await;
    assert_eq!(a.state, JobState::Succeeded, "{a:?}");
    assert_eq!(b.state, JobState::Succeeded, "{b:?}");
    assert_eq!(
        b.info["prompt_id"], staged,
        "the held job ran the prompt it staged"
    );
    let posts = fake
        .log()
        .await
        .iter()
        .filter(|l| l.starts_with("POST /prompt "))
        .count();
    assert_eq!(posts, 2, "each prompt posted once");
    // ComfyUI took it from its own queue: it was there before the first ended.
    let timings = fake.get("/fake/timings").await.unwrap();
    let first_prompt = a.info["prompt_id"].as_str().unwrap();
    let (_, first_end) = span(&timings, first_prompt).expect("the first prompt ran");
    let (second_start, _) = span(&timings, &staged).expect("the staged prompt ran");
    assert!(second_start >= first_end);
    let second_post = timings["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r[2] == "POST" && r[3] == "/prompt")
        .nth(1)
        .expect("two posts")[0]
        .as_u64()
        .unwrap();
    assert!(
        second_post < first_end,
        "the held prompt was posted while the first ran"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_job_taken_back_leaves_comfyuis_queue_without_running() {
    let s = Scratch::new();
    let fake = Fake::start(&s, "0.27.0").await;
    let (broker, _w) = attached(&s, &fake, "stage2").await;
    let client = broker.client();

    let first = client.submit(slow_job(200)).await.unwrap().job_id;
    wait_progress(&client, first).await;
    let second = client.submit(slow_job(5)).await.unwrap().job_id;
    let staged = pending_prompt(&fake).await;

    client.cancel(second).await.unwrap();
    let b = finished(&client, second).await;
    assert_eq!(b.state, JobState::Cancelled, "{b:?}");
    eventually(
        "the staged prompt to leave ComfyUI's queue",
        Duration::from_secs(20),
        || async {
            let q = fake.get("/queue").await?;
            (q["queue_pending"] == json!([])).then_some(())
        },
    )
    .await;
    assert_eq!(
        client.get(first).await.unwrap().state,
        JobState::Running,
        "the running job goes on"
    );

    let a = finished(&client, first).await;
    assert_eq!(a.state, JobState::Succeeded, "{a:?}");
    assert_eq!(
        fake.get(&format!("/history/{staged}")).await.unwrap(),
        json!({}),
        "the taken-back prompt never ran"
    );
    let timings = fake.get("/fake/timings").await.unwrap();
    assert!(span(&timings, &staged).is_none());
}
