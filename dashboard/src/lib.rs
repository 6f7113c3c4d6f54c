//! `kiln-dashboard`: a web dashboard of a Kiln fleet, served by a client of the
//! broker (the broker's own loop never serves web traffic).
//!
//! - [`live`]: the shared live view, fed by the broker's events and a poll;
//! - [`http`]: the server, its token and Host guards;
//! - [`api`]: the JSON API the pages use, and the server-sent event stream;
//! - [`artifacts`]: job outputs streamed from the broker, with byte ranges;
//! - [`form`]: the test-job form and resubmission, validated field by field;
//! - [`assets`]: the HTML, CSS and JavaScript, embedded in the binary.

pub mod api;
pub mod artifacts;
pub mod assets;
pub mod form;
pub mod http;
pub mod live;
