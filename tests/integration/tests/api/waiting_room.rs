//! The waiting room and purchase passes (docs/waiting-room.md), on the private stack's real
//! Redis, MariaDB and broker, with gateways in process or, where one is killed, in processes of
//! their own.

use std::time::{Duration, Instant};

use flash_sale_common::configuration::Secret;
use flash_sale_common::domain::{ActivityId, UserId};
use flash_sale_tests::admission::{self, Answer, Outcome, wait_for_pass};
use flash_sale_tests::apps::{RunningApp, TestApps, gateway_settings, spawn_gateway};
use gateway::admission::Signer;
use gateway::configuration::AdmissionSettings;
use serde_json::{Value, json};

use crate::helpers::*;

const SECRET: &str = "waiting-room-test-secret-of-32-bytes-at-least";

/// Rules with only what these tests look at: the room (or not), passes, nothing that sheds.
fn rules(extra: &str) -> String {
    format!(
        "flow = []\nparam = []\ncluster = []\nbreaker = []\n[system]\nadaptive = false\n\
         [sold_out]\nenabled = false\n{extra}"
    )
}

fn gateway_for(apps: &TestApps, dir: &tempfile::TempDir, rules_toml: &str) -> gateway::Settings {
    let path = dir.path().join("rules.toml");
    std::fs::write(&path, rules_toml).unwrap();
    let mut settings =
        gateway_settings(&apps.stack, &apps.order.base_url, &apps.inventory.base_url);
    settings.auth.trust_body_user_id = true;
    settings.admission.secret = Secret::new(SECRET);
    settings.rules.file = Some(path.to_string_lossy().into_owned());
    settings.redis.response_timeout_ms = 1000;
    settings
}

async fn gateway_with(apps: &TestApps, dir: &tempfile::TempDir, rules_toml: &str) -> RunningApp {
    let gateway = spawn_gateway(gateway_for(apps, dir, rules_toml))
        .await
        .unwrap();
    wait_until_connected(&apps.http, &gateway.base_url, 1).await;
    gateway
}

