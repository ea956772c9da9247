//! `cargo xtask up|down|status`: the whole system on this machine, for trying the API by hand.

use std::path::PathBuf;

use anyhow::{Context, bail};
use flash_sale_common::api;
use flash_sale_tests::stack::{BrokerStorage, Stack, StackInfo};
use serde::{Deserialize, Serialize};

use crate::services::{self, LOCAL_ADMIN_TOKEN, ServiceInfo};

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Running {
    stack: StackInfo,
    services: Vec<ServiceInfo>,
}

/// What `up` started, from `.flash-sale/running.json`.
pub(crate) fn running() -> anyhow::Result<Running> {
    let text = std::fs::read_to_string(state_file())
        .context("nothing is running: `cargo xtask up` starts it")?;
    serde_json::from_str(&text).context("reading .flash-sale/running.json")
}

impl Running {
    /// The stack's servers.
    pub(crate) fn stack(&self) -> &StackInfo {
        &self.stack
    }

    /// The gateway when it runs, else the named service.
    pub(crate) fn url_of(&self, name: &str) -> Option<String> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .map(ServiceInfo::url)
    }
}

fn state_file() -> PathBuf {
    services::workspace_root().join(".flash-sale/running.json")
}

pub(crate) fn up(foreground: bool) -> anyhow::Result<()> {
    if state_file().exists() {
        bail!("already running (see `cargo xtask status`); `cargo xtask down` stops it");
    }
    crate::setup::run()?;
    services::build()?;
    let runtime = tokio::runtime::Runtime::new()?;
    let root = services::workspace_root().join(".flash-sale");
    let stack = runtime.block_on(Stack::start_in(
        BrokerStorage::Sqlite,
        Some(&root),
        !foreground,
    ))?;
    let mut children = Vec::new();
    let mut infos = Vec::new();
    for name in services::SERVICES {
        let (child, info) = services::start(name, stack.info(), !foreground)?;
        children.push(child);
        infos.push(info);
    }
    let (child, gateway) =
        services::start_gateway(stack.info(), &infos[0], &infos[1], !foreground)?;
    children.push(child);
    infos.push(gateway);
    let running = Running {
        stack: stack.info().clone(),
        services: infos,
    };
    print_running(&running);
    if foreground {
        println!("\nrunning in the foreground; Ctrl-C stops everything");
        runtime.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
        for child in &mut children {
            services::stop(child);
        }
        drop(stack);
        println!("stopped");
        return Ok(());
    }
    let mut running = running;
    running.stack = stack.detach();
    std::fs::write(state_file(), serde_json::to_string_pretty(&running)?)?;
    println!("\nrunning in the background; `cargo xtask down` stops it");
    Ok(())
}

fn print_running(r: &Running) {
    let s = &r.stack;
    println!("flash-sale is up:");
    for svc in &r.services {
        println!(
            "  {:<18} {}   (health and metrics: {})",
            svc.name,
            svc.url(),
            svc.management_url()
        );
    }
    println!("  {:<18} {}", "redis", s.redis_url());
    println!("  {:<18} {}", "mysql", s.database_url());
    println!("  {:<18} {}", "kafka broker", s.brokers());
    println!("  {:<18} {}", "admin token", LOCAL_ADMIN_TOKEN);
    println!(
        "  {:<18} {} (HS256; the gateway also trusts the body's userId locally)",
        "gateway JWT key",
        services::LOCAL_JWT_SECRET
    );
    println!("  {:<18} {}", "files and logs", s.dir.display());
    let inv = &r.services[1];
    let ord = r.services.get(2).unwrap_or(&r.services[0]);
    println!("\ntry it (the buy goes through the gateway, the last URL above):");
    println!(
        "  curl -s -X POST {}{} -H 'Authorization: Bearer {LOCAL_ADMIN_TOKEN}' \\\n    -H 'Content-Type: application/json' -d '{{\"activityId\":\"1\",\"name\":\"demo\",\"stock\":100}}'",
        inv.url(),
        api::inventory::ACTIVITIES
    );
    println!(
        "  curl -s -X POST {}{} -H 'Content-Type: application/json' \\\n    -d '{{\"userId\":\"42\",\"activityId\":\"1\",\"quantity\":1}}'",
        ord.url(),
        api::order::CREATE
    );
    println!(
        "\nthen, with the orderNo it answered (once the order is CREATED, a moment later):\n  curl -s {}{}  -H 'x-user-id: 42'\n  cargo xtask pay <orderNo>        (the payment simulator signs and sends the provider's callback)\n  curl -s -X POST {}{} -H 'Content-Type: application/json' -d '{{\"userId\":\"42\"}}'\n  curl -s '{}{}?userId=42'",
        ord.url(),
        api::order::one("<orderNo>"),
        ord.url(),
        api::order::cancel("<orderNo>"),
        ord.url(),
        api::order::MINE
    );
}

pub(crate) fn down() -> anyhow::Result<()> {
    let path = state_file();
    let Ok(text) = std::fs::read_to_string(&path) else {
        println!("nothing is running");
        return Ok(());
    };
    let running: Running =
        serde_json::from_str(&text).context("reading .flash-sale/running.json")?;
    for svc in &running.services {
        let _ = std::process::Command::new("kill")
            .arg(svc.pid.to_string())
            .status();
    }
    std::thread::sleep(std::time::Duration::from_secs(2));
    Stack::stop_detached(&running.stack);
    std::fs::remove_file(&path)?;
    println!("stopped");
    Ok(())
}

pub(crate) fn status() -> anyhow::Result<()> {
    match std::fs::read_to_string(state_file()) {
        Ok(text) => {
            let running: Running = serde_json::from_str(&text)?;
            print_running(&running);
            print_stranded(&running);
        }
        Err(_) => println!("nothing is running (`cargo xtask up` starts it)"),
    }
    Ok(())
}

/// The reconciler's measure of stranded orders, from inventory-service's metrics: the age of the
/// oldest accepted order not yet in MySQL, per activity (alerted on as FlashSaleOrderStranded).
fn print_stranded(r: &Running) {
    const GAUGE: &str = "flash_sale_oldest_unwritten_order_age_seconds";
    let Some(inventory) = r.services.iter().find(|s| s.name == "inventory-service") else {
        return;
    };
    let addr = format!("127.0.0.1:{}", inventory.management_port);
    let Some(metrics) = services::http_get(&addr, "/metrics") else {
        println!("\ninventory-service's metrics did not answer at {addr}");
        return;
    };
    let lines: Vec<&str> = metrics.lines().filter(|l| l.starts_with(GAUGE)).collect();
    println!("\noldest accepted order not yet in MySQL (s, measured by each reconciler pass):");
    if lines.is_empty() {
        println!("  no activity reconciled yet");
    }
    for line in lines {
        println!("  {}", line.trim_start_matches(GAUGE));
    }
}
