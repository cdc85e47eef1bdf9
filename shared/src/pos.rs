//! The built-in `pos` module: its schema (CONTRACT.md 2.4) and the pure parts of its rules
//! (status transitions). The edge's store applies the rules inside its write transaction.

use std::collections::BTreeMap;

use crate::schema::{
    Column, ColumnType, HotRule, Owner, Permission, Role, Schema, Table, TableKind, UpdateGrant,
};
use crate::value::Value;

/// Order statuses in their forward order; `cancelled` is reachable from any non-closed state.
pub const ORDER_STATUSES: [&str; 5] = ["open", "preparing", "ready", "served", "closed"];
/// Line statuses in their forward order; `cancelled` is reachable from any non-served state.
pub const LINE_STATUSES: [&str; 4] = ["queued", "preparing", "ready", "served"];
pub const CANCELLED: &str = "cancelled";

/// Whether a status may move from `from` to `to` in a chain such as [`ORDER_STATUSES`]:
/// forward moves (skipping steps is allowed: a paid takeaway goes straight from `open` to
/// `closed`), or to `cancelled` from any state but the chain's last. Staying put is no move.
pub fn transition_allowed(chain: &[&str], from: &str, to: &str) -> bool {
    let last = chain.len() - 1;
    let pos = |s: &str| chain.iter().position(|c| *c == s);
    match (pos(from), to) {
        (Some(f), CANCELLED) => f < last,
        (Some(f), _) => pos(to).is_some_and(|t| t > f),
        (None, _) => false, // nothing leaves `cancelled`
    }
}

/// Whether `status` is a known status of `chain` (including `cancelled`).
pub fn status_known(chain: &[&str], status: &str) -> bool {
    status == CANCELLED || chain.contains(&status)
}

fn col(name: &str, ty: ColumnType) -> Column {
    Column {
        name: name.into(),
        ty,
        indexed: false,
        server_owned: false,
    }
}

fn indexed(name: &str, ty: ColumnType) -> Column {
    Column {
        indexed: true,
        ..col(name, ty)
    }
}

fn derived(name: &str, ty: ColumnType) -> Column {
    Column {
        server_owned: true,
        ..col(name, ty)
    }
}

fn text(v: &str) -> Value {
    Value::Text(v.into())
}

struct Grants {
    cashier: Permission,
    waiter: Permission,
    kitchen: Permission,
}

fn table(
    name: &str,
    kind: TableKind,
    owner: Owner,
    columns: Vec<Column>,
    hot: HotRule,
    grants: Grants,
) -> Table {
    let permissions = BTreeMap::from([
        (Role::Cashier, grants.cashier),
        (Role::Waiter, grants.waiter),
        (Role::Kitchen, grants.kitchen),
    ]);
    Table {
        name: name.into(),
        kind,
        owner,
        columns,
        hot,
        priority: false,
        server_written: false,
        permissions,
    }
}

