//! order-service's Redis calls in lots (`services/order-service/src/lots.rs`, `acker.rs`,
//! `reserver.rs`) on a private Redis: acknowledgements and reservations that wait together go
//! in one script call, and each caller still gets its own order's answer.

use flash_sale_common::configuration::{RedisSettings, Secret};
use flash_sale_common::domain::{ActivityId, OrderNo, Quantity, UserId};
use flash_sale_common::redis::{
    ActivityKeys, Redis, RedisConnection, ReservationState, ReserveOutcome,
};
use flash_sale_tests::scenario::scripts_run;
use flash_sale_tests::stack::Stack;
use order_service::acker::Acker;
use order_service::reserver::Reserver;

/// A private Redis, the buy path's handle on it, and a plain connection to look with.
async fn redis_only() -> (Stack, Redis, RedisConnection) {
    let stack = Stack::start_redis_only().expect("redis-server starts");
    let settings = RedisSettings {
        url: Secret::new(stack.redis_url()),
        ..RedisSettings::default()
    };
    let redis = Redis::connect(&settings).await.unwrap();
    let conn = RedisConnection::open(&stack.redis_url()).await.unwrap();
    (stack, redis, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledgements_waiting_together_share_one_call_and_each_gets_its_answer() {
    let (_stack, redis, mut conn) = redis_only().await;
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

/// Opens an activity in Redis as the warm-up does: window open, this process's epoch, `stock`.
async fn open_activity(conn: &mut RedisConnection, activity: ActivityId, stock: i64) {
    let keys = ActivityKeys::new(activity);
    let epoch: i64 = redis::cmd("LASTSAVE").query_async(conn).await.unwrap();
    let _: () = redis::cmd("HSET")
        .arg(&keys.meta)
        .arg(&["start_ms", "0", "end_ms", "-1"])
        .arg("total")
        .arg(stock)
        .arg("epoch")
        .arg(epoch)
        .query_async(conn)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&keys.stock)
        .arg(stock)
        .query_async(conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_waiting_together_share_one_call_and_never_oversell() {
    let (_stack, redis, mut conn) = redis_only().await;
    let (scarce, ample, unknown) = (
        ActivityId::new(7).unwrap(),
        ActivityId::new(8).unwrap(),
        ActivityId::new(9).unwrap(),
    );
    open_activity(&mut conn, scarce, 50).await;
    open_activity(&mut conn, ample, 1000).await;

    // 100 buyers for 50 items, 20 of them twice; 60 buyers for 1,000 items; 5 for an activity
    // Redis does not know.
    let mut asks: Vec<(ActivityId, i64)> = (1..=100).map(|u| (scarce, u)).collect();
    asks.extend((1..=20).map(|u| (scarce, u)));
    asks.extend((1..=60).map(|u| (ample, u)));
    asks.extend((1..=5).map(|u| (unknown, u)));

    let reserver = Reserver::start(redis);
    let one = Quantity::new(1).unwrap();
    let calls_before = scripts_run(&mut conn).await.unwrap();
    let tasks = asks.iter().map(|&(activity, user)| {
        let reserver = reserver.clone();
        let user = UserId::new(user).unwrap();
        let order = OrderNo::generate(activity);
        tokio::spawn(async move {
            let outcome = reserver.reserve(activity, user, one, &order).await;
            (order, outcome.unwrap())
        })
    });
    let answers: Vec<(OrderNo, ReserveOutcome)> =
        futures::future::join_all(tasks.collect::<Vec<_>>())
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
    let calls = scripts_run(&mut conn).await.unwrap() - calls_before;

    let mut reserved = std::collections::HashMap::<ActivityId, Vec<(i64, &OrderNo)>>::new();
    for ((activity, user), (order, outcome)) in asks.iter().zip(&answers) {
        match outcome {
            ReserveOutcome::Reserved { .. } => {
                reserved.entry(*activity).or_default().push((*user, order));
            }
            ReserveOutcome::SoldOut { stock_left } => {
                assert_eq!((*activity, *stock_left), (scarce, 0), "{order}");
            }
            ReserveOutcome::AlreadyPurchased => assert_eq!(*activity, scarce, "{order}"),
            ReserveOutcome::UnknownActivity => assert_eq!(*activity, unknown, "{order}"),
            other => panic!("{order}: {other:?}"),
        }
    }
    for (activity, sold, stock_left) in [(scarce, 50, 0), (ample, 60, 940)] {
        let keys = ActivityKeys::new(activity);
        let mine = reserved.remove(&activity).unwrap_or_default();
        assert_eq!(
            mine.len(),
            sold,
            "reservations told yes in activity {activity}"
        );
        let mut users: Vec<i64> = mine.iter().map(|(u, _)| *u).collect();
        users.sort_unstable();
        users.dedup();
        assert_eq!(users.len(), sold, "no buyer holds two reservations");
        let stock: i64 = redis::cmd("GET")
            .arg(&keys.stock)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(stock, stock_left, "the stock of activity {activity}");
        let held: i64 = redis::cmd("HLEN")
            .arg(&keys.resv)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(
            held, sold as i64,
            "Redis holds exactly the reservations told yes"
        );
        for (user, order) in mine {
            let record: String = redis::cmd("HGET")
                .arg(&keys.resv)
                .arg(order.as_str())
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(
                record.starts_with(&format!("R|{user}|1|")),
                "{order}: {record}"
            );
        }
    }
    assert!(
        reserved.is_empty(),
        "nothing reserved in an unknown activity"
    );
    // At least one call per activity; far fewer than one per reservation (185 asked).
    assert!(
        (3..=60).contains(&calls),
        "{calls} script calls for {} reservations",
        asks.len()
    );
}

/// Reads a count (`HLEN`, `SCARD`, `ZCARD`, `GET`) of one key.
async fn count(conn: &mut RedisConnection, command: &str, key: &str) -> i64 {
    redis::cmd(command)
        .arg(key)
        .query_async(conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn one_call_reserves_moves_and_settles_thousands_of_orders_of_one_key() {
    // The scripts write a lot with one command per key, in slices of 4,000 values
    // (`services/common/lua/bulk.lua`): 9,000 orders cross them.
    let (_stack, redis, mut conn) = redis_only().await;
    let activity = ActivityId::new(11).unwrap();
    let keys = ActivityKeys::new(activity);
    open_activity(&mut conn, activity, 10_000).await;
    let one = Quantity::new(1).unwrap();
    let mut lot: Vec<(UserId, Quantity, OrderNo)> = (1..=9_000)
        .map(|u| (UserId::new(u).unwrap(), one, OrderNo::generate(activity)))
        .collect();
    lot.push((UserId::new(5).unwrap(), one, OrderNo::generate(activity)));

    let outcomes = redis.reserve_lot(activity, &lot).await.unwrap();
    for (i, outcome) in outcomes[..9_000].iter().enumerate() {
        let left = 10_000 - 1 - i as i64;
        assert!(
            matches!(outcome, ReserveOutcome::Reserved { stock_left } if *stock_left == left),
            "order {i}: {outcome:?}"
        );
    }
    assert!(
        matches!(outcomes[9_000], ReserveOutcome::AlreadyPurchased),
        "a buyer twice in the lot: {:?}",
        outcomes[9_000]
    );
    assert_eq!(count(&mut conn, "GET", &keys.stock).await, 1_000);
    assert_eq!(count(&mut conn, "SCARD", &keys.users).await, 9_000);
    assert_eq!(count(&mut conn, "HLEN", &keys.resv).await, 9_000);
    assert_eq!(count(&mut conn, "ZCARD", &keys.resv_ts).await, 9_000);

    // Every reservation, the first one named twice and one order Redis never saw, R -> A.
    let reserved: Vec<&OrderNo> = lot[..9_000].iter().map(|(_, _, no)| no).collect();
    let unknown = OrderNo::generate(activity);
    let mut named = reserved.clone();
    named.push(reserved[0]);
    named.push(&unknown);
    let codes = redis
        .transition(
            activity,
            &named,
            &[ReservationState::Reserved],
            ReservationState::Acked,
        )
        .await
        .unwrap();
    assert!(codes[..9_000].iter().all(|&c| c == 1), "all moved");
    assert_eq!(codes[9_000..], [-1, 0], "named twice: A by then; unknown");
    let records: Vec<String> = redis::cmd("HVALS")
        .arg(&keys.resv)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        records.iter().all(|r| r.starts_with("A|")),
        "all acknowledged"
    );

    // A released one leaves a tombstone that the next move reports.
    assert_eq!(
        redis
            .release(reserved[1], &[ReservationState::Acked])
            .await
            .unwrap(),
        1
    );
    let codes = redis
        .transition(
            activity,
            &reserved,
            &[ReservationState::Acked],
            ReservationState::Claimed,
        )
        .await
        .unwrap();
    assert_eq!(codes[1], -2, "released");
    assert_eq!(codes.iter().filter(|&&c| c == 1).count(), 8_999);

    assert_eq!(redis.settle(activity, &reserved).await.unwrap(), 8_999);
    assert_eq!(count(&mut conn, "HLEN", &keys.resv).await, 0);
    assert_eq!(count(&mut conn, "ZCARD", &keys.resv_ts).await, 0);
    assert_eq!(
        count(&mut conn, "SCARD", &keys.users).await,
        8_999,
        "settled buyers stay in the users set; the released one left it"
    );
}
