//! A UDP fault proxy between one edge and the hub: per-direction drop rate, delay and jitter
//! (kept in order, so jitter does not reorder every packet), duplication, explicit
//! reordering, and cuts. Packets from the edge go to the hub from the proxy's own socket; the
//! hub's answers go back to the last edge address seen.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// What happens to packets going one way.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkFaults {
    /// Probability that a packet is lost (1.0: the direction is cut).
    #[serde(default)]
    pub drop: f64,
    #[serde(default)]
    pub delay_ms: u64,
    /// Extra delay, uniform in `0..=jitter_ms`; delivery stays in order.
    #[serde(default)]
    pub jitter_ms: u64,
    #[serde(default)]
    pub duplicate: f64,
    /// Probability that a packet is held back behind later ones (by 5–30 ms).
    #[serde(default)]
    pub reorder: f64,
}

impl LinkFaults {
    pub fn validate(&self) -> Result<(), String> {
        for (name, p) in [
            ("drop", self.drop),
            ("duplicate", self.duplicate),
            ("reorder", self.reorder),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name} must be a probability from 0 to 1, not {p}"));
            }
        }
        if self.delay_ms > 10_000 || self.jitter_ms > 10_000 {
            return Err("delays are at most 10,000 ms".into());
        }
        Ok(())
    }
}

/// Counters of one proxy.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub reordered: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Edge to hub.
    Up,
    /// Hub to edge.
    Down,
}

struct Faults {
    up: LinkFaults,
    down: LinkFaults,
    rng: u64,
}

impl Faults {
    fn next(&mut self) -> f64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A running proxy. Dropping it stops it.
pub struct FaultProxy {
    addr: SocketAddr,
    faults: Arc<Mutex<Faults>>,
    pub stats: Arc<ProxyStats>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// A packet waiting for its delivery time; ties keep arrival order.
type Pending = Reverse<(Instant, u64, Vec<u8>)>;

impl FaultProxy {
    /// Listens on a free loopback port and relays to `upstream` with `faults` both ways.
    pub async fn start(
        upstream: SocketAddr,
        faults: LinkFaults,
        seed: u64,
    ) -> std::io::Result<FaultProxy> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        back.connect(upstream).await?;
        let addr = front.local_addr()?;
        let faults = Arc::new(Mutex::new(Faults {
            up: faults.clone(),
            down: faults,
            rng: seed | 1,
        }));
        let stats = Arc::new(ProxyStats::default());
        let client = Arc::new(Mutex::new(None::<SocketAddr>));
        let (up_tx, up_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let (down_tx, down_rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let mut tasks = Vec::new();
        {
            let (front, client) = (front.clone(), client.clone());
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    // A receive error is an ICMP report about an earlier send (the peer's
                    // port was closed for a moment): the socket itself is fine.
                    let Ok((n, from)) = front.recv_from(&mut buf).await else {
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                        continue;
                    };
                    *client.lock() = Some(from);
                    if up_tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }));
        }
        {
            let back = back.clone();
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    // "Connection refused" here only means the hub was down when we last
                    // sent (ICMP port unreachable); it may be back, so keep listening.
                    let Ok(n) = back.recv(&mut buf).await else {
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                        continue;
                    };
                    if down_tx.send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }));
        }
        let up_out = {
            let back = back.clone();
            move |p: Vec<u8>| {
                let back = back.clone();
                async move {
                    let _ = back.send(&p).await;
                }
            }
        };
        let down_out = {
            let (front, client) = (front.clone(), client.clone());
            move |p: Vec<u8>| {
                let (front, client) = (front.clone(), client.clone());
                async move {
                    let to = *client.lock();
                    if let Some(to) = to {
                        let _ = front.send_to(&p, to).await;
                    }
                }
            }
        };
        tasks.push(tokio::spawn(shape(
            up_rx,
            Direction::Up,
            faults.clone(),
            stats.clone(),
            up_out,
        )));
        tasks.push(tokio::spawn(shape(
            down_rx,
            Direction::Down,
            faults.clone(),
            stats.clone(),
            down_out,
        )));
        Ok(FaultProxy {
            addr,
            faults,
            stats,
            tasks,
        })
    }

    /// Where the edge should send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the faults of one direction, or both.
    pub fn set(&self, direction: Option<Direction>, faults: LinkFaults) {
        let mut f = self.faults.lock();
        match direction {
            Some(Direction::Up) => f.up = faults,
            Some(Direction::Down) => f.down = faults,
            None => {
                f.up = faults.clone();
                f.down = faults;
            }
        }
    }

    /// Cuts both directions (`true`), or restores `faults` on both (`false`).
    pub fn cut(&self, cut: bool, faults: &LinkFaults) {
        let mut f = faults.clone();
        if cut {
            f.drop = 1.0;
        }
        self.set(None, f);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Applies one direction's faults and delivers packets at their time.
async fn shape<F, Fut>(
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    dir: Direction,
    faults: Arc<Mutex<Faults>>,
    stats: Arc<ProxyStats>,
    out: F,
) where
    F: Fn(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut queue: BinaryHeap<Pending> = BinaryHeap::new();
    let mut order = 0u64;
    // The latest in-order delivery time: jitter never moves a packet before an earlier one.
    let mut last = Instant::now();
    loop {
        let next = queue.peek().map(|Reverse((t, _, _))| *t);
        tokio::select! {
            p = rx.recv() => {
                let Some(p) = p else { return };
                let (drop, dup, reorder, delay) = {
                    let mut f = faults.lock();
                    let lf = match dir { Direction::Up => f.up.clone(), Direction::Down => f.down.clone() };
                    let drop = f.next() < lf.drop;
                    let dup = f.next() < lf.duplicate;
                    let reorder = f.next() < lf.reorder;
                    let jitter = if lf.jitter_ms > 0 { (f.next() * (lf.jitter_ms + 1) as f64) as u64 } else { 0 };
                    let extra = if reorder { 5 + (f.next() * 25.0) as u64 } else { 0 };
                    (drop, dup, reorder, (lf.delay_ms + jitter, extra))
                };
                if drop {
                    stats.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let now = Instant::now();
                let mut at = (now + Duration::from_millis(delay.0)).max(last);
                last = at;
                if reorder {
                    stats.reordered.fetch_add(1, Ordering::Relaxed);
                    at += Duration::from_millis(delay.1);
                }
                let copies = if dup { stats.duplicated.fetch_add(1, Ordering::Relaxed); 2 } else { 1 };
                for _ in 0..copies {
                    order += 1;
                    queue.push(Reverse((at, order, p.clone())));
                }
            }
            _ = async { tokio::time::sleep_until(next.expect("guarded")).await }, if next.is_some() => {
                let now = Instant::now();
                while queue.peek().is_some_and(|Reverse((t, _, _))| *t <= now) {
                    let Reverse((_, _, p)) = queue.pop().expect("peeked");
                    stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    out(p).await;
                }
            }
        }
    }
}
