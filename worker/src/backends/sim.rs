//! The `sim` backend: Kiln's stand-in generator for machines without a GPU.
//!
//! It renders a real PNG (an animated PNG for video tasks) whose pixels depend on
//! the prompt and the seed, reports steps at a configurable pace, honours cancel,
//! and, when the worker's config sets `allow_faults`, can be told through
//! `params.fault` to fail, run out of memory, hang or crash the worker. It is the
//! default of `kiln demo` and the test double for the whole system; it is not a
//! generator and never claims to be one (outputs are named `sim_*`).
//!
//! Parameters ([`SimBackend::schema`], which the broker checks at submit):
//! `prompt`, `seed` (default: derived from the prompt), `width` and `height`
//! (default 512, up to `max_side`), `steps` (default from config), `step_ms`
//! (per-job pace override), `count` (images, 0-8), `frames` (video tasks, 2-48),
//! `fps`, and, only when faults are allowed, `fault` (`fail`, `fail_retryable`,
//! `oom`, `hang`, `crash`). Kiln's other common parameters
//! (`kiln_protocol::params::COMMON_PARAMS`: `negative_prompt`, `cfg`, `sampler`, …)
//! are type-checked and ignored, so a job written for ComfyUI runs on `sim`
//! unchanged; any other key is refused. `steps = 0` with `count = 0` is a no-op job, for
//! benchmarks.
//!
//! It behaves like a GPU where scheduling is concerned: each model takes the
//! memory of its profile, models stay resident up to the GPU's `vram_mb` and the
//! least recently used one is evicted to load another (a load takes the
//! profile's time), a step takes `step_ms / speed`, and the resident set is
//! reported to the broker for placement. A model bigger than the whole GPU fails
//! the job as out of memory (retryable: the broker looks for a bigger GPU).

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kiln_config::SimConfig;
use kiln_protocol::params::{ParamKind, ParamSchema, ParamSet, ParamSpec};
use kiln_protocol::worker::ModelEntry;
use kiln_protocol::{FailureKind, JobError, JobSpec};
use serde_json::json;

use crate::backend::*;

pub struct SimBackend {
    cfg: SimConfig,
    /// Models resident in the simulated GPU's memory, most recently used first.
    resident: Mutex<Vec<String>>,
}

impl SimBackend {
    pub fn new(cfg: SimConfig) -> SimBackend {
        SimBackend {
            cfg,
            resident: Mutex::new(Vec::new()),
        }
    }

    /// Memory and load time of a model.
    fn cost(&self, model: &str) -> (u64, u64) {
        self.cfg
            .profiles
            .iter()
            .find(|p| p.name == model)
            .map_or((0, self.cfg.load_ms), |p| (p.vram_mb, p.load_ms))
    }

    /// Makes `model` resident: returns the load time it needs (0 when it is
    /// resident already) after evicting least recently used models to make room.
    fn make_resident(&self, model: &str) -> Result<u64, RunError> {
        let (need, load_ms) = self.cost(model);
        let vram = self.cfg.vram_mb;
        if vram > 0 && need > vram {
            return Err(RunError::Failed(JobError::new(
                FailureKind::OutOfMemory,
                format!("model {model} needs {need} MiB; this simulated GPU has {vram} MiB"),
                true,
            )));
        }
        let mut resident = self.resident.lock().expect("not poisoned");
        if let Some(i) = resident.iter().position(|m| m == model) {
            let m = resident.remove(i);
            resident.insert(0, m);
            return Ok(0);
        }
        let mut used: u64 = resident.iter().map(|m| self.cost(m).0).sum();
        while vram > 0 && used + need > vram {
            let Some(out) = resident.pop() else { break };
            used -= self.cost(&out).0;
        }
        resident.insert(0, model.to_string());
        Ok(load_ms)
    }

