//! The encodings of a job's durable *state* record (the spec record is separate and
//! stays a named msgpack map, written once at submit).
//!
//! A state record is rewritten on every transition, so its encoding is on the
//! scheduler's hot path. Two versions exist, told apart by the first byte:
//!
//! - **version 1, named** (every release before the positional one): the
//!   `rmp_serde::to_vec_named` map of [`Job`], field names included. Still read, so
//!   a store written by an earlier release loads.
//! - **version 2, positional** (written now): one msgpack array whose first element
//!   is the version number, then the fields in the fixed order of [`FIELDS`], with
//!   nested values as arrays too (a transition is `[at_ms, state, attempt, worker,
//!   note]`). It is written by hand, not by serde: the protocol types skip empty
//!   fields when serialized (`skip_serializing_if`), which a positional serde
//!   encoding would turn into misplaced fields.
//!
//! Evolving version 2: a new field is appended at the end, and a reader takes a
//! missing trailing field as its default and skips trailing fields it does not know,
//! so a record of the release after this one still loads here (a rollback). Any
//! other change (removing, reordering or retyping a field) needs version 3.
//! `broker/tests/golden_records.rs` holds the stored bytes of both versions.

use std::borrow::Cow;
use std::sync::Arc;

use kiln_protocol::{ArtifactId, ArtifactMeta, JobError, JobId, JobSpec, JobState, Transition};
use serde::de::{DeserializeOwned, IntoDeserializer};
use serde::Deserialize as _;
use serde_json::{Map, Value};

use super::job::Job;

/// The version of the positional encoding written now.
pub const POSITIONAL: u64 = 2;

/// The fields of a version-2 record after the version number, in order.
pub const FIELDS: [&str; 24] = [
    "id",
    "client",
    "state",
    "attempt",
    "max_attempts",
    "worker",
    "gpu",
    "seq",
    "error",
    "artifacts",
    "info",
    "cancel_requested",
    "created_ms",
    "started_ms",
    "finished_ms",
    "enqueue_seq",
    "min_vram_mb",
    "history",
    "queue_deadline_ms",
    "run_deadline_ms",
    "degrade",
    "refusals",
    "tries",
    "attempt_reserve",
];

/// Why stored job records do not load.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("the state record is empty")]
    Empty,
    #[error("the named (version 1) state record does not decode: {0}")]
    Named(rmp_serde::decode::Error),
    #[error("the spec record does not decode: {0}")]
    Spec(rmp_serde::decode::Error),
    #[error("the state record is neither a msgpack map (version 1) nor an array (version 2 and later); first byte {0:#04x}")]
    Shape(u8),
    #[error("state record version {0} is not one this broker reads (1 and {v}); it was written by a later release", v = POSITIONAL)]
    Version(u64),
    #[error("the version {v} state record has {0} fields; at least {n} expected", v = POSITIONAL, n = FIELDS.len() + 1)]
    Short(u32),
    #[error("field `{field}` of the state record: {reason}")]
    Field { field: &'static str, reason: String },
}

/// The state record of `job` in the positional encoding.
pub fn encode(job: &Job) -> Vec<u8> {
    let mut e = Enc(Vec::with_capacity(96 + 48 * job.history.len()));
    e.array(1 + FIELDS.len());
    e.uint(POSITIONAL);
    e.uint(job.id.0);
    e.str(&job.client);
    e.str(job.state.as_str());
    e.uint(job.attempt.into());
    e.uint(job.max_attempts.into());
    e.opt_str(job.worker.as_deref());
    e.opt_str(job.gpu.as_deref());
    e.uint(job.seq);
    match &job.error {
        None => e.nil(),
        Some(err) => {
            e.array(3);
            e.serde(&err.kind);
            e.str(&err.message);
            e.bool(err.retryable);
        }
    }
    e.array(job.artifacts.len());
    for a in &job.artifacts {
        e.array(6);
        e.uint(a.id.job.0);
        e.uint(a.id.index.into());
        e.str(&a.name);
        e.str(&a.media_type);
        e.uint(a.size);
        e.str(&a.sha256);
    }
    if job.info.is_empty() {
        e.map0();
    } else {
        e.serde(&job.info);
    }
    e.bool(job.cancel_requested);
    e.uint(job.created_ms);
    e.opt_uint(job.started_ms);
    e.opt_uint(job.finished_ms);
    e.uint(job.enqueue_seq);
    e.uint(job.min_vram_mb);
    e.array(job.history.len());
    for t in &job.history {
        e.array(5);
        e.uint(t.at_ms);
        e.str(t.state.as_str());
        e.uint(t.attempt.into());
        e.opt_str(t.worker.as_deref());
        e.str(&t.note);
    }
    e.opt_uint(job.queue_deadline_ms);
    e.opt_uint(job.run_deadline_ms);
    e.uint(job.degrade.into());
    e.uint(job.refusals.into());
    e.uint(job.tries.into());
    e.uint(job.attempt_reserve.into());
    e.0
}

