//! Job commands: submit, watch, status, cancel, jobs, fetch.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use kiln_protocol::{
    ArtifactId, Backend, Client, InputFile, JobId, JobSnapshot, JobSpec, JobState, ListFilter,
    LoraRef, Task,
};
use serde_json::Value;

use crate::print_json;
use crate::progress::Board;
use crate::table::Table;

#[derive(Args)]
pub struct SubmitArgs {
    /// comfyui, wan2gp or sim.
    #[arg(long, default_value = "sim")]
    backend: String,
    /// text_to_image, image_to_image, text_to_video, image_to_video or workflow.
    #[arg(long, default_value = "text_to_image")]
    task: String,
    #[arg(long, short = 'p')]
    prompt: Option<String>,
    #[arg(long)]
    negative: Option<String>,
    #[arg(long)]
    seed: Option<i64>,
    #[arg(long)]
    width: Option<u32>,
    #[arg(long)]
    height: Option<u32>,
    #[arg(long)]
    steps: Option<u32>,
    #[arg(long)]
    model: Option<String>,
    /// A LoRA as name or name:strength (repeatable).
    #[arg(long = "lora")]
    loras: Vec<String>,
    /// Any other parameter as key=value; the value is read as JSON when it parses.
    #[arg(long = "param", short = 'P')]
    params: Vec<String>,
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    priority: i8,
    #[arg(long)]
    min_vram_mb: Option<u64>,
    /// A label the worker must carry (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    #[arg(long)]
    max_attempts: Option<u8>,
    #[arg(long)]
    queue_timeout: Option<u32>,
    #[arg(long)]
    run_timeout: Option<u32>,
    /// An input image (img2img, image-to-video); repeatable.
    #[arg(long = "input")]
    inputs: Vec<PathBuf>,
    /// A ComfyUI API-format workflow file (task `workflow`).
    #[arg(long)]
    workflow: Option<PathBuf>,
    /// A workflow template installed on the workers.
    #[arg(long)]
    template: Option<String>,
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Wait for the job with a progress bar, then download its outputs.
    #[arg(long)]
    wait: bool,
    /// Where `--wait` writes outputs.
    #[arg(long, default_value = ".")]
    out: PathBuf,
}

fn parse_enum<T: serde::de::DeserializeOwned>(what: &str, s: &str) -> anyhow::Result<T> {
    serde_json::from_value(Value::String(s.to_string()))
        .with_context(|| format!("unknown {what} {s:?}"))
}

impl SubmitArgs {
    fn spec(&self) -> anyhow::Result<JobSpec> {
        let backend: Backend = self.backend.parse().map_err(anyhow::Error::msg)?;
        let task: Task = parse_enum("task", &self.task)?;
        let mut spec = JobSpec::new(backend, task);
        let mut set = |k: &str, v: Option<Value>| {
            if let Some(v) = v {
                spec.params.insert(k.to_string(), v);
            }
        };
        set("prompt", self.prompt.clone().map(Value::from));
        set("negative_prompt", self.negative.clone().map(Value::from));
        set("seed", self.seed.map(Value::from));
        set("width", self.width.map(Value::from));
        set("height", self.height.map(Value::from));
        set("steps", self.steps.map(Value::from));
        for p in &self.params {
            let (k, v) = p
                .split_once('=')
                .with_context(|| format!("--param {p:?} is not key=value"))?;
            let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_string()));
            spec.params.insert(k.to_string(), v);
        }
        spec.model = self.model.clone();
        for l in &self.loras {
            let (name, strength) = match l.rsplit_once(':') {
                Some((n, s)) => (
                    n.to_string(),
                    s.parse()
                        .with_context(|| format!("LoRA strength in {l:?}"))?,
                ),
                None => (l.clone(), 1.0),
            };
            spec.loras.push(LoraRef { name, strength });
        }
        spec.priority = self.priority;
        spec.min_vram_mb = self.min_vram_mb;
        spec.labels = self.labels.clone();
        spec.max_attempts = self.max_attempts;
        spec.queue_timeout_s = self.queue_timeout;
        spec.run_timeout_s = self.run_timeout;
        for path in &self.inputs {
            let data =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("input.png")
                .to_string();
            spec.inputs.push(InputFile {
                media_type: media_type_of(&name).into(),
                name,
                data,
            });
        }
        if let Some(path) = &self.workflow {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            spec.workflow = Some(
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not JSON", path.display()))?,
            );
        }
        spec.template = self.template.clone();
        spec.idempotency_key = self.idempotency_key.clone();
        Ok(spec)
    }
}

fn media_type_of(name: &str) -> &'static str {
    kiln_protocol::job::media_type_for(name)
}

fn parse_job(s: &str) -> anyhow::Result<JobId> {
    s.parse().map_err(anyhow::Error::from)
}

