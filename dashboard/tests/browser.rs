//! The dashboard in a real browser: Debian's headless Chromium driven over
//! WebDriver (chromedriver) against a real broker with two sim workers and a real
//! `kiln-dashboard` process. One browser session walks every page, so the whole
//! file costs one Chromium start (CI has two cores).
//!
//! Screenshots of each page are written to `target/dashboard-screenshots/`.

use std::path::PathBuf;
use std::time::Duration;

use fantoccini::{ClientBuilder, Locator};
use kiln_protocol::{Backend, Client, JobId, JobSpec, JobState, Task};
use kiln_testkit::{bin, eventually, free_port, BrokerOpts, Proc, Scratch, WorkerOpts};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// `kiln-dashboard` on a free loopback port, configured for `broker`.
fn start_dashboard(scratch: &Scratch, broker: &kiln_testkit::Broker) -> (Proc, String) {
    let port = free_port();
    let o = broker.client_options();
    let config = scratch.path().join("dashboard.toml");
    std::fs::write(
        &config,
        format!(
            "[client]\nbroker = \"{}\"\nevents = \"{}\"\ntransport = \"{}\"\n\n[dashboard]\nbind = \"127.0.0.1:{port}\"\npoll_ms = 500\n",
            o.endpoint, o.events_endpoint, o.transport
        ),
    )
    .unwrap();
    let proc = Proc::spawn(
        "kiln-dashboard",
        &bin("kiln-dashboard"),
        &["--config".into(), config.display().to_string()],
        &[],
        scratch.path().join("dashboard.log"),
    );
    (proc, format!("http://127.0.0.1:{port}"))
}

/// chromedriver on a free port, and a headless Chromium session through it.
async fn start_browser(scratch: &Scratch) -> (Proc, fantoccini::Client) {
    let port = free_port();
    let driver = Proc::spawn(
        "chromedriver",
        &which("chromedriver"),
        &[format!("--port={port}")],
        &[],
        scratch.path().join("chromedriver.log"),
    );
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": which("chromium").display().to_string(),
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                     "--disable-dev-shm-usage", "--window-size=1280,1000",
                     "--autoplay-policy=no-user-gesture-required"]
        }),
    );
    let url = format!("http://127.0.0.1:{port}");
    let client = eventually("chromedriver to start a session", WAIT, || {
        let (caps, url) = (caps.clone(), url.clone());
        async move {
            let connector = hyper_util::client::legacy::connect::HttpConnector::new();
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&url)
                .await
                .ok()
        }
    })
    .await;
    (driver, client)
}

fn which(program: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{program} is not installed: run scripts/test-deps (Debian's chromium and chromium-driver)")
        })
}

async fn js(b: &fantoccini::Client, script: &str) -> Value {
    b.execute(script, vec![]).await.expect("script runs")
}

