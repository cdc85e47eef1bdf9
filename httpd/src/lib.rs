//! Outpost's HTTP server: axum's router on hyper's HTTP/1, with the limits that
//! `axum::serve` does not set. The edge serves its terminal API with it, the hub its
//! head-office API.
//!
//! - **Open connections are capped** ([`Limits::connections`]), and so are one client's
//!   ([`Limits::per_client`]: a quarter of the cap, at least 64; see [`per_client_for`]). A
//!   client is an IPv4 address or an IPv6 /64 ([`client_of`]). A connection beyond either
//!   limit is answered 503 `too_many_connections` and closed. So one device on the LAN that
//!   opens connections until something gives out takes a quarter of the slots, not all of
//!   them, and cannot run the process out of file descriptors (which would also stop the
//!   store opening files). Behind a reverse proxy every connection comes from one address:
//!   set [`PER_CLIENT_MAX_ENV`] to the cap there. A WebSocket keeps its slot after the
//!   upgrade: the slot travels with the socket ([`Counted`]).
//! - **A request head must arrive within [`Limits::head_timeout`]** (hyper's header-read
//!   timeout) and be at most [`HEAD_MAX`] bytes (431 beyond). The timeout also closes a
//!   keep-alive connection idle that long, so a connection that sends nothing, or a head a
//!   byte at a time, gives its slot back. A body that stalls has its own timeout
//!   ([`body_timeout`], applied where a handler reads the body: the edge's `api::RawBody`).
//! - **A socket that accepts no write for [`SEND_TIMEOUT`] is closed** ([`Counted`]): a
//!   client that stopped reading its answer, or its feed, gives its slot back. (The feed's
//!   own send timeout, shorter, usually comes first for a WebSocket.)
//!
//! At start the soft limit on open files is raised towards the hard one, and the cap is kept
//! below what the limit leaves after [`FILES_RESERVED`] for the store's and the sync link's
//! own descriptors, unless that would leave fewer than 64 ([`connections_for`]).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use shared::metrics::Exposition;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};

/// Most connections open at once. A branch has tens of terminals; this leaves room for all of
/// them reconnecting at once after a network blip, and bounds what the edge holds per
/// connection (hyper's buffers, a feed queue).
pub const CONNECTIONS_MAX: usize = 2048;

/// How long a request body may take to arrive once its handler starts reading it.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connection's socket may accept no write (of an answer, of a feed frame) before
/// the connection is closed. The time runs from a write that finds the socket full to the
/// next write it accepts; the kernel accepts one once a good part of its send buffer has
/// drained, so only a client that reads next to nothing for this long is cut off.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Largest request head (request line and headers) in bytes; hyper answers 431 beyond it.
/// Terminals send a few hundred bytes; without this, hyper buffers up to ~400 KiB of a head
/// per connection.
pub const HEAD_MAX: usize = 32 * 1024;

/// How long a request head may take to arrive, and how long a keep-alive connection may sit
/// idle. Terminals that keep connections longer reconnect (Node's server, which the seed
/// terminals were written against, closed idle connections after 5 s).
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// File descriptors kept for everything but terminal connections: SQLite's database, WAL and
/// shared-memory files for the writer and each pooled reader, the sync link, release files.
const FILES_RESERVED: u64 = 256;

/// How high the soft limit on open files is raised (when the hard limit allows).
const FILES_WANTED: u64 = 65_536;

/// The fewest connections the edge serves, however low the file limit: a branch's terminals.
const CONNECTIONS_MIN: usize = 64;

/// Connections being refused at once because the cap was reached; beyond this a refused
/// connection is closed unanswered.
const REFUSALS_AT_ONCE: usize = 32;

/// Connections being refused at once because their client held its share. Kept apart from
/// [`REFUSALS_AT_ONCE`] so that a device opening connections in a loop cannot use up the
/// answers other terminals get when the edge is full.
const CLIENT_REFUSALS_AT_ONCE: usize = 8;

/// How long a refusal may take: it writes its answer, then reads what the client sent until
/// the client closes or this time is up. The answer is best effort: a client whose request
/// was still coming when the connection closed may see it reset instead of the 503.
const REFUSAL_TIME: Duration = Duration::from_secs(3);

/// Test hooks: a smaller cap, per-client cap and head timeout, so tests reach them quickly.
pub const CONNECTIONS_MAX_ENV: &str = "OUTPOST_HTTP_CONNECTIONS_MAX";
pub const PER_CLIENT_MAX_ENV: &str = "OUTPOST_HTTP_CONNECTIONS_PER_CLIENT";
pub const HEAD_TIMEOUT_ENV: &str = "OUTPOST_HTTP_HEAD_TIMEOUT_MS";
pub const BODY_TIMEOUT_ENV: &str = "OUTPOST_HTTP_BODY_TIMEOUT_MS";

