//! The dashboard's HTTP surface without a browser: the token and its login
//! cookie, the Host and JSON guards, validation errors that name the field, and
//! artifacts with byte ranges, against a real broker, a sim worker and the real
//! `kiln-dashboard` binary.

use std::time::Duration;

use kiln_protocol::{Backend, JobSpec, JobState, Task};
use kiln_testkit::{bin, eventually, free_port, Broker, BrokerOpts, Proc, Scratch, WorkerOpts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(20);

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 request with `Connection: close`; the answer read to its end.
async fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: 127.0.0.1:{port}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect::<Vec<_>>();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Answer {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..end]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[end + 2..end + 2 + size]);
        data = &data[end + 4 + size..];
    }
}

fn dashboard(s: &Scratch, broker: &Broker, extra: &str, args: &[&str]) -> (Proc, u16) {
    let port = free_port();
    let o = broker.client_options();
    let token = o
        .token
        .as_ref()
        .map(|t| format!("token = \"{t}\"\n"))
        .unwrap_or_default();
    let config = s.path().join(format!("dashboard-{port}.toml"));
    std::fs::write(
        &config,
        format!(
            "[client]\nbroker = \"{}\"\nevents = \"{}\"\ntransport = \"{}\"\n{token}\n[dashboard]\nbind = \"127.0.0.1:{port}\"\npoll_ms = 300\n{extra}\n",
            o.endpoint, o.events_endpoint, o.transport
        ),
    )
    .unwrap();
    let mut all = vec!["--config".to_string(), config.display().to_string()];
    all.extend(args.iter().map(|a| a.to_string()));
    let proc = Proc::spawn(
        "kiln-dashboard",
        &bin("kiln-dashboard"),
        &all,
        &[],
        s.path().join(format!("dashboard-{port}.log")),
    );
    (proc, port)
}

