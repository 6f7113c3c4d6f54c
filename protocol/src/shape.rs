//! A walk over a msgpack body that checks its declared sizes before any value is
//! built.
//!
//! msgpack states each string's, array's and map's length up front. A decoder that
//! trusts those lengths can be made to allocate far more than the message holds (a
//! nine-byte body may declare a map of 2^32 entries), and a body of many tiny values
//! grows many times over once it becomes strings and maps (a 47 MiB map of one-byte
//! keys peaked at 1.24 GB). [`check`] reads only the markers and lengths, allocates
//! nothing but a stack bounded by [`Shape::max_depth`], and refuses a body whose
//! declarations cannot be honest (more entries than bytes left) or exceed the caps,
//! naming the field where it happened. The frame decoder runs it before `rmp_serde`.

use crate::error::ProtocolError;

/// The caps every decoded body is held to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Most entries in one array or map. Kiln's own lists are far shorter (64
    /// params, 1,000 jobs per `list` reply); a ComfyUI graph has hundreds of nodes.
    pub max_container_len: u64,
    /// Most values (scalars, strings and containers, keys included) in one body:
    /// bounds the memory a body can become once decoded to a small multiple of this.
    pub max_values: u64,
    /// Deepest nesting of arrays and maps.
    pub max_depth: usize,
}

/// The caps of every Kiln message on the wire (docs/protocol.md, "Decoding rules").
pub const WIRE: Shape = Shape {
    max_container_len: 65_536,
    max_values: 1 << 20,
    max_depth: 64,
};

/// One open container on the walk.
struct Open<'a> {
    /// Values still to read in it (a map counts keys and values).
    left: u64,
    map: bool,
    /// The last string key read in this map, for naming the field.
    key: Option<&'a str>,
}

