//! The sale's report as one self-contained HTML page (docs/report.md): charts over the run's
//! timeline drawn by `plotters` into inline SVG, and tables of the invariant check, the phases,
//! the settings and the machine. Also the sampler that polls the stores while the run goes on.
//!
//! The page carries a small script that checks, once the browser has laid it out, that every
//! chart drew each of its series, and writes the verdict into `#render-check`: the browser test
//! reads it from the DOM.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use plotters::prelude::*;
use tokio_util::sync::CancellationToken;

use flash_sale_common::api;

use crate::prometheus::PrometheusApi;
use crate::scenario::{AnswerKind, InvariantReport, LoadReport, Stores};

/// What the stores held at one moment of the run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// Since the run's origin.
    pub at: Duration,
    pub stock: i64,
    pub orders: i64,
    pub paid: i64,
    /// Reservations Redis holds that are not in MySQL yet: the order queue, in orders.
    pub queue: i64,
}

/// Polls the stores of one activity every [`Sampler::EVERY`] until stopped.
pub struct Sampler {
    latest: Arc<Mutex<Option<Sample>>>,
    samples: Arc<Mutex<Vec<Sample>>>,
    failures: Arc<Mutex<usize>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    pub const EVERY: Duration = Duration::from_millis(500);

    pub fn start(stores: Stores, activity: i64, origin: Instant) -> Self {
        let latest = Arc::new(Mutex::new(None));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let failures = Arc::new(Mutex::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (latest, samples, failures, stop) = (
                latest.clone(),
                samples.clone(),
                failures.clone(),
                stop.clone(),
            );
            async move {
                let mut tick = tokio::time::interval(Self::EVERY);
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    match sample(&stores, activity, origin).await {
                        Ok(s) => {
                            *latest.lock().expect("sampler lock") = Some(s);
                            samples.lock().expect("sampler lock").push(s);
                        }
                        // A store briefly unreachable: a gap in the charts, not a failed run.
                        Err(_) => *failures.lock().expect("sampler lock") += 1,
                    }
                }
            }
        });
        Self {
            latest,
            samples,
            failures,
            stop,
            task,
        }
    }

    /// The last sample taken, if any (the live view).
    pub fn latest(&self) -> Option<Sample> {
        *self.latest.lock().expect("sampler lock")
    }

    /// Stops sampling; the samples and how many failed.
    pub async fn stop(self) -> (Vec<Sample>, usize) {
        self.stop.cancel();
        let _ = self.task.await;
        let samples = std::mem::take(&mut *self.samples.lock().expect("sampler lock"));
        let failures = *self.failures.lock().expect("sampler lock");
        (samples, failures)
    }
}

async fn sample(stores: &Stores, activity: i64, origin: Instant) -> anyhow::Result<Sample> {
    let at = origin.elapsed();
    Ok(Sample {
        at,
        stock: stores.redis_stock(activity).await?,
        orders: stores.order_count(activity).await?,
        paid: stores.order_count_in_status(activity, 1).await?,
        queue: stores.pending(activity).await?,
    })
}

/// A stretch of the run with a name (the sale, the drain...), shaded on every chart.
#[derive(Debug, Clone)]
pub struct Phase {
    pub name: String,
    pub start: Duration,
    pub end: Duration,
}

/// Everything the page shows.
pub struct RunReport<'a> {
    pub title: String,
    /// The run's settings, as (name, value).
    pub settings: Vec<(String, String)>,
    pub phases: Vec<Phase>,
    /// The loads with their name, each placed on the timeline by its own start.
    pub loads: Vec<(String, &'a LoadReport)>,
    pub samples: Vec<Sample>,
    pub failed_samples: usize,
    pub invariants: &'a InvariantReport,
    /// When the run began (the origin of the timeline).
    pub origin: Instant,
    /// Other facts worth a line (the after-sale figures...).
    pub notes: Vec<(String, String)>,
}

/// The answer charts' interval: about 150 over the run, 0.1 s at least.
fn interval_of(run: Duration) -> Duration {
    let ms = (run.as_millis() / 150).max(100);
    Duration::from_millis((ms / 100 * 100) as u64)
}

/// One chart's lines: a label, a colour, points (seconds, value).
type Series = (String, RGBColor, Vec<(f64, f64)>);

const COLOURS: [RGBColor; 6] = [
    RGBColor(0x1b, 0x9e, 0x77),
    RGBColor(0xd9, 0x5f, 0x02),
    RGBColor(0x75, 0x70, 0xb3),
    RGBColor(0xe7, 0x29, 0x8a),
    RGBColor(0x66, 0xa6, 0x1e),
    RGBColor(0x44, 0x44, 0x44),
];

