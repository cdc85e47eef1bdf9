//! The sync protocol core, sans-IO (in the manner of quinn-proto): `EdgeSession` and
//! `HubSession` are state machines. Inputs arrive through `handle_*` methods, each taking
//! `now` in milliseconds; outputs leave through `poll_*` methods: frames to send, storage
//! requests (load segments, persist a verified segment, record an ack) and the next deadline.
//! No sockets, no clock, no randomness: the edge and hub drivers move bytes and time, the
//! simulator drives the same machines over a simulated network.
//!
//! A connection carries two logs, one each way, and both ways work alike: an [`Outbound`]
//! half sends an origin's sealed segments after the receiver's durable position with a bounded
//! window, and an [`Inbound`] half verifies each segment's hash and chain link before it asks
//! storage to persist it, and acks only after storage made it durable. Upstream the edge sends
//! its branch's origin log; downstream the hub sends the branch's feed, the hub-origin log of
//! head-office rows (menus, prices, employees) and shared rows meant for that branch.
//!
//! Both sides exchange their positions in the handshake (`Hello`, `Welcome`): the sender
//! resumes from the receiver's durable position, never from what it sent before. Positions
//! at the same seq with different hashes are divergence: reported, and never merged.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::ids::{OriginId, Seq};
use crate::log::{LogEntry, Segment, SegmentError};
use crate::schema::Schema;
use crate::wire::{Frame, PROTOCOL_VERSION, PROTOCOL_VERSION_MIN, Position, RejectReason};

/// Milliseconds on the caller's clock.
pub type Millis = u64;

/// Deliberate bugs that prove the simulator bites. They can only be switched on with the
/// `mutations` feature (`with_mutation`); without it a session never has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// The receiver acks a segment when it is verified, before storage made it durable.
    AckBeforePersist,
    /// The sender resumes from its own recorded ack instead of the receiver's position.
    ResumeFromEdgeAck,
    /// The receiver stores segments without checking their hash and chain link.
    SkipChainCheck,
    /// The receiver stores a segment it already holds again.
    SkipDuplicateCheck,
}

impl Mutation {
    pub const ALL: [Mutation; 4] = [
        Mutation::AckBeforePersist,
        Mutation::ResumeFromEdgeAck,
        Mutation::SkipChainCheck,
        Mutation::SkipDuplicateCheck,
    ];
}

/// Knobs of both sessions.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// Segments sent and not yet acknowledged, at most.
    pub window_segments: usize,
    /// An unacknowledged segment (or an unanswered hello) older than this is sent again.
    pub ack_timeout_ms: Millis,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            window_segments: 8,
            ack_timeout_ms: 5_000,
        }
    }
}

/// Storage work a session asks of its driver.
#[derive(Debug, Clone, PartialEq)]
pub enum SyncIo {
    /// Load this side's sealed segments after `after`, at most `max`; answer with
    /// `handle_segments`.
    LoadSegments { after: Seq, max: usize },
    /// The peer holds this side's log up to here durably (the edge: the log's retention
    /// watermark; the hub: how far the branch has applied its feed).
    RecordAck(Position),
    /// Persist this verified segment of the peer's log (and its decoded entries) and advance
    /// that origin's durable position in one transaction; answer with `handle_persisted`.
    /// The edge applies the hub's entries through its normal write path.
    Persist {
        segment: Segment,
        entries: Vec<LogEntry>,
    },
    /// A segment was refused (reported, never stored).
    Refused {
        origin: OriginId,
        first_seq: Seq,
        reason: RejectReason,
        detail: String,
    },
    /// The two sides hold different histories of one origin; syncing stops, nothing is merged.
    Diverged { ours: Position, theirs: Position },
}

/// The edge's storage requests.
pub type EdgeIo = SyncIo;
/// The hub's storage requests.
pub type HubIo = SyncIo;

/// What a half produces: frames and storage requests, in order.
#[derive(Debug, Default)]
struct Effects {
    transmit: VecDeque<Frame>,
    io: VecDeque<SyncIo>,
}

