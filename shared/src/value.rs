//! Typed column values and rows, and timestamps as microseconds since the Unix epoch.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

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
        self.with_rfc3339(str::to_owned)
    }

    /// Calls `with` on the [`Timestamp::to_rfc3339`] text, without allocating it when it can.
    pub fn with_rfc3339<R>(self, with: impl FnOnce(&str) -> R) -> R {
        match self.rfc3339_fast() {
            // ASCII digits and separators only, so always UTF-8.
            Some(text) => with(std::str::from_utf8(&text).unwrap_or_default()),
            None => with(&match jiff::Timestamp::from_microsecond(self.0) {
                Ok(ts) => format!("{ts:.6}"),
                // Out of jiff's range (beyond year 9999): only reachable through a bad clock.
                Err(_) => format!("@{}us", self.0),
            }),
        }
    }

    /// [`Timestamp::to_rfc3339`] for years 0000 to 9998 (inside jiff's range, whose end is
    /// late on 9999-12-30), without a formatter: every row an answer or a feed delta carries
    /// has two of them. Days to a civil date as in Howard Hinnant's `civil_from_days`.
    fn rfc3339_fast(self) -> Option<[u8; 27]> {
        const MICROS_PER_DAY: i64 = 86_400_000_000;
        let days = self.0.div_euclid(MICROS_PER_DAY);
        let micros = self.0.rem_euclid(MICROS_PER_DAY);
        // Days from 1970-01-01 to 0000-03-01 are 719468.
        let z = days.checked_add(719_468)?;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        if !(0..=9998).contains(&year) {
            return None;
        }
        let secs = micros / 1_000_000;
        let fields = [
            (year, 4),
            (month, 2),
            (day, 2),
            (secs / 3600, 2),
            (secs / 60 % 60, 2),
            (secs % 60, 2),
            (micros % 1_000_000, 6),
        ];
        let mut out = *b"0000-00-00T00:00:00.000000Z";
        let starts = [0, 5, 8, 11, 14, 17, 20];
        for ((mut value, width), start) in fields.into_iter().zip(starts) {
            for i in (start..start + width).rev() {
                out[i] = b'0' + (value % 10) as u8;
                value /= 10;
            }
        }
        Some(out)
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

/// User columns by name: how callers describe a row to insert or the columns to update.
pub type Fields = BTreeMap<String, Value>;

/// The names of a table's user columns, shared by all its rows.
pub type Columns = Arc<[String]>;

/// A stored row: the server-maintained columns and the user columns, positionally, in the
/// table's column order. Each row shares its table's column names, so `get` works by name;
/// encodings carry only the values (see [`RowWire`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub id: String,
    /// Row version: 1 on insert, +1 per update.
    pub version: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// For log tables: the origin-log seq of the entry that inserted it.
    pub seq: Option<u64>,
    pub columns: Columns,
    /// One value per column, in `columns` order.
    pub values: Vec<Value>,
}

impl Row {
    /// The value of a column by name; `Null` for a name the table lacks.
    pub fn get(&self, column: &str) -> &Value {
        const NULL: &Value = &Value::Null;
        match self.columns.iter().position(|c| c == column) {
            Some(i) => self.values.get(i).unwrap_or(NULL),
            None => NULL,
        }
    }

    /// Sets a column by name; returns false when the table has no such column.
    pub fn set(&mut self, column: &str, value: Value) -> bool {
        match self.columns.iter().position(|c| c == column) {
            Some(i) => {
                self.values[i] = value;
                true
            }
            None => false,
        }
    }

    /// The user columns as a map by name.
    pub fn fields(&self) -> Fields {
        self.columns
            .iter()
            .cloned()
            .zip(self.values.iter().cloned())
            .collect()
    }

    /// Iterates `(column name, value)`.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.columns
            .iter()
            .map(String::as_str)
            .zip(self.values.iter())
    }

    /// The row's encoding (values only, names come from the schema).
    pub fn wire(&self) -> RowWireRef<'_> {
        RowWireRef {
            id: &self.id,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
            seq: self.seq,
            values: &self.values,
        }
    }
}

/// A row as encoded in the log and on the wire: its user columns by position only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowWire {
    pub id: String,
    pub version: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub seq: Option<u64>,
    pub values: Vec<Value>,
}

/// Borrowed [`RowWire`]: encodes to the same bytes.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RowWireRef<'a> {
    pub id: &'a str,
    pub version: u64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub seq: Option<u64>,
    pub values: &'a [Value],
}

impl RowWire {
    /// Attaches the table's column names. A row encoded when the table had fewer columns
    /// (columns are only ever appended) gets nulls for the new ones; a row with more values
    /// than the table has columns is refused.
    pub fn attach(self, columns: &Columns) -> Option<Row> {
        let mut values = self.values;
        if values.len() > columns.len() {
            return None;
        }
        values.resize(columns.len(), Value::Null);
        Some(Row {
            id: self.id,
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
            seq: self.seq,
            columns: columns.clone(),
            values,
        })
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

    /// What jiff writes, the reference for the fast path.
    fn jiff_text(t: Timestamp) -> Option<String> {
        jiff::Timestamp::from_microsecond(t.0)
            .ok()
            .map(|ts| format!("{ts:.6}"))
    }

    #[test]
    fn the_fast_format_is_jiffs_at_the_edges() {
        let day = 86_400_000_000;
        // 0000-01-01, 1969-12-31T23:59:59.999999, the epoch, leap days, 9998-12-31 end.
        for t in [
            -62_167_219_200_000_000,
            -1,
            0,
            951_782_400_000_000,
            951_782_400_000_000 - 1,
            4_107_542_400_000_000 - day,
            253_370_764_799_999_999,
        ] {
            let t = Timestamp(t);
            let fast = t
                .rfc3339_fast()
                .map(|b| String::from_utf8(b.to_vec()).unwrap());
            assert_eq!(fast, jiff_text(t), "{}", t.0);
        }
        // Outside 0000-9998 the fast path steps aside.
        assert_eq!(Timestamp(-62_167_219_200_000_001).rfc3339_fast(), None);
        assert_eq!(Timestamp(253_370_764_800_000_000).rfc3339_fast(), None);
        assert_eq!(Timestamp(i64::MIN).rfc3339_fast(), None);
        assert_eq!(Timestamp(i64::MAX).rfc3339_fast(), None);
    }

    proptest::proptest! {
        #[test]
        fn the_fast_format_is_jiffs(t in -62_167_219_200_000_000i64..253_370_764_800_000_000) {
            let t = Timestamp(t);
            let fast = t.rfc3339_fast().map(|b| String::from_utf8(b.to_vec()).unwrap());
            proptest::prop_assert_eq!(fast, jiff_text(t));
        }
    }
}