impl RunReport<'_> {
    /// Answers per interval over the run, by kind, and the latency percentiles per interval.
    fn answer_series(&self) -> (Vec<Series>, Vec<Series>) {
        let end = self.end();
        let interval = interval_of(end);
        let intervals = (end.as_millis() / interval.as_millis()) as usize + 1;
        let mut counts = vec![[0u64; AnswerKind::ALL.len()]; intervals];
        let mut latencies: Vec<Vec<u32>> = vec![Vec::new(); intervals];
        for (_, load) in &self.loads {
            let Some(started) = load.started else {
                continue;
            };
            let offset = started.saturating_duration_since(self.origin);
            for answer in &load.answers {
                let at = offset + Duration::from_millis(answer.at_ms.into());
                let i = ((at.as_millis() / interval.as_millis()) as usize).min(intervals - 1);
                let kind = AnswerKind::ALL
                    .iter()
                    .position(|k| *k == answer.kind)
                    .expect("every kind is in ALL");
                counts[i][kind] += 1;
                // The time until a transport error is no latency.
                if answer.kind != AnswerKind::NoAnswer {
                    latencies[i].push(answer.latency_us);
                }
            }
        }
        let per_sec = 1.0 / interval.as_secs_f64();
        let x = |i: usize| (i as f64 + 0.5) * interval.as_secs_f64();
        let rates = AnswerKind::ALL
            .iter()
            .enumerate()
            .filter(|(k, _)| counts.iter().any(|c| c[*k] > 0))
            .map(|(k, kind)| {
                let points = (0..intervals)
                    .map(|i| (x(i), counts[i][k] as f64 * per_sec))
                    .collect();
                (kind.label().to_owned(), COLOURS[k], points)
            })
            .collect();
        let mut percentiles: Vec<Series> = [("p50", 0.50), ("p90", 0.90), ("p99", 0.99)]
            .iter()
            .enumerate()
            .map(|(c, (label, _))| ((*label).to_owned(), COLOURS[c], Vec::new()))
            .collect();
        for (i, mut l) in latencies.into_iter().enumerate() {
            if l.is_empty() {
                continue;
            }
            l.sort_unstable();
            for (series, q) in percentiles.iter_mut().zip([0.50, 0.90, 0.99]) {
                let at = ((l.len() as f64 * q) as usize).min(l.len() - 1);
                series.2.push((x(i), f64::from(l[at]) / 1000.0));
            }
        }
        (rates, percentiles)
    }

    /// The end of the run's last phase.
    fn end(&self) -> Duration {
        self.phases.iter().map(|p| p.end).max().unwrap_or_default()
    }

    fn sample_series(&self, pick: impl Fn(&Sample) -> i64, label: &str, colour: usize) -> Series {
        let points = self
            .samples
            .iter()
            .map(|s| (s.at.as_secs_f64(), pick(s) as f64))
            .collect();
        (label.to_owned(), COLOURS[colour], points)
    }

    /// The page.
    pub fn html(&self) -> String {
        let (rates, percentiles) = self.answer_series();
        let latency_title = format!(
            "Latency per {:.1} s interval",
            interval_of(self.end()).as_secs_f64()
        );
        let charts = [
            (
                "Answers per second, by kind (retried tries included)",
                "answers/s",
                rates,
            ),
            (latency_title.as_str(), "ms", percentiles),
            (
                "Stock left in Redis",
                "items",
                vec![self.sample_series(|s| s.stock, "stock", 0)],
            ),
            (
                "Orders in MySQL",
                "orders",
                vec![
                    self.sample_series(|s| s.orders, "all", 2),
                    self.sample_series(|s| s.paid, "paid", 1),
                ],
            ),
            (
                "Order queue (reserved in Redis, not yet in MySQL)",
                "orders",
                vec![self.sample_series(|s| s.queue, "queue", 3)],
            ),
        ];
        let mut page = Page::new(&self.title);
        page.verdict(self.invariants.all_hold());
        page.heading("Timeline");
        let axis = Axis {
            desc: "seconds since the run began",
            start: 0.0,
            end: self.end().as_secs_f64(),
            phases: &self.phases,
        };
        for (title, unit, series) in &charts {
            page.chart(title, unit, &axis, series);
        }
        page.invariants(
            self.invariants
                .rows()
                .into_iter()
                .map(|(name, ok, detail)| (name, Some(ok), detail))
                .collect(),
        );
        page.table(
            "Phases",
            &["phase", "from, s", "to, s"],
            self.phases
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        format!("{:.1}", p.start.as_secs_f64()),
                        format!("{:.1}", p.end.as_secs_f64()),
                    ]
                })
                .collect(),
        );
        for (name, load) in &self.loads {
            page.heading(name);
            page.paragraph(&format!(
                "{} requests in {:.2} s = {:.0} requests/s; latency ms p50 {:.1}, p90 {:.1}, p99 {:.1}, max {:.1}; {} tries repeated, {} without an answer",
                load.requests,
                load.elapsed.as_secs_f64(),
                load.throughput(),
                load.latency_ms[0],
                load.latency_ms[1],
                load.latency_ms[2],
                load.latency_ms[3],
                load.retries,
                load.transport_errors
            ));
            page.table(
                "",
                &["outcome", "count"],
                load.outcomes
                    .iter()
                    .map(|(k, n)| vec![k.clone(), n.to_string()])
                    .collect(),
            );
        }
        page.pairs("After the sale", &self.notes);
        page.pairs("Settings", &self.settings);
        page.pairs("Machine", &machine());
        page.finish(&format!(
            "{} samples of the stores every {} ms ({} failed).",
            self.samples.len(),
            Sampler::EVERY.as_millis(),
            self.failed_samples
        ))
    }
}

