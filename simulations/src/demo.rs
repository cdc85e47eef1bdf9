//! The newcomer's first command: a branch's rush hour on a real edge store. Many terminals at
//! once open orders with their lines, take split payments and close the orders; half-way the
//! edge restarts; at the end every order, payment and the log's hash chain are checked.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use edge::store::{Op, Store, StoreConfig, StoreError, Txn};
use shared::{BranchId, Fields, Value, pos};

pub struct DemoConfig {
    pub data_dir: Option<PathBuf>,
    pub orders: usize,
    pub terminals: usize,
}

/// What the demo saw, and whether every check held.
pub struct Report {
    pub orders: usize,
    pub lines: usize,
    pub payments: usize,
    pub conflicts_retried: usize,
    pub revenue: i64,
    pub commits: u64,
    pub groups: u64,
    pub seconds: f64,
    pub log_entries: u64,
    pub hot_rows_at_end: usize,
    pub failures: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "\n== Outpost demo: one branch's rush hour ==")?;
        writeln!(f, "orders served and closed   {}", self.orders)?;
        writeln!(
            f,
            "lines / payments           {} / {}",
            self.lines, self.payments
        )?;
        writeln!(
            f,
            "revenue                    {}.{:02}",
            self.revenue / 100,
            self.revenue % 100
        )?;
        writeln!(f, "CAS conflicts, retried     {}", self.conflicts_retried)?;
        writeln!(
            f,
            "durable commits            {} in {} group commits ({:.1} per fsync), {:.0} commits/s",
            self.commits,
            self.groups,
            self.commits as f64 / self.groups.max(1) as f64,
            self.commits as f64 / self.seconds
        )?;
        writeln!(
            f,
            "origin log                 {} entries, sealed and chain-verified",
            self.log_entries
        )?;
        writeln!(
            f,
            "hot tier at the end        {} rows (closed orders evicted)",
            self.hot_rows_at_end
        )?;
        if self.ok() {
            write!(
                f,
                "checks                     all passed: no payment or line lost, totals match"
            )?;
        } else {
            for e in &self.failures {
                writeln!(f, "FAILED: {e}")?;
            }
        }
        Ok(())
    }
}

fn text(s: &str) -> Value {
    Value::Text(s.into())
}

