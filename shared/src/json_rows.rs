//! Rows read straight from a request's JSON text against a table's schema, without building
//! a `serde_json::Value` tree first: each key is looked up among the table's columns and each
//! value is read into the column's type as the parser reaches it.
//!
//! The result is the same as parsing into a `Value` and calling
//! [`insert_from_json`](crate::json::insert_from_json) or
//! [`update_from_json`](crate::json::update_from_json) (a property test checks this):
//! - a refused row is still read to its end, and values that are skipped are checked as
//!   fully as a `Value` would be ([`Skip`]: UTF-8, escapes, nesting depth), so text that is
//!   not JSON is always reported as such;
//! - of a key given twice the last value counts;
//! - of several refused columns, the one first in name order is reported.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value as Json;

use crate::json::{FieldError, InsertInput, TEXT_BYTES_MAX, expected, value_from_json};
use crate::schema::{ColumnType, SYSTEM_COLUMNS, Table};
use crate::value::{Fields, Timestamp, Value};

/// Whether a row object is an insert's row or an update's `set`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowKind {
    /// `id` may be given; the other server-maintained columns are ignored.
    Insert,
    /// Every server-maintained column is refused.
    Update,
}

/// Why a row object was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowRefusal {
    /// The value is not a JSON object.
    NotObject,
    /// `error` refuses the first refused column in name order; `columns` names every
    /// column the row gave, refused or not (an insert's `id` and the server-maintained
    /// columns it ignores aside), for a permission check that must come first.
    Field {
        error: FieldError,
        columns: Vec<String>,
    },
}

/// Why a body holding one row was refused.
#[derive(Debug)]
pub enum BodyError {
    /// The text is not JSON.
    Syntax(serde_json::Error),
    Refused(RowRefusal),
}

/// Reads all of `text` with `seed`: nothing but whitespace may follow the value.
pub fn from_slice_seed<'de, S: DeserializeSeed<'de>>(
    text: &'de [u8],
    seed: S,
) -> Result<S::Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let value = seed.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// Reads `text` as one row object of `table`.
pub fn row_from_slice(table: &Table, kind: RowKind, text: &[u8]) -> Result<InsertInput, BodyError> {
    let row = from_slice_seed(text, RowSeed { table, kind }).map_err(BodyError::Syntax)?;
    row.map_err(BodyError::Refused)
}

/// Reads one row object of `table` from a deserializer. A refused row is still read to its
/// end (the outer `Result` is the parser's, the inner one the row's).
#[derive(Clone, Copy)]
pub struct RowSeed<'t> {
    pub table: &'t Table,
    pub kind: RowKind,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = Result<InsertInput, RowRefusal>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// The refused columns of a row so far, by name: the last value of a key counts, so a later
/// valid value takes its key's refusal back. A map, so that a body of many refused keys
/// costs no more than its size.
#[derive(Default)]
struct Refusals(std::collections::BTreeMap<String, FieldError>);

impl Refusals {
    fn accept(&mut self, column: &str) {
        self.0.remove(column);
    }

    fn refuse(&mut self, column: &str, e: FieldError) {
        match self.0.get_mut(column) {
            Some(refused) => *refused = e,
            None => {
                self.0.insert(column.to_owned(), e);
            }
        }
    }
}

impl RowSeed<'_> {
    /// The user column `name` read from `map`, or why it is refused (its value skipped).
    fn user_value<'de, A: MapAccess<'de>>(
        &self,
        name: &str,
        map: &mut A,
    ) -> Result<Result<Value, FieldError>, A::Error> {
        let column = match self.table.column(name) {
            None => {
                map.next_value::<Skip>()?;
                return Ok(Err(FieldError::UnknownColumn {
                    table: self.table.name.clone(),
                    column: name.chars().take(64).collect(),
                }));
            }
            Some(c) if c.server_owned => {
                map.next_value::<Skip>()?;
                return Ok(Err(FieldError::ReadOnlyColumn {
                    column: name.to_owned(),
                }));
            }
            Some(c) => c,
        };
        Ok(map
            .next_value_seed(ColumnSeed(column.ty))?
            .map_err(|expected| FieldError::InvalidValue {
                column: name.to_owned(),
                expected,
            }))
    }
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = Result<InsertInput, RowRefusal>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut id = None;
        let mut fields = Fields::new();
        let mut refused = Refusals::default();
        while let Some(Key(name)) = map.next_key::<Key<'de>>()? {
            let name = name.as_ref();
            if self.kind == RowKind::Insert && name == "id" {
                match map.next_value_seed(IdSeed)? {
                    Ok(given) => {
                        refused.accept(name);
                        id = given;
                    }
                    Err(e) => {
                        refused.refuse(name, e);
                        id = None;
                    }
                }
                continue;
            }
            if SYSTEM_COLUMNS.contains(&name) {
                map.next_value::<Skip>()?;
                if self.kind == RowKind::Update {
                    let e = FieldError::ReadOnlyColumn {
                        column: name.to_owned(),
                    };
                    refused.refuse(name, e);
                }
                continue;
            }
            match self.user_value(name, &mut map)? {
                Ok(v) => {
                    refused.accept(name);
                    fields.insert(name.to_owned(), v);
                }
                Err(e) => {
                    refused.refuse(name, e);
                    fields.remove(name);
                }
            }
        }
        let Some(error) = refused.0.values().next().cloned() else {
            return Ok(Ok(InsertInput { id, fields }));
        };
        let columns = fields
            .into_keys()
            .chain(refused.0.into_keys())
            .filter(|c| self.kind == RowKind::Update || c != "id")
            .collect();
        Ok(Err(RowRefusal::Field { error, columns }))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Err(RowRefusal::NotObject))
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Err(RowRefusal::NotObject))
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Err(RowRefusal::NotObject))
    }

    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(Err(RowRefusal::NotObject))
    }

    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(Err(RowRefusal::NotObject))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(Err(RowRefusal::NotObject))
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(Err(RowRefusal::NotObject))
    }
}