/// A finished activity's report, from MySQL and Redis alone (`cargo xtask report --activity N`):
/// what sold, a timeline from the orders' own timestamps, the drift between Redis and MySQL,
/// and the invariants that can be checked after the fact.
#[derive(Debug, Clone)]
pub struct ActivityReport {
    pub activity: i64,
    /// The timeline's bucket: a minute, or a second for an activity shorter than ten minutes.
    pub bucket_secs: i64,
    /// Per bucket from the first order's: orders created, paid, closed (cancelled or expired).
    pub timeline: Vec<[i64; 3]>,
    pub first_order: Option<String>,
    pub revenue_cents: i64,
    pub invariants: InvariantReport,
    /// What a reconcile pass answered, when the caller ran one (`--repair`).
    pub repair: Option<String>,
    /// The first and the last order timestamp (created, paid or closed), unix seconds.
    pub first_order_at: Option<i64>,
    pub last_order_at: Option<i64>,
    /// The figures of a Prometheus, when the caller read one (`--prometheus-url`).
    pub prometheus: Option<PrometheusFigures>,
}

impl ActivityReport {
    /// Reads the activity; an activity MySQL does not know is an error.
    pub async fn build(stores: &Stores, activity: i64) -> anyhow::Result<Self> {
        let stock: Option<(i64,)> =
            sqlx::query_as("SELECT CAST(stock AS SIGNED) FROM inventory WHERE activity_id = ?")
                .bind(activity)
                .fetch_optional(&stores.db)
                .await?;
        let Some((mysql_stock,)) = stock else {
            anyhow::bail!("MySQL has no activity {activity}");
        };
        let (live, revenue, first, last): (i64, i64, Option<i64>, Option<i64>) = sqlx::query_as(
            "SELECT CAST(COALESCE(SUM(CASE WHEN status IN (0, 1) THEN quantity END), 0) AS SIGNED), \
                    CAST(COALESCE(SUM(CASE WHEN status = 1 THEN amount_cents END), 0) AS SIGNED), \
                    CAST(MIN(UNIX_TIMESTAMP(create_time)) AS SIGNED), \
                    CAST(MAX(UNIX_TIMESTAMP(GREATEST(create_time, COALESCE(paid_at, create_time), COALESCE(closed_at, create_time)))) AS SIGNED) \
             FROM orders WHERE activity_id = ?",
        )
        .bind(activity)
        .fetch_one(&stores.db)
        .await?;
        let span = match (first, last) {
            (Some(f), Some(l)) => l - f,
            _ => 0,
        };
        let bucket_secs = if span >= 600 { 60 } else { 1 };
        let origin = first.unwrap_or(0);
        // One empty bucket on each side, so that even a one-second sale draws a line.
        let buckets = (span / bucket_secs + 3) as usize;
        let mut timeline = vec![[0i64; 3]; buckets];
        for (column, at) in ["create_time", "paid_at", "closed_at"].iter().enumerate() {
            let rows: Vec<(i64, i64)> = sqlx::query_as(&format!(
                "SELECT CAST(FLOOR((UNIX_TIMESTAMP({at}) - ?) / ?) AS SIGNED) AS b, COUNT(*) \
                 FROM orders WHERE activity_id = ? AND {at} IS NOT NULL GROUP BY b"
            ))
            .bind(origin)
            .bind(bucket_secs)
            .bind(activity)
            .fetch_all(&stores.db)
            .await?;
            for (b, n) in rows {
                let i = (b + 1).clamp(0, buckets as i64 - 1) as usize;
                timeline[i][column] += n;
            }
        }
        let orders: Vec<(String, i64)> =
            sqlx::query_as("SELECT order_no, user_id FROM orders WHERE activity_id = ?")
                .bind(activity)
                .fetch_all(&stores.db)
                .await?;
        // The stock ever on sale is not kept apart: MySQL's stock plus its live orders.
        let invariants = stores
            .check_invariants(activity, mysql_stock + live, &orders)
            .await?;
        let first_order = match first {
            Some(f) => chrono::DateTime::from_timestamp(f, 0).map(|t| t.to_rfc3339()),
            None => None,
        };
        Ok(Self {
            activity,
            bucket_secs,
            timeline,
            first_order,
            revenue_cents: revenue,
            invariants,
            repair: None,
            first_order_at: first,
            last_order_at: last,
            prometheus: None,
        })
    }

    /// Reads the sale's figures from the Prometheus at `url` over the activity's time range
    /// ([`PrometheusFigures`]). Any error (unreachable, an HTTP error, a query refused) names the
    /// URL and leaves the report as it was.
    pub async fn read_prometheus(&mut self, url: &str) -> anyhow::Result<()> {
        let (Some(first), Some(last)) = (self.first_order_at, self.last_order_at) else {
            anyhow::bail!(
                "activity {} has no orders: no time range to ask Prometheus about",
                self.activity
            );
        };
        let api = PrometheusApi::new(url);
        self.prometheus = Some(PrometheusFigures::read(&api, self.activity, first, last).await?);
        Ok(())
    }

    /// Redis' stock minus MySQL's, once nothing is in flight between them (0: no drift).
    pub fn drift(&self) -> i64 {
        self.invariants.redis_stock - self.invariants.mysql_stock
    }