    /// The parameters this worker's simulator accepts, with its configured limits.
    pub fn schema(&self) -> ParamSchema {
        use ParamKind::*;
        let side = |name: &str| {
            ParamSpec::new(name, Integer, "image side; halved per degrade level")
                .range(8.0, self.cfg.max_side as f64)
                .default(512)
                .unit("px")
        };
        let mut params = vec![
            ParamSpec::new("prompt", String, "drawn into the image's pixels"),
            ParamSpec::new("seed", Integer, "default: derived from the prompt")
                .range(0.0, MAX_SAFE_INTEGER),
            side("width"),
            side("height"),
            ParamSpec::new("steps", Integer, "progress steps reported")
                .range(0.0, 10_000.0)
                .default(self.cfg.default_steps),
            ParamSpec::new("step_ms", Integer, "time per step")
                .range(0.0, 60_000.0)
                .default(self.cfg.step_ms)
                .unit("ms"),
            ParamSpec::new("count", Integer, "images (0 makes none)")
                .range(0.0, 8.0)
                .default(1),
            ParamSpec::new("frames", Integer, "frames of a video task's animated PNG")
                .range(2.0, 48.0)
                .default(8)
                .unit("frames"),
            ParamSpec::new("fps", Integer, "frame rate of a video task")
                .range(1.0, 60.0)
                .default(8)
                .unit("fps"),
        ];
        if self.cfg.allow_faults {
            params.push(
                ParamSpec::new("fault", String, "simulate a failure (tests only)").choices(&[
                    "fail",
                    "fail_retryable",
                    "oom",
                    "hang",
                    "crash",
                ]),
            );
        }
        ParamSchema {
            sets: vec![ParamSet {
                params,
                ..ParamSet::default()
            }
            .with_common()],
        }
    }
}

/// The largest integer a JSON number (a JavaScript client) holds exactly.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

fn invalid(msg: impl Into<String>) -> RunError {
    RunError::Failed(JobError::new(FailureKind::InvalidInput, msg, false))
}

#[async_trait]
impl Backend for SimBackend {
    fn kind(&self) -> kiln_protocol::Backend {
        kiln_protocol::Backend::Sim
    }

    async fn inventory(&self) -> Vec<ModelEntry> {
        self.cfg
            .models
            .iter()
            .map(|m| ModelEntry {
                name: m.clone(),
                kind: "sim".into(),
            })
            .collect()
    }

    async fn health(&self) -> Health {
        Health::ok()
    }

    fn params(&self) -> Option<ParamSchema> {
        Some(self.schema())
    }

    fn loaded_model(&self) -> Option<String> {
        self.resident.lock().ok()?.first().cloned()
    }

    fn resident_models(&self) -> Vec<String> {
        self.resident.lock().map(|r| r.clone()).unwrap_or_default()
    }

    async fn run(
        &self,
        job: JobRun,
        progress: ProgressSink,
        cancel: CancellationToken,
    ) -> Result<RunOutput, RunError> {
        let started = Instant::now();
        let spec = &job.spec;
        // The broker checked this already against the same schema; a job from an
        // older broker is checked here, with the same message.
        if let Err(e) = self.schema().check(spec) {
            return Err(invalid(e.to_string()));
        }
        let prompt = str_param(spec, "prompt")?.unwrap_or("").to_string();
        let max_side = self.cfg.max_side as i64;
        // Each degrade level halves the sides, as a real backend would lower the
        // resolution after running out of memory.
        let shrink = |side: i64| ((side >> job.degrade.min(4)) as u32).max(8);
        let width = shrink(int_param(spec, "width", 512, 8, max_side)?);
        let height = shrink(int_param(spec, "height", 512, 8, max_side)?);
        let steps = int_param(spec, "steps", self.cfg.default_steps as i64, 0, 10_000)? as u32;
        let step_ms = int_param(spec, "step_ms", self.cfg.step_ms as i64, 0, 60_000)? as u64;
        let step_time = Duration::from_secs_f64(step_ms as f64 / 1000.0 / self.cfg.speed.max(1e-3));
        let count = int_param(spec, "count", 1, 0, 8)? as u32;
        let frames = int_param(spec, "frames", 8, 2, 48)? as u32;
        let fps = int_param(spec, "fps", 8, 1, 60)? as u16;
        let seed = match spec.params.get("seed") {
            None | Some(serde_json::Value::Null) => {
                kiln_protocol::fnv1a(prompt.as_bytes()) & 0xffff_ffff
            }
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_i64().map(|i| i as u64))
                .ok_or_else(|| invalid(format!("params.seed must be an integer, got {v}")))?,
        };
        let fault = str_param(spec, "fault")?.map(str::to_string);

