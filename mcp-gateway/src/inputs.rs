//! Input images for `edit_image` and image-to-video: read from an allowed path,
//! decoded from base64, or taken from an earlier job's artifact, then checked to be
//! an image the generators take and within the broker's input size limit.

use base64::Engine;
use kiln_protocol::{ArtifactId, InputFile};

use crate::args::InputImage;
use crate::error::ToolError;
use crate::gateway::Gateway;

fn media_type_of(data: &[u8]) -> Option<&'static str> {
    match image::guess_format(data).ok()? {
        image::ImageFormat::Png => Some("image/png"),
        image::ImageFormat::Jpeg => Some("image/jpeg"),
        image::ImageFormat::WebP => Some("image/webp"),
        _ => None,
    }
}

/// Loads the image named by `img` (argument `field`) as a job input.
pub async fn load(gw: &Gateway, img: &InputImage, field: &str) -> Result<InputFile, ToolError> {
    img.check(field)?;
    let (data, sub) = if let Some(path) = &img.path {
        let sub = format!("{field}.path");
        let real = gw.roots.readable_file(&sub, path)?;
        let data = tokio::fs::read(&real).await.map_err(|e| {
            ToolError::invalid(&sub, format!("cannot read {}: {e}", real.display()))
        })?;
        (data, sub)
    } else if let Some(b64) = &img.base64 {
        let sub = format!("{field}.base64");
        let cleaned: String = b64
            .split_once(";base64,")
            .map_or(b64.as_str(), |(_, d)| d)
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let data = base64::engine::general_purpose::STANDARD
            .decode(cleaned)
            .map_err(|e| ToolError::invalid(&sub, format!("is not valid base64: {e}")))?;
        (data, sub)
    } else {
        let sub = format!("{field}.artifact");
        let id: ArtifactId = img
            .artifact
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|e: kiln_protocol::IdError| ToolError::invalid(&sub, e.to_string()))?;
        (gw.client.fetch_artifact(id).await?.data, sub)
    };
    let limit = gw
        .client
        .welcome()
        .map(|w| w.limits)
        .unwrap_or_default()
        .max_input_bytes;
    check_size(&sub, data.len() as u64, limit)?;
    let media_type = media_type_of(&data)
        .ok_or_else(|| ToolError::invalid(&sub, "is not a PNG, JPEG or WebP image"))?;
    let ext = media_type.rsplit('/').next().unwrap_or("png");
    Ok(InputFile {
        name: format!("input.{ext}"),
        media_type: media_type.into(),
        data,
    })
}

fn check_size(field: &str, size: u64, limit: u64) -> Result<(), ToolError> {
    if size > limit {
        return Err(ToolError::invalid(
            field,
            format!("is {size} bytes; the broker takes inputs up to {limit} bytes"),
        ));
    }
    if size == 0 {
        return Err(ToolError::invalid(field, "is empty"));
    }
    Ok(())
}