/// [`BODY_TIMEOUT`], or the test hook's.
pub fn body_timeout() -> Duration {
    static TIMEOUT: std::sync::LazyLock<Duration> = std::sync::LazyLock::new(|| {
        env_u64(BODY_TIMEOUT_ENV).map_or(BODY_TIMEOUT, Duration::from_millis)
    });
    *TIMEOUT
}

/// A positive whole number from the environment variable `name`.
fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|n| *n > 0)
}

/// Why a connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The cap is reached.
    Full,
    /// The connection's client holds its share of the cap.
    Client,
}

impl Refusal {
    fn body(self) -> &'static str {
        match self {
            Refusal::Full => REFUSAL_FULL,
            Refusal::Client => REFUSAL_CLIENT,
        }
    }
}

/// The answer to a connection beyond the cap.
const REFUSAL_FULL: &str = "{\"error\":\"too_many_connections\",\"message\":\"the server has as many \
connections open as it serves at once; close idle connections or try again shortly\"}";

/// The answer to a connection beyond its client's share.
const REFUSAL_CLIENT: &str = "{\"error\":\"too_many_connections\",\"message\":\"this device has as \
many connections open to this server as one device may hold; close idle connections or try again \
shortly\"}";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub connections: usize,
    /// Most connections from one client address.
    pub per_client: usize,
    pub head_timeout: Duration,
}

impl Limits {
    /// The limits for this process: [`CONNECTIONS_MAX`], or fewer if the limit on open files
    /// (raised first, see [`raise_file_limit`]) leaves less room; [`per_client_for`] that;
    /// [`HEAD_TIMEOUT`]. The test hooks override each.
    pub fn for_this_process() -> Limits {
        let env = env_u64;
        let connections = match env(CONNECTIONS_MAX_ENV) {
            Some(n) => n as usize,
            None => {
                let connections = connections_for(raise_file_limit());
                if connections < CONNECTIONS_MAX {
                    tracing::warn!(
                        "the open-file limit leaves room for {connections} connections, fewer \
                         than {CONNECTIONS_MAX}; raise it (ulimit -n) if terminals are refused"
                    );
                }
                connections
            }
        };
        Limits {
            connections,
            per_client: env(PER_CLIENT_MAX_ENV).map_or(per_client_for(connections), |n| n as usize),
            head_timeout: env(HEAD_TIMEOUT_ENV).map_or(HEAD_TIMEOUT, Duration::from_millis),
        }
    }
}

/// One client address's share of a cap of `connections`: a quarter, and at least
/// [`CONNECTIONS_MIN`] (a cap that small is not split).
pub fn per_client_for(connections: usize) -> usize {
    (connections / 4).max(connections.min(CONNECTIONS_MIN))
}

/// The cap for a limit of `files` open files: what is left after [`FILES_RESERVED`], at most
/// [`CONNECTIONS_MAX`]. A limit too low for that still serves [`CONNECTIONS_MIN`] (or half
/// the limit, if even that is less): better some terminals refused a file than all of them a
/// connection.
fn connections_for(files: u64) -> usize {
    let left = usize::try_from(files.saturating_sub(FILES_RESERVED)).unwrap_or(usize::MAX);
    let floor = CONNECTIONS_MIN.min(usize::try_from(files / 2).unwrap_or(usize::MAX));
    left.max(floor).clamp(1, CONNECTIONS_MAX)
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
    /// Connections answered 503 (or closed unanswered) because the cap, or their client's
    /// share of it, was reached.
    pub refused: AtomicU64,
    /// Of those, the ones refused because their client held its share.
    pub refused_client: AtomicU64,
    /// Connections closed because no complete request head came within the head timeout
    /// (idle keep-alive connections included).
    pub head_timeouts: AtomicU64,
    /// Connections whose socket accepted no write for [`SEND_TIMEOUT`] (each counted once).
    pub send_timeouts: AtomicU64,
}

