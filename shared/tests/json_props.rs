//! Property test for rows written straight to JSON (`RowJson`): the same text as the map
//! `row_to_json` builds, for any column names (system names included), values and text.

use std::sync::Arc;

use proptest::prelude::*;
use shared::json::{RowJson, row_to_json};
use shared::{Row, Timestamp, Value};

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<String>().prop_map(Value::Text),
        any::<i64>().prop_map(|t| Value::Timestamp(Timestamp(t))),
        // Stored JSON documents, and text that does not parse (written as null by both).
        prop_oneof![
            Just(r#"{"b":[1,2.5,"x"],"a":null}"#.to_owned()),
            "[0-9]{1,5}".prop_map(|s| s),
            ".{0,8}".prop_map(|s| s),
        ]
        .prop_map(Value::Json),
    ]
}

/// Column names, some of them equal to a system column or to each other.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z_]{1,10}",
        Just("id".to_owned()),
        Just("version".to_owned()),
        Just("seq".to_owned()),
        Just("updated_at".to_owned()),
        any::<String>(),
    ]
}

fn row() -> impl Strategy<Value = Row> {
    (
        any::<String>(),
        any::<u64>(),
        any::<i64>(),
        any::<i64>(),
        proptest::option::of(any::<u64>()),
        proptest::collection::vec((name(), value()), 0..12),
    )
        .prop_map(|(id, version, created, updated, seq, cols)| {
            let (names, values): (Vec<String>, Vec<Value>) = cols.into_iter().unzip();
            Row {
                id,
                version,
                created_at: Timestamp(created),
                updated_at: Timestamp(updated),
                seq,
                columns: Arc::from(names),
                values,
            }
        })
}

/// Rows of one table: one shared column set, different values, some with `seq`.
fn table_rows() -> impl Strategy<Value = Vec<Row>> {
    (
        proptest::collection::vec(name(), 0..12),
        proptest::collection::vec(
            (
                any::<u64>(),
                proptest::option::of(any::<u64>()),
                proptest::collection::vec(value(), 12),
            ),
            1..6,
        ),
    )
        .prop_map(|(names, rows)| {
            let columns: shared::value::Columns = Arc::from(names);
            rows.into_iter()
                .map(|(version, seq, mut values)| {
                    values.truncate(columns.len());
                    Row {
                        id: format!("r{version}"),
                        version,
                        created_at: Timestamp(0),
                        updated_at: Timestamp(1),
                        seq,
                        columns: columns.clone(),
                        values,
                    }
                })
                .collect()
        })
}

fn via_map(row: &Row) -> String {
    serde_json::to_string(&serde_json::Value::Object(row_to_json(row))).unwrap()
}

proptest! {
    #[test]
    fn a_row_written_directly_is_the_map_it_converts_to(row in row()) {
        prop_assert_eq!(serde_json::to_string(&RowJson(&row)).unwrap(), via_map(&row));
    }

    /// The member order remembered for a column set serves every row of it.
    #[test]
    fn rows_sharing_a_column_set_are_written_as_their_maps(rows in table_rows()) {
        for row in rows.iter().chain(rows.iter()) {
            prop_assert_eq!(serde_json::to_string(&RowJson(row)).unwrap(), via_map(row));
        }
    }
}
