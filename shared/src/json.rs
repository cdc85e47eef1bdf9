//! JSON at the boundary: typed values and rows from and to `serde_json` documents, checked
//! against a table's schema. Used by the edge's and the hub's HTTP layers.

use serde_json::{Map, Value as Json};

use crate::schema::{ColumnType, SYSTEM_COLUMNS, Table};
use crate::value::{Fields, Row, Timestamp, Value};

/// Longest text value accepted in a column, in bytes.
pub const TEXT_BYTES_MAX: usize = 64 * 1024;

/// Converts one JSON value to a column value. The error is what was expected, for messages.
pub fn value_from_json(ty: ColumnType, v: &Json) -> Result<Value, &'static str> {
    if v.is_null() {
        return Ok(Value::Null);
    }
    let value = match ty {
        ColumnType::Text => match v {
            Json::String(s) if s.len() <= TEXT_BYTES_MAX => Some(Value::Text(s.clone())),
            _ => None,
        },
        ColumnType::Integer | ColumnType::Money => v.as_i64().map(Value::Int),
        ColumnType::Bool => v.as_bool().map(Value::Bool),
        ColumnType::Timestamp => v
            .as_str()
            .and_then(Timestamp::parse_rfc3339)
            .map(Value::Timestamp),
        ColumnType::Json => Some(v.to_string())
            .filter(|text| text.len() <= TEXT_BYTES_MAX)
            .map(Value::Json),
    };
    value.ok_or(expected(ty))
}

/// What a column of type `ty` accepts, for error messages.
pub(crate) fn expected(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Text => "a string of at most 65536 bytes",
        ColumnType::Integer => "an integer",
        ColumnType::Money => "an integer amount in minor units (12550 means 125.50)",
        ColumnType::Bool => "true or false",
        ColumnType::Timestamp => "an RFC 3339 timestamp such as 2026-11-22T12:00:00Z",
        ColumnType::Json => "a JSON document of at most 65536 bytes",
    }
}

/// Converts a column value to JSON.
pub fn value_to_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => Json::from(*i),
        Value::Text(s) => Json::String(s.clone()),
        Value::Timestamp(t) => Json::String(t.to_rfc3339()),
        // Stored JSON text was produced by serde_json; it always parses.
        Value::Json(text) => serde_json::from_str(text).unwrap_or(Json::Null),
    }
}

/// A stored row as a JSON object: `id`, `version`, `created_at`, `updated_at`, `seq` (log
/// tables), then the user columns.
pub fn row_to_json(row: &Row) -> Map<String, Json> {
    let mut m = Map::with_capacity(row.values.len() + 5);
    m.insert("id".into(), Json::String(row.id.clone()));
    m.insert("version".into(), Json::from(row.version));
    m.insert(
        "created_at".into(),
        Json::String(row.created_at.to_rfc3339()),
    );
    m.insert(
        "updated_at".into(),
        Json::String(row.updated_at.to_rfc3339()),
    );
    if let Some(seq) = row.seq {
        m.insert("seq".into(), Json::from(seq));
    }
    for (k, v) in row.iter() {
        m.insert(k.to_owned(), value_to_json(v));
    }
    m
}

/// A row written as JSON straight from the row: the same object as [`row_to_json`] (keys in
/// sorted order, as `serde_json::Map` keeps them) without building a map of owned keys and
/// values first. HTTP answers carry rows this way.
#[derive(Debug, Clone, Copy)]
pub struct RowJson<'a>(pub &'a Row);

/// A column value written as JSON, as [`value_to_json`] converts it.
struct ValueJson<'a>(&'a Value);

/// One member of a row's JSON object.
enum Member<'a> {
    Text(&'a str),
    Number(u64),
    Time(Timestamp),
    Value(&'a Value),
}

impl serde::Serialize for ValueJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Null => s.serialize_unit(),
            Value::Bool(b) => s.serialize_bool(*b),
            Value::Int(i) => s.serialize_i64(*i),
            Value::Text(t) => s.serialize_str(t),
            Value::Timestamp(t) => t.with_rfc3339(|text| s.serialize_str(text)),
            Value::Json(_) => value_to_json(self.0).serialize(s),
        }
    }
}

