//! Job outputs for the browser, streamed from the broker's chunked `fetch` as
//! they are read (a video is never held whole in memory), with single byte ranges
//! so video and audio players can seek.
//!
//! A whole-file answer is hashed on the way; if the bytes do not match the
//! broker's sha256 the stream is cut, so the browser reports a failed download
//! instead of keeping a corrupt file. Outputs come from workers, which the
//! dashboard does not trust with its origin: only images, video, audio and plain
//! text are shown inline, everything else is a download, and every answer is
//! sandboxed by its Content-Security-Policy.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use kiln_protocol::request::Chunk;
use kiln_protocol::{ArtifactId, Client};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::api::{client_error, error_response};
use crate::http::App;

#[derive(Debug, Default, Deserialize)]
pub struct ArtifactQuery {
    /// Any value: answer as an attachment (the browser saves it).
    #[serde(default)]
    pub download: Option<String>,
}

/// A single byte range, as asked for: `bytes=a-b`, `bytes=a-` or `bytes=-n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    From(u64, Option<u64>),
    Suffix(u64),
}

/// Parses a `Range` header; `None` for anything but one byte range (the whole
/// file is then sent, as RFC 9110 allows).
pub fn parse_range(value: &str) -> Option<ByteRange> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (a, b) = (a.trim(), b.trim());
    if a.is_empty() {
        return b.parse().ok().filter(|n| *n > 0).map(ByteRange::Suffix);
    }
    let start: u64 = a.parse().ok()?;
    let end = if b.is_empty() {
        None
    } else {
        Some(b.parse::<u64>().ok().filter(|e| *e >= start)?)
    };
    Some(ByteRange::From(start, end))
}

impl ByteRange {
    /// The inclusive byte span within a file of `total` bytes, or `None` when
    /// the range is unsatisfiable.
    pub fn span(self, total: u64) -> Option<(u64, u64)> {
        if total == 0 {
            return None;
        }
        match self {
            ByteRange::From(start, _) if start >= total => None,
            ByteRange::From(start, end) => Some((start, end.unwrap_or(total - 1).min(total - 1))),
            ByteRange::Suffix(n) => Some((total.saturating_sub(n), total - 1)),
        }
    }
}

/// Media types shown in the page; anything else is only ever downloaded.
pub fn inline_safe(media_type: &str) -> bool {
    let t = media_type.to_ascii_lowercase();
    matches!(
        t.as_str(),
        "image/png" | "image/jpeg" | "image/webp" | "image/gif" | "text/plain"
    ) || t.starts_with("video/")
        || t.starts_with("audio/")
}

/// A `Content-Disposition` that any browser reads and that no file name can
/// break out of: an ASCII fallback plus the RFC 8187 UTF-8 form.
pub fn disposition(kind: &str, name: &str) -> String {
    let ascii: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let encoded: String = name
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    format!("{kind}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

/// `GET /api/artifacts/{id}[?download=1]`.
pub async fn serve(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    Query(query): Query<ArtifactQuery>,
    headers: HeaderMap,
) -> Response {
    let id: ArtifactId = match id.parse() {
        Ok(id) => id,
        Err(e) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("{id:?} is not an artifact id: {e}"),
                Some("artifact_id"),
            )
        }
    };
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_range);
    // The first chunk tells the size, name and type.
    let first = match app.client.fetch_chunk(id, 0, None).await {
        Ok(c) => c,
        Err(e) => return client_error(&e),
    };
    let total = first.total;
    let span = match range.map(|r| r.span(total)) {
        Some(None) => {
            return (
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{total}"))],
            )
                .into_response()
        }
        Some(Some(span)) => Some(span),
        None => None,
    };
    let safe = inline_safe(&first.media_type);
    let media_type = if safe {
        HeaderValue::from_str(&first.media_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream"))
    } else {
        HeaderValue::from_static("application/octet-stream")
    };
    let kind = if query.download.is_some() || !safe {
        "attachment"
    } else {
        "inline"
    };
    let disposition = HeaderValue::from_str(&disposition(kind, &first.name))
        .unwrap_or(HeaderValue::from_static("attachment"));
    let (status, start, end) = match span {
        Some((a, b)) => (StatusCode::PARTIAL_CONTENT, a, b + 1),
        None => (StatusCode::OK, 0, total),
    };
    let stream = ChunkStream {
        client: app.client.clone(),
        id,
        next: start,
        end,
        first: (start == 0).then_some(first),
        hasher: (span.is_none()).then(Sha256::new),
    };
    let mut response = Response::new(Body::from_stream(futures::stream::unfold(
        stream,
        ChunkStream::step,
    )));
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, media_type);
    h.insert(header::CONTENT_DISPOSITION, disposition);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=86400, immutable"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("sandbox; default-src 'none'; img-src 'self'; media-src 'self'"),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{total}", end - 1)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    response
}

