//! Installs what a fresh Debian machine lacks: the servers from apt, the broker from crates.io.

use std::process::Command;

use anyhow::{Context, bail};
use flash_sale_tests::stack::{BROKER_PROGRAM, BROKER_PROGRAM_ENV, find_program};

/// The broker's crate, its pinned version and the features of its SQLite log.
const BROKER_CRATE: (&str, &str, &str) = ("nisshi", "0.8.1", "dynostore,libsql");

/// nisshi 0.8.1 needs this rustc or newer (its dependencies use 1.96 features).
const BROKER_RUSTC: (u32, u32) = (1, 96);

/// Debian packages and the program each provides.
const APT: &[(&str, &str)] = &[
    ("redis-server", "redis-server"),
    ("mariadbd", "mariadb-server"),
    ("mariadb-install-db", "mariadb-server"),
    ("hey", "hey"),
    ("wrk", "wrk"),
    // The browser tests (the reports, the buyer's page), and a font for its screenshots.
    ("chromium", "chromium"),
    // The WebDriver of Debian's Chromium, for the buyer page's browser tests.
    ("chromedriver", "chromium-driver"),
    (
        "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
        "fonts-dejavu-core",
    ),
    // The activity report's Prometheus test runs a private server (flash_sale_tests::prometheus);
    // the same package gives tests/deploy/install-tools.sh its promtool.
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
];

/// Debian's postinst starts a system Prometheus on :9090 (unless a policy-rc.d forbids it); the
/// tests run their own on free ports, so stop it and keep it from starting at boot. Best effort:
/// a failure here is printed, and does not fail the setup.
fn stop_system_prometheus(sudo: &[&str]) {
    let steps: &[(&str, &[&str])] = if std::path::Path::new("/run/systemd/system").is_dir() {
        &[("systemctl", &["disable", "--now", "prometheus"])]
    } else {
        &[
            ("/etc/init.d/prometheus", &["stop"]),
            ("update-rc.d", &["prometheus", "disable"]),
        ]
    };
    for (program, args) in steps {
        if let Err(e) = sh(sudo, program, args) {
            println!("setup: could not stop the system Prometheus: {e:#}");
        }
    }
}

/// A program on PATH, or for an absolute path, that file.
fn present(what: &str) -> bool {
    if what.starts_with('/') {
        std::path::Path::new(what).is_file()
    } else {
        find_program(what).is_some()
    }
}

pub(crate) fn run() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT
        .iter()
        .filter(|(program, _)| !present(program))
        .map(|(_, package)| *package)
        .collect();
    if !missing.is_empty() {
        let mut packages = missing.clone();
        packages.dedup();
        println!("setup: installing {} with apt-get", packages.join(", "));
        let sudo = if is_root() { vec![] } else { vec!["sudo"] };
        sh(&sudo, "apt-get", &["update", "-qq"])?;
        let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
        args.extend(&packages);
        sh(&sudo, "apt-get", &args)?;
        if packages.contains(&"prometheus") {
            stop_system_prometheus(&sudo);
        }
    }
    let broker_given = std::env::var_os(BROKER_PROGRAM_ENV).is_some();
    if !broker_given && find_program(BROKER_PROGRAM).is_none() {
        install_broker()?;
    }
    for (program, package) in APT {
        if !present(program) {
            bail!("{program} is still missing after installing {package}");
        }
    }
    if !broker_given && find_program(BROKER_PROGRAM).is_none() {
        bail!("{BROKER_PROGRAM} is still missing after cargo install");
    }
    Ok(())
}

/// `cargo install` of the broker, with the default toolchain if it is new enough, else with a
/// rustup toolchain that is (the image's nightly): the services themselves build on stable.
fn install_broker() -> anyhow::Result<()> {
    let (name, version, features) = BROKER_CRATE;
    let toolchain = ["stable", "nightly", "beta"]
        .into_iter()
        .find(|t| rustc_version(t).is_some_and(|v| v >= BROKER_RUSTC))
        .with_context(|| {
            format!(
                "{name} {version} needs rustc {}.{} or newer and no rustup toolchain here has it \
                 (`rustup toolchain list`); install one, or put a `{BROKER_PROGRAM}` binary on PATH",
                BROKER_RUSTC.0, BROKER_RUSTC.1
            )
        })?;
    println!(
        "setup: installing the {name} {version} broker from crates.io with the {toolchain} \
         toolchain (about 15 minutes on 2 cores, once)"
    );
    let status = Command::new("cargo")
        .arg(format!("+{toolchain}"))
        .args(["install", name, "--version", version, "--locked"])
        .args(["--no-default-features", "--features", features])
        // The workspace's own toolchain choice must not leak into the broker's build.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .status()
        .context("running cargo install")?;
    if !status.success() {
        bail!("cargo install {name} failed with {status}");
    }
    Ok(())
}

/// `(major, minor)` of a rustup toolchain's rustc, if that toolchain is installed.
fn rustc_version(toolchain: &str) -> Option<(u32, u32)> {
    let out = Command::new("rustc")
        .arg(format!("+{toolchain}"))
        .arg("--version")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut numbers = text.split_whitespace().nth(1)?.split(['.', '-']);
    Some((numbers.next()?.parse().ok()?, numbers.next()?.parse().ok()?))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn sh(prefix: &[&str], program: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = match prefix.first() {
        Some(p) => {
            let mut c = Command::new(p);
            c.arg(program);
            c
        }
        None => Command::new(program),
    };
    cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
    let status = cmd.status().with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed with {status}", args.join(" "));
    }
    Ok(())
}
