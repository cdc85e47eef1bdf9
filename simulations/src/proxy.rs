//! A UDP relay between one edge and the hub that can cut the link: the demo's partition (and
//! the start of the partition harness's fault proxy). Packets from the edge go to the hub from
//! a socket of the relay's own; the hub's answers go back to the last edge address seen.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use tokio::net::UdpSocket;

/// A running relay. Dropping it stops it.
pub struct UdpRelay {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    pub dropped: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl UdpRelay {
    /// Listens on a free loopback port and relays to `upstream`.
    pub async fn start(upstream: SocketAddr) -> std::io::Result<UdpRelay> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let back = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        back.connect(upstream).await?;
        let addr = front.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let client = Arc::new(parking_lot::Mutex::new(None::<SocketAddr>));
        let up = {
            let (front, back, cut, dropped, client) = (
                front.clone(),
                back.clone(),
                cut.clone(),
                dropped.clone(),
                client.clone(),
            );
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    // A receive error reports an earlier send's ICMP error; keep going.
                    let Ok((n, from)) = front.recv_from(&mut buf).await else {
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                        continue;
                    };
                    *client.lock() = Some(from);
                    if cut.load(Ordering::Relaxed) {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let _ = back.send(&buf[..n]).await;
                }
            })
        };
        let down = {
            let (cut, dropped) = (cut.clone(), dropped.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    // "Connection refused" means the hub was down at our last send; it may
                    // be back, so keep listening.
                    let Ok(n) = back.recv(&mut buf).await else {
                        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                        continue;
                    };
                    if cut.load(Ordering::Relaxed) {
                        dropped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let to = *client.lock();
                    if let Some(to) = to {
                        let _ = front.send_to(&buf[..n], to).await;
                    }
                }
            })
        };
        Ok(UdpRelay {
            addr,
            cut,
            dropped,
            tasks: vec![up, down],
        })
    }

    /// Where the edge should send.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Cuts (`true`) or heals (`false`) the link, both ways.
    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::Relaxed);
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
