//! Kiln's job parameters → Wan2GP settings, sized by the VRAM table.
//!
//! Pure functions, so every rule is unit-tested without Python. The mapping:
//!
//! | Kiln | Wan2GP | notes |
//! |---|---|---|
//! | `job.model` | `model_type` | else `[worker.wan2gp.default_models]` per task |
//! | `params.prompt` | `prompt` | required for text tasks |
//! | `params.negative_prompt` | `negative_prompt` | |
//! | `params.width` + `params.height`, or `params.resolution` (`"832x480"`) | `resolution` | default: the model's |
//! | `params.frames`, or `params.seconds` × fps | `video_length` | video tasks; snapped to the model's frame grid (4n+1 for Wan) |
//! | `params.fps` | `force_fps` | video tasks |
//! | `params.steps` | `num_inference_steps` | |
//! | `params.seed` | `seed` | drawn by the worker when absent, and reported |
//! | `params.guidance`, `params.guidance2` | `guidance_scale`, `guidance2_scale` | |
//! | `params.flow_shift`, `params.sampler` | `flow_shift`, `sample_solver` | |
//! | `params.count` | `batch_size` | text-to-image |
//! | `job.loras` `[{name, strength}]` | `activated_loras`, `loras_multipliers` | names checked against the model's LoRAs |
//! | `job.inputs[0]` | `image_start` + `image_prompt_type = "S"` | image-to-video, an absolute path |
//! | task `text_to_image` | `image_mode = 1` | |
//! | `params.wan2gp` `{...}` | merged as is | raw Wan2GP settings for anything else; no paths or URLs |
//!
//! Always set: `multi_prompts_gen_type = "FG"` (a blank line in the prompt does not
//! split it into several generations, which Wan2GP's API would reject), an
//! explicit `seed`, and `client_id`/`output_filename` = the attempt's key.
//!
//! The VRAM table (video tasks): a request larger than the table's top row is
//! refused; one that needs a larger row than this GPU's fails at once as out of
//! memory, so the broker moves it to a bigger GPU. At `degrade` level d ≥ 1 the
//! job is clamped to the row d below the smallest row that fits it (never above
//! this GPU's row), and runs with that row's memory profile. Images are not
//! limited by the table; each degrade level halves their pixel count and takes
//! the profile d rows below this GPU's.

use std::path::Path;

use kiln_config::{parse_resolution, DefaultModels, VramRow, VramTable};
use kiln_protocol::{FailureKind, JobError, JobSpec, Task};
use serde_json::{json, Map, Value};

use crate::backend::{int_param, str_param};

/// Settings Kiln manages itself; `params.wan2gp` may not set them.
const MANAGED: [&str; 16] = [
    "model_type",
    "client_id",
    "output_filename",
    "image_start",
    "image_end",
    "image_refs",
    "image_guide",
    "image_mask",
    "video_guide",
    "video_mask",
    "video_source",
    "audio_guide",
    "audio_guide2",
    "audio_source",
    "activated_loras",
    "loras_multipliers",
];

/// Side lengths are rounded down to this (Wan2GP's VAE block size).
const BLOCK: u32 = 16;

/// What the bridge reported about one model type.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelFacts {
    /// `get_model_schema(model_type)["metadata"]`: capabilities, fps, frame grid.
    pub metadata: Map<String, Value>,
    /// `get_default_settings(model_type)`.
    pub defaults: Map<String, Value>,
    /// The model's LoRAs, when it supports them.
    pub loras: Option<Vec<String>>,
}

impl ModelFacts {
    fn frames_grid(&self) -> (u32, u32) {
        let get = |k: &str, d: u32| {
            self.metadata
                .get(k)
                .and_then(Value::as_u64)
                .map_or(d, |v| v.max(1) as u32)
        };
        (get("frames_minimum", 5), get("frames_steps", 4))
    }

