//! A buyer of a sale with a waiting room, over the gateway's public API (docs/waiting-room.md):
//! join, poll the ticket until admitted, buy with the pass. The tests, `cargo xtask sale
//! --waiting-room` and the bench drive rooms with it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use flash_sale_common::api;
use serde_json::{Value, json};

use crate::scenario::{Answer as LoadAnswer, AnswerKind, LoadProgress, LoadReport, SaleConfig};

/// What the waiting room answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// In the queue; the ticket comes with a join, not with a poll.
    Waiting {
        ticket: Option<String>,
        position: Option<u64>,
        paused: bool,
        retry_after_ms: u64,
    },
    Admitted {
        pass: String,
        expires_at: u64,
    },
    /// Any other answer: its status and code (`SOLD_OUT`, `TICKET_INVALID`...).
    Refused {
        status: u16,
        code: String,
    },
}

impl Answer {
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Refused { code, .. } => Some(code),
            _ => None,
        }
    }

    async fn read(response: reqwest::Response) -> anyhow::Result<Self> {
        let status = response.status().as_u16();
        let body: Value = response.json().await.context("the answer is JSON")?;
        if status != 200 {
            return Ok(Self::Refused {
                status,
                code: body["code"].as_str().unwrap_or_default().to_owned(),
            });
        }
        Ok(match body["state"].as_str() {
            Some("admitted") => Self::Admitted {
                pass: body["pass"].as_str().context("a pass")?.to_owned(),
                expires_at: body["passExpiresAt"].as_u64().context("an expiry")?,
            },
            Some(state @ ("waiting" | "paused")) => Self::Waiting {
                ticket: body["ticket"].as_str().map(str::to_owned),
                position: body["position"].as_u64(),
                paused: state == "paused",
                retry_after_ms: body["retryAfterMs"].as_u64().unwrap_or(500),
            },
            other => anyhow::bail!("an unknown state {other:?}: {body}"),
        })
    }
}

/// `POST /api/admission/{activity}` as `user` (development mode: the body names the buyer).
pub async fn join(
    http: &reqwest::Client,
    gateway: &str,
    activity: i64,
    user: i64,
) -> anyhow::Result<Answer> {
    let response = http
        .post(format!("{gateway}/api/admission/{activity}"))
        .json(&json!({ "userId": user }))
        .send()
        .await?;
    Answer::read(response).await
}

/// `GET /api/admission/{activity}` with a ticket, as `user`.
pub async fn poll(
    http: &reqwest::Client,
    gateway: &str,
    activity: i64,
    user: i64,
    ticket: &str,
) -> anyhow::Result<Answer> {
    let response = http
        .get(format!("{gateway}/api/admission/{activity}?userId={user}"))
        .header("x-queue-ticket", ticket)
        .send()
        .await?;
    Answer::read(response).await
}

/// The activity's public view (`GET /api/admission/{activity}` without a ticket).
pub async fn info(http: &reqwest::Client, gateway: &str, activity: i64) -> anyhow::Result<Value> {
    let response = http
        .get(format!("{gateway}/api/admission/{activity}"))
        .send()
        .await?;
    anyhow::ensure!(response.status() == 200, "info: {}", response.status());
    Ok(response.json().await?)
}

/// A create-order through the gateway as `user`, with `pass` if given: status and body.
pub async fn buy(
    http: &reqwest::Client,
    gateway: &str,
    activity: i64,
    user: i64,
    pass: Option<&str>,
) -> anyhow::Result<(u16, Value)> {
    let mut request = http.post(format!("{gateway}{}", api::order::CREATE)).json(
        &json!({"userId": user.to_string(), "activityId": activity.to_string(), "quantity": 1}),
    );
    if let Some(pass) = pass {
        request = request.header("x-purchase-pass", pass);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    Ok((status, response.json().await.unwrap_or(Value::Null)))
}

/// How one buyer's wait ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub user: i64,
    /// When the join was sent, from `origin`.
    pub joined: Duration,
    /// From the join to the pass (or the refusal).
    pub waited: Duration,
    /// When the pass came, from `origin`.
    pub admitted_at: Option<Duration>,
    /// The pass, or the refusal's code.
    pub answer: Answer,
    /// Polls sent after the join.
    pub polls: u32,
}

