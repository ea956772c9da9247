//! `cargo xtask <command>`: the project's commands (`cargo xtask help` lists them with their
//! options; clap writes that text from the doc comments below).

mod bench;
mod canary;
mod ci;
mod drill;
mod hostile;
mod live;
mod pay;
mod report;
mod sale;
mod services;
mod setup;
mod tail;
mod up;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "The flash-sale project's commands"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The main job: a local flash sale end to end, with its report.
    ///
    /// Installs what is missing,
    /// builds the services, starts a private stack and the services, opens a sale, drives the
    /// seed's load at it through the public API, waits for the queue to drain and prints the
    /// report with the invariant check.
    Sale(sale::Args),
    /// The benchmark, as ratios to a bare handler making one Redis Lua call.
    ///
    /// Order-service paths against a bare axum handler making one Redis Lua call, and accepted orders straight at order-service, through a bare proxy and through the
    /// gateway in rotating rounds, in one run, with wrk (docs/performance.md).
    Bench(bench::Args),
    /// The crash drills: a SIGKILL of each part mid-sale, and the invariants after.
    ///
    /// For each part, a sale through the gateway with buyers who retry, a SIGKILL of that part mid-load, its restart, and the invariants read from MySQL and Redis.
    Drill(drill::Args),
    /// Start the stack and the services on this machine and print where they listen.
    Up {
        /// Stay in the terminal until Ctrl-C instead of running in the background.
        #[arg(long)]
        foreground: bool,
    },
    /// Stop what `up` started.
    Down,
    /// Pay for an order of what `up` started, through the payment simulator (a stand-in for
    /// the provider's signed callback).
    Pay(pay::Args),
    /// The report of a finished activity from MySQL and Redis: sold, a timeline, the drift,
    /// the invariants (of what `up` started, or of the stores given).
    Report(report::Args),
    /// Show what `up` started.
    Status,
    /// Install redis-server, mariadb-server, hey, wrk, chromium and the nisshi broker if missing.
    Setup,
    /// Every check and test (what .ci/run runs).
    Ci,
    /// A canary (staging or production): its verdict, then promote or abort.
    Canary {
        #[command(subcommand)]
        command: canary::Command,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Sale(args) => sale::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Drill(args) => drill::run(args),
        Command::Up { foreground } => up::up(foreground),
        Command::Down => up::down(),
        Command::Pay(args) => pay::run(args),
        Command::Report(args) => report::run(args),
        Command::Status => up::status(),
        Command::Setup => setup::run(),
        Command::Ci => ci::run(),
        Command::Canary { command } => canary::run(command),
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
