//! Checks on the Nix flake that need no Nix build.
//!
//! No Nix build can run on the machines this project is developed on (no binary cache, no
//! nixpkgs), so the flake is kept correct by what can run here:
//!
//! - every `.nix` file parses (`nix-instantiate --parse`), is formatted (`nixpkgs-fmt --check`)
//!   and has no dead code (`deadnix --fail`);
//! - the flake's real wiring (flake.nix and nix/) is evaluated by `nix-instantiate` with
//!   stand-ins for nixpkgs, crane and flake-utils (`eval.nix`), and what it produces is
//!   cross-checked against the workspace, docs/contracts.md, the Kubernetes bundle, the README
//!   and the CI pipeline;
//! - every flake input is pinned to a commit that docs/nix.md accounts for.
//!
//! A missing tool fails the test that needs it; `install-tools.sh` installs them all.
//!
//! Layout: this file holds the shared helpers (repository walking, running tools, the evaluated
//! flake, image references, flake references in prose); `tests/nix_files.rs` checks the Nix
//! files themselves; `tests/wiring.rs` checks what the flake builds and runs.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// What a test prints when a tool it needs is not installed.
pub const INSTALL_HINT: &str = "run tests/flake/install-tools.sh (as root on Debian)";

/// Directories never searched for sources: build output, VCS data, local state.
const SKIPPED_DIRS: &[&str] = &["target", "result", "node_modules"];

/// The repository root, two levels above this crate.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}

/// Reads a file of the repository, by path relative to the root.
pub fn read(relative: impl AsRef<Path>) -> String {
    let path = repo_root().join(relative.as_ref());
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Files under `dir` (relative to the root) whose names end in one of `suffixes`, sorted.
/// Hidden directories, build output and symbolic links (Nix `result` links) are skipped.
pub fn files_ending_with(dir: impl AsRef<Path>, suffixes: &[&str]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![repo_root().join(dir.as_ref())];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                if !name.starts_with('.') && !SKIPPED_DIRS.contains(&name.as_str()) {
                    pending.push(entry.path());
                }
            } else if kind.is_file() && suffixes.iter().any(|s| name.ends_with(s)) {
                found.push(entry.path());
            }
        }
    }
    found.sort();
    found
}

/// Runs `program` in the repository root. A tool that is not installed fails the test (it is
/// never skipped), with a hint on how to install it.
pub fn run<I, S>(program: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    match Command::new(program)
        .args(args)
        .current_dir(repo_root())
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{program}` is not installed: {INSTALL_HINT}")
        }
        Err(e) => panic!("cannot run `{program}`: {e}"),
    }
}

/// Stdout and stderr of a finished command, for failure messages.
pub fn describe(output: &Output) -> String {
    format!(
        "exit {}\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The flake's wiring for x86_64-linux, as `eval.nix` reports it (evaluated once per test
/// binary).
pub fn flake() -> &'static serde_json::Value {
    static FLAKE: OnceLock<serde_json::Value> = OnceLock::new();
    FLAKE.get_or_init(|| {
        let eval = Path::new(env!("CARGO_MANIFEST_DIR")).join("eval.nix");
        let root = repo_root();
        let output = run(
            "nix-instantiate",
            [
                "--eval".as_ref(),
                "--strict".as_ref(),
                "--json".as_ref(),
                eval.as_os_str(),
                "--argstr".as_ref(),
                "root".as_ref(),
                root.as_os_str(),
            ],
        );
        assert!(
            output.status.success(),
            "evaluating the flake failed: {}",
            describe(&output)
        );
        serde_json::from_slice(&output.stdout).expect("nix-instantiate prints JSON")
    })
}

/// The attribute names of a JSON object or the strings of a JSON array.
pub fn names(value: &serde_json::Value) -> Vec<String> {
    match value {
        serde_json::Value::Object(map) => map.keys().cloned().collect(),
        serde_json::Value::Array(items) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        other => panic!("expected an object or an array, got {other}"),
    }
}

/// Every image reference in a YAML document: the values of `image` keys at any depth, and the
/// `name` and `newName` of Kustomize `images:` entries.
pub fn image_refs(node: &serde_yaml::Value, found: &mut Vec<String>) {
    match node {
        serde_yaml::Value::Mapping(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    (Some("image"), serde_yaml::Value::String(reference)) => {
                        found.push(reference.clone());
                    }
                    (Some("images"), serde_yaml::Value::Sequence(entries)) => {
                        for entry in entries {
                            for field in ["name", "newName"] {
                                if let Some(reference) = entry.get(field).and_then(|v| v.as_str()) {
                                    found.push(reference.to_owned());
                                }
                            }
                        }
                    }
                    _ => image_refs(value, found),
                }
            }
        }
        serde_yaml::Value::Sequence(items) => {
            for item in items {
                image_refs(item, found);
            }
        }
        _ => {}
    }
}

/// The repository of an image reference: `reg:5000/flash-sale/gateway:1.0@sha256:..` ->
/// `reg:5000/flash-sale/gateway`.
pub fn repository(reference: &str) -> &str {
    let name = reference.split('@').next().unwrap_or(reference);
    match name.rsplit_once(':') {
        Some((head, tag)) if !tag.contains('/') => head,
        _ => name,
    }
}

/// The service of one of our images (`[registry/]flash-sale/<service>`), if it is one.
pub fn our_image(reference: &str) -> Option<&str> {
    let mut parts = repository(reference).rsplit('/');
    let service = parts.next()?;
    (parts.next()? == "flash-sale").then_some(service)
}

/// Which flake output a reference in prose points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FlakeRef {
    /// `.#checks.<system>.<name>`
    Check(String),
    /// `nix run .#<name>` or `.#apps.<system>.<name>`
    App(String),
    /// `nix build .#<name>`, `nix shell .#<name>` or `.#packages.<system>.<name>`
    Package(String),
    /// `nix develop .#<name>` or `.#devShells.<system>.<name>`
    DevShell(String),
    /// `.#<name>` anywhere else: any output of that name will do.
    Any(String),
}

