//! Property tests for the log's codecs and hash chain: round trips, and that any changed byte,
//! dropped entry or reordered segment fails verification.

use std::collections::BTreeMap;

use crdts::{CmRDT, VClock};
use proptest::prelude::*;
use shared::log::{
    ChainHash, EntryOp, LogEntry, LogEntryWire, Segment, SegmentError, verify_chain,
};
use shared::{BranchId, Hlc, OriginId, Row, Schema, Seq, Timestamp, Value};

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        ".{0,12}".prop_map(Value::Text),
        any::<i64>().prop_map(|t| Value::Timestamp(Timestamp(t))),
        "[0-9]{1,5}".prop_map(Value::Json),
    ]
}

fn schema() -> Schema {
    shared::pos::schema()
}

/// A row of `order_payment` (the table the generated entries name), with arbitrary values.
fn row() -> impl Strategy<Value = Row> {
    let columns = schema()
        .columns(schema().table_index("order_payment").unwrap())
        .clone();
    (
        "[a-z0-9]{1,10}",
        1u64..1000,
        any::<i64>(),
        proptest::option::of(any::<u64>()),
        proptest::collection::vec(value(), columns.len()),
    )
        .prop_map(move |(id, version, t, seq, values)| Row {
            id,
            version,
            created_at: Timestamp(t),
            updated_at: Timestamp(t),
            seq,
            columns: columns.clone(),
            values,
        })
}

fn op() -> impl Strategy<Value = EntryOp> {
    prop_oneof![
        Just(EntryOp::Insert),
        Just(EntryOp::Update),
        Just(EntryOp::Delete)
    ]
}

/// Entries of origin `o` numbered from 1, with optional clocks and scopes.
fn entries(max: usize) -> impl Strategy<Value = Vec<LogEntry>> {
    proptest::collection::vec(
        (
            op(),
            row(),
            any::<u64>(),
            proptest::option::of(proptest::collection::btree_map("[a-c]", 1u64..5, 0..3)),
            any::<bool>(),
        ),
        1..max,
    )
    .prop_map(|v| {
        let origin = OriginId::parse("B001").unwrap();
        v.into_iter()
            .enumerate()
            .map(|(i, (op, row, hlc, clock, scoped))| LogEntry {
                origin: origin.clone(),
                seq: Seq(i as u64 + 1),
                hlc: Hlc(hlc),
                table: "order_payment".into(),
                op,
                row_id: row.id.clone(),
                row,
                clock: clock.map(|m: BTreeMap<String, u64>| {
                    let mut c = VClock::new();
                    for (actor, n) in m {
                        for _ in 0..n {
                            c.apply(c.inc(OriginId::parse(&actor).unwrap()));
                        }
                    }
                    c
                }),
                scope: scoped.then(|| BranchId::parse("B002").unwrap()),
            })
            .collect()
    })
}

/// Cuts `entries` into segments of `size` and chains them from genesis.
fn chain(entries: &[LogEntry], size: usize) -> Vec<Segment> {
    let origin = entries[0].origin.clone();
    let mut prev = ChainHash::genesis(&origin);
    entries
        .chunks(size)
        .map(|chunk| {
            let encoded: Vec<Vec<u8>> = chunk.iter().map(LogEntry::encode).collect();
            let s = Segment::seal(
                origin.clone(),
                chunk[0].seq,
                prev,
                encoded.iter().map(Vec::as_slice),
            );
            prev = s.hash;
            s
        })
        .collect()
}

