//! Property tests of the broker's answer to a submit, against the rules of
//! docs/protocol.md (`submit`): random jobs, valid or carrying faults of several
//! kinds at once, are encoded as msgpack frames and go through the broker's own
//! decoding ([`crate::net::client_input`]) into the core, with workers that
//! describe their parameters with the real sim backend's description. The
//! answer must be `accepted` for a valid job, and otherwise the error of the
//! first failing check in the documented order — decoding → field limits and
//! ranges → idempotency → `unschedulable` → parameters — naming its field; a
//! refused job is never queued. A second property checks idempotency keys
//! against a model of the rule (scoped per client, conflicts on a different
//! job), across a broker restart.

use std::collections::HashMap;

use bytes::Bytes;
use kiln_protocol::frame::PROTOCOL_TAG;
use kiln_protocol::request::*;
use kiln_protocol::worker::BackendInventory;
use kiln_protocol::*;
use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::tests::{acceptance, inventory, peer, Sim};
use super::tests_contract::{durable, hello, restart};
use super::*;

/// The client every case submits as.
const CLIENT: &str = "client";
/// The key the client used before each case, for another job.
const TAKEN_KEY: &str = "taken";

/// A broker with two sim workers that describe their parameters as the real sim
/// backend does: `small` (8000 MiB, label `fast`, `sim-sd15`) and `big` (24000
/// MiB, `sim-sd15` and `sim-sdxl`), and one job of [`CLIENT`] keyed [`TAKEN_KEY`].
fn fleet(cfg: CoreConfig) -> Sim {
    let schema = kiln_worker::backends::sim::SimBackend::new(Default::default()).schema();
    let described = |models: &[&str]| BackendInventory {
        params: Some(schema.clone()),
        ..inventory(Backend::Sim, models)
    };
    let mut sim = Sim::with(cfg);
    sim.register_full(
        "small",
        8_000,
        vec![described(&["sim-sd15"])],
        &["fast"],
        None,
    );
    sim.register_full(
        "big",
        24_000,
        vec![described(&["sim-sd15", "sim-sdxl"])],
        &[],
        None,
    );
    let mut first = JobSpec::new(Backend::Sim, Task::TextToImage).param("prompt", "SETUP");
    first.idempotency_key = Some(TAKEN_KEY.into());
    sim.submit_as(CLIENT, first).expect("the first keyed job");
    sim
}

/// A submit's `job` map that the fleet can run and whose fields are all valid.
fn valid_job() -> impl Strategy<Value = Map<String, Value>> {
    (
        "[a-z ]{1,40}",
        (
            proptest::option::of(8i64..=2048),
            proptest::option::of(0i64..=10_000),
            proptest::option::of(0u64..=9_007_199_254_740_991),
        ),
        (
            proptest::option::of(-10i64..=10),
            any::<bool>(),
            proptest::option::of(1u64..=8_000),
            any::<bool>(),
        ),
        (
            proptest::option::of(1u64..=10),
            proptest::option::of(1u64..=3_600),
            proptest::option::of("k[0-9]{1,8}"),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(prompt, (width, steps, seed), (priority, fast, vram, model), rest)| {
                let (attempts, queue_timeout, key, degrade) = rest;
                let mut params = Map::new();
                params.insert("prompt".into(), prompt.into());
                let mut put = |k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        params.insert(k.into(), v);
                    }
                };
                put("width", width.map(Value::from));
                put("steps", steps.map(Value::from));
                put("seed", seed.map(Value::from));
                let mut job = Map::new();
                job.insert("backend".into(), "sim".into());
                job.insert("task".into(), "text_to_image".into());
                job.insert("params".into(), Value::Object(params));
                let mut put = |k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        job.insert(k.into(), v);
                    }
                };
                put("priority", priority.map(Value::from));
                put("labels", fast.then(|| json!(["fast"])));
                put("min_vram_mb", vram.map(Value::from));
                put("model", model.then(|| json!("sim-sd15")));
                put("max_attempts", attempts.map(Value::from));
                put("queue_timeout_s", queue_timeout.map(Value::from));
                put("idempotency_key", key.map(Value::from));
                put("allow_degrade", degrade.then_some(Value::Bool(true)));
                job
            },
        )
}

/// Something wrong with a job, and the answer docs/protocol.md gives for it.
#[derive(Debug, Clone)]
enum Fault {
    // Decoding.
    UnknownKey,
    MissingBackend,
    // Field limits and ranges.
    PriorityOutOfRange(i64),
    TooManyLabels,
    LongPrompt,
    // Idempotency.
    KeyUsedForAnotherJob,
    // Scheduling.
    MoreVramThanAnyGpu(u64),
    LabelNoWorkerHas,
    ModelNoWorkerHas,
    LoraNoWorkerHas,
    TemplateNoWorkerHas,
    // Parameters.
    WidthOutOfRange(i64),
    UnknownParameter,
    StepsNotAnInteger,
}

