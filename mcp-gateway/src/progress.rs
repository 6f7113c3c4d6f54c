//! Folds job snapshots into MCP progress: one monotone value out of 100 for a call,
//! whether it runs one job or a batch of fifty, and a message a person can read
//! (`j12: sampling 12/30 on gpu0 (RTX 4090)`).
//!
//! MCP requires the progress value to increase with every notification. A job that
//! is retried on another worker starts again from zero, and a batch moves unevenly,
//! so the reported value is the running maximum; a new message at the same value
//! is nudged up by a hundredth so that it can still be sent.

use kiln_protocol::{JobSnapshot, JobState};

/// Progress of one tool call over its jobs.
#[derive(Debug)]
pub struct Aggregate {
    jobs: Vec<Option<JobSnapshot>>,
    /// Items the broker refused at submit: finished, as failures.
    refused: Vec<bool>,
    last_value: Option<f64>,
    last_message: String,
}

/// One notification to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub value: f64,
    pub total: f64,
    pub message: String,
}

/// What one snapshot says about its job, e.g. `j3: sampling 4/20 on w1 (RTX 4090)`.
pub fn describe(s: &JobSnapshot) -> String {
    let id = s.job_id;
    match s.state {
        JobState::Queued => match s.queue_position {
            Some(0) | None => format!("{id}: queued"),
            Some(n) => format!("{id}: queued, {n} ahead"),
        },
        JobState::Running => {
            let stage = s
                .progress
                .as_ref()
                .map(|p| p.stage.clone())
                .filter(|st| !st.is_empty())
                .unwrap_or_else(|| "starting".into());
            let place = place(s.worker.as_deref(), s.gpu.as_deref());
            format!("{id}: {stage}{place}")
        }
        JobState::Failed => match &s.error {
            Some(e) => format!("{id}: failed: {}", e.message),
            None => format!("{id}: failed"),
        },
        state => format!("{id}: {state}"),
    }
}

/// ` on gpu0 (RTX 4090)`: the broker's GPU label already names the worker.
pub fn place(worker: Option<&str>, gpu_label: Option<&str>) -> String {
    match (worker, gpu_label) {
        (_, Some(label)) => format!(" on {label}"),
        (Some(w), None) => format!(" on {w}"),
        (None, None) => String::new(),
    }
}

/// How far a job is, 0 to 100.
fn percent(s: &JobSnapshot) -> f64 {
    if s.state.is_terminal() {
        100.0
    } else {
        s.progress.as_ref().map_or(0.0, |p| p.pct.clamp(0.0, 100.0))
    }
}

impl Aggregate {
    pub fn new(jobs: usize) -> Aggregate {
        Aggregate {
            jobs: vec![None; jobs],
            refused: vec![false; jobs],
            last_value: None,
            last_message: String::new(),
        }
    }

    /// Records that item `index` was refused at submit (it counts as finished).
    pub fn update_failed(&mut self, index: usize) {
        self.refused[index] = true;
    }

    /// Records a snapshot of job `index`; returns the notification to send, if any.
    pub fn update(&mut self, index: usize, snapshot: JobSnapshot) -> Option<Update> {
        let message = self.message(index, &snapshot);
        self.jobs[index] = Some(snapshot);
        let n = self.jobs.len().max(1) as f64;
        let refused = self.refused.iter().filter(|r| **r).count() as f64;
        let mean = (self.jobs.iter().flatten().map(percent).sum::<f64>() + 100.0 * refused) / n;
        // Keep the last hundredth for the call's own end.
        let mut value = (mean * 100.0).round() / 100.0;
        if !self.all_done() {
            value = value.min(99.9);
        }
        if let Some(last) = self.last_value {
            value = value.max(last);
            if value == last {
                if message == self.last_message {
                    return None;
                }
                value = ((last + 0.01) * 100.0).round() / 100.0;
            }
        }
        if value > 100.0 {
            return None;
        }
        self.last_value = Some(value);
        self.last_message = message.clone();
        Some(Update {
            value,
            total: 100.0,
            message,
        })
    }

    fn all_done(&self) -> bool {
        self.jobs
            .iter()
            .zip(&self.refused)
            .all(|(j, refused)| *refused || j.as_ref().is_some_and(|s| s.state.is_terminal()))
    }

    fn message(&self, index: usize, snapshot: &JobSnapshot) -> String {
        let own = describe(snapshot);
        if self.jobs.len() == 1 {
            return own;
        }
        let mut done = 0;
        let mut failed = self.refused.iter().filter(|r| **r).count();
        for (i, j) in self.jobs.iter().enumerate() {
            let s = if i == index {
                Some(snapshot)
            } else {
                j.as_ref()
            };
            match s.map(|s| s.state) {
                Some(JobState::Succeeded) => done += 1,
                Some(JobState::Failed | JobState::Cancelled) => failed += 1,
                _ => {}
            }
        }
        let failed = if failed > 0 {
            format!(", {failed} failed")
        } else {
            String::new()
        };
        format!("{done}/{} done{failed} · {own}", self.jobs.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_protocol::{Backend, JobId, Progress, Task};

    fn snap(id: u64, state: JobState, pct: f64) -> JobSnapshot {
        JobSnapshot {
            job_id: JobId(id),
            seq: 1,
            state,
            backend: Backend::Sim,
            task: Task::TextToImage,
            model: None,
            priority: 0,
            client: "c".into(),
            attempt: 1,
            tries: 1,
            max_attempts: 3,
            worker: Some("gpu0".into()),
            gpu: Some("gpu0 (RTX 4090)".into()),
            progress: Some(Progress {
                pct,
                step: None,
                steps: None,
                stage: format!("sampling {}/100", pct as u32),
            }),
            error: None,
            artifacts: vec![],
            info: Default::default(),
            cancel_requested: false,
            degrade: 0,
            queue_position: None,
            waiting: None,
            created_ms: 0,
            started_ms: None,
            finished_ms: None,
            history: vec![],
            params: None,
            options: None,
            template: None,
        }
    }

    #[test]
    fn one_job_reports_its_stage_and_never_goes_back() {
        let mut a = Aggregate::new(1);
        let u = a.update(0, snap(3, JobState::Running, 12.0)).unwrap();
        assert_eq!(u.value, 12.0);
        assert_eq!(u.message, "j3: sampling 12/100 on gpu0 (RTX 4090)");
        // A retry starts again from zero: the value holds, the new message is nudged.
        let u = a.update(0, snap(3, JobState::Running, 0.0)).unwrap();
        assert_eq!(u.value, 12.01);
        assert!(
            a.update(0, snap(3, JobState::Running, 0.0)).is_none(),
            "nothing new"
        );
        let u = a.update(0, snap(3, JobState::Running, 100.0)).unwrap();
        assert_eq!(u.value, 99.9, "the end is kept for the terminal state");
        assert_eq!(
            a.update(0, snap(3, JobState::Succeeded, 100.0))
                .unwrap()
                .value,
            100.0
        );
    }

    #[test]
    fn a_batch_averages_its_jobs_and_counts_failures() {
        let mut a = Aggregate::new(4);
        assert_eq!(
            a.update(0, snap(1, JobState::Running, 40.0)).unwrap().value,
            10.0
        );
        let u = a.update(1, snap(2, JobState::Failed, 0.0)).unwrap();
        assert_eq!(u.value, 35.0);
        assert!(
            u.message.starts_with("0/4 done, 1 failed · j2: failed"),
            "{}",
            u.message
        );
        let u = a.update(0, snap(1, JobState::Succeeded, 100.0)).unwrap();
        assert_eq!(u.message, "1/4 done, 1 failed · j1: succeeded");
    }
}
