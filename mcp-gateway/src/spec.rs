//! Turns validated tool arguments into the broker's [`JobSpec`]s.
//!
//! The parameter names are Kiln's common vocabulary (`prompt`, `width`, `steps`,
//! `cfg`, `seed`, `count`, `frames`, `fps`, `strength`, …) that every backend maps
//! onto its generator. Seeds are always chosen here when the caller gives none, so
//! every result can report the seed that reproduces it.

use std::hash::{BuildHasher, Hasher};

use kiln_config::McpConfig;
use kiln_protocol::{Backend, InputFile, JobOptions, JobSpec, Task};
use serde_json::{Map, Value};

use crate::args::*;
use crate::error::ToolError;

/// A seed nobody chose: 32 random bits (fits every generator's seed range).
pub fn random_seed() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        & 0xffff_ffff
}

/// The seed of a job whose call chose none: random, or, when the call carries an
/// idempotency key, 32 bits derived from the key (FNV-1a, the same in every
/// gateway process), so that a retried call is the same job and gets its first
/// job back instead of an `idempotency_conflict` over the seed.
pub fn default_seed(idempotency_key: Option<&str>) -> u64 {
    match idempotency_key {
        None => random_seed(),
        Some(key) => kiln_protocol::fnv1a(key.as_bytes()) & 0xffff_ffff,
    }
}

/// The words a style preset adds: (prompt suffix, negative prompt additions, pixel
/// grid size for pixel styles).
pub fn style_words(style: StylePreset) -> (&'static str, &'static str, Option<u32>) {
    match style {
        StylePreset::PixelArt => (
            "pixel art, crisp pixels, limited palette",
            "blurry, smooth shading, anti-aliasing, photo",
            Some(8),
        ),
        StylePreset::EightBit => (
            "8-bit pixel art, NES palette, chunky pixels",
            "blurry, gradients, high detail, photo",
            Some(16),
        ),
        StylePreset::SixteenBit => (
            "16-bit pixel art, SNES era, detailed sprite shading",
            "blurry, photo, 3d render",
            Some(4),
        ),
        StylePreset::Retro => (
            "retro video game art, bold outlines, flat colours",
            "photo, realistic, noisy",
            None,
        ),
        StylePreset::GameSprite => (
            "game sprite, clean silhouette, centred, full body, readable shapes",
            "cropped, cluttered, text, watermark",
            None,
        ),
        StylePreset::Photo => (
            "photograph, natural light, sharp focus",
            "illustration, cartoon, painting",
            None,
        ),
        StylePreset::Illustration => ("digital illustration, clean lines", "photo, blurry", None),
        StylePreset::Anime => ("anime style, cel shading", "photo, realistic", None),
        StylePreset::ConceptArt => (
            "concept art, painterly, dramatic lighting",
            "photo, text",
            None,
        ),
    }
}

fn join_prompt(base: &str, extra: &str) -> String {
    if extra.is_empty() {
        base.to_string()
    } else {
        format!("{base}, {extra}")
    }
}

fn join_negative(base: Option<&str>, extra: &str) -> Option<String> {
    match (base.filter(|s| !s.is_empty()), extra.is_empty()) {
        (None, true) => None,
        (None, false) => Some(extra.to_string()),
        (Some(b), true) => Some(b.to_string()),
        (Some(b), false) => Some(format!("{b}, {extra}")),
    }
}

/// Adds caller-given extra parameters, refusing those that would silently replace
/// a named argument.
fn merge_extra(
    params: &mut Map<String, Value>,
    extra: Option<&Map<String, Value>>,
    field: &str,
) -> Result<(), ToolError> {
    for (key, value) in extra.into_iter().flatten() {
        if params.contains_key(key) {
            return Err(ToolError::invalid(
                format!("{field}.{key}"),
                format!("is set by the tool's own `{key}` argument; use that instead"),
            ));
        }
        params.insert(key.clone(), value.clone());
    }
    Ok(())
}

/// Sets the job options on `spec` (the gateway's configured priority when the
/// call gives none).
fn apply_options(spec: &mut JobSpec, job: &JobOptions, cfg: &McpConfig) -> Result<(), ToolError> {
    job.apply(spec)
        .map_err(|e| ToolError::invalid("arguments", e.to_string()))?;
    if job.priority.is_none() {
        spec.priority = cfg.priority;
    }
    Ok(())
}

