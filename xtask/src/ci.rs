//! `cargo xtask ci`: every check and test, in the order a failure is cheapest to find.
//! `.ci/run` runs exactly this; the README names it as the test command.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

use crate::services::workspace_root;

pub(crate) fn run() -> anyhow::Result<()> {
    let root = workspace_root();
    step("install the servers and tools", crate::setup::run)?;
    for script in [
        "tests/deploy/install-tools.sh",
        "tests/flake/install-tools.sh",
    ] {
        if root.join(script).exists() {
            step(&format!("install tools ({script})"), || {
                cmd(&root, "bash", &[script], &[])
            })?;
        }
    }
    step("cargo fmt --check", || {
        cmd(&root, "cargo", &["fmt", "--all", "--", "--check"], &[])
    })?;
    step("cargo clippy -D warnings", || {
        cmd(
            &root,
            "cargo",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--locked",
                "--",
                "-D",
                "warnings",
            ],
            &[],
        )
    })?;
    step(
        "hermetic build (--locked --offline, SQLX_OFFLINE=true)",
        || {
            cmd(
                &root,
                "cargo",
                &["build", "--release", "--workspace", "--locked", "--offline"],
                &[("SQLX_OFFLINE", "true")],
            )
        },
    )?;
    step(
        "cargo test (unit, integration against private servers, manifests, flake)",
        || {
            cmd(
                &root,
                "cargo",
                &[
                    "test",
                    "--release",
                    "--workspace",
                    "--locked",
                    "--",
                    "--test-threads=2",
                ],
                &[],
            )
        },
    )?;
    step(
        "crash drills, short form (cargo xtask drill --short: SIGKILL of every part mid-sale)",
        || crate::drill::run(crate::drill::Args::short()),
    )?;
    println!("\nci: every step passed");
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<()> {
    println!("\n==> {name}");
    let started = std::time::Instant::now();
    f().with_context(|| format!("ci step failed: {name}"))?;
    println!("<== {name}: ok in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn cmd(dir: &Path, program: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<()> {
    let status = Command::new(program)
        .current_dir(dir)
        .args(args)
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed with {status}", args.join(" "));
    }
    Ok(())
}
