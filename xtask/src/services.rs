//! The service binaries, built in release mode and run as processes against a stack.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flash_sale_tests::stack::{StackInfo, free_port};
use serde::{Deserialize, Serialize};

/// The admin token of a local stack (local only; never a production value).
pub(crate) const LOCAL_ADMIN_TOKEN: &str = "local-admin-token";
/// The key the local order-service and the payment simulator (`cargo xtask pay`) share.
pub(crate) const LOCAL_PAYMENT_SECRET: &str = "local-payment-callback-secret";
/// The key the local gateway signs queue tickets and purchase passes with (`--waiting-room`).
pub(crate) const LOCAL_ADMISSION_SECRET: &str = "local-admission-secret-of-32-bytes-or-more";

pub(crate) const SERVICES: &[&str] = &["order-service", "inventory-service"];

/// Everything `build` compiles: the services and the gateway in front of them.
const BINARIES: &[&str] = &["order-service", "inventory-service", "gateway"];

/// The gateway's token key on a local stack (local only; never a production value).
pub(crate) const LOCAL_JWT_SECRET: &str = "local-only-hs256-secret-32-bytes-long";

/// Starts the gateway in front of `order` and `inventory`, trusting the body's userId (the
/// development mode the seed's `hey` command needs) while still verifying tokens that are sent.
pub(crate) fn start_gateway(
    stack: &StackInfo,
    order: &ServiceInfo,
    inventory: &ServiceInfo,
    detached: bool,
) -> anyhow::Result<(Child, ServiceInfo)> {
    gateway_launch(order, inventory)?.start(stack, detached)
}

/// How [`start_gateway`] starts the gateway, on ports of its own.
pub(crate) fn gateway_launch(
    order: &ServiceInfo,
    inventory: &ServiceInfo,
) -> anyhow::Result<Launch> {
    let env = [
        ("FLASH_SALE_UPSTREAMS__ORDER_SERVICE", order.url()),
        ("FLASH_SALE_UPSTREAMS__INVENTORY_SERVICE", inventory.url()),
        ("FLASH_SALE_AUTH__HS256_SECRET", LOCAL_JWT_SECRET.to_owned()),
        ("FLASH_SALE_AUTH__TRUST_BODY_USER_ID", "true".to_owned()),
        // One key for every local gateway, so a ticket outlives a restart and a replica.
        (
            "FLASH_SALE_ADMISSION__SECRET",
            LOCAL_ADMISSION_SECRET.to_owned(),
        ),
    ];
    Launch::new("gateway", &env)
}

/// Where a running service listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ServiceInfo {
    pub(crate) name: String,
    pub(crate) pid: u32,
    pub(crate) port: u16,
    pub(crate) management_port: u16,
}

impl ServiceInfo {
    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn management_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.management_port)
    }
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits in the workspace")
        .to_path_buf()
}

/// Environment variable naming a directory of prebuilt service binaries (`nix run .#sale` sets
/// it); when set, nothing is built.
pub(crate) const BIN_DIR_ENV: &str = "FLASH_SALE_BIN_DIR";

/// `cargo build --release` of the service binaries, unless `FLASH_SALE_BIN_DIR` provides them.
pub(crate) fn build() -> anyhow::Result<()> {
    if std::env::var_os(BIN_DIR_ENV).is_some() {
        return Ok(());
    }
    println!("building the services (release)...");
    let mut cmd = cargo_build();
    for s in BINARIES {
        cmd.args(["-p", s]);
    }
    let status = cmd.status().context("running cargo build")?;
    if !status.success() {
        bail!("building the services failed");
    }
    Ok(())
}

/// `cargo build --release` of one example of the workspace (the bench's bare proxy); its path.
pub(crate) fn build_example(package: &str, example: &str) -> anyhow::Result<PathBuf> {
    let status = cargo_build()
        .args(["-p", package, "--example", example])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the example {example} of {package} failed");
    }
    Ok(release_dir().join("examples").join(example))
}

fn cargo_build() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root())
        .args(["build", "--release", "--quiet"]);
    cmd
}

fn release_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace_root().join("target"), PathBuf::from)
        .join("release")
}

fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV) {
        return PathBuf::from(dir).join(name);
    }
    release_dir().join(name)
}

