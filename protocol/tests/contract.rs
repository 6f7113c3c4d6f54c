//! The decoding rules of docs/protocol.md ("Decoding rules"), each case of issue #12
//! checked against the real decoder and validator, plus property tests that encode
//! random valid and invalid submits and check the answer follows the documented
//! rule.

use kiln_protocol::frame::{decode, decode_body, PROTOCOL_TAG};
use kiln_protocol::request::Request;
use kiln_protocol::*;
use proptest::prelude::*;
use serde_json::{json, Value};

fn body(v: &Value) -> Vec<u8> {
    rmp_serde::to_vec_named(v).unwrap()
}

fn submit(job: Value) -> Result<Request, ProtocolError> {
    decode_body::<Request>(
        &body(&json!({"type": "submit", "req_id": 1, "job": job})),
        1 << 20,
    )
}

/// Decodes and validates a submit as the broker does; the error body on failure.
fn check(job: Value) -> Result<JobSpec, ErrorBody> {
    match submit(job).map_err(|e| e.to_body())? {
        Request::Submit(s) => {
            s.job
                .validate(&Limits::default())
                .map_err(|e| e.to_body())?;
            Ok(s.job)
        }
        other => panic!("{other:?}"),
    }
}

fn minimal() -> Value {
    json!({"backend": "sim", "task": "text_to_image", "params": {"prompt": "x"}})
}

fn with(key: &str, v: Value) -> Value {
    let mut j = minimal();
    j[key] = v;
    j
}

#[test]
fn a_body_is_a_map_never_a_positional_array() {
    let array = rmp_serde::to_vec(&("ping", 905u64)).unwrap();
    let err = decode_body::<Request>(&array, 1 << 20).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Malformed, "{err}");
    assert!(err.to_string().contains("positional array"), "{err}");
    // A nested struct sent as an array is refused too, naming it.
    let nested = body(&json!({"type": "submit", "req_id": 1, "job": ["sim", "text_to_image"]}));
    let err = decode_body::<Request>(&nested, 1 << 20).unwrap_err();
    assert_eq!(err.to_body().field.as_deref(), Some("job"), "{err}");
    let filter = body(&json!({"type": "list", "req_id": 1, "filter": [["queued"]]}));
    let err = decode_body::<Request>(&filter, 1 << 20).unwrap_err();
    assert_eq!(err.to_body().field.as_deref(), Some("filter"), "{err}");
}

#[test]
fn null_is_the_same_as_absent_for_every_optional_field() {
    let plain = check(minimal()).unwrap();
    // Every optional key of a job, from the same list the strict decoder uses, so
    // a new field is covered as soon as it exists.
    let optional = JOB_SPEC_FIELDS
        .iter()
        .filter(|k| !matches!(**k, "backend" | "task"));
    for &key in optional {
        let got = check(with(key, Value::Null)).unwrap_or_else(|e| panic!("{key}: null: {e}"));
        let mut want = plain.clone();
        if key == "params" {
            want.params.clear();
        }
        assert_eq!(got, want, "{key}: null must equal absent");
    }
    let lora = check(with("loras", json!([{"name": "ink", "strength": null}]))).unwrap();
    assert_eq!(lora.loras[0].strength, 1.0);
    for filter in [
        json!(null),
        json!({"states": null, "backend": null, "limit": null}),
    ] {
        let r = decode_body::<Request>(
            &body(&json!({"type": "list", "req_id": 1, "filter": filter})),
            1 << 20,
        )
        .unwrap();
        assert!(matches!(r, Request::List(l) if l.filter == ListFilter::default()));
    }
    let fetch = body(
        &json!({"type": "fetch", "req_id": 1, "artifact_id": "j1.0", "offset": null, "max_len": null}),
    );
    decode_body::<Request>(&fetch, 1 << 20).unwrap();
}

#[test]
fn params_numbers_are_finite() {
    #[derive(serde::Serialize)]
    struct Job {
        backend: &'static str,
        task: &'static str,
        params: std::collections::BTreeMap<&'static str, f64>,
    }
    #[derive(serde::Serialize)]
    struct Submit {
        #[serde(rename = "type")]
        kind: &'static str,
        req_id: u64,
        job: Job,
    }
    // serde_json cannot hold NaN: encode typed structs instead.
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let b = rmp_serde::to_vec_named(&Submit {
            kind: "submit",
            req_id: 1,
            job: Job {
                backend: "sim",
                task: "text_to_image",
                params: [("steps", bad)].into_iter().collect(),
            },
        })
        .unwrap();
        let err = decode_body::<Request>(&b, 1 << 20).unwrap_err().to_body();
        assert_eq!(err.code, ErrorCode::InvalidField);
        assert_eq!(err.field.as_deref(), Some("job.params.steps"), "{bad}");
        assert!(err.message.contains("finite"), "{}", err.message);
    }
}

