//! The store through its API: the pos rules, CAS, idempotent log inserts, group isolation, the
//! lost-update scenario, segments and retention.

mod common;

use std::sync::Arc;

use common::*;
use edge::store::{Applied, Op, Txn};
use shared::{Seq, Value};

#[test]
fn order_lifecycle_derives_totals_and_logs_status() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .commit_blocking(txn(insert(
            "order_header",
            "o1",
            &[("table_id", text("T4"))],
        )))
        .unwrap();
    store
        .commit_blocking(txn(insert(
            "order_line",
            "l1",
            &[
                ("order_id", text("o1")),
                ("quantity", Value::Int(2)),
                ("unit_price", Value::Int(1250)),
            ],
        )))
        .unwrap();
    let o = store.get("order_header", "o1").unwrap().unwrap();
    assert_eq!(o.get("total_amount"), &Value::Int(2500));
    assert_eq!(o.get("status"), &text("open"));
    // Closing while unpaid is refused.
    let e = store
        .commit_blocking(txn(update(
            "order_header",
            "o1",
            o.version,
            &[("status", text("closed"))],
        )))
        .unwrap_err();
    assert_eq!(e.error.code(), "unpaid");
    store
        .commit_blocking(txn(insert(
            "order_payment",
            "p1",
            &[
                ("order_id", text("o1")),
                ("amount", Value::Int(2500)),
                ("method", text("cash")),
            ],
        )))
        .unwrap();
    let o = store.get("order_header", "o1").unwrap().unwrap();
    assert_eq!(o.get("paid_amount"), &Value::Int(2500));
    let closed = store
        .commit_blocking(txn(update(
            "order_header",
            "o1",
            o.version,
            &[("status", text("closed"))],
        )))
        .unwrap();
    assert_eq!(closed.results[0].row.get("status"), &text("closed"));
    // A closed order leaves the hot tier but is still readable.
    let snap = store
        .snapshot(Some(&["order_header", "order_line"]))
        .unwrap();
    assert!(snap.tables.iter().all(|(_, rows)| rows.is_empty()));
    assert_eq!(
        store
            .get("order_header", "o1")
            .unwrap()
            .unwrap()
            .get("status"),
        &text("closed")
    );
    let logs = store.scan("order_status_log").unwrap();
    let mut statuses: Vec<_> = logs.iter().map(|r| r.get("status").clone()).collect();
    statuses.sort();
    assert_eq!(statuses, vec![text("closed"), text("open")]);
    assert_eq!(store.scan("order_line_status_log").unwrap().len(), 1);
    // Reopening is an illegal move.
    let o = store.get("order_header", "o1").unwrap().unwrap();
    let e = store
        .commit_blocking(txn(update(
            "order_header",
            "o1",
            o.version,
            &[("status", text("open"))],
        )))
        .unwrap_err();
    assert_eq!(e.error.code(), "illegal_transition");
}

