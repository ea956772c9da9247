//! Policy over the rendered output of every overlay: the workload checklist (requests and a
//! memory limit, probes of the pod itself, a preStop drain inside the grace period, the
//! restricted security context, a disruption budget, spread over nodes, default-deny network
//! policies with exact allow-lists, secrets only by reference), the seed's HPA numbers, the
//! canary steps of production, and that every name one object uses for another resolves.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use deploy_tests::contracts;
use deploy_tests::crds::{self, PodTemplateHashValue, StepAction};
use deploy_tests::manifest::{Object, Overlay, Rendered, selector_matches, string_map};
use deploy_tests::tools;
use serde_json::{Value, json};

/// The services: name, app port, management port (docs/contracts.md).
const SERVICES: [(&str, i64, i64); 3] = [
    ("gateway", 8080, 8081),
    ("order-service", 8082, 8083),
    ("inventory-service", 8084, 8085),
];

/// Secrets the manifests reference but never contain: deploy.sh (or an operator) creates them.
const EXTERNAL_SECRETS: [(&str, &[&str]); 4] = [
    ("mysql-secret", &["root-password", "app-password"]),
    ("flash-sale-db", &["url"]),
    ("inventory-admin", &["token"]),
    ("gateway-auth", &["hs256-secret"]),
];

/// The app.kubernetes.io/component values, as deploy.sh groups them into layers.
const COMPONENTS: [&str; 9] = [
    "platform",
    "cache",
    "broker",
    "database",
    "migration",
    "backend",
    "gateway",
    "canary",
    "monitoring",
];

fn each_overlay(mut check: impl FnMut(Overlay, &Rendered)) {
    for overlay in Overlay::ALL {
        check(overlay, overlay.rendered());
    }
}

fn is_our_image(image: &str) -> bool {
    image.starts_with("flash-sale/")
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value.pointer(pointer).and_then(Value::as_str)
}

fn int_at(value: &Value, pointer: &str) -> Option<i64> {
    value.pointer(pointer).and_then(Value::as_i64)
}

fn array_at<'a>(value: &'a Value, pointer: &str) -> &'a [Value] {
    value
        .pointer(pointer)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

