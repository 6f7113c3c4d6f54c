//! The HTTP server: routes, the token check, and the guards a page on a second
//! screen needs (Host against DNS rebinding, JSON-only actions against cross-site
//! forms).
//!
//! With a token, a person logs in once at `/login` and gets an HttpOnly,
//! `SameSite=Strict` cookie (an `EventSource` cannot send headers); scripts send
//! `Authorization: Bearer <token>`. Without a token the server refuses to bind
//! anything but loopback.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use kiln_protocol::auth::{bearer_token, token_matches};
use kiln_protocol::Client;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{api, assets};

/// The cookie that carries the token for browsers.
pub const COOKIE: &str = "kiln_dashboard";

/// How the dashboard is exposed.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub bind: SocketAddr,
    pub token: Option<String>,
    /// Accepted `Host` values; empty means the loopback names when there is no
    /// token, and any host when there is one.
    pub allowed_hosts: Vec<String>,
    pub queue_limit: u64,
    pub waiting_detail_limit: u64,
}

/// Why the server will not start.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("refusing to serve the dashboard on {0} without a token: set dashboard.token (or dashboard.token_file) or bind a loopback address")]
    NoTokenOnNetwork(SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// What every handler shares.
pub struct App {
    pub client: Client,
    pub live: watch::Receiver<Arc<str>>,
    pub settings: HttpSettings,
    pub shutdown: CancellationToken,
}

/// The routes, behind the guards.
pub fn router(app: Arc<App>) -> Router {
    let guarded = Router::new()
        .route("/", get(assets::index))
        .route("/app.js", get(assets::script))
        .route("/api/live", get(api::live))
        .route("/api/events", get(api::events))
        .route("/api/queue", get(api::queue))
        .route("/api/jobs", get(api::jobs))
        .route("/api/jobs/{id}", get(api::job))
        .route("/api/jobs/{id}/cancel", post(api::cancel))
        .route("/api/jobs/{id}/resubmit", post(api::resubmit))
        .route("/api/submit", post(api::submit))
        .route("/api/artifacts/{id}", get(crate::artifacts::serve))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            require_token,
        ))
        .layer(axum::middleware::from_fn(json_actions));
    Router::new()
        .route("/login", get(assets::login).post(login))
        .route("/favicon.ico", get(assets::favicon))
        // The stylesheet holds nothing secret, and the login page needs it.
        .route("/app.css", get(assets::style))
        .merge(guarded)
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            check_host,
        ))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(app)
}

/// Binds (so a taken port is reported before anything else), then serves until
/// `shutdown` fires.
pub async fn serve(app: Arc<App>) -> Result<(), HttpError> {
    let settings = app.settings.clone();
    if settings.token.is_none() && !settings.bind.ip().is_loopback() {
        return Err(HttpError::NoTokenOnNetwork(settings.bind));
    }
    let listener = tokio::net::TcpListener::bind(settings.bind)
        .await
        .map_err(|source| HttpError::Bind {
            addr: settings.bind,
            source,
        })?;
    let local = listener.local_addr().unwrap_or(settings.bind);
    tracing::info!(address = %local, token = settings.token.is_some(), "serving the dashboard on http://{local}/");
    let shutdown = app.shutdown.clone();
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(HttpError::Serve)
}

/// The token a request presents: a bearer header, else the login cookie.
fn presented(headers: &HeaderMap) -> Option<String> {
    if let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        return bearer_token(auth).map(str::to_string);
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_string())
}

async fn require_token(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if let Some(expected) = app.settings.token.as_deref() {
        let given = presented(request.headers());
        if !token_matches(given.as_deref(), expected) {
            let wants_page = request.uri().path() == "/";
            return if wants_page {
                Redirect::to("/login").into_response()
            } else {
                api::error_response(
                    StatusCode::UNAUTHORIZED,
                    "missing or wrong token: log in at /login or send Authorization: Bearer <token>",
                    None,
                )
            };
        }
    }
    next.run(request).await
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// Checks the token and sets the cookie; a wrong token gets the form again.
async fn login(State(app): State<Arc<App>>, Form(form): Form<LoginForm>) -> Response {
    let Some(expected) = app.settings.token.as_deref() else {
        return Redirect::to("/").into_response();
    };
    if !token_matches(Some(form.token.trim()), expected) {
        return (
            StatusCode::UNAUTHORIZED,
            assets::login_page(Some("wrong token")),
        )
            .into_response();
    }
    // The cookie holds the token itself: only its owner and this origin see it
    // (HttpOnly, SameSite=Strict), and a changed token logs everyone out.
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age=2592000",
        form.token.trim()
    );
    match HeaderValue::from_str(&cookie) {
        Ok(value) => (
            StatusCode::SEE_OTHER,
            [
                (header::SET_COOKIE, value),
                (header::LOCATION, HeaderValue::from_static("/")),
            ],
        )
            .into_response(),
        Err(_) => (
            StatusCode::BAD_REQUEST,
            assets::login_page(Some("the token has characters a cookie cannot carry")),
        )
            .into_response(),
    }
}