proptest! {
    #[test]
    fn entries_round_trip(es in entries(8)) {
        for e in &es {
            prop_assert_eq!(&LogEntry::decode(&e.encode(), &schema()).unwrap(), e);
        }
    }

    #[test]
    fn borrowed_entries_encode_identically(es in entries(8)) {
        for e in &es {
            prop_assert_eq!(shared::log::LogEntryRef::from(e).encode(), e.encode());
        }
    }

    #[test]
    fn segment_body_equals_postcard_of_the_entries(es in entries(8)) {
        let s = &chain(&es, es.len())[0];
        let wires: Vec<LogEntryWire> = es.iter().map(|e| postcard::from_bytes(&e.encode()).unwrap()).collect();
        prop_assert_eq!(&s.body, &postcard::to_stdvec(&wires).unwrap());
        let back = s.verify(&ChainHash::genesis(&es[0].origin), &schema()).unwrap();
        prop_assert_eq!(back, es);
    }

    #[test]
    fn chains_verify_and_segments_round_trip(es in entries(20), size in 1usize..6) {
        let segs = chain(&es, size);
        let genesis = ChainHash::genesis(&es[0].origin);
        let head = verify_chain(genesis, &segs, &schema()).unwrap();
        prop_assert_eq!(head, segs.last().unwrap().hash);
        for s in &segs {
            let bytes = postcard::to_stdvec(s).unwrap();
            prop_assert_eq!(&postcard::from_bytes::<Segment>(&bytes).unwrap(), s);
        }
    }

    #[test]
    fn a_changed_byte_fails(es in entries(8), at in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let mut s = chain(&es, es.len()).remove(0);
        let i = at.index(s.body.len());
        s.body[i] ^= flip;
        prop_assert_eq!(s.verify(&ChainHash::genesis(&es[0].origin), &schema()).unwrap_err(), SegmentError::HashMismatch);
    }

    #[test]
    fn a_dropped_entry_fails(es in entries(8), at in any::<prop::sample::Index>()) {
        prop_assume!(es.len() >= 2);
        let genesis = ChainHash::genesis(&es[0].origin);
        let mut s = chain(&es, es.len()).remove(0);
        let mut fewer: Vec<LogEntryWire> = es.iter().map(|e| postcard::from_bytes(&e.encode()).unwrap()).collect();
        fewer.remove(at.index(es.len()));
        // The sender re-encodes without the entry but keeps the header and hash: hash fails.
        let forged = Segment { body: postcard::to_stdvec(&fewer).unwrap(), ..s.clone() };
        prop_assert!(forged.verify(&genesis, &schema()).is_err());
        // Re-hashed honestly, the gap in seqs is still caught.
        s.body = postcard::to_stdvec(&fewer).unwrap();
        s.hash = shared::log::chain_hash(&genesis, &s.body);
        prop_assert!(s.verify(&genesis, &schema()).is_err());
    }

    #[test]
    fn reordered_or_missing_segments_fail(es in entries(20), a in any::<prop::sample::Index>(), b in any::<prop::sample::Index>()) {
        let segs = chain(&es, 3);
        prop_assume!(segs.len() >= 2);
        let (i, j) = (a.index(segs.len()), b.index(segs.len()));
        prop_assume!(i != j);
        let mut swapped = segs.clone();
        swapped.swap(i, j);
        let genesis = ChainHash::genesis(&es[0].origin);
        prop_assert_eq!(verify_chain(genesis, &swapped, &schema()).unwrap_err(), SegmentError::ChainBreak);
        let mut dropped = segs.clone();
        dropped.remove(i.min(segs.len() - 2));
        prop_assert!(verify_chain(genesis, &dropped, &schema()).is_err());
    }

    #[test]
    fn wire_frames_round_trip_and_hostile_frames_never_panic(es in entries(6), junk in proptest::collection::vec(any::<u8>(), 0..256)) {
        use shared::wire::{Frame, Position};
        let segs = chain(&es, 2);
        let origin = es[0].origin.clone();
        let frames = vec![
            Frame::Segment(segs[0].clone()),
            Frame::Ack(Position::genesis(&origin)),
            Frame::Welcome { protocol: shared::wire::PROTOCOL_VERSION, vector: vec![Position::genesis(&origin)] },
        ];
        for f in &frames {
            let bytes = f.encode();
            let (back, used) = Frame::decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(&back, f);
            prop_assert_eq!(used, bytes.len());
            // Any prefix asks for more bytes or fails cleanly; a flipped payload byte fails
            // cleanly or decodes to something else, never panics.
            for cut in 0..bytes.len() {
                let _ = Frame::decode(&bytes[..cut]);
            }
            let mut flipped = bytes.clone();
            let i = 5 + junk.first().copied().unwrap_or(0) as usize % (bytes.len() - 5);
            flipped[i] ^= 0xa5;
            let _ = Frame::decode(&flipped);
        }
        let mut hostile = vec![shared::wire::FRAME_VERSION];
        hostile.extend((junk.len() as u32).to_le_bytes());
        hostile.extend(&junk);
        let _ = Frame::decode(&hostile);
    }

    #[test]
    fn hostile_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = LogEntry::decode(&bytes, &schema());
        if let Ok(s) = postcard::from_bytes::<Segment>(&bytes) {
            let _ = s.verify(&ChainHash([0; 32]), &schema());
        }
    }
}

#[test]
fn another_origins_chain_does_not_splice() {
    let a = OriginId::parse("B001").unwrap();
    let b = OriginId::parse("B002").unwrap();
    assert_ne!(ChainHash::genesis(&a), ChainHash::genesis(&b));
}