    fn fps(&self) -> f64 {
        self.metadata
            .get("fps")
            .and_then(Value::as_f64)
            .or_else(|| number(self.defaults.get("force_fps")?))
            .filter(|f| *f > 0.0)
            .unwrap_or(16.0)
    }

    /// Whether the model can do `task`; unknown when Wan2GP does not say.
    fn supports(&self, task: Task) -> Option<bool> {
        self.metadata
            .get("capabilities")?
            .get(task.as_str())?
            .as_bool()
    }
}

/// Everything [`plan`] needs besides the job.
pub struct PlanInput<'a> {
    pub spec: &'a JobSpec,
    pub model_type: &'a str,
    pub facts: &'a ModelFacts,
    pub table: &'a VramTable,
    /// This GPU's row in `table` (the last row for GPUs below every row).
    pub gpu_row: usize,
    pub degrade: u8,
    /// The attempt's key: Wan2GP's `client_id` and output file name.
    pub job_key: &'a str,
    /// The job's input image, already written to disk (image-to-video).
    pub image_start: Option<&'a Path>,
    /// Used when the job gives no seed.
    pub random_seed: u32,
}

/// Settings for Wan2GP and facts for the job's `info`.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub settings: Map<String, Value>,
    pub info: Map<String, Value>,
}

fn invalid(msg: impl Into<String>) -> JobError {
    JobError::new(FailureKind::InvalidInput, msg, false)
}

fn number(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_str()?.trim().parse().ok())
}

fn float_param(spec: &JobSpec, key: &str, min: f64, max: f64) -> Result<Option<f64>, JobError> {
    match spec.params.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(f) if f.is_finite() && (min..=max).contains(&f) => Ok(Some(f)),
            _ => Err(invalid(format!(
                "params.{key} must be a number from {min} to {max}, got {v}"
            ))),
        },
    }
}

/// The model type a job runs: its own, or the configured default for its task.
pub fn model_type(spec: &JobSpec, defaults: &DefaultModels) -> Result<String, JobError> {
    let default = match spec.task {
        Task::TextToVideo => &defaults.text_to_video,
        Task::ImageToVideo => &defaults.image_to_video,
        Task::TextToImage => &defaults.text_to_image,
        other => {
            return Err(invalid(format!(
                "the wan2gp backend runs text_to_video, image_to_video and text_to_image, not {}",
                other.as_str()
            )))
        }
    };
    Ok(spec.model.clone().unwrap_or_else(|| default.clone()))
}

/// A frame size and count, as requested or as planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Size {
    width: u32,
    height: u32,
    /// `None` for images.
    frames: Option<u32>,
}

impl Size {
    fn pixels(&self) -> u64 {
        self.width as u64 * self.height as u64
    }

    fn fits(&self, row: &VramRow) -> bool {
        let (rw, rh) = row.max_size();
        self.pixels() <= row.max_pixels()
            && self.width.max(self.height) <= rw.max(rh)
            && self.frames.is_none_or(|f| f <= row.max_frames)
    }

    fn describe(&self) -> String {
        match self.frames {
            Some(f) => format!("{}x{} with {f} frames", self.width, self.height),
            None => format!("{}x{}", self.width, self.height),
        }
    }

    /// Scales the frame by `factor` (keeping its shape), rounding sides down to
    /// the block size.
    fn scaled(&self, factor: f64) -> Size {
        let side = |s: u32| ((((s as f64) * factor) as u32) / BLOCK * BLOCK).max(BLOCK);
        Size {
            width: side(self.width),
            height: side(self.height),
            frames: self.frames,
        }
    }
}

fn row_text(row: &VramRow) -> String {
    format!(
        "the {} MiB row of the VRAM table (up to {}, {} frames, profile {})",
        row.min_vram_mb, row.max_resolution, row.max_frames, row.profile
    )
}

/// Snaps a frame count to the model's grid (`minimum + k × step`), rounding to
/// the nearest, or down when `down`.
fn snap_frames(frames: u32, (minimum, step): (u32, u32), down: bool) -> u32 {
    if frames <= minimum {
        return minimum;
    }
    let k = (frames - minimum) as f64 / step as f64;
    let k = if down { k.floor() } else { k.round() };
    minimum + k as u32 * step
}

