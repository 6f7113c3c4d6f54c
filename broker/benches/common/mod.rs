//! What the benchmarks share.

use std::io::Write;
use std::time::{Duration, Instant};

/// The latency below which a fraction `p` of the `sorted` ones lie.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Appending 128 bytes to a file and `fdatasync`, `rounds` times: what one
/// durable commit cannot go below on this disk.
pub fn fsync_latencies(rounds: usize) -> Vec<Duration> {
    let dir = tempfile::tempdir().unwrap();
    let mut f = std::fs::File::create(dir.path().join("fsync")).unwrap();
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f.write_all(&[7; 128]).unwrap();
            f.sync_data().unwrap();
            t.elapsed()
        })
        .collect()
}
