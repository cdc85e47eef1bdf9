//! The sans-IO sync sessions driven by a tiny in-memory driver: fresh sync, resume from the
//! hub's position, duplicates, corruption and reordering in flight, foreign origins,
//! divergence and ack timeouts.

use std::sync::Arc;

use shared::log::{ChainHash, EntryOp, LogEntry, Segment};
use shared::sync::{EdgeIo, EdgeSession, HubIo, HubSession, SyncConfig};
use shared::wire::{Frame, Position, RejectReason};
use shared::{Hlc, OriginId, Row, Schema, Seq, Timestamp, Value};

fn schema() -> Arc<Schema> {
    Arc::new(shared::pos::schema())
}

/// An origin's log cut into segments of `per` entries.
fn log(origin: &str, entries: u64, per: usize) -> Vec<Segment> {
    let s = schema();
    let origin = OriginId::parse(origin).unwrap();
    let ti = s.table_index("order_payment").unwrap();
    let encoded: Vec<Vec<u8>> = (1..=entries)
        .map(|seq| {
            let columns = s.columns(ti).clone();
            let mut values = vec![Value::Null; columns.len()];
            values[0] = Value::Text("o1".into());
            values[2] = Value::Int(seq as i64);
            LogEntry {
                origin: origin.clone(),
                seq: Seq(seq),
                hlc: Hlc(seq),
                table: "order_payment".into(),
                op: EntryOp::Insert,
                row_id: format!("p{seq}"),
                row: Row {
                    id: format!("p{seq}"),
                    version: 1,
                    created_at: Timestamp(0),
                    updated_at: Timestamp(0),
                    seq: Some(seq),
                    columns,
                    values,
                },
                clock: None,
                scope: None,
            }
            .encode()
        })
        .collect();
    let mut prev = ChainHash::genesis(&origin);
    encoded
        .chunks(per)
        .enumerate()
        .map(|(i, chunk)| {
            let seg = Segment::seal(
                origin.clone(),
                Seq((i * per) as u64 + 1),
                prev,
                chunk.iter().map(Vec::as_slice),
            );
            prev = seg.hash;
            seg
        })
        .collect()
}

fn hub_session(durable: Position) -> HubSession {
    let feed = Position::genesis(&OriginId::hub());
    HubSession::new(SyncConfig::default(), schema(), durable, feed.clone(), feed)
}

fn head(log: &[Segment]) -> Position {
    let last = log.last().unwrap();
    Position {
        origin: last.origin.clone(),
        seq: last.last_seq,
        hash: last.hash,
    }
}

/// What may happen to a frame on its way.
type Mangle = Box<dyn FnMut(Frame) -> Vec<Frame>>;

/// Runs edge and hub until quiet; returns the segments each side transmitted.
struct World {
    edge: EdgeSession,
    hub: HubSession,
    edge_log: Vec<Segment>,
    hub_store: Vec<Segment>,
    recorded_acks: Vec<Seq>,
    refused: Vec<RejectReason>,
    sent_segments: usize,
    up: Mangle,
    now: u64,
}

impl World {
    fn new(edge_log: Vec<Segment>, hub_store: Vec<Segment>, acked: Position) -> World {
        let origin = edge_log[0].origin.clone();
        let durable = hub_store
            .last()
            .map_or(Position::genesis(&origin), |s| Position {
                origin: origin.clone(),
                seq: s.last_seq,
                hash: s.hash,
            });
        World {
            edge: EdgeSession::new(
                SyncConfig {
                    window_segments: 3,
                    ack_timeout_ms: 1000,
                },
                "0.1.0",
                schema(),
                acked,
                head(&edge_log),
                Position::genesis(&OriginId::hub()),
            ),
            hub: hub_session(durable),
            edge_log,
            hub_store,
            recorded_acks: Vec::new(),
            refused: Vec::new(),
            sent_segments: 0,
            up: Box::new(|f| vec![f]),
            now: 0,
        }
    }