/// Maps a job to Wan2GP settings. Errors name the offending field.
pub fn plan(input: &PlanInput) -> Result<Plan, JobError> {
    let spec = input.spec;
    let facts = input.facts;
    let task = spec.task;
    let video = task.is_video();
    if facts.supports(task) == Some(false) {
        return Err(invalid(format!(
            "Wan2GP model {} cannot do {}",
            input.model_type,
            task.as_str()
        )));
    }
    let mut settings = passthrough(spec)?;
    let mut info = Map::new();
    let mut notes: Vec<String> = Vec::new();

    settings.insert("model_type".into(), input.model_type.into());
    settings.insert("client_id".into(), input.job_key.into());
    settings.insert("output_filename".into(), input.job_key.into());
    settings
        .entry("multi_prompts_gen_type")
        .or_insert_with(|| "FG".into());

    let prompt = str_param(spec, "prompt")?.unwrap_or("");
    if prompt.trim().is_empty() && task != Task::ImageToVideo {
        return Err(invalid(format!(
            "params.prompt is required for {}",
            task.as_str()
        )));
    }
    settings.insert("prompt".into(), prompt.into());
    if let Some(neg) = str_param(spec, "negative_prompt")? {
        settings.insert("negative_prompt".into(), neg.into());
    }

    // Size: as asked, else the model's default.
    let (width, height) = requested_resolution(spec, facts)?;
    let frames = if video {
        Some(requested_frames(spec, facts)?)
    } else {
        None
    };
    let asked = Size {
        width,
        height,
        frames,
    };
    let (size, degraded_row) = fit_to_table(input, asked, &mut notes)?;
    settings.insert(
        "resolution".into(),
        format!("{}x{}", size.width, size.height).into(),
    );
    if let Some(f) = size.frames {
        settings.insert("video_length".into(), f.into());
    }
    // The bridge starts with this GPU's row's profile; a degraded job takes the
    // profile of the row it was clamped to.
    let profile = degraded_row.map(|r| input.table.rows()[r].profile);
    if let Some(p) = profile {
        settings.insert("override_profile".into(), json!(p));
    }

    if video {
        if let Some(fps) = float_param(spec, "fps", 1.0, 120.0)? {
            settings.insert("force_fps".into(), json!(fps));
        }
    } else {
        settings.insert("image_mode".into(), 1.into());
        if spec.params.contains_key("count") {
            settings.insert(
                "batch_size".into(),
                int_param(spec, "count", 1, 1, 8)?.into(),
            );
        }
    }
    if spec.params.contains_key("steps") {
        settings.insert(
            "num_inference_steps".into(),
            int_param(spec, "steps", 0, 1, 1000)?.into(),
        );
    }
    let seed = match spec.params.get("seed") {
        None | Some(Value::Null) => input.random_seed as i64,
        Some(_) => int_param(spec, "seed", 0, 0, u32::MAX as i64)?,
    };
    settings.insert("seed".into(), seed.into());
    for (kiln, wan) in [
        ("guidance", "guidance_scale"),
        ("guidance2", "guidance2_scale"),
        ("flow_shift", "flow_shift"),
    ] {
        if let Some(v) = float_param(spec, kiln, 0.0, 100.0)? {
            settings.insert(wan.into(), json!(v));
        }
    }
    if let Some(sampler) = str_param(spec, "sampler")? {
        settings.insert("sample_solver".into(), sampler.into());
    }
    map_loras(input, &mut settings)?;

    if task == Task::ImageToVideo {
        let path = input
            .image_start
            .ok_or_else(|| invalid("image_to_video needs the start image in job.inputs"))?;
        settings.insert("image_start".into(), path.display().to_string().into());
        settings.insert("image_prompt_type".into(), "S".into());
    }

    info.insert("model".into(), input.model_type.into());
    info.insert("seed".into(), seed.into());
    info.insert("width".into(), size.width.into());
    info.insert("height".into(), size.height.into());
    info.insert(
        "resolution".into(),
        format!("{}x{}", size.width, size.height).into(),
    );
    if let Some(f) = size.frames {
        info.insert("frames".into(), f.into());
    }
    let row = &input.table.rows()[input.gpu_row];
    info.insert("profile".into(), json!(profile.unwrap_or(row.profile)));
    info.insert("vram_row_mb".into(), row.min_vram_mb.into());
    info.insert("degrade".into(), input.degrade.into());
    if !notes.is_empty() {
        info.insert("adjusted".into(), notes.join("; ").into());
    }
    Ok(Plan { settings, info })
}