fn unavailable(answer: &Answer) -> bool {
    matches!(answer, Answer::Refused { status: 503, .. })
}

/// Joins as `user`, then polls as the room asks until admitted or refused (at most `deadline`).
pub async fn wait_for_pass(
    http: &reqwest::Client,
    gateway: &str,
    activity: i64,
    user: i64,
    origin: Instant,
    deadline: Duration,
) -> anyhow::Result<Outcome> {
    let started = Instant::now();
    let joined = origin.elapsed();
    let in_time = || {
        anyhow::ensure!(
            started.elapsed() < deadline,
            "user {user} still waits after {deadline:?}"
        );
        Ok(())
    };
    // A 503 (the room cannot reach Redis in time) is tried again a second later, as its
    // Retry-After says and as an app would.
    let mut answer = join(http, gateway, activity, user).await?;
    while unavailable(&answer) {
        in_time()?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        answer = join(http, gateway, activity, user).await?;
    }
    let ticket = match &answer {
        Answer::Waiting { ticket, .. } => ticket.clone().context("a join's ticket")?,
        _ => String::new(),
    };
    let mut polls = 0;
    loop {
        let pause = match &answer {
            Answer::Waiting { retry_after_ms, .. } => Duration::from_millis(*retry_after_ms),
            refused if unavailable(refused) => Duration::from_secs(1),
            _ => break,
        };
        in_time()?;
        tokio::time::sleep(pause).await;
        answer = poll(http, gateway, activity, user, &ticket).await?;
        polls += 1;
    }
    Ok(Outcome {
        user,
        joined,
        waited: started.elapsed(),
        admitted_at: matches!(answer, Answer::Admitted { .. }).then(|| origin.elapsed()),
        answer,
        polls,
    })
}

/// The share of admitted buyers admitted before someone who was admitted too and had sent
/// their join at least `tolerance` earlier: 0 is first come, first served. Admission is read
/// from the room's own clock (a pass' expiry is its admission plus the pass' lifetime), not
/// from when a poll came back; a buyer who joined twice counts by their first join. The
/// tolerance covers what the client's and the server's scheduling can reorder (the joins of a
/// thousand buyers sent within the same milliseconds reach Redis in no knowable order).
pub fn out_of_order_share(outcomes: &[Outcome], tolerance: Duration) -> f64 {
    let mut first: BTreeMap<i64, (Duration, Option<u64>)> = BTreeMap::new();
    for o in outcomes {
        let admitted = match &o.answer {
            Answer::Admitted { expires_at, .. } => Some(*expires_at),
            _ => None,
        };
        let entry = first.entry(o.user).or_insert((o.joined, admitted));
        if o.joined < entry.0 {
            entry.0 = o.joined;
        }
        entry.1 = entry.1.or(admitted);
    }
    let mut admitted: Vec<(Duration, u64)> = first
        .into_values()
        .filter_map(|(joined, at)| at.map(|at| (joined, at)))
        .collect();
    if admitted.is_empty() {
        return 0.0;
    }
    admitted.sort();
    // Sweep in join order; `latest` is the latest admission of those who joined `tolerance`
    // or more before the buyer at hand.
    let (mut behind, mut latest, mut out_of_order) = (0, 0, 0usize);
    for &(joined, at) in &admitted {
        while behind < admitted.len() && admitted[behind].0 + tolerance <= joined {
            latest = latest.max(admitted[behind].1);
            behind += 1;
        }
        if at < latest {
            out_of_order += 1;
        }
    }
    out_of_order as f64 / admitted.len() as f64
}

/// The tolerance of [`out_of_order_share`] in the main job and the bench.
pub const ORDER_TOLERANCE: Duration = Duration::from_millis(50);