/// A Kubernetes quantity in base units (bytes, cores).
fn quantity(text: &str) -> f64 {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let number: f64 = number
        .parse()
        .unwrap_or_else(|_| panic!("bad quantity {text:?}"));
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

// ------------------------------------------------------------------- namespace and labels

#[test]
fn everything_lives_in_the_flash_sale_namespace() {
    each_overlay(|overlay, rendered| {
        let namespaces: Vec<&Object> = rendered.of_kind("Namespace").collect();
        assert_eq!(namespaces.len(), 1, "{}: one Namespace", overlay.name());
        let namespace = namespaces[0];
        assert_eq!(namespace.name(), "flash-sale");
        let labels = namespace.labels();
        assert_eq!(
            labels
                .get("pod-security.kubernetes.io/enforce")
                .map(String::as_str),
            Some("restricted")
        );
        for object in &rendered.objects {
            if object.kind() != "Namespace" {
                assert_eq!(
                    object.namespace(),
                    Some("flash-sale"),
                    "{}: {} has no namespace",
                    overlay.name(),
                    object.id()
                );
            }
        }
    });
}

#[test]
fn every_object_carries_the_recommended_labels() {
    each_overlay(|overlay, rendered| {
        for object in &rendered.objects {
            let labels = object.labels();
            let context = format!("{}: {}", overlay.name(), object.id());
            assert!(
                labels.contains_key("app.kubernetes.io/name"),
                "{context}: no app.kubernetes.io/name"
            );
            assert_eq!(
                labels.get("app.kubernetes.io/part-of").map(String::as_str),
                Some("flash-sale"),
                "{context}"
            );
            assert_eq!(
                labels
                    .get("app.kubernetes.io/managed-by")
                    .map(String::as_str),
                Some("kustomize"),
                "{context}"
            );
            let component = labels
                .get("app.kubernetes.io/component")
                .map(String::as_str)
                .unwrap_or_default();
            assert!(
                COMPONENTS.contains(&component),
                "{context}: component {component:?}"
            );
            if object.pod_template().is_some() {
                let pod = object.pod_labels();
                assert_eq!(
                    pod.get("app.kubernetes.io/part-of").map(String::as_str),
                    Some("flash-sale"),
                    "{context}: pod labels"
                );
                assert_eq!(
                    pod.get("app.kubernetes.io/name"),
                    labels.get("app.kubernetes.io/name"),
                    "{context}: pod labels"
                );
            }
        }
    });
}

// ------------------------------------------------------------------ the workload checklist

#[test]
fn every_container_has_requests_and_a_memory_limit() {
    each_overlay(|overlay, rendered| {
        for owner in rendered.pod_owners() {
            for container in owner.containers() {
                let name = str_at(container, "/name").unwrap_or_default();
                let context = format!("{}: {} container {name}", overlay.name(), owner.id());
                let cpu = str_at(container, "/resources/requests/cpu")
                    .unwrap_or_else(|| panic!("{context}: no CPU request"));
                let memory = str_at(container, "/resources/requests/memory")
                    .unwrap_or_else(|| panic!("{context}: no memory request"));
                let limit = str_at(container, "/resources/limits/memory")
                    .unwrap_or_else(|| panic!("{context}: no memory limit"));
                assert!(quantity(cpu) > 0.0, "{context}");
                assert!(
                    quantity(memory) <= quantity(limit),
                    "{context}: request {memory} over limit {limit}"
                );
            }
        }
    });
}

/// A probe that checks the pod itself: HTTP or TCP to its own port (no `host`), or a command
/// that talks to localhost only.
fn assert_probe_is_local(probe: &Value, context: &str) {
    if let Some(http) = probe.get("httpGet") {
        assert!(
            http.get("host").is_none(),
            "{context}: httpGet probe with a host"
        );
    } else if let Some(tcp) = probe.get("tcpSocket") {
        assert!(
            tcp.get("host").is_none(),
            "{context}: tcpSocket probe with a host"
        );
    } else if let Some(exec) = probe.get("exec") {
        let command: Vec<&str> = array_at(exec, "/command")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        for (index, word) in command.iter().enumerate() {
            let host = if *word == "-h" || *word == "--host" {
                command.get(index + 1).copied()
            } else {
                word.strip_prefix("--host=")
            };
            if let Some(host) = host {
                assert!(
                    host == "127.0.0.1" || host == "localhost",
                    "{context}: probe talks to {host}"
                );
            }
        }
    } else {
        panic!("{context}: probe of an unknown kind: {probe}");
    }
}

#[test]
fn long_running_containers_probe_only_themselves() {
    each_overlay(|overlay, rendered| {
        for workload in rendered.workloads() {
            for container in workload.containers() {
                let name = str_at(container, "/name").unwrap_or_default();
                let context = format!("{}: {} container {name}", overlay.name(), workload.id());
                for probe in ["readinessProbe", "startupProbe"] {
                    let probe_value = container
                        .get(probe)
                        .unwrap_or_else(|| panic!("{context}: no {probe}"));
                    assert_probe_is_local(probe_value, &format!("{context} {probe}"));
                }
                if let Some(liveness) = container.get("livenessProbe") {
                    assert_probe_is_local(liveness, &format!("{context} livenessProbe"));
                }
            }
        }
    });
}

#[test]
fn services_probe_their_management_port_health_endpoints() {
    each_overlay(|overlay, rendered| {
        for (service, _, management) in SERVICES {
            let workload = rendered
                .workloads()
                .find(|w| w.name() == service)
                .unwrap_or_else(|| panic!("{}: no workload {service}", overlay.name()));
            let container = workload.containers()[0];
            let ports: BTreeMap<&str, i64> = array_at(container, "/ports")
                .iter()
                .map(|p| {
                    (
                        str_at(p, "/name").unwrap_or_default(),
                        int_at(p, "/containerPort").unwrap_or_default(),
                    )
                })
                .collect();
            assert_eq!(
                ports.get("management"),
                Some(&management),
                "{service}: management port"
            );
            for (probe, path) in [
                ("startupProbe", "/health/live"),
                ("livenessProbe", "/health/live"),
                ("readinessProbe", "/health/ready"),
            ] {
                assert_eq!(
                    str_at(container, &format!("/{probe}/httpGet/path")),
                    Some(path),
                    "{service} {probe}"
                );
                assert_eq!(
                    str_at(container, &format!("/{probe}/httpGet/port")),
                    Some("management"),
                    "{service} {probe}"
                );
            }
        }
    });
}

#[test]
fn pre_stop_drains_within_the_grace_period() {
    /// Time left after the preStop hook for the process's own drain on SIGTERM.
    const MIN_DRAIN_SECONDS: i64 = 15;
    each_overlay(|overlay, rendered| {
        for workload in rendered.workloads() {
            let grace = workload
                .pod_spec()
                .and_then(|spec| int_at(spec, "/terminationGracePeriodSeconds"))
                .unwrap_or_else(|| {
                    panic!(
                        "{}: {} sets no terminationGracePeriodSeconds",
                        overlay.name(),
                        workload.id()
                    )
                });
            for container in workload.containers() {
                let name = str_at(container, "/name").unwrap_or_default();
                let context = format!("{}: {} container {name}", overlay.name(), workload.id());
                let pre_stop = container
                    .pointer("/lifecycle/preStop")
                    .unwrap_or_else(|| panic!("{context}: no preStop"));
                let seconds = int_at(pre_stop, "/sleep/seconds")
                    .unwrap_or_else(|| panic!("{context}: preStop is not a sleep: {pre_stop}"));
                assert!(seconds > 0, "{context}");
                assert!(
                    seconds + MIN_DRAIN_SECONDS <= grace,
                    "{context}: preStop {seconds}s leaves under {MIN_DRAIN_SECONDS}s of a {grace}s grace period"
                );
            }
        }
    });
}

#[test]
fn every_pod_runs_with_the_restricted_security_context() {
    each_overlay(|overlay, rendered| {
        for owner in rendered.pod_owners() {
            let spec = owner.pod_spec().unwrap();
            let context = format!("{}: {}", overlay.name(), owner.id());
            assert_eq!(
                spec.pointer("/securityContext/runAsNonRoot"),
                Some(&json!(true)),
                "{context}"
            );
            assert_eq!(
                str_at(spec, "/securityContext/seccompProfile/type"),
                Some("RuntimeDefault"),
                "{context}"
            );
            assert_ne!(
                int_at(spec, "/securityContext/runAsUser"),
                Some(0),
                "{context}"
            );
            for key in ["hostNetwork", "hostPID", "hostIPC"] {
                assert_ne!(spec.get(key), Some(&json!(true)), "{context}: {key}");
            }
            assert_eq!(
                spec.get("automountServiceAccountToken"),
                Some(&json!(false)),
                "{context}: mounts an API token"
            );
            for volume in array_at(spec, "/volumes") {
                assert!(
                    volume.get("hostPath").is_none(),
                    "{context}: hostPath volume"
                );
            }
            for container in owner.containers() {
                let name = str_at(container, "/name").unwrap_or_default();
                let context = format!("{context} container {name}");
                let security = container
                    .get("securityContext")
                    .unwrap_or_else(|| panic!("{context}: no securityContext"));
                assert_eq!(
                    security.get("allowPrivilegeEscalation"),
                    Some(&json!(false)),
                    "{context}"
                );
                assert_eq!(
                    security.get("readOnlyRootFilesystem"),
                    Some(&json!(true)),
                    "{context}"
                );
                assert_eq!(
                    security.get("runAsNonRoot"),
                    Some(&json!(true)),
                    "{context}"
                );
                assert_ne!(security.get("privileged"), Some(&json!(true)), "{context}");
                assert_ne!(int_at(security, "/runAsUser"), Some(0), "{context}");
                let dropped: Vec<&str> = array_at(security, "/capabilities/drop")
                    .iter()
                    .filter_map(Value::as_str)
                    .collect();
                assert_eq!(dropped, ["ALL"], "{context}: capabilities");
                assert!(
                    security.pointer("/capabilities/add").is_none(),
                    "{context}: adds capabilities"
                );
            }
        }
    });
}

/// The replica count a workload runs with: the HPA minimum when one manages it.
fn minimum_replicas(rendered: &Rendered, workload: &Object) -> i64 {
    rendered
        .of_kind("HorizontalPodAutoscaler")
        .find(|hpa| str_at(&hpa.0, "/spec/scaleTargetRef/name") == Some(workload.name()))
        .and_then(|hpa| int_at(&hpa.0, "/spec/minReplicas"))
        .or_else(|| int_at(&workload.0, "/spec/replicas"))
        .unwrap_or(1)
}

#[test]
fn every_workload_has_one_disruption_budget_that_lets_drains_proceed() {
    each_overlay(|overlay, rendered| {
        for workload in rendered.workloads() {
            let labels = workload.pod_labels();
            let budgets: Vec<&Object> = rendered
                .of_kind("PodDisruptionBudget")
                .filter(|pdb| selector_matches(pdb.pointer("/spec/selector").unwrap(), &labels))
                .collect();
            let context = format!("{}: {}", overlay.name(), workload.id());
            assert_eq!(
                budgets.len(),
                1,
                "{context}: {} PodDisruptionBudgets",
                budgets.len()
            );
            let pdb = &budgets[0].0;
            assert_eq!(
                str_at(pdb, "/spec/unhealthyPodEvictionPolicy"),
                Some("AlwaysAllow"),
                "{context}"
            );
            // Some pod can always be evicted, so a node drain never waits forever; only the
            // MySQL primary, a singleton, refuses voluntary evictions (see docs/kubernetes.md).
            let replicas = minimum_replicas(rendered, workload);
            let allows = match (
                pdb.pointer("/spec/maxUnavailable"),
                pdb.pointer("/spec/minAvailable"),
            ) {
                (Some(Value::Number(n)), None) => n.as_i64().unwrap() >= 1,
                (Some(Value::String(percent)), None) => percent != "0%",
                (None, Some(Value::Number(n))) => n.as_i64().unwrap() < replicas,
                other => panic!("{context}: unexpected budget {other:?}"),
            };
            if workload.name() == "mysql" {
                assert!(
                    !allows && replicas == 1,
                    "{context}: the primary's budget changed"
                );
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
            let spec = workload.pod_spec().unwrap();
            let context = format!("{}: {}", overlay.name(), workload.id());
            let by_host = array_at(spec, "/topologySpreadConstraints")
                .iter()
                .find(|c| str_at(c, "/topologyKey") == Some("kubernetes.io/hostname"))
                .unwrap_or_else(|| panic!("{context}: no spread over kubernetes.io/hostname"));
            assert_eq!(int_at(by_host, "/maxSkew"), Some(1), "{context}");
            assert!(
                selector_matches(
                    by_host.get("labelSelector").unwrap(),
                    &workload.pod_labels()
                ),
                "{context}: spreads other pods"
            );
            let quorum_store = matches!(workload.name(), "redis-cluster" | "redpanda");
            if quorum_store && overlay != Overlay::Dev {
                // Two Redis masters or two brokers on one node: one node failure loses slots
                // or the Raft majority. Outside dev that must not be schedulable at all.
                assert_eq!(
                    str_at(by_host, "/whenUnsatisfiable"),
                    Some("DoNotSchedule"),
                    "{context}"
                );
            }
        }
    });
}

// ------------------------------------------------------------------------ network policies

/// Who may talk to whom: (source, destination app, port), sources being apps or `ns:<name>`.
type Edges = BTreeSet<(String, String, i64)>;

fn policy_selects(policy: &Object, labels: &BTreeMap<String, String>) -> bool {
    selector_matches(policy.pointer("/spec/podSelector").unwrap(), labels)
}

fn policy_types(policy: &Object) -> Vec<&str> {
    array_at(&policy.0, "/spec/policyTypes")
        .iter()
        .filter_map(Value::as_str)
        .collect()
}

/// Whether a rule's peers admit a pod of this namespace with `labels` (or, for `namespace`, any
/// pod of that other namespace).
fn peers_admit(
    rule: &Value,
    key: &str,
    labels: Option<&BTreeMap<String, String>>,
    namespace: Option<&str>,
) -> bool {
    let Some(peers) = rule.get(key).and_then(Value::as_array) else {
        return true; // no `from`/`to`: every peer
    };
    peers.iter().any(|peer| {
        match (
            peer.get("namespaceSelector"),
            peer.get("podSelector"),
            labels,
            namespace,
        ) {
            (None, Some(pods), Some(labels), None) => selector_matches(pods, labels),
            (Some(namespaces), pods, None, Some(namespace)) => {
                let ns_labels = BTreeMap::from([(
                    "kubernetes.io/metadata.name".to_owned(),
                    namespace.to_owned(),
                )]);
                selector_matches(namespaces, &ns_labels)
                    && pods.is_none_or(|p| p.as_object().is_some_and(|o| o.is_empty()))
            }
            _ => false,
        }
    })
}

fn ports_admit(rule: &Value, port: i64) -> bool {
    match rule.get("ports").and_then(Value::as_array) {
        None => true,
        Some(ports) => ports.iter().any(|p| {
            int_at(p, "/port") == Some(port) && str_at(p, "/protocol").unwrap_or("TCP") == "TCP"
        }),
    }
}

/// The connections the NetworkPolicies allow between the pods of the rendered output, on the
/// destination's container ports, plus those from other namespaces.
fn allowed_edges(rendered: &Rendered, other_namespaces: &[&str]) -> Edges {
    let policies: Vec<&Object> = rendered.of_kind("NetworkPolicy").collect();
    let pods: Vec<(String, BTreeMap<String, String>, Vec<i64>)> = rendered
        .pod_owners()
        .map(|owner| {
            let ports = owner
                .containers()
                .iter()
                .flat_map(|c| array_at(c, "/ports"))
                .filter_map(|p| int_at(p, "/containerPort"))
                .collect();
            (
                owner.pod_labels()["app.kubernetes.io/name"].clone(),
                owner.pod_labels(),
                ports,
            )
        })
        .collect();
    let ingress_allows = |dest: &BTreeMap<String, String>,
                          source: Option<&BTreeMap<String, String>>,
                          namespace: Option<&str>,
                          port: i64| {
        policies
            .iter()
            .filter(|p| policy_selects(p, dest) && policy_types(p).contains(&"Ingress"))
            .any(|p| {
                array_at(&p.0, "/spec/ingress").iter().any(|rule| {
                    peers_admit(rule, "from", source, namespace) && ports_admit(rule, port)
                })
            })
    };
    let egress_allows =
        |source: &BTreeMap<String, String>, dest: &BTreeMap<String, String>, port: i64| {
            policies
                .iter()
                .filter(|p| policy_selects(p, source) && policy_types(p).contains(&"Egress"))
                .any(|p| {
                    array_at(&p.0, "/spec/egress").iter().any(|rule| {
                        peers_admit(rule, "to", Some(dest), None) && ports_admit(rule, port)
                    })
                })
        };
    let mut edges = Edges::new();
    for (dest_name, dest_labels, ports) in &pods {
        for &port in ports {
            for (source_name, source_labels, _) in &pods {
                if egress_allows(source_labels, dest_labels, port)
                    && ingress_allows(dest_labels, Some(source_labels), None, port)
                {
                    edges.insert((source_name.clone(), dest_name.clone(), port));
                }
            }
            for namespace in other_namespaces {
                if ingress_allows(dest_labels, None, Some(namespace), port) {
                    edges.insert((format!("ns:{namespace}"), dest_name.clone(), port));
                }
            }
        }
    }
    edges
}

fn edge(source: &str, dest: &str, port: i64) -> (String, String, i64) {
    (source.to_owned(), dest.to_owned(), port)
}

#[test]
fn network_policies_deny_by_default() {
    each_overlay(|overlay, rendered| {
        let default_deny = rendered.of_kind("NetworkPolicy").find(|p| {
            p.pointer("/spec/podSelector") == Some(&json!({}))
                && policy_types(p) == ["Ingress", "Egress"]
                && p.pointer("/spec/ingress").is_none()
                && p.pointer("/spec/egress").is_none()
        });
        assert!(
            default_deny.is_some(),
            "{}: no default-deny NetworkPolicy",
            overlay.name()
        );
        // The only namespace-wide allowance is DNS.
        for policy in rendered.of_kind("NetworkPolicy") {
            if policy.pointer("/spec/podSelector") == Some(&json!({}))
                && policy.pointer("/spec/egress").is_some()
            {
                for rule in array_at(&policy.0, "/spec/egress") {
                    let ports: BTreeSet<i64> = array_at(rule, "/ports")
                        .iter()
                        .filter_map(|p| int_at(p, "/port"))
                        .collect();
                    assert_eq!(
                        ports,
                        BTreeSet::from([53]),
                        "{}: {} allows more than DNS",
                        overlay.name(),
                        policy.id()
                    );
                }
            }
        }
        // Every pod has its own allow-list, explicit in both directions.
        for owner in rendered.pod_owners() {
            let labels = owner.pod_labels();
            let own = rendered.of_kind("NetworkPolicy").filter(|p| {
                p.pointer("/spec/podSelector") != Some(&json!({}))
                    && policy_selects(p, &labels)
                    && policy_types(p) == ["Ingress", "Egress"]
            });
            assert_eq!(
                own.count(),
                1,
                "{}: {} has no allow-list of its own",
                overlay.name(),
                owner.id()
            );
        }
    });
}

#[test]
fn network_policies_allow_exactly_the_needed_connections() {
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
        let found = allowed_edges(rendered, &namespaces);
        let missing: Vec<_> = expected.difference(&found).collect();
        let extra: Vec<_> = found.difference(&expected).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{}: missing {missing:?}, unexpected {extra:?}",
            overlay.name()
        );
    });
    // The policies are no mere formality: dropping the gateway's egress rule cuts it off.
    let mut rendered = Rendered {
        yaml: String::new(),
        objects: Overlay::Dev.rendered().objects.clone(),
        warnings: String::new(),
    };
    for object in &mut rendered.objects {
        if object.kind() == "NetworkPolicy" && object.name() == "gateway" {
            object.0["spec"]["egress"] = json!([]);
        }
    }
    let found = allowed_edges(&rendered, &namespaces);
    expected.remove(&edge("gateway", "order-service", 8082));
    expected.remove(&edge("gateway", "inventory-service", 8084));
    expected.remove(&edge("gateway", "redis-cluster", 6379));
    assert_eq!(found, expected);
}

