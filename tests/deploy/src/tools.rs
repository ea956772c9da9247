//! The external tools the checks run, found once and run with their output captured.
//!
//! Every lookup fails loudly: a check whose tool is missing must fail, never pass by skipping.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{Context, Result, bail};

const INSTALL_HINT: &str = "run tests/deploy/install-tools.sh (as root on Debian) to install it";

/// Where `install-tools.sh` puts the pip and npm installs.
pub fn tools_dir() -> PathBuf {
    crate::repo_path("tests/deploy/tools")
}

/// The first executable called `name` on `PATH`.
fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// An installed tool, by name on `PATH`; panics with the install hint when it is missing.
pub fn require(name: &str) -> PathBuf {
    on_path(name).unwrap_or_else(|| panic!("`{name}` is not installed: {INSTALL_HINT}"))
}

/// `kubernetes-validate`: the one in `tools/.venv` first, else one on `PATH`.
pub fn kubernetes_validate() -> PathBuf {
    let local = tools_dir().join(".venv/bin/kubernetes-validate");
    if is_executable(&local) {
        return local;
    }
    on_path("kubernetes-validate")
        .unwrap_or_else(|| panic!("`kubernetes-validate` is not installed: {INSTALL_HINT}"))
}

/// The CRD validation script with its npm packages installed next to it.
pub fn crd_validator() -> (PathBuf, PathBuf) {
    let script = tools_dir().join("validate-crds.mjs");
    let packages = tools_dir().join("node_modules/@kubernetes-models");
    assert!(
        packages.join("argo-rollouts").is_dir() && packages.join("prometheus-operator").is_dir(),
        "the @kubernetes-models packages are not installed in {}: {INSTALL_HINT}",
        tools_dir().display()
    );
    (require("node"), script)
}

/// Runs `program args...` with `stdin` fed in, and returns its output whatever its exit status.
pub fn run_with_input<I, S>(program: &Path, args: I, stdin: &[u8]) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let mut input = child.stdin.take().expect("stdin is piped");
    let data = stdin.to_vec();
    let writer = std::thread::spawn(move || input.write_all(&data));
    let output = child
        .wait_with_output()
        .with_context(|| format!("waiting for {}", program.display()))?;
    writer
        .join()
        .expect("stdin writer thread")
        .with_context(|| format!("writing to {}", program.display()))?;
    Ok(output)
}

/// Runs a command to completion and returns its stdout; a non-zero exit is an error that
/// carries both streams.
pub fn run_ok(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("starting {command:?}"))?;
    check(command, &output)?;
    Ok(String::from_utf8(output.stdout)?)
}

/// Turns a failed run into an error that shows what the tool said.
pub fn check(command: &Command, output: &Output) -> Result<()> {
    if !output.status.success() {
        bail!(
            "{command:?} failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