/// What a sale through a waiting room showed, beside its [`LoadReport`].
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoomFigures {
    /// The room's admission rate (buyers a second).
    pub rate: u32,
    pub buyers: usize,
    pub admitted: usize,
    /// Told `SOLD_OUT` by the room, without a create.
    pub told_sold_out: usize,
    /// Other answers that ended a wait, by code.
    pub other_endings: BTreeMap<String, usize>,
    /// Polls after the joins.
    pub polls: u64,
    /// From the join to the pass, of the admitted: p50, p99, max (ms).
    pub wait_ms: [f64; 3],
    /// Admitted before someone who joined 50 ms or more earlier ([`out_of_order_share`]).
    pub out_of_order_share: f64,
    /// The most admissions within one second of the room's clock (Redis' `TIME`).
    pub peak_admitted_per_sec: usize,
    /// The most creates accepted within one second, as the buyers' answers arrived.
    pub peak_accepted_per_sec: usize,
}

impl RoomFigures {
    /// Rows for the report's notes.
    pub fn rows(&self) -> Vec<(String, String)> {
        let mut rows = vec![
            (
                "waiting room: admission rate".to_owned(),
                format!("{} buyers/s", self.rate),
            ),
            ("waiting room: buyers".into(), self.buyers.to_string()),
            ("waiting room: admitted".into(), self.admitted.to_string()),
            (
                "waiting room: told sold out while waiting".into(),
                self.told_sold_out.to_string(),
            ),
            (
                "waiting room: polls per buyer".into(),
                format!("{:.1}", self.polls as f64 / self.buyers.max(1) as f64),
            ),
            (
                "waiting room: wait to admission".into(),
                format!(
                    "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
                    self.wait_ms[0], self.wait_ms[1], self.wait_ms[2]
                ),
            ),
            (
                "waiting room: admitted out of arrival order (by 50 ms or more)".into(),
                format!("{:.2} %", self.out_of_order_share * 100.0),
            ),
            (
                "waiting room: peak admitted in one second (the room's clock)".into(),
                format!(
                    "{} ({:.2} of the admission rate)",
                    self.peak_admitted_per_sec,
                    self.peak_admitted_per_sec as f64 / f64::from(self.rate.max(1))
                ),
            ),
            (
                "waiting room: peak orders accepted in one second (as answered)".into(),
                format!(
                    "{} ({:.2} of the admission rate)",
                    self.peak_accepted_per_sec,
                    self.peak_accepted_per_sec as f64 / f64::from(self.rate.max(1))
                ),
            ),
        ];
        for (code, n) in &self.other_endings {
            rows.push((format!("waiting room: ended with {code}"), n.to_string()));
        }
        rows
    }
}

impl std::fmt::Display for RoomFigures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (name, value) in self.rows() {
            writeln!(f, "  {name:<48} {value}")?;
        }
        Ok(())
    }
}

