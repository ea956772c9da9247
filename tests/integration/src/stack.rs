//! Private server instances for tests and the local stack: Redis, MariaDB and a Kafka-protocol
//! broker (nisshi), each on a free 127.0.0.1 port, with its files under one temporary directory.
//! Dropping a [`Stack`] stops them and deletes the directory; [`Stack::detach`] keeps them running
//! (`cargo xtask up`). [`Stack::kill`] and [`Stack::restart`] crash a server with SIGKILL and
//! start it again on the same port and data (the crash drills). [`Stack::start_redis_only`]
//! starts Redis alone, for tests that need nothing else. [`Stack::start_with`] with
//! [`StackOptions::redis_cluster`] runs a three-master Redis Cluster instead of one Redis, formed
//! by the Kubernetes bundle's own `k8s/redis/` files (see `Stack::start_redis_cluster`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// Where the broker keeps its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BrokerStorage {
    /// SQLite file: survives a broker restart (crash tests, the main job).
    Sqlite,
    /// In memory: fastest, and an acknowledged order is lost on restart (`xtask bench --broker
    /// memory`).
    Memory,
}

impl BrokerStorage {
    pub const ALL: [BrokerStorage; 2] = [Self::Sqlite, Self::Memory];

    /// The name options use: `sqlite`, `memory`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Memory => "memory",
        }
    }
}

/// What a running stack offers, and which processes make it up. Serializable, so `cargo xtask
/// up` can write it down and `cargo xtask down` can stop what it started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StackInfo {
    pub dir: PathBuf,
    pub redis_port: u16,
    pub mysql_port: u16,
    pub broker_port: u16,
    pub mysql_password: String,
    pub broker_storage: BrokerStorage,
    pub pids: Vec<u32>,
    /// A Redis Cluster (the services' `redis.cluster` mode) rather than one Redis.
    #[serde(default)]
    pub redis_cluster: bool,
    /// The cluster's nodes (masters), when [`StackInfo::redis_cluster`].
    #[serde(default)]
    pub redis_cluster_ports: Vec<u16>,
    /// The password every cluster node requires (empty for the single Redis, which has none).
    #[serde(default)]
    pub redis_password: String,
    /// MariaDB sized for a load run ([`StackOptions::mysql_for_load`]).
    #[serde(default)]
    pub mysql_for_load: bool,
}

impl StackInfo {
    /// The single Redis' URL; for a cluster, every node's, with the password, comma separated
    /// (what `redis.url` takes in cluster mode).
    pub fn redis_url(&self) -> String {
        if self.redis_cluster {
            self.redis_cluster_ports
                .iter()
                .map(|port| format!("redis://:{}@127.0.0.1:{port}", self.redis_password))
                .collect::<Vec<_>>()
                .join(",")
        } else {
            format!("redis://127.0.0.1:{}", self.redis_port)
        }
    }

    /// DSN of the application user on the `flash_sale` database.
    pub fn database_url(&self) -> String {
        format!(
            "mysql://flash_sale:{}@127.0.0.1:{}/flash_sale",
            self.mysql_password, self.mysql_port
        )
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.broker_port)
    }
}

/// How to start a stack ([`Stack::start_with`]).
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub storage: BrokerStorage,
    /// Where the temporary directory goes (`None`: the system's temp dir).
    pub root: Option<PathBuf>,
    /// Keep the servers running after the [`Stack`] is dropped (`cargo xtask up`).
    pub detached: bool,
    /// A three-master Redis Cluster instead of one Redis.
    pub redis_cluster: bool,
    /// MariaDB with the memory and redo log of a load run (`cargo xtask bench`, `xtask sale`):
    /// a 512 MiB buffer pool and a 256 MiB redo log, where the tests' many small stacks take
    /// 64 and 8 MiB, for runs that write up to a million orders. It was tried against the
    /// bench's slow drains and did not cure them (those were stranded reservations,
    /// docs/performance.md); the sizes stay as a load run's.
    pub mysql_for_load: bool,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            storage: BrokerStorage::Sqlite,
            root: None,
            detached: false,
            redis_cluster: false,
            mysql_for_load: false,
        }
    }
}

/// Masters of the stack's Redis Cluster, as the bundle's StatefulSet runs them. No replicas:
/// the suite checks the services on a cluster's slots and redirects, not failover
/// (`tests/deploy/tests/redis_bootstrap.rs` checks that).
pub const REDIS_CLUSTER_MASTERS: usize = 3;

