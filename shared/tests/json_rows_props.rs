//! Property test for rows read straight from JSON text (`json_rows`): the same row, or the
//! same refusal, as parsing the text into a `serde_json::Value` and converting that with
//! `insert_from_json` / `update_from_json`, for any object over a table's columns, system
//! names and unknown names (given more than once, too), with values of every JSON type,
//! text a parser must refuse (bad UTF-8, lone surrogates, bad escapes, nesting past the depth
//! limit) anywhere, and text that is cut short.

use proptest::prelude::*;
use serde_json::{Value as Json, json};
use shared::json::{FieldError, InsertInput, insert_from_json, update_from_json};
use shared::json_rows::{BodyError, RowKind, RowRefusal, row_from_slice};
use shared::{Schema, pos};

/// What either path made of a body, in terms both can give.
#[derive(Debug, PartialEq)]
enum Outcome {
    Row(InsertInput),
    Field(FieldError),
    NotObject,
    Syntax,
}

/// The built-in tables, and one with a column of every type.
fn schema(table: &str) -> Schema {
    if table != "kinds" {
        return pos::schema();
    }
    Schema::from_json(
        r#"{"module":"kinds","tables":[{"name":"kinds","kind":"state","owner":"branch",
        "columns":[{"name":"notes","type":"text"},{"name":"quantity","type":"integer"},
        {"name":"amount","type":"money"},{"name":"status","type":"bool"},
        {"name":"created","type":"timestamp"},{"name":"reference","type":"json"}]}]}"#,
    )
    .unwrap()
}

fn via_value(table: &str, kind: RowKind, text: &[u8]) -> Outcome {
    let schema = schema(table);
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
    let schema = schema(table);
    let t = schema.table(table).unwrap();
    match row_from_slice(t, kind, text) {
        Ok(row) => Outcome::Row(row),
        Err(BodyError::Syntax(_)) => Outcome::Syntax,
        Err(BodyError::Refused(RowRefusal::NotObject)) => Outcome::NotObject,
        Err(BodyError::Refused(RowRefusal::Field { error, mut columns })) => {
            // Every column the row gave is named, for the role check before the error.
            let Ok(Json::Object(given)) = serde_json::from_slice::<Json>(text) else {
                panic!("a refused field in text that is not an object");
            };
            let mut want: Vec<String> = given
                .keys()
                .filter(|k| kind == RowKind::Update || !SYSTEM.contains(&k.as_str()))
                .cloned()
                .collect();
            columns.sort();
            want.sort();
            assert_eq!(columns, want, "the columns of a refused row");
            Outcome::Field(error)
        }
    }
}

const SYSTEM: [&str; 5] = ["id", "version", "created_at", "updated_at", "seq"];

/// Keys: columns of the tables below (`paid_amount` is server-owned), system names, and
/// names no table has.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        6 => prop::sample::select(vec![
            "id", "version", "created_at", "updated_at", "seq", "order_id", "amount", "method",
            "reference", "status", "notes", "paid_amount", "total_amount", "table_id",
            "customer_name", "quantity", "unit_price", "created",
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

/// A value's text: a value written by serde_json, or text a parser must refuse or bound.
fn value_text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        16 => value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => Just(b"\"a\xffb\"".to_vec()),
        1 => Just(br#""\ud800""#.to_vec()),
        1 => Just(br#""a\qb""#.to_vec()),
        1 => Just(br#"["x", {"\udc00": 1}]"#.to_vec()),
        1 => (100usize..140).prop_map(|n| format!("{}{}", "[".repeat(n), "]".repeat(n)).into_bytes()),
        1 => (100usize..140)
            .prop_map(|n| format!("{}1{}", r#"{"a":"#.repeat(n), "}".repeat(n)).into_bytes()),
    ]
}

/// An object's text, written by hand so that keys may repeat.
fn object_text() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec((key(), value_text()), 0..8).prop_map(|members| {
        let mut text = b"{".to_vec();
        for (i, (k, v)) in members.iter().enumerate() {
            if i > 0 {
                text.push(b',');
            }
            text.extend(serde_json::to_vec(k).unwrap());
            text.push(b':');
            text.extend(v);
        }
        text.push(b'}');
        text
    })
}

/// A payment's members, each given once or more with a valid or a refused value: the last
/// value of each key decides.
fn repeated_members() -> impl Strategy<Value = Vec<u8>> {
    let member = (
        prop::sample::select(vec!["id", "order_id", "amount", "method"]),
        any::<bool>(),
    );
    prop::collection::vec(member, 0..8).prop_map(|members| {
        let members: Vec<String> = members
            .iter()
            .map(|(k, valid)| match (*k, valid) {
                ("amount", true) => format!(r#""{k}":100"#),
                (_, true) => format!(r#""{k}":"x1""#),
                (_, false) => format!(r#""{k}":12.5"#),
            })
            .collect();
        format!("{{{}}}", members.join(",")).into_bytes()
    })
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        8 => object_text(),
        2 => repeated_members(),
        1 => value_text(),
        // Cut short at any byte: not JSON (or, rarely, a shorter document).
        1 => (object_text(), any::<prop::sample::Index>())
            .prop_map(|(text, at)| text[..at.index(text.len() + 1)].to_vec()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn a_row_read_directly_is_the_row_the_value_converts_to(
        text in body(),
        table in prop::sample::select(vec!["order_payment", "order_header", "order_line", "kinds"]),
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
    // A body of many refused keys (a 1 MiB body holds ~100k) names the first of them.
    let many: Vec<String> = (0..60_000)
        .rev()
        .map(|i| format!(r#""k{i:05}":1"#))
        .collect();
    let many = format!("{{{}}}", many.join(","));
    let Outcome::Field(FieldError::UnknownColumn { column, .. }) =
        direct("order_header", RowKind::Update, many.as_bytes())
    else {
        panic!("not refused");
    };
    assert_eq!(column, "k00000");
    assert_eq!(
        direct("order_header", RowKind::Insert, br#"{"status": "open"} x"#),
        Outcome::Syntax
    );
    assert_eq!(
        direct("order_header", RowKind::Insert, br#"{"status": [1, 2} "#),
        Outcome::Syntax
    );
}