/// A sale through a waiting room: `config.requests` buyers (`config.user(i)`, so one in
/// `repeat_every` comes back), `config.concurrency` of them in the room at once, each joining,
/// polling as told, and buying with the pass (retrying a 429 or 5xx for `config.retry_ms`, as
/// the plain sale does). The load report holds one outcome per buyer, and the creates' answers.
pub async fn drive_room_sale(
    clients: &[reqwest::Client],
    gateway: &str,
    config: &SaleConfig,
    rate: u32,
    progress: &Arc<LoadProgress>,
) -> (LoadReport, RoomFigures) {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..config.concurrency.max(1) {
        let http = clients[w % clients.len()].clone();
        let (gateway, next, config) = (gateway.to_owned(), next.clone(), config.clone());
        let progress = progress.clone();
        workers.push(tokio::spawn(async move {
            let mut part = RoomPart::default();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= config.requests {
                    return part;
                }
                let user = config.user(i);
                let wait = wait_for_pass(
                    &http,
                    &gateway,
                    config.activity,
                    user,
                    started,
                    Duration::from_secs(900),
                )
                .await;
                let key = match wait {
                    Err(error) => format!("no answer from the room ({error})"),
                    Ok(outcome) => {
                        part.polls += u64::from(outcome.polls);
                        let key = match &outcome.answer {
                            Answer::Admitted { pass, .. } => {
                                part.waits.push(outcome.waited);
                                Some(
                                    buy_once(
                                        &http, &gateway, &config, user, pass, started, &progress,
                                        &mut part,
                                    )
                                    .await,
                                )
                            }
                            Answer::Refused { status, code } => {
                                Some(format!("{status} {code} (waiting room)"))
                            }
                            Answer::Waiting { .. } => None,
                        };
                        part.endings.push(outcome);
                        key.unwrap_or_else(|| "still waiting".to_owned())
                    }
                };
                progress.buyers_done.fetch_add(1, Ordering::Relaxed);
                *part.outcomes.entry(key).or_default() += 1;
            }
        }));
    }
    let mut report = LoadReport {
        requests: config.requests,
        started: Some(started),
        ..LoadReport::default()
    };
    let mut figures = RoomFigures {
        rate,
        buyers: config.requests,
        ..RoomFigures::default()
    };
    let mut latencies = Vec::new();
    let mut waits = Vec::new();
    let mut endings = Vec::new();
    for w in workers {
        let part = w.await.expect("a room worker does not panic");
        latencies.extend(part.latencies);
        waits.extend(part.waits);
        endings.extend(part.endings);
        report.accepted.extend(part.accepted);
        report.accepted_at.extend(part.accepted_at);
        report.answers.extend(part.answers);
        report.retries += part.retries;
        report.transport_errors += part.transport_errors;
        figures.polls += part.polls;
        for (k, n) in part.outcomes {
            *report.outcomes.entry(k).or_default() += n;
        }
    }
    report.elapsed = started.elapsed();
    report.latency_ms = percentiles(&mut latencies, &[0.5, 0.9, 0.99, 1.0])
        .try_into()
        .expect("four percentiles");
    figures.wait_ms = percentiles(&mut waits, &[0.5, 0.99, 1.0])
        .try_into()
        .expect("three percentiles");
    let outcomes = endings;
    for o in &outcomes {
        match &o.answer {
            Answer::Admitted { .. } => figures.admitted += 1,
            Answer::Refused { code, .. } if code == "SOLD_OUT" => figures.told_sold_out += 1,
            Answer::Refused { status, code } => {
                *figures
                    .other_endings
                    .entry(format!("{status} {code}"))
                    .or_default() += 1
            }
            Answer::Waiting { .. } => {}
        }
    }
    figures.out_of_order_share = out_of_order_share(&outcomes, ORDER_TOLERANCE);
    let answered: Vec<u64> = report
        .accepted_at
        .iter()
        .map(|at| at.duration_since(started).as_millis() as u64)
        .collect();
    figures.peak_accepted_per_sec = peak_per_second(&answered);
    // An admission's instant on the room's clock is its pass' expiry, less one lifetime for
    // all: the spacing is what counts. Twins (one buyer joining twice) hold one admission.
    let admitted: BTreeMap<i64, u64> = outcomes
        .iter()
        .filter_map(|o| match o.answer {
            Answer::Admitted { expires_at, .. } => Some((o.user, expires_at)),
            _ => None,
        })
        .collect();
    figures.peak_admitted_per_sec = peak_per_second(&admitted.into_values().collect::<Vec<_>>());
    (report, figures)
}