/// A running stack; dropping it stops every server and removes its files.
pub struct Stack {
    info: StackInfo,
    redis: Option<Child>,
    /// The Redis Cluster's nodes, when the stack runs one instead of `redis`.
    redis_nodes: Vec<Child>,
    mysql: Option<Child>,
    broker: Option<Child>,
    detached: bool,
}

/// One of the stack's servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    Redis,
    Mysql,
    Broker,
}

/// The Kafka-protocol broker's program: nisshi, whose group coordinator expires a member that
/// died without a LeaveGroup (tansu 0.6 never did: docs/decisions.md).
pub const BROKER_PROGRAM: &str = "nisshi";

/// Names another broker program with the same command line (`broker --listener-url ...
/// --storage-engine ...`): `nix run .#sale` sets it to nixpkgs' tansu, which has no nisshi.
pub const BROKER_PROGRAM_ENV: &str = "FLASH_SALE_BROKER_PROGRAM";

/// The broker program in force: [`BROKER_PROGRAM_ENV`] if set, else [`BROKER_PROGRAM`].
fn broker_program() -> anyhow::Result<PathBuf> {
    match std::env::var_os(BROKER_PROGRAM_ENV) {
        Some(path) => Ok(PathBuf::from(path)),
        None => program(BROKER_PROGRAM),
    }
}

/// The three servers the stack needs, with how to install them on Debian.
pub const REQUIRED_TOOLS: &[(&str, &str)] = &[
    ("redis-server", "apt-get install redis-server"),
    ("mariadbd", "apt-get install mariadb-server"),
    ("mariadb-install-db", "apt-get install mariadb-server"),
    (BROKER_PROGRAM, "cargo xtask setup (cargo install nisshi)"),
];