#[test]
fn errors_name_the_rule_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .commit_blocking(txn(insert("order_header", "o1", &[])))
        .unwrap();
    let before = store.version();
    let check = |op: Op, code: &str| {
        let e = store.commit_blocking(txn(op)).unwrap_err();
        assert_eq!(e.error.code(), code);
        assert_eq!(e.op_index, Some(0));
    };
    check(
        insert("order_line", "l1", &[("order_id", text("nope"))]),
        "unknown_order",
    );
    check(
        insert(
            "order_payment",
            "p1",
            &[("order_id", text("nope")), ("amount", Value::Int(1))],
        ),
        "unknown_order",
    );
    check(
        insert("order_payment", "p1", &[("order_id", text("o1"))]),
        "invalid_value",
    );
    check(
        insert(
            "order_payment",
            "p1",
            &[("order_id", text("o1")), ("amount", text("12"))],
        ),
        "invalid_value",
    );
    check(
        insert("order_header", "o2", &[("total_amount", Value::Int(5))]),
        "read_only_column",
    );
    check(
        insert("order_header", "o2", &[("colour", text("red"))]),
        "unknown_column",
    );
    check(
        insert("order_header", "o2", &[("status", text("eaten"))]),
        "invalid_value",
    );
    check(insert("order_header", "o1", &[]), "id_conflict");
    check(
        insert("menu_item", "m1", &[("name", text("Soup"))]),
        "hub_owned",
    );
    check(
        insert("order_status_log", "s1", &[("order_id", text("o1"))]),
        "forbidden",
    );
    check(insert("no_such_table", "x", &[]), "unknown_table");
    check(
        update("order_header", "o1", 7, &[("notes", text("x"))]),
        "version_conflict",
    );
    check(
        update("order_header", "zz", 1, &[("notes", text("x"))]),
        "not_found",
    );
    check(
        update("order_header", "o1", 1, &[("status", Value::Null)]),
        "invalid_value",
    );
    check(
        Op::Delete {
            table: "order_payment".into(),
            id: "p".into(),
            version: 1,
        },
        "log_immutable",
    );
    check(
        insert(
            "order_line",
            "l1",
            &[
                ("order_id", text("o1")),
                ("quantity", Value::Int(10_000_000)),
            ],
        ),
        "invalid_value",
    );
    let e = store.commit_blocking(Txn::new("t", vec![])).unwrap_err();
    assert_eq!(e.error.code(), "empty_transaction");
    assert_eq!(store.version(), before);
    assert_eq!(store.scan("order_line").unwrap().len(), 0);
    assert_eq!(store.log_status().last_seq, Seq(2)); // the order and its status log
}

#[test]
fn a_version_conflict_returns_the_current_row() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .commit_blocking(txn(insert("order_header", "o1", &[])))
        .unwrap();
    store
        .commit_blocking(txn(update(
            "order_header",
            "o1",
            1,
            &[("notes", text("a"))],
        )))
        .unwrap();
    let e = store
        .commit_blocking(txn(update(
            "order_header",
            "o1",
            1,
            &[("notes", text("b"))],
        )))
        .unwrap_err();
    match e.error {
        edge::store::StoreError::VersionConflict { current, .. } => {
            assert_eq!(current.version, 2);
            assert_eq!(current.get("notes"), &text("a"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_retried_payment_is_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .commit_blocking(txn(insert("order_header", "o1", &[])))
        .unwrap();
    let pay = || {
        insert(
            "order_payment",
            "p1",
            &[("order_id", text("o1")), ("amount", Value::Int(700))],
        )
    };
    let first = store.commit_blocking(txn(pay())).unwrap();
    assert_eq!(first.results[0].applied, Applied::Inserted);
    let seq = store.log_status().last_seq;
    let again = store.commit_blocking(txn(pay())).unwrap();
    assert_eq!(again.results[0].applied, Applied::AlreadyPresent);
    assert_eq!(again.results[0].row.seq, first.results[0].row.seq);
    assert_eq!(store.log_status().last_seq, seq);
    let e = store
        .commit_blocking(txn(insert(
            "order_payment",
            "p1",
            &[("order_id", text("o1")), ("amount", Value::Int(701))],
        )))
        .unwrap_err();
    assert_eq!(e.error.code(), "id_conflict");
    assert_eq!(
        store
            .get("order_header", "o1")
            .unwrap()
            .unwrap()
            .get("paid_amount"),
        &Value::Int(700)
    );
}

#[test]
fn a_batch_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let e = store
        .commit_blocking(Txn::new(
            "t",
            vec![
                insert("order_header", "o1", &[]),
                insert(
                    "order_line",
                    "l1",
                    &[
                        ("order_id", text("o1")),
                        ("quantity", Value::Int(1)),
                        ("unit_price", Value::Int(5)),
                    ],
                ),
                insert("order_line", "l2", &[("order_id", text("o9"))]),
            ],
        ))
        .unwrap_err();
    assert_eq!(e.op_index, Some(2));
    assert!(store.get("order_header", "o1").unwrap().is_none());
    assert_eq!(store.log_status().last_seq, Seq(0));
    let ok = store
        .commit_blocking(Txn::new(
            "t",
            vec![
                insert("order_header", "o1", &[]),
                insert(
                    "order_line",
                    "l1",
                    &[
                        ("order_id", text("o1")),
                        ("quantity", Value::Int(1)),
                        ("unit_price", Value::Int(5)),
                    ],
                ),
                insert(
                    "order_line",
                    "l2",
                    &[
                        ("order_id", text("o1")),
                        ("quantity", Value::Int(3)),
                        ("unit_price", Value::Int(5)),
                    ],
                ),
            ],
        ))
        .unwrap();
    // One derived header update for the whole batch, shown in the result.
    assert_eq!(ok.results[0].row.get("total_amount"), &Value::Int(20));
    assert_eq!(ok.results[0].row.version, 2);
}

#[test]
fn group_neighbours_are_isolated_from_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .commit_blocking(txn(insert("order_header", "o1", &[])))
        .unwrap();
    // Many concurrent requests, a third of them bound to fail: every good one lands.
    let handles: Vec<_> = (0..60)
        .map(|i| {
            let store = store.clone();
            std::thread::spawn(move || {
                let order = if i % 3 == 0 { "missing" } else { "o1" };
                let r = store.commit_blocking(txn(insert(
                    "order_payment",
                    &format!("p{i}"),
                    &[("order_id", text(order)), ("amount", Value::Int(1))],
                )));
                (i, r.is_ok())
            })
        })
        .collect();
    for h in handles {
        let (i, ok) = h.join().unwrap();
        assert_eq!(ok, i % 3 != 0, "request {i}");
    }
    assert_eq!(store.scan("order_payment").unwrap().len(), 40);
    assert_eq!(
        store
            .get("order_header", "o1")
            .unwrap()
            .unwrap()
            .get("paid_amount"),
        &Value::Int(40)
    );
    store.seal_blocking().unwrap();
    store.verify_log().unwrap();
}

/// An order deleted and inserted again in one batch starts from zero: the totals its deleted
/// lines left pending die with it.
#[test]
fn an_order_inserted_again_in_its_batch_starts_from_zero() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .commit_blocking(txn(insert("order_header", "o1", &[])))
        .unwrap();
    store
        .commit_blocking(txn(line("l1", "o1", 1, 500)))
        .unwrap();
    let order = store.get("order_header", "o1").unwrap().unwrap();
    assert_eq!(order.get("total_amount"), &Value::Int(500));
    store
        .commit_blocking(Txn::new(
            "t",
            vec![
                Op::Delete {
                    table: "order_line".into(),
                    id: "l1".into(),
                    version: 1,
                },
                Op::Delete {
                    table: "order_header".into(),
                    id: "o1".into(),
                    version: order.version,
                },
                insert("order_header", "o1", &[]),
            ],
        ))
        .unwrap();
    let again = store.get("order_header", "o1").unwrap().unwrap();
    assert_eq!(again.get("total_amount"), &Value::Int(0));
    assert_eq!(again.get("paid_amount"), &Value::Int(0));
}

