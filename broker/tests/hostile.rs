//! Bounded resources whatever peers do (issue 10, item 5), on each transport where
//! it applies, with real processes and hostile peers speaking raw ZMTP over TCP:
//! bodies that declare sizes they do not have, a client that never reads, a
//! subscriber that churns subscriptions, a flood of connections from one address,
//! and a "broker" that announces a 32 GiB frame to a worker.

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use bytes::Bytes;
use kiln_protocol::transport::TransportKind;
use kiln_protocol::{Backend, ErrorCode, JobSpec, JobState, Reply, Task, WorkerMessage};
use kiln_testkit::zmtp::Zmtp;
use kiln_testkit::{eventually, recv_within, Broker, BrokerOpts, Scratch, WorkerOpts};
use serde_json::json;

fn job(side: u32) -> JobSpec {
    JobSpec::new(Backend::Sim, Task::TextToImage)
        .param("prompt", "a kiln under siege")
        .param("steps", 2)
        .param("width", side)
        .param("height", side)
}

fn pack(v: &serde_json::Value) -> Vec<u8> {
    rmp_serde::to_vec_named(v).unwrap()
}

/// A msgpack map of `fields` and then `key` with an already encoded (or forged)
/// value.
fn body_with(fields: serde_json::Value, key: &str, raw: &[u8]) -> Vec<u8> {
    let map = fields.as_object().unwrap();
    let mut out = vec![0x80 | (map.len() as u8 + 1)];
    for (k, v) in map {
        out.extend(pack(&json!(k)));
        out.extend(pack(v));
    }
    out.extend(pack(&json!(key)));
    out.extend_from_slice(raw);
    out
}

fn reply(frames: &[Bytes]) -> Reply {
    kiln_protocol::frame::decode(frames, usize::MAX).expect("a Kiln reply")
}