        let mut loaded_ms = 0;
        // Like a real generator, the simulator refuses what it does not have: it
        // has models (sim.models) but no LoRAs and no workflow templates.
        if let Some(lora) = spec.loras.first() {
            return Err(invalid(format!(
                "LoRA {:?} (loras[0]) is not installed on this sim worker (it has no LoRAs)",
                lora.name
            )));
        }
        if let Some(template) = &spec.template {
            return Err(invalid(format!(
                "template {template:?} is not installed on this sim worker (it has no templates)"
            )));
        }
        if let Some(model) = &spec.model {
            if !self.cfg.models.contains(model) {
                return Err(invalid(format!(
                    "model {model:?} is not installed on this sim worker"
                )));
            }
            let load_ms = self.make_resident(model)?;
            loaded_ms = load_ms;
            if load_ms > 0 {
                progress.stage(0.0, format!("loading {model}"));
                if let Err(e) = sleep_or_cancel(Duration::from_millis(load_ms), &cancel).await {
                    // A load cut short leaves nothing usable in memory.
                    self.resident
                        .lock()
                        .expect("not poisoned")
                        .retain(|m| m != model);
                    return Err(e);
                }
            }
        }

        match fault.as_deref() {
            None => {}
            Some("fail") => {
                return Err(RunError::Failed(JobError::new(
                    FailureKind::Backend,
                    "simulated failure (params.fault = fail)",
                    false,
                )))
            }
            Some("fail_retryable") => {
                return Err(RunError::Failed(JobError::new(
                    FailureKind::Backend,
                    "simulated transient failure",
                    true,
                )))
            }
            Some("oom") => {
                return Err(RunError::Failed(JobError::new(
                    FailureKind::OutOfMemory,
                    "simulated CUDA out of memory",
                    true,
                )))
            }
            Some("hang") => {
                progress.stage(1.0, "hanging (params.fault = hang)");
                cancel.cancelled().await;
                return Err(RunError::Cancelled);
            }
            Some("crash") => {
                tracing::error!(job = %job.job_id, "params.fault = crash: aborting the worker process");
                std::process::abort();
            }
            Some(other) => {
                return Err(invalid(format!(
                "unknown params.fault {other:?}; expected fail, fail_retryable, oom, hang or crash"
            )))
            }
        }

        progress.enter(Phase::Sampling);
        for step in 1..=steps {
            sleep_or_cancel(step_time, &cancel).await?;
            progress.step(step, steps, 0.0, 95.0, format!("sampling {step}/{steps}"));
        }
        progress.leave();
        if cancel.is_cancelled() {
            return Err(RunError::Cancelled);
        }
        progress.stage(96.0, "encoding");
        let video = spec.task.is_video();
        let inputs_hash = spec
            .inputs
            .iter()
            .fold(0u64, |h, i| h ^ kiln_protocol::fnv1a(&i.data));
        let job_id = job.job_id;
        // Rendering is CPU work: off the async threads, which keep the heartbeats.
        let render = move || -> Result<Vec<OutputFile>, png::EncodingError> {
            let mut outputs = Vec::new();
            for i in 0..count {
                let item_seed = seed.wrapping_add(i as u64) ^ inputs_hash;
                let (data, media_type) = if video {
                    let frames = render_apng(&prompt, item_seed, width, height, frames, fps)?;
                    (frames, "image/apng")
                } else {
                    (render_png(&prompt, item_seed, width, height)?, "image/png")
                };
                outputs.push(OutputFile {
                    name: format!("sim_{job_id}_{i}.png"),
                    media_type: media_type.into(),
                    data: OutputData::Bytes(data),
                });
            }
            Ok(outputs)
        };
        let outputs = if count == 0 {
            Vec::new()
        } else {
            tokio::task::spawn_blocking(render)
                .await
                .map_err(|e| {
                    RunError::Failed(JobError::new(
                        FailureKind::Internal,
                        format!("render task failed: {e}"),
                        true,
                    ))
                })?
                .map_err(internal)?
        };
        let load_info = spec.model.as_ref().map(|m| self.cost(m));
        let info = json!({
            "seed": seed,
            // Output i is what `seed + i` renders alone (not a batch of one seed).
            "output_seeds": (0..count as u64).map(|i| seed.wrapping_add(i)).collect::<Vec<_>>(),
            "width": width,
            "height": height,
            "steps": steps,
            "degrade": job.degrade,
            "model": spec.model.clone().unwrap_or_else(|| "sim".into()),
            "run_ms": started.elapsed().as_millis() as u64,
            "model_vram_mb": load_info.map(|c| c.0),
            "load_ms": loaded_ms,
            "generator": "kiln sim backend (not a real model)",
        });
        Ok(RunOutput {
            outputs,
            info: info.as_object().cloned().unwrap_or_default(),
        })
    }
}

