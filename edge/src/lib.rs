//! Outpost edge.
