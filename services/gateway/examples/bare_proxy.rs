//! A bare HTTP proxy as a process: `BARE_PROXY_LISTEN` (an address) forwarded to
//! `BARE_PROXY_UPSTREAM` (a URL) by `benches/support/bare_proxy.rs`. `cargo xtask bench` runs it
//! beside the gateway, so that what any proxy hop costs on this machine is measured in the same
//! run as what the gateway costs.

#[path = "../benches/support/bare_proxy.rs"]
mod bare_proxy;

use anyhow::Context;

/// The gateway binary's allocator, so the two processes differ only in what they do.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let setting = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
    let upstream = setting("BARE_PROXY_UPSTREAM")?
        .parse()
        .context("BARE_PROXY_UPSTREAM is not a URL")?;
    let listener = tokio::net::TcpListener::bind(setting("BARE_PROXY_LISTEN")?)
        .await
        .context("binding BARE_PROXY_LISTEN")?;
    axum::serve(listener, bare_proxy::router(upstream)).await?;
    Ok(())
}