/// Rebuilds a job from its state record (either version) and its spec record.
pub fn decode(state: &[u8], spec: &[u8]) -> Result<Job, RecordError> {
    let spec = Arc::new(rmp_serde::from_slice::<JobSpec>(spec).map_err(RecordError::Spec)?);
    match state.first() {
        None => Err(RecordError::Empty),
        // fixmap, map16, map32
        Some(0x80..=0x8f | 0xde | 0xdf) => {
            let mut job = rmp_serde::from_slice::<Job>(state).map_err(RecordError::Named)?;
            job.spec = spec;
            Ok(job)
        }
        // fixarray, array16, array32
        Some(0x90..=0x9f | 0xdc | 0xdd) => positional(state, spec),
        Some(&b) => Err(RecordError::Shape(b)),
    }
}

fn positional(state: &[u8], spec: Arc<JobSpec>) -> Result<Job, RecordError> {
    let mut d = Dec { rd: state, at: 0 };
    let len = d.array()?;
    let version = d.uint()?;
    if version != POSITIONAL {
        return Err(RecordError::Version(version));
    }
    if (len as usize) < 1 + FIELDS.len() {
        return Err(RecordError::Short(len));
    }
    d.at = 1;
    let mut job = Job::new(JobId(d.uint()?), spec, d.next().string()?.into());
    job.state = d.next().state()?;
    job.attempt = d.next().small()?;
    job.max_attempts = d.next().small()?;
    job.worker = d.next().opt_string()?.map(Arc::from);
    job.gpu = d.next().opt_string()?.map(Arc::from);
    job.seq = d.next().uint()?;
    job.error = if d.next().nil()? {
        None
    } else {
        let extra = d.at_least(3)?;
        let err = JobError {
            kind: d.serde()?,
            message: d.string()?,
            retryable: d.bool()?,
        };
        d.skip(extra)?;
        Some(err)
    };
    let n = d.next().array()?;
    job.artifacts = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let extra = d.at_least(6)?;
        job.artifacts.push(ArtifactMeta {
            id: ArtifactId {
                job: JobId(d.uint()?),
                index: d.small()?,
            },
            name: d.string()?,
            media_type: d.string()?,
            size: d.uint()?,
            sha256: d.string()?,
        });
        d.skip(extra)?;
    }
    job.info = d.next().serde::<Map<String, Value>>()?;
    job.cancel_requested = d.next().bool()?;
    job.created_ms = d.next().uint()?;
    job.started_ms = d.next().opt_uint()?;
    job.finished_ms = d.next().opt_uint()?;
    job.enqueue_seq = d.next().uint()?;
    job.min_vram_mb = d.next().uint()?;
    let n = d.next().array()?;
    job.history = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let extra = d.at_least(5)?;
        job.history.push(Transition {
            at_ms: d.uint()?,
            state: d.state()?,
            attempt: d.small()?,
            worker: d.opt_string()?.map(Arc::from),
            note: Cow::Owned(d.string()?),
        });
        d.skip(extra)?;
    }
    job.queue_deadline_ms = d.next().opt_uint()?;
    job.run_deadline_ms = d.next().opt_uint()?;
    job.degrade = d.next().small()?;
    job.refusals = d.next().small()?;
    job.tries = d.next().small()?;
    job.attempt_reserve = d.next().small()?;
    // Fields appended by a later release: not known here, skipped.
    d.next().skip(len as usize - 1 - FIELDS.len())?;
    Ok(job)
}

/// Appends msgpack values to a buffer. Writing to a `Vec` cannot fail.
struct Enc(Vec<u8>);

impl Enc {
    fn array(&mut self, n: usize) {
        let _ = rmp::encode::write_array_len(&mut self.0, n as u32);
    }
    fn uint(&mut self, v: u64) {
        let _ = rmp::encode::write_uint(&mut self.0, v);
    }
    fn str(&mut self, s: &str) {
        let _ = rmp::encode::write_str(&mut self.0, s);
    }
    fn nil(&mut self) {
        let _ = rmp::encode::write_nil(&mut self.0);
    }
    fn bool(&mut self, b: bool) {
        let _ = rmp::encode::write_bool(&mut self.0, b);
    }
    fn map0(&mut self) {
        let _ = rmp::encode::write_map_len(&mut self.0, 0);
    }
    fn opt_str(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.str(s),
            None => self.nil(),
        }
    }
    fn opt_uint(&mut self, v: Option<u64>) {
        match v {
            Some(v) => self.uint(v),
            None => self.nil(),
        }
    }
    /// A value with its own serde form (an enum by name, a JSON map).
    fn serde<T: serde::Serialize>(&mut self, v: &T) {
        rmp_serde::encode::write_named(&mut self.0, v).expect("record values encode");
    }
}