/// An object key, borrowed from the text when it holds no escapes (serde's own `Cow<str>`
/// always copies).
pub struct Key<'de>(pub Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }

            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }

            fn visit_string<E>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s)))
            }
        }
        d.deserialize_str(KeyVisitor)
    }
}

/// An insert's `id`: absent (null) or a non-empty string of at most 128 bytes.
struct IdSeed;

impl<'de> DeserializeSeed<'de> for IdSeed {
    type Value = Result<Option<String>, FieldError>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let refused = || FieldError::InvalidValue {
            column: "id".into(),
            expected: "a non-empty string of at most 128 bytes",
        };
        Ok(match d.deserialize_any(ScalarVisitor)? {
            Scalar::Null => Ok(None),
            Scalar::Str(s) if !s.is_empty() && s.len() <= crate::ids::ID_BYTES_MAX => {
                Ok(Some(s.into_owned()))
            }
            _ => Err(refused()),
        })
    }
}

/// A column's value read into its type. A value of another type is read to its end and
/// reported as what the column expected.
struct ColumnSeed(ColumnType);

impl<'de> DeserializeSeed<'de> for ColumnSeed {
    type Value = Result<Value, &'static str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let ty = self.0;
        if ty == ColumnType::Json {
            // Stored as the text `serde_json` writes for the parsed document.
            return Ok(value_from_json(ty, &Json::deserialize(d)?));
        }
        let value = match d.deserialize_any(ScalarVisitor)? {
            Scalar::Null => Some(Value::Null),
            Scalar::Bool(b) => (ty == ColumnType::Bool).then_some(Value::Bool(b)),
            Scalar::Int(i) => {
                matches!(ty, ColumnType::Integer | ColumnType::Money).then_some(Value::Int(i))
            }
            Scalar::Str(s) => match ty {
                ColumnType::Text if s.len() <= TEXT_BYTES_MAX => Some(Value::Text(s.into_owned())),
                ColumnType::Timestamp => Timestamp::parse_rfc3339(&s).map(Value::Timestamp),
                _ => None,
            },
            Scalar::Other => None,
        };
        Ok(value.ok_or(expected(ty)))
    }
}

/// A JSON value as far as a column needs to know it: integers that fit an `i64`, strings
/// (borrowed when they hold no escapes), and everything else read to its end.
enum Scalar<'de> {
    Null,
    Bool(bool),
    Int(i64),
    Str(Cow<'de, str>),
    Other,
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Null)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Bool(b))
    }

    fn visit_i64<E>(self, i: i64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Int(i))
    }

    fn visit_u64<E>(self, u: u64) -> Result<Scalar<'de>, E> {
        Ok(i64::try_from(u).map_or(Scalar::Other, Scalar::Int))
    }

    fn visit_f64<E>(self, _: f64) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Other)
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E>(self, s: String) -> Result<Scalar<'de>, E> {
        Ok(Scalar::Str(Cow::Owned(s)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Scalar<'de>, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Scalar::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scalar<'de>, A::Error> {
        while map.next_entry::<Skip, Skip>()?.is_some() {}
        Ok(Scalar::Other)
    }
}

/// A value that is read only to be dropped, checked as fully as a `serde_json::Value` would
/// be: strings must be UTF-8 with valid escapes (serde's `IgnoredAny` does not check them in
/// `serde_json`), and nesting counts against the parser's depth limit. Strings are borrowed
/// where they can be; nothing is kept.
pub struct Skip;

impl<'de> serde::Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Skip, D::Error> {
        d.deserialize_any(SkipVisitor)
    }
}

struct SkipVisitor;

impl<'de> Visitor<'de> for SkipVisitor {
    type Value = Skip;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_unit<E>(self) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_i64<E>(self, _: i64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_u64<E>(self, _: u64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_f64<E>(self, _: f64) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_str<E>(self, _: &str) -> Result<Skip, E> {
        Ok(Skip)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Skip, A::Error> {
        while seq.next_element::<Skip>()?.is_some() {}
        Ok(Skip)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
        while map.next_entry::<Key<'de>, Skip>()?.is_some() {}
        Ok(Skip)
    }
}
