//! The frame layout: `[header, body]`, and `[topic, header, body]` on PUB.
//!
//! Decoding is strict and never panics: a foreign tag, an unknown version, a body
//! that is not msgpack, an unknown `type` or a bad field each become a
//! [`ProtocolError`] that names what was wrong, so the broker can answer with a typed
//! error instead of crashing or staying silent.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::ProtocolError;

/// Header frame of every Kiln message: the protocol family and its version.
pub const PROTOCOL_TAG: &[u8] = b"KILN1";
const PROTOCOL_FAMILY: &[u8] = b"KILN";

/// A message enum that travels as an internally tagged msgpack map.
pub trait WireMessage: Serialize + DeserializeOwned {
    /// The `type` values this enum accepts, for error messages and docs.
    const TYPES: &'static [&'static str];

    /// Decodes `body` as the variant named `type_name` with field-path tracking, to
    /// explain a failure of the fast decode. Only runs on the error path.
    fn diagnose(type_name: &str, body: &[u8]) -> ProtocolError;
}

/// Encodes a message body with named fields (maps, not positional arrays), so peers
/// in other languages see `{"type": "submit", ...}`.
pub fn encode_body<T: Serialize>(msg: &T) -> Bytes {
    // Our message types contain only maps with string keys, strings, numbers, bytes
    // and sized sequences, which rmp-serde always encodes.
    Bytes::from(rmp_serde::to_vec_named(msg).expect("kiln messages always encode"))
}

/// The two frames of a request, reply or worker message.
pub fn encode<T: Serialize>(msg: &T) -> [Bytes; 2] {
    [Bytes::from_static(PROTOCOL_TAG), encode_body(msg)]
}

/// Checks the header frame, telling a foreign protocol from another Kiln version.
pub fn check_header(header: &[u8]) -> Result<(), ProtocolError> {
    if header == PROTOCOL_TAG {
        return Ok(());
    }
    let printable: String = String::from_utf8_lossy(&header[..header.len().min(32)]).into_owned();
    if header.starts_with(PROTOCOL_FAMILY) {
        Err(ProtocolError::UnsupportedVersion { found: printable })
    } else {
        Err(ProtocolError::ForeignTag(printable))
    }
}

/// Decodes `[header, body]` after checking the frame count, header and size limit.
pub fn decode<T: WireMessage>(frames: &[Bytes], max_bytes: usize) -> Result<T, ProtocolError> {
    if frames.len() == 3 && frames[0].is_empty() && frames[1].as_ref() == PROTOCOL_TAG {
        // A REQ socket puts an empty delimiter first. Kiln's replies are not framed
        // for REQ (they would need the delimiter back), so say so plainly.
        return Err(ProtocolError::Malformed(
            "an empty delimiter frame came first: REQ sockets are not supported, use a DEALER \
             (docs/protocol.md, \"Sockets\")"
                .to_string(),
        ));
    }
    if frames.len() != 2 {
        return Err(ProtocolError::FrameCount {
            expected: 2,
            got: frames.len(),
        });
    }
    check_header(&frames[0])?;
    decode_body(&frames[1], max_bytes)
}

/// Decodes one msgpack body. The fast path is a single `rmp_serde` decode; only when
/// that fails is the body decoded again to find the type and field at fault.
pub fn decode_body<T: WireMessage>(body: &[u8], max_bytes: usize) -> Result<T, ProtocolError> {
    if body.len() > max_bytes {
        return Err(ProtocolError::TooLarge {
            size: body.len(),
            limit: max_bytes,
        });
    }
    if !is_map(body) {
        return Err(not_a_map(body));
    }
    // Declared lengths are checked before any value is built.
    crate::shape::check(body, &crate::shape::WIRE)?;
    match rmp_serde::from_slice::<T>(body) {
        Ok(msg) => Ok(msg),
        Err(_) => Err(explain::<T>(body)),
    }
}

/// The error for a body that is not a msgpack map: a positional array, or
/// something else.
fn not_a_map(body: &[u8]) -> ProtocolError {
    let is_array = matches!(body.first(), Some(0x90..=0x9f | 0xdc | 0xdd));
    ProtocolError::Malformed(if is_array {
        "it is a positional array; a body is a map with a string `type` field".into()
    } else {
        "a body is a map with a string `type` field".into()
    })
}

/// Whether a msgpack value starts with a map marker (fixmap, map 16, map 32).
fn is_map(body: &[u8]) -> bool {
    matches!(body.first(), Some(0x80..=0x8f | 0xde | 0xdf))
}

/// The envelope fields every message may carry, read without decoding the rest.
#[derive(Debug, Default)]
pub struct Envelope {
    /// `type`, when it is a string.
    pub kind: Option<String>,
    /// `type` is present but not a string.
    pub kind_not_text: bool,
    /// `req_id`, when it is an unsigned integer.
    pub req_id: Option<u64>,
}

/// `type` or `req_id` as read loosely: a string, an unsigned integer, or another
/// scalar. A container is refused without being read into memory.
enum Loose {
    Text(String),
    Unsigned(u64),
    Other,
}