/// Reads the values of one positional record in order; errors name the field.
struct Dec<'a> {
    rd: &'a [u8],
    /// The index in [`FIELDS`] + 1 of the field being read (0: the version).
    at: usize,
}

impl<'a> Dec<'a> {
    /// Moves on to the next top-level field.
    fn next(&mut self) -> &mut Self {
        self.at += 1;
        self
    }

    fn err(&self, reason: impl std::fmt::Display) -> RecordError {
        RecordError::Field {
            field: if self.at == 0 {
                "version"
            } else {
                FIELDS.get(self.at - 1).copied().unwrap_or("(later)")
            },
            reason: reason.to_string(),
        }
    }

    fn array(&mut self) -> Result<u32, RecordError> {
        rmp::decode::read_array_len(&mut self.rd).map_err(|e| self.err(e))
    }

    /// Reads the length of a nested array of at least `n` values and returns how
    /// many more it has (appended by a later release, to [`Dec::skip`]).
    fn at_least(&mut self, n: u32) -> Result<usize, RecordError> {
        match self.array()? {
            got if got >= n => Ok((got - n) as usize),
            got => Err(self.err(format!("an array of {n} values expected, {got} found"))),
        }
    }

    /// Skips `n` values of any type.
    fn skip(&mut self, n: usize) -> Result<(), RecordError> {
        for _ in 0..n {
            self.serde::<serde::de::IgnoredAny>()?;
        }
        Ok(())
    }

    fn uint(&mut self) -> Result<u64, RecordError> {
        rmp::decode::read_int(&mut self.rd).map_err(|e| self.err(e))
    }

    fn small<T: TryFrom<u64>>(&mut self) -> Result<T, RecordError> {
        let v = self.uint()?;
        T::try_from(v).map_err(|_| self.err(format!("{v} is out of range")))
    }

    fn bool(&mut self) -> Result<bool, RecordError> {
        rmp::decode::read_bool(&mut self.rd).map_err(|e| self.err(e))
    }

    /// Consumes a nil and says so, or leaves a non-nil value in place.
    fn nil(&mut self) -> Result<bool, RecordError> {
        match self.rd.first() {
            Some(0xc0) => {
                self.rd = &self.rd[1..];
                Ok(true)
            }
            Some(_) => Ok(false),
            None => Err(self.err("the record ends early")),
        }
    }