/// Starts one service against `stack`, logging to `<stack dir>/<name>.log`, and waits until it
/// is ready.
pub(crate) fn start(
    name: &str,
    stack: &StackInfo,
    detached: bool,
) -> anyhow::Result<(Child, ServiceInfo)> {
    start_with(name, stack, detached, &[])
}

/// [`start`] with extra environment (settings overrides such as `FLASH_SALE_ORDER__...`).
pub(crate) fn start_with(
    name: &str,
    stack: &StackInfo,
    detached: bool,
    env: &[(&str, String)],
) -> anyhow::Result<(Child, ServiceInfo)> {
    Launch::new(name, env)?.start(stack, detached)
}

/// How one service process is started, kept so that it can be started again the same way, on
/// the same ports (a crash drill's restart, as a supervisor would do it).
#[derive(Debug, Clone)]
pub(crate) struct Launch {
    pub(crate) binary: String,
    /// Its name in logs and tables, and its log file: `order-service-b` for a second instance.
    pub(crate) label: String,
    /// App and management ports.
    pub(crate) ports: (u16, u16),
    /// Settings overrides (`FLASH_SALE_...`).
    pub(crate) env: Vec<(String, String)>,
}

impl Launch {
    /// `binary` on two free ports, labelled with its own name.
    pub(crate) fn new(binary: &str, env: &[(&str, String)]) -> anyhow::Result<Self> {
        Ok(Self {
            binary: binary.to_owned(),
            label: binary.to_owned(),
            ports: (free_port()?, free_port()?),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
        })
    }

    /// Starts the process, appending to `<stack dir>/<label>.log`, and waits until it is ready.
    pub(crate) fn start(
        &self,
        stack: &StackInfo,
        detached: bool,
    ) -> anyhow::Result<(Child, ServiceInfo)> {
        let (port, management_port) = self.ports;
        let log_path = stack.dir.join(format!("{}.log", self.label));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)?;
        let mut cmd = Command::new(binary(&self.binary));
        cmd.env("FLASH_SALE_SERVER__HOST", "127.0.0.1")
            .env("FLASH_SALE_SERVER__PORT", port.to_string())
            .env("FLASH_SALE_MANAGEMENT__HOST", "127.0.0.1")
            .env("FLASH_SALE_MANAGEMENT__PORT", management_port.to_string())
            .env("FLASH_SALE_REDIS__URL", stack.redis_url())
            .env("FLASH_SALE_REDIS__CLUSTER", stack.redis_cluster.to_string())
            .env("FLASH_SALE_DATABASE__URL", stack.database_url())
            .env("FLASH_SALE_KAFKA__BROKERS", stack.brokers())
            .env("FLASH_SALE_INVENTORY__ADMIN_TOKEN", LOCAL_ADMIN_TOKEN)
            .env("FLASH_SALE_PAYMENT__CALLBACK_SECRET", LOCAL_PAYMENT_SECRET)
            .env("FLASH_SALE_TELEMETRY__LOG_FORMAT", "json")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if detached {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let mut child = cmd.spawn().with_context(|| {
            format!(
                "starting {} (build it with `cargo build --release`)",
                binary(&self.binary).display()
            )
        })?;
        let info = ServiceInfo {
            name: self.label.clone(),
            pid: child.id(),
            port,
            management_port,
        };
        let ready = format!("127.0.0.1:{management_port}");
        wait_ready(
            &mut child,
            &self.label,
            &log_path,
            Duration::from_secs(60),
            || http_ok(&ready, "/health/ready"),
        )?;
        Ok((child, info))
    }
}

/// Waits until `ready` holds for a process just started. One that exits first fails with its
/// log (`log`), and one not ready within `limit` fails too (it is left running).
pub(crate) fn wait_ready(
    child: &mut Child,
    name: &str,
    log: &Path,
    limit: Duration,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{name} exited with {status}:\n{log}");
        }
        if ready() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{name} was not ready within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A blocking GET's body on a 200 answer (no client library needed for a probe).
pub(crate) fn http_get(addr: &str, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}

/// A blocking GET that is true on a 200 answer (no client library needed for a probe).
fn http_ok(addr: &str, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

/// SIGTERM, then wait for the graceful drain (SIGKILL after 30 s).
pub(crate) fn stop(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}
