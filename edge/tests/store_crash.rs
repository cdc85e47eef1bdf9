//! Crash test: a child process writes to the store under group commit (many concurrent
//! writers) and reports every acknowledged commit on stdout; the parent kills it with SIGKILL
//! at a random moment, reopens the store and checks that every acknowledged write survived,
//! that the derived totals and the origin log agree with the tables, and that the log chain
//! verifies and has no gap. Then the next child continues on the same database, so the state
//! accumulates across the kills.
//!
//! The child is this test binary run again (`child_writer`, active only when
//! `OUTPOST_CRASH_CHILD` names the database directory). Set `OUTPOST_CRASH_SEED` to replay a
//! run's choices (which moments the kills land on still depends on the scheduler).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use common::{config, insert, text, update};
use edge::store::{Applied, LOG_PAGE_MAX, Store, StoreError, Txn};
use shared::{EntryOp, Hlc, Row, Seq, Value};

const CHILD_ENV: &str = "OUTPOST_CRASH_CHILD";
const ROUND_ENV: &str = "OUTPOST_CRASH_ROUND";
const SEED_ENV: &str = "OUTPOST_CRASH_SEED";
const DEFAULT_SEED: u64 = 0x5eed_0b57_c0de;

/// Child processes killed in the test.
const KILLS: u64 = 60;
/// Concurrent writer threads in a child.
const WRITERS: u64 = 24;
/// The parent kills a child after reading up to this many acks.
const ACKS_BEFORE_KILL_MAX: u64 = 300;
/// A child stops on its own after this many acks (only if nobody ever kills it).
const CHILD_ACKS_MAX: usize = 100_000;
/// A child that prints nothing for this long is considered hung (a safety net against a
/// deadlock turning into a test that never ends; not a timing assertion).
const CHILD_SILENCE_MAX: Duration = Duration::from_secs(120);

/// Fixed contents of a batch: two lines and a payment, inserted with their order in one
/// transaction.
const BATCH_LINES: [(i64, i64); 2] = [(1, 500), (2, 250)];
const BATCH_PAID: i64 = 1000;

/// splitmix64: a small deterministic generator.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the modulo bias is irrelevant here).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    std::env::var(SEED_ENV)
        .ok()
        .map(|s| s.parse().expect("OUTPOST_CRASH_SEED is a u64"))
        .unwrap_or(DEFAULT_SEED)
}

// ---------------------------------------------------------------------------------------------
// The child: concurrent writers that print an ack line after each successful commit.
// ---------------------------------------------------------------------------------------------

/// Becomes the writer when started by the crash test; does nothing in a normal test run.
#[test]
fn child_writer() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let round: u64 = std::env::var(ROUND_ENV)
        .expect("the round is set")
        .parse()
        .expect("the round is a number");
    run_child(Path::new(&dir), round, seed());
}

