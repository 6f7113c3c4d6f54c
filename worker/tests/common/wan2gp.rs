//! What the Wan2GP tests share: a worker whose `[worker.wan2gp]` runs the real
//! bridge on the fake WanGP package, and waits on the broker's view.

use std::time::Duration;

use kiln_protocol::{Backend, Client, JobId, JobSnapshot, JobSpec, Task};
use kiln_testkit::{eventually, fixture, python, Broker, BrokerOpts, Proc, Scratch, WorkerOpts};
use serde_json::{json, Value};

pub const WAIT: Duration = Duration::from_secs(60);

/// A worker whose `[worker.wan2gp]` points at the fake WanGP, with fast timers.
pub fn wan2gp_worker(id: &str, vram_mb: u64, env: &[(&str, &str)]) -> WorkerOpts {
    let extra = format!(
        "[worker.wan2gp]\nroot = \"{}\"\npython = \"{}\"\nheartbeat_s = 0.2\nheartbeat_timeout_s = 5\n\
         cancel_grace_s = 1\nkill_grace_s = 1\nprogress_interval_s = 0\n\
         [worker.wan2gp.env]\nPYTHONDONTWRITEBYTECODE = \"1\"\n",
        fixture("wan2gp").display(),
        python().display()
    );
    WorkerOpts {
        vram_mb,
        backends: vec!["wan2gp".into()],
        extra,
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..WorkerOpts::sim(id)
    }
}

pub fn t2v(prompt: &str, fake: Value) -> JobSpec {
    let mut spec = JobSpec::new(Backend::Wan2gp, Task::TextToVideo)
        .param("prompt", prompt)
        .param("resolution", "832x480")
        .param("frames", 33)
        .param("wan2gp", json!({ "_fake": fake }));
    spec.model = Some("t2v_2_2".into());
    spec
}

/// A broker and one 24 GB Wan2GP worker, `w1`, whose models the broker lists.
pub struct OneWorker {
    pub worker: Proc,
    pub client: Client,
    pub broker: Broker,
    pub scratch: Scratch,
}

pub async fn one_worker(env: &[(&str, &str)]) -> OneWorker {
    let scratch = Scratch::new();
    let broker = scratch.broker(BrokerOpts::default()).await;
    let worker = scratch
        .worker(&broker, wan2gp_worker("w1", 24_576, env))
        .await;
    let client = broker.client();
    wait_for_models(&client).await;
    OneWorker {
        worker,
        client,
        broker,
        scratch,
    }
}

/// Waits until the broker lists the worker's Wan2GP models (the bridge is up).
pub async fn wait_for_models(client: &Client) {
    eventually("the Wan2GP models to be listed", WAIT, || async {
        let models = client.models().await.ok()?;
        models
            .iter()
            .any(|m| m.name == "t2v_2_2" && m.backend == Backend::Wan2gp)
            .then_some(())
    })
    .await;
}

pub async fn finish(client: &Client, id: JobId) -> JobSnapshot {
    tokio::time::timeout(WAIT, client.wait(id))
        .await
        .expect("the job ends in time")
        .unwrap();
    client.get(id).await.unwrap()
}

pub async fn wait_state(
    client: &Client,
    id: JobId,
    what: &str,
    pred: impl Fn(&JobSnapshot) -> bool,
) -> JobSnapshot {
    // `eventually`, keeping the last snapshot for the failure message.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = None;
    loop {
        if let Ok(snap) = client.get(id).await {
            if pred(&snap) {
                return snap;
            }
            last = Some(snap);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}; the job was {last:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The settings the fake WanGP recorded in an output.
pub async fn recorded(client: &Client, snap: &JobSnapshot) -> Value {
    let art = client.fetch_artifact(snap.artifacts[0].id).await.unwrap();
    let text = String::from_utf8_lossy(&art.data).into_owned();
    assert!(text.starts_with("KILN-FAKE-MP4"), "{text}");
    serde_json::from_str(text.lines().nth(1).unwrap()).unwrap()
}