/// Every `.#<attr>` reference to this flake in a text (README, CI pipeline).
pub fn flake_refs(text: &str) -> Vec<FlakeRef> {
    let mut refs = Vec::new();
    for line in text.lines() {
        let mut rest = line;
        while let Some(at) = rest.find(".#") {
            let before = &line[..line.len() - rest.len() + at];
            let attr: String = rest[at + 2..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
                .collect();
            rest = &rest[at + 2 + attr.len()..];
            let attr = attr.trim_end_matches('.');
            if attr.is_empty() {
                continue;
            }
            let path: Vec<&str> = attr.split('.').collect();
            // The nix subcommand this reference is an argument of, if it is one: only flags,
            // variables and other references may stand between them.
            let command = before.rsplit_once("nix ").and_then(|(_, call)| {
                let mut words = call.split_whitespace();
                let verb = words.next()?;
                words
                    .all(|w| w.starts_with('-') || w.starts_with('$') || w.starts_with(".#"))
                    .then_some(verb)
            });
            let kind = |name: &str| -> FlakeRef {
                let name = name.to_owned();
                match command {
                    Some("run") => FlakeRef::App(name),
                    Some("build" | "shell") => FlakeRef::Package(name),
                    Some("develop") => FlakeRef::DevShell(name),
                    _ => FlakeRef::Any(name),
                }
            };
            refs.push(match path.as_slice() {
                ["checks", _, name] => FlakeRef::Check((*name).to_owned()),
                ["apps", _, name] => FlakeRef::App((*name).to_owned()),
                ["packages", _, name] => FlakeRef::Package((*name).to_owned()),
                ["devShells", _, name] => FlakeRef::DevShell((*name).to_owned()),
                [name] => kind(name),
                _ => FlakeRef::Any(attr.to_owned()),
            });
        }
    }
    refs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_drop_tags_and_digests_but_keep_registry_ports() {
        assert_eq!(repository("flash-sale/gateway"), "flash-sale/gateway");
        assert_eq!(repository("flash-sale/gateway:1.2"), "flash-sale/gateway");
        assert_eq!(
            repository("reg:5000/flash-sale/gateway@sha256:abc"),
            "reg:5000/flash-sale/gateway"
        );
        assert_eq!(
            repository("reg:5000/flash-sale/gateway"),
            "reg:5000/flash-sale/gateway"
        );
        assert_eq!(
            our_image("ghcr.io/acme/flash-sale/order-service:v1"),
            Some("order-service")
        );
        assert_eq!(our_image("redis:7.2"), None);
        assert_eq!(our_image("docker.redpanda.com/redpandadata/redpanda"), None);
    }

    #[test]
    fn flake_references_are_classified_by_the_nix_command() {
        let text = "nix run .#sale\n`nix build .#gateway-image` and .#checks.x86_64-linux.vm-test.\n\
                    nix develop .#deploy --command x; see .#promote";
        assert_eq!(
            flake_refs(text),
            vec![
                FlakeRef::App("sale".into()),
                FlakeRef::Package("gateway-image".into()),
                FlakeRef::Check("vm-test".into()),
                FlakeRef::DevShell("deploy".into()),
                FlakeRef::Any("promote".into()),
            ]
        );
    }

    #[test]
    fn kustomize_image_entries_count_as_references() {
        let yaml: serde_yaml::Value = serde_yaml::from_str(
            "images:\n  - name: flash-sale/gateway\n    newName: reg/flash-sale/gateway\n\
             spec:\n  containers:\n    - image: redis:7\n",
        )
        .unwrap();
        let mut found = Vec::new();
        image_refs(&yaml, &mut found);
        assert_eq!(
            found,
            ["flash-sale/gateway", "reg/flash-sale/gateway", "redis:7"]
        );
    }
}
