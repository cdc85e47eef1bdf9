//! Counters the store keeps for `/metrics`: commit groups, their sizes, commit latency, and
//! the parts of it spent in the COMMIT statement (WAL writes) and in the WAL fsync.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds (inclusive) of the group-size histogram buckets.
pub const GROUP_SIZE_BUCKETS: [u64; 8] = [1, 2, 4, 16, 64, 256, 1024, u64::MAX];
/// Upper bounds of the commit-latency histogram, in microseconds.
pub const COMMIT_US_BUCKETS: [u64; 8] = [100, 250, 500, 1_000, 2_500, 10_000, 50_000, u64::MAX];

#[derive(Debug, Default)]
pub struct StoreMetrics {
    pub groups: AtomicU64,
    /// Groups rolled back and re-run with savepoints after a request failed part-way.
    pub reruns: AtomicU64,
    pub requests: AtomicU64,
    pub rows: AtomicU64,
    pub group_size: [AtomicU64; 8],
    /// A group: applying it and its COMMIT statement.
    pub commit: LatencyHistogram,
    /// The COMMIT statement alone: writing the group's WAL frames (the fsync is apart).
    pub commit_write: LatencyHistogram,
    /// The WAL fsyncs that make commits durable (one may cover several groups).
    pub fsync: LatencyHistogram,
    /// From the start of a group to its answers being sent: the group, the wait for its
    /// fsync, and the hand-over to the answering thread.
    pub answered: LatencyHistogram,
    /// Frames in the WAL at the housekeeper's last checkpoint (a gauge).
    pub wal_frames: AtomicU64,
    /// Checkpoints the writer ran between groups so that the WAL starts over.
    pub wal_restarts: AtomicU64,
    /// WAL truncations by the housekeeper (each blocks the writer while it runs).
    pub wal_truncates: AtomicU64,
}

/// The bucket of `v` among inclusive upper bounds (the last bucket takes the rest).
pub fn bucket(bounds: &[u64; 8], v: u64) -> usize {
    bounds.iter().position(|b| v <= *b).unwrap_or(7)
}

/// Durations in microseconds, by [`COMMIT_US_BUCKETS`], with their sum.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    pub buckets: [AtomicU64; 8],
    pub sum_us: AtomicU64,
}

impl LatencyHistogram {
    pub fn record(&self, took: Duration) {
        let us = took.as_micros() as u64;
        self.sum_us.fetch_add(us, Relaxed);
        self.buckets[bucket(&COMMIT_US_BUCKETS, us)].fetch_add(1, Relaxed);
    }

    pub fn sum(&self) -> u64 {
        self.sum_us.load(Relaxed)
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }
}

impl StoreMetrics {
    pub(crate) fn record_group(&self, requests: usize, rows: usize, took: Duration) {
        self.groups.fetch_add(1, Relaxed);
        self.requests.fetch_add(requests as u64, Relaxed);
        self.rows.fetch_add(rows as u64, Relaxed);
        self.group_size[bucket(&GROUP_SIZE_BUCKETS, requests as u64)].fetch_add(1, Relaxed);
        self.commit.record(took);
    }
}