impl<'de> Deserialize<'de> for Loose {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Loose, D::Error> {
        struct Scalar;
        impl serde::de::Visitor<'_> for Scalar {
            type Value = Loose;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a scalar")
            }
            fn visit_str<E>(self, s: &str) -> Result<Loose, E> {
                Ok(Loose::Text(s.to_owned()))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Loose, E> {
                Ok(Loose::Unsigned(n))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Loose, E> {
                Ok(u64::try_from(n).map_or(Loose::Other, Loose::Unsigned))
            }
            fn visit_f64<E>(self, _: f64) -> Result<Loose, E> {
                Ok(Loose::Other)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Loose, E> {
                Ok(Loose::Other)
            }
            fn visit_bytes<E>(self, _: &[u8]) -> Result<Loose, E> {
                Ok(Loose::Other)
            }
            fn visit_unit<E>(self) -> Result<Loose, E> {
                Ok(Loose::Other)
            }
        }
        d.deserialize_any(Scalar)
    }
}

/// The caps [`peek_envelope`] holds a body to before reading it: no limit on a
/// container's length (a body over [`crate::shape::WIRE`]'s still has its
/// `req_id` echoed), but the same nesting depth, so that skipping a value never
/// recurses deeper, and the same count of values, so that a body built to be
/// slow to walk is not walked twice.
const PEEK: crate::shape::Shape = crate::shape::Shape {
    max_container_len: u64::MAX,
    max_values: crate::shape::WIRE.max_values,
    max_depth: crate::shape::WIRE.max_depth,
};

/// Reads `type` and `req_id` from a body, if it is a map at all, whatever else it
/// holds. Used to echo the `req_id` of a request that failed to decode. A body
/// nested deeper than the wire allows, or that declares more than it holds,
/// yields nothing (it may have failed to decode on purpose).
pub fn peek_envelope(body: &[u8]) -> Option<Envelope> {
    if !is_map(body) || crate::shape::check(body, &PEEK).is_err() {
        return None;
    }
    Some(read_envelope(body))
}

/// [`peek_envelope`] for a map body already held to the caps (no second walk).
fn read_envelope(body: &[u8]) -> Envelope {
    #[derive(Deserialize)]
    struct Kind {
        #[serde(rename = "type", default)]
        kind: Option<Loose>,
    }
    #[derive(Deserialize)]
    struct ReqId {
        #[serde(default)]
        req_id: Option<Loose>,
    }
    // Read apart, so that a container under one key does not hide the other.
    let kind = rmp_serde::from_slice::<Kind>(body).map(|k| k.kind);
    let req_id = rmp_serde::from_slice::<ReqId>(body).map(|r| r.req_id);
    Envelope {
        kind_not_text: matches!(kind, Ok(Some(Loose::Unsigned(_) | Loose::Other)) | Err(_)),
        kind: match kind {
            Ok(Some(Loose::Text(s))) => Some(s),
            _ => None,
        },
        req_id: match req_id {
            Ok(Some(Loose::Unsigned(n))) => Some(n),
            _ => None,
        },
    }
}

/// Why `body`, a map within the wire's caps (checked by [`decode_body`]), did
/// not decode as `T`.
fn explain<T: WireMessage>(body: &[u8]) -> ProtocolError {
    let envelope = read_envelope(body);
    match envelope.kind {
        None if envelope.kind_not_text => {
            ProtocolError::invalid("type", "must be a string naming the message")
        }
        None => ProtocolError::invalid("type", "missing: every message names its `type`"),
        Some(kind) if T::TYPES.contains(&kind.as_str()) => T::diagnose(&kind, body),
        Some(kind) => ProtocolError::UnknownType(kind.chars().take(64).collect()),
    }
}

/// Decodes `body` as `V` with serde_path_to_error so the error names the field.
/// The body still contains the `type` key, which `V` ignores.
pub fn diagnose_as<V: DeserializeOwned>(body: &[u8]) -> ProtocolError {
    let mut de = rmp_serde::Deserializer::new(body);
    match serde_path_to_error::deserialize::<_, V>(&mut de) {
        Ok(_) => ProtocolError::Malformed("message decodes only in part".to_string()),
        Err(e) => {
            let path = e.path().to_string();
            let reason = e.into_inner().to_string();
            let root = path == "." || path.is_empty();
            let join = |name: &str| {
                if root {
                    name.to_string()
                } else if path.ends_with(&format!(".{name}")) {
                    // serde's derived decoder (`loras[]`, `inputs[]`) already
                    // stepped into the unknown key.
                    path.clone()
                } else {
                    format!("{path}.{name}")
                }
            };
            // A missing or unknown key is reported on the key itself
            // (`job.backend`), not on the map that lacks or has it.
            if let Some(name) = quoted_after(&reason, "missing field `") {
                ProtocolError::invalid(join(&name), "missing")
            } else if let Some(name) = quoted_after(&reason, "unknown field `") {
                ProtocolError::invalid(join(&name), reason)
            } else if root {
                ProtocolError::Malformed(reason)
            } else {
                ProtocolError::InvalidField {
                    field: path,
                    reason,
                }
            }
        }
    }
}

fn quoted_after(reason: &str, prefix: &str) -> Option<String> {
    let rest = reason.strip_prefix(prefix)?;
    Some(rest.split('`').next()?.to_string())
}

/// Implements [`WireMessage`] for an internally tagged enum whose variants each wrap a
/// struct, mapping each `type` name to its struct for error diagnosis.
#[macro_export]
macro_rules! wire_message {
    ($enum:ty { $($name:literal => $variant:ty),* $(,)? }) => {
        impl $crate::frame::WireMessage for $enum {
            const TYPES: &'static [&'static str] = &[$($name),*];
            fn diagnose(type_name: &str, body: &[u8]) -> $crate::error::ProtocolError {
                match type_name {
                    $($name => $crate::frame::diagnose_as::<$variant>(body),)*
                    other => $crate::error::ProtocolError::UnknownType(other.to_string()),
                }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Backend, JobSpec, Task};
    use crate::request::{Request, Submit};

    fn submit_body() -> Bytes {
        encode_body(&Request::Submit(Submit {
            req_id: 7,
            job: JobSpec::new(Backend::Sim, Task::TextToImage).param("prompt", "x"),
            client: None,
        }))
    }

    #[test]
    fn round_trip_is_a_named_map() {
        let body = submit_body();
        // A map whose `type` is readable without knowing the schema.
        let env = peek_envelope(&body).unwrap();
        assert_eq!(env.kind.as_deref(), Some("submit"));
        assert_eq!(env.req_id, Some(7));
        let frames = [Bytes::from_static(PROTOCOL_TAG), body];
        assert!(
            matches!(decode::<Request>(&frames, 1 << 20), Ok(Request::Submit(s)) if s.req_id == 7)
        );
    }

    #[test]
    fn header_and_size_errors_are_typed() {
        let body = submit_body();
        let foreign = [Bytes::from_static(b"HTTP/1.1"), body.clone()];
        assert!(matches!(
            decode::<Request>(&foreign, 1 << 20),
            Err(ProtocolError::ForeignTag(_))
        ));
        let future = [Bytes::from_static(b"KILN9"), body.clone()];
        assert!(matches!(
            decode::<Request>(&future, 1 << 20),
            Err(ProtocolError::UnsupportedVersion { .. })
        ));
        let one = [body.clone()];
        assert!(matches!(
            decode::<Request>(&one, 1 << 20),
            Err(ProtocolError::FrameCount { got: 1, .. })
        ));
        let frames = [Bytes::from_static(PROTOCOL_TAG), body];
        assert!(matches!(
            decode::<Request>(&frames, 10),
            Err(ProtocolError::TooLarge { limit: 10, .. })
        ));
    }

    #[test]
    fn body_errors_name_type_and_field() {
        let truncated = &submit_body()[..20];
        assert!(matches!(
            decode_body::<Request>(truncated, 1 << 20),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            decode_body::<Request>(b"\x01\x02\x03", 1 << 20),
            Err(ProtocolError::Malformed(_))
        ));

        let unknown =
            rmp_serde::to_vec_named(&serde_json::json!({"type": "explode", "req_id": 1})).unwrap();
        assert_eq!(
            decode_body::<Request>(&unknown, 1 << 20).unwrap_err(),
            ProtocolError::UnknownType("explode".into())
        );

        let bad_backend = rmp_serde::to_vec_named(&serde_json::json!({
            "type": "submit", "req_id": 1,
            "job": {"backend": "dalle", "task": "text_to_image"}
        }))
        .unwrap();
        match decode_body::<Request>(&bad_backend, 1 << 20).unwrap_err() {
            ProtocolError::InvalidField { field, reason } => {
                assert_eq!(field, "job.backend");
                assert!(reason.contains("dalle"), "{reason}");
            }
            other => panic!("{other:?}"),
        }

        let wrong_type = rmp_serde::to_vec_named(&serde_json::json!({
            "type": "submit", "req_id": 1,
            "job": {"backend": "sim", "task": "text_to_image", "priority": "high"}
        }))
        .unwrap();
        assert!(matches!(
            decode_body::<Request>(&wrong_type, 1 << 20).unwrap_err(),
            ProtocolError::InvalidField { field, .. } if field == "job.priority"
        ));

        let missing =
            rmp_serde::to_vec_named(&serde_json::json!({"type": "get", "req_id": 1})).unwrap();
        assert_eq!(
            decode_body::<Request>(&missing, 1 << 20).unwrap_err(),
            ProtocolError::invalid("job_id", "missing")
        );

        let typo = rmp_serde::to_vec_named(&serde_json::json!({
            "type": "submit", "req_id": 1,
            "job": {"backend": "sim", "task": "text_to_image", "priorty": 3}
        }))
        .unwrap();
        assert!(matches!(
            decode_body::<Request>(&typo, 1 << 20).unwrap_err(),
            ProtocolError::InvalidField { reason, .. } if reason.contains("priorty")
        ));
    }
}
