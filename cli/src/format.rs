//! Everything the CLI prints for people, in one place: job status, the jobs table,
//! times, and broker errors. Pure functions of the protocol types, so the output is
//! snapshot-tested (cli/tests/snapshots) and a protocol field change is adopted here
//! once.

use std::fmt::Write as _;

use kiln_protocol::{ClientError, ErrorBody, ErrorCode, FailureKind, JobSnapshot, JobState};

use crate::table::Table;

/// `2026-12-01 00:45:12.345Z`: UTC, millisecond precision, sortable.
pub fn time_ms(epoch_ms: u64) -> String {
    let secs = epoch_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        epoch_ms % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's
/// `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `+1.234s` after `from`, for the history column.
fn offset(from_ms: u64, at_ms: u64) -> String {
    let d = at_ms.saturating_sub(from_ms);
    if d < 60_000 {
        format!("+{}.{:03}s", d / 1000, d % 1000)
    } else {
        format!("+{}m{:02}s", d / 60_000, d / 1000 % 60)
    }
}

/// A failure kind as people read it.
pub fn failure_kind(kind: FailureKind) -> String {
    // The wire name (`out_of_memory`) with spaces: stable and free of Rust names.
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(|s| s.replace('_', " ")))
        .unwrap_or_else(|| "failure".into())
}

/// The snapshot fields `kiln status` shows in its own way or leaves to `--json`
/// (`info`, `params`); any other field with a value gets a line of its own
/// ([`JobSnapshot::other_fields`]), so a field added to the snapshot shows here.
const STATUS_PRESENTED: &[&str] = &[
    "job_id",
    "seq",
    "state",
    "cancel_requested",
    "backend",
    "task",
    "model",
    "client",
    "attempt",
    "tries",
    "max_attempts",
    "worker",
    "gpu",
    "progress",
    "queue_position",
    "waiting",
    "error",
    "artifacts",
    "info",
    "params",
    // The Rust client gives every submit a random key (safe retries): noise here.
    "idempotency_key",
    "created_ms",
    "started_ms",
    "finished_ms",
    "history",
];