async fn until_up(port: u16, auth: &[(&str, &str)]) {
    eventually("the dashboard to see the broker", WAIT, || async move {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()?;
        drop(s);
        let a = request(port, "GET", "/api/live", auth, "").await;
        (a.status == 200 && a.text().contains("\"connected\":true")).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guards_errors_and_artifact_ranges() {
    let s = Scratch::new();
    let broker = s.broker(BrokerOpts::default()).await;
    let _w = s.worker(&broker, WorkerOpts::sim("gpu-a")).await;

    // Off loopback without a token it refuses to start, and says why.
    let (mut open, _) = dashboard(&s, &broker, "", &["--bind", "0.0.0.0:0"]);
    let status = open.wait_exit(WAIT).expect("it exits");
    assert!(!status.success());
    assert!(open.log().contains("without a token"), "{}", open.log());

    // With a token: pages redirect to the login, the API answers 401, and both
    // the bearer header and the login cookie let in.
    let (_d, port) = dashboard(&s, &broker, "token = \"s3cret-t0ken\"", &[]);
    let bearer = [("Authorization", "Bearer s3cret-t0ken")];
    until_up(port, &bearer).await;
    let page = request(port, "GET", "/", &[], "").await;
    assert_eq!(
        (page.status, page.header("location")),
        (303, Some("/login"))
    );
    let api = request(port, "GET", "/api/live", &[], "").await;
    assert_eq!(api.status, 401, "{}", api.text());
    assert!(
        api.text().contains("missing or wrong token"),
        "{}",
        api.text()
    );
    let wrong = request(
        port,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "token=nope",
    )
    .await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.text().contains("wrong token"));
    let login = request(
        port,
        "POST",
        "/login",
        &[("Content-Type", "application/x-www-form-urlencoded")],
        "token=s3cret-t0ken",
    )
    .await;
    assert_eq!(login.status, 303);
    let cookie = login.header("set-cookie").expect("a cookie").to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    let index = request(port, "GET", "/", &[("Cookie", &pair)], "").await;
    assert_eq!(index.status, 200);
    assert!(
        index.text().contains("<script src=\"/app.js\""),
        "the embedded page"
    );
    assert!(index
        .header("content-security-policy")
        .is_some_and(|c| c.contains("script-src 'self'")));

    // Actions take JSON only, from this origin only; bad fields are named.
    let form = request(
        port,
        "POST",
        "/api/submit",
        &[
            bearer[0],
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        "backend=sim",
    )
    .await;
    assert_eq!(form.status, 415);
    let json = ("Content-Type", "application/json");
    let cross = request(
        port,
        "POST",
        "/api/submit",
        &[bearer[0], json, ("Origin", "http://evil.example")],
        "{}",
    )
    .await;
    assert_eq!(cross.status, 403, "{}", cross.text());
    let bad = request(
        port,
        "POST",
        "/api/submit",
        &[bearer[0], json],
        r#"{"backend":"sim","prompt":"x","steps":"lots"}"#,
    )
    .await;
    assert_eq!(bad.status, 422, "{}", bad.text());
    let v: serde_json::Value = serde_json::from_slice(&bad.body).unwrap();
    assert_eq!(v["field"], "steps", "{v}");
    let broker_says = request(
        port,
        "POST",
        "/api/submit",
        &[bearer[0], json],
        r#"{"backend":"wan2gp","prompt":"x"}"#,
    )
    .await;
    assert_eq!(
        broker_says.status,
        422,
        "no wan2gp worker: {}",
        broker_says.text()
    );
    let missing = request(port, "GET", "/api/jobs/j999999", &bearer, "").await;
    assert_eq!(missing.status, 404, "{}", missing.text());
    let filter = request(port, "GET", "/api/jobs?state=done", &bearer, "").await;
    assert_eq!(filter.status, 422);
    assert!(
        filter.text().contains("\"field\":\"state\""),
        "{}",
        filter.text()
    );

    // An artifact, whole and by range; the bytes are the broker's.
    let client = broker.client();
    let job = JobSpec::new(Backend::Sim, Task::TextToImage)
        .param("prompt", "range test")
        .param("width", 64)
        .param("height", 64)
        .param("steps", 2);
    let id = client.submit(job).await.unwrap().job_id;
    let done = client.wait(id).await.unwrap();
    assert_eq!(done.state, JobState::Succeeded);
    let meta = &done.artifacts[0];
    let real = client.fetch_artifact(meta.id).await.unwrap().data;
    let path = format!("/api/artifacts/{}", meta.id);
    let whole = request(port, "GET", &path, &bearer, "").await;
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body, real);
    assert_eq!(whole.header("content-type"), Some("image/png"));
    assert!(whole
        .header("content-disposition")
        .is_some_and(|d| d.starts_with("inline")));
    let part = request(
        port,
        "GET",
        &path,
        &[bearer[0], ("Range", "bytes=8-23")],
        "",
    )
    .await;
    assert_eq!(part.status, 206);
    assert_eq!(part.body, real[8..24]);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 8-23/{}", real.len()).as_str())
    );
    let download = request(port, "GET", &format!("{path}?download=1"), &bearer, "").await;
    assert!(download
        .header("content-disposition")
        .is_some_and(|d| d.starts_with("attachment")));
    let past = request(
        port,
        "GET",
        &path,
        &[bearer[0], ("Range", &format!("bytes={}-", real.len()))],
        "",
    )
    .await;
    assert_eq!(past.status, 416);

    // Resubmit makes a new job with the same parameters; cancel answers the state.
    let again = request(
        port,
        "POST",
        &format!("/api/jobs/{id}/resubmit"),
        &[bearer[0], json],
        "{}",
    )
    .await;
    assert_eq!(again.status, 200, "{}", again.text());
    let v: serde_json::Value = serde_json::from_slice(&again.body).unwrap();
    assert_eq!(v["action"], "resubmit");
    let new_id: kiln_protocol::JobId = v["accepted"]["job_id"].as_str().unwrap().parse().unwrap();
    assert_ne!(new_id, id);
    let copy = client.get(new_id).await.unwrap();
    assert_eq!(copy.params, client.get(id).await.unwrap().params);
    let cancel = request(
        port,
        "POST",
        &format!("/api/jobs/{new_id}/cancel"),
        &[bearer[0], json],
        "{}",
    )
    .await;
    assert_eq!(cancel.status, 200, "{}", cancel.text());
    let gone = request(
        port,
        "POST",
        "/api/jobs/j999999/resubmit",
        &[bearer[0], json],
        "{}",
    )
    .await;
    assert_eq!(gone.status, 404, "{}", gone.text());

    // What a snapshot lacks comes along too: the sim mixes its input files into
    // each output's seed, so the copy's image is the original's byte for byte
    // only if the broker resubmitted the input file with the rest.
    let with_input = |data: Vec<u8>| {
        let mut job = JobSpec::new(Backend::Sim, Task::ImageToImage)
            .param("prompt", "resubmit test")
            .param("width", 32)
            .param("height", 32)
            .param("steps", 1)
            .param("seed", 11);
        if !data.is_empty() {
            job.inputs.push(kiln_protocol::InputFile {
                name: "init.png".into(),
                media_type: "image/png".into(),
                data,
            });
        }
        job.min_vram_mb = Some(1);
        job
    };
    let original = client
        .submit(with_input(vec![1, 2, 3, 4]))
        .await
        .unwrap()
        .job_id;
    let original = client.wait(original).await.unwrap();
    let bare = client.submit(with_input(vec![])).await.unwrap().job_id;
    let bare = client.wait(bare).await.unwrap();
    assert_ne!(
        bare.artifacts[0].sha256, original.artifacts[0].sha256,
        "the input changes the image"
    );
    let again = request(
        port,
        "POST",
        &format!("/api/jobs/{}/resubmit", original.job_id),
        &[bearer[0], json],
        "{}",
    )
    .await;
    assert_eq!(again.status, 200, "{}", again.text());
    let v: serde_json::Value = serde_json::from_slice(&again.body).unwrap();
    let copy: kiln_protocol::JobId = v["accepted"]["job_id"].as_str().unwrap().parse().unwrap();
    let copy = client.wait(copy).await.unwrap();
    assert_eq!(copy.state, JobState::Succeeded, "{:?}", copy.error);
    assert_eq!(copy.artifacts[0].sha256, original.artifacts[0].sha256);
    let copy = client.get(copy.job_id).await.unwrap();
    assert_eq!(
        copy.history[0].note,
        format!("resubmitted from {}", original.job_id)
    );

    // Without a token, only the loopback names are answered (DNS rebinding).
    let (_d2, open_port) = dashboard(&s, &broker, "", &[]);
    until_up(open_port, &[]).await;
    let rebound = request(
        open_port,
        "GET",
        "/api/live",
        &[("Host", "evil.example:80")],
        "",
    )
    .await;
    assert_eq!(rebound.status, 403, "{}", rebound.text());
    let local = request(open_port, "GET", "/api/live", &[("Host", "localhost")], "").await;
    assert_eq!(local.status, 200);
}

/// The running job's progress in the live view, when it has some above `above`.
async fn live_pct(port: u16, job: &str, above: f64) -> Option<f64> {
    let a = request(port, "GET", "/api/live", &[], "").await;
    let v: serde_json::Value = serde_json::from_slice(&a.body).ok()?;
    v["running"]
        .as_array()?
        .iter()
        .find(|j| j["job_id"] == job)?["progress"]["pct"]
        .as_f64()
        .filter(|p| *p > above)
}

/// A broker with a client token and no CURVE keeps its events port closed; the
/// dashboard then keeps the live view current from its poll alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_view_follows_jobs_by_polling_when_the_events_port_is_closed() {
    let s = Scratch::new();
    let broker = s
        .broker(BrokerOpts {
            client_token: Some("client-t0ken".into()),
            ..BrokerOpts::default()
        })
        .await;
    let _w = s.worker(&broker, WorkerOpts::sim("gpu-a")).await;
    let (_d, port) = dashboard(&s, &broker, "", &[]);
    until_up(port, &[]).await;
    let client = broker.client();
    let job = JobSpec::new(Backend::Sim, Task::TextToImage)
        .param("prompt", "polled")
        .param("width", 64)
        .param("height", 64)
        .param("steps", 300)
        .param("step_ms", 50);
    let id = client.submit(job).await.unwrap().job_id.to_string();
    let first = eventually("progress in the live view", WAIT, || {
        let id = id.clone();
        async move { live_pct(port, &id, 0.0).await }
    })
    .await;
    let second = eventually("more progress in the live view", WAIT, || {
        let id = id.clone();
        async move { live_pct(port, &id, first).await }
    })
    .await;
    assert!(second > first);
    let live = request(port, "GET", "/api/live", &[], "").await;
    let v: serde_json::Value = serde_json::from_slice(&live.body).unwrap();
    assert!(
        v["broker"].get("last_event_ms").is_none(),
        "no event came through a closed events port: {}",
        v["broker"]
    );
    client.cancel(id.parse().unwrap()).await.unwrap();
}
