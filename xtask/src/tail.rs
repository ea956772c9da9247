//! `cargo xtask sale --compare-wrk`: where the main job's latency tail comes from. After the
//! sale, with the activity sold out, the same requests go to the gateway's sold-out short circuit
//! from the main job's own load tool (reqwest on tokio, in this process) and from `wrk` (C,
//! epoll, another process), alternating, two rounds each, in the same run and at the same
//! number of connections. What the gateway answers is the same; what differs is the client.

use std::process::Command;
use std::sync::Arc;

use anyhow::{Context, bail};
use flash_sale_common::api;
use flash_sale_tests::apps::http_client;
use flash_sale_tests::scenario::{SaleConfig, drive_sale_with};

/// Connections of both clients: under the gateway's 512 per address (wrk has one address).
const CONNECTIONS: usize = 500;
/// Requests of one round of the load tool (about as long as a wrk round at these rates).
const REQUESTS: usize = 60_000;
/// One wrk round.
const WRK_SECS: u64 = 4;

/// One round's figures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Round {
    pub(crate) requests_per_sec: f64,
    /// p50, p90, p99 in ms.
    pub(crate) latency_ms: [f64; 3],
}

/// Both clients, alternating: the rows for the report, printed as they come.
pub(crate) async fn compare(
    gateway_url: &str,
    activity: i64,
) -> anyhow::Result<Vec<(String, String)>> {
    let mut rows = Vec::new();
    println!(
        "\n4. the tail: the sold-out path from two clients, {CONNECTIONS} connections each, alternating"
    );
    for round in 1..=2 {
        let wrk = wrk(gateway_url, activity)?;
        let ours = load_tool(gateway_url, activity).await;
        for (name, r) in [("wrk", wrk), ("the load tool", ours)] {
            let line = format!(
                "{:>8.0} requests/s, p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms",
                r.requests_per_sec, r.latency_ms[0], r.latency_ms[1], r.latency_ms[2]
            );
            println!("  round {round}, {name:<13} {line}");
            rows.push((format!("round {round}, {name}"), line));
        }
    }
    Ok(rows)
}

async fn load_tool(gateway_url: &str, activity: i64) -> Round {
    let config = SaleConfig {
        activity,
        stock: 0,
        requests: REQUESTS,
        concurrency: CONNECTIONS,
        repeat_every: 0,
        first_user: 50_000_000,
        retry_ms: 0,
    };
    let load = drive_sale_with(
        std::slice::from_ref(&http_client()),
        gateway_url,
        &config,
        &Arc::default(),
    )
    .await;
    Round {
        requests_per_sec: load.throughput(),
        latency_ms: [load.latency_ms[0], load.latency_ms[1], load.latency_ms[2]],
    }
}

fn wrk(gateway_url: &str, activity: i64) -> anyhow::Result<Round> {
    let script = tempfile_script(activity)?;
    let out = Command::new("wrk")
        .args(["-t", "2", "-c", &CONNECTIONS.to_string()])
        .args([
            "-d",
            &format!("{WRK_SECS}s"),
            "--latency",
            "--timeout",
            "10s",
        ])
        .arg("-s")
        .arg(&script)
        .arg(format!("{gateway_url}{}", api::order::CREATE))
        .output()
        .context("running wrk")?;
    let _ = std::fs::remove_file(&script);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("wrk failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    }
    parse_wrk(&text).with_context(|| format!("reading wrk's output:\n{text}"))
}

fn tempfile_script(activity: i64) -> anyhow::Result<std::path::PathBuf> {
    let path = std::env::temp_dir().join(format!("flash-sale-wrk-{}.lua", std::process::id()));
    std::fs::write(
        &path,
        format!(
            "wrk.method = \"POST\"\nwrk.headers[\"Content-Type\"] = \"application/json\"\nwrk.body = '{{\"userId\":\"7\",\"activityId\":\"{activity}\",\"quantity\":1}}'\n"
        ),
    )?;
    Ok(path)
}

/// Reads `Requests/sec:` and the `--latency` distribution's 50, 90 and 99 % lines.
fn parse_wrk(text: &str) -> anyhow::Result<Round> {
    let rate = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .context("no Requests/sec line")?
        .trim()
        .parse()?;
    let pct = |p: &str| -> anyhow::Result<f64> {
        let value = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(p))
            .with_context(|| format!("no {p} line"))?
            .trim();
        duration_ms(value)
    };
    Ok(Round {
        requests_per_sec: rate,
        latency_ms: [pct("50%")?, pct("90%")?, pct("99%")?],
    })
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.01s`, `1.50m`.
fn duration_ms(value: &str) -> anyhow::Result<f64> {
    let split = value
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {value:?}"))?;
    let (n, unit) = value.split_at(split);
    let n: f64 = n.parse()?;
    Ok(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        _ => bail!("unknown unit in {value:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read_with_its_units() {
        let text = "Running 4s test @ http://127.0.0.1:1/x\n  2 threads and 500 connections\n  Latency Distribution\n     50%  812.00us\n     75%    1.50ms\n     90%    3.25ms\n     99%    1.02s\n  80000 requests in 4.00s, 12.00MB read\nRequests/sec:  20000.50\nTransfer/sec:      3.00MB\n";
        let r = parse_wrk(text).unwrap();
        assert_eq!(r.requests_per_sec, 20000.5);
        assert_eq!(r.latency_ms, [0.812, 3.25, 1020.0]);
        assert!(parse_wrk("Requests/sec: 1\n").is_err(), "no distribution");
        assert!(duration_ms("12").is_err());
        assert!(duration_ms("3h").is_err());
    }
}
