//! Wan2GP's progress events → Kiln progress with phase text.
//!
//! Wan2GP's own percentage is a per-phase heuristic, and its steps restart in every
//! sliding window and every sample, so the overall figure is computed here from
//! (sample, window, step) and kept from ever going backwards. Phases take these
//! shares of the bar: loading 0-5 %, text encoding 5-10 %, denoising 10-90 %,
//! VAE decoding 90-98 %, saving 98-99 %.

use crate::backend::{Phase, ProgressSink};

use super::protocol::ProgressMsg;

/// Follows one job's progress and remembers whether it loaded a model.
pub struct ProgressMapper {
    sink: ProgressSink,
    pct: f64,
    /// Wan2GP reported loading a model during this job.
    pub loaded_model: bool,
}

impl ProgressMapper {
    pub fn new(sink: ProgressSink) -> ProgressMapper {
        ProgressMapper {
            sink,
            pct: 0.0,
            loaded_model: false,
        }
    }

    pub fn progress(&mut self, p: &ProgressMsg) {
        let phase = p.phase.as_deref().unwrap_or("inference");
        if phase == "loading_model" {
            self.loaded_model = true;
        }
        self.sink.enter(if phase == "downloading_output" {
            Phase::Download
        } else {
            Phase::Sampling
        });
        let (from, to) = match phase {
            "loading_model" => (0.0, 5.0),
            "encoding_text" => (5.0, 10.0),
            "decoding" => (90.0, 98.0),
            "downloading_output" => (98.0, 99.0),
            "cancelled" => (self.pct, self.pct),
            _ => (10.0, 90.0),
        };
        let (sample, samples) = counter(p.sample, p.total_samples);
        let (window, windows) = counter(p.window, p.total_windows);
        let within = match (p.step, p.total_steps) {
            (Some(s), Some(t)) if t > 0 => (s.min(t) as f64) / t as f64,
            _ => 0.0,
        };
        let overall = ((sample - 1) as f64 * windows as f64 + (window - 1) as f64 + within)
            / (samples * windows) as f64;
        self.pct = self.pct.max(from + (to - from) * overall.clamp(0.0, 1.0));
        let label = p
            .raw_phase
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or(phase)
            .to_string();
        let mut stage = match (p.step, p.total_steps) {
            (Some(s), Some(t)) => format!("{label} {s}/{t}"),
            _ => label,
        };
        if samples > 1 {
            stage.push_str(&format!(", sample {sample}/{samples}"));
        }
        if windows > 1 {
            stage.push_str(&format!(", window {window}/{windows}"));
        }
        self.sink.report(kiln_protocol::Progress {
            pct: self.pct,
            step: p.step,
            steps: p.total_steps,
            stage,
        });
    }

    /// A status line such as "Loading model …".
    pub fn status(&mut self, text: &str) {
        if text.to_ascii_lowercase().contains("loading model") {
            self.loaded_model = true;
        }
        self.sink
            .stage(self.pct, text.chars().take(200).collect::<String>());
    }
}

/// (current, total), both at least 1, current at most total.
fn counter(current: Option<u32>, total: Option<u32>) -> (u32, u32) {
    let total = total.unwrap_or(1).max(1);
    (current.unwrap_or(1).clamp(1, total), total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(phase: &str, step: u32, total: u32) -> ProgressMsg {
        ProgressMsg {
            job_id: "j1-1".into(),
            phase: Some(phase.into()),
            raw_phase: Some("Denoising".into()),
            step: Some(step),
            total_steps: Some(total),
            ..ProgressMsg::default()
        }
    }

    #[test]
    fn steps_map_into_the_denoising_share_and_never_go_back() {
        let (sink, rx) = ProgressSink::new();
        let mut m = ProgressMapper::new(sink);
        m.status("Loading model t2v_2_2");
        assert!(m.loaded_model);
        m.progress(&msg("inference", 15, 30));
        let p = rx.latest().unwrap();
        assert_eq!(p.pct, 50.0);
        assert_eq!((p.step, p.steps), (Some(15), Some(30)));
        assert_eq!(p.stage, "Denoising 15/30");
        m.progress(&msg("encoding_text", 1, 1));
        assert_eq!(rx.latest().unwrap().pct, 50.0, "never decreases");
        m.progress(&ProgressMsg {
            phase: Some("decoding".into()),
            ..ProgressMsg::default()
        });
        assert_eq!(rx.latest().unwrap().pct, 90.0);
    }

    #[test]
    fn progress_events_time_sampling_and_the_download_phase() {
        let (sink, _rx) = ProgressSink::new();
        let mut m = ProgressMapper::new(sink.clone());
        m.progress(&msg("loading_model", 1, 1));
        m.progress(&msg("inference", 15, 30));
        m.progress(&msg("downloading_output", 1, 1));
        let phases: Vec<Phase> = sink.take_phases().into_iter().map(|(p, _)| p).collect();
        assert_eq!(phases, [Phase::Sampling, Phase::Download]);
    }

    #[test]
    fn windows_and_samples_count_towards_the_whole() {
        let (sink, rx) = ProgressSink::new();
        let mut m = ProgressMapper::new(sink);
        m.progress(&ProgressMsg {
            sample: Some(2),
            total_samples: Some(2),
            window: Some(1),
            total_windows: Some(2),
            ..msg("inference", 10, 10)
        });
        let p = rx.latest().unwrap();
        // sample 2 of 2, window 1 of 2 complete: 3 of 4 windows done.
        assert_eq!(p.pct, 70.0);
        assert_eq!(p.stage, "Denoising 10/10, sample 2/2, window 1/2");
        assert!(!m.loaded_model);
    }
}