/// A buy with the pass, retried on a 429 or 5xx (the pass is not spent by those) for
/// `config.retry_ms`; returns the outcome's key, as the plain sale writes it.
#[allow(clippy::too_many_arguments)]
async fn buy_once(
    http: &reqwest::Client,
    gateway: &str,
    config: &SaleConfig,
    user: i64,
    pass: &str,
    started: Instant,
    progress: &LoadProgress,
    part: &mut RoomPart,
) -> String {
    let give_up = Instant::now() + Duration::from_millis(config.retry_ms);
    loop {
        let t = Instant::now();
        let answer = buy(http, gateway, config.activity, user, Some(pass)).await;
        let latency = t.elapsed();
        part.answers.push(LoadAnswer {
            at_ms: (t + latency - started).as_millis() as u32,
            latency_us: latency.as_micros().min(u32::MAX as u128) as u32,
            kind: match &answer {
                Ok((status, _)) => AnswerKind::of_status(*status),
                Err(_) => AnswerKind::NoAnswer,
            },
        });
        let retryable =
            answer.as_ref().is_ok_and(|(s, _)| *s == 429 || *s >= 500) || answer.is_err();
        if retryable && Instant::now() < give_up {
            part.retries += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        let Ok((status, body)) = answer else {
            part.transport_errors += 1;
            return "no answer (transport error)".to_owned();
        };
        part.latencies.push(latency);
        progress.record(latency);
        return match (status, body.get("code").and_then(Value::as_str)) {
            (202, _) => {
                if let Some(no) = body.get("orderNo").and_then(Value::as_str) {
                    part.accepted.push((no.to_owned(), user));
                    part.accepted_at.push(Instant::now());
                    progress.accepted.fetch_add(1, Ordering::Relaxed);
                }
                "202 ACCEPTED".to_owned()
            }
            (s, Some(code)) => format!("{s} {code}"),
            (s, None) => format!("{s} (no error code)"),
        };
    }
}

#[derive(Default)]
struct RoomPart {
    latencies: Vec<Duration>,
    waits: Vec<Duration>,
    /// Every wait that ended with an answer (each [`Outcome`] carries its join time).
    endings: Vec<Outcome>,
    outcomes: BTreeMap<String, usize>,
    accepted: Vec<(String, i64)>,
    accepted_at: Vec<Instant>,
    answers: Vec<LoadAnswer>,
    polls: u64,
    retries: usize,
    transport_errors: usize,
}

/// The `qs` quantiles of `values`, in ms.
fn percentiles(values: &mut [Duration], qs: &[f64]) -> Vec<f64> {
    values.sort_unstable();
    qs.iter()
        .map(|q| {
            values
                .get(((values.len() as f64 * q) as usize).min(values.len().saturating_sub(1)))
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        })
        .collect()
}

/// The most instants (ms) within any one second.
pub fn peak_per_second(instants_ms: &[u64]) -> usize {
    let mut sorted = instants_ms.to_vec();
    sorted.sort_unstable();
    let mut peak = 0;
    let mut from = 0;
    for (to, at) in sorted.iter().enumerate() {
        while *at - sorted[from] >= 1000 {
            from += 1;
        }
        peak = peak.max(to - from + 1);
    }
    peak
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admitted(user: i64, joined_ms: u64, admitted_ms: u64) -> Outcome {
        Outcome {
            user,
            joined: Duration::from_millis(joined_ms),
            waited: Duration::ZERO,
            admitted_at: None,
            answer: Answer::Admitted {
                pass: String::new(),
                expires_at: admitted_ms,
            },
            polls: 0,
        }
    }

    #[test]
    fn out_of_order_counts_overtakers_beyond_the_tolerance_and_twins_once() {
        let fifo = [
            admitted(1, 0, 10),
            admitted(2, 100, 20),
            admitted(3, 200, 30),
        ];
        assert_eq!(out_of_order_share(&fifo, Duration::ZERO), 0.0);
        // 3 joined last and was admitted first: it overtook both.
        let overtaken = [
            admitted(1, 0, 20),
            admitted(2, 100, 30),
            admitted(3, 200, 10),
        ];
        assert!((out_of_order_share(&overtaken, Duration::ZERO) - 1.0 / 3.0).abs() < 1e-9);
        // Within the tolerance, an inversion is not counted.
        let close = [admitted(1, 0, 20), admitted(2, 10, 10)];
        assert_eq!(out_of_order_share(&close, Duration::from_millis(50)), 0.0);
        assert_eq!(out_of_order_share(&close, Duration::ZERO), 0.5);
        // A buyer who joined twice counts by the first join.
        let twins = [
            admitted(1, 0, 10),
            admitted(2, 100, 20),
            admitted(1, 300, 10),
        ];
        assert_eq!(out_of_order_share(&twins, Duration::ZERO), 0.0);
    }

    #[test]
    fn the_peak_is_the_most_within_one_second() {
        assert_eq!(peak_per_second(&[]), 0);
        assert_eq!(peak_per_second(&[0, 500, 999, 1000, 1500, 2600]), 3);
    }
}
