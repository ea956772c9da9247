//! Installs what a fresh Debian machine lacks: the servers from apt, the broker from crates.io.

use std::process::Command;

use anyhow::{Context, bail};
use flash_sale_tests::stack::find_program;

/// Debian packages and the program each provides.
const APT: &[(&str, &str)] = &[
    ("redis-server", "redis-server"),
    ("mariadbd", "mariadb-server"),
    ("mariadb-install-db", "mariadb-server"),
    ("hey", "hey"),
    ("wrk", "wrk"),
];

pub(crate) fn run() -> anyhow::Result<()> {
    let missing: Vec<&str> = APT
        .iter()
        .filter(|(program, _)| find_program(program).is_none())
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
    }
    if find_program("tansu").is_none() {
        println!("setup: installing the tansu broker from crates.io (a few minutes, once)");
        let status = Command::new("cargo")
            .args([
                "install",
                "tansu",
                "--version",
                "0.6.0",
                "--locked",
                "--features",
                "dynostore,libsql",
            ])
            .status()
            .context("running cargo install")?;
        if !status.success() {
            bail!("cargo install tansu failed with {status}");
        }
    }
    for (program, package) in APT {
        if find_program(program).is_none() {
            bail!("{program} is still missing after installing {package}");
        }
    }
    if find_program("tansu").is_none() {
        bail!("tansu is still missing after cargo install");
    }
    Ok(())
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
