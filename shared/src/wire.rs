//! Sync wire frames: `[version byte][u32 little-endian payload length][postcard payload]`.
//! Every length and count is bounded by a named limit; decoding hostile bytes returns an
//! error, never panics.

use serde::{Deserialize, Serialize};

use crate::ids::{OriginId, Seq};
use crate::log::{ChainHash, SEGMENT_BYTES_MAX, Segment};
use crate::release::{OFFERS_MAX, REPORTS_MAX, ReleaseOffer, UpdateReport};

/// The sync protocol's version, exchanged in the handshake.
pub const PROTOCOL_VERSION: u16 = 2;
/// The oldest protocol a hub still speaks: protocol 1 edges (no `Platform`, `Fetch` without a
/// target) keep syncing and can be updated to this one.
pub const PROTOCOL_VERSION_MIN: u16 = 1;
/// The QUIC application protocol (ALPN) both sides require.
pub const ALPN: &[u8] = b"outpost-sync/1";
/// The name the hub's certificate carries and every edge verifies, whatever address it dials.
pub const HUB_SERVER_NAME: &str = "outpost-hub";
/// The frame format's version byte.
pub const FRAME_VERSION: u8 = 1;
/// Bytes before the payload: version byte and length.
pub const FRAME_HEADER_BYTES: usize = 5;
/// Largest payload: a whole segment and its header.
pub const FRAME_PAYLOAD_MAX: usize = SEGMENT_BYTES_MAX + 4096;
/// Most origins in a version vector.
pub const VECTOR_ORIGINS_MAX: usize = 4096;
/// Longest free text (software version, reasons).
pub const TEXT_BYTES_MAX: usize = 256;

const _: () = assert!(FRAME_PAYLOAD_MAX < u32::MAX as usize);

/// A replica's durable, contiguous position in one origin's log: the last seq it holds and
/// the hash of the segment that ends there (`lastSeenId`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    pub origin: OriginId,
    pub seq: Seq,
    pub hash: ChainHash,
}

impl Position {
    /// The position before an origin's first entry.
    pub fn genesis(origin: &OriginId) -> Position {
        Position {
            origin: origin.clone(),
            seq: Seq::ZERO,
            hash: ChainHash::genesis(origin),
        }
    }
}

/// Why a segment was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectReason {
    /// The hash does not match the bytes, or the segment does not decode.
    Corrupt,
    /// It does not chain onto the receiver's position (a gap or a reordering).
    OutOfOrder,
    /// The sender may not write this origin.
    ForeignOrigin,
}

/// One sync message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Frame {
    /// Edge → hub, first: the edge's protocol, software and its positions. (A protocol 2
    /// edge follows it with [`Frame::Platform`].)
    Hello {
        protocol: u16,
        software: String,
        vector: Vec<Position>,
    },
    /// Hub → edge: the hub's durable positions (for the edge's own origin: where to resume).
    Welcome {
        protocol: u16,
        vector: Vec<Position>,
    },
    Segment(Segment),
    /// The receiver holds everything up to this position durably.
    Ack(Position),
    /// A segment was refused; resend from `resume`.
    Reject {
        origin: OriginId,
        first_seq: Seq,
        reason: RejectReason,
        resume: Position,
    },
    /// The two sides hold different histories at the same position; nothing is merged.
    Divergence {
        origin: OriginId,
        seq: Seq,
        ours: ChainHash,
        theirs: ChainHash,
    },
    /// The sender closes the session, saying why.
    Close {
        reason: String,
    },
    /// Edge → hub, now and then: how far behind the hub is, as the edge sees it (entries
    /// written and not yet acknowledged, and the creation time of the oldest such payment,
    /// in microseconds since the epoch). Informational: it changes no position.
    Status {
        unsynced: u64,
        oldest_unsynced_payment: Option<i64>,
    },
    /// Hub → edge, after the welcome and whenever they change: the releases for the branch's
    /// rollout ring newer than the version the edge runs, newest first.
    Releases {
        offers: Vec<ReleaseOffer>,
    },
    /// Edge → hub, first on a stream of its own (protocol 1): send release `version` from
    /// byte `offset`, for the hub's own platform. Protocol 2 edges send [`Frame::FetchFor`].
    Fetch {
        version: String,
        offset: u64,
    },
    /// Hub → edge, the answer to `Fetch`: the release's bytes from `offset` to `size` follow
    /// raw on the stream, which then finishes. (A refusal is a `Close` instead.)
    Artifact {
        version: String,
        size: u64,
        offset: u64,
    },
    /// Edge → hub after the welcome: how its latest update attempts ended.
    UpdateReports {
        reports: Vec<UpdateReport>,
    },
    // Protocol 2. Frames are numbered by their place in this enum: a frame's layout never
    // changes once shipped, and new frames go at the end, so that a hub reads the frames of
    // every edge older than itself.
    /// Edge → hub, right after `Hello` (protocol 2 on): the platform the edge runs on
    /// (`<arch>-<os>`), so that it is offered, and may fetch, only releases it can run.
    Platform {
        target: String,
    },
    /// Edge → hub, first on a stream of its own (protocol 2 on): send release `version` for
    /// `target` from byte `offset`.
    FetchFor {
        version: String,
        target: String,
        offset: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("unknown frame version {0}")]
    Version(u8),
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("frame does not decode: {0}")]
    Decode(String),
    #[error("frame exceeds a limit: {0}")]
    Limit(&'static str),
}