    /// The invariants as they can be checked after the sale, without the buyers' answers.
    pub fn rows(&self) -> Vec<(&'static str, Option<bool>, String)> {
        let r = &self.invariants;
        r.rows()
            .into_iter()
            .map(|(name, ok, detail)| match name {
                "1 no oversell" => (
                    name,
                    Some(r.mysql_stock >= 0 && r.redis_stock >= 0),
                    format!(
                        "MySQL stock {} and Redis stock {} not below 0 ({} live ordered)",
                        r.mysql_stock, r.redis_stock, r.ordered
                    ),
                ),
                "2 no lost order" => (
                    name,
                    None,
                    "needs the buyers' answers: checked by the run that made the sale (cargo xtask sale, the drills)".to_owned(),
                ),
                "4 conservation" => (
                    name,
                    Some(ok),
                    format!(
                        "Redis stock {} against MySQL's {} (drift {}), {} reservations pending, {} returns not in Redis",
                        r.redis_stock, r.mysql_stock, self.drift(), r.pending, r.unapplied_returns
                    ),
                ),
                _ => (name, Some(ok), detail),
            })
            .collect()
    }

    pub fn all_hold(&self) -> bool {
        self.rows().iter().all(|(_, ok, _)| ok.unwrap_or(true))
    }

    pub fn html(&self) -> String {
        let unit = if self.bucket_secs == 60 {
            "minute"
        } else {
            "second"
        };
        let mut page = Page::new(&format!("flash-sale: activity {}", self.activity));
        page.verdict(self.all_hold());
        // Bucket 0 is the empty one before the first order's.
        let x = |i: usize| i as f64 - 1.0;
        let series: Vec<Series> = ["created", "paid", "closed (cancelled or expired)"]
            .iter()
            .enumerate()
            .map(|(c, label)| {
                let points = self
                    .timeline
                    .iter()
                    .enumerate()
                    .map(|(i, row)| (x(i), row[c] as f64))
                    .collect();
                ((*label).to_owned(), COLOURS[c], points)
            })
            .collect();
        let desc = format!("{unit}s since the first order");
        let axis = Axis {
            desc: &desc,
            start: -1.0,
            end: x(self.timeline.len() - 1),
            phases: &[],
        };
        page.heading("Timeline");
        page.chart(
            &format!("Orders per {unit}, from their timestamps"),
            "orders",
            &axis,
            &series,
        );
        page.invariants(self.rows());
        let r = &self.invariants;
        let mut facts = vec![
            (
                "first order".to_owned(),
                self.first_order.clone().unwrap_or_else(|| "none".into()),
            ),
            (
                "stock ever on sale (MySQL's stock + live orders)".into(),
                r.initial_stock.to_string(),
            ),
            ("sold (live orders)".into(), r.ordered.to_string()),
            ("orders".into(), r.orders.to_string()),
            ("paid".into(), r.paid.to_string()),
            ("cancelled".into(), r.cancelled.to_string()),
            ("expired".into(), r.expired.to_string()),
            (
                "revenue".into(),
                format!("{:.2}", self.revenue_cents as f64 / 100.0),
            ),
            ("stock left in MySQL".into(), r.mysql_stock.to_string()),
            ("stock left in Redis".into(), r.redis_stock.to_string()),
            ("drift (Redis minus MySQL)".into(), self.drift().to_string()),
        ];
        if let Some(repair) = &self.repair {
            facts.push(("reconcile pass (--repair)".into(), repair.clone()));
        }
        page.pairs("The activity", &facts);
        let footer = match &self.prometheus {
            Some(figures) => {
                figures.section(&mut page, first_order_x(self), self.bucket_secs);
                format!(
                    "From MySQL and Redis, after the sale, and from Prometheus at {}.",
                    figures.url
                )
            }
            None => "From MySQL and Redis, after the sale.".to_owned(),
        };
        page.finish(&footer)
    }
}

/// The unix second at x = 0 of the activity's charts (its first order's).
fn first_order_x(report: &ActivityReport) -> i64 {
    report.first_order_at.unwrap_or(0)
}

/// The page's group of the Prometheus charts: the check lets some of them be empty, not all.
const PROMETHEUS_GROUP: &str = "Prometheus";

/// What an empty Prometheus chart says.
pub const PROMETHEUS_NO_DATA: &str = "no data in Prometheus for this range";

/// The margin the Prometheus range gets either side of the orders' timestamps: half a minute, or
/// a tenth of a longer activity.
fn prometheus_margin(span_secs: i64) -> i64 {
    (span_secs / 10).max(30)
}

/// A Prometheus chart: its lines, each a label and points (unix seconds, value).
#[derive(Debug, Clone)]
pub struct PromChart {
    pub title: String,
    pub unit: &'static str,
    pub lines: Vec<(String, Vec<(f64, f64)>)>,
}

impl PromChart {
    /// No line with two points to draw: "no data in Prometheus for this range".
    pub fn is_empty(&self) -> bool {
        self.lines.iter().all(|(_, points)| points.len() < 2)
    }
}

/// A counter's increase over the range, for one value of the figure's label.
#[derive(Debug, Clone, PartialEq)]
pub struct PromTotal {
    pub figure: &'static str,
    pub series: String,
    pub total: f64,
}

