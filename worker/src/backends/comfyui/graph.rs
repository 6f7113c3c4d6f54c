//! Turning a job into an API-format graph: built-in and operator templates with
//! named parameter bindings, raw graphs with overrides, LoRA chains, init images
//! and a seed per job.
//!
//! A template is a JSON file `{description, workflow, params, loras}`: `workflow` is
//! an API-format graph, `params` maps a parameter name to the node input(s) it
//! sets (`{"node": "5", "input": "seed"}` or a list of them), and `loras` names the
//! loader outputs (`{"model": ["1", 0], "clip": ["1", 1]}`) after which the job's
//! LoRAs are chained. Names with a meaning of their own: `model` (the job's
//! `model`), `image` (the job's first input, after upload), `seed` (the job's seed,
//! or a fresh one), `filename_prefix` (`kiln/job<id>` unless given), `denoise`
//! (also read from `strength`), `count` (also `batch_size`).

use std::collections::BTreeMap;
use std::path::Path;

use kiln_protocol::{FailureKind, JobError, JobSpec, Task};
use serde::Deserialize;
use serde_json::{json, Map, Value};

/// One node input a parameter sets.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub node: String,
    pub input: String,
}

/// Where a parameter goes: one input or several.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Binding {
    One(Target),
    Many(Vec<Target>),
}

impl Binding {
    pub fn targets(&self) -> &[Target] {
        match self {
            Binding::One(t) => std::slice::from_ref(t),
            Binding::Many(ts) => ts,
        }
    }
}

/// The loader outputs the job's LoRAs are applied to, as `[node, output]` links.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraAnchor {
    pub model: (String, u32),
    #[serde(default)]
    pub clip: Option<(String, u32)>,
}

/// An API-format graph with named parameters.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    #[serde(default)]
    pub description: String,
    pub workflow: Map<String, Value>,
    #[serde(default)]
    pub params: BTreeMap<String, Binding>,
    #[serde(default)]
    pub loras: Option<LoraAnchor>,
}

/// Why templates could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("templates folder {path}: {message}")]
    Folder { path: String, message: String },
    #[error("template {path}: {message}")]
    Invalid { path: String, message: String },
}

const BUILT_IN: [(&str, &str); 4] = [
    (
        "text_to_image",
        include_str!("templates/text_to_image.json"),
    ),
    (
        "image_to_image",
        include_str!("templates/image_to_image.json"),
    ),
    (
        "text_to_video",
        include_str!("templates/text_to_video.json"),
    ),
    (
        "image_to_video",
        include_str!("templates/image_to_video.json"),
    ),
];

impl Template {
    fn parse(path: &str, text: &str) -> Result<Template, TemplateError> {
        let invalid = |message: String| TemplateError::Invalid {
            path: path.to_string(),
            message,
        };
        let t: Template = serde_json::from_str(text).map_err(|e| invalid(e.to_string()))?;
        for (name, binding) in &t.params {
            for target in binding.targets() {
                let node = t.workflow.get(&target.node).ok_or_else(|| {
                    invalid(format!(
                        "params.{name} names node {} which is not in the workflow",
                        target.node
                    ))
                })?;
                if node.get("inputs").and_then(Value::as_object).is_none() {
                    return Err(invalid(format!(
                        "node {} has no inputs object",
                        target.node
                    )));
                }
            }
        }
        if let Some(anchor) = &t.loras {
            for (node, _) in std::iter::once(&anchor.model).chain(anchor.clip.as_ref()) {
                if !t.workflow.contains_key(node) {
                    return Err(invalid(format!(
                        "loras names node {node} which is not in the workflow"
                    )));
                }
            }
        }
        Ok(t)
    }
}

/// The built-in templates plus the operator's folder (a file there replaces a
/// built-in of the same name).
#[derive(Debug, Clone)]
pub struct Templates {
    by_name: BTreeMap<String, Template>,
}

