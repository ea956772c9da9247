//! Policy over the rendered output of every overlay: the rules and relations no schema checks.
//! The workload checklist (requests and a memory limit, probes of the pod itself, a preStop
//! drain inside the grace period, the restricted security context, a disruption budget, spread
//! over nodes), default-deny network policies with exactly the needed connections, secrets only
//! by reference, Redis credentials from the redis-auth Secret for everything that reaches Redis,
//! configuration that agrees with `docs/contracts.md` and with the pods, the gateway's rule
//! file of each overlay (purchase passes required outside dev, the rest as in the base), HPA
//! targets, production's canary plans, and that every name one object uses for another
//! resolves. Single values (HPA numbers, probe paths, image names, env values) are pinned by the
//! render snapshots instead.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use deploy_tests::contracts;
use deploy_tests::manifest::{
    EXTERNAL_SECRETS, Object, Overlay, Rendered, array_at, int_at, selector_matches, str_at,
    string_map,
};
use serde_json::{Value, json};

const SERVICES: [&str; 3] = ["gateway", "order-service", "inventory-service"];

type Labels = BTreeMap<String, String>;

fn each_overlay(mut check: impl FnMut(Overlay, &Rendered)) {
    for overlay in Overlay::ALL {
        check(overlay, overlay.rendered());
    }
}

/// Every container of every pod-running object, with a `overlay: Kind/name container c` context.
fn each_container(mut check: impl FnMut(&Object, &Value, &str)) {
    each_overlay(|overlay, rendered| {
        for owner in rendered.pod_owners() {
            for container in owner.containers() {
                let name = str_at(container, "/name").unwrap_or_default();
                let context = format!("{}: {} container {name}", overlay.name(), owner.id());
                check(owner, container, &context);
            }
        }
    });
}

/// A Kubernetes quantity in base units (bytes, cores).
fn quantity(text: &str) -> f64 {
    let split = text.find(char::is_alphabetic).unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number.parse().expect("a quantity");
    let factor = match suffix {
        "" => 1.0,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        other => panic!("unknown quantity suffix {other:?} in {text:?}"),
    };
    number * factor
}

/// The workload of a service: its Deployment, or its Rollout in production.
fn workload<'a>(rendered: &'a Rendered, name: &str) -> &'a Object {
    let found = rendered.workloads().find(|w| w.name() == name);
    found.unwrap_or_else(|| panic!("no {name}"))
}

// ------------------------------------------------------------------- namespace and labels

#[test]
fn every_object_lives_in_the_namespace_and_carries_the_recommended_labels() {
    each_overlay(|overlay, rendered| {
        let namespaces: Vec<&str> = rendered.of_kind("Namespace").map(Object::name).collect();
        assert_eq!(namespaces.len(), 1, "{}: one Namespace", overlay.name());
        for object in &rendered.objects {
            let context = format!("{}: {}", overlay.name(), object.id());
            if object.kind() != "Namespace" {
                assert_eq!(object.namespace(), Some(namespaces[0]), "{context}");
            }
            let labels = object.labels();
            for (key, wanted) in [
                ("app.kubernetes.io/name", None),
                ("app.kubernetes.io/component", None),
                ("app.kubernetes.io/part-of", Some("flash-sale")),
                ("app.kubernetes.io/managed-by", Some("kustomize")),
            ] {
                let value = labels.get(key).map(String::as_str);
                let right = value.is_some() && wanted.is_none_or(|w| value == Some(w));
                assert!(right, "{context}: {key} is {value:?}");
            }
            if object.pod_template().is_some() {
                let pod = object.pod_labels();
                for key in ["app.kubernetes.io/name", "app.kubernetes.io/part-of"] {
                    assert_eq!(pod.get(key), labels.get(key), "{context}: pod label {key}");
                }
            }
        }
    });
}

// ------------------------------------------------------------------ the workload checklist

#[test]
fn every_container_has_requests_and_a_memory_limit() {
    each_container(|_, container, context| {
        let resource = |pointer: &str| {
            str_at(container, &format!("/resources/{pointer}"))
                .map(quantity)
                .unwrap_or_else(|| panic!("{context}: no {pointer}"))
        };
        assert!(resource("requests/cpu") > 0.0, "{context}");
        let (request, limit) = (resource("requests/memory"), resource("limits/memory"));
        assert!(request <= limit, "{context}: memory request over limit");
    });
}

/// A probe that checks the pod itself: HTTP or TCP to its own port (no `host`), or a command
/// that talks to localhost only.
fn assert_probe_is_local(probe: &Value, context: &str) {
    if let Some(check) = probe.get("httpGet").or_else(|| probe.get("tcpSocket")) {
        assert!(check.get("host").is_none(), "{context}: has a host");
    } else if let Some(exec) = probe.get("exec") {
        let command = array_at(exec, "/command").iter();
        let command: Vec<&str> = command.filter_map(Value::as_str).collect();
        for (index, word) in command.iter().enumerate() {
            let host = match *word {
                "-h" | "--host" => command.get(index + 1).copied(),
                _ => word.strip_prefix("--host="),
            };
            if let Some(host) = host {
                let local = matches!(host, "127.0.0.1" | "localhost");
                assert!(local, "{context}: talks to {host}");
            }
        }
    } else {
        panic!("{context}: probe of an unknown kind: {probe}");
    }
}

#[test]
fn long_running_containers_probe_only_themselves() {
    each_container(|owner, container, context| {
        if !owner.is_long_running() {
            return;
        }
        for probe in ["readinessProbe", "startupProbe", "livenessProbe"] {
            match container.get(probe) {
                Some(value) => assert_probe_is_local(value, &format!("{context} {probe}")),
                None => assert_eq!(probe, "livenessProbe", "{context}: no {probe}"),
            }
        }
    });
}

#[test]
fn pre_stop_drains_within_the_grace_period() {
    /// Time left after the preStop hook for the process's own drain on SIGTERM.
    const MIN_DRAIN_SECONDS: i64 = 15;
    each_container(|owner, container, context| {
        if !owner.is_long_running() {
            return;
        }
        let grace = int_at(owner.pod_spec().unwrap(), "/terminationGracePeriodSeconds")
            .unwrap_or_else(|| panic!("{context}: no terminationGracePeriodSeconds"));
        let seconds = int_at(container, "/lifecycle/preStop/sleep/seconds")
            .unwrap_or_else(|| panic!("{context}: no preStop sleep"));
        let drains = seconds > 0 && seconds + MIN_DRAIN_SECONDS <= grace;
        assert!(drains, "{context}: preStop {seconds}s, grace {grace}s");
    });
}

/// Asserts that every pointer of `rules` is (or, not `must`, is not) its value in `target`.
fn assert_fields(target: &Value, rules: &Value, must: bool, context: &str) {
    for (pointer, value) in rules.as_object().unwrap() {
        let actual = target.pointer(pointer);
        assert_eq!(
            actual == Some(value),
            must,
            "{context}: {pointer} is {actual:?}"
        );
    }
}