/// The sale as the services' own metrics saw it, read from a Prometheus over the activity's time
/// range (its first to last order timestamp, [`prometheus_margin`] either side, up to now):
/// series as the monitoring bundle labels them (`service` is the Kubernetes service's name).
#[derive(Debug, Clone)]
pub struct PrometheusFigures {
    pub url: String,
    /// The range, unix seconds.
    pub start: f64,
    pub end: f64,
    pub step: Duration,
    /// The `rate()` window: four scrape intervals, two steps at least.
    pub window: Duration,
    pub charts: Vec<PromChart>,
    /// The counters' increases over the range: raw samples, resets counted, a series that
    /// appears within the range counted from zero (not `increase()`, which extrapolates).
    pub totals: Vec<PromTotal>,
}

/// One query of a Prometheus chart: PromQL, the label naming its lines (`=name`: one line of
/// that name), the scale of its values (seconds to ms).
type Query = (String, &'static str, f64);

/// What the totals table counts: a name, a counter selector, the label its rows are by
/// (`None`: one row).
struct Counted {
    figure: &'static str,
    selector: String,
    by: Option<&'static str>,
}

impl PrometheusFigures {
    /// Reads every figure; the first error fails it all (no half section).
    pub async fn read(
        api: &PrometheusApi,
        activity: i64,
        first_order: i64,
        last_order: i64,
    ) -> anyhow::Result<Self> {
        let margin = prometheus_margin(last_order - first_order);
        let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        let start = (first_order - margin) as f64;
        let end = ((last_order + margin) as f64).min(now).max(start + 1.0);
        // About 240 points over the range, a second apart at least.
        let step = Duration::from_secs((((end - start) / 240.0).ceil() as u64).max(1));
        let scrape = api
            .scrape_interval()
            .await?
            .unwrap_or(Duration::from_secs(15));
        let window = (scrape * 4).max(step * 2);
        let w = format!("{}s", window.as_secs().max(1));

        let gateway = "service=\"gateway\"";
        let order = "service=\"order-service\"";
        let orders_route = format!("route=\"{}{{*rest}}\"", api::order::PREFIX);
        let resource = format!("resource=\"activity:{activity}\"");
        let of_activity = format!("activity=\"{activity}\"");
        // (title, unit, [(query, label of its lines, or the one line's name, scale)])
        let charts: Vec<(String, &'static str, Vec<Query>)> = vec![
            (
                format!(
                    "Gateway: buy requests/s for activity {activity}, passed or refused by reason"
                ),
                "requests/s",
                vec![
                    (
                        format!(
                            "sum(rate(gateway_flow_passed_total{{{gateway},{resource}}}[{w}]))"
                        ),
                        "=passed",
                        1.0,
                    ),
                    (
                        format!(
                            "sum by (reason) (rate(gateway_flow_blocked_total{{{gateway},{resource}}}[{w}]))"
                        ),
                        "reason",
                        1.0,
                    ),
                ],
            ),
            (
                "Gateway: answers/s on order-service's routes, by status".to_owned(),
                "answers/s",
                vec![(
                    format!(
                        "sum by (status) (rate(http_requests_total{{{gateway},{orders_route}}}[{w}]))"
                    ),
                    "status",
                    1.0,
                )],
            ),
            (
                format!(
                    "order-service: create-order answers/s for activity {activity}, by outcome"
                ),
                "answers/s",
                vec![(
                    format!(
                        "sum by (outcome) (rate(flash_sale_orders_total{{{order},{of_activity}}}[{w}]))"
                    ),
                    "outcome",
                    1.0,
                )],
            ),
            (
                "P99 latency, from the histograms".to_owned(),
                "ms",
                vec![
                    (
                        format!(
                            "histogram_quantile(0.99, sum by (le) (rate(http_request_duration_seconds_bucket{{{gateway},{orders_route}}}[{w}])))"
                        ),
                        "=gateway, order-service's routes",
                        1000.0,
                    ),
                    (
                        format!(
                            "histogram_quantile(0.99, sum by (le) (rate(flash_sale_order_create_duration_seconds_bucket{{{order}}}[{w}])))"
                        ),
                        "=order-service, create order",
                        1000.0,
                    ),
                ],
            ),
            (
                "Order consumer lag (messages behind the topic's end)".to_owned(),
                "messages",
                vec![(
                    format!("sum(flash_sale_consumer_lag{{{order}}})"),
                    "=lag",
                    1.0,
                )],
            ),
        ];
        let mut read = Vec::new();
        for (title, unit, queries) in charts {
            let mut lines = Vec::new();
            for (query, label, scale) in queries {
                let mut series = api.query_range(&query, start, end, step).await?;
                series.sort_by(|a, b| a.label(label).cmp(b.label(label)));
                for s in series {
                    let name = match label.strip_prefix('=') {
                        Some(name) => name.to_owned(),
                        None => s.label(label).to_owned(),
                    };
                    let points = s.points.iter().map(|&(t, v)| (t, v * scale)).collect();
                    lines.push((name, points));
                }
            }
            read.push(PromChart { title, unit, lines });
        }

        let counted = [
            Counted {
                figure: "gateway: passed (activity)",
                selector: format!("gateway_flow_passed_total{{{gateway},{resource}}}"),
                by: None,
            },
            Counted {
                figure: "gateway: refused (activity), by reason",
                selector: format!("gateway_flow_blocked_total{{{gateway},{resource}}}"),
                by: Some("reason"),
            },
            Counted {
                figure: "gateway: answers on order-service's routes, by status",
                selector: format!("http_requests_total{{{gateway},{orders_route}}}"),
                by: Some("status"),
            },
            Counted {
                figure: "order-service: create-order answers (activity), by outcome",
                selector: format!("flash_sale_orders_total{{{order},{of_activity}}}"),
                by: Some("outcome"),
            },
        ];
        let mut totals = Vec::new();
        for c in counted {
            // The raw samples of the range, and five minutes before it for each series' baseline.
            let lookback = (end - start).ceil() as u64 + 300;
            let series = api
                .query(&format!("{}[{lookback}s]", c.selector), Some(end))
                .await?;
            let mut rows: std::collections::BTreeMap<String, f64> = Default::default();
            for s in &series {
                let key = c.by.map_or(String::new(), |l| s.label(l).to_owned());
                *rows.entry(key).or_default() += raw_increase(&s.points, start);
            }
            if rows.is_empty() && c.by.is_none() {
                rows.insert(String::new(), 0.0);
            }
            totals.extend(rows.into_iter().map(|(series, total)| PromTotal {
                figure: c.figure,
                series,
                total,
            }));
        }
        Ok(Self {
            url: api.base_url().to_owned(),
            start,
            end,
            step,
            window,
            charts: read,
            totals,
        })
    }

    /// The titles of the charts Prometheus had no data for.
    pub fn empty_charts(&self) -> Vec<&str> {
        self.charts
            .iter()
            .filter(|c| c.is_empty())
            .map(|c| c.title.as_str())
            .collect()
    }

    /// A total by its figure and series (`""` for a figure of one row); 0 when not counted.
    pub fn total(&self, figure_starts_with: &str, series: &str) -> f64 {
        self.totals
            .iter()
            .filter(|t| t.figure.starts_with(figure_starts_with) && t.series == series)
            .map(|t| t.total)
            .sum()
    }

    fn section(&self, page: &mut Page, first_order: i64, bucket_secs: i64) {
        let unit = if bucket_secs == 60 {
            "minute"
        } else {
            "second"
        };
        let x = |t: f64| (t - first_order as f64) / bucket_secs as f64;
        page.heading("From Prometheus");
        let when = |t: f64| {
            chrono::DateTime::from_timestamp(t as i64, 0).map_or(t.to_string(), |d| d.to_rfc3339())
        };
        page.paragraph(&format!(
            "Queried {} from {} to {} (the orders' first to last timestamp, a margin either side), every {} s, rates over {} s. Series as the monitoring bundle labels them (service = the Kubernetes service's name); the gateway's answers and the latencies are not per activity.",
            self.url,
            when(self.start),
            when(self.end),
            self.step.as_secs(),
            self.window.as_secs()
        ));
        let desc = format!("{unit}s since the first order");
        let axis = Axis {
            desc: &desc,
            start: x(self.start),
            end: x(self.end),
            phases: &[],
        };
        for chart in &self.charts {
            let series: Vec<Series> = chart
                .lines
                .iter()
                .enumerate()
                .map(|(i, (label, points))| {
                    let points = points.iter().map(|&(t, v)| (x(t), v)).collect();
                    (label.clone(), COLOURS[i % COLOURS.len()], points)
                })
                .collect();
            page.chart_in(
                &chart.title,
                chart.unit,
                &axis,
                &series,
                Some((PROMETHEUS_GROUP, PROMETHEUS_NO_DATA)),
            );
        }
        page.table(
            "",
            &["counted by Prometheus over the range", "series", "total"],
            self.totals
                .iter()
                .map(|t| {
                    vec![
                        t.figure.to_owned(),
                        if t.series.is_empty() {
                            "all".to_owned()
                        } else {
                            t.series.clone()
                        },
                        format!("{:.0}", t.total),
                    ]
                })
                .collect(),
        );
    }
}

/// A counter's increase after `start` from its raw samples (unix seconds, value): from the last
/// sample at or before `start`, or from zero for a series that appears after it; a drop is a
/// reset (a restarted process), after which the new value is all increase.
fn raw_increase(points: &[(f64, f64)], start: f64) -> f64 {
    let mut previous = points
        .iter()
        .take_while(|(t, _)| *t <= start)
        .last()
        .map_or(0.0, |(_, v)| *v);
    let mut total = 0.0;
    for &(_, v) in points.iter().filter(|(t, _)| *t > start) {
        total += if v >= previous { v - previous } else { v };
        previous = v;
    }
    total
}

/// The x axis every chart of a page shares.
struct Axis<'a> {
    desc: &'a str,
    start: f64,
    end: f64,
    phases: &'a [Phase],
}

