//! The services on a real Redis Cluster, as every overlay of the bundle runs them: a stack whose
//! Redis is three masters started by `k8s/redis/start.sh` with `k8s/redis/redis.conf` and the
//! password, formed by `k8s/redis/bootstrap.sh` ([`StackOptions::redis_cluster`]), and the
//! services in `redis.cluster` mode. A sale of two activities whose keys live on different
//! masters keeps every invariant, the reconciler finds no drift there and repairs one it is
//! shown, and the gateway's cluster-wide bucket counts replicas and shares one bucket.

use std::time::{Duration, Instant};

use flash_sale_common::configuration::{RedisSettings, Secret};
use flash_sale_common::domain::ActivityId;
use flash_sale_common::redis::{ActivityKeys, Redis};
use flash_sale_tests::apps::TestApps;
use flash_sale_tests::scenario::{SaleConfig, StoreConnection, drive_sale};
use flash_sale_tests::stack::{BrokerStorage, REDIS_CLUSTER_MASTERS, Stack, StackOptions};
use gateway::configuration::ClusterSettings;
use gateway::flow::cluster::{ClusterDecision, ClusterLimiter, bucket_key};
use gateway::resource::RouteId;
use gateway::rules::ClusterRule;

use crate::helpers::*;

/// One connection straight to one node (no redirects followed), with the cluster's password.
async fn node(stack: &Stack, port: u16) -> redis::aio::MultiplexedConnection {
    let url = format!("redis://:{}@127.0.0.1:{port}", stack.info().redis_password);
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The slot ranges each master serves, from its own `CLUSTER NODES` line (`myself`).
async fn slots_by_node(stack: &Stack) -> Vec<(u16, Vec<(u16, u16)>)> {
    let mut owners = Vec::new();
    for &port in &stack.info().redis_cluster_ports {
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut node(stack, port).await)
            .await
            .unwrap();
        let mine = nodes
            .lines()
            .find(|line| line.contains("myself"))
            .expect("a node lists itself");
        let ranges = mine
            .split_whitespace()
            .skip(8)
            .filter(|range| !range.starts_with('['))
            .map(|range| match range.split_once('-') {
                Some((from, to)) => (from.parse().unwrap(), to.parse().unwrap()),
                None => (range.parse().unwrap(), range.parse().unwrap()),
            })
            .collect();
        owners.push((port, ranges));
    }
    owners
}