#[test]
fn every_pod_runs_with_the_restricted_security_context() {
    let pod_must = json!({
        "/securityContext/runAsNonRoot": true,
        "/securityContext/seccompProfile/type": "RuntimeDefault",
        "/automountServiceAccountToken": false,
    });
    let pod_must_not = json!({
        "/securityContext/runAsUser": 0, "/hostNetwork": true, "/hostPID": true, "/hostIPC": true,
    });
    let container_must = json!({
        "/securityContext/allowPrivilegeEscalation": false,
        "/securityContext/readOnlyRootFilesystem": true,
        "/securityContext/runAsNonRoot": true,
        "/securityContext/capabilities/drop": ["ALL"],
    });
    let container_must_not =
        json!({"/securityContext/privileged": true, "/securityContext/runAsUser": 0});
    each_container(|owner, container, context| {
        let spec = owner.pod_spec().unwrap();
        assert_fields(spec, &pod_must, true, context);
        assert_fields(spec, &pod_must_not, false, context);
        assert_fields(container, &container_must, true, context);
        assert_fields(container, &container_must_not, false, context);
        let volumes = array_at(spec, "/volumes");
        let host_path = volumes.iter().any(|v| v.get("hostPath").is_some());
        assert!(!host_path, "{context}: a hostPath volume");
        let adds = container.pointer("/securityContext/capabilities/add");
        assert!(adds.is_none(), "{context}: adds capabilities");
    });
}

/// The HPA that scales a workload, if any.
fn hpa_of<'a>(rendered: &'a Rendered, workload: &str) -> Option<&'a Object> {
    rendered
        .of_kind("HorizontalPodAutoscaler")
        .find(|hpa| str_at(&hpa.0, "/spec/scaleTargetRef/name") == Some(workload))
}

#[test]
fn every_workload_has_one_disruption_budget_that_lets_drains_proceed() {
    each_overlay(|overlay, rendered| {
        for workload in rendered.workloads() {
            let context = format!("{}: {}", overlay.name(), workload.id());
            let labels = workload.pod_labels();
            let budgets: Vec<&Object> = rendered
                .of_kind("PodDisruptionBudget")
                .filter(|pdb| selector_matches(&pdb.0["spec"]["selector"], &labels))
                .collect();
            let count = budgets.len();
            assert_eq!(count, 1, "{context}: {count} PodDisruptionBudgets");
            let pdb = &budgets[0].0["spec"];
            // A broken pod never blocks a drain; except Redis's, where a not-ready pod may be
            // the replica about to take over a drained master's slots (clusters.rs checks its
            // budget).
            let policy = str_at(pdb, "/unhealthyPodEvictionPolicy");
            let wanted = match workload.name() {
                "redis-cluster" => "IfHealthyBudget",
                _ => "AlwaysAllow",
            };
            assert_eq!(policy, Some(wanted), "{context}");
            // Some pod can always be evicted, so a node drain never waits forever; only the
            // MySQL primary, a singleton, refuses voluntary evictions (see docs/kubernetes.md).
            let replicas = hpa_of(rendered, workload.name())
                .and_then(|hpa| int_at(&hpa.0, "/spec/minReplicas"))
                .or_else(|| int_at(&workload.0, "/spec/replicas"))
                .unwrap_or(1);
            let allows = match (pdb.get("maxUnavailable"), pdb.get("minAvailable")) {
                (Some(Value::Number(n)), None) => n.as_i64().unwrap() >= 1,
                (Some(Value::String(percent)), None) => percent != "0%",
                (None, Some(Value::Number(n))) => n.as_i64().unwrap() < replicas,
                other => panic!("{context}: unexpected budget {other:?}"),
            };
            if workload.name() == "mysql" {
                let primary = !allows && replicas == 1;
                assert!(primary, "{context}: the primary's budget changed");
            } else {
                assert!(allows, "{context}: the budget blocks every eviction");
            }
        }
    });
}

#[test]
fn workloads_spread_over_nodes() {
    each_overlay(|overlay, rendered| {
        for workload in rendered.workloads() {
            let context = format!("{}: {}", overlay.name(), workload.id());
            let by_host = array_at(workload.pod_spec().unwrap(), "/topologySpreadConstraints")
                .iter()
                .find(|c| str_at(c, "/topologyKey") == Some("kubernetes.io/hostname"))
                .unwrap_or_else(|| panic!("{context}: no spread over kubernetes.io/hostname"));
            assert_eq!(int_at(by_host, "/maxSkew"), Some(1), "{context}");
            let own = selector_matches(&by_host["labelSelector"], &workload.pod_labels());
            assert!(own, "{context}: spreads other pods");
            // Two Redis masters or two brokers on one node: one node failure loses slots or the
            // Raft majority. Outside dev that must not be schedulable at all.
            if matches!(workload.name(), "redis-cluster" | "redpanda") && overlay != Overlay::Dev {
                let when = str_at(by_host, "/whenUnsatisfiable");
                assert_eq!(when, Some("DoNotSchedule"), "{context}");
            }
        }
    });
}

// ------------------------------------------------------------------------ network policies

/// Who may talk to whom: (source, destination app, port), sources being apps or `ns:<name>`.
type Edges = BTreeSet<(String, String, i64)>;

fn policy_types(policy: &Object) -> Vec<&str> {
    let types = array_at(&policy.0, "/spec/policyTypes").iter();
    types.filter_map(Value::as_str).collect()
}