async fn screenshot(b: &fantoccini::Client, name: &str) {
    let dir = bin("kiln-dashboard")
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    let png = b.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

/// Opens a page of the app and waits until its section is shown.
async fn open(b: &fantoccini::Client, base: &str, hash: &str, section: &str) {
    b.goto(&format!("{base}/#/{hash}")).await.unwrap();
    let check =
        format!("const s = document.getElementById('page-{section}'); return !!s && !s.hidden;");
    eventually(&format!("page {section}"), WAIT, || {
        let check = check.clone();
        async move { (js(b, &check).await == json!(true)).then_some(()) }
    })
    .await;
}

/// Clicks the element with this id once it is there.
async fn click(b: &fantoccini::Client, id: &str) {
    let el = b.wait().for_element(Locator::Id(id)).await.unwrap();
    el.click().await.unwrap();
}

/// Answers the confirmation dialog with its confirm button.
async fn confirm(b: &fantoccini::Client) {
    click(b, "confirm-yes").await;
}

/// The text of the element with this id once it is shown (not `hidden`).
async fn shown_text(b: &fantoccini::Client, id: &str) -> String {
    let script = format!(
        "const r = document.getElementById('{id}'); return r && !r.hidden ? r.textContent : null;"
    );
    eventually(&format!("#{id} to show"), WAIT, || {
        let script = script.clone();
        async move { js(b, &script).await.as_str().map(str::to_string) }
    })
    .await
}

fn sim_job(steps: u32, step_ms: u32) -> JobSpec {
    JobSpec::new(Backend::Sim, Task::TextToImage)
        .param("prompt", "a kiln at dusk")
        .param("width", 96)
        .param("height", 64)
        .param("steps", steps)
        .param("step_ms", step_ms)
}

/// The value of the open job page's progress bar, once it has one above 0.
async fn progress(b: &fantoccini::Client, above: f64) -> f64 {
    eventually(
        &format!("the progress bar above {above}"),
        WAIT,
        || async move {
            let v = js(
                b,
                "const p = document.getElementById('job-progress'); return p ? p.value : null;",
            )
            .await;
            v.as_f64().filter(|v| *v > above)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_fleet_and_acts_on_jobs_in_a_real_browser() {
    let s = Scratch::new();
    let broker = s.broker(BrokerOpts::default()).await;
    let gpu_a = WorkerOpts {
        labels: vec!["a".into()],
        ..WorkerOpts::sim("gpu-a")
    };
    let _w1 = s.worker(&broker, gpu_a).await;
    let _w2 = s.worker(&broker, WorkerOpts::sim("gpu-b")).await;
    let client: Client = broker.client();
    let (_dash, base) = start_dashboard(&s, &broker);
    let (_driver, b) = start_browser(&s).await;

    // Fleet: both GPUs, each with its name and VRAM.
    open(&b, &base, "fleet", "fleet").await;
    eventually("both GPUs on the fleet page", WAIT, || async {
        let ids = js(
            &b,
            "return Array.from(document.querySelectorAll('#gpus .gpu')).map(c => [c.dataset.worker, c.querySelector('.name').textContent, c.querySelector('.vram-text').textContent]);",
        )
        .await;
        let cards = ids.as_array()?.clone();
        let names: Vec<&str> = cards.iter().filter_map(|c| c[0].as_str()).collect();
        (names == ["gpu-a", "gpu-b"]
            && cards
                .iter()
                .all(|c| c[1] == "test GPU" && c[2].as_str().is_some_and(|t| t.ends_with("/ 24.0 GiB"))))
        .then_some(())
    })
    .await;

    // Two models run on gpu-a stay resident there (the sim keeps models up to
    // its memory); its card lists both, most recently used first.
    for model in ["sim-sd15", "sim-sdxl"] {
        let mut job = sim_job(2, 5);
        job.model = Some(model.into());
        job.labels = vec!["a".into()];
        let id = client.submit(job).await.unwrap().job_id;
        assert_eq!(client.wait(id).await.unwrap().state, JobState::Succeeded);
    }
    eventually("both resident models on gpu-a's card", WAIT, || async {
        let text = js(
            &b,
            "return document.querySelector('#gpus .gpu[data-worker=\"gpu-a\"] .resident').textContent;",
        )
        .await;
        (text == json!("sim-sdxl, sim-sd15")).then_some(())
    })
    .await;
    screenshot(&b, "fleet").await;

    // A running job's bar advances with no reload: a marker set on the page
    // survives while the value is read twice.
    let long = client.submit(sim_job(400, 50)).await.unwrap().job_id;
    open(&b, &base, &format!("jobs/{long}"), "job").await;
    js(&b, "window.__kilnNoReload = 42; return null;").await;
    // Where the bar and its figures sit: nothing may move as the numbers change.
    let layout = "return ['job-progress', 'job-pct', 'job-eta'].map(id => { const r = document.getElementById(id).getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; });";
    let first = progress(&b, 0.0).await;
    let before = js(&b, layout).await;
    let second = progress(&b, first).await;
    assert!(second > first, "{second} > {first}");
    assert_eq!(
        js(&b, layout).await,
        before,
        "the bar and its figures kept their place"
    );
    assert_eq!(
        js(&b, "return window.__kilnNoReload ?? null;").await,
        json!(42),
        "the page was reloaded"
    );
    // The fleet page shows the same job's bar on its GPU; the `1` key leads there.
    b.find(Locator::Css("body"))
        .await
        .unwrap()
        .send_keys("1")
        .await
        .unwrap();
    eventually("the 1 key to open the fleet page", WAIT, || async {
        (js(&b, "return location.hash;").await == json!("#/fleet")).then_some(())
    })
    .await;
    let on_card = format!("const p = document.querySelector('#gpus progress[data-job=\"{long}\"]'); return p ? p.value : null;");
    eventually("the job's bar on its GPU card", WAIT, || {
        let on_card = on_card.clone();
        let b = &b;
        async move { js(b, &on_card).await.as_f64().filter(|v| *v > 0.0) }
    })
    .await;
    screenshot(&b, "fleet-busy").await;
    // A phone-sized window: the cards stack and nothing overflows sideways.
    b.set_window_size(390, 844).await.unwrap();
    let overflow = js(
        &b,
        "return document.documentElement.scrollWidth > document.documentElement.clientWidth;",
    )
    .await;
    assert_eq!(
        overflow,
        json!(false),
        "no sideways scrolling on a narrow screen"
    );
    screenshot(&b, "fleet-narrow").await;
    b.set_window_size(1280, 1000).await.unwrap();

    // Both GPUs busy: a third job waits, and the Queue page shows it at the
    // head of the line with its client.
    let other = client.submit(sim_job(400, 50)).await.unwrap().job_id;
    let waiting = client.submit(sim_job(400, 50)).await.unwrap().job_id;
    open(&b, &base, "queue", "queue").await;
    let row = format!(
        "const r = document.querySelector('#queue-table tr[data-job=\"{waiting}\"]'); return r ? Array.from(r.cells).map(c => c.textContent) : null;"
    );
    let cells = eventually("the waiting job on the queue page", WAIT, || {
        let row = row.clone();
        let b = &b;
        async move { js(b, &row).await.as_array().cloned() }
    })
    .await;
    // The position is the broker's (`—` when it reports none, e.g. a job a busy
    // worker already holds under pipelined dispatch); nothing ahead of it here.
    assert!(
        cells[0] == "1" || cells[0] == "—",
        "first in line: {cells:?}"
    );
    assert!(
        cells[6].as_str().is_some_and(|why| !why.trim().is_empty()),
        "why it waits is said: {cells:?}"
    );
    assert_eq!(
        cells[2],
        json!(client.welcome().unwrap().client),
        "{cells:?}"
    );
    screenshot(&b, "queue").await;
    // Cancel the waiting one by id from the Actions page.
    open(&b, &base, "actions", "actions").await;
    b.find(Locator::Id("act-id"))
        .await
        .unwrap()
        .send_keys(&waiting.to_string())
        .await
        .unwrap();
    click(&b, "act-cancel").await;
    confirm(&b).await;
    let text = shown_text(&b, "act-result").await;
    assert!(
        text.starts_with(&format!("{waiting}: cancel requested; the job is ")),
        "{text}"
    );
    eventually("the waiting job to be cancelled", WAIT, || async {
        (client.get(waiting).await.ok()?.state == JobState::Cancelled).then_some(())
    })
    .await;
    client.cancel(other).await.unwrap();

    // Cancel from the job's page: confirm, then the job stops on its GPU.
    open(&b, &base, &format!("jobs/{long}"), "job").await;
    click(&b, "job-cancel").await;
    confirm(&b).await;
    let done = eventually("the cancelled job to end", WAIT, || async {
        let j = client.get(long).await.ok()?;
        j.state.is_terminal().then_some(j)
    })
    .await;
    assert_eq!(done.state, JobState::Cancelled, "{done:?}");
    // 400 steps of 50 ms would take 20 s.
    let ran = done.finished_ms.unwrap() - done.started_ms.unwrap();
    assert!(ran < 15_000, "stopped before the end: ran {ran} ms");
    eventually("the GPU to be free again", WAIT, || async {
        let workers = client.workers().await.ok()?;
        workers
            .iter()
            .all(|w| w.current_job != Some(long))
            .then_some(())
    })
    .await;
    let text = shown_text(&b, "job-result").await;
    assert!(text.contains("cancel requested"), "{text}");

    // A finished job's page shows its image, decoded by the browser.
    let short: JobId = client.submit(sim_job(3, 10)).await.unwrap().job_id;
    let finished = client.wait(short).await.unwrap();
    assert_eq!(finished.state, JobState::Succeeded, "{finished:?}");
    open(&b, &base, &format!("jobs/{short}"), "job").await;
    let width = eventually("the output image to load", WAIT, || async {
        let w = js(
            &b,
            "const i = document.querySelector('#job-body img.preview'); return i && i.complete ? i.naturalWidth : null;",
        )
        .await;
        w.as_u64().filter(|w| *w > 0)
    })
    .await;
    assert_eq!(width, 96, "the image the job asked for");
    let timeline = b
        .find(Locator::Css(".timeline"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        timeline.contains("succeeded") && timeline.contains("running"),
        "{timeline}"
    );
    screenshot(&b, "job").await;

    // The Jobs search finds the cancelled jobs.
    open(&b, &base, "jobs", "jobs").await;
    let search = b
        .wait()
        .for_element(Locator::Css("#jobs-filter input[name=q]"))
        .await
        .unwrap();
    search.send_keys("cancelled").await.unwrap();
    let listed = "return Array.from(document.querySelectorAll('#jobs-table tbody tr')).map(r => r.dataset.job);";
    eventually("the search to list the cancelled jobs", WAIT, || {
        let b = &b;
        let want = json!([waiting.to_string(), other.to_string(), long.to_string()]);
        async move { (js(b, listed).await == want).then_some(()) }
    })
    .await;
    screenshot(&b, "jobs").await;

    // Actions: a bad field is named; a good form queues a job.
    open(&b, &base, "actions", "actions").await;
    eventually("the backend list to come from the fleet", WAIT, || async {
        (js(&b, "return document.getElementById('f-backend').value;").await == json!("sim"))
            .then_some(())
    })
    .await;
    let priority = b.find(Locator::Id("f-priority")).await.unwrap();
    priority.send_keys("99").await.unwrap();
    click(&b, "submit-go").await;
    confirm(&b).await;
    let err = b
        .wait()
        .for_element(Locator::Css("#submit-form .field-error"))
        .await
        .unwrap();
    let err = err.text().await.unwrap();
    assert!(
        err.contains("priority") && err.contains("-10 to 10"),
        "{err}"
    );
    priority.clear().await.unwrap();
    click(&b, "submit-go").await;
    confirm(&b).await;
    let queued = eventually("the submitted job's link", WAIT, || async {
        let t = js(&b, "const a = document.querySelector('#submit-result.ok a'); return a ? a.textContent : null;").await;
        t.as_str().map(str::to_string)
    })
    .await;
    let queued: JobId = queued.parse().unwrap();
    let snap = client.get(queued).await.unwrap();
    assert_eq!(snap.backend, Backend::Sim);
    assert_eq!(
        snap.params
            .as_ref()
            .and_then(|p| p.get("prompt"))
            .and_then(Value::as_str),
        Some("a kiln at dusk, test render")
    );
    screenshot(&b, "actions").await;

    b.close().await.unwrap();
}
