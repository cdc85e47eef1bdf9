//! Group-commit probe: 256 async writers commit 200,000 one-row transactions and the store's
//! own metrics report the throughput, average group size and how busy the writer was.
//! Run: `cargo run --release -p edge --example group_commit_probe [TOKIO_WORKERS]`.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use edge::store::{Op, Store, StoreConfig, Txn};
use shared::{BranchId, Fields, Schema, Value};

fn main() {
    let schema = Arc::new(Schema::from_json(r#"{"module":"bench","tables":[{"name":"sale","kind":"log","owner":"branch","columns":[{"name":"till","type":"text"},{"name":"amount","type":"money"},{"name":"method","type":"text"},{"name":"reference","type":"text"}]}]}"#).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig::new(
        dir.path().join("b.db"),
        BranchId::parse("B1").unwrap(),
        schema,
    ))
    .unwrap();
    let workers: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse().unwrap())
        .unwrap_or(2);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap();
    let n = 200_000u64;
    let w = 256u64;
    let start = Instant::now();
    rt.block_on(async {
        let ts: Vec<_> = (0..w)
            .map(|k| {
                let store = store.clone();
                tokio::spawn(async move {
                    for i in 0..n / w {
                        let f: Fields = [
                            ("till".to_string(), Value::Text(format!("t{}", i % 50))),
                            ("amount".to_string(), Value::Int(1250)),
                            ("method".to_string(), Value::Text("card".into())),
                            ("reference".to_string(), Value::Text(format!("r{k}-{i}"))),
                        ]
                        .into_iter()
                        .collect();
                        store
                            .commit(Txn::single(
                                "b",
                                Op::Insert {
                                    table: "sale".into(),
                                    id: None,
                                    fields: f,
                                },
                            ))
                            .await
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in ts {
            t.await.unwrap();
        }
    });
    let el = start.elapsed().as_secs_f64();
    let m = store.metrics();
    let groups = m.groups.load(Relaxed);
    println!(
        "{:.0} commits/s, groups {}, avg group {:.1}, commit us avg {:.0}, commit busy {:.0}%",
        n as f64 / el,
        groups,
        n as f64 / groups as f64,
        m.commit.sum() as f64 / groups as f64,
        m.commit.sum() as f64 / 1e4 / el
    );
}
