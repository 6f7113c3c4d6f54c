//! The client contract of issue #12 on the core: idempotency keys scoped per client
//! with conflict detection (also across a restart), stable sequence numbers of
//! finished jobs, cursor pagination of `list`, counters that survive a restart.

use kiln_protocol::request::*;
use kiln_protocol::*;

use super::tests::{error_code, peer, spec, Sim};
use super::*;

pub(super) fn hello(sim: &mut Sim, conn: &str, name: &str) {
    let out = sim.request(
        conn,
        Request::Hello(Hello {
            req_id: 1,
            token: None,
            client: Some(name.into()),
        }),
    );
    assert!(
        matches!(&out[..], [Output::Reply { reply: Reply::Welcome(w), .. }] if w.client == name),
        "{out:?}"
    );
}

fn keyed(key: &str, prompt: &str) -> JobSpec {
    let mut s = spec().param("prompt", prompt);
    s.idempotency_key = Some(key.into());
    s
}

fn accepted(out: &[Output]) -> Accepted {
    out.iter()
        .find_map(|o| match o {
            Output::Reply {
                reply: Reply::Accepted(a),
                ..
            } => Some(a.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("not accepted: {out:?}"))
}

fn submit_on(sim: &mut Sim, conn: &str, spec: JobSpec) -> Vec<Output> {
    sim.request(
        conn,
        Request::Submit(Submit {
            req_id: 5,
            job: spec,
            client: None,
        }),
    )
}

/// A broker restarted from the records a store would hold now.
pub(super) fn restart(sim: &Sim, cfg: CoreConfig, boot: u64) -> Sim {
    let mut store = Vec::new();
    let mut id = 1;
    while let Some(j) = sim.core.job(JobId(id)) {
        store.push(Job::from_records(&j.state_record(), &j.spec_record()).unwrap());
        id += 1;
    }
    let fleet = sim.core.workers().iter().map(|(_, w)| w.record()).collect();
    let mut sim2 = Sim::with(cfg);
    sim2.now = sim.now + 10_000;
    let mut out = Vec::new();
    let next = sim.core.next_job_id();
    sim2.core
        .recover(sim2.now, boot, store, fleet, next, &mut out);
    sim2
}

pub(super) fn durable() -> CoreConfig {
    CoreConfig {
        persist: true,
        ..CoreConfig::default()
    }
}

#[test]
fn idempotency_keys_belong_to_a_client_and_compare_the_job() {
    let mut sim = Sim::with(durable());
    sim.register("w1", 8000);
    hello(&mut sim, "conn-a", "alice");
    hello(&mut sim, "conn-b", "bob");
    let first = accepted(&submit_on(&mut sim, "conn-a", keyed("1", "a fox")));
    assert!(!first.duplicate);

    // Same client, same key, same job (a retry, here on a new connection): the
    // first job.
    hello(&mut sim, "conn-a2", "alice");
    let again = accepted(&submit_on(&mut sim, "conn-a2", keyed("1", "a fox")));
    assert_eq!((again.job_id, again.duplicate), (first.job_id, true));

    // Another client with the same key: its own job.
    let other = accepted(&submit_on(&mut sim, "conn-b", keyed("1", "a fox")));
    assert_ne!(other.job_id, first.job_id);
    assert!(!other.duplicate);

    // Same client, same key, another job: a conflict naming the key and the field.
    let out = submit_on(&mut sim, "conn-a", keyed("1", "a wolf"));
    assert_eq!(error_code(&out), Some(ErrorCode::IdempotencyConflict));
    let Output::Reply {
        reply: Reply::Error(e),
        ..
    } = &out[0]
    else {
        panic!("{out:?}")
    };
    assert_eq!(e.error.field.as_deref(), Some("job.idempotency_key"));
    assert!(
        e.error.message.contains("job.params.prompt differs"),
        "{}",
        e.error.message
    );
    assert_eq!(sim.core.jobs_len(), 2);

    // After a restart the keys are still the clients'.
    let mut sim2 = restart(&sim, durable(), 1);
    hello(&mut sim2, "conn-a3", "alice");
    hello(&mut sim2, "conn-b2", "bob");
    let after = accepted(&submit_on(&mut sim2, "conn-a3", keyed("1", "a fox")));
    assert_eq!((after.job_id, after.duplicate), (first.job_id, true));
    let bob = accepted(&submit_on(&mut sim2, "conn-b2", keyed("1", "a fox")));
    assert_eq!((bob.job_id, bob.duplicate), (other.job_id, true));
    let out = submit_on(&mut sim2, "conn-a3", keyed("1", "a wolf"));
    assert_eq!(error_code(&out), Some(ErrorCode::IdempotencyConflict));
    assert_eq!(sim2.core.jobs_len(), 2);
}

#[test]
fn a_finished_jobs_seq_survives_restarts_and_counters_too() {
    let mut sim = Sim::with(durable());
    sim.register("w1", 8000);
    let (done, _) = sim.submit(spec());
    sim.succeed("w1", done, 1);
    sim.advance(10);
    assert_eq!(sim.state(done), JobState::Succeeded);
    let (waiting, _) = sim.submit(spec());
    let done_seq = sim.core.job(done).unwrap().seq;
    let waiting_seq = sim.core.job(waiting).unwrap().seq;
    let finished = |sim: &mut Sim| {
        let out = sim.request("c", Request::Health(Simple { req_id: 2 }));
        match &out[..] {
            [Output::Reply {
                reply: Reply::Health(h),
                ..
            }] => h.health.finished,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(finished(&mut sim), 1);
    for boot in 1..=3 {
        sim = restart(&sim, durable(), boot);
        assert_eq!(sim.core.job(done).unwrap().seq, done_seq, "boot {boot}");
        // A job still in flight numbers its next events above anything an earlier
        // boot may have published.
        assert!(sim.core.job(waiting).unwrap().seq > waiting_seq);
        assert_eq!(finished(&mut sim), 1, "boot {boot}");
    }
}

#[test]
fn list_pages_with_a_cursor_past_max_list() {
    let cfg = CoreConfig {
        limits: Limits {
            max_list: 10,
            ..Limits::default()
        },
        ..CoreConfig::default()
    };
    let mut sim = Sim::with(cfg);
    sim.register("w1", 8000);
    let ids: Vec<JobId> = (0..25).map(|_| sim.submit(spec()).0).collect();
    let mut seen = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let out = sim.request(
            "c",
            Request::List(List {
                req_id: 3,
                filter: ListFilter::default(),
                cursor: cursor.clone(),
            }),
        );
        let Output::Reply {
            reply: Reply::Jobs(page),
            ..
        } = &out[0]
        else {
            panic!("{out:?}")
        };
        pages += 1;
        assert!(page.jobs.len() <= 10);
        // A job submitted while paging never shifts the pages.
        sim.submit(spec());
        seen.extend(page.jobs.iter().map(|j| j.job_id));
        match &page.next_cursor {
            Some(c) => cursor = Some(c.clone()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    let mut want = ids;
    want.reverse();
    assert_eq!(seen, want, "newest first, each job once");

    let out = sim.request(
        "c",
        Request::List(List {
            req_id: 4,
            filter: ListFilter::default(),
            cursor: Some("page-2".into()),
        }),
    );
    assert_eq!(error_code(&out), Some(ErrorCode::InvalidField));
    // A job id this broker never handed out is not a cursor from a reply either.
    let out = sim.request(
        "c",
        Request::List(List {
            req_id: 5,
            filter: ListFilter::default(),
            cursor: Some("j999999".into()),
        }),
    );
    assert_eq!(error_code(&out), Some(ErrorCode::InvalidField));
}

#[test]
fn name_errors_state_the_configured_limit() {
    let cfg = CoreConfig {
        limits: Limits {
            max_label_len: 12,
            ..Limits::default()
        },
        ..CoreConfig::default()
    };
    let mut sim = Sim::with(cfg);
    let mut refused = |name: &str| {
        let out = sim.request(
            "c",
            Request::Hello(Hello {
                req_id: 1,
                token: None,
                client: Some(name.into()),
            }),
        );
        match super::tests::acceptance(&out) {
            Some(Err(e)) => e,
            _ => panic!("{out:?}"),
        }
    };
    // Too long is a size over its limit, like every other.
    let e = refused("a-very-long-client-name");
    assert_eq!(
        (e.code, e.field.as_deref(), e.limit),
        (ErrorCode::FieldTooLarge, Some("client"), Some(12))
    );
    // A character outside the rule: the rule in words, with the limit in force.
    let e = refused("a b");
    assert_eq!(e.code, ErrorCode::InvalidField);
    assert!(e.message.contains("1 to 12 characters"), "{}", e.message);
    let _ = peer("unused");
}

#[test]
fn params_are_checked_at_submit_against_the_workers_descriptions() {
    use kiln_protocol::params::*;
    use kiln_protocol::worker::BackendInventory;
    let described = |max_steps: f64| BackendInventory {
        params: Some(ParamSchema {
            sets: vec![ParamSet {
                params: vec![
                    ParamSpec::new("prompt", ParamKind::String, ""),
                    ParamSpec::new("steps", ParamKind::Integer, "").range(1.0, max_steps),
                ],
                ..ParamSet::default()
            }],
        }),
        ..super::tests::inventory(Backend::Sim, &[])
    };
    let mut sim = Sim::new();
    sim.register_full("small", 8000, vec![described(50.0)], &[], None);
    let refused = |sim: &mut Sim, spec: JobSpec| {
        let e = sim.submit_as("c", spec).expect_err("refused at submit");
        (e.code, e.field.unwrap_or_default())
    };
    for (bad, field) in [
        (spec().param("steps", "abc"), "job.params.steps"),
        (spec().param("steps", 0), "job.params.steps"),
        (spec().param("stepz", 10), "job.params.stepz"),
    ] {
        assert_eq!(
            refused(&mut sim, bad),
            (ErrorCode::InvalidField, field.to_string())
        );
    }
    assert_eq!(sim.core.jobs_len(), 0, "nothing refused was queued");
    // Accepted when some capable worker accepts it: a second one allows more.
    assert!(sim.submit_as("c", spec().param("steps", 80)).is_err());
    sim.register_full("big", 8000, vec![described(100.0)], &[], None);
    assert!(sim.submit_as("c", spec().param("steps", 80)).is_ok());
    // A worker that describes nothing (older) leaves the check to itself.
    let mut old = Sim::new();
    old.register("w1", 8000);
    assert!(old.submit_as("c", spec().param("stepz", 10)).is_ok());
}

#[test]
fn too_many_outputs_fail_once_naming_the_count_and_the_setting() {
    use kiln_protocol::worker::{Upload, WorkerMessage};
    let mut cfg = CoreConfig::default();
    cfg.limits.max_artifacts_per_job = 2;
    let mut sim = Sim::with(cfg);
    sim.register("w1", 8000);
    let mut s = spec();
    s.max_attempts = Some(3);
    let (job, _) = sim.submit(s);
    let piece = |index: u16| {
        WorkerMessage::Upload(Upload {
            job_id: job,
            attempt: 1,
            index,
            name: format!("out{index}.png"),
            media_type: "image/png".into(),
            offset: 0,
            total: 1,
            data: vec![1],
        })
    };
    sim.worker("w1", piece(0));
    sim.worker("w1", piece(1));
    assert_eq!(sim.state(job), JobState::Running);
    sim.worker("w1", piece(2));
    // Not retried: another attempt would make as many outputs.
    assert_eq!(sim.state(job), JobState::Failed);
    let error = sim.core.job(job).unwrap().error.clone().expect("an error");
    assert!(!error.retryable);
    assert!(
        error.message.contains("more than 2 outputs")
            && error
                .message
                .contains("broker.limits.max_artifacts_per_job"),
        "{}",
        error.message
    );
}

#[test]
fn a_get_reply_says_how_the_job_was_asked_to_run() {
    let mut sim = Sim::new();
    sim.register_full(
        "w1",
        24_000,
        vec![super::tests::inventory(Backend::Sim, &["sim-sdxl"])],
        &["fast"],
        None,
    );
    let mut asked = spec();
    asked.labels = vec!["fast".into()];
    asked.min_vram_mb = Some(8_000);
    asked.queue_timeout_s = Some(600);
    asked.run_timeout_s = Some(60);
    asked.max_attempts = Some(2);
    asked.idempotency_key = Some("order-17".into());
    asked.allow_degrade = true;
    let (id, out) = sim.submit(asked.clone());
    accepted(&out);
    let job = sim.snapshot(id);
    assert_eq!(job.options, Some(JobOptions::of(&asked)));
    assert_eq!(job.options.as_ref().unwrap().labels, ["fast"]);
    assert_eq!(job.template, None);

    // Listings stay small: no parameters, options or history.
    let out = sim.request(
        "client",
        Request::List(List {
            req_id: 3,
            filter: ListFilter::default(),
            cursor: None,
        }),
    );
    let Output::Reply {
        reply: Reply::Jobs(page),
        ..
    } = &out[0]
    else {
        panic!("{out:?}")
    };
    assert!(page.jobs[0].options.is_none() && page.jobs[0].params.is_none());
}

#[test]
fn loras_and_templates_are_checked_at_submit_against_what_workers_have() {
    use kiln_protocol::params::*;
    use kiln_protocol::worker::{BackendInventory, ModelEntry};
    let described = |loras: &[&str], templates: &[&str]| {
        let mut inv = super::tests::inventory(Backend::Comfyui, &["sdxl.safetensors"]);
        inv.models.extend(loras.iter().map(|l| ModelEntry {
            name: l.to_string(),
            kind: "loras".into(),
        }));
        let mut sets = vec![ParamSet::default()];
        sets.extend(templates.iter().map(|t| ParamSet {
            template: Some(t.to_string()),
            ..ParamSet::default()
        }));
        BackendInventory {
            params: Some(ParamSchema { sets }),
            ..inv
        }
    };
    let job = |loras: &[&str], template: Option<&str>| {
        let mut s = JobSpec::new(Backend::Comfyui, Task::TextToImage);
        s.loras = loras
            .iter()
            .map(|l| LoraRef {
                name: l.to_string(),
                strength: 1.0,
            })
            .collect();
        s.template = template.map(str::to_string);
        s
    };
    let refused = |sim: &mut Sim, spec: JobSpec| {
        let e = sim.submit_as("c", spec).expect_err("refused at submit");
        (e.code, e.field.unwrap_or_default(), e.message)
    };
    let mut sim = Sim::new();
    sim.register_full(
        "a",
        8000,
        vec![described(&["ink.safetensors"], &["portrait"])],
        &[],
        None,
    );
    sim.register_full(
        "b",
        8000,
        vec![described(&["clay.safetensors"], &[])],
        &["b"],
        None,
    );
    // Each worker has what it lists; a job needs one worker with all of it.
    assert!(sim
        .submit_as("c", job(&["ink.safetensors"], Some("portrait")))
        .is_ok());
    assert!(sim.submit_as("c", job(&["clay.safetensors"], None)).is_ok());
    let (code, field, message) = refused(
        &mut sim,
        job(&["ink.safetensors", "clay.safetensors"], None),
    );
    assert_eq!(
        (code, field.as_str()),
        (ErrorCode::Unschedulable, "job.loras[1]")
    );
    assert!(
        message.contains("LoRA \"clay.safetensors\" is not installed"),
        "{message}"
    );
    let (code, field, _) = refused(&mut sim, job(&[], Some("landscape")));
    assert_eq!(
        (code, field.as_str()),
        (ErrorCode::Unschedulable, "job.template")
    );
    // Only among the workers that could run it: labels leave worker b alone.
    let mut labelled = job(&["ink.safetensors"], None);
    labelled.labels = vec!["b".into()];
    let (_, field, _) = refused(&mut sim, labelled);
    assert_eq!(field, "job.loras[0]");
    assert_eq!(sim.core.jobs_len(), 2, "nothing refused was queued");
    // A worker that describes nothing (older) checks when it runs.
    let mut old = Sim::new();
    old.register_full(
        "w1",
        8000,
        vec![super::tests::inventory(
            Backend::Comfyui,
            &["sdxl.safetensors"],
        )],
        &[],
        None,
    );
    assert!(old
        .submit_as("c", job(&["ink.safetensors"], Some("landscape")))
        .is_ok());
}

#[test]
fn a_job_goes_only_to_workers_that_would_take_it() {
    use kiln_protocol::params::*;
    use kiln_protocol::worker::{BackendInventory, BrokerMessage, ModelEntry};
    let described = |max_side: f64, lora: Option<&str>| {
        let mut inv = super::tests::inventory(Backend::Sim, &[]);
        inv.models.extend(lora.map(|l| ModelEntry {
            name: l.into(),
            kind: "loras".into(),
        }));
        BackendInventory {
            params: Some(ParamSchema {
                sets: vec![ParamSet {
                    params: vec![
                        ParamSpec::new("prompt", ParamKind::String, ""),
                        ParamSpec::new("width", ParamKind::Integer, "").range(8.0, max_side),
                    ],
                    ..ParamSet::default()
                }],
            }),
            ..inv
        }
    };
    let mut sim = Sim::new();
    sim.register_full("small", 8000, vec![described(1024.0, None)], &[], None);
    sim.register_full("big", 8000, vec![described(2048.0, Some("ink"))], &[], None);
    let assigned_to = |out: &[Output]| -> Vec<String> {
        out.iter()
            .filter_map(|o| match o {
                Output::ToWorker {
                    peer,
                    msg: BrokerMessage::Assign(_),
                } => Some(String::from_utf8_lossy(peer).into_owned()),
                _ => None,
            })
            .collect()
    };
    // Wide jobs and LoRA jobs: accepted (one worker takes them), and only ever
    // given to that worker, the other staying idle; a plain job takes the other.
    let mut wide = Vec::new();
    for n in 0..3 {
        let mut s = spec()
            .param("width", 1536)
            .param("prompt", format!("wide {n}"));
        if n == 2 {
            s.loras = vec![LoraRef {
                name: "ink".into(),
                strength: 1.0,
            }];
        }
        let (id, out) = sim.submit(s);
        wide.push(id);
        assert!(
            assigned_to(&out).iter().all(|w| w == "big"),
            "{:?}",
            assigned_to(&out)
        );
    }
    assert_eq!(sim.core.job(wide[1]).unwrap().state, JobState::Queued);
    let (narrow, out) = sim.submit(spec().param("width", 512));
    assert_eq!(
        assigned_to(&out),
        ["small"],
        "the plain job takes the idle worker"
    );
    // `small` frees up while wide jobs wait: it takes none of them.
    let attempt = sim.core.job(narrow).unwrap().attempt;
    let out = sim.succeed("small", narrow, attempt);
    assert!(assigned_to(&out).is_empty(), "{:?}", assigned_to(&out));
    // Each wide job runs on `big` in turn.
    for (n, id) in wide.iter().enumerate() {
        let attempt = sim.core.job(*id).unwrap().attempt;
        let out = sim.succeed("big", *id, attempt);
        if n + 1 < wide.len() {
            assert_eq!(assigned_to(&out), ["big"]);
        }
    }
    for id in wide {
        assert_eq!(sim.core.job(id).unwrap().state, JobState::Succeeded);
    }
}