impl Templates {
    pub fn load(dir: Option<&Path>) -> Result<Templates, TemplateError> {
        let mut by_name = BTreeMap::new();
        for (name, text) in BUILT_IN {
            by_name.insert(
                name.to_string(),
                Template::parse(&format!("built-in {name}"), text)?,
            );
        }
        if let Some(dir) = dir {
            let folder = |e: std::io::Error| TemplateError::Folder {
                path: dir.display().to_string(),
                message: e.to_string(),
            };
            let mut entries: Vec<_> = std::fs::read_dir(dir)
                .map_err(folder)?
                .filter_map(Result::ok)
                .map(|e| e.path())
                .collect();
            entries.sort();
            for path in entries {
                let Some(name) = path
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .filter(|_| path.extension().is_some_and(|e| e == "json"))
                else {
                    continue;
                };
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(&path).map_err(|e| TemplateError::Invalid {
                    path: shown.clone(),
                    message: e.to_string(),
                })?;
                by_name.insert(name.to_string(), Template::parse(&shown, &text)?);
            }
        }
        Ok(Templates { by_name })
    }

    pub fn get(&self, name: &str) -> Option<&Template> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

/// A graph ready to validate and queue, with what the job should be told.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    pub graph: Map<String, Value>,
    /// The seed every seed input was set to.
    pub seed: Option<u64>,
    /// The checkpoint or diffusion model the graph loads.
    pub model: Option<String>,
    /// Parameters the template does not use.
    pub ignored: Vec<String>,
    /// The `(node id, input)` pairs `params.overrides` set that the graph did not
    /// have: checked against the node's declared inputs (`/object_info`) before
    /// queueing, since ComfyUI itself silently ignores an input a node lacks.
    pub added_inputs: Vec<(String, String)>,
}

/// An input file after upload: the client's name and the path loader nodes use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    pub name: String,
    pub path: String,
}

fn invalid(message: impl Into<String>) -> JobError {
    JobError::new(FailureKind::InvalidInput, message, false)
}

/// A seed that fits JSON numbers exactly, fresh for every job.
pub fn fresh_seed() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0 >> 11
}

fn seed_of(spec: &JobSpec) -> Result<u64, JobError> {
    match spec.params.get("seed") {
        None | Some(Value::Null) => Ok(fresh_seed()),
        Some(v) => v.as_u64().ok_or_else(|| {
            invalid(format!(
                "params.seed must be a non-negative integer, got {v}"
            ))
        }),
    }
}

/// The template a task runs when the job names none.
pub fn task_template(task: Task) -> Option<&'static str> {
    match task {
        Task::TextToImage => Some("text_to_image"),
        Task::ImageToImage => Some("image_to_image"),
        Task::TextToVideo => Some("text_to_video"),
        Task::ImageToVideo => Some("image_to_video"),
        Task::Workflow => None,
    }
}

fn set_input(graph: &mut Map<String, Value>, target: &Target, value: Value) {
    if let Some(inputs) = graph
        .get_mut(&target.node)
        .and_then(|n| n.get_mut("inputs"))
        .and_then(Value::as_object_mut)
    {
        inputs.insert(target.input.clone(), value);
    }
}

fn get_input<'a>(graph: &'a Map<String, Value>, target: &Target) -> Option<&'a Value> {
    graph.get(&target.node)?.get("inputs")?.get(&target.input)
}

/// Lowers a size by `degrade` halvings, keeping it a multiple of 16 and at least 64.
fn degrade_side(side: u64, degrade: u8) -> u64 {
    ((side >> degrade.min(6)) / 16 * 16).max(64)
}

/// Lowers a frame count by `degrade` halvings, keeping Wan's 4n+1 shape.
fn degrade_frames(frames: u64, degrade: u8) -> u64 {
    (((frames.saturating_sub(1)) >> degrade.min(6)) / 4 * 4 + 1).max(5)
}

