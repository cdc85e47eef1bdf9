//! The deterministic simulator: N edges and one hub built from the sans-IO sessions in
//! `shared::sync`, over a seeded network that delays, drops, duplicates and reorders frames
//! and partitions links (one way too), with crashes that lose whatever was not durable and
//! skewed clocks. Frames cross the network encoded (`shared::wire`), so the codec is in the
//! loop. A run has a safety phase with faults and workload, then a liveness phase where the
//! network heals and everything must converge. The same seed gives the same trace digest.
//!
//! Both directions run: each edge's branch log goes up, and the hub writes head-office rows
//! into each branch's feed, which goes down.
//!
//! Checkers, apart from the code under test: every position a sender recorded as acked is
//! durable at the receiver; the receiver's copy of each log is a prefix of the sender's
//! durable log (exactly once, in order) and its chain verifies; nothing is sent again that
//! the receiver held when the connection started; at the end the copies are equal.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;

use std::collections::BTreeMap;

use shared::log::{ChainHash, EntryOp, LogEntry, Segment, verify_chain};
use shared::merge::SharedRow;
use shared::sync::{EdgeSession, HubSession, SyncConfig, SyncIo};
use shared::wire::{Frame, Position};
use shared::{BranchId, Hlc, HlcClock, OriginId, Row, Schema, Seq, Timestamp, Value};

/// SplitMix64: small, fast, and the same on every machine.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}

/// Fault probabilities per step (per link for network faults).
#[derive(Debug, Clone)]
pub struct Faults {
    pub drop: f64,
    pub duplicate: f64,
    pub reorder: f64,
    pub partition: f64,
    pub heal: f64,
    pub crash_edge: f64,
    pub crash_hub: f64,
    /// A segment's bytes changed on the way up (the integrity test hook).
    pub corrupt: f64,
    /// Swizzle-clogging: cut every link one by one, then heal them in another order.
    pub swizzle: f64,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            drop: 0.02,
            duplicate: 0.02,
            reorder: 0.03,
            partition: 0.002,
            heal: 0.02,
            crash_edge: 0.001,
            crash_hub: 0.0005,
            corrupt: 0.01,
            swizzle: 0.0005,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    /// A deliberate protocol bug to run with (`mutations` feature only).
    pub mutation: Option<shared::sync::Mutation>,
    pub edges: usize,
    pub safety_steps: u64,
    pub liveness_steps: u64,
    pub faults: Faults,
}

impl SimConfig {
    pub fn new(seed: u64) -> SimConfig {
        let mut rng = Rng::new(seed);
        SimConfig {
            seed,
            mutation: None,
            edges: 1 + rng.below(6) as usize,
            safety_steps: 3_000,
            liveness_steps: 20_000,
            faults: Faults::default(),
        }
    }
}

/// How many faults of each kind fired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultCounts {
    pub dropped: u64,
    pub duplicated: u64,
    pub reordered: u64,
    pub partitions: u64,
    pub one_way_partitions: u64,
    pub edge_crashes: u64,
    pub hub_crashes: u64,
    pub torn_tails: u64,
    pub corrupted: u64,
    pub swizzles: u64,
}

impl FaultCounts {
    pub fn add(&mut self, o: &FaultCounts) {
        self.dropped += o.dropped;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.partitions += o.partitions;
        self.one_way_partitions += o.one_way_partitions;
        self.edge_crashes += o.edge_crashes;
        self.hub_crashes += o.hub_crashes;
        self.torn_tails += o.torn_tails;
        self.corrupted += o.corrupted;
        self.swizzles += o.swizzles;
    }

    /// The kinds that never fired.
    pub fn missing(&self) -> Vec<&'static str> {
        let kinds = [
            ("drop", self.dropped),
            ("duplicate", self.duplicated),
            ("reorder", self.reordered),
            ("partition", self.partitions),
            ("one-way partition", self.one_way_partitions),
            ("edge crash", self.edge_crashes),
            ("hub crash", self.hub_crashes),
            ("torn tail", self.torn_tails),
            ("corrupted segment", self.corrupted),
            ("swizzle-clog", self.swizzles),
        ];
        kinds
            .into_iter()
            .filter(|(_, n)| *n == 0)
            .map(|(k, _)| k)
            .collect()
    }
}

/// The result of one seed.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub seed: u64,
    pub edges: usize,
    pub digest: String,
    pub steps: u64,
    pub entries: u64,
    pub faults: FaultCounts,
    pub failure: Option<String>,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} edges {} steps {} entries {} digest {} faults {:?}: {}",
            self.seed,
            self.edges,
            self.steps,
            self.entries,
            &self.digest[..16],
            self.faults,
            self.failure.as_deref().unwrap_or("ok")
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dir {
    Up,
    Down,
}

/// A frame on the wire, tagged with its connection so a stale one is recognised.
#[derive(Debug)]
struct Packet {
    deliver_at: u64,
    edge: usize,
    dir: Dir,
    conn: u64,
    bytes: Vec<u8>,
}

