//! `outpost-sim catchup`: the catch-up benchmark. An edge writes N log entries while the hub
//! is away (a partition), then the hub comes up and the edge syncs everything over real QUIC
//! with mutual TLS, on loopback, until the hub holds it durably. Both run in this process with
//! their real stores on disk. Two baselines are measured in the same run: raw SQLite batched
//! inserts (1,000 rows per transaction, `synchronous=FULL`) of the same number of rows, and
//! raw quinn throughput of the same number of bytes on one stream.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge::identity::EdgeIdentity;
use edge::store::{Op, Store, StoreConfig, Txn};
use edge::sync::SyncClient;
use hub::identity::HubIdentity;
use hub::store::{HubStore, SqliteHubStore};
use hub::sync::SyncServer;
use shared::{BranchId, Fields, Value};

pub struct CatchupReport {
    pub entries: u64,
    pub bytes: u64,
    pub fill_seconds: f64,
    pub catchup_seconds: f64,
    pub raw_sqlite_rows_per_s: f64,
    pub raw_quinn_bytes_per_s: f64,
    /// The hub's storage alone: verify and persist every segment, no network, no edge.
    pub hub_ingest_entries_per_s: f64,
    /// The edge's side alone: load every segment from its store.
    pub edge_load_entries_per_s: f64,
    /// The hub materialising rows from stored segments, alone.
    pub materialise_entries_per_s: f64,
    /// From the start of the catch-up until a query at the hub sees every entry.
    pub queryable_seconds: f64,
}

impl CatchupReport {
    pub fn entries_per_s(&self) -> f64 {
        self.entries as f64 / self.catchup_seconds
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// Writes about `entries` log entries at the edge: one order and its payments, 1,000 per
/// transaction (each transaction also updates the order's derived totals once).
fn fill(store: &Store, entries: u64) -> Result<(), String> {
    let mut order = Fields::new();
    order.insert("status".into(), Value::Text("open".into()));
    store
        .commit_blocking(Txn::single(
            "bench",
            Op::Insert {
                table: "order_header".into(),
                id: Some("o1".into()),
                fields: order,
            },
        ))
        .map_err(|e| e.error.to_string())?;
    let mut n = 0u64;
    while store.log_status().last_seq.0 < entries {
        let ops = (0..1000)
            .map(|_| {
                n += 1;
                let mut f = Fields::new();
                f.insert("order_id".into(), Value::Text("o1".into()));
                f.insert("method".into(), Value::Text("card".into()));
                f.insert("amount".into(), Value::Int(1));
                f.insert("reference".into(), Value::Text(format!("ref-{n:08}")));
                Op::Insert {
                    table: "order_payment".into(),
                    id: Some(format!("p{n:08}")),
                    fields: f,
                }
            })
            .collect();
        store
            .commit_blocking(Txn::new("bench", ops))
            .map_err(|e| e.error.to_string())?;
    }
    store.seal_blocking().map_err(err)
}

/// Raw SQLite: `rows` rows of `row_bytes` each, 1,000 per transaction, WAL + FULL.
fn raw_sqlite(dir: &Path, rows: u64, row_bytes: usize) -> Result<f64, String> {
    let conn = rusqlite::Connection::open(dir.join("raw.db")).map_err(err)?;
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
         CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB NOT NULL);",
    )
    .map_err(err)?;
    let body = vec![7u8; row_bytes];
    let started = Instant::now();
    let mut id = 0i64;
    while (id as u64) < rows {
        conn.execute_batch("BEGIN").map_err(err)?;
        {
            let mut stmt = conn
                .prepare_cached("INSERT INTO t (id, body) VALUES (?1, ?2)")
                .map_err(err)?;
            for _ in 0..1000 {
                id += 1;
                stmt.execute(rusqlite::params![id, &body]).map_err(err)?;
            }
        }
        conn.execute_batch("COMMIT").map_err(err)?;
    }
    Ok(id as f64 / started.elapsed().as_secs_f64())
}

