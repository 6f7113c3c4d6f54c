//! The arguments of every tool, as the assistant sees them.
//!
//! The doc comments become the descriptions in each tool's JSON schema, and the
//! `schemars` ranges become its `minimum`/`maximum`/`maxLength`; the gateway checks
//! calls against that same schema (see [`crate::validate`]) so what is published is
//! what is enforced. Rules that span fields (a multiple of 8, exactly one image
//! source) are checked by the `check` methods here.

use kiln_protocol::JobOptions;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::ToolError;

/// The most prompts one `generate_batch` call may carry.
pub const MAX_BATCH: usize = 50;

fn default_side() -> u32 {
    1024
}
fn default_count() -> u32 {
    1
}
fn default_true() -> bool {
    true
}
fn default_strength() -> f64 {
    0.6
}
fn default_fps() -> u32 {
    16
}
fn default_video_width() -> u32 {
    832
}
fn default_video_height() -> u32 {
    480
}
fn default_list_limit() -> u32 {
    50
}

/// A generator to run on. `sim` is Kiln's built-in simulator, which draws test
/// patterns without a GPU; it is not an image model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BackendArg {
    Comfyui,
    Wan2gp,
    Sim,
}

impl From<BackendArg> for kiln_protocol::Backend {
    fn from(b: BackendArg) -> Self {
        match b {
            BackendArg::Comfyui => kiln_protocol::Backend::Comfyui,
            BackendArg::Wan2gp => kiln_protocol::Backend::Wan2gp,
            BackendArg::Sim => kiln_protocol::Backend::Sim,
        }
    }
}

/// A look the prompt is steered towards (words added to the prompt and the
/// negative prompt; pixel styles are also snapped to a pixel grid).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum StylePreset {
    #[serde(rename = "pixel_art")]
    PixelArt,
    #[serde(rename = "8bit")]
    EightBit,
    #[serde(rename = "16bit")]
    SixteenBit,
    #[serde(rename = "retro")]
    Retro,
    #[serde(rename = "game_sprite")]
    GameSprite,
    #[serde(rename = "photo")]
    Photo,
    #[serde(rename = "illustration")]
    Illustration,
    #[serde(rename = "anime")]
    Anime,
    #[serde(rename = "concept_art")]
    ConceptArt,
}

/// Settings every image tool shares.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct ImageOptions {
    /// What the image must not show.
    #[schemars(length(max = 16384))]
    pub negative_prompt: Option<String>,
    /// Width in pixels, a multiple of 8.
    #[serde(default = "default_side")]
    #[schemars(range(min = 64, max = 4096))]
    pub width: u32,
    /// Height in pixels, a multiple of 8.
    #[serde(default = "default_side")]
    #[schemars(range(min = 64, max = 4096))]
    pub height: u32,
    /// Sampling steps (the model's own default when omitted: few for turbo models,
    /// 20-40 for others).
    #[schemars(range(min = 1, max = 200))]
    pub steps: Option<u32>,
    /// Classifier-free guidance scale (the model's default when omitted).
    #[schemars(range(min = 0.0, max = 30.0))]
    pub cfg: Option<f64>,
    /// Seed for reproducible results; a random one is chosen and reported when omitted.
    #[schemars(range(min = 0, max = 9_007_199_254_740_991u64))]
    pub seed: Option<u64>,
    /// A style preset added to the prompt.
    pub style: Option<StylePreset>,
    /// How many images to make (one job, one seed after another).
    #[serde(default = "default_count")]
    #[schemars(range(min = 1, max = 8))]
    pub count: u32,
    /// A workflow template installed on the workers (ComfyUI), instead of the default graph.
    #[schemars(length(min = 1, max = 256))]
    pub template: Option<String>,
    /// The generator to use (the gateway's configured default when omitted).
    pub backend: Option<BackendArg>,
    /// Extra backend-specific parameters, passed through unchanged (e.g. `sampler`).
    pub params: Option<Map<String, Value>>,
    /// How to run the job (model, LoRAs, priority, placement, timeouts, …): the
    /// options every Kiln client offers, defined once in kiln-protocol.
    #[serde(flatten)]
    pub job: JobOptions,
    #[serde(flatten)]
    pub wait: WaitArgs,
}