/// A peer: a pod of this namespace with these labels, or any pod of another namespace.
#[derive(Clone, Copy)]
enum Peer<'a> {
    Pod(&'a Labels),
    Namespace(&'a str),
}

/// Whether a rule's `from`/`to` peers (`key`) admit `peer`.
fn peers_admit(rule: &Value, key: &str, peer: Peer) -> bool {
    let Some(peers) = rule.get(key).and_then(Value::as_array) else {
        return true; // no `from`/`to`: every peer
    };
    let admits = |p: &Value| match (p.get("namespaceSelector"), p.get("podSelector"), peer) {
        (None, Some(pods), Peer::Pod(labels)) => selector_matches(pods, labels),
        (Some(namespaces), pods, Peer::Namespace(namespace)) => {
            let name = Labels::from([("kubernetes.io/metadata.name".into(), namespace.into())]);
            selector_matches(namespaces, &name) && pods.is_none_or(|p| p == &json!({}))
        }
        _ => false,
    };
    peers.iter().any(admits)
}

fn ports_admit(rule: &Value, port: i64) -> bool {
    let tcp = |p: &Value| str_at(p, "/protocol").unwrap_or("TCP") == "TCP";
    let admits = |p: &Value| int_at(p, "/port") == Some(port) && tcp(p);
    rule.get("ports").is_none() || array_at(rule, "/ports").iter().any(admits)
}

/// The connections the NetworkPolicies allow between the pods of the rendered output, on the
/// destination's container ports, plus those from other namespaces.
fn allowed_edges(objects: &[Object], other_namespaces: &[&str]) -> Edges {
    let policies = objects.iter().filter(|o| o.kind() == "NetworkPolicy");
    let policies: Vec<&Object> = policies.collect();
    // Whether some policy of `direction` selecting `pod` has a rule admitting `peer` on `port`.
    let allows = |direction: &str, pod: &Labels, peer: Peer, port: i64| {
        let ingress = direction == "Ingress";
        let (rules, key) = if ingress {
            ("/spec/ingress", "from")
        } else {
            ("/spec/egress", "to")
        };
        policies
            .iter()
            .filter(|p| selector_matches(&p.0["spec"]["podSelector"], pod))
            .filter(|p| policy_types(p).contains(&direction))
            .flat_map(|p| array_at(&p.0, rules))
            .any(|rule| peers_admit(rule, key, peer) && ports_admit(rule, port))
    };
    let pods: Vec<(Labels, Vec<i64>)> = objects
        .iter()
        .filter(|o| o.pod_template().is_some())
        .map(|owner| {
            let ports = owner
                .containers()
                .into_iter()
                .flat_map(|c| array_at(c, "/ports"));
            let ports = ports.filter_map(|p| int_at(p, "/containerPort"));
            (owner.pod_labels(), ports.collect())
        })
        .collect();
    let app = |labels: &Labels| labels["app.kubernetes.io/name"].clone();
    let mut edges = Edges::new();
    for (dest, ports) in &pods {
        for &port in ports {
            for (source, _) in &pods {
                if allows("Egress", source, Peer::Pod(dest), port)
                    && allows("Ingress", dest, Peer::Pod(source), port)
                {
                    edges.insert((app(source), app(dest), port));
                }
            }
            for namespace in other_namespaces {
                if allows("Ingress", dest, Peer::Namespace(namespace), port) {
                    edges.insert((format!("ns:{namespace}"), app(dest), port));
                }
            }
        }
    }
    edges
}

#[test]
fn network_policies_deny_by_default() {
    each_overlay(|overlay, rendered| {
        let everyone = |p: &&Object| p.pointer("/spec/podSelector") == Some(&json!({}));
        let default_deny = rendered.of_kind("NetworkPolicy").filter(everyone).any(|p| {
            policy_types(p) == ["Ingress", "Egress"]
                && p.pointer("/spec/ingress").is_none()
                && p.pointer("/spec/egress").is_none()
        });
        assert!(default_deny, "{}: no default deny", overlay.name());
        // The only namespace-wide allowance is DNS.
        for policy in rendered.of_kind("NetworkPolicy").filter(everyone) {
            for rule in array_at(&policy.0, "/spec/egress") {
                let ports = array_at(rule, "/ports").iter();
                let ports: BTreeSet<i64> = ports.filter_map(|p| int_at(p, "/port")).collect();
                let context = format!("{}: {} allows more than DNS", overlay.name(), policy.id());
                assert_eq!(ports, BTreeSet::from([53]), "{context}");
            }
        }
        // Every pod has its own allow-list, explicit in both directions.
        for owner in rendered.pod_owners() {
            let labels = owner.pod_labels();
            let own = rendered.of_kind("NetworkPolicy").filter(|p| {
                !everyone(p)
                    && selector_matches(&p.0["spec"]["podSelector"], &labels)
                    && policy_types(p) == ["Ingress", "Egress"]
            });
            let context = format!("{}: {}", overlay.name(), owner.id());
            assert_eq!(own.count(), 1, "{context} has no allow-list of its own");
        }
    });
}

#[test]
fn network_policies_allow_exactly_the_needed_connections() {
    let edge = |source: &str, dest: &str, port: i64| (source.to_owned(), dest.to_owned(), port);
    let mut expected: Edges = [
        // The edge, and Prometheus.
        edge("ns:ingress-nginx", "gateway", 8080),
        edge("ns:monitoring", "gateway", 8081),
        edge("ns:monitoring", "order-service", 8083),
        edge("ns:monitoring", "inventory-service", 8085),
        edge("ns:monitoring", "redis-cluster", 9121),
        edge("ns:monitoring", "redpanda", 9644),
        // The gateway routes to both services and keeps its cluster-wide buckets in Redis.
        edge("gateway", "order-service", 8082),
        edge("gateway", "inventory-service", 8084),
        edge("gateway", "redis-cluster", 6379),
        // The services reach their stores.
        edge("order-service", "redis-cluster", 6379),
        edge("order-service", "redpanda", 9092),
        edge("order-service", "mysql", 3306),
        edge("inventory-service", "redis-cluster", 6379),
        edge("inventory-service", "mysql", 3306),
        // Jobs.
        edge("flash-sale-migrate", "mysql", 3306),
        edge("redis-cluster-bootstrap", "redis-cluster", 6379),
        edge("redpanda-create-topic", "redpanda", 9092),
        // Peers.
        edge("redis-cluster", "redis-cluster", 6379),
        edge("redis-cluster", "redis-cluster", 16379),
        edge("redpanda", "redpanda", 9092),
        edge("redpanda", "redpanda", 33145),
        edge("redpanda", "redpanda", 9644),
    ]
    .into_iter()
    .collect();
    let namespaces = ["ingress-nginx", "monitoring", "kube-system", "default"];
    each_overlay(|overlay, rendered| {
        let found = allowed_edges(&rendered.objects, &namespaces);
        let missing: Vec<_> = expected.difference(&found).collect();
        let extra: Vec<_> = found.difference(&expected).collect();
        let context = format!("{}: missing {missing:?}, unexpected", overlay.name());
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{context} {extra:?}"
        );
    });
    // The policies are no mere formality: dropping the gateway's egress rule cuts it off.
    let mut objects = Overlay::Dev.rendered().objects.clone();
    for object in &mut objects {
        if object.kind() == "NetworkPolicy" && object.name() == "gateway" {
            object.0["spec"]["egress"] = json!([]);
        }
    }
    expected.retain(|(source, _, _)| source != "gateway");
    assert_eq!(allowed_edges(&objects, &namespaces), expected);
}

// ------------------------------------------------------------------ secrets and environment

/// The userinfo (`user:password`) of the first URL in `text`, if it has one.
fn url_userinfo(text: &str) -> Option<&str> {
    let (_, rest) = text.split_once("://")?;
    let authority = rest.split('/').next()?;
    authority.rsplit_once('@').map(|(userinfo, _)| userinfo)
}

/// The variable a URL's userinfo takes its password from: `user:$(NAME)`, and nothing else.
fn password_reference(userinfo: &str) -> Option<&str> {
    let (user, password) = userinfo.split_once(':')?;
    let name = password.strip_prefix("$(")?.strip_suffix(')')?;
    let plain = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    (!user.contains('$') && !name.is_empty() && plain(name)).then_some(name)
}

