//! Job commands: submit, watch, status, cancel, jobs, fetch.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use kiln_protocol::{
    ArtifactId, Backend, Client, InputFile, JobId, JobOptions, JobSnapshot, JobSpec, JobState,
    ListFilter, Task,
};
use serde_json::Value;

use crate::exit::Outcome;
use crate::format;
use crate::print_json;
use crate::progress::Board;

#[derive(Args)]
// `--steps -5` is a bad number of steps, not an unknown flag `-5`.
#[command(allow_negative_numbers = true)]
pub struct SubmitArgs {
    /// comfyui, wan2gp or sim.
    #[arg(long, default_value = "sim")]
    backend: String,
    /// text_to_image, image_to_image, text_to_video, image_to_video or workflow.
    #[arg(long, default_value = "text_to_image")]
    task: String,
    /// What to generate (`params.prompt`).
    #[arg(long, short = 'p')]
    prompt: Option<String>,
    /// What to avoid (`params.negative_prompt`).
    #[arg(long)]
    negative: Option<String>,
    /// Random seed, for a reproducible result (`params.seed`).
    #[arg(long)]
    seed: Option<i64>,
    /// Width in pixels (`params.width`).
    #[arg(long)]
    width: Option<u32>,
    /// Height in pixels (`params.height`).
    #[arg(long)]
    height: Option<u32>,
    /// Sampling steps (`params.steps`).
    #[arg(long)]
    steps: Option<u32>,
    /// Any other parameter as key=value; the value is read as JSON when it parses.
    /// Each backend's parameters are listed at the end of `kiln submit --help`.
    #[arg(long = "param", short = 'P')]
    params: Vec<String>,
    /// How to run the job: model, LoRAs, placement, priority, timeouts, attempts,
    /// idempotency key (the options every client offers, from kiln-protocol).
    #[command(flatten)]
    options: JobOptions,
    /// An input image (img2img, image-to-video); repeatable.
    #[arg(long = "input")]
    inputs: Vec<PathBuf>,
    /// A ComfyUI API-format workflow file (task `workflow`).
    #[arg(long)]
    workflow: Option<PathBuf>,
    /// A workflow template installed on the workers.
    #[arg(long)]
    template: Option<String>,
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
        self.options.apply(&mut spec)?;
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
    match state {
        JobState::Succeeded => Outcome::Ok,
        JobState::Failed => Outcome::JobFailed,
        JobState::Cancelled => Outcome::JobCancelled,
        JobState::Queued | JobState::Running => Outcome::Error,
    }
    .into()
}

/// Follows a job until it ends, or until Ctrl-C, which leaves the job running
/// and says how to find it again.
async fn follow_or_interrupt(client: &Client, job: JobId) -> anyhow::Result<Option<JobSnapshot>> {
    let board = Board::new();
    tokio::select! {
        snap = board.follow(client, job, "") => Ok(Some(snap?)),
        _ = tokio::signal::ctrl_c() => {
            eprintln!(
                "\ninterrupted: {job} keeps running. Follow it with `kiln watch {job}`, \
                 cancel it with `kiln cancel {job}`."
            );
            Ok(None)
        }
    }
}

pub async fn submit(client: &Client, args: SubmitArgs, json: bool) -> anyhow::Result<ExitCode> {
    let spec = args.spec()?;
    let accepted = client.submit(spec).await?;
    if !args.wait {
        if json {
            // The request id is the connection's business, not the caller's.
            print_json(&serde_json::json!({
                "job_id": accepted.job_id,
                "state": accepted.state,
                "duplicate": accepted.duplicate,
            }));
        } else {
            println!("{}", accepted.job_id);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(snap) = follow_or_interrupt(client, accepted.job_id).await? else {
        return Ok(Outcome::Interrupted.into());
    };
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
            snap.error.as_ref().map_or(String::new(), |e| format!(
                "{}: {}",
                format::failure_kind(e.kind),
                e.message
            ))
        ),
        other => eprintln!("{} {other}", snap.job_id),
    }
}

pub async fn watch(client: &Client, job: &str, json: bool) -> anyhow::Result<ExitCode> {
    let Some(snap) = follow_or_interrupt(client, parse_job(job)?).await? else {
        return Ok(Outcome::Interrupted.into());
    };
    report(&snap, &[], json);
    Ok(exit_for(snap.state))
}

pub async fn status(client: &Client, job: &str, json: bool) -> anyhow::Result<ExitCode> {
    let snap = client.get(parse_job(job)?).await?;
    if json {
        print_json(&snap);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", format::status(&snap));
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

/// `kiln resubmit j42`: the broker's copy of the whole job, as a new one.
pub async fn resubmit(client: &Client, job: &str, json: bool) -> anyhow::Result<ExitCode> {
    let from = parse_job(job)?;
    let a = client.resubmit(from, None).await?;
    if json {
        print_json(&a);
    } else {
        println!("{from} resubmitted as {} ({})", a.job_id, a.state);
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct JobsArgs {
    /// Only jobs in these states (comma-separated): queued, running, succeeded,
    /// failed, cancelled.
    #[arg(long, value_delimiter = ',')]
    state: Vec<String>,
    /// Only jobs for this backend (comfyui, wan2gp, sim).
    #[arg(long)]
    backend: Option<String>,
    /// Only jobs that ran (or run) on this worker.
    #[arg(long)]
    worker: Option<String>,
    /// Only jobs of this client name.
    #[arg(long)]
    client: Option<String>,
    /// Most jobs to show, newest first, fetched a page at a time past the broker's
    /// `max_list`; 0 shows one reply's worth (`broker.limits.max_list`).
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
        client: args.client,
        worker: args.worker,
        limit: (args.limit > 0).then_some(args.limit),
    };
    // Page past the broker's `max_list` with the reply's cursor until `--limit`.
    let mut jobs = Vec::new();
    let mut cursor = None;
    loop {
        let page = client.list_page(filter.clone(), cursor).await?;
        jobs.extend(page.jobs);
        cursor = page.next_cursor;
        if cursor.is_none() || args.limit == 0 || jobs.len() as u64 >= args.limit {
            break;
        }
    }
    if args.limit > 0 {
        jobs.truncate(args.limit as usize);
    }
    if json {
        print_json(&jobs);
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", format::jobs_table(&jobs));
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct FetchArgs {
    /// A job (`j42`, all its outputs) or one artifact (`j42.0`).
    id: String,
    /// The folder to write into (made if missing).
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