/// Raw quinn: `bytes` over one stream with the same mutual-TLS configs, in 64 KiB writes.
async fn raw_quinn(hub: &HubIdentity, edge: &EdgeIdentity, bytes: u64) -> Result<f64, String> {
    let server = SyncServer::bind(hub, "127.0.0.1:0".parse().expect("address")).map_err(err)?;
    let addr = server.local_addr().map_err(err)?;
    let receiver = tokio::spawn(async move {
        let conn = server
            .accept()
            .await
            .ok_or("no connection")?
            .await
            .map_err(err)?;
        let mut recv = conn.accept_uni().await.map_err(err)?;
        let mut total = 0u64;
        while let Some(chunk) = recv.read_chunk(1 << 20, true).await.map_err(err)? {
            total += chunk.bytes.len() as u64;
        }
        conn.close(0u32.into(), b"done");
        Ok::<u64, String>(total)
    });
    let mut client =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("address")).map_err(err)?;
    client.set_default_client_config(edge.client_config().map_err(err)?);
    let conn = client
        .connect(addr, shared::wire::HUB_SERVER_NAME)
        .map_err(err)?
        .await
        .map_err(err)?;
    let started = Instant::now();
    let mut send = conn.open_uni().await.map_err(err)?;
    let block = vec![5u8; 64 * 1024];
    let mut sent = 0u64;
    while sent < bytes {
        let n = block.len().min((bytes - sent) as usize);
        send.write_all(&block[..n]).await.map_err(err)?;
        sent += n as u64;
    }
    send.finish().map_err(err)?;
    let received = receiver.await.map_err(err)??;
    let secs = started.elapsed().as_secs_f64();
    if received != bytes {
        return Err(format!("raw quinn received {received} of {bytes} bytes"));
    }
    Ok(bytes as f64 / secs)
}

/// The two ends measured apart: the edge loading its segments, and a fresh hub store
/// verifying and persisting them.
fn parts(
    store: &Store,
    dir: &Path,
    schema: Arc<shared::Schema>,
    branch: &BranchId,
) -> Result<(f64, f64, f64), String> {
    let started = Instant::now();
    let mut segments = Vec::new();
    let mut after = shared::Seq::ZERO;
    loop {
        let segs = store.segments_after(after, 8).map_err(err)?;
        let Some(l) = segs.last() else { break };
        after = l.last_seq;
        segments.extend(segs);
    }
    let entries = after.0 as f64;
    let load = entries / started.elapsed().as_secs_f64();
    let hub = SqliteHubStore::open(&dir.join("ingest.db"), schema.clone()).map_err(err)?;
    hub.enroll(branch, [0; 32]).map_err(err)?;
    let started = Instant::now();
    let mut head = shared::ChainHash::genesis(&shared::OriginId::from(branch));
    for s in &segments {
        s.verify(&head, &schema).map_err(err)?;
        hub.persist(branch, s).map_err(err)?;
        head = s.hash;
    }
    let ingest = entries / started.elapsed().as_secs_f64();
    let started = Instant::now();
    while hub
        .materialise(hub::store::MATERIALISE_BATCH)
        .map_err(err)?
        .more
    {}
    Ok((ingest, load, entries / started.elapsed().as_secs_f64()))
}

