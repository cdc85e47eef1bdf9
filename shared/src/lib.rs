//! Outpost shared data model.
