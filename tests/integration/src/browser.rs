//! A real browser for the tests: Debian's Chromium, headless, one private profile per call.
//!
//! Each call is a separate Chromium process that loads the page, runs its scripts and exits:
//! `--dump-dom` prints the DOM after the load (what the page's scripts made of it),
//! `--screenshot` saves a PNG. Bounded by [`DEADLINE`]; a Chromium that hangs is killed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::stack::find_program;

/// The longest one page load may take.
const DEADLINE: Duration = Duration::from_secs(60);

/// Where the tests leave what a person may want to look at (screenshots, reports).
pub fn artifacts_dir(test: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("test-artifacts").join(test)
}

/// Chromium's path, or how to install it.
pub fn chromium() -> anyhow::Result<PathBuf> {
    ["chromium", "chromium-browser"]
        .into_iter()
        .find_map(find_program)
        .context("no Chromium on PATH: apt-get install chromium (cargo xtask ci installs it)")
}

/// The DOM of `url` once loaded and its scripts ran.
pub fn dump_dom(url: &str) -> anyhow::Result<String> {
    run(&["--dump-dom", url])
}

/// A PNG of `url` at `width` x `height` CSS pixels, saved to `out`.
pub fn screenshot(url: &str, out: &Path, (width, height): (u32, u32)) -> anyhow::Result<()> {
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(out);
    run(&[
        &format!("--screenshot={}", out.display()),
        &format!("--window-size={width},{height}"),
        "--hide-scrollbars",
        url,
    ])?;
    if !out.is_file() {
        bail!("Chromium saved no screenshot at {}", out.display());
    }
    Ok(())
}

fn run(args: &[&str]) -> anyhow::Result<String> {
    let profile = tempfile::tempdir()?;
    // To a file: a pipe nobody reads while waiting would fill and stall Chromium.
    let log = profile.path().join("chromium.log");
    let mut child = Command::new(chromium()?)
        .args([
            "--headless",
            // As root (CI), Chromium refuses to start with its sandbox.
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            &format!("--user-data-dir={}", profile.path().display()),
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .context("starting Chromium")?;
    let stdout = child.stdout.take().expect("piped stdout");
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            bail!("Chromium did not finish within {DEADLINE:?}: {args:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = reader.join().expect("the reader thread")?;
    if !status.success() {
        let err = std::fs::read_to_string(&log).unwrap_or_default();
        bail!("Chromium failed ({status}): {args:?}\n{err}");
    }
    Ok(out)
}
