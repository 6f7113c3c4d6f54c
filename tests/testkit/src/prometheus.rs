//! Scrapes Prometheus endpoints with the Prometheus project's own Python parser
//! (`tests/prometheus/scrape.py`, `prometheus_client` in tests/requirements.txt),
//! so the metrics tests read the daemons' output as Prometheus would.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde_json::Value;

/// One scrape, as the parser saw it.
pub struct Scrape {
    /// Family name → type (`counter`, `gauge`, `histogram`).
    pub families: BTreeMap<String, String>,
    pub samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Scrape {
    /// The sum of the samples named `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|(_, v)| v).sum()
    }

    /// Whether any sample of that name and labels exists.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.matching(name, labels).next().is_some()
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = (&'a BTreeMap<String, String>, f64)> + 'a {
        self.samples
            .iter()
            .filter(move |(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, l, v)| (l, *v))
    }

    /// Every name a query can use: family names and sample names (`_total`,
    /// `_bucket`, `_sum`, `_count`).
    pub fn names(&self) -> BTreeSet<String> {
        self.families
            .keys()
            .cloned()
            .chain(self.samples.iter().map(|(n, _, _)| n.clone()))
            .collect()
    }
}

/// Scrapes `urls` with the Python parser; panics on an HTTP or parse error.
pub async fn scrape(urls: &[&str]) -> Vec<Scrape> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../prometheus/scrape.py");
    let out = tokio::process::Command::new(crate::python())
        .arg(&script)
        .args(urls)
        .output()
        .await
        .expect("run the Python scraper");
    assert!(
        out.status.success(),
        "the Prometheus parser rejected a scrape:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Value = serde_json::from_slice(&out.stdout).expect("scraper JSON");
    urls.iter()
        .map(|url| {
            let s = &parsed[*url];
            assert_eq!(s["status"], 200, "{url}");
            assert_eq!(
                s["content_type"], "text/plain; version=0.0.4; charset=utf-8",
                "{url}"
            );
            let mut families = BTreeMap::new();
            let mut samples = Vec::new();
            for f in s["families"].as_array().unwrap() {
                families.insert(
                    f["name"].as_str().unwrap().to_string(),
                    f["type"].as_str().unwrap().to_string(),
                );
                for x in f["samples"].as_array().unwrap() {
                    let labels = x["labels"]
                        .as_object()
                        .unwrap()
                        .iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                        .collect();
                    samples.push((
                        x["name"].as_str().unwrap().to_string(),
                        labels,
                        x["value"].as_f64().unwrap(),
                    ));
                }
            }
            Scrape { families, samples }
        })
        .collect()
}
