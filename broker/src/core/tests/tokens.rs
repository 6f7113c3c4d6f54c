//! Tokens gate clients and workers.

use super::*;

#[test]
fn tokens_gate_clients_and_workers() {
    let mut sim = Sim::with(CoreConfig {
        client_token: Some("c-token".into()),
        worker_token: Some("w-token".into()),
        ..CoreConfig::default()
    });
    let out = sim.register("w1", 8000);
    assert!(out.iter().any(|o| matches!(o, Output::ToWorker { msg: BrokerMessage::Error(e), .. } if e.error.code == ErrorCode::Unauthenticated)));
    assert!(sim.core.workers().is_empty());

    let out = sim.request(
        "stranger",
        Request::Submit(Submit {
            req_id: 1,
            job: spec(),
            client: None,
        }),
    );
    assert_eq!(error_code(&out), Some(ErrorCode::Unauthenticated));
    // One error, then nothing for anything but a `hello`.
    let out = sim.request(
        "stranger",
        Request::Submit(Submit {
            req_id: 2,
            job: spec(),
            client: None,
        }),
    );
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(sim.core.jobs_len(), 0);
    // A refused connection may still log in: its `hello` is judged like any other.
    let out = sim.request(
        "stranger",
        Request::Hello(Hello {
            req_id: 3,
            token: Some("c-token".into()),
            client: None,
        }),
    );
    assert!(
        matches!(
            &out[..],
            [Output::Reply {
                reply: Reply::Welcome(_),
                ..
            }]
        ),
        "{out:?}"
    );

    let out = sim.request(
        "friend",
        Request::Hello(Hello {
            req_id: 1,
            token: Some("c-token".into()),
            client: Some("alice".into()),
        }),
    );
    assert!(
        matches!(&out[..], [Output::Reply { reply: Reply::Welcome(w), .. }] if w.client == "alice")
    );
    let out = sim.request(
        "wrong",
        Request::Hello(Hello {
            req_id: 1,
            token: Some("nope".into()),
            client: None,
        }),
    );
    assert_eq!(error_code(&out), Some(ErrorCode::Unauthenticated));
}
