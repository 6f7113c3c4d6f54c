//! Messages a ROUTER could not hand to libzmq yet, kept per peer in order.
//!
//! With `ZMQ_ROUTER_MANDATORY`, a send to a peer whose pipe is at its high-water
//! mark fails with `EAGAIN` instead of blocking. That does not mean the peer
//! stopped reading: libzmq counts what the peer's connection has taken from the
//! pipe in steps (the reader reports back only every "low-water mark" messages,
//! most of the HWM), so a burst can see `EAGAIN` for a moment while the peer
//! reads everything. Dropping the message there lost a reply for good, and a
//! client that had sent a burst of requests waited out its timeouts for answers
//! that were never coming (found by the end-to-end benchmark: 256 submits in
//! flight from one client).
//!
//! So a message refused with `EAGAIN` waits here, and every later message to the
//! same peer queues behind it (replies keep their order), until the socket takes
//! them. A peer whose backlog grows past [`MAX_BYTES`] or stays unsent for
//! [`MAX_AGE`] has really stopped reading: its backlog is freed and the caller
//! reports it stalled.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// Bytes waiting for one peer before it counts as stalled.
pub(super) const MAX_BYTES: usize = 16 << 20;
/// How long a peer's oldest waiting message may wait before it counts as stalled.
pub(super) const MAX_AGE: Duration = Duration::from_secs(10);

/// What one attempt to hand a message to libzmq gave.
pub(super) enum Attempt {
    Sent,
    /// `EAGAIN`: the peer's pipe is full for now.
    Full,
    /// Any other error (the peer is gone): the message cannot be delivered.
    Undeliverable,
}

struct Backlog {
    messages: VecDeque<Vec<Bytes>>,
    bytes: usize,
    /// When the oldest waiting message was refused.
    since: Instant,
}

/// The backlogs of every peer that has one.
#[derive(Default)]
pub(super) struct Backlogs {
    peers: HashMap<Bytes, Backlog>,
}

fn size(frames: &[Bytes]) -> usize {
    frames.iter().map(Bytes::len).sum()
}

impl Backlogs {
    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn has(&self, peer: &[u8]) -> bool {
        self.peers.contains_key(peer)
    }

    /// Queues `frames` (routing id first) behind what `peer` already waits for.
    /// False when that takes the backlog past [`MAX_BYTES`]: the backlog is
    /// dropped and the peer is to be reported stalled.
    pub fn push(&mut self, peer: Bytes, frames: Vec<Bytes>, now: Instant) -> bool {
        let b = self.peers.entry(peer.clone()).or_insert_with(|| Backlog {
            messages: VecDeque::new(),
            bytes: 0,
            since: now,
        });
        b.bytes += size(&frames);
        b.messages.push_back(frames);
        if b.bytes > MAX_BYTES {
            self.peers.remove(&peer);
            return false;
        }
        true
    }

    /// Forgets what waits for `peer` (its connection ended).
    pub fn forget(&mut self, peer: &[u8]) {
        self.peers.remove(peer);
    }

    /// Hands waiting messages to `send`, oldest first for each peer, until one is
    /// refused. Returns the peers whose oldest message has waited past
    /// [`MAX_AGE`]; their backlogs are dropped.
    pub fn flush(&mut self, now: Instant, mut send: impl FnMut(&[Bytes]) -> Attempt) -> Vec<Bytes> {
        let mut stalled = Vec::new();
        self.peers.retain(|peer, b| {
            while let Some(frames) = b.messages.front() {
                match send(frames) {
                    Attempt::Sent => {
                        b.bytes -= size(frames);
                        b.messages.pop_front();
                        b.since = now;
                    }
                    Attempt::Full => break,
                    Attempt::Undeliverable => return false,
                }
            }
            if b.messages.is_empty() {
                return false;
            }
            if now.duration_since(b.since) > MAX_AGE {
                stalled.push(peer.clone());
                return false;
            }
            true
        });
        stalled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(peer: &str, body: &str) -> Vec<Bytes> {
        vec![Bytes::from(peer.to_string()), Bytes::from(body.to_string())]
    }

    #[test]
    fn waiting_messages_go_out_in_order_once_the_pipe_has_room() {
        let t0 = Instant::now();
        let mut b = Backlogs::default();
        assert!(b.push(Bytes::from("a"), msg("a", "1"), t0));
        assert!(b.push(Bytes::from("a"), msg("a", "2"), t0));
        assert!(b.has(b"a"));
        // Full: nothing leaves.
        assert!(b.flush(t0, |_| Attempt::Full).is_empty());
        // One fits, then full again.
        let mut sent = Vec::new();
        let mut room = 1;
        b.flush(t0, |f| {
            if room == 0 {
                return Attempt::Full;
            }
            room -= 1;
            sent.push(f[1].clone());
            Attempt::Sent
        });
        assert_eq!(sent, [Bytes::from("1")]);
        b.flush(t0, |f| {
            sent.push(f[1].clone());
            Attempt::Sent
        });
        assert_eq!(sent, [Bytes::from("1"), Bytes::from("2")]);
        assert!(b.is_empty());
    }

    #[test]
    fn a_peer_that_never_reads_is_stalled_by_age_or_by_size() {
        let t0 = Instant::now();
        let mut b = Backlogs::default();
        b.push(Bytes::from("slow"), msg("slow", "x"), t0);
        assert!(b.flush(t0 + MAX_AGE / 2, |_| Attempt::Full).is_empty());
        let stalled = b.flush(t0 + MAX_AGE * 2, |_| Attempt::Full);
        assert_eq!(stalled, [Bytes::from("slow")]);
        assert!(b.is_empty(), "its memory is freed");

        let big = vec![
            Bytes::from("big"),
            Bytes::from(vec![0u8; MAX_BYTES / 2 + 1]),
        ];
        assert!(b.push(Bytes::from("big"), big.clone(), t0));
        assert!(!b.push(Bytes::from("big"), big, t0), "past the byte cap");
        assert!(!b.has(b"big"));
    }

    #[test]
    fn a_gone_peer_loses_its_backlog() {
        let t0 = Instant::now();
        let mut b = Backlogs::default();
        b.push(Bytes::from("gone"), msg("gone", "x"), t0);
        assert!(b.flush(t0, |_| Attempt::Undeliverable).is_empty());
        assert!(b.is_empty());
    }
}
