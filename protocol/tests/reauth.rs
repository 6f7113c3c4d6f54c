//! The client logs in again by itself when the broker forgets its session while the
//! connection stays up (a broker restart under a reconnecting transport, or an idle
//! session swept). A stand-in broker on a real ROUTER socket answers the first call
//! after `hello` with `unauthenticated`, as a restarted broker does.

use std::time::Duration;

use bytes::Bytes;
use kiln_protocol::frame;
use kiln_protocol::request::{Reply, Simple, Welcome};
use kiln_protocol::{Client, ClientOptions, ErrorBody, ErrorCode, Limits, Request};
use zeromq::{RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// Serves `hello` and `ping`; forgets the session once, after the first login.
/// Returns how many `hello`s it saw and the token of the last one.
async fn forgetful_broker(mut router: RouterSocket, forget_once: bool) -> (u32, Option<String>) {
    let mut hellos = 0;
    let mut token = None;
    let mut forgot = !forget_once;
    let mut logged_in: Vec<Bytes> = Vec::new();
    loop {
        let msg = router.recv().await.expect("recv");
        let frames = msg.into_vec();
        let peer = frames[0].clone();
        let request: Request = frame::decode(&frames[1..], 1 << 20).expect("a valid request");
        let done = matches!(request, Request::Ping(_)) && forgot;
        let reply = match request {
            Request::Hello(h) => {
                hellos += 1;
                token = h.token.clone();
                logged_in.push(peer.clone());
                Reply::Welcome(Welcome {
                    req_id: h.req_id,
                    version: kiln_protocol::VERSION.to_string(),
                    client: "test".into(),
                    limits: Limits::default(),
                    features: Vec::new(),
                })
            }
            Request::Ping(p) if !forgot => {
                // The broker restarted: it knows no session any more.
                forgot = true;
                logged_in.clear();
                Reply::error(
                    Some(p.req_id),
                    ErrorBody::new(
                        ErrorCode::Unauthenticated,
                        "send `hello` with a valid token first",
                    ),
                )
            }
            Request::Ping(p) => {
                assert!(logged_in.contains(&peer), "a ping before hello");
                Reply::Pong(Simple { req_id: p.req_id })
            }
            other => panic!("unexpected request {other:?}"),
        };
        let [tag, body] = frame::encode(&reply);
        let out = ZmqMessage::try_from(vec![peer, tag, body]).expect("frames");
        router.send(out).await.expect("send");
        if done {
            return (hellos, token);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forgotten_session_logs_in_again_and_the_call_succeeds() {
    let mut router = RouterSocket::new();
    let endpoint = router.bind("tcp://127.0.0.1:0").await.unwrap().to_string();
    let broker = tokio::spawn(forgetful_broker(router, true));
    let mut opts = ClientOptions::new(endpoint, "tcp://127.0.0.1:1");
    // The stand-in broker is a zeromq-crate ROUTER; the client uses the same.
    opts.transport = kiln_protocol::transport::TransportKind::Zeromq;
    opts.token = Some("sesame".into());
    opts.request_timeout = Duration::from_secs(10);
    let client = Client::connect(opts);
    client
        .ping()
        .await
        .expect("the ping succeeds after a fresh hello");
    let (hellos, token) = tokio::time::timeout(Duration::from_secs(10), broker)
        .await
        .expect("the stand-in broker finished")
        .unwrap();
    assert_eq!(
        hellos, 2,
        "one login, then one more after the session was forgotten"
    );
    assert_eq!(token.as_deref(), Some("sesame"));
}