    /// Steps until nothing moves.
    fn run(&mut self) {
        for _ in 0..10_000 {
            let mut moved = false;
            while let Some(io) = self.edge.poll_io() {
                moved = true;
                match io {
                    EdgeIo::LoadSegments { after, max } => {
                        let segs: Vec<Segment> = self
                            .edge_log
                            .iter()
                            .filter(|s| s.first_seq > after)
                            .take(max)
                            .cloned()
                            .collect();
                        self.edge.handle_segments(self.now, segs);
                    }
                    EdgeIo::RecordAck(p) => self.recorded_acks.push(p.seq),
                    EdgeIo::Diverged { .. } => {}
                    other => panic!("the hub sends no feed in these tests: {other:?}"),
                }
            }
            while let Some(f) = self.edge.poll_transmit() {
                moved = true;
                if matches!(f, Frame::Segment(_)) {
                    self.sent_segments += 1;
                }
                for f in (self.up)(f) {
                    self.hub.handle_frame(self.now, f);
                }
            }
            while let Some(io) = self.hub.poll_io() {
                moved = true;
                match io {
                    HubIo::Persist { segment, entries } => {
                        assert_eq!(
                            entries.len() as u64,
                            segment.last_seq.0 - segment.first_seq.0 + 1
                        );
                        let pos = Position {
                            origin: segment.origin.clone(),
                            seq: segment.last_seq,
                            hash: segment.hash,
                        };
                        self.hub_store.push(segment);
                        self.hub.handle_persisted(self.now, pos);
                    }
                    HubIo::Refused { reason, .. } => self.refused.push(reason),
                    HubIo::Diverged { .. } => {}
                    other => panic!("the hub's feed is empty in these tests: {other:?}"),
                }
            }
            while let Some(f) = self.hub.poll_transmit() {
                moved = true;
                self.edge.handle_frame(self.now, f);
            }
            if !moved {
                match self.edge.poll_timeout() {
                    Some(t) => {
                        self.now = self.now.max(t);
                        self.edge.handle_timeout(self.now);
                    }
                    None => return,
                }
            }
        }
        panic!("the sessions never went quiet");
    }

    /// The hub's store is exactly the edge's log, in order, once.
    fn assert_converged(&self) {
        assert_eq!(
            self.hub_store, self.edge_log,
            "the hub holds the edge's log exactly once, in order"
        );
        assert_eq!(self.edge.acked(), &head(&self.edge_log));
    }
}

#[test]
fn a_fresh_edge_syncs_everything_once_in_order() {
    let edge_log = log("B001", 50, 4);
    let origin = edge_log[0].origin.clone();
    let mut w = World::new(edge_log, Vec::new(), Position::genesis(&origin));
    w.edge.handle_connected(0);
    w.run();
    w.assert_converged();
    assert_eq!(w.sent_segments, 13);
    assert_eq!(w.recorded_acks.last(), Some(&Seq(50)));
}

#[test]
fn a_reconnect_resumes_from_the_hubs_position() {
    let edge_log = log("B001", 40, 4);
    let origin = edge_log[0].origin.clone();
    // The hub already holds 6 segments durably; the edge's own ack record lags behind.
    let hub_store = edge_log[..6].to_vec();
    let mut w = World::new(edge_log, hub_store, Position::genesis(&origin));
    w.edge.handle_connected(0);
    w.run();
    w.assert_converged();
    assert_eq!(w.sent_segments, 4, "only what the hub lacked was sent");
}

#[test]
fn duplicates_are_acknowledged_and_stored_once() {
    let edge_log = log("B001", 30, 3);
    let origin = edge_log[0].origin.clone();
    let mut w = World::new(edge_log, Vec::new(), Position::genesis(&origin));
    w.up = Box::new(|f| vec![f.clone(), f]);
    w.edge.handle_connected(0);
    w.run();
    w.assert_converged();
}

