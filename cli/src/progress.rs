//! Following jobs on screen: a progress bar per job on a terminal, one line per
//! state change otherwise (logs, CI).

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_protocol::{Client, ClientError, JobId, JobSnapshot, JobState};

/// Shared by every job followed at once.
#[derive(Clone)]
pub struct Board {
    multi: MultiProgress,
    fancy: bool,
}

impl Board {
    pub fn new() -> Board {
        let fancy = std::io::stderr().is_terminal();
        let target = if fancy {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Board {
            multi: MultiProgress::with_draw_target(target),
            fancy,
        }
    }

    /// Prints a line above the bars (or plainly).
    pub fn println(&self, line: impl AsRef<str>) {
        if self.fancy {
            let _ = self.multi.println(line.as_ref());
        } else {
            eprintln!("{}", line.as_ref());
        }
    }

    /// Follows one job to its end, drawing its progress; returns the final snapshot.
    pub async fn follow(
        &self,
        client: &Client,
        job: JobId,
        label: &str,
    ) -> Result<JobSnapshot, ClientError> {
        let bar = self.multi.add(ProgressBar::new(1000));
        bar.set_style(
            ProgressStyle::with_template("{prefix:>6} [{bar:30}] {percent:>3}% {msg}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(job.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        let mut follow = client.follow(job).await?;
        let mut last_state = None;
        let mut last = None;
        while let Some(snap) = follow.next().await {
            let snap = snap?;
            let pct = snap.progress.as_ref().map_or(0.0, |p| p.pct);
            bar.set_position((pct * 10.0) as u64);
            let stage = snap
                .progress
                .as_ref()
                .map(|p| p.stage.clone())
                .unwrap_or_default();
            let place = snap
                .worker
                .clone()
                .map(|w| format!(" on {w}"))
                .unwrap_or_default();
            // Progress stages belong to a running attempt only.
            let stage = if snap.state == JobState::Running {
                stage
            } else {
                String::new()
            };
            bar.set_message(tidy(&format!("{} {stage}{place} {label}", snap.state)));
            if last_state != Some(snap.state) {
                if !self.fancy {
                    eprintln!("{}", tidy(&format!("{job} {}{place} {label}", snap.state)));
                }
                last_state = Some(snap.state);
            }
            last = Some(snap);
        }
        let snap = last.ok_or(ClientError::Closed)?;
        let verdict = match snap.state {
            JobState::Succeeded => format!("succeeded, {} output(s)", snap.artifacts.len()),
            JobState::Failed => format!(
                "failed: {}",
                snap.error.as_ref().map_or("", |e| e.message.as_str())
            ),
            other => other.to_string(),
        };
        let verdict = tidy(&format!("{verdict} {label}"));
        if snap.state == JobState::Succeeded {
            bar.set_position(1000);
            bar.finish_with_message(verdict);
        } else {
            // `finish` would fill the bar: a cancelled or failed job stays where it got.
            bar.abandon_with_message(verdict);
        }
        Ok(snap)
    }
}

/// One space between words, none at the ends (an empty label or stage leaves none).
fn tidy(line: &str) -> String {
    line.split_whitespace().collect::<Vec<_>>().join(" ")
}