#[test]
fn secrets_appear_only_as_references() {
    let sensitive = ["PASSWORD", "TOKEN", "SECRET", "DATABASE__URL", "CREDENTIAL"];
    let is_sensitive = |name: &str| sensitive.iter().any(|word| name.contains(word));
    let external: BTreeMap<&str, &[&str]> = EXTERNAL_SECRETS.into_iter().collect();
    each_container(|_, container, context| {
        // Variables defined so far from a Secret: what a `$(VAR)` in a later value may use.
        let mut from_secrets = BTreeSet::new();
        for entry in array_at(container, "/env") {
            let name = str_at(entry, "/name").unwrap_or_default();
            if let Some(reference) = entry.pointer("/valueFrom/secretKeyRef") {
                let secret = str_at(reference, "/name").unwrap_or_default();
                let key = str_at(reference, "/key").unwrap_or_default();
                let keys = external.get(secret).copied().unwrap_or_default();
                assert!(keys.contains(&key), "{context}: no secret {secret}/{key}");
                from_secrets.insert(name);
            } else {
                assert!(!is_sensitive(name), "{context}: {name} not from a Secret");
            }
            // A URL's password is filled in from a Secret variable defined before it.
            let value = str_at(entry, "/value").unwrap_or_default();
            if let Some(userinfo) = url_userinfo(value) {
                let variable = password_reference(userinfo);
                let secret = variable.is_some_and(|v| from_secrets.contains(v));
                assert!(
                    secret,
                    "{context}: {name} has credentials not from a Secret"
                );
            }
        }
    });
    each_overlay(|overlay, rendered| {
        let secrets = rendered.of_kind("Secret").count();
        assert_eq!(secrets, 0, "{}: a Secret in the manifests", overlay.name());
        for config_map in rendered.of_kind("ConfigMap") {
            for key in string_map(config_map.pointer("/data")).keys() {
                let context = format!("{}: {} holds {key}", overlay.name(), config_map.id());
                assert!(!is_sensitive(key), "{context}");
            }
        }
        // No credentials in any URL, anywhere in the output: a URL's password can only be a
        // reference to a variable, which the containers' check above says comes from a Secret.
        for line in rendered.yaml.lines() {
            let userinfo = url_userinfo(line);
            let literal = userinfo.is_some_and(|u| password_reference(u).is_none());
            assert!(!literal, "{}: credentials in {line}", overlay.name());
        }
    });
}

// ------------------------------------------------------------------ the gateway's rules

/// The gateway's rule file as an overlay ships it: the text of the gateway-rules ConfigMap.
fn shipped_rules(rendered: &Rendered) -> &str {
    let config_map = rendered.get("ConfigMap", "gateway-rules");
    let text = config_map
        .pointer("/data/rules.toml")
        .and_then(Value::as_str);
    text.expect("gateway-rules holds rules.toml")
}

fn parse_rules(text: &str, context: &str) -> toml::Table {
    text.parse()
        .unwrap_or_else(|e| panic!("{context}: the rule file is not TOML: {e}"))
}

/// The rule file without what an overlay may change: `[admission] require_pass` and the
/// `[[waiting_room]]` entries.
fn without_overlay_choices(mut rules: toml::Table) -> toml::Table {
    rules.remove("waiting_room");
    if let Some(admission) = rules
        .get_mut("admission")
        .and_then(toml::Value::as_table_mut)
    {
        admission.remove("require_pass");
    }
    rules
}

#[test]
fn staging_and_production_require_purchase_passes_dev_does_not_and_the_rest_is_the_base() {
    let base_text = std::fs::read_to_string(deploy_tests::repo_path("k8s/gateway/rules.toml"));
    let base = parse_rules(&base_text.expect("reading the base rules"), "base");
    each_overlay(|overlay, rendered| {
        let name = overlay.name();
        let text = shipped_rules(rendered);
        let rules = parse_rules(text, name);
        // Dev keeps passes off so the seed's `hey` command works; elsewhere a script must not
        // call `create` directly (docs/waiting-room.md).
        let require_pass = rules
            .get("admission")
            .and_then(|a| a.get("require_pass"))
            .and_then(toml::Value::as_bool);
        let wanted = overlay != Overlay::Dev;
        assert_eq!(
            require_pass,
            Some(wanted),
            "{name}: [admission] require_pass"
        );
        // The overlays' own files follow the base (the gateway's defaults, kept equal to
        // rules.example.toml by a gateway test) in every other rule.
        assert_eq!(
            without_overlay_choices(rules),
            without_overlay_choices(base.clone()),
            "{name}: the rule file differs from k8s/gateway/rules.toml beyond [admission] \
             require_pass and [[waiting_room]]"
        );
        // Each shows a waiting room an operator can turn on: uncommented, it is one entry with
        // a rate (the gateway refuses a rate of 0).
        let lines: Vec<&str> = text.lines().collect();
        let start = lines.iter().position(|l| {
            let l = l.trim_start_matches('#').trim();
            l == "[[waiting_room]]"
        });
        let start = start.unwrap_or_else(|| panic!("{name}: no [[waiting_room]] entry"));
        let entry: String = lines[start..]
            .iter()
            .map(|l| l.trim_start_matches('#').trim())
            .take_while(|l| l.starts_with("[[waiting_room]]") || l.contains(" = "))
            .map(|l| format!("{l}\n"))
            .collect();
        let turned_on = parse_rules(&entry, name);
        let rooms = turned_on
            .get("waiting_room")
            .and_then(toml::Value::as_array);
        let room = rooms
            .and_then(|r| r.first())
            .and_then(toml::Value::as_table);
        let room = room.unwrap_or_else(|| panic!("{name}: {entry}"));
        let rate = room.get("rate").and_then(toml::Value::as_integer);
        assert!(
            rate.is_some_and(|r| r > 0),
            "{name}: the room's rate: {entry}"
        );
        let known = ["activity", "rate", "burst"];
        let unknown = room.keys().find(|k| !known.contains(&k.as_str()));
        assert!(unknown.is_none(), "{name}: {unknown:?} in {entry}");
    });
}

// ------------------------------------------------------------------ Redis authentication

/// How a Secret's key stands in [`resolved_env`].
fn secret_value(name: &str, key: &str) -> String {
    format!("<secret {name}/{key}>")
}

/// Kubernetes' expansion of `$(VAR)` in an env value: one pass, unknown names left as they are.
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

