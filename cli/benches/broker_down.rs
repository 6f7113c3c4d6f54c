//! How long `kiln` takes to report a broker that is not running (issue #14: it
//! used to wait ~16.5 s). Prints figures; asserts nothing about time.
//!
//! ```sh
//! cargo build --release --bins && cargo bench -p kiln-cli --bench broker_down
//! # or, with the debug binaries the tests use:
//! cargo build --workspace --bins && cargo bench --profile dev -p kiln-cli --bench broker_down
//! ```
//!
//! Baseline in the same run: `kiln --version`, the cost of starting the process.

use std::process::Command;
use std::time::{Duration, Instant};

use kiln_testkit::{bin, free_port, Scratch};

const RUNS: usize = 20;

fn time(args: &[&str], s: &Scratch) -> (Duration, i32, String) {
    let start = Instant::now();
    let out = Command::new(bin("kiln"))
        .args(args)
        .env_remove("KILN_CONFIG")
        .env("HOME", s.path())
        .output()
        .expect("kiln runs");
    (
        start.elapsed(),
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn report(what: &str, mut times: Vec<Duration>) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what:<44} p50 {:>7.1} ms   max {:>7.1} ms   ({} runs)",
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1]),
        times.len()
    );
}

fn main() {
    let s = Scratch::new();
    println!("kiln binary: {}", bin("kiln").display());
    let mut baseline = Vec::new();
    let mut refused = Vec::new();
    let mut garbage = Vec::new();
    for _ in 0..RUNS {
        baseline.push(time(&["--version"], &s).0);
        let endpoint = format!("tcp://127.0.0.1:{}", free_port());
        let (d, code, err) = time(&["jobs", "--broker", &endpoint], &s);
        assert_eq!(code, 5, "{err}");
        refused.push(d);
        let (d, code, err) = time(&["jobs", "--broker", "garbage"], &s);
        assert_eq!(code, 6, "{err}");
        garbage.push(d);
    }
    report("kiln --version (baseline: process start)", baseline);
    report("kiln jobs, nothing listening (refused)", refused);
    report("kiln jobs --broker garbage", garbage);
}
