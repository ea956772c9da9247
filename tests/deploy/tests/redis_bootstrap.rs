//! The Redis pieces of `k8s/redis/`, run for real on 127.0.0.1: three `redis-server`s started
//! from the ConfigMap's `redis.conf` (only port, bind address and maxmemory given, as the
//! StatefulSet gives maxmemory and the announced name; each in its own working directory as the
//! pod's /data) accept the seed's
//! tuning, `bootstrap.sh` forms the cluster and is a no-op when rerun, data survives a restart
//! through the AOF, and `rejoin.sh` heals a cluster whose nodes all came back at new addresses.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use deploy_tests::{repo_path, scratch_dir, tools};

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

fn cli(port: u16, args: &[&str]) -> String {
    let output = Command::new(tools::require("redis-cli"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("running redis-cli");
    String::from_utf8_lossy(&output.stdout).replace('\r', "")
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
    fn start(dir: &Path, port: u16) -> Node {
        std::fs::create_dir_all(dir).unwrap();
        let child = Command::new(tools::require("redis-server"))
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

fn run_script(script: &str, env: &[(&str, String)]) -> Output {
    let mut command = Command::new("sh");
    command.arg(repo_path(script));
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

fn dirs(base: &Path) -> [PathBuf; 3] {
    [
        base.join("node-0"),
        base.join("node-1"),
        base.join("node-2"),
    ]
}

#[test]
fn the_cluster_forms_once_keeps_its_data_and_heals_after_every_node_moved() {
    let _ = tools::require("redis-cli");
    let base = scratch_dir!("redis-cluster");
    let dirs = dirs(&base);
    let ports = [free_port(), free_port(), free_port()];
    let nodes: Vec<Node> = dirs
        .iter()
        .zip(ports)
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

    // First run: forms the cluster.
    let env = [
        ("REDIS_NODES", nodes_list(&ports)),
        ("BOOTSTRAP_TIMEOUT_SECONDS", "60".to_owned()),
    ];
    let first = run_script("k8s/redis/bootstrap.sh", &env);
    let log = String::from_utf8_lossy(&first.stdout).into_owned()
        + &String::from_utf8_lossy(&first.stderr);
    assert!(first.status.success(), "bootstrap failed:\n{log}");
    assert!(log.contains("creating the cluster"), "{log}");
    for port in ports {
        wait_until("cluster_state:ok", Duration::from_secs(30), || {
            info_field(port, "cluster_state") == "ok"
        });
        assert_eq!(info_field(port, "cluster_slots_assigned"), "16384");
        assert_eq!(info_field(port, "cluster_known_nodes"), "3");
    }

    // Second run (every later `kubectl apply`): nothing to do.
    let second = run_script("k8s/redis/bootstrap.sh", &env);
    let log = String::from_utf8_lossy(&second.stdout).into_owned();
    assert!(
        second.status.success() && log.contains("already formed"),
        "{log}"
    );

    // An activity's keys share a slot, so one script can touch them all.
    let set = Command::new(tools::require("redis-cli"))
        .args([
            "-c",
            "-h",
            "127.0.0.1",
            "-p",
            &ports[0].to_string(),
            "set",
            "fs:{act:1}:stock",
            "10000",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&set.stdout).trim(), "OK");

    // Every node stops and comes back on a new port: each nodes.conf now points at dead peers.
    for node in nodes {
        node.stop();
    }
    let moved = [free_port(), free_port(), free_port()];
    let nodes: Vec<Node> = dirs
        .iter()
        .zip(moved)
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
        ],
    );
    assert!(
        hook.status.success(),
        "rejoin.sh failed: {}",
        String::from_utf8_lossy(&hook.stderr)
    );
    for port in moved {
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

    // The data came back from the AOF.
    let get = Command::new(tools::require("redis-cli"))
        .args([
            "-c",
            "-h",
            "127.0.0.1",
            "-p",
            &moved[2].to_string(),
            "get",
            "fs:{act:1}:stock",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "10000");
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
        ],
    );
    assert!(hook.status.success());
    // Still alone: forming the cluster is the bootstrap Job's job.
    assert_eq!(info_field(port, "cluster_known_nodes"), "1");
    drop(node);
}