/// An HTML page built section by section, with the render check at its end.
struct Page {
    html: String,
}

impl Page {
    fn new(title: &str) -> Self {
        let title = escape(title);
        let mut html = String::new();
        let _ = write!(
            html,
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\n<style>{STYLE}</style></head>\n<body>\n<h1>{title}</h1>\n"
        );
        Self { html }
    }

    fn verdict(&mut self, holds: bool) {
        self.html.push_str(if holds {
            "<p class=\"ok\">Every invariant checked holds.</p>\n"
        } else {
            "<p class=\"fail\">Invariants broken: see the table.</p>\n"
        });
        self.html
            .push_str("<p id=\"render-check\">the page's check has not run</p>\n");
    }

    fn heading(&mut self, text: &str) {
        let _ = writeln!(self.html, "<h2>{}</h2>", escape(text));
    }

    fn paragraph(&mut self, text: &str) {
        let _ = writeln!(self.html, "<p>{}</p>", escape(text));
    }

    /// A chart in a figure that lists the colours of the series it must show (the check).
    fn chart(&mut self, title: &str, unit: &str, axis: &Axis, series: &[Series]) {
        self.chart_in(title, unit, axis, series, None);
    }

    /// A chart, in a group whose charts may be empty as long as one is not (`Some((group, what
    /// an empty chart says))`), or on its own, which must draw (`None`).
    fn chart_in(
        &mut self,
        title: &str,
        unit: &str,
        axis: &Axis,
        series: &[Series],
        group: Option<(&str, &str)>,
    ) {
        let drawn: Vec<String> = series
            .iter()
            .filter(|s| s.2.len() >= 2)
            .map(|s| hex(s.1))
            .collect();
        let (group_attr, empty) = match group {
            Some((name, empty)) => (format!(" data-group=\"{}\"", escape(name)), empty),
            None => (String::new(), "no data"),
        };
        let _ = writeln!(
            self.html,
            "<figure class=\"chart\" data-title=\"{}\" data-series=\"{}\"{group_attr}>{}</figure>",
            escape(title),
            drawn.join(" "),
            chart(title, unit, axis, series, empty)
        );
    }