impl serde::Serialize for Member<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Member::Text(t) => s.serialize_str(t),
            Member::Number(n) => s.serialize_u64(*n),
            Member::Time(t) => t.with_rfc3339(|text| s.serialize_str(text)),
            Member::Value(v) => ValueJson(v).serialize(s),
        }
    }
}

impl serde::Serialize for RowJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let row = self.0;
        let mut members: Vec<(&str, Member<'_>)> = Vec::with_capacity(row.values.len() + 5);
        members.push(("id", Member::Text(&row.id)));
        members.push(("version", Member::Number(row.version)));
        members.push(("created_at", Member::Time(row.created_at)));
        members.push(("updated_at", Member::Time(row.updated_at)));
        if let Some(seq) = row.seq {
            members.push(("seq", Member::Number(seq)));
        }
        members.extend(row.iter().map(|(k, v)| (k, Member::Value(v))));
        let order = member_order(row, &members);
        let mut map = s.serialize_map(Some(order.len()))?;
        for &i in order.iter() {
            let (k, m) = &members[i as usize];
            map.serialize_entry(k, m)?;
        }
        map.end()
    }
}

/// Column sets (held, so that no other set can take their address), whether rows carry
/// `seq` and how many members they have, with the order the members are written in. Rows
/// of a table share one column set, so the sort runs once per table and thread.
type MemberOrders = Vec<(crate::value::Columns, (bool, usize), std::sync::Arc<[u32]>)>;

thread_local! {
    static MEMBER_ORDERS: std::cell::RefCell<MemberOrders> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Most column sets remembered per thread.
const MEMBER_ORDERS_MAX: usize = 64;

/// The indexes of `members` in the order `row_to_json`'s map writes them: sorted by name,
/// and of equal names the last (the map keeps the last inserted).
fn member_order(row: &Row, members: &[(&str, Member<'_>)]) -> std::sync::Arc<[u32]> {
    let key = (row.seq.is_some(), members.len());
    let cached = MEMBER_ORDERS.with_borrow(|orders| {
        orders
            .iter()
            .find(|(columns, n, _)| std::sync::Arc::ptr_eq(columns, &row.columns) && *n == key)
            .map(|(_, _, order)| order.clone())
    });
    if let Some(order) = cached {
        return order;
    }
    // A stable sort keeps equal names in insertion order.
    let mut sorted: Vec<u32> = (0..members.len())
        .filter_map(|i| u32::try_from(i).ok())
        .collect();
    sorted.sort_by(|&a, &b| members[a as usize].0.cmp(members[b as usize].0));
    let order: std::sync::Arc<[u32]> = sorted
        .iter()
        .enumerate()
        .filter(|&(n, &i)| {
            sorted
                .get(n + 1)
                .is_none_or(|&next| members[next as usize].0 != members[i as usize].0)
        })
        .map(|(_, &i)| i)
        .collect();
    MEMBER_ORDERS.with_borrow_mut(|orders| {
        if orders.len() >= MEMBER_ORDERS_MAX {
            orders.remove(0);
        }
        orders.push((row.columns.clone(), key, order.clone()));
    });
    order
}

/// Why a JSON row was refused. Each maps to a stable HTTP error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("table {table:?} has no column {column:?}")]
    UnknownColumn { table: String, column: String },
    #[error("column {column:?} must be {expected}")]
    InvalidValue {
        column: String,
        expected: &'static str,
    },
    #[error("column {column:?} is maintained by the server and cannot be set")]
    ReadOnlyColumn { column: String },
}

impl FieldError {
    pub fn code(&self) -> &'static str {
        match self {
            FieldError::UnknownColumn { .. } => "unknown_column",
            FieldError::InvalidValue { .. } => "invalid_value",
            FieldError::ReadOnlyColumn { .. } => "read_only_column",
        }
    }
}

/// A row to insert, parsed from JSON: an optional client-chosen id and the user columns given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InsertInput {
    pub id: Option<String>,
    pub fields: Fields,
}

