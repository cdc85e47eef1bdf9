//! Till-cycle probe: the load generator's order cycle (`outpost-sim load`) run straight
//! against the store, without HTTP, to split the store's cost from the server's. N async
//! tills each open an order with 3 lines (one batch), move a line, take the payment and close
//! the order: 4 durable writes per cycle with the `pos` rules. Prints writes/s, group size and
//! how busy the writer was.
//! Run: `cargo run --release -p edge --example till_probe [TILLS] [SECONDS] [v7|till]`
//! (row ids: time-ordered UUIDv7, the default, or per-till sequences).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use edge::store::{Op, Store, StoreConfig, Txn};

// The allocator `outpost-edge` uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use shared::{BranchId, Fields, Value};

fn fields(pairs: &[(&str, Value)]) -> Fields {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

/// How the tills name their rows.
#[derive(Clone, Copy)]
enum Ids {
    /// UUIDv7, as the server names rows and as terminals should: time-ordered.
    V7,
    /// `o<till>-<n>`: each till's rows in a key range of its own, scattered across the
    /// B-trees (64 insertion points), the layout's worst realistic case.
    PerTill,
}

fn main() {
    let mut args = std::env::args().skip(1);
    let tills: usize = args.next().map_or(64, |a| a.parse().expect("TILLS"));
    let seconds: u64 = args.next().map_or(8, |a| a.parse().expect("SECONDS"));
    let ids = match args.next().as_deref() {
        None | Some("v7") => Ids::V7,
        Some("till") => Ids::PerTill,
        Some(other) => panic!("IDS is v7 or till, not {other}"),
    };
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = Store::open(StoreConfig::new(
        dir.path().join("b.db"),
        BranchId::parse("B001").expect("branch"),
        Arc::new(shared::pos::schema()),
    ))
    .expect("the store");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let writes: u64 = rt.block_on(async {
        let tasks: Vec<_> = (0..tills)
            .map(|t| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut writes = 0u64;
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        n += 1;
                        let order = match ids {
                            Ids::V7 => uuid::Uuid::now_v7().to_string(),
                            Ids::PerTill => format!("o{t}-{n}"),
                        };
                        let mut ops = vec![Op::Insert {
                            table: "order_header".into(),
                            id: Some(order.clone()),
                            fields: fields(&[("table_id", Value::Text(format!("T{}", n % 40)))]),
                        }];
                        for l in 0..3i64 {
                            ops.push(Op::Insert {
                                table: "order_line".into(),
                                id: Some(format!("{order}-l{l}")),
                                fields: fields(&[
                                    ("order_id", Value::Text(order.clone())),
                                    ("item_id", Value::Text(format!("i{l}"))),
                                    ("quantity", Value::Int(1 + l)),
                                    ("unit_price", Value::Int(450 + 100 * l)),
                                    (
                                        "station_id",
                                        Value::Text(if l == 0 { "grill" } else { "bar" }.into()),
                                    ),
                                ]),
                            });
                        }
                        let opened = store.commit(Txn::new("cashier", ops)).await.expect("open");
                        let header = &opened.results[0].row;
                        let total = header
                            .columns
                            .iter()
                            .position(|c| c == "total_amount")
                            .and_then(|i| match header.values[i] {
                                Value::Int(v) => Some(v),
                                _ => None,
                            })
                            .expect("a total");
                        let version = header.version;
                        store
                            .commit(Txn::single(
                                "kitchen",
                                Op::Update {
                                    table: "order_line".into(),
                                    id: format!("{order}-l0"),
                                    version: 1,
                                    set: fields(&[("status", Value::Text("preparing".into()))]),
                                },
                            ))
                            .await
                            .expect("line");
                        store
                            .commit(Txn::single(
                                "cashier",
                                Op::Insert {
                                    table: "order_payment".into(),
                                    id: Some(format!("{order}-p")),
                                    fields: fields(&[
                                        ("order_id", Value::Text(order.clone())),
                                        ("amount", Value::Int(total)),
                                        ("method", Value::Text("card".into())),
                                    ]),
                                },
                            ))
                            .await
                            .expect("payment");
                        store
                            .commit(Txn::single(
                                "cashier",
                                Op::Update {
                                    table: "order_header".into(),
                                    id: order.clone(),
                                    version: version + 1,
                                    set: fields(&[("status", Value::Text("closed".into()))]),
                                },
                            ))
                            .await
                            .expect("close");
                        writes += 4;
                    }
                    writes
                })
            })
            .collect();
        let mut total = 0;
        for t in tasks {
            total += t.await.expect("a till");
        }
        total
    });
    let el = start.elapsed().as_secs_f64();
    let m = store.metrics();
    let groups = m.groups.load(Relaxed);
    println!(
        "{tills} tills: {:.0} writes/s, groups {groups}, avg group {:.1}, commit us avg {:.0}, writer busy {:.0}%",
        writes as f64 / el,
        m.requests.load(Relaxed) as f64 / groups as f64,
        m.commit.sum() as f64 / groups as f64,
        m.commit.sum() as f64 / 1e4 / el
    );
}
