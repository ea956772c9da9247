//! The rule file: reloaded when it changes, refused when bad (the last good rules stay).

use std::sync::Arc;
use std::time::Duration;

use flash_sale_common::telemetry;
use gateway::flow::qps::QpsDecision;
use gateway::flow::{FlowLimiter, ReloadOutcome, RulesStore};
use gateway::resource::{ResourceKey, RouteId};
use gateway::rules::Rules;
use tokio::time::Instant;

use crate::helpers::{metric, write_rules};

const TEN_QPS: &str = "[[flow]]\nresource = \"flash-sale-order\"\ncount = 10\n";

fn qps_count(store: &RulesStore) -> Vec<f64> {
    store
        .current()
        .flow(ResourceKey::Route(RouteId::FlashSale))
        .iter()
        .map(|l| l.rule().count)
        .collect()
}

fn failures() -> f64 {
    let text = telemetry::render_metrics(&telemetry::metrics_handle());
    metric(&text, "gateway_rules_reload_failures_total").unwrap_or(0.0)
}

/// Writes a new version of the file; the sleep makes sure its modification time differs on
/// file systems with coarse timestamps (it is not a timing assertion).
async fn rewrite(path: &std::path::Path, text: &str) {
    tokio::time::sleep(Duration::from_millis(20)).await;
    write_rules(path, text);
}

#[tokio::test]
async fn a_changed_file_is_reloaded_and_a_bad_one_leaves_the_last_good_rules_in_force() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    write_rules(&path, TEN_QPS);
    let store = RulesStore::load(Some(&path)).unwrap();
    assert_eq!(qps_count(&store), [10.0]);
    assert_eq!(store.check().await, ReloadOutcome::Unchanged);

    rewrite(&path, &TEN_QPS.replace("10", "20")).await;
    assert_eq!(store.check().await, ReloadOutcome::Reloaded);
    assert_eq!(qps_count(&store), [20.0]);

    // Not TOML at all; then TOML with a bad value; then an unknown field; then gone.
    for bad in [
        "[[flow]\nresource = ",
        "[[flow]]\nresource = \"flash-sale-order\"\ncount = -5\n",
        "[[flow]]\nresource = \"flash-sale-order\"\ncount = 5\nbehaviour = \"reject\"\n",
    ] {
        let before = failures();
        rewrite(&path, bad).await;
        let ReloadOutcome::Rejected(problem) = store.check().await else {
            panic!("{bad:?} was accepted");
        };
        assert!(!problem.is_empty());
        assert_eq!(qps_count(&store), [20.0], "the last good rules stay");
        assert!(
            failures() > before,
            "gateway_rules_reload_failures_total counts it"
        );
        // The same bad version is reported once, not at every poll.
        assert_eq!(store.check().await, ReloadOutcome::Unchanged);
    }
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(store.check().await, ReloadOutcome::Rejected(_)));
    assert_eq!(qps_count(&store), [20.0]);

    // Fixed: in force again.
    rewrite(&path, &TEN_QPS.replace("10", "30")).await;
    assert_eq!(store.check().await, ReloadOutcome::Reloaded);
    assert_eq!(qps_count(&store), [30.0]);
}

#[tokio::test]
async fn a_bad_file_at_start_up_is_an_error_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rules.toml");
    write_rules(
        &path,
        "[[cluster]]\nresource = \"flash-sale-order\"\nreplenish_rate = 0\nburst_capacity = 1\n",
    );
    let error = RulesStore::load(Some(&path)).unwrap_err().to_string();
    assert!(error.contains("replenish_rate must be > 0"), "{error}");
    let error = RulesStore::load(Some(&dir.path().join("missing.toml"))).unwrap_err();
    assert!(format!("{error:#}").contains("missing.toml"), "{error:#}");
}

#[tokio::test(start_paused = true)]
async fn an_unchanged_rule_keeps_its_state_across_a_reload() {
    let store = Arc::new(RulesStore::fixed(Rules::from_toml(TEN_QPS).unwrap()));
    let limiter = |store: &RulesStore| {
        Arc::clone(&store.current().flow(ResourceKey::Route(RouteId::FlashSale))[0])
    };
    let spend = |l: &FlowLimiter| match l {
        FlowLimiter::Qps { limiter, .. } => limiter.try_acquire(Instant::now()),
        FlowLimiter::Concurrency { .. } => unreachable!(),
    };
    let before = limiter(&store);
    for _ in 0..10 {
        assert_eq!(spend(&before), QpsDecision::Pass);
    }
    // Another rule is added: the QPS rule keeps its window, its budget is still spent.
    store
        .replace(
            Rules::from_toml(&format!(
                "{TEN_QPS}[[flow]]\nresource = \"activity:1\"\ncount = 5\n"
            ))
            .unwrap(),
        )
        .unwrap();
    let after = limiter(&store);
    assert!(Arc::ptr_eq(&before, &after));
    assert!(matches!(spend(&after), QpsDecision::Block(_)));
    // The rule itself changes: a fresh limiter.
    store
        .replace(Rules::from_toml(&TEN_QPS.replace("10", "11")).unwrap())
        .unwrap();
    assert_eq!(spend(&limiter(&store)), QpsDecision::Pass);
}
