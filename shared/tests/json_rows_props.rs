//! Property test for rows read straight from JSON text (`json_rows`): the same row, or the
//! same refusal, as parsing the text into a `serde_json::Value` and converting that with
//! `insert_from_json` / `update_from_json`, for any object over a table's columns, system
//! names and unknown names, with values of every JSON type, and for text that is cut short.

use proptest::prelude::*;
use serde_json::{Map, Value as Json, json};
use shared::json::{FieldError, InsertInput, insert_from_json, update_from_json};
use shared::json_rows::{BodyError, RowKind, RowRefusal, row_from_slice};
use shared::pos;

/// What either path made of a body, in terms both can give.
#[derive(Debug, PartialEq)]
enum Outcome {
    Row(InsertInput),
    Field(FieldError),
    NotObject,
    Syntax,
}

fn via_value(table: &str, kind: RowKind, text: &[u8]) -> Outcome {
    let schema = pos::schema();
    let t = schema.table(table).unwrap();
    let Ok(v) = serde_json::from_slice::<Json>(text) else {
        return Outcome::Syntax;
    };
    let Some(obj) = v.as_object() else {
        return Outcome::NotObject;
    };
    let parsed = match kind {
        RowKind::Insert => insert_from_json(t, obj),
        RowKind::Update => update_from_json(t, obj).map(|fields| InsertInput { id: None, fields }),
    };
    match parsed {
        Ok(row) => Outcome::Row(row),
        Err(e) => Outcome::Field(e),
    }
}

fn direct(table: &str, kind: RowKind, text: &[u8]) -> Outcome {
    let schema = pos::schema();
    let t = schema.table(table).unwrap();
    match row_from_slice(t, kind, text) {
        Ok(row) => Outcome::Row(row),
        Err(BodyError::Syntax(_)) => Outcome::Syntax,
        Err(BodyError::Refused(RowRefusal::NotObject)) => Outcome::NotObject,
        Err(BodyError::Refused(RowRefusal::Field(e))) => Outcome::Field(e),
    }
}

/// Keys: columns of the tables below (`paid_amount` is server-owned), system names, and
/// names no table has.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec![
            "id", "version", "created_at", "updated_at", "seq", "order_id", "amount", "method",
            "reference", "status", "notes", "paid_amount", "total_amount", "table_id",
            "customer_name", "quantity", "unit_price",
        ])
        .prop_map(str::to_owned),
        1 => "[a-z_]{1,8}",
        1 => any::<String>(),
    ]
}

fn leaf() -> impl Strategy<Value = Json> {
    prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::Bool),
        any::<i64>().prop_map(Json::from),
        any::<u64>().prop_map(Json::from),
        Just(json!(u64::MAX)),
        Just(json!(i64::MIN)),
        any::<f64>().prop_map(|f| json!(f)),
        Just(json!(12.0)),
        any::<String>().prop_map(Json::String),
        "[a-z0-9 ]{0,12}".prop_map(Json::String),
        Just(json!("2026-11-22T12:00:00Z")),
        Just(json!("2026-11-22T12:00:00.123456+02:00")),
        Just(json!("")),
    ]
}

fn value() -> impl Strategy<Value = Json> {
    leaf().prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
            prop::collection::vec((key(), inner), 0..4)
                .prop_map(|kv| Json::Object(kv.into_iter().collect())),
        ]
    })
}

fn object() -> impl Strategy<Value = Json> {
    prop::collection::vec((key(), value()), 0..8)
        .prop_map(|kv| Json::Object(kv.into_iter().collect::<Map<_, _>>()))
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => object().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        // Cut short at any byte: not JSON (or, rarely, a shorter document).
        1 => (object(), any::<prop::sample::Index>()).prop_map(|(v, at)| {
            let text = serde_json::to_vec(&v).unwrap();
            text[..at.index(text.len() + 1)].to_vec()
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn a_row_read_directly_is_the_row_the_value_converts_to(
        text in body(),
        table in prop::sample::select(vec!["order_payment", "order_header", "order_line"]),
        kind in prop_oneof![Just(RowKind::Insert), Just(RowKind::Update)],
    ) {
        prop_assert_eq!(direct(table, kind, &text), via_value(table, kind, &text));
    }
}

/// Keys and strings with escapes are read as their text.
#[test]
fn escaped_keys_and_strings_are_their_text() {
    let text = br#"{"\u0061mount": 12550, "method": "ca\"sh", "order_id": "o\u00e91"}"#;
    assert_eq!(
        direct("order_payment", RowKind::Insert, text),
        via_value("order_payment", RowKind::Insert, text)
    );
    let Outcome::Row(row) = direct("order_payment", RowKind::Insert, text) else {
        panic!("refused");
    };
    assert_eq!(row.fields["amount"], shared::Value::Int(12550));
    assert_eq!(row.fields["method"], shared::Value::Text("ca\"sh".into()));
    assert_eq!(row.fields["order_id"], shared::Value::Text("oé1".into()));
}

/// Limits: text of exactly the longest length is kept, one byte more is refused; so is an id
/// past 128 bytes; trailing text after the object is not JSON.
#[test]
fn limits_and_trailing_text() {
    let at = |n: usize| format!(r#"{{"notes": "{}"}}"#, "x".repeat(n)).into_bytes();
    let max = shared::json::TEXT_BYTES_MAX;
    for text in [at(max), at(max + 1)] {
        assert_eq!(
            direct("order_header", RowKind::Update, &text),
            via_value("order_header", RowKind::Update, &text)
        );
    }
    assert!(matches!(
        direct("order_header", RowKind::Update, &at(max + 1)),
        Outcome::Field(FieldError::InvalidValue { .. })
    ));
    let id = format!(r#"{{"id": "{}"}}"#, "i".repeat(129));
    assert!(matches!(
        direct("order_header", RowKind::Insert, id.as_bytes()),
        Outcome::Field(FieldError::InvalidValue { .. })
    ));
    assert_eq!(
        direct("order_header", RowKind::Insert, br#"{"status": "open"} x"#),
        Outcome::Syntax
    );
    assert_eq!(
        direct("order_header", RowKind::Insert, br#"{"status": [1, 2} "#),
        Outcome::Syntax
    );
}