/// The gateway connects to Redis in the background: until then the room answers 503.
async fn wait_until_connected(http: &reqwest::Client, gateway: &str, activity: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = http
            .get(format!("{gateway}/api/admission/{activity}"))
            .send()
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if status != 503 && status != 0 {
            return;
        }
        assert!(Instant::now() < deadline, "the gateway never reached Redis");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn rfc3339_in(secs: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(secs))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Everything the room keeps in Redis for `activity`, and its stock: what a refusal must not
/// change.
async fn room_state(apps: &TestApps, activity: i64) -> Vec<String> {
    let client = redis::Client::open(apps.stack.redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let prefix = format!("fs:{{act:{activity}}}");
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await
        .unwrap();
    keys.sort();
    let mut state = Vec::new();
    for key in keys {
        let dump: Option<Vec<u8>> = redis::cmd("DUMP")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let bucket: Option<String> = if key.ends_with(":wr:state") {
            // The bucket's clock moves with every advance: the places and the cursor must not.
            let fields: Vec<Option<String>> = redis::cmd("HMGET")
                .arg(&key)
                .arg("cursor")
                .arg("seq")
                .arg("mode")
                .query_async(&mut conn)
                .await
                .unwrap();
            Some(format!("{fields:?}"))
        } else {
            None
        };
        state.push(format!(
            "{key} {}",
            bucket.unwrap_or_else(|| format!("{dump:?}"))
        ));
    }
    state
}

/// Joins `users` one after the other and waits for each one's pass in parallel.
async fn queue_up(
    http: &reqwest::Client,
    gateway: &str,
    activity: i64,
    users: impl IntoIterator<Item = i64>,
) -> Vec<Outcome> {
    let origin = Instant::now();
    let mut waits = Vec::new();
    for user in users {
        let http = http.clone();
        let gateway = gateway.to_owned();
        waits.push(tokio::spawn(async move {
            wait_for_pass(
                &http,
                &gateway,
                activity,
                user,
                origin,
                Duration::from_secs(60),
            )
            .await
        }));
        // One arrival at a time, so arrival order is known.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut outcomes = Vec::new();
    for wait in waits {
        outcomes.push(wait.await.unwrap().unwrap());
    }
    outcomes
}

/// 30 buyers for 12 items, admitted 10 a second: every admission is in arrival order, no more
/// are admitted than the rate allows, admission stops at the stock (the rest hear SOLD_OUT at
/// once, without buying), and each pass buys once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_admits_at_its_rate_in_arrival_order_up_to_the_stock() {
    let apps = spawn_apps().await;
    apps.admin().create_activity(1, 12).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway_with(
        &apps,
        &dir,
        &rules("[[waiting_room]]\nactivity = 1\nrate = 10\nburst = 0\n"),
    )
    .await;
    let http = &apps.http;
    let url = &gateway.base_url;

    // Without a pass the buy path is closed to this activity.
    let (status, body) = admission::buy(http, url, 1, 999, None).await.unwrap();
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("PASS_REQUIRED"))
    );

    let started = Instant::now();
    let outcomes = queue_up(http, url, 1, 1..=30).await;
    let elapsed = started.elapsed();
    let admitted: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| matches!(o.answer, Answer::Admitted { .. }))
        .collect();
    let refused: Vec<Option<&str>> = outcomes
        .iter()
        .filter(|o| !matches!(o.answer, Answer::Admitted { .. }))
        .map(|o| o.answer.code())
        .collect();
    assert_eq!(
        admitted.len(),
        12,
        "as many admitted as there is stock: {outcomes:#?}"
    );
    assert!(
        refused.iter().all(|c| *c == Some("SOLD_OUT")),
        "the rest are told SOLD_OUT: {refused:?}"
    );
    // The first twelve to arrive are the twelve admitted, in their order.
    let users: Vec<i64> = admitted.iter().map(|o| o.user).collect();
    assert_eq!(users, (1..=12).collect::<Vec<_>>());
    assert_eq!(
        admission::out_of_order_share(&outcomes, Duration::ZERO),
        0.0
    );
    // 10 a second with no burst: twelve admissions span at least 1.1 s of the room's clock.
    let first = admitted.iter().map(|o| expiry(o)).min().unwrap();
    let last = admitted.iter().map(|o| expiry(o)).max().unwrap();
    assert!(
        last - first >= 900,
        "twelve admitted within {} ms at 10/s",
        last - first
    );
    println!("30 buyers through the room in {elapsed:?}");

    // Each pass buys once, for its holder only.
    let Answer::Admitted { pass, .. } = &admitted[0].answer else {
        unreachable!()
    };
    let (status, body) = admission::buy(http, url, 1, 2, Some(pass)).await.unwrap();
    assert_eq!(
        (status, body["code"].as_str()),
        (403, Some("PASS_INVALID")),
        "{body}"
    );
    for o in &admitted {
        let Answer::Admitted { pass, .. } = &o.answer else {
            unreachable!()
        };
        let (status, body) = admission::buy(http, url, 1, o.user, Some(pass))
            .await
            .unwrap();
        assert_eq!(status, 202, "{body}");
    }
    let (status, body) = admission::buy(http, url, 1, 1, Some(pass)).await.unwrap();
    assert_eq!((status, body["code"].as_str()), (409, Some("PASS_USED")));
    let stores = stores(&apps).await;
    stores
        .wait_for_drain(1, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(stores.order_count(1).await.unwrap(), 12);
    assert_eq!(stores.redis_stock(1).await.unwrap(), 0);
}

fn expiry(outcome: &Outcome) -> u64 {
    match outcome.answer {
        Answer::Admitted { expires_at, .. } => expires_at,
        _ => 0,
    }
}