/// Per-connection sending state, reset on disconnect.
#[derive(Debug)]
struct Sending {
    /// The last position sent on this connection.
    sent: Position,
    /// Sent segments awaiting an ack: `(last_seq, sent_at)`.
    in_flight: VecDeque<(Seq, Millis)>,
    loading: bool,
}

/// The sending half of one origin's log.
#[derive(Debug)]
struct Outbound {
    /// The receiver's durable position, as last heard.
    acked: Position,
    /// This side's last sealed position.
    head: Position,
    /// Set once the receiver's position is known on this connection.
    conn: Option<Sending>,
}

/// Why a half stopped the session.
#[derive(Debug)]
struct Diverged;

impl Outbound {
    fn new(acked: Position, head: Position) -> Outbound {
        assert_eq!(acked.origin, head.origin, "one origin per half");
        Outbound {
            acked,
            head,
            conn: None,
        }
    }

    fn origin(&self) -> &OriginId {
        &self.head.origin
    }

    fn record_ack(&mut self, pos: Position, fx: &mut Effects) {
        if pos.seq > self.acked.seq {
            fx.io.push_back(SyncIo::RecordAck(pos.clone()));
        }
        self.acked = pos;
    }

    /// The receiver told its durable position on this connection: stream from there.
    fn start(
        &mut self,
        now: Millis,
        theirs: Position,
        mutation: Option<Mutation>,
        window: usize,
        fx: &mut Effects,
    ) -> Result<(), Diverged> {
        if theirs.seq > self.head.seq
            || (theirs.seq == self.head.seq && theirs.hash != self.head.hash)
        {
            let ours = self.head.clone();
            diverge(ours, theirs, fx);
            return Err(Diverged);
        }
        // Resume from the receiver's durable cursor, never from what was sent before.
        let resume = if mutation == Some(Mutation::ResumeFromEdgeAck) {
            self.acked.clone()
        } else {
            self.record_ack(theirs.clone(), fx);
            theirs
        };
        self.conn = Some(Sending {
            sent: resume,
            in_flight: VecDeque::new(),
            loading: false,
        });
        self.pump(now, window, fx);
        Ok(())
    }

    fn sealed(&mut self, now: Millis, head: Position, window: usize, fx: &mut Effects) {
        assert!(
            head.seq >= self.head.seq,
            "the sealed head only moves forward"
        );
        self.head = head;
        self.pump(now, window, fx);
    }

    fn ack(
        &mut self,
        now: Millis,
        pos: Position,
        window: usize,
        fx: &mut Effects,
    ) -> Result<(), Diverged> {
        if pos.seq > self.head.seq {
            let ours = self.head.clone();
            diverge(ours, pos, fx);
            return Err(Diverged);
        }
        if pos.seq > self.acked.seq {
            self.record_ack(pos.clone(), fx);
        }
        if let Some(c) = self.conn.as_mut() {
            while c
                .in_flight
                .front()
                .is_some_and(|(last, _)| *last <= pos.seq)
            {
                c.in_flight.pop_front();
            }
        }
        self.pump(now, window, fx);
        Ok(())
    }

    /// Start again from the receiver's position; whatever was in flight after it is sent
    /// again.
    fn rejected(&mut self, now: Millis, resume: Position, window: usize, fx: &mut Effects) {
        if let Some(c) = self.conn.as_mut() {
            c.sent = resume;
            c.in_flight.clear();
            c.loading = false;
        }
        self.pump(now, window, fx);
    }

    fn segments(
        &mut self,
        now: Millis,
        segments: Vec<Segment>,
        window: usize,
        fx: &mut Effects,
    ) -> Result<(), Diverged> {
        let Some(c) = self.conn.as_mut() else {
            return Ok(());
        };
        c.loading = false;
        for s in segments {
            if c.in_flight.len() >= window {
                break;
            }
            if s.first_seq != c.sent.seq.next() {
                continue; // a stale load from before a reject or a resume
            }
            if s.last_seq > self.head.seq {
                // Sealed after the driver last told us: it goes out once announced, so that
                // nothing past the known head is ever sent (an ack beyond it is divergence).
                break;
            }
            if s.prev_hash != c.sent.hash {
                // Our own log does not chain onto the position the receiver holds.
                let ours = Position {
                    origin: s.origin.clone(),
                    seq: c.sent.seq,
                    hash: s.prev_hash,
                };
                let theirs = c.sent.clone();
                diverge(ours, theirs, fx);
                return Err(Diverged);
            }
            c.sent = Position {
                origin: s.origin.clone(),
                seq: s.last_seq,
                hash: s.hash,
            };
            c.in_flight.push_back((s.last_seq, now));
            fx.transmit.push_back(Frame::Segment(s));
        }
        self.pump(now, window, fx);
        Ok(())
    }