/// Checks the declared sizes of the msgpack value at the start of `body` against
/// `shape`. A failure is [`ProtocolError::FieldTooLarge`] for a cap (with the field's
/// dotted path, `body` for the top level) or [`ProtocolError::Malformed`] for a
/// declaration the remaining bytes cannot hold.
pub fn check(body: &[u8], shape: &Shape) -> Result<(), ProtocolError> {
    let mut at = 0usize;
    let mut values = 0u64;
    let mut stack: Vec<Open<'_>> = Vec::new();
    loop {
        // The value about to be read is a key if its container is a map with an
        // even number of values left.
        let is_key = stack.last().is_some_and(|o| o.map && o.left % 2 == 0);
        values += 1;
        if values > shape.max_values {
            return Err(ProtocolError::FieldTooLarge {
                field: "body (values)".into(),
                limit: shape.max_values,
                actual: values,
            });
        }
        let Some(&marker) = body.get(at) else {
            return Err(truncated(&stack));
        };
        at += 1;
        let mut container: Option<(u64, bool)> = None;
        let mut skip: u64 = 0;
        let mut string = false;
        match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => {}
            0x80..=0x8f => container = Some(((marker & 0x0f) as u64, true)),
            0x90..=0x9f => container = Some(((marker & 0x0f) as u64, false)),
            0xa0..=0xbf => {
                skip = (marker & 0x1f) as u64;
                string = true;
            }
            0xc1 => return Err(malformed(&stack, "the reserved marker 0xc1")),
            0xc4 | 0xd9 => {
                skip = read_len(body, &mut at, 1).ok_or_else(|| truncated(&stack))?;
                string = marker == 0xd9;
            }
            0xc5 | 0xda => {
                skip = read_len(body, &mut at, 2).ok_or_else(|| truncated(&stack))?;
                string = marker == 0xda;
            }
            0xc6 | 0xdb => {
                skip = read_len(body, &mut at, 4).ok_or_else(|| truncated(&stack))?;
                string = marker == 0xdb;
            }
            0xc7 => skip = read_len(body, &mut at, 1).ok_or_else(|| truncated(&stack))? + 1,
            0xc8 => skip = read_len(body, &mut at, 2).ok_or_else(|| truncated(&stack))? + 1,
            0xc9 => skip = read_len(body, &mut at, 4).ok_or_else(|| truncated(&stack))? + 1,
            0xca => skip = 4,
            0xcb => skip = 8,
            0xcc | 0xd0 => skip = 1,
            0xcd | 0xd1 => skip = 2,
            0xce | 0xd2 => skip = 4,
            0xcf | 0xd3 => skip = 8,
            0xd4 => skip = 2,
            0xd5 => skip = 3,
            0xd6 => skip = 5,
            0xd7 => skip = 9,
            0xd8 => skip = 17,
            0xdc => {
                container = Some((
                    read_len(body, &mut at, 2).ok_or_else(|| truncated(&stack))?,
                    false,
                ))
            }
            0xdd => {
                container = Some((
                    read_len(body, &mut at, 4).ok_or_else(|| truncated(&stack))?,
                    false,
                ))
            }
            0xde => {
                container = Some((
                    read_len(body, &mut at, 2).ok_or_else(|| truncated(&stack))?,
                    true,
                ))
            }
            0xdf => {
                container = Some((
                    read_len(body, &mut at, 4).ok_or_else(|| truncated(&stack))?,
                    true,
                ))
            }
        }
        let left_bytes = (body.len() - at) as u64;
        if skip > 0 {
            if skip > left_bytes {
                let what = if string {
                    "a string"
                } else {
                    "a binary or extension value"
                };
                return Err(malformed(
                    &stack,
                    &format!("{what} of {skip} bytes, but only {left_bytes} bytes follow"),
                ));
            }
            if is_key && string {
                let key = std::str::from_utf8(&body[at..at + skip as usize]).ok();
                if let Some(top) = stack.last_mut() {
                    top.key = key;
                }
            }
            at += skip as usize;
        } else if is_key && string {
            // An empty string key.
            if let Some(top) = stack.last_mut() {
                top.key = Some("");
            }
        }
        if let Some(top) = stack.last_mut() {
            top.left -= 1;
        }
        if let Some((len, map)) = container {
            let kind = if map { "map" } else { "array" };
            if len > shape.max_container_len {
                return Err(ProtocolError::FieldTooLarge {
                    field: format!("{} ({kind} entries)", path(&stack)),
                    limit: shape.max_container_len,
                    actual: len,
                });
            }
            // Every value takes at least one byte.
            let need = if map { len * 2 } else { len };
            if need > left_bytes {
                return Err(malformed(
                    &stack,
                    &format!("a {kind} of {len} entries, but only {left_bytes} bytes follow"),
                ));
            }
            if need > 0 {
                if stack.len() >= shape.max_depth {
                    return Err(ProtocolError::FieldTooLarge {
                        field: format!("{} (nesting depth)", path(&stack)),
                        limit: shape.max_depth as u64,
                        actual: stack.len() as u64 + 1,
                    });
                }
                stack.push(Open {
                    left: need,
                    map,
                    key: None,
                });
                continue;
            }
        }
        // Close every container this value completed.
        while stack.last().is_some_and(|o| o.left == 0) {
            stack.pop();
        }
        if stack.is_empty() {
            return Ok(());
        }
    }
}

/// Reads a big-endian length of `n` bytes at `*at`.
fn read_len(body: &[u8], at: &mut usize, n: usize) -> Option<u64> {
    let bytes = body.get(*at..*at + n)?;
    *at += n;
    Some(bytes.iter().fold(0u64, |acc, b| (acc << 8) | *b as u64))
}