/// The slot of `key`, as the cluster computes it (`CLUSTER KEYSLOT`).
async fn keyslot(conn: &mut StoreConnection, key: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

/// The port of the master serving `slot`.
fn owner(owners: &[(u16, Vec<(u16, u16)>)], slot: u16) -> u16 {
    owners
        .iter()
        .find(|(_, ranges)| ranges.iter().any(|&(from, to)| (from..=to).contains(&slot)))
        .map(|&(port, _)| port)
        .unwrap_or_else(|| panic!("no master serves slot {slot}"))
}

fn stock_key(activity: i64) -> String {
    ActivityKeys::new(ActivityId::new(activity).unwrap()).stock
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_on_a_redis_cluster_keeps_every_invariant_and_the_reconciler_finds_no_drift() {
    let stack = Stack::start_with(StackOptions {
        storage: BrokerStorage::Sqlite,
        redis_cluster: true,
        ..StackOptions::default()
    })
    .await
    .expect("the stack starts on a Redis Cluster");
    let info = stack.info().clone();
    assert!(info.redis_cluster);
    assert_eq!(info.redis_cluster_ports.len(), REDIS_CLUSTER_MASTERS);
    assert_eq!(
        stack.redis_url().split(',').count(),
        REDIS_CLUSTER_MASTERS,
        "the services are given every node"
    );
    let apps = TestApps::spawn(stack).await.expect("the services start");
    let stores = stores(&apps).await;
    let mut conn = stores.redis.clone();
    assert!(
        matches!(conn, StoreConnection::Cluster(_)),
        "the stores talk to the cluster"
    );

    // Two activities whose keys live on different masters.
    let owners = slots_by_node(&apps.stack).await;
    assert_eq!(owners.len(), REDIS_CLUSTER_MASTERS);
    let first = 1;
    let first_slot = keyslot(&mut conn, &stock_key(first)).await;
    let mut second = first + 1;
    while owner(&owners, keyslot(&mut conn, &stock_key(second)).await) == owner(&owners, first_slot)
    {
        second += 1;
    }
    let second_slot = keyslot(&mut conn, &stock_key(second)).await;
    let masters = [owner(&owners, first_slot), owner(&owners, second_slot)];
    assert_ne!(masters[0], masters[1]);

    let configs: Vec<SaleConfig> = [first, second]
        .into_iter()
        .enumerate()
        .map(|(i, activity)| SaleConfig {
            activity,
            stock: 200,
            requests: 1500,
            concurrency: 50,
            repeat_every: 3,
            first_user: 1 + i as i64 * 100_000,
            retry_ms: 0,
        })
        .collect();
    let admin = apps.admin();
    for config in &configs {
        admin
            .create_activity(config.activity, config.stock)
            .await
            .unwrap();
    }
    let (a, b) = tokio::join!(
        drive_sale(&apps.http, &apps.order.base_url, &configs[0]),
        drive_sale(&apps.http, &apps.order.base_url, &configs[1]),
    );
    for (config, load) in configs.iter().zip([&a, &b]) {
        println!("activity {}: {load}", config.activity);
        assert_eq!(load.transport_errors, 0, "{load}");
        assert_eq!(load.count_5xx(), 0, "{load}");
        assert_eq!(load.accepted.len(), 200, "every item sells: {load}");
        stores
            .wait_for_drain(config.activity, Duration::from_secs(30))
            .await
            .unwrap();
        let report = stores
            .check_invariants(config.activity, config.stock, &load.accepted)
            .await
            .unwrap();
        println!("{report}");
        report.ensure().unwrap();
        assert_eq!(report.ordered, 200);
        assert_eq!(report.unanswered_orders, 0);
    }

    // The sale's keys are where the cluster says: each activity's on its own master, and
    // nowhere else.
    for (activity, slot, master) in [
        (first, first_slot, masters[0]),
        (second, second_slot, masters[1]),
    ] {
        for &port in &info.redis_cluster_ports {
            let keys: i64 = redis::cmd("CLUSTER")
                .arg("COUNTKEYSINSLOT")
                .arg(slot)
                .query_async(&mut node(&apps.stack, port).await)
                .await
                .unwrap();
            if port == master {
                assert!(keys >= 3, "activity {activity}'s keys on {port}: {keys}");
            } else {
                assert_eq!(keys, 0, "activity {activity}'s slot {slot} on {port}");
            }
        }
    }

    // The reconciler reads both activities across the cluster and finds nothing to repair.
    let reports = admin.reconcile().await.unwrap();
    let reports = reports.as_array().expect("one report per activity");
    for activity in [first, second] {
        let report = reports
            .iter()
            .find(|r| r["activityId"].as_str() == Some(activity.to_string().as_str()))
            .unwrap_or_else(|| panic!("no report of activity {activity}: {reports:?}"));
        assert_eq!(report["drift"], 0, "{report}");
        assert_eq!(report["released"], 0, "{report}");
        assert_eq!(report["stuck"], 0, "{report}");
        assert_eq!(report["redisStock"], 0, "{report}");
    }

    // Five units appear in MySQL behind Redis' back: the reconciler writes the repair to the
    // master that holds the activity.
    sqlx::query("UPDATE inventory SET stock = stock + 5 WHERE activity_id = ?")
        .bind(second)
        .execute(stores.db())
        .await
        .unwrap();
    let mut repaired = Vec::new();
    for _ in 0..3 {
        let reports = admin.reconcile().await.unwrap();
        let report = reports
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["activityId"].as_str() == Some(second.to_string().as_str()))
            .cloned()
            .unwrap();
        assert_eq!(report["drift"], 5, "{report}");
        repaired.push(report["repaired"].as_bool().unwrap());
    }
    assert_eq!(repaired, [false, false, true]);
    assert_eq!(stores.redis_stock(second).await.unwrap(), 5);
    let on_master: i64 = redis::cmd("GET")
        .arg(stock_key(second))
        .query_async(&mut node(&apps.stack, masters[1]).await)
        .await
        .unwrap();
    assert_eq!(on_master, 5, "the repair is on the activity's master");
}

/// Requests that passed out of `requests`, alternating between the replicas.
async fn alternate(replicas: &[&ClusterLimiter], rule: &ClusterRule, requests: usize) -> usize {
    let route = RouteId::ALL
        .into_iter()
        .find(|r| r.as_str() == rule.resource)
        .expect("cluster rules name a route");
    let mut passed = 0;
    for i in 0..requests {
        if replicas[i % replicas.len()].acquire(route, rule).await == ClusterDecision::Pass {
            passed += 1;
        }
    }
    passed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateways_cluster_bucket_counts_replicas_and_shares_one_bucket_on_a_redis_cluster() {
    let stack = Stack::start_redis_cluster_only().expect("the Redis Cluster forms");
    let settings = RedisSettings {
        url: Secret::new(stack.redis_url()),
        cluster: true,
        ..RedisSettings::default()
    };
    let replica = || async {
        ClusterLimiter::with_redis(
            &ClusterSettings::default(),
            Redis::connect(&settings).await.unwrap(),
        )
    };
    let (a, b) = (replica().await, replica().await);

    // Each heartbeat registers its replica: both count two.
    a.beat().await;
    b.beat().await;
    a.beat().await;
    assert_eq!(
        (a.replicas(), b.replicas()),
        (2, 2),
        "heartbeats on the cluster"
    );

    // A small bucket run dry by both (the case of `gateway_cluster.rs`): no more pass than the
    // bucket held plus what it earned, and no fewer than that less what two leases hold.
    let small = ClusterRule {
        resource: "inventory".into(),
        replenish_rate: 100,
        burst_capacity: 200,
        requested_tokens: 1,
        lease_ms: 100,
    };
    let started = Instant::now();
    let passed = alternate(&[&a, &b], &small, 1000).await;
    let earned = (started.elapsed().as_secs_f64() * 100.0).ceil() as usize;
    assert!(
        (200 - 2 * 10..=200 + earned).contains(&passed),
        "{passed} passed, the bucket earned {earned} meanwhile"
    );
    assert!(!a.is_in_fallback() && !b.is_in_fallback(), "Redis decided");

    // The one bucket lives in the cluster.
    let mut conn = StoreConnection::open(&stack.redis_url()).await.unwrap();
    let exists: bool = redis::cmd("EXISTS")
        .arg(bucket_key("inventory"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(exists, "the bucket lives in the cluster");
}
