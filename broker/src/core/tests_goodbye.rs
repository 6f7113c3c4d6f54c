//! A worker that stops on purpose (breaker finding F4): its goodbye requeues the
//! job it held without charging an attempt, however many times it happens.

use kiln_protocol::worker::*;
use kiln_protocol::*;

use super::tests::{spec, Sim};

#[test]
fn goodbyes_do_not_spend_attempts() {
    let mut sim = Sim::new();
    sim.register("w1", 8000);
    let mut s = spec();
    s.max_attempts = Some(2);
    let (job, _) = sim.submit(s);
    // Three restarts of the only worker while it runs the job (a rolling deploy).
    for _ in 0..3 {
        assert_eq!(sim.state(job), JobState::Running);
        sim.worker(
            "w1",
            WorkerMessage::Goodbye(Goodbye {
                reason: "worker shutting down".into(),
            }),
        );
        assert_eq!(sim.state(job), JobState::Queued, "requeued, not failed");
        sim.register("w1", 8000);
    }
    let j = sim.core.job(job).unwrap();
    assert_eq!(j.attempts_used(), 1, "only the running attempt counts");
    let attempt = j.attempt;
    sim.succeed("w1", job, attempt);
    assert_eq!(sim.state(job), JobState::Succeeded);
}