/// Batches that fail part-way (their first payment written, the second refused) run without
/// savepoints until one fails; the group is re-run with savepoints and every good batch lands,
/// every bad one changes nothing.
#[test]
fn batches_failing_part_way_change_nothing_and_neighbours_land() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .commit_blocking(txn(insert("order_header", "o1", &[])))
        .unwrap();
    let payment = |id: String, order: &str| {
        insert(
            "order_payment",
            &id,
            &[("order_id", text(order)), ("amount", Value::Int(1))],
        )
    };
    let handles: Vec<_> = (0..60)
        .map(|i| {
            let store = store.clone();
            std::thread::spawn(move || {
                let second = if i % 3 == 0 { "missing" } else { "o1" };
                let r = store.commit_blocking(Txn::new(
                    "t",
                    vec![
                        payment(format!("p{i}a"), "o1"),
                        payment(format!("p{i}b"), second),
                    ],
                ));
                (i, r.map(|_| ()).map_err(|e| e.op_index))
            })
        })
        .collect();
    for h in handles {
        let (i, r) = h.join().unwrap();
        if i % 3 == 0 {
            assert_eq!(r, Err(Some(1)), "request {i} fails at its second payment");
            assert!(
                store
                    .get("order_payment", &format!("p{i}a"))
                    .unwrap()
                    .is_none()
            );
        } else {
            assert_eq!(r, Ok(()), "request {i}");
        }
    }
    assert!(
        store
            .metrics()
            .reruns
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    assert_eq!(store.scan("order_payment").unwrap().len(), 80);
    let order = store.get("order_header", "o1").unwrap().unwrap();
    assert_eq!(order.get("paid_amount"), &Value::Int(80));
    store.seal_blocking().unwrap();
    store.verify_log().unwrap();
}