    /// Asks for more segments when the window has room and there are sealed entries to send.
    fn pump(&mut self, _now: Millis, window: usize, fx: &mut Effects) {
        let head = self.head.seq;
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        if !c.loading && c.in_flight.len() < window && c.sent.seq < head {
            c.loading = true;
            fx.io.push_back(SyncIo::LoadSegments {
                after: c.sent.seq,
                max: window - c.in_flight.len(),
            });
        }
    }

    fn timeout(&mut self, now: Millis, timeout: Millis, window: usize, fx: &mut Effects) {
        let acked = self.acked.clone();
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        if c.in_flight
            .front()
            .is_some_and(|(_, at)| now >= at + timeout)
        {
            // Nothing was acknowledged in time: resend from the last acknowledged position.
            c.sent = acked;
            c.in_flight.clear();
            c.loading = false;
            self.pump(now, window, fx);
        }
    }

    fn deadline(&self, timeout: Millis) -> Option<Millis> {
        let c = self.conn.as_ref()?;
        c.in_flight.front().map(|(_, at)| at + timeout)
    }
}

/// The receiving half of one origin's log.
#[derive(Debug)]
struct Inbound {
    /// Durable at this side.
    durable: Position,
    /// Verified and handed to storage (durable, or on its way). It survives a reconnect: a
    /// segment on its way to storage is never handed over twice.
    verified: Position,
    /// A reject was sent and the resend has not arrived: later out-of-order segments (the
    /// rest of the window) are dropped quietly instead of each drawing another reject.
    awaiting_resend: bool,
}

impl Inbound {
    fn new(durable: Position) -> Inbound {
        Inbound {
            verified: durable.clone(),
            durable,
            awaiting_resend: false,
        }
    }

    fn origin(&self) -> &OriginId {
        &self.durable.origin
    }

    /// The sender's head, told in the handshake, against what this side holds.
    fn check_peer_head(&self, theirs: &Position, fx: &mut Effects) -> Result<(), Diverged> {
        let lost = theirs.seq < self.durable.seq;
        let forked = theirs.seq == self.durable.seq && theirs.hash != self.durable.hash;
        if lost || forked {
            // The sender has less than this side holds, or another history: report it and
            // keep what was acknowledged.
            diverge(self.durable.clone(), theirs.clone(), fx);
            return Err(Diverged);
        }
        Ok(())
    }

    fn new_connection(&mut self) {
        self.awaiting_resend = false;
    }

    fn reject(&mut self, s: &Segment, reason: RejectReason, detail: String, fx: &mut Effects) {
        self.awaiting_resend = true;
        fx.io.push_back(SyncIo::Refused {
            origin: s.origin.clone(),
            first_seq: s.first_seq,
            reason,
            detail,
        });
        fx.transmit.push_back(Frame::Reject {
            origin: self.origin().clone(),
            first_seq: s.first_seq,
            reason,
            resume: self.verified.clone(),
        });
    }

