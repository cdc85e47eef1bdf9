//! A model-based property test of the store. Random sequences of operations (inserts, CAS
//! updates and deletes with current and stale versions, duplicate inserts, retried payments,
//! all-or-nothing batches, seals and restarts) run against the store and against a small
//! in-memory model that knows nothing of the store's code. After every step both must agree:
//! rows, versions and user fields (`scan`, `get`), derived order totals, the status logs the
//! store writes itself, the hot tier (`snapshot`), the commit version and the log position. At
//! the end of each case the sealed log verifies and replays to exactly the stored state.

mod common;

use std::collections::BTreeMap;
use std::sync::LazyLock;

use edge::store::{Applied, Op, Refusal, Store, Txn};
use proptest::prelude::*;
use shared::{EntryOp, Fields, Owner, Row, Schema, Seq, TableKind, Timestamp, Value};

static SCHEMA: LazyLock<Schema> = LazyLock::new(shared::pos::schema);

/// The tables the model tracks row by row.
const MODELED: [&str; 5] = [
    "table_lock",
    "pos_shift",
    "order_header",
    "order_line",
    "order_payment",
];

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// A row as the model sees it: its version and every user column.
#[derive(Debug, Clone, PartialEq)]
struct MRow {
    version: u64,
    fields: Fields,
}

/// What the store should hold. Plain maps; the pos rules are restated in a few lines.
#[derive(Debug, Clone, Default)]
struct Model {
    tables: BTreeMap<&'static str, BTreeMap<String, MRow>>,
    /// `order_status_log` rows as (order_id, status, actor).
    status_log: Vec<(String, String, String)>,
    /// `order_line_status_log` rows as (line_id, order_id, status, actor).
    line_status_log: Vec<(String, String, String, String)>,
    /// The last commit version.
    version: u64,
    /// The last log seq (one entry per changed row).
    seq: u64,
    /// Deleted state rows: the tombstone's version, which a re-inserted id continues from.
    tombstones: BTreeMap<(String, String), u64>,
}

/// What a request should return: per op, the applied kind and the row as the op left it; or
/// the failing op and the error code.
type Outcome = Result<Vec<(Applied, Option<MRow>)>, (Option<usize>, &'static str)>;

fn modeled(table: &str) -> &'static str {
    MODELED
        .into_iter()
        .find(|t| *t == table)
        .unwrap_or_else(|| panic!("the model does not track {table}"))
}

fn get_text<'a>(f: &'a Fields, col: &str) -> &'a str {
    f.get(col).and_then(Value::as_str).unwrap_or("")
}

fn get_int(f: &Fields, col: &str) -> i64 {
    f.get(col).and_then(Value::as_int).unwrap_or(0)
}

impl Model {
    fn new() -> Model {
        Model {
            tables: MODELED.into_iter().map(|t| (t, BTreeMap::new())).collect(),
            ..Model::default()
        }
    }

    fn rows(&self, table: &str) -> &BTreeMap<String, MRow> {
        &self.tables[modeled(table)]
    }

    fn rows_mut(&mut self, table: &str) -> &mut BTreeMap<String, MRow> {
        self.tables.get_mut(modeled(table)).expect("modeled table")
    }

    /// The status of an order, if it exists.
    fn order_status(&self, order_id: &str) -> Option<String> {
        self.rows("order_header")
            .get(order_id)
            .map(|o| get_text(&o.fields, "status").to_owned())
    }