/// The seed system's lost update: a cashier adds a payment while a waiter adds a line to the
/// same order, concurrently, many times. Both always land and the totals are right.
#[test]
fn cashier_and_waiter_never_lose_each_others_writes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    const ORDERS: usize = 40;
    const ROUNDS: usize = 10;
    for o in 0..ORDERS {
        store
            .commit_blocking(txn(insert("order_header", &format!("o{o}"), &[])))
            .unwrap();
    }
    let barrier = Arc::new(std::sync::Barrier::new(2 * ORDERS));
    let mut handles = Vec::new();
    for o in 0..ORDERS {
        for role in ["cashier", "waiter"] {
            let store = store.clone();
            let barrier = barrier.clone();
            handles.push(std::thread::spawn(move || {
                barrier.wait();
                for r in 0..ROUNDS {
                    let op = if role == "cashier" {
                        insert(
                            "order_payment",
                            &format!("p{o}-{r}"),
                            &[
                                ("order_id", text(&format!("o{o}"))),
                                ("amount", Value::Int(100)),
                            ],
                        )
                    } else {
                        insert(
                            "order_line",
                            &format!("l{o}-{r}"),
                            &[
                                ("order_id", text(&format!("o{o}"))),
                                ("quantity", Value::Int(2)),
                                ("unit_price", Value::Int(75)),
                            ],
                        )
                    };
                    store.commit_blocking(Txn::single(role, op)).unwrap();
                }
            }));
        }
    }
    handles.into_iter().for_each(|h| h.join().unwrap());
    for o in 0..ORDERS {
        let order = store
            .get("order_header", &format!("o{o}"))
            .unwrap()
            .unwrap();
        assert_eq!(order.get("paid_amount"), &Value::Int(100 * ROUNDS as i64));
        assert_eq!(order.get("total_amount"), &Value::Int(150 * ROUNDS as i64));
    }
    assert_eq!(store.scan("order_payment").unwrap().len(), ORDERS * ROUNDS);
    assert_eq!(store.scan("order_line").unwrap().len(), ORDERS * ROUNDS);
}

#[test]
fn segments_chain_survive_reopen_and_prune_only_after_ack() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.retention_ms = 0;
    let store = edge::store::Store::open(config.clone()).unwrap();
    store
        .commit_blocking(txn(insert("order_header", "o1", &[])))
        .unwrap();
    for i in 0..1500 {
        store
            .commit_blocking(txn(insert(
                "order_payment",
                &format!("p{i}"),
                &[("order_id", text("o1")), ("amount", Value::Int(1))],
            )))
            .unwrap();
    }
    let status = store.log_status();
    assert!(status.sealed_seq >= Seq(1024), "{status:?}");
    store.seal_blocking().unwrap();
    let sealed = store.verify_log().unwrap();
    assert_eq!(sealed, store.log_status().last_seq);
    let segs = store.segments_after(Seq(0), 100).unwrap();
    assert!(segs.len() >= 2);
    assert_eq!(segs[0].first_seq, Seq(1));
    // Acks beyond what is sealed are refused; the ack is recorded, then pruning removes it.
    assert!(store.set_acked_blocking(Seq(sealed.0 + 1)).is_err());
    store.set_acked_blocking(segs[0].last_seq).unwrap();
    store.close();
    drop(store);

    let store = edge::store::Store::open(config).unwrap();
    assert_eq!(store.log_status().acked_seq, segs[0].last_seq);
    assert_eq!(store.log_status().last_seq, sealed);
    // Housekeeping prunes the acked segment (retention 0) but nothing after it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while store.log_status().pruned_seq < segs[0].last_seq {
        assert!(
            std::time::Instant::now() < deadline,
            "pruning never happened"
        );
        std::thread::yield_now();
    }
    assert_eq!(store.log_status().pruned_seq, segs[0].last_seq);
    store.verify_log().unwrap();
    let page = store.log_page(Seq(0), 10).unwrap();
    assert_eq!(page.entries[0].1.seq, segs[0].last_seq.next());
    assert_eq!(
        store
            .get("order_header", "o1")
            .unwrap()
            .unwrap()
            .get("paid_amount"),
        &Value::Int(1500)
    );
}