#[test]
fn a_segment_corrupted_in_flight_is_rejected_and_sent_again() {
    let edge_log = log("B001", 30, 3);
    let origin = edge_log[0].origin.clone();
    let mut w = World::new(edge_log, Vec::new(), Position::genesis(&origin));
    let mut n = 0;
    w.up = Box::new(move |f| {
        if let Frame::Segment(mut s) = f {
            n += 1;
            if n == 4 {
                let i = s.body.len() / 2;
                s.body[i] ^= 0x40;
            }
            vec![Frame::Segment(s)]
        } else {
            vec![f]
        }
    });
    w.edge.handle_connected(0);
    w.run();
    w.assert_converged();
    assert_eq!(w.refused, vec![RejectReason::Corrupt]);
}

#[test]
fn reordered_segments_are_refused_then_delivered_in_order() {
    let edge_log = log("B001", 30, 3);
    let origin = edge_log[0].origin.clone();
    let mut w = World::new(edge_log, Vec::new(), Position::genesis(&origin));
    let mut held: Option<Frame> = None;
    let mut n = 0;
    w.up = Box::new(move |f| {
        if let Frame::Segment(_) = f {
            n += 1;
            if n == 2 {
                held = Some(f);
                return vec![];
            }
            if n == 3 {
                return vec![f, held.take().unwrap()];
            }
        }
        vec![f]
    });
    w.edge.handle_connected(0);
    w.run();
    w.assert_converged();
    assert!(w.refused.contains(&RejectReason::OutOfOrder));
}

#[test]
fn lost_segments_are_sent_again_after_the_ack_timeout() {
    let edge_log = log("B001", 12, 3);
    let origin = edge_log[0].origin.clone();
    let mut w = World::new(edge_log, Vec::new(), Position::genesis(&origin));
    // The last segment is lost once: no later segment reveals the gap, only the timeout.
    let mut dropped = false;
    w.up = Box::new(move |f| {
        if let Frame::Segment(s) = &f
            && s.last_seq == Seq(12)
            && !dropped
        {
            dropped = true;
            return vec![];
        }
        vec![f]
    });
    w.edge.handle_connected(0);
    w.run();
    w.assert_converged();
    assert!(w.now >= 1000, "the resend waited for the ack timeout");
}

#[test]
fn another_branchs_origin_is_refused() {
    let b2 = log("B002", 3, 3);
    let b1 = log("B001", 3, 3);
    let origin = b1[0].origin.clone();
    let mut hub = hub_session(Position::genesis(&origin));
    hub.handle_frame(
        0,
        Frame::Hello {
            protocol: shared::wire::PROTOCOL_VERSION,
            software: "x".into(),
            vector: vec![],
        },
    );
    assert!(matches!(hub.poll_transmit(), Some(Frame::Welcome { .. })));
    hub.handle_frame(0, Frame::Segment(b2[0].clone()));
    assert!(matches!(
        hub.poll_transmit(),
        Some(Frame::Reject {
            reason: RejectReason::ForeignOrigin,
            ..
        })
    ));
    assert!(matches!(
        hub.poll_io(),
        Some(HubIo::Refused {
            reason: RejectReason::ForeignOrigin,
            ..
        })
    ));
    assert!(hub.poll_io().is_none(), "nothing is persisted");
}

#[test]
fn a_different_history_at_the_same_position_is_divergence() {
    let ours = log("B001", 6, 3);
    // The hub holds a segment 1..=3 with different content.
    let theirs = log("B001", 9, 3);
    let mut forked = theirs[0].clone();
    forked.body = ours[0].body.clone();
    let hub_log = vec![Segment {
        hash: ChainHash([7; 32]),
        ..forked
    }];
    let origin = ours[0].origin.clone();
    let mut w = World::new(ours, hub_log, Position::genesis(&origin));
    w.edge.handle_connected(0);
    w.run();
    assert!(w.edge.is_diverged());
    assert_eq!(w.hub_store.len(), 1, "nothing was merged");
}

#[test]
fn a_session_must_start_with_hello() {
    let b1 = log("B001", 3, 3);
    let origin = b1[0].origin.clone();
    let mut hub = hub_session(Position::genesis(&origin));
    hub.handle_frame(0, Frame::Segment(b1[0].clone()));
    assert!(matches!(hub.poll_transmit(), Some(Frame::Close { .. })));
    assert!(hub.is_closed());
    assert!(hub.poll_io().is_none());
}