struct EdgeNode {
    origin: OriginId,
    session: EdgeSession,
    /// Segments that survived an fsync.
    durable: Vec<Segment>,
    /// Sealed but not yet fsynced: lost (or torn) by a crash.
    volatile: Vec<Segment>,
    /// The ack position the edge has persisted (its retention watermark).
    recorded_ack: Position,
    next_seq: u64,
    head_hash: ChainHash,
    conn: Option<u64>,
    /// The hub's durable position when this connection started: nothing at or before it may
    /// be sent again on the connection (resume, not restart).
    resume_floor: Seq,
    /// The hub's feed as applied here durably, and the segments being applied
    /// (`(done_at, segment)`; lost by a crash).
    feed: Vec<Segment>,
    applying: VecDeque<(u64, Segment)>,
    feed_checked: usize,
    feed_checked_head: ChainHash,
    /// The edge's feed position when this connection started (resume, not restart, down).
    feed_floor: Seq,
    /// Shared rows as durable here (fsynced local writes and applied feed writes), and as
    /// terminals see them (with writes still in volatile segments).
    shared: BTreeMap<String, SharedRow>,
    shared_visible: BTreeMap<String, SharedRow>,
    /// Local shared writes in volatile segments: lost by a crash.
    shared_pending: Vec<(String, Put)>,
    hlc: HlcClock,
    reconnect_at: u64,
    clock_skew: u64,
    link_up: bool,
    link_down: bool,
}

struct HubOrigin {
    durable: Vec<Segment>,
    /// How many of `durable` the checker has verified, and the chain head after them.
    checked: usize,
    checked_head: ChainHash,
    session: Option<HubSession>,
    /// Verified segments whose persistence has not completed: `(done_at, segment, entries)`.
    persisting: VecDeque<(u64, Segment, Vec<LogEntry>)>,
    /// The branch's feed: head-office rows for it, written by the hub (durable at once).
    feed: Vec<Segment>,
    feed_next_seq: u64,
    /// How far the branch applied its feed, as the hub recorded it.
    feed_acked: Position,
}

/// A write of a shared row: its clock, HLC and values.
type Put = (crdts::VClock<OriginId>, Hlc, Vec<Value>);

/// Ids of the shared rows the workload edits (few, so that edits collide).
const SHARED_ROWS: u64 = 3;

/// A swizzle in progress: links still to cut, then links to heal, one every few steps.
struct Swizzle {
    cut: Vec<usize>,
    heal: Vec<usize>,
    next_at: u64,
}

struct Sim {
    swizzle: Option<Swizzle>,
    /// The hub's shared rows.
    hub_shared: BTreeMap<String, SharedRow>,
    hub_hlc: HlcClock,
    config: SimConfig,
    rng: Rng,
    schema: Arc<Schema>,
    edges: Vec<EdgeNode>,
    hub: Vec<HubOrigin>,
    net: Vec<Packet>,
    now: u64,
    next_conn: u64,
    trace: blake3::Hasher,
    faults: FaultCounts,
    entries: u64,
    sync: SyncConfig,
    /// A violation seen while moving frames, reported by the next check.
    violation: Option<String>,
}

fn head_of(origin: &OriginId, log: &[Segment]) -> Position {
    log.last().map_or(Position::genesis(origin), |s| Position {
        origin: origin.clone(),
        seq: s.last_seq,
        hash: s.hash,
    })
}

/// Applies the run's deliberate bug, if any, to a new session.
#[cfg(feature = "mutations")]
fn mutate_edge(s: EdgeSession, m: Option<shared::sync::Mutation>) -> EdgeSession {
    match m {
        Some(m) => s.with_mutation(m),
        None => s,
    }
}
#[cfg(not(feature = "mutations"))]
fn mutate_edge(s: EdgeSession, _: Option<shared::sync::Mutation>) -> EdgeSession {
    s
}
#[cfg(feature = "mutations")]
fn mutate_hub(s: HubSession, m: Option<shared::sync::Mutation>) -> HubSession {
    match m {
        Some(m) => s.with_mutation(m),
        None => s,
    }
}
#[cfg(not(feature = "mutations"))]
fn mutate_hub(s: HubSession, _: Option<shared::sync::Mutation>) -> HubSession {
    s
}

