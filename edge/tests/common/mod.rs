//! Helpers shared by the store's integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;

use edge::store::{Op, Store, StoreConfig, Txn};
use shared::{BranchId, Fields, Value, pos};

pub fn open(dir: &Path) -> Store {
    Store::open(config(dir)).expect("store opens")
}

pub fn config(dir: &Path) -> StoreConfig {
    StoreConfig::new(
        dir.join("edge.db"),
        BranchId::parse("B001").unwrap(),
        Arc::new(pos::schema()),
    )
}

pub fn fields(pairs: &[(&str, Value)]) -> Fields {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

pub fn text(s: &str) -> Value {
    Value::Text(s.into())
}

pub fn insert(table: &str, id: &str, pairs: &[(&str, Value)]) -> Op {
    Op::Insert {
        table: table.into(),
        id: Some(id.into()),
        fields: fields(pairs),
    }
}

/// An order line of `quantity` at `unit_price` (minor units).
pub fn line(id: &str, order: &str, quantity: i64, unit_price: i64) -> Op {
    insert(
        "order_line",
        id,
        &[
            ("order_id", text(order)),
            ("quantity", Value::Int(quantity)),
            ("unit_price", Value::Int(unit_price)),
        ],
    )
}

pub fn update(table: &str, id: &str, version: u64, pairs: &[(&str, Value)]) -> Op {
    Op::Update {
        table: table.into(),
        id: id.into(),
        version,
        set: fields(pairs),
    }
}

pub fn txn(op: Op) -> Txn {
    Txn::single("test", op)
}
