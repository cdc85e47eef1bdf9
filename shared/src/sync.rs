//! The sync protocol core, sans-IO (in the manner of quinn-proto): `EdgeSession` and
//! `HubSession` are state machines. Inputs arrive through `handle_*` methods, each taking
//! `now` in milliseconds; outputs leave through `poll_*` methods: frames to send, storage
//! requests (load segments, persist a verified segment, record an ack) and the next deadline.
//! No sockets, no clock, no randomness: the edge and hub drivers move bytes and time, the
//! simulator drives the same machines over a simulated network.
//!
//! This first slice carries a branch's origin log upstream (edge → hub) with resume from the
//! hub's durable position, a bounded window, verification before persistence, acks after it,
//! duplicate recognition, rejection of corrupt or out-of-order segments, and divergence
//! detection. Downstream relay and shared-row merging build on the same frames.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::ids::{OriginId, Seq};
use crate::log::{LogEntry, Segment, SegmentError};
use crate::schema::Schema;
use crate::wire::{Frame, PROTOCOL_VERSION, Position, RejectReason};

/// Milliseconds on the caller's clock.
pub type Millis = u64;

/// Deliberate bugs that prove the simulator bites. They can only be switched on with the
/// `mutations` feature (`with_mutation`); without it a session never has one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    /// The hub acks a segment when it is verified, before storage made it durable.
    AckBeforePersist,
    /// The edge resumes from its own recorded ack instead of the hub's position.
    ResumeFromEdgeAck,
    /// The hub stores segments without checking their hash and chain link.
    SkipChainCheck,
    /// The hub stores a segment it already holds again.
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
    /// An unacknowledged segment older than this is sent again.
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

/// Storage work the edge session asks of its driver.
#[derive(Debug, Clone, PartialEq)]
pub enum EdgeIo {
    /// Load sealed segments of the edge's origin after `after`, at most `max`; answer with
    /// [`EdgeSession::handle_segments`].
    LoadSegments { after: Seq, max: usize },
    /// The hub holds everything up to here durably: the log's retention watermark.
    RecordAck(Position),
    /// The hub holds a different history at the same position; syncing stops.
    Diverged { ours: Position, theirs: Position },
}

/// What survives a reconnect.
#[derive(Debug, Clone)]
struct EdgePersistent {
    /// The hub's durable position for this origin, as last heard.
    acked: Position,
    /// The edge's last sealed position.
    head: Position,
    diverged: bool,
}

/// Per-connection state, reset on disconnect.
#[derive(Debug)]
struct EdgeConn {
    welcomed: bool,
    /// When the last hello went out (it is sent again until a welcome arrives).
    hello_at: Millis,
    /// The last position sent on this connection.
    sent: Position,
    /// Sent segments awaiting an ack: `(last_seq, sent_at)`.
    in_flight: VecDeque<(Seq, Millis)>,
    loading: bool,
}

/// The edge's side of one hub connection at a time.
#[derive(Debug)]
pub struct EdgeSession {
    config: SyncConfig,
    mutation: Option<Mutation>,
    software: String,
    state: EdgePersistent,
    conn: Option<EdgeConn>,
    transmit: VecDeque<Frame>,
    io: VecDeque<EdgeIo>,
}

impl EdgeSession {
    /// `acked` is the hub's position as the edge last recorded it; `head` the edge's last
    /// sealed position.
    pub fn new(config: SyncConfig, software: &str, acked: Position, head: Position) -> Self {
        assert_eq!(acked.origin, head.origin, "one origin per session");
        EdgeSession {
            config,
            mutation: None,
            software: software.to_owned(),
            state: EdgePersistent {
                acked,
                head,
                diverged: false,
            },
            conn: None,
            transmit: VecDeque::new(),
            io: VecDeque::new(),
        }
    }

    /// Switches on a deliberate bug (tests of the simulator only).
    #[cfg(feature = "mutations")]
    pub fn with_mutation(mut self, m: Mutation) -> Self {
        self.mutation = Some(m);
        self
    }

    pub fn acked(&self) -> &Position {
        &self.state.acked
    }

    pub fn is_diverged(&self) -> bool {
        self.state.diverged
    }

    pub fn handle_connected(&mut self, now: Millis) {
        self.conn = Some(EdgeConn {
            welcomed: false,
            hello_at: now,
            sent: self.state.acked.clone(),
            in_flight: VecDeque::new(),
            loading: false,
        });
        self.send_hello();
    }

