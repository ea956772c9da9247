//! The clustered stores as their own software reads the rendered manifests, in every overlay.
//!
//! - Redpanda: a broker founds the cluster only when its advertised RPC address is, as a plain
//!   string, one of the seed servers (`get_node_index_in_seed_servers` in Redpanda's
//!   `src/v/cluster/cluster_discovery.cc` compares `advertised_rpc_api` with each seed's
//!   address). So the seed list must be exactly the addresses the StatefulSet's pods advertise,
//!   with their names and namespace filled in as Kubernetes fills in `$(VAR)` in `args`.
//! - Redis Cluster: every master has a replica, the node list and the bootstrap agree with the
//!   StatefulSet, and the disruption budget lets a drain take only one node at a time and never
//!   a replica that is waiting to take over (`redis_bootstrap.rs` shows the failover itself).

use std::collections::{BTreeMap, BTreeSet};

use deploy_tests::manifest::{Object, Overlay, Rendered, array_at, int_at, str_at, string_map};
use serde_json::Value;

/// The values `$(VAR)` takes in one pod's container args: `env` (plain values and the
/// `metadata.name` / `metadata.namespace` field references) over the `envFrom` ConfigMaps.
fn pod_env(
    rendered: &Rendered,
    owner: &Object,
    container: &Value,
    pod: &str,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for source in array_at(container, "/envFrom") {
        let name = str_at(source, "/configMapRef/name").expect("envFrom only from ConfigMaps");
        env.extend(string_map(rendered.get("ConfigMap", name).pointer("/data")));
    }
    let namespace = owner.namespace().expect("a namespaced StatefulSet");
    for entry in array_at(container, "/env") {
        let name = str_at(entry, "/name").unwrap().to_owned();
        let value = match str_at(entry, "/valueFrom/fieldRef/fieldPath") {
            Some("metadata.name") => Some(pod.to_owned()),
            Some("metadata.namespace") => Some(namespace.to_owned()),
            Some(other) => panic!("{}: unexpected field reference {other}", owner.id()),
            None => str_at(entry, "/value").map(str::to_owned),
        };
        if let Some(value) = value {
            env.insert(name, value);
        }
    }
    env
}

/// Kubernetes' expansion of `$(VAR)` in command and args: one pass, unknown names left as they
/// are.
fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("$(") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        match after.find(')') {
            Some(end) if env.contains_key(&after[..end]) => {
                out.push_str(&env[&after[..end]]);
                rest = &after[end + 1..];
            }
            _ => {
                out.push_str("$(");
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The value of `--flag=value` in a container's args, expanded for one pod.
fn flag(args: &[String], name: &str) -> Option<String> {
    let prefix = format!("--{name}=");
    args.iter()
        .find_map(|arg| arg.strip_prefix(&prefix).map(str::to_owned))
}

/// The container's args as pod `pod` of the StatefulSet gets them.
fn pod_args(rendered: &Rendered, owner: &Object, container: &Value, pod: &str) -> Vec<String> {
    let env = pod_env(rendered, owner, container, pod);
    let args = array_at(container, "/args")
        .iter()
        .filter_map(Value::as_str);
    args.map(|arg| expand(arg, &env)).collect()
}

fn container<'a>(owner: &'a Object, name: &str) -> &'a Value {
    let found = owner.containers().into_iter();
    let mut found = found.filter(|c| str_at(c, "/name") == Some(name));
    found
        .next()
        .unwrap_or_else(|| panic!("{}: no container {name}", owner.id()))
}

fn pod_names(statefulset: &Object) -> Vec<String> {
    let replicas = int_at(&statefulset.0, "/spec/replicas").expect("replicas");
    (0..replicas)
        .map(|index| format!("{}-{index}", statefulset.name()))
        .collect()
}

