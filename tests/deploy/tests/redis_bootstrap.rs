//! The Redis pieces of `k8s/redis/`, run for real on 127.0.0.1: as many `redis-server`s as the
//! StatefulSet runs (three masters and their replicas), started as the pod starts them, by
//! `start.sh` with the password in `REDISCLI_AUTH` (as the redis-auth Secret gives it) and the
//! ConfigMap's `redis.conf` (only port, bind address and maxmemory given, as the StatefulSet gives
//! maxmemory and the announced name; each in its own working directory as the pod's /data),
//! accept the seed's tuning and refuse every client without the password (NOAUTH), the probes
//! (`alive.sh`, `ready.sh`) included; `bootstrap.sh`, given the bundle's
//! `REDIS_CLUSTER_REPLICAS` and the password, forms the cluster with a replica per master (each
//! linked to its master with the password) and is a no-op when rerun, and without the password
//! fails at once; `ready.sh` holds a replica back until it is in sync; with one master killed its
//! replica takes over and every slot range answers again; data survives a restart through the
//! AOF; and `rejoin.sh` heals a cluster whose nodes all came back at new addresses.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use deploy_tests::manifest::{Overlay, string_map};
use deploy_tests::{repo_path, scratch_dir, tools};

/// Masters of the cluster: each owns a third of the slots.
const MASTERS: usize = 3;

/// The password, as the redis-auth Secret holds it (deploy.sh writes 48 hex digits).
const PASSWORD: &str = "0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a6978";

/// The variable every script and redis-cli of the pod reads the password from.
fn auth() -> (&'static str, String) {
    ("REDISCLI_AUTH", PASSWORD.to_owned())
}

/// Replicas per master, as production's bootstrap Job gets it from the `redis-env` ConfigMap.
fn replicas_per_master() -> usize {
    let rendered = Overlay::Production.rendered();
    let job = rendered.get("Job", "redis-cluster-bootstrap");
    let sources = job.pointer("/spec/template/spec/containers/0/envFrom");
    let sources = sources
        .and_then(|s| s.as_array())
        .cloned()
        .unwrap_or_default();
    let value = sources.iter().find_map(|source| {
        let name = source.pointer("/configMapRef/name")?.as_str()?;
        let data = string_map(rendered.get("ConfigMap", name).pointer("/data"));
        data.get("REDIS_CLUSTER_REPLICAS").cloned()
    });
    let value = value.expect("the bootstrap Job is given REDIS_CLUSTER_REPLICAS");
    value.parse().expect("REDIS_CLUSTER_REPLICAS is a number")
}

/// A port whose cluster-bus twin (port + 10000) is free as well.
fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// redis-cli against the node on `port`, authenticated with `password` (through
/// `REDISCLI_AUTH`, as in the pod) or not at all.
fn redis_cli(port: u16, password: Option<&str>) -> Command {
    let mut command = Command::new(tools::require("redis-cli"));
    command.args(["-h", "127.0.0.1", "-p", &port.to_string()]);
    command.env_remove("REDISCLI_AUTH");
    if let Some(password) = password {
        command.env("REDISCLI_AUTH", password);
    }
    command
}

/// What redis-cli prints for `args`, authenticated with `password` or not at all.
fn cli_as(port: u16, password: Option<&str>, args: &[&str]) -> String {
    let output = redis_cli(port, password)
        .args(args)
        .output()
        .expect("running redis-cli");
    String::from_utf8_lossy(&output.stdout).replace('\r', "")
}

/// redis-cli with the password.
fn cli(port: u16, args: &[&str]) -> String {
    cli_as(port, Some(PASSWORD), args)
}

