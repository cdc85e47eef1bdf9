//! The `pos` module's rules (CONTRACT.md 2.1), applied by the writer inside the writing
//! transaction: derived order totals, status transitions, close-only-when-paid, status logs.
//! Because totals are derived here and payments and lines are separate rows, a cashier's
//! payment and a waiter's new line never overwrite each other.

use std::sync::Arc;

use rusqlite::Connection;
use shared::json::FieldError;
use shared::pos::{CANCELLED, LINE_STATUSES, ORDER_STATUSES, status_known, transition_allowed};
use shared::{Fields, Row, Schema, Value};

use super::error::StoreError;
use super::writer::{Scratch, Writer};

/// An order by id as the current request sees it (its own writes included); `None` when
/// there is no such order.
pub(crate) type Orders<'a> = &'a dyn Fn(&str) -> Result<Option<Arc<Row>>, StoreError>;

/// Largest money amount accepted in a pos money column, in minor units (10^11 = one billion
/// major units), so that quantity × price and the sums of an order stay far inside i64.
pub const MONEY_ABS_MAX: i64 = 100_000_000_000;
/// Largest line quantity accepted.
pub const QUANTITY_ABS_MAX: i64 = 100_000;
const _: () = assert!(MONEY_ABS_MAX.checked_mul(QUANTITY_ABS_MAX).is_some());

/// Table indexes of the pos tables the rules touch.
#[derive(Debug, Clone)]
pub(crate) struct PosRules {
    pub order: usize,
    line: usize,
    payment: usize,
    status_log: usize,
    line_status_log: usize,
}

/// Read access by column name to a row or to an update's `set`.
trait Columns {
    fn value(&self, col: &str) -> Option<&Value>;
}

impl Columns for Fields {
    fn value(&self, col: &str) -> Option<&Value> {
        self.get(col)
    }
}

impl Columns for Row {
    fn value(&self, col: &str) -> Option<&Value> {
        Some(self.get(col))
    }
}

fn text<'a>(row_or_fields: &'a impl Columns, col: &str) -> Option<&'a str> {
    row_or_fields.value(col).and_then(Value::as_str)
}

fn bounded(
    fields: &impl Columns,
    col: &str,
    max: i64,
    expected: &'static str,
) -> Result<(), StoreError> {
    match fields.value(col) {
        Some(Value::Int(v)) if v.abs() > max => Err(FieldError::InvalidValue {
            column: col.into(),
            expected,
        }
        .into()),
        _ => Ok(()),
    }
}

fn check_amounts(fields: &impl Columns) -> Result<(), StoreError> {
    const MONEY: &str = "an amount of at most 100000000000 minor units";
    bounded(fields, "unit_price", MONEY_ABS_MAX, MONEY)?;
    bounded(fields, "amount", MONEY_ABS_MAX, MONEY)?;
    bounded(
        fields,
        "quantity",
        QUANTITY_ABS_MAX,
        "a quantity of at most 100000",
    )
}

fn check_status(chain: &[&str], fields: &impl Columns) -> Result<(), StoreError> {
    match fields.value("status") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Text(s)) if status_known(chain, s) => Ok(()),
        Some(_) => Err(FieldError::InvalidValue {
            column: "status".into(),
            expected: if chain.len() == ORDER_STATUSES.len() {
                "one of open, preparing, ready, served, closed, cancelled"
            } else {
                "one of queued, preparing, ready, served, cancelled"
            },
        }
        .into()),
    }
}

/// An update may not clear a status: an order or line always has one (a null would also
/// escape the transition rules and be written to the status log).
fn refuse_null_status(set: &Fields) -> Result<(), StoreError> {
    if matches!(set.get("status"), Some(Value::Null)) {
        return Err(FieldError::InvalidValue {
            column: "status".into(),
            expected: "a status (it cannot be null)",
        }
        .into());
    }
    Ok(())
}

/// What a line adds to its order's total: quantity × unit price, nothing when cancelled.
/// Quantity and price are bounded, so the product fits; sums are kept in i128 until written.
fn line_amount(line: &Row) -> i128 {
    if line.get("status").as_str() == Some(CANCELLED) {
        return 0;
    }
    let q = line.get("quantity").as_int().unwrap_or(0);
    let p = line.get("unit_price").as_int().unwrap_or(0);
    i128::from(q) * i128::from(p)
}

