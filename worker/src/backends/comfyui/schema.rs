//! The ComfyUI backend's parameter description ([`ParamSchema`]), built from the
//! installed templates: one set per template (for `job.template`), the same set
//! for the task whose default template it is, and one for raw workflows. Kiln's
//! common parameters (`COMMON_PARAMS`) a template does not bind are type-checked
//! and reported as ignored, so one job runs on any backend. The
//! broker checks jobs against it at submit, so a bad value (`steps = "abc"`, a
//! `filename_prefix` with `..` that ComfyUI's `/view` would refuse after the whole
//! generation) or an unknown key is refused before any GPU time is spent.

use kiln_protocol::params::{ParamKind, ParamSchema, ParamSet, ParamSpec};
use kiln_protocol::Task;

use super::graph::{task_template, Templates};

/// The largest integer a JSON number (a JavaScript client) holds exactly.
const MAX_SAFE_INTEGER: f64 = 9_007_199_254_740_991.0;

/// How a template parameter of this name is typed; names Kiln does not know are
/// passed to the node as given (`any`), and ComfyUI's `/object_info` check on the
/// worker judges them.
fn describe(name: &str) -> ParamSpec {
    use ParamKind::*;
    let p = |kind, text: &str| ParamSpec::new(name, kind, text);
    match name {
        "prompt" => p(String, "the positive prompt"),
        "negative_prompt" => p(String, "the negative prompt"),
        // The node's own limits (EmptyLatentImage: 16 to 16384, multiples of 8) come
        // from ComfyUI's /object_info, which the worker checks before queueing.
        "width" | "height" => p(Integer, "image side").range(1.0, 16_384.0).unit("px"),
        "steps" => p(Integer, "sampling steps").range(1.0, 10_000.0),
        "cfg" => p(Number, "classifier-free guidance scale").range(0.0, 100.0),
        "seed" => p(
            Integer,
            "default: a fresh random seed, reported in the job's info",
        )
        .range(0.0, MAX_SAFE_INTEGER),
        "count" | "batch_size" => p(Integer, "images per job").range(1.0, 4096.0),
        "denoise" | "strength" => {
            p(Number, "how much of the input image is replaced").range(0.0, 1.0)
        }
        "frames" => p(Integer, "video length")
            .range(1.0, 10_000.0)
            .unit("frames"),
        "fps" => p(Number, "video frame rate").range(1.0, 240.0).unit("fps"),
        "shift" => p(Number, "sampling shift").range(0.0, 100.0),
        "sampler" => p(String, "a KSampler sampler_name, e.g. euler"),
        "scheduler" => p(String, "a KSampler scheduler, e.g. normal"),
        "text_encoder" | "vae" | "clip_vision" => p(String, "a model file name"),
        "filename_prefix" => p(
            FilePrefix,
            "where outputs are saved under ComfyUI's output folder; default kiln/job<id>-<attempt>",
        ),
        "image" => p(
            String,
            "set from the job's first input; a value here is ignored",
        ),
        _ => p(Any, "a template parameter, passed to its node"),
    }
}

/// The parameters of one template, with the aliases every template takes.
fn template_params(names: impl Iterator<Item = String>) -> Vec<ParamSpec> {
    let mut params: Vec<ParamSpec> = names
        // `model` comes from `job.model`, not from params.
        .filter(|n| n != "model")
        .map(|n| describe(&n))
        .collect();
    for alias in ["strength", "batch_size"] {
        if !params.iter().any(|p| p.name == alias) {
            params.push(describe(alias));
        }
    }
    params.push(ParamSpec::new(
        "overrides",
        ParamKind::Object,
        "{\"<node id>\": {\"<input>\": value}}: set inputs of the graph's nodes",
    ));
    params
}

/// The description of what this worker's ComfyUI accepts.
pub fn schema(templates: &Templates) -> ParamSchema {
    let mut sets = Vec::new();
    for name in templates.names() {
        let Some(t) = templates.get(name) else {
            continue;
        };
        let params = template_params(t.params.keys().cloned());
        sets.push(
            ParamSet {
                template: Some(name.to_string()),
                params: params.clone(),
                ..ParamSet::default()
            }
            .with_common(),
        );
        let tasks: Vec<Task> = [
            Task::TextToImage,
            Task::ImageToImage,
            Task::TextToVideo,
            Task::ImageToVideo,
        ]
        .into_iter()
        .filter(|task| task_template(*task) == Some(name))
        .collect();
        if !tasks.is_empty() {
            sets.push(
                ParamSet {
                    tasks,
                    params,
                    ..ParamSet::default()
                }
                .with_common(),
            );
        }
    }
    sets.push(
        ParamSet {
            workflow: true,
            params: vec![
                describe("seed"),
                ParamSpec::new(
                    "overrides",
                    ParamKind::Object,
                    "{\"<node id>\": {\"<input>\": value}}: set inputs of the graph's nodes",
                ),
            ],
            ..ParamSet::default()
        }
        .with_common(),
    );
    ParamSchema { sets }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::{Backend, JobSpec};
    use serde_json::json;

    fn field(spec: &JobSpec) -> Option<String> {
        let schema = schema(&Templates::load(None).unwrap());
        schema.check(spec).err().and_then(|e| e.to_body().field)
    }

    #[test]
    fn built_in_templates_are_described_and_enforced() {
        let t2i = || JobSpec::new(Backend::Comfyui, Task::TextToImage).param("prompt", "a fox");
        assert_eq!(
            field(
                &t2i()
                    .param("steps", 30)
                    .param("filename_prefix", "renders/v1")
            ),
            None
        );
        for (spec, at) in [
            (t2i().param("steps", "abc"), "job.params.steps"),
            (t2i().param("width", 100_000), "job.params.width"),
            (t2i().param("seed", -1), "job.params.seed"),
            (t2i().param("stepz", 10), "job.params.stepz"),
            (
                t2i().param("filename_prefix", "renders/v1..final"),
                "job.params.filename_prefix",
            ),
        ] {
            assert_eq!(field(&spec).as_deref(), Some(at), "{:?}", spec.params);
        }
        // A template named explicitly uses its own set.
        let mut named = JobSpec::new(Backend::Comfyui, Task::Workflow).param("frames", 33);
        named.template = Some("text_to_video".into());
        assert_eq!(field(&named), None);
        named.template = Some("text_to_image".into());
        assert_eq!(field(&named), None, "a common parameter, unused here");
        let named = named.param("shift", 5.0);
        assert_eq!(field(&named).as_deref(), Some("job.params.shift"));
        // A raw workflow takes a seed and overrides only.
        let mut raw = JobSpec::new(Backend::Comfyui, Task::Workflow).param("seed", 5);
        raw.workflow = Some(json!({"1": {"class_type": "X", "inputs": {}}}));
        assert_eq!(field(&raw), None);
        let raw = raw.param("stepz", 20);
        assert_eq!(field(&raw).as_deref(), Some("job.params.stepz"));
    }
}