#[test]
fn errors_name_the_field_itself() {
    let err = check(json!({"task": "text_to_image"})).unwrap_err();
    assert_eq!(
        (err.code, err.field.as_deref()),
        (ErrorCode::InvalidField, Some("job.backend"))
    );
    let err = check(with("priorty", json!(3))).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("job.priorty"), "{}", err.message);
    let err = check(with("params", json!(7))).unwrap_err();
    assert_eq!(err.field.as_deref(), Some("job.params"), "{}", err.message);
    // Values out of range are invalid_field with the range, whatever the field.
    for (key, v, max) in [
        ("priority", json!(99), 10),
        ("max_attempts", json!(11), 10),
        ("run_timeout_s", json!(0), 7 * 24 * 3600),
    ] {
        let err = check(with(key, v)).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidField, "{key}: {}", err.message);
        assert_eq!(err.field.as_deref(), Some(&*format!("job.{key}")));
        assert_eq!(err.limit, Some(max));
        assert!(err.message.contains("must be from"), "{}", err.message);
    }
    // Sizes over a limit are field_too_large.
    let long = "x".repeat(20_000);
    let err = check(with("params", json!({"prompt": long}))).unwrap_err();
    assert_eq!(err.code, ErrorCode::FieldTooLarge);
    assert_eq!(err.field.as_deref(), Some("job.params.prompt"));
    // An empty idempotency key is refused, not taken as a key.
    let err = check(with("idempotency_key", json!(""))).unwrap_err();
    assert_eq!(
        (err.code, err.field.as_deref()),
        (ErrorCode::InvalidField, Some("job.idempotency_key")),
        "{}",
        err.message
    );
    // req_id must be an unsigned integer.
    let err = decode_body::<Request>(&body(&json!({"type": "ping", "req_id": "7"})), 1 << 20)
        .unwrap_err()
        .to_body();
    assert_eq!(err.field.as_deref(), Some("req_id"));
}

#[test]
fn label_messages_follow_the_configured_limit() {
    let limits = Limits {
        max_label_len: 8,
        ..Limits::default()
    };
    let spec = JobSpec {
        labels: vec!["much-too-long-label".into()],
        ..JobSpec::new(Backend::Sim, Task::TextToImage)
    };
    // Too long: a size over the limit in force, as every size is.
    let err = spec.validate(&limits).unwrap_err().to_body();
    assert_eq!(
        (err.code, err.field.as_deref(), err.limit),
        (ErrorCode::FieldTooLarge, Some("job.labels[0]"), Some(8))
    );
    // Another character: the rule in words, with the limit in force.
    let spec = JobSpec {
        labels: vec!["a b".into()],
        ..JobSpec::new(Backend::Sim, Task::TextToImage)
    };
    let err = spec.validate(&limits).unwrap_err().to_body();
    assert_eq!(err.code, ErrorCode::InvalidField);
    assert!(err.message.contains("1 to 8 characters"), "{}", err.message);
}

#[test]
fn a_type_that_is_not_a_string_is_named_and_the_req_id_echoed() {
    let body = body(&json!({"type": 5, "req_id": 7}));
    let err = decode_body::<Request>(&body, 1 << 20)
        .unwrap_err()
        .to_body();
    assert_eq!(
        (err.code, err.field.as_deref()),
        (ErrorCode::InvalidField, Some("type"))
    );
    assert_eq!(
        kiln_protocol::frame::peek_envelope(&body).unwrap().req_id,
        Some(7)
    );
}

#[test]
fn an_empty_lora_name_is_refused_naming_it() {
    let err = check(with("loras", json!([{"name": ""}]))).unwrap_err();
    assert_eq!(
        (err.code, err.field.as_deref()),
        (ErrorCode::InvalidField, Some("job.loras[0].name"))
    );
}

#[test]
fn an_unknown_key_in_a_list_entry_is_named_once() {
    for (key, entry, want) in [
        (
            "loras",
            json!({"name": "x", "weight": 1}),
            "job.loras[0].weight",
        ),
        (
            "inputs",
            json!({"name": "a.png", "media_type": "image/png", "data": [1], "foo": 1}),
            "job.inputs[0].foo",
        ),
    ] {
        let err = check(with(key, json!([entry]))).unwrap_err();
        assert_eq!(err.field.as_deref(), Some(want), "{}", err.message);
    }
}

#[test]
fn a_req_socket_is_told_to_use_a_dealer() {
    let frames = [
        bytes::Bytes::new(),
        bytes::Bytes::from_static(PROTOCOL_TAG),
        bytes::Bytes::from(body(&json!({"type": "ping", "req_id": 1}))),
    ];
    let err = decode::<Request>(&frames, 1 << 20).unwrap_err();
    assert_eq!(err.code(), ErrorCode::Malformed);
    assert!(
        err.to_string().contains("REQ sockets are not supported"),
        "{err}"
    );
}

