//! The buyer's page (`GET /shop`, services/gateway/static/buyer.html) in a real headless
//! Chromium, driven through chromedriver, against a real gateway in front of the real
//! order-service, inventory-service, Redis, broker and MariaDB: the countdown, the queue of a
//! waiting room, the admission, the order and its status, as a buyer sees them. Screenshots of
//! each step are left under `target/test-artifacts/buyer-page/`.

use std::time::{Duration, Instant};

use flash_sale_common::api;
use flash_sale_common::configuration::Secret;
use flash_sale_common::error::ErrorCode;
use flash_sale_tests::apps::{JWT_SECRET, RunningApp, TestApps, gateway_settings, spawn_gateway};
use flash_sale_tests::browser::artifacts_dir;
use flash_sale_tests::webdriver::Browser;
use serde_json::{Value, json};

use crate::helpers::*;

/// The buyer the browser acts for.
const BUYER: i64 = 42;

/// The stack, and a gateway with `rules` as its rule file (none: the built-in rules), in
/// development mode (the body's or query's `userId` is the buyer) when `dev`.
async fn shop(rules: Option<&str>, dev: bool) -> (TestApps, RunningApp, tempfile::TempDir) {
    let apps = spawn_apps().await;
    let dir = tempfile::tempdir().unwrap();
    let mut settings =
        gateway_settings(&apps.stack, &apps.order.base_url, &apps.inventory.base_url);
    settings.auth.trust_body_user_id = dev;
    if !dev {
        // Outside development mode the gateway signs tickets and passes with a secret it is given.
        settings.admission.secret = Secret::new("test-admission-secret-of-32-bytes-at-least");
    }
    if let Some(rules) = rules {
        let path = dir.path().join("rules.toml");
        std::fs::write(&path, rules).unwrap();
        settings.rules.file = Some(path.to_string_lossy().into_owned());
    }
    let gateway = spawn_gateway(settings).await.unwrap();
    (apps, gateway, dir)
}

/// What the page shows of the purchase, for the assertions and their messages.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    state: String,
    position: String,
    message: String,
}

/// The page's state, place and message, read in one script so that they belong together.
async fn seen(browser: &Browser) -> Seen {
    let read = browser
        .execute(
            "const t = (id) => document.getElementById(id).textContent.trim();
             return {state: t('state'), position: t('position'), message: t('message')};",
        )
        .await
        .unwrap();
    let field = |name: &str| read[name].as_str().unwrap_or_default().to_owned();
    Seen {
        state: field("state"),
        position: field("position"),
        message: field("message"),
    }
}

