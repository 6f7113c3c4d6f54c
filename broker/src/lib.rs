//! The Kiln broker.
//!
//! - [`core`]: the scheduler, registry, heartbeats, requeue and cancel logic as a
//!   state machine without I/O.
//! - [`store`]: the durable job store (redb) with group commit.
//! - [`wal`]: the store's write-ahead log, one fsync per group.
//! - [`committer`]: group commit, and riding out a store that cannot write.
//! - [`artifacts`]: output files on disk, with their size and sha256.
//! - [`net`]: the thin async shell: frontend ROUTER, backend ROUTER, events PUB.
//! - [`metrics`]: the Prometheus metrics, counted by the shell from the core's
//!   outputs and counters.

pub mod artifacts;
pub mod committer;
pub mod core;
pub mod metrics;
pub mod net;
pub mod store;
pub mod wal;

pub use net::{Broker, BrokerError, BrokerSettings, Endpoints};