impl Fault {
    /// Applies the fault to `job`.
    fn apply(&self, job: &mut Map<String, Value>) {
        // The params are taken out, edited and put back.
        let mut p = match job.remove("params") {
            Some(Value::Object(p)) => p,
            _ => Map::new(),
        };
        match self {
            Fault::UnknownKey => {
                job.insert("priorty".into(), 1.into());
            }
            Fault::MissingBackend => {
                job.remove("backend");
            }
            Fault::PriorityOutOfRange(p) => {
                job.insert("priority".into(), (*p).into());
            }
            Fault::TooManyLabels => add_labels(job, (0..17).map(|i| format!("l{i}"))),
            Fault::LongPrompt => {
                p.insert("prompt".into(), "x".repeat(16_385).into());
            }
            Fault::KeyUsedForAnotherJob => {
                job.insert("idempotency_key".into(), TAKEN_KEY.into());
            }
            Fault::MoreVramThanAnyGpu(mb) => {
                job.insert("min_vram_mb".into(), (*mb).into());
            }
            Fault::LabelNoWorkerHas => add_labels(job, ["nowhere".to_string()]),
            Fault::ModelNoWorkerHas => {
                job.insert("model".into(), "no-such-model".into());
            }
            Fault::LoraNoWorkerHas => {
                job.insert("loras".into(), json!([{"name": "no-such-lora"}]));
            }
            Fault::TemplateNoWorkerHas => {
                job.insert("template".into(), "no-such-template".into());
            }
            Fault::WidthOutOfRange(w) => {
                p.insert("width".into(), (*w).into());
            }
            Fault::UnknownParameter => {
                p.insert("stepz".into(), 10.into());
            }
            Fault::StepsNotAnInteger => {
                p.insert("steps".into(), "abc".into());
            }
        }
        job.insert("params".into(), Value::Object(p));
    }

    /// The documented answer: the error code and, where the rule names one, the
    /// field.
    fn answer(&self) -> (ErrorCode, Option<&'static str>) {
        use ErrorCode::*;
        match self {
            Fault::UnknownKey => (InvalidField, Some("job.priorty")),
            Fault::MissingBackend => (InvalidField, Some("job.backend")),
            Fault::PriorityOutOfRange(_) => (InvalidField, Some("job.priority")),
            Fault::TooManyLabels => (FieldTooLarge, Some("job.labels")),
            Fault::LongPrompt => (FieldTooLarge, Some("job.params.prompt")),
            Fault::KeyUsedForAnotherJob => (IdempotencyConflict, Some("job.idempotency_key")),
            Fault::MoreVramThanAnyGpu(_) | Fault::LabelNoWorkerHas | Fault::ModelNoWorkerHas => {
                (Unschedulable, None)
            }
            Fault::LoraNoWorkerHas => (Unschedulable, Some("job.loras[0]")),
            Fault::TemplateNoWorkerHas => (Unschedulable, Some("job.template")),
            Fault::WidthOutOfRange(_) => (InvalidField, Some("job.params.width")),
            Fault::UnknownParameter => (InvalidField, Some("job.params.stepz")),
            Fault::StepsNotAnInteger => (InvalidField, Some("job.params.steps")),
        }
    }
}

/// Adds `labels` to the job's own (two faults may both add some).
fn add_labels(job: &mut Map<String, Value>, labels: impl IntoIterator<Item = String>) {
    let entry = job.entry("labels").or_insert_with(|| json!([]));
    if let Value::Array(list) = entry {
        list.extend(labels.into_iter().map(Value::from));
    }
}

/// At most one fault of each stage, in the documented order of the checks.
fn faults() -> impl Strategy<Value = Vec<Fault>> {
    let decoding = prop_oneof![Just(Fault::UnknownKey), Just(Fault::MissingBackend)];
    let limits = prop_oneof![
        prop_oneof![11i64..=127, -128i64..=-11].prop_map(Fault::PriorityOutOfRange),
        Just(Fault::TooManyLabels),
        Just(Fault::LongPrompt),
    ];
    let idempotency = Just(Fault::KeyUsedForAnotherJob);
    let scheduling = prop_oneof![
        (24_001u64..=1_000_000).prop_map(Fault::MoreVramThanAnyGpu),
        Just(Fault::LabelNoWorkerHas),
        Just(Fault::ModelNoWorkerHas),
        Just(Fault::LoraNoWorkerHas),
        Just(Fault::TemplateNoWorkerHas),
    ];
    let parameters = prop_oneof![
        prop_oneof![2049i64..=1_000_000, -1_000i64..=7].prop_map(Fault::WidthOutOfRange),
        Just(Fault::UnknownParameter),
        Just(Fault::StepsNotAnInteger),
    ];
    (
        proptest::option::weighted(0.2, decoding),
        proptest::option::weighted(0.2, limits),
        proptest::option::weighted(0.2, idempotency),
        proptest::option::weighted(0.2, scheduling),
        proptest::option::weighted(0.2, parameters),
    )
        .prop_map(|(a, b, c, d, e)| [a, b, c, d, e].into_iter().flatten().collect())
}

