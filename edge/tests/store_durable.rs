//! The fsync runs beside the writer (`store::durable`): nothing committed is answered, read
//! or fanned out before the fsync that covers it, whether the writer fsyncs a small group
//! itself or the answering thread fsyncs while the writer moves on.

mod common;

use std::sync::Arc;

use common::*;
use edge::store::{Store, SyncGate};

/// Opens the gate when the test ends, failed assertions included, so that a failure is
/// reported instead of the store's threads waiting at the gate for ever.
struct OpenOnDrop(Arc<SyncGate>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

async fn a_held_fsync_holds_answers_reads_and_the_feed(deliver_inline_max: usize) {
    let dir = tempfile::tempdir().unwrap();
    let gate = SyncGate::closed();
    let mut cfg = config(dir.path());
    cfg.sync_gate = Some(gate.clone());
    cfg.deliver_inline_max = deliver_inline_max;
    let store = Store::open(cfg).unwrap();
    // After the store, so that it is dropped (and the gate opened) before the store.
    let _open_at_the_end = OpenOnDrop(gate.clone());
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
    // Nothing was fanned out before the fsync (the feed goes out before the answers).
    assert!(
        matches!(
            feed.try_recv(),
            Err(tokio::sync::broadcast::error::TryRecvError::Empty)
        ),
        "fanned out before its fsync"
    );
    // Reads of the hot tier, of the log status and of SQLite all wait for it.
    let hot = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.get("order_header", "o1").unwrap())
    };
    let status = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.log_status().version.0)
    };
    let scan = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.scan("order_header").unwrap().len())
    };
    {
        let gate = gate.clone();
        tokio::task::spawn_blocking(move || gate.wait_readers(3))
            .await
            .unwrap();
    }
    gate.open();
    let committed = commit.await.unwrap().unwrap();
    assert_eq!(committed.version.0, 1);
    assert_eq!(
        hot.await
            .unwrap()
            .expect("the committed row")
            .get("table_id"),
        &text("T1")
    );
    assert_eq!(status.await.unwrap(), 1);
    assert_eq!(scan.await.unwrap(), 1);
    assert_eq!(feed.recv().await.unwrap().version.0, 1);

    // With the gate open, commits flow as usual, many at once, and survive a reopen.
    let writers: Vec<_> = (2..=40)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .commit(txn(insert("order_header", &format!("o{i}"), &[])))
                    .await
                    .unwrap()
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    store.close();
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.scan("order_header").unwrap().len(), 40);
    assert_eq!(store.version().0, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_group_fsynced_by_the_writer_is_held_until_durable() {
    a_held_fsync_holds_answers_reads_and_the_feed(4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_fsynced_by_the_answering_thread_is_held_until_durable() {
    a_held_fsync_holds_answers_reads_and_the_feed(0).await;
}

#[test]
fn a_symlinked_database_is_fsynced_where_sqlite_keeps_its_wal() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = dir.path().join("link");
    std::fs::create_dir(&link).unwrap();
    // The database file is a symlink into another directory: SQLite keeps the WAL beside
    // the target, and so must the fsync.
    std::fs::write(real.join("edge.db"), b"").unwrap();
    std::os::unix::fs::symlink(real.join("edge.db"), link.join("edge.db")).unwrap();
    let gate = SyncGate::closed();
    gate.open();
    let mut cfg = config(&link);
    cfg.sync_gate = Some(gate);
    let store = Store::open(cfg).unwrap();
    store
        .commit_blocking(txn(insert("order_header", "o1", &[])))
        .unwrap();
    assert!(real.join("edge.db-wal").exists());
    assert!(
        !link.join("edge.db-wal").exists(),
        "a stray WAL beside the link"
    );
    store.close();
    drop(store);
    let store = open(&link);
    assert_eq!(store.scan("order_header").unwrap().len(), 1);
}

/// Under steady writes the housekeeper's checkpoints never catch up with the writer, so
/// SQLite would never write the WAL from its start again and the housekeeper would have to
/// truncate it under the writer. The writer checkpoints the rest itself between groups and
/// the WAL starts over: no truncation, the file stays near the restart length, and a copy of
/// the files taken as a crash would leave them holds every acknowledged row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steady_writes_start_the_wal_over_and_keep_every_row() {
    use std::sync::atomic::Ordering::Relaxed;
    const TILLS: usize = 16;
    const COMMITS: usize = 200;
    const RESTART_FRAMES: u64 = 256;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.housekeeping_ms = 5;
    cfg.wal_restart_frames = RESTART_FRAMES;
    let store = Store::open(cfg.clone()).unwrap();
    // Back to back: each till commits again as soon as it is answered.
    let tills: Vec<_> = (0..TILLS)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for n in 0..COMMITS {
                    let order = insert(
                        "order_header",
                        &format!("o{t}-{n}"),
                        &[("table_id", text("T1"))],
                    );
                    store.commit(txn(order)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tills {
        t.await.unwrap();
    }
    let m = store.metrics();
    let (restarts, truncates) = (m.wal_restarts.load(Relaxed), m.wal_truncates.load(Relaxed));
    assert!(restarts >= 3, "{restarts} restarts");
    assert_eq!(truncates, 0, "the WAL was truncated under the writer");
    let wal = dir.path().join("edge.db-wal");
    let frame = 4096 + 24;
    let wal_bytes = std::fs::metadata(&wal).unwrap().len();
    assert!(
        wal_bytes <= 32 + 5 * RESTART_FRAMES * frame,
        "the WAL grew to {wal_bytes} bytes"
    );

    // The files as a crash would leave them, every commit acknowledged.
    let crashed = tempfile::tempdir().unwrap();
    std::fs::copy(dir.path().join("edge.db"), crashed.path().join("edge.db")).unwrap();
    std::fs::copy(&wal, crashed.path().join("edge.db-wal")).unwrap();
    let copy = Store::open(config(crashed.path())).unwrap();
    let rows = copy.scan("order_header").unwrap();
    assert_eq!(rows.len(), TILLS * COMMITS);
    let db = rusqlite::Connection::open(crashed.path().join("edge.db")).unwrap();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
}