/// Finds a program on PATH, in /usr/sbin (mariadbd) or in ~/.cargo/bin (the broker).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push("/usr/sbin".into());
    dirs.push("/usr/local/sbin".into());
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    if let Some(cargo_home) = std::env::var_os("CARGO_HOME") {
        dirs.push(Path::new(&cargo_home).join("bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

fn program(name: &str) -> anyhow::Result<PathBuf> {
    find_program(name).with_context(|| {
        let hint = REQUIRED_TOOLS
            .iter()
            .find(|(n, _)| *n == name)
            .map_or("", |(_, h)| h);
        format!("`{name}` is not installed; `cargo xtask setup` installs it ({hint})")
    })
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// `port` when a server had it before (a restart keeps its address), else a free one.
fn port_or_free(port: u16) -> anyhow::Result<u16> {
    if port == 0 { free_port() } else { Ok(port) }
}

fn wait_for_port(port: u16, child: &mut Child, what: &str, log: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            let tail = std::fs::read_to_string(log).unwrap_or_default();
            bail!("{what} exited with {status} before listening on {port}:\n{tail}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    bail!(
        "{what} did not listen on 127.0.0.1:{port} within 30 s (log: {})",
        log.display()
    )
}

fn spawn_logged(mut cmd: Command, dir: &Path, name: &str, detached: bool) -> anyhow::Result<Child> {
    // Appended to: a restarted server's log follows the one it had before its crash.
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if detached {
        // Its own process group: a Ctrl-C in the terminal that started it does not stop it.
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
    }
    cmd.spawn().with_context(|| format!("starting {name}"))
}

/// A MariaDB data directory initialised once per process and copied for each stack (install
/// takes seconds; a copy, milliseconds).
fn mariadb_template() -> anyhow::Result<&'static Path> {
    static TEMPLATE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let result = TEMPLATE.get_or_init(|| {
        let make = || -> anyhow::Result<PathBuf> {
            let dir = tempfile::Builder::new()
                .prefix("flash-sale-mariadb-template-")
                .tempdir()?
                .keep();
            let data = dir.join("data");
            let out = Command::new(program("mariadb-install-db")?)
                .arg("--no-defaults")
                .arg(format!("--datadir={}", data.display()))
                .args([
                    "--auth-root-authentication-method=normal",
                    "--skip-test-db",
                    "--user=root",
                    "--innodb-log-file-size=8M",
                ])
                .output()
                .context("running mariadb-install-db")?;
            if !out.status.success() {
                bail!(
                    "mariadb-install-db failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            Ok(data)
        };
        make().map_err(|e| format!("{e:#}"))
    });
    match result {
        Ok(path) => Ok(path.as_path()),
        Err(e) => bail!("{e}"),
    }
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

impl Stack {
    /// Starts Redis, MariaDB (with the `flash_sale` database, its user and the migrations) and the
    /// broker. `root` is where the temporary directory goes (`None`: the system's temp dir).
    pub async fn start(storage: BrokerStorage) -> anyhow::Result<Self> {
        Self::start_in(storage, None, false).await
    }

    pub async fn start_in(
        storage: BrokerStorage,
        root: Option<&Path>,
        detached: bool,
    ) -> anyhow::Result<Self> {
        let mut stack = Self::empty(storage, root, detached)?;
        stack.start_redis()?;
        stack.start_mysql().await?;
        stack.start_broker()?;
        Ok(stack)
    }

    /// Starts a stack as `options` say; with [`StackOptions::redis_cluster`], a Redis Cluster
    /// (`Stack::start_redis_cluster`) takes the single Redis' place.
    pub async fn start_with(options: StackOptions) -> anyhow::Result<Self> {
        let mut stack = Self::empty(options.storage, options.root.as_deref(), options.detached)?;
        stack.info.mysql_for_load = options.mysql_for_load;
        if options.redis_cluster {
            stack.start_redis_cluster()?;
        } else {
            stack.start_redis()?;
        }
        stack.start_mysql().await?;
        stack.start_broker()?;
        stack.refresh_pids();
        Ok(stack)
    }

    /// Starts Redis alone, for tests that need nothing else (the gateway's cluster-wide bucket):
    /// MariaDB's start-up and migrations take seconds. Such a stack has no database and no
    /// broker, so [`Stack::database_url`] and [`Stack::brokers`] name nothing that listens, and
    /// only [`Server::Redis`] may be killed and restarted.
    pub fn start_redis_only() -> anyhow::Result<Self> {
        let mut stack = Self::empty(BrokerStorage::Memory, None, false)?;
        stack.start_redis()?;
        Ok(stack)
    }

    /// Starts a Redis Cluster alone ([`Stack::start_redis_only`]'s twin), for the gateway's
    /// cluster-wide bucket on a cluster.
    pub fn start_redis_cluster_only() -> anyhow::Result<Self> {
        let mut stack = Self::empty(BrokerStorage::Memory, None, false)?;
        stack.start_redis_cluster()?;
        Ok(stack)
    }

    /// The stack's directory, with no server running yet.
    fn empty(storage: BrokerStorage, root: Option<&Path>, detached: bool) -> anyhow::Result<Self> {
        let dir = match root {
            Some(root) => {
                std::fs::create_dir_all(root)?;
                tempfile::Builder::new().prefix("stack-").tempdir_in(root)?
            }
            None => tempfile::Builder::new()
                .prefix("flash-sale-stack-")
                .tempdir()?,
        }
        .keep();
        let password: String = format!("pw{:016x}", rand_u64());
        Ok(Stack {
            info: StackInfo {
                dir,
                redis_port: 0,
                mysql_port: 0,
                broker_port: 0,
                mysql_password: password,
                broker_storage: storage,
                pids: Vec::new(),
                redis_cluster: false,
                redis_cluster_ports: Vec::new(),
                redis_password: String::new(),
                mysql_for_load: false,
            },
            redis: None,
            redis_nodes: Vec::new(),
            mysql: None,
            broker: None,
            detached,
        })
    }

    pub fn info(&self) -> &StackInfo {
        &self.info
    }

    pub fn redis_url(&self) -> String {
        self.info.redis_url()
    }

    pub fn database_url(&self) -> String {
        self.info.database_url()
    }

    pub fn brokers(&self) -> String {
        self.info.brokers()
    }

    /// Keeps the servers running after this value is gone; returns how to find and stop them.
    pub fn detach(mut self) -> StackInfo {
        self.detached = true;
        self.refresh_pids();
        self.info.clone()
    }

    fn refresh_pids(&mut self) {
        self.info.pids = [&self.redis, &self.mysql, &self.broker]
            .into_iter()
            .flatten()
            .chain(&self.redis_nodes)
            .map(Child::id)
            .collect();
    }

    /// The process id of one server, while it runs.
    pub fn pid(&mut self, server: Server) -> Option<u32> {
        self.child(server).as_ref().map(Child::id)
    }

    /// Crashes one server: SIGKILL, no chance to flush or say goodbye. [`Server::Redis`] on a
    /// Redis Cluster kills every node.
    pub fn kill(&mut self, server: Server) {
        if let Some(mut child) = self.child(server).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if server == Server::Redis {
            for mut node in self.redis_nodes.drain(..) {
                let _ = node.kill();
                let _ = node.wait();
            }
        }
    }

    /// Starts a server again after [`Stack::kill`], on the same port and the same data. (Not a
    /// Redis Cluster's nodes: no test needs it.)
    pub fn restart(&mut self, server: Server) -> anyhow::Result<()> {
        if server == Server::Redis && self.info.redis_cluster {
            bail!("restarting a Redis Cluster's nodes is not supported");
        }
        match server {
            Server::Redis => self.start_redis(),
            Server::Mysql => self.spawn_mysql(),
            Server::Broker => self.start_broker(),
        }?;
        self.refresh_pids();
        Ok(())
    }

    /// Copies Redis' append-only files as they are now: what a replica that is behind, or a disk
    /// whose last second was never synced, would hold after a crash.
    pub fn copy_redis_data(&self) -> anyhow::Result<()> {
        let (aof, copy) = self.redis_aof_dirs();
        let _ = std::fs::remove_dir_all(&copy);
        copy_dir(&aof, &copy)
    }

    /// After [`Stack::kill`] of Redis: puts the copy of [`Stack::copy_redis_data`] in place of
    /// its append-only files, so the restart comes back without what was written since.
    pub fn restore_redis_copy(&self) -> anyhow::Result<()> {
        let (aof, copy) = self.redis_aof_dirs();
        std::fs::remove_dir_all(&aof).context("removing Redis' append-only files")?;
        std::fs::rename(&copy, &aof).context("restoring the copy of Redis' files")?;
        Ok(())
    }

    fn redis_aof_dirs(&self) -> (PathBuf, PathBuf) {
        // Redis 7 keeps its multi-part append-only file in `appendonlydir` under `--dir`.
        (
            self.info.dir.join("appendonlydir"),
            self.info.dir.join("appendonlydir.copy"),
        )
    }

    fn child(&mut self, server: Server) -> &mut Option<Child> {
        match server {
            Server::Redis => &mut self.redis,
            Server::Mysql => &mut self.mysql,
            Server::Broker => &mut self.broker,
        }
    }

    /// Starts Redis (again: on the same port and append-only file).
    fn start_redis(&mut self) -> anyhow::Result<()> {
        let port = port_or_free(self.info.redis_port)?;
        let mut cmd = Command::new(program("redis-server")?);
        cmd.args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
            ])
            .arg("--dir")
            .arg(&self.info.dir);
        let mut child = spawn_logged(cmd, &self.info.dir, "redis", self.detached)?;
        wait_for_port(
            port,
            &mut child,
            "redis-server",
            &self.info.dir.join("redis.log"),
        )?;
        self.info.redis_port = port;
        self.redis = Some(child);
        Ok(())
    }

    /// Starts a Redis Cluster of [`REDIS_CLUSTER_MASTERS`] masters as the bundle runs one: each
    /// node by `k8s/redis/start.sh` with the ConfigMap's `k8s/redis/redis.conf` and the password
    /// in `REDISCLI_AUTH` (as the StatefulSet does; each in its own directory, as the pod's
    /// /data), then `k8s/redis/bootstrap.sh` forms the cluster (`REDIS_CLUSTER_REPLICAS=0`), and
    /// the start waits until every node sees it `ok`.
    fn start_redis_cluster(&mut self) -> anyhow::Result<()> {
        let bundle = bundle_redis_dir();
        let redis_cli = program("redis-cli")?;
        let redis_server = program("redis-server")?;
        // start.sh and bootstrap.sh call the programs by name.
        let mut path = vec![
            redis_cli
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            redis_server
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
        ];
        path.extend(
            std::env::var_os("PATH")
                .map_or_else(Vec::new, |p| std::env::split_paths(&p).collect::<Vec<_>>()),
        );
        let path = std::env::join_paths(path)?;
        let password = format!("rc{:016x}", rand_u64());
        let ports = cluster_ports(REDIS_CLUSTER_MASTERS)?;
        for (i, &port) in ports.iter().enumerate() {
            let name = format!("redis-node-{i}");
            let dir = self.info.dir.join(&name);
            std::fs::create_dir_all(&dir)?;
            let mut cmd = Command::new("sh");
            cmd.arg(bundle.join("start.sh"))
                .arg(bundle.join("redis.conf"))
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                // What the StatefulSet adds: the name clients are redirected to (there the
                // pod's DNS name; redis.conf prefers hostnames in redirects).
                .args([
                    "--cluster-announce-hostname",
                    "127.0.0.1",
                    "--daemonize",
                    "no",
                ])
                .env("REDISCLI_AUTH", &password)
                .env("PATH", &path)
                .current_dir(&dir);
            let mut child = spawn_logged(cmd, &self.info.dir, &name, self.detached)?;
            let log = self.info.dir.join(format!("{name}.log"));
            let up = wait_for_port(port, &mut child, "redis-server (cluster node)", &log);
            self.redis_nodes.push(child);
            up?;
        }
        let nodes = ports
            .iter()
            .map(|port| format!("127.0.0.1:{port}"))
            .collect::<Vec<_>>()
            .join(" ");
        let out = Command::new("sh")
            .arg(bundle.join("bootstrap.sh"))
            .env("REDIS_NODES", nodes)
            .env("REDIS_CLUSTER_REPLICAS", "0")
            .env("BOOTSTRAP_TIMEOUT_SECONDS", "60")
            .env("REDISCLI_AUTH", &password)
            .env("PATH", &path)
            .stdin(Stdio::null())
            .output()
            .context("running k8s/redis/bootstrap.sh")?;
        let log = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        std::fs::write(self.info.dir.join("redis-bootstrap.log"), &log)?;
        if !out.status.success() {
            bail!("k8s/redis/bootstrap.sh failed ({}):\n{log}", out.status);
        }
        // Every node's view settles: all slots assigned, every node known, state ok.
        let deadline = Instant::now() + Duration::from_secs(30);
        for &port in &ports {
            loop {
                let info = Command::new(&redis_cli)
                    .args([
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &port.to_string(),
                        "cluster",
                        "info",
                    ])
                    .env("REDISCLI_AUTH", &password)
                    .output()
                    .context("running redis-cli")?;
                let info = String::from_utf8_lossy(&info.stdout).replace('\r', "");
                let field = |name: &str| {
                    info.lines()
                        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                        .unwrap_or_default()
                        .to_owned()
                };
                if field("cluster_state") == "ok"
                    && field("cluster_slots_assigned") == "16384"
                    && field("cluster_known_nodes") == REDIS_CLUSTER_MASTERS.to_string()
                {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the Redis Cluster node on {port} is not ok after 30 s:\n{info}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        self.info.redis_cluster = true;
        self.info.redis_port = ports[0];
        self.info.redis_cluster_ports = ports;
        self.info.redis_password = password;
        Ok(())
    }

    async fn start_mysql(&mut self) -> anyhow::Result<()> {
        copy_dir(mariadb_template()?, &self.info.dir.join("mysql"))?;
        self.spawn_mysql()?;
        let port = self.info.mysql_port;

        // The application database and user, then the schema.
        let root = format!("mysql://root@127.0.0.1:{port}/mysql");
        let pool = sqlx::MySqlPool::connect(&root)
            .await
            .context("connecting as root")?;
        for statement in [
            "CREATE DATABASE flash_sale CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci"
                .to_owned(),
            format!(
                "CREATE USER 'flash_sale'@'127.0.0.1' IDENTIFIED BY '{}'",
                self.info.mysql_password
            ),
            "GRANT ALL ON flash_sale.* TO 'flash_sale'@'127.0.0.1'".to_owned(),
        ] {
            sqlx::query(&statement).execute(&pool).await?;
        }
        pool.close().await;
        let app = sqlx::MySqlPool::connect(&self.database_url()).await?;
        flash_sale_common::db::MIGRATOR
            .run(&app)
            .await
            .context("applying migrations")?;
        app.close().await;
        Ok(())
    }

    /// Runs mariadbd on the stack's data directory (again: on the same port).
    fn spawn_mysql(&mut self) -> anyhow::Result<()> {
        let data = self.info.dir.join("mysql");
        let port = port_or_free(self.info.mysql_port)?;
        let (buffer_pool, redo_log) = if self.info.mysql_for_load {
            ("512M", "256M")
        } else {
            ("64M", "8M")
        };
        let mut cmd = Command::new(program("mariadbd")?);
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!(
                "--socket={}",
                self.info.dir.join("mysql.sock").display()
            ))
            .arg(format!(
                "--pid-file={}",
                self.info.dir.join("mysql.pid").display()
            ))
            .arg(format!("--port={port}"))
            .args([
                "--bind-address=127.0.0.1",
                "--user=root",
                "--skip-log-bin",
                "--max-connections=500",
            ])
            .arg(format!("--innodb-buffer-pool-size={buffer_pool}"))
            .arg(format!("--innodb-log-file-size={redo_log}"));
        let mut child = spawn_logged(cmd, &self.info.dir, "mysql", self.detached)?;
        wait_for_port(
            port,
            &mut child,
            "mariadbd",
            &self.info.dir.join("mysql.log"),
        )?;
        self.info.mysql_port = port;
        self.mysql = Some(child);
        Ok(())
    }

    /// Starts the broker (again: on the same port and, with SQLite storage, the same data).
    fn start_broker(&mut self) -> anyhow::Result<()> {
        let port = port_or_free(self.info.broker_port)?;
        let url = format!("tcp://127.0.0.1:{port}");
        let storage = match self.info.broker_storage {
            BrokerStorage::Sqlite => "sqlite://broker.db",
            BrokerStorage::Memory => "memory://broker/",
        };
        let mut cmd = Command::new(broker_program()?);
        cmd.current_dir(&self.info.dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", storage])
            .env("RUST_LOG", "warn");
        let mut child = spawn_logged(cmd, &self.info.dir, "broker", self.detached)?;
        wait_for_port(
            port,
            &mut child,
            BROKER_PROGRAM,
            &self.info.dir.join("broker.log"),
        )?;
        self.info.broker_port = port;
        self.broker = Some(child);
        Ok(())
    }

    /// Stops every process listed in `info` (a stack detached by an earlier command).
    pub fn stop_detached(info: &StackInfo) {
        for pid in &info.pids {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        std::thread::sleep(Duration::from_millis(300));
        for pid in &info.pids {
            let _ = Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&info.dir);
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        for child in [&mut self.broker, &mut self.mysql, &mut self.redis]
            .into_iter()
            .flatten()
            .chain(&mut self.redis_nodes)
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.info.dir);
    }
}

/// The bundle's Redis files (`k8s/redis/` of the repository).
fn bundle_redis_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../k8s/redis")
}

/// `count` distinct free ports whose cluster-bus twins (port + 10000) are free as well.
fn cluster_ports(count: usize) -> anyhow::Result<Vec<u16>> {
    let mut ports: Vec<u16> = Vec::new();
    for _ in 0..1000 {
        if ports.len() == count {
            return Ok(ports);
        }
        let port = free_port()?;
        if port < 55_000
            && !ports.contains(&port)
            && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
        {
            ports.push(port);
        }
    }
    bail!("no {count} free ports with free cluster-bus ports (port + 10000)")
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stack written down by `cargo xtask up` before cluster mode existed reads back as the
    /// single Redis it was; a cluster's URL lists every node with the password, as the services'
    /// `redis.url` takes it in cluster mode.
    #[test]
    fn redis_url_names_the_single_redis_or_every_cluster_node() {
        let old = r#"{"dir":"/tmp/s","redis_port":7001,"mysql_port":7002,"broker_port":7003,
            "mysql_password":"pw","broker_storage":"Sqlite","pids":[1,2,3]}"#;
        let mut info: StackInfo = serde_json::from_str(old).unwrap();
        assert!(!info.redis_cluster);
        assert_eq!(info.redis_url(), "redis://127.0.0.1:7001");

        info.redis_cluster = true;
        info.redis_cluster_ports = vec![7001, 7011, 7021];
        info.redis_password = "secret".into();
        assert_eq!(
            info.redis_url(),
            "redis://:secret@127.0.0.1:7001,redis://:secret@127.0.0.1:7011,\
             redis://:secret@127.0.0.1:7021"
        );
        let back: StackInfo = serde_json::from_str(&serde_json::to_string(&info).unwrap()).unwrap();
        assert_eq!(back.redis_url(), info.redis_url());
    }
}