    fn require_open_order(&self, order_id: &str) -> Result<(), &'static str> {
        match self.order_status(order_id).as_deref() {
            None => Err("unknown_order"),
            Some("closed" | "cancelled") => Err("order_closed"),
            Some(_) => Ok(()),
        }
    }

    /// (total, paid) of an order from its lines and payments.
    fn totals(&self, order_id: &str) -> (i64, i64) {
        let total = self
            .rows("order_line")
            .values()
            .filter(|l| get_text(&l.fields, "order_id") == order_id)
            .filter(|l| get_text(&l.fields, "status") != "cancelled")
            .map(|l| get_int(&l.fields, "quantity") * get_int(&l.fields, "unit_price"))
            .sum();
        let paid = self
            .rows("order_payment")
            .values()
            .filter(|p| get_text(&p.fields, "order_id") == order_id)
            .map(|p| get_int(&p.fields, "amount"))
            .sum();
        (total, paid)
    }

    /// Applies one request: every op or none, then the derived totals.
    fn request(&mut self, actor: &str, ops: &[Op]) -> Outcome {
        if ops.is_empty() {
            return Err((None, "empty_transaction"));
        }
        let mut work = self.clone();
        let mut applied = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            match work.apply(actor, op) {
                Ok(a) => {
                    let (table, id) = op_target(op);
                    applied.push((a, work.rows(table).get(id).cloned()));
                }
                Err(code) => return Err((Some(i), code)),
            }
        }
        let orders: Vec<String> = work.rows("order_header").keys().cloned().collect();
        for o in orders {
            let (total, paid) = work.totals(&o);
            let row = work.rows_mut("order_header").get_mut(&o).expect("order");
            if get_int(&row.fields, "total_amount") != total
                || get_int(&row.fields, "paid_amount") != paid
            {
                row.fields.insert("total_amount".into(), Value::Int(total));
                row.fields.insert("paid_amount".into(), Value::Int(paid));
                row.version += 1;
                work.seq += 1;
            }
        }
        if work.seq != self.seq {
            work.version += 1;
        }
        *self = work;
        Ok(applied)
    }

    fn apply(&mut self, actor: &str, op: &Op) -> Result<Applied, &'static str> {
        match op {
            Op::Refused(r) => Err(r.code),
            Op::Insert { table, id, fields } => {
                let id = id.clone().expect("the test names its ids");
                let mut f = fields.clone();
                for c in &SCHEMA.table(table).expect("table").columns {
                    f.entry(c.name.clone()).or_insert(Value::Null);
                }
                match table.as_str() {
                    "order_header" => {
                        if f["status"].is_null() {
                            f.insert("status".into(), text("open"));
                        }
                        f.insert("total_amount".into(), Value::Int(0));
                        f.insert("paid_amount".into(), Value::Int(0));
                    }
                    "order_line" => {
                        self.require_open_order(get_text(&f, "order_id"))?;
                        if f["status"].is_null() {
                            f.insert("status".into(), text("queued"));
                        }
                    }
                    "order_payment" if self.order_status(get_text(&f, "order_id")).is_none() => {
                        return Err("unknown_order");
                    }
                    _ => {}
                }
                if let Some(existing) = self.rows(table).get(&id) {
                    return if table == "order_payment" && existing.fields == f {
                        Ok(Applied::AlreadyPresent)
                    } else {
                        Err("id_conflict")
                    };
                }
                self.seq += 1;
                match table.as_str() {
                    "order_header" => {
                        self.seq += 1;
                        self.status_log.push((
                            id.clone(),
                            get_text(&f, "status").into(),
                            actor.into(),
                        ));
                    }
                    "order_line" => {
                        self.seq += 1;
                        self.line_status_log.push((
                            id.clone(),
                            get_text(&f, "order_id").into(),
                            get_text(&f, "status").into(),
                            actor.into(),
                        ));
                    }
                    _ => {}
                }
                let version = match self.tombstones.get(&(table.clone(), id.clone())) {
                    Some(v) if table != "order_payment" => v + 1,
                    _ => 1,
                };
                self.rows_mut(table).insert(id, MRow { version, fields: f });
                Ok(Applied::Inserted)
            }
            Op::Update {
                table,
                id,
                version,
                set,
            } => {
                if table == "order_payment" {
                    return Err("log_immutable");
                }
                let current = self.rows(table).get(id).ok_or("not_found")?.clone();
                if current.version != *version {
                    return Err("version_conflict");
                }
                let from = get_text(&current.fields, "status").to_owned();
                let to = set.get("status").and_then(Value::as_str);
                match table.as_str() {
                    "order_header" => {
                        if let Some(to) = to {
                            let allowed = from == to
                                || (from == "open" && (to == "closed" || to == "cancelled"));
                            if !allowed {
                                return Err("illegal_transition");
                            }
                            let (total, paid) = (
                                get_int(&current.fields, "total_amount"),
                                get_int(&current.fields, "paid_amount"),
                            );
                            if to == "closed" && paid < total {
                                return Err("unpaid");
                            }
                        }
                    }
                    "order_line" => {
                        self.require_open_order(get_text(&current.fields, "order_id"))?;
                        if let Some(to) = to {
                            let allowed = from == to || (from == "queued" && to == "cancelled");
                            if !allowed {
                                return Err("illegal_transition");
                            }
                        }
                    }
                    _ => {}
                }
                let changed = set
                    .iter()
                    .any(|(k, v)| current.fields.get(k).unwrap_or(&Value::Null) != v);
                if !changed {
                    return Ok(Applied::Unchanged);
                }
                let mut row = current;
                row.version += 1;
                row.fields.extend(set.clone());
                self.seq += 1;
                if let Some(to) = to.filter(|to| *to != from) {
                    self.seq += 1;
                    match table.as_str() {
                        "order_header" => {
                            self.status_log.push((id.clone(), to.into(), actor.into()))
                        }
                        "order_line" => self.line_status_log.push((
                            id.clone(),
                            get_text(&row.fields, "order_id").into(),
                            to.into(),
                            actor.into(),
                        )),
                        t => panic!("no status log for {t}"),
                    }
                }
                self.rows_mut(table).insert(id.clone(), row);
                Ok(Applied::Updated)
            }
            Op::Delete { table, id, version } => {
                if table == "order_payment" {
                    return Err("log_immutable");
                }
                let current = self.rows(table).get(id).ok_or("not_found")?.clone();
                if current.version != *version {
                    return Err("version_conflict");
                }
                match table.as_str() {
                    "order_header" => {
                        let refers = |t: &str| {
                            self.rows(t)
                                .values()
                                .any(|r| get_text(&r.fields, "order_id") == id)
                        };
                        if refers("order_line") || refers("order_payment") {
                            return Err("order_not_empty");
                        }
                    }
                    "order_line" => {
                        self.require_open_order(get_text(&current.fields, "order_id"))?
                    }
                    _ => {}
                }
                self.rows_mut(table).remove(id);
                self.tombstones
                    .insert((table.clone(), id.clone()), current.version + 1);
                self.seq += 1;
                Ok(Applied::Deleted)
            }
        }
    }

    /// Whether a row belongs in the hot tier (the schema's hot rules, restated).
    fn is_hot(&self, table: &str, row: &MRow) -> bool {
        let order_hot = |o: &str| {
            self.order_status(o)
                .is_some_and(|s| s != "closed" && s != "cancelled")
        };
        match table {
            "table_lock" => true,
            "pos_shift" => row.fields.get("is_closed") != Some(&Value::Bool(true)),
            "order_header" => !matches!(get_text(&row.fields, "status"), "closed" | "cancelled"),
            "order_line" | "order_payment" => order_hot(get_text(&row.fields, "order_id")),
            t => panic!("no hot rule for {t}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Generated steps, resolved against the model when they run
// ---------------------------------------------------------------------------------------------

/// Which version a CAS op sends.
#[derive(Debug, Clone, Copy)]
enum Ver {
    Current,
    /// One below the current version (or above it when the row is at version 1).
    Behind,
    /// One above the current version.
    Ahead,
}

#[derive(Debug, Clone)]
enum Act {
    InsertLock {
        n: u8,
        by: u8,
        until: i64,
    },
    UpdateLock {
        pick: u8,
        ver: Ver,
        /// `None` sets `locked_by` to null.
        by: Option<u8>,
        /// `None` leaves `until` out of the update.
        until: Option<i64>,
    },
    InsertShift {
        n: u8,
        pos: u8,
        cash: i64,
        closed: Option<bool>,
    },
    UpdateShift {
        pick: u8,
        ver: Ver,
        closed: Option<bool>,
        cash: i64,
    },
    DeleteState {
        shift: bool,
        pick: u8,
        ver: Ver,
    },
    InsertOrder {
        n: u8,
        table: u8,
    },
    /// Not in batches (see `order_act`).
    NoteOrder {
        pick: u8,
        ver: Ver,
        note: u8,
    },
    /// Close (`close`) or cancel the order. Not in batches (see `order_act`).
    SetOrderStatus {
        pick: u8,
        ver: Ver,
        close: bool,
    },
    DeleteOrder {
        pick: u8,
        ver: Ver,
    },
    InsertLine {
        n: u8,
        order: u8,
        qty: i64,
        price: i64,
    },
    CancelLine {
        pick: u8,
        ver: Ver,
    },
    Requantify {
        pick: u8,
        ver: Ver,
        qty: i64,
    },
    DeleteLine {
        pick: u8,
        ver: Ver,
    },
    InsertPayment {
        n: u8,
        order: u8,
        amount: i64,
        card: bool,
    },
    /// Inserts an existing payment's id again, with identical content or a different amount.
    RetryPayment {
        pick: u8,
        same: bool,
    },
    /// Updates or deletes a payment: refused, payments are immutable.
    TouchPayment {
        pick: u8,
        delete: bool,
    },
}

#[derive(Debug, Clone)]
enum Step {
    Single(u8, Act),
    /// A multi-op request. When `clean`, the ops the model refuses are left out, so that
    /// the rest should commit together; `poison` appends an op that always fails (by kind,
    /// or refused by the caller before it reached the store).
    Batch {
        actor: u8,
        acts: Vec<Act>,
        clean: bool,
        poison: Option<u8>,
    },
    Seal,
    Restart,
}

const ACTORS: [&str; 3] = ["cashier", "waiter", "manager"];

fn ver() -> impl Strategy<Value = Ver> {
    prop_oneof![8 => Just(Ver::Current), 1 => Just(Ver::Behind), 1 => Just(Ver::Ahead)]
}

fn insert_act() -> impl Strategy<Value = Act> {
    let p = any::<u8>;
    prop_oneof![
        2 => (p(), 0u8..4, 0i64..5_000_000).prop_map(|(n, by, until)| Act::InsertLock { n, by, until }),
        2 => (p(), 0u8..3, 0i64..50_000, proptest::option::of(any::<bool>()))
            .prop_map(|(n, pos, cash, closed)| Act::InsertShift { n, pos, cash, closed }),
        3 => (p(), 0u8..9).prop_map(|(n, table)| Act::InsertOrder { n, table }),
        6 => (p(), p(), 0i64..5, 0i64..2_000)
            .prop_map(|(n, order, qty, price)| Act::InsertLine { n, order, qty, price }),
        5 => (p(), p(), prop_oneof![9 => 0i64..3_000, 1 => -500i64..0], any::<bool>())
            .prop_map(|(n, order, amount, card)| Act::InsertPayment { n, order, amount, card }),
        2 => (p(), any::<bool>()).prop_map(|(pick, same)| Act::RetryPayment { pick, same }),
    ]
}

/// Updates and deletes that may appear in batches.
fn change_act() -> impl Strategy<Value = Act> {
    let p = any::<u8>;
    prop_oneof![
        3 => (p(), ver(), proptest::option::weighted(0.8, 0u8..4), proptest::option::of(0i64..5_000_000))
            .prop_map(|(pick, ver, by, until)| Act::UpdateLock { pick, ver, by, until }),
        3 => (p(), ver(), proptest::option::of(any::<bool>()), 0i64..50_000)
            .prop_map(|(pick, ver, closed, cash)| Act::UpdateShift { pick, ver, closed, cash }),
        2 => (any::<bool>(), p(), ver()).prop_map(|(shift, pick, ver)| Act::DeleteState { shift, pick, ver }),
        1 => (p(), ver()).prop_map(|(pick, ver)| Act::DeleteOrder { pick, ver }),
        3 => (p(), ver()).prop_map(|(pick, ver)| Act::CancelLine { pick, ver }),
        3 => (p(), ver(), 0i64..5).prop_map(|(pick, ver, qty)| Act::Requantify { pick, ver, qty }),
        2 => (p(), ver()).prop_map(|(pick, ver)| Act::DeleteLine { pick, ver }),
        1 => (p(), any::<bool>()).prop_map(|(pick, delete)| Act::TouchPayment { pick, delete }),
    ]
}

/// Updates of order headers, in single-op requests only. In a batch, the store recomputes a
/// dirty order's totals *before* an update of that order, so a batch that adds a line or a
/// payment and then updates the order with the version the client read is refused with
/// `version_conflict` (see `pay_and_close_in_one_batch` below); the model leaves that out.
fn order_act() -> impl Strategy<Value = Act> {
    let p = any::<u8>;
    prop_oneof![
        1 => (p(), ver(), 0u8..3).prop_map(|(pick, ver, note)| Act::NoteOrder { pick, ver, note }),
        2 => (p(), ver(), any::<bool>()).prop_map(|(pick, ver, close)| Act::SetOrderStatus { pick, ver, close }),
    ]
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![5 => insert_act(), 4 => change_act(), 1 => order_act()]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        30 => (0u8..3, act()).prop_map(|(a, act)| Step::Single(a, act)),
        6 => (
            0u8..3,
            proptest::collection::vec(prop_oneof![3 => insert_act(), 1 => change_act()], 2..5),
            any::<bool>(),
            proptest::option::weighted(0.25, 0u8..3),
        )
            .prop_map(|(actor, acts, clean, poison)| Step::Batch { actor, acts, clean, poison }),
        1 => Just(Step::Seal),
        2 => Just(Step::Restart),
    ]
}

/// An existing row of `table` chosen by `pick`, or a missing id (when there is none, and
/// one time in eight).
fn pick_row(model: &Model, table: &str, pick: u8) -> (String, u64, Option<MRow>) {
    let rows = model.rows(table);
    if rows.is_empty() || pick.is_multiple_of(8) {
        return (format!("{table}-missing"), 1, None);
    }
    let (id, r) = rows
        .iter()
        .nth(pick as usize / 8 % rows.len())
        .expect("a row");
    (id.clone(), r.version, Some(r.clone()))
}

/// The id of a new row: one time in eight an existing id (a duplicate insert), else the first
/// free id of the table (which may be one a delete freed).
fn insert_id(model: &Model, table: &str, prefix: &str, n: u8) -> String {
    let rows = model.rows(table);
    if n.is_multiple_of(8) && !rows.is_empty() {
        return rows
            .keys()
            .nth(n as usize / 8 % rows.len())
            .expect("a row")
            .clone();
    }
    (0..)
        .map(|k| format!("{prefix}{k}"))
        .find(|id| !rows.contains_key(id))
        .expect("a free id")
}

/// The order a new line or payment names: mostly an existing one (open or not), sometimes
/// one time in eight one that does not exist.
fn pick_order(model: &Model, pick: u8) -> String {
    let orders = model.rows("order_header");
    match pick % 8 {
        0 => "o-missing".into(),
        _ if orders.is_empty() => "o-missing".into(),
        _ => orders
            .keys()
            .nth(pick as usize / 8 % orders.len())
            .expect("an order")
            .clone(),
    }
}

fn cas(version: u64, ver: Ver) -> u64 {
    match ver {
        Ver::Current => version,
        Ver::Behind if version > 1 => version - 1,
        Ver::Behind | Ver::Ahead => version + 1,
    }
}

fn insert(table: &str, id: String, pairs: Vec<(&str, Value)>) -> Op {
    Op::Insert {
        table: table.into(),
        id: Some(id),
        fields: pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
    }
}

fn update(table: &str, pick: u8, ver: Ver, model: &Model, pairs: Vec<(&str, Value)>) -> Op {
    let (id, version, _) = pick_row(model, table, pick);
    Op::Update {
        table: table.into(),
        id,
        version: cas(version, ver),
        set: pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
    }
}

fn delete(table: &str, pick: u8, ver: Ver, model: &Model) -> Op {
    let (id, version, _) = pick_row(model, table, pick);
    Op::Delete {
        table: table.into(),
        id,
        version: cas(version, ver),
    }
}

/// Turns a generated act into a concrete op against the model's current rows. Small id
/// pools make duplicate inserts common.
fn resolve(act: &Act, model: &Model) -> Op {
    match *act {
        Act::InsertLock { n, by, until } => insert(
            "table_lock",
            insert_id(model, "table_lock", "T", n),
            vec![
                ("locked_by", text(&format!("waiter-{by}"))),
                ("until", Value::Timestamp(Timestamp(until))),
            ],
        ),
        Act::UpdateLock {
            pick,
            ver,
            by,
            until,
        } => {
            let mut set = vec![(
                "locked_by",
                by.map_or(Value::Null, |b| text(&format!("waiter-{b}"))),
            )];
            if let Some(u) = until {
                set.push(("until", Value::Timestamp(Timestamp(u))));
            }
            update("table_lock", pick, ver, model, set)
        }
        Act::InsertShift {
            n,
            pos,
            cash,
            closed,
        } => insert(
            "pos_shift",
            insert_id(model, "pos_shift", "s", n),
            vec![
                ("pos_id", text(&format!("pos-{pos}"))),
                ("opened_by", text("cashier")),
                (
                    "opened_at",
                    Value::Timestamp(Timestamp(1_700_000_000_000_000)),
                ),
                ("opening_cash", Value::Int(cash)),
                ("is_closed", closed.map_or(Value::Null, Value::Bool)),
            ],
        ),
        Act::UpdateShift {
            pick,
            ver,
            closed,
            cash,
        } => update(
            "pos_shift",
            pick,
            ver,
            model,
            vec![
                ("is_closed", closed.map_or(Value::Null, Value::Bool)),
                ("closing_cash", Value::Int(cash)),
            ],
        ),
        Act::DeleteState { shift, pick, ver } => delete(
            if shift { "pos_shift" } else { "table_lock" },
            pick,
            ver,
            model,
        ),
        Act::InsertOrder { n, table } => insert(
            "order_header",
            insert_id(model, "order_header", "o", n),
            vec![("table_id", text(&format!("T{table}")))],
        ),
        Act::NoteOrder { pick, ver, note } => update(
            "order_header",
            pick,
            ver,
            model,
            vec![("notes", text(&format!("note {note}")))],
        ),
        Act::SetOrderStatus { pick, ver, close } => update(
            "order_header",
            pick,
            ver,
            model,
            vec![("status", text(if close { "closed" } else { "cancelled" }))],
        ),
        Act::DeleteOrder { pick, ver } => delete("order_header", pick, ver, model),
        Act::InsertLine {
            n,
            order,
            qty,
            price,
        } => insert(
            "order_line",
            insert_id(model, "order_line", "l", n),
            vec![
                ("order_id", text(&pick_order(model, order))),
                ("name", text("Soup")),
                ("quantity", Value::Int(qty)),
                ("unit_price", Value::Int(price)),
            ],
        ),
        Act::CancelLine { pick, ver } => update(
            "order_line",
            pick,
            ver,
            model,
            vec![("status", text("cancelled"))],
        ),
        Act::Requantify { pick, ver, qty } => update(
            "order_line",
            pick,
            ver,
            model,
            vec![("quantity", Value::Int(qty))],
        ),
        Act::DeleteLine { pick, ver } => delete("order_line", pick, ver, model),
        Act::InsertPayment {
            n,
            order,
            amount,
            card,
        } => insert(
            "order_payment",
            insert_id(model, "order_payment", "p", n),
            vec![
                ("order_id", text(&pick_order(model, order))),
                ("amount", Value::Int(amount)),
                ("method", text(if card { "card" } else { "cash" })),
            ],
        ),
        Act::RetryPayment { pick, same } => match pick_row(model, "order_payment", pick) {
            (id, _, Some(existing)) => {
                let mut fields = existing.fields;
                if !same {
                    let amount = get_int(&fields, "amount") + 1;
                    fields.insert("amount".into(), Value::Int(amount));
                }
                Op::Insert {
                    table: "order_payment".into(),
                    id: Some(id),
                    fields,
                }
            }
            (_, _, None) => resolve(
                &Act::InsertPayment {
                    n: pick,
                    order: pick,
                    amount: 100,
                    card: same,
                },
                model,
            ),
        },
        Act::TouchPayment { pick, delete } => {
            let (id, version, _) = pick_row(model, "order_payment", pick);
            if delete {
                Op::Delete {
                    table: "order_payment".into(),
                    id,
                    version,
                }
            } else {
                Op::Update {
                    table: "order_payment".into(),
                    id,
                    version,
                    set: [("amount".to_owned(), Value::Int(1))].into(),
                }
            }
        }
    }
}

fn op_target(op: &Op) -> (&str, &str) {
    match op {
        Op::Insert { table, id, .. } => (table, id.as_deref().unwrap_or("")),
        Op::Update { table, id, .. } | Op::Delete { table, id, .. } => (table, id),
        Op::Refused(_) => unreachable!("refused ops touch no row"),
    }
}

// ---------------------------------------------------------------------------------------------
// Running and checking
// ---------------------------------------------------------------------------------------------

fn mrow(r: &Row) -> MRow {
    MRow {
        version: r.version,
        fields: r.fields(),
    }
}

/// Commits `ops` to the store and the model and checks that the answers agree.
fn commit(store: &Store, model: &mut Model, actor: &str, ops: Vec<Op>, ctx: &str) {
    let expected = model.request(actor, &ops);
    let got = store.commit_blocking(Txn::new(actor, ops.clone()));
    match (&expected, got) {
        (Ok(applied), Ok(committed)) => {
            let kinds: Vec<Applied> = committed.results.iter().map(|r| r.applied).collect();
            let want: Vec<Applied> = applied.iter().map(|(a, _)| *a).collect();
            assert_eq!(kinds, want, "{ctx}: applied kinds of {ops:?}");
            assert_eq!(committed.version.0, model.version, "{ctx}: commit version");
            for ((op, r), (_, after_op)) in ops.iter().zip(&committed.results).zip(applied) {
                let (table, id) = op_target(op);
                assert_eq!(r.row.id, id, "{ctx}: result row id");
                if r.applied == Applied::Deleted {
                    continue;
                }
                let got = mrow(&r.row);
                let fin = model.rows(table).get(id);
                if table == "order_header" {
                    // An order's result shows its totals as the whole request left them.
                    if let Some(fin) = fin {
                        assert_eq!(&got, fin, "{ctx}: result row of {op:?}");
                    }
                } else {
                    // Other rows: as the op left them, or as the request left them (when a
                    // later op of the batch changed the row again); both are fair answers.
                    assert!(
                        after_op.as_ref() == Some(&got) || fin == Some(&got),
                        "{ctx}: result row of {op:?}: {got:?}, the op left {after_op:?}, the request {fin:?}"
                    );
                }
            }
        }
        (Err((index, code)), Err(e)) => {
            assert_eq!(e.error.code(), *code, "{ctx}: error of {ops:?}: {e}");
            assert_eq!(e.op_index, *index, "{ctx}: failing op of {ops:?}");
        }
        (expected, got) => panic!(
            "{ctx}: {ops:?}\n  model expects {expected:?}\n  store answered {:?}",
            got.map(|c| c.results.iter().map(|r| r.applied).collect::<Vec<_>>())
        ),
    }
}

/// Everything the store shows must equal the model.
fn check(store: &Store, model: &Model, touched: &[(String, String)], ctx: &str) {
    let status = store.log_status();
    assert_eq!(status.version.0, model.version, "{ctx}: log status version");
    assert_eq!(store.version().0, model.version, "{ctx}: store version");
    assert_eq!(status.last_seq.0, model.seq, "{ctx}: last seq");

    for table in MODELED {
        let is_log = SCHEMA.table(table).expect("table").kind == TableKind::Log;
        let rows = store.scan(table).unwrap();
        for r in &rows {
            assert_eq!(r.seq.is_some(), is_log, "{ctx}: seq of {table}/{}", r.id);
        }
        let got: BTreeMap<String, MRow> = rows.iter().map(|r| (r.id.clone(), mrow(r))).collect();
        assert_eq!(&got, model.rows(table), "{ctx}: scan of {table}");
        for (id, m) in model.rows(table) {
            let r = store.get(table, id).unwrap();
            assert_eq!(
                r.map(|r| mrow(&r)).as_ref(),
                Some(m),
                "{ctx}: get {table}/{id}"
            );
        }
    }
    for (table, id) in touched {
        let r = store.get(table, id).unwrap();
        assert_eq!(
            r.map(|r| mrow(&r)).as_ref(),
            model.rows(table).get(id),
            "{ctx}: get touched {table}/{id}"
        );
    }

    // The status logs the store writes itself.
    let mut got: Vec<(String, String, String)> = store
        .scan("order_status_log")
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r.version, 1);
            (
                get_text(&r.fields(), "order_id").into(),
                get_text(&r.fields(), "status").into(),
                get_text(&r.fields(), "actor").into(),
            )
        })
        .collect();
    let mut want = model.status_log.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "{ctx}: order_status_log");
    let mut got: Vec<(String, String, String, String)> = store
        .scan("order_line_status_log")
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r.version, 1);
            (
                get_text(&r.fields(), "line_id").into(),
                get_text(&r.fields(), "order_id").into(),
                get_text(&r.fields(), "status").into(),
                get_text(&r.fields(), "actor").into(),
            )
        })
        .collect();
    let mut want = model.line_status_log.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "{ctx}: order_line_status_log");

    // The hot tier holds exactly the rows the hot rules want, as committed.
    let snap = store.snapshot(Some(&MODELED)).unwrap();
    assert_eq!(snap.version.0, model.version, "{ctx}: snapshot version");
    assert_eq!(snap.tables.len(), MODELED.len(), "{ctx}: snapshot tables");
    for (table, rows) in &snap.tables {
        let got: BTreeMap<String, MRow> = rows.iter().map(|r| (r.id.clone(), mrow(r))).collect();
        let want: BTreeMap<String, MRow> = model
            .rows(table)
            .iter()
            .filter(|(_, r)| model.is_hot(table, r))
            .map(|(id, r)| (id.clone(), r.clone()))
            .collect();
        assert_eq!(got, want, "{ctx}: hot rows of {table}");
    }
}

