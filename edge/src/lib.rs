//! Outpost's branch edge node: the durable store (SQLite + hot tier) that serves the branch's
//! terminals and keeps the origin log the sync client sends to the hub, and the HTTP server.

pub mod api;
pub mod feed;
/// The HTTP server under the terminal API (the `httpd` crate, shared with the hub).
pub use httpd as http;
pub mod identity;
pub mod server;
pub mod store;
pub mod sync;
pub mod tokens;
pub mod update;
