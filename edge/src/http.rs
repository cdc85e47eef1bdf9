//! The terminal API's HTTP server: axum's router on hyper's HTTP/1, with the two limits that
//! `axum::serve` does not set.
//!
//! - **Open connections are capped** ([`Limits::connections`]). A connection beyond the cap
//!   is answered 503 `too_many_connections` and closed, so a LAN client that opens
//!   connections until the process runs out of file descriptors cannot lock the tills out
//!   (nor make the store fail to open a file). A WebSocket keeps its slot after the upgrade:
//!   the slot travels with the socket ([`Counted`]).
//! - **A request head must arrive within [`Limits::head_timeout`]** (hyper's header-read
//!   timeout). This also closes a keep-alive connection idle for that long, so a connection
//!   that sends nothing, or a head a byte at a time, gives its slot back.
//!
//! At start the soft limit on open files is raised towards the hard one, and the cap is kept
//! below what the limit leaves after the store's and the sync link's own descriptors.

use std::future::Future;
use std::io;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// Most connections open at once. A branch has tens of terminals; this leaves room for all of
/// them reconnecting at once after a network blip, and bounds what the edge holds per
/// connection (hyper's buffers, a feed queue).
pub const CONNECTIONS_MAX: usize = 2048;

/// How long a request head may take to arrive, and how long a keep-alive connection may sit
/// idle. Terminals that keep connections longer reconnect (Node's server, which the seed
/// terminals were written against, closed idle connections after 5 s).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// File descriptors kept for everything but terminal connections: SQLite's database, WAL and
/// shared-memory files for the writer and each pooled reader, the sync link, release files.
const FILES_RESERVED: u64 = 256;

/// How high the soft limit on open files is raised (when the hard limit allows).
const FILES_WANTED: u64 = 65_536;

/// Connections being refused at once; beyond this a refused connection is closed unanswered.
const REFUSALS_AT_ONCE: usize = 32;

/// How long a refusal may take to write its answer and read what the client sent.
const REFUSAL_TIME: Duration = Duration::from_secs(1);

/// Test hooks: a smaller cap and a shorter head timeout, so tests reach them quickly.
pub const CONNECTIONS_MAX_ENV: &str = "OUTPOST_HTTP_CONNECTIONS_MAX";
pub const HEAD_TIMEOUT_ENV: &str = "OUTPOST_HTTP_HEAD_TIMEOUT_MS";

/// The answer to a connection beyond the cap.
const REFUSAL_BODY: &str = "{\"error\":\"too_many_connections\",\"message\":\"the edge has as many \
connections open as it serves at once; close idle connections or try again shortly\"}";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub connections: usize,
    pub head_timeout: Duration,
}

impl Limits {
    /// The limits for this process: [`CONNECTIONS_MAX`], or fewer if the limit on open files
    /// (raised first, see [`raise_file_limit`]) leaves less room; [`HEAD_TIMEOUT`]. The test
    /// hooks override either.
    pub fn for_this_process() -> Limits {
        let files = raise_file_limit();
        let connections = usize::try_from(files.saturating_sub(FILES_RESERVED))
            .unwrap_or(usize::MAX)
            .clamp(1, CONNECTIONS_MAX);
        let env = |name: &str| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|n| *n > 0)
        };
        Limits {
            connections: env(CONNECTIONS_MAX_ENV).map_or(connections, |n| n as usize),
            head_timeout: env(HEAD_TIMEOUT_ENV).map_or(HEAD_TIMEOUT, Duration::from_millis),
        }
    }
}

/// Raises the soft limit on open files to the hard limit (at most [`FILES_WANTED`]), as
/// servers do: the usual soft default, 1,024, is a limit for `select`, which nothing here
/// uses. Returns the soft limit in force afterwards.
pub fn raise_file_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // `None` is unlimited.
    let Some(current) = limit.current else {
        return u64::MAX;
    };
    let wanted = limit.maximum.unwrap_or(u64::MAX).min(FILES_WANTED);
    if wanted <= current {
        return current;
    }
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(wanted),
            maximum: limit.maximum,
        },
    ) {
        Ok(()) => wanted,
        Err(e) => {
            tracing::warn!("cannot raise the open-file limit from {current} to {wanted}: {e}");
            current
        }
    }
}

