//! Durable commit throughput of the edge store under group commit, against raw rusqlite in the
//! same run. Run: `cargo bench -p edge --bench commit`.
//!
//! - `store/writers/W`: W concurrent writers each committing one-row transactions (a row in a
//!   plain log table plus its origin-log entry, fsynced, `synchronous=FULL`).
//! - `store_pos_payment/writers/W`: the same with `pos` payments, which also re-derive the
//!   order's `paid_amount` (a second row write and log entry per payment).
//! - `raw_sqlite/rows_per_txn/N`: the baseline: rusqlite inserts of N rows per transaction in
//!   WAL mode with `synchronous=FULL`, one prepared statement.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use edge::store::{Op, Store, StoreConfig, Txn};
use shared::{BranchId, Fields, Schema, Value, pos};

const BENCH_SCHEMA: &str = r#"{"module":"bench","tables":[{"name":"sale","kind":"log","owner":"branch",
  "columns":[{"name":"till","type":"text"},{"name":"amount","type":"money"},{"name":"method","type":"text"},{"name":"reference","type":"text"}]}]}"#;

fn sale_fields(i: u64) -> Fields {
    [
        ("till".to_string(), Value::Text(format!("till-{}", i % 50))),
        ("amount".to_string(), Value::Int(1250 + (i % 1000) as i64)),
        ("method".to_string(), Value::Text("card".into())),
        ("reference".to_string(), Value::Text(format!("ref-{i:012}"))),
    ]
    .into_iter()
    .collect()
}

/// Commits `n` transactions from `writers` concurrent tasks; returns the elapsed time.
fn run_writers(
    rt: &tokio::runtime::Runtime,
    store: &Store,
    writers: usize,
    n: u64,
    make: Arc<dyn Fn(u64) -> Op + Send + Sync>,
) -> Duration {
    let per = n.div_ceil(writers as u64);
    let start = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..writers as u64)
            .map(|w| {
                let store = store.clone();
                let make = make.clone();
                tokio::spawn(async move {
                    for k in 0..per {
                        store
                            .commit(Txn::single("bench", make(w * per + k)))
                            .await
                            .expect("commit");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("writer task");
        }
    });
    // Scale to exactly `n` commits when `writers` does not divide `n`.
    start
        .elapsed()
        .mul_f64(n as f64 / (per * writers as u64) as f64)
}

fn store_benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));

    let mut g = c.benchmark_group("store");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    for writers in [1usize, 16, 64, 256] {
        let dir = tempfile::tempdir().unwrap();
        let schema = Arc::new(Schema::from_json(BENCH_SCHEMA).unwrap());
        let store = Store::open(StoreConfig::new(
            dir.path().join("bench.db"),
            BranchId::parse("B001").unwrap(),
            schema,
        ))
        .unwrap();
        let ctr = counter.clone();
        let make: Arc<dyn Fn(u64) -> Op + Send + Sync> = Arc::new(move |_| {
            let i = ctr.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Op::Insert {
                table: "sale".into(),
                id: None,
                fields: sale_fields(i),
            }
        });
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("writers", writers), &writers, |b, &w| {
            b.iter_custom(|iters| run_writers(&rt, &store, w, iters, make.clone()));
        });
        store.close();
    }
    g.finish();

    let mut g = c.benchmark_group("store_pos_payment");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    for writers in [1usize, 256] {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(StoreConfig::new(
            dir.path().join("bench.db"),
            BranchId::parse("B001").unwrap(),
            Arc::new(pos::schema()),
        ))
        .unwrap();
        // Payments spread over 500 open orders.
        for o in 0..500 {
            store
                .commit_blocking(Txn::single(
                    "bench",
                    Op::Insert {
                        table: "order_header".into(),
                        id: Some(format!("o{o}")),
                        fields: Fields::new(),
                    },
                ))
                .unwrap();
        }
        let ctr = counter.clone();
        let make: Arc<dyn Fn(u64) -> Op + Send + Sync> = Arc::new(move |_| {
            let i = ctr.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let fields = [
                ("order_id".to_string(), Value::Text(format!("o{}", i % 500))),
                ("amount".to_string(), Value::Int(100)),
                ("method".to_string(), Value::Text("cash".into())),
            ]
            .into_iter()
            .collect();
            Op::Insert {
                table: "order_payment".into(),
                id: None,
                fields,
            }
        });
        g.throughput(Throughput::Elements(1));
        g.bench_with_input(BenchmarkId::new("writers", writers), &writers, |b, &w| {
            b.iter_custom(|iters| run_writers(&rt, &store, w, iters, make.clone()));
        });
        store.close();
    }
    g.finish();
}

fn raw_sqlite(c: &mut Criterion) {
    let mut g = c.benchmark_group("raw_sqlite");
    g.sample_size(10).measurement_time(Duration::from_secs(8));
    for rows in [1u64, 100] {
        let dir = tempfile::tempdir().unwrap();
        let conn = rusqlite::Connection::open(dir.path().join("raw.db")).unwrap();
        conn.pragma_update(None, "journal_mode", "WAL").unwrap();
        conn.pragma_update(None, "synchronous", "FULL").unwrap();
        conn.execute_batch("CREATE TABLE sale (id TEXT PRIMARY KEY, till TEXT, amount INTEGER, method TEXT, reference TEXT) WITHOUT ROWID").unwrap();
        let mut i = 0u64;
        g.throughput(Throughput::Elements(rows));
        g.bench_with_input(BenchmarkId::new("rows_per_txn", rows), &rows, |b, &rows| {
            b.iter(|| {
                let tx = conn.unchecked_transaction().unwrap();
                {
                    let mut stmt = tx.prepare_cached("INSERT INTO sale (id, till, amount, method, reference) VALUES (?1, ?2, ?3, ?4, ?5)").unwrap();
                    for _ in 0..rows {
                        i += 1;
                        stmt.execute(rusqlite::params![format!("{i:016}"), format!("till-{}", i % 50), 1250 + (i % 1000) as i64, "card", format!("ref-{i:012}")]).unwrap();
                    }
                }
                tx.commit().unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, raw_sqlite, store_benches);
criterion_main!(benches);
