//! Outpost's hub: the QUIC sync server, its storage and the head-office API.

pub mod api;
pub mod identity;
pub mod releases;
pub mod rows;
pub mod store;
pub mod sync;