/// Reads the page every 50 ms until its state is one of `until`, and returns every distinct
/// thing it showed on the way (the last one in `until`). `on_change` runs at each change, for
/// screenshots. Fails after `timeout`, with the way so far and a screenshot of the page.
async fn watch(
    browser: &Browser,
    until: &[&str],
    timeout: Duration,
    name: &str,
    mut on_change: impl AsyncFnMut(&Seen, usize),
) -> Vec<Seen> {
    let deadline = Instant::now() + timeout;
    let mut way: Vec<Seen> = Vec::new();
    loop {
        let now = seen(browser).await;
        if way.last() != Some(&now) {
            way.push(now.clone());
            on_change(&now, way.len() - 1).await;
        }
        if until.contains(&now.state.as_str()) {
            return way;
        }
        if Instant::now() > deadline {
            let shot =
                artifacts_dir("buyer-page").join(format!("{}-stuck.png", name.replace(' ', "-")));
            let _ = browser.screenshot(&shot).await;
            panic!(
                "{name}: the page did not reach {until:?} within {timeout:?}; it showed {way:#?} \
                 (screenshot {})",
                shot.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The order as order-service has it.
async fn order(apps: &TestApps, order_no: &str) -> Value {
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
    assert_eq!(res.status().as_u16(), 200, "order {order_no}");
    res.json().await.unwrap()
}

/// An activity behind a waiting room admitting 2 buyers a second with no burst: the page counts
/// down to the opening, then the browser's buyer joins behind eight others (joined over the API),
/// sees a place in the queue above 1 that only goes down, is admitted, orders with the pass and
/// sees the order CREATED: the order order-service holds for that buyer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_counts_down_queues_and_orders_through_the_page() {
    let (apps, gateway, _dir) = shop(
        Some(
            r#"
[admission]
require_pass = false

[[waiting_room]]
activity = 1
rate = 2
burst = 0
"#,
        ),
        true,
    )
    .await;
    let browser = Browser::start()
        .await
        .expect("chromedriver and Chromium start");
    let shots = artifacts_dir("buyer-page");
    // Opens in a few seconds: long enough to see the countdown, short for the test.
    let opens = chrono::Utc::now() + chrono::Duration::seconds(8);
    apps.admin()
        .create_activity_with(
            1,
            20,
            json!({"startTime": opens.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)}),
        )
        .await
        .unwrap();
    // The premise: the room is there, a buy without its pass is refused.
    let (status, body) = {
        let res = apps
            .http
            .post(format!("{}{}", gateway.base_url, api::order::CREATE))
            .json(&json!({"userId": "7", "activityId": "1", "quantity": 1}))
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.json::<Value>().await.unwrap())
    };
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some(ErrorCode::PassRequired.as_str())),
        "{body}"
    );

    browser
        .goto(&format!(
            "{}/shop?activity=1&user={BUYER}",
            gateway.base_url
        ))
        .await
        .unwrap();
    let way = watch(
        &browser,
        &["countdown", "ready", "error"],
        Duration::from_secs(10),
        "load",
        async |_, _| {},
    )
    .await;
    let first = way.last().unwrap();
    assert_eq!(first.state, "countdown", "before the opening: {way:#?}");
    let countdown = browser.text("#countdown").await.unwrap();
    assert!(
        countdown.len() == 5 && countdown.starts_with("00:0") && countdown != "00:00",
        "a few seconds to go: {countdown:?}"
    );
    assert_eq!(browser.text("#buy").await.unwrap(), "Join the queue");
    assert!(
        browser.is_enabled("#buy").await.unwrap(),
        "a room's queue may be joined early"
    );
    assert_eq!(browser.text("#stock").await.unwrap(), "20");
    browser
        .screenshot(&shots.join("1-countdown.png"))
        .await
        .unwrap();

    // The opening: the page says so by itself.
    watch(
        &browser,
        &["ready"],
        Duration::from_secs(15),
        "opening",
        async |_, _| {},
    )
    .await;
    assert_eq!(browser.text("#buy").await.unwrap(), "Buy now");
    assert_eq!(browser.text("#countdown").await.unwrap(), "Open now");
    browser.screenshot(&shots.join("2-open.png")).await.unwrap();

    // Eight buyers ahead, in the queue (after the opening: first come, first served).
    for user in 101..=108 {
        let res = apps
            .http
            .post(format!("{}/api/admission/1", gateway.base_url))
            .json(&json!({"userId": user}))
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let body: Value = res.json().await.unwrap();
        assert_eq!(status, 200, "user {user} joins: {body}");
    }
    browser.click("#buy").await.unwrap();
    let mut waiting_shot = false;
    let way = watch(
        &browser,
        &["ordered", "error", "sold-out", "ended"],
        Duration::from_secs(60),
        "queue",
        async |now: &Seen, _| {
            if now.state == "waiting" && now.position.parse::<u64>().is_ok() && !waiting_shot {
                waiting_shot = true;
                browser
                    .screenshot(&shots.join("3-waiting.png"))
                    .await
                    .unwrap();
            }
        },
    )
    .await;
    println!("the page showed: {way:#?}");
    let last = way.last().unwrap();
    assert_eq!(last.state, "ordered", "{way:#?}");
    let places: Vec<u64> = way
        .iter()
        .filter(|s| s.state == "waiting")
        .filter_map(|s| s.position.parse().ok())
        .collect();
    assert!(
        places.first().is_some_and(|&p| p > 1),
        "the buyer waited behind others: {way:#?}"
    );
    assert!(
        places.windows(2).all(|w| w[1] <= w[0]),
        "the place only goes down: {places:?}"
    );
    let states: Vec<&str> = way.iter().map(|s| s.state.as_str()).collect();
    let order_of = |s: &str| states.iter().position(|x| *x == s);
    assert!(
        order_of("waiting") < order_of("ordering") && order_of("ordering") < order_of("ordered"),
        "waiting, then ordering, then ordered: {states:?}"
    );
    browser
        .screenshot(&shots.join("4-ordered.png"))
        .await
        .unwrap();

    let order_no = browser.text("#order-no").await.unwrap();
    assert_eq!(browser.text("#order-status").await.unwrap(), "CREATED");
    let order = order(&apps, &order_no).await;
    assert_eq!(
        (order["userId"].as_str(), order["status"].as_str()),
        (Some(BUYER.to_string().as_str()), Some("CREATED")),
        "{order}"
    );
    let stores = stores(&apps).await;
    assert_eq!(
        stores.order_count(1).await.unwrap(),
        1,
        "one order, the page's"
    );
}