#[test]
fn newer_peers_may_add_fields_to_what_others_receive() {
    // A welcome from a newer broker with a limit and a field this version lacks.
    let mut limits = serde_json::to_value(Limits::default()).unwrap();
    limits["max_future_thing"] = json!(5);
    let w = body(&json!({"type": "welcome", "req_id": 0, "version": "0.2.0",
        "client": "c", "limits": limits, "features": ["x"], "shiny": true}));
    assert!(matches!(
        decode_body::<Reply>(&w, 1 << 20).unwrap(),
        Reply::Welcome(w) if w.limits == Limits::default()
    ));
    // An error code this version does not know.
    let e = body(&json!({"type": "error", "req_id": 3,
        "error": {"code": "quota_exceeded", "message": "later"}}));
    assert!(matches!(
        decode_body::<Reply>(&e, 1 << 20).unwrap(),
        Reply::Error(e) if e.error.code == ErrorCode::Unknown
    ));
    // A stored or assigned spec with a newer field (a rolled-back broker, an
    // older worker) still reads; only a client's submit is strict.
    let mut spec = minimal();
    spec["future_field"] = json!(1);
    let plain: JobSpec = rmp_serde::from_slice(&body(&spec)).unwrap();
    assert_eq!(plain.prompt(), Some("x"));
    assert!(submit(spec).is_err());
}

fn valid_job() -> impl Strategy<Value = Value> {
    (
        prop::option::of(-10i64..=10),
        prop::option::of(1u64..=10),
        prop::option::of("[a-z0-9._-]{1,64}"),
        prop::option::of(1u64..=604_800),
        any::<bool>(),
        "[ -~]{0,200}",
    )
        .prop_map(|(priority, attempts, label, timeout, degrade, prompt)| {
            let mut j = json!({"backend": "sim", "task": "text_to_image",
                "params": {"prompt": prompt}});
            // Each optional field is absent, null or set.
            let mut set = |k: &str, v: Option<Value>, null: bool| match (v, null) {
                (Some(v), _) => j[k] = v,
                (None, true) => j[k] = Value::Null,
                (None, false) => {}
            };
            set("priority", priority.map(Value::from), degrade);
            set("max_attempts", attempts.map(Value::from), !degrade);
            set("labels", label.map(|l| json!([l])), degrade);
            set("queue_timeout_s", timeout.map(Value::from), !degrade);
            set("allow_degrade", Some(Value::Bool(degrade)), false);
            j
        })
}

/// One field made invalid, and the field path the error must name.
fn invalid_job() -> impl Strategy<Value = (Value, String)> {
    prop_oneof![
        (11i64..1000).prop_map(|p| (with("priority", json!(p)), "job.priority".into())),
        (-1000i64..-10).prop_map(|p| (with("priority", json!(p)), "job.priority".into())),
        (11u64..255).prop_map(|a| (with("max_attempts", json!(a)), "job.max_attempts".into())),
        "[A-Z ]{1,8}".prop_map(|l| (
            with("labels", json!([format!("bad {l}")])),
            "job.labels[0]".into()
        )),
        "[a-z]{3,12}_x".prop_map(|k| (with(&k, json!(1)), format!("job.{k}"))),
        Just((with("backend", json!("dalle")), "job.backend".into())),
        Just((with("loras", json!("ink")), "job.loras".into())),
        Just((with("params", json!([1, 2])), "job.params".into())),
        Just((with("min_vram_mb", json!(-5)), "job.min_vram_mb".into())),
        Just((
            with("inputs", json!([{"name": "../x", "data": []}])),
            "job.inputs[0].name".into()
        )),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn valid_submits_are_accepted(job in valid_job()) {
        prop_assert!(check(job.clone()).is_ok(), "{job}: {:?}", check(job.clone()));
    }

    #[test]
    fn invalid_submits_name_their_field((job, field) in invalid_job()) {
        let err = check(job.clone()).expect_err("must be refused");
        prop_assert!(
            matches!(err.code, ErrorCode::InvalidField | ErrorCode::FieldTooLarge),
            "{job}: {err:?}"
        );
        prop_assert_eq!(err.field.as_deref(), Some(field.as_str()), "{} -> {:?}", job, err);
    }

    #[test]
    fn random_bytes_never_panic_and_get_a_typed_error(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(e) = decode_body::<Request>(&bytes, 1 << 20) {
            prop_assert!(!e.to_body().message.is_empty());
        }
    }
}

#[test]
fn a_deeply_nested_value_is_refused_without_a_crash() {
    // A map whose `key` holds 5,000 nested arrays, then `"req_id": 3`, built by
    // hand: past the shape check's depth, and past rmp-serde's own.
    let deep = |head: &[u8], key: &[u8]| {
        let mut body = head.to_vec();
        body.push(0xa0 | key.len() as u8);
        body.extend_from_slice(key);
        body.extend(std::iter::repeat_n(0x91, 5000));
        body.extend_from_slice(&[0xc0, 0xa6]);
        body.extend_from_slice(b"req_id");
        body.push(0x03);
        body
    };
    let ping = [
        0x83, 0xa4, b't', b'y', b'p', b'e', 0xa4, b'p', b'i', b'n', b'g',
    ];
    for body in [deep(&[0x82], b"type"), deep(&ping, b"junk")] {
        assert!(decode_body::<Request>(&body, 1 << 20).is_err());
        // Nor when a broker reads it again for its `req_id` (it cannot: nil).
        assert!(kiln_protocol::frame::peek_envelope(&body).is_none());
    }
}
