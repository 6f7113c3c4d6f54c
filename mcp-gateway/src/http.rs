//! The streamable HTTP transport: rmcp's service mounted in axum behind a bearer
//! token check, with rmcp's own Host (DNS rebinding) and Origin guards.
//!
//! Every session gets its own [`KilnMcp`] over the one shared [`Gateway`], so any
//! number of remote assistants share one broker connection.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kiln_protocol::auth::token_matches;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;

use crate::gateway::Gateway;
use crate::server::KilnMcp;

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
    /// Accepted `Origin` values; empty means any request with an Origin is refused.
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
            .and_then(|v| v.strip_prefix("Bearer "));
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
        config.enforce_origin_validation()
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
