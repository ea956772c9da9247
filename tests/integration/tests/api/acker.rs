//! order-service's grouped acknowledgements (`services/order-service/src/acker.rs`) on a
//! private Redis: acknowledgements that wait together go in one script call, and each caller
//! still gets its own order's answer.

use flash_sale_common::configuration::{RedisSettings, Secret};
use flash_sale_common::domain::{ActivityId, OrderNo};
use flash_sale_common::redis::{ActivityKeys, Redis, RedisConnection};
use flash_sale_tests::scenario::scripts_run;
use flash_sale_tests::stack::Stack;
use order_service::acker::Acker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_waiting_together_share_one_call_and_each_gets_its_answer() {
    let stack = Stack::start_redis_only().expect("redis-server starts");
    let settings = RedisSettings {
        url: Secret::new(stack.redis_url()),
        ..RedisSettings::default()
    };
    let redis = Redis::connect(&settings).await.unwrap();
    let mut conn = RedisConnection::open(&stack.redis_url()).await.unwrap();
    let (a, b) = (ActivityId::new(5).unwrap(), ActivityId::new(6).unwrap());

    // 300 reservations over two activities, and per activity one order Redis never saw and
    // one already acknowledged.
    let mut expected = Vec::new();
    for (activity, n) in [(a, 200), (b, 100)] {
        let resv = ActivityKeys::new(activity).resv;
        for user in 1..=n {
            let order = OrderNo::generate(activity);
            let _: () = redis::cmd("HSET")
                .arg(&resv)
                .arg(order.as_str())
                .arg(format!("R|{user}|1|0"))
                .query_async(&mut conn)
                .await
                .unwrap();
            expected.push((activity, order, 1));
        }
        let acked = OrderNo::generate(activity);
        let _: () = redis::cmd("HSET")
            .arg(&resv)
            .arg(acked.as_str())
            .arg("A|999|1|0")
            .query_async(&mut conn)
            .await
            .unwrap();
        expected.push((activity, acked, -1));
        expected.push((activity, OrderNo::generate(activity), 0));
    }

    let acker = Acker::start(redis);
    let calls_before = scripts_run(&mut conn).await.unwrap();
    let acks = expected.iter().map(|(_, order, _)| {
        let acker = acker.clone();
        let order = order.clone();
        tokio::spawn(async move { acker.ack(&order).await })
    });
    let answers = futures::future::join_all(acks.collect::<Vec<_>>()).await;
    let calls = scripts_run(&mut conn).await.unwrap() - calls_before;

    for ((activity, order, want), answer) in expected.iter().zip(answers) {
        let code = answer.unwrap().unwrap();
        assert_eq!(code, *want, "the answer for {order}");
        let record: Option<String> = redis::cmd("HGET")
            .arg(ActivityKeys::new(*activity).resv)
            .arg(order.as_str())
            .query_async(&mut conn)
            .await
            .unwrap();
        match want {
            0 => assert_eq!(record, None, "an unknown order stays unknown"),
            _ => assert!(record.unwrap().starts_with('A'), "{order} is acknowledged"),
        }
    }
    // At least one call per activity; far fewer than one per order (304 acknowledgements).
    assert!(
        (2..=60).contains(&calls),
        "{calls} script calls for {} acknowledgements",
        expected.len()
    );
}