/// `kiln status`: the job's state, placement, progress and history.
pub fn status(snap: &JobSnapshot) -> String {
    let mut s = String::new();
    let mut line = |k: &str, v: String| {
        let _ = writeln!(s, "{k:<10} {v}");
    };
    line("job", snap.job_id.to_string());
    line(
        "state",
        format!(
            "{}{}",
            snap.state,
            if snap.cancel_requested && !snap.state.is_terminal() {
                " (cancel requested)"
            } else {
                ""
            }
        ),
    );
    line(
        "backend",
        format!("{} / {}", snap.backend, snap.task.as_str()),
    );
    if let Some(m) = &snap.model {
        line("model", m.clone());
    }
    line("client", snap.client.clone());
    line(
        "attempts",
        format!("{} of at most {}", snap.tries, snap.max_attempts),
    );
    // `gpu` already names the worker: `box1-gpu0 (NVIDIA RTX 4090)`.
    if let Some(w) = snap.gpu.as_ref().or(snap.worker.as_ref()) {
        line("worker", w.clone());
    }
    // Progress belongs to a running attempt; a finished job's last stage would
    // read as if it were still encoding.
    if snap.state == JobState::Running {
        if let Some(p) = &snap.progress {
            line(
                "progress",
                format!("{:.0}% {}", p.pct, p.stage).trim_end().into(),
            );
        }
    }
    if let Some(q) = snap
        .queue_position
        .filter(|_| snap.state == JobState::Queued)
    {
        line("ahead", format!("{q} job(s)"));
    }
    if let Some(w) = snap
        .waiting
        .as_ref()
        .filter(|_| snap.state == JobState::Queued)
    {
        line("waiting", w.detail.clone());
    }
    if let Some(e) = &snap.error {
        line("error", format!("{}: {}", failure_kind(e.kind), e.message));
    }
    for a in &snap.artifacts {
        line(
            "output",
            format!("{} {} ({}, {} bytes)", a.id, a.name, a.media_type, a.size),
        );
    }
    for (key, value) in snap.other_fields(STATUS_PRESENTED) {
        let text = match value {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        line(&key, text);
    }
    line("submitted", time_ms(snap.created_ms));
    s.push_str("history\n");
    for t in &snap.history {
        let mut note = t.note.to_string();
        if note.is_empty() {
            note = match (t.state, &t.worker) {
                (JobState::Running, Some(w)) => format!("on {w}, attempt {}", t.attempt),
                (JobState::Succeeded, Some(w)) => format!("on {w}"),
                (JobState::Queued, _) if t.attempt > 1 => format!("attempt {}", t.attempt),
                _ => String::new(),
            };
        }
        let _ = writeln!(
            s,
            "  {:<9} {:<10} {}",
            offset(snap.created_ms, t.at_ms),
            t.state.as_str(),
            note
        );
        // Trailing spaces help nobody.
        let trimmed = s.trim_end().len();
        s.truncate(trimmed);
        s.push('\n');
    }
    s
}

/// `kiln jobs`: one row per job.
pub fn jobs_table(jobs: &[JobSnapshot]) -> String {
    let mut t = Table::new([
        "JOB",
        "STATE",
        "BACKEND",
        "TASK",
        "PROGRESS",
        "WORKER",
        "CLIENT",
        "TRIES",
        "SUBMITTED",
    ]);
    for j in jobs {
        t.row([
            j.job_id.to_string(),
            j.state.to_string(),
            j.backend.to_string(),
            j.task.as_str().to_string(),
            match (&j.progress, j.state) {
                (Some(p), JobState::Running) => format!("{:.0}%", p.pct),
                _ => "-".into(),
            },
            j.worker.clone().unwrap_or_else(|| "-".into()),
            j.client.clone(),
            format!("{}/{}", j.tries, j.max_attempts),
            time_ms(j.created_ms),
        ]);
    }
    t.render()
}

/// A broker refusal as a sentence: the message, the field it is about, and the
/// limit, without Rust type names.
pub fn broker_error(e: &ErrorBody) -> String {
    let mut s = e.message.clone();
    if let Some(f) = &e.field {
        if !s.contains(f.as_str()) {
            let _ = write!(s, " (field `{f}`)");
        }
    }
    if let Some(l) = e.limit {
        if !s.contains(&l.to_string()) {
            let _ = write!(s, " (limit {l})");
        }
    }
    match e.code {
        ErrorCode::Unauthenticated => {
            s.push_str("; set `client.token`, `client.token_file` or --token")
        }
        ErrorCode::Unavailable => s.push_str("; try again shortly"),
        _ => {}
    }
    s
}

/// A client error for people; `origin` says where the endpoint came from.
pub fn client_error(e: &ClientError, origin: &str) -> String {
    match e {
        ClientError::Broker(body) => broker_error(body),
        ClientError::Unreachable(u) => format!(
            "{u}\n  the endpoint comes from {origin}.\n  \
             Start a broker here with `kiln up` (or `kiln up --sim 2` without a GPU), \
             or point `client.broker` (or --broker, KILN_BROKER) at the running one."
        ),
        ClientError::Timeout { endpoint, .. } => format!(
            "{e}\n  the endpoint {endpoint} comes from {origin}; something accepts \
             connections there but no Kiln broker answered. Check `client.broker` \
             and the broker's log."
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_dates() {
        assert_eq!(time_ms(0), "1970-01-01 00:00:00.000Z");
        assert_eq!(time_ms(1_796_085_912_345), "2026-12-01 00:45:12.345Z");
        assert_eq!(time_ms(951_782_400_000), "2000-02-29 00:00:00.000Z");
        assert_eq!(offset(1000, 2234), "+1.234s");
        assert_eq!(offset(0, 125_000), "+2m05s");
    }

    /// A snapshot field `kiln status` has no code for (here `degrade` and a
    /// non-zero `priority`) still gets its line.
    #[test]
    fn snapshot_fields_without_code_of_their_own_are_shown() {
        let snap: JobSnapshot = serde_json::from_value(serde_json::json!({
            "job_id": "j7", "seq": 4, "state": "queued", "backend": "sim",
            "task": "text_to_image", "priority": -2, "client": "c", "attempt": 0,
            "max_attempts": 3, "degrade": 1, "created_ms": 1,
            "info": {"seed": 5}, "params": {"prompt": "x"}
        }))
        .unwrap();
        let text = status(&snap);
        assert!(text.contains("\npriority   -2\n"), "{text}");
        assert!(text.contains("\ndegrade    1\n"), "{text}");
        assert!(!text.contains("seed") && !text.contains("prompt"), "{text}");
    }

    /// A queued job says why it waits, once, in words (`waiting` has its own
    /// line, so it must not come back as a raw map among the other fields).
    #[test]
    fn a_queued_job_says_why_it_waits_once() {
        let snap: JobSnapshot = serde_json::from_value(serde_json::json!({
            "job_id": "j8", "seq": 2, "state": "queued", "backend": "sim", "priority": 0,
            "task": "text_to_image", "client": "c", "attempt": 0, "max_attempts": 3,
            "created_ms": 1, "queue_position": 0,
            "waiting": {"reason": "all_busy", "detail": "all 2 worker(s) that can run it are busy"}
        }))
        .unwrap();
        let text = status(&snap);
        assert!(
            text.contains("\nwaiting    all 2 worker(s) that can run it are busy\n"),
            "{text}"
        );
        assert_eq!(text.matches("waiting").count(), 1, "{text}");
        assert!(!text.contains("all_busy"), "{text}");
    }

    #[test]
    fn failure_kinds_read_as_words() {
        assert_eq!(failure_kind(FailureKind::OutOfMemory), "out of memory");
    }
}