fn internal(e: png::EncodingError) -> RunError {
    RunError::Failed(JobError::new(
        FailureKind::Internal,
        format!("PNG encoding failed: {e}"),
        false,
    ))
}

async fn sleep_or_cancel(d: Duration, cancel: &CancellationToken) -> Result<(), RunError> {
    if d.is_zero() {
        return if cancel.is_cancelled() {
            Err(RunError::Cancelled)
        } else {
            Ok(())
        };
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => Ok(()),
        _ = cancel.cancelled() => Err(RunError::Cancelled),
    }
}

/// RGB pixels of one frame: overlapping colour waves whose directions, speeds and
/// hues come from a hash of prompt and seed, so different prompts look different.
fn pixels(prompt: &str, seed: u64, width: u32, height: u32, t: f32) -> Vec<u8> {
    let h = kiln_protocol::fnv1a(prompt.as_bytes()) ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let param = |k: u32| ((h >> (k * 5)) & 0x1f) as f32 / 31.0;
    let waves: Vec<(f32, f32, f32, f32)> = (0..3)
        .map(|c| {
            let k = c * 4;
            (
                (param(k) - 0.5) * 0.08,
                (param(k + 1) - 0.5) * 0.08,
                param(k + 2) * std::f32::consts::TAU,
                0.5 + param(k + 3),
            )
        })
        .collect();
    let mut out = Vec::with_capacity((width * height * 3) as usize);
    for y in 0..height {
        for x in 0..width {
            for (fx, fy, phase, amp) in &waves {
                let v = (x as f32 * fx + y as f32 * fy + phase + t).sin() * amp;
                out.push(((v * 0.5 + 0.5).clamp(0.0, 1.0) * 255.0) as u8);
            }
        }
    }
    out
}

fn render_png(
    prompt: &str,
    seed: u64,
    width: u32,
    height: u32,
) -> Result<Vec<u8>, png::EncodingError> {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.add_text_chunk("Software".into(), "kiln sim backend".into())?;
        enc.add_text_chunk("Description".into(), prompt.chars().take(200).collect())?;
        let mut w = enc.write_header()?;
        w.write_image_data(&pixels(prompt, seed, width, height, 0.0))?;
        w.finish()?;
    }
    Ok(buf)
}

fn render_apng(
    prompt: &str,
    seed: u64,
    width: u32,
    height: u32,
    frames: u32,
    fps: u16,
) -> Result<Vec<u8>, png::EncodingError> {
    let mut buf = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut buf, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_animated(frames, 0)?;
        enc.set_frame_delay(1, fps)?;
        let mut w = enc.write_header()?;
        for f in 0..frames {
            w.write_image_data(&pixels(prompt, seed, width, height, f as f32 * 0.4))?;
        }
        w.finish()?;
    }
    let _ = buf.flush();
    Ok(buf)
}

