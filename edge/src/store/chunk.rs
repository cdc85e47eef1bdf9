//! Log chunks: the origin log is stored as one SQLite row per run of entries written by one
//! group commit (split where a segment is sealed), instead of one row per entry. A chunk is the
//! concatenation of `varint(commit version) varint(length) entry-bytes` per entry; entry bytes
//! are exactly the postcard bytes that segments hash, so nothing is re-encoded.

use shared::Version;

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn take_varint(bytes: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes.split_first()?;
        *bytes = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

pub fn encode<'a>(entries: impl Iterator<Item = (Version, &'a [u8])> + Clone) -> Vec<u8> {
    let size: usize = entries.clone().map(|(_, b)| b.len() + 12).sum();
    let mut out = Vec::with_capacity(size);
    for (version, bytes) in entries {
        put_varint(&mut out, version.0);
        put_varint(&mut out, bytes.len() as u64);
        out.extend_from_slice(bytes);
    }
    out
}

/// Decodes a chunk into `(version, entry bytes)`; `None` when it is damaged.
pub fn decode(mut blob: &[u8]) -> Option<Vec<(Version, &[u8])>> {
    let mut out = Vec::new();
    while !blob.is_empty() {
        let version = take_varint(&mut blob)?;
        let len = usize::try_from(take_varint(&mut blob)?).ok()?;
        if len > blob.len() {
            return None;
        }
        let (entry, rest) = blob.split_at(len);
        out.push((Version(version), entry));
        blob = rest;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(entries in proptest::collection::vec((any::<u64>(), proptest::collection::vec(any::<u8>(), 0..300)), 0..20)) {
            let blob = encode(entries.iter().map(|(v, b)| (Version(*v), b.as_slice())));
            let back = decode(&blob).unwrap();
            prop_assert_eq!(back.len(), entries.len());
            for ((v, b), (v2, b2)) in entries.iter().zip(back) {
                prop_assert_eq!(Version(*v), v2);
                prop_assert_eq!(b.as_slice(), b2);
            }
        }

        #[test]
        fn damaged_chunks_never_panic(blob in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = decode(&blob);
        }
    }
}
