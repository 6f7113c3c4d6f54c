//! ComfyUI's HTTP API, as the reference (`shared/reference/comfyui/API.md`) describes
//! it for a local server: submit, history, queue, cancel, files, introspection.
//!
//! Every route is used without the `/api` prefix except the jobs API, which only
//! exists as `/api/jobs...`. Several mutating endpoints answer 200 with an empty
//! body, so their answers are never parsed as JSON.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;

/// What can go wrong talking to ComfyUI over HTTP.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No answer: refused, reset or timed out. The server may be restarting.
    #[error("ComfyUI at {url} is unreachable: {message}")]
    Unreachable { url: String, message: String },
    #[error("{what} answered HTTP {status}: {body}")]
    Status {
        what: String,
        status: u16,
        body: String,
    },
    #[error("{what} answered something unexpected: {message}")]
    Decode { what: String, message: String },
    #[error("writing {path}: {message}")]
    Io { path: String, message: String },
}

impl ApiError {
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ApiError::Unreachable { .. })
    }
}

/// The answer to `POST /prompt`.
#[derive(Debug)]
pub enum Submitted {
    /// Queued. `node_errors` can be non-empty: the graph was only partly accepted.
    Queued {
        number: f64,
        node_errors: Map<String, Value>,
    },
    /// HTTP 400: `{error, node_errors}`.
    Rejected(Value),
}

/// A file as ComfyUI names it: history outputs, `/upload/image` answers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FileRef {
    #[serde(alias = "name")]
    pub filename: String,
    #[serde(default)]
    pub subfolder: String,
    #[serde(default = "output_type", rename = "type")]
    pub kind: String,
}

fn output_type() -> String {
    "output".into()
}

impl FileRef {
    /// How a loader node (LoadImage, LoadAudio) refers to an input file.
    pub fn input_path(&self) -> String {
        if self.subfolder.is_empty() {
            self.filename.clone()
        } else {
            format!("{}/{}", self.subfolder, self.filename)
        }
    }
}

/// Where a prompt is in ComfyUI's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueuePlace {
    Running,
    Pending,
    Absent,
}