/// Connection counts for `/metrics`.
#[derive(Debug, Default)]
pub struct ConnMetrics {
    /// Connections open now, WebSockets included.
    pub open: AtomicU64,
    pub accepted: AtomicU64,
    /// Connections answered 503 (or closed unanswered) because the cap was reached.
    pub refused: AtomicU64,
    /// Connections closed because no complete request head came within the head timeout
    /// (idle keep-alive connections included).
    pub head_timeouts: AtomicU64,
}

/// Serves `router` on `listener` until `stop` resolves; then stops accepting, lets each
/// connection finish the request it is on (idle ones close at once) and returns when they
/// have. An upgraded connection (a WebSocket) is not waited for.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    metrics: Arc<ConnMetrics>,
    stop: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(limits.connections));
    let refusals = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout);
    // `finish` tells connections to finish; each connection task holds a `running` receiver,
    // so `running_tx.closed()` resolves when the last one ends.
    let (finish, _) = watch::channel(());
    let (running_tx, running) = watch::channel(());
    let mut stop = pin!(stop);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.refused.fetch_add(1, Relaxed);
            match refusals.clone().try_acquire_owned() {
                Ok(refusing) => {
                    tokio::spawn(refuse(tcp, refusing));
                }
                Err(_) => drop(tcp),
            }
            continue;
        };
        // Nagle's algorithm off: terminals get small responses and feed frames that must
        // leave at once, not wait for the client's delayed acknowledgement.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY on a connection: {e}");
        }
        metrics.accepted.fetch_add(1, Relaxed);
        let io = TokioIo::new(Counted::new(tcp, slot, metrics.clone()));
        let conn = http
            .serve_connection(io, TowerToHyperService::new(router.clone()))
            .with_upgrades();
        let (mut finish, running, metrics) = (finish.subscribe(), running.clone(), metrics.clone());
        tokio::spawn(async move {
            let mut conn = pin!(conn);
            let served = tokio::select! {
                served = conn.as_mut() => served,
                _ = finish.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = served {
                if e.is_timeout() {
                    metrics.head_timeouts.fetch_add(1, Relaxed);
                }
                tracing::debug!("connection ended: {e}");
            }
            drop(running);
        });
    }
    drop(listener);
    let _ = finish.send(());
    drop(running);
    running_tx.closed().await;
}

/// What `axum::serve` does with a failed accept: a connection that went away before it was
/// accepted is nothing; anything else (out of file descriptors) is logged and waited out.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!("cannot accept a connection: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Answers a connection beyond the cap with 503 and closes it. What the client sent is read
/// (a little of it, briefly) so that closing does not reset the connection before the client
/// has read the answer.
async fn refuse(mut tcp: TcpStream, _refusing: OwnedSemaphorePermit) {
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{REFUSAL_BODY}",
        REFUSAL_BODY.len()
    );
    let _ = tokio::time::timeout(REFUSAL_TIME, async {
        tcp.write_all(answer.as_bytes()).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut read = 0;
        while read < 64 * 1024 {
            match tcp.read(&mut sink).await? {
                0 => break,
                n => read += n,
            }
        }
        io::Result::Ok(())
    })
    .await;
}

/// A connection's socket holding its slot: the slot is given back when the socket is dropped,
/// by hyper, or by the WebSocket that took it over.
pub struct Counted {
    tcp: TcpStream,
    metrics: Arc<ConnMetrics>,
    _slot: OwnedSemaphorePermit,
}

impl Counted {
    fn new(tcp: TcpStream, slot: OwnedSemaphorePermit, metrics: Arc<ConnMetrics>) -> Counted {
        metrics.open.fetch_add(1, Relaxed);
        Counted {
            tcp,
            metrics,
            _slot: slot,
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.metrics.open.fetch_sub(1, Relaxed);
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_stays_below_the_file_limit() {
        let limits = Limits::for_this_process();
        let files = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        assert!(limits.connections >= 1);
        assert!(limits.connections <= CONNECTIONS_MAX);
        assert!((limits.connections as u64) <= files.saturating_sub(FILES_RESERVED).max(1));
    }
}