/// Found by the simulator (a lost hello left the edge waiting forever): the hello is sent again
/// after the timeout.
#[test]
fn a_lost_hello_is_sent_again() {
    let edge_log = log("B001", 6, 3);
    let origin = edge_log[0].origin.clone();
    let mut w = World::new(edge_log, Vec::new(), Position::genesis(&origin));
    let mut first = true;
    w.up = Box::new(move |f| {
        if matches!(f, Frame::Hello { .. }) && first {
            first = false;
            return vec![];
        }
        vec![f]
    });
    w.edge.handle_connected(0);
    w.run();
    w.assert_converged();
}

/// Found by the simulator (a duplicated hello, delivered after the hub had received more than
/// its head, was taken for an edge that lost data): a repeated hello is answered, not judged.
#[test]
fn a_late_duplicate_hello_is_not_divergence() {
    let edge_log = log("B001", 12, 3);
    let origin = edge_log[0].origin.clone();
    let mut w = World::new(edge_log, Vec::new(), Position::genesis(&origin));
    let mut hello: Option<Frame> = None;
    let mut segments = 0;
    w.up = Box::new(move |f| {
        if matches!(f, Frame::Hello { .. }) {
            hello = Some(f.clone());
        }
        if matches!(f, Frame::Segment(_)) {
            segments += 1;
            if segments == 4 {
                return vec![f, hello.clone().unwrap()];
            }
        }
        vec![f]
    });
    w.edge.handle_connected(0);
    w.run();
    w.assert_converged();
    assert!(!w.hub.is_closed());
}

/// The driver may load segments sealed after it last told the session (its load has no upper
/// bound): they wait until announced, so the hub never acks past the head the edge knows,
/// which would look like divergence (found by an end-to-end test, 1 run in 40).
#[test]
fn segments_sealed_after_the_last_announcement_wait_for_it() {
    let segs = log("B001", 9, 3);
    let origin = segs[0].origin.clone();
    let genesis = Position::genesis(&origin);
    let pos = |s: &Segment| Position {
        origin: origin.clone(),
        seq: s.last_seq,
        hash: s.hash,
    };
    let mut edge = EdgeSession::new(
        SyncConfig::default(),
        "0.1.0",
        schema(),
        genesis.clone(),
        pos(&segs[0]),
        Position::genesis(&OriginId::hub()),
    );
    let mut hub = hub_session(genesis);
    edge.handle_connected(0);
    let mut sent = Vec::new();
    let mut announced = false;
    for _ in 0..100 {
        while let Some(io) = edge.poll_io() {
            if let EdgeIo::LoadSegments { after, max } = io {
                // The store holds all three sealed segments already.
                let loaded: Vec<Segment> = segs
                    .iter()
                    .filter(|s| s.first_seq > after)
                    .take(max)
                    .cloned()
                    .collect();
                edge.handle_segments(0, loaded);
            }
        }
        while let Some(f) = edge.poll_transmit() {
            if let Frame::Segment(s) = &f {
                sent.push(s.last_seq);
            }
            hub.handle_frame(0, f);
        }
        while let Some(io) = hub.poll_io() {
            if let HubIo::Persist { segment, .. } = io {
                hub.handle_persisted(0, pos(&segment));
            }
        }
        while let Some(f) = hub.poll_transmit() {
            edge.handle_frame(0, f);
        }
        if !announced && sent == vec![Seq(3)] {
            // Only the announced segment went out; now the driver announces the rest.
            announced = true;
            edge.handle_sealed(0, pos(&segs[2]));
        }
    }
    assert!(
        announced,
        "only the announced segment was sent first: {sent:?}"
    );
    assert!(!edge.is_diverged(), "no false divergence");
    assert_eq!(sent, vec![Seq(3), Seq(6), Seq(9)]);
    assert_eq!(edge.acked(), &pos(&segs[2]));
}
