//! The decoding rules every request follows, as serde helpers (docs/protocol.md,
//! "Decoding rules"):
//!
//! * a struct is a msgpack **map**, never a positional array ([`map_only`],
//!   [`strict`]);
//! * **`null` is the same as absent** for every optional field ([`null_default`]);
//! * the maps a client sends (`job`, `filter`) **refuse unknown keys**, so a typo
//!   (`priorty`) is an error naming it, while everything a peer *receives* ignores
//!   unknown keys, so a newer peer may add fields ([`strict`]);
//! * numbers in free-form `params` are **finite**: NaN and infinity are refused
//!   rather than turned into `null` ([`params`]).
//!
//! Stored records and replies use the plain derives (lenient), so a broker rolled
//! back one version still reads what the newer one stored.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{
    self, value::MapAccessDeserializer, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess,
    SeqAccess, Visitor,
};
use serde::Deserialize;
use serde_json::{Map, Number, Value};

/// Deserializes an optional field where `null` means "absent": the type's default.
pub fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Deserializes a struct that must arrive as a map (a positional array is refused).
pub fn map_only<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    d.deserialize_map(MapVisitor::<T> {
        fields: None,
        marker: PhantomData,
    })
}

/// Like [`map_only`], and every key must be one of `fields`: an unknown key fails
/// with serde's `unknown field` error, which the frame decoder turns into an
/// `invalid_field` naming it. `null` for the whole value means the default.
pub fn strict<'de, D, T>(d: D, fields: &'static [&'static str]) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    d.deserialize_map(MapVisitor::<T> {
        fields: Some(fields),
        marker: PhantomData,
    })
}

struct MapVisitor<T> {
    fields: Option<&'static [&'static str]>,
    marker: PhantomData<T>,
}

impl<'de, T: Deserialize<'de>> Visitor<'de> for MapVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a map with named fields")
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        match self.fields {
            None => T::deserialize(MapAccessDeserializer::new(map)),
            Some(fields) => {
                T::deserialize(MapAccessDeserializer::new(KnownKeys { inner: map, fields }))
            }
        }
    }
}

/// A map whose keys are checked against a list before the struct sees them.
struct KnownKeys<A> {
    inner: A,
    fields: &'static [&'static str],
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for KnownKeys<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let Some(key) = self.inner.next_key::<String>()? else {
            return Ok(None);
        };
        if !self.fields.contains(&key.as_str()) {
            return Err(de::Error::unknown_field(&key, self.fields));
        }
        seed.deserialize(key.into_deserializer()).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
        self.inner.next_value_seed(seed)
    }
}

/// Deserializes free-form `params`: a map of string keys to JSON-like values whose
/// numbers are all finite; `null` means an empty map.
pub fn params<'de, D: Deserializer<'de>>(d: D) -> Result<Map<String, Value>, D::Error> {
    struct ParamsVisitor;
    impl<'de> Visitor<'de> for ParamsVisitor {
        type Value = Map<String, Value>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of parameter names to values")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Map::new())
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(Map::new())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = Map::new();
            while let Some(key) = map.next_key::<String>()? {
                let Finite(v) = map.next_value()?;
                out.insert(key, v);
            }
            Ok(out)
        }
    }
    d.deserialize_any(ParamsVisitor)
}

/// A JSON-like value that refuses non-finite numbers and binary data.
struct Finite(Value);

impl<'de> Deserialize<'de> for Finite {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(FiniteVisitor).map(Finite)
    }
}

struct FiniteVisitor;

impl<'de> Visitor<'de> for FiniteVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string, a finite number, a boolean, null, an array or a map")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom(format!("must be a finite number, got {v}")))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Finite(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let Finite(v) = map.next_value()?;
            out.insert(key, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize, PartialEq, Default)]
    struct Inner {
        #[serde(default)]
        a: u8,
    }

    #[derive(Debug, Deserialize)]
    struct Outer {
        #[serde(deserialize_with = "inner")]
        inner: Inner,
    }

    fn inner<'de, D: Deserializer<'de>>(d: D) -> Result<Inner, D::Error> {
        strict(d, &["a"])
    }

    fn decode(v: serde_json::Value) -> Result<Outer, String> {
        let b = rmp_serde::to_vec_named(&v).unwrap();
        rmp_serde::from_slice(&b).map_err(|e| e.to_string())
    }

    #[test]
    fn arrays_and_unknown_keys_are_refused() {
        assert_eq!(
            decode(serde_json::json!({"inner": {"a": 3}}))
                .unwrap()
                .inner,
            Inner { a: 3 }
        );
        let e = decode(serde_json::json!({"inner": [3]})).unwrap_err();
        assert!(e.contains("expected a map"), "{e}");
        let e = decode(serde_json::json!({"inner": {"b": 3}})).unwrap_err();
        assert!(e.contains("unknown field `b`"), "{e}");
    }

    #[test]
    fn params_refuse_non_finite_numbers() {
        #[derive(Deserialize)]
        struct P {
            #[serde(deserialize_with = "params")]
            p: Map<String, Value>,
        }
        let ok =
            rmp_serde::to_vec_named(&serde_json::json!({"p": {"x": 1.5, "y": [1, "a"]}})).unwrap();
        assert_eq!(rmp_serde::from_slice::<P>(&ok).unwrap().p.len(), 2);
        let nan = rmp_serde::to_vec_named(&std::collections::BTreeMap::from([(
            "p",
            std::collections::BTreeMap::from([("steps", f64::INFINITY)]),
        )]))
        .unwrap();
        let e = rmp_serde::from_slice::<P>(&nan).err().unwrap().to_string();
        assert!(e.contains("finite"), "{e}");
        let null = rmp_serde::to_vec_named(&serde_json::json!({"p": null})).unwrap();
        assert!(rmp_serde::from_slice::<P>(&null).unwrap().p.is_empty());
    }
}