/// Seals, verifies the chain, and replays the whole origin log into a fresh map, which must
/// equal every branch table of the store.
fn check_log_replays(store: &Store, model: &Model) {
    store.seal_blocking().unwrap();
    let sealed = store.verify_log().unwrap();
    let status = store.log_status();
    assert_eq!(sealed, status.last_seq, "everything is sealed");
    assert_eq!(sealed.0, model.seq);

    let segments = store.segments_after(Seq(0), 10_000).unwrap();
    let mut next = Seq(1);
    for s in &segments {
        assert_eq!(s.first_seq, next, "segments are contiguous");
        next = s.last_seq.next();
    }
    assert_eq!(next, sealed.next(), "segments cover the log");

    let mut replayed: BTreeMap<(String, String), Row> = BTreeMap::new();
    let mut after = Seq(0);
    let mut last_version = 0;
    let mut tombstones: BTreeMap<(String, String), u64> = BTreeMap::new();
    loop {
        let page = store.log_page(after, 37).unwrap();
        for (version, e) in &page.entries {
            assert_eq!(e.seq, after.next(), "log seqs are contiguous");
            after = e.seq;
            assert!(version.0 >= last_version && version.0 <= model.version);
            last_version = version.0;
            assert_eq!(&e.origin, store.origin());
            assert_eq!(e.row_id, e.row.id);
            let t = SCHEMA.table(&e.table).expect("logged table exists");
            assert_eq!(t.owner, Owner::Branch, "only branch tables are logged");
            if t.kind == TableKind::Log {
                assert_eq!(e.op, EntryOp::Insert, "log rows are only inserted");
                assert_eq!(e.row.seq, Some(e.seq.0), "a log row carries its seq");
            }
            let key = (e.table.clone(), e.row_id.clone());
            match e.op {
                EntryOp::Insert => {
                    // A re-inserted id continues after its tombstone.
                    let expected = tombstones.get(&key).map_or(1, |v| v + 1);
                    assert_eq!(e.row.version, expected, "insert of {key:?}");
                    let old = replayed.insert(key.clone(), e.row.clone());
                    assert!(old.is_none(), "insert of a live row {key:?}");
                }
                EntryOp::Update => {
                    let old = replayed.insert(key.clone(), e.row.clone());
                    let old = old.unwrap_or_else(|| panic!("update of a missing row {key:?}"));
                    assert_eq!(e.row.version, old.version + 1, "update of {key:?}");
                    assert_eq!(e.row.created_at, old.created_at, "update of {key:?}");
                }
                EntryOp::Delete => {
                    tombstones.insert(key.clone(), e.row.version);
                    let old = replayed.remove(&key);
                    let old = old.unwrap_or_else(|| panic!("delete of a missing row {key:?}"));
                    assert!(e.row.version > old.version, "tombstone of {key:?}");
                    assert_eq!(e.row.fields(), old.fields(), "tombstone of {key:?}");
                }
            }
        }
        if !page.has_more {
            break;
        }
    }
    assert_eq!(after, sealed, "the log pages reach the last seq");
    assert_eq!(last_version, model.version);

    for t in SCHEMA.tables().iter().filter(|t| t.owner == Owner::Branch) {
        let stored = store.scan(&t.name).unwrap();
        let from_log: Vec<Row> = replayed
            .iter()
            .filter(|((table, _), _)| *table == t.name)
            .map(|(_, r)| r.clone())
            .collect();
        assert_eq!(stored, from_log, "the log replays to table {}", t.name);
    }
    assert!(
        replayed
            .keys()
            .all(|(t, _)| SCHEMA.table(t).is_some_and(|t| t.owner == Owner::Branch))
    );
}

