//! `kiln demo`: the whole system on one box with the sim backend.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use kiln_config::KilnConfig;
use kiln_protocol::{Backend, Client, ClientOptions, JobState};
use kiln_worker::backends::sim::demo_spec;

use super::jobs::download;
use super::up::Local;
use crate::progress::Board;

#[derive(Args)]
pub struct DemoArgs {
    /// How many jobs to run.
    #[arg(long, default_value_t = 4)]
    jobs: u32,
    /// Where to write the PNGs.
    #[arg(long, default_value = "kiln-demo-output")]
    out: PathBuf,
    /// Sampling steps per job.
    #[arg(long, default_value_t = 20)]
    steps: u32,
    /// Simulated time per step, in ms.
    #[arg(long, default_value_t = 60)]
    step_ms: u64,
}

const PROMPTS: [&str; 8] = [
    "a kiln glowing at dusk",
    "a lighthouse in a storm",
    "a field of sunflowers under a violet sky",
    "a robot watering a bonsai",
    "a fox in the snow, watercolor",
    "neon city streets in the rain",
    "a cabin by a frozen lake",
    "an astronaut reading in a library",
];

pub async fn run(base: KilnConfig, args: DemoArgs) -> anyhow::Result<()> {
    let state = std::env::temp_dir().join(format!("kiln-demo-{}", std::process::id()));
    let mut cfg = base;
    cfg.broker.frontend = "tcp://127.0.0.1:0".into();
    cfg.broker.backend = "tcp://127.0.0.1:0".into();
    cfg.broker.events = "tcp://127.0.0.1:0".into();
    cfg.broker.state_dir = state.clone();
    cfg.broker.durable = true;
    cfg.broker.client_token = None;
    cfg.broker.worker_token = None;
    let workers = [
        ("demo-gpu0", "simulated RTX 4090", 24_564),
        ("demo-gpu1", "simulated RTX 4070", 12_282),
    ]
    .into_iter()
    .enumerate()
    .map(|(i, (id, name, vram))| {
        let mut w = cfg.clone();
        w.worker.id = Some(id.into());
        w.worker.backends = vec![Backend::Sim];
        w.worker.token = None;
        w.worker.gpu.index = i as u32;
        w.worker.gpu.nvml = false;
        w.worker.gpu.name = Some(name.into());
        w.worker.gpu.total_vram_mb = Some(vram);
        w.worker.sim.step_ms = args.step_ms;
        w.worker.work_dir = Some(state.join(format!("work-{id}")));
        w
    })
    .collect();
    let local = Local::start(&cfg, workers).await?;
    let result = drive(&local, &args).await;
    local.shutdown().await?;
    let _ = std::fs::remove_dir_all(&state);
    result
}

async fn drive(local: &Local, args: &DemoArgs) -> anyhow::Result<()> {
    let ep = local.broker.endpoints();
    let mut opts = ClientOptions::new(ep.frontend.clone(), ep.events.clone().unwrap_or_default());
    opts.name = Some("demo".into());
    let client = Client::connect(opts);
    let board = Board::new();
    board.println(format!(
        "kiln demo: broker on {}, events on {}",
        ep.frontend,
        ep.events.as_deref().unwrap_or("(closed)")
    ));

    // Wait until both workers have registered.
    let deadline = Instant::now() + Duration::from_secs(15);
    let workers = loop {
        let w = client.workers().await?;
        if w.iter()
            .filter(|w| w.state == kiln_protocol::worker::WorkerState::Idle)
            .count()
            >= 2
        {
            break w;
        }
        if Instant::now() > deadline {
            bail!("the demo workers did not register within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for w in &workers {
        board.println(format!(
            "worker {} ready: {} ({:.1} GiB), backend sim",
            w.worker_id,
            w.gpu.name,
            w.gpu.total_vram_mb as f64 / 1024.0
        ));
    }

    let started = Instant::now();
    let mut follows = Vec::new();
    for i in 0..args.jobs {
        let prompt = PROMPTS[i as usize % PROMPTS.len()];
        let spec = demo_spec(prompt, 1000 + i as u64)
            .param("steps", args.steps)
            .param("width", 512)
            .param("height", 512);
        let accepted = client.submit(spec).await.context("submitting a demo job")?;
        board.println(format!("submitted {}: {prompt:?}", accepted.job_id));
        let (client, board) = (client.clone(), board.clone());
        let label = format!("\"{prompt}\"");
        follows.push(tokio::spawn(async move {
            board.follow(&client, accepted.job_id, &label).await
        }));
    }
    let mut files = Vec::new();
    let mut failed = 0;
    for f in follows {
        let snap = f.await.context("follow task")??;
        if snap.state == JobState::Succeeded {
            files.extend(download(&client, &snap, &args.out).await?);
        } else {
            failed += 1;
            board.println(format!(
                "{} ended {}: {:?}",
                snap.job_id, snap.state, snap.error
            ));
        }
    }
    let out = std::fs::canonicalize(&args.out).unwrap_or_else(|_| args.out.clone());
    println!(
        "\nkiln demo: {} of {} jobs succeeded in {:.1} s; {} PNG(s) written to {}",
        args.jobs - failed,
        args.jobs,
        started.elapsed().as_secs_f64(),
        files.len(),
        out.display()
    );
    for f in &files {
        println!("  {}", f.display());
    }
    println!("(rendered by Kiln's sim backend: a stand-in for a real GPU generator)");
    if failed > 0 {
        bail!("{failed} demo job(s) did not succeed");
    }
    Ok(())
}