// ------------------------------------------------------------------ secrets and environment

/// Every `env` entry of every container: (owner, container, entry).
fn env_entries(rendered: &Rendered) -> Vec<(String, String, &Value)> {
    rendered
        .pod_owners()
        .flat_map(|owner| {
            owner.containers().into_iter().flat_map(move |container| {
                let name = str_at(container, "/name").unwrap_or_default().to_owned();
                array_at(container, "/env")
                    .iter()
                    .map(move |entry| (owner.id(), name.clone(), entry))
            })
        })
        .collect()
}

#[test]
fn secrets_appear_only_as_references() {
    let sensitive = ["PASSWORD", "TOKEN", "SECRET", "DATABASE__URL", "CREDENTIAL"];
    let external: BTreeMap<&str, &[&str]> = EXTERNAL_SECRETS.into_iter().collect();
    each_overlay(|overlay, rendered| {
        assert_eq!(
            rendered.of_kind("Secret").count(),
            0,
            "{}: a Secret object in the manifests",
            overlay.name()
        );
        for (owner, container, entry) in env_entries(rendered) {
            let name = str_at(entry, "/name").unwrap_or_default();
            let context = format!(
                "{}: {owner} container {container} env {name}",
                overlay.name()
            );
            if let Some(reference) = entry.pointer("/valueFrom/secretKeyRef") {
                let secret = str_at(reference, "/name").unwrap_or_default();
                let key = str_at(reference, "/key").unwrap_or_default();
                let keys = external
                    .get(secret)
                    .unwrap_or_else(|| panic!("{context}: unknown secret {secret}"));
                assert!(
                    keys.contains(&key),
                    "{context}: secret {secret} has no key {key}"
                );
            } else if sensitive.iter().any(|word| name.contains(word)) {
                panic!("{context}: a sensitive variable not taken from a Secret");
            }
        }
        for config_map in rendered.of_kind("ConfigMap") {
            for key in string_map(config_map.pointer("/data")).keys() {
                assert!(
                    !sensitive.iter().any(|word| key.contains(word)),
                    "{}: {} holds {key}",
                    overlay.name(),
                    config_map.id()
                );
            }
        }
        // No credentials in any URL, anywhere in the output.
        assert!(
            !rendered.yaml.lines().any(|line| line.contains("://")
                && line.split("://").nth(1).is_some_and(|rest| rest
                    .split('/')
                    .next()
                    .unwrap_or_default()
                    .contains('@'))),
            "{}: a URL with credentials",
            overlay.name()
        );
    });
}