    /// The invariant table; `None`: not checkable here, with the reason as its detail.
    fn invariants(&mut self, rows: Vec<(&str, Option<bool>, String)>) {
        self.heading("Invariants");
        self.html
            .push_str("<table><tr><th></th><th>invariant</th><th>what was counted</th></tr>\n");
        for (name, ok, detail) in rows {
            let (class, mark) = match ok {
                Some(true) => ("ok", "ok"),
                Some(false) => ("fail", "FAIL"),
                None => ("na", "n/a"),
            };
            let _ = writeln!(
                self.html,
                "<tr class=\"{class}\"><td>{mark}</td><td>{}</td><td>{}</td></tr>",
                escape(name),
                escape(&detail)
            );
        }
        self.html.push_str("</table>\n");
    }

    fn table(&mut self, heading: &str, header: &[&str], rows: Vec<Vec<String>>) {
        if !heading.is_empty() {
            self.heading(heading);
        }
        self.html.push_str("<table><tr>");
        for h in header {
            let _ = write!(self.html, "<th>{}</th>", escape(h));
        }
        self.html.push_str("</tr>\n");
        for row in rows {
            self.html.push_str("<tr>");
            for cell in row {
                let _ = write!(self.html, "<td>{}</td>", escape(&cell));
            }
            self.html.push_str("</tr>\n");
        }
        self.html.push_str("</table>\n");
    }

    /// A table of (name, value), left out when empty.
    fn pairs(&mut self, heading: &str, rows: &[(String, String)]) {
        if rows.is_empty() {
            return;
        }
        self.table(
            heading,
            &[],
            rows.iter()
                .map(|(k, v)| vec![k.clone(), v.clone()])
                .collect(),
        );
    }

    fn finish(mut self, footer: &str) -> String {
        let _ = write!(
            self.html,
            "<p class=\"small\">{}</p>\n<script>{CHECK}</script>\n</body></html>\n",
            escape(footer)
        );
        self.html
    }
}

/// One chart as inline SVG: its series over the axis, the phases shaded behind them; `empty`
/// is written across a chart without a series to draw.
fn chart(title: &str, unit: &str, axis: &Axis, series: &[Series], empty: &str) -> String {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (960, 280)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let end = axis.end.max(axis.start + 1.0);
        let top = series
            .iter()
            .flat_map(|s| s.2.iter().map(|p| p.1))
            .fold(1.0, f64::max)
            * 1.1;
        let chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(32)
            .y_label_area_size(64)
            .build_cartesian_2d(axis.start..end, 0.0..top);
        let Ok(mut chart) = chart else {
            return svg_error(title);
        };
        let _ = chart
            .configure_mesh()
            .x_desc(axis.desc)
            .y_desc(unit)
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .draw();
        for (i, phase) in axis.phases.iter().enumerate() {
            let shade = if i % 2 == 0 {
                RGBColor(0xf2, 0xf6, 0xfb)
            } else {
                RGBColor(0xfb, 0xf7, 0xf0)
            };
            let _ = chart.draw_series(std::iter::once(Rectangle::new(
                [
                    (phase.start.as_secs_f64(), 0.0),
                    (phase.end.as_secs_f64(), top),
                ],
                shade.filled(),
            )));
            // A name only where it has room: a phase of a few pixels would print over the next.
            if (phase.end - phase.start).as_secs_f64() < (end - axis.start) * 0.06 {
                continue;
            }
            let _ = chart.draw_series(std::iter::once(Text::new(
                phase.name.clone(),
                (phase.start.as_secs_f64(), top * 0.97),
                ("sans-serif", 12)
                    .into_font()
                    .color(&RGBColor(0x88, 0x88, 0x88)),
            )));
        }
        let mut drawn = 0;
        for (label, colour, points) in series {
            if points.len() < 2 {
                continue;
            }
            drawn += 1;
            let colour = *colour;
            for (i, run) in runs(points).into_iter().enumerate() {
                let Ok(s) =
                    chart.draw_series(LineSeries::new(run.iter().copied(), colour.stroke_width(2)))
                else {
                    continue;
                };
                if i == 0 {
                    s.label(label.as_str()).legend(move |(x, y)| {
                        Rectangle::new([(x, y - 4), (x + 14, y + 4)], colour.filled())
                    });
                }
            }
        }
        if drawn == 0 {
            // Roughly centred: about 10 px a character at this size.
            let left = (480 - 5 * empty.len() as i32).max(8);
            let _ = root.draw(&Text::new(
                empty,
                (left, 140),
                ("sans-serif", 20).into_font(),
            ));
        } else {
            let _ = chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(0xcc, 0xcc, 0xcc))
                .position(SeriesLabelPosition::UpperRight)
                .draw();
        }
        let _ = root.present();
    }
    svg
}