/// Whether and how long a tool waits for its jobs.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct WaitArgs {
    /// Wait for the result (default). False returns the job ids at once; follow
    /// them with `wait_for_job` or `get_job`.
    #[serde(default = "default_true")]
    pub wait: bool,
    /// Seconds to wait before returning the job ids and states instead of the
    /// result (the jobs keep running). The gateway's configured default when omitted.
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_s: Option<u64>,
}

/// Where an input image comes from: exactly one of `path`, `base64` or `artifact`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("oneOf" = [{ "required": ["path"] }, { "required": ["base64"] }, { "required": ["artifact"] }]))]
pub struct InputImage {
    /// A file the gateway may read (inside its allowed roots).
    #[schemars(length(min = 1, max = 4096))]
    pub path: Option<String>,
    /// The image's bytes in base64 (PNG, JPEG or WebP).
    pub base64: Option<String>,
    /// A Kiln artifact id such as `j42.0` (the output of an earlier job).
    #[schemars(length(min = 3, max = 32))]
    pub artifact: Option<String>,
}

/// Arguments of `generate_image`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct GenerateImageArgs {
    /// What to draw.
    #[schemars(length(min = 1, max = 16384))]
    pub prompt: String,
    #[serde(flatten)]
    pub options: ImageOptions,
}

/// Arguments of `edit_image`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct EditImageArgs {
    /// What the edited image should show.
    #[schemars(length(min = 1, max = 16384))]
    pub prompt: String,
    /// The image to start from.
    pub image: InputImage,
    /// How much to change it: 0 keeps the input, 1 ignores it.
    #[serde(default = "default_strength")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub strength: f64,
    #[serde(flatten)]
    pub options: ImageOptions,
}

/// Background of a sprite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Background {
    /// Transparent: the generator is asked for a plain backdrop, which the gateway
    /// then keys out to alpha.
    #[default]
    Transparent,
    /// A flat, plain backdrop kept as it is.
    Flat,
}

/// Arguments of `generate_sprite`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct GenerateSpriteArgs {
    /// The game asset: a character, an item, a tile…
    #[schemars(length(min = 1, max = 16384))]
    pub prompt: String,
    /// Transparent (default) or flat background.
    #[serde(default)]
    pub background: Background,
    #[serde(flatten)]
    pub options: ImageOptions,
}

/// One prompt of a batch, with what may differ per item.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum BatchItem {
    /// Just the prompt.
    Prompt(#[schemars(length(min = 1, max = 16384))] String),
    /// A prompt with its own seed, negative prompt or extra parameters.
    Detailed(BatchItemDetail),
}

/// A batch item with overrides.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchItemDetail {
    #[schemars(length(min = 1, max = 16384))]
    pub prompt: String,
    #[schemars(range(min = 0, max = 9_007_199_254_740_991u64))]
    pub seed: Option<u64>,
    #[schemars(length(max = 16384))]
    pub negative_prompt: Option<String>,
    /// Extra backend-specific parameters for this item only.
    pub params: Option<Map<String, Value>>,
}

impl BatchItem {
    pub fn prompt(&self) -> &str {
        match self {
            BatchItem::Prompt(p) => p,
            BatchItem::Detailed(d) => &d.prompt,
        }
    }
}

/// Arguments of `generate_batch`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct GenerateBatchArgs {
    /// The prompts, each run as its own job across all capable GPUs at once.
    #[schemars(length(min = 1, max = 50))]
    pub prompts: Vec<BatchItem>,
    #[serde(flatten)]
    pub options: ImageOptions,
}