/// The sim backend's default spec, for `kiln demo` and examples.
pub fn demo_spec(prompt: &str, seed: u64) -> JobSpec {
    JobSpec::new(
        kiln_protocol::Backend::Sim,
        kiln_protocol::Task::TextToImage,
    )
    .param("prompt", prompt)
    .param("seed", seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn job(spec: JobSpec) -> JobRun {
        JobRun {
            job_id: kiln_protocol::JobId(1),
            attempt: 1,
            spec: Arc::new(spec),
            degrade: 0,
            work_dir: std::env::temp_dir(),
            max_outputs: None,
        }
    }

    fn fast() -> SimConfig {
        SimConfig {
            step_ms: 1,
            allow_faults: true,
            ..SimConfig::default()
        }
    }

    fn png_bytes(out: &RunOutput) -> &[u8] {
        match &out.outputs[0].data {
            OutputData::Bytes(b) => b,
            OutputData::File(_) => panic!("sim returns bytes"),
        }
    }

    #[tokio::test]
    async fn renders_a_decodable_png_that_depends_on_prompt_and_seed() {
        let sim = SimBackend::new(fast());
        let run = |p: &str, s: u64| {
            let spec = demo_spec(p, s)
                .param("width", 64)
                .param("height", 48)
                .param("steps", 3);
            let (sink, _rx) = ProgressSink::new();
            sim.run(job(spec), sink, CancellationToken::new())
        };
        let a = run("a red kiln", 1).await.unwrap();
        let b = run("a red kiln", 1).await.unwrap();
        let c = run("a red kiln", 2).await.unwrap();
        let d = run("a blue kiln", 1).await.unwrap();
        assert_eq!(png_bytes(&a), png_bytes(&b), "deterministic");
        assert_ne!(png_bytes(&a), png_bytes(&c), "seed matters");
        assert_ne!(png_bytes(&a), png_bytes(&d), "prompt matters");
        let decoder = png::Decoder::new(std::io::Cursor::new(png_bytes(&a).to_vec()));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (64, 48));
        assert_eq!(a.info["seed"], 1);
    }

    #[tokio::test]
    async fn video_tasks_make_an_animated_png() {
        let sim = SimBackend::new(fast());
        let spec = JobSpec::new(
            kiln_protocol::Backend::Sim,
            kiln_protocol::Task::TextToVideo,
        )
        .param("prompt", "waves")
        .param("width", 32)
        .param("height", 32)
        .param("frames", 4)
        .param("steps", 0);
        let (sink, _rx) = ProgressSink::new();
        let out = sim
            .run(job(spec), sink, CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(out.outputs[0].media_type, "image/apng");
        let reader = png::Decoder::new(std::io::Cursor::new(png_bytes(&out).to_vec()))
            .read_info()
            .unwrap();
        assert_eq!(reader.info().animation_control().unwrap().num_frames, 4);
    }

    #[tokio::test]
    async fn progress_steps_and_cancel() {
        let sim = SimBackend::new(SimConfig {
            step_ms: 5,
            ..fast()
        });
        let (sink, mut rx) = ProgressSink::new();
        let cancel = CancellationToken::new();
        let spec = demo_spec("slow", 1)
            .param("steps", 10_000)
            .param("width", 8)
            .param("height", 8);
        let task = sim.run(job(spec), sink, cancel.clone());
        let watcher = async {
            rx.changed().await.unwrap();
            let p = rx.latest().unwrap();
            assert!(p.stage.starts_with("sampling 1/10000"), "{}", p.stage);
            cancel.cancel();
        };
        let (result, ()) = tokio::join!(task, watcher);
        assert_eq!(result.unwrap_err(), RunError::Cancelled);
    }

    #[tokio::test]
    async fn faults_need_permission_and_map_to_typed_errors() {
        let strict = SimBackend::new(SimConfig::default());
        let (sink, _rx) = ProgressSink::new();
        let err = strict
            .run(
                job(demo_spec("x", 1).param("fault", "oom")),
                sink.clone(),
                CancellationToken::new(),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::Failed(e) if e.kind == FailureKind::InvalidInput));

        let lax = SimBackend::new(fast());
        let err = lax
            .run(
                job(demo_spec("x", 1).param("fault", "oom")),
                sink.clone(),
                CancellationToken::new(),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, RunError::Failed(e) if e.kind == FailureKind::OutOfMemory && e.retryable)
        );
        let err = lax
            .run(
                job(demo_spec("x", 1).param("fault", "fail")),
                sink.clone(),
                CancellationToken::new(),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::Failed(e) if !e.retryable));
        let err = lax
            .run(
                job(demo_spec("x", 1).param("width", 100_000)),
                sink,
                CancellationToken::new(),
            )
            .await
            .unwrap_err();
        assert!(matches!(err, RunError::Failed(e) if e.message.contains("params.width")));
    }

    #[tokio::test]
    async fn models_stay_resident_up_to_the_vram_and_the_least_recent_is_evicted() {
        let cfg = SimConfig {
            vram_mb: 10_000,
            load_ms: 40,
            models: vec!["a".into(), "b".into(), "c".into(), "huge".into()],
            profiles: vec![
                kiln_config::SimModelProfile {
                    name: "a".into(),
                    vram_mb: 4_000,
                    load_ms: 40,
                },
                kiln_config::SimModelProfile {
                    name: "b".into(),
                    vram_mb: 4_000,
                    load_ms: 0,
                },
                kiln_config::SimModelProfile {
                    name: "c".into(),
                    vram_mb: 5_000,
                    load_ms: 0,
                },
                kiln_config::SimModelProfile {
                    name: "huge".into(),
                    vram_mb: 20_000,
                    load_ms: 0,
                },
            ],
            ..fast()
        };
        let sim = SimBackend::new(cfg);
        let run = |m: &str| {
            let mut spec = demo_spec("x", 1).param("steps", 0).param("count", 0);
            spec.model = Some(m.into());
            let (sink, _rx) = ProgressSink::new();
            let fut = sim.run(job(spec), sink, CancellationToken::new());
            async move {
                let r = fut.await;
                // Whether the run loaded its model.
                let loaded = r.as_ref().is_ok_and(|o| o.info["load_ms"] != 0);
                (r, loaded)
            }
        };
        assert!(run("a").await.1, "first use loads");
        run("b").await.0.unwrap();
        assert_eq!(sim.resident_models(), ["b", "a"], "both fit in 10,000 MiB");
        let (r, loaded) = run("a").await;
        r.unwrap();
        assert!(!loaded, "a resident model does not load again");
        assert_eq!(sim.resident_models(), ["a", "b"]);
        // c needs 5,000 MiB: the least recently used (b) goes.
        run("c").await.0.unwrap();
        assert_eq!(sim.resident_models(), ["c", "a"]);
        assert_eq!(sim.loaded_model().as_deref(), Some("c"));
        // A model bigger than the GPU is out of memory, retryably.
        let err = run("huge").await.0.unwrap_err();
        assert!(
            matches!(err, RunError::Failed(ref e) if e.kind == FailureKind::OutOfMemory && e.retryable),
            "{err:?}"
        );
        assert_eq!(sim.resident_models(), ["c", "a"], "nothing evicted for it");
    }

    #[tokio::test]
    async fn model_switches_are_reported() {
        let sim = SimBackend::new(fast());
        assert_eq!(sim.loaded_model(), None);
        let mut spec = demo_spec("x", 1)
            .param("steps", 0)
            .param("width", 8)
            .param("height", 8);
        spec.model = Some("sim-sdxl".into());
        let (sink, _rx) = ProgressSink::new();
        sim.run(job(spec.clone()), sink.clone(), CancellationToken::new())
            .await
            .unwrap();
        assert_eq!(sim.loaded_model().as_deref(), Some("sim-sdxl"));
        spec.model = Some("not-installed".into());
        assert!(sim
            .run(job(spec), sink, CancellationToken::new())
            .await
            .is_err());
    }
}