/// The variables a container gets: its `env` names and the keys of the ConfigMaps in `envFrom`.
fn container_env(rendered: &Rendered, container: &Value) -> BTreeMap<String, Option<String>> {
    let mut env = BTreeMap::new();
    for source in array_at(container, "/envFrom") {
        let name = str_at(source, "/configMapRef/name").expect("envFrom only from ConfigMaps");
        let config_map = rendered.get("ConfigMap", name);
        for (key, value) in string_map(config_map.pointer("/data")) {
            env.insert(key, Some(value));
        }
    }
    for entry in array_at(container, "/env") {
        env.insert(
            str_at(entry, "/name").unwrap().to_owned(),
            str_at(entry, "/value").map(str::to_owned),
        );
    }
    env
}

#[test]
fn service_configuration_follows_the_contract() {
    let contract = contracts::env_vars();
    each_overlay(|overlay, rendered| {
        for (service, app_port, management_port) in SERVICES {
            let workload = rendered.workloads().find(|w| w.name() == service).unwrap();
            let container = workload.containers()[0];
            let context = format!("{}: {service}", overlay.name());
            let image = str_at(container, "/image").unwrap();
            assert!(
                image.starts_with(&format!("flash-sale/{service}:")),
                "{context}: image {image}"
            );
            let env = container_env(rendered, container);
            for name in env.keys() {
                if name.starts_with("FLASH_SALE_") || name == "RUST_LOG" {
                    assert!(
                        contract.contains(name),
                        "{context}: {name} is not in docs/contracts.md"
                    );
                }
            }
            assert_eq!(
                env.get("FLASH_SALE_SERVER__PORT"),
                Some(&Some(app_port.to_string())),
                "{context}"
            );
            assert_eq!(
                env.get("FLASH_SALE_MANAGEMENT__PORT"),
                Some(&Some(management_port.to_string())),
                "{context}"
            );
            assert_eq!(
                env.get("FLASH_SALE_TELEMETRY__LOG_FORMAT"),
                Some(&Some("json".to_owned())),
                "{context}"
            );
            // All three reach the Redis Cluster (the gateway for its cluster-wide buckets).
            assert_eq!(
                env.get("FLASH_SALE_REDIS__CLUSTER"),
                Some(&Some("true".to_owned())),
                "{context}"
            );
            if service != "gateway" {
                assert!(env.contains_key("FLASH_SALE_DATABASE__URL"), "{context}");
            }
            if service == "gateway" {
                // A token key always (the gateway refuses to start without one, outside
                // development mode), development mode only in dev, and the HPA minimum as the
                // replica hint of the cluster-wide buckets.
                assert!(
                    env.contains_key("FLASH_SALE_AUTH__HS256_SECRET"),
                    "{context}"
                );
                let trusting = env.get("FLASH_SALE_AUTH__TRUST_BODY_USER_ID");
                if overlay == Overlay::Dev {
                    assert_eq!(trusting, Some(&Some("true".to_owned())), "{context}");
                } else {
                    assert_eq!(trusting, None, "{context}: development mode outside dev");
                }
                let minimum = int_at(
                    &rendered.get("HorizontalPodAutoscaler", "gateway").0,
                    "/spec/minReplicas",
                );
                assert_eq!(
                    env.get("FLASH_SALE_CLUSTER__REPLICAS_HINT"),
                    Some(&minimum.map(|m| m.to_string())),
                    "{context}: the replica hint is the HPA minimum"
                );
                assert_eq!(
                    env.get("FLASH_SALE_PROXY__TRUSTED_PROXY_HOPS"),
                    Some(&Some("1".to_owned())),
                    "{context}: behind the ingress controller"
                );
            }
            if service == "order-service" {
                assert_eq!(
                    env.get("FLASH_SALE_KAFKA__TOPIC"),
                    Some(&Some("flash-sale-order-topic".to_owned())),
                    "{context}"
                );
            }
            if service == "inventory-service" {
                assert!(
                    env.contains_key("FLASH_SALE_INVENTORY__ADMIN_TOKEN"),
                    "{context}"
                );
            }
        }
    });
}

