//! A client's session belongs to its connection, whatever happens to its replies.

use super::*;

#[test]
fn a_client_whose_replies_were_dropped_keeps_its_name_and_its_keys() {
    let mut sim = Sim::new();
    sim.register("w1", 24_000);
    let hello = |req_id| {
        Request::Hello(Hello {
            req_id,
            token: None,
            client: Some("render-farm-script".into()),
        })
    };
    sim.request("conn", hello(1));
    let mut keyed = spec();
    keyed.idempotency_key = Some("shot-42".into());
    let (first, _) = sim.submit_as("conn", keyed.clone()).unwrap();
    assert_eq!(&*sim.core.job(first).unwrap().client, "render-farm-script");

    // It stopped reading long enough for the transport to cut its replies off.
    sim.input(Input::PeerUnreachable {
        peer: peer("conn"),
        worker: false,
    });

    // Its retry after the cut is the same request from the same client.
    let out = sim.request(
        "conn",
        Request::Submit(Submit {
            req_id: 2,
            job: keyed,
            client: None,
        }),
    );
    let again = acceptance(&out)
        .expect("a reply to the retried submit")
        .expect("accepted");
    assert_eq!(again.job_id, first, "the key still finds its job");
    assert!(again.duplicate);
    assert_eq!(sim.core.jobs_len(), 1);

    // The connection ending is what ends the session.
    sim.input(Input::PeerGone {
        peer: peer("conn"),
        worker: false,
    });
    let (other, _) = sim.submit_as("conn", spec()).unwrap();
    assert_ne!(&*sim.core.job(other).unwrap().client, "render-farm-script");
}