/// A container's environment as the kubelet builds it: the envFrom ConfigMaps first, then `env`
/// in order, each value's `$(VAR)` filled in from the variables defined before it. A Secret's
/// key stands as [`secret_value`].
fn resolved_env(rendered: &Rendered, container: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for source in array_at(container, "/envFrom") {
        let name = str_at(source, "/configMapRef/name").expect("envFrom only from ConfigMaps");
        env.extend(string_map(rendered.get("ConfigMap", name).pointer("/data")));
    }
    for entry in array_at(container, "/env") {
        let name = str_at(entry, "/name").unwrap().to_owned();
        let value = match entry.pointer("/valueFrom/secretKeyRef") {
            Some(reference) => secret_value(
                str_at(reference, "/name").unwrap(),
                str_at(reference, "/key").unwrap(),
            ),
            None => expand(str_at(entry, "/value").unwrap_or_default(), &env),
        };
        env.insert(name, value);
    }
    env
}

fn named<'a>(owner: &'a Object, container: &str) -> &'a Value {
    let found = owner.containers().into_iter();
    let mut found = found.filter(|c| str_at(c, "/name") == Some(container));
    found
        .next()
        .unwrap_or_else(|| panic!("{}: no container {container}", owner.id()))
}

fn strings(value: &Value, pointer: &str) -> Vec<String> {
    let items = array_at(value, pointer).iter();
    items.filter_map(Value::as_str).map(str::to_owned).collect()
}

/// The data of the ConfigMap a pod mounts as volume `volume`.
fn mounted_config_map(
    rendered: &Rendered,
    owner: &Object,
    volume: &str,
) -> BTreeMap<String, String> {
    let volumes = array_at(owner.pod_spec().unwrap(), "/volumes").iter();
    let mut found = volumes.filter(|v| str_at(v, "/name") == Some(volume));
    let name = found.next().and_then(|v| str_at(v, "/configMap/name"));
    let name = name.unwrap_or_else(|| panic!("{}: no ConfigMap volume {volume}", owner.id()));
    string_map(rendered.get("ConfigMap", name).pointer("/data"))
}

#[test]
fn everything_that_reaches_redis_authenticates_with_the_redis_auth_secret() {
    let password = secret_value("redis-auth", "password");
    each_overlay(|overlay, rendered| {
        let context = overlay.name();
        let redis = rendered.get("StatefulSet", "redis-cluster");
        let node = named(redis, "redis");
        let scripts = mounted_config_map(rendered, redis, "scripts");
        // The node starts through start.sh, which gives Redis the password (requirepass,
        // masterauth) from REDISCLI_AUTH; every redis-cli in the container reads it too.
        let command = strings(node, "/command");
        assert_eq!(
            command,
            ["sh", "/scripts/start.sh"],
            "{context}: redis command"
        );
        assert!(scripts.contains_key("start.sh"), "{context}: no start.sh");
        let env = resolved_env(rendered, node);
        assert_eq!(
            env.get("REDISCLI_AUTH"),
            Some(&password),
            "{context}: redis node"
        );
        // Never in a ConfigMap nor on the command line.
        let config = mounted_config_map(rendered, redis, "config");
        let conf = config.get("redis.conf").expect("redis.conf");
        for line in conf
            .lines()
            .chain(strings(node, "/args").iter().map(String::as_str))
        {
            let word = line.trim().trim_start_matches("--");
            let word = word.split_whitespace().next().unwrap_or_default();
            let auth = ["requirepass", "masterauth", "masteruser", "user", "aclfile"];
            assert!(
                !auth.contains(&word),
                "{context}: {line:?} outside start.sh"
            );
        }
        // The probes run in that container, through the scripts that check the answer (an
        // unauthenticated redis-cli exits 0 on NOAUTH).
        for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
            let command = strings(node, &format!("/{probe}/exec/command"));
            let script = command.get(1).and_then(|c| c.strip_prefix("/scripts/"));
            let checked = command.len() == 2
                && command[0] == "sh"
                && script.is_some_and(|s| ["alive.sh", "ready.sh"].contains(&s))
                && script.is_some_and(|s| scripts.contains_key(s));
            assert!(checked, "{context}: {probe} runs {command:?}");
        }
        // The exporter logs in with the same password.
        let exporter = resolved_env(rendered, named(redis, "exporter"));
        let exporter = exporter.get("REDIS_PASSWORD");
        assert_eq!(exporter, Some(&password), "{context}: exporter");

        // Everything the NetworkPolicies let reach Redis's client port has the password: the
        // services in their Redis URL, the bootstrap Job and the peers (the hook) in
        // REDISCLI_AUTH. The URL's address is the redis-cluster Service.
        let service = rendered.get("Service", "redis-cluster");
        let ports = array_at(&service.0, "/spec/ports").iter();
        let port = ports
            .filter_map(|p| int_at(p, "/port"))
            .find(|&p| p == 6379);
        assert!(port.is_some(), "{context}: redis-cluster serves 6379");
        let wanted_url = format!("redis://:{password}@redis-cluster:6379");
        let edges = allowed_edges(&rendered.objects, &[]);
        let clients: BTreeSet<&str> = edges
            .iter()
            .filter(|(_, dest, port)| dest == "redis-cluster" && *port == 6379)
            .map(|(source, _, _)| source.as_str())
            .collect();
        for service in SERVICES {
            assert!(
                clients.contains(service),
                "{context}: {service} reaches no Redis"
            );
        }
        for client in clients {
            let owners = rendered.pod_owners();
            let mut owners = owners.filter(|o| o.pod_labels()["app.kubernetes.io/name"] == client);
            let owner = owners.next().unwrap();
            let mut authenticated = false;
            for container in owner.containers() {
                let env = resolved_env(rendered, container);
                let name = str_at(container, "/name").unwrap_or_default();
                if let Some(url) = env.get("FLASH_SALE_REDIS__URL") {
                    assert_eq!(url, &wanted_url, "{context}: {client} {name} Redis URL");
                    authenticated = true;
                } else if env.get("REDISCLI_AUTH") == Some(&password) {
                    authenticated = true;
                }
            }
            assert!(
                authenticated,
                "{context}: {client} reaches Redis without the password"
            );
        }
        // The services' URL is built in their own env: the shared ConfigMap has no URL, so
        // none can be used without the password.
        for config_map in rendered.of_kind("ConfigMap") {
            let data = string_map(config_map.pointer("/data"));
            let url = data.get("FLASH_SALE_REDIS__URL");
            assert!(
                url.is_none(),
                "{context}: {} holds a Redis URL",
                config_map.id()
            );
        }
    });
}

/// The variables a container gets: its `env` names and the keys of the ConfigMaps in `envFrom`.
fn container_env(rendered: &Rendered, container: &Value) -> BTreeMap<String, Option<String>> {
    let mut env = BTreeMap::new();
    for source in array_at(container, "/envFrom") {
        let name = str_at(source, "/configMapRef/name").expect("envFrom only from ConfigMaps");
        for (key, value) in string_map(rendered.get("ConfigMap", name).pointer("/data")) {
            env.insert(key, Some(value));
        }
    }
    for entry in array_at(container, "/env") {
        let value = str_at(entry, "/value").map(str::to_owned);
        env.insert(str_at(entry, "/name").unwrap().to_owned(), value);
    }
    env
}

