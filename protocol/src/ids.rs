//! Identifiers that travel on the wire as strings but are compact in memory.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a valid identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("job id {0:?} is not of the form j<number>, e.g. j42")]
    Job(String),
    #[error("artifact id {0:?} is not of the form j<number>.<index>, e.g. j42.0")]
    Artifact(String),
}

/// A job's identity. The broker hands them out from a persisted counter, so they are
/// unique for the life of a state directory. On the wire: `"j42"`.
///
/// A `u64` rather than a string so that a million queued jobs stay small in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct JobId(pub u64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "j{}", self.0)
    }
}

impl FromStr for JobId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        s.strip_prefix('j')
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse().ok())
            .map(JobId)
            .ok_or_else(|| IdError::Job(s.chars().take(64).collect()))
    }
}

impl Serialize for JobId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for JobId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One output file of one job: `"j42.0"` is the first output of job `j42`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ArtifactId {
    pub job: JobId,
    pub index: u16,
}

impl fmt::Display for ArtifactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.job, self.index)
    }
}

impl FromStr for ArtifactId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        let bad = || IdError::Artifact(s.chars().take(64).collect());
        let (job, index) = s.split_once('.').ok_or_else(bad)?;
        Ok(ArtifactId {
            job: job.parse().map_err(|_| bad())?,
            index: index.parse().map_err(|_| bad())?,
        })
    }
}

impl Serialize for ArtifactId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ArtifactId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// True when `s` is usable as a worker id, label or client name: 1 to `max` characters
/// from `[A-Za-z0-9._-]`, so it is safe in topics, file names and log lines.
pub fn is_simple_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The naming rule for worker ids, labels, client names and template names, as a
/// checked error naming `field`: a name longer than `max` bytes (the limit in
/// force, `Limits::max_label_len` or `max_name_len`) is `field_too_large` with that
/// limit, like every other size over its limit; an empty one or one with another
/// character is `invalid_field`, with the rule in words built from `max`, so it
/// stays true when an operator changes it.
pub fn check_simple_name(field: &str, s: &str, max: u64) -> Result<(), crate::ProtocolError> {
    crate::limits::check_len(field, s, max)?;
    if is_simple_name(s, max as usize) {
        Ok(())
    } else {
        Err(crate::ProtocolError::invalid(field, simple_name_rule(max)))
    }
}

/// The rule [`is_simple_name`] checks, in words.
pub fn simple_name_rule(max: u64) -> String {
    format!("must be 1 to {max} characters of [A-Za-z0-9._-]")
}

/// A list of simple names (labels): at most `max_count`, each within `max_len`.
/// Errors name the list (`labels`) or the entry (`labels[2]`).
pub fn check_labels(
    field: &str,
    labels: &[String],
    max_count: u64,
    max_len: u64,
) -> Result<(), crate::ProtocolError> {
    crate::limits::check(field, labels.len() as u64, max_count)?;
    for (i, label) in labels.iter().enumerate() {
        check_simple_name(&format!("{field}[{i}]"), label, max_len)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_round_trip_and_reject_garbage() {
        assert_eq!("j42".parse::<JobId>().unwrap(), JobId(42));
        assert_eq!(JobId(7).to_string(), "j7");
        for bad in ["", "j", "42", "jx", "j-1", "j1.5"] {
            assert!(bad.parse::<JobId>().is_err(), "{bad}");
        }
        let a: ArtifactId = "j9.3".parse().unwrap();
        assert_eq!((a.job, a.index), (JobId(9), 3));
        assert_eq!(a.to_string(), "j9.3");
        assert!("j9".parse::<ArtifactId>().is_err());
        assert!("j9.x".parse::<ArtifactId>().is_err());
    }

    #[test]
    fn simple_names() {
        assert!(is_simple_name("box1-gpu0", 64));
        assert!(!is_simple_name("../etc", 64));
        assert!(!is_simple_name("", 64));
        assert!(!is_simple_name("a b", 64));
    }
}