/// Buyers who arrive before the opening are drawn in a random order at the opening; those who
/// come after queue behind them, first come first served, and admission follows the places.
/// (The room is paused over the opening, so every place can be read before anyone is admitted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_crowd_before_the_opening_is_shuffled_and_latecomers_queue_behind() {
    let apps = spawn_apps().await;
    apps.admin()
        .create_activity_with(2, 100, json!({"startTime": rfc3339_in(6)}))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway_with(
        &apps,
        &dir,
        &rules("[[waiting_room]]\nactivity = 2\nrate = 20\nburst = 0\n"),
    )
    .await;
    let (http, url) = (&apps.http, gateway.base_url.as_str());
    assert_eq!(
        set_mode(http, &gateway.management_url, 2, "pause").await.0,
        200
    );
    let mut tickets = Vec::new();
    for user in 1..=40 {
        match admission::join(http, url, 2, user).await.unwrap() {
            Answer::Waiting {
                ticket: Some(t),
                position: None,
                ..
            } => tickets.push((user, t)),
            other => panic!("before the opening: waiting, the place hidden: {other:?}"),
        }
    }
    let info = admission::info(http, url, 2).await.unwrap();
    let (opens, now) = (
        info["opensAt"].as_u64().unwrap(),
        info["now"].as_u64().unwrap(),
    );
    assert!(now < opens, "the forty joined before the opening: {info}");
    // Buying before the opening without a pass is refused like any time.
    let (status, _) = admission::buy(http, url, 2, 1, None).await.unwrap();
    assert_eq!(status, 403);
    tokio::time::sleep(Duration::from_millis(opens - now + 200)).await;

    let mut places = Vec::new();
    for (user, ticket) in &tickets {
        match admission::poll(http, url, 2, *user, ticket).await.unwrap() {
            Answer::Waiting {
                position: Some(p),
                paused: true,
                ..
            } => places.push(p),
            other => panic!("after the opening, paused: a place: {other:?}"),
        }
    }
    let mut sorted = places.clone();
    sorted.sort();
    assert_eq!(
        sorted,
        (1..=40).collect::<Vec<_>>(),
        "every early buyer has one place"
    );
    // A draw of 40 that comes out in arrival order has odds of 1 in 40!.
    assert_ne!(places, sorted, "the early crowd was not shuffled");
    for user in 41..=50 {
        match admission::join(http, url, 2, user).await.unwrap() {
            Answer::Waiting {
                position: Some(p), ..
            } => {
                assert_eq!(p, user as u64, "latecomers queue behind, in arrival order")
            }
            other => panic!("{other:?}"),
        }
    }

    assert_eq!(
        set_mode(http, &gateway.management_url, 2, "resume").await.0,
        200
    );
    let outcomes = queue_up(http, url, 2, 1..=50).await;
    let mut admitted: Vec<(u64, u64)> = outcomes
        .iter()
        .map(|o| {
            let place = if o.user <= 40 {
                places[o.user as usize - 1]
            } else {
                o.user as u64
            };
            (place, expiry(o))
        })
        .collect();
    assert!(
        outcomes
            .iter()
            .all(|o| matches!(o.answer, Answer::Admitted { .. }))
    );
    admitted.sort();
    assert!(
        admitted.windows(2).all(|w| w[0].1 <= w[1].1),
        "admitted in the order of their places: {admitted:?}"
    );
}