/// Builds the graph of a template for a job.
pub fn from_template(
    t: &Template,
    spec: &JobSpec,
    prefix: &str,
    inputs: &[Uploaded],
    degrade: u8,
) -> Result<Prepared, JobError> {
    let mut graph = t.workflow.clone();
    let mut seed = None;
    let mut model = None;
    for (name, binding) in &t.params {
        let value =
            match name.as_str() {
                "model" => spec.model.as_ref().map(|m| Value::from(m.clone())),
                "image" => match inputs.first() {
                    Some(up) => Some(Value::from(up.path.clone())),
                    None => return Err(invalid(
                        "job.inputs: this workflow needs an input image (the first input is used)",
                    )),
                },
                "seed" => {
                    let s = seed_of(spec)?;
                    seed = Some(s);
                    Some(Value::from(s))
                }
                "filename_prefix" => Some(
                    spec.params
                        .get(name)
                        .cloned()
                        .unwrap_or_else(|| Value::from(prefix)),
                ),
                "denoise" => spec
                    .params
                    .get("denoise")
                    .or_else(|| spec.params.get("strength"))
                    .cloned(),
                "count" => spec
                    .params
                    .get("count")
                    .or_else(|| spec.params.get("batch_size"))
                    .cloned(),
                _ => spec.params.get(name).cloned(),
            };
        let value = value.filter(|v| !v.is_null());
        if let Some(value) = value {
            for target in binding.targets() {
                set_input(&mut graph, target, value.clone());
            }
        }
        if name == "model" {
            model = binding
                .targets()
                .first()
                .and_then(|tg| get_input(&graph, tg))
                .and_then(Value::as_str)
                .map(String::from);
            if model.as_deref().is_none_or(str::is_empty) {
                return Err(invalid("job.model is required: name the model file to load (see the worker's inventory)"));
            }
        }
        if degrade > 0 && matches!(name.as_str(), "width" | "height" | "frames") {
            for target in binding.targets() {
                if let Some(n) = get_input(&graph, target).and_then(Value::as_u64) {
                    let lowered = if name == "frames" {
                        degrade_frames(n, degrade)
                    } else {
                        degrade_side(n, degrade)
                    };
                    set_input(&mut graph, target, Value::from(lowered));
                }
            }
        }
    }
    let known =
        |k: &str| t.params.contains_key(k) || matches!(k, "overrides" | "strength" | "batch_size");
    let ignored = spec.params.keys().filter(|k| !known(k)).cloned().collect();
    let added_inputs = apply_overrides(&mut graph, spec)?;
    if let Some(anchor) = &t.loras {
        chain_loras(&mut graph, anchor, spec)?;
    } else if !spec.loras.is_empty() {
        return Err(invalid(
            "job.loras: this template does not say where LoRAs go (no `loras` anchor)",
        ));
    }
    substitute_inputs(&mut graph, inputs);
    Ok(Prepared {
        graph,
        seed,
        model,
        ignored,
        added_inputs,
    })
}

/// Inputs that carry a seed in stock and common custom nodes.
const SEED_INPUTS: [&str; 2] = ["seed", "noise_seed"];
/// Inputs that name the main model in stock loaders.
const MODEL_INPUTS: [(&str, &str); 2] = [
    ("CheckpointLoaderSimple", "ckpt_name"),
    ("UNETLoader", "unet_name"),
];

/// Prepares a raw API-format graph: overrides, the job's model and seed, LoRAs
/// after the first model loader, and input file names.
pub fn from_raw(
    workflow: &Value,
    spec: &JobSpec,
    inputs: &[Uploaded],
) -> Result<Prepared, JobError> {
    let mut graph = workflow.as_object().cloned().ok_or_else(|| {
        invalid("job.workflow must be an API-format graph (a map of node id to node)")
    })?;
    for (id, node) in &graph {
        if !node.get("inputs").is_some_and(Value::is_object)
            || !node.get("class_type").is_some_and(Value::is_string)
        {
            return Err(invalid(format!("job.workflow node {id} needs a class_type and an inputs object (API format, not the UI's workflow format)")));
        }
    }
    let added_inputs = apply_overrides(&mut graph, spec)?;
    let seed = seed_of(spec)?;
    let mut seeded = false;
    let mut model = None;
    let mut anchor = None;
    let mut ids: Vec<String> = graph.keys().cloned().collect();
    ids.sort_by_key(|id| (id.parse::<u64>().unwrap_or(u64::MAX), id.clone()));
    for id in &ids {
        let node = graph.get_mut(id).expect("listed");
        let class = node["class_type"].as_str().unwrap_or_default().to_string();
        let inputs_map = node["inputs"].as_object_mut().expect("checked");
        for key in SEED_INPUTS {
            if inputs_map.get(key).is_some_and(Value::is_number) {
                inputs_map.insert(key.into(), Value::from(seed));
                seeded = true;
            }
        }
        if let Some((_, input)) = MODEL_INPUTS.iter().find(|(c, _)| *c == class) {
            if let Some(m) = &spec.model {
                inputs_map.insert((*input).into(), Value::from(m.clone()));
            }
            if model.is_none() {
                model = inputs_map
                    .get(*input)
                    .and_then(Value::as_str)
                    .map(String::from);
                let clip = (class == "CheckpointLoaderSimple").then(|| (id.clone(), 1));
                anchor = Some(LoraAnchor {
                    model: (id.clone(), 0),
                    clip,
                });
            }
        }
    }
    if !spec.loras.is_empty() {
        let anchor = anchor.ok_or_else(|| invalid("job.loras: the workflow has no CheckpointLoaderSimple or UNETLoader to apply LoRAs to"))?;
        chain_loras(&mut graph, &anchor, spec)?;
    }
    substitute_inputs(&mut graph, inputs);
    Ok(Prepared {
        graph,
        seed: seeded.then_some(seed),
        model,
        ignored: spec
            .params
            .keys()
            .filter(|k| !matches!(k.as_str(), "overrides" | "seed"))
            .cloned()
            .collect(),
        added_inputs,
    })
}