/// Arguments of `generate_video`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
pub struct GenerateVideoArgs {
    /// What happens in the video.
    #[schemars(length(min = 1, max = 16384))]
    pub prompt: String,
    /// What the video must not show.
    #[schemars(length(max = 16384))]
    pub negative_prompt: Option<String>,
    /// A first frame: makes it image-to-video.
    pub image: Option<InputImage>,
    /// Number of frames (the backend's default when neither this nor `seconds` is given).
    #[schemars(range(min = 2, max = 1024))]
    pub frames: Option<u32>,
    /// Length in seconds, converted to frames at `fps`; give this or `frames`.
    #[schemars(range(min = 0.1, max = 120.0))]
    pub seconds: Option<f64>,
    /// Frames per second.
    #[serde(default = "default_fps")]
    #[schemars(range(min = 1, max = 60))]
    pub fps: u32,
    /// Width in pixels, a multiple of 8.
    #[serde(default = "default_video_width")]
    #[schemars(range(min = 64, max = 4096))]
    pub width: u32,
    /// Height in pixels, a multiple of 8.
    #[serde(default = "default_video_height")]
    #[schemars(range(min = 64, max = 4096))]
    pub height: u32,
    /// Sampling steps (the model's default when omitted).
    #[schemars(range(min = 1, max = 200))]
    pub steps: Option<u32>,
    /// Seed; a random one is chosen and reported when omitted.
    #[schemars(range(min = 0, max = 9_007_199_254_740_991u64))]
    pub seed: Option<u64>,
    /// `comfyui` or `wan2gp` (the gateway's configured default when omitted).
    pub backend: Option<BackendArg>,
    /// Extra backend-specific parameters, passed through unchanged.
    pub params: Option<Map<String, Value>>,
    /// How to run the job, as in every client (see `ImageOptions::job`).
    #[serde(flatten)]
    pub job: JobOptions,
    #[serde(flatten)]
    pub wait: WaitArgs,
}

/// Arguments of `run_workflow`: exactly one of `workflow` or `template`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[schemars(extend("oneOf" = [{ "required": ["workflow"] }, { "required": ["template"] }]))]
pub struct RunWorkflowArgs {
    /// A ComfyUI API-format workflow: a map of node id to `{class_type, inputs}`.
    pub workflow: Option<Map<String, Value>>,
    /// Or the name of a workflow template installed on the workers.
    #[schemars(length(min = 1, max = 256))]
    pub template: Option<String>,
    /// Values to set before running, keyed `<node id>.<input name>` (e.g.
    /// `"6.text": "a red kiln"`); for a template, its parameter names.
    #[serde(default)]
    pub overrides: Map<String, Value>,
    /// The generator (ComfyUI unless told otherwise).
    pub backend: Option<BackendArg>,
    /// How to run the job, as in every client (see `ImageOptions::job`).
    #[serde(flatten)]
    pub job: JobOptions,
    #[serde(flatten)]
    pub wait: WaitArgs,
}

/// A job id argument.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct JobIdArgs {
    /// The job id, e.g. `j42`.
    #[schemars(length(min = 2, max = 24))]
    pub job_id: String,
}

/// Arguments of `wait_for_job`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WaitForJobArgs {
    /// The job id, e.g. `j42`.
    #[schemars(length(min = 2, max = 24))]
    pub job_id: String,
    /// Seconds to wait before returning the current state instead.
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_s: Option<u64>,
}

/// A job state to filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StateArg {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl From<StateArg> for kiln_protocol::JobState {
    fn from(s: StateArg) -> Self {
        use kiln_protocol::JobState as S;
        match s {
            StateArg::Queued => S::Queued,
            StateArg::Running => S::Running,
            StateArg::Succeeded => S::Succeeded,
            StateArg::Failed => S::Failed,
            StateArg::Cancelled => S::Cancelled,
        }
    }
}

/// Arguments of `list_jobs`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListJobsArgs {
    /// Only jobs in these states (default: queued and running, i.e. the queue).
    #[serde(default)]
    pub states: Vec<StateArg>,
    /// Only jobs of this backend.
    pub backend: Option<BackendArg>,
    /// Only jobs that ran on this worker.
    #[schemars(length(min = 1, max = 64))]
    pub worker: Option<String>,
    /// Only jobs submitted through this gateway.
    #[serde(default)]
    pub mine: bool,
    /// At most this many, newest first.
    #[serde(default = "default_list_limit")]
    #[schemars(range(min = 1, max = 1000))]
    pub limit: u32,
}

