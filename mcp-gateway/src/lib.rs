//! kiln-mcp: the MCP gateway of Kiln.
//!
//! An MCP server (rmcp) that is a client of the Kiln broker. Desktop assistants run
//! it over stdio; remote ones reach it over streamable HTTP with a bearer token.
//! All sessions share one broker connection ([`gateway::Gateway`]).
//!
//! - [`server`]: the tools, resources and prompts.
//! - [`args`] and [`validate`]: tool arguments, their schemas, and checks against them.
//! - [`spec`]: arguments → broker job specs; [`tool_params`]: the backends'
//!   parameter descriptions in the tools' schemas.
//! - [`jobs`] and [`progress`]: submitting, following, progress notifications, cancel.
//! - [`render`] and [`imaging`]: results with inline images, links and saved copies.
//! - [`files`] and [`save`]: the allowed roots, `save_output` and asset manifests.
//! - [`fleet`], [`resources`], [`prompts`], [`inputs`]: the rest of the surface.
//! - [`http`]: the HTTP transport with its token and Host/Origin guards.

pub mod args;
pub mod error;
pub mod files;
pub mod fleet;
pub mod gateway;
pub mod http;
pub mod imaging;
pub mod inputs;
pub mod jobs;
pub mod progress;
pub mod prompts;
pub mod render;
pub mod resources;
pub mod save;
pub mod schema;
pub mod server;
pub mod spec;
pub mod stdio;
pub mod tool_params;
pub mod validate;

pub use gateway::Gateway;
pub use server::KilnMcp;