fn info_field(port: u16, field: &str) -> String {
    cli(port, &["cluster", "info"])
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{field}:")).map(str::to_owned))
        .unwrap_or_default()
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One Redis node, stopped when dropped.
struct Node {
    child: Child,
    port: u16,
}

impl Node {
    /// Starts a node as the StatefulSet does: `start.sh` with the password in REDISCLI_AUTH.
    fn start(dir: &Path, port: u16) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        let _ = tools::require("redis-server");
        let child = Command::new("sh")
            .arg(repo_path("k8s/redis/start.sh"))
            .arg(repo_path("k8s/redis/redis.conf"))
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            // What the StatefulSet passes: maxmemory, and the name clients are redirected to
            // (there the pod's DNS name; with the preferred endpoint type `hostname`, a node
            // without one redirects to "?").
            .args([
                "--maxmemory",
                "64mb",
                "--cluster-announce-hostname",
                "127.0.0.1",
                "--daemonize",
                "no",
            ])
            .arg("--logfile")
            .arg(dir.join("redis.log"))
            .env("REDISCLI_AUTH", PASSWORD)
            // As in the pod: files land in the working directory.
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting redis-server");
        let mut node = Node { child, port };
        wait_until(&format!("redis on {port}"), Duration::from_secs(10), || {
            assert!(
                node.child.try_wait().unwrap().is_none(),
                "redis-server on {port} exited; see {}",
                dir.join("redis.log").display()
            );
            cli(port, &["ping"]).trim() == "PONG"
        });
        node
    }

    /// A clean shutdown: Redis flushes its AOF on SHUTDOWN.
    fn stop(mut self) {
        cli(self.port, &["shutdown"]);
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs a script of the bundle with exactly the Redis credentials `env` gives (none when it
/// gives no REDISCLI_AUTH).
fn run_script(script: &str, env: &[(&str, String)]) -> Output {
    let mut command = Command::new("sh");
    command.arg(repo_path(script)).env_remove("REDISCLI_AUTH");
    for (key, value) in env {
        command.env(key, value);
    }
    command
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"))
}

fn nodes_list(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|port| format!("127.0.0.1:{port}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn dirs(base: &Path, count: usize) -> Vec<PathBuf> {
    (0..count).map(|i| base.join(format!("node-{i}"))).collect()
}

fn free_ports(count: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < count {
        let port = free_port();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    ports
}

/// One line of CLUSTER NODES: id, port, whether it is a live master, its master's id, slots.
struct ClusterNode {
    id: String,
    port: u16,
    master: bool,
    master_id: String,
    slots: Vec<(u16, u16)>,
}

fn cluster_nodes(port: u16) -> Vec<ClusterNode> {
    cli(port, &["cluster", "nodes"])
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let address = fields[1].split('@').next().unwrap();
            let node_port = address.rsplit(':').next().unwrap().parse().unwrap_or(0);
            let flags = fields[2];
            let slots = fields[8..]
                .iter()
                .filter(|slot| !slot.starts_with('['))
                .map(|range| match range.split_once('-') {
                    Some((from, to)) => (from.parse().unwrap(), to.parse().unwrap()),
                    None => (range.parse().unwrap(), range.parse().unwrap()),
                })
                .collect();
            ClusterNode {
                id: fields[0].to_owned(),
                port: node_port,
                master: flags.contains("master") && !flags.contains("fail"),
                master_id: fields[3].to_owned(),
                slots,
            }
        })
        .collect()
}

/// Runs `ready.sh` (the readiness probe) against the node on `port`, with the password.
fn ready(port: u16) -> bool {
    let env = [("REDIS_PORT", port.to_string()), auth()];
    run_script("k8s/redis/ready.sh", &env).status.success()
}

/// Runs `alive.sh` (the startup and liveness probe) against the node on `port`, with the
/// password or without.
fn alive(port: u16, password: Option<&str>) -> bool {
    let mut env = vec![("REDIS_PORT", port.to_string())];
    env.extend(password.map(|p| ("REDISCLI_AUTH", p.to_owned())));
    run_script("k8s/redis/alive.sh", &env).status.success()
}

/// A key whose slot lies in `from..=to`.
fn key_in(port: u16, (from, to): (u16, u16)) -> String {
    (0..)
        .map(|n| format!("probe:{n}"))
        .find(|key| {
            let slot: u16 = cli(port, &["cluster", "keyslot", key])
                .trim()
                .parse()
                .unwrap();
            (from..=to).contains(&slot)
        })
        .unwrap()
}

/// A command through the cluster (redis-cli follows redirects, authenticating at each node),
/// answered by way of `port`.
fn cluster_cli(port: u16, args: &[&str]) -> String {
    let output = redis_cli(port, Some(PASSWORD))
        .arg("-c")
        .args(args)
        .output()
        .expect("running redis-cli");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// Every node refuses a client without the password, or with a wrong one, and its probes
/// pass only with the password; the password is the one start.sh was given, for clients
/// (requirepass) and for the replica's link to its master (masterauth).
fn assert_authentication_required(port: u16) {
    let refused = "NOAUTH Authentication required.";
    assert_eq!(cli_as(port, None, &["ping"]).trim(), refused, "no password");
    let wrong = redis_cli(port, Some("not-the-password"))
        .arg("ping")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("WRONGPASS"), "a wrong password: {stderr}");
    assert_eq!(String::from_utf8_lossy(&wrong.stdout).trim(), refused);
    let unauthenticated = cli_as(port, None, &["set", "fs:{act:9}:stock", "1"]);
    assert_eq!(
        unauthenticated.trim(),
        refused,
        "a write without the password"
    );
    assert_eq!(cli(port, &["ping"]).trim(), "PONG", "with the password");
    for key in ["requirepass", "masterauth"] {
        let answer = cli(port, &["config", "get", key]);
        assert_eq!(answer.lines().nth(1), Some(PASSWORD), "{key}: {answer}");
    }
    assert!(alive(port, Some(PASSWORD)), "alive.sh with the password");
    assert!(!alive(port, None), "alive.sh passes without the password");
}

#[test]
fn start_refuses_a_missing_or_unsafe_password() {
    for (password, why) in [
        ("", "empty"),
        ("pass word", "only letters"),
        ("p@ss:word", "only letters"),
    ] {
        let output = Command::new("sh")
            .arg(repo_path("k8s/redis/start.sh"))
            .arg(repo_path("k8s/redis/redis.conf"))
            .env("REDISCLI_AUTH", password)
            .output()
            .expect("running start.sh");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(why),
            "{password:?}: {stderr}"
        );
    }
}

#[test]
fn the_cluster_forms_once_keeps_its_data_and_heals_after_every_node_moved() {
    let _ = tools::require("redis-cli");
    let base = scratch_dir!("redis-cluster");
    let per_master = replicas_per_master();
    let count = MASTERS * (1 + per_master);
    let dirs = dirs(&base, count);
    let ports = free_ports(count);
    let mut nodes: Vec<Node> = dirs
        .iter()
        .zip(ports.iter().copied())
        .map(|(dir, port)| Node::start(dir, port))
        .collect();

    // The seed's tuning, as a real Redis took it from the ConfigMap's file.
    for (key, value) in [
        ("appendonly", "yes"),
        ("appendfsync", "everysec"),
        ("save", ""),
        ("maxmemory-policy", "noeviction"),
        ("slowlog-log-slower-than", "10000"),
        ("busy-reply-threshold", "5000"),
        ("cluster-enabled", "yes"),
        ("cluster-require-full-coverage", "yes"),
        ("cluster-preferred-endpoint-type", "hostname"),
    ] {
        let answer = cli(ports[0], &["config", "get", key]);
        let lines: Vec<&str> = answer.lines().collect();
        assert_eq!(
            lines.get(1).copied().unwrap_or_default(),
            value,
            "{key}: {answer}"
        );
    }

    // Nobody gets in without the password; the probes use it.
    for &port in &ports {
        assert_authentication_required(port);
    }

    // Without the password the bootstrap stops at once, naming the node that refused it,
    // rather than wait for its deadline.
    let env = [
        ("REDIS_NODES", nodes_list(&ports)),
        ("REDIS_CLUSTER_REPLICAS", per_master.to_string()),
        ("BOOTSTRAP_TIMEOUT_SECONDS", "60".to_owned()),
    ];
    let started = Instant::now();
    let refused = run_script("k8s/redis/bootstrap.sh", &env);
    let log = String::from_utf8_lossy(&refused.stdout).into_owned();
    assert!(
        !refused.status.success() && log.contains("refuses our password"),
        "bootstrap without the password:\n{log}"
    );
    assert!(started.elapsed() < Duration::from_secs(10), "it waited");
    assert_eq!(info_field(ports[0], "cluster_known_nodes"), "1");

    // First run with the password, as the Job has it: forms the cluster.
    let env = [
        ("REDIS_NODES", nodes_list(&ports)),
        ("REDIS_CLUSTER_REPLICAS", per_master.to_string()),
        ("BOOTSTRAP_TIMEOUT_SECONDS", "60".to_owned()),
        auth(),
    ];
    let first = run_script("k8s/redis/bootstrap.sh", &env);
    let log = String::from_utf8_lossy(&first.stdout).into_owned()
        + &String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "bootstrap failed:\n{log}");
    assert!(log.contains("creating the cluster"), "{log}");
    for &port in &ports {
        wait_until("cluster_state:ok", Duration::from_secs(30), || {
            info_field(port, "cluster_state") == "ok"
        });
        assert_eq!(info_field(port, "cluster_slots_assigned"), "16384");
        assert_eq!(info_field(port, "cluster_known_nodes"), count.to_string());
    }
    // Three masters, each with its replicas, once every node's view has caught up.
    let roles_settled = |port: u16| {
        let view = cluster_nodes(port);
        let masters: Vec<&ClusterNode> = view.iter().filter(|n| n.master).collect();
        masters.len() == MASTERS
            && masters
                .iter()
                .all(|m| view.iter().filter(|n| n.master_id == m.id).count() == per_master)
    };
    for &port in &ports {
        wait_until("masters and replicas", Duration::from_secs(30), || {
            roles_settled(port)
        });
    }
    let view = cluster_nodes(ports[0]);
    let masters: Vec<&ClusterNode> = view.iter().filter(|n| n.master).collect();
    assert_eq!(masters.len(), MASTERS, "masters");
    for master in &masters {
        let replicas = view.iter().filter(|n| n.master_id == master.id).count();
        assert_eq!(
            replicas, per_master,
            "replicas of the master on {}",
            master.port
        );
    }
    // Ready (the readiness probe) once every replica is in sync: linked to its master, which
    // admits it only with the password (masterauth).
    for &port in &ports {
        wait_until(
            &format!("node {port} ready"),
            Duration::from_secs(30),
            || ready(port),
        );
    }
    for replica in view.iter().filter(|n| !n.master) {
        let info = cli(replica.port, &["info", "replication"]);
        assert!(
            info.contains("role:slave") && info.contains("master_link_status:up"),
            "replica on {}: {info}",
            replica.port
        );
        let probe = run_script(
            "k8s/redis/ready.sh",
            &[("REDIS_PORT", replica.port.to_string())],
        );
        assert!(
            !probe.status.success(),
            "ready.sh passes without the password"
        );
    }

    // Second run (every later `kubectl apply`): nothing to do.
    let second = run_script("k8s/redis/bootstrap.sh", &env);
    let log = String::from_utf8_lossy(&second.stdout).into_owned();
    assert!(
        second.status.success() && log.contains("already formed"),
        "{log}"
    );

    // An activity's keys share a slot, so one script can touch them all.
    assert_eq!(
        cluster_cli(ports[0], &["set", "fs:{act:1}:stock", "10000"]),
        "OK"
    );

    // A drain takes one node: here the master of that key dies outright (kill -9).
    let slot: u16 = cli(ports[0], &["cluster", "keyslot", "fs:{act:1}:stock"])
        .trim()
        .parse()
        .unwrap();
    let owner = masters
        .iter()
        .find(|m| {
            m.slots
                .iter()
                .any(|&(from, to)| (from..=to).contains(&slot))
        })
        .expect("a master owns the slot");
    let (owner_id, owner_port) = (owner.id.clone(), owner.port);
    let replica_port = view.iter().find(|n| n.master_id == owner_id).unwrap().port;
    // The replica has the write before its master goes.
    assert_eq!(
        cli(owner_port, &["wait", &per_master.to_string(), "5000"]).trim(),
        per_master.to_string()
    );
    let index = ports.iter().position(|&p| p == owner_port).unwrap();
    let mut killed = nodes.remove(index);
    killed.child.kill().unwrap();
    killed.child.wait().unwrap();
    drop(killed);
    // Until it takes over, the replica is not ready: a drain may not evict it too (the budget
    // counts it as missing).
    wait_until(
        "the orphaned replica to turn unready",
        Duration::from_secs(4),
        || !ready(replica_port),
    );
    // It takes over, and every slot range answers again, on every surviving node.
    let survivors: Vec<u16> = ports.iter().copied().filter(|&p| p != owner_port).collect();
    wait_until("the replica's failover", Duration::from_secs(60), || {
        survivors.iter().all(|&port| {
            let view = cluster_nodes(port);
            let promoted = view.iter().any(|n| n.port == replica_port && n.master);
            promoted && info_field(port, "cluster_state") == "ok"
        })
    });
    let after = cluster_nodes(replica_port);
    let promoted = after.iter().find(|n| n.port == replica_port).unwrap();
    assert!(promoted.master, "the replica took over its master's slots");
    let ranges: Vec<(u16, u16)> = after
        .iter()
        .filter(|n| n.master)
        .flat_map(|n| n.slots.iter().copied())
        .collect();
    let covered: u32 = ranges
        .iter()
        .map(|&(from, to)| u32::from(to - from) + 1)
        .sum();
    assert_eq!(covered, 16384, "every slot served by a live master");
    // Each command may be retried for a while: on a loaded machine a live node can miss
    // heartbeats and the cluster refuse commands for a moment; it must answer again.
    let answers = |port: u16, args: &[&str], wanted: &str| {
        let mut last = String::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            last = cluster_cli(port, args);
            if last == wanted {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let view = cli(port, &["cluster", "nodes"]);
        panic!("{args:?} via {port}: {last:?}, not {wanted:?}; cluster nodes:\n{view}");
    };
    for &range in &ranges {
        let key = key_in(replica_port, range);
        for &port in &survivors {
            answers(port, &["set", &key, "v"], "OK");
            answers(port, &["get", &key], "v");
        }
    }
    // The killed master's write is there, from its replica.
    answers(survivors[0], &["get", "fs:{act:1}:stock"], "10000");
    assert!(ready(replica_port), "the promoted node is ready");

    // The killed node comes back with its volume, follows the node that took over, and is
    // ready once in sync.
    nodes.insert(index, Node::start(&dirs[index], owner_port));
    wait_until(
        "the old master back as a ready replica",
        Duration::from_secs(60),
        || {
            let me = cluster_nodes(owner_port);
            let me = me.iter().find(|n| n.port == owner_port);
            me.is_some_and(|n| !n.master && n.master_id == promoted.id) && ready(owner_port)
        },
    );

    // Every node stops and comes back on a new port: each nodes.conf now points at dead peers.
    for node in nodes {
        node.stop();
    }
    let moved = free_ports(count);
    let nodes: Vec<Node> = dirs
        .iter()
        .zip(moved.iter().copied())
        .map(|(dir, port)| Node::start(dir, port))
        .collect();
    let stale = cli(moved[1], &["cluster", "nodes"]);
    assert!(
        stale.contains(&format!("127.0.0.1:{}", ports[2])),
        "node 1 should still list node 2 at its old port:\n{stale}"
    );

    // The postStart hook of one node meets the others where they are now; gossip does the rest.
    let hook = run_script(
        "k8s/redis/rejoin.sh",
        &[
            ("REDIS_PORT", moved[0].to_string()),
            ("REDIS_NODES", nodes_list(&moved[1..])),
            auth(),
        ],
    );
    assert!(
        hook.status.success(),
        "rejoin.sh failed: {}",
        String::from_utf8_lossy(&hook.stderr)
    );
    for &port in &moved {
        wait_until(
            &format!("node {port} to see the moved cluster"),
            Duration::from_secs(60),
            || {
                let view = cli(port, &["cluster", "nodes"]);
                info_field(port, "cluster_state") == "ok"
                    && moved
                        .iter()
                        .all(|p| view.contains(&format!("127.0.0.1:{p}@")))
            },
        );
    }

    // The data came back from the AOF, and a restarted node still wants the password.
    assert_eq!(cluster_cli(moved[2], &["get", "fs:{act:1}:stock"]), "10000");
    assert_authentication_required(moved[2]);
    drop(nodes);
}

#[test]
fn the_hook_leaves_a_node_without_slots_alone() {
    let base = scratch_dir!("redis-fresh");
    let port = free_port();
    let node = Node::start(&base.join("node"), port);
    let other = free_port();
    let hook = run_script(
        "k8s/redis/rejoin.sh",
        &[
            ("REDIS_PORT", port.to_string()),
            ("REDIS_NODES", format!("127.0.0.1:{other}")),
            auth(),
        ],
    );
    assert!(hook.status.success());
    // Still alone: forming the cluster is the bootstrap Job's job.
    assert_eq!(info_field(port, "cluster_known_nodes"), "1");
    drop(node);
}