fn run(steps: Vec<Step>) {
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(dir.path());
    let mut store = Store::open(config.clone()).expect("store opens");
    let mut model = Model::new();
    // A few rows to start from, so that early updates and lines have targets.
    let prelude = [
        Act::InsertOrder { n: 0, table: 1 },
        Act::InsertOrder { n: 1, table: 2 },
        Act::InsertLock {
            n: 0,
            by: 0,
            until: 1,
        },
        Act::InsertShift {
            n: 0,
            pos: 0,
            cash: 10_000,
            closed: None,
        },
    ];
    let steps = prelude.into_iter().map(|a| Step::Single(0, a)).chain(steps);
    for (i, step) in steps.enumerate() {
        let ctx = format!("step {i} ({step:?})");
        let mut touched = Vec::new();
        match &step {
            Step::Single(actor, act) => {
                let op = resolve(act, &model);
                let (t, id) = op_target(&op);
                touched.push((t.to_owned(), id.to_owned()));
                commit(&store, &mut model, ACTORS[*actor as usize], vec![op], &ctx);
            }
            Step::Batch {
                actor,
                acts,
                clean,
                poison,
            } => {
                // Each op is resolved against the rows the batch's earlier ops leave, so that
                // a batch can succeed as well as fail.
                let mut scratch = model.clone();
                let actor = ACTORS[*actor as usize];
                let mut ops = Vec::new();
                for act in acts {
                    let op = resolve(act, &scratch);
                    let ok = scratch.apply(actor, &op).is_ok();
                    if ok || !clean {
                        ops.push(op);
                    }
                }
                match poison {
                    Some(0) => ops.push(insert(
                        "order_line",
                        "l-poison".into(),
                        vec![("order_id", text("o-none")), ("quantity", Value::Int(1))],
                    )),
                    Some(1) => ops.push(Op::Update {
                        table: "table_lock".into(),
                        id: "T-none".into(),
                        version: 1,
                        set: [("locked_by".to_owned(), text("x"))].into(),
                    }),
                    Some(_) => ops.push(Op::Refused(Refusal {
                        status: 403,
                        code: "forbidden",
                        message: "the API refused this op".into(),
                    })),
                    None => {}
                }
                for op in ops.iter().filter(|op| !matches!(op, Op::Refused(_))) {
                    let (t, id) = op_target(op);
                    touched.push((t.to_owned(), id.to_owned()));
                }
                commit(&store, &mut model, actor, ops, &ctx);
            }
            Step::Seal => {
                store.seal_blocking().unwrap();
                assert_eq!(store.log_status().sealed_seq.0, model.seq, "{ctx}");
            }
            Step::Restart => {
                store.close();
                drop(store);
                store = Store::open(config.clone()).expect("store reopens");
                store.verify_log().unwrap();
            }
        }
        check(&store, &model, &touched, &ctx);
    }
    check_log_replays(&store, &model);
    store.close();
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 32,
        // One file only: a failing case is printed (with its steps), not persisted.
        failure_persistence: None,
        max_shrink_iters: 512,
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_agrees_with_a_model(steps in proptest::collection::vec(step(), 20..=60)) {
        run(steps);
    }
}

