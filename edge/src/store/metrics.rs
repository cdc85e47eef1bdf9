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
    pub requests: AtomicU64,
    pub rows: AtomicU64,
    pub commit_us_sum: AtomicU64,
    pub group_size: [AtomicU64; 8],
    pub commit_us: [AtomicU64; 8],
    /// The COMMIT statement alone: writing the group's WAL frames (the fsync is apart).
    pub commit_write_us_sum: AtomicU64,
    pub commit_write_us: [AtomicU64; 8],
    /// The WAL fsyncs that make commits durable (one may cover several groups).
    pub fsync_us_sum: AtomicU64,
    pub fsync_us: [AtomicU64; 8],
}

/// The bucket of `v` among inclusive upper bounds (the last bucket takes the rest).
pub fn bucket(bounds: &[u64; 8], v: u64) -> usize {
    bounds.iter().position(|b| v <= *b).unwrap_or(7)
}

impl StoreMetrics {
    pub(crate) fn record_group(&self, requests: usize, rows: usize, took: Duration) {
        self.groups.fetch_add(1, Relaxed);
        self.requests.fetch_add(requests as u64, Relaxed);
        self.rows.fetch_add(rows as u64, Relaxed);
        let us = took.as_micros() as u64;
        self.commit_us_sum.fetch_add(us, Relaxed);
        self.group_size[bucket(&GROUP_SIZE_BUCKETS, requests as u64)].fetch_add(1, Relaxed);
        self.commit_us[bucket(&COMMIT_US_BUCKETS, us)].fetch_add(1, Relaxed);
    }

    pub(crate) fn record_fsync(&self, took: Duration) {
        let us = took.as_micros() as u64;
        self.fsync_us_sum.fetch_add(us, Relaxed);
        self.fsync_us[bucket(&COMMIT_US_BUCKETS, us)].fetch_add(1, Relaxed);
    }

    pub(crate) fn record_commit_write(&self, took: Duration) {
        let us = took.as_micros() as u64;
        self.commit_write_us_sum.fetch_add(us, Relaxed);
        self.commit_write_us[bucket(&COMMIT_US_BUCKETS, us)].fetch_add(1, Relaxed);
    }
}
