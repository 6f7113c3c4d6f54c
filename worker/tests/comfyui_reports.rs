//! What the ComfyUI backend reports, against the fake ComfyUI (which replays
//! the recorded v0.27.0 message order): the progress of a prompt whose nodes
//! all finish inside the runner's 100 ms progress throttle still shows every
//! node, in order; and a `count` job is one batch drawn from one seed, which is
//! what save_output's manifest says about it.

use std::time::Duration;

use kiln_protocol::{Backend, Event, JobId, JobSpec, JobState, Task};
use kiln_testkit::Scratch;
use serde_json::json;

mod common;
use common::comfy::*;

/// The stages published for `job`, in publication order, until its terminal
/// state; checks that the sequence numbers only go up.
async fn stages_until_done(
    events: &mut kiln_protocol::client::EventStream,
    job: JobId,
) -> (JobState, Vec<String>) {
    let mut stages = Vec::new();
    let mut last_seq = 0;
    loop {
        let event = tokio::time::timeout(Duration::from_secs(30), events.recv())
            .await
            .expect("the job to move on")
            .expect("the event stream to stay open");
        match event {
            Event::JobProgress(p) if p.job_id == job => {
                assert!(p.seq > last_seq, "sequence numbers go up");
                last_seq = p.seq;
                stages.push(p.progress.stage);
            }
            Event::JobState(s) if s.job_id == job => {
                assert!(s.seq > last_seq, "sequence numbers go up");
                last_seq = s.seq;
                if s.state.is_terminal() {
                    return (s.state, stages);
                }
            }
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_of_a_fast_prompt_reaches_the_broker_in_order() {
    let s = Scratch::new();
    let fake = Fake::start(&s, "0.27.0").await;
    let (broker, _w) = attached(&s, &fake, "c1").await;
    let client = broker.client();
    let mut events = client.subscribe("job/").await.unwrap();
    // Three nodes without progress bars: the whole prompt runs in a few
    // milliseconds. A new colour each time, so ComfyUI's cache answers nothing.
    let fast = |color: u32| {
        let mut spec = raw("01_empty_invert_save");
        spec.workflow.as_mut().unwrap()["1"]["inputs"]["color"] = json!(color);
        spec
    };
    // A subscription goes live some time after `subscribe` returns: warm-up
    // jobs run until one's end is seen on it; the next job is the one checked.
    let mut live = false;
    for color in 1..=5 {
        let warm = client.submit(fast(color)).await.unwrap().job_id;
        let done = client.wait(warm).await.unwrap();
        assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
        let seen = tokio::time::timeout(Duration::from_secs(5), async {
            while let Some(event) = events.recv().await {
                if matches!(&event, Event::JobState(s) if s.job_id == warm && s.state.is_terminal())
                {
                    return;
                }
            }
        });
        if seen.await.is_ok() {
            live = true;
            break;
        }
    }
    assert!(live, "the event subscription never went live");

    let id = client.submit(fast(100)).await.unwrap().job_id;
    let (state, stages) = stages_until_done(&mut events, id).await;
    assert_eq!(state, JobState::Succeeded, "{stages:?}");
    let nodes: Vec<&str> = stages
        .iter()
        .map(String::as_str)
        .filter(|st| st.contains("(node "))
        .collect();
    assert_eq!(
        nodes,
        [
            "EmptyImage (node 1 of 3)",
            "ImageInvert (node 2 of 3)",
            "SaveImage (node 3 of 3)"
        ],
        "every node's stage, in order: {stages:?}"
    );
    let pos = |want: &str| stages.iter().position(|st| st.starts_with(want));
    assert!(
        pos("SaveImage") < pos("downloading ") && pos("downloading ") < pos("done"),
        "{stages:?}"
    );
    assert_eq!(stages.last().map(String::as_str), Some("done"));
    // The prompt really was shorter than the throttle: the fake's nodes here
    // take no time (run_ms is the whole attempt, downloads included).
    let snap = client.get(id).await.unwrap();
    eprintln!("fast prompt: run_ms = {}", snap.info["run_ms"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_job_is_one_batch_from_one_seed() {
    let s = Scratch::new();
    let fake = Fake::start(&s, "0.27.0").await;
    let (broker, _w) = attached(&s, &fake, "c2").await;
    let client = broker.client();
    let mut spec = JobSpec::new(Backend::Comfyui, Task::TextToImage)
        .param("prompt", "three tiles")
        .param("steps", 2)
        .param("count", 3)
        .param("seed", 100)
        .param("width", 512)
        .param("height", 512);
    spec.model = Some("sd15.safetensors".into());
    let id = client.submit(spec).await.unwrap().job_id;
    let done = tokio::time::timeout(Duration::from_secs(60), client.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    // One prompt: one sampler seeded 100 over a latent batch of 3.
    let pid = done.info["prompt_id"].as_str().unwrap();
    let history = fake.get(&format!("/history/{pid}")).await.unwrap();
    let graph = &history[pid]["prompt"][2];
    let nodes: Vec<&serde_json::Value> = graph.as_object().unwrap().values().collect();
    let of = |class: &str| -> Vec<&serde_json::Value> {
        nodes
            .iter()
            .copied()
            .filter(|n| n["class_type"] == class)
            .collect()
    };
    assert_eq!(of("KSampler").len(), 1);
    assert_eq!(of("KSampler")[0]["inputs"]["seed"], 100);
    assert_eq!(of("EmptyLatentImage")[0]["inputs"]["batch_size"], 3);
    // Three images in batch order, one seed, and no per-output seeds claimed
    // (which save_output turns into `seed: 100, batch_index: i`).
    let names: Vec<&str> = done.artifacts.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted, "artifacts follow the batch order");
    assert_eq!(done.info["seed"], 100);
    assert!(done.info.get("output_seeds").is_none(), "{:?}", done.info);
}
