//! Typed column values and rows, and timestamps as microseconds since the Unix epoch.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Microseconds since 1970-01-01T00:00:00Z. On the wire (JSON) it is RFC 3339 UTC.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
pub struct Timestamp(pub i64);

impl Timestamp {
    /// Parses RFC 3339 (any offset; normalised to UTC).
    pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
        let ts: jiff::Timestamp = text.parse().ok()?;
        Some(Timestamp(ts.as_microsecond()))
    }

    /// Formats as RFC 3339 UTC with microseconds, e.g. `2026-11-22T01:02:03.000004Z`.
    /// The fixed width makes the text order equal the time order.
    pub fn to_rfc3339(self) -> String {
        match jiff::Timestamp::from_microsecond(self.0) {
            Ok(ts) => format!("{ts:.6}"),
            // Out of jiff's range (beyond year 9999): only reachable through a bad clock.
            Err(_) => format!("@{}us", self.0),
        }
    }

    pub fn as_millis(self) -> u64 {
        u64::try_from(self.0 / 1000).unwrap_or(0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

/// One column's value. Money is [`Value::Int`] in minor units; JSON columns hold the
/// document's compact text so that equal documents compare equal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Text(String),
    Timestamp(Timestamp),
    Json(String),
}

impl Value {
    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

/// The user columns of a row, by name. Every column of the table is present (absent ones
/// are [`Value::Null`]) once a row is stored.
pub type Fields = BTreeMap<String, Value>;

/// A stored row: the server-maintained columns and the user columns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    pub id: String,
    /// Row version: 1 on insert, +1 per update.
    pub version: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// For log tables: the origin-log seq of the entry that inserted it.
    pub seq: Option<u64>,
    pub fields: Fields,
}

impl Row {
    pub fn get(&self, column: &str) -> &Value {
        self.fields.get(column).unwrap_or(&Value::Null)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip_and_sort_as_text() {
        let a = Timestamp::parse_rfc3339("2026-11-22T01:02:03.5Z").unwrap();
        assert_eq!(a.to_rfc3339(), "2026-11-22T01:02:03.500000Z");
        assert_eq!(Timestamp::parse_rfc3339(&a.to_rfc3339()), Some(a));
        let b = Timestamp::parse_rfc3339("2026-11-22T03:02:03+02:00").unwrap();
        assert!(b < a);
        assert!(b.to_rfc3339() < a.to_rfc3339());
        assert_eq!(Timestamp::parse_rfc3339("yesterday"), None);
    }
}