/// Parameters of an image job before the per-item prompt is set.
fn image_spec(
    task: Task,
    prompt: &str,
    o: &ImageOptions,
    cfg: &McpConfig,
    sprite: Option<Background>,
) -> Result<JobSpec, ToolError> {
    check_size(o.width, o.height)?;
    let backend: Backend = o.backend.map(Into::into).unwrap_or(cfg.image_backend);
    let style = o.style.or(sprite.map(|_| StylePreset::GameSprite));
    let (mut extra_prompt, mut extra_negative) = style
        .map(|s| (style_words(s).0.to_string(), style_words(s).1.to_string()))
        .unwrap_or_default();
    if let Some(bg) = sprite {
        let (p, n) = match bg {
            Background::Transparent => (
                "isolated on a plain flat solid-colour background, no shadow",
                "background scenery, gradient background, ground shadow",
            ),
            Background::Flat => (
                "on a plain flat solid-colour background",
                "background scenery, gradient background",
            ),
        };
        extra_prompt = join_prompt(&extra_prompt, p)
            .trim_start_matches(", ")
            .to_string();
        extra_negative = join_prompt(&extra_negative, n)
            .trim_start_matches(", ")
            .to_string();
    }
    let mut spec = JobSpec::new(backend, task);
    let p = &mut spec.params;
    p.insert("prompt".into(), join_prompt(prompt, &extra_prompt).into());
    if let Some(neg) = join_negative(o.negative_prompt.as_deref(), &extra_negative) {
        p.insert("negative_prompt".into(), neg.into());
    }
    p.insert("width".into(), o.width.into());
    p.insert("height".into(), o.height.into());
    if let Some(steps) = o.steps {
        p.insert("steps".into(), steps.into());
    }
    if let Some(cfg_scale) = o.cfg {
        p.insert("cfg".into(), cfg_scale.into());
    }
    let key = o.job.idempotency_key.as_deref();
    p.insert(
        "seed".into(),
        o.seed.unwrap_or_else(|| default_seed(key)).into(),
    );
    if o.count > 1 {
        p.insert("count".into(), o.count.into());
    }
    if let Some(bg) = sprite {
        p.insert(
            "background".into(),
            if bg == Background::Transparent {
                "transparent"
            } else {
                "flat"
            }
            .into(),
        );
    }
    merge_extra(&mut spec.params, o.params.as_ref(), "params")?;
    spec.template = o.template.clone();
    apply_options(&mut spec, &o.job, cfg)?;
    Ok(spec)
}

pub fn generate_image(a: &GenerateImageArgs, cfg: &McpConfig) -> Result<JobSpec, ToolError> {
    image_spec(Task::TextToImage, &a.prompt, &a.options, cfg, None)
}

pub fn generate_sprite(a: &GenerateSpriteArgs, cfg: &McpConfig) -> Result<JobSpec, ToolError> {
    image_spec(
        Task::TextToImage,
        &a.prompt,
        &a.options,
        cfg,
        Some(a.background),
    )
}

pub fn edit_image(
    a: &EditImageArgs,
    cfg: &McpConfig,
    input: InputFile,
) -> Result<JobSpec, ToolError> {
    let mut spec = image_spec(Task::ImageToImage, &a.prompt, &a.options, cfg, None)?;
    spec.params.insert("strength".into(), a.strength.into());
    spec.params
        .insert("image".into(), input.name.clone().into());
    spec.inputs.push(input);
    Ok(spec)
}

/// One spec per batch item; items share everything but prompt, seed, negative
/// prompt and per-item extras. Without seeds, items get consecutive seeds from
/// one random start so the batch can be reproduced.
pub fn generate_batch(a: &GenerateBatchArgs, cfg: &McpConfig) -> Result<Vec<JobSpec>, ToolError> {
    let key = a.options.job.idempotency_key.as_deref();
    let base_seed = a.options.seed.unwrap_or_else(|| default_seed(key));
    a.prompts
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let mut options = a.options.clone();
            options.seed = Some(base_seed + i as u64);
            if let BatchItem::Detailed(d) = item {
                if let Some(seed) = d.seed {
                    options.seed = Some(seed);
                }
                if d.negative_prompt.is_some() {
                    options.negative_prompt = d.negative_prompt.clone();
                }
            }
            let mut spec = image_spec(Task::TextToImage, item.prompt(), &options, cfg, None)?;
            // Each item is its own job: the call's key, numbered per item.
            if let Some(key) = key {
                spec.idempotency_key = Some(format!("{key}/{i}"));
            }
            if let BatchItem::Detailed(d) = item {
                merge_extra(
                    &mut spec.params,
                    d.params.as_ref(),
                    &format!("prompts[{i}].params"),
                )?;
            }
            Ok(spec)
        })
        .collect()
}