#[test]
fn the_migration_job_runs_the_inventory_image_with_migrate() {
    each_overlay(|overlay, rendered| {
        let job = rendered.get("Job", "flash-sale-migrate");
        let container = job.containers()[0];
        let inventory = rendered
            .workloads()
            .find(|w| w.name() == "inventory-service")
            .unwrap()
            .containers()[0];
        assert_eq!(
            container.get("image"),
            inventory.get("image"),
            "{}: the migration runs another image",
            overlay.name()
        );
        assert_eq!(
            container.get("args"),
            Some(&json!(["migrate"])),
            "{}",
            overlay.name()
        );
        assert!(
            container.get("command").is_none(),
            "{}: the image's entrypoint must run",
            overlay.name()
        );
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
                let tag = reference
                    .rsplit_once(':')
                    .map(|(_, tag)| tag)
                    .filter(|tag| !tag.contains('/'));
                assert!(
                    tag.is_some_and(|tag| tag != "latest"),
                    "{context}: no version tag"
                );
                if let Some(digest) = digest {
                    let hex = digest
                        .strip_prefix("sha256:")
                        .unwrap_or_else(|| panic!("{context}: bad digest"));
                    assert!(
                        hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()),
                        "{context}: bad digest"
                    );
                }
                if is_our_image(image) {
                    assert_eq!(
                        digest.is_some(),
                        overlay == Overlay::Production,
                        "{context}: digest only (and always) in production"
                    );
                    ours.insert(tag.unwrap().to_owned());
                }
            }
        }
        assert_eq!(
            ours.len(),
            1,
            "{}: the services run different versions: {ours:?}",
            overlay.name()
        );
    });
}

// --------------------------------------------------------------------------- autoscaling

fn seed_hpa(min: i64, max: i64, up_percent: i64, up_pods: i64, up_period: i64) -> Value {
    json!({
        "minReplicas": min,
        "maxReplicas": max,
        "metrics": [
            {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}},
            {"type": "Resource", "resource": {"name": "memory", "target": {"type": "Utilization", "averageUtilization": 80}}}
        ],
        "behavior": {
            "scaleUp": {
                "stabilizationWindowSeconds": 0,
                "selectPolicy": "Max",
                "policies": [
                    {"type": "Percent", "value": up_percent, "periodSeconds": up_period},
                    {"type": "Pods", "value": up_pods, "periodSeconds": up_period}
                ]
            },
            "scaleDown": {
                "stabilizationWindowSeconds": 300,
                "selectPolicy": "Max",
                "policies": [{"type": "Percent", "value": 30, "periodSeconds": 60}]
            }
        }
    })
}

#[test]
fn hpas_carry_the_seeds_numbers() {
    // order-service 5-20, CPU 70 %, memory 80 %, up 200 % or 5 pods per 15 s, down 30 % after a
    // 300 s window; gateway and inventory-service 3-10, up 100 % or 2 pods per 30 s.
    let seed = [
        ("order-service", seed_hpa(5, 20, 200, 5, 15)),
        ("gateway", seed_hpa(3, 10, 100, 2, 30)),
        ("inventory-service", seed_hpa(3, 10, 100, 2, 30)),
    ];
    each_overlay(|overlay, rendered| {
        assert_eq!(
            rendered.of_kind("HorizontalPodAutoscaler").count(),
            3,
            "{}",
            overlay.name()
        );
        for (service, expected) in &seed {
            let hpa = rendered.get("HorizontalPodAutoscaler", service);
            let mut spec = hpa.pointer("/spec").unwrap().clone();
            spec.as_object_mut().unwrap().remove("scaleTargetRef");
            let mut expected = expected.clone();
            if overlay == Overlay::Dev {
                // dev is small and cheap: one or two pods, the seed's behaviour otherwise.
                expected["minReplicas"] = json!(1);
                expected["maxReplicas"] = json!(2);
            }
            assert_eq!(spec, expected, "{}: HPA {service}", overlay.name());
        }
    });
}