/// Applies a change to a derived total, refusing a result outside i64.
pub(crate) fn add_amount(order_id: &str, current: &Value, delta: i128) -> Result<i64, StoreError> {
    let now = i128::from(current.as_int().unwrap_or(0));
    i64::try_from(now + delta).map_err(|_| StoreError::AmountOverflow {
        order_id: order_id.to_owned(),
    })
}

impl PosRules {
    /// The rules apply to a module named `pos` that has the tables they need.
    pub(crate) fn for_schema(schema: &Schema) -> Option<PosRules> {
        if schema.module() != "pos" {
            return None;
        }
        let has = |t: &str, cols: &[&str]| {
            let table = schema.table(t)?;
            cols.iter()
                .all(|c| table.column(c).is_some())
                .then(|| schema.table_index(t))
                .flatten()
        };
        Some(PosRules {
            order: has("order_header", &["status", "total_amount", "paid_amount"])?,
            line: has(
                "order_line",
                &["order_id", "quantity", "unit_price", "status"],
            )?,
            payment: has("order_payment", &["order_id", "amount"])?,
            status_log: has("order_status_log", &["order_id", "status", "actor"])?,
            line_status_log: has(
                "order_line_status_log",
                &["line_id", "order_id", "status", "actor"],
            )?,
        })
    }

    pub(crate) fn is_order(&self, ti: usize) -> bool {
        ti == self.order
    }

    fn order_of(&self, orders: Orders<'_>, fields: &impl Columns) -> Result<Arc<Row>, StoreError> {
        let order_id = text(fields, "order_id").unwrap_or_default();
        orders(order_id)?.ok_or_else(|| StoreError::UnknownOrder {
            order_id: order_id.chars().take(128).collect(),
        })
    }

    fn require_open(order: &Row) -> Result<(), StoreError> {
        match order.get("status").as_str() {
            Some("closed") | Some(CANCELLED) => Err(StoreError::OrderClosed {
                order_id: order.id.clone(),
            }),
            _ => Ok(()),
        }
    }

    pub(crate) fn before_insert(
        &self,
        orders: Orders<'_>,
        ti: usize,
        row: &mut Row,
    ) -> Result<(), StoreError> {
        check_amounts(row)?;
        if ti == self.order {
            check_status(&ORDER_STATUSES, row)?;
            if row.get("status").is_null() {
                row.set("status", Value::Text("open".into()));
            }
            row.set("total_amount", Value::Int(0));
            row.set("paid_amount", Value::Int(0));
        } else if ti == self.line {
            check_status(&LINE_STATUSES, row)?;
            let order = self.order_of(orders, row)?;
            Self::require_open(&order)?;
            if row.get("status").is_null() {
                row.set("status", Value::Text("queued".into()));
            }
        } else if ti == self.payment {
            // A payment is accepted on any existing order, closed or cancelled included:
            // money a till has taken (or refunded) must always be recordable.
            self.order_of(orders, row)?;
            if row.get("amount").is_null() {
                return Err(FieldError::InvalidValue {
                    column: "amount".into(),
                    expected: "an integer amount in minor units (it is required)",
                }
                .into());
            }
        }
        Ok(())
    }

    pub(crate) fn before_update(
        &self,
        orders: Orders<'_>,
        ti: usize,
        current: &Row,
        set: &Fields,
    ) -> Result<(), StoreError> {
        check_amounts(set)?;
        if ti == self.order {
            check_status(&ORDER_STATUSES, set)?;
            if let Some(to) = text(set, "status") {
                let from = current.get("status").as_str().unwrap_or("open");
                if from != to && !transition_allowed(&ORDER_STATUSES, from, to) {
                    return Err(StoreError::IllegalTransition {
                        from: from.into(),
                        to: to.into(),
                    });
                }
                if to == "closed" {
                    let total = current.get("total_amount").as_int().unwrap_or(0);
                    let paid = current.get("paid_amount").as_int().unwrap_or(0);
                    if paid < total {
                        return Err(StoreError::Unpaid { total, paid });
                    }
                }
            }
            refuse_null_status(set)?;
        } else if ti == self.line {
            check_status(&LINE_STATUSES, set)?;
            refuse_null_status(set)?;
            Self::require_open(&*self.order_of(orders, current)?)?;
            if set.contains_key("order_id") {
                Self::require_open(&*self.order_of(orders, set)?)?;
            }
            if let Some(to) = text(set, "status") {
                let from = current.get("status").as_str().unwrap_or("queued");
                if from != to && !transition_allowed(&LINE_STATUSES, from, to) {
                    return Err(StoreError::IllegalTransition {
                        from: from.into(),
                        to: to.into(),
                    });
                }
            }
        }
        Ok(())
    }