/// Runs the benchmark with about `entries` entries in a temporary directory.
pub async fn run(entries: u64) -> Result<CatchupReport, String> {
    let dir = tempfile::tempdir().map_err(err)?;
    let branch = BranchId::parse("B001").map_err(err)?;
    let schema = Arc::new(shared::pos::schema());
    let hub_id = HubIdentity::init_or_load(&dir.path().join("hub")).map_err(err)?;
    let hub_store: Arc<dyn HubStore> = Arc::new(
        SqliteHubStore::open(&dir.path().join("hub/hub.db"), schema.clone()).map_err(err)?,
    );
    let enrolled = hub_id
        .enroll(&branch, &dir.path().join("id"), Duration::from_secs(86_400))
        .map_err(err)?;
    hub_store
        .enroll(&branch, enrolled.fingerprint)
        .map_err(err)?;
    let edge_id = EdgeIdentity::load(&dir.path().join("id")).map_err(err)?;

    // The partition: the edge works alone.
    let store = Store::open(StoreConfig::new(
        dir.path().join("edge.db"),
        branch.clone(),
        schema.clone(),
    ))
    .map_err(err)?;
    let started = Instant::now();
    {
        let store = store.clone();
        tokio::task::spawn_blocking(move || fill(&store, entries))
            .await
            .map_err(err)??;
    }
    let fill_seconds = started.elapsed().as_secs_f64();
    let last = store.log_status().last_seq;
    let bytes: u64 = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || -> Result<u64, String> {
            let mut after = shared::Seq::ZERO;
            let mut total = 0;
            loop {
                let segs = store.segments_after(after, 64).map_err(err)?;
                let Some(l) = segs.last() else { break };
                after = l.last_seq;
                total += segs.iter().map(|s| s.body.len() as u64).sum::<u64>();
            }
            Ok(total)
        })
        .await
        .map_err(err)??
    };

    // The hub comes back: time until it holds everything durably.
    let server = SyncServer::new(hub_store.clone());
    let endpoint =
        SyncServer::bind(&hub_id, "127.0.0.1:0".parse().expect("address")).map_err(err)?;
    let addr = endpoint.local_addr().map_err(err)?;
    let serving = tokio::spawn(server.clone().serve(endpoint.clone()));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let client_id = EdgeIdentity::load(&dir.path().join("id")).map_err(err)?;
    let client =
        tokio::spawn(SyncClient::new(store.clone(), client_id, addr, "bench").run(stopped));
    loop {
        let hs = hub_store.clone();
        let b = branch.clone();
        let durable = tokio::task::spawn_blocking(move || hs.sync_state(&b))
            .await
            .map_err(err)?
            .map_err(err)?
            .durable
            .seq;
        if durable >= last {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            return Err(format!("catch-up stalled at {durable} of {last}"));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let catchup_seconds = started.elapsed().as_secs_f64();
    // A query sees everything acknowledged (it materialises what is still pending first).
    {
        let hs = hub_store.clone();
        let counted = tokio::task::spawn_blocking(move || {
            hs.query(&serde_json::json!({"table": "order_payment", "aggregates": [{"fn": "count", "as": "n"}]}))
        })
        .await
        .map_err(err)?
        .map_err(|e| e.message)?;
        let n = counted["rows"][0]["n"].as_u64().unwrap_or(0);
        // One order update per 1,000 payments, and the order itself: the rest are payments.
        if n * 1002 < last.0 * 1000 {
            return Err(format!("the hub counts {n} payments after the catch-up"));
        }
    }
    let queryable_seconds = started.elapsed().as_secs_f64();
    let _ = stop.send(true);
    let _ = client.await;
    endpoint.close(0u32.into(), b"done");
    serving.abort();

    let row_bytes = (bytes / last.0.max(1)) as usize;
    let raw_sqlite_rows_per_s = {
        let d = dir.path().to_owned();
        let n = last.0;
        tokio::task::spawn_blocking(move || raw_sqlite(&d, n, row_bytes))
            .await
            .map_err(err)??
    };
    let raw_quinn_bytes_per_s = raw_quinn(&hub_id, &edge_id, bytes).await?;
    let (hub_ingest_entries_per_s, edge_load_entries_per_s, materialise_entries_per_s) = {
        let (store, d, schema, branch) = (
            store.clone(),
            dir.path().to_owned(),
            schema.clone(),
            branch.clone(),
        );
        tokio::task::spawn_blocking(move || parts(&store, &d, schema, &branch))
            .await
            .map_err(err)??
    };
    store.close();
    Ok(CatchupReport {
        entries: last.0,
        bytes,
        fill_seconds,
        catchup_seconds,
        raw_sqlite_rows_per_s,
        raw_quinn_bytes_per_s,
        hub_ingest_entries_per_s,
        edge_load_entries_per_s,
        materialise_entries_per_s,
        queryable_seconds,
    })
}