    fn segment(
        &mut self,
        s: Segment,
        schema: &Schema,
        mutation: Option<Mutation>,
        fx: &mut Effects,
    ) {
        if mutation == Some(Mutation::SkipDuplicateCheck) && s.last_seq <= self.verified.seq {
            fx.io.push_back(SyncIo::Persist {
                segment: s,
                entries: Vec::new(),
            });
            return;
        }
        if s.last_seq <= self.durable.seq {
            // A duplicate (a retransmit or a replay): acknowledged, not stored again.
            fx.transmit.push_back(Frame::Ack(self.durable.clone()));
            return;
        }
        if s.last_seq <= self.verified.seq {
            return; // on its way to storage; its ack follows the commit
        }
        if s.first_seq != self.verified.seq.next() {
            if self.awaiting_resend {
                return;
            }
            let detail = format!(
                "segment starts at {} but {} is next",
                s.first_seq,
                self.verified.seq.next()
            );
            self.reject(&s, RejectReason::OutOfOrder, detail, fx);
            return;
        }
        // Verify hash and chain link before asking storage to persist.
        let checked = if mutation == Some(Mutation::SkipChainCheck) {
            Ok(Vec::new())
        } else {
            s.verify(&self.verified.hash, schema)
        };
        match checked {
            Ok(entries) => {
                self.awaiting_resend = false;
                self.verified = Position {
                    origin: self.origin().clone(),
                    seq: s.last_seq,
                    hash: s.hash,
                };
                if mutation == Some(Mutation::AckBeforePersist) {
                    fx.transmit.push_back(Frame::Ack(self.verified.clone()));
                }
                fx.io.push_back(SyncIo::Persist {
                    segment: s,
                    entries,
                });
            }
            Err(SegmentError::ChainBreak) => {
                self.reject(&s, RejectReason::OutOfOrder, "chain break".into(), fx);
            }
            Err(e) => self.reject(&s, RejectReason::Corrupt, e.to_string(), fx),
        }
    }

    /// Storage committed a segment: the durable position moves (and the sender is told).
    fn persisted(
        &mut self,
        pos: Position,
        mutation: Option<Mutation>,
        connected: bool,
        fx: &mut Effects,
    ) {
        if mutation.is_none() {
            assert!(
                pos.seq > self.durable.seq && pos.seq <= self.verified.seq,
                "persisted positions are verified and move forward"
            );
        }
        self.durable = pos.clone();
        if connected {
            fx.transmit.push_back(Frame::Ack(pos));
        }
    }
}

/// Reports a divergence to the peer and to storage.
fn diverge(ours: Position, theirs: Position, fx: &mut Effects) {
    fx.transmit.push_back(Frame::Divergence {
        origin: ours.origin.clone(),
        seq: ours.seq,
        ours: ours.hash,
        theirs: theirs.hash,
    });
    fx.io.push_back(SyncIo::Diverged { ours, theirs });
}

/// A divergence frame from the peer, from this side's point of view.
fn peer_divergence(
    origin: OriginId,
    seq: Seq,
    peer_ours: crate::log::ChainHash,
    peer_theirs: crate::log::ChainHash,
    fx: &mut Effects,
) {
    fx.io.push_back(SyncIo::Diverged {
        ours: Position {
            origin: origin.clone(),
            seq,
            hash: peer_theirs,
        },
        theirs: Position {
            origin,
            seq,
            hash: peer_ours,
        },
    });
}

/// Per-connection state of the edge, reset on disconnect.
#[derive(Debug)]
struct EdgeConn {
    welcomed: bool,
    /// When the last hello went out (it is sent again until a welcome arrives).
    hello_at: Millis,
}

/// The edge's side of one hub connection at a time: its branch's log goes up, the branch's
/// feed from the hub comes down.
#[derive(Debug)]
pub struct EdgeSession {
    config: SyncConfig,
    mutation: Option<Mutation>,
    software: String,
    schema: Arc<Schema>,
    up: Outbound,
    down: Inbound,
    diverged: bool,
    conn: Option<EdgeConn>,
    fx: Effects,
}

impl EdgeSession {
    /// `acked` is the hub's position in the branch's log as the edge last recorded it; `head`
    /// the edge's last sealed position; `feed` how far the edge holds the hub's feed durably.
    pub fn new(
        config: SyncConfig,
        software: &str,
        schema: Arc<Schema>,
        acked: Position,
        head: Position,
        feed: Position,
    ) -> Self {
        EdgeSession {
            config,
            mutation: None,
            software: software.to_owned(),
            schema,
            up: Outbound::new(acked, head),
            down: Inbound::new(feed),
            diverged: false,
            conn: None,
            fx: Effects::default(),
        }
    }