fn exit_for(state: JobState) -> ExitCode {
    if state == JobState::Succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

pub async fn submit(client: &Client, args: SubmitArgs, json: bool) -> anyhow::Result<ExitCode> {
    let spec = args.spec()?;
    let accepted = client.submit(spec).await?;
    if !args.wait {
        if json {
            print_json(&accepted);
        } else {
            println!("{}", accepted.job_id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let board = Board::new();
    let snap = board.follow(client, accepted.job_id, "").await?;
    let files = if snap.state == JobState::Succeeded {
        download(client, &snap, &args.out).await?
    } else {
        Vec::new()
    };
    report(&snap, &files, json);
    Ok(exit_for(snap.state))
}

fn report(snap: &JobSnapshot, files: &[PathBuf], json: bool) {
    if json {
        print_json(&serde_json::json!({ "job": snap, "files": files }));
        return;
    }
    match snap.state {
        JobState::Succeeded => {
            for f in files {
                println!("{}", f.display());
            }
        }
        JobState::Failed => eprintln!(
            "{} failed: {}",
            snap.job_id,
            snap.error.as_ref().map_or("", |e| e.message.as_str())
        ),
        other => eprintln!("{} {other}", snap.job_id),
    }
}

pub async fn watch(client: &Client, job: &str, json: bool) -> anyhow::Result<ExitCode> {
    let snap = Board::new().follow(client, parse_job(job)?, "").await?;
    report(&snap, &[], json);
    Ok(exit_for(snap.state))
}

pub async fn status(client: &Client, job: &str, json: bool) -> anyhow::Result<ExitCode> {
    let snap = client.get(parse_job(job)?).await?;
    if json {
        print_json(&snap);
        return Ok(ExitCode::SUCCESS);
    }
    println!("job        {}", snap.job_id);
    println!(
        "state      {}{}",
        snap.state,
        if snap.cancel_requested {
            " (cancel requested)"
        } else {
            ""
        }
    );
    println!("backend    {} / {}", snap.backend, snap.task.as_str());
    if let Some(m) = &snap.model {
        println!("model      {m}");
    }
    println!(
        "tries      {} of {} (attempt #{})",
        snap.tries, snap.max_attempts, snap.attempt
    );
    if let Some(w) = &snap.gpu {
        println!("worker     {w}");
    }
    if let Some(p) = &snap.progress {
        println!("progress   {:.0}% {}", p.pct, p.stage);
    }
    if let Some(q) = snap.queue_position {
        println!("ahead      {q} job(s)");
    }
    if let Some(w) = &snap.waiting {
        println!("waiting    {}", w.detail);
    }
    if let Some(e) = &snap.error {
        println!("error      {:?}: {}", e.kind, e.message);
    }
    for a in &snap.artifacts {
        println!(
            "artifact   {} {} ({}, {} bytes)",
            a.id, a.name, a.media_type, a.size
        );
    }
    println!("history");
    for t in &snap.history {
        println!("  {:>13} {:<9} {}", t.at_ms, t.state.as_str(), t.note);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn cancel(client: &Client, job: &str, json: bool) -> anyhow::Result<ExitCode> {
    let r = client.cancel(parse_job(job)?).await?;
    if json {
        print_json(&r);
    } else if r.state == JobState::Cancelled {
        println!("{} cancelled", r.job_id);
    } else {
        println!("{} is {}; its worker was asked to stop", r.job_id, r.state);
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct JobsArgs {
    /// Only jobs in these states (comma-separated).
    #[arg(long, value_delimiter = ',')]
    state: Vec<String>,
    #[arg(long)]
    backend: Option<String>,
    #[arg(long)]
    worker: Option<String>,
    #[arg(long, default_value_t = 50)]
    limit: u64,
}

pub async fn list(client: &Client, args: JobsArgs, json: bool) -> anyhow::Result<ExitCode> {
    let filter = ListFilter {
        states: args
            .state
            .iter()
            .map(|s| parse_enum("state", s))
            .collect::<anyhow::Result<_>>()?,
        backend: args
            .backend
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        client: None,
        worker: args.worker,
        limit: Some(args.limit),
    };
    let jobs = client.list(filter).await?;
    if json {
        print_json(&jobs);
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new([
        "JOB", "STATE", "BACKEND", "TASK", "PROGRESS", "WORKER", "CLIENT", "ATTEMPT",
    ]);
    for j in jobs {
        t.row([
            j.job_id.to_string(),
            j.state.to_string(),
            j.backend.to_string(),
            j.task.as_str().to_string(),
            j.progress
                .map(|p| format!("{:.0}%", p.pct))
                .unwrap_or_default(),
            j.worker.unwrap_or_default(),
            j.client,
            format!("{}/{}", j.attempt, j.max_attempts),
        ]);
    }
    t.print();
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct FetchArgs {
    /// A job (`j42`, all its outputs) or one artifact (`j42.0`).
    id: String,
    #[arg(long, default_value = ".")]
    out: PathBuf,
}

pub async fn fetch(client: &Client, args: FetchArgs, json: bool) -> anyhow::Result<ExitCode> {
    let files = if args.id.contains('.') {
        let id: ArtifactId = args.id.parse()?;
        vec![save(client, id, &args.out).await?]
    } else {
        let snap = client.get(parse_job(&args.id)?).await?;
        if snap.state != JobState::Succeeded {
            bail!(
                "{} is {}; only succeeded jobs have outputs",
                snap.job_id,
                snap.state
            );
        }
        download(client, &snap, &args.out).await?
    };
    if json {
        print_json(&files);
    } else {
        for f in files {
            println!("{}", f.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Downloads every output of a job into `dir`, checking each sha256.
pub async fn download(
    client: &Client,
    snap: &JobSnapshot,
    dir: &Path,
) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for a in &snap.artifacts {
        files.push(save(client, a.id, dir).await?);
    }
    Ok(files)
}

async fn save(client: &Client, id: ArtifactId, dir: &Path) -> anyhow::Result<PathBuf> {
    let artifact = client.fetch_artifact(id).await?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // Names are checked by the broker to be plain file names.
    let name = if artifact.name.contains(&id.job.to_string()) {
        artifact.name.clone()
    } else {
        format!("{}_{}", id.job, artifact.name)
    };
    let path = dir.join(name);
    let tmp = dir.join(format!(
        ".{}.part",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("artifact")
    ));
    std::fs::write(&tmp, &artifact.data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}
