//! CURVE settings: which transport, whose keys, and whether a broker may listen
//! beyond loopback without them.
//!
//! Secret keys resolve like tokens (inline, `_file`, or a systemd credential) and
//! may be a bare Z85 key or a ZPL certificate (`kiln keys generate`, pyzmq).
//! Public keys are Z85 text or a path to a `.key` certificate.

use std::path::Path;

use kiln_protocol::transport::{curve, CurveClient, CurveKeyPair, CurveServer, TransportKind};

use crate::{invalid, is_loopback_endpoint, resolve_secret, ConfigError, KilnConfig, Table};

/// The broker's CURVE servers: one key pair, and the keys each port lets in.
#[derive(Debug, Clone)]
pub struct BrokerCurve {
    /// The frontend: client keys.
    pub clients: CurveServer,
    /// The backend: worker keys.
    pub workers: CurveServer,
    /// The events PUB: client and worker keys.
    pub events: CurveServer,
}

fn key_error(key: &str, e: curve::KeyError) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: e.to_string(),
    }
}

/// A public key given as Z85 text or as the path of a certificate file.
fn public_key(key: &str, value: &str) -> Result<String, ConfigError> {
    // Z85 uses '/' too, so a 40-character value that decodes is a key.
    if value.trim().len() == 40 && curve::check_key(key, value).is_ok() {
        return Ok(value.trim().to_string());
    }
    curve::read_public_file(Path::new(value)).map_err(|e| key_error(key, e))
}

fn keys(key: &str, values: &[String]) -> Result<Vec<String>, ConfigError> {
    values.iter().map(|v| public_key(key, v)).collect()
}

impl KilnConfig {
    /// The broker's CURVE setup, `None` when no secret key is configured.
    pub fn broker_curve(&self) -> Result<Option<BrokerCurve>, ConfigError> {
        let b = &self.broker;
        let key = "broker.curve_secret_key";
        let Some(secret) = resolve_secret(
            key,
            &b.curve_secret_key,
            &b.curve_secret_key_file,
            "kiln-broker-curve",
        )?
        else {
            return Ok(None);
        };
        let pair =
            CurveKeyPair::parse_secret(key, secret.expose()).map_err(|e| key_error(key, e))?;
        let clients = keys("broker.curve_client_keys", &b.curve_client_keys)?;
        let workers = keys("broker.curve_worker_keys", &b.curve_worker_keys)?;
        if clients.is_empty() && workers.is_empty() {
            return invalid(
                "broker.curve_client_keys",
                "CURVE is on (broker.curve_secret_key) but no client or worker key is allowed; list them in broker.curve_client_keys and broker.curve_worker_keys",
            );
        }
        let server = |allowed: Vec<String>| CurveServer {
            keys: pair.clone(),
            allowed,
        };
        Ok(Some(BrokerCurve {
            events: server(clients.iter().chain(&workers).cloned().collect()),
            clients: server(clients),
            workers: server(workers),
        }))
    }

    /// A worker's CURVE client setup, `None` when the broker's key is not set.
    pub fn worker_curve(&self) -> Result<Option<CurveClient>, ConfigError> {
        let w = &self.worker;
        peer_curve(
            "worker",
            &w.broker_public_key,
            resolve_secret(
                "worker.curve_secret_key",
                &w.curve_secret_key,
                &w.curve_secret_key_file,
                "kiln-worker-curve",
            )?,
        )
    }

    /// A client's (CLI, kiln-mcp) CURVE setup, `None` when the broker's key is not set.
    pub fn client_curve(&self) -> Result<Option<CurveClient>, ConfigError> {
        let c = &self.client;
        peer_curve(
            "client",
            &c.broker_public_key,
            resolve_secret(
                "client.curve_secret_key",
                &c.curve_secret_key,
                &c.curve_secret_key_file,
                "kiln-client-curve",
            )?,
        )
    }

    /// What `validated` checks about transports and keys.
    pub(crate) fn validate_transport(&self, tables: &[Table]) -> Result<(), ConfigError> {
        // Key files are read when a program starts (they may be readable by that
        // program's user only); here only whether CURVE is on matters.
        let b = &self.broker;
        let broker_curve = b.curve_secret_key.is_some()
            || b.curve_secret_key_file.is_some()
            || credential_exists("kiln-broker-curve");
        for (table, kind, curve) in [
            ("broker", b.transport, broker_curve),
            (
                "worker",
                self.worker.transport,
                self.worker.broker_public_key.is_some(),
            ),
            (
                "client",
                self.client.transport,
                self.client.broker_public_key.is_some(),
            ),
        ] {
            if curve && kind == TransportKind::Zeromq {
                return invalid(
                    &format!("{table}.transport"),
                    "CURVE keys are configured but the zeromq transport has no CURVE; set transport = \"libzmq\"",
                );
            }
        }
        if tables.contains(&Table::Broker) && !broker_curve && !b.allow_insecure_network {
            for (key, ep) in [
                ("broker.frontend", &b.frontend),
                ("broker.backend", &b.backend),
                ("broker.events", &b.events),
            ] {
                if !is_loopback_endpoint(ep) {
                    return invalid(
                        key,
                        &format!("{ep} is not loopback and CURVE is off: anyone who can reach it could read and send jobs. Configure broker.curve_secret_key with the allowed keys (transport = \"libzmq\"), or set broker.allow_insecure_network = true for a fenced private network"),
                    );
                }
            }
        }
        Ok(())
    }
}

fn credential_exists(name: &str) -> bool {
    std::env::var_os("CREDENTIALS_DIRECTORY").is_some_and(|d| Path::new(&d).join(name).exists())
}

fn peer_curve(
    table: &str,
    broker_public_key: &Option<String>,
    secret: Option<crate::Secret>,
) -> Result<Option<CurveClient>, ConfigError> {
    let key = format!("{table}.broker_public_key");
    let secret_key = format!("{table}.curve_secret_key");
    match (broker_public_key, secret) {
        (None, None) => Ok(None),
        (Some(_), None) => invalid(
            &secret_key,
            "the broker's public key is set, so CURVE is on: give this program its own key pair too",
        ),
        (None, Some(_)) => invalid(&key, "a CURVE secret key is set but not the broker's public key"),
        (Some(server), Some(secret)) => Ok(Some(CurveClient {
            server_public: public_key(&key, server)?,
            keys: CurveKeyPair::parse_secret(&secret_key, secret.expose())
                .map_err(|e| key_error(&secret_key, e))?,
        })),
    }
}