#[test]
fn the_redpanda_seed_servers_are_exactly_the_addresses_the_brokers_advertise() {
    for overlay in Overlay::ALL {
        let rendered = overlay.rendered();
        let context = overlay.name();
        let redpanda = rendered.get("StatefulSet", "redpanda");
        let broker = container(redpanda, "redpanda");
        let mut advertised = BTreeSet::new();
        let mut seed_lists = BTreeSet::new();
        for pod in pod_names(redpanda) {
            let args = pod_args(rendered, redpanda, broker, &pod);
            let address = flag(&args, "advertise-rpc-addr")
                .unwrap_or_else(|| panic!("{context}: {pod} advertises no RPC address"));
            assert!(
                !address.contains("$("),
                "{context}: {pod} advertises {address}"
            );
            advertised.insert(address);
            let seeds = flag(&args, "seeds").unwrap_or_else(|| panic!("{context}: no --seeds"));
            seed_lists.insert(seeds);
        }
        // Every broker is given the same list, ...
        assert_eq!(
            seed_lists.len(),
            1,
            "{context}: brokers get different seeds {seed_lists:?}"
        );
        let list = seed_lists.pop_first().unwrap();
        let seeds: Vec<&str> = list.split(',').map(str::trim).collect();
        let distinct: BTreeSet<String> = seeds.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(
            distinct.len(),
            seeds.len(),
            "{context}: a seed twice in {list}"
        );
        // ... and it names every broker exactly as that broker names itself: otherwise no
        // broker finds itself in the list, nobody founds the cluster, and all of them wait.
        assert_eq!(
            distinct, advertised,
            "{context}: seed servers are not the advertised RPC addresses"
        );
    }
}

// ------------------------------------------------------------------------------ Redis Cluster

/// Redis needs at least three masters for a cluster.
const REDIS_MIN_MASTERS: i64 = 3;

#[test]
fn every_redis_master_has_a_replica_and_a_drain_takes_one_node_at_a_time() {
    for overlay in Overlay::ALL {
        let rendered = overlay.rendered();
        let context = overlay.name();
        let redis = rendered.get("StatefulSet", "redis-cluster");
        let pods = pod_names(redis);
        let node = container(redis, "redis");
        let env = pod_env(rendered, redis, node, &pods[0]);

        // The node list the bootstrap and the hook read is exactly the StatefulSet's pods.
        let headless = str_at(&redis.0, "/spec/serviceName").unwrap();
        let expected: Vec<String> = pods
            .iter()
            .map(|p| format!("{p}.{headless}:6379"))
            .collect();
        let listed: Vec<String> = env["REDIS_NODES"]
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        assert_eq!(listed, expected, "{context}: REDIS_NODES");

        // The bootstrap gives each master the same number of replicas, at least one, and the
        // pods are exactly masters and their replicas.
        let bootstrap = rendered.get("Job", "redis-cluster-bootstrap");
        let job_env = pod_env(
            rendered,
            bootstrap,
            container(bootstrap, "bootstrap"),
            "job",
        );
        let per_master: i64 = job_env
            .get("REDIS_CLUSTER_REPLICAS")
            .unwrap_or_else(|| {
                panic!("{context}: the bootstrap is given no REDIS_CLUSTER_REPLICAS")
            })
            .parse()
            .expect("a number of replicas");
        assert!(per_master >= 1, "{context}: masters without replicas");
        let count = pods.len() as i64;
        let masters = count / (1 + per_master);
        let whole = masters * (1 + per_master) == count && masters >= REDIS_MIN_MASTERS;
        assert!(
            whole,
            "{context}: {count} pods are not masters with {per_master} replicas each"
        );

        // One node at a time; and a pod that is not ready (a replica whose master just went,
        // before it takes over) is evicted only while the budget holds, never on top of
        // another missing node.
        let budgets: Vec<&Object> = rendered
            .of_kind("PodDisruptionBudget")
            .filter(|pdb| {
                str_at(&pdb.0, "/spec/selector/matchLabels/app.kubernetes.io~1name")
                    == Some("redis-cluster")
            })
            .collect();
        assert_eq!(budgets.len(), 1, "{context}: Redis budgets");
        let pdb = &budgets[0].0["spec"];
        assert_eq!(
            pdb.get("maxUnavailable"),
            Some(&Value::from(1)),
            "{context}: {pdb}"
        );
        let unhealthy = str_at(pdb, "/unhealthyPodEvictionPolicy");
        assert_eq!(unhealthy, Some("IfHealthyBudget"), "{context}");

        // Ready means a replica is in sync with its master: a rolling update or a drain waits
        // for that before it takes the next node.
        let probe = array_at(node, "/readinessProbe/exec/command").iter();
        let probe: Vec<&str> = probe.filter_map(Value::as_str).collect();
        assert_eq!(probe, ["sh", "/scripts/ready.sh"], "{context}: readiness");
    }
}