    pub(crate) fn before_delete(
        &self,
        conn: &Connection,
        orders: Orders<'_>,
        ti: usize,
        current: &Row,
    ) -> Result<(), StoreError> {
        if ti == self.order {
            let lines: i64 = conn
                .prepare_cached("SELECT (SELECT COUNT(*) FROM t_order_line WHERE order_id = ?1) + (SELECT COUNT(*) FROM t_order_payment WHERE order_id = ?1)")?
                .query_row([&current.id], |r| r.get(0))?;
            if lines > 0 {
                return Err(StoreError::OrderNotEmpty {
                    order_id: current.id.clone(),
                });
            }
        } else if ti == self.line {
            Self::require_open(&*self.order_of(orders, current)?)?;
        }
        Ok(())
    }

    /// After an insert (`before` is `None`) or update: status logs and dirty totals.
    pub(crate) fn after_write(
        &self,
        w: &mut Writer,
        ti: usize,
        before: Option<&Row>,
        row: &Arc<Row>,
        s: &mut Scratch<'_>,
    ) -> Result<(), StoreError> {
        let changed = |col: &str| before.is_none_or(|b| b.get(col) != row.get(col));
        if ti == self.order {
            if changed("status") {
                self.log_status(w, self.status_log, None, row, s)?;
            }
        } else if ti == self.line {
            // Totals change by the line's contribution: what it no longer adds to its old
            // order, and what it now adds to its (possibly new) order.
            if let Some(b) = before
                && let Some(o) = b.get("order_id").as_str()
            {
                s.add_to_order(o, -line_amount(b), 0);
            }
            if let Some(o) = row.get("order_id").as_str() {
                s.add_to_order(o, line_amount(row), 0);
            }
            if changed("status") {
                self.log_status(w, self.line_status_log, Some(&row.id), row, s)?;
            }
        } else if ti == self.payment
            && let Some(o) = row.get("order_id").as_str()
        {
            s.add_to_order(o, 0, i128::from(row.get("amount").as_int().unwrap_or(0)));
        }
        Ok(())
    }

    pub(crate) fn after_delete(
        &self,
        _w: &mut Writer,
        ti: usize,
        row: &Row,
        s: &mut Scratch<'_>,
    ) -> Result<(), StoreError> {
        if ti == self.line
            && let Some(o) = row.get("order_id").as_str()
        {
            s.add_to_order(o, -line_amount(row), 0);
        } else if ti == self.order {
            // Totals its deleted lines left pending die with it: an order inserted again
            // under the same id in this request starts from zero.
            s.forget_order(&row.id);
        }
        Ok(())
    }

    fn log_status(
        &self,
        w: &mut Writer,
        log_table: usize,
        line_id: Option<&str>,
        row: &Row,
        s: &mut Scratch<'_>,
    ) -> Result<(), StoreError> {
        let order_id = match line_id {
            Some(_) => row.get("order_id").clone(),
            None => Value::Text(row.id.clone()),
        };
        let mut fields = Fields::new();
        fields.insert("order_id".into(), order_id);
        fields.insert("status".into(), row.get("status").clone());
        fields.insert("actor".into(), Value::Text(s.actor().to_owned()));
        if let Some(line) = line_id {
            fields.insert("line_id".into(), Value::Text(line.to_owned()));
        }
        let id = w.new_id(s.now);
        let row = w.new_row_from(log_table, id, fields, s.now);
        w.insert_row(log_table, row, s)?;
        Ok(())
    }
}