fn requested_resolution(spec: &JobSpec, facts: &ModelFacts) -> Result<(u32, u32), JobError> {
    let w = spec.params.get("width").filter(|v| !v.is_null());
    let h = spec.params.get("height").filter(|v| !v.is_null());
    if w.is_some() || h.is_some() {
        if w.is_none() || h.is_none() {
            return Err(invalid("params.width and params.height go together"));
        }
        let w = int_param(spec, "width", 0, BLOCK as i64, 8192)? as u32;
        let h = int_param(spec, "height", 0, BLOCK as i64, 8192)? as u32;
        return Ok((w, h));
    }
    if let Some(text) = str_param(spec, "resolution")? {
        return parse_resolution(text)
            .filter(|(w, h)| (BLOCK..=8192).contains(w) && (BLOCK..=8192).contains(h))
            .ok_or_else(|| {
                invalid(format!(
                    "params.resolution must be WIDTHxHEIGHT from 16 to 8192, got {text:?}"
                ))
            });
    }
    Ok(facts
        .defaults
        .get("resolution")
        .and_then(Value::as_str)
        .and_then(parse_resolution)
        .unwrap_or((832, 480)))
}

fn requested_frames(spec: &JobSpec, facts: &ModelFacts) -> Result<u32, JobError> {
    let grid = facts.frames_grid();
    if spec.params.get("frames").is_some_and(|v| !v.is_null()) {
        let f = int_param(spec, "frames", 0, 1, 10_000)? as u32;
        return Ok(snap_frames(f, grid, false));
    }
    if let Some(seconds) = float_param(spec, "seconds", 0.05, 600.0)? {
        let fps = float_param(spec, "fps", 1.0, 120.0)?.unwrap_or_else(|| facts.fps());
        return Ok(snap_frames((seconds * fps).round() as u32, grid, false));
    }
    Ok(facts
        .defaults
        .get("video_length")
        .and_then(Value::as_u64)
        .map_or(81, |f| f as u32))
}

