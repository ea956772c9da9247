//! `cargo xtask <command>`: the project's commands.
//!
//! - `sale`: the main job. Installs what is missing, builds the services, starts a private stack
//!   and the services, opens a sale, drives load at it through the public API, waits for the
//!   queue to drain and prints the report with the invariant check.
//! - `up [--foreground]` / `down` / `status`: the whole system on this machine, for trying the
//!   API by hand.
//! - `bench`: the buy path's throughput as ratios against a bare axum + one-Lua-call baseline.
//! - `setup`: installs the servers and tools (Debian packages, the nisshi broker).
//! - `drill [--part NAME] [--short]`: the crash drills (SIGKILL of each part mid-sale).
//! - `ci`: every check and test; `.ci/run` runs exactly this.

mod bench;
mod canary;
mod ci;
mod drill;
mod sale;
mod services;
mod setup;
mod up;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = args
        .split_first()
        .map_or(("help", &[][..]), |(c, r)| (c.as_str(), r));
    match command {
        "sale" => sale::run(rest),
        "bench" => bench::run(rest),
        "up" => up::up(rest),
        "down" => up::down(),
        "status" => up::status(),
        "setup" => setup::run(),
        "ci" => ci::run(),
        "canary" => canary::run(rest),
        "drill" => drill::run(rest),
        "help" | "--help" | "-h" => {
            println!("{}", HELP.trim());
            Ok(())
        }
        other => anyhow::bail!("unknown command {other:?}\n\n{}", HELP.trim()),
    }
}

const HELP: &str = "
usage: cargo xtask <command>

  sale [--requests N] [--concurrency C] [--stock S] [--hey]
                     the main job: a local flash sale end to end, with its report
                     (defaults: the seed's 100000 requests, 1000 concurrent, 10000 items;
                     --hey also runs the seed's hey command against the stack)
  bench [--seconds N] [--connections C] [--rounds R] [--broker sqlite|memory]
                     the benchmark: order-service paths against a bare axum handler
                     making one Redis Lua call, and accepted orders straight at order-service,
                     through a bare proxy and through the gateway in R rotating rounds
                     (defaults: 10 s, 1000 connections, 5 rounds, the broker's log in SQLite
                     as in the main job), same run, with wrk (docs/performance.md)
  drill [--part NAME] [--short]
                     the crash drills: for each of order-service, inventory-service, gateway,
                     redis, broker, mariadb and order-service-pair, a sale through the gateway
                     with buyers who retry, a SIGKILL of that part mid-load, its restart, and
                     the invariants read from MySQL and Redis (--short: the CI's smaller sale)
  up [--foreground]  start the stack and the services and print where they listen
  down               stop what `up` started
  status             show what `up` started
  setup              install redis-server, mariadb-server, hey and the nisshi broker if missing
  ci                 every check and test (what .ci/run runs)
  canary promote [--dry-run] [...]
                     the canary's verdict from Prometheus, then promote or abort it (--help)
";
