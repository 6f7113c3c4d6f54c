//! The pages, embedded in the binary: one HTML shell, one stylesheet, one script,
//! no build step and nothing fetched from elsewhere, so the dashboard works on a
//! machine without internet access.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};

const INDEX: &str = include_str!("../assets/index.html");
const SCRIPT: &str = include_str!("../assets/app.js");
const STYLE: &str = include_str!("../assets/app.css");
const LOGIN: &str = include_str!("../assets/login.html");
const FAVICON: &str = include_str!("../assets/favicon.svg");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            // The binary's version is the assets' version: revalidate each load.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX)
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", SCRIPT)
}

pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE)
}

pub async fn favicon() -> Response {
    asset("image/svg+xml", FAVICON)
}

/// The login form, with a message when the last try failed.
pub fn login_page(message: Option<&str>) -> Html<String> {
    let message = message
        .map(|m| format!("<p class=\"error\" role=\"alert\">{}</p>", escape(m)))
        .unwrap_or_default();
    Html(LOGIN.replace("<!--message-->", &message))
}

pub async fn login() -> Response {
    (StatusCode::OK, login_page(None)).into_response()
}

/// HTML-escapes text.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}
