//! Orders published together share a broker record (`services/order-service/src/publisher.rs`),
//! on a private Redis, MariaDB and nisshi: the records on the topic hold every accepted order
//! exactly once, in fewer records than orders, and the consumer turns them into those orders.
//! With `kafka.lot_max_orders = 1` every record is one bare order event, the shape an
//! order-service from before lots reads.

use std::collections::BTreeMap;
use std::time::Duration;

use flash_sale_common::domain::{OrderEvent, decode_lot};
use flash_sale_tests::apps::{TestApps, http_client, order_settings, spawn_order_service};
use flash_sale_tests::apps::{inventory_settings, spawn_inventory_service};
use flash_sale_tests::scenario::{SaleConfig, drive_sale};
use flash_sale_tests::stack::{BrokerStorage, Stack};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use crate::helpers::{drain_with, stores};

/// Every record of `topic`, as payloads, read from the start by a group of its own.
fn records(brokers: &str, topic: &str) -> Vec<Vec<u8>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "lots-test-reader")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut high = BTreeMap::new();
    let mut list = TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        let (_, hw) = consumer
            .fetch_watermarks(topic, partition.id(), Duration::from_secs(10))
            .unwrap();
        high.insert(partition.id(), hw);
        list.add_partition_offset(topic, partition.id(), Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&list).unwrap();
    let total: i64 = high.values().sum();
    let mut payloads = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (payloads.len() as i64) < total {
        assert!(
            std::time::Instant::now() < deadline,
            "read {} of {total} records",
            payloads.len()
        );
        if let Some(m) = consumer.poll(Duration::from_millis(200)) {
            let m = m.unwrap();
            payloads.push(m.payload().unwrap_or_default().to_vec());
        }
    }
    payloads
}

/// Sells `stock` to as many buyers, 50 at a time, with order-service's consumer off; returns
/// the apps, the accepted order numbers and the records on the topic.
async fn sell_with_consumer_off(
    lot_max_orders: usize,
    stock: i64,
) -> (
    TestApps,
    order_service::Settings,
    Vec<(String, i64)>,
    Vec<Vec<u8>>,
) {
    let stack = Stack::start(BrokerStorage::Sqlite).await.unwrap();
    let mut settings = order_settings(&stack);
    settings.consumer.enabled = false;
    settings.kafka.lot_max_orders = lot_max_orders;
    let order = spawn_order_service(settings.clone()).await.unwrap();
    let inventory = spawn_inventory_service(inventory_settings(&stack))
        .await
        .unwrap();
    let apps = TestApps {
        order,
        inventory,
        http: http_client(),
        stack,
    };
    apps.admin().create_activity(1, stock).await.unwrap();
    let config = SaleConfig {
        activity: 1,
        stock,
        requests: stock as usize,
        concurrency: 50,
        repeat_every: 0,
        first_user: 1,
        retry_ms: 0,
    };
    let load = drive_sale(&apps.http, &apps.order.base_url, &config).await;
    assert_eq!(load.accepted.len(), stock as usize, "{load}");
    let records = records(&settings.kafka.brokers, &settings.kafka.topic);
    (apps, settings, load.accepted.clone(), records)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_published_together_share_a_record_and_each_becomes_one_order() {
    let (apps, settings, accepted, records) = sell_with_consumer_off(256, 400).await;

    let mut on_topic: BTreeMap<String, usize> = BTreeMap::new();
    let mut largest = 0;
    for payload in &records {
        let events: Vec<OrderEvent> = decode_lot(payload).expect("every record is a lot");
        largest = largest.max(events.len());
        for event in events {
            *on_topic.entry(event.order_no.to_string()).or_default() += 1;
        }
    }
    let mut want: Vec<String> = accepted.iter().map(|(no, _)| no.clone()).collect();
    want.sort();
    assert_eq!(
        on_topic.keys().cloned().collect::<Vec<_>>(),
        want,
        "the records hold exactly the accepted orders"
    );
    assert!(
        on_topic.values().all(|&n| n == 1),
        "no order in two records"
    );
    // 50 buyers at a time within one 10 ms linger: lots of many, far fewer records than orders.
    assert!(
        records.len() * 3 <= accepted.len() && largest > 1,
        "{} records for {} orders, the largest lot {largest}",
        records.len(),
        accepted.len()
    );

    // The consumer turns the lots into exactly those orders.
    let db = flash_sale_common::db::pool(&settings.database).unwrap();
    let redis = flash_sale_common::redis::Redis::connect(&settings.redis)
        .await
        .unwrap();
    let consumer = order_service::consumer::OrderConsumer::new(
        &settings.kafka,
        settings.consumer.clone(),
        db,
        redis,
    )
    .unwrap();
    let stores = stores(&apps).await;
    drain_with(consumer, &stores, 1).await;
    let report = stores.check_invariants(1, 400, &accepted).await.unwrap();
    println!("{report}");
    report.ensure().unwrap();
    assert_eq!(report.orders, 400, "each accepted order exactly once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lots_of_one_every_record_is_a_bare_order_event() {
    let (_apps, _settings, accepted, records) = sell_with_consumer_off(1, 60).await;
    assert_eq!(records.len(), accepted.len(), "one record per order");
    for payload in &records {
        // What an order-service from before lots decodes.
        let event: OrderEvent = serde_json::from_slice(payload).expect("a bare order event");
        let no = event.order_no.to_string();
        assert!(
            accepted.iter().any(|(a, _)| *a == no),
            "{no} was not accepted"
        );
    }
}
