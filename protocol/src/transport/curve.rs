//! CURVE keys as an operator handles them, and the ZAP handler that checks them.
//!
//! Keys are Z85 text (40 characters for 32 bytes), the form libzmq, pyzmq and
//! `curve_keygen` use. `kiln keys generate NAME` writes `NAME.key` (the public key)
//! and `NAME.key_secret` (both keys, mode 0600) in the ZPL certificate format that
//! pyzmq's `zmq.auth.load_certificate` reads, so a Python script uses the same
//! files.
//!
//! The ZAP handler (RFC 27) runs once per process on `inproc://zeromq.zap.01`.
//! Every socket Kiln binds with libzmq names a ZAP domain, so the handler sees every
//! handshake, CURVE or not: it admits a CURVE client only if its public key is in
//! that socket's allowed list, and gives every admitted connection a fresh
//! `User-Id`, which libzmq attaches to each message from that connection. That id
//! is how the broker binds a session to a connection.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Why a key could not be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum KeyError {
    #[error("`{field}` is not a Z85 CURVE key (40 characters): {reason}")]
    Invalid { field: String, reason: String },
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("cannot write {path}: {reason}")]
    Write { path: String, reason: String },
    #[error(
        "this binary's libzmq was built without CURVE (libsodium); refusing to run unencrypted"
    )]
    Unsupported,
}

/// A 32-byte CURVE key in Z85.
fn decode(field: &str, z85: &str) -> Result<[u8; 32], KeyError> {
    let bad = |reason: &str| KeyError::Invalid {
        field: field.to_string(),
        reason: reason.to_string(),
    };
    let z85 = z85.trim();
    if z85.len() != 40 {
        return Err(bad(&format!("{} characters", z85.len())));
    }
    let raw = zmq::z85_decode(z85).map_err(|e| bad(&e.to_string()))?;
    raw.try_into()
        .map_err(|_| bad("does not decode to 32 bytes"))
}

/// Checks that `z85` is a CURVE key; `field` names it in the error.
pub fn check_key(field: &str, z85: &str) -> Result<(), KeyError> {
    decode(field, z85).map(|_| ())
}

/// A CURVE key pair in Z85.
#[derive(Clone, PartialEq, Eq)]
pub struct CurveKeyPair {
    pub public: String,
    pub secret: String,
}

impl std::fmt::Debug for CurveKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CurveKeyPair")
            .field("public", &self.public)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl CurveKeyPair {
    /// A fresh key pair from libsodium.
    pub fn generate() -> Result<CurveKeyPair, KeyError> {
        if !super::libzmq_has_curve() {
            return Err(KeyError::Unsupported);
        }
        let kp = zmq::CurveKeyPair::new().map_err(|_| KeyError::Unsupported)?;
        Ok(CurveKeyPair {
            public: zmq::z85_encode(&kp.public_key).expect("32 bytes encode"),
            secret: zmq::z85_encode(&kp.secret_key).expect("32 bytes encode"),
        })
    }

    /// The pair of a secret key (Z85); `field` names it in errors.
    pub fn from_secret(field: &str, secret: &str) -> Result<CurveKeyPair, KeyError> {
        let raw = decode(field, secret)?;
        let public = kiln_libzmq_build::curve_public(&raw).ok_or(KeyError::Unsupported)?;
        Ok(CurveKeyPair {
            public: zmq::z85_encode(&public).expect("32 bytes encode"),
            secret: secret.trim().to_string(),
        })
    }

    /// Reads a secret key from a file: a ZPL certificate (`secret-key = "…"`, as
    /// written by `kiln keys generate` or pyzmq) or the bare Z85 key.
    pub fn read_secret_file(path: &Path) -> Result<CurveKeyPair, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        CurveKeyPair::parse_secret(&path.display().to_string(), &text)
    }

    /// A secret key given as a ZPL certificate's text or as the bare Z85 key.
    pub fn parse_secret(field: &str, text: &str) -> Result<CurveKeyPair, KeyError> {
        let secret = zpl_value(text, "secret-key").unwrap_or_else(|| text.trim().to_string());
        CurveKeyPair::from_secret(field, &secret)
    }

    /// Writes `<base>.key` (public) and `<base>.key_secret` (mode 0600).
    pub fn write_certificates(&self, base: &Path) -> Result<(), KeyError> {
        let public = base.with_extension("key");
        let secret = base.with_extension("key_secret");
        let header = "#   ZeroMQ CURVE certificate, written by `kiln keys generate`\n";
        write(
            &public,
            &format!("{header}#   Public key: give it to the peers that must accept this one.\n\nmetadata\ncurve\n    public-key = \"{}\"\n", self.public),
            0o644,
        )?;
        write(
            &secret,
            &format!("{header}#   SECRET: keep this file private (mode 0600).\n\nmetadata\ncurve\n    public-key = \"{}\"\n    secret-key = \"{}\"\n", self.public, self.secret),
            0o600,
        )
    }
}