impl Sim {
    fn new(config: SimConfig) -> Sim {
        let mut rng = Rng::new(config.seed);
        let schema: Arc<Schema> = Arc::new(shared::pos::schema());
        let sync = SyncConfig {
            window_segments: 4,
            ack_timeout_ms: 200,
        };
        let edges = (0..config.edges)
            .map(|i| {
                let origin = OriginId::parse(&format!("B{i:03}")).expect("valid id");
                let genesis = Position::genesis(&origin);
                let hub = Position::genesis(&OriginId::hub());
                EdgeNode {
                    session: EdgeSession::new(
                        sync.clone(),
                        "0.1.0",
                        schema.clone(),
                        genesis.clone(),
                        genesis.clone(),
                        hub.clone(),
                    ),
                    feed: Vec::new(),
                    applying: VecDeque::new(),
                    feed_checked: 0,
                    feed_checked_head: hub.hash,
                    feed_floor: Seq::ZERO,
                    shared: BTreeMap::new(),
                    shared_visible: BTreeMap::new(),
                    shared_pending: Vec::new(),
                    hlc: HlcClock::starting_after(Hlc::default()),
                    head_hash: genesis.hash,
                    origin,
                    durable: Vec::new(),
                    volatile: Vec::new(),
                    recorded_ack: genesis,
                    next_seq: 1,
                    conn: None,
                    resume_floor: Seq::ZERO,
                    reconnect_at: 0,
                    clock_skew: rng.below(5_000),
                    link_up: true,
                    link_down: true,
                }
            })
            .collect();
        let hub = (0..config.edges)
            .map(|i| HubOrigin {
                durable: Vec::new(),
                checked: 0,
                checked_head: ChainHash::genesis(
                    &OriginId::parse(&format!("B{i:03}")).expect("valid id"),
                ),
                session: None,
                persisting: VecDeque::new(),
                feed: Vec::new(),
                feed_next_seq: 1,
                feed_acked: Position::genesis(&OriginId::hub()),
            })
            .collect();
        Sim {
            swizzle: None,
            hub_shared: BTreeMap::new(),
            hub_hlc: HlcClock::starting_after(Hlc::default()),
            config,
            rng,
            schema,
            edges,
            hub,
            net: Vec::new(),
            now: 0,
            next_conn: 1,
            trace: blake3::Hasher::new(),
            faults: FaultCounts::default(),
            entries: 0,
            sync,
            violation: None,
        }
    }

    fn trace(&mut self, event: &str) {
        self.trace.update(&self.now.to_le_bytes());
        self.trace.update(event.as_bytes());
    }