pub fn generate_video(
    a: &GenerateVideoArgs,
    cfg: &McpConfig,
    input: Option<InputFile>,
) -> Result<JobSpec, ToolError> {
    check_size(a.width, a.height)?;
    if a.frames.is_some() && a.seconds.is_some() {
        return Err(ToolError::invalid(
            "seconds",
            "give `frames` or `seconds`, not both",
        ));
    }
    let frames = match (a.frames, a.seconds) {
        (Some(f), _) => Some(f),
        (None, Some(s)) => {
            let f = (s * a.fps as f64).round() as u32;
            if !(2..=1024).contains(&f) {
                return Err(ToolError::invalid(
                    "seconds",
                    format!(
                        "{s} s at {} fps is {f} frames; allowed are 2 to 1024",
                        a.fps
                    ),
                ));
            }
            Some(f)
        }
        (None, None) => None,
    };
    let backend: Backend = a.backend.map(Into::into).unwrap_or(cfg.video_backend);
    let task = if input.is_some() {
        Task::ImageToVideo
    } else {
        Task::TextToVideo
    };
    let mut spec = JobSpec::new(backend, task);
    let p = &mut spec.params;
    p.insert("prompt".into(), a.prompt.clone().into());
    if let Some(neg) = a.negative_prompt.as_ref().filter(|n| !n.is_empty()) {
        p.insert("negative_prompt".into(), neg.clone().into());
    }
    p.insert("width".into(), a.width.into());
    p.insert("height".into(), a.height.into());
    p.insert("fps".into(), a.fps.into());
    if let Some(f) = frames {
        p.insert("frames".into(), f.into());
    }
    if let Some(steps) = a.steps {
        p.insert("steps".into(), steps.into());
    }
    let key = a.job.idempotency_key.as_deref();
    p.insert(
        "seed".into(),
        a.seed.unwrap_or_else(|| default_seed(key)).into(),
    );
    if let Some(input) = input {
        p.insert("image".into(), input.name.clone().into());
        spec.inputs.push(input);
    }
    merge_extra(&mut spec.params, a.params.as_ref(), "params")?;
    apply_options(&mut spec, &a.job, cfg)?;
    Ok(spec)
}

/// Applies `<node id>.<input>` overrides to a raw graph, refusing names that do not
/// exist so that a typo is not silently ignored.
fn apply_overrides(
    workflow: &mut Map<String, Value>,
    overrides: &Map<String, Value>,
) -> Result<(), ToolError> {
    for (key, value) in overrides {
        let field = format!("overrides.{key}");
        let (node, input) = key.split_once('.').ok_or_else(|| {
            ToolError::invalid(&field, "keys are `<node id>.<input name>`, e.g. `6.text`")
        })?;
        let inputs = workflow
            .get_mut(node)
            .ok_or_else(|| {
                ToolError::invalid(&field, format!("the workflow has no node {node:?}"))
            })?
            .get_mut("inputs")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| {
                ToolError::invalid(&field, format!("node {node:?} has no `inputs` map"))
            })?;
        if !inputs.contains_key(input) {
            let mut known: Vec<&str> = inputs.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err(ToolError::invalid(
                &field,
                format!(
                    "node {node:?} has no input {input:?}; it has {}",
                    known.join(", ")
                ),
            ));
        }
        inputs.insert(input.to_string(), value.clone());
    }
    Ok(())
}