/// Reads a public key from a file (a ZPL certificate or the bare Z85 key).
pub fn read_public_file(path: &Path) -> Result<String, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|e| KeyError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let key = zpl_value(&text, "public-key").unwrap_or_else(|| text.trim().to_string());
    check_key(&path.display().to_string(), &key)?;
    Ok(key)
}

fn zpl_value(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.trim().split_once('=')?;
        (k.trim() == name).then(|| v.trim().trim_matches('"').to_string())
    })
}

fn write(path: &Path, text: &str, mode: u32) -> Result<(), KeyError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |e: std::io::Error| KeyError::Write {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(fail)?;
    f.write_all(text.as_bytes()).map_err(fail)?;
    f.sync_all().map_err(fail)
}

/// The server side of CURVE: our key pair and the public keys let in.
#[derive(Debug, Clone)]
pub struct CurveServer {
    pub keys: CurveKeyPair,
    /// Z85 public keys of the peers allowed to connect.
    pub allowed: Vec<String>,
}

/// The client side of CURVE: the server's public key and our key pair.
#[derive(Debug, Clone)]
pub struct CurveClient {
    pub server_public: String,
    pub keys: CurveKeyPair,
}

impl CurveServer {
    pub(super) fn allowed_raw(&self) -> Result<HashSet<[u8; 32]>, KeyError> {
        self.allowed
            .iter()
            .map(|k| decode("allowed public key", k))
            .collect()
    }
}

pub(super) fn raw(field: &str, z85: &str) -> Result<[u8; 32], KeyError> {
    decode(field, z85)
}

/// Who a ZAP domain lets in: `None` = any peer (plain ZMTP), else these CURVE keys.
type Policy = Option<HashSet<[u8; 32]>>;

pub(super) struct Zap {
    domains: Mutex<HashMap<String, Arc<Policy>>>,
    next_domain: AtomicU64,
}

/// The process's ZAP handler, started on first use.
pub(super) fn zap(ctx: &zmq::Context) -> &'static Zap {
    static ZAP: OnceLock<&'static Zap> = OnceLock::new();
    ZAP.get_or_init(|| {
        let zap: &'static Zap = Box::leak(Box::new(Zap {
            domains: Mutex::new(HashMap::new()),
            next_domain: AtomicU64::new(1),
        }));
        let socket = ctx.socket(zmq::REP).expect("ZAP socket");
        socket
            .bind("inproc://zeromq.zap.01")
            .expect("bind the ZAP endpoint");
        std::thread::Builder::new()
            .name("kiln-zap".into())
            .spawn(move || zap.serve(socket))
            .expect("spawn the ZAP thread");
        zap
    })
}

impl Zap {
    /// Registers a socket's policy under a fresh domain name.
    pub(super) fn domain(&self, policy: Policy) -> String {
        let name = format!("kiln-{}", self.next_domain.fetch_add(1, Ordering::Relaxed));
        self.domains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone(), Arc::new(policy));
        name
    }

    fn serve(&self, socket: zmq::Socket) {
        let mut next_user = 1u64;
        let mut refusals = RateLimit::new(Duration::from_secs(10));
        loop {
            let Ok(frames) = socket.recv_multipart(0) else {
                return;
            };
            // version, request id, domain, address, routing id, mechanism, credentials…
            if frames.len() < 6 {
                continue;
            }
            let domain = String::from_utf8_lossy(&frames[2]).to_string();
            let address = String::from_utf8_lossy(&frames[3]).to_string();
            let mechanism = frames[5].as_slice();
            let policy = self
                .domains
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&domain)
                .cloned();
            let ok = match (policy.as_deref(), mechanism) {
                (Some(None), b"NULL") => true,
                (Some(Some(keys)), b"CURVE") => frames
                    .get(6)
                    .and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok())
                    .is_some_and(|k| keys.contains(&k)),
                _ => false,
            };
            let user = if ok {
                next_user += 1;
                format!("{next_user}")
            } else {
                if let Some(suppressed) = refusals.allow(Instant::now()) {
                    tracing::warn!(%address, mechanism = %String::from_utf8_lossy(mechanism), suppressed, "refused a connection: its CURVE key is not allowed");
                }
                String::new()
            };
            let reply: [&[u8]; 6] = [
                b"1.0",
                &frames[1],
                if ok { b"200" } else { b"400" },
                if ok { b"OK" } else { b"key not allowed" },
                user.as_bytes(),
                b"",
            ];
            if socket.send_multipart(reply, 0).is_err() {
                return;
            }
        }
    }
}

/// Lets one log line through per period and counts the rest.
pub(super) struct RateLimit {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub(super) fn new(period: Duration) -> RateLimit {
        RateLimit {
            period,
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(lines suppressed since the last one)` when a line may be logged now.
    pub(super) fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < self.period => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}