    fn send_hello(&mut self) {
        self.transmit.push_back(Frame::Hello {
            protocol: PROTOCOL_VERSION,
            software: self.software.clone(),
            vector: vec![self.state.head.clone()],
        });
    }

    pub fn handle_disconnected(&mut self, _now: Millis) {
        self.conn = None;
        self.transmit.clear();
    }

    /// The edge sealed more of its log.
    pub fn handle_sealed(&mut self, now: Millis, head: Position) {
        assert!(
            head.seq >= self.state.head.seq,
            "the sealed head only moves forward"
        );
        self.state.head = head;
        self.pump(now);
    }

    fn diverge(&mut self, ours: Position, theirs: Position) {
        self.state.diverged = true;
        self.transmit.push_back(Frame::Divergence {
            origin: ours.origin.clone(),
            seq: ours.seq,
            ours: ours.hash,
            theirs: theirs.hash,
        });
        self.io.push_back(EdgeIo::Diverged { ours, theirs });
        self.conn = None;
    }

    fn record_ack(&mut self, pos: Position) {
        if pos.seq > self.state.acked.seq {
            self.io.push_back(EdgeIo::RecordAck(pos.clone()));
        }
        self.state.acked = pos;
    }

    pub fn handle_frame(&mut self, now: Millis, frame: Frame) {
        if self.conn.is_none() || self.state.diverged {
            return;
        }
        let origin = self.state.head.origin.clone();
        match frame {
            Frame::Welcome { .. } if self.conn.as_ref().is_some_and(|c| c.welcomed) => {
                // A repeated welcome: the session already streams from the first one.
            }
            Frame::Welcome { protocol, vector } => {
                if protocol != PROTOCOL_VERSION {
                    self.transmit.push_back(Frame::Close {
                        reason: format!("protocol {protocol} is not {PROTOCOL_VERSION}"),
                    });
                    self.conn = None;
                    return;
                }
                let hub = vector
                    .into_iter()
                    .find(|p| p.origin == origin)
                    .unwrap_or_else(|| Position::genesis(&origin));
                if hub.seq > self.state.head.seq
                    || (hub.seq == self.state.head.seq && hub.hash != self.state.head.hash)
                {
                    let ours = self.state.head.clone();
                    self.diverge(ours, hub);
                    return;
                }
                // Resume from the hub's durable cursor, never from what was sent before.
                let resume = if self.mutation == Some(Mutation::ResumeFromEdgeAck) {
                    self.state.acked.clone()
                } else {
                    self.record_ack(hub.clone());
                    hub
                };
                if let Some(c) = self.conn.as_mut() {
                    c.welcomed = true;
                    c.sent = resume;
                }
                self.pump(now);
            }
            Frame::Ack(pos) if pos.origin == origin => {
                if pos.seq > self.state.head.seq {
                    let ours = self.state.head.clone();
                    self.diverge(ours, pos);
                    return;
                }
                if pos.seq > self.state.acked.seq {
                    self.record_ack(pos.clone());
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
                self.pump(now);
            }
            Frame::Reject { resume, .. } if resume.origin == origin => {
                // Start again from the receiver's position; whatever was in flight after it
                // is sent again.
                if let Some(c) = self.conn.as_mut() {
                    c.sent = resume;
                    c.in_flight.clear();
                    c.loading = false;
                }
                self.pump(now);
            }
            Frame::Divergence {
                origin: o,
                seq,
                ours,
                theirs,
            } if o == origin => {
                self.state.diverged = true;
                self.io.push_back(EdgeIo::Diverged {
                    ours: Position {
                        origin: o.clone(),
                        seq,
                        hash: theirs,
                    },
                    theirs: Position {
                        origin: o,
                        seq,
                        hash: ours,
                    },
                });
                self.conn = None;
            }
            Frame::Close { .. } => self.conn = None,
            // Anything else (another origin's ack, an unexpected hello) is ignored.
            _ => {}
        }
    }

    /// Segments loaded for a [`EdgeIo::LoadSegments`] request.
    pub fn handle_segments(&mut self, now: Millis, segments: Vec<Segment>) {
        let window = self.config.window_segments;
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        c.loading = false;
        for s in segments {
            if c.in_flight.len() >= window {
                break;
            }
            if s.first_seq != c.sent.seq.next() {
                continue; // a stale load from before a reject or a resume
            }
            if s.prev_hash != c.sent.hash {
                // Our own log does not chain onto the position the hub holds.
                let ours = Position {
                    origin: s.origin.clone(),
                    seq: c.sent.seq,
                    hash: s.prev_hash,
                };
                let theirs = c.sent.clone();
                self.diverge(ours, theirs);
                return;
            }
            c.sent = Position {
                origin: s.origin.clone(),
                seq: s.last_seq,
                hash: s.hash,
            };
            c.in_flight.push_back((s.last_seq, now));
            self.transmit.push_back(Frame::Segment(s));
        }
        self.pump(now);
    }

    /// Asks for more segments when the window has room and there are sealed entries to send.
    fn pump(&mut self, _now: Millis) {
        let window = self.config.window_segments;
        let head = self.state.head.seq;
        let Some(c) = self.conn.as_mut() else {
            return;
        };
        if c.welcomed && !c.loading && c.in_flight.len() < window && c.sent.seq < head {
            c.loading = true;
            self.io.push_back(EdgeIo::LoadSegments {
                after: c.sent.seq,
                max: window - c.in_flight.len(),
            });
        }
    }

    pub fn handle_timeout(&mut self, now: Millis) {
        let timeout = self.config.ack_timeout_ms;
        let acked = self.state.acked.clone();
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
        if c.in_flight
            .front()
            .is_some_and(|(_, at)| now >= at + timeout)
        {
            // Nothing was acknowledged in time: resend from the last acknowledged position.
            c.sent = acked;
            c.in_flight.clear();
            c.loading = false;
            self.pump(now);
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    pub fn poll_io(&mut self) -> Option<EdgeIo> {
        self.io.pop_front()
    }

    /// When [`EdgeSession::handle_timeout`] should be called next.
    pub fn poll_timeout(&self) -> Option<Millis> {
        let c = self.conn.as_ref()?;
        if !c.welcomed {
            return Some(c.hello_at + self.config.ack_timeout_ms);
        }
        c.in_flight
            .front()
            .map(|(_, at)| at + self.config.ack_timeout_ms)
    }
}

/// Storage work the hub session asks of its driver.
#[derive(Debug, Clone, PartialEq)]
pub enum HubIo {
    /// Persist this verified segment (and its decoded entries) and advance the origin's
    /// durable position in one transaction; answer with [`HubSession::handle_persisted`].
    Persist {
        segment: Segment,
        entries: Vec<LogEntry>,
    },
    /// A segment was refused (reported, never stored).
    Refused {
        first_seq: Seq,
        reason: RejectReason,
        detail: String,
    },
    /// The edge holds a different history; nothing is merged.
    Diverged { ours: Position, theirs: Position },
}

/// The hub's side of one edge connection. The origin is the branch the connection
/// authenticated as (from its certificate), never a branch id taken from a message.
#[derive(Debug)]
pub struct HubSession {
    mutation: Option<Mutation>,
    schema: Arc<Schema>,
    origin: OriginId,
    /// Durable at the hub.
    durable: Position,
    /// Verified and handed to storage (durable, or on its way).
    verified: Position,
    /// A reject was sent and the resend has not arrived: later out-of-order segments (the
    /// rest of the window) are dropped quietly instead of each drawing another reject.
    awaiting_resend: bool,
    greeted: bool,
    closed: bool,
    transmit: VecDeque<Frame>,
    io: VecDeque<HubIo>,
}

impl HubSession {
    pub fn new(schema: Arc<Schema>, origin: OriginId, durable: Position) -> Self {
        assert_eq!(
            durable.origin, origin,
            "the position is the branch's origin"
        );
        HubSession {
            mutation: None,
            schema,
            origin,
            verified: durable.clone(),
            durable,
            awaiting_resend: false,
            greeted: false,
            closed: false,
            transmit: VecDeque::new(),
            io: VecDeque::new(),
        }
    }

    /// Switches on a deliberate bug (tests of the simulator only).
    #[cfg(feature = "mutations")]
    pub fn with_mutation(mut self, m: Mutation) -> Self {
        self.mutation = Some(m);
        self
    }

    pub fn durable(&self) -> &Position {
        &self.durable
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }

    fn close(&mut self, reason: &str) {
        self.transmit.push_back(Frame::Close {
            reason: reason.to_owned(),
        });
        self.closed = true;
    }

    fn reject(&mut self, s: &Segment, reason: RejectReason, detail: String) {
        self.awaiting_resend = true;
        self.io.push_back(HubIo::Refused {
            first_seq: s.first_seq,
            reason,
            detail,
        });
        self.transmit.push_back(Frame::Reject {
            origin: self.origin.clone(),
            first_seq: s.first_seq,
            reason,
            resume: self.verified.clone(),
        });
    }

    pub fn handle_frame(&mut self, _now: Millis, frame: Frame) {
        if self.closed {
            return;
        }
        match frame {
            Frame::Hello {
                protocol, vector, ..
            } => {
                if protocol != PROTOCOL_VERSION {
                    self.close(&format!("protocol {protocol} is not {PROTOCOL_VERSION}"));
                    return;
                }
                if self.greeted {
                    // A repeated hello (the welcome was lost, or the network duplicated it):
                    // its head may be older than what the hub has received since, so it is
                    // answered, not judged again.
                    self.transmit.push_back(Frame::Welcome {
                        protocol: PROTOCOL_VERSION,
                        vector: vec![self.durable.clone()],
                    });
                    return;
                }
                let edge = vector
                    .into_iter()
                    .find(|p| p.origin == self.origin)
                    .unwrap_or_else(|| Position::genesis(&self.origin));
                let lost = edge.seq < self.durable.seq;
                let forked = edge.seq == self.durable.seq && edge.hash != self.durable.hash;
                if lost || forked {
                    // The edge has less than the hub holds, or another history: report it and
                    // keep what was acknowledged.
                    let ours = self.durable.clone();
                    self.io.push_back(HubIo::Diverged {
                        ours: ours.clone(),
                        theirs: edge.clone(),
                    });
                    self.transmit.push_back(Frame::Divergence {
                        origin: self.origin.clone(),
                        seq: edge.seq,
                        ours: ours.hash,
                        theirs: edge.hash,
                    });
                    self.closed = true;
                    return;
                }
                self.greeted = true;
                self.transmit.push_back(Frame::Welcome {
                    protocol: PROTOCOL_VERSION,
                    vector: vec![self.durable.clone()],
                });
            }
            Frame::Segment(s) => {
                if !self.greeted {
                    self.close("a session starts with hello");
                    return;
                }
                if s.origin != self.origin {
                    let detail = format!("{} may not write origin {}", self.origin, s.origin);
                    self.reject(&s, RejectReason::ForeignOrigin, detail);
                    return;
                }
                if self.mutation == Some(Mutation::SkipDuplicateCheck)
                    && s.last_seq <= self.verified.seq
                {
                    self.io.push_back(HubIo::Persist {
                        segment: s,
                        entries: Vec::new(),
                    });
                    return;
                }
                if s.last_seq <= self.durable.seq {
                    // A duplicate (a retransmit or a replay): acknowledged, not stored again.
                    self.transmit.push_back(Frame::Ack(self.durable.clone()));
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
                    self.reject(&s, RejectReason::OutOfOrder, detail);
                    return;
                }
                // The hub verifies hash and chain link before it asks storage to persist.
                let checked = if self.mutation == Some(Mutation::SkipChainCheck) {
                    Ok(Vec::new())
                } else {
                    s.verify(&self.verified.hash, &self.schema)
                };
                match checked {
                    Ok(entries) => {
                        self.awaiting_resend = false;
                        self.verified = Position {
                            origin: self.origin.clone(),
                            seq: s.last_seq,
                            hash: s.hash,
                        };
                        if self.mutation == Some(Mutation::AckBeforePersist) {
                            self.transmit.push_back(Frame::Ack(self.verified.clone()));
                        }
                        self.io.push_back(HubIo::Persist {
                            segment: s,
                            entries,
                        });
                    }
                    Err(SegmentError::ChainBreak) => {
                        self.reject(&s, RejectReason::OutOfOrder, "chain break".into());
                    }
                    Err(e) => self.reject(&s, RejectReason::Corrupt, e.to_string()),
                }
            }
            Frame::Close { .. } => self.closed = true,
            _ => {}
        }
    }

    /// Storage committed a segment: the durable position moves and the edge is told.
    pub fn handle_persisted(&mut self, _now: Millis, pos: Position) {
        if self.mutation.is_none() {
            assert!(
                pos.seq > self.durable.seq && pos.seq <= self.verified.seq,
                "persisted positions are verified and move forward"
            );
        }
        self.durable = pos.clone();
        if !self.closed {
            self.transmit.push_back(Frame::Ack(pos));
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.transmit.pop_front()
    }

    pub fn poll_io(&mut self) -> Option<HubIo> {
        self.io.pop_front()
    }
}
