//! What the ComfyUI tests share: the fake ComfyUI process, its arguments, the
//! worker settings that attach to it, and waits on the broker's view.

use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_protocol::job::InputFile;
use kiln_protocol::worker::WorkerState;
use kiln_protocol::{Backend, Client, JobId, JobSpec, JobState, Task};
use kiln_testkit::{
    eventually, fixture, free_port, python, Broker, BrokerOpts, Proc, Scratch, WorkerOpts,
};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    fixture("comfyui")
}

pub const MODELS: [&str; 4] = [
    "checkpoints/sd15.safetensors",
    "loras/detail.safetensors",
    "diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors",
    "upscale_models/tiny_compact_x2.safetensors",
];

/// The fake's own arguments (without the port).
pub fn fake_args(dir: &Path, version: &str) -> Vec<String> {
    let mut args = vec![
        fixtures().join("fake_comfyui.py").display().to_string(),
        "--version".into(),
        version.into(),
        "--step-ms".into(),
        "10".into(),
        "--base-directory".into(),
        dir.display().to_string(),
    ];
    for m in MODELS {
        args.extend(["--model".into(), m.into()]);
    }
    // The Wan templates load these by default.
    for m in [
        "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors",
        "vae/wan_2.1_vae.safetensors",
        "clip_vision/clip_vision_h.safetensors",
    ] {
        args.extend(["--model".into(), m.into()]);
    }
    args
}

/// A fake ComfyUI process in attach mode.
pub struct Fake {
    pub proc: Proc,
    pub url: String,
    pub http: reqwest::Client,
}

impl Fake {
    pub async fn start(s: &Scratch, version: &str) -> Fake {
        Fake::start_with(s, version, &[]).await
    }

    /// A fake with more arguments, e.g. `["--step-ms", "3"]` (the last one wins).
    pub async fn start_with(s: &Scratch, version: &str, extra: &[&str]) -> Fake {
        let port = free_port();
        let dir = s.path().join(format!("comfyui-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut args = fake_args(&dir, version);
        args.extend(extra.iter().map(|a| a.to_string()));
        args.extend(["--port".into(), port.to_string()]);
        let proc = Proc::spawn("fake ComfyUI", &python(), &args, &[], dir.join("fake.log"));
        Fake::answering(proc, port).await
    }

    /// A fake started in `s` with a relative `--base-directory comfyui-<port>`
    /// (so its command line does not say where its folders are); returns it and
    /// its input folder.
    pub async fn start_relative(s: &Scratch, version: &str) -> (Fake, PathBuf) {
        let port = free_port();
        let rel = format!("comfyui-{port}");
        let dir = s.path().join(&rel);
        std::fs::create_dir_all(&dir).unwrap();
        let mut args = vec![
            "-c".to_string(),
            "cd \"$0\" && exec \"$@\"".into(),
            s.path().display().to_string(),
            python().display().to_string(),
        ];
        for a in fake_args(&dir, version) {
            args.push(if a == dir.display().to_string() {
                rel.clone()
            } else {
                a
            });
        }
        args.extend(["--port".into(), port.to_string()]);
        let proc = Proc::spawn(
            "fake ComfyUI",
            Path::new("sh"),
            &args,
            &[],
            dir.join("fake.log"),
        );
        (Fake::answering(proc, port).await, dir.join("input"))
    }

    async fn answering(proc: Proc, port: u16) -> Fake {
        let fake = Fake {
            proc,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        eventually(
            "the fake ComfyUI to answer",
            Duration::from_secs(20),
            || async { fake.get("/system_stats").await },
        )
        .await;
        fake
    }

    pub async fn get(&self, path: &str) -> Option<Value> {
        let resp = self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        serde_json::from_slice(&resp.bytes().await.ok()?).ok()
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
    }

    /// The requests the fake has seen, oldest first.
    pub async fn log(&self) -> Vec<String> {
        let v = self.get("/fake/log").await.unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    }
}

pub fn comfy_opts(id: &str, comfyui_toml: &str) -> WorkerOpts {
    WorkerOpts {
        backends: vec!["comfyui".into()],
        extra: format!("[worker.comfyui]\npoll_ms = 300\ncancel_timeout_s = 5\n{comfyui_toml}\n"),
        ..WorkerOpts::sim(id)
    }
}

pub async fn wait_healthy(client: &Client, id: &str) {
    eventually(
        &format!("worker {id} to be healthy"),
        Duration::from_secs(30),
        || async {
            let workers = client.workers().await.ok()?;
            workers
                .iter()
                .any(|w| {
                    w.worker_id == id && matches!(w.state, WorkerState::Idle | WorkerState::Busy)
                })
                .then_some(())
        },
    )
    .await;
}

pub async fn wait_progress(client: &Client, id: JobId) {
    eventually(
        "the job to report step progress",
        Duration::from_secs(30),
        || async {
            let j = client.get(id).await.ok()?;
            (j.state == JobState::Running && j.progress.as_ref().is_some_and(|p| p.step.is_some()))
                .then_some(())
        },
    )
    .await;
}

pub fn slow_job(steps: u32) -> JobSpec {
    let mut spec = JobSpec::new(Backend::Comfyui, Task::TextToImage)
        .param("prompt", "slow")
        .param("steps", steps)
        .param("width", 512)
        .param("height", 512);
    spec.model = Some("sd15.safetensors".into());
    spec
}

pub fn workflow(name: &str) -> Value {
    let text =
        std::fs::read_to_string(fixtures().join("workflows").join(format!("{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn input(name: &str, media_type: &str) -> InputFile {
    InputFile {
        name: name.into(),
        media_type: media_type.into(),
        data: std::fs::read(fixtures().join("workflows/inputs").join(name)).unwrap(),
    }
}

/// A broker and a worker attached to `fake`; waits until the worker is healthy.
pub async fn attached(s: &Scratch, fake: &Fake, id: &str) -> (Broker, Proc) {
    let broker = s
        .broker(BrokerOpts {
            heartbeat_ms: 200,
            ..BrokerOpts::default()
        })
        .await;
    let worker = s
        .worker(&broker, comfy_opts(id, &format!("url = \"{}\"", fake.url)))
        .await;
    wait_healthy(&broker.client(), id).await;
    (broker, worker)
}

pub fn raw(name: &str) -> JobSpec {
    let mut spec = JobSpec::new(Backend::Comfyui, Task::Workflow);
    spec.workflow = Some(workflow(name));
    spec
}