/// The stretches of `points` without a gap: a gap (no data for more than three of the
/// series' steps) breaks the line rather than drawing a slope across it.
fn runs(points: &[(f64, f64)]) -> Vec<&[(f64, f64)]> {
    let step = points
        .windows(2)
        .map(|w| w[1].0 - w[0].0)
        .fold(f64::INFINITY, f64::min);
    let mut runs = Vec::new();
    let mut start = 0;
    for i in 1..points.len() {
        if points[i].0 - points[i - 1].0 > 3.0 * step {
            runs.push(&points[start..i]);
            start = i;
        }
    }
    runs.push(&points[start..]);
    runs
}

/// A colour as plotters writes it in SVG (`#1B9E77`).
fn hex(c: RGBColor) -> String {
    format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
}

fn svg_error(title: &str) -> String {
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"960\" height=\"40\"><text x=\"8\" y=\"24\">{}: the chart could not be drawn</text></svg>",
        escape(title)
    )
}

/// The machine the run ran on, from `/proc`.
fn machine() -> Vec<(String, String)> {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split(':').nth(1))
        .map_or("unknown".to_owned(), |m| m.trim().to_owned());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or("unknown".to_owned(), |kb| {
            format!("{:.1} GiB", kb as f64 / 1024.0 / 1024.0)
        });
    vec![
        ("CPU".into(), model),
        ("CPUs available".into(), cpus.to_string()),
        ("memory".into(), memory),
        (
            "kernel".into(),
            read("/proc/sys/kernel/osrelease").trim().to_owned(),
        ),
    ]
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const STYLE: &str = "body{font-family:sans-serif;margin:2em auto;max-width:1000px;color:#222}\
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:left}\
tr.ok td:first-child,p.ok{color:#1b7e3c}tr.na td:first-child{color:#777}tr.fail td,p.fail{color:#b00020;font-weight:bold}\
figure{margin:0 0 1em}p.small{color:#777;font-size:.9em}";

/// Finds, in each chart, the line each of its series drew (plotters draws a line series as one
/// `polyline` stroked in the series' colour; `data-series` lists the colours), laid out with a
/// width and at least two points, and says which chart misses one. A chart of a group
/// (`data-group`, the Prometheus charts) may have no series at all, unless every chart of its
/// group has none.
const CHECK: &str = r#"
(function () {
  var figures = document.querySelectorAll("figure.chart");
  var bad = [];
  var groups = {};
  var empty = [];
  figures.forEach(function (f) {
    var want = f.dataset.series.split(" ").filter(function (c) { return c.length > 0; });
    var group = f.dataset.group;
    if (group) {
      groups[group] = groups[group] || { all: 0, empty: [] };
      groups[group].all += 1;
      if (want.length < 1) {
        groups[group].empty.push(f.dataset.title);
        empty.push(f.dataset.title);
        return;
      }
    }
    var lines = want.filter(function (colour) {
      return Array.prototype.some.call(f.querySelectorAll("svg polyline"), function (p) {
        return (p.getAttribute("stroke") || "").toUpperCase() === colour
          && p.points.numberOfItems >= 2 && p.getBoundingClientRect().width > 0;
      });
    }).length;
    if (want.length < 1 || lines < want.length)
      bad.push(f.dataset.title + " (" + lines + " of " + want.length + " lines)");
  });
  Object.keys(groups).forEach(function (g) {
    if (groups[g].empty.length === groups[g].all)
      bad.push("every " + g + " chart is empty (" + groups[g].empty.join("; ") + ")");
  });
  var check = document.getElementById("render-check");
  check.textContent = bad.length > 0
    ? "render check failed: " + bad.join("; ")
    : empty.length === 0
      ? "render check: all " + figures.length + " charts drew their series"
      : "render check: " + (figures.length - empty.length) + " of " + figures.length
        + " charts drew their series; no data for: " + empty.join("; ");
  check.className = bad.length === 0 ? "ok" : "fail";
})();
"#;
