//! Outpost hub.