/// Reads `[next, end)` of an artifact chunk by chunk.
struct ChunkStream {
    client: Client,
    id: ArtifactId,
    next: u64,
    end: u64,
    /// The chunk at offset 0, already read to learn the size.
    first: Option<Chunk>,
    /// Set when the whole file is sent: its sha256 is checked at the end.
    hasher: Option<Sha256>,
}

impl ChunkStream {
    async fn step(mut self) -> Option<(Result<Bytes, std::io::Error>, Self)> {
        if self.next >= self.end {
            return None;
        }
        let chunk = match self.first.take() {
            Some(c) => c,
            None => match self.client.fetch_chunk(self.id, self.next, None).await {
                Ok(c) => c,
                Err(e) => {
                    self.end = 0;
                    return Some((Err(std::io::Error::other(e.to_string())), self));
                }
            },
        };
        if chunk.offset != self.next || chunk.data.is_empty() {
            self.end = 0;
            let why = format!(
                "artifact {}: chunk at offset {} while {} was asked for",
                self.id, chunk.offset, self.next
            );
            return Some((Err(std::io::Error::other(why)), self));
        }
        let room = (self.end - self.next) as usize;
        let mut data = chunk.data;
        data.truncate(room);
        self.next += data.len() as u64;
        if let Some(h) = self.hasher.as_mut() {
            h.update(&data);
        }
        if self.next >= self.end {
            if let Some(h) = self.hasher.take() {
                let actual = kiln_protocol::client::hex(&h.finalize());
                if actual != chunk.sha256 {
                    tracing::warn!(artifact = %self.id, expected = %chunk.sha256, %actual, "artifact failed its integrity check; the download is cut");
                    return Some((Err(std::io::Error::other("sha256 mismatch")), self));
                }
            }
        }
        Some((Ok(Bytes::from(data)), self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_byte_ranges_parse_and_clamp() {
        assert_eq!(
            parse_range("bytes=0-99"),
            Some(ByteRange::From(0, Some(99)))
        );
        assert_eq!(parse_range("bytes=100-"), Some(ByteRange::From(100, None)));
        assert_eq!(parse_range("bytes=-500"), Some(ByteRange::Suffix(500)));
        for ignored in [
            "bytes=0-1,5-6",
            "items=0-1",
            "bytes=5-1",
            "bytes=x-",
            "bytes=-0",
        ] {
            assert_eq!(parse_range(ignored), None, "{ignored}");
        }
        assert_eq!(ByteRange::From(0, Some(99)).span(50), Some((0, 49)));
        assert_eq!(ByteRange::From(50, None).span(50), None);
        assert_eq!(ByteRange::Suffix(500).span(100), Some((0, 99)));
        assert_eq!(ByteRange::Suffix(10).span(100), Some((90, 99)));
    }

    #[test]
    fn only_media_are_inline_and_names_cannot_break_the_header() {
        assert!(inline_safe("image/png") && inline_safe("video/mp4") && inline_safe("audio/wav"));
        assert!(!inline_safe("text/html") && !inline_safe("image/svg+xml"));
        let d = disposition("inline", "a\"b;\r\nc é.png");
        assert!(HeaderValue::from_str(&d).is_ok(), "{d}");
        assert_eq!(
            d,
            "inline; filename=\"a_b___c__.png\"; filename*=UTF-8''a%22b%3B%0D%0Ac%20%C3%A9.png"
        );
    }
}
