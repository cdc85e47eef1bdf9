//! Outpost's branch edge node: the durable store (SQLite + hot tier) that serves the branch's
//! terminals and keeps the origin log the sync client sends to the hub, and the HTTP server.

pub mod api;
pub mod feed;
pub mod http;
pub mod identity;
pub mod server;
pub mod store;
pub mod sync;
pub mod tokens;
pub mod update;