/// Parses an insert body. Server-maintained columns (`version`, `created_at`, `updated_at`,
/// `seq`) are ignored; server-owned user columns are refused.
pub fn insert_from_json(table: &Table, obj: &Map<String, Json>) -> Result<InsertInput, FieldError> {
    let mut id = None;
    let mut fields = Fields::new();
    for (k, v) in obj {
        if k == "id" {
            match v {
                Json::Null => {}
                Json::String(s) if !s.is_empty() && s.len() <= crate::ids::ID_BYTES_MAX => {
                    id = Some(s.clone())
                }
                _ => {
                    return Err(FieldError::InvalidValue {
                        column: "id".into(),
                        expected: "a non-empty string of at most 128 bytes",
                    });
                }
            }
            continue;
        }
        if SYSTEM_COLUMNS.contains(&k.as_str()) {
            continue;
        }
        fields.insert(k.clone(), user_value(table, k, v)?);
    }
    Ok(InsertInput { id, fields })
}

/// Parses the `set` of an update. Every server-maintained column is refused. The edge reads
/// update bodies with `json_rows` instead; this is the reference its property test checks
/// it against.
pub fn update_from_json(table: &Table, set: &Map<String, Json>) -> Result<Fields, FieldError> {
    let mut fields = Fields::new();
    for (k, v) in set {
        if SYSTEM_COLUMNS.contains(&k.as_str()) {
            return Err(FieldError::ReadOnlyColumn { column: k.clone() });
        }
        fields.insert(k.clone(), user_value(table, k, v)?);
    }
    Ok(fields)
}

fn user_value(table: &Table, name: &str, v: &Json) -> Result<Value, FieldError> {
    let column = table
        .column(name)
        .ok_or_else(|| FieldError::UnknownColumn {
            table: table.name.clone(),
            column: name.chars().take(64).collect(),
        })?;
    if column.server_owned {
        return Err(FieldError::ReadOnlyColumn {
            column: name.to_owned(),
        });
    }
    value_from_json(column.ty, v).map_err(|expected| FieldError::InvalidValue {
        column: name.to_owned(),
        expected,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::pos;

    fn obj(v: Json) -> Map<String, Json> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn insert_parses_and_checks() {
        let s = pos::schema();
        let pay = s.table("order_payment").unwrap();
        let ok = insert_from_json(
            pay,
            &obj(json!({"id":"p1","order_id":"o1","amount":12550,"method":"cash","version":9})),
        )
        .unwrap();
        assert_eq!(ok.id.as_deref(), Some("p1"));
        assert_eq!(ok.fields["amount"], Value::Int(12550));
        assert!(!ok.fields.contains_key("version"));

        let check = |body: Json, code: &str| {
            let e = insert_from_json(pay, &obj(body.clone())).unwrap_err();
            assert_eq!(e.code(), code, "{body}");
        };
        check(json!({"amount":125.5}), "invalid_value");
        check(json!({"amount":"12550"}), "invalid_value");
        check(json!({"amount":1e30}), "invalid_value");
        check(json!({"tip":1}), "unknown_column");
        check(json!({"seq ; drop table x":1}), "unknown_column");
        check(json!({"id":17}), "invalid_value");
        let order = s.table("order_header").unwrap();
        let e = insert_from_json(order, &obj(json!({"total_amount":5}))).unwrap_err();
        assert_eq!(e.code(), "read_only_column");
    }

    #[test]
    fn update_refuses_system_columns() {
        let s = pos::schema();
        let t = s.table("order_header").unwrap();
        for col in ["id", "version", "created_at", "updated_at", "paid_amount"] {
            let e = update_from_json(t, &obj(json!({ col: 1 }))).unwrap_err();
            assert_eq!(e.code(), "read_only_column", "{col}");
        }
        let f = update_from_json(t, &obj(json!({"status":"preparing","notes":null}))).unwrap();
        assert_eq!(f["notes"], Value::Null);
    }

    #[test]
    fn values_round_trip() {
        let cases = [
            (ColumnType::Text, json!("x")),
            (ColumnType::Integer, json!(-5)),
            (ColumnType::Money, json!(12550)),
            (ColumnType::Bool, json!(true)),
            (ColumnType::Timestamp, json!("2026-11-22T01:02:03.000000Z")),
            (ColumnType::Json, json!({"a":[1,2]})),
            (ColumnType::Text, Json::Null),
        ];
        for (ty, j) in cases {
            let v = value_from_json(ty, &j).unwrap();
            assert_eq!(value_to_json(&v), j);
        }
    }
}