impl ConnMetrics {
    /// Adds the connection metrics to a `/metrics` page.
    pub fn render(&self, out: &mut Exposition) {
        out.gauge(
            "outpost_http_connections",
            "Open HTTP connections, WebSockets included (capped; see ARCHITECTURE.md).",
            self.open.load(Relaxed),
        );
        out.counter(
            "outpost_http_connections_accepted_total",
            "HTTP connections accepted.",
            self.accepted.load(Relaxed),
        );
        out.counter(
            "outpost_http_connections_refused_total",
            "HTTP connections refused (503 too_many_connections) because the cap, or the client's share of it, was reached.",
            self.refused.load(Relaxed),
        );
        out.counter(
            "outpost_http_connections_refused_client_total",
            "Of those, connections refused because their client held its share of the cap.",
            self.refused_client.load(Relaxed),
        );
        out.counter(
            "outpost_http_head_timeouts_total",
            "HTTP connections closed because no complete request head came in time (idle keep-alive connections included).",
            self.head_timeouts.load(Relaxed),
        );
        out.counter(
            "outpost_http_send_timeouts_total",
            &format!(
                "HTTP connections (WebSockets included) closed because their socket accepted no write for {} s.",
                SEND_TIMEOUT.as_secs()
            ),
            self.send_timeouts.load(Relaxed),
        );
    }
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
    tracing::info!(
        connections = limits.connections,
        per_client = limits.per_client,
        head_timeout_ms = limits.head_timeout.as_millis() as u64,
        "HTTP limits"
    );
    let slots = Arc::new(Semaphore::new(limits.connections));
    let clients = Arc::new(Clients {
        most: limits.per_client,
        open: Mutex::default(),
    });
    let refusals = Arc::new(Semaphore::new(REFUSALS_AT_ONCE));
    let client_refusals = Arc::new(Semaphore::new(CLIENT_REFUSALS_AT_ONCE));
    let router = router.layer(tower::util::MapResponseLayer::new(keep_alive(
        limits.head_timeout,
    )));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout)
        .max_header_size(HEAD_MAX);
    // `finish` tells connections to finish; each connection task holds a `running` receiver,
    // so `running_tx.closed()` resolves when the last one ends.
    let (finish, _) = watch::channel(());
    let (running_tx, running) = watch::channel(());
    let mut stop = pin!(stop);
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            () = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tokio::select! {
                        biased;
                        () = &mut stop => break,
                        () = accept_failed(e) => continue,
                    }
                }
            },
        };
        let slot = clients.admit(client_of(peer.ip()), || {
            slots.clone().try_acquire_owned().ok()
        });
        let slot = match slot {
            Ok(slot) => slot,
            Err(why) => {
                metrics.refused.fetch_add(1, Relaxed);
                let refusing = match why {
                    Refusal::Full => &refusals,
                    Refusal::Client => {
                        metrics.refused_client.fetch_add(1, Relaxed);
                        &client_refusals
                    }
                };
                match refusing.clone().try_acquire_owned() {
                    Ok(refusing) => {
                        tokio::spawn(refuse(tcp, why, refusing));
                    }
                    Err(_) => drop(tcp),
                }
                continue;
            }
        };
        // Nagle's algorithm off: terminals get small responses and feed frames that must
        // leave at once, not wait for the client's delayed acknowledgement.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY on a connection: {e}");
        }
        metrics.accepted.fetch_add(1, Relaxed);
        let io = TokioIo::new(Counted::new(tcp, slot, metrics.clone(), SEND_TIMEOUT));
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

/// Adds `keep-alive: timeout=N` to the router's answers (not to a WebSocket's 101), N a
/// little under the idle timeout, so clients that read it (browsers, Node's) stop reusing an
/// idle connection before the edge closes it, rather than send a request into a connection
/// being closed.
fn keep_alive(idle: Duration) -> impl Fn(Response) -> Response + Clone + Send + Sync + 'static {
    let secs = idle
        .as_secs()
        .saturating_sub(5)
        .max(idle.as_secs() / 2)
        .max(1);
    // Leaked once per server, so that the per-answer clone is a copy of a pointer rather than
    // a reference count shared by every worker thread.
    let value = HeaderValue::from_static(String::leak(format!("timeout={secs}")));
    // Not a name `http` knows: made once here, not looked up among the standard names per
    // answer.
    let name = header::HeaderName::from_static("keep-alive");
    move |mut response: Response| {
        if response.status() != axum::http::StatusCode::SWITCHING_PROTOCOLS {
            response.headers_mut().insert(name.clone(), value.clone());
        }
        response
    }
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

/// Answers a connection beyond the cap with 503 and closes it. What the client sent is then
/// read (up to 64 KiB, for at most [`REFUSAL_TIME`]) so that closing does not reset the
/// connection before the client has read the answer.
async fn refuse(mut tcp: TcpStream, why: Refusal, _refusing: OwnedSemaphorePermit) {
    let body = why.body();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
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

/// The client a connection counts against: its IPv4 address (an IPv4-mapped IPv6 address
/// is the IPv4 one), or its IPv6 /64, the prefix one device may draw addresses from.
pub fn client_of(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(prefix.into())
        }
        v4 => v4,
    }
}