#[test]
fn service_configuration_agrees_with_the_contract_and_the_pods() {
    let contract = contracts::env_vars();
    each_overlay(|overlay, rendered| {
        for service in SERVICES {
            let container = workload(rendered, service).containers()[0];
            let context = format!("{}: {service}", overlay.name());
            let env = container_env(rendered, container);
            for name in env.keys() {
                let ours = name.starts_with("FLASH_SALE_") || name == "RUST_LOG";
                let known = !ours || contract.contains(name);
                assert!(known, "{context}: {name} is not in the contract");
            }
            // The service listens where the pod says it does.
            for (variable, port) in [
                ("FLASH_SALE_SERVER__PORT", "http"),
                ("FLASH_SALE_MANAGEMENT__PORT", "management"),
            ] {
                let declared = array_at(container, "/ports")
                    .iter()
                    .find(|p| str_at(p, "/name") == Some(port))
                    .and_then(|p| int_at(p, "/containerPort"));
                let configured = env.get(variable).cloned().flatten();
                let declared = declared.map(|p| p.to_string());
                assert_eq!(configured, declared, "{context}: {variable}");
            }
        }
        // The gateway's cluster-wide buckets are sized for the HPA's minimum of replicas.
        let gateway = workload(rendered, "gateway").containers()[0];
        let hint = container_env(rendered, gateway)["FLASH_SALE_CLUSTER__REPLICAS_HINT"].clone();
        let minimum = hpa_of(rendered, "gateway").and_then(|h| int_at(&h.0, "/spec/minReplicas"));
        let minimum = minimum.map(|m| m.to_string());
        assert_eq!(hint, minimum, "{}: replica hint", overlay.name());
        // The migration runs the very image of the service whose migrations it holds.
        let migrate = rendered.get("Job", "flash-sale-migrate").containers()[0];
        let inventory = workload(rendered, "inventory-service").containers()[0];
        let same = migrate["image"] == inventory["image"];
        assert!(same, "{}: the migration runs another image", overlay.name());
    });
}

/// Memory one open gateway connection takes, its buffers included.
const GATEWAY_BYTES_PER_CONNECTION: f64 = 10_000.0;
/// ingress-nginx's default `upstream-keepalive-timeout`: how long the controller keeps an idle
/// connection to a gateway pod.
const INGRESS_UPSTREAM_KEEPALIVE_SECONDS: i64 = 60;

#[test]
fn the_gateway_connection_caps_fit_its_pod_and_the_ingress_in_front_of_it() {
    each_overlay(|overlay, rendered| {
        let gateway = workload(rendered, "gateway").containers()[0];
        let env = container_env(rendered, gateway);
        let context = overlay.name();
        let number = |name: &str| -> i64 {
            let value = env.get(name).cloned().flatten();
            let value = value.unwrap_or_else(|| panic!("{context}: no {name}"));
            let parsed = value.parse();
            parsed.unwrap_or_else(|_| panic!("{context}: {name}={value}"))
        };
        // An explicit cap (0 would follow the node's open-file limit) well inside the memory
        // limit.
        let max = number("FLASH_SALE_CONNECTIONS__MAX_CONNECTIONS");
        let limit = quantity(str_at(gateway, "/resources/limits/memory").unwrap());
        let share = max as f64 * GATEWAY_BYTES_PER_CONNECTION / limit;
        let fits = max > 0 && share <= 0.5;
        assert!(
            fits,
            "{context}: {max} connections take {share:.2} of the memory limit"
        );
        // Every connection comes from an ingress controller pod: no per-address cap under the
        // global one.
        let per_ip = number("FLASH_SALE_CONNECTIONS__MAX_CONNECTIONS_PER_IP");
        let open = per_ip == 0 || per_ip >= max;
        assert!(
            open,
            "{context}: per-address cap {per_ip} under the cap {max}"
        );
        // The gateway keeps idle connections longer than the controller reuses them.
        let idle = number("FLASH_SALE_CONNECTIONS__IDLE_TIMEOUT_MS");
        let outlasts = idle > INGRESS_UPSTREAM_KEEPALIVE_SECONDS * 1000;
        assert!(outlasts, "{context}: idle timeout {idle} ms");
    });
}

#[test]
fn images_are_pinned() {
    each_overlay(|overlay, rendered| {
        let mut ours = BTreeSet::new();
        for owner in rendered.pod_owners() {
            for container in owner.containers() {
                let image = str_at(container, "/image").unwrap();
                let context = format!("{}: {} image {image}", overlay.name(), owner.id());
                let (reference, digest) = match image.split_once('@') {
                    Some((reference, digest)) => (reference, Some(digest)),
                    None => (image, None),
                };
                let tag = reference.rsplit_once(':').map(|(_, tag)| tag);
                let tag = tag.filter(|t| !t.contains('/'));
                let versioned = tag.is_some_and(|tag| tag != "latest");
                assert!(versioned, "{context}: no version tag");
                if let Some(digest) = digest {
                    let hex = digest.strip_prefix("sha256:").unwrap_or_default();
                    let valid = hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit());
                    assert!(valid, "{context}: bad digest");
                }
                if image.starts_with("flash-sale/") {
                    let production = overlay == Overlay::Production;
                    assert_eq!(digest.is_some(), production, "{context}: digest");
                    ours.insert(tag.unwrap().to_owned());
                }
            }
        }
        let context = format!("{}: the services run different versions", overlay.name());
        assert_eq!(ours.len(), 1, "{context}: {ours:?}");
    });
}

// --------------------------------------------------------------------------- autoscaling

#[test]
fn every_service_is_scaled_by_one_hpa_and_sets_no_replicas_itself() {
    each_overlay(|overlay, rendered| {
        for hpa in rendered.of_kind("HorizontalPodAutoscaler") {
            let target = &hpa.0["spec"]["scaleTargetRef"];
            let [kind, name] = ["kind", "name"].map(|key| target[key].as_str().unwrap());
            let workload = rendered.get(kind, name);
            let context = format!("{}: {} scales {}", overlay.name(), hpa.id(), workload.id());
            assert_eq!(target["apiVersion"], workload.api_version(), "{context}");
            let replicas = workload.pointer("/spec/replicas");
            assert!(replicas.is_none(), "{context}, which sets replicas");
        }
        for service in SERVICES {
            let scaled = rendered
                .of_kind("HorizontalPodAutoscaler")
                .filter(|hpa| str_at(&hpa.0, "/spec/scaleTargetRef/name") == Some(service))
                .count();
            assert_eq!(scaled, 1, "{}: {service}", overlay.name());
        }
    });
}

// ----------------------------------------------------------------------------- canary