fn field_too_large(r: Reply) -> (String, Option<u64>) {
    match r {
        Reply::Error(e) => {
            assert_eq!(e.error.code, ErrorCode::FieldTooLarge, "{e:?}");
            (e.error.field.unwrap_or_default(), e.error.limit)
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

/// A line of the broker's log, read when it appears.
async fn log_line(broker: &Broker, needle: &str) {
    eventually(
        &format!("the broker to log {needle:?}"),
        Duration::from_secs(30),
        || async { broker.log().contains(needle).then_some(()) },
    )
    .await;
}

/// Kilobytes of a process's `/proc/<pid>/status` field (`VmHWM` is the peak RSS).
fn status_kb(pid: i32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

async fn declared_sizes_are_refused_before_values_are_built(kind: TransportKind) {
    let s = Scratch::new();
    let broker = s
        .broker(BrokerOpts {
            transport: kind,
            durable: false,
            ..BrokerOpts::default()
        })
        .await;
    let mut d = broker.raw_dealer().await;
    let header = Bytes::from_static(b"KILN1");

    // `job` declares a map of 2^32 - 1 entries in a body of 40 bytes.
    let body = body_with(
        json!({"type": "submit", "req_id": 5}),
        "job",
        &[0xdf, 0xff, 0xff, 0xff, 0xff],
    );
    d.send([header.clone(), Bytes::from(body)]).await.unwrap();
    let r = recv_within(&mut d, Duration::from_secs(10))
        .await
        .expect("an answer");
    assert_eq!(
        field_too_large(reply(&r)),
        ("job (map entries)".to_string(), Some(65_536))
    );

    // 200,000 entries of two bytes each (800 KB): far under the message limit,
    // refused before a single entry becomes a key and a value.
    let mut params = vec![0xdf];
    params.extend(200_000u32.to_be_bytes());
    for i in 0..200_000u32 {
        params.extend([0xa1, b'a' + (i % 26) as u8, 0xc0]);
    }
    let job = body_with(
        json!({"backend": "sim", "task": "text_to_image"}),
        "params",
        &params,
    );
    let body = body_with(json!({"type": "submit", "req_id": 6}), "job", &job);
    d.send([header.clone(), Bytes::from(body)]).await.unwrap();
    let r = recv_within(&mut d, Duration::from_secs(10))
        .await
        .expect("an answer");
    match reply(&r) {
        Reply::Error(e) => {
            assert_eq!(e.req_id, Some(6), "the req_id is echoed");
            assert_eq!(e.error.code, ErrorCode::FieldTooLarge);
            assert_eq!(e.error.field.as_deref(), Some("job.params (map entries)"));
        }
        other => panic!("{other:?}"),
    }

    // A string declaring 4 GiB.
    let body = body_with(
        json!({"type": "ping", "req_id": 7}),
        "pad",
        &[0xdb, 0xff, 0xff, 0xff, 0xff, b'x'],
    );
    d.send([header.clone(), Bytes::from(body)]).await.unwrap();
    let r = recv_within(&mut d, Duration::from_secs(10))
        .await
        .expect("an answer");
    match reply(&r) {
        Reply::Error(e) => {
            assert_eq!(e.error.code, ErrorCode::Malformed);
            assert!(e.error.message.contains("4294967295 bytes"), "{e:?}");
        }
        other => panic!("{other:?}"),
    }

    // 5,000 nested arrays under a key the broker only skips: refused at the
    // nesting cap, and reading the body again for its `req_id` does not recurse
    // (a debug broker overflowed its stack here).
    let mut deep = vec![0x91; 5_000];
    deep.push(0xc0);
    let body = body_with(json!({"type": "ping", "req_id": 8}), "junk", &deep);
    d.send([header, Bytes::from(body)]).await.unwrap();
    let r = recv_within(&mut d, Duration::from_secs(10))
        .await
        .expect("an answer");
    assert_eq!(
        field_too_large(reply(&r)),
        ("junk (nesting depth)".to_string(), Some(64))
    );

    // Everyone else is still served.
    broker.client().ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libzmq_declared_sizes_are_refused_before_values_are_built() {
    declared_sizes_are_refused_before_values_are_built(TransportKind::Libzmq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zeromq_declared_sizes_are_refused_before_values_are_built() {
    declared_sizes_are_refused_before_values_are_built(TransportKind::Zeromq).await;
}

/// A client asks for far more artifact bytes than any queue may hold and never
/// reads: the broker's peak memory stays bounded, the client's replies are
/// dropped and logged, other clients are served throughout, and the client, once
/// it reads again, is answered under the session it had.
async fn a_client_that_never_reads_is_dropped(kind: TransportKind, stall_log: &str) {
    let s = Scratch::new();
    let broker = s
        .broker(BrokerOpts {
            transport: kind,
            durable: false,
            client_token: Some("tok".into()),
            ..BrokerOpts::default()
        })
        .await;
    let _w = s.worker(&broker, WorkerOpts::sim("w1")).await;
    let client = broker.client();
    let id = client.submit(job(512)).await.unwrap().job_id;
    let done = client.wait(id).await.unwrap();
    assert_eq!(done.state, JobState::Succeeded);
    let art = done.artifacts[0].clone();
    // About 2 GiB of replies requested, in chunks of the whole artifact.
    let n = (2u64 << 30).div_ceil(art.size).min(40_000);

    let mut raw = Zmtp::connect(&broker.frontend, "DEALER").unwrap();
    raw.send(&[
        b"KILN1",
        &pack(&json!({"type": "hello", "req_id": 0, "token": "tok"})),
    ])
    .unwrap();
    let welcome = raw.recv().unwrap();
    assert!(matches!(
        reply(&welcome.into_iter().map(Bytes::from).collect::<Vec<_>>()),
        Reply::Welcome(_)
    ));
    let fetch = |req_id: u64| {
        pack(
            &json!({"type": "fetch", "req_id": req_id, "artifact_id": art.id.to_string(),
            "offset": 0, "max_len": art.size}),
        )
    };
    for i in 1..=n {
        raw.send(&[b"KILN1", &fetch(i)]).unwrap();
    }
    log_line(&broker, stall_log).await;
    // The artifact thread serves reads in order: once another client's fetch is
    // answered, every read the silent client asked for has been made.
    client.fetch_artifact(art.id).await.unwrap();
    let peak_mb = status_kb(broker.proc.pid(), "VmHWM") / 1024;
    let requested_mb = (n * art.size) >> 20;
    assert!(
        peak_mb < 400,
        "the broker peaked at {peak_mb} MB with {requested_mb} MB of replies requested"
    );

    // The silent client now reads, and asks once more: some replies were
    // dropped, and it is answered under the session it had (or gets EOF, if the
    // broker's ZMTP heartbeats timed out meanwhile).
    let _ = raw.send(&[
        b"KILN1",
        &pack(&json!({"type": "list", "req_id": 999_999_999u64})),
    ]);
    raw.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let (mut delivered, mut last) = (0u64, 0u64);
    loop {
        let frames: Vec<Bytes> = match raw.recv() {
            Ok(f) => f.into_iter().map(Bytes::from).collect(),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(e) => panic!("{e}"),
        };
        match reply(&frames) {
            Reply::Chunk(c) => {
                assert!(c.req_id > last, "replies in order");
                last = c.req_id;
                delivered += 1;
            }
            Reply::Jobs(list) => {
                assert_eq!(list.req_id, 999_999_999);
                assert!(
                    list.jobs.iter().any(|j| j.job_id == id),
                    "still the session that sees its jobs"
                );
                break;
            }
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert!(
        delivered < n,
        "{delivered} of {n} replies delivered: none dropped"
    );
    client.ping().await.unwrap();
    eprintln!(
        "{kind}: artifact {} bytes x {n} fetches = {requested_mb} MB requested; broker peak RSS {peak_mb} MB",
        art.size
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libzmq_a_client_that_never_reads_is_dropped() {
    a_client_that_never_reads_is_dropped(TransportKind::Libzmq, "a peer stopped reading").await;
}

// On `zeromq` the crate queues up to 100,000 messages per peer in front of
// Kiln's byte-capped queue, so a client that never reads is not noticed until
// the broker has swollen (tried: no stall within 30 s while the worker's
// heartbeats lapsed). That transport stays fenced (docs/security.md); the fence
// is tested in transport.rs.

/// Subscribers that churn subscriptions, and send huge ones, while jobs flow and
/// events go out; then they disconnect. Ping and submit keep working.
async fn subscription_churn_leaves_the_broker_serving(kind: TransportKind) {
    let s = Scratch::new();
    let broker = s
        .broker(BrokerOpts {
            transport: kind,
            durable: false,
            ..BrokerOpts::default()
        })
        .await;
    let _w = s.worker(&broker, WorkerOpts::sim("w1")).await;
    let client = broker.client();
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(client.submit(job(16)).await.unwrap().job_id);
    }
    let mut subs = Vec::new();
    for c in 0..8u32 {
        let mut sub = Zmtp::connect(&broker.events, "SUB").unwrap();
        for i in 0..2_000u32 {
            let topic = format!("\x01job/j{c}-{i}/{}", "x".repeat(48));
            sub.send(&[topic.as_bytes()]).unwrap();
            let mut cancel = topic.into_bytes();
            cancel[0] = 0;
            sub.send(&[&cancel]).unwrap();
        }
        sub.send(&[b"\x01"]).unwrap();
        subs.push(sub);
    }
    // A subscription of 1 MiB on one more connection.
    let mut big = Zmtp::connect(&broker.events, "SUB").unwrap();
    let mut huge = vec![b'y'; 1 << 20];
    huge[0] = 1;
    let _ = big.send(&[&huge]);
    for id in &ids {
        let done = client.wait(*id).await.unwrap();
        assert_eq!(done.state, JobState::Succeeded, "{done:?}");
    }
    drop(subs);
    drop(big);
    client.ping().await.unwrap();
    let id = client.submit(job(16)).await.unwrap().job_id;
    assert_eq!(client.wait(id).await.unwrap().state, JobState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libzmq_subscription_churn_leaves_the_broker_serving() {
    subscription_churn_leaves_the_broker_serving(TransportKind::Libzmq).await;
}

// On `zeromq` the same churn stops the broker (the crate's PUB takes a sync lock
// on the async path; tried: ping timed out after 20 s): fenced, like above.

/// libzmq closes a 1 MiB subscription's connection (the events port's message
/// limit), freeing what it subscribed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libzmq_a_huge_subscription_closes_its_connection() {
    let s = Scratch::new();
    let broker = s
        .broker(BrokerOpts {
            transport: TransportKind::Libzmq,
            durable: false,
            ..BrokerOpts::default()
        })
        .await;
    let mut big = Zmtp::connect(&broker.events, "SUB").unwrap();
    let mut huge = vec![b'y'; 1 << 20];
    huge[0] = 1;
    let _ = big.send(&[&huge]);
    big.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 64];
    let closed = matches!(
        std::io::Read::read(&mut big.stream, &mut buf),
        Ok(0) | Err(_)
    );
    assert!(closed, "the connection stayed open");
    broker.client().ping().await.unwrap();
}

/// A TCP connection to `endpoint` from the loopback address `from` (127.0.0.x).
fn connect_from(from: Ipv4Addr, endpoint: &str) -> std::io::Result<TcpStream> {
    let to: SocketAddr = endpoint.trim_start_matches("tcp://").parse().unwrap();
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&SocketAddr::from((from, 0)).into())?;
    sock.connect(&to.into())?;
    Ok(sock.into())
}

/// Whether the broker has closed `s`: reading what it sent (a greeting) ends in
/// the end of the stream rather than in nothing more to read.
fn is_closed(mut s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 512];
    let closed = loop {
        match std::io::Read::read(&mut s, &mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) => break e.kind() != std::io::ErrorKind::WouldBlock,
        }
    };
    s.set_nonblocking(false).unwrap();
    closed
}

/// Connections past the per-address and overall caps are closed at once, logged
/// with a rate limit, and a client from another address is served meanwhile; the
/// broker's descriptors stay bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libzmq_connections_past_the_caps_are_closed() {
    let s = Scratch::new();
    let broker = s
        .broker(BrokerOpts {
            transport: TransportKind::Libzmq,
            durable: false,
            extra: "max_connections = 8\nmax_connections_per_address = 4\n".into(),
            ..BrokerOpts::default()
        })
        .await;
    let client = broker.client();
    client.ping().await.unwrap();
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", broker.proc.pid()))
            .unwrap()
            .count()
    };
    let before = fds();

    let a = Ipv4Addr::new(127, 0, 0, 2);
    let held: Vec<TcpStream> = (0..12)
        .map(|_| connect_from(a, &broker.frontend).unwrap())
        .collect();
    let open = eventually(
        "connections over the per-address cap to close",
        Duration::from_secs(10),
        || {
            let open = held.iter().filter(|s| !is_closed(s)).count();
            async move { (open == 4).then_some(open) }
        },
    )
    .await;
    assert_eq!(open, 4);
    client.ping().await.unwrap();

    // From another address, only what the overall cap leaves (8, the client holds 1).
    let b = Ipv4Addr::new(127, 0, 0, 3);
    let more: Vec<TcpStream> = (0..12)
        .map(|_| connect_from(b, &broker.frontend).unwrap())
        .collect();
    eventually(
        "connections over the overall cap to close",
        Duration::from_secs(10),
        || {
            let open = more.iter().filter(|s| !is_closed(s)).count();
            async move { (open <= 3).then_some(()) }
        },
    )
    .await;
    assert!(
        fds() <= before + 8,
        "{} descriptors, {before} before",
        fds()
    );
    log_line(&broker, "refused a connection: already holding the most").await;
    let lines = broker
        .log()
        .matches("refused a connection: already holding")
        .count();
    assert!(
        lines <= 2,
        "refusals are logged with a rate limit: {lines} lines"
    );

    // The held connections go away; a new one from the first address is let in.
    drop(held);
    drop(more);
    eventually(
        "a new connection from the capped address",
        Duration::from_secs(10),
        || async {
            let z = Zmtp::handshake(connect_from(a, &broker.frontend).ok()?, "DEALER").ok()?;
            (!is_closed(&z.stream)).then_some(())
        },
    )
    .await;
    client.ping().await.unwrap();
}

/// A "broker" that completes the handshake with a worker and then announces a
/// 32 GiB frame: libzmq's `ZMQ_MAXMSGSIZE` drops the connection, and the worker
/// lives, connects again and introduces itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libzmq_a_worker_survives_a_hostile_broker() {
    let s = Scratch::new();
    let broker = s
        .broker(BrokerOpts {
            transport: TransportKind::Libzmq,
            durable: false,
            ..BrokerOpts::default()
        })
        .await;
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_ep = format!("tcp://{}", fake.local_addr().unwrap());
    let mut worker = s.worker_unchecked(
        &broker,
        &WorkerOpts {
            env: vec![("KILN_WORKER__BROKER".into(), fake_ep)],
            ..WorkerOpts::sim("w1")
        },
    );
    let fake = tokio::task::spawn_blocking(move || {
        let mut z = accept_zmtp(&fake);
        let closed = z
            .oversize_header(Duration::from_secs(10))
            .expect("the oversize header is written");
        assert!(closed, "the worker kept a connection that announced 32 GiB");
        fake
    })
    .await
    .unwrap();
    assert!(worker.is_running(), "the worker died");
    let register = tokio::task::spawn_blocking(move || {
        let mut z = accept_zmtp(&fake);
        z.recv().expect("the worker's first message")
    })
    .await
    .unwrap();
    let frames: Vec<Bytes> = register.into_iter().map(Bytes::from).collect();
    let msg: WorkerMessage = kiln_protocol::frame::decode(&frames, usize::MAX).unwrap();
    assert!(
        matches!(&msg, WorkerMessage::Register(r) if r.worker_id == "w1"),
        "{msg:?}"
    );
    assert!(worker.is_running());
}

/// Accepts connections until one completes a ZMTP handshake (as a ROUTER);
/// connection probes that close at once are skipped.
fn accept_zmtp(listener: &TcpListener) -> Zmtp {
    loop {
        let (s, _) = listener.accept().expect("the worker connects");
        if let Ok(z) = Zmtp::handshake(s, "ROUTER") {
            return z;
        }
    }
}