/// Connections open per client ([`client_of`]).
struct Clients {
    most: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

impl Clients {
    /// A place for a connection of `ip` (a [`client_of`]): one of its share, then one of the
    /// cap's slots from `slot`. The share is checked first, so a client over its share is
    /// refused as such (from its own pool of answers) even when the edge is full.
    fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        slot: impl FnOnce() -> Option<OwnedSemaphorePermit>,
    ) -> Result<Slot, Refusal> {
        let mut open = self.open.lock();
        let held = open.entry(ip).or_default();
        if *held >= self.most {
            return Err(Refusal::Client);
        }
        let Some(slot) = slot() else {
            if *held == 0 {
                open.remove(&ip);
            }
            return Err(Refusal::Full);
        };
        *held += 1;
        Ok(Slot {
            _slot: slot,
            clients: self.clone(),
            ip,
        })
    }
}

/// A connection's place: one of the cap's slots and one of its client's share.
struct Slot {
    _slot: OwnedSemaphorePermit,
    clients: Arc<Clients>,
    ip: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.clients.open.lock();
        if let Some(held) = open.get_mut(&self.ip) {
            *held -= 1;
            if *held == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// A connection's socket holding its slot: the slot is given back when the socket is dropped,
/// by hyper, or by the WebSocket that took it over. A write the socket has not taken for
/// its send timeout fails, which ends the connection.
pub struct Counted {
    tcp: TcpStream,
    metrics: Arc<ConnMetrics>,
    send_timeout: Duration,
    /// Armed when a write finds the socket full; disarmed when one goes through. So the
    /// usual write, which the kernel takes at once, arms no timer.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The send timeout has passed: every write fails from now on.
    timed_out: bool,
    _slot: Slot,
}

impl Counted {
    fn new(
        tcp: TcpStream,
        slot: Slot,
        metrics: Arc<ConnMetrics>,
        send_timeout: Duration,
    ) -> Counted {
        metrics.open.fetch_add(1, Relaxed);
        Counted {
            tcp,
            metrics,
            send_timeout,
            stalled: None,
            timed_out: false,
            _slot: slot,
        }
    }

    /// Runs `write` on the socket, with the send timeout over a socket that accepts nothing.
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        if self.timed_out {
            return Poll::Ready(Err(self.timed_out_error()));
        }
        // Out of its scheduling budget, the task is told Pending whatever the socket's state
        // (and woken again at once): that is no sign of a full socket.
        let budget = tokio::task::coop::has_budget_remaining();
        match write(Pin::new(&mut self.tcp), cx) {
            Poll::Pending if !budget => Poll::Pending,
            Poll::Pending => {
                let timeout = self.send_timeout;
                let stalled = self
                    .stalled
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if stalled.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.stalled = None;
                self.timed_out = true;
                self.metrics.send_timeouts.fetch_add(1, Relaxed);
                Poll::Ready(Err(self.timed_out_error()))
            }
            done => {
                self.stalled = None;
                done
            }
        }
    }

    fn timed_out_error(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the client's socket accepted nothing sent to it for {} s",
                self.send_timeout.as_secs_f64()
            ),
        )
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
        self.get_mut()
            .poll_send(cx, |tcp, cx| tcp.poll_write(cx, buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_send(cx, |tcp, cx| tcp.poll_write_vectored(cx, bufs))
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    // A TCP socket's flush and shutdown do not wait for the peer.
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
    fn the_cap_leaves_the_store_its_files() {
        let raised = raise_file_limit();
        let files = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        assert_eq!(raised, files, "the limit in force is the one reported");
        let cap = connections_for(files);
        assert!((1..=CONNECTIONS_MAX).contains(&cap));
        if files >= FILES_RESERVED + CONNECTIONS_MIN as u64 {
            assert!(cap as u64 <= files - FILES_RESERVED);
        }
    }

    #[test]
    fn a_client_over_its_share_is_refused_as_such_even_when_the_edge_is_full() {
        let slots = Arc::new(Semaphore::new(2));
        let clients = Arc::new(Clients {
            most: 1,
            open: Mutex::default(),
        });
        let take = || slots.clone().try_acquire_owned().ok();
        let (a, b, c) = (
            IpAddr::from([10, 0, 0, 1]),
            IpAddr::from([10, 0, 0, 2]),
            IpAddr::from([10, 0, 0, 3]),
        );
        let first = clients.admit(a, take).expect("a place");
        assert_eq!(clients.admit(a, take).err(), Some(Refusal::Client));
        let _second = clients.admit(b, take).expect("a place");
        // Full: `a` is still over its share; `c` is refused for the cap, holding nothing.
        assert_eq!(clients.admit(a, take).err(), Some(Refusal::Client));
        assert_eq!(clients.admit(c, take).err(), Some(Refusal::Full));
        assert!(!clients.open.lock().contains_key(&c));
        drop(first);
        assert!(!clients.open.lock().contains_key(&a));
        let _third = clients.admit(c, take).expect("the place `a` gave back");
        assert_eq!(slots.available_permits(), 0);
    }

    #[test]
    fn a_client_is_an_ipv4_address_or_an_ipv6_prefix() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("an address");
        assert_eq!(client_of(ip("10.0.0.7")), ip("10.0.0.7"));
        assert_eq!(client_of(ip("::ffff:10.0.0.7")), ip("10.0.0.7"));
        assert_eq!(client_of(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            client_of(ip("2001:db8:1:2:bbbb::9")),
            client_of(ip("2001:db8:1:2:aaaa::1"))
        );
        assert_ne!(
            client_of(ip("2001:db8:1:3::1")),
            client_of(ip("2001:db8:1:2::1"))
        );
        assert_eq!(client_of(ip("::1")), ip("::"));
    }

    /// A client that reads nothing has its connection's writes fail after the send timeout,
    /// and the connection's slot and share come back when the socket is dropped.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_takes_nothing_is_cut_off() {
        use tokio::io::AsyncWriteExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("a listener");
        let _client = TcpStream::connect(listener.local_addr().expect("an address"))
            .await
            .expect("a connection");
        let (tcp, peer) = listener.accept().await.expect("accepted");
        let slots = Arc::new(Semaphore::new(1));
        let clients = Arc::new(Clients {
            most: 1,
            open: Mutex::default(),
        });
        let slot = clients
            .admit(client_of(peer.ip()), || {
                slots.clone().try_acquire_owned().ok()
            })
            .expect("a place");
        let metrics = Arc::<ConnMetrics>::default();
        let mut counted = Counted::new(tcp, slot, metrics.clone(), SEND_TIMEOUT);
        let start = tokio::time::Instant::now();
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 0usize;
        let writes = async {
            loop {
                match counted.write(&chunk).await {
                    Ok(n) => sent += n,
                    Err(e) => break e,
                }
            }
        };
        let error = tokio::time::timeout(SEND_TIMEOUT * 2, writes)
            .await
            .expect("the writes fail within the send timeout");
        assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{error}");
        assert!(sent > 0, "the kernel took some before the socket filled");
        assert!(start.elapsed() >= SEND_TIMEOUT);
        assert_eq!(metrics.send_timeouts.load(Relaxed), 1);
        // Every later write fails at once, and the connection is counted once.
        let again = counted
            .write(&chunk)
            .await
            .expect_err("a write after the timeout");
        assert_eq!(again.kind(), io::ErrorKind::TimedOut);
        assert_eq!(metrics.send_timeouts.load(Relaxed), 1);
        assert_eq!(metrics.open.load(Relaxed), 1);
        drop(counted);
        assert_eq!(metrics.open.load(Relaxed), 0);
        assert_eq!(slots.available_permits(), 1);
        assert!(clients.open.lock().is_empty());
    }

    #[test]
    fn a_low_file_limit_still_serves_a_branch() {
        assert_eq!(connections_for(u64::MAX), CONNECTIONS_MAX);
        assert_eq!(connections_for(4096), CONNECTIONS_MAX);
        assert_eq!(connections_for(1024), 1024 - 256);
        // Too low to keep FILES_RESERVED aside: a branch's terminals are served anyway.
        assert_eq!(connections_for(300), CONNECTIONS_MIN);
        assert_eq!(connections_for(256), CONNECTIONS_MIN);
        assert_eq!(connections_for(40), 20);
        assert_eq!(connections_for(1), 1);
        assert_eq!(connections_for(0), 1);
        assert_eq!(per_client_for(CONNECTIONS_MAX), CONNECTIONS_MAX / 4);
        assert_eq!(per_client_for(1024), 256);
        assert_eq!(per_client_for(200), CONNECTIONS_MIN);
        assert_eq!(per_client_for(CONNECTIONS_MIN), CONNECTIONS_MIN);
        assert_eq!(per_client_for(3), 3);
    }
}