/// A plain activity (no waiting room, no pass required), already open: the page is ready at
/// once, asks for the user id (none in the address), and buys on the click; the order it shows
/// is the one order-service holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_waiting_room_the_page_buys_at_once() {
    let (apps, gateway, _dir) = shop(None, true).await;
    let browser = Browser::start()
        .await
        .expect("chromedriver and Chromium start");
    let shots = artifacts_dir("buyer-page");
    apps.admin().create_activity(2, 5).await.unwrap();

    browser
        .goto(&format!("{}/shop?activity=2", gateway.base_url))
        .await
        .unwrap();
    let way = watch(
        &browser,
        &["countdown", "ready", "error"],
        Duration::from_secs(10),
        "plain load",
        async |_, _| {},
    )
    .await;
    assert_eq!(way.last().unwrap().state, "ready", "{way:#?}");
    assert_eq!(browser.text("#waiting").await.unwrap(), "no queue");
    assert_eq!(browser.text("#stock").await.unwrap(), "5");
    browser.type_into("#user-id", "7").await.unwrap();
    browser
        .screenshot(&shots.join("plain-1-ready.png"))
        .await
        .unwrap();
    browser.click("#buy").await.unwrap();
    let way = watch(
        &browser,
        &["ordered", "error", "sold-out", "ended"],
        Duration::from_secs(30),
        "plain buy",
        async |_, _| {},
    )
    .await;
    assert_eq!(way.last().unwrap().state, "ordered", "{way:#?}");
    assert!(
        !way.iter().any(|s| s.state == "waiting"),
        "no queue to wait in: {way:#?}"
    );
    browser
        .screenshot(&shots.join("plain-2-ordered.png"))
        .await
        .unwrap();
    let order_no = browser.text("#order-no").await.unwrap();
    assert_eq!(browser.text("#order-status").await.unwrap(), "CREATED");
    let order = order(&apps, &order_no).await;
    assert_eq!(
        (order["userId"].as_str(), order["status"].as_str()),
        (Some("7"), Some("CREATED")),
        "{order}"
    );
}

/// Outside development mode, with purchase passes required and no waiting room: the page is
/// given the buyer's token in its address, takes it out of the address bar, gets a pass with it
/// (`Authorization: Bearer`), buys with the pass and shows the order, which order-service holds
/// for the token's subject.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_the_page_gets_a_pass_and_buys_as_its_subject() {
    let (apps, gateway, _dir) = shop(
        Some(
            r#"
[admission]
require_pass = true
"#,
        ),
        false,
    )
    .await;
    let browser = Browser::start()
        .await
        .expect("chromedriver and Chromium start");
    let shots = artifacts_dir("buyer-page");
    apps.admin().create_activity(3, 5).await.unwrap();
    let exp = chrono::Utc::now().timestamp() + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "9", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap();
    // The premise: a buy without a pass is refused.
    let res = apps
        .http
        .post(format!("{}{}", gateway.base_url, api::order::CREATE))
        .bearer_auth(&token)
        .json(&json!({"activityId": "3", "quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status().as_u16(), 403);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["code"], ErrorCode::PassRequired.as_str(), "{body}");

    browser
        .goto(&format!(
            "{}/shop?activity=3&token={token}",
            gateway.base_url
        ))
        .await
        .unwrap();
    let way = watch(
        &browser,
        &["countdown", "ready", "error"],
        Duration::from_secs(10),
        "token load",
        async |_, _| {},
    )
    .await;
    assert_eq!(way.last().unwrap().state, "ready", "{way:#?}");
    let address = browser.execute("return location.href").await.unwrap();
    assert_eq!(
        address.as_str(),
        Some(format!("{}/shop?activity=3", gateway.base_url).as_str()),
        "the token is out of the address bar"
    );
    assert!(
        !browser.is_displayed("#user-id").await.unwrap(),
        "the token names the buyer: no user id to type"
    );
    browser.click("#buy").await.unwrap();
    let way = watch(
        &browser,
        &["ordered", "error", "sold-out", "ended"],
        Duration::from_secs(30),
        "token buy",
        async |_, _| {},
    )
    .await;
    assert_eq!(way.last().unwrap().state, "ordered", "{way:#?}");
    browser
        .screenshot(&shots.join("token-ordered.png"))
        .await
        .unwrap();
    let order_no = browser.text("#order-no").await.unwrap();
    assert_eq!(browser.text("#order-status").await.unwrap(), "CREATED");
    let order = order(&apps, &order_no).await;
    assert_eq!(
        (order["userId"].as_str(), order["status"].as_str()),
        (Some("9"), Some("CREATED")),
        "{order}"
    );
}
