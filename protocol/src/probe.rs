//! A pre-flight check that something listens at an endpoint, before a ZeroMQ connect.
//!
//! A ZeroMQ connect never says "connection refused": it retries quietly until a
//! timeout, so a client of a broker that is not running learns nothing for seconds.
//! One plain TCP (or Unix-socket) connect answers at once, whatever ZMTP
//! implementation (the zeromq crate or libzmq) then makes the real connection.
//! The probe closes its socket before any byte is sent; the broker's ZMTP listener
//! sees a peer that left before greeting.

use std::io;
use std::time::Duration;

/// Why an endpoint cannot be reached; each case is definitive, not worth retrying
/// within the same command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unreachable {
    /// The endpoint does not parse: not `tcp://host:port` or `ipc://path`.
    #[error("{0:?} is not an endpoint like tcp://127.0.0.1:5555 or ipc:///run/kiln/clients")]
    BadEndpoint(String),
    /// The host name did not resolve.
    #[error("the host name in {endpoint} does not resolve ({detail})")]
    NoSuchHost { endpoint: String, detail: String },
    /// The host answered that nothing listens on that port (or the socket file
    /// does not exist / is not listened on).
    #[error("nothing is listening at {0} (connection refused)")]
    Refused(String),
    /// The network says the host cannot be reached.
    #[error("{endpoint} cannot be reached ({detail})")]
    NoRoute { endpoint: String, detail: String },
}

/// A parsed `tcp://host:port` or `ipc://path` endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Tcp { host: String, port: u16 },
    Ipc(std::path::PathBuf),
}

impl Endpoint {
    /// Parses `tcp://host:port` (host may be a name, an IPv4 address or `[v6]`)
    /// and `ipc://path`; anything else is [`Unreachable::BadEndpoint`].
    pub fn parse(ep: &str) -> Result<Endpoint, Unreachable> {
        let bad = || Unreachable::BadEndpoint(ep.to_string());
        if let Some(rest) = ep.strip_prefix("tcp://") {
            let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = port.parse::<u16>().map_err(|_| bad())?;
            if host.is_empty() {
                return Err(bad());
            }
            return Ok(Endpoint::Tcp {
                host: host.to_string(),
                port,
            });
        }
        match ep.strip_prefix("ipc://") {
            Some(p) if !p.is_empty() => Ok(Endpoint::Ipc(p.into())),
            _ => Err(bad()),
        }
    }
}

/// Connects to `endpoint` once with a plain socket and closes it. `Ok` means
/// something accepted the connection (or the answer did not come within
/// `timeout`, which is left to the caller's own ZeroMQ timeout: a slow network
/// is not a verdict). Refused, unresolvable and unroutable endpoints fail at once.
pub async fn probe(endpoint: &str, timeout: Duration) -> Result<(), Unreachable> {
    let connect = async {
        match Endpoint::parse(endpoint)? {
            Endpoint::Tcp { host, port } => {
                let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), port))
                    .await
                    .map_err(|e| Unreachable::NoSuchHost {
                        endpoint: endpoint.to_string(),
                        detail: e.to_string(),
                    })?
                    .collect();
                let mut last = None;
                for addr in addrs {
                    match tokio::net::TcpStream::connect(addr).await {
                        Ok(_) => return Ok(()),
                        Err(e) => last = Some(e),
                    }
                }
                match last {
                    Some(e) => Err(verdict(endpoint, e)),
                    None => Err(Unreachable::NoSuchHost {
                        endpoint: endpoint.to_string(),
                        detail: "no address".into(),
                    }),
                }
            }
            Endpoint::Ipc(path) => tokio::net::UnixStream::connect(&path)
                .await
                .map(drop)
                .map_err(|e| verdict(endpoint, e)),
        }
    };
    match tokio::time::timeout(timeout, connect).await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

fn verdict(endpoint: &str, e: io::Error) -> Unreachable {
    match e.kind() {
        io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound => {
            Unreachable::Refused(endpoint.to_string())
        }
        _ => Unreachable::NoRoute {
            endpoint: endpoint.to_string(),
            detail: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_or_are_refused_by_name() {
        assert_eq!(
            Endpoint::parse("tcp://[::1]:5555").unwrap(),
            Endpoint::Tcp {
                host: "::1".into(),
                port: 5555
            }
        );
        assert!(matches!(
            Endpoint::parse("ipc:///run/k").unwrap(),
            Endpoint::Ipc(_)
        ));
        for bad in [
            "garbage",
            "tcp://host",
            "tcp://:5555",
            "tcp://h:99999",
            "ipc://",
            "tcp://[]:1",
        ] {
            assert_eq!(
                Endpoint::parse(bad),
                Err(Unreachable::BadEndpoint(bad.into())),
                "{bad}"
            );
        }
    }

    #[tokio::test]
    async fn a_closed_port_is_refused_and_an_open_one_passes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = format!("tcp://{}", listener.local_addr().unwrap());
        assert_eq!(probe(&open, Duration::from_secs(2)).await, Ok(()));
        drop(listener);
        assert_eq!(
            probe(&open, Duration::from_secs(2)).await,
            Err(Unreachable::Refused(open.clone()))
        );
        let dir = std::env::temp_dir().join(format!("kiln-probe-{}", std::process::id()));
        let ipc = format!("ipc://{}", dir.display());
        assert_eq!(
            probe(&ipc, Duration::from_secs(2)).await,
            Err(Unreachable::Refused(ipc.clone()))
        );
    }

    /// kiln-mcp and the CLI share this: a broker that is not running costs a
    /// call one refused connect, not the request timeout.
    #[tokio::test]
    async fn a_client_that_never_reached_its_broker_fails_at_once() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoint = format!("tcp://127.0.0.1:{port}");
        let mut opts = crate::ClientOptions::new(endpoint.clone(), "tcp://127.0.0.1:1");
        opts.request_timeout = Duration::from_secs(600);
        let client = crate::Client::connect(opts);
        let err = tokio::time::timeout(Duration::from_secs(60), client.ping())
            .await
            .expect("the call must not wait for its request timeout")
            .unwrap_err();
        assert!(
            matches!(&err, crate::ClientError::Unreachable(Unreachable::Refused(e)) if *e == endpoint),
            "{err:?}"
        );
    }
}
