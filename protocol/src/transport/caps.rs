//! Connection caps of a bound libzmq socket (issue #10: bounded resources).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::os::fd::{FromRawFd, RawFd};
use std::time::{Duration, Instant};

use super::curve::RateLimit;
use super::BindOptions;

/// The connections a bound socket holds, counted from its monitor's accepted and
/// disconnected events (each carries the connection's descriptor), and the caps
/// on them. libzmq has no connection limit of its own, so a connection accepted
/// past a cap is shut down (`shutdown(2)`, not `close`: libzmq still owns the
/// descriptor, sees the end of the stream and closes it as for any peer).
pub(super) struct Caps {
    max_total: usize,
    max_per_address: usize,
    open: HashMap<RawFd, Option<IpAddr>>,
    per_address: HashMap<IpAddr, usize>,
    /// Shut down for being over a cap; their disconnect is not counted down.
    refused: HashSet<RawFd>,
    log: RateLimit,
}

impl Caps {
    pub fn new(opts: &BindOptions) -> Caps {
        Caps {
            max_total: opts.max_connections.max(1),
            max_per_address: opts.max_connections_per_address.max(1),
            open: HashMap::new(),
            per_address: HashMap::new(),
            refused: HashSet::new(),
            log: RateLimit::new(Duration::from_secs(10)),
        }
    }

    pub fn accepted(&mut self, fd: RawFd, endpoint: &str) {
        // A descriptor still counted lost its disconnect event (the monitor queue
        // overflowed): forget the old connection first.
        self.closed(fd);
        let ip = peer_ip(fd);
        if self.open.len() >= self.max_total {
            self.prune();
        }
        let from_ip = ip
            .and_then(|ip| self.per_address.get(&ip))
            .copied()
            .unwrap_or(0);
        let over = if self.open.len() >= self.max_total {
            Some(("connections", self.max_total))
        } else if from_ip >= self.max_per_address {
            Some(("connections from this address", self.max_per_address))
        } else {
            None
        };
        if let Some((what, cap)) = over {
            // SAFETY: shuts down the stream of a descriptor libzmq just accepted.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            self.refused.insert(fd);
            if let Some(suppressed) = self.log.allow(Instant::now()) {
                let peer = ip.map(|i| i.to_string()).unwrap_or_default();
                tracing::warn!(%endpoint, %peer, cap, suppressed, "refused a connection: already holding the most {what} allowed");
            }
            return;
        }
        self.open.insert(fd, ip);
        if let Some(ip) = ip {
            *self.per_address.entry(ip).or_default() += 1;
        }
    }

    pub fn closed(&mut self, fd: RawFd) {
        if self.refused.remove(&fd) {
            return;
        }
        if let Some(Some(ip)) = self.open.remove(&fd) {
            if let Some(n) = self.per_address.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    self.per_address.remove(&ip);
                }
            }
        }
    }

    /// Drops counted descriptors that are no longer connected sockets, in case
    /// disconnect events were lost.
    fn prune(&mut self) {
        let gone: Vec<RawFd> = self
            .open
            .keys()
            .copied()
            .filter(|fd| peer_ip(*fd).is_none() && !is_socket(*fd))
            .collect();
        for fd in gone {
            self.closed(fd);
        }
    }
}

/// The peer address of a connected TCP descriptor; `None` for IPC or a closed one.
fn peer_ip(fd: RawFd) -> Option<IpAddr> {
    // SAFETY: the stream is never dropped (ManuallyDrop), so the descriptor stays
    // libzmq's; only getpeername(2) is called on it.
    let s = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
    s.peer_addr().ok().map(|a| a.ip())
}

fn is_socket(fd: RawFd) -> bool {
    // SAFETY: fstat on any descriptor number only reads into a local struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    unsafe { libc::fstat(fd, &mut st) == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFSOCK }
}