    /// Switches on a deliberate bug (tests of the simulator only).
    #[cfg(feature = "mutations")]
    pub fn with_mutation(mut self, m: Mutation) -> Self {
        self.mutation = Some(m);
        self
    }

    /// The hub's durable position in the branch's log, as last heard.
    pub fn acked(&self) -> &Position {
        &self.up.acked
    }

    /// The edge's last sealed position, as the session knows it.
    pub fn head(&self) -> &Position {
        &self.up.head
    }

    /// How far the edge holds the hub's feed durably.
    pub fn feed(&self) -> &Position {
        &self.down.durable
    }

    pub fn is_diverged(&self) -> bool {
        self.diverged
    }

    /// Whether the hub answered the hello on this connection.
    pub fn is_welcomed(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| c.welcomed)
    }

    pub fn handle_connected(&mut self, now: Millis) {
        if self.diverged {
            return;
        }
        self.conn = Some(EdgeConn {
            welcomed: false,
            hello_at: now,
        });
        self.up.conn = None;
        self.down.new_connection();
        self.send_hello();
    }

    fn send_hello(&mut self) {
        self.fx.transmit.push_back(Frame::Hello {
            protocol: PROTOCOL_VERSION,
            software: self.software.clone(),
            vector: vec![self.up.head.clone(), self.down.durable.clone()],
        });
        self.fx.transmit.push_back(Frame::Platform {
            target: crate::release::this_target(),
        });
    }

    pub fn handle_disconnected(&mut self, _now: Millis) {
        self.conn = None;
        self.up.conn = None;
        self.fx.transmit.clear();
    }

    fn stop(&mut self) {
        self.diverged = true;
        self.conn = None;
        self.up.conn = None;
    }

    /// The edge sealed more of its log.
    pub fn handle_sealed(&mut self, now: Millis, head: Position) {
        self.up
            .sealed(now, head, self.config.window_segments, &mut self.fx);
    }

    pub fn handle_frame(&mut self, now: Millis, frame: Frame) {
        if self.conn.is_none() || self.diverged {
            return;
        }
        let window = self.config.window_segments;
        let outcome = match frame {
            Frame::Welcome { .. } if self.is_welcomed() => Ok(()), // a repeated welcome
            Frame::Welcome { protocol, vector } => {
                if protocol != PROTOCOL_VERSION {
                    self.fx.transmit.push_back(Frame::Close {
                        reason: format!("protocol {protocol} is not {PROTOCOL_VERSION}"),
                    });
                    self.conn = None;
                    return;
                }
                let find = |origin: &OriginId| {
                    vector
                        .iter()
                        .find(|p| &p.origin == origin)
                        .cloned()
                        .unwrap_or_else(|| Position::genesis(origin))
                };
                let hub_has = find(self.up.origin());
                let feed_head = find(self.down.origin());
                if let Some(c) = self.conn.as_mut() {
                    c.welcomed = true;
                }
                self.down
                    .check_peer_head(&feed_head, &mut self.fx)
                    .and_then(|()| {
                        self.up
                            .start(now, hub_has, self.mutation, window, &mut self.fx)
                    })
            }
            Frame::Ack(pos) if &pos.origin == self.up.origin() => {
                self.up.ack(now, pos, window, &mut self.fx)
            }
            Frame::Reject { resume, .. } if &resume.origin == self.up.origin() => {
                self.up.rejected(now, resume, window, &mut self.fx);
                Ok(())
            }
            Frame::Segment(s) if self.is_welcomed() => {
                if &s.origin == self.down.origin() {
                    self.down
                        .segment(s, &self.schema, self.mutation, &mut self.fx);
                } else {
                    let detail = format!("the hub may not send origin {}", s.origin);
                    self.down
                        .reject(&s, RejectReason::ForeignOrigin, detail, &mut self.fx);
                }
                Ok(())
            }
            Frame::Divergence {
                origin,
                seq,
                ours,
                theirs,
            } if &origin == self.up.origin() || &origin == self.down.origin() => {
                peer_divergence(origin, seq, ours, theirs, &mut self.fx);
                Err(Diverged)
            }
            Frame::Close { .. } => {
                self.conn = None;
                self.up.conn = None;
                Ok(())
            }
            // Anything else (another origin's ack, an unexpected hello) is ignored.
            _ => Ok(()),
        };
        if outcome.is_err() {
            self.stop();
        }
    }

    /// Segments loaded for a [`SyncIo::LoadSegments`] request.
    pub fn handle_segments(&mut self, now: Millis, segments: Vec<Segment>) {
        if self.conn.is_none() {
            return;
        }
        if self
            .up
            .segments(now, segments, self.config.window_segments, &mut self.fx)
            .is_err()
        {
            self.stop();
        }
    }

    /// Storage applied a segment of the hub's feed durably.
    pub fn handle_persisted(&mut self, _now: Millis, pos: Position) {
        let connected = self.is_welcomed();
        self.down
            .persisted(pos, self.mutation, connected, &mut self.fx);
    }

    pub fn handle_timeout(&mut self, now: Millis) {
        let timeout = self.config.ack_timeout_ms;
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        if !c.welcomed {
            // No welcome yet: the hello (or its answer) was lost; ask again.
            if now >= c.hello_at + timeout {
                c.hello_at = now;
                self.send_hello();
            }
            return;
        }
        self.up
            .timeout(now, timeout, self.config.window_segments, &mut self.fx);
    }

    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.fx.transmit.pop_front()
    }

    pub fn poll_io(&mut self) -> Option<SyncIo> {
        self.fx.io.pop_front()
    }

    /// When the oldest segment still waiting for the hub's ack was sent, if any: a link
    /// that has not acknowledged for a while is down in all but name.
    pub fn oldest_unacked(&self) -> Option<Millis> {
        self.up.conn.as_ref()?.in_flight.front().map(|(_, at)| *at)
    }

    /// When [`EdgeSession::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let c = self.conn.as_ref()?;
        if !c.welcomed {
            return Some(c.hello_at + self.config.ack_timeout_ms);
        }
        self.up.deadline(self.config.ack_timeout_ms)
    }
}

