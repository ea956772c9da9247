//! An order's whole life on real Redis, MariaDB and the broker: pay, cancel, expire, the stock
//! that sells again, the races between them, and a sweeper killed between MySQL and Redis.

use std::time::{Duration, Instant};

use flash_sale_common::api;
use flash_sale_common::error::{ErrorBody, ErrorCode};
use flash_sale_tests::apps::{self, PAYMENT_SECRET, TestApps};
use flash_sale_tests::payments::{Confirmation, PaymentSimulator};
use flash_sale_tests::scenario::Stores;
use flash_sale_tests::stack::{BrokerStorage, Server, Stack};
use serde_json::{Value, json};

use super::helpers::{ServiceProcess, ServiceSettings, create_order, spawn_apps, stores};

const PRICE: i64 = 250;

fn simulator(apps: &TestApps) -> PaymentSimulator {
    PaymentSimulator::new(apps.http.clone(), &apps.order.base_url, PAYMENT_SECRET)
}

/// Creates an activity of `stock` items at [`PRICE`] with `pay_secs` to pay.
async fn sale(apps: &TestApps, activity: i64, stock: i64, pay_secs: i64) {
    apps.admin()
        .create_activity_with(
            activity,
            stock,
            json!({"priceCents": PRICE, "payTimeoutSecs": pay_secs}),
        )
        .await
        .expect("the activity is created");
}

/// Buys one item for each user; every one must be accepted. Returns (order number, user).
async fn buy_all(apps: &TestApps, activity: i64, users: &[i64]) -> Vec<(String, i64)> {
    let mut orders = Vec::new();
    for &user in users {
        let (status, body) = create_order(apps, user, activity).await;
        assert_eq!(status, 202, "user {user}: {body}");
        orders.push((body["orderNo"].as_str().unwrap().to_owned(), user));
    }
    orders
}

async fn drained(stores: &Stores, activity: i64) {
    stores
        .wait_for_drain(activity, Duration::from_secs(30))
        .await
        .expect("the queue drains");
}

async fn order(apps: &TestApps, order_no: &str) -> (u16, Value) {
    let res = apps
        .http
        .get(format!(
            "{}{}",
            apps.order.base_url,
            api::order::one(order_no)
        ))
        .send()
        .await
        .unwrap();
    (
        res.status().as_u16(),
        res.json().await.unwrap_or(Value::Null),
    )
}

async fn cancel(apps: &TestApps, order_no: &str, user: i64) -> (u16, Value) {
    let res = apps
        .http
        .post(format!(
            "{}{}",
            apps.order.base_url,
            api::order::cancel(order_no)
        ))
        .header(api::USER_HEADER, user.to_string())
        .send()
        .await
        .unwrap();
    (
        res.status().as_u16(),
        res.json().await.unwrap_or(Value::Null),
    )
}

fn code(body: &Value) -> Option<ErrorCode> {
    ErrorBody::code_of(body.to_string().as_bytes())
}

async fn status_in_mysql(stores: &Stores, order_no: &str) -> i8 {
    let (status,): (i8,) = sqlx::query_as("SELECT status FROM orders WHERE order_no = ?")
        .bind(order_no)
        .fetch_one(stores.db())
        .await
        .unwrap();
    status
}