/// Applies the VRAM table and the degrade level to the requested size; also
/// returns the row a degraded job was stepped down to.
fn fit_to_table(
    input: &PlanInput,
    asked: Size,
    notes: &mut Vec<String>,
) -> Result<(Size, Option<usize>), JobError> {
    let rows = input.table.rows();
    let last = rows.len() - 1;
    let g = input.gpu_row.min(last);
    let d = input.degrade as usize;
    if asked.frames.is_none() {
        // Images: each level halves the pixel count.
        if d == 0 {
            return Ok((asked, None));
        }
        let size = asked.scaled(0.5f64.powf(d as f64 / 2.0));
        notes.push(format!(
            "degrade {d}: {} → {}",
            asked.describe(),
            size.describe()
        ));
        return Ok((size, Some((g + d).min(last))));
    }
    let Some(need) = (0..rows.len()).rev().find(|&i| asked.fits(&rows[i])) else {
        return Err(invalid(format!(
            "{} is more than the largest row of the VRAM table allows ({}, {} frames); no worker can run it",
            asked.describe(),
            rows[0].max_resolution,
            rows[0].max_frames
        )));
    };
    if d == 0 {
        if need < g {
            return Err(JobError::new(
                FailureKind::OutOfMemory,
                format!(
                    "{} needs {}; this GPU is in {}",
                    asked.describe(),
                    row_text(&rows[need]),
                    row_text(&rows[g])
                ),
                true,
            ));
        }
        return Ok((asked, None));
    }
    let wanted = need + d;
    let target = wanted.max(g).min(last);
    if wanted > last {
        notes.push(format!(
            "degrade {d} goes below the VRAM table; using its smallest row"
        ));
    }
    let row = &rows[target];
    let (rw, rh) = row.max_size();
    let mut size = asked;
    let frame_only = Size {
        frames: None,
        ..asked
    };
    if !frame_only.fits(row) {
        let by_area = (row.max_pixels() as f64 / asked.pixels() as f64).sqrt();
        let by_side = rw.max(rh) as f64 / asked.width.max(asked.height) as f64;
        size = asked.scaled(by_area.min(by_side));
    }
    if asked.frames.is_some_and(|f| f > row.max_frames) {
        size.frames =
            Some(snap_frames(row.max_frames, input.facts.frames_grid(), true).min(row.max_frames));
    }
    notes.push(format!(
        "degrade {d}: {} → {} ({})",
        asked.describe(),
        size.describe(),
        row_text(row)
    ));
    Ok((size, Some(target)))
}

fn map_loras(input: &PlanInput, settings: &mut Map<String, Value>) -> Result<(), JobError> {
    let spec = input.spec;
    if spec.loras.is_empty() {
        return Ok(());
    }
    let mut names = Vec::new();
    let mut strengths = Vec::new();
    for (i, lora) in spec.loras.iter().enumerate() {
        if looks_like_a_path(&lora.name) {
            return Err(invalid(format!(
                "job.loras[{i}].name must name an installed LoRA, not a path or URL"
            )));
        }
        match &input.facts.loras {
            None => {
                return Err(invalid(format!(
                    "Wan2GP model {} does not take LoRAs",
                    input.model_type
                )));
            }
            Some(known) if !known.contains(&lora.name) => {
                let some: Vec<&str> = known.iter().take(10).map(String::as_str).collect();
                return Err(invalid(format!(
                    "job.loras[{i}].name: LoRA {:?} is not installed for {}; installed: {}",
                    lora.name,
                    input.model_type,
                    if some.is_empty() {
                        "none".into()
                    } else {
                        some.join(", ")
                    }
                )));
            }
            Some(_) => {}
        }
        names.push(Value::from(lora.name.clone()));
        strengths.push(format!("{}", lora.strength));
    }
    settings.insert("activated_loras".into(), Value::Array(names));
    settings.insert("loras_multipliers".into(), strengths.join(" ").into());
    Ok(())
}

/// `params.wan2gp`: raw Wan2GP settings, checked so they cannot name files.
fn passthrough(spec: &JobSpec) -> Result<Map<String, Value>, JobError> {
    let raw = match spec.params.get("wan2gp") {
        None | Some(Value::Null) => return Ok(Map::new()),
        Some(Value::Object(m)) => m,
        Some(v) => {
            return Err(invalid(format!(
                "params.wan2gp must be a map of Wan2GP settings, got {v}"
            )))
        }
    };
    for (key, value) in raw {
        if MANAGED.contains(&key.as_str()) {
            return Err(invalid(format!(
                "params.wan2gp.{key} is set by Kiln (use job.model, job.inputs or job.loras)"
            )));
        }
        if holds_a_path(value) {
            return Err(invalid(format!(
                "params.wan2gp.{key} looks like a file path or URL; files come from job.inputs"
            )));
        }
    }
    Ok(raw.clone())
}

fn looks_like_a_path(s: &str) -> bool {
    s.starts_with('/')
        || s.starts_with('~')
        || s.contains("..")
        || s.contains('\\')
        || s.contains("://")
}