/// The dotted path of string keys down to the current value (`job.params`), or
/// `body` at the top level.
fn path(stack: &[Open<'_>]) -> String {
    let keys: Vec<&str> = stack
        .iter()
        .filter(|o| o.map)
        .filter_map(|o| o.key)
        .collect();
    if keys.is_empty() {
        "body".to_string()
    } else {
        keys.join(".")
    }
}

fn malformed(stack: &[Open<'_>], what: &str) -> ProtocolError {
    ProtocolError::Malformed(format!("at `{}`: {what}", path(stack)))
}

fn truncated(stack: &[Open<'_>]) -> ProtocolError {
    malformed(stack, "the body ends in the middle of a value")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pack(v: &serde_json::Value) -> Vec<u8> {
        rmp_serde::to_vec_named(v).unwrap()
    }

    #[test]
    fn honest_bodies_pass() {
        for v in [
            json!({}),
            json!({"type": "ping", "req_id": 1}),
            json!({"a": [1, 2.5, -3, null, true, "x", {"b": []}], "s": "é".repeat(300)}),
            json!([[[[]]]]),
        ] {
            check(&pack(&v), &WIRE).unwrap_or_else(|e| panic!("{v}: {e}"));
        }
        let bin = rmp_serde::to_vec_named(&serde_bytes::ByteBuf::from(vec![7u8; 70_000])).unwrap();
        check(&bin, &WIRE).unwrap();
    }

    #[test]
    fn a_nine_byte_body_declaring_four_billion_entries_is_refused() {
        // map 32 with 0xffffffff entries, then one byte.
        let map = [0xdf, 0xff, 0xff, 0xff, 0xff, 0xa1];
        let err = check(&map, &WIRE).unwrap_err();
        assert!(
            matches!(&err, ProtocolError::FieldTooLarge { field, actual: 4_294_967_295, .. } if field == "body (map entries)"),
            "{err:?}"
        );
        // Within the entry cap but more than the bytes that follow.
        let arr = [0xdc, 0x10, 0x00, 0x01];
        let err = check(&arr, &WIRE).unwrap_err();
        assert!(
            matches!(&err, ProtocolError::Malformed(m) if m.contains("4096 entries, but only 1 bytes follow")),
            "{err:?}"
        );
        // A string of 2^32 - 1 bytes inside a field.
        let mut s = pack(&json!({"job": {}}));
        s.pop(); // the empty map
        s.extend([0xdb, 0xff, 0xff, 0xff, 0xff, b'x']);
        let err = check(&s, &WIRE).unwrap_err();
        assert!(
            matches!(&err, ProtocolError::Malformed(m) if m.starts_with("at `job`") && m.contains("4294967295 bytes")),
            "{err:?}"
        );
    }

    #[test]
    fn caps_name_the_field() {
        let many: serde_json::Map<String, serde_json::Value> =
            (0..70_000).map(|i| (format!("k{i}"), json!(0))).collect();
        let body = pack(&json!({"type": "submit", "job": {"params": many}}));
        let err = check(&body, &WIRE).unwrap_err();
        assert_eq!(
            err,
            ProtocolError::FieldTooLarge {
                field: "job.params (map entries)".into(),
                limit: 65_536,
                actual: 70_000
            }
        );

        let small = Shape {
            max_container_len: 10,
            max_values: 20,
            max_depth: 3,
        };
        let wide = pack(&json!({"a": [1, 2, 3, 4, 5, 6, 7, 8], "b": [1, 2, 3, 4, 5, 6, 7, 8]}));
        assert!(matches!(
            check(&wide, &small),
            Err(ProtocolError::FieldTooLarge { ref field, limit: 20, .. }) if field == "body (values)"
        ));
        let deep = pack(&json!({"a": {"b": {"c": {"d": 1}}}}));
        assert!(matches!(
            check(&deep, &small),
            Err(ProtocolError::FieldTooLarge { ref field, limit: 3, .. }) if field == "a.b.c (nesting depth)"
        ));
    }

    #[test]
    fn truncation_and_reserved_markers_are_malformed() {
        let body = pack(&json!({"type": "ping", "req_id": 70000}));
        for cut in 1..body.len() {
            assert!(
                matches!(check(&body[..cut], &WIRE), Err(ProtocolError::Malformed(_))),
                "cut at {cut}"
            );
        }
        assert!(matches!(
            check(&[0x81, 0xc1, 0x00], &WIRE),
            Err(ProtocolError::Malformed(_))
        ));
        assert!(matches!(
            check(&[], &WIRE),
            Err(ProtocolError::Malformed(_))
        ));
    }
}