#[test]
fn the_commit_feed_is_gap_free_and_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut feed = store.subscribe();
    store
        .commit_blocking(txn(insert("order_header", "o1", &[])))
        .unwrap();
    let handles: Vec<_> = (0..16)
        .map(|t| {
            let store = store.clone();
            std::thread::spawn(move || {
                for i in 0..100 {
                    let op = insert(
                        "order_payment",
                        &format!("p{t}-{i}"),
                        &[("order_id", text("o1")), ("amount", Value::Int(1))],
                    );
                    store.commit_blocking(txn(op)).unwrap();
                }
            })
        })
        .collect();
    handles.into_iter().for_each(|h| h.join().unwrap());
    let last = store.version();
    let mut expected = 1;
    while expected <= last.0 {
        let commit = feed.try_recv().expect("every commit is in the feed");
        assert_eq!(commit.version.0, expected);
        // A payment's commit carries the payment and the order's new paid amount.
        if expected > 1 {
            assert_eq!(commit.changes.len(), 2);
        }
        expected += 1;
    }
    assert_eq!(last.0, 1601);
}

#[test]
fn the_hot_tier_holds_open_orders_not_history() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for o in 0..300 {
        let id = format!("o{o}");
        store
            .commit_blocking(Txn::new(
                "t",
                vec![
                    insert("order_header", &id, &[]),
                    insert(
                        "order_line",
                        &format!("{id}-l"),
                        &[
                            ("order_id", text(&id)),
                            ("quantity", Value::Int(1)),
                            ("unit_price", Value::Int(10)),
                        ],
                    ),
                    insert(
                        "order_payment",
                        &format!("{id}-p"),
                        &[("order_id", text(&id)), ("amount", Value::Int(10))],
                    ),
                ],
            ))
            .unwrap();
        // All but every tenth order is served and closed.
        if o % 10 != 0 {
            let order = store.get("order_header", &id).unwrap().unwrap();
            store
                .commit_blocking(txn(update(
                    "order_header",
                    &id,
                    order.version,
                    &[("status", text("closed"))],
                )))
                .unwrap();
        }
    }
    // 30 open orders, each with a line and a payment; closed history lives in SQLite only.
    assert_eq!(store.hot_rows(), 90);
    let snap = store.snapshot(Some(&["order_header"])).unwrap();
    assert_eq!(snap.tables[0].1.len(), 30);
    assert_eq!(store.scan("order_header").unwrap().len(), 300);
    // A restart rebuilds the same hot tier with targeted queries.
    store.close();
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.hot_rows(), 90);
    assert_eq!(
        store
            .get("order_line", "o1-l")
            .unwrap()
            .unwrap()
            .get("quantity"),
        &Value::Int(1)
    );
}

#[test]
fn schema_changes_migrate_and_bad_ones_are_refused() {
    use edge::store::Store;
    use shared::schema::{Column, ColumnType, Schema};
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .commit_blocking(txn(insert("order_header", "o1", &[])))
        .unwrap();
    store.close();
    drop(store);

    // An added column: the table gains it, old rows read it as null.
    let with = |ty: ColumnType| {
        let pos = shared::pos::schema();
        let mut tables = pos.tables().to_vec();
        tables[0].columns.push(Column {
            name: "loyalty_id".into(),
            ty,
            indexed: true,
            server_owned: false,
        });
        std::sync::Arc::new(Schema::new("pos", tables).unwrap())
    };
    let mut cfg = config(dir.path());
    cfg.schema = with(ColumnType::Text);
    let store = Store::open(cfg.clone()).unwrap();
    let o = store.get("order_header", "o1").unwrap().unwrap();
    assert_eq!(o.get("loyalty_id"), &Value::Null);
    store
        .commit_blocking(txn(update(
            "order_header",
            "o1",
            o.version,
            &[("loyalty_id", text("L7"))],
        )))
        .unwrap();
    store.close();
    drop(store);

    // The same column with another type is a clear error, not a silent reinterpretation.
    cfg.schema = with(ColumnType::Integer);
    let err = Store::open(cfg.clone()).err().expect("refused");
    assert!(err.to_string().contains("loyalty_id"), "{err}");
    // Another branch's database is refused.
    let mut other = config(dir.path());
    other.branch = shared::BranchId::parse("B002").unwrap();
    let err = Store::open(other).err().expect("refused");
    assert!(err.to_string().contains("B001"), "{err}");
}