/// The hub's side of one edge connection: the branch's log comes up, the branch's feed goes
/// down. The origin is the branch the connection authenticated as (from its certificate),
/// never a branch id taken from a message.
#[derive(Debug)]
pub struct HubSession {
    config: SyncConfig,
    mutation: Option<Mutation>,
    schema: Arc<Schema>,
    up: Inbound,
    down: Outbound,
    greeted: bool,
    /// The protocol spoken: the edge's, from its hello (the welcome answers in it).
    protocol: u16,
    closed: bool,
    fx: Effects,
}

impl HubSession {
    /// `durable`: the hub's position in the branch's log; `feed_acked`: how far the branch
    /// acknowledged its feed, as recorded; `feed_head`: the feed's last sealed position.
    pub fn new(
        config: SyncConfig,
        schema: Arc<Schema>,
        durable: Position,
        feed_acked: Position,
        feed_head: Position,
    ) -> Self {
        HubSession {
            config,
            mutation: None,
            schema,
            up: Inbound::new(durable),
            down: Outbound::new(feed_acked, feed_head),
            greeted: false,
            protocol: PROTOCOL_VERSION,
            closed: false,
            fx: Effects::default(),
        }
    }

    /// Switches on a deliberate bug (tests of the simulator only).
    #[cfg(feature = "mutations")]
    pub fn with_mutation(mut self, m: Mutation) -> Self {
        self.mutation = Some(m);
        self
    }

    /// The hub's durable position in the branch's log.
    pub fn durable(&self) -> &Position {
        &self.up.durable
    }