/// Arguments of `list_models`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListModelsArgs {
    /// Only models of this backend.
    pub backend: Option<BackendArg>,
}

/// Arguments of tools that take none.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoArgs {}

/// Arguments of `save_output`: exactly one of `job_id` or `artifact`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(extend("oneOf" = [{ "required": ["job_id"] }, { "required": ["artifact"] }]))]
pub struct SaveOutputArgs {
    /// The job whose outputs to save (all of them), e.g. `j42`; or give `artifact`.
    #[schemars(length(min = 2, max = 24))]
    pub job_id: Option<String>,
    /// One output, e.g. `j42.0`.
    #[schemars(length(min = 3, max = 32))]
    pub artifact: Option<String>,
    /// Target directory: absolute, or relative to the first allowed root. It must
    /// lie inside an allowed root; missing directories are created.
    #[schemars(length(min = 1, max = 4096))]
    pub directory: String,
    /// File name (one output) or name stem (several: `_0`, `_1`… are added); the
    /// output's own name when omitted. The extension is kept from the output.
    #[schemars(length(min = 1, max = 200))]
    pub file_name: Option<String>,
    /// Replace files that exist.
    #[serde(default)]
    pub overwrite: bool,
    /// A JSON asset manifest to add the files to, relative to the allowed root the
    /// directory is in (e.g. `sprites.assets.json`); created when missing.
    #[schemars(length(min = 1, max = 1024))]
    pub manifest: Option<String>,
    /// The key of the entry in the manifest (the file stem when omitted).
    #[schemars(length(min = 1, max = 128))]
    pub asset_key: Option<String>,
    /// Key a flat background out to transparency before saving (sprites made with
    /// `background: transparent` get this automatically).
    pub remove_background: Option<bool>,
}

/// Checks a width and height pair: both multiples of 8.
pub fn check_size(width: u32, height: u32) -> Result<(), ToolError> {
    for (field, v) in [("width", width), ("height", height)] {
        if v % 8 != 0 {
            return Err(ToolError::invalid(
                field,
                format!("must be a multiple of 8, got {v} (try {})", v / 8 * 8),
            ));
        }
    }
    Ok(())
}

impl InputImage {
    /// Exactly one source must be given.
    pub fn check(&self, field: &str) -> Result<(), ToolError> {
        let given = [
            self.path.is_some(),
            self.base64.is_some(),
            self.artifact.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            return Err(ToolError::invalid(
                field,
                "give exactly one of `path`, `base64` or `artifact`",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job option defined in kiln-protocol is an argument of every generate tool,
    /// with its description, in the schema clients see.
    #[test]
    fn every_job_option_is_an_argument_of_every_generate_tool() {
        let options = schemars::schema_for!(JobOptions);
        let names: Vec<&String> = options.as_value()["properties"]
            .as_object()
            .unwrap()
            .keys()
            .collect();
        assert!(names.len() >= 10);
        for (tool, schema) in [
            ("generate_image", schemars::schema_for!(GenerateImageArgs)),
            ("edit_image", schemars::schema_for!(EditImageArgs)),
            ("generate_sprite", schemars::schema_for!(GenerateSpriteArgs)),
            ("generate_batch", schemars::schema_for!(GenerateBatchArgs)),
            ("generate_video", schemars::schema_for!(GenerateVideoArgs)),
            ("run_workflow", schemars::schema_for!(RunWorkflowArgs)),
        ] {
            let portable = crate::schema::portable_input(schema.as_object().unwrap());
            for name in &names {
                let prop = &portable["properties"][name.as_str()];
                assert!(
                    prop.get("description").is_some(),
                    "{tool} lacks `{name}`: {prop}"
                );
            }
        }
    }
}