#[test]
fn hpa_managed_workloads_carry_no_replicas() {
    each_overlay(|overlay, rendered| {
        for hpa in rendered.of_kind("HorizontalPodAutoscaler") {
            let target = hpa.pointer("/spec/scaleTargetRef").unwrap();
            let kind = str_at(target, "/kind").unwrap();
            let name = str_at(target, "/name").unwrap();
            let workload = rendered.get(kind, name);
            assert_eq!(
                str_at(target, "/apiVersion"),
                Some(workload.api_version()),
                "{}: {}",
                overlay.name(),
                hpa.id()
            );
            assert!(
                workload.pointer("/spec/replicas").is_none(),
                "{}: {} sets replicas",
                overlay.name(),
                workload.id()
            );
        }
        // And every service is scaled by one.
        for (service, _, _) in SERVICES {
            let scaled = rendered
                .of_kind("HorizontalPodAutoscaler")
                .filter(|hpa| str_at(&hpa.0, "/spec/scaleTargetRef/name") == Some(service))
                .count();
            assert_eq!(scaled, 1, "{}: {service}", overlay.name());
        }
    });
}

// ----------------------------------------------------------------------------- canary

/// What a Rollout's steps amount to: the weights, and for each raise what preceded it.
#[derive(Debug, Default)]
struct CanaryPlan {
    weights: Vec<i32>,
    pause_seconds: Vec<u64>,
    ends_with_manual_gate: bool,
}

fn duration_seconds(duration: &crds::IntOrString) -> u64 {
    match duration {
        crds::IntOrString::Int(seconds) => *seconds as u64,
        crds::IntOrString::String(text) => {
            let (number, unit) = text.split_at(text.len() - 1);
            let number: u64 = number
                .parse()
                .unwrap_or_else(|_| panic!("bad duration {text}"));
            match unit {
                "s" => number,
                "m" => number * 60,
                "h" => number * 3600,
                _ => panic!("bad duration {text}"),
            }
        }
    }
}

/// Checks the step rules and returns the plan: weights rise strictly within (0, 100); every raise
/// after the first, and the final implicit raise to 100 %, comes after a timed pause and a
/// passed analysis of the canary's own pods, at the current weight.
fn canary_plan(
    rollout: &crds::Rollout,
    templates: &BTreeMap<String, crds::AnalysisTemplate>,
) -> CanaryPlan {
    let name = &rollout.metadata.name;
    let mut plan = CanaryPlan::default();
    // Since the last weight change: was there a timed pause, then an analysis?
    let mut paused = false;
    let mut analysed = false;
    let steps = &rollout.spec.strategy.canary.steps;
    for (index, step) in steps.iter().enumerate() {
        let context = format!("{name} step {index}");
        match step.action().unwrap_or_else(|e| panic!("{context}: {e}")) {
            StepAction::SetWeight(weight) => {
                assert!(weight > 0 && weight < 100, "{context}: weight {weight}");
                if let Some(&last) = plan.weights.last() {
                    assert!(
                        weight > last,
                        "{context}: weight {weight} does not rise from {last}"
                    );
                    assert!(
                        paused && analysed,
                        "{context}: raise to {weight} without a pause and an analysis first"
                    );
                }
                plan.weights.push(weight);
                paused = false;
                analysed = false;
            }
            StepAction::Pause(pause) => match &pause.duration {
                Some(duration) => {
                    assert!(
                        !analysed,
                        "{context}: a pause after the analysis delays nothing useful"
                    );
                    plan.pause_seconds.push(duration_seconds(duration));
                    paused = true;
                }
                None => {
                    assert_eq!(
                        index,
                        steps.len() - 1,
                        "{context}: a manual gate only at the end"
                    );
                    plan.ends_with_manual_gate = true;
                }
            },
            StepAction::Analysis(analysis) => {
                assert!(
                    paused,
                    "{context}: analysis before any traffic reached the new weight"
                );
                for reference in &analysis.templates {
                    let template = templates.get(&reference.template_name).unwrap_or_else(|| {
                        panic!("{context}: no AnalysisTemplate {}", reference.template_name)
                    });
                    let given: BTreeMap<&str, &crds::AnalysisRunArgument> = analysis
                        .args
                        .iter()
                        .flatten()
                        .map(|arg| (arg.name.as_str(), arg))
                        .collect();
                    for arg in template.spec.args.iter().flatten() {
                        assert!(
                            arg.value.is_some() || given.contains_key(arg.name.as_str()),
                            "{context}: argument {} missing",
                            arg.name
                        );
                    }
                    assert_eq!(
                        given.get("service").and_then(|a| a.value.as_deref()),
                        Some(name.as_str()),
                        "{context}: analyses another service"
                    );
                    let hash = given
                        .get("canary-hash")
                        .and_then(|a| a.value_from.as_ref())
                        .and_then(|v| v.pod_template_hash_value);
                    assert_eq!(
                        hash,
                        Some(PodTemplateHashValue::Latest),
                        "{context}: must judge the canary's pods"
                    );
                }
                analysed = true;
            }
            StepAction::SetCanaryScale(_) => {
                panic!("{context}: setCanaryScale needs traffic routing, which this bundle has not")
            }
        }
    }
    assert!(!plan.weights.is_empty(), "{name}: no steps");
    assert!(
        paused && analysed,
        "{name}: the last raise (to 100 %) is not preceded by a pause and an analysis"
    );
    plan
}

fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(object: &Object) -> T {
    crds::round_trip(&object.0).unwrap_or_else(|e| panic!("{}: {e:#}", object.id()))
}

#[test]
fn production_releases_each_service_as_a_careful_canary() {
    let rendered = Overlay::Production.rendered();
    assert_eq!(
        rendered.of_kind("Deployment").count(),
        0,
        "production keeps a Deployment"
    );
    let templates: BTreeMap<String, crds::AnalysisTemplate> = rendered
        .of_kind("AnalysisTemplate")
        .map(|object| {
            (
                object.name().to_owned(),
                typed::<crds::AnalysisTemplate>(object),
            )
        })
        .collect();
    let plans: BTreeMap<String, CanaryPlan> = SERVICES
        .iter()
        .map(|(service, _, _)| {
            let rollout: crds::Rollout = typed(rendered.get("Rollout", service));
            assert!(
                rollout.spec.replicas.is_none(),
                "{service}: the HPA owns the replicas"
            );
            assert_eq!(
                rollout.spec.strategy.canary.canary_service, None,
                "{service}: canary by replica weight, no traffic routing"
            );
            assert_eq!(
                rollout.spec.progress_deadline_abort,
                Some(true),
                "{service}: a stuck canary must abort"
            );
            ((*service).to_owned(), canary_plan(&rollout, &templates))
        })
        .collect();
    // order-service, the buy path and the consumer, is the most careful of the three.
    let order = &plans["order-service"];
    for (service, plan) in &plans {
        if service == "order-service" {
            continue;
        }
        let largest_raise = |p: &CanaryPlan| {
            p.weights
                .iter()
                .chain([&100])
                .zip(std::iter::once(&0).chain(p.weights.iter()))
                .map(|(b, a)| b - a)
                .max()
                .unwrap()
        };
        assert!(
            order.weights.len() > plan.weights.len(),
            "order-service takes fewer steps than {service}"
        );
        assert!(
            order.weights[0] <= plan.weights[0],
            "order-service starts bigger than {service}"
        );
        assert!(
            largest_raise(order) <= largest_raise(plan),
            "order-service raises faster than {service}"
        );
        assert!(
            order.pause_seconds.iter().min() >= plan.pause_seconds.iter().max(),
            "order-service pauses less than {service}"
        );
        assert!(!plan.ends_with_manual_gate || order.ends_with_manual_gate);
    }
    assert!(
        order.ends_with_manual_gate,
        "order-service must wait for a promotion before 100 %"
    );
    insta::assert_yaml_snapshot!(
        "canary_plans",
        plans
            .iter()
            .map(|(service, plan)| (service.clone(), json!({"weights": plan.weights, "pauses_s": plan.pause_seconds, "manual_gate": plan.ends_with_manual_gate})))
            .collect::<BTreeMap<_, _>>()
    );
}