/// Forged, expired, someone else's, another activity's tickets and passes, a ticket offered as
/// a pass and a pass as a ticket: each gets its 4xx, and neither Redis nor MySQL changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tickets_and_passes_are_refused_and_change_nothing() {
    let apps = spawn_apps().await;
    apps.admin().create_activity(3, 100).await.unwrap();
    apps.admin().create_activity(4, 100).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway_with(
        &apps,
        &dir,
        &rules("[[waiting_room]]\nactivity = 3\nrate = 1\nburst = 1\n[admission]\nrequire_pass = true\n"),
    )
    .await;
    let (http, url) = (&apps.http, gateway.base_url.as_str());
    // User 1 is admitted at once (the bucket's first token), user 2 waits.
    let pass_one = match admission::join(http, url, 3, 1).await.unwrap() {
        Answer::Admitted { pass, .. } => pass,
        other => panic!("the first buyer of a quiet room is admitted at once: {other:?}"),
    };
    let two = admission::join(http, url, 3, 2).await.unwrap();
    let Answer::Waiting {
        ticket: Some(ticket_two),
        ..
    } = two
    else {
        panic!("{two:?}")
    };
    let plain_pass_four = match admission::join(http, url, 4, 1).await.unwrap() {
        Answer::Admitted { pass, .. } => pass,
        other => panic!("activity 4 has no room: a plain pass at once, not {other:?}"),
    };
    // Paused while the refusals come, so the room's own clock admits nobody meanwhile.
    assert_eq!(
        set_mode(http, &gateway.management_url, 3, "pause").await.0,
        200
    );

    let stranger = signer("a-different-secret-of-at-least-32-bytes!!");
    let ours = signer(SECRET);
    let (u1, a3) = (UserId::new(1).unwrap(), ActivityId::new(3).unwrap());
    let now = now_ms();
    let before = (room_state(&apps, 3).await, room_state(&apps, 4).await);
    let stores = stores(&apps).await;
    let orders_before = stores.order_count(3).await.unwrap() + stores.order_count(4).await.unwrap();

    let polls: Vec<(&str, i64, String, &str)> = vec![
        (
            "forged ticket",
            1,
            stranger.ticket(u1, a3, now, 600),
            "TICKET_INVALID",
        ),
        (
            "expired ticket",
            1,
            ours.ticket(u1, a3, now - 20_000, 1),
            "TICKET_EXPIRED",
        ),
        (
            "someone else's ticket",
            1,
            ticket_two.clone(),
            "TICKET_INVALID",
        ),
        ("a pass as a ticket", 1, pass_one.clone(), "TICKET_INVALID"),
        ("garbage", 1, "not-a-ticket".into(), "TICKET_INVALID"),
        (
            "another activity's ticket",
            1,
            ours.ticket(u1, ActivityId::new(4).unwrap(), now, 600),
            "TICKET_INVALID",
        ),
        // A ticket we signed for someone not in the queue is no bad ticket: its holder left
        // when told sold out (or Redis lost the place), and it queues again
        // (`a_buyer_told_sold_out_queues_again_when_stock_comes_back`).
    ];
    for (what, user, ticket, code) in &polls {
        let answer = admission::poll(http, url, 3, *user, ticket).await.unwrap();
        assert_eq!(answer.code(), Some(*code), "{what}: {answer:?}");
        assert!(
            matches!(answer, Answer::Refused { status: 403, .. }),
            "{what}: {answer:?}"
        );
    }
    let buys: Vec<BadBuy> = vec![
        ("no pass", 3, 1, None, 403, "PASS_REQUIRED"),
        (
            "no pass, no room, require_pass",
            4,
            5,
            None,
            403,
            "PASS_REQUIRED",
        ),
        (
            "forged pass",
            3,
            1,
            Some(stranger.pass(u1, a3, now + 60_000, true)),
            403,
            "PASS_INVALID",
        ),
        (
            "expired pass",
            3,
            1,
            Some(ours.pass(u1, a3, now - 20_000, true)),
            403,
            "PASS_EXPIRED",
        ),
        (
            "someone else's pass",
            3,
            2,
            Some(pass_one.clone()),
            403,
            "PASS_INVALID",
        ),
        (
            "another activity's pass",
            4,
            1,
            Some(pass_one.clone()),
            403,
            "PASS_INVALID",
        ),
        (
            "a ticket as a pass",
            3,
            2,
            Some(ticket_two.clone()),
            403,
            "PASS_INVALID",
        ),
        (
            "a pass of no admission",
            3,
            2,
            Some(ours.pass(UserId::new(2).unwrap(), a3, now + 60_000, true)),
            403,
            "PASS_EXPIRED",
        ),
        (
            "someone else's plain pass",
            4,
            2,
            Some(plain_pass_four.clone()),
            403,
            "PASS_INVALID",
        ),
    ];
    for (what, activity, user, pass, status, code) in &buys {
        let (got, body) = admission::buy(http, url, *activity, *user, pass.as_deref())
            .await
            .unwrap();
        assert_eq!(
            (got, body["code"].as_str()),
            (*status, Some(*code)),
            "{what}: {body}"
        );
    }
    let after = (room_state(&apps, 3).await, room_state(&apps, 4).await);
    assert_eq!(before, after, "a refusal changed the room");
    let orders_after = stores.order_count(3).await.unwrap() + stores.order_count(4).await.unwrap();
    assert_eq!(orders_before, orders_after);

    // The good ones still work, once.
    let (status, body) = admission::buy(http, url, 3, 1, Some(&pass_one))
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let (status, body) = admission::buy(http, url, 4, 1, Some(&plain_pass_four))
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let (status, body) = admission::buy(http, url, 4, 1, Some(&plain_pass_four))
        .await
        .unwrap();
    assert_eq!((status, body["code"].as_str()), (409, Some("PASS_USED")));
    // User 2, admitted once resumed, buys; then its ticket says its pass is spent.
    assert_eq!(
        set_mode(http, &gateway.management_url, 3, "resume").await.0,
        200
    );
    let pass_two = poll_for_pass(http, url, 3, 2, &ticket_two).await;
    let (status, body) = admission::buy(http, url, 3, 2, Some(&pass_two))
        .await
        .unwrap();
    assert_eq!(status, 202, "{body}");
    let answer = admission::poll(http, url, 3, 2, &ticket_two).await.unwrap();
    assert_eq!(answer.code(), Some("PASS_USED"));
    // A bad activity or body: a 400, nothing joined.
    let res = http
        .post(format!("{url}/api/admission/x"))
        .json(&json!({"userId": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = http
        .post(format!("{url}/api/admission/3"))
        .body("[1]")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    let res = http
        .post(format!("{url}/api/admission/3"))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 400, "no buyer named");
    let res = http
        .post(format!("{url}/api/admission/77"))
        .json(&json!({"userId": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404, "no such activity");
}

/// Sets a room's mode on the management port: status and the room's view.
async fn set_mode(
    http: &reqwest::Client,
    management: &str,
    activity: i64,
    action: &str,
) -> (u16, Value) {
    let res = http
        .post(format!("{management}/waiting-room/{activity}/{action}"))
        .send()
        .await
        .unwrap();
    let status = res.status().as_u16();
    (status, res.json().await.unwrap())
}

/// Polls `ticket` as the room says until admitted (at most 30 s): the pass.
async fn poll_for_pass(
    http: &reqwest::Client,
    url: &str,
    activity: i64,
    user: i64,
    ticket: &str,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match admission::poll(http, url, activity, user, ticket)
            .await
            .unwrap()
        {
            Answer::Admitted { pass, .. } => return pass,
            Answer::Waiting { retry_after_ms, .. } => {
                assert!(Instant::now() < deadline, "user {user} never admitted");
                tokio::time::sleep(Duration::from_millis(retry_after_ms)).await
            }
            other => panic!("user {user}: {other:?}"),
        }
    }
}

/// What a bad buy sends and what it must get: what it is, activity, user, pass, status, code.
type BadBuy<'a> = (&'a str, i64, i64, Option<String>, u16, &'a str);

fn signer(secret: &str) -> Signer {
    Signer::from_settings(
        &AdmissionSettings {
            secret: Secret::new(secret),
        },
        0,
        false,
    )
    .unwrap()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Two gateway processes share one room. One is SIGKILLed with buyers in its queue: they poll
/// the other with the tickets the dead one signed and keep their places, their passes buy; a
/// gateway started afresh with the same secret honours them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_mid_admission_loses_no_place() {
    let apps = spawn_apps().await;
    apps.admin().create_activity(5, 100).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let settings = gateway_for(
        &apps,
        &dir,
        &rules("[[waiting_room]]\nactivity = 5\nrate = 2\nburst = 0\n"),
    );
    let first = ServiceProcess::spawn(ServiceSettings::Gateway(settings.clone()))
        .await
        .unwrap();
    let second = ServiceProcess::spawn(ServiceSettings::Gateway(settings.clone()))
        .await
        .unwrap();
    let http = &apps.http;
    wait_until_connected(http, &first.base_url, 5).await;
    wait_until_connected(http, &second.base_url, 5).await;
    let mut tickets = Vec::new();
    for user in 1..=8 {
        match admission::join(http, &first.base_url, 5, user)
            .await
            .unwrap()
        {
            Answer::Waiting {
                ticket: Some(t), ..
            } => tickets.push((user, t)),
            other => panic!("user {user}: {other:?}"),
        }
    }
    let positions_before = positions(http, &second.base_url, &tickets).await;
    // Dropping a ServiceProcess SIGKILLs its child: a crash, not a drain.
    drop(first);
    // The dead gateway's buyers, on the other one: the same places, or further on.
    let positions_after = positions(http, &second.base_url, &tickets).await;
    for ((user, before), (_, after)) in positions_before.iter().zip(&positions_after) {
        assert!(
            after <= before,
            "user {user}: place {before} became {after}"
        );
    }
    let mut bought = 0;
    let third = ServiceProcess::spawn(ServiceSettings::Gateway(settings))
        .await
        .unwrap();
    wait_until_connected(http, &third.base_url, 5).await;
    for (i, (user, ticket)) in tickets.iter().enumerate() {
        // Alternate between the survivor and the fresh gateway.
        let url = if i % 2 == 0 {
            &second.base_url
        } else {
            &third.base_url
        };
        let pass = poll_for_pass(http, url, 5, *user, ticket).await;
        let (status, body) = admission::buy(http, url, 5, *user, Some(&pass))
            .await
            .unwrap();
        assert_eq!(status, 202, "user {user}: {body}");
        bought += 1;
    }
    assert_eq!(bought, 8);
    let stores = stores(&apps).await;
    stores
        .wait_for_drain(5, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(stores.order_count(5).await.unwrap(), 8);
}

/// Each ticket's position (0 once admitted).
async fn positions(
    http: &reqwest::Client,
    url: &str,
    tickets: &[(i64, String)],
) -> Vec<(i64, u64)> {
    let mut out = Vec::new();
    for (user, ticket) in tickets {
        let position = match admission::poll(http, url, 5, *user, ticket).await.unwrap() {
            Answer::Waiting { position, .. } => position.unwrap_or(u64::MAX),
            Answer::Admitted { .. } => 0,
            other => panic!("user {user}: {other:?}"),
        };
        out.push((*user, position));
    }
    out
}

/// Stock that comes back after the room stood sold out for a while is admitted at the room's
/// rate, not all at once: buyers held back by the stock did not let the bucket fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stock_that_comes_back_is_admitted_at_the_rate_not_at_once() {
    let apps = spawn_apps().await;
    apps.admin().create_activity(8, 2).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway_with(
        &apps,
        &dir,
        &rules("[[waiting_room]]\nactivity = 8\nrate = 5\nburst = 0\n"),
    )
    .await;
    let (http, url) = (&apps.http, gateway.base_url.as_str());
    // 22 buyers join; two are admitted (the stock), the other 20 wait behind a sold-out room
    // and never poll again.
    for user in 1..=22 {
        admission::join(http, url, 8, user).await.unwrap();
    }
    let outstanding = |view: &Value| view["outstanding"].as_u64().unwrap();
    let view = |http: &reqwest::Client| {
        let url = format!("{}/waiting-room/8", gateway.management_url);
        let http = http.clone();
        async move {
            http.get(url)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while outstanding(&view(http).await) < 2 {
        assert!(
            Instant::now() < deadline,
            "the room never admitted the stock"
        );
        admission::info(http, url, 8).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Three seconds sold out: at 5 a second the bucket would have earned 15.
    tokio::time::sleep(Duration::from_secs(3)).await;
    apps.admin()
        .call(
            reqwest::Method::POST,
            &flash_sale_common::api::inventory::activity(8, "restock"),
            Some(serde_json::json!({ "quantity": 20 })),
        )
        .await
        .unwrap();
    // The next call advances the queue once: it may admit what one call earns, not 15.
    admission::join(http, url, 8, 23).await.unwrap();
    let admitted_at_once = outstanding(&view(http).await) - 2;
    assert!(
        admitted_at_once <= 1,
        "{admitted_at_once} admitted by the first call after the stock came back"
    );
}

/// A buyer told SOLD_OUT leaves the queue; when stock comes back (a cancel, an expiry), its
/// next poll with the same ticket queues it again at the end, as a newcomer, instead of a 403
/// for a ticket whose holder is gone. (Seen in `xtask sale --waiting-room`: a second tab of a
/// buyer told sold out came back after the second wave's stock returned.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buyer_told_sold_out_queues_again_when_stock_comes_back() {
    let apps = spawn_apps().await;
    apps.admin().create_activity(9, 1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway_with(
        &apps,
        &dir,
        &rules("[[waiting_room]]\nactivity = 9\nrate = 20\nburst = 0\n"),
    )
    .await;
    let (http, url) = (&apps.http, gateway.base_url.as_str());
    // Both join a paused room, so neither is admitted (nor told sold out) on the join.
    assert_eq!(
        set_mode(http, &gateway.management_url, 9, "pause").await.0,
        200
    );
    let mut tickets = Vec::new();
    for user in [1, 2] {
        let Answer::Waiting {
            ticket: Some(ticket),
            ..
        } = admission::join(http, url, 9, user).await.unwrap()
        else {
            panic!("user {user} was not queued");
        };
        tickets.push(ticket);
    }
    assert_eq!(
        set_mode(http, &gateway.management_url, 9, "resume").await.0,
        200
    );
    poll_for_pass(http, url, 9, 1, &tickets[0]).await;
    let told = admission::poll(http, url, 9, 2, &tickets[1]).await.unwrap();
    assert_eq!(told.code(), Some("SOLD_OUT"), "{told:?}");
    // While it stays sold out, that stays the answer.
    let again = admission::poll(http, url, 9, 2, &tickets[1]).await.unwrap();
    assert_eq!(again.code(), Some("SOLD_OUT"), "{again:?}");

    apps.admin()
        .call(
            reqwest::Method::POST,
            &flash_sale_common::api::inventory::activity(9, "restock"),
            Some(json!({ "quantity": 1 })),
        )
        .await
        .unwrap();
    let back = admission::poll(http, url, 9, 2, &tickets[1]).await.unwrap();
    assert!(
        matches!(
            back,
            Answer::Waiting {
                position: Some(1),
                ..
            } | Answer::Admitted { .. }
        ),
        "{back:?}"
    );
    let pass = poll_for_pass(http, url, 9, 2, &tickets[1]).await;
    let (status, body) = admission::buy(http, url, 9, 2, Some(&pass)).await.unwrap();
    assert_eq!(status, 202, "{body}");
}

/// Passes redeemed together still reach order-service at the room's rate: each order waits for
/// its slot in the room's redemption schedule (`lua/pass.lua`), and an order whose slot is more
/// than 2 s ahead is refused with its pass kept, and buys when retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passes_redeemed_together_reach_order_service_at_the_rooms_rate() {
    let apps = spawn_apps().await;
    apps.admin().create_activity(10, 100).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway_with(
        &apps,
        &dir,
        &rules("[[waiting_room]]\nactivity = 10\nrate = 10\nburst = 0\n"),
    )
    .await;
    let (http, url) = (&apps.http, gateway.base_url.as_str());
    let users: Vec<i64> = (1..=26).collect();
    let mut tickets = Vec::new();
    for &user in &users {
        let Answer::Waiting {
            ticket: Some(ticket),
            ..
        } = admission::join(http, url, 10, user).await.unwrap()
        else {
            panic!("user {user} was not queued");
        };
        tickets.push(ticket);
    }
    // Everyone admitted (2.6 s at 10 a second) before anyone buys.
    let mut passes = Vec::new();
    for (&user, ticket) in users.iter().zip(&tickets) {
        passes.push(poll_for_pass(http, url, 10, user, ticket).await);
    }
    let started = Instant::now();
    let buys: Vec<_> = users
        .iter()
        .zip(passes.clone())
        .map(|(&user, pass)| {
            let (http, url) = (http.clone(), url.to_owned());
            tokio::spawn(async move {
                let (status, body) = admission::buy(&http, &url, 10, user, Some(&pass))
                    .await
                    .unwrap();
                (user, status, body, started.elapsed())
            })
        })
        .collect();
    let mut answered = Vec::new();
    let mut crowded = Vec::new();
    for buy in buys {
        let (user, status, body, at) = buy.await.unwrap();
        match status {
            202 => answered.push(at),
            429 => {
                assert_eq!(body["code"], "RATE_LIMITED", "{body}");
                crowded.push(user);
            }
            other => panic!("user {user}: {other} {body}"),
        }
    }
    // Slots 100 ms apart: the 202s span about 2 s, where all at once they take milliseconds.
    let first = answered.iter().min().unwrap();
    let last = answered.iter().max().unwrap();
    assert!(
        *last - *first >= Duration::from_millis(1500),
        "{} orders answered within {:?}",
        answered.len(),
        *last - *first
    );
    // The orders whose slot was past 2 s kept their passes and buy now.
    assert!(!crowded.is_empty(), "every slot was within 2 s");
    for user in crowded {
        let pass = &passes[usize::try_from(user - 1).unwrap()];
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = admission::buy(http, url, 10, user, Some(pass))
                .await
                .unwrap();
            if status == 202 {
                break;
            }
            assert_eq!(status, 429, "user {user}: {body}");
            assert!(Instant::now() < deadline, "user {user} never bought");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    assert_eq!(stores(&apps).await.redis_stock(10).await.unwrap(), 100 - 26);
}

/// The operator pauses a room (nobody is admitted, places are kept), resumes it, and sends
/// everyone to the queue (a quiet room with a burst no longer admits on the join).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_pauses_resumes_and_queues_everyone() {
    let apps = spawn_apps().await;
    apps.admin().create_activity(6, 100).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway_with(
        &apps,
        &dir,
        &rules("[[waiting_room]]\nactivity = 6\nrate = 20\nburst = 5\n"),
    )
    .await;
    let (http, url) = (&apps.http, gateway.base_url.as_str());
    let mode = |action: &'static str| set_mode(http, &gateway.management_url, 6, action);
    // A quiet room with a burst admits on the join.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        admission::join(http, url, 6, 1).await.unwrap(),
        Answer::Admitted { .. }
    ));

    let (status, body) = mode("pause").await;
    assert_eq!(
        (status, body["mode"].as_str()),
        (200, Some("paused")),
        "{body}"
    );
    let Answer::Waiting {
        ticket: Some(ticket),
        paused: true,
        ..
    } = admission::join(http, url, 6, 2).await.unwrap()
    else {
        panic!("a join while paused waits, and says so")
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    let answer = admission::poll(http, url, 6, 2, &ticket).await.unwrap();
    assert!(
        matches!(
            answer,
            Answer::Waiting {
                paused: true,
                position: Some(1),
                ..
            }
        ),
        "still first, still paused: {answer:?}"
    );
    let (status, _) = mode("resume").await;
    assert_eq!(status, 200);
    let answer = admission::poll(http, url, 6, 2, &ticket).await.unwrap();
    assert!(
        matches!(answer, Answer::Admitted { .. }),
        "admitted once resumed: {answer:?}"
    );

    let (status, body) = mode("queue-all").await;
    assert_eq!((status, body["mode"].as_str()), (200, Some("queue-all")));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let joined = admission::join(http, url, 6, 3).await.unwrap();
    assert!(
        matches!(joined, Answer::Waiting { .. }),
        "queue-all: even a quiet room queues the buyer: {joined:?}"
    );
    // Bad operator input changes nothing.
    let (status, _) = mode("explode").await;
    assert_eq!(status, 400);
    let res = http
        .post(format!("{}/waiting-room/77/pause", gateway.management_url))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let res = http
        .get(format!("{}/waiting-room/6", gateway.management_url))
        .send()
        .await
        .unwrap();
    let view: Value = res.json().await.unwrap();
    assert_eq!(view["mode"], "queue-all", "{view}");
}

/// Without Redis the room cannot admit fairly: a join answers 503, and nothing else breaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_room_answers_503() {
    let mut apps = spawn_apps().await;
    apps.admin().create_activity(7, 100).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let gateway = gateway_with(
        &apps,
        &dir,
        &rules("[[waiting_room]]\nactivity = 7\nrate = 20\nburst = 5\n"),
    )
    .await;
    let (http, url) = (apps.http.clone(), gateway.base_url.clone());
    apps.stack.kill(flash_sale_tests::stack::Server::Redis);
    let answer = admission::join(&http, &url, 7, 1).await.unwrap();
    assert!(
        matches!(&answer, Answer::Refused { status: 503, code } if code == "SERVICE_UNAVAILABLE"),
        "{answer:?}"
    );
}
