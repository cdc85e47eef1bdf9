//! Identifier and position newtypes: branches, origins, sequence numbers, commit versions.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest identifier (branch, origin, row id) accepted anywhere, in bytes.
pub const ID_BYTES_MAX: usize = 128;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid identifier {value:?}: {reason}")]
pub struct IdError {
    pub value: String,
    pub reason: &'static str,
}

/// Parses an identifier made of ASCII letters, digits, `-`, `_` and `.`, 1..=128 bytes.
fn parse_ident(value: &str) -> Result<(), IdError> {
    let fail = |reason| {
        Err(IdError {
            value: value.chars().take(ID_BYTES_MAX).collect(),
            reason,
        })
    };
    if value.is_empty() {
        return fail("it is empty");
    }
    if value.len() > ID_BYTES_MAX {
        return fail("it is longer than 128 bytes");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return fail("only ASCII letters, digits, '-', '_' and '.' are allowed");
    }
    Ok(())
}

/// A branch's identity, e.g. `B001`. Also the name of the branch's origin log.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct BranchId(String);

impl BranchId {
    pub fn parse(value: &str) -> Result<Self, IdError> {
        parse_ident(value)?;
        Ok(Self(value.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for BranchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The name of a replica's origin log: a branch id, or [`OriginId::HUB`] for head office.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OriginId(String);

impl OriginId {
    /// The hub's own origin (master data written at head office).
    pub const HUB: &'static str = "hub";

    pub fn parse(value: &str) -> Result<Self, IdError> {
        parse_ident(value)?;
        Ok(Self(value.to_owned()))
    }
    pub fn hub() -> Self {
        Self(Self::HUB.to_owned())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&BranchId> for OriginId {
    fn from(branch: &BranchId) -> Self {
        Self(branch.0.clone())
    }
}

impl fmt::Display for OriginId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Position of an entry in one origin's log. Gap-free, starting at 1; 0 means "nothing".
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Seq(pub u64);

impl Seq {
    pub const ZERO: Seq = Seq(0);
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// An edge's commit sequence number: one per committed transaction, monotonic.
/// Terminals see it as `version` on snapshots and deltas.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Version(pub u64);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_parse() {
        assert!(BranchId::parse("B001").is_ok());
        assert!(BranchId::parse("shop-7.east_wing").is_ok());
        for bad in ["", "a b", "x;drop", "é", &"a".repeat(129)] {
            assert!(BranchId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