    /// `n` encoded entries of `origin` from `first`: payments at an edge, menu prices in a
    /// branch's feed.
    fn entries(
        &self,
        origin: &OriginId,
        first: u64,
        n: u64,
        scope: Option<BranchId>,
    ) -> Vec<Vec<u8>> {
        let hub = origin.as_str() == OriginId::HUB;
        // A till's activity: an order, its lines, status changes and payments; head office
        // edits menu rows.
        let pick = |seq: u64| -> &'static str {
            match (hub, seq % 4) {
                (true, _) => "menu_item",
                (false, 0) => "order_header",
                (false, 1) => "order_line",
                (false, 2) => "order_status_log",
                (false, _) => "order_payment",
            }
        };
        (0..n)
            .map(|k| {
                let seq = first + k;
                let table = pick(seq);
                let ti = self.schema.table_index(table).expect("pos table");
                let t = &self.schema.tables()[ti];
                let columns = self.schema.columns(ti).clone();
                let mut values = vec![Value::Null; columns.len()];
                let mut set = |name: &str, v: Value| {
                    if let Some(i) = t.column_index(name) {
                        values[i] = v;
                    }
                };
                let order = format!("o{}", seq / 4);
                let id = match table {
                    "menu_item" => {
                        set("name", Value::Text(format!("item {seq}")));
                        set("price", Value::Int(seq as i64 * 10));
                        format!("m{}", seq % 7)
                    }
                    "order_header" => {
                        set("status", Value::Text("open".into()));
                        order.clone()
                    }
                    "order_line" => {
                        set("order_id", Value::Text(order.clone()));
                        set("quantity", Value::Int(1 + (seq % 3) as i64));
                        set("unit_price", Value::Int(450));
                        format!("{order}-l")
                    }
                    "order_status_log" => {
                        set("order_id", Value::Text(order.clone()));
                        set("status", Value::Text("preparing".into()));
                        format!("{order}-s")
                    }
                    _ => {
                        set("order_id", Value::Text(order.clone()));
                        set("amount", Value::Int(seq as i64 * 100));
                        format!("p{seq}")
                    }
                };
                let is_log = t.kind == shared::TableKind::Log;
                LogEntry {
                    origin: origin.clone(),
                    seq: Seq(seq),
                    hlc: Hlc(seq),
                    table: table.into(),
                    op: if hub && seq > 7 {
                        EntryOp::Update
                    } else {
                        EntryOp::Insert
                    },
                    row_id: id.clone(),
                    row: Row {
                        id,
                        version: 1,
                        created_at: Timestamp(0),
                        updated_at: Timestamp(0),
                        seq: is_log.then_some(seq),
                        columns: columns.clone(),
                        values,
                    },
                    clock: None,
                    scope: scope.clone(),
                }
                .encode()
            })
            .collect()
    }

    /// A shared-row entry of `origin` at `seq`.
    fn shared_entry(
        &self,
        origin: &OriginId,
        seq: u64,
        id: &str,
        put: &Put,
        scope: Option<BranchId>,
    ) -> LogEntry {
        let ti = self
            .schema
            .table_index("item_availability")
            .expect("pos table");
        LogEntry {
            origin: origin.clone(),
            seq: Seq(seq),
            hlc: put.1,
            table: "item_availability".into(),
            op: EntryOp::Update,
            row_id: id.to_owned(),
            row: Row {
                id: id.to_owned(),
                version: 1,
                created_at: Timestamp(0),
                updated_at: Timestamp(0),
                seq: None,
                columns: self.schema.columns(ti).clone(),
                values: put.2.clone(),
            },
            clock: Some(put.0.clone()),
            scope,
        }
    }

    /// The edge's terminals commit a few rows; they become a sealed (not yet durable) segment.
    /// Sometimes a kitchen marks an item available or not (a shared row).
    fn workload(&mut self, i: usize) {
        let n = 1 + self.rng.below(4);
        let first = self.edges[i].next_seq;
        let mut encoded = self.entries(&self.edges[i].origin, first, n, None);
        let mut n = n;
        if self.rng.chance(0.3) {
            let id = format!("s{}", self.rng.below(SHARED_ROWS));
            let values = vec![
                Value::Bool(self.rng.chance(0.5)),
                Value::Text(format!("{} at {}", self.edges[i].origin, self.now)),
            ];
            let now = self.now + self.edges[i].clock_skew;
            let e = &mut self.edges[i];
            let hlc = e.hlc.tick(now);
            let reg = e.shared_visible.entry(id.clone()).or_default();
            let clock = reg.write(&e.origin, hlc, values.clone());
            let put = (clock, hlc, values);
            e.shared_pending.push((id.clone(), put.clone()));
            let origin = e.origin.clone();
            encoded.push(
                self.shared_entry(&origin, first + n, &id, &put, None)
                    .encode(),
            );
            n += 1;
        }
        let e = &mut self.edges[i];
        let seg = Segment::seal(
            e.origin.clone(),
            Seq(first),
            e.head_hash,
            encoded.iter().map(Vec::as_slice),
        );
        e.head_hash = seg.hash;
        e.next_seq += n;
        e.volatile.push(seg);
        self.entries += n;
    }

    /// Appends entries to branch `j`'s feed as one durable segment.
    fn append_feed(&mut self, j: usize, entries: Vec<LogEntry>) {
        let hub = OriginId::hub();
        let encoded: Vec<Vec<u8>> = entries.iter().map(LogEntry::encode).collect();
        let h = &mut self.hub[j];
        let first = h.feed_next_seq;
        let prev = head_of(&hub, &h.feed).hash;
        let seg = Segment::seal(
            hub.clone(),
            Seq(first),
            prev,
            encoded.iter().map(Vec::as_slice),
        );
        h.feed_next_seq += entries.len() as u64;
        h.feed.push(seg);
        let head = head_of(&hub, &h.feed);
        if let Some(s) = h.session.as_mut() {
            s.handle_sealed(self.now, head);
        }
    }

    /// Relays a shared write to branch `j`'s feed.
    fn relay_shared(&mut self, j: usize, id: &str, put: &Put) {
        let seq = self.hub[j].feed_next_seq;
        let entry = self.shared_entry(&OriginId::hub(), seq, id, put, None);
        self.append_feed(j, vec![entry]);
    }

    /// Head office marks an item (a shared row) for every branch.
    fn hub_shared_write(&mut self) {
        let id = format!("s{}", self.rng.below(SHARED_ROWS));
        let values = vec![
            Value::Bool(self.rng.chance(0.5)),
            Value::Text(format!("hub at {}", self.now)),
        ];
        let hlc = self.hub_hlc.tick(self.now);
        let clock = self.hub_shared.entry(id.clone()).or_default().write(
            &OriginId::hub(),
            hlc,
            values.clone(),
        );
        let put = (clock, hlc, values);
        for j in 0..self.hub.len() {
            self.relay_shared(j, &id, &put);
        }
    }

    /// Head office changes a few menu rows for branch `i`: a durable segment of its feed.
    fn hub_workload(&mut self, i: usize) {
        let n = 1 + self.rng.below(3);
        let hub = OriginId::hub();
        let first = self.hub[i].feed_next_seq;
        // Menu rows for this branch only: they must reach exactly this branch.
        let scope = BranchId::parse(self.edges[i].origin.as_str()).ok();
        let encoded = self.entries(&hub, first, n, scope);
        let h = &mut self.hub[i];
        let prev = head_of(&hub, &h.feed).hash;
        let seg = Segment::seal(
            hub.clone(),
            Seq(first),
            prev,
            encoded.iter().map(Vec::as_slice),
        );
        h.feed_next_seq += n;
        h.feed.push(seg);
        let head = head_of(&hub, &h.feed);
        if let Some(s) = h.session.as_mut() {
            s.handle_sealed(self.now, head);
        }
        self.entries += n;
    }

    fn fsync_edge(&mut self, i: usize) {
        let now = self.now + self.edges[i].clock_skew;
        let e = &mut self.edges[i];
        if e.volatile.is_empty() {
            return;
        }
        e.durable.append(&mut e.volatile);
        for (id, (c, h, v)) in e.shared_pending.drain(..) {
            e.shared.entry(id).or_default().apply(c, h, v);
        }
        let head = head_of(&e.origin, &e.durable);
        e.session.handle_sealed(now, head);
    }

    fn crash_edge(&mut self, i: usize) {
        self.faults.edge_crashes += 1;
        let e = &mut self.edges[i];
        if !e.volatile.is_empty() {
            self.faults.torn_tails += 1;
        }
        e.volatile.clear();
        e.shared_pending.clear();
        e.shared_visible = e.shared.clone();
        // What was not fsynced is gone: the log continues from the durable head.
        let head = head_of(&e.origin, &e.durable);
        e.head_hash = head.hash;
        e.next_seq = head.seq.0 + 1;
        e.applying.clear();
        e.session = mutate_edge(
            EdgeSession::new(
                self.sync.clone(),
                "0.1.0",
                self.schema.clone(),
                e.recorded_ack.clone(),
                head,
                head_of(&OriginId::hub(), &e.feed),
            ),
            self.config.mutation,
        );
        e.conn = None;
        e.reconnect_at = self.now + 50;
        self.hub[i].session = None;
        self.trace(&format!("crash edge {i}"));
    }

    fn crash_hub(&mut self) {
        self.faults.hub_crashes += 1;
        for (i, h) in self.hub.iter_mut().enumerate() {
            h.persisting.clear();
            h.session = None;
            let e = &mut self.edges[i];
            if e.conn.take().is_some() {
                e.session.handle_disconnected(self.now + e.clock_skew);
            }
            e.reconnect_at = self.now + 100;
        }
        self.trace("crash hub");
    }

    fn connect(&mut self, i: usize) {
        let conn = self.next_conn;
        self.next_conn += 1;
        let origin = self.edges[i].origin.clone();
        let durable = head_of(&origin, &self.hub[i].durable);
        let feed_head = head_of(&OriginId::hub(), &self.hub[i].feed);
        self.hub[i].session = Some(mutate_hub(
            HubSession::new(
                self.sync.clone(),
                self.schema.clone(),
                durable,
                self.hub[i].feed_acked.clone(),
                feed_head,
            ),
            self.config.mutation,
        ));
        self.hub[i].persisting.clear();
        let floor = self.hub[i].durable.last().map_or(Seq::ZERO, |s| s.last_seq);
        let e = &mut self.edges[i];
        e.resume_floor = floor;
        e.feed_floor = e.feed.last().map_or(Seq::ZERO, |s| s.last_seq);
        e.conn = Some(conn);
        e.session.handle_connected(self.now + e.clock_skew);
        self.trace(&format!("connect {i} {conn}"));
    }

    fn disconnect(&mut self, i: usize) {
        let e = &mut self.edges[i];
        if e.conn.take().is_some() {
            e.session.handle_disconnected(self.now + e.clock_skew);
            e.reconnect_at = self.now + 20 + self.rng.below(200);
            self.hub[i].session = None;
            self.hub[i].persisting.clear();
            self.trace(&format!("disconnect {i}"));
        }
    }

    fn send(&mut self, i: usize, dir: Dir, frame: &Frame) {
        let Some(conn) = self.edges[i].conn else {
            return;
        };
        if let Frame::Segment(seg) = frame
            && self.violation.is_none()
        {
            let (floor, who) = match dir {
                Dir::Up => (self.edges[i].resume_floor, "edge"),
                Dir::Down => (self.edges[i].feed_floor, "hub"),
            };
            if seg.last_seq <= floor {
                self.violation = Some(format!(
                    "{who} sent entries up to {} on link {i} again though the receiver held {floor} when the connection started",
                    seg.last_seq
                ));
            }
        }
        let up = match dir {
            Dir::Up => self.edges[i].link_up,
            Dir::Down => self.edges[i].link_down,
        };
        let f = self.config.faults.clone();
        if !up || self.rng.chance(f.drop) {
            self.faults.dropped += 1;
            return;
        }
        let bytes = match frame {
            Frame::Segment(seg) if self.rng.chance(f.corrupt) => {
                // The integrity hook: one byte of the segment's body changes on the way.
                self.faults.corrupted += 1;
                let mut bad = seg.clone();
                let i = self.rng.below(bad.body.len() as u64) as usize;
                bad.body[i] ^= 1 << self.rng.below(8);
                Frame::Segment(bad).encode()
            }
            _ => frame.encode(),
        };
        let mut delay = 1 + self.rng.below(5);
        if self.rng.chance(f.reorder) {
            self.faults.reordered += 1;
            delay += 5 + self.rng.below(30);
        }
        let copies = if self.rng.chance(f.duplicate) {
            self.faults.duplicated += 1;
            2
        } else {
            1
        };
        for c in 0..copies {
            self.net.push(Packet {
                deliver_at: self.now + delay + c,
                edge: i,
                dir,
                conn,
                bytes: bytes.clone(),
            });
        }
    }

    /// Moves every session's outputs: storage requests and frames.
    fn pump(&mut self) {
        for i in 0..self.edges.len() {
            loop {
                let now = self.now + self.edges[i].clock_skew;
                let Some(io) = self.edges[i].session.poll_io() else {
                    break;
                };
                match io {
                    SyncIo::LoadSegments { after, max } => {
                        let segs = after_seq(&self.edges[i].durable, after, max);
                        self.edges[i].session.handle_segments(now, segs);
                    }
                    SyncIo::RecordAck(pos) => self.edges[i].recorded_ack = pos,
                    SyncIo::Persist { segment, .. } => {
                        let done = self.now + 1 + self.rng.below(10);
                        self.edges[i].applying.push_back((done, segment));
                    }
                    SyncIo::Refused { .. } => {}
                    SyncIo::Diverged { ours, theirs } => {
                        self.trace(&format!(
                            "edge {i} diverged at {} vs {}",
                            ours.seq, theirs.seq
                        ));
                    }
                }
            }
            while let Some(frame) = self.edges[i].session.poll_transmit() {
                self.send(i, Dir::Up, &frame);
            }
            if let Some(s) = self.hub[i].session.as_mut() {
                let mut frames = Vec::new();
                let mut ios = Vec::new();
                while let Some(io) = s.poll_io() {
                    ios.push(io);
                }
                for io in ios {
                    match io {
                        SyncIo::Persist { segment, entries } => {
                            let done = self.now + 1 + self.rng.below(10);
                            self.hub[i].persisting.push_back((done, segment, entries));
                        }
                        SyncIo::LoadSegments { after, max } => {
                            let segs = after_seq(&self.hub[i].feed, after, max);
                            if let Some(s) = self.hub[i].session.as_mut() {
                                s.handle_segments(self.now, segs);
                            }
                        }
                        SyncIo::RecordAck(pos) => self.hub[i].feed_acked = pos,
                        SyncIo::Refused { .. } | SyncIo::Diverged { .. } => {}
                    }
                }
                if let Some(s) = self.hub[i].session.as_mut() {
                    while let Some(f) = s.poll_transmit() {
                        frames.push(f);
                    }
                }
                for f in frames {
                    self.send(i, Dir::Down, &f);
                }
            }
        }
    }

    fn deliver(&mut self) {
        let now = self.now;
        let mut due: Vec<Packet> = Vec::new();
        let mut i = 0;
        while i < self.net.len() {
            if self.net[i].deliver_at <= now {
                due.push(self.net.swap_remove(i));
            } else {
                i += 1;
            }
        }
        // swap_remove scrambles order; deliver by time, then by send order is not kept on
        // purpose only through the reorder fault: sort to keep delivery deterministic.
        due.sort_by_key(|p| (p.deliver_at, p.edge, p.dir == Dir::Down, p.conn));
        for p in due {
            if self.edges[p.edge].conn != Some(p.conn) {
                continue; // a frame of a connection that is gone
            }
            let frame = match Frame::decode(&p.bytes) {
                Ok(Some((f, _))) => f,
                other => panic!("a frame the sender encoded does not decode: {other:?}"),
            };
            let skew = self.edges[p.edge].clock_skew;
            match p.dir {
                Dir::Up => {
                    if let Some(s) = self.hub[p.edge].session.as_mut() {
                        s.handle_frame(now, frame);
                    }
                }
                Dir::Down => self.edges[p.edge].session.handle_frame(now + skew, frame),
            }
            self.trace.update(&p.bytes);
        }
    }

    /// Completes persistence that is due: the segment is durable, then the session acks.
    fn persist(&mut self) {
        let schema = self.schema.clone();
        for e in &mut self.edges {
            while e.applying.front().is_some_and(|(t, _)| *t <= self.now) {
                let Some((_, seg)) = e.applying.pop_front() else {
                    break;
                };
                let pos = Position {
                    origin: seg.origin.clone(),
                    seq: seg.last_seq,
                    hash: seg.hash,
                };
                if let Ok(entries) = seg.verify(&seg.prev_hash, &schema) {
                    for en in entries.iter().filter(|en| en.table == "item_availability") {
                        let (c, h, v) = (
                            en.clock.clone().unwrap_or_default(),
                            en.hlc,
                            en.row.values.clone(),
                        );
                        e.hlc.observe(h, self.now + e.clock_skew);
                        e.shared.entry(en.row_id.clone()).or_default().apply(
                            c.clone(),
                            h,
                            v.clone(),
                        );
                        e.shared_visible
                            .entry(en.row_id.clone())
                            .or_default()
                            .apply(c, h, v);
                    }
                }
                e.feed.push(seg);
                e.session.handle_persisted(self.now + e.clock_skew, pos);
            }
        }
        for i in 0..self.hub.len() {
            while self.hub[i]
                .persisting
                .front()
                .is_some_and(|(t, _, _)| *t <= self.now)
            {
                let Some((_, seg, entries)) = self.hub[i].persisting.pop_front() else {
                    break;
                };
                // The hub merges shared writes and relays each new one to the other branches.
                for e in entries.iter().filter(|e| e.table == "item_availability") {
                    let put: Put = (
                        e.clock.clone().unwrap_or_default(),
                        e.hlc,
                        e.row.values.clone(),
                    );
                    let reg = self.hub_shared.entry(e.row_id.clone()).or_default();
                    if reg.apply(put.0.clone(), put.1, put.2.clone()) {
                        for j in 0..self.hub.len() {
                            if j != i {
                                self.relay_shared(j, &e.row_id, &put);
                            }
                        }
                    }
                }
                let pos = Position {
                    origin: seg.origin.clone(),
                    seq: seg.last_seq,
                    hash: seg.hash,
                };
                self.hub[i].durable.push(seg);
                if let Some(s) = self.hub[i].session.as_mut() {
                    s.handle_persisted(self.now, pos);
                }
            }
        }
    }

    fn timers(&mut self) {
        for i in 0..self.edges.len() {
            let now = self.now + self.edges[i].clock_skew;
            if self.edges[i]
                .session
                .poll_timeout()
                .is_some_and(|t| t <= now)
            {
                self.edges[i].session.handle_timeout(now);
            }
            if let Some(s) = self.hub[i].session.as_mut()
                && s.poll_timeout().is_some_and(|t| t <= self.now)
            {
                s.handle_timeout(self.now);
            }
            let e = &self.edges[i];
            if e.conn.is_none() && self.now >= e.reconnect_at && e.link_up && e.link_down {
                self.connect(i);
            }
        }
    }

    /// The safety checks, after every step. Both logs only grow (what is durable stays), so
    /// the segments checked before need no second look.
    fn check(&mut self) -> Result<(), String> {
        if let Some(v) = self.violation.take() {
            return Err(v);
        }
        for (i, e) in self.edges.iter_mut().enumerate() {
            let h = &mut self.hub[i];
            let new = &h.durable[h.checked..];
            if h.durable.len() > e.durable.len() || *new != e.durable[h.checked..h.durable.len()] {
                return Err(format!(
                    "edge {i}: the hub's log is not a prefix of the edge's"
                ));
            }
            h.checked_head = verify_chain(h.checked_head, new, &self.schema)
                .map_err(|err| format!("edge {i}: the hub's chain does not verify: {err}"))?;
            h.checked = h.durable.len();
            let hub_head = head_of(&e.origin, &h.durable);
            if e.recorded_ack.seq > hub_head.seq {
                return Err(format!(
                    "edge {i}: acked up to {} but the hub holds only {} durably",
                    e.recorded_ack.seq, hub_head.seq
                ));
            }
            // Downstream: the edge's applied feed is a prefix of the hub's, verified.
            let new = &e.feed[e.feed_checked..];
            if e.feed.len() > h.feed.len() || *new != h.feed[e.feed_checked..e.feed.len()] {
                return Err(format!(
                    "edge {i}: its applied feed is not a prefix of the hub's"
                ));
            }
            let feed_head = verify_chain(e.feed_checked_head, new, &self.schema)
                .map_err(|err| format!("edge {i}: the applied feed does not verify: {err}"))?;
            for seg in new {
                let entries = seg
                    .verify(&seg.prev_hash, &self.schema)
                    .map_err(|err| format!("edge {i}: a feed segment does not decode: {err}"))?;
                if let Some(b) = entries.iter().find_map(|en| {
                    en.scope
                        .as_ref()
                        .filter(|b| b.as_str() != e.origin.as_str())
                }) {
                    return Err(format!("edge {i}: its feed carries a row scoped to {b}"));
                }
            }
            let applied = head_of(&OriginId::hub(), &e.feed);
            if h.feed_acked.seq > applied.seq {
                return Err(format!(
                    "edge {i}: the hub recorded the feed acked up to {} but the edge applied only {}",
                    h.feed_acked.seq, applied.seq
                ));
            }
            if e.session.is_diverged() {
                return Err(format!("edge {i}: divergence reported on a single history"));
            }
            (e.feed_checked, e.feed_checked_head) = (e.feed.len(), feed_head);
        }
        Ok(())
    }

    /// Everything durable at each edge is durable at the hub and acknowledged. (The checker
    /// has already compared the hub's segments with the edge's one by one.)
    fn converged(&self) -> bool {
        self.edges.iter().enumerate().all(|(i, e)| {
            let head = head_of(&e.origin, &e.durable);
            let h = &self.hub[i];
            e.volatile.is_empty()
                && h.durable.len() == e.durable.len()
                && e.recorded_ack == head
                && e.feed.len() == h.feed.len()
                && h.feed_acked == head_of(&OriginId::hub(), &h.feed)
                && e.shared_pending.is_empty()
        })
    }

    /// Every replica shows the same version of every shared row (and has seen the same
    /// writes): convergence of concurrent edits.
    fn shared_agree(&self) -> Result<(), String> {
        let view = |m: &BTreeMap<String, SharedRow>| -> Vec<(String, Option<Vec<Value>>)> {
            m.iter()
                .map(|(k, r)| (k.clone(), r.winner().map(|w| w.values)))
                .collect()
        };
        let hub = view(&self.hub_shared);
        for (i, e) in self.edges.iter().enumerate() {
            let edge = view(&e.shared_visible);
            if edge != hub {
                return Err(format!(
                    "edge {i}'s shared rows {edge:?} differ from the hub's {hub:?}"
                ));
            }
            for (k, r) in &e.shared_visible {
                if self.hub_shared.get(k).map(SharedRow::clock) != Some(r.clock()) {
                    return Err(format!(
                        "edge {i} has seen other writes of {k} than the hub"
                    ));
                }
            }
        }
        Ok(())
    }

    fn step(&mut self, faults: bool) -> Result<(), String> {
        self.now += 1;
        let f = self.config.faults.clone();
        for i in 0..self.edges.len() {
            if faults {
                if self.rng.chance(f.crash_edge) {
                    self.crash_edge(i);
                }
                if self.rng.chance(f.partition) {
                    let e = &mut self.edges[i];
                    match self.rng.below(3) {
                        0 => {
                            e.link_up = false;
                            self.faults.one_way_partitions += 1;
                        }
                        1 => {
                            e.link_down = false;
                            self.faults.one_way_partitions += 1;
                        }
                        _ => {
                            e.link_up = false;
                            e.link_down = false;
                            self.faults.partitions += 1;
                        }
                    }
                }
                if self.rng.chance(f.heal) {
                    let e = &mut self.edges[i];
                    e.link_up = true;
                    e.link_down = true;
                }
                // A long partition is noticed as a dead connection.
                if (!self.edges[i].link_up || !self.edges[i].link_down) && self.rng.chance(0.01) {
                    self.disconnect(i);
                }
                if self.rng.chance(0.05) {
                    self.workload(i);
                }
                if self.rng.chance(0.01) {
                    self.hub_workload(i);
                }
                if i == 0 && self.rng.chance(0.003) {
                    self.hub_shared_write();
                }
            }
            if self.rng.chance(0.3) {
                self.fsync_edge(i);
            }
        }
        if faults && self.swizzle.is_none() && self.edges.len() > 1 && self.rng.chance(f.swizzle) {
            // Cut the links one by one in a random order, then heal them in another.
            let mut cut: Vec<usize> = (0..self.edges.len()).collect();
            let mut heal = cut.clone();
            for v in [&mut cut, &mut heal] {
                for k in (1..v.len()).rev() {
                    let j = self.rng.below(k as u64 + 1) as usize;
                    v.swap(k, j);
                }
            }
            self.swizzle = Some(Swizzle {
                cut,
                heal,
                next_at: self.now,
            });
            self.faults.swizzles += 1;
        }
        if let Some(sw) = self.swizzle.as_mut()
            && self.now >= sw.next_at
        {
            sw.next_at = self.now + 20 + self.rng.below(40);
            if let Some(i) = sw.cut.pop() {
                self.edges[i].link_up = false;
                self.edges[i].link_down = false;
            } else if let Some(i) = sw.heal.pop() {
                self.edges[i].link_up = true;
                self.edges[i].link_down = true;
            } else {
                self.swizzle = None;
            }
        }
        if faults && self.rng.chance(f.crash_hub) {
            self.crash_hub();
        }
        self.deliver();
        self.persist();
        self.pump();
        self.timers();
        self.pump();
        self.check()
    }

    fn run(mut self) -> Outcome {
        let mut failure = None;
        let mut steps = 0;
        for _ in 0..self.config.safety_steps {
            steps += 1;
            if let Err(e) = self.step(true) {
                failure = Some(format!("safety, step {steps}: {e}"));
                break;
            }
        }
        if failure.is_none() {
            // Liveness: heal everything, stop the workload, require convergence.
            self.swizzle = None;
            for e in &mut self.edges {
                e.link_up = true;
                e.link_down = true;
            }
            let mut converged = false;
            for _ in 0..self.config.liveness_steps {
                steps += 1;
                if let Err(e) = self.step(false) {
                    failure = Some(format!("liveness, step {steps}: {e}"));
                    break;
                }
                if self.converged() {
                    converged = true;
                    break;
                }
            }
            if converged && let Err(e) = self.shared_agree() {
                failure = Some(format!("after convergence: {e}"));
            }
            if failure.is_none() && !converged {
                let state: Vec<String> = self
                    .edges
                    .iter()
                    .enumerate()
                    .map(|(i, e)| {
                        format!(
                            "edge {i}: durable {} hub {} recorded ack {} session ack {} feed {}/{} feed ack {} conn {:?} hub session {}",
                            head_of(&e.origin, &e.durable).seq,
                            head_of(&e.origin, &self.hub[i].durable).seq,
                            e.recorded_ack.seq,
                            e.session.acked().seq,
                            head_of(&OriginId::hub(), &e.feed).seq,
                            head_of(&OriginId::hub(), &self.hub[i].feed).seq,
                            self.hub[i].feed_acked.seq,
                            e.conn,
                            self.hub[i].session.is_some(),
                        )
                    })
                    .collect();
                failure = Some(format!(
                    "no convergence within {} healed steps: {}",
                    self.config.liveness_steps,
                    state.join("; ")
                ));
            }
        }
        Outcome {
            seed: self.config.seed,
            edges: self.config.edges,
            digest: self.trace.finalize().to_hex().to_string(),
            steps,
            entries: self.entries,
            faults: self.faults,
            failure,
        }
    }
}

/// Segments of `log` after `after`, at most `max`.
fn after_seq(log: &[Segment], after: Seq, max: usize) -> Vec<Segment> {
    log.iter()
        .filter(|s| s.first_seq > after)
        .take(max)
        .cloned()
        .collect()
}

/// Runs one seed.
pub fn run_seed(config: SimConfig) -> Outcome {
    Sim::new(config).run()
}

/// For each deliberate protocol bug, how many of the seeds catch it (`mutations` feature).
#[cfg(feature = "mutations")]
pub fn mutants(seeds: std::ops::Range<u64>) -> Vec<(shared::sync::Mutation, u64, u64)> {
    shared::sync::Mutation::ALL
        .into_iter()
        .map(|m| {
            let caught = seeds
                .clone()
                .filter(|&seed| {
                    let mut config = SimConfig::new(seed);
                    config.mutation = Some(m);
                    // A mutation may also trip an assertion inside the sessions: caught too.
                    std::panic::catch_unwind(|| run_seed(config))
                        .map_or(true, |o| o.failure.is_some())
                })
                .count() as u64;
            (m, caught, seeds.end - seeds.start)
        })
        .collect()
}