#[test]
fn a_deleted_id_comes_back_with_its_versions_continued() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    store
        .commit_blocking(txn(insert(
            "table_lock",
            "T4",
            &[("locked_by", text("ana"))],
        )))
        .unwrap();
    store
        .commit_blocking(txn(Op::Delete {
            table: "table_lock".into(),
            id: "T4".into(),
            version: 1,
        }))
        .unwrap();
    // The tombstone is found after a restart too (the writer learns at open which tables
    // have tombstones and looks only in those).
    store.close();
    drop(store);
    let store = open(dir.path());
    let again = store
        .commit_blocking(txn(insert(
            "table_lock",
            "T4",
            &[("locked_by", text("ben"))],
        )))
        .unwrap();
    assert_eq!(again.results[0].row.version, 3);
    // A client still holding version 1 of the old lock cannot touch the new one.
    let e = store
        .commit_blocking(txn(update(
            "table_lock",
            "T4",
            1,
            &[("locked_by", text("ana"))],
        )))
        .unwrap_err();
    assert_eq!(e.error.code(), "version_conflict");
    // A delete rolled back with its batch leaves the row in place, at its version.
    store
        .commit_blocking(txn(insert(
            "table_lock",
            "T5",
            &[("locked_by", text("cy"))],
        )))
        .unwrap();
    let e = store
        .commit_blocking(Txn::new(
            "t",
            vec![
                Op::Delete {
                    table: "table_lock".into(),
                    id: "T5".into(),
                    version: 1,
                },
                insert("table_lock", "T6", &[("locked_by", Value::Int(7))]),
            ],
        ))
        .unwrap_err();
    assert_eq!(e.op_index, Some(1));
    let t5 = store.get("table_lock", "T5").unwrap().expect("T5 kept");
    assert_eq!(t5.version, 1);
    let e = store
        .commit_blocking(txn(insert(
            "table_lock",
            "T5",
            &[("locked_by", text("dee"))],
        )))
        .unwrap_err();
    assert_eq!(e.error.code(), "id_conflict");
}

/// The tables' SQL as SQLite keeps it, by name.
fn table_sql(db: &std::path::Path) -> Vec<(String, String)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name LIKE 't\\_%' ESCAPE '\\' ORDER BY name")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

/// Every index of the user tables: (name, table, SQL).
fn index_sql(db: &std::path::Path) -> Vec<(String, String, String)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name LIKE 't\\_%' ESCAPE '\\' AND sql IS NOT NULL ORDER BY name")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<rusqlite::Result<_>>()
        .unwrap()
}