    fn str(&mut self) -> Result<&'a str, RecordError> {
        let len = rmp::decode::read_str_len(&mut self.rd).map_err(|e| self.err(e))? as usize;
        if self.rd.len() < len {
            return Err(self.err("the record ends inside a string"));
        }
        let (s, rest) = self.rd.split_at(len);
        self.rd = rest;
        std::str::from_utf8(s).map_err(|e| self.err(e))
    }

    fn string(&mut self) -> Result<String, RecordError> {
        self.str().map(str::to_string)
    }

    fn opt_string(&mut self) -> Result<Option<String>, RecordError> {
        if self.nil()? {
            return Ok(None);
        }
        self.string().map(Some)
    }

    fn opt_uint(&mut self) -> Result<Option<u64>, RecordError> {
        if self.nil()? {
            return Ok(None);
        }
        self.uint().map(Some)
    }

    fn state(&mut self) -> Result<JobState, RecordError> {
        let s = self.str()?;
        JobState::deserialize(s.into_deserializer())
            .map_err(|e: serde::de::value::Error| self.err(e))
    }

    fn serde<T: DeserializeOwned>(&mut self) -> Result<T, RecordError> {
        rmp_serde::from_read(&mut self.rd).map_err(|e| self.err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::{Backend, FailureKind, Task};

    /// A job with every stored field set away from its default.
    fn full() -> Job {
        let mut j = Job::new(
            JobId(42),
            Arc::new(JobSpec::new(Backend::Sim, Task::TextToImage)),
            "studio-a".into(),
        );
        j.spec = Arc::new(JobSpec::new(Backend::Sim, Task::TextToImage).param("prompt", "p"));
        j.state = JobState::Failed;
        j.attempt = 7;
        j.max_attempts = 3;
        j.worker = Some("box1-gpu0".into());
        j.gpu = Some("GPU-1234".into());
        j.seq = 19;
        j.error = Some(JobError::new(FailureKind::OutOfMemory, "out of VRAM", true));
        j.artifacts = vec![ArtifactMeta {
            id: "j42.1".parse().unwrap(),
            name: "out.png".into(),
            media_type: "image/png".into(),
            size: 1234,
            sha256: "ab".repeat(32),
        }];
        j.info.insert("seed".into(), 7.into());
        j.info.insert(
            "nested".into(),
            serde_json::json!({"a": [1, "b", null, 2.5]}),
        );
        j.cancel_requested = true;
        j.created_ms = 1_700_000_000_000;
        j.started_ms = Some(1_700_000_000_100);
        j.finished_ms = Some(1_700_000_000_200);
        j.enqueue_seq = 99;
        j.min_vram_mb = 24_000;
        j.history = vec![
            Transition {
                at_ms: 1,
                state: JobState::Queued,
                attempt: 0,
                worker: None,
                note: Cow::Borrowed(""),
            },
            Transition {
                at_ms: 2,
                state: JobState::Running,
                attempt: 7,
                worker: Some("box1-gpu0".into()),
                note: Cow::Borrowed("requeued: worker lost"),
            },
        ];
        j.queue_deadline_ms = Some(5);
        j.run_deadline_ms = Some(6);
        j.degrade = 2;
        j.refusals = 4;
        j.tries = 5;
        j.attempt_reserve = 17;
        j
    }

    fn spec(j: &Job) -> Vec<u8> {
        j.spec_record()
    }

    /// The named encoding of every stored field: two jobs with equal named
    /// records are equal as far as the store is concerned.
    fn named(j: &Job) -> Vec<u8> {
        j.named_state_record()
    }

    #[test]
    fn every_field_survives_the_positional_encoding() {
        let j = full();
        let bytes = encode(&j);
        assert_eq!(
            bytes[..4],
            [0xdc, 0, 25, 2],
            "an array16 of 25, version 2 first"
        );
        let back = decode(&bytes, &spec(&j)).unwrap();
        assert_eq!(named(&back), named(&j));
        assert_eq!(back.spec.prompt(), Some("p"));
        // And a job with every optional field empty.
        let empty = Job::new(JobId(1), j.spec.clone(), "c".into());
        let back = decode(&encode(&empty), &spec(&j)).unwrap();
        assert_eq!(named(&back), named(&empty));
    }

    #[test]
    fn named_records_still_decode_to_the_same_job() {
        let j = full();
        let back = decode(&named(&j), &spec(&j)).unwrap();
        assert_eq!(encode(&back), encode(&j));
    }

    #[test]
    fn the_positional_record_is_smaller_than_the_named_one() {
        let j = full();
        assert!(
            encode(&j).len() * 2 < named(&j).len(),
            "{} vs {}",
            encode(&j).len(),
            named(&j).len()
        );
    }

    #[test]
    fn fields_a_later_release_appends_are_skipped() {
        let j = full();
        let mut bytes = encode(&j);
        // An array16 of 27: the same fields plus a string and a map.
        bytes[2] = 27;
        rmp::encode::write_str(&mut bytes, "a field from the future").unwrap();
        rmp_serde::encode::write_named(&mut bytes, &serde_json::json!({"x": [1, 2]})).unwrap();
        let back = decode(&bytes, &spec(&j)).unwrap();
        assert_eq!(named(&back), named(&j));
    }

    #[test]
    fn bad_records_are_refused_naming_what_is_wrong() {
        let j = full();
        let s = spec(&j);
        let err = |b: &[u8]| decode(b, &s).expect_err("refused").to_string();
        assert!(err(&[]).contains("empty"));
        assert!(err(&[0xa3, b'a', b'b', b'c']).contains("first byte 0xa3"));
        assert!(
            err(&[0x92, 3, 1]).contains("version 3"),
            "{}",
            err(&[0x92, 3, 1])
        );
        assert!(err(&[0x92, 2, 1]).contains("2 fields"));
        // The state field holds a number.
        let mut bytes = encode(&j);
        let at = 3 + 1 + 1 + (1 + "studio-a".len());
        assert_eq!(bytes[at], 0xa6, "fixstr `failed`");
        bytes[at] = 0x07;
        let e = err(&bytes);
        assert!(e.contains("field `state`"), "{e}");
        // Cut short.
        let bytes = encode(&j);
        let e = err(&bytes[..bytes.len() - 3]);
        assert!(e.contains("field `"), "{e}");
        assert!(decode(&encode(&j), b"junk")
            .err()
            .unwrap()
            .to_string()
            .contains("spec"));
    }
}