/// What a Rollout's steps amount to: the weights, and the timed pauses before each raise.
#[derive(Debug, Default)]
struct CanaryPlan {
    weights: Vec<i64>,
    pause_seconds: Vec<u64>,
    ends_with_manual_gate: bool,
}

fn duration_seconds(duration: &Value) -> u64 {
    if let Some(seconds) = duration.as_u64() {
        return seconds;
    }
    let text = duration.as_str().unwrap_or_default();
    let (number, unit) = text.split_at(text.len().saturating_sub(1));
    let number: u64 = number
        .parse()
        .unwrap_or_else(|_| panic!("bad duration {duration}"));
    match unit {
        "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        _ => panic!("bad duration {text}"),
    }
}

/// Checks the step rules and returns the plan: every step does exactly one thing; weights rise
/// strictly within (0, 100); every raise after the first, and the final implicit raise to 100 %,
/// comes after a timed pause and a passed analysis of the canary's own pods, at the current
/// weight; a manual gate only at the end.
fn canary_plan(rendered: &Rendered, rollout: &Object) -> CanaryPlan {
    let name = rollout.name();
    let mut plan = CanaryPlan::default();
    // Since the last weight change: was there a timed pause, then an analysis?
    let (mut paused, mut analysed) = (false, false);
    let steps = array_at(&rollout.0, "/spec/strategy/canary/steps");
    for (index, step) in steps.iter().enumerate() {
        let context = format!("{name} step {index}");
        let action = step.as_object().filter(|s| s.len() == 1);
        let action = action.and_then(|s| s.iter().next());
        let (kind, value) = action.unwrap_or_else(|| panic!("{context}: not exactly one action"));
        match kind.as_str() {
            "setWeight" => {
                let weight = value.as_i64().unwrap();
                assert!(weight > 0 && weight < 100, "{context}: weight {weight}");
                if let Some(&last) = plan.weights.last() {
                    assert!(weight > last, "{context}: {weight} after {last}");
                    let checked = paused && analysed;
                    assert!(checked, "{context}: no pause and analysis first");
                }
                plan.weights.push(weight);
                (paused, analysed) = (false, false);
            }
            "pause" => match value.get("duration") {
                Some(duration) => {
                    // After the analysis a pause would delay the raise for nothing.
                    assert!(!analysed, "{context}: a pause after the analysis");
                    plan.pause_seconds.push(duration_seconds(duration));
                    paused = true;
                }
                None => {
                    let last = index == steps.len() - 1;
                    assert!(last, "{context}: a manual gate only at the end");
                    plan.ends_with_manual_gate = true;
                }
            },
            "analysis" => {
                // Only a pause lets traffic reach the new weight before it is judged.
                assert!(paused, "{context}: analysis before a pause");
                let args = array_at(value, "/args").iter();
                let given: BTreeMap<&str, &Value> = args
                    .map(|arg| (arg["name"].as_str().unwrap(), arg))
                    .collect();
                for reference in array_at(value, "/templates") {
                    let template = reference["templateName"].as_str().unwrap();
                    let template = rendered.get("AnalysisTemplate", template);
                    for arg in array_at(&template.0, "/spec/args") {
                        let name = arg["name"].as_str().unwrap();
                        let known = arg.get("value").is_some() || given.contains_key(name);
                        assert!(known, "{context}: argument {name} missing");
                    }
                }
                let service = given.get("service").and_then(|a| str_at(a, "/value"));
                assert_eq!(service, Some(name), "{context}: analyses another service");
                let hash = given.get("canary-hash");
                let hash = hash.and_then(|a| str_at(a, "/valueFrom/podTemplateHashValue"));
                assert_eq!(hash, Some("Latest"), "{context}: not the canary's pods");
                analysed = true;
            }
            // setCanaryScale needs traffic routing, which this bundle has not.
            other => panic!("{context}: {other}"),
        }
    }
    assert!(!plan.weights.is_empty(), "{name}: no steps");
    let checked = paused && analysed;
    assert!(checked, "{name}: no pause and analysis before 100 %");
    plan
}

#[test]
fn production_releases_each_service_as_a_careful_canary() {
    let rendered = Overlay::Production.rendered();
    let deployments = rendered.of_kind("Deployment").count();
    assert_eq!(deployments, 0, "production keeps a Deployment");
    let plan = |name| (name, canary_plan(rendered, rendered.get("Rollout", name)));
    let plans: BTreeMap<&str, CanaryPlan> = SERVICES.into_iter().map(plan).collect();
    // order-service, the buy path and the consumer, is the most careful of the three.
    let order = &plans["order-service"];
    let largest_raise = |p: &CanaryPlan| {
        let (from, to) = ([0].iter().chain(&p.weights), p.weights.iter().chain(&[100]));
        to.zip(from).map(|(b, a)| b - a).max().unwrap()
    };
    for (service, plan) in plans.iter().filter(|(s, _)| **s != "order-service") {
        let steps = order.weights.len() > plan.weights.len();
        assert!(steps, "order-service takes fewer steps than {service}");
        let start = order.weights[0] <= plan.weights[0];
        assert!(start, "order-service starts bigger than {service}");
        let raises = largest_raise(order) <= largest_raise(plan);
        assert!(raises, "order-service raises faster than {service}");
        let pauses = order.pause_seconds.iter().min() >= plan.pause_seconds.iter().max();
        assert!(pauses, "order-service pauses less than {service}");
        assert!(!plan.ends_with_manual_gate || order.ends_with_manual_gate);
    }
    let gated = order.ends_with_manual_gate;
    assert!(gated, "order-service must wait for a promotion to 100 %");
}

// ------------------------------------------------------------------------------- references