/// Refuses a `Host` this dashboard does not answer to: a page on another site
/// that rebinds its name to 127.0.0.1 must not reach the API.
async fn check_host(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !host_allowed(host, &app.settings) {
        return api::error_response(
            StatusCode::FORBIDDEN,
            &format!(
                "Host {host:?} is not one this dashboard answers to (dashboard.allowed_hosts)"
            ),
            None,
        );
    }
    next.run(request).await
}

/// Whether `host` (a `Host` header: name or address, maybe with a port) may be
/// served.
pub fn host_allowed(host: &str, settings: &HttpSettings) -> bool {
    if !settings.allowed_hosts.is_empty() {
        return settings.allowed_hosts.iter().any(|h| h == host);
    }
    if settings.token.is_some() {
        return true;
    }
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    matches!(name, "localhost" | "127.0.0.1" | "::1") || name == settings.bind.ip().to_string()
}

/// Actions change things, so they accept only JSON bodies (a cross-site form
/// cannot send one without a preflight, which is never answered) and, when the
/// browser names the page's origin, only from this origin.
async fn json_actions(request: Request, next: Next) -> Response {
    if request.method() == Method::POST {
        let headers = request.headers();
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/json")
            });
        if !json {
            return api::error_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "actions take a JSON body (Content-Type: application/json)",
                None,
            );
        }
        if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
            let host = headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
            if origin_host != host {
                return api::error_response(
                    StatusCode::FORBIDDEN,
                    &format!("requests from {origin} are refused (not this dashboard's origin)"),
                    None,
                );
            }
        }
    }
    next.run(request).await
}

/// Every answer: no framing by other sites, no sniffing, scripts and styles from
/// this origin only (the pages use no inline script).
async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.entry(header::CONTENT_SECURITY_POLICY).or_insert(HeaderValue::from_static(
        "default-src 'self'; img-src 'self' blob: data:; media-src 'self'; style-src 'self'; script-src 'self'; frame-ancestors 'none'; form-action 'self'",
    ));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(token: Option<&str>, allowed: &[&str]) -> HttpSettings {
        HttpSettings {
            bind: "127.0.0.1:8790".parse().unwrap(),
            token: token.map(str::to_string),
            allowed_hosts: allowed.iter().map(|s| s.to_string()).collect(),
            queue_limit: 10,
            waiting_detail_limit: 5,
        }
    }

    #[test]
    fn loopback_names_only_without_a_token() {
        let s = settings(None, &[]);
        for ok in [
            "127.0.0.1:8790",
            "localhost:8790",
            "[::1]:8790",
            "localhost",
        ] {
            assert!(host_allowed(ok, &s), "{ok}");
        }
        for bad in ["evil.example:8790", "evil.example", "", "10.0.0.1:8790"] {
            assert!(!host_allowed(bad, &s), "{bad}");
        }
        assert!(host_allowed("anything", &settings(Some("t"), &[])));
        let listed = settings(Some("t"), &["gpu-box.lan:8790"]);
        assert!(host_allowed("gpu-box.lan:8790", &listed));
        assert!(!host_allowed("localhost:8790", &listed));
    }

    #[test]
    fn the_token_comes_from_the_header_or_the_cookie() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=b; kiln_dashboard=s3cret"),
        );
        assert_eq!(presented(&h).as_deref(), Some("s3cret"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer t0k"),
        );
        assert_eq!(presented(&h).as_deref(), Some("t0k"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic t0k"));
        assert_eq!(presented(&h), None);
    }
}