fn fields(pairs: &[(&str, Value)]) -> Fields {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// One terminal serving `orders` start to finish: open with lines, pay, close. A close that
/// loses a compare-and-set re-reads the order and retries.
fn serve_orders(
    store: &Store,
    terminal: usize,
    orders: std::ops::Range<usize>,
    conflicts: &AtomicUsize,
) -> Result<(), String> {
    let err = |e: StoreError| e.to_string();
    for o in orders {
        let order_id = format!("o{o}");
        let lines = 1 + (o * 7 + terminal) % 5;
        let mut ops = vec![Op::Insert {
            table: "order_header".into(),
            id: Some(order_id.clone()),
            fields: fields(&[
                ("table_id", text(&format!("T{}", o % 40))),
                ("customer_name", text("guest")),
            ]),
        }];
        for l in 0..lines {
            ops.push(Op::Insert {
                table: "order_line".into(),
                id: Some(format!("{order_id}-l{l}")),
                fields: fields(&[
                    ("order_id", text(&order_id)),
                    ("item_id", text(&format!("item{}", (o + l) % 30))),
                    ("quantity", Value::Int(1 + (l as i64 % 3))),
                    ("unit_price", Value::Int(450 + 125 * (l as i64 % 4))),
                    ("station_id", text(if l % 2 == 0 { "grill" } else { "bar" })),
                ]),
            });
        }
        let opened = store
            .commit_blocking(Txn::new("waiter", ops))
            .map_err(|e| err(e.error))?;
        let total = opened.results[0]
            .row
            .get("total_amount")
            .as_int()
            .unwrap_or(0);
        // Two payments (a split bill), each idempotent by id.
        let first = total / 2;
        for (i, amount) in [first, total - first].into_iter().enumerate() {
            store
                .commit_blocking(Txn::single(
                    "cashier",
                    Op::Insert {
                        table: "order_payment".into(),
                        id: Some(format!("{order_id}-p{i}")),
                        fields: fields(&[
                            ("order_id", text(&order_id)),
                            ("amount", Value::Int(amount)),
                            ("method", text(if i == 0 { "card" } else { "cash" })),
                        ]),
                    },
                ))
                .map_err(|e| err(e.error))?;
        }
        loop {
            let current = store
                .get("order_header", &order_id)
                .map_err(err)?
                .ok_or("order vanished")?;
            let close = Op::Update {
                table: "order_header".into(),
                id: order_id.clone(),
                version: current.version,
                set: fields(&[("status", text("closed"))]),
            };
            match store.commit_blocking(Txn::single("cashier", close)) {
                Ok(_) => break,
                Err(e) if e.error.code() == "version_conflict" => {
                    conflicts.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => return Err(err(e.error)),
            }
        }
    }
    Ok(())
}

fn run_phase(
    store: &Store,
    terminals: usize,
    orders: std::ops::Range<usize>,
    conflicts: &Arc<AtomicUsize>,
) -> Result<(), String> {
    let per = orders.len().div_ceil(terminals.max(1));
    let handles: Vec<_> = (0..terminals)
        .map(|t| {
            let store = store.clone();
            let conflicts = conflicts.clone();
            let start = orders.start + t * per;
            let end = (start + per).min(orders.end);
            std::thread::spawn(move || serve_orders(&store, t, start..end.max(start), &conflicts))
        })
        .collect();
    for h in handles {
        h.join()
            .map_err(|_| "a terminal thread panicked".to_string())??;
    }
    Ok(())
}

pub fn run(config: DemoConfig) -> Result<Report, String> {
    let tmp;
    let dir = match &config.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = std::env::temp_dir().join(format!("outpost-demo-{}", std::process::id()));
            std::fs::create_dir_all(&tmp)
                .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
            tmp.clone()
        }
    };
    let store_config = StoreConfig::new(
        dir.join("edge.db"),
        BranchId::parse("B001").expect("valid id"),
        Arc::new(pos::schema()),
    );
    let open = || Store::open(store_config.clone()).map_err(|e| e.to_string());
    println!("edge store: {}", dir.join("edge.db").display());
    println!(
        "{} terminals serving {} orders; the edge restarts half-way",
        config.terminals, config.orders
    );
    let conflicts = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let half = config.orders / 2;
    let store = open()?;
    run_phase(&store, config.terminals, 0..half, &conflicts)?;
    let m = store.metrics();
    let (mut commits, mut groups) = (
        m.requests.load(Ordering::Relaxed),
        m.groups.load(Ordering::Relaxed),
    );
    println!(
        "half-way: {half} orders closed at version {}; restarting the edge",
        store.version()
    );
    store.close();
    drop(store);
    let store = open()?;
    run_phase(&store, config.terminals, half..config.orders, &conflicts)?;
    let seconds = started.elapsed().as_secs_f64();
    commits += store.metrics().requests.load(Ordering::Relaxed);
    groups += store.metrics().groups.load(Ordering::Relaxed);
    store.seal_blocking().map_err(|e| e.to_string())?;

    let mut failures = Vec::new();
    let orders = store.scan("order_header").map_err(|e| e.to_string())?;
    let lines = store.scan("order_line").map_err(|e| e.to_string())?;
    let payments = store.scan("order_payment").map_err(|e| e.to_string())?;
    let mut revenue = 0;
    for o in &orders {
        let paid: i64 = payments
            .iter()
            .filter(|p| p.get("order_id").as_str() == Some(&o.id))
            .filter_map(|p| p.get("amount").as_int())
            .sum();
        let total: i64 = lines
            .iter()
            .filter(|l| l.get("order_id").as_str() == Some(&o.id))
            .map(|l| {
                l.get("quantity").as_int().unwrap_or(0) * l.get("unit_price").as_int().unwrap_or(0)
            })
            .sum();
        if o.get("status").as_str() != Some("closed") {
            failures.push(format!(
                "order {} is {:?}, not closed",
                o.id,
                o.get("status")
            ));
        }
        if o.get("paid_amount").as_int() != Some(paid)
            || o.get("total_amount").as_int() != Some(total)
            || paid != total
        {
            failures.push(format!(
                "order {}: total {total}, paid {paid}, stored {:?}/{:?}",
                o.id,
                o.get("total_amount"),
                o.get("paid_amount")
            ));
        }
        revenue += paid;
    }
    if orders.len() != config.orders {
        failures.push(format!(
            "{} orders stored, {} served",
            orders.len(),
            config.orders
        ));
    }
    let log_entries = match store.verify_log() {
        Ok(seq) => seq.0,
        Err(e) => {
            failures.push(format!("log chain: {e}"));
            0
        }
    };
    let report = Report {
        orders: orders.len(),
        lines: lines.len(),
        payments: payments.len(),
        conflicts_retried: conflicts.load(Ordering::Relaxed),
        revenue,
        commits,
        groups,
        seconds,
        log_entries,
        hot_rows_at_end: store.hot_rows(),
        failures,
    };
    store.close();
    if config.data_dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(report)
}