#[test]
fn every_reference_resolves() {
    let external: BTreeMap<&str, &[&str]> = EXTERNAL_SECRETS.into_iter().collect();
    each_overlay(|overlay, rendered| {
        let fail = |what: String| -> ! { panic!("{}: {what}", overlay.name()) };
        let config_map = |name: &str, key: Option<&str>, user: &str| {
            let Some(found) = rendered.of_kind("ConfigMap").find(|c| c.name() == name) else {
                fail(format!(
                    "{user} names ConfigMap {name}, which is not rendered"
                ))
            };
            if key.is_some_and(|key| !string_map(found.pointer("/data")).contains_key(key)) {
                fail(format!("{user}: ConfigMap {name} has no {key:?}"));
            }
        };
        for owner in rendered.pod_owners() {
            let (spec, user) = (owner.pod_spec().unwrap(), owner.id());
            for volume in array_at(spec, "/volumes") {
                if let Some(name) = str_at(volume, "/configMap/name") {
                    config_map(name, None, &user);
                    for item in array_at(volume, "/configMap/items") {
                        config_map(name, str_at(item, "/key"), &user);
                    }
                }
                if let Some(name) = str_at(volume, "/secret/secretName") {
                    if !external.contains_key(name) {
                        fail(format!("{user} mounts unknown secret {name}"));
                    }
                }
            }
            let volumes: BTreeSet<&str> = array_at(spec, "/volumes")
                .iter()
                .chain(array_at(&owner.0, "/spec/volumeClaimTemplates"))
                .filter_map(|v| str_at(v, "/name").or_else(|| str_at(v, "/metadata/name")))
                .collect();
            for container in owner.containers() {
                for source in array_at(container, "/envFrom") {
                    config_map(str_at(source, "/configMapRef/name").unwrap(), None, &user);
                }
                for entry in array_at(container, "/env") {
                    if let Some(reference) = entry.pointer("/valueFrom/configMapKeyRef") {
                        let name = str_at(reference, "/name").unwrap();
                        config_map(name, str_at(reference, "/key"), &user);
                    }
                }
                for mount in array_at(container, "/volumeMounts") {
                    let name = str_at(mount, "/name").unwrap();
                    if !volumes.contains(name) {
                        fail(format!("{user} mounts unknown volume {name}"));
                    }
                }
                // Probes by port name name a port of their own container.
                let ports: BTreeSet<&str> = array_at(container, "/ports")
                    .iter()
                    .filter_map(|p| str_at(p, "/name"))
                    .collect();
                for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
                    for kind in ["httpGet", "tcpSocket"] {
                        if let Some(port) = str_at(container, &format!("/{probe}/{kind}/port")) {
                            if !ports.contains(port) {
                                fail(format!(
                                    "{user} {probe} names no port of its container: {port}"
                                ));
                            }
                        }
                    }
                }
            }
            if owner.kind() == "StatefulSet" {
                let service =
                    rendered.get("Service", str_at(&owner.0, "/spec/serviceName").unwrap());
                if str_at(&service.0, "/spec/clusterIP") != Some("None") {
                    fail(format!("{user} needs a headless Service"));
                }
            }
        }
        // Services select pods and target ports those pods have.
        for service in rendered.of_kind("Service") {
            let selector = json!({"matchLabels": service.0["spec"]["selector"]});
            let backends: Vec<&Object> = rendered
                .workloads()
                .filter(|w| selector_matches(&selector, &w.pod_labels()))
                .collect();
            if backends.len() != 1 {
                fail(format!(
                    "{} selects {} workloads",
                    service.id(),
                    backends.len()
                ));
            }
            let ports: BTreeSet<&str> = backends[0]
                .containers()
                .iter()
                .flat_map(|c| array_at(c, "/ports"))
                .filter_map(|p| str_at(p, "/name"))
                .collect();
            for port in array_at(&service.0, "/spec/ports") {
                let Some(target) = str_at(port, "/targetPort") else {
                    fail(format!("{}: name the target port", service.id()))
                };
                if !ports.contains(target) {
                    fail(format!("{}: no container port {target}", service.id()));
                }
            }
        }
        let has_port = |service: &Object, port: &str| {
            array_at(&service.0, "/spec/ports")
                .iter()
                .any(|p| str_at(p, "/name") == Some(port))
        };
        // The Ingress reaches a port of the Service it names.
        for ingress in rendered.of_kind("Ingress") {
            for path in array_at(&ingress.0, "/spec/rules/0/http/paths") {
                let backend = &path["backend"]["service"];
                let port = backend["port"]["name"].as_str().unwrap();
                if !has_port(
                    rendered.get("Service", backend["name"].as_str().unwrap()),
                    port,
                ) {
                    fail(format!("{} port {port}", ingress.id()));
                }
            }
        }
        // ServiceMonitors select Services that have the port they scrape.
        for monitor in rendered.of_kind("ServiceMonitor") {
            for endpoint in array_at(&monitor.0, "/spec/endpoints") {
                let port = str_at(endpoint, "/port").unwrap();
                let scraped = rendered.of_kind("Service").any(|s| {
                    selector_matches(&monitor.0["spec"]["selector"], &s.labels())
                        && has_port(s, port)
                });
                if !scraped {
                    fail(format!("{} scrapes no Service port {port}", monitor.id()));
                }
            }
        }
    });
}

// ---------------------------------------------------- the Argo Rollouts transformer config

/// Renders production, renamed with a name prefix, from a copy of the bundle; `strip_config`
/// removes the Argo Rollouts component's `configurations:`.
fn render_renamed_production(strip_config: bool) -> Rendered {
    let dir = deploy_tests::scratch_dir!(&format!("renamed-{strip_config}"));
    for part in ["k8s", "kustomize", "monitoring"] {
        let status = Command::new("cp")
            .arg("-r")
            .arg(deploy_tests::repo_path(part))
            .arg(&dir)
            .status();
        assert!(status.unwrap().success());
    }
    let edit = |file: &str, from: &str, to: &str| {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(from), "{file} has no {from:?}");
        std::fs::write(&path, text.replacen(from, to, 1)).unwrap();
    };
    let config = "configurations:\n  - rollout-transformers.yaml\n";
    edit(
        "kustomize/components/argo-rollouts/kustomization.yaml",
        config,
        if strip_config { "" } else { config },
    );
    edit(
        "kustomize/overlays/production/kustomization.yaml",
        "resources:",
        "namePrefix: eu-\n\nresources:",
    );
    Rendered::from_dir(&dir.join("kustomize/overlays/production")).unwrap()
}

#[test]
fn renamed_objects_stay_referenced_thanks_to_the_transformer_config() {
    let with = render_renamed_production(false);
    for service in SERVICES {
        let rollout = with.get("Rollout", &format!("eu-{service}"));
        let hpa = with.get("HorizontalPodAutoscaler", &format!("eu-{service}"));
        let target = str_at(&hpa.0, "/spec/scaleTargetRef/name");
        assert_eq!(target, Some(rollout.name()), "the HPA follows its Rollout");
        for reference in array_at(rollout.containers()[0], "/envFrom") {
            let name = str_at(reference, "/configMapRef/name").unwrap();
            let found = with.of_kind("ConfigMap").any(|c| c.name() == name);
            assert!(found, "{service}: ConfigMap {name} (hash) followed");
        }
        for step in array_at(&rollout.0, "/spec/strategy/canary/steps") {
            if let Some(name) = str_at(step, "/analysis/templates/0/templateName") {
                assert_eq!(name, "eu-flash-sale-canary", "{service}: not followed");
            }
        }
    }
    // The negative control: without the configuration the analysis steps point at nothing.
    let without = render_renamed_production(true);
    let templates: BTreeSet<&str> = without
        .of_kind("AnalysisTemplate")
        .map(Object::name)
        .collect();
    let dangling = without
        .of_kind("Rollout")
        .flat_map(|r| array_at(&r.0, "/spec/strategy/canary/steps"))
        .filter_map(|step| str_at(step, "/analysis/templates/0/templateName"))
        .any(|name| !templates.contains(name));
    assert!(
        dangling,
        "without the configuration the references should break"
    );
}
