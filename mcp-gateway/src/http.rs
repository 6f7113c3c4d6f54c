//! The streamable HTTP transport: rmcp's service mounted in axum behind a bearer
//! token check, with rmcp's own Host (DNS rebinding) and Origin guards.
//!
//! Around rmcp, [`http_conventions`] makes the transport answer as clients expect:
//! a body that is not JSON gets a JSON-RPC parse error (not 415), and closing a
//! session with `DELETE` answers 200 (the Python SDK warns on anything but 200/204).
//! With no `mcp.allowed_origins`, pages served from the machine itself (`localhost`,
//! `127.0.0.1`, `[::1]`, any port: the MCP Inspector's own page) may connect, and
//! every other Origin is refused.
//!
//! Every session gets its own [`KilnMcp`] over the one shared [`Gateway`], so any
//! number of remote assistants share one broker connection.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kiln_protocol::auth::{bearer_token, token_matches};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;
use crate::server::KilnMcp;

/// Origins accepted when `mcp.allowed_origins` is empty: the loopback names.
const LOOPBACK_ORIGINS: [&str; 6] = [
    "http://localhost:*",
    "https://localhost:*",
    "http://127.0.0.1:*",
    "https://127.0.0.1:*",
    "http://[::1]:*",
    "https://[::1]:*",
];

/// Largest request body: a base64 input image at the broker's 16 MiB input limit
/// is about 21.4 MiB of JSON, and rmcp's own default (4 MiB) would refuse it.
const MAX_REQUEST_BODY_BYTES: usize = 32 * 1024 * 1024;

/// How the HTTP endpoint is exposed.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub bind: SocketAddr,
    pub path: String,
    /// Required as `Authorization: Bearer <token>` when set.
    pub token: Option<String>,
    /// Accepted `Host` values; empty means the loopback names.
    pub allowed_hosts: Vec<String>,
    /// Accepted `Origin` values; empty means the loopback origins (any port).
    pub allowed_origins: Vec<String>,
}

/// Why the HTTP transport will not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("refusing to serve MCP on {0} without a token: set mcp.token (or mcp.token_file) or bind a loopback address")]
    NoTokenOnNetwork(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
}

async fn require_token(
    State(token): State<Arc<Option<String>>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(expected) = token.as_deref() {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token);
        if !token_matches(given, expected) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "missing or wrong bearer token\n",
            )
                .into_response();
        }
    }
    next.run(request).await
}

/// JSON-RPC's "Parse error" code.
const PARSE_ERROR: i64 = -32700;

/// Answers a JSON body that does not parse with a JSON-RPC parse error, and a
/// session `DELETE` with 200 instead of rmcp's 202.
async fn http_conventions(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let json_body = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    let request = if method == Method::POST && json_body {
        let (parts, body) = request.into_parts();
        let bytes = match axum::body::to_bytes(body, MAX_REQUEST_BODY_BYTES).await {
            Ok(b) => b,
            Err(_) => {
                return (
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("the request body is over {MAX_REQUEST_BODY_BYTES} bytes\n"),
                )
                    .into_response()
            }
        };
        if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&bytes) {
            let error = serde_json::json!({
                "jsonrpc": "2.0",
                "id": null,
                "error": { "code": PARSE_ERROR, "message": format!("Parse error: {e}") }
            });
            return (
                StatusCode::BAD_REQUEST,
                [(header::CONTENT_TYPE, "application/json")],
                error.to_string(),
            )
                .into_response();
        }
        Request::from_parts(parts, axum::body::Body::from(bytes))
    } else {
        request
    };
    let mut response = next.run(request).await;
    if method == Method::DELETE && response.status() == StatusCode::ACCEPTED {
        *response.status_mut() = StatusCode::OK;
    }
    response
}

/// Binds the listener (so the caller knows the port is taken before anything else
/// happens), then serves until `shutdown` fires.
pub async fn serve(
    gw: Arc<Gateway>,
    settings: HttpSettings,
    shutdown: CancellationToken,
) -> Result<(), HttpError> {
    if settings.token.is_none() && !settings.bind.ip().is_loopback() {
        return Err(HttpError::NoTokenOnNetwork(settings.bind));
    }
    let mut config = StreamableHttpServerConfig::default()
        .with_cancellation_token(shutdown.child_token())
        .with_max_request_body_bytes(MAX_REQUEST_BODY_BYTES);
    if !settings.allowed_hosts.is_empty() {
        config = config.with_allowed_hosts(settings.allowed_hosts.clone());
    }
    config = if settings.allowed_origins.is_empty() {
        config.with_allowed_origins(LOOPBACK_ORIGINS)
    } else {
        config.with_allowed_origins(settings.allowed_origins.clone())
    };
    let service = StreamableHttpService::new(
        move || Ok(KilnMcp::new(gw.clone())),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    let token = Arc::new(settings.token.clone());
    let app = axum::Router::new()
        .nest_service(&settings.path, service)
        .layer(axum::middleware::from_fn(http_conventions))
        .layer(axum::middleware::from_fn_with_state(token, require_token));
    let listener = tokio::net::TcpListener::bind(settings.bind)
        .await
        .map_err(|source| HttpError::Bind {
            addr: settings.bind,
            source,
        })?;
    let local = listener.local_addr().unwrap_or(settings.bind);
    tracing::info!(address = %local, path = %settings.path, token = settings.token.is_some(), "serving MCP over streamable HTTP");
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(HttpError::Serve)
}