#[test]
fn the_analysis_judges_success_rate_and_p99_of_the_canary_only() {
    let rendered = Overlay::Production.rendered();
    let template: crds::AnalysisTemplate =
        typed(rendered.get("AnalysisTemplate", "flash-sale-canary"));
    let metrics: BTreeMap<&str, &crds::AnalysisMetric> = template
        .spec
        .metrics
        .iter()
        .map(|m| (m.name.as_str(), m))
        .collect();
    assert_eq!(
        metrics.keys().copied().collect::<Vec<_>>(),
        ["p99-latency", "success-rate"]
    );
    for metric in metrics.values() {
        let query = &metric.provider.prometheus.query;
        assert!(
            query.contains(r#"rollouts_pod_template_hash="{{args.canary-hash}}""#),
            "{}: not the canary's pods",
            metric.name
        );
        assert!(
            query.contains(r#"service="{{args.service}}""#),
            "{}",
            metric.name
        );
        assert!(
            metric.success_condition.is_some() && metric.failure_condition.is_some(),
            "{}: both conditions, so no-data is inconclusive",
            metric.name
        );
        assert_eq!(
            metric.failure_limit,
            Some(crds::IntOrString::Int(0)),
            "{}: one failed measurement aborts",
            metric.name
        );
    }
    assert!(
        metrics["success-rate"]
            .provider
            .prometheus
            .query
            .contains("http_requests_total")
    );
    assert!(
        metrics["p99-latency"]
            .provider
            .prometheus
            .query
            .contains("http_request_duration_seconds_bucket")
    );
    // The ServiceMonitor copies the label the queries select on.
    let monitor = rendered.get("ServiceMonitor", "flash-sale-services");
    assert_eq!(
        monitor.pointer("/spec/podTargetLabels"),
        Some(&json!(["rollouts-pod-template-hash"]))
    );
}

#[test]
fn staging_and_dev_run_plain_deployments() {
    for overlay in [Overlay::Dev, Overlay::Staging] {
        let rendered = overlay.rendered();
        assert_eq!(rendered.of_kind("Rollout").count(), 0, "{}", overlay.name());
        for (service, _, _) in SERVICES {
            let deployment = rendered.get("Deployment", service);
            assert_eq!(
                str_at(&deployment.0, "/spec/strategy/rollingUpdate/maxUnavailable"),
                None
            );
            assert_eq!(
                int_at(&deployment.0, "/spec/strategy/rollingUpdate/maxUnavailable"),
                Some(0),
                "{}: {service}",
                overlay.name()
            );
        }
    }
}

// ------------------------------------------------------------------------------- references

#[test]
fn every_reference_resolves() {
    let external: BTreeMap<&str, &[&str]> = EXTERNAL_SECRETS.into_iter().collect();
    each_overlay(|overlay, rendered| {
        let context = |what: String| format!("{}: {what}", overlay.name());
        let config_map = |name: &str, key: Option<&str>, what: &str| {
            let found = rendered.of_kind("ConfigMap").find(|c| c.name() == name);
            let found = found.unwrap_or_else(|| {
                panic!(
                    "{}",
                    context(format!(
                        "{what} names ConfigMap {name}, which is not rendered"
                    ))
                )
            });
            if let Some(key) = key {
                assert!(
                    string_map(found.pointer("/data")).contains_key(key),
                    "{}",
                    context(format!("{what}: ConfigMap {name} has no {key}"))
                );
            }
        };
        for owner in rendered.pod_owners() {
            let spec = owner.pod_spec().unwrap();
            for volume in array_at(spec, "/volumes") {
                if let Some(name) = str_at(volume, "/configMap/name") {
                    config_map(name, None, &owner.id());
                    for item in array_at(volume, "/configMap/items") {
                        config_map(name, str_at(item, "/key"), &owner.id());
                    }
                }
                if let Some(name) = str_at(volume, "/secret/secretName") {
                    assert!(
                        external.contains_key(name),
                        "{}",
                        context(format!("{} mounts unknown secret {name}", owner.id()))
                    );
                }
            }
            let mounts: BTreeSet<&str> = array_at(spec, "/volumes")
                .iter()
                .filter_map(|v| str_at(v, "/name"))
                .collect();
            let claims: BTreeSet<&str> = array_at(&owner.0, "/spec/volumeClaimTemplates")
                .iter()
                .filter_map(|c| str_at(c, "/metadata/name"))
                .collect();
            for container in owner.containers() {
                for source in array_at(container, "/envFrom") {
                    config_map(
                        str_at(source, "/configMapRef/name").unwrap(),
                        None,
                        &owner.id(),
                    );
                }
                for entry in array_at(container, "/env") {
                    if let Some(reference) = entry.pointer("/valueFrom/configMapKeyRef") {
                        config_map(
                            str_at(reference, "/name").unwrap(),
                            str_at(reference, "/key"),
                            &owner.id(),
                        );
                    }
                }
                for mount in array_at(container, "/volumeMounts") {
                    let name = str_at(mount, "/name").unwrap();
                    assert!(
                        mounts.contains(name) || claims.contains(name),
                        "{}",
                        context(format!("{} mounts unknown volume {name}", owner.id()))
                    );
                }
            }
            if owner.kind() == "StatefulSet" {
                let service_name = str_at(&owner.0, "/spec/serviceName").unwrap();
                let service = rendered.get("Service", service_name);
                assert_eq!(
                    str_at(&service.0, "/spec/clusterIP"),
                    Some("None"),
                    "{}",
                    context(format!("{} needs a headless Service", owner.id()))
                );
            }
        }
        // Services select pods and target ports those pods have.
        for service in rendered.of_kind("Service") {
            let selector = json!({"matchLabels": service.pointer("/spec/selector").cloned().unwrap_or(json!({}))});
            let backends: Vec<&Object> = rendered
                .workloads()
                .filter(|w| selector_matches(&selector, &w.pod_labels()))
                .collect();
            assert_eq!(
                backends.len(),
                1,
                "{}",
                context(format!(
                    "{} selects {} workloads",
                    service.id(),
                    backends.len()
                ))
            );
            let port_names: BTreeSet<&str> = backends[0]
                .containers()
                .iter()
                .flat_map(|c| array_at(c, "/ports"))
                .filter_map(|p| str_at(p, "/name"))
                .collect();
            for port in array_at(&service.0, "/spec/ports") {
                let target = str_at(port, "/targetPort").unwrap_or_else(|| {
                    panic!(
                        "{}",
                        context(format!("{}: name the target port", service.id()))
                    )
                });
                assert!(
                    port_names.contains(target),
                    "{}",
                    context(format!("{}: no container port {target}", service.id()))
                );
            }
        }
        // The Ingress reaches the gateway's http port.
        for ingress in rendered.of_kind("Ingress") {
            for path in array_at(&ingress.0, "/spec/rules/0/http/paths") {
                let name = str_at(path, "/backend/service/name").unwrap();
                let port = str_at(path, "/backend/service/port/name").unwrap();
                let service = rendered.get("Service", name);
                assert!(
                    array_at(&service.0, "/spec/ports")
                        .iter()
                        .any(|p| str_at(p, "/name") == Some(port)),
                    "{}",
                    context(format!("{} port {port}", ingress.id()))
                );
            }
        }
        // ServiceMonitors select Services that have the port they scrape.
        for monitor in rendered.of_kind("ServiceMonitor") {
            let selector = monitor.pointer("/spec/selector").unwrap();
            for endpoint in array_at(&monitor.0, "/spec/endpoints") {
                let port = str_at(endpoint, "/port").unwrap();
                let scraped = rendered
                    .of_kind("Service")
                    .filter(|s| selector_matches(selector, &s.labels()))
                    .filter(|s| {
                        array_at(&s.0, "/spec/ports")
                            .iter()
                            .any(|p| str_at(p, "/name") == Some(port))
                    })
                    .count();
                assert!(
                    scraped >= 1,
                    "{}",
                    context(format!("{} scrapes no Service port {port}", monitor.id()))
                );
            }
        }
    });
}

// ---------------------------------------------------- the Argo Rollouts transformer config

/// Renders production, renamed with a name prefix and a changed ConfigMap, from a copy of the
/// bundle; `strip_config` removes the component's `configurations:`.
fn render_renamed_production(strip_config: bool) -> Rendered {
    let dir = deploy_tests::scratch_dir!(if strip_config {
        "renamed-without-config"
    } else {
        "renamed-with-config"
    });
    for part in ["k8s", "kustomize", "monitoring"] {
        let status = Command::new("cp")
            .arg("-r")
            .arg(deploy_tests::repo_path(part))
            .arg(&dir)
            .status()
            .unwrap();
        assert!(status.success());
    }
    let component = dir.join("kustomize/components/argo-rollouts/kustomization.yaml");
    let text = std::fs::read_to_string(&component).unwrap();
    let marker = "configurations:\n  - rollout-transformers.yaml\n";
    assert!(
        text.contains(marker),
        "the component declares its transformer configuration"
    );
    if strip_config {
        std::fs::write(&component, text.replace(marker, "")).unwrap();
    }
    let overlay = dir.join("kustomize/overlays/production/kustomization.yaml");
    let text = std::fs::read_to_string(&overlay).unwrap();
    std::fs::write(
        &overlay,
        text.replacen("resources:", "namePrefix: eu-\n\nresources:", 1),
    )
    .unwrap();
    Rendered::from_dir(&dir.join("kustomize/overlays/production")).unwrap()
}

#[test]
fn renamed_objects_stay_referenced_thanks_to_the_transformer_config() {
    let _ = tools::require("kubectl");
    let with = render_renamed_production(false);
    for (service, _, _) in SERVICES {
        let rollout = with.get("Rollout", &format!("eu-{service}"));
        let hpa = with.get("HorizontalPodAutoscaler", &format!("eu-{service}"));
        assert_eq!(
            str_at(&hpa.0, "/spec/scaleTargetRef/name"),
            Some(rollout.name()),
            "the HPA follows its Rollout"
        );
        for reference in rollout.containers()[0]
            .get("envFrom")
            .and_then(Value::as_array)
            .unwrap()
        {
            let name = str_at(reference, "/configMapRef/name").unwrap();
            assert!(
                with.of_kind("ConfigMap").any(|c| c.name() == name),
                "{service}: ConfigMap {name} (hash) followed"
            );
        }
        for step in array_at(&rollout.0, "/spec/strategy/canary/steps") {
            if let Some(name) = str_at(step, "/analysis/templates/0/templateName") {
                assert_eq!(
                    name, "eu-flash-sale-canary",
                    "{service}: the AnalysisTemplate reference followed"
                );
            }
        }
    }
    // The negative control: without the configuration the analysis steps point at nothing.
    let without = render_renamed_production(true);
    let dangling = without
        .of_kind("Rollout")
        .flat_map(|r| array_at(&r.0, "/spec/strategy/canary/steps").to_vec())
        .filter_map(|step| str_at(&step, "/analysis/templates/0/templateName").map(str::to_owned))
        .filter(|name| {
            !without
                .of_kind("AnalysisTemplate")
                .any(|t| t.name() == name)
        })
        .count();
    assert!(
        dangling > 0,
        "without the transformer configuration the references should break"
    );
}

#[test]
fn production_config_changes_reach_the_rollout_through_the_hash() {
    // production merges its own RUST_LOG into order-service-env: a new content hash, and the
    // Rollout must carry the new name (staging, without the merge, has another).
    let name_in = |overlay: Overlay, kind: &str| {
        let workload = overlay.rendered().get(kind, "order-service");
        array_at(workload.containers()[0], "/envFrom")
            .iter()
            .filter_map(|r| str_at(r, "/configMapRef/name"))
            .find(|n| n.starts_with("order-service-env-"))
            .unwrap()
            .to_owned()
    };
    let production = name_in(Overlay::Production, "Rollout");
    let staging = name_in(Overlay::Staging, "Deployment");
    assert_ne!(production, staging);
    let config = Overlay::Production.rendered().get("ConfigMap", &production);
    assert_eq!(
        str_at(&config.0, "/data/RUST_LOG"),
        Some("warn,order_service=info")
    );
}