/// The built-in `pos` schema.
pub fn schema() -> Schema {
    use ColumnType::*;
    use Owner::{Branch, Hub, Shared};
    use TableKind::{Log, State};

    let none = Permission::default;
    let read = Permission::read_only;
    let rw = Permission::read_write;
    let append = || Permission {
        read: true,
        insert: true,
        ..Permission::default()
    };
    let of_parent = |table: &str| HotRule::WithParent {
        column: "order_id".into(),
        table: table.into(),
    };

    let mut tables = vec![
        table(
            "order_header",
            State,
            Branch,
            vec![
                indexed("shift_id", Text),
                indexed("table_id", Text),
                indexed("status", Text),
                col("stage", Text),
                col("payment_state", Text),
                col("customer_name", Text),
                col("notes", Text),
                derived("total_amount", Money),
                derived("paid_amount", Money),
            ],
            HotRule::Unless {
                column: "status".into(),
                values: vec![text("closed"), text(CANCELLED)],
            },
            Grants {
                cashier: rw(),
                waiter: rw(),
                kitchen: read(),
            },
        ),
        table(
            "order_line",
            State,
            Branch,
            vec![
                indexed("order_id", Text),
                col("item_id", Text),
                col("name", Text),
                col("quantity", Integer),
                col("unit_price", Money),
                indexed("status", Text),
                indexed("station_id", Text),
                col("notes", Text),
            ],
            of_parent("order_header"),
            Grants {
                cashier: rw(),
                waiter: rw(),
                kitchen: Permission {
                    read: true,
                    update: UpdateGrant::Columns(vec!["status".into()]),
                    ..Permission::default()
                },
            },
        ),
        table(
            "order_payment",
            Log,
            Branch,
            vec![
                indexed("order_id", Text),
                col("method", Text),
                col("amount", Money),
                col("reference", Text),
            ],
            of_parent("order_header"),
            Grants {
                cashier: append(),
                waiter: read(),
                kitchen: none(),
            },
        ),
        table(
            "order_status_log",
            Log,
            Branch,
            vec![
                indexed("order_id", Text),
                col("status", Text),
                col("actor", Text),
            ],
            HotRule::None,
            Grants {
                cashier: read(),
                waiter: read(),
                kitchen: read(),
            },
        ),
        table(
            "order_line_status_log",
            Log,
            Branch,
            vec![
                indexed("line_id", Text),
                indexed("order_id", Text),
                col("status", Text),
                col("actor", Text),
            ],
            HotRule::None,
            Grants {
                cashier: read(),
                waiter: read(),
                kitchen: read(),
            },
        ),
        table(
            "pos_shift",
            State,
            Branch,
            vec![
                indexed("pos_id", Text),
                col("opened_by", Text),
                col("opened_at", Timestamp),
                col("closed_at", Timestamp),
                col("is_closed", Bool),
                col("opening_cash", Money),
                col("closing_cash", Money),
            ],
            HotRule::Unless {
                column: "is_closed".into(),
                values: vec![Value::Bool(true)],
            },
            Grants {
                cashier: rw(),
                waiter: read(),
                kitchen: none(),
            },
        ),
        table(
            "table_lock",
            State,
            Branch,
            vec![col("locked_by", Text), col("until", Timestamp)],
            HotRule::All,
            Grants {
                cashier: read(),
                waiter: rw(),
                kitchen: none(),
            },
        ),
    ];
    let master = |name: &str, columns: Vec<Column>, kitchen_reads: bool| {
        table(
            name,
            State,
            Hub,
            columns,
            HotRule::All,
            Grants {
                cashier: read(),
                waiter: read(),
                kitchen: if kitchen_reads { read() } else { none() },
            },
        )
    };
    tables.extend([
        master(
            "menu_item",
            vec![
                indexed("category_id", Text),
                col("name", Text),
                col("price", Money),
                indexed("station_id", Text),
                col("active", Bool),
            ],
            true,
        ),
        master(
            "menu_category",
            vec![col("name", Text), col("sort", Integer)],
            true,
        ),
        master(
            "menu_modifier",
            vec![
                indexed("item_id", Text),
                col("name", Text),
                col("price", Money),
            ],
            true,
        ),
        master(
            "payment_method",
            vec![col("name", Text), col("active", Bool)],
            false,
        ),
        master("kitchen_section", vec![col("name", Text)], true),
        master(
            "employee",
            vec![col("name", Text), col("role", Text), col("active", Bool)],
            false,
        ),
        table(
            "item_availability",
            State,
            Shared,
            vec![col("available", Bool), col("reason", Text)],
            HotRule::All,
            Grants {
                cashier: read(),
                waiter: read(),
                kitchen: rw(),
            },
        ),
    ]);
    for t in &mut tables {
        match t.name.as_str() {
            "order_payment" => t.priority = true,
            "order_status_log" | "order_line_status_log" => t.server_written = true,
            _ => {}
        }
    }
    // The built-in schema is a constant of the program; failing validation is a bug here.
    Schema::new("pos", tables).expect("built-in pos schema is valid")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Access;

    #[test]
    fn builds_with_every_table() {
        let s = schema();
        for t in [
            "order_header",
            "order_line",
            "pos_shift",
            "table_lock",
            "order_payment",
            "order_status_log",
            "order_line_status_log",
            "menu_item",
            "menu_category",
            "menu_modifier",
            "payment_method",
            "kitchen_section",
            "employee",
            "item_availability",
        ] {
            assert!(s.table(t).is_some(), "{t}");
        }
        assert_eq!(s.tables().len(), 14);
    }

    #[test]
    fn roles_follow_the_contract() {
        let s = schema();
        let t = |n| s.table(n).unwrap();
        let upd = |cols: &'static [&'static str]| Access::Update { columns: cols };
        assert!(t("order_payment").allows(Role::Cashier, Access::Insert));
        assert!(!t("order_payment").allows(Role::Waiter, Access::Insert));
        assert!(t("order_line").allows(Role::Waiter, Access::Insert));
        assert!(t("order_line").allows(Role::Kitchen, upd(&["status"])));
        assert!(!t("order_line").allows(Role::Kitchen, upd(&["status", "quantity"])));
        assert!(!t("order_line").allows(Role::Kitchen, Access::Insert));
        assert!(t("order_header").allows(Role::Kitchen, Access::Read));
        assert!(!t("order_payment").allows(Role::Kitchen, Access::Read));
        assert!(t("menu_item").allows(Role::Kitchen, Access::Read));
        assert!(!t("employee").allows(Role::Kitchen, Access::Read));
        assert!(t("item_availability").allows(Role::Kitchen, upd(&["available"])));
        assert!(t("table_lock").allows(Role::Waiter, Access::Insert));
        assert!(!t("table_lock").allows(Role::Cashier, Access::Insert));
        assert!(t("employee").allows(Role::Manager, Access::Delete));
        // Status logs are written by the edge alone, even admins cannot forge them.
        assert!(!t("order_status_log").allows(Role::Admin, Access::Insert));
    }

    #[test]
    fn transitions() {
        let ok = |a, b| transition_allowed(&ORDER_STATUSES, a, b);
        assert!(ok("open", "preparing"));
        assert!(ok("open", "closed"));
        assert!(ok("served", "closed"));
        assert!(ok("ready", CANCELLED));
        assert!(!ok("closed", CANCELLED));
        assert!(!ok("preparing", "open"));
        assert!(!ok(CANCELLED, "open"));
        assert!(!ok("open", "open"));
        assert!(!ok("open", "eaten"));
        assert!(transition_allowed(&LINE_STATUSES, "queued", "served"));
        assert!(!transition_allowed(&LINE_STATUSES, "served", CANCELLED));
    }
}
