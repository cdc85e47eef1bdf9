//! Hostile bytes against every decoder the sync link and the stores use: sync frames (whole
//! and reassembled from a stream), log entries, segments and shared-row registers. Decoding
//! may fail; it must never panic, hang or allocate without bound.
//!
//! `cargo +nightly fuzz run wire_decode` from `shared/` (the stable test suite runs the same
//! decoders under proptest: `shared/tests/log_props.rs`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use shared::log::LogEntry;
use shared::merge::SharedRow;
use shared::wire::{Frame, FrameReader};

fuzz_target!(|data: &[u8]| {
    let schema = shared::pos::schema();
    if let Ok(Some((Frame::Segment(s), _))) = Frame::decode(data) {
        let _ = s.verify(&s.prev_hash, &schema);
    }
    let mut reader = FrameReader::default();
    for chunk in data.chunks(7) {
        reader.push(chunk);
        while let Ok(Some(_)) = reader.next_frame() {}
    }
    let _ = LogEntry::decode(data, &schema);
    let _ = SharedRow::decode(data);
});