/// A plain-HTTP client of one ComfyUI server.
#[derive(Clone)]
pub struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    pub fn new(base: &str, timeout: Duration) -> Api {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5).min(timeout))
            // ComfyUI is local: never route it through a proxy from the environment.
            .no_proxy()
            .build()
            .expect("an HTTP client without TLS always builds");
        Api {
            base: base.trim_end_matches('/').to_string(),
            http,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The WebSocket address for `client_id`.
    pub fn ws_url(&self, client_id: &str) -> String {
        let rest = self.base.strip_prefix("http://").unwrap_or(&self.base);
        format!("ws://{rest}/ws?clientId={client_id}")
    }

    fn unreachable(&self, e: reqwest::Error) -> ApiError {
        ApiError::Unreachable {
            url: self.base.clone(),
            message: e.to_string(),
        }
    }

    async fn send(
        &self,
        what: &str,
        req: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ApiError> {
        let resp = req.send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        Err(ApiError::Status {
            what: what.to_string(),
            status,
            body: body.chars().take(2000).collect(),
        })
    }

    async fn json(&self, what: &str, req: reqwest::RequestBuilder) -> Result<Value, ApiError> {
        let resp = self.send(what, req).await?;
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Decode {
            what: what.to_string(),
            message: e.to_string(),
        })
    }

    fn post_json(&self, path: &str, body: Value) -> reqwest::RequestBuilder {
        self.http
            .post(format!("{}{path}", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
    }

    async fn get_json(&self, path: &str) -> Result<Value, ApiError> {
        self.json(
            &format!("GET {path}"),
            self.http.get(format!("{}{path}", self.base)),
        )
        .await
    }

    /// `GET /system_stats`: the readiness probe and the VRAM figures.
    pub async fn system_stats(&self) -> Result<Value, ApiError> {
        self.get_json("/system_stats").await
    }

    /// `GET /object_info`: every node class with its input specs.
    pub async fn object_info(&self) -> Result<Map<String, Value>, ApiError> {
        match self.get_json("/object_info").await? {
            Value::Object(m) => Ok(m),
            other => Err(decode(
                "GET /object_info",
                format!("not an object: {}", short(&other)),
            )),
        }
    }

    /// `GET /object_info/{class}`: `None` for an unknown class (the server answers `{}`).
    pub async fn object_info_class(&self, class: &str) -> Result<Option<Value>, ApiError> {
        let url = reqwest::Url::parse(&format!("{}/object_info/", self.base))
            .and_then(|u| u.join(&encode_segment(class)))
            .map_err(|e| decode("GET /object_info/{class}", e.to_string()))?;
        let v = self
            .json("GET /object_info/{class}", self.http.get(url))
            .await?;
        Ok(v.get(class).cloned())
    }

    /// `GET /models/{folder}`: the file names in a model folder; `None` when the
    /// server has no such folder (404).
    pub async fn models_in(&self, folder: &str) -> Result<Option<Vec<String>>, ApiError> {
        match self
            .get_json(&format!("/models/{}", encode_segment(folder)))
            .await
        {
            Ok(Value::Array(items)) => Ok(Some(
                items
                    .into_iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect(),
            )),
            Ok(other) => Err(decode(
                "GET /models/{folder}",
                format!("not a list: {}", short(&other)),
            )),
            Err(ApiError::Status { status: 404, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /prompt` with our own id and the worker's WebSocket client id.
    pub async fn submit(
        &self,
        graph: &Value,
        prompt_id: &str,
        client_id: &str,
    ) -> Result<Submitted, ApiError> {
        let body = json!({"prompt": graph, "prompt_id": prompt_id, "client_id": client_id});
        let what = "POST /prompt";
        let resp = self
            .http
            .post(format!("{}/prompt", self.base))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        let parsed: Result<Value, _> = serde_json::from_slice(&bytes);
        match (status, parsed) {
            (200, Ok(v)) => Ok(Submitted::Queued {
                number: v.get("number").and_then(Value::as_f64).unwrap_or(0.0),
                node_errors: v
                    .get("node_errors")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default(),
            }),
            (400, Ok(v)) => Ok(Submitted::Rejected(v)),
            (_, _) => Err(ApiError::Status {
                what: what.into(),
                status,
                body: String::from_utf8_lossy(&bytes).chars().take(2000).collect(),
            }),
        }
    }

    /// `GET /history/{id}`: the entry once the prompt has finished, else `None`.
    pub async fn history(&self, prompt_id: &str) -> Result<Option<Value>, ApiError> {
        let v = self.get_json(&format!("/history/{prompt_id}")).await?;
        Ok(v.get(prompt_id).cloned())
    }

    /// Where `prompt_id` is in `GET /queue`.
    pub async fn queue_place(&self, prompt_id: &str) -> Result<QueuePlace, ApiError> {
        let v = self.get_json("/queue").await?;
        let holds = |key: &str| {
            v.get(key).and_then(Value::as_array).is_some_and(|items| {
                items
                    .iter()
                    .any(|item| item.get(1).and_then(Value::as_str) == Some(prompt_id))
            })
        };
        Ok(if holds("queue_running") {
            QueuePlace::Running
        } else if holds("queue_pending") {
            QueuePlace::Pending
        } else {
            QueuePlace::Absent
        })
    }

    /// Prompts queued or running for the clients `wanted` picks
    /// (`extra_data.client_id` of each `GET /queue` item), running ones first.
    pub async fn queued_for_clients(
        &self,
        wanted: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, ApiError> {
        let v = self.get_json("/queue").await?;
        let mut ids = Vec::new();
        for key in ["queue_running", "queue_pending"] {
            for item in v.get(key).and_then(Value::as_array).into_iter().flatten() {
                let client = item
                    .get(3)
                    .and_then(|extra| extra.get("client_id"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if let (true, Some(id)) = (wanted(client), item.get(1).and_then(Value::as_str)) {
                    ids.push(id.to_string());
                }
            }
        }
        Ok(ids)
    }

    /// `POST /api/jobs/{id}/cancel` (v0.27): dequeues a pending prompt or interrupts
    /// it atomically if it runs. `None` when the server has no jobs API.
    pub async fn cancel_job(&self, prompt_id: &str) -> Result<Option<bool>, ApiError> {
        let req = self
            .http
            .post(format!("{}/api/jobs/{prompt_id}/cancel", self.base));
        match self.json("POST /api/jobs/{id}/cancel", req).await {
            Ok(v) => Ok(Some(
                v.get("cancelled").and_then(Value::as_bool).unwrap_or(false),
            )),
            Err(ApiError::Status {
                status: 404 | 405, ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /interrupt {"prompt_id"}`: interrupts the prompt only if it is the running one.
    pub async fn interrupt(&self, prompt_id: &str) -> Result<(), ApiError> {
        let req = self.post_json("/interrupt", json!({"prompt_id": prompt_id}));
        self.send("POST /interrupt", req).await.map(drop)
    }

    /// `POST /queue {"delete": [id]}`: removes a pending prompt; a running one is untouched.
    pub async fn delete_pending(&self, prompt_id: &str) -> Result<(), ApiError> {
        let req = self.post_json("/queue", json!({"delete": [prompt_id]}));
        self.send("POST /queue", req).await.map(drop)
    }

    /// `POST /upload/image` into `input/<subfolder>`; the answer names the file as
    /// the server stored it, which can differ from `name`.
    pub async fn upload(
        &self,
        name: &str,
        media_type: &str,
        data: Vec<u8>,
        subfolder: &str,
    ) -> Result<FileRef, ApiError> {
        let what = "POST /upload/image";
        let part = reqwest::multipart::Part::bytes(data)
            .file_name(name.to_string())
            .mime_str(media_type)
            .or_else(|_| {
                reqwest::multipart::Part::bytes(Vec::new()).mime_str("application/octet-stream")
            })
            .map_err(|e| decode(what, e.to_string()))?;
        let form = reqwest::multipart::Form::new()
            .part("image", part)
            .text("type", "input")
            .text("subfolder", subfolder.to_string());
        let v = self
            .json(
                what,
                self.http
                    .post(format!("{}/upload/image", self.base))
                    .multipart(form),
            )
            .await?;
        serde_json::from_value(v).map_err(|e| decode(what, e.to_string()))
    }

    /// Streams `GET /view` into `dest` and returns the server's `Content-Type`.
    pub async fn download(&self, file: &FileRef, dest: &Path) -> Result<Option<String>, ApiError> {
        let req = self.http.get(format!("{}/view", self.base)).query(&[
            ("filename", file.filename.as_str()),
            ("subfolder", file.subfolder.as_str()),
            ("type", file.kind.as_str()),
        ]);
        let mut resp = self.send("GET /view", req).await?;
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let io = |e: std::io::Error| ApiError::Io {
            path: dest.display().to_string(),
            message: e.to_string(),
        };
        let mut out = tokio::fs::File::create(dest).await.map_err(io)?;
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.unreachable(e))? {
            out.write_all(&chunk).await.map_err(io)?;
        }
        out.flush().await.map_err(io)?;
        Ok(content_type)
    }
}

fn decode(what: &str, message: String) -> ApiError {
    ApiError::Decode {
        what: what.to_string(),
        message,
    }
}

fn short(v: &Value) -> String {
    v.to_string().chars().take(200).collect()
}

/// Percent-encodes one URL path segment (class names may hold spaces or `+`).
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_refs_read_history_items_and_upload_answers() {
        let item: FileRef = serde_json::from_value(
            json!({"filename": "invert_00001_.png", "subfolder": "fixture", "type": "output"}),
        )
        .unwrap();
        assert_eq!(item.kind, "output");
        let up: FileRef = serde_json::from_value(
            json!({"name": "upload_test.png", "subfolder": "jobs/abc", "type": "input"}),
        )
        .unwrap();
        assert_eq!(up.input_path(), "jobs/abc/upload_test.png");
        let flat: FileRef =
            serde_json::from_value(json!({"name": "a (1).png", "subfolder": "", "type": "input"}))
                .unwrap();
        assert_eq!(flat.input_path(), "a (1).png");
    }

    #[test]
    fn urls() {
        let api = Api::new("http://127.0.0.1:8188/", Duration::from_secs(1));
        assert_eq!(api.ws_url("w-1"), "ws://127.0.0.1:8188/ws?clientId=w-1");
        assert_eq!(encode_segment("Load Image+"), "Load%20Image%2B");
    }
}