/// Prints one line on stdout and flushes it. When the parent is gone there is nobody to
/// report to: the child exits.
fn emit(line: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// An unexpected failure in the child: the parent sees the exit status and the message.
fn die(what: String) -> ! {
    eprintln!("crash child: {what}");
    std::process::exit(3);
}

struct ChildState {
    store: Store,
    round: u64,
    /// Every order known to exist: those present at start and those created (and acked) since.
    orders: Mutex<Vec<String>>,
    acks: AtomicUsize,
}

fn run_child(dir: &Path, round: u64, seed: u64) {
    let mut config = config(dir);
    // Even rounds: small entries, segments sealed by age (the housekeeping tick, between
    // groups). Odd rounds: large orders (see `padding`), segments sealed by size inside the
    // group commits.
    config.housekeeping_ms = 2;
    config.segment_age_ms = if round.is_multiple_of(2) {
        10
    } else {
        3_600_000
    };
    let store = Store::open(config).unwrap_or_else(|e| die(format!("open: {e}")));
    let orders = store
        .scan("order_header")
        .unwrap_or_else(|e| die(format!("scan: {e}")))
        .into_iter()
        .map(|r| r.id)
        .collect();
    let state = Arc::new(ChildState {
        store,
        round,
        orders: Mutex::new(orders),
        acks: AtomicUsize::new(0),
    });
    emit("READY");
    let writers: Vec<_> = (0..WRITERS)
        .map(|t| {
            let state = state.clone();
            std::thread::Builder::new()
                .name(format!("crash-writer-{t}"))
                .spawn(move || {
                    writer(
                        &state,
                        t,
                        Rng::new(seed ^ (round << 32) ^ (t << 8) ^ 0xc0ffee),
                    )
                })
                .expect("spawn a writer")
        })
        .collect();
    for w in writers {
        if w.join().is_err() {
            die("a writer panicked".into());
        }
    }
    // Only reached when nobody killed the child: CHILD_ACKS_MAX acks.
    std::process::exit(0);
}

fn commit(store: &Store, txn: Txn) -> edge::store::Committed {
    store
        .commit_blocking(txn)
        .unwrap_or_else(|e| die(format!("commit failed: {e:?}")))
}

/// Reports an ack (after the commit returned) and, now and then, the group metrics.
fn ack(state: &ChildState, line: String) {
    emit(&format!("ACK {line}"));
    let n = state.acks.fetch_add(1, Ordering::SeqCst) + 1;
    if n.is_multiple_of(16) {
        let m = state.store.metrics();
        let multi: u64 = m.group_size[1..]
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        emit(&format!(
            "STAT {} {} {multi}",
            m.groups.load(Ordering::Relaxed),
            m.requests.load(Ordering::Relaxed)
        ));
    }
}

/// A customer name of up to 4 KiB in odd rounds: every entry of such an order (its insert and
/// each derived totals update) is large, so that segments fill by bytes.
fn padding(round: u64, rng: &mut Rng) -> Value {
    if round.is_multiple_of(2) {
        Value::Null
    } else {
        text(&"x".repeat(rng.below(4096) as usize))
    }
}

fn writer(state: &ChildState, t: u64, mut rng: Rng) {
    let store = &state.store;
    let round = state.round;
    // Orders this thread created in this round: only it updates their notes, so its note
    // counter orders those updates.
    let mut own: Vec<String> = Vec::new();
    let mut k = 0u64;
    while state.acks.load(Ordering::SeqCst) < CHILD_ACKS_MAX {
        k += 1;
        let tag = format!("{round}.{t}.{k}");
        // An order someone else may be writing to as well: mostly one of the newest.
        let some_order = |rng: &mut Rng| -> Option<String> {
            let orders = state.orders.lock().unwrap();
            if orders.is_empty() {
                return None;
            }
            let n = orders.len() as u64;
            let i = if rng.below(2) == 0 {
                n - 1 - rng.below(n.min(16))
            } else {
                rng.below(n)
            };
            Some(orders[i as usize].clone())
        };
        let pick = rng.below(100);
        let target = if (20..75).contains(&pick) {
            some_order(&mut rng)
        } else {
            None
        };
        match (pick, target) {
            (20..45, Some(order)) => {
                let id = format!("p{tag}");
                let amount = 1 + rng.below(1000) as i64;
                let pay = || {
                    insert(
                        "order_payment",
                        &id,
                        &[
                            ("order_id", text(&order)),
                            ("amount", Value::Int(amount)),
                            ("method", text("cash")),
                        ],
                    )
                };
                let c = commit(store, Txn::single("cashier", pay()));
                ack(state, format!("P {id} {order} {amount} {}", c.version));
                if rng.below(8) == 0 {
                    // A retried request (the till did not see the answer): applied once.
                    let again = commit(store, Txn::single("cashier", pay()));
                    if again.results[0].applied != Applied::AlreadyPresent {
                        die(format!(
                            "retried payment {id}: {:?}",
                            again.results[0].applied
                        ));
                    }
                }
            }
            (45..75, Some(order)) => {
                let id = format!("l{tag}");
                let qty = 1 + rng.below(5) as i64;
                let price = 100 + rng.below(1900) as i64;
                let c = commit(
                    store,
                    Txn::single(
                        "waiter",
                        insert(
                            "order_line",
                            &id,
                            &[
                                ("order_id", text(&order)),
                                ("quantity", Value::Int(qty)),
                                ("unit_price", Value::Int(price)),
                            ],
                        ),
                    ),
                );
                ack(state, format!("L {id} {order} {qty} {price} {}", c.version));
            }
            (75..90, _) if !own.is_empty() => {
                let order = own[rng.below(own.len() as u64) as usize].clone();
                let note = format!("n{tag}");
                let mut version = match store.get("order_header", &order) {
                    Ok(Some(r)) => r.version,
                    other => die(format!("own order {order}: {other:?}")),
                };
                // Compare-and-set: a conflict (a payment or line changed the order's totals)
                // is retried with the current version.
                for _ in 0..1000 {
                    let op = update("order_header", &order, version, &[("notes", text(&note))]);
                    match store.commit_blocking(Txn::single("waiter", op)) {
                        Ok(c) => {
                            let row_version = c.results[0].row.version;
                            ack(
                                state,
                                format!("N {order} {round} {t} {k} {row_version} {}", c.version),
                            );
                            break;
                        }
                        Err(e) => match e.error {
                            StoreError::VersionConflict { current, .. } => {
                                version = current.version
                            }
                            other => die(format!("note on {order}: {other:?}")),
                        },
                    }
                }
            }
            (90.., _) => {
                let id = format!("b{tag}");
                let mut ops = vec![insert(
                    "order_header",
                    &id,
                    &[
                        ("table_id", text(&format!("T{t}"))),
                        ("customer_name", padding(round, &mut rng)),
                    ],
                )];
                for (i, (qty, price)) in BATCH_LINES.iter().enumerate() {
                    ops.push(insert(
                        "order_line",
                        &format!("{id}-l{i}"),
                        &[
                            ("order_id", text(&id)),
                            ("quantity", Value::Int(*qty)),
                            ("unit_price", Value::Int(*price)),
                        ],
                    ));
                }
                ops.push(insert(
                    "order_payment",
                    &format!("{id}-p"),
                    &[("order_id", text(&id)), ("amount", Value::Int(BATCH_PAID))],
                ));
                let c = commit(store, Txn::new("cashier", ops));
                state.orders.lock().unwrap().push(id.clone());
                ack(state, format!("B {id} {}", c.version));
            }
            _ => {
                let id = format!("o{tag}");
                let c = commit(
                    store,
                    Txn::single(
                        "waiter",
                        insert(
                            "order_header",
                            &id,
                            &[
                                ("table_id", text(&format!("T{t}"))),
                                ("customer_name", padding(round, &mut rng)),
                            ],
                        ),
                    ),
                );
                state.orders.lock().unwrap().push(id.clone());
                own.push(id.clone());
                ack(state, format!("O {id} {}", c.version));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The parent: kill, reopen, check.
// ---------------------------------------------------------------------------------------------

/// Everything the parent saw acknowledged, accumulated over all rounds.
#[derive(Default)]
struct Expected {
    orders: BTreeSet<String>,
    /// payment id -> (order, amount)
    payments: BTreeMap<String, (String, i64)>,
    /// line id -> (order, quantity, unit price)
    lines: BTreeMap<String, (String, i64, i64)>,
    /// order -> (round, thread, counter, row version) of the newest acked note
    notes: BTreeMap<String, (u64, u64, u64, u64)>,
    batches: BTreeSet<String>,
    /// The highest commit version acked.
    version: u64,
    acks: usize,
}

impl Expected {
    /// Records one ack line (the part after "ACK ").
    fn record(&mut self, line: &str) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> u64 {
            f.get(i)
                .and_then(|s| s.parse().ok())
                .unwrap_or_else(|| panic!("bad ack line {line:?}"))
        };
        let version = match (f.first().copied(), f.len()) {
            (Some("O"), 3) => {
                self.orders.insert(f[1].to_owned());
                num(2)
            }
            (Some("B"), 3) => {
                self.batches.insert(f[1].to_owned());
                num(2)
            }
            (Some("P"), 5) => {
                let prev = self
                    .payments
                    .insert(f[1].to_owned(), (f[2].to_owned(), num(3) as i64));
                assert!(prev.is_none(), "payment {} acked twice", f[1]);
                num(4)
            }
            (Some("L"), 6) => {
                let prev = self.lines.insert(
                    f[1].to_owned(),
                    (f[2].to_owned(), num(3) as i64, num(4) as i64),
                );
                assert!(prev.is_none(), "line {} acked twice", f[1]);
                num(5)
            }
            (Some("N"), 7) => {
                let note = (num(2), num(3), num(4), num(5));
                let slot = self.notes.entry(f[1].to_owned()).or_insert(note);
                if (note.0, note.1) != (slot.0, slot.1) {
                    panic!("order {} noted by two writers: {line:?}", f[1]);
                }
                if note.2 > slot.2 {
                    *slot = note;
                }
                num(6)
            }
            _ => panic!("bad ack line {line:?}"),
        };
        self.version = self.version.max(version);
        self.acks += 1;
    }
}

/// The origin log replayed so far (incrementally, round after round).
#[derive(Default)]
struct Replay {
    last_seq: u64,
    last_hlc: Hlc,
    last_version: u64,
    /// table -> id -> row, as the log says it is.
    rows: BTreeMap<String, BTreeMap<String, Row>>,
}

struct RoundOutcome {
    acks_before_kill: u64,
    killed: bool,
    groups: u64,
    requests: u64,
    multi_groups: u64,
}

/// Runs one child, kills it after `target` acks (counting only lines already read) and reads
/// the rest of what it printed. Every ack line read, before or after the kill, was printed
/// after its commit returned, so all of them count.
fn run_and_kill(
    dir: &Path,
    round: u64,
    seed: u64,
    target: u64,
    exp: &mut Expected,
) -> RoundOutcome {
    let exe = std::env::current_exe().expect("the test binary's path");
    let mut child = Command::new(exe)
        .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .env(ROUND_ENV, round.to_string())
        .env(SEED_ENV, seed.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the child writer");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let (tx, rx) = mpsc::channel::<String>();
    let stdout_reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                // A last line without its newline was cut by the kill: not an ack.
                Ok(0) | Err(_) => break,
                Ok(_) if !line.ends_with('\n') => break,
                Ok(_) => {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let mut out = RoundOutcome {
        acks_before_kill: 0,
        killed: false,
        groups: 0,
        requests: 0,
        multi_groups: 0,
    };
    let mut lines = 0u64;
    let mut acks = 0u64;
    loop {
        if !out.killed && lines > 0 && acks >= target {
            child.kill().expect("SIGKILL the child");
            out.killed = true;
            out.acks_before_kill = acks;
        }
        let line = match rx.recv_timeout(CHILD_SILENCE_MAX) {
            Ok(line) => line,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "round {round}: the child printed nothing for {CHILD_SILENCE_MAX:?} \
                     (hung?); stderr:\n{}",
                    stderr_reader.join().unwrap_or_default()
                );
            }
        };
        lines += 1;
        // The harness's own lines ("running 1 test", "test child_writer ... ") may share a
        // line with the first ack: find the marker anywhere in the line.
        if let Some(i) = line.find("ACK ") {
            exp.record(line[i + 4..].trim_end());
            acks += 1;
        } else if let Some(i) = line.find("STAT ") {
            let f: Vec<u64> = line[i + 5..]
                .split_whitespace()
                .map(|s| s.parse().expect("a STAT number"))
                .collect();
            out.groups = f[0];
            out.requests = f[1];
            out.multi_groups = f[2];
        }
    }
    stdout_reader.join().expect("the stdout reader");
    let status = child.wait().expect("wait for the child");
    let stderr = stderr_reader.join().unwrap_or_default();
    if out.killed {
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "round {round}: the child ended by itself ({status}) before the kill; stderr:\n{stderr}"
        );
    } else {
        assert!(
            status.success(),
            "round {round}: the child failed ({status}) after {acks} acks; stderr:\n{stderr}"
        );
    }
    out
}

/// Reopens the store after a kill and checks everything; the store is closed on return.
fn check_after_crash(dir: &Path, round: u64, exp: &Expected, replay: &mut Replay) {
    let store = Store::open(config(dir))
        .unwrap_or_else(|e| panic!("round {round}: the store does not reopen after the kill: {e}"));
    let ctx = |what: &str| format!("round {round}: {what}");

    // The chain as the crash left it (sealed segments, contiguous open tail), then sealed.
    store
        .verify_log()
        .unwrap_or_else(|e| panic!("{}: {e}", ctx("verify_log before sealing")));
    store
        .seal_blocking()
        .unwrap_or_else(|e| panic!("{}: {e}", ctx("seal")));
    let sealed = store
        .verify_log()
        .unwrap_or_else(|e| panic!("{}: {e}", ctx("verify_log after sealing")));
    let status = store.log_status();
    assert_eq!(sealed, status.last_seq, "{}", ctx("everything is sealed"));
    assert_eq!(status.sealed_seq, status.last_seq, "{}", ctx("sealed seq"));
    assert_eq!(
        status.pruned_seq,
        Seq(0),
        "{}",
        ctx("nothing is acked, so nothing is pruned")
    );
    assert!(
        status.version.0 >= exp.version,
        "{}: version {} < acked commit version {}",
        ctx("version"),
        status.version,
        exp.version
    );
    assert!(
        status.last_seq.0 >= replay.last_seq,
        "{}: the log shrank from {} to {}",
        ctx("log"),
        replay.last_seq,
        status.last_seq
    );

    // The log after what earlier rounds saw: gap-free, stamps increasing, versions
    // non-decreasing, every entry a valid step for its row.
    loop {
        let page = store
            .log_page(Seq(replay.last_seq), LOG_PAGE_MAX)
            .unwrap_or_else(|e| panic!("{}: {e}", ctx("log_page")));
        for (version, e) in &page.entries {
            assert_eq!(e.seq.0, replay.last_seq + 1, "{}", ctx("log seq gap"));
            assert_eq!(&e.origin, store.origin(), "{}", ctx("entry origin"));
            assert!(
                e.hlc > replay.last_hlc,
                "{}: hlc at seq {} is {:?}, not after {:?}",
                ctx("hlc"),
                e.seq,
                e.hlc,
                replay.last_hlc
            );
            assert!(
                version.0 >= replay.last_version && version.0 <= status.version.0,
                "{}: seq {} has version {version}, previous {}, store at {}",
                ctx("entry version"),
                e.seq,
                replay.last_version,
                status.version
            );
            assert_eq!(e.row_id, e.row.id, "{}", ctx("entry row id"));
            let rows = replay.rows.entry(e.table.clone()).or_default();
            match e.op {
                EntryOp::Insert => {
                    assert_eq!(e.row.version, 1, "{}", ctx("inserted row version"));
                    let prev = rows.insert(e.row_id.clone(), e.row.clone());
                    assert!(
                        prev.is_none(),
                        "{}: seq {} inserts {}/{} twice",
                        ctx("log"),
                        e.seq,
                        e.table,
                        e.row_id
                    );
                }
                EntryOp::Update => {
                    let prev = rows.insert(e.row_id.clone(), e.row.clone());
                    let prev = prev.unwrap_or_else(|| {
                        panic!(
                            "{}: seq {} updates {}/{} that was never inserted",
                            ctx("log"),
                            e.seq,
                            e.table,
                            e.row_id
                        )
                    });
                    assert_eq!(
                        prev.version + 1,
                        e.row.version,
                        "{}",
                        ctx("updated version")
                    );
                }
                EntryOp::Delete => {
                    rows.remove(&e.row_id);
                }
            }
            replay.last_seq = e.seq.0;
            replay.last_hlc = e.hlc;
            replay.last_version = version.0;
        }
        if !page.has_more {
            break;
        }
    }
    assert_eq!(
        replay.last_seq,
        status.last_seq.0,
        "{}",
        ctx("log ends at last_seq")
    );
    if replay.last_seq > 0 {
        assert_eq!(
            replay.last_version,
            status.version.0,
            "{}",
            ctx("the last entry's version is the store's version")
        );
    }

    // The tables are exactly what the log says (transactional outbox).
    let mut tables: BTreeMap<String, BTreeMap<String, Row>> = BTreeMap::new();
    for t in store.schema().tables() {
        let rows: BTreeMap<String, Row> = store
            .scan(&t.name)
            .unwrap_or_else(|e| panic!("{}: {e}", ctx("scan")))
            .into_iter()
            .map(|r| (r.id.clone(), r))
            .collect();
        let logged = replay.rows.get(&t.name).cloned().unwrap_or_default();
        if rows != logged {
            let ids: BTreeSet<&String> = rows.keys().chain(logged.keys()).collect();
            let id = ids
                .into_iter()
                .find(|id| rows.get(*id) != logged.get(*id))
                .expect("a differing id");
            panic!(
                "{}: table {} differs from its log at {id}:\n table: {:?}\n log:   {:?}",
                ctx("outbox"),
                t.name,
                rows.get(id),
                logged.get(id)
            );
        }
        tables.insert(t.name.clone(), rows);
    }
    let orders = &tables["order_header"];
    let lines = &tables["order_line"];
    let payments = &tables["order_payment"];

    // Derived totals, references, status logs.
    let mut paid: BTreeMap<&str, i64> = BTreeMap::new();
    let mut total: BTreeMap<&str, i64> = BTreeMap::new();
    for p in payments.values() {
        let o = p.get("order_id").as_str().expect("payment order id");
        assert!(
            orders.contains_key(o),
            "{}: payment {} of no order",
            ctx("refs"),
            p.id
        );
        *paid.entry(o).or_default() += p.get("amount").as_int().expect("amount");
    }
    for l in lines.values() {
        let o = l.get("order_id").as_str().expect("line order id");
        assert!(
            orders.contains_key(o),
            "{}: line {} of no order",
            ctx("refs"),
            l.id
        );
        *total.entry(o).or_default() += l.get("quantity").as_int().expect("quantity")
            * l.get("unit_price").as_int().expect("unit price");
    }
    for o in orders.values() {
        let id = o.id.as_str();
        assert_eq!(
            o.get("paid_amount"),
            &Value::Int(paid.get(id).copied().unwrap_or(0)),
            "{}: order {id} paid_amount is not the sum of its payments",
            ctx("totals")
        );
        assert_eq!(
            o.get("total_amount"),
            &Value::Int(total.get(id).copied().unwrap_or(0)),
            "{}: order {id} total_amount is not the sum of its lines",
            ctx("totals")
        );
        assert_eq!(o.get("status"), &text("open"), "{}", ctx("status"));
    }
    assert_eq!(
        tables["order_status_log"].len(),
        orders.len(),
        "{}",
        ctx("one status log row per order")
    );
    assert_eq!(
        tables["order_line_status_log"].len(),
        lines.len(),
        "{}",
        ctx("one status log row per line")
    );

    // Batches are all or nothing, acked or not.
    for id in orders.keys().filter(|id| id.starts_with('b')) {
        for (i, (qty, price)) in BATCH_LINES.iter().enumerate() {
            let l = lines
                .get(&format!("{id}-l{i}"))
                .unwrap_or_else(|| panic!("{}: batch {id} lacks line {i}", ctx("batch")));
            assert_eq!(l.get("quantity"), &Value::Int(*qty));
            assert_eq!(l.get("unit_price"), &Value::Int(*price));
        }
        let p = payments
            .get(&format!("{id}-p"))
            .unwrap_or_else(|| panic!("{}: batch {id} lacks its payment", ctx("batch")));
        assert_eq!(p.get("amount"), &Value::Int(BATCH_PAID));
    }

    // Every acknowledged write is there.
    for id in exp.orders.iter().chain(&exp.batches) {
        assert!(
            orders.contains_key(id),
            "{}: acked order {id} is lost",
            ctx("durability")
        );
        let hot = store
            .get("order_header", id)
            .unwrap_or_else(|e| panic!("{}: {e}", ctx("get")));
        assert_eq!(hot.as_deref(), orders.get(id), "{}: get({id})", ctx("get"));
    }
    for (id, (order, amount)) in &exp.payments {
        let p = payments
            .get(id)
            .unwrap_or_else(|| panic!("{}: acked payment {id} is lost", ctx("durability")));
        assert_eq!(
            p.get("order_id"),
            &text(order),
            "{}: payment {id}",
            ctx("durability")
        );
        assert_eq!(
            p.get("amount"),
            &Value::Int(*amount),
            "{}: payment {id}",
            ctx("durability")
        );
    }
    for (id, (order, qty, price)) in &exp.lines {
        let l = lines
            .get(id)
            .unwrap_or_else(|| panic!("{}: acked line {id} is lost", ctx("durability")));
        assert_eq!(
            l.get("order_id"),
            &text(order),
            "{}: line {id}",
            ctx("durability")
        );
        assert_eq!(
            l.get("quantity"),
            &Value::Int(*qty),
            "{}: line {id}",
            ctx("durability")
        );
        assert_eq!(
            l.get("unit_price"),
            &Value::Int(*price),
            "{}: line {id}",
            ctx("durability")
        );
    }
    for (id, &(r, t, k, row_version)) in &exp.notes {
        let o = orders
            .get(id)
            .unwrap_or_else(|| panic!("{}: noted order {id} is lost", ctx("durability")));
        // Only writer t of round r wrote this order's notes, with an increasing counter: the
        // stored note is the acked one or a later one of the same writer.
        let note = o.get("notes").as_str().unwrap_or_default().to_owned();
        let parsed: Option<Vec<u64>> = note
            .strip_prefix('n')
            .map(|s| s.split('.').map(|x| x.parse().ok()).collect::<Option<_>>())
            .unwrap_or_default();
        match parsed.as_deref() {
            Some(&[nr, nt, nk]) if (nr, nt) == (r, t) && nk >= k => {}
            _ => panic!(
                "{}: order {id} has note {note:?}, but n{r}.{t}.{k} was acked",
                ctx("durability")
            ),
        }
        assert!(
            o.version >= row_version,
            "{}: order {id} at version {} < acked {row_version}",
            ctx("durability"),
            o.version
        );
    }
    store.close();
}

#[test]
fn acked_writes_survive_sigkill() {
    let seed = seed();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut rng = Rng::new(seed);
    let mut exp = Expected::default();
    let mut replay = Replay::default();
    let (mut kills, mut multi_groups, mut groups, mut requests) = (0u64, 0u64, 0u64, 0u64);
    let mut acks_before_kill = 0u64;
    for round in 0..KILLS {
        // Mostly somewhere in the write stream; sometimes right at the start (while the
        // child opens and recovers the store).
        let target = if rng.below(8) == 0 {
            rng.below(3)
        } else {
            rng.below(ACKS_BEFORE_KILL_MAX + 1)
        };
        let out = run_and_kill(dir.path(), round, seed, target, &mut exp);
        kills += u64::from(out.killed);
        acks_before_kill += out.acks_before_kill;
        multi_groups += out.multi_groups;
        groups += out.groups;
        requests += out.requests;
        check_after_crash(dir.path(), round, &exp, &mut replay);
    }
    eprintln!(
        "crash test (seed {seed}): {kills} kills, {} acks verified ({acks_before_kill} read \
         before the kills), {} log entries, {requests} requests in {groups} reported groups, \
         {multi_groups} of them with more than one request",
        exp.acks, replay.last_seq
    );
    assert_eq!(kills, KILLS, "every child was killed");
    assert!(
        multi_groups > 0,
        "no group commit ever held more than one request"
    );
    assert!(!exp.payments.is_empty() && !exp.lines.is_empty() && !exp.notes.is_empty());
}