/// Sends `job` as a submit's bytes through the broker's decoding and core.
fn submit_bytes(sim: &mut Sim, job: &Map<String, Value>) -> Option<Result<Accepted, ErrorBody>> {
    let body = json!({"type": "submit", "req_id": 7, "job": job});
    let frames = [
        Bytes::from_static(PROTOCOL_TAG),
        Bytes::from(rmp_serde::to_vec_named(&body).expect("encodes")),
    ];
    let input = crate::net::client_input(peer(CLIENT), &frames, 48 << 20);
    acceptance(&sim.input(input))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn a_submit_is_answered_by_its_first_failing_check(
        mut job in valid_job(),
        faults in faults(),
    ) {
        let mut sim = fleet(CoreConfig::default());
        for f in &faults {
            f.apply(&mut job);
        }
        let before = sim.core.jobs_len();
        let answer = submit_bytes(&mut sim, &job).expect("a reply");
        match (faults.first(), answer) {
            (None, Ok(a)) => {
                prop_assert!(!a.duplicate);
                prop_assert_eq!(sim.core.jobs_len(), before + 1);
            }
            (None, Err(e)) => prop_assert!(false, "a valid job was refused: {:?}\n{:?}", e, job),
            (Some(f), Ok(_)) => prop_assert!(false, "{:?} was accepted: {:?}", f, job),
            (Some(f), Err(e)) => {
                let (code, field) = f.answer();
                prop_assert_eq!(e.code, code, "{:?} (of {:?}): {:?}", f, faults, e);
                if field.is_some() {
                    prop_assert_eq!(e.field.as_deref(), field, "{:?}: {:?}", f, e);
                }
                prop_assert!(!e.message.is_empty());
                prop_assert_eq!(sim.core.jobs_len(), before, "a refused job was kept");
            }
        }
    }
}

/// One submit of the idempotency property: which client, which key, which job.
#[derive(Debug, Clone)]
enum Step {
    Submit {
        client: usize,
        key: Option<usize>,
        prompt: usize,
    },
    Restart,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    let submit = (0usize..2, proptest::option::of(0usize..3), 0usize..2).prop_map(
        |(client, key, prompt)| Step::Submit {
            client,
            key,
            prompt,
        },
    );
    proptest::collection::vec(prop_oneof![8 => submit, 1 => Just(Step::Restart)], 1..24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    #[test]
    fn idempotency_keys_follow_the_documented_rule(steps in steps()) {
        const CLIENTS: [&str; 2] = ["alice", "bob"];
        let cfg = || CoreConfig {
            limits: Limits {
                max_queued_per_client: 1_000,
                ..Limits::default()
            },
            ..durable()
        };
        let mut sim = Sim::with(cfg());
        sim.register("w1", 8_000);
        // (client, key) -> (the job it made, the prompt of that job).
        let mut model: HashMap<(usize, usize), (JobId, usize)> = HashMap::new();
        let mut boot = 0;
        let mut connected = [false; 2];
        for step in &steps {
            let (client, key, prompt) = match *step {
                Step::Restart => {
                    boot += 1;
                    sim = restart(&sim, cfg(), boot);
                    connected = [false; 2];
                    continue;
                }
                Step::Submit { client, key, prompt } => (client, key, prompt),
            };
            let conn = format!("{}-{boot}", CLIENTS[client]);
            if !connected[client] {
                hello(&mut sim, &conn, CLIENTS[client]);
                connected[client] = true;
            }
            let mut spec = JobSpec::new(Backend::Sim, Task::TextToImage)
                .param("prompt", format!("prompt {prompt}"));
            spec.idempotency_key = key.map(|k| format!("key-{k}"));
            let before = sim.core.jobs_len();
            let answer = sim.submit_as(&conn, spec);
            match key.and_then(|k| model.get(&(client, k)).copied()) {
                None => {
                    let (id, _) = answer.map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
                    prop_assert_eq!(sim.core.jobs_len(), before + 1);
                    if let Some(k) = key {
                        model.insert((client, k), (id, prompt));
                    }
                }
                Some((first, first_prompt)) if first_prompt == prompt => {
                    let (id, out) = answer.map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
                    prop_assert_eq!(id, first, "a retry returns the first job");
                    prop_assert!(matches!(acceptance(&out), Some(Ok(a)) if a.duplicate));
                    prop_assert_eq!(sim.core.jobs_len(), before);
                }
                Some(_) => {
                    let e = answer.expect_err("another job with a used key");
                    prop_assert_eq!(e.code, ErrorCode::IdempotencyConflict);
                    prop_assert_eq!(e.field.as_deref(), Some("job.idempotency_key"));
                    prop_assert_eq!(sim.core.jobs_len(), before);
                }
            }
        }
    }
}