    /// How far the branch holds its feed durably, as last heard.
    pub fn feed_acked(&self) -> &Position {
        &self.down.acked
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    fn close(&mut self, reason: &str) {
        self.fx.transmit.push_back(Frame::Close {
            reason: reason.to_owned(),
        });
        self.closed = true;
    }

    fn welcome(&mut self) {
        self.fx.transmit.push_back(Frame::Welcome {
            protocol: self.protocol,
            vector: vec![self.up.durable.clone(), self.down.head.clone()],
        });
    }

    pub fn handle_frame(&mut self, now: Millis, frame: Frame) {
        if self.closed {
            return;
        }
        let window = self.config.window_segments;
        let outcome = match frame {
            Frame::Hello {
                protocol, vector, ..
            } => {
                if !(PROTOCOL_VERSION_MIN..=PROTOCOL_VERSION).contains(&protocol) {
                    self.close(&format!(
                        "protocol {protocol} is not one of {PROTOCOL_VERSION_MIN} to {PROTOCOL_VERSION}"
                    ));
                    return;
                }
                self.protocol = protocol;
                if self.greeted {
                    // A repeated hello (the welcome was lost, or the network duplicated it):
                    // its positions may be older than what arrived since, so it is answered,
                    // not judged again.
                    self.welcome();
                    return;
                }
                let find = |origin: &OriginId| {
                    vector
                        .iter()
                        .find(|p| &p.origin == origin)
                        .cloned()
                        .unwrap_or_else(|| Position::genesis(origin))
                };
                let edge_head = find(self.up.origin());
                let edge_feed = find(self.down.origin());
                self.up
                    .check_peer_head(&edge_head, &mut self.fx)
                    .map(|()| {
                        self.greeted = true;
                        self.welcome();
                    })
                    .and_then(|()| {
                        self.down
                            .start(now, edge_feed, self.mutation, window, &mut self.fx)
                    })
            }
            Frame::Segment(_) | Frame::Ack(_) if !self.greeted => {
                self.close("a session starts with hello");
                return;
            }
            Frame::Segment(s) => {
                if &s.origin == self.up.origin() {
                    self.up
                        .segment(s, &self.schema, self.mutation, &mut self.fx);
                } else {
                    let detail = format!("{} may not write origin {}", self.up.origin(), s.origin);
                    self.up
                        .reject(&s, RejectReason::ForeignOrigin, detail, &mut self.fx);
                }
                Ok(())
            }
            Frame::Ack(pos) if &pos.origin == self.down.origin() => {
                self.down.ack(now, pos, window, &mut self.fx)
            }
            Frame::Reject { resume, .. } if &resume.origin == self.down.origin() => {
                self.down.rejected(now, resume, window, &mut self.fx);
                Ok(())
            }
            Frame::Divergence {
                origin,
                seq,
                ours,
                theirs,
            } if &origin == self.up.origin() || &origin == self.down.origin() => {
                peer_divergence(origin, seq, ours, theirs, &mut self.fx);
                Err(Diverged)
            }
            Frame::Close { .. } => {
                self.closed = true;
                Ok(())
            }
            _ => Ok(()),
        };
        if outcome.is_err() {
            self.closed = true;
        }
    }

    /// Storage committed a segment of the branch's log: the durable position moves and the
    /// edge is told.
    pub fn handle_persisted(&mut self, _now: Millis, pos: Position) {
        let connected = !self.closed;
        self.up
            .persisted(pos, self.mutation, connected, &mut self.fx);
    }

    /// The branch's feed grew.
    pub fn handle_sealed(&mut self, now: Millis, head: Position) {
        if self.closed {
            return;
        }
        self.down
            .sealed(now, head, self.config.window_segments, &mut self.fx);
    }

    /// Feed segments loaded for a [`SyncIo::LoadSegments`] request.
    pub fn handle_segments(&mut self, now: Millis, segments: Vec<Segment>) {
        if self.closed {
            return;
        }
        if self
            .down
            .segments(now, segments, self.config.window_segments, &mut self.fx)
            .is_err()
        {
            self.closed = true;
        }
    }

    pub fn handle_timeout(&mut self, now: Millis) {
        if self.closed {
            return;
        }
        self.down.timeout(
            now,
            self.config.ack_timeout_ms,
            self.config.window_segments,
            &mut self.fx,
        );
    }

    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.fx.transmit.pop_front()
    }

    pub fn poll_io(&mut self) -> Option<SyncIo> {
        self.fx.io.pop_front()
    }

    /// When [`HubSession::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Millis> {
        if self.closed {
            return None;
        }
        self.down.deadline(self.config.ack_timeout_ms)
    }
}
