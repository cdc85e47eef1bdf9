//! The fsync runs beside the writer (`store::durable`): nothing committed is answered, read
//! or fanned out before the fsync that covers it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use edge::store::{Store, SyncGate};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_answered_read_or_fanned_out_before_its_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let gate = SyncGate::closed();
    let mut cfg = config(dir.path());
    cfg.sync_gate = Some(gate.clone());
    let store = Store::open(cfg).unwrap();
    let mut feed = store.subscribe();

    let commit = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .commit(txn(insert(
                    "order_header",
                    "o1",
                    &[("table_id", text("T1"))],
                )))
                .await
        })
    };
    // The COMMIT has written the WAL and the writer has published the row in memory; its
    // fsync is held at the gate.
    {
        let gate = gate.clone();
        tokio::task::spawn_blocking(move || gate.wait_arrivals(1))
            .await
            .unwrap();
    }
    let opened = Arc::new(AtomicBool::new(false));
    let read = {
        let (store, opened) = (store.clone(), opened.clone());
        tokio::task::spawn_blocking(move || {
            let row = store.get("order_header", "o1").unwrap();
            (row, opened.load(Ordering::SeqCst))
        })
    };
    let status = {
        let (store, opened) = (store.clone(), opened.clone());
        tokio::task::spawn_blocking(move || {
            let s = store.log_status();
            (s.version.0, opened.load(Ordering::SeqCst))
        })
    };
    assert!(!commit.is_finished(), "answered before its fsync");
    assert!(
        matches!(
            feed.try_recv(),
            Err(tokio::sync::broadcast::error::TryRecvError::Empty)
        ),
        "fanned out before its fsync"
    );

    opened.store(true, Ordering::SeqCst);
    gate.open();
    let committed = commit.await.unwrap().unwrap();
    assert_eq!(committed.version.0, 1);
    let (row, after_fsync) = read.await.unwrap();
    let row = row.expect("the committed row");
    assert_eq!(row.get("table_id"), &text("T1"));
    assert!(after_fsync, "a read returned the row before its fsync");
    let (version, after_fsync) = status.await.unwrap();
    assert!(version <= 1);
    assert!(
        after_fsync || version == 0,
        "the log status ran ahead of the fsync"
    );
    assert_eq!(feed.recv().await.unwrap().version.0, 1);

    // With the gate open, commits flow as usual and survive a reopen.
    for i in 2..=20 {
        store
            .commit(txn(insert("order_header", &format!("o{i}"), &[])))
            .await
            .unwrap();
    }
    store.close();
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.scan("order_header").unwrap().len(), 20);
    assert_eq!(store.version().0, 20);
}
