//! The previous release reading this version's messages: the reverse direction of
//! `golden.rs` (which checks that this version reads the previous release's).
//!
//! The previous release (`0.1.0-dc6b6c9`, before the contract of issue #12) cannot
//! be run here, so its decoding rules are applied to this version's golden files:
//! serde's derived decoders, which ignore unknown keys except in the types that
//! release declared `deny_unknown_fields` (`JobSpec`, `LoraRef`, `InputFile`,
//! `ListFilter`, `Limits`), require the keys they know and accept an integer where
//! they want a float. For each wire message of that release, this version's sample
//! must keep every key the release's sample has, with a value of a kind it reads,
//! and may add keys only where that release ignored them. A renamed or removed
//! field, a new limit in `welcome`, a new spec or filter key sent to an older peer,
//! or a number that became a string fails here. Stored records are checked by the
//! broker's `golden_records.rs`.

use std::path::{Path, PathBuf};

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

const PREVIOUS: &str = "0.1.0-dc6b6c9";

/// Where, in each message, the previous release refused unknown keys (`[]` is
/// every element of a list).
const PREVIOUS_STRICT: &[(&str, &str)] = &[
    ("request.submit", "job"),
    ("request.submit", "job.loras[]"),
    ("request.submit", "job.inputs[]"),
    ("broker.assign", "job"),
    ("broker.assign", "job.loras[]"),
    ("broker.assign", "job.inputs[]"),
    ("request.list", "filter"),
    ("reply.welcome", "limits"),
];

/// Any msgpack value, enough to compare shapes.
#[derive(Debug, Clone, PartialEq)]
enum V {
    Nil,
    Bool,
    Int,
    Float,
    Str,
    Bin,
    List(Vec<V>),
    Map(Vec<(String, V)>),
}

impl V {
    fn kind(&self) -> &'static str {
        match self {
            V::Nil => "nil",
            V::Bool => "a boolean",
            V::Int => "an integer",
            V::Float => "a float",
            V::Str => "a string",
            V::Bin => "bytes",
            V::List(_) => "a list",
            V::Map(_) => "a map",
        }
    }
}

impl<'de> Deserialize<'de> for V {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<V, D::Error> {
        struct Any;
        impl<'de> Visitor<'de> for Any {
            type Value = V;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any msgpack value")
            }
            fn visit_unit<E>(self) -> Result<V, E> {
                Ok(V::Nil)
            }
            fn visit_none<E>(self) -> Result<V, E> {
                Ok(V::Nil)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V, D::Error> {
                V::deserialize(d)
            }
            fn visit_bool<E>(self, _: bool) -> Result<V, E> {
                Ok(V::Bool)
            }
            fn visit_i64<E>(self, _: i64) -> Result<V, E> {
                Ok(V::Int)
            }
            fn visit_u64<E>(self, _: u64) -> Result<V, E> {
                Ok(V::Int)
            }
            fn visit_f64<E>(self, _: f64) -> Result<V, E> {
                Ok(V::Float)
            }
            fn visit_str<E>(self, _: &str) -> Result<V, E> {
                Ok(V::Str)
            }
            fn visit_bytes<E>(self, _: &[u8]) -> Result<V, E> {
                Ok(V::Bin)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<V, A::Error> {
                let mut items = Vec::new();
                while let Some(v) = seq.next_element()? {
                    items.push(v);
                }
                Ok(V::List(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<V, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    entries.push((k, v));
                }
                Ok(V::Map(entries))
            }
        }
        d.deserialize_any(Any)
    }
}

fn dir(release: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/golden")
        .join(release)
}

fn read(release: &str, name: &str) -> V {
    let bytes = std::fs::read(dir(release).join(format!("{name}.msgpack"))).unwrap();
    rmp_serde::from_slice(&bytes).unwrap_or_else(|e| panic!("{release}/{name}: {e}"))
}

/// What the previous release, reading `current` where it wrote `previous`, would
/// choke on.
fn problems(message: &str, path: &str, previous: &V, current: &V, out: &mut Vec<String>) {
    let at = |p: &str| {
        if p.is_empty() {
            "the message".to_string()
        } else {
            format!("`{p}`")
        }
    };
    match (previous, current) {
        // An optional value the previous sample left empty: any kind is read
        // through the field's own type, which did not change.
        (V::Nil, _) => {}
        (V::Float, V::Int) => {} // serde reads an integer as a float
        (V::Map(old), V::Map(new)) => {
            for (key, old_value) in old {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match new.iter().find(|(k, _)| k == key) {
                    Some((_, new_value)) => problems(message, &child, old_value, new_value, out),
                    None => out.push(format!(
                        "{message}: {} is gone (the previous release may require it)",
                        at(&child)
                    )),
                }
            }
            if PREVIOUS_STRICT.contains(&(message, path)) {
                for (key, _) in new.iter().filter(|(k, _)| !old.iter().any(|(o, _)| o == k)) {
                    out.push(format!(
                        "{message}: new key `{key}` in {}, which the previous release refuses",
                        at(path)
                    ));
                }
            }
        }
        (V::List(old), V::List(new)) => {
            if let (Some(o), Some(n)) = (old.first(), new.first()) {
                problems(message, &format!("{path}[]"), o, n, out);
            }
        }
        (old, new) if old.kind() == new.kind() => {}
        (old, new) => out.push(format!(
            "{message}: {} was {} and is now {}",
            at(path),
            old.kind(),
            new.kind()
        )),
    }
}

fn wire_messages(release: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir(release))
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".msgpack")?.to_string();
            (!stem.starts_with("record.")).then_some(stem)
        })
        .collect();
    names.sort();
    names
}

#[test]
fn the_previous_release_reads_every_message_of_this_version() {
    let previous = wire_messages(PREVIOUS);
    assert!(previous.len() >= 30, "{previous:?}");
    let current = wire_messages("current");
    let mut out = Vec::new();
    for name in &previous {
        if !current.contains(name) {
            out.push(format!("{name}: no longer sent"));
            continue;
        }
        problems(
            name,
            "",
            &read(PREVIOUS, name),
            &read("current", name),
            &mut out,
        );
    }
    assert!(out.is_empty(), "{out:#?}");
}

/// The check itself finds what it is meant to find.
#[test]
fn the_check_catches_removed_keys_strict_additions_and_kind_changes() {
    let old = read(PREVIOUS, "reply.welcome");
    let V::Map(mut entries) = old.clone() else {
        panic!("a map")
    };
    let mut out = Vec::new();
    // A new limit inside `limits`, which the previous release refused.
    for (k, v) in entries.iter_mut() {
        if k == "limits" {
            if let V::Map(limits) = v {
                limits.push(("max_new_thing".into(), V::Int));
            }
        }
    }
    // A key gone and a number turned into a string.
    entries.retain(|(k, _)| k != "version");
    for (k, v) in entries.iter_mut() {
        if k == "req_id" {
            *v = V::Str;
        }
    }
    problems("reply.welcome", "", &old, &V::Map(entries), &mut out);
    let text = out.join("\n");
    assert!(
        text.contains("new key `max_new_thing` in `limits`"),
        "{text}"
    );
    assert!(text.contains("`version` is gone"), "{text}");
    assert!(
        text.contains("`req_id` was an integer and is now a string"),
        "{text}"
    );
    assert_eq!(out.len(), 3, "{text}");
}