impl Frame {
    /// Checks the limits a decoded frame must respect.
    fn check(&self) -> Result<(), WireError> {
        let text = |s: &str| {
            if s.len() > TEXT_BYTES_MAX {
                Err(WireError::Limit("text longer than 256 bytes"))
            } else {
                Ok(())
            }
        };
        match self {
            Frame::Hello {
                software, vector, ..
            } => {
                text(software)?;
                if vector.len() > VECTOR_ORIGINS_MAX {
                    return Err(WireError::Limit("version vector too long"));
                }
            }
            Frame::Welcome { vector, .. } if vector.len() > VECTOR_ORIGINS_MAX => {
                return Err(WireError::Limit("version vector too long"));
            }
            Frame::Close { reason } => text(reason)?,
            Frame::Releases { offers } => {
                if offers.len() > OFFERS_MAX {
                    return Err(WireError::Limit("too many release offers"));
                }
                for o in offers {
                    text(&o.version)?;
                    text(&o.target)?;
                    if o.signature.len() != 64 {
                        return Err(WireError::Limit("a release signature is 64 bytes"));
                    }
                }
            }
            Frame::Fetch { version, .. } | Frame::Artifact { version, .. } => text(version)?,
            Frame::Platform { target } => text(target)?,
            Frame::FetchFor {
                version, target, ..
            } => {
                text(version)?;
                text(target)?;
            }
            Frame::UpdateReports { reports } => {
                if reports.len() > REPORTS_MAX {
                    return Err(WireError::Limit("too many update reports"));
                }
                for r in reports {
                    text(&r.version)?;
                    text(&r.from)?;
                    text(&r.detail)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The frame with its header.
    pub fn encode(&self) -> Vec<u8> {
        let payload = postcard::to_stdvec(self).expect("postcard encodes frames");
        debug_assert!(payload.len() <= FRAME_PAYLOAD_MAX, "a frame over the limit");
        let mut out = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
        out.push(FRAME_VERSION);
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Decodes one frame from the front of `bytes`: `Ok(None)` when more bytes are needed,
    /// else the frame and how many bytes it used.
    pub fn decode(bytes: &[u8]) -> Result<Option<(Frame, usize)>, WireError> {
        let Some(&version) = bytes.first() else {
            return Ok(None);
        };
        if version != FRAME_VERSION {
            return Err(WireError::Version(version));
        }
        let Some(len) = bytes.get(1..FRAME_HEADER_BYTES) else {
            return Ok(None);
        };
        let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len > FRAME_PAYLOAD_MAX {
            return Err(WireError::TooLarge(len));
        }
        let Some(payload) = bytes.get(FRAME_HEADER_BYTES..FRAME_HEADER_BYTES + len) else {
            return Ok(None);
        };
        let frame: Frame =
            postcard::from_bytes(payload).map_err(|e| WireError::Decode(e.to_string()))?;
        frame.check()?;
        Ok(Some((frame, FRAME_HEADER_BYTES + len)))
    }
}

/// Reassembles frames from a byte stream (a QUIC stream delivers arbitrary chunks). It holds
/// at most one frame's bytes beyond what was consumed: a length over the limit is refused as
/// soon as the header arrives.
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
    start: usize,
}

impl FrameReader {
    pub fn push(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > 64 * 1024 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        match Frame::decode(&self.buf[self.start..])? {
            Some((frame, used)) => {
                self.start += used;
                Ok(Some(frame))
            }
            None => Ok(None),
        }
    }

    /// The bytes received after the last frame taken (for a stream that switches from frames
    /// to raw bytes, like a release download).
    pub fn into_rest(mut self) -> Vec<u8> {
        self.buf.drain(..self.start);
        self.buf
    }

    /// Whether no partial frame is buffered.
    pub fn is_empty(&self) -> bool {
        self.start == self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn frames_reassemble_from_any_chunking() {
        let frames = [
            Frame::Close { reason: "a".into() },
            Frame::Ack(Position::genesis(&OriginId::hub())),
            Frame::Close {
                reason: "b".repeat(200),
            },
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(Frame::encode).collect();
        for chunk in [1, 2, 7, 64, bytes.len()] {
            let mut r = FrameReader::default();
            let mut out = Vec::new();
            for c in bytes.chunks(chunk) {
                r.push(c);
                while let Some(f) = r.next_frame().unwrap() {
                    out.push(f);
                }
            }
            assert_eq!(out, frames);
            assert!(r.is_empty());
        }
    }

    #[test]
    fn an_oversized_length_is_refused_from_the_header() {
        let mut r = FrameReader::default();
        let mut header = vec![FRAME_VERSION];
        header.extend_from_slice(&(FRAME_PAYLOAD_MAX as u32 + 1).to_le_bytes());
        r.push(&header);
        assert!(matches!(r.next_frame(), Err(WireError::TooLarge(_))));
    }
    use super::*;

    /// Bytes a protocol 1 edge (the release before `Platform`) sends, captured from that
    /// release's build. A hub must read them as long as it accepts protocol 1.
    #[test]
    fn frames_of_protocol_1_edges_still_decode() {
        let o = OriginId::parse("B001").unwrap();
        let golden = [
            (
                "012f000000000105302e312e30010442303031006574080f461a8b6368f4737d37550806dec4a3ff294769765458341a422e1d15",
                Frame::Hello {
                    protocol: 1,
                    software: "0.1.0".into(),
                    vector: vec![Position::genesis(&o)],
                },
            ),
            (
                "01080000000905302e322e304d",
                Frame::Fetch {
                    version: "0.2.0".into(),
                    offset: 77,
                },
            ),
            (
                "01120000000b0105302e322e3005302e312e300201640a",
                Frame::UpdateReports {
                    reports: vec![UpdateReport {
                        version: "0.2.0".into(),
                        from: "0.1.0".into(),
                        outcome: crate::release::UpdateOutcome::RolledBack,
                        detail: "d".into(),
                        at: 5,
                    }],
                },
            ),
            (
                "010400000007030112",
                Frame::Status {
                    unsynced: 3,
                    oldest_unsynced_payment: Some(9),
                },
            ),
        ];
        for (bytes, frame) in golden {
            let bytes = hex::decode(bytes).unwrap();
            let (decoded, used) = Frame::decode(&bytes).unwrap().unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(decoded, frame);
            assert_eq!(frame.encode(), bytes, "the layout of {frame:?} changed");
        }
    }

    #[test]
    fn frames_round_trip_and_arrive_in_pieces() {
        let o = OriginId::parse("B001").unwrap();
        let frames = vec![
            Frame::Hello {
                protocol: PROTOCOL_VERSION,
                software: "0.1.0".into(),
                vector: vec![Position::genesis(&o)],
            },
            Frame::Platform {
                target: crate::release::this_target(),
            },
            Frame::Ack(Position::genesis(&o)),
            Frame::Close {
                reason: "bye".into(),
            },
            Frame::Status {
                unsynced: 3,
                oldest_unsynced_payment: Some(1_700_000_000_000_000),
            },
            Frame::Releases {
                offers: vec![crate::release::ReleaseOffer {
                    version: "0.2.0".into(),
                    target: crate::release::this_target(),
                    size: 1234,
                    hash: [9; 32],
                    signature: vec![1; 64],
                }],
            },
            Frame::Fetch {
                version: "0.2.0".into(),
                offset: 77,
            },
            Frame::FetchFor {
                version: "0.2.0".into(),
                target: crate::release::this_target(),
                offset: 77,
            },
            Frame::Artifact {
                version: "0.2.0".into(),
                size: 1234,
                offset: 77,
            },
            Frame::UpdateReports {
                reports: vec![crate::release::UpdateReport {
                    version: "0.2.0".into(),
                    from: "0.1.0".into(),
                    outcome: crate::release::UpdateOutcome::RolledBack,
                    detail: "exited with status 3 on start, 3 times".into(),
                    at: 1,
                }],
            },
        ];
        let mut stream = Vec::new();
        for f in &frames {
            stream.extend(f.encode());
        }
        // Fed one byte at a time, the decoder waits, then yields each frame whole.
        let mut buf = Vec::new();
        let mut out = Vec::new();
        for b in stream {
            buf.push(b);
            while let Some((f, used)) = Frame::decode(&buf).unwrap() {
                out.push(f);
                buf.drain(..used);
            }
        }
        assert_eq!(out, frames);
    }

    #[test]
    fn hostile_headers_are_errors() {
        assert_eq!(Frame::decode(&[9, 0, 0, 0, 0]), Err(WireError::Version(9)));
        let huge = [FRAME_VERSION, 0xff, 0xff, 0xff, 0x7f];
        assert!(matches!(Frame::decode(&huge), Err(WireError::TooLarge(_))));
        let junk = [FRAME_VERSION, 3, 0, 0, 0, 0xff, 0xff, 0xff];
        assert!(matches!(Frame::decode(&junk), Err(WireError::Decode(_))));
        let long = Frame::Close {
            reason: "x".repeat(300),
        }
        .encode();
        assert!(matches!(Frame::decode(&long), Err(WireError::Limit(_))));
    }
}
