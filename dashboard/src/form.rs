//! The test-job form and resubmission: turning what a person typed (or an old
//! job) into a [`JobSpec`], with every mistake named by its form field before
//! anything reaches the broker.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use kiln_protocol::{Backend, JobSnapshot, JobSpec, Limits, Task};
use serde::Deserialize;
use serde_json::Value;

/// A mistake in a form or query, named by its field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FormError {
    pub field: String,
    pub message: String,
}

impl FormError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        FormError {
            field: field.to_string(),
            message: message.into(),
        }
    }
}

impl IntoResponse for FormError {
    fn into_response(self) -> Response {
        crate::api::error_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            &self.to_string(),
            Some(&self.field),
        )
    }
}

/// The form field a protocol field belongs to: `job.params.prompt` → `prompt`,
/// `job.priority` → `priority`.
pub fn form_field(protocol_field: &str) -> &str {
    protocol_field
        .strip_prefix("job.params.")
        .or_else(|| protocol_field.strip_prefix("job."))
        .unwrap_or(protocol_field)
}

/// The small form of the Actions page, as the browser sends it: every value is
/// the text of its input, so the server alone decides what is valid.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestJobForm {
    pub backend: String,
    #[serde(default)]
    pub task: String,
    pub prompt: String,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub priority: String,
    #[serde(default)]
    pub steps: String,
    #[serde(default)]
    pub width: String,
    #[serde(default)]
    pub height: String,
    #[serde(default)]
    pub seed: String,
}

/// An optional whole number in `min..=max`, named `field` in errors.
fn number(field: &str, text: &str, min: i64, max: i64) -> Result<Option<i64>, FormError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    let n: i64 = text
        .parse()
        .map_err(|_| FormError::new(field, format!("{text:?} is not a whole number")))?;
    if !(min..=max).contains(&n) {
        return Err(FormError::new(
            field,
            format!("{n} is out of range; allowed {min} to {max}"),
        ));
    }
    Ok(Some(n))
}

impl TestJobForm {
    /// The job this form asks for, checked against the broker's `limits`.
    pub fn to_spec(&self, limits: &Limits) -> Result<JobSpec, FormError> {
        let backend: Backend = self
            .backend
            .trim()
            .parse()
            .map_err(|e: String| FormError::new("backend", e))?;
        let task = match self.task.trim() {
            "" => Task::TextToImage,
            t => serde_json::from_value::<Task>(Value::String(t.to_string())).map_err(|_| {
                FormError::new(
                    "task",
                    format!("unknown task {t:?}; expected text_to_image or text_to_video"),
                )
            })?,
        };
        if !matches!(task, Task::TextToImage | Task::TextToVideo) {
            return Err(FormError::new(
                "task",
                "the test form runs text_to_image or text_to_video (other tasks need input files or a workflow)",
            ));
        }
        let prompt = self.prompt.trim();
        if prompt.is_empty() {
            return Err(FormError::new("prompt", "a prompt is required"));
        }
        let mut spec = JobSpec::new(backend, task).param("prompt", prompt);
        let model = self.model.trim();
        if !model.is_empty() {
            spec.model = Some(model.to_string());
        }
        if let Some(p) = number("priority", &self.priority, -10, 10)? {
            spec.priority = p as i8;
        }
        for (field, text, max) in [
            ("steps", &self.steps, 10_000),
            ("width", &self.width, 16_384),
            ("height", &self.height, 16_384),
        ] {
            if let Some(n) = number(field, text, 1, max)? {
                spec.params.insert(field.to_string(), n.into());
            }
        }
        if let Some(seed) = number("seed", &self.seed, 0, i64::MAX)? {
            spec.params.insert("seed".into(), seed.into());
        }
        spec.validate(limits).map_err(|e| {
            let body = e.to_body();
            let field = body.field.as_deref().map(form_field).unwrap_or("form");
            FormError::new(field, body.message)
        })?;
        Ok(spec)
    }
}

/// A new job like `job`: same backend, task, model, priority and parameters, for
/// a broker without the `resubmit` request (which copies the whole spec itself).
/// Jobs whose spec carried what a snapshot does not (a workflow graph or
/// template, input files) are refused rather than resubmitted without it.
pub fn resubmission(job: &JobSnapshot) -> Result<JobSpec, FormError> {
    match job.task {
        Task::Workflow => {
            return Err(FormError::new(
                "job",
                "a workflow job's graph or template is not in the broker's snapshot; resubmit it from the client that made it",
            ))
        }
        Task::ImageToImage | Task::ImageToVideo => {
            return Err(FormError::new(
                "job",
                "this job's input files are not in the broker's snapshot; resubmit it from the client that made it",
            ))
        }
        Task::TextToImage | Task::TextToVideo => {}
    }
    let Some(params) = job.params.clone() else {
        return Err(FormError::new(
            "job",
            "the broker did not return this job's parameters",
        ));
    };
    let mut spec = JobSpec::new(job.backend, job.task);
    spec.params = params;
    spec.model = job.model.clone();
    spec.priority = job.priority;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form() -> TestJobForm {
        TestJobForm {
            backend: "sim".into(),
            prompt: "a kiln at dusk".into(),
            ..TestJobForm::default()
        }
    }

    fn field_of(f: TestJobForm) -> String {
        f.to_spec(&Limits::default()).unwrap_err().field
    }

    #[test]
    fn a_plain_form_makes_a_text_to_image_job() {
        let mut f = form();
        f.steps = " 12 ".into();
        f.priority = "-3".into();
        f.seed = "7".into();
        let spec = f.to_spec(&Limits::default()).unwrap();
        assert_eq!(spec.backend, Backend::Sim);
        assert_eq!(spec.task, Task::TextToImage);
        assert_eq!(spec.priority, -3);
        assert_eq!(spec.params["steps"], 12);
        assert_eq!(spec.params["seed"], 7);
        assert_eq!(spec.prompt(), Some("a kiln at dusk"));
        assert!(
            !spec.params.contains_key("width"),
            "empty inputs stay unset"
        );
    }

    #[test]
    fn each_mistake_names_its_field() {
        let bad = |f: fn(&mut TestJobForm)| {
            let mut x = form();
            f(&mut x);
            field_of(x)
        };
        assert_eq!(bad(|f| f.backend = "dall-e".into()), "backend");
        assert_eq!(bad(|f| f.task = "paint".into()), "task");
        assert_eq!(bad(|f| f.task = "workflow".into()), "task");
        assert_eq!(bad(|f| f.prompt = "   ".into()), "prompt");
        assert_eq!(bad(|f| f.priority = "11".into()), "priority");
        assert_eq!(bad(|f| f.steps = "abc".into()), "steps");
        assert_eq!(bad(|f| f.width = "0".into()), "width");
        assert_eq!(bad(|f| f.seed = "-1".into()), "seed");
        let limits = Limits {
            max_prompt_chars: 4,
            ..Limits::default()
        };
        assert_eq!(form().to_spec(&limits).unwrap_err().field, "prompt");
    }

    #[test]
    fn protocol_fields_map_to_form_fields() {
        assert_eq!(form_field("job.params.prompt"), "prompt");
        assert_eq!(form_field("job.priority"), "priority");
        assert_eq!(form_field("other"), "other");
    }
}