#[test]
fn new_tables_are_rowid_tables_and_the_older_layout_is_rebuilt_as_them() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("edge.db");
    let store = open(dir.path());
    store
        .commit_blocking(Txn::new(
            "test",
            vec![
                insert(
                    "order_header",
                    "o1",
                    &[("table_id", text("T1")), ("notes", text("napkins"))],
                ),
                insert(
                    "order_line",
                    "l1",
                    &[
                        ("order_id", text("o1")),
                        ("quantity", Value::Int(2)),
                        ("unit_price", Value::Int(700)),
                    ],
                ),
            ],
        ))
        .unwrap();
    store.close();
    drop(store);
    let tables = table_sql(&db);
    assert_eq!(tables.len(), shared::pos::schema().tables().len());
    for (name, sql) in &tables {
        assert!(!sql.contains("WITHOUT ROWID"), "{name}: {sql}");
    }

    // Rebuild every table the way earlier versions created them (`WITHOUT ROWID`), with
    // their rows and indexes, as an edge upgraded in the field has them.
    {
        let mut conn = rusqlite::Connection::open(&db).unwrap();
        let tx = conn.transaction().unwrap();
        for (name, sql) in &tables {
            let indexes: Vec<String> = tx
                .prepare("SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ?1 AND sql IS NOT NULL")
                .unwrap()
                .query_map([name], |r| r.get(0))
                .unwrap()
                .collect::<rusqlite::Result<_>>()
                .unwrap();
            let mut old = sql.replacen(&format!("\"{name}\""), "\"old_layout\"", 1);
            let mut columns = "*".to_owned();
            if name == "t_order_header" {
                // As if `notes` had been added by a later version (ALTER TABLE ADD COLUMN):
                // stored last, not where the schema declares it.
                old = old.replacen(", \"notes\" TEXT", "", 1);
                old = format!("{}, \"notes\" TEXT)", old.trim_end().trim_end_matches(')'));
                columns = "id, version, created_at, updated_at, seq, _clock, shift_id, table_id, status, stage, payment_state, customer_name, total_amount, paid_amount, notes".to_owned();
            }
            tx.execute_batch(&format!(
                "{old} WITHOUT ROWID; INSERT INTO old_layout SELECT {columns} FROM \"{name}\"; DROP TABLE \"{name}\"; ALTER TABLE old_layout RENAME TO \"{name}\";"
            ))
            .unwrap();
            for i in indexes {
                tx.execute_batch(&i).unwrap();
            }
        }
        tx.commit().unwrap();
    }
    assert!(
        table_sql(&db)
            .iter()
            .all(|(_, sql)| sql.ends_with("WITHOUT ROWID"))
    );
    let indexes_before = index_sql(&db);
    assert!(indexes_before.len() >= 10, "{indexes_before:?}");
    let header_columns = |db: &std::path::Path| -> Vec<String> {
        let conn = rusqlite::Connection::open(db).unwrap();
        let mut stmt = conn
            .prepare("SELECT name FROM pragma_table_info('t_order_header') ORDER BY cid")
            .unwrap();
        stmt.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap()
    };
    assert_eq!(
        header_columns(&db).last().map(String::as_str),
        Some("notes")
    );

    // Opening the store rebuilds them as rowid tables, with their rows and indexes; then
    // reads, the rules, CAS and queries work, and survive a reopen.
    let store = open(dir.path());
    let rebuilt = table_sql(&db);
    assert_eq!(rebuilt.len(), tables.len());
    for (name, sql) in &rebuilt {
        assert!(!sql.contains("WITHOUT ROWID"), "{name}: {sql}");
    }
    assert_eq!(index_sql(&db), indexes_before);
    assert_eq!(
        header_columns(&db).last().map(String::as_str),
        Some("notes")
    );
    assert_eq!(store.scan("order_line").unwrap().len(), 1);
    assert_eq!(store.scan("order_status_log").unwrap().len(), 1);
    let o = store.get("order_header", "o1").unwrap().unwrap();
    assert_eq!(o.get("total_amount"), &Value::Int(1400));
    assert_eq!(o.get("notes"), &text("napkins"));
    assert_eq!(o.get("table_id"), &text("T1"));
    assert_eq!(o.seq, None);
    store
        .commit_blocking(txn(insert(
            "order_payment",
            "p1",
            &[("order_id", text("o1")), ("amount", Value::Int(1400))],
        )))
        .unwrap();
    let stale = store
        .commit_blocking(txn(update(
            "order_header",
            "o1",
            o.version,
            &[("status", text("closed"))],
        )))
        .unwrap_err();
    assert_eq!(stale.error.code(), "version_conflict");
    let o = store.get("order_header", "o1").unwrap().unwrap();
    store
        .commit_blocking(txn(update(
            "order_header",
            "o1",
            o.version,
            &[("status", text("closed"))],
        )))
        .unwrap();
    store.close();
    drop(store);
    let store = open(dir.path());
    let o = store.get("order_header", "o1").unwrap().unwrap();
    assert_eq!(o.get("status"), &text("closed"));
    assert_eq!(o.get("paid_amount"), &Value::Int(1400));
    assert_eq!(store.scan("order_status_log").unwrap().len(), 2);
    assert_eq!(store.scan("order_line").unwrap().len(), 1);
}
