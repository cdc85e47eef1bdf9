//! The HTTP ceiling: a bare axum server that answers every terminal route the load generator
//! uses with a fixed small JSON body, without auth, parsing or a store. `outpost-sim load
//! --url` against it measures what HTTP alone (hyper, axum, loopback TCP and the generator's
//! own client) costs on this machine, the baseline for the edge's figures in BENCHMARKS.md.
//! Run: `cargo run --release -p edge --example http_ceiling [ADDR]` (default 127.0.0.1:9192).

use axum::Router;
use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;

// The allocator `outpost-edge` uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What a batch that opens an order answers, trimmed to the fields the generator reads.
const OPENED: &str = r#"{"version":1,"results":[{"id":"o","total_amount":1750,"version":1}]}"#;

async fn answer(body: Bytes) -> ([(axum::http::HeaderName, &'static str); 1], &'static str) {
    // The body is read (as the edge must) and dropped.
    drop(body);
    ([(CONTENT_TYPE, "application/json")], OPENED)
}

fn main() -> std::io::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9192".to_owned());
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&addr).await?;
        eprintln!("http_ceiling on http://{}", listener.local_addr()?);
        let app = Router::new().fallback(answer);
        let limits = edge::http::Limits::for_this_process();
        edge::http::serve(
            listener,
            app,
            limits,
            Default::default(),
            std::future::pending(),
        )
        .await;
        Ok(())
    })
}