fn holds_a_path(v: &Value) -> bool {
    match v {
        Value::String(s) => looks_like_a_path(s),
        Value::Array(items) => items.iter().any(holds_a_path),
        Value::Object(m) => m.values().any(holds_a_path),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::{Backend, LoraRef};

    fn facts() -> ModelFacts {
        let metadata = json!({
            "capabilities": {"text_to_video": true, "image_to_video": false, "text_to_image": false},
            "fps": 16, "frames_minimum": 5, "frames_steps": 4
        });
        let defaults =
            json!({"resolution": "832x480", "video_length": 81, "num_inference_steps": 30});
        ModelFacts {
            metadata: metadata.as_object().unwrap().clone(),
            defaults: defaults.as_object().unwrap().clone(),
            loras: Some(vec!["wan/kiln_style.safetensors".into()]),
        }
    }

    fn t2v(prompt: &str) -> JobSpec {
        JobSpec::new(Backend::Wan2gp, Task::TextToVideo).param("prompt", prompt)
    }

    fn run(
        spec: &JobSpec,
        facts: &ModelFacts,
        gpu_row: usize,
        degrade: u8,
    ) -> Result<Plan, JobError> {
        let table = VramTable::default();
        plan(&PlanInput {
            spec,
            model_type: "t2v_2_2",
            facts,
            table: &table,
            gpu_row,
            degrade,
            job_key: "j7-1",
            image_start: None,
            random_seed: 4242,
        })
    }

    #[test]
    fn kiln_names_map_to_wan2gp_names() {
        let mut spec = t2v("a fox\n\nin the snow")
            .param("negative_prompt", "blurry")
            .param("width", 1280)
            .param("height", 720)
            .param("frames", 80)
            .param("fps", 24)
            .param("steps", 12)
            .param("seed", 7)
            .param("guidance", 5.5)
            .param("sampler", "unipc");
        spec.loras.push(LoraRef {
            name: "wan/kiln_style.safetensors".into(),
            strength: 0.8,
        });
        let p = run(&spec, &facts(), 0, 0).unwrap();
        let s = &p.settings;
        assert_eq!(s["model_type"], "t2v_2_2");
        assert_eq!(s["prompt"], "a fox\n\nin the snow");
        assert_eq!(
            s["multi_prompts_gen_type"], "FG",
            "blank lines do not split the prompt"
        );
        assert_eq!(s["negative_prompt"], "blurry");
        assert_eq!(s["resolution"], "1280x720");
        assert_eq!(s["video_length"], 81, "snapped to 4n+1");
        assert_eq!(s["force_fps"], 24.0);
        assert_eq!(s["num_inference_steps"], 12);
        assert_eq!(s["seed"], 7);
        assert_eq!(s["guidance_scale"], 5.5);
        assert_eq!(s["sample_solver"], "unipc");
        assert_eq!(s["activated_loras"], json!(["wan/kiln_style.safetensors"]));
        assert_eq!(s["loras_multipliers"], "0.8");
        assert_eq!(
            (s["client_id"].as_str(), s["output_filename"].as_str()),
            (Some("j7-1"), Some("j7-1"))
        );
        assert!(
            !s.contains_key("override_profile"),
            "degrade 0 keeps the bridge's profile"
        );
        assert_eq!(p.info["profile"], 3.0);
        assert_eq!(p.info["frames"], 81);
    }

    #[test]
    fn defaults_seconds_and_resolution_strings() {
        let p = run(&t2v("x"), &facts(), 0, 0).unwrap();
        assert_eq!(p.settings["resolution"], "832x480", "the model's default");
        assert_eq!(p.settings["video_length"], 81);
        assert_eq!(p.settings["seed"], 4242, "a drawn seed is explicit");
        assert_eq!(p.info["seed"], 4242);
        let p = run(
            &t2v("x").param("seconds", 5).param("resolution", "640x352"),
            &facts(),
            0,
            0,
        )
        .unwrap();
        assert_eq!(p.settings["video_length"], 81, "5 s at the model's 16 fps");
        assert_eq!(p.settings["resolution"], "640x352");
    }

    #[test]
    fn bad_parameters_name_their_field() {
        let cases = [
            (
                t2v("x").param("width", 640),
                "params.width and params.height",
            ),
            (t2v("x").param("resolution", "huge"), "params.resolution"),
            (t2v("x").param("steps", "many"), "params.steps"),
            (t2v("x").param("seed", -1), "params.seed"),
            (t2v("x").param("guidance", "high"), "params.guidance"),
            (t2v(""), "params.prompt"),
            (
                t2v("x").param("wan2gp", json!({"image_refs": ["/etc/passwd"]})),
                "params.wan2gp.image_refs",
            ),
            (
                t2v("x").param("wan2gp", json!({"prompt_enhancer": "../../x"})),
                "params.wan2gp.prompt_enhancer",
            ),
        ];
        for (spec, field) in cases {
            let err = run(&spec, &facts(), 0, 0).unwrap_err();
            assert_eq!(err.kind, FailureKind::InvalidInput);
            assert!(err.message.contains(field), "{field}: {}", err.message);
        }
        let mut spec = t2v("x");
        spec.loras.push(LoraRef {
            name: "missing.safetensors".into(),
            strength: 1.0,
        });
        let err = run(&spec, &facts(), 0, 0).unwrap_err();
        assert!(
            err.message.contains("job.loras[0]") && err.message.contains("kiln_style"),
            "{}",
            err.message
        );
        let err = run(
            &JobSpec::new(Backend::Wan2gp, Task::TextToImage).param("prompt", "x"),
            &facts(),
            0,
            0,
        )
        .unwrap_err();
        assert!(
            err.message.contains("cannot do text_to_image"),
            "{}",
            err.message
        );
    }

    #[test]
    fn passthrough_settings_are_merged_but_cannot_override_kiln() {
        let spec = t2v("x").param(
            "wan2gp",
            json!({"flow_shift": 3, "multi_prompts_gen_type": "PG", "_fake": {"steps": 2}}),
        );
        let p = run(&spec, &facts(), 0, 0).unwrap();
        assert_eq!(p.settings["flow_shift"], 3);
        assert_eq!(
            p.settings["multi_prompts_gen_type"], "PG",
            "an explicit choice wins"
        );
        assert_eq!(p.settings["_fake"]["steps"], 2);
        let err = run(
            &t2v("x").param("wan2gp", json!({"model_type": "other"})),
            &facts(),
            0,
            0,
        )
        .unwrap_err();
        assert!(
            err.message.contains("params.wan2gp.model_type"),
            "{}",
            err.message
        );
    }

    #[test]
    fn the_vram_table_refuses_too_big_and_sends_bigger_requests_to_bigger_gpus() {
        let too_big = t2v("x")
            .param("resolution", "1920x1080")
            .param("frames", 241);
        let err = run(&too_big, &facts(), 0, 0).unwrap_err();
        assert_eq!(err.kind, FailureKind::InvalidInput);
        assert!(
            err.message.contains("no worker can run it"),
            "{}",
            err.message
        );

        // 1920x1080 needs the 24 GB row; on a 12 GB GPU (row 2) it is an OOM at once.
        let big = t2v("x")
            .param("resolution", "1920x1080")
            .param("frames", 81);
        let err = run(&big, &facts(), 2, 0).unwrap_err();
        assert_eq!((err.kind, err.retryable), (FailureKind::OutOfMemory, true));
        assert!(err.message.contains("24576 MiB row"), "{}", err.message);
        assert!(run(&big, &facts(), 0, 0).is_ok());
    }

    #[test]
    fn each_degrade_level_steps_down_the_table() {
        // 1280x720/81 fits the 12 GB row at best (row 2); level 1 is the 8 GB row.
        let spec = t2v("x")
            .param("width", 1280)
            .param("height", 720)
            .param("frames", 81);
        let p = run(&spec, &facts(), 0, 1).unwrap();
        assert_eq!(
            p.settings["resolution"], "720x400",
            "within 720x480's long side, 16:9 kept, multiples of 16"
        );
        assert_eq!(p.settings["video_length"], 73);
        assert_eq!(p.settings["override_profile"], 4.5);
        assert_eq!(p.info["degrade"], 1);
        assert!(p.info["adjusted"]
            .as_str()
            .unwrap()
            .contains("1280x720 with 81 frames → 720x400 with 73 frames"));
        let p = run(&spec, &facts(), 0, 2).unwrap();
        assert_eq!(p.settings["resolution"], "512x288");
        assert_eq!(p.settings["video_length"], 49);
        assert_eq!(p.settings["override_profile"], 5.0);
        let p = run(&spec, &facts(), 0, 3).unwrap();
        assert_eq!(
            p.settings["resolution"], "512x288",
            "below the table: its smallest row"
        );
        assert!(p.info["adjusted"]
            .as_str()
            .unwrap()
            .contains("below the VRAM table"));

        // A request too big for this GPU degrades straight to this GPU's row.
        let big = t2v("x")
            .param("resolution", "1920x1080")
            .param("frames", 169);
        let p = run(&big, &facts(), 2, 1).unwrap();
        assert_eq!(p.settings["resolution"], "1280x720");
        assert_eq!(p.settings["video_length"], 97);
        assert_eq!(p.settings["override_profile"], 4.0);

        // Images: half the pixels per level, the profile d rows below the GPU's.
        let mut image_facts = facts();
        image_facts
            .metadata
            .insert("capabilities".into(), json!({"text_to_image": true}));
        let img = JobSpec::new(Backend::Wan2gp, Task::TextToImage)
            .param("prompt", "x")
            .param("resolution", "1024x1024");
        let p = run(&img, &image_facts, 0, 0).unwrap();
        assert_eq!(p.settings["resolution"], "1024x1024");
        assert_eq!(p.settings["image_mode"], 1);
        assert!(!p.settings.contains_key("video_length"));
        let p = run(&img, &image_facts, 0, 2).unwrap();
        assert_eq!(p.settings["resolution"], "512x512");
        assert_eq!(p.settings["override_profile"], 4.0);
    }

    #[test]
    fn image_to_video_takes_the_input_image_by_absolute_path() {
        let mut f = facts();
        f.metadata
            .insert("capabilities".into(), json!({"image_to_video": true}));
        let spec = JobSpec::new(Backend::Wan2gp, Task::ImageToVideo);
        let table = VramTable::default();
        let mut input = PlanInput {
            spec: &spec,
            model_type: "i2v_2_2",
            facts: &f,
            table: &table,
            gpu_row: 0,
            degrade: 0,
            job_key: "j1-1",
            image_start: None,
            random_seed: 1,
        };
        assert!(plan(&input).unwrap_err().message.contains("job.inputs"));
        let path = Path::new("/work/j1-1/start.png");
        input.image_start = Some(path);
        let p = plan(&input).unwrap();
        assert_eq!(p.settings["image_start"], "/work/j1-1/start.png");
        assert_eq!(p.settings["image_prompt_type"], "S");
    }

    #[test]
    fn default_models_per_task() {
        let d = DefaultModels::default();
        assert_eq!(model_type(&t2v("x"), &d).unwrap(), "t2v_2_2");
        let mut spec = t2v("x");
        spec.model = Some("ltx2_22B".into());
        assert_eq!(model_type(&spec, &d).unwrap(), "ltx2_22B");
        let wf = JobSpec::new(Backend::Wan2gp, Task::Workflow);
        assert_eq!(
            model_type(&wf, &d).unwrap_err().kind,
            FailureKind::InvalidInput
        );
    }

    #[test]
    fn frames_snap_to_the_grid() {
        assert_eq!(snap_frames(80, (5, 4), false), 81);
        assert_eq!(snap_frames(2, (5, 4), false), 5);
        assert_eq!(snap_frames(100, (5, 4), true), 97);
        assert_eq!(snap_frames(97, (5, 4), true), 97);
    }
}
