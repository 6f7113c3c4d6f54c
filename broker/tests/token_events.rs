//! With client tokens and no authenticating transport, no stranger receives events:
//! the events port stays closed (a PUB socket cannot tell who subscribes), and a
//! client with the token still follows its job to the end through `get`.

use std::net::TcpStream;
use std::time::Duration;

use kiln_protocol::{Backend, JobSpec, JobState, Task};
use kiln_testkit::{BrokerOpts, Scratch, WorkerOpts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_client_tokens_the_events_port_is_closed_and_clients_still_follow_jobs() {
    let s = Scratch::new();
    let broker = s
        .broker(BrokerOpts {
            client_token: Some("client-secret".into()),
            ..BrokerOpts::default()
        })
        .await;
    let _worker = s.worker(&broker, WorkerOpts::sim("w1")).await;

    let addr = broker.events.trim_start_matches("tcp://");
    let err = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2))
        .expect_err("nothing listens on the events port");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(
        broker.log().contains("the events port stays closed"),
        "the broker says why"
    );

    let client = broker.client();
    let spec = JobSpec::new(Backend::Sim, Task::TextToImage)
        .param("prompt", "followed without events")
        .param("steps", 5)
        .param("width", 16)
        .param("height", 16);
    let id = client.submit(spec).await.unwrap().job_id;
    let snap = tokio::time::timeout(Duration::from_secs(30), client.wait(id))
        .await
        .expect("the job is followed to its end")
        .unwrap();
    assert_eq!(snap.state, JobState::Succeeded, "{snap:?}");
}
