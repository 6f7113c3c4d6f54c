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

/// What the manifest says about the seed of output `index` of a job with
/// `outputs` outputs: `(seed, batch_index)`.
///
/// A backend that draws one seed per output lists them in `info.output_seeds`
/// (the sim backend: `seed`, `seed + 1`, …), and each output gets its own. Where
/// it does not, the outputs share the job's `info.seed`: ComfyUI draws the noise
/// of a whole batch from one seed (`comfy/sample.py`, `prepare_noise`: one
/// `torch.randn` over the batch's shape), so image `i` of a `count`/`batch_size`
/// job is batch item `i` of that seed, not what `seed + i` would give alone.
/// The entry then says so with `batch_index`.
pub fn output_seed(
    info: &serde_json::Map<String, serde_json::Value>,
    index: u16,
    outputs: usize,
) -> (Option<u64>, Option<u16>) {
    let own = info
        .get("output_seeds")
        .and_then(|s| s.get(index as usize))
        .and_then(serde_json::Value::as_u64);
    match own {
        Some(seed) => (Some(seed), None),
        None => {
            let seed = info.get("seed").and_then(serde_json::Value::as_u64);
            (seed, seed.and((outputs > 1).then_some(index)))
        }
    }
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
            let (seed, batch_index) = output_seed(&job.info, meta.id.index, job.artifacts.len());
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
                    seed,
                    batch_index,
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn info(v: serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn a_batch_shares_its_seed_and_per_output_seeds_are_kept() {
        // ComfyUI, `count: 3` through `batch_size`: one seed for the batch.
        let comfy = info(json!({"seed": 100, "prompt_id": "p"}));
        let entries: Vec<_> = (0..3).map(|i| output_seed(&comfy, i, 3)).collect();
        assert_eq!(
            entries,
            [
                (Some(100), Some(0)),
                (Some(100), Some(1)),
                (Some(100), Some(2))
            ]
        );
        // One output: just the seed.
        assert_eq!(output_seed(&comfy, 0, 1), (Some(100), None));
        // The sim draws one seed per output and says so.
        let sim = info(json!({"seed": 100, "output_seeds": [100, 101, 102]}));
        assert_eq!(output_seed(&sim, 2, 3), (Some(102), None));
        // No seed reported: nothing claimed.
        assert_eq!(output_seed(&info(json!({})), 1, 2), (None, None));
    }
}