/// `params.overrides`: `{"<node id>": {"<input>": value}}`. Returns the inputs it
/// added (the node did not have them in the graph).
fn apply_overrides(
    graph: &mut Map<String, Value>,
    spec: &JobSpec,
) -> Result<Vec<(String, String)>, JobError> {
    let mut added = Vec::new();
    let Some(overrides) = spec.params.get("overrides").filter(|v| !v.is_null()) else {
        return Ok(added);
    };
    let overrides = overrides
        .as_object()
        .ok_or_else(|| invalid("params.overrides must be a map of node id to {input: value}"))?;
    for (node, values) in overrides {
        let values = values.as_object().ok_or_else(|| {
            invalid(format!(
                "params.overrides.{node} must be a map of input name to value"
            ))
        })?;
        let inputs = graph
            .get_mut(node)
            .and_then(|n| n.get_mut("inputs"))
            .and_then(Value::as_object_mut)
            .ok_or_else(|| {
                invalid(format!(
                    "params.overrides: node {node} is not in the workflow"
                ))
            })?;
        for (k, v) in values {
            if inputs.insert(k.clone(), v.clone()).is_none() {
                added.push((node.clone(), k.clone()));
            }
        }
    }
    Ok(added)
}

/// Inserts one LoRA loader per job LoRA after `anchor`, and points every former
/// consumer of the anchor's outputs at the end of the chain.
fn chain_loras(
    graph: &mut Map<String, Value>,
    anchor: &LoraAnchor,
    spec: &JobSpec,
) -> Result<(), JobError> {
    if spec.loras.is_empty() {
        return Ok(());
    }
    let link = |(node, slot): &(String, u32)| json!([node, slot]);
    let (model_anchor, clip_anchor) = (link(&anchor.model), anchor.clip.as_ref().map(link));
    let first_id = graph
        .keys()
        .filter_map(|k| k.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    let (mut model_out, mut clip_out) = (model_anchor.clone(), clip_anchor.clone());
    let mut added = Vec::new();
    for (i, lora) in spec.loras.iter().enumerate() {
        if lora.name.is_empty() {
            return Err(invalid(format!("job.loras[{i}].name must not be empty")));
        }
        let id = (first_id + i as u64).to_string();
        let node = match &clip_out {
            Some(clip) => json!({"class_type": "LoraLoader", "inputs": {
                "model": model_out, "clip": clip, "lora_name": lora.name,
                "strength_model": lora.strength, "strength_clip": lora.strength}}),
            None => json!({"class_type": "LoraLoaderModelOnly", "inputs": {
                "model": model_out, "lora_name": lora.name, "strength_model": lora.strength}}),
        };
        model_out = json!([id, 0]);
        if clip_out.is_some() {
            clip_out = Some(json!([id, 1]));
        }
        added.push((id, node));
    }
    for node in graph.values_mut() {
        let Some(inputs) = node.get_mut("inputs").and_then(Value::as_object_mut) else {
            continue;
        };
        for v in inputs.values_mut() {
            if *v == model_anchor {
                *v = model_out.clone();
            } else if clip_anchor.as_ref() == Some(v) {
                *v = clip_out.clone().expect("a clip anchor has a clip chain");
            }
        }
    }
    graph.extend(added);
    Ok(())
}

/// Replaces string inputs that name one of the job's input files (exactly, or
/// as the last path segment) with the path the server stored the upload under.
fn substitute_inputs(graph: &mut Map<String, Value>, inputs: &[Uploaded]) {
    if inputs.is_empty() {
        return;
    }
    for node in graph.values_mut() {
        let Some(map) = node.get_mut("inputs").and_then(Value::as_object_mut) else {
            continue;
        };
        for v in map.values_mut() {
            let Some(s) = v.as_str() else { continue };
            let last = s.rsplit('/').next().unwrap_or(s);
            if let Some(up) = inputs.iter().find(|up| up.name == s || up.name == last) {
                *v = Value::from(up.path.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::{Backend, LoraRef};

    fn t2i() -> JobSpec {
        let mut spec = JobSpec::new(Backend::Comfyui, Task::TextToImage)
            .param("prompt", "a kiln")
            .param("width", 768)
            .param("seed", 42);
        spec.model = Some("sdxl.safetensors".into());
        spec
    }

    #[test]
    fn built_in_templates_load_and_bind_parameters() {
        let templates = Templates::load(None).unwrap();
        assert_eq!(
            templates.names().collect::<Vec<_>>(),
            [
                "image_to_image",
                "image_to_video",
                "text_to_image",
                "text_to_video"
            ]
        );
        let p = from_template(
            templates.get("text_to_image").unwrap(),
            &t2i(),
            "kiln/job7",
            &[],
            0,
        )
        .unwrap();
        assert_eq!(p.graph["1"]["inputs"]["ckpt_name"], "sdxl.safetensors");
        assert_eq!(p.graph["2"]["inputs"]["text"], "a kiln");
        assert_eq!(p.graph["4"]["inputs"]["width"], 768);
        assert_eq!(
            p.graph["4"]["inputs"]["height"], 1024,
            "template default kept"
        );
        assert_eq!(p.graph["5"]["inputs"]["seed"], 42);
        assert_eq!(p.graph["7"]["inputs"]["filename_prefix"], "kiln/job7");
        assert_eq!(
            (p.seed, p.model.as_deref()),
            (Some(42), Some("sdxl.safetensors"))
        );
        // Degraded twice: a quarter of each side.
        let p =
            from_template(templates.get("text_to_image").unwrap(), &t2i(), "k", &[], 2).unwrap();
        assert_eq!(
            (
                p.graph["4"]["inputs"]["width"].as_u64(),
                p.graph["4"]["inputs"]["height"].as_u64()
            ),
            (Some(192), Some(256))
        );
    }

    #[test]
    fn a_missing_model_or_image_is_a_clear_error() {
        let templates = Templates::load(None).unwrap();
        let mut spec = t2i();
        spec.model = None;
        let err =
            from_template(templates.get("text_to_image").unwrap(), &spec, "k", &[], 0).unwrap_err();
        assert!(err.message.contains("job.model"), "{}", err.message);
        let err = from_template(
            templates.get("image_to_video").unwrap(),
            &t2i(),
            "k",
            &[],
            0,
        )
        .unwrap_err();
        assert!(err.message.contains("job.inputs"), "{}", err.message);
    }

    #[test]
    fn seeds_are_fresh_per_job_unless_given() {
        let templates = Templates::load(None).unwrap();
        let mut spec = t2i();
        spec.params.remove("seed");
        let a = from_template(templates.get("text_to_image").unwrap(), &spec, "k", &[], 0).unwrap();
        let b = from_template(templates.get("text_to_image").unwrap(), &spec, "k", &[], 0).unwrap();
        assert_ne!(a.seed, b.seed);
        assert!(a.seed.unwrap() < 1 << 53);
    }

    #[test]
    fn loras_chain_after_the_loader_and_consumers_are_rewired() {
        let templates = Templates::load(None).unwrap();
        let mut spec = t2i();
        spec.loras = vec![
            LoraRef {
                name: "a.safetensors".into(),
                strength: 0.5,
            },
            LoraRef {
                name: "b.safetensors".into(),
                strength: 1.0,
            },
        ];
        let p = from_template(templates.get("text_to_image").unwrap(), &spec, "k", &[], 0).unwrap();
        assert_eq!(p.graph["8"]["inputs"]["model"], json!(["1", 0]));
        assert_eq!(p.graph["9"]["inputs"]["model"], json!(["8", 0]));
        assert_eq!(p.graph["9"]["inputs"]["clip"], json!(["8", 1]));
        assert_eq!(
            p.graph["5"]["inputs"]["model"],
            json!(["9", 0]),
            "the sampler uses the last LoRA"
        );
        assert_eq!(p.graph["2"]["inputs"]["clip"], json!(["9", 1]));
        // Wan: model-only LoRAs.
        let mut spec = JobSpec::new(Backend::Comfyui, Task::TextToVideo).param("prompt", "waves");
        spec.model = Some("wan.safetensors".into());
        spec.loras = vec![LoraRef {
            name: "motion.safetensors".into(),
            strength: 0.8,
        }];
        let p = from_template(templates.get("text_to_video").unwrap(), &spec, "k", &[], 0).unwrap();
        assert_eq!(p.graph["12"]["class_type"], "LoraLoaderModelOnly");
        assert_eq!(p.graph["4"]["inputs"]["model"], json!(["12", 0]));
    }

    #[test]
    fn raw_graphs_get_overrides_seed_and_uploaded_names() {
        let wf = json!({
            "1": {"class_type": "LoadImage", "inputs": {"image": "jobs/abc/upload_test.png"}},
            "2": {"class_type": "KSampler", "inputs": {"seed": 5, "steps": 20}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}},
        });
        let spec = JobSpec::new(Backend::Comfyui, Task::Workflow)
            .param("overrides", json!({"2": {"steps": 4}}));
        let up = [Uploaded {
            name: "upload_test.png".into(),
            path: "kiln/upload_test (1).png".into(),
        }];
        let p = from_raw(&wf, &spec, &up).unwrap();
        assert_eq!(p.graph["1"]["inputs"]["image"], "kiln/upload_test (1).png");
        assert_eq!(p.graph["2"]["inputs"]["steps"], 4);
        assert_eq!(p.graph["2"]["inputs"]["seed"].as_u64(), p.seed);
        assert_eq!(p.added_inputs, vec![]);
        let added = JobSpec::new(Backend::Comfyui, Task::Workflow)
            .param("overrides", json!({"2": {"steps": 4, "colour": 1}}));
        let p = from_raw(&wf, &added, &[]).unwrap();
        assert_eq!(
            p.added_inputs,
            vec![("2".to_string(), "colour".to_string())]
        );
        let bad = JobSpec::new(Backend::Comfyui, Task::Workflow)
            .param("overrides", json!({"9": {"x": 1}}));
        assert!(from_raw(&wf, &bad, &[])
            .unwrap_err()
            .message
            .contains("node 9"));
        let ui_format = json!({"nodes": [], "links": []});
        assert!(from_raw(&ui_format, &spec, &[]).is_err());
    }

    #[test]
    fn operator_templates_are_checked_and_can_replace_built_ins() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("invert.json"),
            r#"{"workflow": {"1": {"class_type": "EmptyImage", "inputs": {"width": 64}}}, "params": {"size": [{"node": "1", "input": "width"}]}}"#,
        )
        .unwrap();
        let t = Templates::load(Some(dir.path())).unwrap();
        assert!(t.get("invert").is_some() && t.get("text_to_image").is_some());
        std::fs::write(
            dir.path().join("broken.json"),
            r#"{"workflow": {}, "params": {"x": {"node": "9", "input": "y"}}}"#,
        )
        .unwrap();
        let err = Templates::load(Some(dir.path())).unwrap_err().to_string();
        assert!(
            err.contains("broken.json") && err.contains("params.x names node 9"),
            "{err}"
        );
    }
}