/// Paying and closing an order in one batch, with the order version the cashier read. The
/// store refuses the close with `version_conflict`: the writer flushes the order's totals
/// (dirtied by the payment earlier in the same request) before it compares the version, so
/// the request conflicts with its own derived write. Whether the client's version matches
/// depends on whether its own earlier ops changed the totals, which it cannot know.
#[test]
fn pay_and_close_in_one_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = common::open(dir.path());
    let line = common::insert(
        "order_line",
        "l1",
        &[
            ("order_id", text("o1")),
            ("quantity", Value::Int(1)),
            ("unit_price", Value::Int(500)),
        ],
    );
    store
        .commit_blocking(Txn::new(
            "waiter",
            vec![common::insert("order_header", "o1", &[]), line],
        ))
        .unwrap();
    let seen = store.get("order_header", "o1").unwrap().unwrap();
    assert_eq!(seen.get("total_amount"), &Value::Int(500));
    let paid_and_closed = store.commit_blocking(Txn::new(
        "cashier",
        vec![
            common::insert(
                "order_payment",
                "p1",
                &[("order_id", text("o1")), ("amount", Value::Int(500))],
            ),
            common::update(
                "order_header",
                "o1",
                seen.version,
                &[("status", text("closed"))],
            ),
        ],
    ));
    let committed = paid_and_closed.expect("nobody else wrote the order since it was read");
    let order = &committed.results[1].row;
    assert_eq!(order.get("status"), &text("closed"));
    assert_eq!(order.get("paid_amount"), &Value::Int(500));
}
