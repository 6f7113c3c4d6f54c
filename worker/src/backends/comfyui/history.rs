//! Reading a finished prompt's history entry: the verdict and the outputs.
//!
//! The verdict is the name of the last message in `status.messages`
//! (API.md §8.1); `status_str` alone cannot tell an interrupt from an error.
//! Outputs follow the generic rule of API.md §5.2: any list element that is an
//! object with a `filename` is a file (`images`, with or without `animated`,
//! `audio`, VideoHelperSuite's `gifs`, custom keys), and `text` lists are text.

use kiln_protocol::{FailureKind, JobError};
use serde_json::Value;

use super::api::FileRef;

/// How a finished prompt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Success,
    /// `execution_error`, with its payload.
    Error(Value),
    /// `execution_interrupted`: cancelled.
    Interrupted,
    /// A history entry whose messages say nothing we know.
    Unknown(String),
}

pub fn verdict(entry: &Value) -> Verdict {
    let status = &entry["status"];
    let last = status["messages"].as_array().and_then(|m| m.last());
    match last.and_then(|m| m.get(0)).and_then(Value::as_str) {
        Some("execution_success") => Verdict::Success,
        Some("execution_error") => {
            Verdict::Error(last.and_then(|m| m.get(1)).cloned().unwrap_or(Value::Null))
        }
        Some("execution_interrupted") => Verdict::Interrupted,
        _ => match status["status_str"].as_str() {
            Some("success") => Verdict::Success,
            other => Verdict::Unknown(other.unwrap_or("no status").to_string()),
        },
    }
}

/// Turns an `execution_error` payload into a job failure: which node, which
/// exception, and whether it was the GPU running out of memory.
pub fn runtime_failure(payload: &Value) -> JobError {
    let text = |k: &str| payload.get(k).and_then(Value::as_str).unwrap_or("").trim();
    let (node, class, exc, msg) = (
        text("node_id"),
        text("node_type"),
        text("exception_type"),
        text("exception_message"),
    );
    let oom = exc.contains("OutOfMemory") || msg.to_ascii_lowercase().contains("out of memory");
    let message = format!("ComfyUI node {node} ({class}) failed: {exc}: {msg}");
    if oom {
        JobError::new(FailureKind::OutOfMemory, message, true)
    } else {
        JobError::new(FailureKind::Backend, message, false)
    }
}

/// What a finished prompt produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Produced {
    /// `(node id, file)`, saved outputs first; temp previews only when nothing
    /// was saved.
    pub files: Vec<(String, FileRef)>,
    /// `(node id, text)` from `text` lists.
    pub texts: Vec<(String, String)>,
}

fn node_order(id: &str) -> (u64, String) {
    (id.parse().unwrap_or(u64::MAX), id.to_string())
}

pub fn produced(outputs: &Value) -> Produced {
    let mut nodes: Vec<(&String, &Value)> = outputs
        .as_object()
        .map(|m| m.iter().collect())
        .unwrap_or_default();
    nodes.sort_by_key(|(id, _)| node_order(id));
    let mut saved = Vec::new();
    let mut temp = Vec::new();
    let mut texts = Vec::new();
    for (id, ui) in nodes {
        let Some(ui) = ui.as_object() else { continue };
        for (key, items) in ui {
            for item in items.as_array().into_iter().flatten() {
                match item {
                    Value::Object(o) if o.contains_key("filename") => {
                        if let Ok(file) = serde_json::from_value::<FileRef>(item.clone()) {
                            if file.kind == "temp" {
                                temp.push((id.clone(), file));
                            } else {
                                saved.push((id.clone(), file));
                            }
                        }
                    }
                    Value::String(s) if key == "text" => texts.push((id.clone(), s.clone())),
                    _ => {}
                }
            }
        }
    }
    let files = if saved.is_empty() { temp } else { saved };
    Produced { files, texts }
}

/// A media type from a file name, for servers that answer `application/octet-stream`.
pub fn media_type_of(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "mkv" => "video/x-matroska",
        "flac" => "audio/flac",
        "wav" => "audio/wav",
        "mp3" => "audio/mpeg",
        "ogg" | "opus" => "audio/ogg",
        "txt" => "text/plain",
        "json" => "application/json",
        "glb" => "model/gltf-binary",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> Value {
        let path = format!(
            "{}/../tests/fixtures/comfyui/traces/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        v.as_object().unwrap().values().next().unwrap().clone()
    }

    #[test]
    fn verdicts_come_from_the_last_message() {
        assert_eq!(
            verdict(&entry("history_01_empty_invert_save.json")),
            Verdict::Success
        );
        assert_eq!(
            verdict(&entry("history_08_cancel_job_api.json")),
            Verdict::Interrupted
        );
        assert_eq!(
            verdict(&entry("history_08_interrupt_prompt.json")),
            Verdict::Interrupted
        );
        let Verdict::Error(payload) = verdict(&entry("history_07_runtime_error.json")) else {
            panic!()
        };
        let err = runtime_failure(&payload);
        assert_eq!(err.kind, FailureKind::Backend);
        assert!(err.message.starts_with("ComfyUI node 1 (LoadImage) failed: PIL.UnidentifiedImageError: cannot identify image file"), "{}", err.message);
    }

    #[test]
    fn every_output_kind_is_found() {
        let video = produced(&entry("history_06_video_mp4_webp.json")["outputs"]);
        let names: Vec<&str> = video
            .files
            .iter()
            .map(|(_, f)| f.filename.as_str())
            .collect();
        assert_eq!(names, ["video_00001_.mp4", "anim_00001_.webp"]);
        let audio = produced(&entry("history_09_audio_roundtrip.json")["outputs"]);
        assert_eq!(audio.files[0].1.filename, "audio_00001.flac");
        let text = produced(&entry("history_05_text_getimagesize.json")["outputs"]);
        assert_eq!(text.texts, vec![("3".to_string(), "320".to_string())]);
        // A temp preview next to a saved image is not an output ...
        let both = produced(&entry("history_10_loadimage_subfolder_preview.json")["outputs"]);
        assert_eq!(both.files.len(), 1);
        assert_eq!(both.files[0].1.kind, "output");
        // ... but it is when nothing was saved.
        let only_temp = serde_json::json!({"3": {"images": [{"filename": "ComfyUI_temp_abcde_00001_.png", "subfolder": "", "type": "temp"}]}});
        assert_eq!(produced(&only_temp).files.len(), 1);
        let vhs = serde_json::json!({"9": {"gifs": [{"filename": "AnimateDiff_00001.mp4", "subfolder": "", "type": "output", "format": "video/h264-mp4", "frame_rate": 8.0}]}});
        assert_eq!(produced(&vhs).files[0].1.filename, "AnimateDiff_00001.mp4");
        assert_eq!(media_type_of("AnimateDiff_00001.mp4"), "video/mp4");
    }
}