/// Waits until the order has reached `status` (by name) or panics after `timeout`.
async fn wait_status(apps: &TestApps, order_no: &str, status: &str, timeout: Duration) -> Value {
    let started = Instant::now();
    loop {
        let (_, body) = order(apps, order_no).await;
        if body["status"] == status {
            return body;
        }
        assert!(
            started.elapsed() < timeout,
            "{order_no} did not become {status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn paid_cancelled_and_expired_orders_and_the_stock_that_sells_again() {
    let apps = spawn_apps().await;
    let stores = stores(&apps).await;
    let pay = simulator(&apps);
    sale(&apps, 151, 3, 3).await;
    let orders = buy_all(&apps, 151, &[1, 2, 3]).await;
    drained(&stores, 151).await;
    let [(paid, _), (cancelled, _), (expires, _)] = orders.as_slice() else {
        unreachable!()
    };

    // CREATED, with what is owed and until when
    let (status, view) = order(&apps, paid).await;
    assert_eq!(status, 200);
    assert_eq!(view["status"], "CREATED", "{view}");
    assert_eq!(view["amountCents"], PRICE);
    assert!(view["payDeadline"].is_string(), "{view}");

    // paid once; the same callback again gives the same answer and changes nothing
    let first = pay.pay(paid, PRICE, 1, "pay-151-1").await.unwrap();
    let Confirmation::Paid(first) = first else {
        panic!("the first confirmation pays: {first:?}")
    };
    assert_eq!(first["status"], "PAID");
    let again = pay.pay(paid, PRICE, 1, "pay-151-1").await.unwrap();
    assert_eq!(
        again,
        Confirmation::Paid(first.clone()),
        "a repeated callback"
    );
    // another payment for a paid order is refused, to be refunded
    let other = pay.pay(paid, PRICE, 1, "pay-151-other").await.unwrap();
    assert_eq!(other, Confirmation::Refund(ErrorCode::OrderPaid));
    // a paid order cannot be cancelled
    let (status, body) = cancel(&apps, paid, 1).await;
    assert_eq!(
        (status, code(&body)),
        (409, Some(ErrorCode::OrderPaid)),
        "{body}"
    );

    // someone else's order is not found, for cancelling and for reading behind the gateway
    let (status, body) = cancel(&apps, cancelled, 1).await;
    assert_eq!(
        (status, code(&body)),
        (404, Some(ErrorCode::OrderNotFound)),
        "{body}"
    );
    // the buyer cancels; twice answers the same
    let (status, body) = cancel(&apps, cancelled, 2).await;
    assert_eq!(
        (status, &body["status"]),
        (200, &json!("CANCELLED")),
        "{body}"
    );
    let (status, again) = cancel(&apps, cancelled, 2).await;
    assert_eq!((status, &again), (200, &body));
    // a payment after the stock went back is refused, to be refunded
    let late = pay.pay(cancelled, PRICE, 1, "pay-151-2").await.unwrap();
    assert_eq!(late, Confirmation::Refund(ErrorCode::OrderExpired));

    // nobody pays the third: the sweeper expires it, and its payment is refused
    wait_status(&apps, expires, "EXPIRED", Duration::from_secs(15)).await;
    let late = pay.pay(expires, PRICE, 1, "pay-151-3").await.unwrap();
    assert_eq!(late, Confirmation::Refund(ErrorCode::OrderExpired));
    let (status, body) = cancel(&apps, expires, 3).await;
    assert_eq!(
        (status, code(&body)),
        (409, Some(ErrorCode::OrderExpired)),
        "{body}"
    );
    assert_eq!(
        status_in_mysql(&stores, paid).await,
        1,
        "the paid order stays paid"
    );

    // two items are back on sale: the buyer who cancelled may buy again, and one newcomer;
    // then it is sold out (past the pods' sold-out TTL of 1 s, which does not hold them back)
    drained(&stores, 151).await;
    assert_eq!(stores.redis_stock(151).await.unwrap(), 2);
    let second = buy_all(&apps, 151, &[2, 4]).await;
    let (status, body) = create_order(&apps, 5, 151).await;
    assert_eq!(
        (status, code(&body)),
        (409, Some(ErrorCode::SoldOut)),
        "{body}"
    );
    drained(&stores, 151).await;

    // a buyer lists their own orders, newest first
    let res = apps
        .http
        .get(format!("{}{}", apps.order.base_url, api::order::MINE))
        .header(api::USER_HEADER, "2")
        .send()
        .await
        .unwrap();
    let mine: Value = res.json().await.unwrap();
    let states: Vec<&str> = mine["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["status"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["CREATED", "CANCELLED"], "{mine}");

    let accepted: Vec<(String, i64)> = orders.iter().chain(&second).cloned().collect();
    let report = stores.check_invariants(151, 3, &accepted).await.unwrap();
    report.ensure().unwrap();
    assert_eq!(
        (report.paid, report.cancelled, report.expired),
        (1, 1, 1),
        "{report}"
    );
    assert_eq!(report.returns, 2, "{report}");
}

#[tokio::test]
async fn bad_callbacks_get_a_clear_error_and_change_nothing() {
    let apps = spawn_apps().await;
    let stores = stores(&apps).await;
    let pay = simulator(&apps);
    sale(&apps, 152, 2, 900).await;
    let orders = buy_all(&apps, 152, &[1, 2]).await;
    drained(&stores, 152).await;
    let (no, _) = &orders[0];
    let now = chrono::Utc::now().timestamp();
    let body = |amount: i64, quantity: u32, payment: &str, order: &str| {
        json!({"paymentId": payment, "orderNo": order, "amountCents": amount, "quantity": quantity})
            .to_string()
            .into_bytes()
    };
    let good = body(PRICE, 1, "pay-152", no);
    let refused = |status, code| Confirmation::Refused(status, Some(code));

    let cases: Vec<(&str, Vec<u8>, i64, String, Confirmation)> = vec![
        (
            "no signature",
            good.clone(),
            now,
            String::new(),
            refused(401, ErrorCode::BadSignature),
        ),
        (
            "signed with another key",
            good.clone(),
            now,
            PaymentSimulator::new(apps.http.clone(), "http://x", "another-key").sign(now, &good),
            refused(401, ErrorCode::BadSignature),
        ),
        (
            "body changed after signing",
            body(1, 1, "pay-152", no),
            now,
            pay.sign(now, &good),
            refused(401, ErrorCode::BadSignature),
        ),
        (
            "ten minutes old",
            good.clone(),
            now - 600,
            pay.sign(now - 600, &good),
            refused(401, ErrorCode::StaleCallback),
        ),
        (
            "wrong amount",
            body(PRICE - 1, 1, "pay-152", no),
            now,
            pay.sign(now, &body(PRICE - 1, 1, "pay-152", no)),
            refused(422, ErrorCode::PaymentMismatch),
        ),
        (
            "wrong quantity",
            body(PRICE, 2, "pay-152", no),
            now,
            pay.sign(now, &body(PRICE, 2, "pay-152", no)),
            refused(422, ErrorCode::PaymentMismatch),
        ),
        (
            "unknown order",
            body(PRICE, 1, "pay-152", "152-0123456789abcdef0123456789abcdef"),
            now,
            pay.sign(
                now,
                &body(PRICE, 1, "pay-152", "152-0123456789abcdef0123456789abcdef"),
            ),
            refused(404, ErrorCode::OrderNotFound),
        ),
        (
            "not JSON",
            b"{\"paymentId\":".to_vec(),
            now,
            pay.sign(now, b"{\"paymentId\":"),
            refused(400, ErrorCode::MalformedJson),
        ),
        (
            "an unknown field",
            br#"{"paymentId":"p","orderNo":"x","amountCents":1,"quantity":1,"paid":true}"#.to_vec(),
            now,
            pay.sign(
                now,
                br#"{"paymentId":"p","orderNo":"x","amountCents":1,"quantity":1,"paid":true}"#,
            ),
            refused(400, ErrorCode::InvalidArgument),
        ),
        (
            "a key twice",
            br#"{"paymentId":"p","paymentId":"q","orderNo":"x","amountCents":1,"quantity":1}"#
                .to_vec(),
            now,
            pay.sign(
                now,
                br#"{"paymentId":"p","paymentId":"q","orderNo":"x","amountCents":1,"quantity":1}"#,
            ),
            refused(400, ErrorCode::InvalidArgument),
        ),
    ];
    for (case, body, timestamp, signature, expected) in cases {
        let got = pay.send(&body, timestamp, &signature).await.unwrap();
        assert_eq!(got, expected, "{case}");
        assert_eq!(
            status_in_mysql(&stores, no).await,
            0,
            "{case} changed the order"
        );
    }

    // a payment id that paid one order cannot pay another
    let paid = pay.pay(no, PRICE, 1, "pay-152").await.unwrap();
    assert!(matches!(paid, Confirmation::Paid(_)), "{paid:?}");
    let (other, _) = &orders[1];
    let reused = pay.pay(other, PRICE, 1, "pay-152").await.unwrap();
    assert_eq!(reused, refused(422, ErrorCode::PaymentMismatch));
    assert_eq!(status_in_mysql(&stores, other).await, 0);

    let report = stores.check_invariants(152, 2, &orders).await.unwrap();
    report.ensure().unwrap();
    assert_eq!(report.paid, 1, "{report}");
}

/// Payment and expiry at the same instant, many times: each order ends either paid, with the
/// payment answered 200 and no stock returned, or expired, with the payment refused and its
/// stock returned once. Never both.
#[tokio::test]
async fn a_payment_racing_the_expiry_either_pays_or_is_refunded_never_both() {
    let apps = spawn_apps().await;
    let stores = stores(&apps).await;
    let pay = simulator(&apps);
    const N: i64 = 40;
    sale(&apps, 153, N, 2).await;
    let users: Vec<i64> = (1..=N).collect();
    let orders = buy_all(&apps, 153, &users).await;
    drained(&stores, 153).await;

    // Fire each payment around its order's deadline (as MySQL stored it), while the service's
    // sweeper and this test's own expire orders as they come due.
    let deadline = |view: &Value| {
        chrono::DateTime::parse_from_rfc3339(view["payDeadline"].as_str().unwrap())
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    let mut payments = Vec::new();
    for (i, (no, _)) in orders.iter().enumerate() {
        let (_, view) = order(&apps, no).await;
        // a third well before the deadline (they pay), a third well after (refunded), a third
        // at the very millisecond the deadline passes (the race)
        let offset_ms = [-400, 0, 400][i % 3];
        let at = deadline(&view) + chrono::Duration::milliseconds(offset_ms);
        let (pay, no) = (pay.clone(), no.clone());
        payments.push(tokio::spawn(async move {
            let wait = (at - chrono::Utc::now()).to_std().unwrap_or_default();
            tokio::time::sleep(wait).await;
            let answer = pay.pay(&no, PRICE, 1, &format!("race-{no}")).await.unwrap();
            (no, answer)
        }));
    }
    // This test's own sweeper, on its own connections, expiring orders as they come due.
    let db = stores.db().clone();
    let redis = flash_sale_common::redis::Redis::connect(&apps::order_settings(&apps.stack).redis)
        .await
        .unwrap();
    let sweeping = tokio::spawn(async move {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(6) {
            order_service::lifecycle::expire_due(&db, &redis, 10)
                .await
                .unwrap();
        }
    });
    let mut paid = 0;
    for payment in payments {
        let (no, answer) = payment.await.unwrap();
        let status = status_in_mysql(&stores, &no).await;
        match answer {
            Confirmation::Paid(view) => {
                assert_eq!((status, &view["status"]), (1, &json!("PAID")), "{no}");
                paid += 1;
            }
            Confirmation::Refund(ErrorCode::OrderExpired) => {
                assert_eq!(status, 3, "{no} refunded but not expired");
            }
            other => panic!("{no}: {other:?}"),
        }
    }
    sweeping.await.unwrap();
    drained(&stores, 153).await;
    // Every unpaid order expires in the end; the invariants count the returns.
    let started = Instant::now();
    while stores.order_count_in_status(153, 0).await.unwrap() > 0 {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "orders left unexpired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drained(&stores, 153).await;
    let report = stores.check_invariants(153, N, &orders).await.unwrap();
    report.ensure().unwrap();
    assert_eq!(report.paid, paid, "{report}");
    assert_eq!(report.expired as i64, N - paid as i64, "{report}");
    // Both sides won some: the race was a race (the deadline sits between the payments' times).
    assert!(
        paid > 0 && (paid as i64) < N,
        "paid {paid} of {N}: {report}"
    );
}

/// A buyer cancelling while the provider confirms a payment: one wins, the other is told.
#[tokio::test]
async fn cancel_racing_payment_exactly_one_wins() {
    let apps = spawn_apps().await;
    let stores = stores(&apps).await;
    let pay = simulator(&apps);
    const N: i64 = 30;
    sale(&apps, 154, N, 900).await;
    let users: Vec<i64> = (1..=N).collect();
    let orders = buy_all(&apps, 154, &users).await;
    drained(&stores, 154).await;
    let mut races = Vec::new();
    for (no, user) in &orders {
        let (pay, no, user) = (pay.clone(), no.clone(), *user);
        let http = apps.http.clone();
        let url = format!("{}{}", apps.order.base_url, api::order::cancel(&no));
        races.push(tokio::spawn(async move {
            let cancelling = http
                .post(url)
                .header(api::USER_HEADER, user.to_string())
                .send();
            let payment_id = format!("c-{no}");
            let paying = pay.pay(&no, PRICE, 1, &payment_id);
            let (cancelled, paid) = tokio::join!(cancelling, paying);
            let cancelled = cancelled.unwrap();
            let status = cancelled.status().as_u16();
            let body: Value = cancelled.json().await.unwrap();
            (no, status, body, paid.unwrap())
        }));
    }
    let (mut paid_won, mut cancel_won) = (0, 0);
    for race in races {
        let (no, status, body, paid) = race.await.unwrap();
        let in_mysql = status_in_mysql(&stores, &no).await;
        match (status, paid) {
            (200, Confirmation::Refund(ErrorCode::OrderExpired)) => {
                assert_eq!(in_mysql, 2, "{no}");
                cancel_won += 1;
            }
            (409, Confirmation::Paid(_)) => {
                assert_eq!(code(&body), Some(ErrorCode::OrderPaid), "{no}: {body}");
                assert_eq!(in_mysql, 1, "{no}");
                paid_won += 1;
            }
            (status, paid) => panic!("{no}: cancel {status} {body}, payment {paid:?}"),
        }
    }
    drained(&stores, 154).await;
    let report = stores.check_invariants(154, N, &orders).await.unwrap();
    report.ensure().unwrap();
    assert_eq!(
        (report.paid, report.cancelled),
        (paid_won, cancel_won),
        "{report}"
    );
}

/// How Redis is kept from taking the returns while the sweeper commits them in MySQL.
#[derive(Debug, Clone, Copy)]
enum RedisAway {
    /// SIGSTOP: the sweeper's restore calls (one per pass, each timing out) wait in the socket
    /// and all run when Redis resumes, after order-service is dead.
    Paused,
    /// SIGKILL, restarted after order-service is dead: its counters must be rebuilt from MySQL,
    /// returns in flight included.
    Killed,
}

/// The sweeper expires orders and commits in MySQL while Redis cannot take the stock, and
/// order-service is SIGKILLed before it could record the return as applied. A new order-service
/// finishes the returns from MySQL's outbox; the stock comes back exactly once.
async fn sweeper_killed_between_mysql_and_redis(away: RedisAway) {
    apps::init_test_tracing();
    let mut stack = Stack::start(BrokerStorage::Sqlite).await.unwrap();
    let inventory = apps::spawn_inventory_service(apps::inventory_settings(&stack))
        .await
        .unwrap();
    let http = apps::http_client();
    let admin = flash_sale_tests::scenario::Admin::new(
        http.clone(),
        &inventory.base_url,
        apps::ADMIN_TOKEN,
    );
    let mut settings = apps::order_settings(&stack);
    settings.redis.response_timeout_ms = 300;
    let order = ServiceProcess::spawn(ServiceSettings::Order(settings.clone()))
        .await
        .unwrap();
    let stores = super::helpers::stack_stores(&stack).await;
    admin
        .create_activity_with(155, 5, json!({"priceCents": PRICE, "payTimeoutSecs": 2}))
        .await
        .unwrap();
    let mut accepted = Vec::new();
    for user in 1..=5 {
        let res = http
            .post(format!("{}{}", order.base_url, api::order::CREATE))
            .json(&json!({"userId": user, "activityId": 155}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status().as_u16(), 202);
        let body: Value = res.json().await.unwrap();
        accepted.push((body["orderNo"].as_str().unwrap().to_owned(), user));
    }
    stores
        .wait_for_drain(155, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(stores.redis_stock(155).await.unwrap(), 0);

    let redis_pid = stack.pid(Server::Redis).expect("Redis runs").to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &redis_pid])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} {redis_pid}");
    };
    match away {
        RedisAway::Paused => signal("-STOP"),
        RedisAway::Killed => stack.kill(Server::Redis),
    }
    // The deadline passes; the sweeper commits the expiries, and cannot reach Redis.
    let started = Instant::now();
    while stores.order_count_in_status(155, 3).await.unwrap() < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the sweeper did not expire the orders"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few passes that each try Redis again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        stores.unapplied_returns(155).await.unwrap(),
        5,
        "the returns are committed, none recorded as applied"
    );
    drop(order); // SIGKILL
    match away {
        RedisAway::Paused => signal("-CONT"),
        RedisAway::Killed => stack.restart(Server::Redis).unwrap(),
    }

    let order = ServiceProcess::spawn(ServiceSettings::Order(settings))
        .await
        .unwrap();
    // A Redis that restarted needs a new connection (the old one broke with it).
    let stores = super::helpers::stack_stores(&stack).await;
    stores
        .wait_for_drain(155, Duration::from_secs(60))
        .await
        .unwrap();
    let report = stores.check_invariants(155, 5, &accepted).await.unwrap();
    report.ensure().unwrap();
    assert_eq!((report.expired, report.returns), (5, 5), "{report}");
    assert_eq!(report.redis_stock, 5, "{report}");
    // Every buyer may buy again.
    let res = http
        .post(format!("{}{}", order.base_url, api::order::CREATE))
        .json(&json!({"userId": 1, "activityId": 155}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 202, "{}", res.text().await.unwrap());
}

#[tokio::test]
async fn a_sweeper_killed_while_redis_is_paused_returns_the_stock_once() {
    sweeper_killed_between_mysql_and_redis(RedisAway::Paused).await;
}

#[tokio::test]
async fn a_sweeper_killed_while_redis_is_down_returns_the_stock_once() {
    sweeper_killed_between_mysql_and_redis(RedisAway::Killed).await;
}
