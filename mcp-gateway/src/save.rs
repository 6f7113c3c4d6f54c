//! `save_output`: copies a job's outputs into a directory under the allowed roots,
//! optionally recording them in a game's JSON asset manifest.

use kiln_protocol::client::hex;
use kiln_protocol::{ArtifactId, ArtifactMeta, JobId, JobState};
use schemars::JsonSchema;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::args::SaveOutputArgs;
use crate::error::ToolError;
use crate::files::{asset_path, write_atomic, Manifest, ManifestEntry};
use crate::gateway::{Gateway, PostProcess};
use crate::imaging;
use crate::render::post_process;

/// What `save_output` did.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct SaveReport {
    pub saved: Vec<SavedFile>,
    /// The manifest that was updated, when one was named.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
}

/// One file written.
#[derive(Debug, Clone, Serialize, JsonSchema)]
pub struct SavedFile {
    pub artifact: String,
    pub path: String,
    /// The path relative to the allowed root, as a game's asset loader takes it.
    pub asset_path: String,
    pub media_type: String,
    pub size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub asset_key: Option<String>,
}

fn parse_job(field: &str, s: &str) -> Result<JobId, ToolError> {
    s.parse()
        .map_err(|e: kiln_protocol::IdError| ToolError::invalid(field, e.to_string()))
}

/// The file name for output `index` of `total`, keeping the output's extension.
fn target_name(
    args: &SaveOutputArgs,
    meta: &ArtifactMeta,
    media_type: &str,
    index: usize,
    total: usize,
) -> Result<String, ToolError> {
    let ext = match media_type {
        "image/png" | "image/apng" => Some("png".to_string()),
        _ => meta.name.rsplit_once('.').map(|(_, e)| e.to_string()),
    };
    let name = match &args.file_name {
        None => {
            let stem = meta
                .name
                .rsplit_once('.')
                .map_or(meta.name.as_str(), |(s, _)| s);
            match &ext {
                Some(e) => format!("{stem}.{e}"),
                None => stem.to_string(),
            }
        }
        Some(given) => {
            let stem = given.rsplit_once('.').map_or(given.as_str(), |(s, _)| s);
            let stem = if total > 1 {
                format!("{stem}_{index}")
            } else {
                stem.to_string()
            };
            match &ext {
                Some(e) => format!("{stem}.{e}"),
                None => stem,
            }
        }
    };
    kiln_protocol::job::safe_file_name(&name)
        .map(str::to_string)
        .ok_or_else(|| {
            ToolError::invalid(
                "file_name",
                "must be a plain file name without directories or a leading dot",
            )
        })
}

/// The seed of output `index` of a job whose first image used `seed`: the
/// images of a `count` job take one seed after another.
fn output_seed(seed: Option<u64>, index: impl Into<u64>) -> Option<u64> {
    seed.map(|s| s.wrapping_add(index.into()))
}

pub async fn save_output(gw: &Gateway, args: &SaveOutputArgs) -> Result<SaveReport, ToolError> {
    let (job_id, only) = match (&args.job_id, &args.artifact) {
        (Some(_), Some(_)) => {
            return Err(ToolError::invalid(
                "artifact",
                "give `job_id` or `artifact`, not both",
            ))
        }
        (None, None) => return Err(ToolError::invalid("job_id", "give `job_id` or `artifact`")),
        (Some(j), None) => (parse_job("job_id", j)?, None),
        (None, Some(a)) => {
            let id: ArtifactId = a.parse().map_err(|e: kiln_protocol::IdError| {
                ToolError::invalid("artifact", e.to_string())
            })?;
            (id.job, Some(id))
        }
    };
    // Resolve the target first: a path outside the roots is refused before any fetch.
    let (target, root) = gw.roots.target_dir("directory", &args.directory)?;
    let manifest_path = args
        .manifest
        .as_deref()
        .map(|m| Manifest::path_in(&root, "manifest", m))
        .transpose()?;

    let job = gw.client.get(job_id).await?;
    if job.state != JobState::Succeeded {
        return Err(ToolError::invalid(
            if only.is_some() { "artifact" } else { "job_id" },
            format!(
                "job {job_id} is {}; only succeeded jobs have outputs to save",
                job.state
            ),
        ));
    }
    let metas: Vec<&ArtifactMeta> = job
        .artifacts
        .iter()
        .filter(|a| only.is_none_or(|id| a.id == id))
        .collect();
    if metas.is_empty() {
        return Err(ToolError::invalid(
            "artifact",
            format!("job {job_id} has no such output"),
        ));
    }
    let mut post = gw.post_process(&job);
    if let Some(remove) = args.remove_background {
        post = PostProcess {
            remove_background: remove,
            ..post
        };
    }
    let seed = job.info.get("seed").and_then(serde_json::Value::as_u64);

    // Everything is checked: now the directory may be made.
    let (dir, _) = gw.roots.create_dir("directory", &target)?;
    let mut saved = Vec::new();
    let mut manifest = manifest_path.as_deref().map(Manifest::load).transpose()?;
    for (i, meta) in metas.iter().enumerate() {
        let artifact = gw.client.fetch_artifact(meta.id).await?;
        let (data, media_type) = post_process(artifact.data, &meta.media_type, post)?;
        let name = target_name(args, meta, &media_type, i, metas.len())?;
        let path = dir.join(&name);
        if path.exists() && !args.overwrite {
            return Err(ToolError::invalid(
                "overwrite",
                format!(
                    "{} exists; set `overwrite: true` to replace it",
                    path.display()
                ),
            ));
        }
        write_atomic(&path, &data)?;
        let rel = asset_path(&root, &path);
        let key = manifest
            .as_ref()
            .map(|_| match (&args.asset_key, metas.len()) {
                (Some(k), 1) => k.clone(),
                (Some(k), _) => format!("{k}_{i}"),
                (None, _) => name
                    .rsplit_once('.')
                    .map_or(name.as_str(), |(s, _)| s)
                    .to_string(),
            });
        if let (Some(m), Some(key)) = (manifest.as_mut(), &key) {
            let (width, height) = imaging::dimensions(&data, &media_type).unzip();
            m.assets.insert(
                key.clone(),
                ManifestEntry {
                    path: rel.clone(),
                    media_type: media_type.clone(),
                    width,
                    height,
                    job: job_id.to_string(),
                    artifact: meta.id.to_string(),
                    sha256: hex(&Sha256::digest(&data)),
                    seed: output_seed(seed, meta.id.index),
                },
            );
        }
        saved.push(SavedFile {
            artifact: meta.id.to_string(),
            path: path.display().to_string(),
            asset_path: rel,
            media_type,
            size: data.len() as u64,
            asset_key: key,
        });
    }
    if let (Some(m), Some(path)) = (&manifest, &manifest_path) {
        m.save(path)?;
    }
    Ok(SaveReport {
        saved,
        manifest: manifest_path.map(|p| p.display().to_string()),
    })
}
