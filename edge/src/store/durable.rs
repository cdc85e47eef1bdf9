//! Durability with the fsync beside the writer instead of inside its COMMIT.
//!
//! The writer's connection runs `synchronous=NORMAL`: its COMMIT writes the group's WAL
//! frames and returns at once. The WAL is then made durable by `fdatasync` on a handle of our
//! own on the `-wal` file (fsync acts on the file, whichever descriptor wrote it), done by the
//! answering thread, which only then answers the group's callers and hands its commits to the
//! feed. Meanwhile the writer applies the next group, so the disk and the CPU work at once.
//!
//! Every COMMIT takes a ticket first; `durable` is the highest ticket an fsync has covered.
//! Whatever leaves the store (answers, feed deltas, and every read: hot tier, SQLite, log
//! status) waits until everything committed by then is durable, so nothing a terminal, a
//! subscriber or the hub has seen can be lost to a power cut. An fsync that fails leaves the
//! page cache in an unknown state (the kernel may have dropped the dirty pages, or kept
//! pages that never reached the disk), so the process aborts rather than acknowledge
//! anything more. It logs that the machine should be rebooted before the edge serves again:
//! until then a restarted edge may read pages from the cache that are not on the disk.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};

use super::metrics::StoreMetrics;

pub(crate) struct Durability {
    committed: AtomicU64,
    /// The ticket of the last state the writer published (hot tier, log status): set
    /// before the state, so a reader that saw the state reads at least its ticket.
    published: AtomicU64,
    durable: AtomicU64,
    lock: Mutex<()>,
    changed: Condvar,
    wal: File,
    gate: Option<Arc<SyncGate>>,
}

impl Durability {
    /// Opens the WAL of the database SQLite has open at `db`: the path SQLite resolved (a
    /// symlinked database keeps its WAL beside the link's target, not beside the link), and
    /// the file must already exist (a connection in WAL mode that has read creates it).
    /// Makes the WAL and its directory entry durable: SQLite syncs the directory only on its
    /// own first sync of the WAL, which under `synchronous=NORMAL` waits for a checkpoint.
    pub(crate) fn open(db: &Path, gate: Option<Arc<SyncGate>>) -> std::io::Result<Durability> {
        let mut name = db.as_os_str().to_owned();
        name.push("-wal");
        let name = std::path::PathBuf::from(name);
        let wal = std::fs::OpenOptions::new().write(true).open(&name)?;
        wal.sync_all()?;
        let dir = match name.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()?;
        Ok(Durability {
            committed: AtomicU64::new(0),
            published: AtomicU64::new(0),
            durable: AtomicU64::new(0),
            lock: Mutex::new(()),
            changed: Condvar::new(),
            wal,
            gate,
        })
    }