pub fn run_workflow(a: &RunWorkflowArgs, cfg: &McpConfig) -> Result<JobSpec, ToolError> {
    let backend: Backend = a.backend.map(Into::into).unwrap_or(Backend::Comfyui);
    let mut spec = JobSpec::new(backend, Task::Workflow);
    match (&a.workflow, &a.template) {
        (Some(_), Some(_)) => {
            return Err(ToolError::invalid(
                "template",
                "give `workflow` or `template`, not both",
            ))
        }
        (None, None) => {
            return Err(ToolError::invalid(
                "workflow",
                "give a `workflow` graph or a `template` name",
            ))
        }
        (Some(graph), None) => {
            if graph.is_empty() {
                return Err(ToolError::invalid(
                    "workflow",
                    "must contain at least one node",
                ));
            }
            let mut graph = graph.clone();
            apply_overrides(&mut graph, &a.overrides)?;
            spec.workflow = Some(Value::Object(graph));
        }
        (None, Some(name)) => {
            spec.template = Some(name.clone());
            spec.params = a.overrides.clone();
        }
    }
    apply_options(&mut spec, &a.job, cfg)?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse<T: serde::de::DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn image_arguments_become_params_with_a_reported_seed() {
        let cfg = McpConfig::default();
        let a: GenerateImageArgs = parse(
            json!({"prompt": "a kiln", "width": 512, "style": "pixel_art", "loras": [{"name": "detail"}]}),
        );
        let spec = generate_image(&a, &cfg).unwrap();
        assert_eq!(spec.backend, cfg.image_backend);
        assert_eq!(spec.params["width"], 512);
        assert_eq!(spec.params["height"], 1024);
        assert!(spec.params["prompt"]
            .as_str()
            .unwrap()
            .starts_with("a kiln, pixel art"));
        assert!(spec.params["seed"].is_u64());
        assert_eq!(spec.loras[0].strength, 1.0);
        assert_eq!(spec.priority, cfg.priority);

        // Every job option reaches the spec under its own name.
        let all: GenerateImageArgs = parse(json!({"prompt": "x", "model": "m", "priority": -3,
            "labels": ["studio"], "min_vram_mb": 9000, "queue_timeout_s": 5, "run_timeout_s": 60,
            "max_attempts": 2, "idempotency_key": "k1", "allow_degrade": true}));
        let spec = generate_image(&all, &cfg).unwrap();
        assert_eq!(JobOptions::of(&spec), all.options.job);
        assert_eq!(spec.labels, ["studio"]);
        assert!(spec.allow_degrade);

        let odd: GenerateImageArgs = parse(json!({"prompt": "x", "width": 500}));
        assert!(
            matches!(generate_image(&odd, &cfg), Err(ToolError::InvalidArgument { field, .. }) if field == "width")
        );
        let clash: GenerateImageArgs = parse(json!({"prompt": "x", "params": {"width": 8}}));
        assert!(
            matches!(generate_image(&clash, &cfg), Err(ToolError::InvalidArgument { field, .. }) if field == "params.width")
        );
    }

    #[test]
    fn a_call_with_an_idempotency_key_is_the_same_job_when_retried() {
        let cfg = McpConfig::default();
        let seed = |s: &JobSpec| s.params["seed"].as_u64().unwrap();
        let a: GenerateImageArgs = parse(json!({"prompt": "x", "idempotency_key": "mk1"}));
        let first = generate_image(&a, &cfg).unwrap();
        assert_eq!(first, generate_image(&a, &cfg).unwrap());
        let b: GenerateImageArgs = parse(json!({"prompt": "x", "idempotency_key": "mk2"}));
        assert_ne!(seed(&first), seed(&generate_image(&b, &cfg).unwrap()));
        // A batch's items are jobs of their own: the key numbered per item.
        let batch: GenerateBatchArgs =
            parse(json!({"prompts": ["a", "b"], "idempotency_key": "bk"}));
        let specs = generate_batch(&batch, &cfg).unwrap();
        let keys: Vec<_> = specs.iter().map(|s| s.idempotency_key.as_deref()).collect();
        assert_eq!(keys, [Some("bk/0"), Some("bk/1")]);
        assert_eq!(specs, generate_batch(&batch, &cfg).unwrap());
    }

    #[test]
    fn batch_items_get_consecutive_seeds_and_their_own_extras() {
        let a: GenerateBatchArgs = parse(
            json!({"prompts": ["a", {"prompt": "b", "params": {"fault": "fail"}}, {"prompt": "c", "seed": 7}], "seed": 100, "backend": "sim"}),
        );
        let specs = generate_batch(&a, &McpConfig::default()).unwrap();
        let seeds: Vec<u64> = specs
            .iter()
            .map(|s| s.params["seed"].as_u64().unwrap())
            .collect();
        assert_eq!(seeds, [100, 101, 7]);
        assert_eq!(specs[1].params["fault"], "fail");
        assert!(specs[0].params.get("fault").is_none());
        assert_eq!(specs[2].backend, Backend::Sim);
    }

    #[test]
    fn video_seconds_become_frames() {
        let a: GenerateVideoArgs = parse(json!({"prompt": "waves", "seconds": 2.0, "fps": 8}));
        let spec = generate_video(&a, &McpConfig::default(), None).unwrap();
        assert_eq!(spec.task, Task::TextToVideo);
        assert_eq!(spec.params["frames"], 16);
        let both: GenerateVideoArgs =
            parse(json!({"prompt": "waves", "seconds": 2.0, "frames": 3}));
        assert!(generate_video(&both, &McpConfig::default(), None).is_err());
    }

    #[test]
    fn workflow_overrides_must_name_real_inputs() {
        let graph = json!({"6": {"class_type": "CLIPTextEncode", "inputs": {"text": "old", "clip": ["4", 1]}}});
        let ok: RunWorkflowArgs = parse(json!({"workflow": graph, "overrides": {"6.text": "new"}}));
        let spec = run_workflow(&ok, &McpConfig::default()).unwrap();
        assert_eq!(spec.workflow.unwrap()["6"]["inputs"]["text"], "new");
        let bad: RunWorkflowArgs = parse(json!({"workflow": graph, "overrides": {"6.txt": "new"}}));
        let err = run_workflow(&bad, &McpConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("overrides.6.txt") && err.contains("clip, text"),
            "{err}"
        );
    }
}
