//! One percentage for a whole prompt, from ComfyUI's node- and step-level events.
//!
//! ComfyUI reports which node runs (`executing`), a node's own bar (`progress`,
//! throttled, not always reaching `max`, possibly several bars per node) and the
//! state of every node (`progress_state`). Nothing reports the whole prompt
//! (API.md §9), so the tracker counts nodes finished out of nodes to run (cached
//! nodes count as finished) plus the running node's bar, and never goes backwards.

use std::collections::{BTreeSet, HashMap};

use kiln_protocol::Progress;
use serde_json::Value;

/// The share of the job spent in ComfyUI; the rest is downloading outputs.
pub const RUN_SHARE: f64 = 95.0;

/// Follows one prompt's events.
#[derive(Debug)]
pub struct Tracker {
    to_run: BTreeSet<String>,
    class_of: HashMap<String, String>,
    done: BTreeSet<String>,
    current: Option<String>,
    bar: Option<(f64, f64)>,
    pct: f64,
}

fn num(v: Option<&Value>) -> Option<f64> {
    v.and_then(Value::as_f64)
}

impl Tracker {
    /// `to_run`: the node ids expected to execute; `graph` gives their classes.
    pub fn new(graph: &Value, to_run: BTreeSet<String>) -> Tracker {
        let class_of = graph
            .as_object()
            .map(|g| {
                g.iter()
                    .filter_map(|(id, n)| {
                        Some((id.clone(), n.get("class_type")?.as_str()?.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Tracker {
            to_run,
            class_of,
            done: BTreeSet::new(),
            current: None,
            bar: None,
            pct: 0.0,
        }
    }

    fn finish_node(&mut self, id: &str) {
        self.to_run.insert(id.to_string());
        self.done.insert(id.to_string());
        if self.current.as_deref() == Some(id) {
            self.current = None;
            self.bar = None;
        }
    }

    fn start_node(&mut self, id: &str) {
        if self.current.as_deref() == Some(id) {
            return;
        }
        // A new node starts only when the previous one is over.
        if let Some(prev) = self.current.take() {
            self.finish_node(&prev);
        }
        self.to_run.insert(id.to_string());
        self.current = Some(id.to_string());
        self.bar = None;
    }

    /// Feeds one JSON event of this prompt; returns the progress to report when it
    /// moved.
    pub fn on_event(&mut self, kind: &str, data: &Value) -> Option<Progress> {
        match kind {
            "execution_cached" => {
                for id in data
                    .get("nodes")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(id) = id.as_str() {
                        self.finish_node(id);
                    }
                }
            }
            "executing" => match data.get("node").and_then(Value::as_str) {
                Some(id) => self.start_node(id),
                None => return None,
            },
            "progress" => {
                let node = data.get("node").and_then(Value::as_str)?;
                self.start_node(node);
                let (value, max) = (num(data.get("value"))?, num(data.get("max"))?);
                self.bar = (max > 0.0).then_some((value.min(max), max));
            }
            "progress_state" => {
                let nodes = data.get("nodes").and_then(Value::as_object)?;
                for (id, st) in nodes {
                    if st.get("state").and_then(Value::as_str) == Some("finished") {
                        self.finish_node(id);
                    }
                }
            }
            _ => return None,
        }
        Some(self.report())
    }

    fn report(&mut self) -> Progress {
        let total = self.to_run.len().max(1) as f64;
        let frac = self.bar.map_or(0.0, |(v, m)| v / m);
        let running = self.current.iter().len() as f64 * frac;
        let pct = ((self.done.len() as f64 + running) / total).min(1.0) * RUN_SHARE;
        self.pct = self.pct.max(pct);
        let position = (self.done.len() + 1).min(self.to_run.len());
        let (stage, step, steps) = match &self.current {
            Some(id) => {
                let class = self.class_of.get(id).map_or(id.as_str(), String::as_str);
                match self.bar {
                    Some((v, m)) => (
                        format!(
                            "{class} {}/{} (node {position} of {})",
                            v as u64,
                            m as u64,
                            self.to_run.len()
                        ),
                        Some(v as u32),
                        Some(m as u32),
                    ),
                    None => (
                        format!("{class} (node {position} of {})", self.to_run.len()),
                        None,
                        None,
                    ),
                }
            }
            None => (
                format!("{} of {} nodes done", self.done.len(), self.to_run.len()),
                None,
                None,
            ),
        };
        Progress {
            pct: self.pct,
            step,
            steps,
            stage,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lines(path: &str) -> Vec<(String, Value)> {
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/comfyui/traces/"
        );
        std::fs::read_to_string(format!("{dir}{path}"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["kind"] == "text")
            .map(|v| {
                (
                    v["msg"]["type"].as_str().unwrap().to_string(),
                    v["msg"]["data"].clone(),
                )
            })
            .collect()
    }

    fn graph() -> Value {
        json!({
            "1": {"class_type": "EmptyImage", "inputs": {}},
            "2": {"class_type": "UpscaleModelLoader", "inputs": {}},
            "3": {"class_type": "ImageUpscaleWithModel", "inputs": {}},
            "4": {"class_type": "SaveImage", "inputs": {}},
        })
    }

    #[test]
    fn a_recorded_run_gives_a_monotone_percentage_with_step_stages() {
        let mut t = Tracker::new(&graph(), ["1", "2", "3", "4"].map(String::from).into());
        let mut seen = Vec::new();
        for (kind, data) in lines("ws_trace_03_progress_upscale.jsonl") {
            if let Some(p) = t.on_event(&kind, &data) {
                seen.push(p);
            }
        }
        assert!(seen.windows(2).all(|w| w[0].pct <= w[1].pct), "monotone");
        assert!(
            seen.iter()
                .any(|p| p.stage == "ImageUpscaleWithModel 5/18 (node 3 of 4)"),
            "{seen:#?}"
        );
        assert_eq!(seen.last().unwrap().pct, RUN_SHARE);
    }

    #[test]
    fn cached_nodes_count_as_done() {
        let mut t = Tracker::new(&graph(), ["1", "2", "3", "4"].map(String::from).into());
        let p = t
            .on_event("execution_cached", &json!({"nodes": ["1", "2"]}))
            .unwrap();
        assert_eq!(p.pct, RUN_SHARE / 2.0);
        let p = t
            .on_event("progress", &json!({"node": "3", "value": 9, "max": 18}))
            .unwrap();
        assert_eq!(p.pct, RUN_SHARE * 2.5 / 4.0);
        assert_eq!((p.step, p.steps), (Some(9), Some(18)));
        // A second, lower bar on the same node does not move the percentage back.
        let p = t
            .on_event("progress", &json!({"node": "3", "value": 1, "max": 18}))
            .unwrap();
        assert_eq!(p.pct, RUN_SHARE * 2.5 / 4.0);
        assert!(t.on_event("status", &json!({})).is_none());
    }
}