    /// A ticket for a COMMIT about to run; take it before the statement, so that any reader
    /// that can see the commit also sees its ticket.
    pub(crate) fn ticket(&self) -> u64 {
        self.committed.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Records that the state about to be published includes ticket `t`; call before
    /// publishing it.
    pub(crate) fn publishing(&self, t: u64) {
        self.published.fetch_max(t, Ordering::AcqRel);
    }

    /// Call after reading published state (hot tier, log status) and before returning it:
    /// waits until the last published ticket is durable, not for COMMITs still in flight.
    pub(crate) fn barrier_published(&self) {
        self.wait(self.published.load(Ordering::Acquire));
    }

    /// The last ticket handed out.
    pub(crate) fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    /// Makes every COMMIT up to ticket `upto` durable; call it only once that COMMIT has
    /// returned. Cheap when an earlier fsync already covered it.
    pub(crate) fn sync(&self, upto: u64, metrics: &StoreMetrics) {
        if self.durable.load(Ordering::Acquire) >= upto {
            return;
        }
        if let Some(gate) = &self.gate {
            gate.pass();
        }
        let started = std::time::Instant::now();
        let synced = self.wal.sync_data();
        metrics.fsync.record(started.elapsed());
        if let Err(e) = synced {
            tracing::error!(
                "fsync of the WAL failed ({e}); stopping before anything more is acknowledged. \
                 Check the disk and reboot the machine before the edge serves again: the page \
                 cache may hold writes that never reached the disk"
            );
            std::process::abort();
        }
        self.durable.fetch_max(upto, Ordering::AcqRel);
        let _guard = self.lock.lock();
        self.changed.notify_all();
    }

    /// Waits until ticket `t` is durable.
    pub(crate) fn wait(&self, t: u64) {
        if self.durable.load(Ordering::Acquire) >= t {
            return;
        }
        if let Some(gate) = &self.gate {
            gate.reader_waits();
        }
        let mut guard = self.lock.lock();
        while self.durable.load(Ordering::Acquire) < t {
            self.changed.wait(&mut guard);
        }
    }

    /// Call after reading SQLite and before returning what was read: waits until every
    /// COMMIT that had started (and so may have been seen) is durable. Under load that can
    /// mean the fsync in flight and the next one; reads of what the writer published (hot
    /// tier, log status) wait only for the ticket published with it.
    pub(crate) fn barrier(&self) {
        self.wait(self.committed());
    }
}

/// A test hook: holds every WAL fsync until opened, and counts the fsyncs that reached it
/// and the reads that waited for one.
#[derive(Debug, Default)]
pub struct SyncGate {
    /// (open, fsyncs arrived, readers that waited)
    state: Mutex<(bool, u64, u64)>,
    changed: Condvar,
}

impl SyncGate {
    /// A gate that holds fsyncs until [`SyncGate::open`].
    pub fn closed() -> Arc<SyncGate> {
        Arc::new(SyncGate::default())
    }

    pub fn open(&self) {
        self.state.lock().0 = true;
        self.changed.notify_all();
    }

    /// Waits until at least `n` fsyncs have reached the gate.
    pub fn wait_arrivals(&self, n: u64) {
        let mut s = self.state.lock();
        while s.1 < n {
            self.changed.wait(&mut s);
        }
    }

    /// Waits until at least `n` reads have had to wait for an fsync.
    pub fn wait_readers(&self, n: u64) {
        let mut s = self.state.lock();
        while s.2 < n {
            self.changed.wait(&mut s);
        }
    }

    fn reader_waits(&self) {
        self.state.lock().2 += 1;
        self.changed.notify_all();
    }

    fn pass(&self) {
        let mut s = self.state.lock();
        s.1 += 1;
        self.changed.notify_all();
        while !s.0 {
            self.changed.wait(&mut s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_waits_for_the_fsync_that_covers_what_it_saw() {
        let dir = tempfile::tempdir().unwrap();
        let gate = SyncGate::closed();
        // The WAL must exist: SQLite creates it, the store never does.
        assert!(Durability::open(&dir.path().join("x.db"), None).is_err());
        std::fs::write(dir.path().join("x.db-wal"), b"").unwrap();
        let d = Arc::new(Durability::open(&dir.path().join("x.db"), Some(gate.clone())).unwrap());
        // Nothing committed: nothing to wait for.
        d.barrier();
        let t = d.ticket();
        assert_eq!((t, d.committed()), (1, 1));
        let metrics = Arc::new(StoreMetrics::default());
        let syncer = {
            let (d, metrics) = (d.clone(), metrics.clone());
            std::thread::spawn(move || d.sync(t, &metrics))
        };
        gate.wait_arrivals(1);
        // The fsync is held at the gate, so ticket 1 is not durable: a reader that may have
        // seen it returns only once it is.
        let reader = {
            let d = d.clone();
            std::thread::spawn(move || {
                d.barrier();
                d.durable.load(Ordering::Acquire)
            })
        };
        gate.wait_readers(1);
        assert_eq!(d.durable.load(Ordering::Acquire), 0);
        gate.open();
        syncer.join().unwrap();
        assert_eq!(reader.join().unwrap(), 1);
        assert_eq!(d.durable.load(Ordering::Acquire), 1);
        // A sync already covered costs no second fsync.
        d.sync(1, &metrics);
        assert_eq!(gate.state.lock().1, 1);
        assert_eq!(metrics.fsync.count(), 1);
    }
}
